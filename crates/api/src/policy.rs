//! The network policy: the rules in force, edits, a check exactly as the
//! proxy decides, presets, and the file rules a sandbox runs with
//! (docs/policy.md). `sandpen policy` and the page call these.

use std::path::PathBuf;

use sandpen_policy::file::PolicyFile;
use sandpen_policy::history::{Edit, History, Who};
use sandpen_policy::{Action, Mode, Policy, Preset, Rule, Scope, Verdict};
use sandpen_supervisor::{sandbox, Dirs};
use serde::Serialize;

use crate::ApiError;

/// Which policy file an edit goes to: the global one or a sandbox's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Where {
    Global,
    Sandbox(String),
}

impl Where {
    pub fn from_name(name: Option<String>) -> Where {
        name.map_or(Where::Global, Where::Sandbox)
    }
}

/// The file of `place`, checked (a sandbox must exist; the config folder is
/// made for the global file).
pub fn file_path(dirs: &Dirs, place: &Where) -> Result<(PathBuf, Scope), ApiError> {
    match place {
        Where::Sandbox(name) => {
            sandbox::load(dirs, name)?;
            Ok((dirs.sandbox(name).dir.join("policy.toml"), Scope::Sandbox))
        }
        Where::Global => {
            std::fs::create_dir_all(&dirs.config)
                .map_err(|e| ApiError::io(format!("creating {}", dirs.config.display()), e))?;
            Ok((dirs.config.join("policy.toml"), Scope::Global))
        }
    }
}

/// Loads the file of `place`, applies `f`, saves it (comments kept).
pub fn edit<T>(
    dirs: &Dirs,
    place: &Where,
    f: impl FnOnce(&mut PolicyFile) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let (path, scope) = file_path(dirs, place)?;
    let mut file = PolicyFile::load(&path, scope)?;
    let out = f(&mut file)?;
    file.save()?;
    Ok(out)
}

/// The policy in force: a sandbox's (global, its own file, its workspace
/// file as trusted) or the global one alone.
pub fn policy_for(dirs: &Dirs, name: Option<&str>) -> Result<Policy, ApiError> {
    match name {
        Some(name) => {
            let config = sandbox::load(dirs, name)?;
            Ok(sandpen_supervisor::egress::load_policy(
                dirs,
                &dirs.sandbox(name),
                &config,
            )?)
        }
        None => Ok(Policy::load(Some(&dirs.config.join("policy.toml")), None)?),
    }
}

/// One rule as the CLI's `policy ls --json` and the page show it.
#[derive(Debug, Clone, Serialize)]
pub struct RuleInfo {
    pub id: u32,
    pub scope: &'static str,
    pub action: &'static str,
    pub target: String,
    pub source: String,
}

impl From<&Rule> for RuleInfo {
    fn from(r: &Rule) -> RuleInfo {
        RuleInfo {
            id: r.id,
            scope: r.scope.as_str(),
            action: r.action.as_str(),
            target: r.target.to_string(),
            source: r.source.to_string(),
        }
    }
}

/// The policy in force, as `policy ls` shows it, and (for a sandbox) its
/// file rules.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyInfo {
    pub mode: &'static str,
    pub preset: &'static str,
    pub rules: Vec<RuleInfo>,
    /// `deny-read …; read-only …; secret …` (a sandbox's only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<String>,
    /// What of the workspace's `.sandpen.toml` is not applied until trusted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_back: Option<String>,
}

pub fn show(dirs: &Dirs, name: Option<&str>) -> Result<PolicyInfo, ApiError> {
    let policy = policy_for(dirs, name)?;
    let files = match name {
        Some(_) => Some(policy.file_rules()?.summary()),
        None => None,
    };
    Ok(PolicyInfo {
        mode: policy.mode().as_str(),
        preset: policy.preset().as_str(),
        rules: policy.rules().iter().map(RuleInfo::from).collect(),
        files,
        held_back: policy.held_back().map(|h| h.to_string()),
    })
}

pub fn parse_action(s: &str) -> Result<Action, ApiError> {
    match s {
        "allow" => Ok(Action::Allow),
        "deny" => Ok(Action::Deny),
        other => Err(ApiError::UnknownAction(other.to_string())),
    }
}

/// Where a change to `place`'s file is recorded: the sandbox's history, or
/// the global file's (in the state folder), as `sandpen policy history` reads.
fn history_of(dirs: &Dirs, place: &Where) -> History {
    match place {
        Where::Sandbox(name) => History::in_dir(&dirs.sandbox(name).dir),
        Where::Global => History::in_dir(&dirs.state),
    }
}

/// [`edit`], and the change `f` reports (if any) appended to the history as
/// made by `who`, with `reason` (empty: none given).
fn edit_recorded<T>(
    dirs: &Dirs,
    place: &Where,
    who: Who,
    reason: &str,
    f: impl FnOnce(&mut PolicyFile) -> Result<(T, Option<Edit>), ApiError>,
) -> Result<T, ApiError> {
    let (path, scope) = file_path(dirs, place)?;
    let mut file = PolicyFile::load(&path, scope)?;
    let (out, change) = f(&mut file)?;
    file.save()?;
    if let Some(change) = change {
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        history_of(dirs, place).append(&now, who, &file, change, reason, None)?;
    }
    Ok(out)
}

