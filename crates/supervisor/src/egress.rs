//! Guest-opened streams: each is one outbound connection, handed to the egress
//! proxy, which decides it by policy, makes it, and logs it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use sandpen_policy::{AddHost, Label, LabelStore, Policy, WorkspaceFile};
use sandpen_proto::frame::{read_one, write_one};
use sandpen_proto::mux::MuxStream;
use sandpen_proto::{EgressAccepted, GuestOpen, GuestRequest, RequestOutcome};
use sandpen_proxy::{AuditLog, Proxy, ProxyConfig};
use tokio::sync::mpsc;

use crate::paths::{Dirs, SandboxPaths};
use crate::sandbox::SandboxConfig;
use crate::SupervisorError;

/// How long a guest stream may take to name its destination.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest `GuestOpen` frame accepted: a host name is at most 253 bytes; a
/// request's reason and path are clipped to a few hundred when shown.
const MAX_HEADER: usize = 8 * 1024;
/// Guest streams that have not named their destination yet; beyond this new
/// ones are dropped at once (the proxy's own cap applies after the header).
const MAX_PENDING_HEADERS: usize = 256;
/// `sandpen-request`s waiting for the user at once; beyond this one is
/// refused at once.
const MAX_GUEST_REQUESTS: usize = 16;

/// The two policy files of a sandbox: the user's global one and its own.
pub fn policy_files(dirs: &Dirs, paths: &SandboxPaths) -> (PathBuf, PathBuf) {
    (
        dirs.config.join("policy.toml"),
        paths.dir.join("policy.toml"),
    )
}

/// Loads the sandbox's policy with its `--add-host` overrides. A malformed file
/// is an error naming the file and line: never a silent allow-all. The
/// workspace's `.sandpen.toml` widens nothing unless the user trusted its
/// text (crate::trust); a share that is or holds a home folder brings the
/// home-level credential stores under the deny-read defaults.
pub fn load_policy(
    dirs: &Dirs,
    paths: &SandboxPaths,
    config: &SandboxConfig,
) -> Result<Policy, SupervisorError> {
    let (global, own) = policy_files(dirs, paths);
    let workspace = WorkspaceFile::load(&config.workspace)
        .map_err(|e| SupervisorError::Invalid(format!("policy: {e}")))?;
    let labels = LabelStore::in_dir(&paths.dir)
        .load()
        .map_err(|e| SupervisorError::Invalid(format!("flow labels: {e}")))?;
    let trusted = crate::trust::load(paths)?;
    let homes = crate::own::home_folders();
    let home = crate::own::shares(config).any(|s| crate::own::holds_home(s, &homes));
    let policy = Policy::load(Some(&global), Some(&own))
        .map_err(|e| SupervisorError::Invalid(format!("policy: {e}")))?
        .with_workspace(workspace, trusted.as_ref().map(|t| t.sha256.as_str()))
        .with_home_secrets(home)
        .with_labels(labels);
    let mut add_hosts = Vec::new();
    for entry in &config.add_hosts {
        add_hosts.push(
            AddHost::parse(entry)
                .map_err(|e| SupervisorError::Invalid(format!("--add-host {entry}: {e}")))?,
        );
    }
    Ok(policy.with_add_hosts(add_hosts))
}

/// Reloads the policy when either file or the flow labels changed, so
/// `sandpen policy allow ...`, a label the file server set and `sandpen flow
/// reset` apply to running sandboxes at once: to new connections, to the
/// next request on a kept-alive one, and to the next bytes an open tunnel
/// sends (the proxy calls [`PolicyWatch::refresh`] before each). A file
/// that became malformed keeps the last good policy in force and is reported.
struct PolicyWatch {
    dirs: Dirs,
    paths: SandboxPaths,
    config: SandboxConfig,
    stamps: Mutex<Stamps>,
}

type Stamps = [Option<(SystemTime, u64)>; 5];

/// Modification time and inode: files are replaced by rename.
fn stamp(p: &Path) -> Option<(SystemTime, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.ino()))
}

impl PolicyWatch {
    fn stamps(&self) -> Stamps {
        let (g, s) = policy_files(&self.dirs, &self.paths);
        [
            stamp(&g),
            stamp(&s),
            stamp(LabelStore::in_dir(&self.paths.dir).path()),
            stamp(&crate::trust::trust_file(&self.paths)),
            stamp(
                &self
                    .config
                    .workspace
                    .join(sandpen_policy::files::WORKSPACE_FILE),
            ),
        ]
    }

