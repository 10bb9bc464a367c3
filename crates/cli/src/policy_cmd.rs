//! `sandpen policy ...`: edit the policy files, check a destination exactly as
//! the proxy would, and read the network log.

use anyhow::{bail, Result};
use clap::{Args, Subcommand, ValueEnum};
use sandpen_api::policy::Where;
use sandpen_policy::{Action, Verdict};
use sandpen_supervisor::{sandbox, Dirs};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Kind {
    Network,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogType {
    Network,
    File,
    All,
}

/// Where a rule or setting goes: the global file (`-g`, the default) or a
/// sandbox's own.
#[derive(Args, Clone, Debug)]
pub struct ScopeArgs {
    /// The global policy (default)
    #[arg(short = 'g', long = "global", conflicts_with = "name")]
    pub global: bool,
    /// A sandbox's own policy
    pub name: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Start from a preset: deny-all, balanced (model APIs, registries, git hosts) or allow-all
    Init {
        preset: String,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// Allow a destination: HOST[:PORT] (globs: *.example.org, **) or CIDR[:PORT]
    Allow {
        kind: Kind,
        target: String,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// Deny a destination (deny wins over allow)
    Deny {
        kind: Kind,
        target: String,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// List the rules in force (global, then the sandbox's)
    Ls {
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove a rule by id (see `policy ls`)
    Rm {
        kind: Kind,
        #[arg(long)]
        id: u32,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// Say what the proxy would do with a destination
    Check {
        kind: Kind,
        target: String,
        name: Option<String>,
    },
    /// The logs: network (one line per connection and request) and file
    /// (denied operations and flow label changes)
    Log {
        name: Option<String>,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// network, file or all
        #[arg(long = "type", value_enum, default_value_t = LogType::All)]
        kind: LogType,
    },
    /// Accept the sandbox's workspace `.sandpen.toml` as it is now: its
    /// trusted_sinks, trusted and allow rules apply until the file changes
    Trust { name: String },
    /// Forget an earlier `policy trust`
    Untrust { name: String },
    /// enforce (default), learn (allow, log what enforce would deny) or ask
    Mode {
        mode: String,
        #[command(flatten)]
        scope: ScopeArgs,
    },
}

fn place(scope: &ScopeArgs) -> Where {
    Where::from_name(scope.name.clone())
}

fn policy_for(dirs: &Dirs, name: Option<&str>) -> Result<sandpen_policy::Policy> {
    Ok(sandpen_api::policy::policy_for(dirs, name)?)
}

pub async fn run(dirs: &Dirs, cmd: PolicyCommand) -> Result<i32> {
    match cmd {
        PolicyCommand::Init { preset, scope } => {
            let path = sandpen_api::policy::init_preset(dirs, &place(&scope), &preset)?;
            println!("{}: preset {preset}", path.display());
            Ok(0)
        }
        PolicyCommand::Allow { target, scope, .. } => {
            let rule = sandpen_api::policy::add_rule(dirs, &place(&scope), Action::Allow, &target)?;
            println!(
                "added rule {} ({}: allow {})",
                rule.id, rule.scope, rule.target
            );
            Ok(0)
        }
        PolicyCommand::Deny { target, scope, .. } => {
            let rule = sandpen_api::policy::add_rule(dirs, &place(&scope), Action::Deny, &target)?;
            println!(
                "added rule {} ({}: deny {})",
                rule.id, rule.scope, rule.target
            );
            Ok(0)
        }
        PolicyCommand::Rm { id, scope, .. } => {
            let rule = sandpen_api::policy::remove_rule(dirs, &place(&scope), id)?;
            println!(
                "removed rule {} ({}: {} {})",
                rule.id, rule.scope, rule.action, rule.target
            );
            Ok(0)
        }
        PolicyCommand::Mode { mode, scope } => {
            let path = sandpen_api::policy::set_mode(dirs, &place(&scope), &mode)?;
            println!("{}: mode {mode}", path.display());
            Ok(0)
        }
        PolicyCommand::Trust { name } => {
            let config = sandbox::load(dirs, &name)?;
            let Some(ws) = sandpen_policy::WorkspaceFile::load(&config.workspace)? else {
                bail!(
                    "{} has no {}; there is nothing to trust",
                    config.workspace.display(),
                    sandpen_policy::files::WORKSPACE_FILE
                );
            };
            let t = sandpen_supervisor::trust::save(&dirs.sandbox(&name), &ws.path, &ws.sha256)?;
            let what = sandpen_policy::Policy::default()
                .with_workspace(Some(ws), None)
                .held_back()
                .map(|h| h.items.join(", "))
                .unwrap_or_else(|| "nothing that widens the policy".into());
            println!(
                "{name}: trusted {} (sha256 {}): {what}; a later edit needs a new `sandpen policy trust {name}`",
                t.file.display(),
                &t.sha256[..12]
            );
            Ok(0)
        }
        PolicyCommand::Untrust { name } => {
            sandbox::load(dirs, &name)?;
            if sandpen_supervisor::trust::remove(&dirs.sandbox(&name))? {
                println!("{name}: the workspace file is no longer trusted");
            } else {
                println!("{name}: the workspace file was not trusted");
            }
            Ok(0)
        }
        PolicyCommand::Ls { name, json } => {
            if json {
                let info = sandpen_api::policy::show(dirs, name.as_deref())?;
                let out = serde_json::json!({
                    "mode": info.mode, "preset": info.preset, "rules": info.rules,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(0);
            }
            let policy = policy_for(dirs, name.as_deref())?;
            println!(
                "mode {}, preset {}",
                policy.mode().as_str(),
                policy.preset().as_str()
            );
            let mut rows = vec![[
                "ID".to_string(),
                "SCOPE".into(),
                "ACTION".into(),
                "TARGET".into(),
                "FROM".into(),
            ]];
            for r in policy.rules() {
                rows.push([
                    r.id.to_string(),
                    r.scope.as_str().into(),
                    r.action.as_str().into(),
                    r.target.to_string(),
                    r.source.to_string(),
                ]);
            }
            crate::commands::print_table(&rows);
            Ok(0)
        }
        PolicyCommand::Check { target, name, .. } => {
            let checked = sandpen_api::policy::check(dirs, name.as_deref(), &target).await?;
            println!("{}:{} {}", checked.host, checked.port, checked.decision);
            Ok(match checked.verdict {
                Verdict::Deny => 1,
                _ => 0,
            })
        }
        PolicyCommand::Log {
            name,
            json,
            limit,
            kind,
        } => {
            let names = sandpen_api::logs::names(dirs, name.as_deref())?;
            if kind != LogType::Network {
                file_log(dirs, &names, json, limit)?;
                if kind == LogType::File {
                    return Ok(0);
                }
            }
            let records = sandpen_api::logs::network(dirs, &names, limit)?;
            if json {
                for r in records {
                    println!("{}", serde_json::to_string(&r)?);
                }
                return Ok(0);
            }
            let mut rows = vec![[
                "TIME".to_string(),
                "SANDBOX".into(),
                "MODE".into(),
                "DECISION".into(),
                "HOST:PORT".into(),
                "REQUEST".into(),
                "RULE".into(),
                "REASON".into(),
            ]];
            for r in records {
                let clean = |s: &str| printable(s);
                let time = r
                    .time
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default();
                rows.push([
                    time,
                    clean(&r.sandbox),
                    clean(&r.mode),
                    r.decision.as_str().into(),
                    clean(&format!("{}:{}", r.host, r.port)),
                    match (&r.method, &r.path) {
                        (Some(m), Some(p)) => clean(&format!("{m} {p}")),
                        _ => "-".into(),
                    },
                    clean(r.rule.as_deref().unwrap_or("-")),
                    clean(&r.reason),
                ]);
            }
            crate::commands::print_table(&rows);
            Ok(0)
        }
    }
}

/// The file log (`logs/files.jsonl`) of these sandboxes: denied operations
/// and label changes.
fn file_log(dirs: &Dirs, names: &[String], json: bool, limit: usize) -> Result<()> {
    let records = sandpen_api::logs::files(dirs, names, limit)?;
    if json {
        for r in records {
            println!("{}", serde_json::to_string(&r)?);
        }
        return Ok(());
    }
    if records.is_empty() {
        return Ok(());
    }
    let mut rows = vec![[
        "TIME".to_string(),
        "SANDBOX".into(),
        "FILE".into(),
        "OP".into(),
        "PATH".into(),
        "RULE".into(),
        "ERROR".into(),
    ]];
    for r in records {
        rows.push([
            printable(&r.time),
            printable(&r.sandbox),
            printable(&r.kind),
            printable(&r.op),
            printable(&r.path),
            printable(&r.rule),
            if r.error.is_empty() {
                "-".into()
            } else {
                printable(&r.error)
            },
        ]);
    }
    crate::commands::print_table(&rows);
    Ok(())
}

/// Text from the guest, safe for a terminal: control characters (escape
/// sequences could rewrite the screen or the clipboard) become `\u{..}`.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_text_cannot_drive_the_terminal() {
        assert_eq!(printable("a.test"), "a.test");
        assert!(!printable("x\u{1b}]52;c;aGk=\u{7}").contains('\u{1b}'));
    }
}
