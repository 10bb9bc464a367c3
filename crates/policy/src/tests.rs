use std::net::IpAddr;
use std::path::Path;

use super::*;

fn file(text: &str, scope: Scope) -> PolicyFile {
    PolicyFile::parse(text.to_string(), Path::new("/cfg/policy.toml"), scope)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn policy(global: &str, sandbox: &str) -> Policy {
    Policy::from_files(
        Some(&file(global, Scope::Global)),
        Some(&file(sandbox, Scope::Sandbox)),
    )
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn invalid(text: &str) -> (usize, usize, String) {
    match PolicyFile::parse(text.to_string(), Path::new("/x/p.toml"), Scope::Global) {
        Err(PolicyError::Invalid {
            line,
            column,
            message,
            path,
        }) => {
            assert_eq!(path, Path::new("/x/p.toml"));
            (line, column, message)
        }
        other => panic!("expected an Invalid error, got {other:?}"),
    }
}

const G: &str = r#"
[[network]]
id = 1
action = "allow"
target = "*.example.org:443"

[[network]]
id = 2
action = "deny"
target = "bad.example.org"

[[network]]
id = 3
action = "allow"
target = "10.1.2.0/24"
"#;

#[test]
fn allow_by_glob_and_port() {
    let p = policy(G, "");
    let d = p.check("pkgs.example.org", 443, None);
    assert_eq!(d.verdict, Verdict::Allow);
    assert_eq!(
        d.rule.as_ref().map(|r| (r.id, r.scope)),
        Some((1, Scope::Global))
    );
    assert_eq!(
        d.to_string(),
        "allowed by rule 1 (global: allow *.example.org:443)"
    );
    assert_eq!(p.check("pkgs.example.org", 80, None).verdict, Verdict::Deny);
    assert_eq!(
        p.check("example.org", 443, None).reason,
        reason::NO_MATCHING_RULE
    );
}

#[test]
fn deny_wins_over_allow() {
    let p = policy(G, "");
    let d = p.check("bad.example.org", 443, None);
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(d.rule.as_ref().map(|r| r.id), Some(2));
    assert_eq!(d.reason, reason::DENIED_BY_RULE);
    // A sandbox allow cannot override a global deny.
    let p = policy(
        G,
        "[[network]]\naction = \"allow\"\ntarget = \"bad.example.org\"\n",
    );
    assert_eq!(p.check("bad.example.org", 443, None).verdict, Verdict::Deny);
}

#[test]
fn default_is_deny() {
    let p = policy("", "");
    let d = p.check("anything.example", 443, None);
    assert_eq!(d.verdict, Verdict::Deny);
    assert!(d.rule.is_none());
    assert_eq!(d.reason, reason::NO_MATCHING_RULE);
}

#[test]
fn literal_ip_needs_a_network_rule() {
    let p = policy(G, "");
    assert_eq!(p.check("93.184.216.34", 443, None).verdict, Verdict::Deny);
    let d = p.check("10.1.2.3", 5432, None);
    assert_eq!(d.verdict, Verdict::Allow, "{d}");
    assert_eq!(d.rule.map(|r| r.id), Some(3));
    // A name rule never matches a literal IP.
    let p = policy(
        "[[network]]\naction=\"allow\"\ntarget=\"example.com\"\n",
        "",
    );
    assert_eq!(p.check("1.2.3.4", 443, None).verdict, Verdict::Deny);
}

#[test]
fn blocked_addresses_need_explicit_permission() {
    let p = policy("preset = \"allow-all\"", "");
    // Allowed by name, then refused on the resolved address.
    assert_eq!(p.check("api.example", 443, None).verdict, Verdict::Allow);
    for bad in [
        "127.0.0.1",
        "169.254.169.254",
        "10.0.0.1",
        "::1",
        "fd00::1",
        "198.18.0.5",
    ] {
        let d = p.check("api.example", 443, Some(&ips(&[bad])));
        assert_eq!(d.verdict, Verdict::Deny, "{bad}");
        assert_eq!(d.reason_code(), reason::BLOCKED_ADDRESS);
    }
    // One bad address among good ones is enough to refuse.
    let d = p.check("api.example", 443, Some(&ips(&["1.1.1.1", "127.0.0.1"])));
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(
        p.check("api.example", 443, Some(&ips(&["1.1.1.1"])))
            .verdict,
        Verdict::Allow
    );
    // `**` covers literal IPs, but not blocked ones.
    assert_eq!(p.check("1.1.1.1", 22, None).verdict, Verdict::Allow);
    assert_eq!(
        p.check("127.0.0.1", 22, None).reason_code(),
        reason::BLOCKED_ADDRESS
    );
}

#[test]
fn cidr_allow_rule_unblocks_a_range() {
    let p = policy(
        G,
        "[[network]]\naction=\"allow\"\ntarget=\"db.internal:5432\"\n",
    );
    let d = p.check("db.internal", 5432, Some(&ips(&["10.1.2.7"])));
    assert_eq!(d.verdict, Verdict::Allow, "{d}");
    assert_eq!(d.rule.map(|r| r.scope), Some(Scope::Sandbox));
    let d = p.check("db.internal", 5432, Some(&ips(&["10.9.9.9"])));
    assert_eq!(d.reason_code(), reason::BLOCKED_ADDRESS);
}

#[test]
fn cidr_deny_rule_denies_names_resolving_into_it() {
    let p = policy(
        "preset = \"allow-all\"\n[[network]]\naction=\"deny\"\ntarget=\"203.0.113.0/24\"\n",
        "",
    );
    let d = p.check("x.example", 443, Some(&ips(&["203.0.113.9"])));
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(d.reason_code(), reason::DENIED_ADDRESS);
    assert_eq!(d.rule.map(|r| r.id), Some(1));
}

#[test]
fn add_host_is_permission_for_that_name_and_ip_only() {
    let p = policy("[[network]]\naction=\"allow\"\ntarget=\"*.test\"\n", "").with_add_hosts([
        AddHost::parse("allowed.test:127.0.0.1").unwrap(),
        AddHost::parse("Denied.Test.:127.0.0.1").unwrap(),
    ]);
    assert_eq!(p.overrides_for("ALLOWED.test"), ips(&["127.0.0.1"]));
    let d = p.check("allowed.test", 443, Some(&ips(&["127.0.0.1"])));
    assert_eq!(d.verdict, Verdict::Allow, "{d}");
    // Another name resolving to the same address is not covered.
    let d = p.check("other.test", 443, Some(&ips(&["127.0.0.1"])));
    assert_eq!(d.reason_code(), reason::BLOCKED_ADDRESS);
    // Nor is the literal address.
    assert_eq!(p.check("127.0.0.1", 443, None).verdict, Verdict::Deny);
    assert!(AddHost::parse("nocolon").is_err());
    assert!(AddHost::parse("x:notanip").is_err());
    assert_eq!(
        AddHost::parse("v6.test:[::1]").unwrap().ip,
        "::1".parse::<IpAddr>().unwrap()
    );
}

#[test]
fn learn_mode_softens_policy_denials_but_not_safety_checks() {
    let p = policy("mode = \"learn\"\n", "");
    assert_eq!(p.mode(), Mode::Learn);
    let d = p.check("denied.test", 443, None);
    assert_eq!(d.verdict, Verdict::WouldDeny);
    assert!(d.permits());
    assert_eq!(d.reason, reason::NO_MATCHING_RULE);
    let d = p.check("denied.test", 443, Some(&ips(&["1.1.1.1"])));
    assert_eq!(d.verdict, Verdict::WouldDeny);
    let d = p.check("denied.test", 443, Some(&ips(&["127.0.0.1"])));
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(
        p.check("bad host", 443, None).reason_code(),
        reason::INVALID_HOST
    );
    // Allowed things stay plain allows.
    let p = policy("mode = \"learn\"\npreset = \"balanced\"\n", "");
    assert_eq!(
        p.check("api.anthropic.com", 443, None).verdict,
        Verdict::Allow
    );
}

#[test]
fn ask_mode_is_enforced_for_now() {
    let p = policy("mode = \"ask\"\n", "");
    assert_eq!(p.mode(), Mode::Ask);
    assert_eq!(p.check("x.example", 443, None).verdict, Verdict::Deny);
}

#[test]
fn sandbox_overrides_mode_and_preset() {
    let p = policy(
        "mode = \"learn\"\npreset = \"allow-all\"\n",
        "mode = \"enforce\"\npreset = \"balanced\"\n",
    );
    assert_eq!(p.mode(), Mode::Enforce);
    assert_eq!(p.preset(), Preset::Balanced);
    assert_eq!(p.check("x.example", 443, None).verdict, Verdict::Deny);
    let d = p.check("github.com", 443, None);
    assert_eq!(d.verdict, Verdict::Allow);
    assert_eq!(d.rule.as_ref().map(|r| r.scope), Some(Scope::Preset));
}

#[test]
fn presets() {
    let p = policy("preset = \"balanced\"", "");
    for ok in [
        "api.anthropic.com:443",
        "api.openai.com:443",
        "generativelanguage.googleapis.com:443",
        "registry.npmjs.org:443",
        "pypi.org:443",
        "files.pythonhosted.org:443",
        "static.crates.io:443",
        "deb.debian.org:80",
        "codeload.github.com:443",
        "raw.githubusercontent.com:443",
        "gitlab.com:443",
    ] {
        let (h, port) = ok.rsplit_once(':').unwrap();
        assert_eq!(
            p.check(h, port.parse().unwrap(), None).verdict,
            Verdict::Allow,
            "{ok}"
        );
    }
    for no in [
        "github.com:22",
        "example.com:443",
        "pypi.org:80",
        "githubusercontent.com:443",
    ] {
        let (h, port) = no.rsplit_once(':').unwrap();
        assert_eq!(
            p.check(h, port.parse().unwrap(), None).verdict,
            Verdict::Deny,
            "{no}"
        );
    }
    assert_eq!(
        policy("preset = \"deny-all\"", "")
            .check("github.com", 443, None)
            .verdict,
        Verdict::Deny
    );
    assert_eq!(
        policy("preset = \"allow-all\"", "")
            .check("x.y", 1, None)
            .verdict,
        Verdict::Allow
    );
}

#[test]
fn invalid_hosts_are_denied() {
    let p = policy("preset = \"allow-all\"", "");
    for bad in ["", "a b", "x..y", "ünï.example", "a/b"] {
        let d = p.check(bad, 443, None);
        assert_eq!(d.verdict, Verdict::Deny, "{bad:?}");
        assert_eq!(d.reason_code(), reason::INVALID_HOST);
    }
}

#[test]
fn ids_without_id_key_follow_the_largest() {
    let f = file(
        "[[network]]\nid = 7\naction=\"allow\"\ntarget=\"a.example\"\n[[network]]\naction=\"allow\"\ntarget=\"b.example\"\n",
        Scope::Sandbox,
    );
    let ids: Vec<_> = f.rules().iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![7, 8]);
    assert_eq!(
        f.rules()[1].source,
        RuleSource::File {
            path: "/cfg/policy.toml".into(),
            line: 5
        }
    );
}

#[test]
fn syntax_error_names_line_and_column() {
    let (line, col, msg) = invalid("mode = \"enforce\"\n\n[[network]\naction = \"allow\"\n");
    assert_eq!(line, 3, "{msg}");
    assert!(col >= 1);
    let e = PolicyFile::parse("x = ".into(), Path::new("/x/p.toml"), Scope::Global).unwrap_err();
    assert!(e.to_string().starts_with("/x/p.toml:1:"), "{e}");
}

#[test]
fn unknown_keys_are_errors() {
    let (line, col, msg) = invalid("mode = \"enforce\"\nmdoe = \"learn\"\n");
    assert_eq!((line, col), (2, 1));
    assert!(msg.contains("unknown key `mdoe`"), "{msg}");
    let (line, col, msg) =
        invalid("[[network]]\naction = \"allow\"\n  acton = \"deny\"\ntarget = \"x.example\"\n");
    assert_eq!((line, col), (3, 3));
    assert!(msg.contains("unknown key `acton` in [[network]]"), "{msg}");
}

#[test]
fn bad_values_are_errors_with_positions() {
    let (line, col, msg) = invalid("mode = \"strict\"\n");
    assert_eq!((line, col), (1, 8));
    assert!(msg.contains("unknown mode `strict`"), "{msg}");
    let (line, _, msg) = invalid("preset = 3\n");
    assert_eq!(line, 1);
    assert!(msg.contains("must be a string"), "{msg}");
    let (line, col, msg) =
        invalid("\n[[network]]\naction = \"allow\"\ntarget = \"*.exa mple.com:443\"\n");
    assert_eq!((line, col), (4, 10));
    assert!(msg.contains("invalid target"), "{msg}");
    let (line, _, msg) = invalid("[[network]]\naction = \"permit\"\ntarget = \"x\"\n");
    assert_eq!(line, 2);
    assert!(msg.contains("unknown action `permit`"), "{msg}");
    let (line, _, msg) = invalid("[[network]]\naction = \"allow\"\n");
    assert_eq!(line, 1);
    assert!(msg.contains("without `target`"), "{msg}");
    let (line, _, msg) = invalid("[[network]]\nid = -1\naction = \"allow\"\ntarget = \"x\"\n");
    assert_eq!(line, 2);
    assert!(msg.contains("positive integer"), "{msg}");
    let (line, _, msg) = invalid(
        "[[network]]\nid = 1\naction = \"allow\"\ntarget = \"x\"\n[[network]]\nid = 1\naction = \"allow\"\ntarget = \"y\"\n",
    );
    assert_eq!(line, 6);
    assert!(msg.contains("duplicate rule id 1"), "{msg}");
    let (line, _, msg) = invalid("network = [{ action = \"allow\", target = \"x\" }]\n");
    assert_eq!(line, 1);
    assert!(msg.contains("[[network]]"), "{msg}");
    let (line, _, msg) = invalid("[filez]\nx = 1\n");
    assert_eq!(line, 1);
    assert!(msg.contains("unknown key `filez`"), "{msg}");
}

#[test]
fn a_malformed_file_is_an_error_not_an_empty_policy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(
        &path,
        "preset = \"allow-all\"\n[[network]]\naction = \"alow\"\ntarget = \"x\"\n",
    )
    .unwrap();
    let e = Policy::load(Some(&path), None).unwrap_err();
    let s = e.to_string();
    assert!(s.starts_with(&format!("{}:3:", path.display())), "{s}");
    // A missing file is simply empty.
    let p = Policy::load(Some(&dir.path().join("none.toml")), None).unwrap();
    assert!(p.rules().is_empty());
    assert_eq!(p.mode(), Mode::Enforce);
}

