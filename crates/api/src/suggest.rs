//! Suggestions: rules proposed from what a sandbox did. `sandpen policy
//! suggest` and the page's Decisions section (`GET
//! /api/sandboxes/{name}/suggestions`, `POST …/suggestions/apply`) call
//! [`for_sandbox`] and [`apply`], so both list and apply the same thing.
//!
//! Read from the sandbox's network log: learn mode's `would-deny` records,
//! connections ask mode refused for want of an answer (`no-matching-rule`,
//! `ask-timeout`) and the ones the user approved once. A destination the
//! user refused (`ask-denied`) or a rule denies is never proposed, nor one
//! the policy in force already allows.
//!
//! - **Additions**, grouped by registrable domain (the public suffix list of
//!   the `psl` crate) and port: one rule per name, or `*.DOMAIN:PORT` (and
//!   `DOMAIN:PORT` if the apex was used) when two or more names under the
//!   domain were, so the set is the smallest that covers what was seen.
//!   Each carries counts, first and last seen, and flags for what looks like
//!   exfiltration: a high-entropy subdomain (data in the name), a large
//!   upload soon after the domain was first seen, a paste or drop site.
//! - **Promotions**: a rule that the files of at least K sandboxes carry
//!   can become one global rule.
//! - **Removals**: an allow rule of the sandbox's file that no connection
//!   used for N days (and that is older than that).
//!
//! Guarantees of [`apply`]: only the numbers chosen are applied, each to
//! its file (promotions to the global one), each recorded in the sandbox's
//! history as made by the caller (`suggestion` from the CLI, `web` from the
//! page) with the counts and flags as the reason; when the caller passes
//! the proposals it showed and the list has changed since, nothing is
//! applied. Hosts, domains and processes come from the guest: the caller
//! escapes them (docs/policy.md, "Suggestions").

use std::collections::{BTreeMap, BTreeSet};

use sandpen_policy::file::PolicyFile;
use sandpen_policy::history::{Change, Edit, History, Who};
use sandpen_policy::{Action, Policy, Rule, RuleSource, Scope, Verdict};
use sandpen_proxy::audit::{read_log, LogFilter};
use sandpen_proxy::ConnectionReport;
use sandpen_supervisor::{control, sandbox, Dirs};
use serde::Serialize;
use time::OffsetDateTime;

use crate::policy::{file_path, Where};
use crate::ApiError;

/// A single connection that sent at least this much right after its
/// domain was first seen is flagged.
pub const LARGE_UPLOAD: u64 = 1024 * 1024;
/// "Right after": within this long of the domain's first record.
const FIRST_SEEN_WINDOW: time::Duration = time::Duration::minutes(10);

/// Paste, drop and request-capture sites: a destination an agent has little
/// reason to need and an attacker every reason to use.
const PASTE_SITES: &[&str] = &[
    "pastebin.com",
    "paste.ee",
    "hastebin.com",
    "ghostbin.com",
    "dpaste.org",
    "dpaste.com",
    "paste.rs",
    "termbin.com",
    "ix.io",
    "sprunge.us",
    "0x0.st",
    "transfer.sh",
    "file.io",
    "tmpfiles.org",
    "webhook.site",
    "requestbin.com",
    "pipedream.net",
    "beeceptor.com",
    "ngrok.io",
    "ngrok-free.app",
    "interact.sh",
    "oast.fun",
    "burpcollaborator.net",
];

/// What a suggestion does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Proposal {
    /// Add `allow TARGET` to the sandbox's file.
    Add { target: String },
    /// Add `allow TARGET` to the global file (it is in `sandboxes`' files).
    Promote {
        target: String,
        sandboxes: Vec<String>,
    },
    /// Remove the sandbox's rule `id` (`allow TARGET`).
    Remove { id: u32, target: String },
}

impl std::fmt::Display for Proposal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Proposal::Add { target } => write!(f, "allow {target}"),
            Proposal::Promote { target, sandboxes } => write!(
                f,
                "allow {target} -g (in {} sandboxes: {})",
                sandboxes.len(),
                sandboxes.join(", ")
            ),
            Proposal::Remove { id, target } => write!(f, "remove rule {id} (allow {target})"),
        }
    }
}

