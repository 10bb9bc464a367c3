//! Rule targets: host patterns and CIDR ranges, each with an optional port.
//!
//! Host patterns are matched by a small label matcher rather than `globset`:
//! globset's `*` is a path glob (it stops at `/`, not at `.`), so `*.x` would
//! also match `a.b.x` only by accident of syntax and `evil-x` style tricks are
//! hard to reason about. Host names have their own grammar (dot-separated,
//! case-insensitive labels, an optional trailing dot), so the rules are:
//!
//! - `example.com` matches exactly that name (any case, trailing dot ignored);
//! - `*.example.com` matches one or more labels below `example.com`
//!   (`a.example.com`, `a.b.example.com`), never `example.com` itself;
//! - `**` matches every name and every literal IP address.
//!
//! A name target may end in ` raw` (`db.example.org:5432 raw`): the
//! connections it allows may carry bytes that are neither HTTP nor TLS. A
//! connection allowed by a name target without it must speak HTTP (whose
//! Host is checked) or TLS (whose SNI is checked), so that the name the
//! policy allowed is the name the server sees (docs/egress.md).

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// What a rule's host part matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// One exact, normalized name.
    Exact(String),
    /// `*.suffix`: any name with one or more labels below `suffix`.
    Subdomains(String),
    /// `**`: everything, names and literal addresses.
    Any,
}

/// A rule target: `HOST[:PORT]`, `*.HOST[:PORT]`, `**[:PORT]`, `CIDR[:PORT]`,
/// `IP[:PORT]`, or `[IPv6 or IPv6 CIDR]:PORT`; a name target may end in
/// ` raw`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Host {
        pattern: HostPattern,
        port: Option<u16>,
        /// ` raw`: the connections may carry bytes that are neither HTTP
        /// nor TLS.
        raw: bool,
    },
    /// A literal address is stored as a /32 or /128 network.
    Net { net: IpNet, port: Option<u16> },
}

/// Why a target or host string is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid target `{input}`: {why}")]
pub struct TargetError {
    pub input: String,
    pub why: String,
}

fn terr(input: &str, why: impl Into<String>) -> TargetError {
    TargetError {
        input: input.to_string(),
        why: why.into(),
    }
}

/// A host the guest asked for, after normalization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Name(String),
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

impl Host {
    /// Normalize a claimed host: a literal IP (IPv6 may be bracketed) or a DNS
    /// name (lower-cased, trailing dot removed, labels checked). Every
    /// spelling of an IPv4 address that the host's resolver would read as
    /// one (`inet_aton`: `2130706433`, `0x7f.1`, `0177.0.0.1`, `10.0.0.2.`)
    /// is that address, so address rules and blocked ranges see it as the
    /// proxy will connect to it.
    pub fn parse(s: &str) -> Result<Host, TargetError> {
        let inner = s
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(s);
        if let Ok(ip) = inner.parse::<IpAddr>() {
            return Ok(Host::Ip(ip));
        }
        if let Some(v4) = inet_aton(s.strip_suffix('.').unwrap_or(s)) {
            return Ok(Host::Ip(IpAddr::V4(v4)));
        }
        normalize_name(s).map(Host::Name)
    }
}

/// The IPv4 address glibc's `inet_aton` (and so `getaddrinfo`) reads `s` as,
/// if any: one to four parts separated by dots, each decimal, octal (`0`
/// prefix) or hex (`0x`), the last filling the remaining bytes.
pub fn inet_aton(s: &str) -> Option<std::net::Ipv4Addr> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut nums = Vec::with_capacity(parts.len());
    for p in &parts {
        let (digits, radix) = if let Some(h) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X"))
        {
            (h, 16)
        } else if p.len() > 1 && p.starts_with('0') {
            (&p[1..], 8)
        } else {
            (*p, 10)
        };
        if digits.is_empty() && radix != 16 {
            return None;
        }
        // `0x` alone is 0 to inet_aton.
        let n = if digits.is_empty() {
            0
        } else if digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            u64::from_str_radix(digits, radix).ok()?
        } else {
            return None;
        };
        if n > u64::from(u32::MAX) {
            return None;
        }
        nums.push(n as u32);
    }
    let (last, head) = nums.split_last()?;
    if head.iter().any(|n| *n > 255) {
        return None;
    }
    let room = 8 * (4 - head.len() as u32);
    if room < 32 && u64::from(*last) >> room != 0 {
        return None;
    }
    let mut v: u32 = 0;
    for (i, n) in head.iter().enumerate() {
        v |= n << (24 - 8 * i as u32);
    }
    Some(std::net::Ipv4Addr::from(v | last))
}

