//! The first-bytes classifier and the request-head parser
//! (`crates/proxy/src/http.rs`): no panic, and the classifier is stable
//! under more bytes (once it has decided, more bytes never change it; a
//! guest cannot turn a request into raw bytes by adding to it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandpen_proxy::http::{classify, parse_absolute, split_authority, FirstBytes, RequestHead};

fuzz_target!(|data: &[u8]| {
    let whole = classify(data);
    for cut in [1, data.len() / 2, data.len().saturating_sub(1)] {
        if cut == 0 || cut > data.len() {
            continue;
        }
        let part = classify(&data[..cut]);
        if part != FirstBytes::Undecided {
            assert_eq!(part, whole, "deciding on {cut} bytes");
        }
    }
    if let Ok(head) = RequestHead::parse(data) {
        assert!(head.len <= data.len());
        if let Ok(t) = parse_absolute(&head.target) {
            assert!(t.origin.starts_with('/'));
            assert_ne!(t.port, 0);
        }
        let _ = split_authority(&head.target, 80);
        for (_, v) in &head.headers {
            if let Ok(s) = std::str::from_utf8(v) {
                let _ = split_authority(s.trim(), 80);
            }
        }
    }
});