    fn refresh(&self, proxy: &Proxy) {
        let now = self.stamps();
        let Ok(mut seen) = self.stamps.lock() else {
            return;
        };
        if *seen == now {
            return;
        }
        *seen = now;
        match load_policy(&self.dirs, &self.paths, &self.config) {
            Ok(policy) => {
                tracing::info!("policy reloaded");
                proxy.set_policy(policy);
            }
            Err(e) => tracing::error!("{e}; keeping the previous policy"),
        }
    }
}

pub fn start_proxy(
    dirs: &Dirs,
    paths: &SandboxPaths,
    config: &SandboxConfig,
) -> Result<Proxy, SupervisorError> {
    let policy = load_policy(dirs, paths, config)?;
    let audit = AuditLog::open(paths.logs().join("net.jsonl"))
        .map_err(|e| SupervisorError::Invalid(format!("opening the network log: {e}")))?;
    let proxy = Proxy::new(ProxyConfig::new(config.name.clone()), policy, audit);
    let ca = crate::credentials::ensure_ca(paths)?;
    let mut mitm = crate::credentials::mitm(dirs, ca, config)?;
    match toolchain_cache(dirs, config) {
        Ok(cache) => mitm = mitm.with_cache(cache),
        // Downloads still work, through the tunnel, uncached.
        Err(e) => tracing::warn!("the toolchain cache is off: {e}"),
    }
    proxy.set_mitm(Some(mitm));
    Ok(proxy)
}

/// The host's toolchain cache, as this sandbox's proxy uses it: keyed also
/// by the sandbox's upstream identity (`--add-host`, `--upstream-ca`), so a
/// sandbox pointed at a mirror of its own never fills another's.
pub fn toolchain_cache(
    dirs: &Dirs,
    config: &SandboxConfig,
) -> std::io::Result<sandpen_toolcache::ToolCache> {
    let mut cas = Vec::new();
    for path in &config.upstream_cas {
        cas.push(std::fs::read(path)?);
    }
    let identity = sandpen_toolcache::upstream_identity(&config.add_hosts, &cas);
    sandpen_toolcache::ToolCache::open(&dirs.toolchains(), &identity)
}

/// Serves guest-opened streams until the channel closes.
pub async fn serve(
    mut inbound: mpsc::Receiver<MuxStream>,
    proxy: Proxy,
    dirs: Dirs,
    paths: SandboxPaths,
    config: SandboxConfig,
) {
    let watch = Arc::new(PolicyWatch {
        stamps: Mutex::new([None; 5]),
        dirs,
        paths,
        config,
    });
    if let Ok(mut s) = watch.stamps.lock() {
        *s = watch.stamps();
    }
    // Before every decision, and before each chunk an open connection sends
    // up, so a label the file server just set closes what it narrows at once.
    let refresh_watch = watch.clone();
    proxy.set_refresh(Some(Arc::new(move |p: &Proxy| refresh_watch.refresh(p))));
    let proxy = Arc::new(proxy);
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HEADERS));
    let requests = Arc::new(tokio::sync::Semaphore::new(MAX_GUEST_REQUESTS));
    while let Some(mut stream) = inbound.recv().await {
        let proxy = proxy.clone();
        let watch = watch.clone();
        let requests = requests.clone();
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            tracing::debug!(
                "{MAX_PENDING_HEADERS} guest streams are waiting to name their destination; dropping one"
            );
            continue;
        };
        tokio::spawn(async move {
            // What the guest sends is hostile: bounded, checked, and only logged at
            // debug level (the guest must not be able to fill the host's disk).
            let header = read_one::<GuestOpen, _>(&mut stream, MAX_HEADER);
            let open = match tokio::time::timeout(HEADER_TIMEOUT, header).await {
                Ok(Ok(GuestOpen::Connect(open))) if plausible_host(&open.host) => open,
                Ok(Ok(GuestOpen::Request(req))) => {
                    drop(permit);
                    if write_one(&mut stream, &EgressAccepted).await.is_err() {
                        return;
                    }
                    let outcome = match requests.try_acquire() {
                        Ok(_held) => guest_request(&proxy, &watch.paths, req).await,
                        Err(_) => RequestOutcome::Invalid {
                            why: format!("{MAX_GUEST_REQUESTS} requests are waiting already"),
                        },
                    };
                    let _ = write_one(&mut stream, &outcome).await;
                    return;
                }
                Ok(Ok(_)) => {
                    tracing::debug!("a guest stream named an impossible host");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::debug!("a guest stream without a valid header: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!("a guest stream sent no header in {HEADER_TIMEOUT:?}");
                    return;
                }
            };
            drop(permit);
            // Acknowledge the stream at once (see `EgressAccepted`); the
            // proxy decides the connection after.
            if write_one(&mut stream, &EgressAccepted).await.is_err() {
                return;
            }
            let report = proxy.handle(crate::resources::Counted(stream), open).await;
            note_untrusted_input(&proxy, &watch.paths, &watch.config.name, &report);
        });
    }
}