/// Lower-case a DNS name, drop one trailing dot and check its labels.
pub fn normalize_name(s: &str) -> Result<String, TargetError> {
    let name = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    if name.is_empty() {
        return Err(terr(s, "empty host name"));
    }
    if name.len() > 253 {
        return Err(terr(s, "host name longer than 253 characters"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(terr(s, "empty label in host name"));
        }
        if label.len() > 63 {
            return Err(terr(s, "label longer than 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(terr(
                s,
                "host names may contain only letters, digits, '-', '_' and '.' (use punycode for IDNs)",
            ));
        }
    }
    Ok(name)
}

fn parse_port(input: &str, p: &str) -> Result<u16, TargetError> {
    match p.parse::<u16>() {
        Ok(0) => Err(terr(input, "port 0 is not a port")),
        Ok(n) => Ok(n),
        Err(_) => Err(terr(input, format!("`{p}` is not a port (1-65535)"))),
    }
}

fn parse_net(input: &str, s: &str) -> Option<Result<IpNet, TargetError>> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(Ok(IpNet::from(ip)));
    }
    if s.contains('/') {
        return Some(match s.parse::<IpNet>() {
            // Store the network address so `10.1.2.3/24` and `10.1.2.0/24` agree.
            Ok(net) => Ok(net.trunc()),
            Err(_) => Err(terr(input, format!("`{s}` is not a CIDR range"))),
        });
    }
    None
}

