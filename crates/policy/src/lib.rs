//! sandpen's network policy: rules, presets, policy files and the one
//! evaluation function, [`Policy::check`], that both the egress proxy and
//! `sandpen policy check` call, so they can never disagree.
//!
//! # Rules
//!
//! A rule is an action (`allow` or `deny`) and a [`Target`]: `example.com`,
//! `*.example.com` (one or more labels below, not the apex), `**` (everything),
//! a literal IP or a CIDR range, each with an optional `:PORT` (no port = any
//! port). Rules come from three [`Scope`]s: the global file, the sandbox's file
//! and the built-in preset named by either file. Deny wins over allow; when
//! nothing matches, the connection is denied.
//!
//! # Addresses
//!
//! After a name is allowed, the proxy resolves it on the host and calls
//! `check` again with the addresses. An address in a [blocked range](is_blocked)
//! (loopback, RFC 1918, link-local and the metadata address, CGNAT, the guest's
//! fake-IP range 198.18.0.0/15, ULA, multicast, unspecified, the IPv6 forms
//! that embed an IPv4 address) or one of the host's own addresses
//! ([`hostaddrs`]) is refused with reason `blocked-address` unless an allow rule with a CIDR target covers it,
//! or the name was mapped to it by an [`AddHost`] override. A deny rule with a
//! CIDR target denies names that resolve into it. Allow rules with a CIDR
//! target never allow a *name* (the host resolves only names that a name rule
//! allowed, so a denied name is never looked up: no DNS side channel).
//!
//! # Modes
//!
//! `enforce` applies the policy. `learn` turns policy denials into
//! `would-deny` verdicts that let the connection through; it never waives the
//! safety checks (`blocked-address`, `invalid-host`, and the proxy's
//! `sni-mismatch` / `host-mismatch`). `ask` evaluates as `enforce`, but a
//! denial that only says no rule decided ([`Decision::ask`]) may be held by
//! the proxy for the user's answer. Deny rules, blocked ranges (of a literal
//! address) and flow narrowing are never askable: they stay denials.
//!
//! The file format is documented on [`file`] and in docs/policy.md.

mod blocked;
pub mod file;
pub mod files;
pub mod flow;
pub mod history;
pub mod hostaddrs;
mod preset;
mod target;

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use blocked::{blocked_ranges, is_blocked};
pub use file::{global_policy_path, PolicyError, PolicyFile, WorkspaceFile};
pub use files::{FileRules, FilesSection, FlowSection, PatternError, Reserve};
pub use flow::{FlowLabels, Label, LabelSet, LabelStore};
pub use hostaddrs::is_host_address;
pub use preset::Preset;
pub use target::{canonical, normalize_name, Host, HostPattern, Target, TargetError};

/// What a rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a rule lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// `$XDG_CONFIG_HOME/sandpen/policy.toml`, shared by every sandbox.
    Global,
    /// The sandbox's own policy file.
    Sandbox,
    /// The built-in rules of the preset that a file names.
    Preset,
    /// A workspace's `.sandpen.toml` (allow rules only once trusted).
    Workspace,
    /// One connection the user approved in ask mode (`approve --once`):
    /// never in a file.
    Once,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::Sandbox => "sandbox",
            Scope::Preset => "preset",
            Scope::Workspace => "workspace",
            Scope::Once => "once",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the policy is applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    /// Allow everything the safety checks allow; report what enforce would deny.
    Learn,
    /// Evaluated as enforce, but a connection that no rule decides is
    /// marked [`Decision::ask`]: the proxy holds it until the user answers
    /// (docs/policy.md, "Ask mode").
    Ask,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Learn => "learn",
            Mode::Ask => "ask",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "enforce" => Some(Mode::Enforce),
            "learn" => Some(Mode::Learn),
            "ask" => Some(Mode::Ask),
            _ => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a rule was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleSource {
    /// A `[[network]]` table in a policy file, at this line.
    File { path: PathBuf, line: usize },
    /// A built-in preset.
    Preset(Preset),
    /// `policy approve --once`: one connection, in memory.
    Once,
}