/// An agent's request (`sandpen-request`, docs/policy.md): decided at once
/// when the policy already decides it (or no answer could change it),
/// otherwise held in the ask queue, with its reason, until the user answers
/// on the host. Nothing from the guest answers it.
async fn guest_request(proxy: &Proxy, paths: &SandboxPaths, req: GuestRequest) -> RequestOutcome {
    use sandpen_policy::Mode;
    use sandpen_proxy::{Answer, Asking};
    let invalid = |why: String| RequestOutcome::Invalid { why };
    match req {
        GuestRequest::Why { host } => {
            if !plausible_host(&host) {
                return invalid("not a host name".into());
            }
            RequestOutcome::Why {
                text: last_denial(paths, &host),
            }
        }
        GuestRequest::Network { host, port, reason } => {
            if !plausible_host(&host) || sandpen_policy::Host::parse(&host).is_err() || port == 0 {
                return invalid(format!("`{host}:{port}` is not a destination"));
            }
            let policy = proxy.current_policy();
            let d = policy.check(&host, port, None);
            if d.permits() {
                return RequestOutcome::Decided {
                    allowed: true,
                    text: format!("{host}:{port} is {d}"),
                };
            }
            // Undecided in any mode is what ask mode would hold.
            let askable = (*policy)
                .clone()
                .with_mode(Mode::Ask)
                .check(&host, port, None)
                .ask;
            if !askable {
                return RequestOutcome::Decided {
                    allowed: false,
                    text: format!("{host}:{port} is {d}; that is not for a request to change"),
                };
            }
            tracing::info!(host = %host, port, "sandpen-request from the guest: waiting for the user");
            let asking = Asking {
                host: host.clone(),
                port,
                reason: Some(reason),
                ..Default::default()
            };
            match proxy.ask().hold(asking, policy.ask_timeout()).await {
                Answer::Once => {
                    let window = sandpen_proxy::ONCE_WINDOW;
                    proxy.ask().grant_once(&host, port, window);
                    RequestOutcome::Decided {
                        allowed: true,
                        text: once_text(&host, port, window),
                    }
                }
                Answer::Recheck => {
                    let now = proxy.current_policy();
                    let d = now.check(&host, port, None);
                    match &d.rule {
                        Some(r) if d.permits() => RequestOutcome::Approved {
                            always: true,
                            global: r.scope == sandpen_policy::Scope::Global,
                        },
                        _ => RequestOutcome::Denied { reason: d.reason },
                    }
                }
                refused @ (Answer::Deny | Answer::Timeout) => refusal(refused, &policy),
            }
        }
        GuestRequest::File {
            path,
            write,
            reason,
        } => {
            if path.len() > 4096 || !path.starts_with('/') {
                return invalid("the path must be absolute".into());
            }
            let policy = proxy.current_policy();
            let shown = path.clone();
            let asking = Asking {
                host: path,
                port: 0,
                reason: Some(reason),
                file: Some(if write { "write" } else { "read" }.into()),
                ..Default::default()
            };
            match proxy.ask().hold(asking, policy.ask_timeout()).await {
                // The host sends this only after it wrote the exception
                // (sandpen_api::decisions::file_exception_for_pending).
                Answer::Recheck => RequestOutcome::Decided {
                    allowed: true,
                    text: format!(
                        "approved (always, sandbox scope): the user allowed reading {shown}; \
                         it applies from this sandbox's next start, so it stays hidden until the user restarts the sandbox."
                    ),
                },
                // Not offered for files (docs/policy.md): nothing changed.
                Answer::Once => RequestOutcome::Decided {
                    allowed: false,
                    text: format!("the user answered, but no file rule changed for {shown}."),
                },
                refused @ (Answer::Deny | Answer::Timeout) => refusal(refused, &policy),
            }
        }
    }
}

