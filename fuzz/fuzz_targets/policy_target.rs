//! The policy target syntax and host normalization (`crates/policy`): no
//! panic; a target that parses prints as text that parses to the same
//! target; a host is decided without panicking, and a literal address in a
//! blocked range is never allowed by `allow **`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandpen_policy::{
    is_blocked, Action, AddHost, Host, Mode, Policy, Preset, Rule, RuleSource, Scope, Target,
    Verdict,
};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = Target::parse(s) {
        let text = t.to_string();
        assert_eq!(Target::parse(&text).as_ref(), Ok(&t), "{text}");
    }
    let _ = AddHost::parse(s);
    let policy = Policy::from_rules(
        Mode::Enforce,
        Preset::DenyAll,
        vec![Rule {
            id: 1,
            scope: Scope::Global,
            action: Action::Allow,
            target: Target::parse("** raw").expect("a valid target"),
            source: RuleSource::File {
                path: "fuzz".into(),
                line: 1,
            },
        }],
    );
    let d = policy.check(s, 443, None);
    if let Ok(Host::Ip(ip)) = Host::parse(s) {
        if is_blocked(ip) {
            assert_eq!(d.verdict, Verdict::Deny, "{s}");
        }
    }
});
