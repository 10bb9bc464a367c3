//! The parts of `sandpen-guest` that parse bytes from guest processes, as a
//! library so that they can be tested and fuzzed apart from PID 1
//! (`fuzz/fuzz_targets/dns_query.rs`). The `sandpen-guest` binary is the only
//! user at run time; see `docs/egress.md` ("The guest side").

pub mod dns;
