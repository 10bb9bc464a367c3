//! Just enough TLS to read the server name from a ClientHello.
//!
//! Hand-written (about a hundred lines with bounds checks) instead of pulling
//! in a full TLS parser: we need one extension of one message. Every length is
//! checked against the bytes we hold; the input is hostile.

/// The most ClientHello bytes we buffer (TLS records carry at most 16 KiB).
pub const MAX_HELLO: usize = 16 * 1024 + 5;

pub(crate) const CONTENT_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const EXT_SERVER_NAME: u16 = 0x0000;
const NAME_TYPE_HOST: u8 = 0x00;

/// What the buffered bytes say so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// Need more bytes to decide.
    Incomplete,
    /// A complete ClientHello; the SNI host name if it has one.
    Complete(Option<String>),
    /// Not a well-formed ClientHello.
    Malformed(&'static str),
}

/// Does this look like the start of a TLS handshake record?
pub fn looks_like_tls(first: &[u8]) -> bool {
    first.first() == Some(&CONTENT_HANDSHAKE)
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

/// Parse the buffered start of a TLS connection. The handshake message may
/// span several records; their payloads are joined (bounded by [`MAX_HELLO`]).
pub fn parse_client_hello(buf: &[u8]) -> Hello {
    // Reassemble the handshake payload from consecutive handshake records.
    let mut payload: Vec<u8> = Vec::new();
    let mut rest = buf;
    let needed = loop {
        if rest.len() < 5 {
            return Hello::Incomplete;
        }
        if rest[0] != CONTENT_HANDSHAKE {
            return Hello::Malformed("not a handshake record");
        }
        if rest[1] != 3 {
            return Hello::Malformed("unknown record version");
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len == 0 || len > 16 * 1024 {
            return Hello::Malformed("bad record length");
        }
        let Some(body) = rest.get(5..5 + len) else {
            return Hello::Incomplete;
        };
        payload.extend_from_slice(body);
        rest = &rest[5 + len..];
        if payload.len() >= 4 {
            if payload[0] != HANDSHAKE_CLIENT_HELLO {
                return Hello::Malformed("first handshake message is not a ClientHello");
            }
            let msg_len = (usize::from(payload[1]) << 16)
                | (usize::from(payload[2]) << 8)
                | usize::from(payload[3]);
            if msg_len + 4 > MAX_HELLO {
                return Hello::Malformed("ClientHello too large");
            }
            if payload.len() >= msg_len + 4 {
                break msg_len;
            }
        }
        if payload.len() > MAX_HELLO {
            return Hello::Malformed("ClientHello too large");
        }
    };
    match client_hello_sni(&payload[4..4 + needed]) {
        Ok(sni) => Hello::Complete(sni),
        Err(why) => Hello::Malformed(why),
    }
}

fn client_hello_sni(body: &[u8]) -> Result<Option<String>, &'static str> {
    let mut r = Reader { buf: body };
    let short = "truncated ClientHello";
    r.take(2).ok_or(short)?; // legacy_version
    r.take(32).ok_or(short)?; // random
    r.vec8().ok_or(short)?; // legacy_session_id
    r.vec16().ok_or(short)?; // cipher_suites
    r.vec8().ok_or(short)?; // legacy_compression_methods
    if r.buf.is_empty() {
        return Ok(None); // no extensions at all
    }
    let mut exts = Reader {
        buf: r.vec16().ok_or(short)?,
    };
    let mut sni = None;
    while !exts.buf.is_empty() {
        let ty = exts.u16().ok_or(short)?;
        let data = exts.vec16().ok_or(short)?;
        if ty != EXT_SERVER_NAME {
            continue;
        }
        if sni.is_some() {
            return Err("duplicate server_name extension");
        }
        let mut ext = Reader { buf: data };
        let mut list = Reader {
            buf: ext.vec16().ok_or(short)?,
        };
        while !list.buf.is_empty() {
            let name_type = list.u8().ok_or(short)?;
            let name = list.vec16().ok_or(short)?;
            if name_type == NAME_TYPE_HOST {
                if sni.is_some() {
                    return Err("more than one host name in server_name");
                }
                let name = std::str::from_utf8(name).map_err(|_| "server name is not UTF-8")?;
                sni = Some(name.to_string());
            }
        }
    }
    Ok(sni)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ClientHello record with an optional SNI (test helper).
    pub(crate) fn client_hello(sni: Option<&str>) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut exts = Vec::new();
        // An unrelated extension first (supported_versions).
        exts.extend_from_slice(&[0x00, 0x2b, 0, 3, 2, 3, 4]);
        if let Some(name) = sni {
            let n = name.len() as u16;
            let mut list = vec![0];
            list.extend_from_slice(&n.to_be_bytes());
            list.extend_from_slice(name.as_bytes());
            let mut ext = (list.len() as u16).to_be_bytes().to_vec();
            ext.extend_from_slice(&list);
            exts.extend_from_slice(&[0, 0]);
            exts.extend_from_slice(&(ext.len() as u16).to_be_bytes());
            exts.extend_from_slice(&ext);
        }
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn reads_sni() {
        let h = client_hello(Some("example.com"));
        assert_eq!(
            parse_client_hello(&h),
            Hello::Complete(Some("example.com".into()))
        );
        assert_eq!(
            parse_client_hello(&client_hello(None)),
            Hello::Complete(None)
        );
    }

    #[test]
    fn incomplete_until_the_whole_message_is_there() {
        let h = client_hello(Some("example.com"));
        for cut in 0..h.len() {
            assert_eq!(
                parse_client_hello(&h[..cut]),
                Hello::Incomplete,
                "cut {cut}"
            );
        }
    }

    #[test]
    fn message_split_over_two_records() {
        let h = client_hello(Some("split.example"));
        let hs = &h[5..];
        let (a, b) = hs.split_at(20);
        let mut two = Vec::new();
        for part in [a, b] {
            two.extend_from_slice(&[0x16, 3, 1]);
            two.extend_from_slice(&(part.len() as u16).to_be_bytes());
            two.extend_from_slice(part);
        }
        assert_eq!(
            parse_client_hello(&two),
            Hello::Complete(Some("split.example".into()))
        );
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        assert!(matches!(
            parse_client_hello(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"),
            Hello::Malformed(_)
        ));
        assert!(matches!(
            parse_client_hello(b"GET / HTTP/1.1\r\n"),
            Hello::Malformed(_)
        ));
        // Lengths that point past the end.
        let mut h = client_hello(Some("example.com"));
        let n = h.len();
        h[n - 13] = 0xff; // the name length
        assert!(matches!(parse_client_hello(&h), Hello::Malformed(_)));
        // Every byte flipped in turn: never a panic.
        let base = client_hello(Some("x.example"));
        for i in 0..base.len() {
            let mut m = base.clone();
            m[i] ^= 0xa5;
            let _ = parse_client_hello(&m);
        }
    }
}