impl fmt::Display for RuleSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleSource::File { path, line } => write!(f, "{}:{line}", path.display()),
            RuleSource::Preset(p) => write!(f, "preset {p}"),
            RuleSource::Once => f.write_str("approved once"),
        }
    }
}

/// One network rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Stable within its scope: written in the file, never renumbered.
    pub id: u32,
    pub scope: Scope,
    pub action: Action,
    pub target: Target,
    pub source: RuleSource,
}

impl Rule {
    /// The short reference carried by decisions and audit records.
    pub fn to_ref(&self) -> RuleRef {
        RuleRef {
            id: self.id,
            scope: self.scope,
            text: format!("{} {}", self.action, self.target),
        }
    }
}

/// Which rule decided: `rule 3 (global: allow *.example.org:443)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRef {
    pub id: u32,
    pub scope: Scope,
    /// `ACTION TARGET`.
    pub text: String,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule {} ({}: {})", self.id, self.scope, self.text)
    }
}

/// `--add-host NAME:IP`: the proxy resolves NAME to IP without DNS, and may
/// connect to IP for NAME even inside a blocked range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddHost {
    pub name: String,
    pub ip: IpAddr,
}

impl AddHost {
    /// Parse `NAME:IP` (the IP may be IPv6, optionally in brackets).
    pub fn parse(s: &str) -> Result<AddHost, TargetError> {
        let bad = |why: &str| TargetError {
            input: s.to_string(),
            why: why.to_string(),
        };
        let (name, ip) = s.split_once(':').ok_or_else(|| bad("expected NAME:IP"))?;
        let ip = ip
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(ip);
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| bad("the part after `:` is not an IP address"))?;
        let name = normalize_name(name).map_err(|e| bad(&e.why))?;
        Ok(AddHost { name, ip })
    }
}

/// The outcome of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Allow,
    Deny,
    /// Learn mode: let through, but enforce would have denied it.
    WouldDeny,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::WouldDeny => "would-deny",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reason codes used in decisions and audit records.
pub mod reason {
    pub const ALLOWED_BY_RULE: &str = "allowed-by-rule";
    pub const DENIED_BY_RULE: &str = "denied-by-rule";
    pub const NO_MATCHING_RULE: &str = "no-matching-rule";
    pub const DENIED_ADDRESS: &str = "denied-address";
    pub const BLOCKED_ADDRESS: &str = "blocked-address";
    pub const INVALID_HOST: &str = "invalid-host";
    /// `flow: secret-read at T from PATH`: the sandbox read a secret and the
    /// host is not a trusted sink.
    pub const FLOW: &str = "flow";
    /// Ask mode: nobody answered within the ask timeout.
    pub const ASK_TIMEOUT: &str = "ask-timeout";
    /// Ask mode: the user refused this connection (`policy deny ID`).
    pub const ASK_DENIED: &str = "ask-denied";
    /// Ask mode: the user let this connection alone through
    /// (`policy approve ID --once`).
    pub const APPROVED_ONCE: &str = "approved-once";
}

/// How long ask mode holds a connection when no file sets `ask_timeout`.
pub const DEFAULT_ASK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// A verdict, the rule that gave it (if one did) and a reason code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub verdict: Verdict,
    pub rule: Option<RuleRef>,
    /// A reason code from [`reason`] (the proxy adds its own, e.g.
    /// `sni-mismatch`), optionally followed by `: detail`.
    pub reason: String,
    /// On a decision that permits: may the connection carry bytes that are
    /// neither HTTP nor TLS? False when a name rule without ` raw` allowed
    /// it (the proxy then refuses such bytes, `raw-refused`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub raw: bool,
    /// After `secret-read`, the host is open only because a workspace's
    /// `.sandpen.toml` names it a trusted sink: it stays open only for a
    /// connection the proxy intercepts (one that carries the user's own
    /// credential, swapped in by the proxy). The user's own files name
    /// sinks without this condition.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sink_if_intercepted: bool,
    /// Ask mode: a denial only because no rule decides the destination
    /// (`no-matching-rule`), which the user may still allow: the proxy may
    /// hold the connection and ask. Never set on a deny rule, a blocked
    /// literal address or a flow narrowing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ask: bool,
}

