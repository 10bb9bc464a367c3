//! Ask mode's decisions (docs/policy.md, "Ask mode"): what waits for the
//! user in every running sandbox, and the user's answers. `sandpen policy
//! pending|approve|deny` and the page's Decisions section call these.
//!
//! Guarantees: an answer comes only from the host (the CLI or the page, each
//! behind its own checks), never from the guest; an `always` answer is a rule
//! in the policy file plus a line in the sandbox's history naming who made
//! it and the pending entry it answered (the agent's reason quoted as
//! untrusted); an `always` answer to a file request is an exception in the
//! sandbox's `[files] allow_read` (read requests only; it applies from the
//! sandbox's next start) plus the same history line.

use sandpen_policy::file::PolicyFile;
use sandpen_policy::history::{Edit, History, Who};
use sandpen_policy::Action;
use sandpen_proxy::{Answer, PendingInfo};
use sandpen_supervisor::{control, sandbox, Dirs};
use serde::Deserialize;

use crate::policy::{file_path, Where};
use crate::ApiError;

/// What waits in sandbox `name`'s supervisor, or in every running one.
pub async fn pending(dirs: &Dirs, name: Option<&str>) -> Result<Vec<PendingInfo>, ApiError> {
    let names: Vec<String> = match name {
        Some(n) => {
            sandbox::load(dirs, n)?;
            vec![n.to_string()]
        }
        None => sandbox::list(dirs)?.into_iter().map(|c| c.name).collect(),
    };
    let mut all = Vec::new();
    for n in names {
        let paths = dirs.sandbox(&n);
        if !control::supervisor_alive(&paths) {
            continue;
        }
        // A sandbox that stops meanwhile has nothing waiting.
        if let Ok(list) = control::pending(&paths).await {
            all.extend(list);
        }
    }
    Ok(all)
}