impl RuleInfo {
    /// `rule 3 (sandbox: allow pypi.org:443)`, as the CLI says it.
    pub fn said(&self) -> String {
        format!(
            "rule {} ({}: {} {})",
            self.id, self.scope, self.action, self.target
        )
    }
}

/// What [`add_rule`] did: the rule, and whether it is new (an identical one
/// already there is returned with `added: false`, and nothing is recorded).
#[derive(Debug, Clone)]
pub struct AddedRule {
    pub rule: RuleInfo,
    pub added: bool,
}

/// Adds a network rule (an identical one already there is returned), and
/// records a new one in the history as made by `who`, with `reason`.
pub fn add_rule(
    dirs: &Dirs,
    place: &Where,
    action: Action,
    target: &str,
    who: Who,
    reason: &str,
) -> Result<AddedRule, ApiError> {
    edit_recorded(dirs, place, who, reason, |f| {
        let before = f.rules().len();
        let rule = f.add_rule(action, target)?;
        let added = f.rules().len() != before;
        let change = added.then(|| Edit::AddRule {
            id: rule.id,
            action: rule.action,
            target: rule.target.to_string(),
        });
        Ok((
            AddedRule {
                rule: RuleInfo::from(&rule),
                added,
            },
            change,
        ))
    })
}

/// Removes a network rule by id, recorded as made by `who`, with `reason`.
pub fn remove_rule(
    dirs: &Dirs,
    place: &Where,
    id: u32,
    who: Who,
    reason: &str,
) -> Result<RuleInfo, ApiError> {
    edit_recorded(dirs, place, who, reason, |f| {
        let rule = f.remove_rule(id)?;
        let change = Edit::RemoveRule {
            id: rule.id,
            action: rule.action,
            target: rule.target.to_string(),
        };
        Ok((RuleInfo::from(&rule), Some(change)))
    })
}

/// Starts a file from a preset; returns the file's path.
pub fn init_preset(
    dirs: &Dirs,
    place: &Where,
    preset: &str,
    who: Who,
    reason: &str,
) -> Result<PathBuf, ApiError> {
    let p = Preset::parse(preset).ok_or_else(|| ApiError::UnknownPreset(preset.to_string()))?;
    edit_recorded(dirs, place, who, reason, |f| {
        let from = f.preset();
        f.init_preset(p)?;
        let change = (from != Some(p)).then_some(Edit::SetPreset { from, to: p });
        Ok((f.path().to_path_buf(), change))
    })
}

/// Sets a file's mode; returns the file's path.
pub fn set_mode(
    dirs: &Dirs,
    place: &Where,
    mode: &str,
    who: Who,
    reason: &str,
) -> Result<PathBuf, ApiError> {
    let m = Mode::parse(mode).ok_or_else(|| ApiError::UnknownMode(mode.to_string()))?;
    edit_recorded(dirs, place, who, reason, |f| {
        let from = f.mode();
        f.set_mode(m)?;
        let change = (from != Some(m)).then_some(Edit::SetMode { from, to: m });
        Ok((f.path().to_path_buf(), change))
    })
}

/// Whether a global policy file exists (the first run asks for a preset
/// when it does not).
pub fn has_global(dirs: &Dirs) -> bool {
    dirs.config.join("policy.toml").exists()
}

/// `host:port`, `[v6]:port` or a bare host (port 443).
pub fn split_target(target: &str) -> Result<(String, u16), ApiError> {
    let bad_port = || ApiError::BadTarget(format!("bad port in {target}"));
    if let Some(rest) = target.strip_prefix('[') {
        let (host, port) = rest
            .split_once(']')
            .ok_or_else(|| ApiError::BadTarget("unclosed [ in the target".into()))?;
        let port = match port.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad_port())?,
            None => 443,
        };
        return Ok((host.to_string(), port));
    }
    match target.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => {
            Ok((host.to_string(), port.parse().map_err(|_| bad_port())?))
        }
        _ => Ok((target.to_string(), 443)),
    }
}

/// A destination checked exactly as the proxy decides it.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub host: String,
    pub port: u16,
    /// `allow`, `deny` or `would-deny`.
    pub verdict: Verdict,
    /// The decision as the log says it: `allowed by rule 3 (global: …)`.
    pub decision: String,
}

pub async fn check(dirs: &Dirs, name: Option<&str>, target: &str) -> Result<CheckResult, ApiError> {
    let policy = policy_for(dirs, name)?;
    let (host, port) = split_target(target)?;
    let checked = sandpen_proxy::decide(&policy, &host, port).await;
    Ok(CheckResult {
        decision: checked.decision.to_string(),
        verdict: checked.decision.verdict,
        host,
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_split_into_host_and_port() {
        assert_eq!(split_target("a.test:80").unwrap(), ("a.test".into(), 80));
        assert_eq!(split_target("a.test").unwrap(), ("a.test".into(), 443));
        assert_eq!(split_target("[::1]:22").unwrap(), ("::1".into(), 22));
        assert!(split_target("a.test:http").is_err());
    }
}