impl Decision {
    pub fn new(verdict: Verdict, rule: Option<RuleRef>, reason: impl Into<String>) -> Self {
        Decision {
            verdict,
            rule,
            reason: reason.into(),
            raw: false,
            sink_if_intercepted: false,
            ask: false,
        }
    }

    /// A hard deny with no rule, e.g. a protocol check in the proxy.
    pub fn deny(reason: impl Into<String>) -> Self {
        Decision::new(Verdict::Deny, None, reason)
    }

    /// The reason code without its detail: `blocked-address` for
    /// `blocked-address: 127.0.0.1`.
    pub fn reason_code(&self) -> &str {
        self.reason.split(':').next().unwrap_or_default()
    }

    /// May the connection proceed? True for allow and would-deny.
    pub fn permits(&self) -> bool {
        self.verdict != Verdict::Deny
    }
}

impl fmt::Display for Decision {
    /// `allowed by rule 3 (global: allow *.example.org:443)`,
    /// `denied: no-matching-rule`, ...
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self.verdict {
            Verdict::Allow => "allowed",
            Verdict::Deny => "denied",
            Verdict::WouldDeny => "allowed (learn mode), enforce would deny",
        };
        match &self.rule {
            Some(r)
                if self.reason == reason::ALLOWED_BY_RULE
                    || self.reason == reason::DENIED_BY_RULE =>
            {
                write!(f, "{word} by {r}")
            }
            Some(r) => write!(f, "{word}: {} ({r})", self.reason),
            None => write!(f, "{word}: {}", self.reason),
        }?;
        if self.sink_if_intercepted && self.permits() {
            f.write_str(
                "; after secret-read a trusted sink only through interception \
                 (only the workspace's .sandpen.toml names it)",
            )?;
        }
        Ok(())
    }
}

/// One file's `[files]` and `[flow]`.
#[derive(Debug, Clone)]
struct Section {
    path: PathBuf,
    files: FilesSection,
    flow: FlowSection,
    /// From the user's own files (global, sandbox), not the workspace's.
    users: bool,
}

/// The effective policy of one sandbox: global + sandbox + preset rules, the
/// mode, and the `--add-host` overrides.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    mode: Mode,
    preset: Preset,
    rules: Vec<Rule>,
    add_hosts: Vec<AddHost>,
    /// `[files]` and `[flow]` of each file, in order (global, sandbox, workspace).
    sections: Vec<Section>,
    /// The sandbox's flow labels at the time the policy was built.
    labels: FlowLabels,
    /// A share is a home folder or holds one: the home-level credential
    /// stores join the deny-read defaults.
    home_secrets: bool,
    /// What the workspace file asked for and did not get.
    held: Option<HeldBack>,
    reserve: Reserve,
    /// Ask mode: how long a connection is held for an answer.
    ask_timeout: std::time::Duration,
}

/// Why a workspace file's widening parts were not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldReason {
    /// The user never trusted this workspace's file.
    NotTrusted,
    /// The user trusted another text of it.
    ChangedSinceTrusted,
}

impl fmt::Display for HeldReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HeldReason::NotTrusted => "it comes with the workspace and you have not trusted it",
            HeldReason::ChangedSinceTrusted => "it changed since you trusted it",
        })
    }
}

/// The parts of a workspace file that widen the policy and were left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldBack {
    pub path: PathBuf,
    pub reason: HeldReason,
    /// `flow.trusted_sinks **`, `network allow evil.test`, ...
    pub items: Vec<String>,
}

impl fmt::Display for HeldBack {
    /// `/w/.sandpen.toml: not applied: flow.trusted_sinks **, network allow x (it comes with ...)`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: not applied: {} ({})",
            self.path.display(),
            self.items.join(", "),
            self.reason
        )
    }
}