#[test]
fn edits_keep_comments_and_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub").join("policy.toml");
    let original = "\
# my policy
mode = \"enforce\" # strict for now

# the docs site
[[network]]
id = 4
action = \"allow\"
target = \"docs.example.org:443\"  # keep

[[network]]
action = \"deny\"
target = \"evil.example\"
";
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, original).unwrap();
    let mut f = PolicyFile::load(&path, Scope::Global).unwrap();
    let r = f.add_rule(Action::Allow, "*.Example.org:443").unwrap();
    assert_eq!(r.id, 6);
    assert_eq!(r.target.to_string(), "*.example.org:443");
    // Adding the same rule again is a no-op.
    assert_eq!(
        f.add_rule(Action::Allow, "*.example.org:443").unwrap().id,
        6
    );
    f.set_mode(Mode::Learn).unwrap();
    f.init_preset(Preset::Balanced).unwrap();
    let removed = f.remove_rule(5).unwrap();
    assert_eq!(removed.target.to_string(), "evil.example");
    assert!(matches!(
        f.remove_rule(99),
        Err(PolicyError::NoSuchRule { id: 99, .. })
    ));
    assert!(f.add_rule(Action::Deny, "bad target").is_err());
    f.save().unwrap();

    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.starts_with("# my policy\nmode = \"learn\" # strict for now\n"),
        "{text}"
    );
    assert!(
        text.contains("# the docs site\n[[network]]\nid = 4\n"),
        "{text}"
    );
    assert!(
        text.contains("target = \"docs.example.org:443\"  # keep"),
        "{text}"
    );
    assert!(!text.contains("evil.example"), "{text}");
    let again = PolicyFile::load(&path, Scope::Global).unwrap();
    assert_eq!(again.mode(), Some(Mode::Learn));
    assert_eq!(again.preset(), Some(Preset::Balanced));
    let ids: Vec<_> = again.rules().iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![4, 6]);
    assert_eq!(again.rules()[1].target.to_string(), "*.example.org:443");
}

