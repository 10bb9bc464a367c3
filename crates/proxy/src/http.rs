//! Plain HTTP/1.x helpers: the first request head of a proxy connection
//! (parsed with httparse, to tell CONNECT from a plain request), absolute-form
//! targets and authorities. Plain requests themselves are served by hyper in
//! `forward`, each checked on its own.

/// Largest request head the proxy reads.
pub const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 100;

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

/// What a connection's first bytes are, for the Host and SNI checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstBytes {
    /// A TLS record (`0x16`): the ClientHello's SNI is checked.
    Tls,
    /// A line `TOKEN SP ... HTTP/` (any case, after any blank lines): served
    /// as HTTP, so its Host is checked; what hyper cannot parse is refused.
    Http,
    /// Neither TLS nor a request line: raw bytes.
    Other,
    /// A prefix of what could still become a request line (`G`, `GET / HT`):
    /// more bytes are needed to tell.
    Undecided,
}

/// Classify a connection's first bytes. A request line is recognized
/// whatever its case and however it was split: anything that could still
/// become one is [`FirstBytes::Undecided`] until its line ends, so no
/// request can reach a server as raw bytes past the Host check (servers skip
/// blank lines before a request, RFC 9112 §2.2, and some take lower-case
/// methods).
pub fn classify(first: &[u8]) -> FirstBytes {
    let Some(&b0) = first.first() else {
        return FirstBytes::Undecided;
    };
    if b0 == crate::tls::CONTENT_HANDSHAKE {
        return FirstBytes::Tls;
    }
    let Some(start) = first
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n' | b' ' | b'\t'))
    else {
        return FirstBytes::Undecided;
    };
    let rest = &first[start..];
    let token = rest.iter().take_while(|b| is_tchar(**b)).count();
    if token == rest.len() {
        return FirstBytes::Undecided;
    }
    if token == 0 || !matches!(rest[token], b' ' | b'\t') {
        return FirstBytes::Other;
    }
    let line = &rest[token..];
    let Some(end) = line.iter().position(|b| *b == b'\n') else {
        return FirstBytes::Undecided;
    };
    let line = &line[..end];
    if line.windows(5).any(|w| w.eq_ignore_ascii_case(b"http/")) {
        FirstBytes::Http
    } else {
        FirstBytes::Other
    }
}

/// A byte of an HTTP token (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_absolute_form() {
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
    fn http_detection_and_authority() {
        use FirstBytes::*;
        for (bytes, want) in [
            (&b"GET / HTTP/1.1\r\n"[..], Http),
            (b"get / http/1.1\r\n", Http),
            (b"\r\n\r\nGET / HTTP/1.1\n", Http),
            (b"  Get\t/ HTTP/1.0\r\n", Http),
            (b"X-CUSTOM-METHOD-THAT-IS-LONG /x HTTP/1.1\r\n", Http),
            (b"", Undecided),
            (b"G", Undecided),
            (b"\r\n", Undecided),
            (b"GET / HT", Undecided),
            (b"get /", Undecided),
            (b"\x16\x03\x01", Tls),
            (b"SSH-2.0-OpenSSH\r\n", Other),
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Other),
            (b"*1\r\n$4\r\nPING\r\n", Other),
            (b"PING\r\n", Other),
            (b"SET k v\r\n", Other),
            (b"\x00GET / HTTP/1.1\r\n", Other),
        ] {
            assert_eq!(
                classify(bytes),
                want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        // A request behind empty lines is still parsed, so its Host is checked.
        match RequestHead::parse(b"\r\nGET / HTTP/1.1\r\nHost: evil.example\r\n\r\n") {
            Ok(head) => assert!(head
                .headers
                .iter()
                .any(|(n, v)| n == "host" && v == b"evil.example")),
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