/// One numbered suggestion.
#[derive(Debug, Clone, Serialize)]
pub struct Suggestion {
    /// 1, 2, ...: what `--apply` takes.
    pub n: usize,
    pub proposal: Proposal,
    /// The registrable domain the additions are grouped by.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// `host:port`s seen.
    pub destinations: Vec<String>,
    /// Connections (or requests) seen.
    pub count: usize,
    #[serde(with = "time::serde::rfc3339::option")]
    pub first_seen: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_seen: Option<OffsetDateTime>,
    /// Guest processes, where known.
    pub processes: Vec<String>,
    pub bytes_up: u64,
    /// Why it may be exfiltration; flagged suggestions deserve a look first.
    pub flags: Vec<String>,
    /// Where the records came from: `learn`, `ask`, `approved-once`.
    pub sources: Vec<String>,
}

/// Everything `suggest` reads.
pub struct Input<'a> {
    /// The sandbox's network log, oldest first.
    pub records: &'a [ConnectionReport],
    /// The sandbox's policy in force (additions it allows are left out).
    pub policy: &'a Policy,
    /// Every sandbox's own file rules, by name (for promotions).
    pub sandbox_rules: &'a [(String, Vec<Rule>)],
    /// The sandbox whose suggestions these are.
    pub sandbox: &'a str,
    /// Its history (when its rules were added).
    pub history: &'a [Change],
    pub now: OffsetDateTime,
    /// Promotion threshold: in at least this many sandboxes.
    pub promote_k: usize,
    /// Removal threshold: unused for this many days.
    pub unused_days: i64,
}

/// Where a record says the sandbox wanted to go and was not let.
fn source_of(r: &ConnectionReport) -> Option<&'static str> {
    let code = r.reason.split(':').next().unwrap_or_default();
    match (r.decision, code) {
        (Verdict::WouldDeny, _) => Some("learn"),
        (Verdict::Deny, "no-matching-rule" | "ask-timeout") => Some("ask"),
        (Verdict::Allow, _) if r.rule_scope == Some(Scope::Once) => Some("approved-once"),
        _ => None,
    }
}

/// The registrable domain of `host` (`files.pythonhosted.org` ->
/// `pythonhosted.org`), or the host itself (an address, a bare name).
pub fn registrable(host: &str) -> String {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return host.to_string();
    }
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    match psl::domain_str(&host) {
        Some(d) => d.to_string(),
        None => host,
    }
}