impl Target {
    /// Parse the text form used in policy files and on the command line.
    pub fn parse(input: &str) -> Result<Target, TargetError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(terr(input, "empty target"));
        }
        let (s, raw) = match s.split_once(char::is_whitespace) {
            None => (s, false),
            Some((t, w)) if w.trim() == "raw" => (t, true),
            Some((_, w)) => {
                return Err(terr(
                    input,
                    format!(
                        "unexpected `{}` after the target (the only word allowed there is `raw`)",
                        w.trim()
                    ),
                ))
            }
        };
        let target = Target::parse_bare(input, s)?;
        match target {
            Target::Host { pattern, port, .. } => Ok(Target::Host { pattern, port, raw }),
            Target::Net { .. } if raw => Err(terr(
                input,
                "`raw` is for name targets: an address target allows any protocol already",
            )),
            net => Ok(net),
        }
    }

    fn parse_bare(input: &str, s: &str) -> Result<Target, TargetError> {
        // `[v6 or v6/len]` with an optional `:port`.
        if let Some(rest) = s.strip_prefix('[') {
            let Some((inside, after)) = rest.split_once(']') else {
                return Err(terr(input, "missing `]`"));
            };
            let port = match after {
                "" => None,
                p => match p.strip_prefix(':') {
                    Some(p) => Some(parse_port(input, p)?),
                    None => return Err(terr(input, "expected `:PORT` after `]`")),
                },
            };
            return match parse_net(input, inside) {
                Some(net) => Ok(Target::Net { net: net?, port }),
                None => Err(terr(input, "brackets are only for IPv6 addresses")),
            };
        }
        // More than one colon: a bare IPv6 address or range, no port.
        if s.matches(':').count() > 1 {
            return match parse_net(input, s) {
                Some(net) => Ok(Target::Net {
                    net: net?,
                    port: None,
                }),
                None => Err(terr(
                    input,
                    "not an IPv6 address or range (write `[ADDR]:PORT` for a port)",
                )),
            };
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(parse_port(input, p)?)),
            None => (s, None),
        };
        if let Some(net) = parse_net(input, host) {
            return Ok(Target::Net { net: net?, port });
        }
        // `10.0.0.2.`, `0x0a000002`: the address the resolver would read.
        if let Some(v4) = inet_aton(host.strip_suffix('.').unwrap_or(host)) {
            return Ok(Target::Net {
                net: IpNet::from(IpAddr::V4(v4)),
                port,
            });
        }
        let pattern = if host == "**" {
            HostPattern::Any
        } else if let Some(suffix) = host.strip_prefix("*.") {
            HostPattern::Subdomains(normalize_name(suffix).map_err(|e| terr(input, e.why))?)
        } else if host.contains('*') {
            return Err(terr(
                input,
                "`*` is allowed only as a leading `*.` label, or as `**` alone",
            ));
        } else {
            HostPattern::Exact(normalize_name(host).map_err(|e| terr(input, e.why))?)
        };
        Ok(Target::Host {
            pattern,
            port,
            raw: false,
        })
    }

    /// May the connections this target allows carry bytes that are neither
    /// HTTP nor TLS? Address targets: yes; name targets: with ` raw`.
    pub fn allows_raw(&self) -> bool {
        match self {
            Target::Host { raw, .. } => *raw,
            Target::Net { .. } => true,
        }
    }

    /// The port this target is limited to, if any.
    pub fn port(&self) -> Option<u16> {
        match self {
            Target::Host { port, .. } | Target::Net { port, .. } => *port,
        }
    }

    fn port_matches(&self, port: u16) -> bool {
        self.port().is_none_or(|p| p == port)
    }

    /// Does this target match the host the guest claimed, on `port`?
    /// Name patterns match names (and `**` also literal IPs); networks match
    /// literal IPs.
    pub fn matches_host(&self, host: &Host, port: u16) -> bool {
        if !self.port_matches(port) {
            return false;
        }
        match (self, host) {
            (
                Target::Host {
                    pattern: HostPattern::Any,
                    ..
                },
                _,
            ) => true,
            (Target::Host { pattern, .. }, Host::Name(name)) => match pattern {
                HostPattern::Exact(p) => p == name,
                HostPattern::Subdomains(suffix) => name
                    .strip_suffix(suffix.as_str())
                    .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
                HostPattern::Any => true,
            },
            (Target::Host { .. }, Host::Ip(_)) => false,
            (Target::Net { net, .. }, Host::Ip(ip)) => net.contains(&canonical(*ip)),
            (Target::Net { .. }, Host::Name(_)) => false,
        }
    }

    /// Does every host and port that `other` matches match this target too?
    /// (`*.example.org` covers `api.example.org:443` and `*.a.example.org`;
    /// `**` covers every name target; a target with a port covers only
    /// targets with the same port.) ` raw` plays no part.
    pub fn covers(&self, other: &Target) -> bool {
        let port = match (self.port(), other.port()) {
            (None, _) => true,
            (Some(a), Some(b)) => a == b,
            (Some(_), None) => false,
        };
        let under = |name: &str, suffix: &str| {
            name.strip_suffix(suffix)
                .is_some_and(|head| head.len() > 1 && head.ends_with('.'))
        };
        port && match (self, other) {
            (
                Target::Host { pattern: mine, .. },
                Target::Host {
                    pattern: theirs, ..
                },
            ) => match (mine, theirs) {
                (HostPattern::Any, _) => true,
                (_, HostPattern::Any) => false,
                (HostPattern::Exact(a), HostPattern::Exact(b)) => a == b,
                (HostPattern::Exact(_), HostPattern::Subdomains(_)) => false,
                (HostPattern::Subdomains(s), HostPattern::Exact(n)) => under(n, s),
                (HostPattern::Subdomains(s), HostPattern::Subdomains(t)) => s == t || under(t, s),
            },
            (
                Target::Host {
                    pattern: HostPattern::Any,
                    ..
                },
                Target::Net { .. },
            ) => true,
            (Target::Net { net: mine, .. }, Target::Net { net: theirs, .. }) => {
                mine.contains(theirs)
            }
            _ => false,
        }
    }

    /// Is this a network rule that covers `ip` on `port`?
    pub fn covers_addr(&self, ip: IpAddr, port: u16) -> bool {
        match self {
            Target::Net { net, .. } => self.port_matches(port) && net.contains(&canonical(ip)),
            Target::Host { .. } => false,
        }
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are treated as the IPv4
/// address they carry, so a range check cannot be side-stepped by mapping.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

impl fmt::Display for Target {
    /// The canonical text form; `Target::parse` of it gives the same target.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Host { pattern, port, raw } => {
                match pattern {
                    HostPattern::Exact(n) => f.write_str(n)?,
                    HostPattern::Subdomains(s) => write!(f, "*.{s}")?,
                    HostPattern::Any => f.write_str("**")?,
                }
                if let Some(p) = port {
                    write!(f, ":{p}")?;
                }
                if *raw {
                    f.write_str(" raw")?;
                }
                Ok(())
            }
            Target::Net { net, port } => {
                let single = net.prefix_len() == net.max_prefix_len();
                let text = if single {
                    net.addr().to_string()
                } else {
                    net.to_string()
                };
                match (net, port) {
                    (IpNet::V6(_), Some(p)) => write!(f, "[{text}]:{p}"),
                    (_, Some(p)) => write!(f, "{text}:{p}"),
                    (_, None) => f.write_str(&text),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Target {
        Target::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }
    fn name(s: &str) -> Host {
        Host::parse(s).unwrap()
    }

    #[test]
    fn exact_host_any_port_and_with_port() {
        assert!(t("example.com").matches_host(&name("example.com"), 443));
        assert!(t("example.com").matches_host(&name("EXAMPLE.com."), 80));
        assert!(!t("example.com").matches_host(&name("www.example.com"), 443));
        assert!(t("example.com:443").matches_host(&name("example.com"), 443));
        assert!(!t("example.com:443").matches_host(&name("example.com"), 80));
    }

    #[test]
    fn star_matches_one_or_more_labels_but_not_the_apex() {
        let p = t("*.example.com");
        assert!(p.matches_host(&name("a.example.com"), 1));
        assert!(p.matches_host(&name("a.b.example.com"), 1));
        assert!(!p.matches_host(&name("example.com"), 1));
        assert!(!p.matches_host(&name("badexample.com"), 1));
        assert!(!p.matches_host(&name("example.com.evil"), 1));
    }

    #[test]
    fn double_star_matches_everything() {
        let p = t("**");
        assert!(p.matches_host(&name("x.y"), 1));
        assert!(p.matches_host(&name("1.2.3.4"), 1));
        assert!(t("**:443").matches_host(&name("x"), 443));
        assert!(!t("**:443").matches_host(&name("x"), 22));
    }

    #[test]
    fn cidr_and_literal_ip_targets() {
        let p = t("10.1.2.0/24");
        assert!(p.matches_host(&name("10.1.2.3"), 22));
        assert!(!p.matches_host(&name("10.1.3.3"), 22));
        assert!(!p.matches_host(&name("ten.example"), 22));
        assert!(p.covers_addr("10.1.2.9".parse().unwrap(), 5));
        assert!(p.covers_addr("::ffff:10.1.2.9".parse().unwrap(), 5));
        let p = t("10.1.2.0/24:5432");
        assert!(p.covers_addr("10.1.2.9".parse().unwrap(), 5432));
        assert!(!p.covers_addr("10.1.2.9".parse().unwrap(), 5433));
        assert_eq!(t("10.1.2.3/24").to_string(), "10.1.2.0/24");
        assert_eq!(t("1.2.3.4:80").to_string(), "1.2.3.4:80");
        assert!(t("1.2.3.4").matches_host(&name("1.2.3.4"), 9));
        assert_eq!(t("fc00::/7").to_string(), "fc00::/7");
        assert_eq!(t("[fc00::/7]:443").to_string(), "[fc00::/7]:443");
        assert!(t("[::1]:443").matches_host(&name("[::1]"), 443));
    }

    #[test]
    fn bad_targets_are_errors() {
        for bad in [
            "",
            "exa mple.com",
            "a*.example.com",
            "*.",
            "example.com:0",
            "example.com:99999",
            "example.com:http",
            "10.0.0.0/33",
            "[::1",
            "a..b",
            "ünïcode.example",
            "x.*.example.com",
            "db.example.org:5432 tcp",
            "db.example.org raw raw",
            "10.0.0.0/8 raw",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn raw_is_a_word_after_a_name_target() {
        assert!(t("db.example.org:5432 raw").allows_raw());
        assert!(t("  db.example.org:5432   raw ").allows_raw());
        assert!(!t("db.example.org:5432").allows_raw());
        assert!(t("10.0.0.0/8:5432").allows_raw());
        assert!(t("db.example.org:5432 raw").matches_host(&name("db.example.org"), 5432));
        assert_ne!(t("db.example.org raw"), t("db.example.org"));
    }

    #[test]
    fn every_spelling_of_an_ipv4_address_is_that_address() {
        let lo = Host::Ip("127.0.0.1".parse().unwrap());
        for s in [
            "127.0.0.1",
            "127.0.0.1.",
            "2130706433",
            "0x7f000001",
            "0X7F000001",
            "017700000001",
            "0177.0.0.1",
            "0x7f.0.0.1",
            "0x7f.1",
            "127.1",
            "127.0.1",
        ] {
            assert_eq!(Host::parse(s).unwrap(), lo, "{s}");
        }
        for name in [
            "1.2.3.4.5",
            "256.1.1.1",
            "0x.y",
            "08.1.1.1",
            "1e3",
            "a.b",
            "1..2",
            "4294967296",
        ] {
            assert!(!matches!(Host::parse(name), Ok(Host::Ip(_))), "{name}");
        }
        assert_eq!(
            Host::parse("0x").unwrap(),
            Host::Ip("0.0.0.0".parse().unwrap())
        );
        // As a target: an address, which prints and parses back the same.
        assert_eq!(t("10.0.0.2."), t("10.0.0.2"));
        assert_eq!(t("0x0a000002:22").to_string(), "10.0.0.2:22");
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "example.com",
            "*.example.com:443",
            "**",
            "**:80",
            "10.0.0.0/8",
            "10.1.2.3:22",
            "::1",
            "[2001:db8::/32]:443",
            "db.example.org:5432 raw",
            "** raw",
        ] {
            assert_eq!(t(s).to_string(), s);
            assert_eq!(t(&t(s).to_string()), t(s));
        }
    }
}