/// `host:port` as a rule target (IPv6 in brackets).
pub fn destination(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Adds a rule for pending entry `p` (`action`, in the sandbox's file or with
/// `global` the global one), records it in the sandbox's history as made by
/// `who`, and asks every running sandbox that reads the file to re-check what
/// waits. Returns what was done, in words.
pub async fn rule_for_pending(
    dirs: &Dirs,
    p: &PendingInfo,
    action: Action,
    global: bool,
    who: Who,
) -> Result<String, ApiError> {
    let place = if global {
        Where::Global
    } else {
        Where::Sandbox(p.sandbox.clone())
    };
    let (path, scope) = file_path(dirs, &place)?;
    let mut file = PolicyFile::load(&path, scope)?;
    let target = destination(&p.host, p.port);
    let before = file.rules().len();
    let rule = file.add_rule(action, &target)?;
    let said = format!(
        "rule {} ({}: {} {})",
        rule.id, rule.scope, rule.action, rule.target
    );
    let added = file.rules().len() != before;
    let edit = Edit::AddRule {
        id: rule.id,
        action: rule.action,
        target: rule.target.to_string(),
    };
    file.save()?;
    let said = if added {
        // Kept in the sandbox's history whichever file the rule went to.
        let mut why = format!("pending {}", p.id);
        if let Some(f) = &p.first {
            why.push_str(&format!(": {f}"));
        }
        if let Some(r) = &p.reason {
            why.push_str(&format!("; the agent's reason (untrusted): {r}"));
        }
        History::in_dir(&dirs.sandbox(&p.sandbox).dir).append(
            &now_rfc3339(),
            who,
            &file,
            edit,
            &why,
            None,
        )?;
        format!("added {said}")
    } else {
        format!("already there: {said}")
    };
    // Every running sandbox reads a global rule; the entry's own sandbox first.
    let mut names = vec![p.sandbox.clone()];
    if global {
        names.extend(
            sandbox::list(dirs)?
                .into_iter()
                .map(|c| c.name)
                .filter(|n| *n != p.sandbox),
        );
    }
    for n in names {
        let paths = dirs.sandbox(&n);
        if control::supervisor_alive(&paths) {
            let _ = control::recheck(&paths).await;
        }
    }
    Ok(said)
}

/// Writes the exception an agent's `sandpen-request file read PATH` (pending
/// entry `p`) asks for: PATH, relative to the share that holds it, in
/// `[files] allow_read` of the sandbox's own file; records it in the
/// sandbox's history as made by `who`, and tells the waiting agent that it
/// applies from the sandbox's next start (the file server takes its rules
/// at start). Refused, with the reason, for a write, for `global`, for a
/// path outside the shares, one no deny-read rule hides, or one below a
/// hidden folder.
pub async fn file_exception_for_pending(
    dirs: &Dirs,
    p: &PendingInfo,
    global: bool,
    who: Who,
) -> Result<String, ApiError> {
    use crate::error::FileRefusal;
    let shown = match &p.file {
        Some(access) => format!("file {access} {}", p.host),
        None => destination(&p.host, p.port),
    };
    let refuse = |why| ApiError::FileException {
        what: shown.clone(),
        why,
    };
    if global {
        return Err(refuse(FileRefusal::Global));
    }
    if p.file.as_deref() != Some("read") {
        return Err(refuse(FileRefusal::Write));
    }
    let config = sandbox::load(dirs, &p.sandbox)?;
    let asked = std::path::Path::new(&p.host);
    // The guest mounts each share at its host path (docs/architecture.md).
    let rel = std::iter::once(config.workspace.as_path())
        .chain(config.mounts.iter().map(|m| m.path.as_path()))
        .filter_map(|root| asked.strip_prefix(root).ok())
        .min_by_key(|rel| rel.components().count())
        .filter(|rel| !rel.as_os_str().is_empty())
        .ok_or_else(|| refuse(FileRefusal::OutsideShares))?;
    let rel_text = rel.to_string_lossy().into_owned();
    sandpen_policy::files::exception_path(&rel_text)
        .map_err(|e| refuse(FileRefusal::BadPath(e.to_string())))?;
    let rules = crate::policy::policy_for(dirs, Some(&p.sandbox))?.file_rules()?;
    if let Some(r) = rules.hidden_above(rel) {
        return Err(refuse(FileRefusal::HiddenAbove(r.to_string())));
    }
    if rules.hidden(rel).is_none() {
        return Err(refuse(FileRefusal::NotHidden));
    }
    let (path, scope) = file_path(dirs, &Where::Sandbox(p.sandbox.clone()))?;
    let mut file = PolicyFile::load(&path, scope)?;
    let added = file.add_read_exception(&rel_text)?;
    file.save()?;
    let said = if added {
        let mut why = format!("pending {}: file read {}", p.id, p.host);
        if let Some(r) = &p.reason {
            why.push_str(&format!("; the agent's reason (untrusted): {r}"));
        }
        History::in_dir(&dirs.sandbox(&p.sandbox).dir).append(
            &now_rfc3339(),
            who,
            &file,
            Edit::AddReadException {
                path: rel_text.clone(),
            },
            &why,
            None,
        )?;
        format!("added the file exception allow_read {rel_text} (sandbox scope)")
    } else {
        format!("already there: the file exception allow_read {rel_text}")
    };
    // The agent is told; the entry is gone afterwards (or was already).
    let paths = dirs.sandbox(&p.sandbox);
    if control::supervisor_alive(&paths) {
        let _ = control::answer(&paths, p.id, Answer::Recheck).await;
    }
    Ok(format!(
        "{said}; it applies from the sandbox's next start (`sandpen stop {0}; sandpen start {0}`)",
        p.sandbox
    ))
}

/// The page's answer to one pending entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    /// This connection (or request) alone.
    Once,
    /// An allow rule in the sandbox's file; everything waiting for it goes on.
    Always,
    /// Refused, this once.
    Deny,
}

/// Answers pending entry `id` of sandbox `name` as `who`; what was done, in
/// words.
pub async fn decide(
    dirs: &Dirs,
    name: &str,
    id: u64,
    decision: Decision,
    who: Who,
) -> Result<String, ApiError> {
    sandbox::load(dirs, name)?;
    let paths = dirs.sandbox(name);
    if !control::supervisor_alive(&paths) {
        return Err(ApiError::NotRunning(name.to_string()));
    }
    let p = control::pending(&paths)
        .await?
        .into_iter()
        .find(|p| p.id == id)
        .ok_or(ApiError::NoSuchPending {
            sandbox: name.to_string(),
            id,
        })?;
    let shown = match &p.file {
        Some(access) => format!("file {access} {}", p.host),
        None => destination(&p.host, p.port),
    };
    match decision {
        Decision::Always if p.file.is_some() => {
            let said = file_exception_for_pending(dirs, &p, false, who).await?;
            Ok(format!("{shown}: {said}"))
        }
        Decision::Once if p.file.is_some() => Err(ApiError::FileException {
            what: shown,
            why: crate::error::FileRefusal::Once,
        }),
        Decision::Always => {
            let said = rule_for_pending(dirs, &p, Action::Allow, false, who).await?;
            Ok(format!(
                "{shown}: {said}; every connection waiting for it goes on"
            ))
        }
        Decision::Once => {
            control::answer(&paths, p.id, Answer::Once).await?;
            Ok(format!("{shown}: {}", once_said(&p)))
        }
        Decision::Deny => {
            control::answer(&paths, p.id, Answer::Deny).await?;
            Ok(format!("{shown}: refused"))
        }
    }
}

/// What `approve --once` did to a network entry, in words: a held
/// connection goes on alone; an agent's request becomes a one-time
/// allowance for its next connection (docs/policy.md, "Requests from
/// inside").
pub fn once_said(p: &PendingInfo) -> String {
    if p.reason.is_some() {
        format!(
            "approved once: the next connection to {} within {} s is allowed, once",
            destination(&p.host, p.port),
            sandpen_proxy::ONCE_WINDOW.as_secs()
        )
    } else {
        "approved once (this connection only)".into()
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
