//! The DNS stub's answers (see `docs/egress.md`, "The guest side"): any guest
//! process can send the stub a UDP datagram, so [`answer`] takes arbitrary
//! bytes. Guaranteed, whatever the bytes:
//!
//! - no panic; a datagram that is not a DNS query gets no reply (`None`);
//! - a reply is a response with the query's id, and its only answer records
//!   are `A` records for the first question's name, holding an address of
//!   the synthetic range [`SYNTHETIC_NET`] that [`FakeDns::name_of`] maps
//!   back to that name (lower case, without the trailing dot);
//! - a name keeps its address for the life of the table, and no two names
//!   share one; past [`MAX_NAMES`] names new names get `SERVFAIL`;
//! - `AAAA` gets an empty answer, every other type `REFUSED`, and nothing
//!   is forwarded anywhere: a query cannot carry data out.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

/// Synthetic addresses: 198.18.0.0/15 (reserved for benchmarking, never
/// routed), as `(first address, prefix length)`.
pub const SYNTHETIC_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 15);
const FAKE_BASE: u32 = u32::from_be_bytes(SYNTHETIC_NET.0.octets());
const FAKE_SIZE: u32 = 1 << (32 - SYNTHETIC_NET.1);
/// The most names one table hands out addresses to.
pub const MAX_NAMES: usize = 65_536;

/// Whether `ip` is in [`SYNTHETIC_NET`].
pub fn is_synthetic(ip: Ipv4Addr) -> bool {
    (FAKE_BASE..FAKE_BASE + FAKE_SIZE).contains(&u32::from(ip))
}

/// Names the stub has answered, and the synthetic address each got.
#[derive(Default)]
pub struct FakeDns {
    by_name: HashMap<String, Ipv4Addr>,
    by_addr: HashMap<Ipv4Addr, String>,
    next: u32,
}

impl FakeDns {
    /// The stable synthetic address of `name`, allocating one on first use.
    pub fn address_of(&mut self, name: &str) -> Option<Ipv4Addr> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(ip) = self.by_name.get(&name) {
            return Some(*ip);
        }
        if self.by_name.len() >= MAX_NAMES {
            return None;
        }
        // Skip .0 of the range: some clients treat x.x.x.0 as a network address.
        self.next += 1;
        let ip = Ipv4Addr::from(FAKE_BASE + (self.next % FAKE_SIZE));
        self.by_name.insert(name.clone(), ip);
        self.by_addr.insert(ip, name);
        Some(ip)
    }

    /// The name that `ip` was handed out for.
    pub fn name_of(&self, ip: Ipv4Addr) -> Option<&str> {
        self.by_addr.get(&ip).map(String::as_str)
    }
}

/// Answers one DNS query: A gets a synthetic address, AAAA an empty answer,
/// everything else REFUSED (no TXT, no NULL: nothing to tunnel data through).
pub fn answer(query: &[u8], table: &Mutex<FakeDns>) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    let Some(q) = request.queries.first().cloned() else {
        reply.metadata.response_code = ResponseCode::FormErr;
        return reply.to_vec().ok();
    };
    reply.add_query(q.clone());
    match q.query_type() {
        RecordType::A => {
            let name = q.name().to_ascii();
            let ip = table.lock().ok()?.address_of(&name);
            match ip {
                Some(ip) => {
                    reply.add_answer(Record::from_rdata(q.name().clone(), 5, RData::A(A(ip))));
                }
                None => reply.metadata.response_code = ResponseCode::ServFail,
            }
        }
        RecordType::AAAA => {}
        _ => reply.metadata.response_code = ResponseCode::Refused,
    }
    reply.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use std::str::FromStr;

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.add_query(Query::query(Name::from_str(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    #[test]
    fn a_queries_get_stable_synthetic_addresses() {
        let table = Mutex::new(FakeDns::default());
        let r1 =
            Message::from_vec(&answer(&query("api.example.com.", RecordType::A), &table).unwrap())
                .unwrap();
        let r2 =
            Message::from_vec(&answer(&query("API.example.com.", RecordType::A), &table).unwrap())
                .unwrap();
        let other =
            Message::from_vec(&answer(&query("b.example.com.", RecordType::A), &table).unwrap())
                .unwrap();
        let ip = |m: &Message| match &m.answers[0].data {
            RData::A(a) => a.0,
            other => panic!("{other:?}"),
        };
        assert_eq!(r1.metadata.id, 4242);
        assert_eq!(ip(&r1), ip(&r2));
        assert_ne!(ip(&r1), ip(&other));
        assert!(is_synthetic(ip(&r1)));
        assert_eq!(
            table.lock().unwrap().name_of(ip(&r1)),
            Some("api.example.com")
        );
    }

    #[test]
    fn no_tunnel_record_types() {
        let table = Mutex::new(FakeDns::default());
        for t in [
            RecordType::TXT,
            RecordType::NULL,
            RecordType::MX,
            RecordType::CNAME,
            RecordType::ANY,
        ] {
            let r =
                Message::from_vec(&answer(&query("x.attacker.test.", t), &table).unwrap()).unwrap();
            assert_eq!(r.metadata.response_code, ResponseCode::Refused, "{t:?}");
            assert!(r.answers.is_empty());
        }
        let r = Message::from_vec(&answer(&query("x.test.", RecordType::AAAA), &table).unwrap())
            .unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        assert!(answer(b"\x00\x01garbage", &table).is_none());
    }
}