#[test]
fn editing_a_new_file_creates_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new").join("policy.toml");
    let mut f = PolicyFile::load(&path, Scope::Sandbox).unwrap();
    f.init_preset(Preset::DenyAll).unwrap();
    assert_eq!(f.add_rule(Action::Allow, "10.1.2.0/24:5432").unwrap().id, 1);
    assert_eq!(f.add_rule(Action::Deny, "[fd00::/8]:443").unwrap().id, 2);
    f.save().unwrap();
    let again = PolicyFile::load(&path, Scope::Sandbox).unwrap();
    assert_eq!(again.rules().len(), 2);
    assert_eq!(again.rules()[1].target.to_string(), "[fd00::/8]:443");
    assert_eq!(again.rules()[0].scope, Scope::Sandbox);
    assert!(again.text().starts_with("# sandpen network policy"));
    // Removing the last rule leaves a valid file.
    let mut f = again;
    f.remove_rule(1).unwrap();
    f.remove_rule(2).unwrap();
    assert!(f.rules().is_empty());
    assert!(!f.text().contains("[[network]]"), "{}", f.text());
}

#[test]
fn global_path_follows_xdg() {
    // Only reads the environment; both variables are normally set in tests.
    if let Some(p) = global_policy_path() {
        assert!(p.ends_with("sandpen/policy.toml"));
    }
}

