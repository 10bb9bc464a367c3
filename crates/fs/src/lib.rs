//! sandpen's workspace file server: a vhost-user-fs backend (the
//! `vhost-user-backend` crate) serving a passthrough file system
//! (`fuse-backend-rs`) through a policy layer, [`guard::Guarded`], that puts
//! every FUSE operation through the share's file rules.
//!
//! One server per share, one process per server (`sandpen fs-serve`, started
//! by the supervisor). It runs as the invoking user, serves exactly one QEMU
//! connection, and exits when QEMU disconnects.
//!
//! Why the passthrough layer cannot be walked out of: every inode it holds is
//! an `O_PATH` descriptor reached from the root by single-component lookups
//! (`openat` with `O_NOFOLLOW`), names from the guest are checked to be one
//! component that is not `..`, a symlink is never opened (only read with
//! `readlink`, and the guest resolves it in the guest's own namespace), and a
//! hard link can only be made to an inode the server already serves. See
//! docs/files.md.

pub mod backend;
pub mod confine;
pub mod events;
pub mod guard;
pub mod reserve;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use sandpen_policy::FileRules;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub use events::{read_records, Events, FileRecord};
pub use guard::{Guarded, IdMap, Limits};

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("the shared folder {}: {source}", path.display())]
    Root {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the file server: {0}")]
    Backend(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Confine(#[from] confine::ConfineError),
}

/// One share to serve.
pub struct ServeConfig {
    /// The folder on the host (absolute; the guest mounts it at the same path).
    pub root: PathBuf,
    /// The vhost-user socket to listen on.
    pub socket: PathBuf,
    pub rules: FileRules,
    pub ids: IdMap,
    pub events: Arc<Events>,
    /// Confine the process before the first request (see [`confine`]);
    /// `None` only where the caller is not a server process of its own.
    pub confine: Option<ConfineSpec>,
    /// The disk reserve on the state folder's file system (see [`reserve`]).
    pub reserve: Option<Arc<reserve::DiskReserve>>,
}

/// What the server may still reach once confined, besides its share.
#[derive(Debug, Clone, Default)]
pub struct ConfineSpec {
    /// A `:ro` mount: nothing beneath the root may change.
    pub read_only: bool,
    /// Folders it writes its own files in afterwards (the flow labels').
    pub state_dirs: Vec<PathBuf>,
}

/// The passthrough file system for `root`, behind the policy layer.
pub fn guarded_fs(cfg: &ServeConfig) -> Result<Guarded<PassthroughFs>, FsError> {
    let root = cfg.root.canonicalize().map_err(|source| FsError::Root {
        path: cfg.root.clone(),
        source,
    })?;
    if !root.is_dir() {
        return Err(FsError::Root {
            path: root,
            source: std::io::Error::other("not a folder"),
        });
    }
    let pt = Config {
        root_dir: root.to_string_lossy().into_owned(),
        // What virtiofsd's `--cache=auto` does: 1 s of attribute and entry
        // caching, page cache kept while the file is unchanged.
        cache_policy: CachePolicy::Auto,
        attr_timeout: Duration::from_secs(1),
        entry_timeout: Duration::from_secs(1),
        xattr: false,
        writeback: false,
        do_import: true,
        ..Default::default()
    };
    let fs = PassthroughFs::new(pt).map_err(|e| FsError::Backend(format!("passthrough: {e}")))?;
    Ok(
        Guarded::new(fs, cfg.rules.clone(), cfg.ids, root, cfg.events.clone())
            .with_reserve(cfg.reserve.clone()),
    )
}

/// Raises the soft limit on open files to the hard one: the passthrough layer
/// holds one descriptor per inode the guest knows, and a workspace with a
/// `node_modules` has far more files than the usual soft limit of 1024.
pub fn raise_fd_limit() -> Result<u64, FsError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(FsError::Io {
            what: "reading the open-file limit".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct we pass and nothing else.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(FsError::Io {
                what: "raising the open-file limit".into(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(lim.rlim_cur)
}

/// The caps, lowered (never raised) by `SANDPEN_FS_MAX_INODES` and
/// `SANDPEN_FS_MAX_HANDLES` (for tests that reach them quickly).
pub fn limits_from_env(mut limits: Limits) -> Result<Limits, FsError> {
    for (var, cap) in [
        ("SANDPEN_FS_MAX_INODES", &mut limits.inodes),
        ("SANDPEN_FS_MAX_HANDLES", &mut limits.handles),
    ] {
        if let Some(v) = std::env::var_os(var) {
            let n: usize = v
                .to_str()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| FsError::Backend(format!("{var}: not a number: {v:?}")))?;
            *cap = (*cap).min(n.max(1));
        }
    }
    Ok(limits)
}

/// Serve one share until QEMU disconnects.
///
/// Everything outside the share is opened first (the passthrough layer's
/// `/proc/self/fd`, the socket; the caller opened the logs), then the
/// process confines itself while it still has one thread, then the
/// vhost-user daemon starts its threads and accepts QEMU.
pub fn serve(cfg: ServeConfig) -> Result<(), FsError> {
    let limit = raise_fd_limit()?;
    let limits = limits_from_env(Limits::for_fd_limit(limit))?;
    tracing::info!(
        fd_limit = limit,
        inodes = limits.inodes,
        handles = limits.handles,
        "caps on what the guest can make the server hold"
    );
    let fs = guarded_fs(&cfg)?.with_limits(limits);
    let root = fs.root().to_path_buf();
    let _ = std::fs::remove_file(&cfg.socket);
    let mut listener = vhost::vhost_user::Listener::new(&cfg.socket, true)
        .map_err(|e| FsError::Backend(format!("listening on {}: {e}", cfg.socket.display())))?;
    if let Some(spec) = &cfg.confine {
        let confined = confine::confine(&confine::Confinement {
            root,
            writable: !spec.read_only,
            state_dirs: spec.state_dirs.clone(),
        })?;
        match &confined.landlock {
            confine::LandlockOutcome::Enforced { .. } => {
                tracing::info!("confined: {}", confined.summary())
            }
            confine::LandlockOutcome::NotEnforced(_) => tracing::warn!(
                "confined only partly, the share's rules still hold: {}",
                confined.summary()
            ),
        }
        if let Err(why) = &confined.seccomp {
            tracing::warn!("no seccomp filter: {why}");
        }
    }
    let backend = Arc::new(backend::FsBackend::new(Arc::new(fs)));
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("sandpen-fs".into(), backend, mem)
        .map_err(|e| FsError::Backend(format!("{e}")))?;
    daemon
        .start(&mut listener)
        .map_err(|e| FsError::Backend(format!("{e}")))?;
    // What `VhostUserDaemon::serve` does after `start`: a guest that quits
    // mid-message is a normal end.
    match daemon.wait() {
        Ok(()) => Ok(()),
        Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(FsError::Backend(format!("{e}"))),
    }
}

/// The `kind` that carries the git guard in `--rules`.
const GIT_GUARD: &str = "git_guard";
/// The `kind` that carries an exception to the deny-read rules
/// (`[files] allow_read`, one exact path) in `--rules`.
const ALLOW_READ: &str = "allow_read";

/// One rule as carried to the server process (`--rules`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RuleSpec {
    /// `deny_read`, `read_only`, `flow.secret`, or `git_guard` (the git
    /// guard is on).
    pub kind: String,
    pub pattern: String,
    /// Where it was written, for the audit log.
    pub source: String,
    /// Matched without regard to case (the defaults).
    #[serde(default)]
    pub ignore_case: bool,
}

/// The rules as JSON for `sandpen fs-serve --rules`.
pub fn rules_to_json(rules: &FileRules) -> String {
    let mut specs: Vec<RuleSpec> = rules
        .all()
        .map(|r| RuleSpec {
            kind: r.kind.as_str().into(),
            pattern: r.pattern.clone(),
            source: r.source.to_string(),
            ignore_case: r.ignore_case,
        })
        .collect();
    for e in rules.read_exceptions() {
        specs.push(RuleSpec {
            kind: ALLOW_READ.into(),
            pattern: e.path.to_string_lossy().into_owned(),
            source: e.source.to_string(),
            ignore_case: false,
        });
    }
    if rules.git_guard() {
        specs.push(RuleSpec {
            kind: GIT_GUARD.into(),
            pattern: sandpen_policy::files::GIT_DIR.into(),
            source: "default".into(),
            ignore_case: false,
        });
    }
    serde_json::to_string(&specs).unwrap_or_else(|_| "[]".into())
}

/// The rules from `--rules` JSON.
pub fn rules_from_json(json: &str) -> Result<FileRules, FsError> {
    use sandpen_policy::files::{FileRuleKind, FileRuleSource, PathRule};
    let specs: Vec<RuleSpec> =
        serde_json::from_str(json).map_err(|e| FsError::Backend(format!("--rules: {e}")))?;
    let mut rules = FileRules::default();
    for s in specs {
        if s.kind == GIT_GUARD {
            rules = rules.with_git_guard(true);
            continue;
        }
        if s.kind == ALLOW_READ {
            let path = sandpen_policy::files::exception_path(&s.pattern)
                .map_err(|e| FsError::Backend(format!("--rules: {e}")))?;
            rules.push_read_exception(path, FileRuleSource::Text(s.source));
            continue;
        }
        let kind = FileRuleKind::parse(&s.kind)
            .ok_or_else(|| FsError::Backend(format!("--rules: unknown kind {:?}", s.kind)))?;
        let rule = PathRule::with_case(
            kind,
            &s.pattern,
            FileRuleSource::Text(s.source),
            s.ignore_case,
        )
        .map_err(|e| FsError::Backend(format!("--rules: {e}")))?;
        rules.push(rule);
    }
    Ok(rules)
}

#[cfg(test)]
mod tests;