/// What in a workspace file widens the policy: `flow.trusted_sinks`,
/// `flow.trusted` and allow rules. Everything else in it only narrows.
fn widening(ws: &WorkspaceFile) -> Vec<String> {
    let mut items = Vec::new();
    for t in &ws.flow.trusted_sinks {
        items.push(format!("flow.trusted_sinks {t}"));
    }
    for t in &ws.flow.trusted {
        items.push(format!("flow.trusted {t}"));
    }
    for r in ws.network.iter().filter(|r| r.action == Action::Allow) {
        items.push(format!("network allow {}", r.target));
    }
    items
}

impl Policy {
    /// Combine the files. The sandbox file's `mode` and `preset` override the
    /// global file's; rules of both (and of the preset) all apply.
    pub fn from_files(global: Option<&PolicyFile>, sandbox: Option<&PolicyFile>) -> Policy {
        let mode = sandbox
            .and_then(PolicyFile::mode)
            .or_else(|| global.and_then(PolicyFile::mode))
            .unwrap_or_default();
        let preset = sandbox
            .and_then(PolicyFile::preset)
            .or_else(|| global.and_then(PolicyFile::preset))
            .unwrap_or_default();
        let mut rules = Vec::new();
        let mut sections = Vec::new();
        for f in [global, sandbox].into_iter().flatten() {
            rules.extend(f.rules().iter().cloned());
            sections.push(Section {
                path: f.path().to_path_buf(),
                files: f.files().clone(),
                flow: f.flow().clone(),
                users: true,
            });
        }
        rules.extend(preset.rules());
        let reserve = [sandbox, global]
            .into_iter()
            .flatten()
            .find_map(|f| f.files().reserve)
            .unwrap_or_default();
        let ask_timeout = [sandbox, global]
            .into_iter()
            .flatten()
            .find_map(PolicyFile::ask_timeout)
            .map_or(DEFAULT_ASK_TIMEOUT, std::time::Duration::from_secs);
        Policy {
            mode,
            preset,
            rules,
            add_hosts: Vec::new(),
            sections,
            labels: FlowLabels::default(),
            home_secrets: false,
            held: None,
            reserve,
            ask_timeout,
        }
    }

    /// Add a workspace's `.sandpen.toml`. What in it narrows (deny-read,
    /// read-only, `flow.secret`, deny rules) always applies. What widens
    /// (`flow.trusted_sinks`, `flow.trusted`, allow rules) applies only when
    /// `trusted_sha256` is the hash of this very text (`sandpen policy
    /// trust`); otherwise it is left out and [`held_back`](Self::held_back)
    /// says what and why.
    pub fn with_workspace(
        mut self,
        ws: Option<WorkspaceFile>,
        trusted_sha256: Option<&str>,
    ) -> Policy {
        let Some(mut ws) = ws else {
            return self;
        };
        let items = widening(&ws);
        let reason = match trusted_sha256 {
            _ if items.is_empty() => None,
            Some(h) if h == ws.sha256 => None,
            Some(_) => Some(HeldReason::ChangedSinceTrusted),
            None => Some(HeldReason::NotTrusted),
        };
        if let Some(reason) = reason {
            ws.flow.trusted_sinks.clear();
            ws.flow.trusted.clear();
            ws.network.retain(|r| r.action == Action::Deny);
            self.held = Some(HeldBack {
                path: ws.path.clone(),
                reason,
                items,
            });
        }
        self.rules.extend(ws.network);
        self.sections.push(Section {
            path: ws.path,
            files: ws.files,
            flow: ws.flow,
            users: false,
        });
        self
    }

    /// The widening parts of the workspace file that were left out.
    pub fn held_back(&self) -> Option<&HeldBack> {
        self.held.as_ref()
    }

    /// A share is a home folder or holds one: add the home-level credential
    /// stores (`~/.ssh`, `~/.aws`, ...) to the deny-read defaults.
    pub fn with_home_secrets(mut self, yes: bool) -> Policy {
        self.home_secrets = yes;
        self
    }

