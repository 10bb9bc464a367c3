//! The guest's DNS stub (`sandpen_guest::dns::answer`), which any guest
//! process can send a datagram: no panic; a reply is a response with the
//! query's id; its answers are `A` records for the question's name, each an
//! address of the synthetic range that the table maps back to that name; no
//! other type gets an answer; the same query gets the same reply.
#![no_main]

use std::sync::Mutex;

use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::{RData, RecordType};
use libfuzzer_sys::fuzz_target;
use sandpen_guest::dns::{answer, is_synthetic, FakeDns};

fuzz_target!(|data: &[u8]| {
    let table = Mutex::new(FakeDns::default());
    let Some(bytes) = answer(data, &table) else {
        return;
    };
    let reply = Message::from_vec(&bytes).expect("the stub's reply parses");
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    assert_eq!(reply.metadata.id.to_be_bytes(), data[..2]);
    assert!(reply.queries.len() <= 1);
    for record in &reply.answers {
        let q = &reply.queries[0];
        assert_eq!(q.query_type(), RecordType::A);
        assert_eq!(record.name, *q.name());
        let RData::A(a) = &record.data else {
            panic!("a non-A answer: {record:?}");
        };
        assert!(is_synthetic(a.0), "{a:?}");
        let name = q.name().to_ascii();
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let table = table.lock().expect("not poisoned");
        assert_eq!(table.name_of(a.0), Some(name.as_str()));
    }
    assert_eq!(answer(data, &table), Some(bytes), "the same reply again");
});
