//! Plain HTTP/1.x: request heads (parsed with httparse), the rewrite that the
//! proxy forwards, and request-body framing.
//!
//! The proxy forwards exactly one request per client connection: it sends the
//! request upstream with `Connection: close`, forwards that request's body and
//! nothing after it, and relays the response until the upstream closes. A
//! second request on the connection is therefore never forwarded unchecked;
//! clients see the close and open a new connection, which is checked again.

/// Largest request head the proxy reads.
pub const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 100;

/// Hop-by-hop headers that are not forwarded (RFC 9110 7.6.1), plus the proxy
/// credentials header, which is for us and not for the origin.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "te",
    "trailer",
];

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(u64),
    Chunked,
}

/// A parsed request head.
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: String,
    /// The request target as sent (origin-form, absolute-form or authority-form).
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Bytes of the head including the final blank line.
    pub len: usize,
}

/// Why a head was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    Incomplete,
    TooLarge,
    Bad(String),
}

/// Could these first bytes be an HTTP/1 request line (`TOKEN SP`)? Leading
/// empty lines count as HTTP too: servers skip them (RFC 9112 §2.2), so they
/// must not turn a request into unchecked raw bytes.
pub fn looks_like_http(first: &[u8]) -> bool {
    if matches!(first.first(), Some(b'\r' | b'\n')) {
        return true;
    }
    let token_len = first
        .iter()
        .take_while(|b| b.is_ascii_uppercase() || **b == b'-' || **b == b'_')
        .count();
    token_len > 0
        && token_len <= 20
        && match first.get(token_len) {
            Some(b' ') => true,
            None => true, // still arriving
            Some(_) => false,
        }
}

impl RequestHead {
    /// Parse a complete head from the start of `buf`.
    pub fn parse(buf: &[u8]) -> Result<RequestHead, HeadError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                let (Some(method), Some(target), Some(version)) =
                    (req.method, req.path, req.version)
                else {
                    return Err(HeadError::Bad("incomplete request line".into()));
                };
                Ok(RequestHead {
                    method: method.to_string(),
                    target: target.to_string(),
                    version,
                    headers: req
                        .headers
                        .iter()
                        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                        .collect(),
                    len,
                })
            }
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => Err(HeadError::TooLarge),
            Ok(httparse::Status::Partial) => Err(HeadError::Incomplete),
            Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
            Err(e) => Err(HeadError::Bad(e.to_string())),
        }
    }

    /// All values of a header (lower-case name).
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The one value of a header; an error if it appears more than once.
    pub fn single<'a>(&'a self, name: &'a str) -> Result<Option<&'a str>, HeadError> {
        let mut it = self.all(name);
        let first = it.next();
        if it.next().is_some() {
            return Err(HeadError::Bad(format!("more than one {name} header")));
        }
        first
            .map(|v| {
                std::str::from_utf8(v)
                    .map(str::trim)
                    .map_err(|_| HeadError::Bad(format!("{name} header is not text")))
            })
            .transpose()
    }

    /// How the body is framed. Ambiguous framing (both Content-Length and
    /// Transfer-Encoding, differing lengths, codings other than `chunked`)
    /// is refused: it is how requests are smuggled.
    pub fn body(&self) -> Result<BodyKind, HeadError> {
        let te: Vec<&[u8]> = self.all("transfer-encoding").collect();
        let cl: Vec<&[u8]> = self.all("content-length").collect();
        if !te.is_empty() {
            if !cl.is_empty() {
                return Err(HeadError::Bad(
                    "both Content-Length and Transfer-Encoding".into(),
                ));
            }
            if te.len() == 1 && te[0].trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Ok(BodyKind::Chunked);
            }
            return Err(HeadError::Bad("unsupported Transfer-Encoding".into()));
        }
        let mut len = None;
        for v in cl {
            let n: u64 = std::str::from_utf8(v)
                .ok()
                .map(str::trim)
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| HeadError::Bad("bad Content-Length".into()))?;
            if len.is_some_and(|l| l != n) {
                return Err(HeadError::Bad("conflicting Content-Length".into()));
            }
            len = Some(n);
        }
        Ok(match len {
            Some(0) | None => BodyKind::None,
            Some(n) => BodyKind::Length(n),
        })
    }

    /// Is this a protocol upgrade (WebSocket)?
    pub fn is_upgrade(&self) -> bool {
        self.all("upgrade").next().is_some()
            && self.all("connection").any(|v| {
                v.split(|b| *b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
            })
    }

    /// The head to send upstream: origin-form target, hop-by-hop headers
    /// dropped, `Connection: close` (or `Connection: upgrade` for upgrades).
    pub fn rewrite(&self, origin_target: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len + 32);
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(origin_target.as_bytes());
        out.extend_from_slice(if self.version == 0 {
            b" HTTP/1.0\r\n"
        } else {
            b" HTTP/1.1\r\n"
        });
        let upgrade = self.is_upgrade();
        for (name, value) in &self.headers {
            if HOP_BY_HOP.contains(&name.as_str()) {
                continue;
            }
            if name == "upgrade" && !upgrade {
                continue;
            }
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(if upgrade {
            b"Connection: upgrade\r\n\r\n"
        } else {
            b"Connection: close\r\n\r\n"
        });
        out
    }
}

