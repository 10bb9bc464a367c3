//! Address ranges that no name may resolve into unless a rule says so.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::target::canonical;

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> (Ipv4Addr, u8) {
    (Ipv4Addr::new(a, b, c, d), len)
}

/// IPv4 ranges blocked by default.
const BLOCKED_V4: &[(Ipv4Addr, u8)] = &[
    v4(0, 0, 0, 0, 8),      // "this network", includes the unspecified address
    v4(10, 0, 0, 0, 8),     // RFC 1918
    v4(100, 64, 0, 0, 10),  // CGNAT, RFC 6598
    v4(127, 0, 0, 0, 8),    // loopback
    v4(169, 254, 0, 0, 16), // link-local, includes the metadata address 169.254.169.254
    v4(172, 16, 0, 0, 12),  // RFC 1918
    v4(192, 0, 0, 0, 24),   // IETF protocol assignments
    v4(192, 168, 0, 0, 16), // RFC 1918
    v4(198, 18, 0, 0, 15),  // benchmarking; the guest's DNS stub hands these out as fake IPs
    v4(224, 0, 0, 0, 4),    // multicast
    v4(240, 0, 0, 0, 4),    // reserved, includes broadcast
];

/// IPv6 ranges blocked by default. IPv4-mapped addresses are checked as IPv4.
/// The ranges that embed an IPv4 address in another form (IPv4-compatible,
/// NAT64, 6to4) are blocked whole: none of them is needed to reach a public
/// service, and each may carry a private IPv4 address to a host that
/// translates it.
const BLOCKED_V6: &[(Ipv6Addr, u8)] = &[
    (Ipv6Addr::UNSPECIFIED, 128),
    (Ipv6Addr::LOCALHOST, 128),
    (Ipv6Addr::UNSPECIFIED, 96), // IPv4-compatible (deprecated): `::a.b.c.d`
    (Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96), // NAT64: may embed a private IPv4
    (Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48), // local-use NAT64 (RFC 8215)
    (Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16), // 6to4: embeds an IPv4 in bits 16-47
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7), // unique local (ULA)
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10), // link-local
    (Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10), // site-local (deprecated)
    (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8), // multicast
];

/// The blocked ranges as networks, for documentation and `policy ls`.
pub fn blocked_ranges() -> Vec<IpNet> {
    let mut out = Vec::new();
    for (a, l) in BLOCKED_V4 {
        if let Ok(n) = Ipv4Net::new(*a, *l) {
            out.push(IpNet::V4(n));
        }
    }
    for (a, l) in BLOCKED_V6 {
        if let Ok(n) = Ipv6Net::new(*a, *l) {
            out.push(IpNet::V6(n));
        }
    }
    out
}

fn v4_in(ip: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    (u32::from(ip) & mask) == (u32::from(net) & mask)
}

fn v6_in(ip: Ipv6Addr, net: Ipv6Addr, len: u8) -> bool {
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    };
    (u128::from(ip) & mask) == (u128::from(net) & mask)
}

/// Is `ip` in a range that is blocked unless explicitly allowed?
pub fn is_blocked(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(ip) => BLOCKED_V4.iter().any(|(n, l)| v4_in(ip, *n, *l)),
        IpAddr::V6(ip) => BLOCKED_V6.iter().any(|(n, l)| v6_in(ip, *n, *l)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_and_public_addresses() {
        for b in [
            "127.0.0.1",
            "127.9.9.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "198.18.0.7",
            "198.19.255.1",
            "224.0.0.1",
            "255.255.255.255",
            "0.0.0.0",
            "::",
            "::1",
            "fe80::1",
            "fd00::1",
            "fc00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "::127.0.0.1",
            "::10.0.0.1",
            "::8.8.8.8",
            "64:ff9b:1::a00:1",
            "64:ff9b:1:ffff::1",
            "2002:a00:1::1",
            "2002:7f00:1::",
            "2002:808:808::1",
        ] {
            assert!(is_blocked(b.parse().unwrap()), "{b} should be blocked");
        }
        for ok in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "198.20.0.1",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
            "64:ff9b:2::1",
            "2003::1",
            "2001:db9::1",
        ] {
            assert!(
                !is_blocked(ok.parse().unwrap()),
                "{ok} should not be blocked"
            );
        }
        assert_eq!(blocked_ranges().len(), BLOCKED_V4.len() + BLOCKED_V6.len());
    }
}
