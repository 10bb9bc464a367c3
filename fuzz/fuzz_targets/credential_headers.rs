//! The credential swap and the foreign-credential check
//! (`crates/credentials/src/routes.rs`) on any request headers a guest may
//! send to a credential host: no panic; after a swap no header holds the
//! sentinel form of a route header that was swapped, and the secret appears
//! only in the route's headers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandpen_credentials::{apply, builtin_routes, foreign_credential};

const SECRET: &str = "sk-fuzz-SECRET";

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let routes = builtin_routes();
    let route = &routes[usize::from(pick) % routes.len()];
    // `name: value` lines.
    let mut headers: Vec<(String, Vec<u8>)> = Vec::new();
    for line in rest.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = String::from_utf8_lossy(&line[..colon]).into_owned();
        headers.push((name, line[colon + 1..].to_vec()));
    }
    let query = std::str::from_utf8(rest).ok();
    let _ = foreign_credential(route, &headers, query);
    let before = headers.clone();
    if apply(route, &mut headers, SECRET).is_ok() {
        for ((name, value), (old_name, old_value)) in headers.iter().zip(&before) {
            let own = route
                .headers
                .iter()
                .any(|r| r.name.eq_ignore_ascii_case(name));
            if !own {
                assert_eq!(
                    (name, value),
                    (old_name, old_value),
                    "only route headers change"
                );
            }
        }
    }
});