/// What an agent is told when the user approved its network request once.
fn once_text(host: &str, port: u16, window: Duration) -> String {
    format!(
        "approved (once): the next connection to {host}:{port} within {} s is allowed, once; after that, ask again.",
        window.as_secs()
    )
}

/// What a guest request that the user refused, or left unanswered, is told.
fn refusal(answer: sandpen_proxy::Answer, policy: &sandpen_policy::Policy) -> RequestOutcome {
    let reason = match answer {
        sandpen_proxy::Answer::Timeout => format!(
            "{}: no answer within {} s",
            sandpen_policy::reason::ASK_TIMEOUT,
            policy.ask_timeout().as_secs()
        ),
        _ => format!(
            "{}: the user refused it",
            sandpen_policy::reason::ASK_DENIED
        ),
    };
    RequestOutcome::Denied { reason }
}

/// `sandpen-request --why HOST`: the denial text of the newest refused
/// connection to `host` (any port) in the network log.
fn last_denial(paths: &SandboxPaths, host: &str) -> String {
    let filter = sandpen_proxy::LogFilter {
        sandbox: None,
        limit: Some(2000),
    };
    let records =
        sandpen_proxy::read_log(&paths.logs().join("net.jsonl"), &filter).unwrap_or_default();
    let wanted = sandpen_policy::normalize_name(host).unwrap_or_else(|_| host.to_string());
    let last = records.iter().rev().find(|r| {
        r.decision == sandpen_policy::Verdict::Deny
            && sandpen_policy::normalize_name(&r.host).is_ok_and(|h| h == wanted)
    });
    match last {
        Some(r) => {
            let line = match (&r.method, &r.path) {
                (Some(m), Some(p)) => Some(format!("{m} {p}")),
                _ => r.sni.as_ref().map(|s| format!("TLS SNI {s}")),
            };
            sandpen_proxy::denial::explain(r, line.as_deref())
        }
        None => format!(
            "sandpen: no refused connection to {host} is in this sandbox's log.
"
        ),
    }
}

/// Content that came from a host outside `flow.trusted` sets the
/// `untrusted-input` label (recorded only; no policy uses it yet).
fn note_untrusted_input(
    proxy: &Proxy,
    paths: &SandboxPaths,
    sandbox: &str,
    report: &sandpen_proxy::ConnectionReport,
) {
    if report.decision == sandpen_policy::Verdict::Deny || report.bytes_down == 0 {
        return;
    }
    let policy = proxy.policy();
    if policy.labels().get(Label::UntrustedInput).is_some()
        || policy.is_trusted_source(&report.host, report.port)
    {
        return;
    }
    let at = sandpen_fs::events::now();
    let by = format!("{}:{}", report.host, report.port);
    match LabelStore::in_dir(&paths.dir).set(Label::UntrustedInput, &at, &by) {
        Ok((_, true)) => {
            let rec = sandpen_fs::FileRecord {
                time: at,
                sandbox: sandbox.to_string(),
                kind: "label".into(),
                op: Label::UntrustedInput.as_str().into(),
                path: by,
                rule: "not in flow.trusted".into(),
                error: String::new(),
            };
            if let Ok(mut line) = serde_json::to_vec(&rec) {
                line.push(b'\n');
                use std::io::Write;
                let _ = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(paths.logs().join("files.jsonl"))
                    .and_then(|mut f| f.write_all(&line));
            }
        }
        Ok((_, false)) => {}
        Err(e) => tracing::warn!("setting untrusted-input: {e}"),
    }
}

/// A host name or literal address as the guest may claim it: at most 253
/// bytes of printable ASCII (the proxy parses it properly; this keeps junk out
/// of logs and records).
fn plausible_host(host: &str) -> bool {
    host.len() <= 253 && host.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_from_the_guest_are_bounded_and_printable() {
        assert!(plausible_host("api.example.com"));
        assert!(plausible_host("203.0.113.7"));
        assert!(plausible_host(""));
        assert!(!plausible_host(&"a".repeat(254)));
        assert!(!plausible_host("evil\u{1b}]52;c;aGk=\u{7}"));
        assert!(!plausible_host("two words"));
    }
}