/// Shannon entropy in bits per character.
fn entropy(s: &str) -> f64 {
    let mut counts = BTreeMap::new();
    for c in s.chars() {
        *counts.entry(c).or_insert(0usize) += 1;
    }
    let n = s.chars().count() as f64;
    counts
        .values()
        .map(|&k| {
            let p = k as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// A label left of the registrable domain that looks like encoded data:
/// long and close to random (hex, base32, base64).
pub fn high_entropy_label(host: &str, domain: &str) -> Option<String> {
    let sub = host.strip_suffix(domain)?.trim_end_matches('.');
    sub.split('.')
        .find(|l| l.len() >= 16 && entropy(l) >= 3.3)
        .map(str::to_string)
}

pub fn is_paste_site(domain: &str) -> bool {
    PASTE_SITES.contains(&domain)
}

/// `host:port`, IPv6 in brackets.
fn dest(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[derive(Default)]
struct Group {
    hosts: BTreeSet<String>,
    count: usize,
    first: Option<OffsetDateTime>,
    last: Option<OffsetDateTime>,
    bytes_up: u64,
    sources: BTreeSet<&'static str>,
    flags: BTreeSet<String>,
    processes: BTreeSet<String>,
}

/// The guest process a record names, when the network log carries one (a
/// `process` field: a name, or an object with `name`/`comm`/`exe` and
/// `pid`). Read through the record's JSON form so that this works before
/// and after `ConnectionReport` has a typed field for it.
pub fn process_of(r: &ConnectionReport) -> Option<String> {
    r.process
        .as_ref()
        .filter(|p| !p.name.is_empty())
        .map(|p| format!("{} ({})", p.name, p.pid))
}

/// The suggestions, numbered from 1: additions (flagged ones last), then
/// promotions, then removals.
pub fn suggest(input: &Input<'_>) -> Vec<Suggestion> {
    // When each domain was first seen at all (any decision).
    let mut first_of_domain: BTreeMap<String, OffsetDateTime> = BTreeMap::new();
    for r in input.records {
        let d = registrable(&r.host);
        first_of_domain
            .entry(d)
            .and_modify(|t| *t = (*t).min(r.time))
            .or_insert(r.time);
    }
    // Destinations the user refused: never proposed.
    let refused: BTreeSet<(String, u16)> = input
        .records
        .iter()
        .filter(|r| r.reason.starts_with(sandpen_policy::reason::ASK_DENIED))
        .map(|r| (r.host.to_ascii_lowercase(), r.port))
        .collect();
    let mut groups: BTreeMap<(String, u16), Group> = BTreeMap::new();
    for r in input.records {
        let Some(source) = source_of(r) else {
            continue;
        };
        let host = r.host.trim_end_matches('.').to_ascii_lowercase();
        if host.is_empty() || r.port == 0 || refused.contains(&(host.clone(), r.port)) {
            continue;
        }
        // Already allowed by the policy in force (enforce semantics).
        let enforced = input
            .policy
            .clone()
            .with_mode(sandpen_policy::Mode::Enforce);
        if enforced.check(&host, r.port, None).verdict == Verdict::Allow {
            continue;
        }
        let domain = registrable(&host);
        let g = groups.entry((domain.clone(), r.port)).or_default();
        g.hosts.insert(host.clone());
        g.count += 1;
        g.first = Some(g.first.map_or(r.time, |t| t.min(r.time)));
        g.last = Some(g.last.map_or(r.time, |t| t.max(r.time)));
        g.bytes_up += r.bytes_up;
        g.sources.insert(source);
        if let Some(p) = process_of(r) {
            g.processes.insert(p);
        }
        if let Some(label) = high_entropy_label(&host, &domain) {
            g.flags.insert(format!(
                "high-entropy subdomain `{label}` (data in the name?)"
            ));
        }
        if is_paste_site(&domain) {
            g.flags.insert(format!("{domain} is a paste or drop site"));
        }
        let first = first_of_domain.get(&domain).copied().unwrap_or(r.time);
        if r.bytes_up >= LARGE_UPLOAD && r.time - first <= FIRST_SEEN_WINDOW {
            g.flags.insert(format!(
                "{:.1} MiB uploaded to {domain} within {} min of its first appearance",
                r.bytes_up as f64 / 1048576.0,
                FIRST_SEEN_WINDOW.whole_minutes()
            ));
        }
    }

    let mut additions = Vec::new();
    for ((domain, port), g) in groups {
        let apex = g.hosts.contains(&domain);
        let subs: Vec<&String> = g.hosts.iter().filter(|h| **h != domain).collect();
        let mut targets = Vec::new();
        if subs.len() >= 2 && domain.parse::<std::net::IpAddr>().is_err() {
            targets.push(format!("*.{domain}:{port}"));
            if apex {
                targets.push(format!("{domain}:{port}"));
            }
        } else {
            targets.extend(g.hosts.iter().map(|h| dest(h, port)));
        }
        for target in targets {
            additions.push(Suggestion {
                n: 0,
                proposal: Proposal::Add { target },
                domain: Some(domain.clone()),
                destinations: g.hosts.iter().map(|h| dest(h, port)).collect(),
                count: g.count,
                first_seen: g.first,
                last_seen: g.last,
                processes: g.processes.iter().cloned().collect(),
                bytes_up: g.bytes_up,
                flags: g.flags.iter().cloned().collect(),
                sources: g.sources.iter().map(|s| s.to_string()).collect(),
            });
        }
    }
    // Flagged ones last: the list reads clean first.
    additions.sort_by_key(|s| !s.flags.is_empty());

    let mut out = additions;
    out.extend(promotions(input));
    out.extend(removals(input));
    for (i, s) in out.iter_mut().enumerate() {
        s.n = i + 1;
    }
    out
}

fn bare(proposal: Proposal) -> Suggestion {
    Suggestion {
        n: 0,
        proposal,
        domain: None,
        destinations: Vec::new(),
        count: 0,
        first_seen: None,
        last_seen: None,
        processes: Vec::new(),
        bytes_up: 0,
        flags: Vec::new(),
        sources: Vec::new(),
    }
}

/// Allow rules of this sandbox's file that at least K sandboxes' files
/// carry, and the global file does not.
fn promotions(input: &Input<'_>) -> Vec<Suggestion> {
    let mine: Vec<&Rule> = input
        .sandbox_rules
        .iter()
        .filter(|(n, _)| n == input.sandbox)
        .flat_map(|(_, rules)| rules.iter())
        .filter(|r| r.action == Action::Allow)
        .collect();
    let global: Vec<&Rule> = input
        .policy
        .rules()
        .iter()
        .filter(|r| r.scope == Scope::Global)
        .collect();
    let mut out = Vec::new();
    for rule in mine {
        if global
            .iter()
            .any(|g| g.action == rule.action && g.target == rule.target)
        {
            continue;
        }
        let sandboxes: Vec<String> = input
            .sandbox_rules
            .iter()
            .filter(|(_, rules)| {
                rules
                    .iter()
                    .any(|r| r.action == rule.action && r.target == rule.target)
            })
            .map(|(n, _)| n.clone())
            .collect();
        if sandboxes.len() >= input.promote_k.max(1) {
            out.push(bare(Proposal::Promote {
                target: rule.target.to_string(),
                sandboxes,
            }));
        }
    }
    out
}

/// Allow rules of the sandbox's own file that no connection used for
/// `unused_days`, and that were added before that.
fn removals(input: &Input<'_>) -> Vec<Suggestion> {
    let since = input.now - time::Duration::days(input.unused_days);
    let mut out = Vec::new();
    for rule in input.policy.rules() {
        if rule.scope != Scope::Sandbox || rule.action != Action::Allow {
            continue;
        }
        let RuleSource::File { path, .. } = &rule.source else {
            continue;
        };
        let target = rule.target.to_string();
        let added = input
            .history
            .iter()
            .filter(|c| &c.file == path)
            .filter(|c| matches!(&c.edit, Edit::AddRule { id, target: t, .. } if *id == rule.id && *t == target))
            .filter_map(|c| {
                OffsetDateTime::parse(&c.time, &time::format_description::well_known::Rfc3339).ok()
            })
            .max();
        if added.is_some_and(|t| t > since) {
            continue;
        }
        let last_use = input
            .records
            .iter()
            .filter(|r| {
                r.rule_scope == Some(Scope::Sandbox)
                    && r.rule_id == Some(rule.id)
                    && r.decision == Verdict::Allow
            })
            .map(|r| r.time)
            .max();
        if last_use.is_some_and(|t| t > since) {
            continue;
        }
        let mut s = bare(Proposal::Remove {
            id: rule.id,
            target,
        });
        s.last_seen = last_use;
        out.push(s);
    }
    out
}

/// `1,3` or `1-3,5`: the numbers chosen.
pub fn parse_selection(s: &str, max: usize) -> Result<Vec<usize>, String> {
    let mut out = BTreeSet::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let parse = |x: &str| {
            x.parse::<usize>()
                .map_err(|_| format!("`{part}` is not a suggestion number or range"))
        };
        let (a, b) = (parse(a)?, parse(b)?);
        if a == 0 || b < a || b > max {
            return Err(format!(
                "`{part}`: suggestions are numbered 1 to {max} (see `sandpen policy suggest`)"
            ));
        }
        out.extend(a..=b);
    }
    if out.is_empty() {
        return Err("no suggestion chosen".into());
    }
    Ok(out.into_iter().collect())
}

/// `--promote-k` and `--unused-days`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Propose a global rule when this many sandboxes have it.
    pub promote_k: usize,
    /// Propose removing an allow rule no connection used for this many days.
    pub unused_days: i64,
}

impl Default for Thresholds {
    fn default() -> Thresholds {
        Thresholds {
            promote_k: 3,
            unused_days: 30,
        }
    }
}

/// The suggestions for sandbox `name`: its network log, the policy in
/// force, every sandbox's own rules and its history, read now.
pub fn for_sandbox(dirs: &Dirs, name: &str, t: Thresholds) -> Result<Vec<Suggestion>, ApiError> {
    sandbox::load(dirs, name)?;
    let paths = dirs.sandbox(name);
    let records = read_log(
        &paths.logs().join("net.jsonl"),
        &LogFilter {
            sandbox: None,
            limit: None,
        },
    )?;
    let policy = crate::policy::policy_for(dirs, Some(name))?;
    let mut sandbox_rules = Vec::new();
    for c in sandbox::list(dirs)? {
        let file = PolicyFile::load(
            &dirs.sandbox(&c.name).dir.join("policy.toml"),
            Scope::Sandbox,
        )?;
        sandbox_rules.push((c.name, file.rules().to_vec()));
    }
    let changes = History::in_dir(&paths.dir).read()?;
    Ok(suggest(&Input {
        records: &records,
        policy: &policy,
        sandbox_rules: &sandbox_rules,
        sandbox: name,
        history: &changes,
        now: OffsetDateTime::now_utc(),
        promote_k: t.promote_k,
        unused_days: t.unused_days,
    }))
}

/// One applied suggestion: its number and what was done, in words.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    pub n: usize,
    pub done: String,
}

/// The reason a suggestion's change is recorded with.
fn why(s: &Suggestion) -> String {
    format!(
        "suggestion {}: {} connection(s) ({}){}",
        s.n,
        s.count,
        s.sources.join(", "),
        if s.flags.is_empty() {
            String::new()
        } else {
            format!("; flagged: {}", s.flags.join("; "))
        }
    )
}

/// Applies suggestions `selection` (`1,3`, `2-4`) of sandbox `name`, as
/// listed now by [`for_sandbox`]: each written to its file, recorded in the
/// sandbox's history as made by `who`, and the running sandbox told to
/// decide what it holds again. With `shown` (the proposals, in the order of
/// the selection, as the caller showed them), nothing is applied if they
/// are no longer what those numbers propose.
pub async fn apply(
    dirs: &Dirs,
    name: &str,
    selection: &str,
    shown: Option<&[Proposal]>,
    t: Thresholds,
    who: Who,
) -> Result<Vec<Applied>, ApiError> {
    let all = for_sandbox(dirs, name, t)?;
    let chosen = parse_selection(selection, all.len()).map_err(ApiError::Selection)?;
    let chosen: Vec<&Suggestion> = chosen
        .iter()
        .filter_map(|n| all.iter().find(|s| s.n == *n))
        .collect();
    if let Some(shown) = shown {
        let now: Vec<&Proposal> = chosen.iter().map(|s| &s.proposal).collect();
        if !now.iter().copied().eq(shown.iter()) {
            return Err(ApiError::SuggestionsChanged(name.to_string()));
        }
    }
    let paths = dirs.sandbox(name);
    let history = History::in_dir(&paths.dir);
    let mut out = Vec::new();
    for s in chosen {
        let place = match s.proposal {
            Proposal::Promote { .. } => Where::Global,
            _ => Where::Sandbox(name.to_string()),
        };
        let (path, kind) = file_path(dirs, &place)?;
        let mut file = PolicyFile::load(&path, kind)?;
        let (done, change) = match &s.proposal {
            Proposal::Add { target } | Proposal::Promote { target, .. } => {
                let before = file.rules().len();
                let rule = file.add_rule(Action::Allow, target)?;
                let said = format!(
                    "rule {} ({}: {} {})",
                    rule.id, rule.scope, rule.action, rule.target
                );
                if file.rules().len() == before {
                    (format!("already there: {said}"), None)
                } else {
                    (
                        format!("added {said}"),
                        Some(Edit::AddRule {
                            id: rule.id,
                            action: rule.action,
                            target: rule.target.to_string(),
                        }),
                    )
                }
            }
            Proposal::Remove { id, .. } => {
                let r = file.remove_rule(*id)?;
                (
                    format!(
                        "removed rule {} ({}: {} {})",
                        r.id, r.scope, r.action, r.target
                    ),
                    Some(Edit::RemoveRule {
                        id: r.id,
                        action: r.action,
                        target: r.target.to_string(),
                    }),
                )
            }
        };
        file.save()?;
        if let Some(change) = change {
            let now = OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            history.append(&now, who, &file, change, &why(s), None)?;
        }
        out.push(Applied { n: s.n, done });
    }
    if control::supervisor_alive(&paths) {
        // A sandbox that stops meanwhile holds nothing.
        let _ = control::recheck(&paths).await;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A learn-mode log as the proxy writes it: an `npm ci`, a `pip
    /// install` and a `git clone` (GitHub over HTTPS), plus what an
    /// injected agent might do on the side.
    const FIXTURE: &str = include_str!("../testdata/learn-npm-pip-git.jsonl");

    /// Destinations the commands used (they must pass after --apply) and
    /// destinations that must stay closed.
    const COMMANDS_NEED: &[(&str, u16)] = &[
        ("registry.npmjs.org", 443),
        ("pypi.org", 443),
        ("files.pythonhosted.org", 443),
        ("github.com", 443),
        ("codeload.github.com", 443),
        ("objects.githubusercontent.com", 443),
    ];
    const EXTRA_HOSTS: &[(&str, u16)] = &[
        ("pastebin.com", 443),
        ("evil.example", 443),
        ("npmjs.org.evil.example", 443),
        ("registry.npmjs.org", 80),
        ("pypi.org", 22),
        ("example.com", 443),
        ("github.com.attacker.test", 443),
    ];

    fn records() -> Vec<ConnectionReport> {
        FIXTURE
            .lines()
            .map(|l| serde_json::from_str(l).expect("a fixture record"))
            .collect()
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::parse(
            "2026-12-04T18:00:00Z",
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    }

    fn run(policy: &Policy, sandbox_rules: &[(String, Vec<Rule>)]) -> Vec<Suggestion> {
        suggest(&Input {
            records: &records(),
            policy,
            sandbox_rules,
            sandbox: "app",
            history: &[],
            now: now(),
            promote_k: 3,
            unused_days: 30,
        })
    }

    fn learn() -> Policy {
        Policy::from_rules(
            sandpen_policy::Mode::Learn,
            sandpen_policy::Preset::DenyAll,
            vec![],
        )
    }

    #[test]
    fn registrable_domains_come_from_the_public_suffix_list() {
        assert_eq!(registrable("files.pythonhosted.org"), "pythonhosted.org");
        assert_eq!(registrable("a.b.example.co.uk"), "example.co.uk");
        assert_eq!(registrable("user.github.io"), "user.github.io");
        assert_eq!(registrable("203.0.113.7"), "203.0.113.7");
    }

    #[test]
    fn exfiltration_signs_are_flagged() {
        assert!(high_entropy_label("q8z2k4x7c9v1b3n5m0ls.evil.example", "evil.example").is_some());
        assert!(high_entropy_label("registry.npmjs.org", "npmjs.org").is_none());
        assert!(
            high_entropy_label("objects.githubusercontent.com", "githubusercontent.com").is_none()
        );
        assert!(is_paste_site("pastebin.com"));
        let s = run(&learn(), &[]);
        let flagged: Vec<_> = s.iter().filter(|s| !s.flags.is_empty()).collect();
        let by_domain = |d: &str| flagged.iter().find(|s| s.domain.as_deref() == Some(d));
        assert!(by_domain("pastebin.com").is_some(), "{s:#?}");
        assert!(
            by_domain("evil.example").is_some_and(|s| s
                .flags
                .iter()
                .any(|f| f.contains("high-entropy"))
                && s.flags.iter().any(|f| f.contains("MiB uploaded"))),
            "{s:#?}"
        );
        // Clean ones first.
        let first_flagged = s.iter().position(|s| !s.flags.is_empty()).unwrap();
        assert!(s[first_flagged..].iter().all(|s| !s.flags.is_empty()));
    }

    /// Applied in enforce mode, the clean suggestions let the commands'
    /// destinations through and nothing of the extra hosts.
    #[test]
    fn applied_suggestions_pass_the_commands_and_nothing_else() {
        let s = run(&learn(), &[]);
        let chosen: Vec<_> = s.iter().filter(|s| s.flags.is_empty()).collect();
        let mut file = sandpen_policy::PolicyFile::empty(
            std::path::Path::new("/x/policy.toml"),
            Scope::Sandbox,
        );
        for c in &chosen {
            let Proposal::Add { target } = &c.proposal else {
                panic!("only additions expected: {c:?}");
            };
            file.add_rule(Action::Allow, target).unwrap();
        }
        let enforce = Policy::from_files(None, Some(&file));
        for (h, p) in COMMANDS_NEED {
            assert_eq!(
                enforce.check(h, *p, None).verdict,
                Verdict::Allow,
                "{h}:{p} is needed; rules: {:?}",
                chosen
                    .iter()
                    .map(|c| c.proposal.to_string())
                    .collect::<Vec<_>>()
            );
        }
        for (h, p) in EXTRA_HOSTS {
            assert_eq!(
                enforce.check(h, *p, None).verdict,
                Verdict::Deny,
                "{h}:{p} must stay closed"
            );
        }
        // The rule set is small: one per registrable domain and port, a
        // wildcard where two names of one domain were used.
        let targets: BTreeSet<String> = chosen.iter().map(|c| c.proposal.to_string()).collect();
        assert!(targets.contains("allow github.com:443"), "{targets:?}");
        assert!(
            targets.contains("allow codeload.github.com:443"),
            "{targets:?}"
        );
        assert_eq!(targets.len(), 6, "{targets:?}");
        let npm = chosen
            .iter()
            .find(|c| c.domain.as_deref() == Some("npmjs.org"))
            .unwrap();
        assert!(npm.count >= 3 && npm.first_seen < npm.last_seen, "{npm:?}");
    }

    /// A log recorded through the real proxy in learn mode (test-agents
    /// image): `npm install` and `npm ci` of two packages, `pip install six`
    /// in a venv, and a `git clone` of a GitHub repository, which fails
    /// here (GitHub does not resolve on the development machine: a
    /// `resolve-failed` denial, never proposed).
    #[test]
    fn a_recorded_learn_log_gives_rules_that_pass_npm_and_pip() {
        let records: Vec<ConnectionReport> =
            include_str!("../testdata/recorded-learn-npm-pip.jsonl")
                .lines()
                .map(|l| serde_json::from_str(l).expect("a recorded record"))
                .collect();
        let s = suggest(&Input {
            records: &records,
            policy: &learn(),
            sandbox_rules: &[],
            sandbox: "rec",
            history: &[],
            now: now(),
            promote_k: 3,
            unused_days: 30,
        });
        let targets: BTreeSet<String> = s.iter().map(|s| s.proposal.to_string()).collect();
        assert_eq!(
            targets,
            [
                "allow files.pythonhosted.org:443",
                "allow pypi.org:443",
                "allow registry.npmjs.org:443"
            ]
            .into_iter()
            .map(String::from)
            .collect::<BTreeSet<_>>()
        );
        assert!(s.iter().all(|s| s.flags.is_empty()), "{s:#?}");
        let mut file = sandpen_policy::PolicyFile::empty(
            std::path::Path::new("/x/policy.toml"),
            Scope::Sandbox,
        );
        for c in &s {
            if let Proposal::Add { target } = &c.proposal {
                file.add_rule(Action::Allow, target).unwrap();
            }
        }
        let enforce = Policy::from_files(None, Some(&file));
        // Every connection the commands made passes in enforce mode.
        for r in records.iter().filter(|r| r.decision == Verdict::WouldDeny) {
            assert_eq!(
                enforce.check(&r.host, r.port, None).verdict,
                Verdict::Allow,
                "{r:?}"
            );
        }
        for (h, p) in EXTRA_HOSTS {
            assert_eq!(enforce.check(h, *p, None).verdict, Verdict::Deny, "{h}:{p}");
        }
    }

    #[test]
    fn two_names_under_one_domain_become_one_wildcard() {
        let line = |host: &str| {
            format!(
                "{{\"time\":\"2026-12-04T10:00:00Z\",\"sandbox\":\"app\",\"mode\":\"transparent\",\"decision\":\"would-deny\",\"reason\":\"no-matching-rule\",\"host\":\"{host}\",\"port\":443,\"bytes_up\":10,\"bytes_down\":10,\"duration_ms\":1}}"
            )
        };
        let records: Vec<ConnectionReport> = [
            "a.example.org",
            "b.example.org",
            "example.org",
            "x.other.net",
        ]
        .iter()
        .map(|h| serde_json::from_str(&line(h)).unwrap())
        .collect();
        let s = suggest(&Input {
            records: &records,
            policy: &learn(),
            sandbox_rules: &[],
            sandbox: "app",
            history: &[],
            now: now(),
            promote_k: 3,
            unused_days: 30,
        });
        let targets: Vec<String> = s.iter().map(|s| s.proposal.to_string()).collect();
        assert_eq!(
            targets,
            [
                "allow *.example.org:443",
                "allow example.org:443",
                "allow x.other.net:443"
            ]
        );
    }

    #[test]
    fn what_is_allowed_or_refused_is_not_proposed() {
        let mut file = sandpen_policy::PolicyFile::empty(
            std::path::Path::new("/x/policy.toml"),
            Scope::Sandbox,
        );
        file.add_rule(Action::Allow, "pypi.org:443").unwrap();
        let s = run(&Policy::from_files(None, Some(&file)), &[]);
        assert!(!s.iter().any(|s| s.proposal
            == Proposal::Add {
                target: "pypi.org:443".into()
            }));
        // The fixture's user refused refused.example in ask mode.
        assert!(!s
            .iter()
            .any(|s| s.domain.as_deref() == Some("refused.example")));
    }

    #[test]
    fn promotions_and_removals() {
        let mut file = sandpen_policy::PolicyFile::empty(
            std::path::Path::new("/x/app/policy.toml"),
            Scope::Sandbox,
        );
        file.add_rule(Action::Allow, "crates.io:443").unwrap();
        file.add_rule(Action::Allow, "old.example:443").unwrap();
        let rules = file.rules().to_vec();
        let others = |n: &str| (n.to_string(), rules[..1].to_vec());
        let all = vec![("app".to_string(), rules.clone()), others("b"), others("c")];
        let s = run(&Policy::from_files(None, Some(&file)), &all);
        assert!(s.iter().any(|s| matches!(&s.proposal,
            Proposal::Promote { target, sandboxes } if target == "crates.io:443" && sandboxes.len() == 3)));
        assert!(!s.iter().any(|s| matches!(&s.proposal,
            Proposal::Promote { target, .. } if target == "old.example:443")));
        // Neither rule decided any record of the fixture: both unused.
        assert!(s
            .iter()
            .any(|s| matches!(&s.proposal, Proposal::Remove { id: 2, .. })));
    }

    /// A sandbox `app` in a temporary state folder, its network log the
    /// fixture's.
    fn sandbox_with_log() -> (tempfile::TempDir, Dirs) {
        let root = tempfile::tempdir().unwrap();
        let dirs = Dirs {
            state: root.path().join("state"),
            data: root.path().join("data"),
            config: root.path().join("config"),
        };
        let ws = root.path().join("ws");
        std::fs::create_dir_all(&ws).unwrap();
        let paths = dirs.sandbox("app");
        std::fs::create_dir_all(paths.logs()).unwrap();
        let config = serde_json::json!({
            "name": "app", "workspace": ws, "image": "default", "agent": "shell",
            "cpus": 1, "memory_mib": 512, "disk_gib": 4, "accel": "auto",
            "host_uid": 0, "host_gid": 0, "guest_uid": 1000, "guest_gid": 1000,
            "created_at": "2026-12-04T09:00:00Z",
        });
        std::fs::write(paths.config(), config.to_string()).unwrap();
        std::fs::write(paths.logs().join("net.jsonl"), FIXTURE).unwrap();
        (root, dirs)
    }

    /// What `policy suggest --apply` and the page's Apply share: only the
    /// chosen numbers are written, each recorded as made by the caller with
    /// the suggestion as the reason; a list that changed since it was shown
    /// writes nothing.
    #[tokio::test]
    async fn apply_writes_what_was_chosen_and_records_who() {
        let (_root, dirs) = sandbox_with_log();
        let t = Thresholds::default();
        let all = for_sandbox(&dirs, "app", t).unwrap();
        let clean = all.iter().find(|s| s.flags.is_empty()).unwrap();
        let flagged = all.iter().find(|s| !s.flags.is_empty()).unwrap();
        let Proposal::Add { target } = &clean.proposal else {
            panic!("{clean:?}")
        };
        let policy_file = dirs.sandbox("app").dir.join("policy.toml");

        let stale = [Proposal::Add {
            target: "stale.example:443".into(),
        }];
        let e = apply(
            &dirs,
            "app",
            &clean.n.to_string(),
            Some(&stale),
            t,
            Who::Web,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ApiError::SuggestionsChanged(_)), "{e}");
        assert!(!policy_file.exists());
        let e = apply(&dirs, "app", "999", None, t, Who::Web)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("numbered 1 to"), "{e}");

        let done = apply(
            &dirs,
            "app",
            &clean.n.to_string(),
            Some(std::slice::from_ref(&clean.proposal)),
            t,
            Who::Web,
        )
        .await
        .unwrap();
        assert_eq!(done.len(), 1);
        assert!(done[0].done.starts_with("added rule 1"), "{done:?}");
        let text = std::fs::read_to_string(&policy_file).unwrap();
        assert!(text.contains(target.as_str()), "{text}");
        assert!(!text.contains("pastebin"), "{text}");
        let history = History::in_dir(&dirs.sandbox("app").dir).read().unwrap();
        assert_eq!(history.len(), 1);
        assert_eq!(history[0].who, Who::Web);
        assert!(
            history[0]
                .reason
                .starts_with(&format!("suggestion {}: ", clean.n)),
            "{:?}",
            history[0]
        );
        // Applied: no longer proposed; the flagged one still is.
        let after = for_sandbox(&dirs, "app", t).unwrap();
        assert!(!after.iter().any(|s| s.proposal == clean.proposal));
        assert!(after.iter().any(|s| s.proposal == flagged.proposal));
    }

    #[test]
    fn a_process_in_the_record_is_shown() {
        let r = records().remove(0);
        assert_eq!(process_of(&r), None);
        let with = |p: serde_json::Value| {
            let mut v = serde_json::to_value(&r).unwrap();
            v["process"] = p;
            serde_json::from_value::<ConnectionReport>(v)
                .ok()
                .and_then(|r| process_of(&r))
        };
        assert_eq!(
            with(serde_json::json!({"pid": 42, "name": "npm"})).as_deref(),
            Some("npm (42)")
        );
        assert_eq!(with(serde_json::json!({"pid": 7, "name": ""})), None);
    }

    #[test]
    fn selections_parse() {
        assert_eq!(parse_selection("1,3", 5).unwrap(), [1, 3]);
        assert_eq!(parse_selection("2-4, 1", 5).unwrap(), [1, 2, 3, 4]);
        assert!(parse_selection("0", 5).is_err());
        assert!(parse_selection("6", 5).is_err());
        assert!(parse_selection("a", 5).is_err());
        assert!(parse_selection("", 5).is_err());
    }
}