/// An absolute-form target split up: `http://host[:port]/path?q`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbsoluteTarget {
    pub host: String,
    pub port: u16,
    /// Origin-form: path and query, at least `/`.
    pub origin: String,
}

/// Parse an absolute-form target. Only `http://` is valid here (HTTPS goes
/// through CONNECT). Userinfo is refused.
pub fn parse_absolute(target: &str) -> Result<AbsoluteTarget, String> {
    let scheme_end = target
        .find("://")
        .ok_or_else(|| "not an absolute URI".to_string())?;
    let scheme = &target[..scheme_end];
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(format!(
            "scheme `{scheme}` is not proxied (use CONNECT for https)"
        ));
    }
    let rest = &target[scheme_end + 3..];
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..auth_end];
    let mut origin = rest[auth_end..].to_string();
    if let Some(i) = origin.find('#') {
        origin.truncate(i);
    }
    if origin.is_empty() || origin.starts_with('?') {
        origin.insert(0, '/');
    }
    if authority.contains('@') {
        return Err("userinfo in the URI is not allowed".into());
    }
    let (host, port) = split_authority(authority, 80)?;
    Ok(AbsoluteTarget { host, port, origin })
}

/// Split `host[:port]` / `[v6][:port]`; `default` when there is no port.
pub fn split_authority(authority: &str, default: u16) -> Result<(String, u16), String> {
    let bad = || format!("bad authority `{authority}`");
    if authority.is_empty() {
        return Err(bad());
    }
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after {
            "" => default,
            p => p
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .filter(|p| *p != 0)
                .ok_or_else(bad)?,
        };
        return Ok((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => {
            let port = p.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
            Ok((h.to_string(), port))
        }
        Some(_) => Err(bad()),
        None => Ok((authority.to_string(), default)),
    }
}

/// Does `host` (a Host header or URI authority host) name the claimed host?
/// Case-insensitive, a trailing dot ignored.
pub fn same_host(a: &str, b: &str) -> bool {
    let trim = |s: &str| s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    trim(a) == trim(b)
}

/// Incremental parser of a chunked body: tells how many of the next bytes
/// still belong to the body, so the proxy can stop exactly at its end.
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
    /// Length of the current size or trailer line.
    line: usize,
    /// The chunk size read so far.
    partial: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    SizeExt,
    SizeLf,
    Data(u64),
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

/// Longest chunk-size or trailer line accepted.
const MAX_CHUNK_LINE: usize = 4096;

impl Chunked {
    /// Consume body bytes from `buf`; returns how many belong to the body.
    /// After [`is_done`](Self::is_done), nothing more does.
    pub fn advance(&mut self, buf: &[u8]) -> Result<usize, String> {
        use ChunkState::*;
        let mut i = 0;
        while i < buf.len() && self.state != Done {
            let b = buf[i];
            match self.state {
                Size => {
                    self.line += 1;
                    if self.line > MAX_CHUNK_LINE {
                        return Err("chunk size line too long".into());
                    }
                    match b {
                        b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                            let d = u64::from((b as char).to_digit(16).unwrap_or(0));
                            self.partial = self
                                .partial
                                .checked_mul(16)
                                .and_then(|v| v.checked_add(d))
                                .ok_or("chunk size overflow")?;
                        }
                        b';' | b' ' | b'\t' => self.state = SizeExt,
                        b'\r' => self.state = SizeLf,
                        _ => return Err("bad chunk size".into()),
                    }
                    i += 1;
                }
                SizeExt => {
                    self.line += 1;
                    if self.line > MAX_CHUNK_LINE {
                        return Err("chunk extension too long".into());
                    }
                    if b == b'\r' {
                        self.state = SizeLf;
                    }
                    i += 1;
                }
                SizeLf => {
                    if b != b'\n' {
                        return Err("bad chunk size line ending".into());
                    }
                    self.line = 0;
                    let n = std::mem::take(&mut self.partial);
                    self.state = if n == 0 { TrailerStart } else { Data(n) };
                    i += 1;
                }
                Data(n) => {
                    let take = (buf.len() - i).min(usize::try_from(n).unwrap_or(usize::MAX));
                    i += take;
                    let left = n - take as u64;
                    self.state = if left == 0 { DataCr } else { Data(left) };
                }
                DataCr => {
                    if b != b'\r' {
                        return Err("chunk data not followed by CRLF".into());
                    }
                    self.state = DataLf;
                    i += 1;
                }
                DataLf => {
                    if b != b'\n' {
                        return Err("chunk data not followed by CRLF".into());
                    }
                    self.state = Size;
                    i += 1;
                }
                TrailerStart => {
                    self.state = if b == b'\r' { EndLf } else { Trailer };
                    self.line = 1;
                    i += 1;
                }
                Trailer => {
                    self.line += 1;
                    if self.line > MAX_CHUNK_LINE {
                        return Err("trailer line too long".into());
                    }
                    if b == b'\r' {
                        self.state = TrailerLf;
                    }
                    i += 1;
                }
                TrailerLf => {
                    if b != b'\n' {
                        return Err("bad trailer line ending".into());
                    }
                    self.state = TrailerStart;
                    i += 1;
                }
                EndLf => {
                    if b != b'\n' {
                        return Err("bad end of chunked body".into());
                    }
                    self.state = Done;
                    i += 1;
                }
                Done => {}
            }
        }
        Ok(i)
    }

    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rewrites_absolute_form() {
        let raw = b"GET http://Example.com:8080/a?b=1 HTTP/1.1\r\nHost: example.com:8080\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive\r\nUser-Agent: t\r\n\r\nextra";
        let head = RequestHead::parse(raw).unwrap();
        assert_eq!(head.method, "GET");
        assert_eq!(head.len, raw.len() - 5);
        let t = parse_absolute(&head.target).unwrap();
        assert_eq!(
            t,
            AbsoluteTarget {
                host: "Example.com".into(),
                port: 8080,
                origin: "/a?b=1".into()
            }
        );
        let out = String::from_utf8(head.rewrite(&t.origin)).unwrap();
        assert_eq!(
            out,
            "GET /a?b=1 HTTP/1.1\r\nhost: example.com:8080\r\nuser-agent: t\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(parse_absolute("http://x").unwrap().origin, "/");
        assert_eq!(parse_absolute("http://x?q").unwrap().origin, "/?q");
        assert_eq!(parse_absolute("http://[::1]:81/").unwrap().port, 81);
        assert!(parse_absolute("https://x/").is_err());
        assert!(parse_absolute("http://u:p@x/").is_err());
        assert!(parse_absolute("/relative").is_err());
    }

    #[test]
    fn partial_and_oversized_heads() {
        assert_eq!(
            RequestHead::parse(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap_err(),
            HeadError::Incomplete
        );
        let mut big = b"GET / HTTP/1.1\r\n".to_vec();
        while big.len() < MAX_HEAD {
            big.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert_eq!(RequestHead::parse(&big).unwrap_err(), HeadError::TooLarge);
        assert!(matches!(
            RequestHead::parse(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"),
            Err(HeadError::Bad(_))
        ));
    }

    #[test]
    fn body_framing_and_smuggling_checks() {
        let h = |extra: &str| {
            RequestHead::parse(format!("POST / HTTP/1.1\r\nHost: x\r\n{extra}\r\n").as_bytes())
                .unwrap()
        };
        assert_eq!(h("").body().unwrap(), BodyKind::None);
        assert_eq!(
            h("Content-Length: 5\r\n").body().unwrap(),
            BodyKind::Length(5)
        );
        assert_eq!(
            h("Content-Length: 5\r\nContent-Length: 5\r\n")
                .body()
                .unwrap(),
            BodyKind::Length(5)
        );
        assert_eq!(
            h("Transfer-Encoding: Chunked\r\n").body().unwrap(),
            BodyKind::Chunked
        );
        for bad in [
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: gzip, chunked\r\n",
            "Content-Length: -1\r\n",
            "Content-Length: +5\r\n",
        ] {
            assert!(h(bad).body().is_err(), "{bad:?}");
        }
        assert!(h("Host: y\r\n").single("host").is_err());
    }

    #[test]
    fn chunked_body_ends_exactly() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-T: 1\r\n\r\nGET /next HTTP/1.1\r\n";
        let end = body.len() - b"GET /next HTTP/1.1\r\n".len();
        let mut c = Chunked::default();
        assert_eq!(c.advance(body).unwrap(), end);
        assert!(c.is_done());
        // Byte by byte gives the same.
        let mut c = Chunked::default();
        let mut used = 0;
        for b in body.iter() {
            used += c.advance(std::slice::from_ref(b)).unwrap();
            if c.is_done() {
                break;
            }
        }
        assert_eq!(used, end);
        let mut c = Chunked::default();
        assert_eq!(c.advance(b"0\r\n\r\n").unwrap(), 5);
        assert!(c.is_done());
        assert!(Chunked::default().advance(b"zz\r\n").is_err());
        assert!(Chunked::default()
            .advance(b"ffffffffffffffffff\r\n")
            .is_err());
        assert!(Chunked::default().advance(b"2\r\nabX").is_err());
    }

    #[test]
    fn http_detection_and_authority() {
        assert!(looks_like_http(b"GET / HTTP/1.1"));
        assert!(looks_like_http(b"PO"));
        assert!(!looks_like_http(b"\x16\x03\x01"));
        assert!(!looks_like_http(b"SSH-2.0-OpenSSH"));
        assert!(!looks_like_http(b"get / HTTP/1.1"));
        assert!(looks_like_http(b"\r\nGET / HTTP/1.1"));
        // A request behind empty lines is still parsed, so its Host is checked.
        match RequestHead::parse(b"\r\nGET / HTTP/1.1\r\nHost: evil.example\r\n\r\n") {
            Ok(head) => assert!(head.all("host").any(|h| h == b"evil.example")),
            Err(HeadError::Bad(_)) => {} // refused outright: also safe
            Err(other) => panic!("{other:?}"),
        }
        assert_eq!(split_authority("a.b:443", 80).unwrap(), ("a.b".into(), 443));
        assert_eq!(split_authority("a.b", 80).unwrap(), ("a.b".into(), 80));
        assert_eq!(split_authority("[::1]:8", 80).unwrap(), ("::1".into(), 8));
        assert!(split_authority("a.b:0", 80).is_err());
        assert!(split_authority("a:b:c", 80).is_err());
        assert!(same_host("Allowed.TEST.", "allowed.test"));
        assert!(!same_host("denied.test", "allowed.test"));
    }
}
