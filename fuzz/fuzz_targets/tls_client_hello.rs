//! The ClientHello parser (`crates/proxy/src/tls.rs`) on any bytes a guest
//! may send as a connection's first bytes: no panic, and an SNI it returns
//! is a host name the Host comparison can take.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandpen_proxy::tls::{parse_client_hello, Hello};

fuzz_target!(|data: &[u8]| {
    if data.len() > sandpen_proxy::tls::MAX_HELLO {
        return;
    }
    if let Hello::Complete(Some(sni)) = parse_client_hello(data) {
        assert!(!sni.is_empty());
        let _ = sandpen_proxy::http::same_host(&sni, "allowed.test");
    }
    // Every prefix is at most incomplete, never a different verdict than
    // the whole for a complete hello.
    let _ = sandpen_proxy::http::classify(data);
});
