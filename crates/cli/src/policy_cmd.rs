//! `sandpen policy ...`: edit the policy files, check a destination exactly as
//! the proxy would, and read the network log.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use sandpen_api::policy::Where;
use sandpen_policy::history::{Edit, History, Who};
use sandpen_policy::{Action, Verdict};
use sandpen_proxy::audit::{read_log, LogFilter};
use sandpen_supervisor::{control, sandbox, Dirs};

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
    /// Why (kept in `policy history`)
    #[arg(long)]
    pub reason: Option<String>,
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
    /// Deny a destination (`deny network TARGET`; deny wins over allow), or
    /// refuse a connection waiting in ask mode (`deny ID [--always]`)
    Deny {
        /// `network`, or a pending ID (ID or SANDBOX/ID, see `policy pending`)
        what: String,
        /// With `network`: HOST[:PORT] or CIDR[:PORT]
        target: Option<String>,
        /// With an ID: also add a deny rule for its HOST:PORT (sandbox scope)
        #[arg(long)]
        always: bool,
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
    /// (hold what no rule decides until you answer: `policy pending`)
    Mode {
        mode: String,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// Rules proposed from the sandbox's learn-mode records, ask history and
    /// denials: additions grouped by site, promotions to global, removals
    Suggest {
        name: String,
        /// Apply these suggestions: `1,3` or `1-3`
        #[arg(long, value_name = "N,...")]
        apply: Option<String>,
        #[arg(long)]
        json: bool,
        /// Propose a rule for the global file when this many sandboxes have it
        #[arg(long, default_value_t = 3)]
        promote_k: usize,
        /// Propose removing an allow rule no connection used for this many days
        #[arg(long, default_value_t = 30)]
        unused_days: i64,
    },
    /// Every change to a policy: who (cli, approval, suggestion, web), when, why
    History {
        /// A sandbox's history (default: the global file's)
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Undo change N of `policy history [NAME]` (the undo is a change of its own)
    Undo { n: u64, name: Option<String> },
    /// Ask mode: the connections and requests waiting for your answer
    Pending {
        /// Only this sandbox's
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Ask mode: let a waiting connection through (ID or SANDBOX/ID, see `policy pending`)
    Approve {
        id: String,
        /// This connection only
        #[arg(long, conflicts_with = "always", required_unless_present = "always")]
        once: bool,
        /// Add an allow rule for its HOST:PORT (sandbox scope; -g global) and
        /// let every connection waiting for it through
        #[arg(long)]
        always: bool,
        /// With --always: the rule goes in the global file
        #[arg(short = 'g', long = "global", requires = "always")]
        global: bool,
    },
}

impl ScopeArgs {
    fn place(&self) -> Where {
        Where::from_name(self.name.clone())
    }

    fn reason(&self) -> &str {
        self.reason.as_deref().unwrap_or_default()
    }
}

/// `add_rule` through sandpen-api (recorded in the history as the CLI's,
/// with `--reason`), and what to print.
fn add_rule(dirs: &Dirs, scope: &ScopeArgs, action: Action, target: &str) -> Result<i32> {
    let r = sandpen_api::policy::add_rule(
        dirs,
        &scope.place(),
        action,
        target,
        Who::Cli,
        scope.reason(),
    )?;
    if r.added {
        println!("added {}", r.rule.said());
    } else {
        println!("already there: {}", r.rule.said());
    }
    Ok(0)
}

/// A sandbox's policy history, or the global file's (`NAME` absent).
fn history_for(dirs: &Dirs, name: Option<&str>) -> History {
    match name {
        Some(n) => History::in_dir(&dirs.sandbox(n).dir),
        None => History::in_dir(&dirs.state),
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The change that added `rule` to its file as it is now: the latest
/// `add-rule` of its id, action and target in that file.
fn provenance<'a>(
    changes: &'a [sandpen_policy::history::Change],
    rule: &sandpen_policy::Rule,
) -> Option<&'a sandpen_policy::history::Change> {
    let sandpen_policy::RuleSource::File { path, .. } = &rule.source else {
        return None;
    };
    changes
        .iter()
        .filter(|c| &c.file == path)
        .filter(|c| {
            matches!(&c.edit, Edit::AddRule { id, action, target }
                if *id == rule.id && *action == rule.action && *target == rule.target.to_string())
        })
        .max_by(|a, b| a.time.cmp(&b.time))
}

fn policy_for(dirs: &Dirs, name: Option<&str>) -> Result<sandpen_policy::Policy> {
    Ok(sandpen_api::policy::policy_for(dirs, name)?)
}

/// `host:port`, `[v6]:port` or a bare host (port 443).
fn split_target(target: &str) -> Result<(String, u16)> {
    if let Some(rest) = target.strip_prefix('[') {
        let (host, port) = rest.split_once(']').context("unclosed [ in the target")?;
        let port = match port.strip_prefix(':') {
            Some(p) => p.parse().with_context(|| format!("bad port in {target}"))?,
            None => 443,
        };
        return Ok((host.to_string(), port));
    }
    match target.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => Ok((
            host.to_string(),
            port.parse()
                .with_context(|| format!("bad port in {target}"))?,
        )),
        _ => Ok((target.to_string(), 443)),
    }
}

/// The running sandboxes (all, or `name`), each with its held connections.
async fn pending_of(
    dirs: &Dirs,
    name: Option<&str>,
) -> Result<Vec<(String, Vec<sandpen_proxy::PendingInfo>)>> {
    let names: Vec<String> = match name {
        Some(n) => {
            sandbox::load(dirs, n)?;
            vec![n.to_string()]
        }
        None => sandbox::list(dirs)?.into_iter().map(|c| c.name).collect(),
    };
    let mut out = Vec::new();
    for n in names {
        let paths = dirs.sandbox(&n);
        if !control::supervisor_alive(&paths) || !paths.control_socket().exists() {
            continue;
        }
        match control::pending(&paths).await {
            Ok(list) => out.push((n, list)),
            Err(e) if name.is_some() => return Err(e.into()),
            Err(_) => {}
        }
    }
    Ok(out)
}

/// `ID` or `SANDBOX/ID`: the one held entry it names.
async fn find_pending(dirs: &Dirs, id: &str) -> Result<sandpen_proxy::PendingInfo> {
    let (name, num) = match id.rsplit_once('/') {
        Some((n, i)) => (Some(n), i),
        None => (None, id),
    };
    let num: u64 = num.parse().with_context(|| {
        format!("{id:?} is not a pending id (ID or SANDBOX/ID, see `sandpen policy pending`)")
    })?;
    let found: Vec<_> = pending_of(dirs, name)
        .await?
        .into_iter()
        .flat_map(|(_, list)| list)
        .filter(|p| p.id == num)
        .collect();
    match found.as_slice() {
        [] => bail!("no pending request {id} (answered already, timed out, or its connection closed; see `sandpen policy pending`)"),
        [one] => Ok(one.clone()),
        many => bail!(
            "pending id {num} is in several sandboxes ({}); say SANDBOX/{num}",
            many.iter().map(|p| p.sandbox.as_str()).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// How long ago, in words: `12s`, `3m04s`.
fn ago(since: time::OffsetDateTime) -> String {
    let secs = (time::OffsetDateTime::now_utc() - since)
        .whole_seconds()
        .max(0);
    if secs < 60 {
        format!("{secs}s")
    } else {
        format!("{}m{:02}s", secs / 60, secs % 60)
    }
}

/// Add `action HOST:PORT` for a held entry to the sandbox's file (or the
/// global one) and tell the running sandboxes to decide their held
/// connections again.
async fn rule_for_pending(
    dirs: &Dirs,
    p: &sandpen_proxy::PendingInfo,
    action: Action,
    global: bool,
) -> Result<String> {
    Ok(sandpen_api::decisions::rule_for_pending(dirs, p, action, global, Who::Approval).await?)
}

/// What a held entry is for: `host:port`, or `file read PATH`.
fn shown_destination(p: &sandpen_proxy::PendingInfo) -> String {
    match &p.file {
        Some(access) => format!("file {access} {}", p.host),
        None => sandpen_api::decisions::destination(&p.host, p.port),
    }
}

pub async fn run(dirs: &Dirs, cmd: PolicyCommand) -> Result<i32> {
    match cmd {
        PolicyCommand::Suggest {
            name,
            apply,
            json,
            promote_k,
            unused_days,
        } => suggest_cmd(dirs, &name, apply.as_deref(), json, promote_k, unused_days).await,
        PolicyCommand::History { name, json } => {
            if let Some(n) = &name {
                sandbox::load(dirs, n)?;
            }
            let all = history_for(dirs, name.as_deref()).read()?;
            if json {
                for c in &all {
                    println!("{}", serde_json::to_string(c)?);
                }
                return Ok(0);
            }
            let mut rows = vec![[
                "N".to_string(),
                "TIME".into(),
                "WHO".into(),
                "SCOPE".into(),
                "CHANGE".into(),
                "REASON".into(),
            ]];
            for c in &all {
                let mut change = c.edit.to_string();
                if let Some(u) = c.undoes {
                    change.push_str(&format!(" (undoes {u})"));
                }
                rows.push([
                    c.n.to_string(),
                    c.time.clone(),
                    c.who.to_string(),
                    c.scope.to_string(),
                    change,
                    if c.reason.is_empty() {
                        "-".into()
                    } else {
                        printable(&c.reason)
                    },
                ]);
            }
            crate::commands::print_table(&rows);
            Ok(0)
        }
        PolicyCommand::Undo { n, name } => {
            if let Some(n) = &name {
                sandbox::load(dirs, n)?;
            }
            let change = history_for(dirs, name.as_deref()).undo(n, &now_rfc3339(), Who::Cli)?;
            println!("change {}: {} (undoes {n})", change.n, change.edit);
            // Running sandboxes read the file at their next decision; held
            // connections are decided again now.
            let names: Vec<String> = match name {
                Some(n) => vec![n],
                None => sandbox::list(dirs)?.into_iter().map(|c| c.name).collect(),
            };
            for n in names {
                let paths = dirs.sandbox(&n);
                if control::supervisor_alive(&paths) {
                    let _ = control::recheck(&paths).await;
                }
            }
            Ok(0)
        }
        PolicyCommand::Pending { name, json } => {
            let all = pending_of(dirs, name.as_deref()).await?;
            let entries: Vec<_> = all.into_iter().flat_map(|(_, l)| l).collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
                return Ok(0);
            }
            if entries.is_empty() {
                println!("nothing is waiting");
                return Ok(0);
            }
            let mut rows = vec![[
                "ID".to_string(),
                "SANDBOX".into(),
                "DESTINATION".into(),
                "PROCESS".into(),
                "FIRST LINE / SNI".into(),
                "FIRST-SEEN".into(),
                "WAITING".into(),
                "AGENT'S REASON (untrusted)".into(),
            ]];
            for p in &entries {
                let time = p
                    .first_seen
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default();
                let dash = |o: &Option<String>| o.as_deref().map_or("-".to_string(), printable);
                rows.push([
                    p.id.to_string(),
                    printable(&p.sandbox),
                    printable(&shown_destination(p)),
                    dash(&p.process),
                    dash(&p.first),
                    time,
                    format!("{} of {}s", ago(p.first_seen), p.timeout_secs),
                    p.reason
                        .as_deref()
                        .map_or("-".to_string(), |r| format!("\"{}\"", printable(r))),
                ]);
            }
            crate::commands::print_table(&rows);
            Ok(0)
        }
        PolicyCommand::Approve {
            id,
            once: _,
            always,
            global,
        } => {
            let p = find_pending(dirs, &id).await?;
            let dest = shown_destination(&p);
            if p.file.is_some() {
                if !always {
                    return Err(sandpen_api::ApiError::FileException {
                        what: dest,
                        why: sandpen_api::error::FileRefusal::Once,
                    }
                    .into());
                }
                let said = sandpen_api::decisions::file_exception_for_pending(
                    dirs,
                    &p,
                    global,
                    Who::Approval,
                )
                .await?;
                println!("{}: {dest}: {said}", p.sandbox);
                return Ok(0);
            }
            if always {
                let said = rule_for_pending(dirs, &p, Action::Allow, global).await?;
                println!(
                    "{}: {dest}: {said}; every connection waiting for it goes on",
                    p.sandbox
                );
            } else {
                control::answer(&dirs.sandbox(&p.sandbox), p.id, sandpen_proxy::Answer::Once)
                    .await?;
                println!(
                    "{}: {dest}: {}",
                    p.sandbox,
                    sandpen_api::decisions::once_said(&p)
                );
            }
            Ok(0)
        }
        PolicyCommand::Deny {
            what,
            target: None,
            always,
            scope,
        } if what != "network" => {
            if scope.name.is_some() || scope.global {
                bail!("`policy deny ID` takes no sandbox or -g: the ID names its sandbox (SANDBOX/ID)");
            }
            let id = what;
            let p = find_pending(dirs, &id).await?;
            let dest = shown_destination(&p);
            if always && p.file.is_some() {
                bail!("{dest}: --always makes a network rule; refuse a file request without it");
            }
            if always {
                let said = rule_for_pending(dirs, &p, Action::Deny, false).await?;
                println!("{}: {dest}: {said}", p.sandbox);
            }
            // A deny rule releases it through the recheck; the answer is for
            // the case where it did not (it is gone then, which is fine).
            match control::answer(&dirs.sandbox(&p.sandbox), p.id, sandpen_proxy::Answer::Deny)
                .await
            {
                Ok(_) => println!("{}: {dest}: refused", p.sandbox),
                Err(_) if always => {}
                Err(e) => return Err(e.into()),
            }
            Ok(0)
        }
        PolicyCommand::Init { preset, scope } => {
            let path = sandpen_api::policy::init_preset(
                dirs,
                &scope.place(),
                &preset,
                Who::Cli,
                scope.reason(),
            )?;
            println!("{}: preset {preset}", path.display());
            Ok(0)
        }
        PolicyCommand::Allow { target, scope, .. } => {
            add_rule(dirs, &scope, Action::Allow, &target)
        }
        PolicyCommand::Deny {
            what,
            target,
            always,
            scope,
        } => {
            if what != "network" {
                bail!(
                    "usage: `policy deny network TARGET [-g|NAME]` or `policy deny ID [--always]`"
                );
            }
            if always {
                bail!("--always goes with a pending ID: `policy deny ID --always`");
            }
            let Some(target) = target else {
                bail!("usage: `policy deny network TARGET [-g|NAME]`");
            };
            add_rule(dirs, &scope, Action::Deny, &target)
        }
        PolicyCommand::Rm { id, scope, .. } => {
            let rule = sandpen_api::policy::remove_rule(
                dirs,
                &scope.place(),
                id,
                Who::Cli,
                scope.reason(),
            )?;
            println!("removed {}", rule.said());
            Ok(0)
        }
        PolicyCommand::Mode { mode, scope } => {
            let path = sandpen_api::policy::set_mode(
                dirs,
                &scope.place(),
                &mode,
                Who::Cli,
                scope.reason(),
            )?;
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
            let policy = policy_for(dirs, name.as_deref())?;
            // Who added each rule: the sandbox's history (approvals of global
            // rules are kept there too) and the global file's.
            let mut changes = history_for(dirs, None).read()?;
            if let Some(n) = &name {
                changes.extend(history_for(dirs, Some(n)).read()?);
            }
            if json {
                let rows: Vec<_> = policy
                    .rules()
                    .iter()
                    .map(|r| {
                        let by = provenance(&changes, r);
                        serde_json::json!({
                            "id": r.id, "scope": r.scope.as_str(), "action": r.action.as_str(),
                            "target": r.target.to_string(), "source": r.source.to_string(),
                            "added_by": by.map(|c| c.who.as_str()),
                            "added_at": by.map(|c| c.time.as_str()),
                            "reason": by.map(|c| c.reason.as_str()),
                            "change": by.map(|c| c.n),
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "mode": policy.mode().as_str(), "preset": policy.preset().as_str(), "rules": rows,
                    }))?
                );
                return Ok(0);
            }
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
                "ADDED BY".into(),
            ]];
            for r in policy.rules() {
                let by = provenance(&changes, r).map_or("-".to_string(), |c| {
                    let mut s = format!("{} at {} (change {})", c.who, c.time, c.n);
                    if !c.reason.is_empty() {
                        s.push_str(&format!(": {}", printable(&c.reason)));
                    }
                    s
                });
                rows.push([
                    r.id.to_string(),
                    r.scope.as_str().into(),
                    r.action.as_str().into(),
                    r.target.to_string(),
                    r.source.to_string(),
                    by,
                ]);
            }
            crate::commands::print_table(&rows);
            Ok(0)
        }
        PolicyCommand::Check { target, name, .. } => {
            let policy = policy_for(dirs, name.as_deref())?;
            let (host, port) = split_target(&target)?;
            let checked = sandpen_proxy::decide(&policy, &host, port).await;
            println!("{host}:{port} {}", checked.decision);
            Ok(match checked.decision.verdict {
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
            let names: Vec<String> = match name {
                Some(n) => {
                    sandbox::load(dirs, &n)?;
                    vec![n]
                }
                None => sandbox::list(dirs)?.into_iter().map(|c| c.name).collect(),
            };
            if kind != LogType::Network {
                file_log(dirs, &names, json, limit)?;
                if kind == LogType::File {
                    return Ok(0);
                }
            }
            let mut records = Vec::new();
            for n in names {
                let path = dirs.sandbox(&n).logs().join("net.jsonl");
                records.extend(read_log(
                    &path,
                    &LogFilter {
                        sandbox: None,
                        limit: Some(limit),
                    },
                )?);
            }
            records.sort_by_key(|r| r.time);
            let skip = records.len().saturating_sub(limit);
            let records = &records[skip..];
            if json {
                for r in records {
                    println!("{}", serde_json::to_string(r)?);
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

async fn suggest_cmd(
    dirs: &Dirs,
    name: &str,
    apply: Option<&str>,
    json: bool,
    promote_k: usize,
    unused_days: i64,
) -> Result<i32> {
    use sandpen_api::suggest;
    let t = suggest::Thresholds {
        promote_k,
        unused_days,
    };
    if let Some(selection) = apply {
        for a in suggest::apply(dirs, name, selection, None, t, Who::Suggestion).await? {
            println!("{}: {}", a.n, a.done);
        }
        return Ok(0);
    }
    let all = suggest::for_sandbox(dirs, name, t)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(0);
    }
    if all.is_empty() {
        println!("{name}: nothing to suggest");
        return Ok(0);
    }
    let time = |t: Option<time::OffsetDateTime>| {
        t.and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".into())
    };
    let mut rows = vec![[
        "N".to_string(),
        "PROPOSAL".into(),
        "SITE".into(),
        "SEEN".into(),
        "FIRST".into(),
        "LAST".into(),
        "UP".into(),
        "PROCESSES".into(),
        "FLAGS".into(),
    ]];
    for s in &all {
        rows.push([
            s.n.to_string(),
            printable(&s.proposal.to_string()),
            s.domain.as_deref().map_or("-".into(), printable),
            if s.count == 0 {
                "-".into()
            } else {
                format!("{} ({})", s.count, s.sources.join(", "))
            },
            time(s.first_seen),
            time(s.last_seen),
            s.bytes_up.to_string(),
            if s.processes.is_empty() {
                "-".into()
            } else {
                printable(&s.processes.join(", "))
            },
            if s.flags.is_empty() {
                "-".into()
            } else {
                format!("! {}", printable(&s.flags.join("; ")))
            },
        ]);
    }
    crate::commands::print_table(&rows);
    println!(
        "apply with `sandpen policy suggest {name} --apply N[,N...]` (look at flagged ones first)"
    );
    Ok(0)
}

/// The file log (`logs/files.jsonl`) of these sandboxes: denied operations
/// and label changes.
fn file_log(dirs: &Dirs, names: &[String], json: bool, limit: usize) -> Result<()> {
    let mut records = Vec::new();
    for n in names {
        let path = dirs.sandbox(n).logs().join("files.jsonl");
        records.extend(
            sandpen_fs::read_records(&path)
                .with_context(|| format!("reading {}", path.display()))?,
        );
    }
    records.sort_by(|a, b| a.time.cmp(&b.time));
    let skip = records.len().saturating_sub(limit);
    let records = &records[skip..];
    if json {
        for r in records {
            println!("{}", serde_json::to_string(r)?);
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

    #[test]
    fn targets_split_into_host_and_port() {
        assert_eq!(split_target("a.test:80").unwrap(), ("a.test".into(), 80));
        assert_eq!(split_target("a.test").unwrap(), ("a.test".into(), 443));
        assert_eq!(split_target("[::1]:22").unwrap(), ("::1".into(), 22));
        assert!(split_target("a.test:http").is_err());
    }

    /// The CLI's edits go through sandpen-api: each is in the history as the
    /// CLI's with its `--reason`, recorded exactly as the page's edit of the
    /// same kind is (the same `Change` but for who and the reason).
    #[tokio::test]
    async fn cli_edits_are_recorded_through_the_api_with_their_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = Dirs {
            state: tmp.path().join("state"),
            data: tmp.path().join("data"),
            config: tmp.path().join("config"),
        };
        let scope = |reason: &str| ScopeArgs {
            global: true,
            name: None,
            reason: Some(reason.into()),
        };
        let cmds = [
            PolicyCommand::Init {
                preset: "balanced".into(),
                scope: scope("start narrow"),
            },
            PolicyCommand::Mode {
                mode: "ask".into(),
                scope: scope("ask me"),
            },
            PolicyCommand::Allow {
                kind: Kind::Network,
                target: "a.test:443".into(),
                scope: scope("the tests"),
            },
            PolicyCommand::Deny {
                what: "network".into(),
                target: Some("b.test".into()),
                always: false,
                scope: scope("no"),
            },
            PolicyCommand::Rm {
                kind: Kind::Network,
                id: 1,
                scope: scope("done with it"),
            },
        ];
        for cmd in cmds {
            assert_eq!(run(&dirs, cmd).await.unwrap(), 0);
        }
        // The same rule again changes nothing and records nothing.
        run(
            &dirs,
            PolicyCommand::Deny {
                what: "network".into(),
                target: Some("b.test".into()),
                always: false,
                scope: scope("again"),
            },
        )
        .await
        .unwrap();
        let all = history_for(&dirs, None).read().unwrap();
        let got: Vec<(String, Who, &str)> = all
            .iter()
            .map(|c| (c.edit.to_string(), c.who, c.reason.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "preset (unset) -> balanced".to_string(),
                    Who::Cli,
                    "start narrow"
                ),
                ("mode (unset) -> ask".into(), Who::Cli, "ask me"),
                ("add rule 1: allow a.test:443".into(), Who::Cli, "the tests"),
                ("add rule 2: deny b.test".into(), Who::Cli, "no"),
                (
                    "remove rule 1: allow a.test:443".into(),
                    Who::Cli,
                    "done with it"
                ),
            ]
        );
        // The page's edit through the same function: the same record.
        let web = sandpen_api::policy::add_rule(
            &dirs,
            &Where::Global,
            Action::Allow,
            "c.test:443",
            Who::Web,
            "",
        )
        .unwrap();
        assert!(web.added);
        let all = history_for(&dirs, None).read().unwrap();
        let (cli, page) = (&all[4], &all[5]);
        assert_eq!(
            (cli.file.clone(), cli.scope),
            (page.file.clone(), page.scope)
        );
        assert_eq!((page.who, page.reason.as_str()), (Who::Web, ""));
    }
}