    /// The free space kept on the state folder's file system: the sandbox
    /// file's `[files] reserve`, else the global file's, else the default.
    pub fn reserve(&self) -> Reserve {
        self.reserve
    }

    /// The sandbox's current flow labels.
    pub fn with_labels(mut self, labels: FlowLabels) -> Policy {
        self.labels = labels;
        self
    }

    pub fn labels(&self) -> &FlowLabels {
        &self.labels
    }

    /// The file rules of the sandbox's shares: the defaults (unless a user
    /// file says `defaults = false`) plus every file's `[files]` and
    /// `flow.secret`.
    pub fn file_rules(&self) -> Result<FileRules, PatternError> {
        let refs: Vec<_> = self
            .sections
            .iter()
            .map(|s| (s.path.as_path(), &s.files, &s.flow))
            .collect();
        files::compile(&refs, self.home_secrets)
    }

    /// `flow.trusted_sinks` of every file.
    pub fn trusted_sinks(&self) -> impl Iterator<Item = &Target> {
        self.sections
            .iter()
            .flat_map(|s| s.flow.trusted_sinks.iter())
    }

    /// `flow.trusted_sinks` of the user's own files (global and sandbox),
    /// not of the workspace's `.sandpen.toml`.
    pub fn users_trusted_sinks(&self) -> impl Iterator<Item = &Target> {
        self.sections
            .iter()
            .filter(|s| s.users)
            .flat_map(|s| s.flow.trusted_sinks.iter())
    }

    /// The `flow.trusted_sinks` that only the workspace's `.sandpen.toml`
    /// names: no sink of the user's own files covers them (see
    /// [`Target::covers`]). After `secret-read` such a sink stays open only
    /// for connections the proxy intercepts, so it is a sink only for hosts
    /// with a credential route and a secret (docs/egress.md); `sandpen run`
    /// and `start` name those that are not.
    pub fn workspace_only_sinks(&self) -> Vec<&Target> {
        let mut out: Vec<&Target> = Vec::new();
        for t in self
            .sections
            .iter()
            .filter(|s| !s.users)
            .flat_map(|s| s.flow.trusted_sinks.iter())
        {
            if !self.users_trusted_sinks().any(|u| u.covers(t)) && !out.contains(&t) {
                out.push(t);
            }
        }
        out
    }

    /// Is `host` in `flow.trusted` (content from it does not set
    /// `untrusted-input`)?
    pub fn is_trusted_source(&self, host: &str, port: u16) -> bool {
        let Ok(host) = Host::parse(host) else {
            return false;
        };
        self.sections
            .iter()
            .flat_map(|s| s.flow.trusted.iter())
            .any(|t| t.matches_host(&host, port))
    }

    /// Load the global file (if given and present) and the sandbox file (if
    /// given and present). Any malformed file is an error, never an empty policy.
    pub fn load(global: Option<&Path>, sandbox: Option<&Path>) -> Result<Policy, PolicyError> {
        let g = global
            .map(|p| PolicyFile::load(p, Scope::Global))
            .transpose()?;
        let s = sandbox
            .map(|p| PolicyFile::load(p, Scope::Sandbox))
            .transpose()?;
        Ok(Policy::from_files(g.as_ref(), s.as_ref()))
    }

    /// The policy of one sandbox: the global file (`global_policy_path()`,
    /// if it can be named), the sandbox's own file, and its `--add-host`
    /// entries. Any malformed file is an error and the sandbox must not start.
    pub fn for_sandbox(sandbox_file: &Path, add_hosts: &[AddHost]) -> Result<Policy, PolicyError> {
        let global = global_policy_path();
        Ok(Policy::load(global.as_deref(), Some(sandbox_file))?
            .with_add_hosts(add_hosts.iter().cloned()))
    }

    /// A policy from explicit parts (tests, benchmarks, embedding).
    pub fn from_rules(mode: Mode, preset: Preset, mut rules: Vec<Rule>) -> Policy {
        rules.extend(preset.rules());
        Policy {
            mode,
            preset,
            rules,
            add_hosts: Vec::new(),
            sections: Vec::new(),
            labels: FlowLabels::default(),
            home_secrets: false,
            held: None,
            reserve: Reserve::default(),
            ask_timeout: DEFAULT_ASK_TIMEOUT,
        }
    }

