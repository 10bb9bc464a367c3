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
//! - `AAAA` gets an empty answer; `TXT` for a name (or for
//!   `_sandpen-why.NAME`) is handed to the caller as a [`WhyQuery`]: the
//!   stub asks the host why the last connection to NAME was refused (the
//!   text `sandpen-request --why NAME` prints, from the same place, the
//!   host's network log) and [`WhyQuery::reply`] makes the answer, `TXT`
//!   records for the question's name only, one per line of the text, in at
//!   most 512 bytes; every other type gets `REFUSED`. Nothing is forwarded
//!   beyond the host's own log, which the guest can read this way anyway:
//!   a query cannot carry data out.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, TXT};
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

/// What the stub does with one datagram.
#[derive(Debug)]
pub enum Handled {
    /// Send this reply.
    Reply(Vec<u8>),
    /// A `TXT` question: ask the host why [`WhyQuery::host`] was refused,
    /// then send [`WhyQuery::reply`].
    Why(WhyQuery),
}

/// A `TXT` question for `NAME` or `_sandpen-why.NAME`, waiting for the
/// host's explanation of the last refusal of `NAME`.
#[derive(Debug)]
pub struct WhyQuery {
    /// The name asked about: lower case, no trailing dot, without the
    /// `_sandpen-why.` label.
    pub host: String,
    request: Message,
}

/// The label that may precede the name in a `TXT` question.
pub const WHY_LABEL: &str = "_sandpen-why.";
/// The largest reply the stub sends: a client without EDNS takes no more.
const MAX_REPLY: usize = 512;
/// The longest string in a `TXT` record.
const MAX_TXT_STRING: usize = 255;
/// The most lines of the host's text a reply carries (the text is two).
const MAX_LINES: usize = 4;

fn response_to(request: &Message) -> Message {
    let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    if let Some(q) = request.queries.first() {
        reply.add_query(q.clone());
    }
    reply
}

/// Handles one DNS query: `A` gets a synthetic address, `AAAA` an empty
/// answer, `TXT` becomes a [`WhyQuery`], everything else `REFUSED`.
pub fn handle(query: &[u8], table: &Mutex<FakeDns>) -> Option<Handled> {
    let request = Message::from_vec(query).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut reply = response_to(&request);
    let Some(q) = request.queries.first().cloned() else {
        reply.metadata.response_code = ResponseCode::FormErr;
        return reply.to_vec().ok().map(Handled::Reply);
    };
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
        RecordType::TXT => {
            let name = q
                .name()
                .to_ascii()
                .trim_end_matches('.')
                .to_ascii_lowercase();
            let host = name.strip_prefix(WHY_LABEL).unwrap_or(&name).to_string();
            if !host.is_empty() && host.bytes().all(|b| b.is_ascii_graphic()) {
                return Some(Handled::Why(WhyQuery { host, request }));
            }
            reply.metadata.response_code = ResponseCode::Refused;
        }
        _ => reply.metadata.response_code = ResponseCode::Refused,
    }
    reply.to_vec().ok().map(Handled::Reply)
}

impl WhyQuery {
    /// The reply carrying `text` (the host's explanation): one `TXT` record
    /// per non-empty line, for the question's name, lines cut (at a
    /// character boundary) until the reply fits in 512 bytes; `SERVFAIL`
    /// when `text` is `None` (the host did not answer).
    pub fn reply(&self, text: Option<&str>) -> Option<Vec<u8>> {
        let q = self.request.queries.first()?;
        let Some(text) = text else {
            let mut reply = response_to(&self.request);
            reply.metadata.response_code = ResponseCode::ServFail;
            return reply.to_vec().ok();
        };
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .take(MAX_LINES)
            .collect();
        let mut max = MAX_REPLY;
        loop {
            let mut reply = response_to(&self.request);
            for line in &lines {
                let line = clip(line, max);
                let strings = chunks(line, MAX_TXT_STRING);
                reply.add_answer(Record::from_rdata(
                    q.name().clone(),
                    0,
                    RData::TXT(TXT::new(strings)),
                ));
            }
            let bytes = reply.to_vec().ok()?;
            if bytes.len() <= MAX_REPLY || max == 0 {
                return Some(bytes);
            }
            max = max.saturating_sub(16);
        }
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn clip(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `s` in pieces of at most `max` bytes, each at a character boundary.
fn chunks(mut s: &str, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    while !s.is_empty() {
        let piece = clip(s, max);
        let piece = if piece.is_empty() {
            // A character longer than `max` (impossible for max >= 4).
            &s[..s.chars().next().map_or(s.len(), char::len_utf8)]
        } else {
            piece
        };
        out.push(piece.to_string());
        s = &s[piece.len()..];
    }
    if out.is_empty() {
        // A TXT record holds at least one string.
        out.push(String::new());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use std::str::FromStr;

    fn answer(query: &[u8], table: &Mutex<FakeDns>) -> Option<Vec<u8>> {
        match handle(query, table)? {
            Handled::Reply(r) => Some(r),
            Handled::Why(w) => panic!("a why question: {w:?}"),
        }
    }

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

    /// `dig TXT NAME` (or `_sandpen-why.NAME`) asks why NAME was refused;
    /// the reply is the host's text as TXT records for the question's name,
    /// within 512 bytes however long the text.
    #[test]
    fn txt_asks_why_and_carries_the_text() {
        let table = Mutex::new(FakeDns::default());
        for name in ["PyPI.org.", "_sandpen-why.pypi.org."] {
            let Some(Handled::Why(w)) = handle(&query(name, RecordType::TXT), &table) else {
                panic!("{name}: not a why question");
            };
            assert_eq!(w.host, "pypi.org");
            let text = "sandpen: pypi.org:443 is not allowed (no-matching-rule).\nTo ask the user: sandpen-request network pypi.org:443 \"<why>\"\n";
            let r = Message::from_vec(&w.reply(Some(text)).unwrap()).unwrap();
            assert_eq!(r.metadata.id, 4242);
            let got: Vec<String> = r
                .answers
                .iter()
                .map(|a| {
                    assert_eq!(a.name, *r.queries[0].name());
                    match &a.data {
                        RData::TXT(t) => t
                            .txt_data
                            .iter()
                            .map(|s| String::from_utf8_lossy(s).into_owned())
                            .collect::<String>(),
                        other => panic!("{other:?}"),
                    }
                })
                .collect();
            assert_eq!(got, text.lines().map(str::to_string).collect::<Vec<_>>());
            let long = format!("{}\n{}", "é".repeat(700), "x".repeat(900));
            let bytes = w.reply(Some(&long)).unwrap();
            assert!(bytes.len() <= 512, "{}", bytes.len());
            let r = Message::from_vec(&bytes).unwrap();
            assert_eq!(r.answers.len(), 2);
            let many = "x\n".repeat(500);
            let bytes = w.reply(Some(&many)).unwrap();
            assert!(bytes.len() <= 512, "{}", bytes.len());
            let r = Message::from_vec(&w.reply(None).unwrap()).unwrap();
            assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
            assert!(r.answers.is_empty());
        }
        assert!(table
            .lock()
            .unwrap()
            .name_of(Ipv4Addr::new(198, 18, 0, 1))
            .is_none());
    }
}
