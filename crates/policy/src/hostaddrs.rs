//! The host's own addresses: every address on the host's network interfaces.
//!
//! A name that resolves to one of them (or a literal one) would reach a
//! service listening on the host itself, on an address outside the blocked
//! ranges when the host has a public one. [`Policy::check`](crate::Policy::check)
//! refuses them like a blocked range (`blocked-address: IP (the host's own)`)
//! unless an allow rule with an address target or an `--add-host` names them.
//!
//! The list is read with `getifaddrs(3)` and read again when it is older than
//! [`REFRESH`], so an address the host gains (a new interface, a DHCP lease)
//! is refused from at most that long after.

use std::net::IpAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::target::canonical;

/// How long one reading of the interface list is used.
pub const REFRESH: Duration = Duration::from_secs(1);

struct Cache {
    read_at: Option<Instant>,
    addrs: Vec<IpAddr>,
}

fn cache() -> &'static Mutex<Cache> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    CACHE.get_or_init(|| {
        Mutex::new(Cache {
            read_at: None,
            addrs: Vec::new(),
        })
    })
}

/// Every address on the host's interfaces, as of at most [`REFRESH`] ago.
/// A list that cannot be read again keeps the last one read (a failed
/// refresh must not unblock the host's addresses); empty only if it was
/// never read (then only the fixed ranges apply; the failure is not the
/// guest's to cause).
pub fn host_addresses() -> Vec<IpAddr> {
    let mut c = match cache().lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    if c.read_at.is_none_or(|t| t.elapsed() >= REFRESH) {
        if let Some(addrs) = read_interfaces() {
            c.addrs = addrs;
        }
        c.read_at = Some(Instant::now());
    }
    c.addrs.clone()
}

/// Is `ip` (IPv4-mapped IPv6 as IPv4) one of the host's own addresses?
pub fn is_host_address(ip: IpAddr) -> bool {
    host_addresses().contains(&canonical(ip))
}

fn read_interfaces() -> Option<Vec<IpAddr>> {
    let Ok(list) = nix::ifaddrs::getifaddrs() else {
        return None;
    };
    let mut out = Vec::new();
    for ifa in list {
        let Some(addr) = ifa.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            canonical(IpAddr::V6(v6.ip()))
        } else {
            continue;
        };
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loopback_address_is_one_of_the_hosts() {
        let all = host_addresses();
        assert!(all.contains(&IpAddr::from([127, 0, 0, 1])), "{all:?}");
        assert!(is_host_address("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_host_address("192.0.2.77".parse().unwrap()));
    }
}