    /// Add `flow.trusted_sinks` (tests, embedding).
    pub fn with_trusted_sinks(mut self, sinks: Vec<Target>) -> Policy {
        self.sections.push(Section {
            path: PathBuf::new(),
            files: FilesSection::default(),
            flow: FlowSection {
                trusted_sinks: sinks,
                ..Default::default()
            },
            users: true,
        });
        self
    }

    /// Add `--add-host` overrides.
    pub fn with_add_hosts(mut self, add_hosts: impl IntoIterator<Item = AddHost>) -> Policy {
        self.add_hosts.extend(add_hosts);
        self
    }

    pub fn with_mode(mut self, mode: Mode) -> Policy {
        self.mode = mode;
        self
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Ask mode: how long a connection is held for the user's answer (the
    /// sandbox file's `ask_timeout`, else the global file's, else 120 s).
    pub fn ask_timeout(&self) -> std::time::Duration {
        self.ask_timeout
    }

    pub fn with_ask_timeout(mut self, t: std::time::Duration) -> Policy {
        self.ask_timeout = t;
        self
    }

    /// This policy plus an allow rule for exactly `host:port` in scope
    /// [`Scope::Once`]: the decision for one connection the user approved
    /// in ask mode. Deny rules, blocked ranges and flow narrowing still
    /// apply to it. `None` when `host` is not a valid name or address.
    pub fn with_once(&self, host: &str, port: u16) -> Option<Policy> {
        let target = Target::parse(&format!("{}:{port}", bracket(host))).ok()?;
        let mut p = self.clone();
        p.rules.insert(
            0,
            Rule {
                id: 0,
                scope: Scope::Once,
                action: Action::Allow,
                target,
                source: RuleSource::Once,
            },
        );
        Some(p)
    }

    pub fn preset(&self) -> Preset {
        self.preset
    }

    /// Every rule in evaluation order: global, sandbox, preset.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn add_hosts(&self) -> &[AddHost] {
        &self.add_hosts
    }

    /// The `--add-host` addresses for `name`, if any (names are compared
    /// normalized). These replace DNS for that name.
    pub fn overrides_for(&self, name: &str) -> Vec<IpAddr> {
        let Ok(name) = normalize_name(name) else {
            return Vec::new();
        };
        self.add_hosts
            .iter()
            .filter(|a| a.name == name)
            .map(|a| a.ip)
            .collect()
    }