// ---- [files], [flow], workspace file, flow labels ----

#[test]
fn files_and_flow_tables_parse_with_their_lines() {
    let f = file(
        "[files]\ndeny_read = [\"secrets/**\"]\nread_only = [\".github/workflows/**\"]\n\
         [flow]\nsecret = [\".env*\"]\ntrusted_sinks = [\"api.anthropic.com\"]\ntrusted = [\"*.github.com\"]\n",
        Scope::Global,
    );
    assert_eq!(f.files().deny_read[0].pattern, "secrets/**");
    assert_eq!(f.files().deny_read[0].line, 2);
    assert_eq!(f.flow().trusted_sinks.len(), 1);
    let p = Policy::from_files(Some(&f), None);
    let rules = p.file_rules().unwrap();
    assert!(rules.hidden(Path::new("secrets/a")).is_some());
    assert!(rules.hidden(Path::new(".env")).is_some(), "defaults stay");
    assert!(rules.secret(Path::new(".env.prod")).is_some());
    assert!(p.is_trusted_source("api.github.com", 443));
    assert!(!p.is_trusted_source("evil.test", 443));
}

#[test]
fn bad_file_rules_name_the_line_and_column() {
    let (line, column, msg) =
        invalid("mode = \"learn\"\n[files]\ndeny_read = [\"ok\", \"a/../b\"]\n");
    assert_eq!((line, column), (3, 20), "{msg}");
    assert!(msg.contains("a/../b"), "{msg}");
    let (line, _, msg) = invalid("[files]\nread_only = \".git\"\n");
    assert_eq!(line, 2);
    assert!(msg.contains("array"), "{msg}");
    let (line, _, msg) = invalid("[flow]\ntrusted_sinks = [\"*bad*\"]\n");
    assert_eq!(line, 2);
    assert!(msg.contains("*bad*"), "{msg}");
    let (_, _, msg) = invalid("[files]\nhide = []\n");
    assert!(msg.contains("unknown key `hide`"), "{msg}");
}

