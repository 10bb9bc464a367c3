//! The guest's DNS stub (`sandpen_guest::dns::handle`), which any guest
//! process can send a datagram: no panic; a reply is a response with the
//! query's id; its answers are `A` records for the question's name, each an
//! address of the synthetic range that the table maps back to that name; a
//! `TXT` question becomes a why-question for that name (without a leading
//! `_sandpen-why.`), whose reply, for any text the host might send, is at
//! most 512 bytes of `TXT` records for the question's name; no other type
//! gets an answer; the same query gets the same reply.
#![no_main]

use std::sync::Mutex;

use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::{RData, RecordType};
use libfuzzer_sys::fuzz_target;
use sandpen_guest::dns::{handle, is_synthetic, FakeDns, Handled, WHY_LABEL};

fn check_reply(data: &[u8], bytes: &[u8], want: RecordType) -> Message {
    let reply = Message::from_vec(bytes).expect("the stub's reply parses");
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    assert_eq!(reply.metadata.id.to_be_bytes(), data[..2]);
    assert!(reply.queries.len() <= 1);
    for record in &reply.answers {
        let q = &reply.queries[0];
        assert_eq!(q.query_type(), want);
        assert_eq!(record.name, *q.name());
    }
    reply
}

fuzz_target!(|data: &[u8]| {
    let table = Mutex::new(FakeDns::default());
    match handle(data, &table) {
        None => {}
        Some(Handled::Reply(bytes)) => {
            let reply = check_reply(data, &bytes, RecordType::A);
            for record in &reply.answers {
                let RData::A(a) = &record.data else {
                    panic!("a non-A answer: {record:?}");
                };
                assert!(is_synthetic(a.0), "{a:?}");
                let name = reply.queries[0].name().to_ascii();
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                let table = table.lock().expect("not poisoned");
                assert_eq!(table.name_of(a.0), Some(name.as_str()));
            }
            match handle(data, &table) {
                Some(Handled::Reply(again)) => assert_eq!(again, bytes, "the same reply again"),
                other => panic!("another outcome the second time: {other:?}"),
            }
        }
        Some(Handled::Why(why)) => {
            let request = Message::from_vec(data).expect("a why question parsed");
            let name = request.queries[0].name().to_ascii();
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            assert_eq!(why.host, name.strip_prefix(WHY_LABEL).unwrap_or(&name));
            let host_text = String::from_utf8_lossy(data).repeat(3);
            for text in [Some(host_text.as_str()), Some(""), None] {
                let bytes = why.reply(text).expect("a reply");
                assert!(bytes.len() <= 512, "{} bytes", bytes.len());
                let reply = check_reply(data, &bytes, RecordType::TXT);
                for record in &reply.answers {
                    assert!(matches!(record.data, RData::TXT(_)), "{record:?}");
                }
            }
        }
    }
});