    /// Decide a connection to `host:port`.
    ///
    /// Call with `resolved = None` before resolving (decides on the name) and
    /// with the host-resolved addresses before connecting. A literal IP host is
    /// always checked as an address too. This is the only place a network
    /// rule is evaluated.
    pub fn check(&self, host: &str, port: u16, resolved: Option<&[IpAddr]>) -> Decision {
        let host = match Host::parse(host) {
            Ok(h) => h,
            Err(e) => return Decision::deny(format!("{}: {}", reason::INVALID_HOST, e.why)),
        };
        let learn = self.mode == Mode::Learn;
        let soften = |d: Decision| {
            if learn && d.verdict == Verdict::Deny {
                Decision::new(Verdict::WouldDeny, d.rule, d.reason)
            } else {
                d
            }
        };

        let find = |action: Action| {
            self.rules
                .iter()
                .find(|r| r.action == action && r.target.matches_host(&host, port))
        };
        let allowing = find(Action::Allow);
        let mut decision = if let Some(r) = find(Action::Deny) {
            Decision::new(Verdict::Deny, Some(r.to_ref()), reason::DENIED_BY_RULE)
        } else if let Some(r) = allowing {
            Decision::new(Verdict::Allow, Some(r.to_ref()), reason::ALLOWED_BY_RULE)
        } else {
            match blocked_literal(&host) {
                // No rule could open it: say why, not that no rule matched.
                Some(why) => Decision::deny(why),
                None => {
                    let mut d = Decision::deny(reason::NO_MATCHING_RULE);
                    d.ask = self.mode == Mode::Ask && self.askable(&host, port);
                    d
                }
            }
        };
        // Raw bytes: an address rule or a literal address carries any
        // protocol; a name rule only with ` raw` (docs/egress.md).
        decision.raw = matches!(host, Host::Ip(_))
            || allowing.is_none_or(|r| r.target.allows_raw())
            || decision.verdict != Verdict::Allow;
        // Flow: after a secret was read, only the trusted sinks stay open. It
        // narrows what the rules allow; it never allows anything itself.
        if decision.verdict == Verdict::Allow {
            if let Some(l) = self.labels.get(Label::SecretRead) {
                let names = |t: &Target| t.matches_host(&host, port);
                let users_sink = self.users_trusted_sinks().any(names);
                if !users_sink && self.trusted_sinks().any(names) {
                    // Named by the workspace only: see `sink_if_intercepted`.
                    decision.sink_if_intercepted = true;
                } else if !users_sink {
                    decision = Decision::new(
                        Verdict::Deny,
                        None,
                        format!("{}: secret-read at {} from {}", reason::FLOW, l.at, l.by),
                    );
                }
            }
        }
        if decision.verdict == Verdict::Deny && !learn {
            return decision;
        }

        let literal;
        let addrs: &[IpAddr] = match (&host, resolved) {
            (Host::Ip(ip), _) => {
                literal = [*ip];
                &literal
            }
            (Host::Name(_), Some(r)) => r,
            (Host::Name(_), None) => &[],
        };
        let overrides = match &host {
            Host::Name(n) => self.overrides_for(n),
            Host::Ip(_) => Vec::new(),
        };
        for &ip in addrs {
            let covering = |action: Action| {
                self.rules
                    .iter()
                    .find(|r| r.action == action && r.target.covers_addr(ip, port))
            };
            if decision.verdict == Verdict::Allow {
                if let Some(r) = covering(Action::Deny) {
                    decision = Decision::new(
                        Verdict::Deny,
                        Some(r.to_ref()),
                        format!("{}: {ip}", reason::DENIED_ADDRESS),
                    );
                    if !learn {
                        return decision;
                    }
                }
            }
            let permitted = covering(Action::Allow).is_some() || overrides.contains(&ip);
            if permitted {
                continue;
            }
            // Safety checks: learn mode does not waive them.
            if is_blocked(ip) {
                return Decision::deny(format!("{}: {ip}", reason::BLOCKED_ADDRESS));
            }
            if is_host_address(ip) {
                return Decision::deny(format!(
                    "{}: {ip} (the host's own)",
                    reason::BLOCKED_ADDRESS
                ));
            }
        }
        soften(decision)
    }

    /// Could a user's allow rule for `host:port` let it through? Not when it
    /// is a blocked literal address (safety checks are never waived), nor
    /// when the sandbox carries `secret-read` and the host is no trusted
    /// sink of the user's (the flow narrowing would deny it anyway).
    fn askable(&self, host: &Host, port: u16) -> bool {
        if blocked_literal(host).is_some() {
            return false;
        }
        if self.labels.get(Label::SecretRead).is_some() {
            return self
                .users_trusted_sinks()
                .any(|t| t.matches_host(host, port));
        }
        true
    }
}

/// `blocked-address: IP` for a literal address in a blocked range or of
/// the host's own, which only an allow rule with a range target opens.
fn blocked_literal(host: &Host) -> Option<String> {
    let Host::Ip(ip) = host else {
        return None;
    };
    if is_blocked(*ip) {
        Some(format!("{}: {ip}", reason::BLOCKED_ADDRESS))
    } else if is_host_address(*ip) {
        Some(format!(
            "{}: {ip} (the host's own)",
            reason::BLOCKED_ADDRESS
        ))
    } else {
        None
    }
}

/// A host as it goes before `:PORT` in a target: IPv6 in brackets.
fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

#[cfg(test)]
mod tests;