#[test]
fn a_workspace_file_adds_rules_but_cannot_drop_defaults() {
    let path = Path::new("/w/.sandpen.toml");
    let ws = WorkspaceFile::parse("[files]\ndeny_read = [\"db/**\"]\n", path).unwrap();
    let p = Policy::default().with_workspace(Some(ws), None);
    let rules = p.file_rules().unwrap();
    assert!(rules.hidden(Path::new("db/x")).is_some());
    assert!(rules.hidden(Path::new("id_rsa")).is_some());
    let hit = rules.hidden(Path::new("db/x")).unwrap();
    assert_eq!(hit.source.to_string(), "/w/.sandpen.toml:2");
    match WorkspaceFile::parse("[files]\ndefaults = false\n", path) {
        Err(PolicyError::Invalid { line, message, .. }) => {
            assert_eq!(line, 2);
            assert!(message.contains("cannot drop"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    match WorkspaceFile::parse("[files]\nreserve = \"0\"\n", path) {
        Err(PolicyError::Invalid { message, .. }) => {
            assert!(message.contains("reserve"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(WorkspaceFile::parse("mode = \"learn\"\n", path).is_err());
    // The user's own file can drop them.
    let user = file("[files]\ndefaults = false\n", Scope::Sandbox);
    let rules = Policy::from_files(None, Some(&user)).file_rules().unwrap();
    assert!(rules.hidden(Path::new(".env")).is_none());
}

fn secret_read() -> FlowLabels {
    FlowLabels {
        labels: vec![LabelSet {
            label: Label::SecretRead,
            at: "2026-11-27T12:00:00Z".into(),
            by: "/w/secrets/token".into(),
        }],
    }
}

#[test]
fn after_secret_read_only_trusted_sinks_stay_open() {
    let sinks = vec![Target::parse("api.anthropic.com").unwrap()];
    let p = policy(
        G,
        "[[network]]\naction = \"allow\"\ntarget = \"api.anthropic.com\"\n",
    )
    .with_trusted_sinks(sinks.clone());
    // Before: both allowed.
    assert_eq!(
        p.check("api.anthropic.com", 443, None).verdict,
        Verdict::Allow
    );
    assert_eq!(p.check("x.example.org", 443, None).verdict, Verdict::Allow);
    let p = p.with_labels(secret_read());
    assert_eq!(
        p.check("api.anthropic.com", 443, None).verdict,
        Verdict::Allow
    );
    let d = p.check("x.example.org", 443, None);
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(
        d.reason,
        "flow: secret-read at 2026-11-27T12:00:00Z from /w/secrets/token"
    );
    assert_eq!(d.reason_code(), reason::FLOW);
    // Learn mode: would-deny, let through.
    let learn = p.clone().with_mode(Mode::Learn);
    assert_eq!(
        learn.check("x.example.org", 443, None).verdict,
        Verdict::WouldDeny
    );
    // A trusted sink the network rules deny stays denied: flow never widens.
    let p = Policy::from_rules(Mode::Enforce, Preset::DenyAll, vec![])
        .with_trusted_sinks(sinks)
        .with_labels(secret_read());
    assert_eq!(
        p.check("api.anthropic.com", 443, None).verdict,
        Verdict::Deny
    );
    assert_eq!(
        p.check("api.anthropic.com", 443, None).reason,
        reason::NO_MATCHING_RULE
    );
}

#[test]
fn ipv6_forms_embedding_ipv4_are_blocked_by_literal_and_by_name() {
    let p = policy("preset = \"allow-all\"", "");
    for bad in [
        "::127.0.0.1",
        "::a00:1",
        "::8.8.8.8",
        "64:ff9b:1::a00:1",
        "2002:a00:1::1",
        "2002:7f00:1::1",
    ] {
        let literal = p.check(bad, 443, None);
        assert_eq!(literal.reason_code(), reason::BLOCKED_ADDRESS, "{bad}");
        let named = p.check("api.example", 443, Some(&ips(&[bad])));
        assert_eq!(named.verdict, Verdict::Deny, "{bad}");
        assert_eq!(named.reason_code(), reason::BLOCKED_ADDRESS, "{bad}");
        // Learn mode does not waive it.
        let learn = p.clone().with_mode(Mode::Learn);
        assert_eq!(learn.check(bad, 443, None).verdict, Verdict::Deny, "{bad}");
    }
    // An address rule lifts it, as for every blocked range.
    let p = policy(
        "preset = \"allow-all\"\n[[network]]\naction = \"allow\"\ntarget = \"2002::/16\"\n",
        "",
    );
    assert_eq!(p.check("2002:a00:1::1", 443, None).verdict, Verdict::Allow);
}

#[test]
fn the_hosts_own_addresses_are_blocked_unless_named() {
    // Every address on the host's interfaces, whatever its range: the
    // loopback one is always there; others (a public address) when present.
    let own = hostaddrs::host_addresses();
    assert!(!own.is_empty());
    let p = policy("preset = \"allow-all\"", "");
    for ip in &own {
        let text = ip.to_string();
        let literal = p.check(&text, 8080, None);
        assert_eq!(literal.verdict, Verdict::Deny, "{ip}");
        assert_eq!(literal.reason_code(), reason::BLOCKED_ADDRESS, "{ip}");
        let named = p.check("api.example", 8080, Some(&[*ip]));
        assert_eq!(named.reason_code(), reason::BLOCKED_ADDRESS, "{ip}");
        if !is_blocked(*ip) {
            assert!(named.reason.ends_with("(the host's own)"), "{named:?}");
        }
        // `--add-host` for a name is permission for that name.
        let mapped = p
            .clone()
            .with_add_hosts([AddHost::parse(&format!("svc.test:[{ip}]")).unwrap()]);
        assert_eq!(
            mapped.check("svc.test", 8080, Some(&[*ip])).verdict,
            Verdict::Allow,
            "{ip}"
        );
    }
}

#[test]
fn raw_bytes_need_a_raw_name_rule() {
    let p = policy(
        "[[network]]\naction = \"allow\"\ntarget = \"web.example\"\n\
         [[network]]\naction = \"allow\"\ntarget = \"db.example:5432 raw\"\n\
         [[network]]\naction = \"allow\"\ntarget = \"203.0.113.0/24\"\n",
        "",
    );
    assert!(!p.check("web.example", 5432, None).raw);
    assert!(p.check("db.example", 5432, None).raw);
    assert!(p.check("203.0.113.9", 5432, None).raw);
    let rules = p.rules();
    assert_eq!(rules[1].target.to_string(), "db.example:5432 raw");
}

#[test]
fn a_workspace_sink_counts_only_when_intercepted() {
    let ws = WorkspaceFile::parse(
        "[flow]\ntrusted_sinks = [\"api.anthropic.com\"]\n",
        Path::new("/w/.sandpen.toml"),
    )
    .unwrap();
    let p = policy(
        "[[network]]\naction = \"allow\"\ntarget = \"api.anthropic.com\"\n",
        "",
    )
    .with_workspace(Some(ws.clone()), Some(&ws.sha256))
    .with_labels(secret_read());
    let d = p.check("api.anthropic.com", 443, None);
    assert_eq!(d.verdict, Verdict::Allow);
    assert!(d.sink_if_intercepted);
    // The same sink in the user's own file needs nothing more.
    let p = p.with_trusted_sinks(vec![Target::parse("api.anthropic.com").unwrap()]);
    assert!(!p.check("api.anthropic.com", 443, None).sink_if_intercepted);
}

#[test]
fn workspace_only_sinks_are_those_no_user_sink_covers() {
    let ws = WorkspaceFile::parse(
        "[flow]\ntrusted_sinks = [\"api.anthropic.com\", \"up.example.org\", \
         \"*.corp.example\", \"*.a.corp.example:443\", \"api.anthropic.com\"]\n",
        Path::new("/w/.sandpen.toml"),
    )
    .unwrap();
    let user = file(
        "[flow]\ntrusted_sinks = [\"*.example.org:8443\", \"a.corp.example\"]\n",
        Scope::Sandbox,
    );
    let p =
        Policy::from_files(None, Some(&user)).with_workspace(Some(ws.clone()), Some(&ws.sha256));
    let only: Vec<String> = p
        .workspace_only_sinks()
        .iter()
        .map(|t| t.to_string())
        .collect();
    // The user's `*.example.org:8443` does not cover every port of
    // up.example.org, nor `a.corp.example` the wildcard; duplicates once.
    assert_eq!(
        only,
        [
            "api.anthropic.com",
            "up.example.org",
            "*.corp.example",
            "*.a.corp.example:443"
        ]
    );
    let p = p.with_trusted_sinks(vec![
        Target::parse("*.example.org").unwrap(),
        Target::parse("*.corp.example").unwrap(),
    ]);
    let only: Vec<String> = p
        .workspace_only_sinks()
        .iter()
        .map(|t| t.to_string())
        .collect();
    assert_eq!(only, ["api.anthropic.com"]);
    // An untrusted workspace file names no sink at all.
    let p = Policy::default().with_workspace(Some(ws), None);
    assert!(p.workspace_only_sinks().is_empty());
}

#[test]
fn a_target_covers_what_it_matches_all_of() {
    let t = |s: &str| Target::parse(s).unwrap();
    let yes = [
        ("**", "api.example.org"),
        ("**", "*.example.org:443"),
        ("**", "10.0.0.0/8"),
        ("*.example.org", "api.example.org:443"),
        ("*.example.org", "*.a.example.org"),
        ("*.example.org", "*.example.org:443"),
        ("api.example.org", "api.example.org:443 raw"),
        ("10.0.0.0/8", "10.1.2.3:22"),
    ];
    for (a, b) in yes {
        assert!(t(a).covers(&t(b)), "{a} covers {b}");
    }
    let no = [
        ("api.example.org:443", "api.example.org"),
        ("*.example.org", "example.org"),
        ("*.example.org", "**"),
        ("api.example.org", "*.example.org"),
        ("*.a.example.org", "*.example.org"),
        ("*.example.org", "badexample.org"),
        ("10.0.0.0/8", "11.0.0.1"),
        ("api.example.org", "10.0.0.1"),
    ];
    for (a, b) in no {
        assert!(!t(a).covers(&t(b)), "{a} does not cover {b}");
    }
}

/// A workspace file that widens: `trusted_sinks = ["**"]`, `trusted`, an
/// allow rule; it also narrows (a deny rule, a secret).
const WIDENING: &str = "[files]\ndeny_read = [\"db/**\"]\n\
[flow]\nsecret = [\"secrets/**\"]\ntrusted_sinks = [\"**\"]\ntrusted = [\"*.evil.test\"]\n\
[[network]]\naction = \"allow\"\ntarget = \"evil.test\"\n\
[[network]]\naction = \"deny\"\ntarget = \"registry.npmjs.org\"\n";

fn sandbox_allowing(targets: &[&str]) -> PolicyFile {
    let mut text = String::from("preset = \"deny-all\"\n");
    for t in targets {
        text += &format!("[[network]]\naction = \"allow\"\ntarget = \"{t}\"\n");
    }
    file(&text, Scope::Sandbox)
}

#[test]
fn an_untrusted_workspace_file_only_narrows() {
    let path = Path::new("/w/.sandpen.toml");
    let ws = WorkspaceFile::parse(WIDENING, path).unwrap();
    assert_eq!(ws.network.len(), 2);
    assert_eq!(ws.network[0].scope, Scope::Workspace);
    let user = sandbox_allowing(&["other.test", "registry.npmjs.org"]);
    let p = Policy::from_files(None, Some(&user))
        .with_workspace(Some(ws.clone()), None)
        .with_labels(secret_read());
    // The allow rule is not applied: evil.test stays denied.
    assert_eq!(p.check("evil.test", 443, None).verdict, Verdict::Deny);
    // `trusted_sinks = ["**"]` is not applied: the label narrows.
    let d = p.check("other.test", 443, None);
    assert_eq!(d.verdict, Verdict::Deny, "{d}");
    assert!(d.reason.starts_with("flow: secret-read"), "{d}");
    assert!(!p.is_trusted_source("a.evil.test", 443));
    // What narrows applies: the deny rule, the deny-read and secret patterns.
    let p2 = Policy::from_files(None, Some(&user)).with_workspace(Some(ws.clone()), None);
    assert_eq!(
        p2.check("registry.npmjs.org", 443, None).verdict,
        Verdict::Deny
    );
    assert_eq!(p2.check("other.test", 443, None).verdict, Verdict::Allow);
    let rules = p2.file_rules().unwrap();
    assert!(rules.hidden(Path::new("db/x")).is_some());
    assert!(rules.secret(Path::new("secrets/t")).is_some());
    // And the policy says what it left out, and why, in one line.
    let held = p.held_back().unwrap();
    assert_eq!(held.reason, HeldReason::NotTrusted);
    let line = held.to_string();
    assert!(!line.contains('\n'), "{line}");
    for part in [
        "/w/.sandpen.toml",
        "flow.trusted_sinks **",
        "flow.trusted *.evil.test",
        "network allow evil.test",
        "not trusted",
    ] {
        assert!(line.contains(part), "{part} missing from: {line}");
    }
    assert!(
        !line.contains("registry.npmjs.org"),
        "a deny rule is not held back: {line}"
    );
}

#[test]
fn a_trusted_workspace_file_applies_until_it_changes() {
    let path = Path::new("/w/.sandpen.toml");
    let ws = WorkspaceFile::parse(WIDENING, path).unwrap();
    let user = sandbox_allowing(&["other.test"]);
    let trusted = ws.sha256.clone();
    let p = Policy::from_files(None, Some(&user))
        .with_workspace(Some(ws), Some(&trusted))
        .with_labels(secret_read());
    assert!(p.held_back().is_none());
    assert_eq!(p.check("evil.test", 443, None).verdict, Verdict::Allow);
    assert_eq!(p.check("other.test", 443, None).verdict, Verdict::Allow);
    assert!(p.is_trusted_source("a.evil.test", 443));
    // One byte more, and the trust no longer holds.
    let edited = WorkspaceFile::parse(&format!("{WIDENING}# edited\n"), path).unwrap();
    assert_ne!(edited.sha256, trusted);
    let p = Policy::from_files(None, Some(&user))
        .with_workspace(Some(edited), Some(&trusted))
        .with_labels(secret_read());
    assert_eq!(
        p.held_back().unwrap().reason,
        HeldReason::ChangedSinceTrusted
    );
    assert!(p
        .held_back()
        .unwrap()
        .to_string()
        .contains("changed since you trusted it"));
    assert_eq!(p.check("evil.test", 443, None).verdict, Verdict::Deny);
    // A file that only narrows needs no trust and holds nothing back.
    let narrow = WorkspaceFile::parse("[files]\nread_only = [\"ci/**\"]\n", path).unwrap();
    assert!(Policy::default()
        .with_workspace(Some(narrow), None)
        .held_back()
        .is_none());
}

#[test]
fn the_reserve_comes_from_the_users_files_only() {
    let g = file("[files]\nreserve = \"2GiB\"\n", Scope::Global);
    let s = file("[files]\nreserve = \"10%\"\n", Scope::Sandbox);
    assert_eq!(
        Policy::from_files(Some(&g), None).reserve(),
        Reserve::Bytes(2 << 30)
    );
    assert_eq!(
        Policy::from_files(Some(&g), Some(&s)).reserve(),
        Reserve::Percent(10)
    );
    assert_eq!(Policy::default().reserve(), Reserve::Default);
    let (line, _, msg) = invalid("[files]\nreserve = \"lots\"\n");
    assert_eq!(line, 2);
    assert!(msg.contains("invalid reserve"), "{msg}");
}

// ---- ask mode ----

#[test]
fn ask_mode_marks_only_what_no_rule_decides() {
    let p = policy(G, "mode = \"ask\"\nask_timeout = 7\n");
    assert_eq!(p.mode(), Mode::Ask);
    assert_eq!(p.ask_timeout(), std::time::Duration::from_secs(7));
    // Nothing decides it: denied (as enforce), but askable.
    let d = p.check("new.test", 443, None);
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(d.reason, reason::NO_MATCHING_RULE);
    assert!(d.ask);
    // A deny rule stays a denial.
    let d = p.check("bad.example.org", 443, None);
    assert_eq!(d.reason, reason::DENIED_BY_RULE);
    assert!(!d.ask);
    // An allowed name is not asked about.
    assert!(!p.check("pkgs.example.org", 443, None).ask);
    // A blocked literal address is never asked about; a public one is.
    assert!(!p.check("169.254.169.254", 80, None).ask);
    assert!(!p.check("127.0.0.1", 80, None).ask);
    assert!(p.check("203.0.113.7", 80, None).ask);
    // Enforce and learn never mark anything.
    assert!(!policy(G, "").check("new.test", 443, None).ask);
    assert!(
        !policy(G, "mode = \"learn\"")
            .check("new.test", 443, None)
            .ask
    );
    // The default timeout.
    assert_eq!(policy(G, "").ask_timeout(), DEFAULT_ASK_TIMEOUT);
}

#[test]
fn ask_mode_never_asks_past_a_flow_narrowing() {
    let p = policy(
        G,
        "mode = \"ask\"\n[flow]\ntrusted_sinks = [\"sink.test\"]\n",
    )
    .with_labels(secret_read());
    assert!(!p.check("new.test", 443, None).ask);
    // A trusted sink of the user's could still be allowed: askable.
    assert!(p.check("sink.test", 443, None).ask);
}

#[test]
fn an_approval_once_allows_that_destination_only() {
    let p = policy(G, "mode = \"ask\"");
    let once = p.with_once("new.test", 443).expect("a valid host");
    let d = once.check("new.test", 443, None);
    assert_eq!(d.verdict, Verdict::Allow);
    assert_eq!(d.rule.as_ref().map(|r| r.scope), Some(Scope::Once));
    assert_eq!(once.check("new.test", 80, None).verdict, Verdict::Deny);
    assert_eq!(once.check("other.test", 443, None).verdict, Verdict::Deny);
    // Deny rules still win over it.
    let once = p.with_once("bad.example.org", 443).expect("a valid host");
    assert_eq!(
        once.check("bad.example.org", 443, None).reason,
        reason::DENIED_BY_RULE
    );
    assert!(p.with_once("::1", 22).is_some());
}

#[test]
fn ask_timeout_is_checked() {
    let (line, _, msg) = invalid("ask_timeout = 0\n");
    assert_eq!(line, 1);
    assert!(msg.contains("ask_timeout"), "{msg}");
    let (_, _, msg) = invalid("ask_timeout = \"2m\"\n");
    assert!(msg.contains("ask_timeout"), "{msg}");
}
