//! One cgroup per sandbox: where it goes, its limits, its usage
//! (docs/architecture.md, "Resource limits").
//!
//! The supervisor moves itself into its sandbox's cgroup before it starts the
//! file servers and QEMU, so they inherit it: everything a sandbox runs on the
//! host is bounded together. Where it goes:
//!
//! - **cgroup v2, as root**: `/sys/fs/cgroup/sandpen/NAME`, with the `cpu`,
//!   `memory`, `pids` and (where present) `io` controllers enabled down to it.
//! - **cgroup v2, as a normal user**: a transient systemd scope made by
//!   `systemd-run --user --scope` around the supervisor
//!   ([`systemd_scope_command`]); systemd sets the limits and removes the
//!   scope when its last process exits. The supervisor then only reads it.
//! - **cgroup v2, as a normal user without a systemd user manager**: a
//!   subtree the user owns (delegated to them, as a container runtime or an
//!   administrator delegates one): `DELEGATED/sandpen/NAME`, where DELEGATED
//!   is the highest ancestor of the caller's own cgroup that the user owns
//!   and may enable `cpu`, `memory` and `pids` in.
//! - **cgroup v1 (hybrid hosts), as root**: `sandpen/NAME` under the
//!   supervisor's own cgroup in each of the `cpu`, `cpuacct`, `memory`,
//!   `pids` and `blkio` hierarchies, so a limit around the caller (a
//!   container's, a CI job's) still applies.
//!
//! Guarantees: [`Cgroup::create`] either returns a cgroup with every limit
//! written, or an error naming why limits cannot be had (the sandbox then
//! runs without them, and says so). A stale cgroup of the same sandbox (a
//! supervisor that was killed) is emptied and removed first; the caller must
//! hold the sandbox's supervisor lock, so no live sandbox is in it.
//! [`Cgroup::remove`] moves the caller back where it came from and removes
//! the cgroup once its other processes are gone.

pub mod limits;
pub mod parse;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use limits::Limits;

/// `SANDPEN_LIMITS=off` starts sandboxes without a cgroup of their own (a
/// documented knob: the limits benchmark compares against it).
pub const ENV_SWITCH: &str = "SANDPEN_LIMITS";
/// Set by [`systemd_scope_command`] on the supervisor it wraps: the
/// supervisor is already in its own scope.
pub const ENV_SCOPE: &str = "SANDPEN_CGROUP_SCOPE";

const SUBDIR: &str = "sandpen";

/// Why a sandbox runs without limits. Display is the one line `run`,
/// `start` and `doctor` print.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("resource limits are off ({ENV_SWITCH}=off)")]
    Disabled,
    #[error("no cgroup file system is mounted")]
    NoCgroupFs,
    #[error(
        "cgroup v2 needs root, a systemd user session (systemd-run --user) or a cgroup subtree \
         delegated to this user to make a cgroup; none here"
    )]
    NoDelegation,
    #[error("cgroup v1 (this host's hierarchy) needs root to make a cgroup")]
    V1NotRoot,
    #[error("no {0} controller is available (cgroup v1 or v2)")]
    MissingController(&'static str),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl CgroupError {
    fn io(what: impl Into<String>, source: std::io::Error) -> CgroupError {
        CgroupError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Which kind of cgroup a sandbox gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backend {
    V2,
    V1,
    /// A systemd user scope (cgroup v2) that systemd made and bounds.
    SystemdScope,
    /// cgroup v2 under a subtree delegated to this (normal) user.
    Delegated,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::V2 => "cgroup v2",
            Backend::V1 => "cgroup v1",
            Backend::SystemdScope => "cgroup v2 (systemd user scope)",
            Backend::Delegated => "cgroup v2 (a subtree delegated to this user)",
        })
    }
}

/// What a sandbox has used so far (counters) and holds now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// CPU time of every process in the cgroup, µs since it was made.
    pub cpu_usec: Option<u64>,
    /// Memory in use, without the inactive file cache (as `docker stats`).
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
    /// Disk bytes read and written by the cgroup (v1 misses buffered
    /// writeback, which it does not attribute).
    pub io_read_bytes: Option<u64>,
    pub io_write_bytes: Option<u64>,
    /// Times the memory limit killed a process.
    pub oom_kills: Option<u64>,
    /// Forks refused at the pids limit.
    pub pids_refused: Option<u64>,
}

/// One directory of the sandbox's cgroup, and the one its creator came from.
#[derive(Debug, Clone)]
struct Dir {
    /// v1: the controllers of this hierarchy; v2: empty.
    controllers: Vec<String>,
    path: PathBuf,
    origin: PathBuf,
}

/// A sandbox's cgroup.
#[derive(Debug)]
pub struct Cgroup {
    backend: Backend,
    dirs: Vec<Dir>,
    limits: Limits,
    /// Limits the host cannot apply (e.g. no `blkio.weight` without BFQ).
    absent: Vec<String>,
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value)
        .map_err(|e| CgroupError::io(format!("writing {value:?} to {}", path.display()), e))
}

/// The cgroup file systems this process sees, and its place in each.
struct Host {
    mounts: Vec<parse::CgroupMount>,
    member: Vec<parse::Membership>,
}

impl Host {
    fn read() -> Host {
        Host {
            mounts: parse::mountinfo(&read(Path::new("/proc/self/mountinfo")).unwrap_or_default()),
            member: parse::proc_cgroup(&read(Path::new("/proc/self/cgroup")).unwrap_or_default()),
        }
    }

    /// The v2 mount and this process's directory in it.
    fn v2(&self) -> Option<(&parse::CgroupMount, PathBuf)> {
        let mount = self.mounts.iter().find(|m| m.v2)?;
        let path = &self.member.iter().find(|m| m.controllers.is_empty())?.path;
        Some((
            mount,
            parse::dir_in_mount(&mount.mount_point, &mount.root, path)?,
        ))
    }

    /// The v2 controllers available at the mount's root.
    fn v2_controllers(&self) -> Vec<String> {
        self.mounts
            .iter()
            .find(|m| m.v2)
            .and_then(|m| read(&m.mount_point.join("cgroup.controllers")))
            .map(|s| s.split_whitespace().map(String::from).collect())
            .unwrap_or_default()
    }

    /// v1: the hierarchy holding `controller`, and this process's directory in it.
    fn v1(&self, controller: &str) -> Option<(Vec<String>, PathBuf)> {
        let mount = self
            .mounts
            .iter()
            .find(|m| !m.v2 && m.controllers.iter().any(|c| c == controller))?;
        let member = self
            .member
            .iter()
            .find(|m| m.controllers.iter().any(|c| c == controller))?;
        Some((
            mount.controllers.clone(),
            parse::dir_in_mount(&mount.mount_point, &mount.root, &member.path)?,
        ))
    }

    /// A subtree of the v2 hierarchy delegated to this user: the highest
    /// ancestor of this process's cgroup (itself included, the mount's root
    /// never) that the user owns and may write `cgroup.procs` and
    /// `cgroup.subtree_control` of, and in which `cpu`, `memory` and `pids`
    /// are enabled for children or can be (it holds no process). Moving a
    /// process between two cgroups below it needs write access to their
    /// common ancestor's `cgroup.procs`, which it grants.
    fn delegated(&self) -> Option<PathBuf> {
        let (mount, mine) = self.v2()?;
        let uid = nix::unistd::geteuid().as_raw();
        let owned = |dir: &Path| {
            use std::os::unix::fs::MetadataExt;
            let writable =
                |f: &str| nix::unistd::access(&dir.join(f), nix::unistd::AccessFlags::W_OK).is_ok();
            std::fs::metadata(dir).is_ok_and(|m| m.uid() == uid)
                && writable("cgroup.procs")
                && writable("cgroup.subtree_control")
        };
        let mut top = None;
        let mut dir = mine.as_path();
        while dir != mount.mount_point && dir.starts_with(&mount.mount_point) && owned(dir) {
            top = Some(dir.to_path_buf());
            dir = dir.parent()?;
        }
        let top = top?;
        let listed = |file: &str| {
            let words = read(&top.join(file)).unwrap_or_default();
            ["cpu", "memory", "pids"]
                .iter()
                .all(|c| words.split_whitespace().any(|w| w == *c))
        };
        let enabled = listed("cgroup.subtree_control");
        let can_enable = listed("cgroup.controllers")
            && read(&top.join("cgroup.procs")).is_some_and(|p| p.trim().is_empty());
        (enabled || can_enable).then_some(top)
    }

    fn backend(&self, name: &str) -> Result<Backend, CgroupError> {
        // Only a scope that `systemd_scope_command` made for this sandbox
        // counts (an inherited or hand-set variable does not).
        let in_scope = self.v2().is_some_and(|(_, dir)| {
            dir.file_name().and_then(|f| f.to_str()).is_some_and(|f| {
                f.starts_with(&format!("sandpen-{name}-")) && f.ends_with(".scope")
            })
        });
        if std::env::var_os(ENV_SCOPE).is_some() && in_scope {
            return Ok(Backend::SystemdScope);
        }
        let v2 = self.v2_controllers();
        let v2_ok = ["cpu", "memory", "pids"]
            .iter()
            .all(|c| v2.iter().any(|x| x == c));
        if v2_ok {
            return if is_root() {
                Ok(Backend::V2)
            } else if user_manager().is_none() && self.delegated().is_some() {
                // With a user manager, its scope is the way (systemd owns the
                // structure of the user's subtree).
                Ok(Backend::Delegated)
            } else {
                Err(CgroupError::NoDelegation)
            };
        }
        if !is_root() && user_manager().is_none() && self.delegated().is_some() {
            // A delegated subtree shows its own controllers, not the root's.
            return Ok(Backend::Delegated);
        }
        let v1_any = self.mounts.iter().any(|m| !m.v2);
        if v1_any {
            for c in ["cpu", "memory", "pids"] {
                if self.v1(c).is_none() {
                    return Err(CgroupError::MissingController(c));
                }
            }
            return if is_root() {
                Ok(Backend::V1)
            } else {
                Err(CgroupError::V1NotRoot)
            };
        }
        if self.mounts.is_empty() {
            Err(CgroupError::NoCgroupFs)
        } else {
            Err(CgroupError::MissingController("cpu"))
        }
    }
}

fn switched_off() -> bool {
    std::env::var(ENV_SWITCH).is_ok_and(|v| v == "off" || v == "0")
}

/// Which cgroup a sandbox started now would get, or why none (for `doctor`).
pub fn probe() -> Result<Backend, CgroupError> {
    if switched_off() {
        return Err(CgroupError::Disabled);
    }
    let host = Host::read();
    match host.backend("") {
        // A normal user on v2 gets a scope where systemd's user manager runs.
        Err(CgroupError::NoDelegation) if user_manager().is_some() => Ok(Backend::SystemdScope),
        other => other,
    }
}

/// The socket of the user's systemd manager, when one runs, and `systemd-run`.
fn user_manager() -> Option<PathBuf> {
    let runtime = std::env::var_os("XDG_RUNTIME_DIR")?;
    let private = Path::new(&runtime).join("systemd/private");
    if !private.exists() {
        return None;
    }
    find_on_path("systemd-run")
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// For a normal user on cgroup v2 with a systemd user manager: the command
/// that runs `program args` in a new transient scope bounded by `limits`
/// (`systemd-run --user --scope`; systemd removes the scope when its last
/// process exits). `None` where that is not the way (root, v1, no manager,
/// limits switched off): the supervisor then makes its cgroup itself, or
/// says why it cannot.
pub fn systemd_scope_command(
    name: &str,
    limits: &Limits,
    program: &Path,
    args: &[&str],
) -> Option<std::process::Command> {
    if switched_off() || is_root() {
        return None;
    }
    let host = Host::read();
    if !matches!(host.backend(name), Err(CgroupError::NoDelegation)) {
        return None;
    }
    let systemd_run = user_manager()?;
    let mut cmd = std::process::Command::new(systemd_run);
    cmd.args(scope_args(name, limits, std::process::id()))
        .arg("--")
        .arg(program)
        .args(args)
        .env(ENV_SCOPE, "1");
    Some(cmd)
}

/// `systemd-run`'s options for sandbox `name`'s scope (the unit is named
/// `sandpen-NAME-PID.scope`, which [`Cgroup::create`] recognises).
fn scope_args(name: &str, limits: &Limits, pid: u32) -> Vec<String> {
    vec![
        "--user".into(),
        "--scope".into(),
        "--quiet".into(),
        "--collect".into(),
        format!("--unit=sandpen-{name}-{pid}"),
        format!(
            "--property=CPUQuota={}%",
            limits.cpu_quota_us * 100 / limits.cpu_period_us.max(1)
        ),
        format!("--property=MemoryMax={}", limits.memory_max),
        format!("--property=TasksMax={}", limits.pids_max),
        format!("--property=IOWeight={}", limits.io_weight),
    ]
}

impl Cgroup {
    /// Makes the cgroup of sandbox `name` with `limits` (removing a stale
    /// one first), or says why it cannot. The caller holds the sandbox's
    /// supervisor lock.
    pub fn create(name: &str, limits: &Limits) -> Result<Cgroup, CgroupError> {
        if switched_off() {
            return Err(CgroupError::Disabled);
        }
        let host = Host::read();
        match host.backend(name)? {
            Backend::SystemdScope => {
                let (_, dir) = host.v2().ok_or(CgroupError::NoCgroupFs)?;
                Ok(Cgroup {
                    backend: Backend::SystemdScope,
                    dirs: vec![Dir {
                        controllers: vec![],
                        path: dir.clone(),
                        origin: dir,
                    }],
                    limits: *limits,
                    absent: vec![],
                })
            }
            Backend::V2 => {
                let (mount, origin) = host.v2().ok_or(CgroupError::NoCgroupFs)?;
                let available = host.v2_controllers();
                Self::create_v2(
                    Backend::V2,
                    &mount.mount_point,
                    origin,
                    &available,
                    name,
                    limits,
                )
            }
            Backend::Delegated => {
                let (_, origin) = host.v2().ok_or(CgroupError::NoCgroupFs)?;
                let base = host.delegated().ok_or(CgroupError::NoDelegation)?;
                let available: Vec<String> = read(&base.join("cgroup.controllers"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .map(String::from)
                    .collect();
                Self::create_v2(Backend::Delegated, &base, origin, &available, name, limits)
            }
            Backend::V1 => Self::create_v1(&host, name, limits),
        }
    }

    /// `BASE/sandpen/NAME`, with `available`'s `cpu memory pids io` enabled
    /// down to it. BASE is the v2 mount's root (as root) or the subtree
    /// delegated to this user.
    fn create_v2(
        backend: Backend,
        base: &Path,
        origin: PathBuf,
        available: &[String],
        name: &str,
        limits: &Limits,
    ) -> Result<Cgroup, CgroupError> {
        let wanted: Vec<&str> = ["cpu", "memory", "pids", "io"]
            .into_iter()
            .filter(|c| available.iter().any(|a| a == c))
            .collect();
        let enable = wanted
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(" ");
        let parent = base.join(SUBDIR);
        mkdir(&parent)?;
        write(&base.join("cgroup.subtree_control"), &enable)?;
        write(&parent.join("cgroup.subtree_control"), &enable)?;
        let path = parent.join(name);
        clear_stale(&path)?;
        mkdir(&path)?;
        let cg = Cgroup {
            backend,
            dirs: vec![Dir {
                controllers: vec![],
                path: path.clone(),
                origin,
            }],
            limits: *limits,
            absent: if wanted.contains(&"io") {
                vec![]
            } else {
                vec!["IO weight (no io controller)".into()]
            },
        };
        let set = || -> Result<(), CgroupError> {
            write(&path.join("cpu.max"), &limits.cpu_max())?;
            write(&path.join("memory.max"), &limits.memory_max.to_string())?;
            write(&path.join("pids.max"), &limits.pids_max.to_string())?;
            if path.join("io.weight").exists() {
                write(
                    &path.join("io.weight"),
                    &format!("default {}", limits.io_weight),
                )?;
            }
            Ok(())
        };
        if let Err(e) = set() {
            let _ = std::fs::remove_dir(&path);
            return Err(e);
        }
        Ok(cg)
    }

    fn create_v1(host: &Host, name: &str, limits: &Limits) -> Result<Cgroup, CgroupError> {
        let mut dirs: Vec<Dir> = Vec::new();
        let mut absent = Vec::new();
        for c in ["cpu", "cpuacct", "memory", "pids", "blkio"] {
            let Some((controllers, origin)) = host.v1(c) else {
                absent.push(format!("{c} (no v1 hierarchy)"));
                continue;
            };
            let path = origin.join(SUBDIR).join(name);
            if dirs.iter().any(|d| d.path == path) {
                continue;
            }
            dirs.push(Dir {
                controllers,
                path,
                origin,
            });
        }
        let made = (|| -> Result<(), CgroupError> {
            for d in &dirs {
                mkdir(d.path.parent().unwrap_or(&d.origin))?;
                clear_stale(&d.path)?;
                mkdir(&d.path)?;
            }
            Ok(())
        })();
        let mut cg = Cgroup {
            backend: Backend::V1,
            dirs,
            limits: *limits,
            absent,
        };
        let set = made.and_then(|()| {
            let cpu = cg.dir("cpu").ok_or(CgroupError::MissingController("cpu"))?;
            write(
                &cpu.join("cpu.cfs_period_us"),
                &limits.cpu_period_us.to_string(),
            )?;
            write(
                &cpu.join("cpu.cfs_quota_us"),
                &limits.cpu_quota_us.to_string(),
            )?;
            let mem = cg
                .dir("memory")
                .ok_or(CgroupError::MissingController("memory"))?;
            write(
                &mem.join("memory.limit_in_bytes"),
                &limits.memory_max.to_string(),
            )?;
            let pids = cg
                .dir("pids")
                .ok_or(CgroupError::MissingController("pids"))?;
            write(&pids.join("pids.max"), &limits.pids_max.to_string())?;
            match cg.dir("blkio").map(|d| d.join("blkio.weight")) {
                Some(w) if w.exists() => write(&w, &limits.blkio_weight().to_string())?,
                _ => cg
                    .absent
                    .push("IO weight (no blkio.weight: the disk scheduler has none)".into()),
            }
            Ok(())
        });
        if let Err(e) = set {
            cg.rmdirs();
            return Err(e);
        }
        Ok(cg)
    }

    /// v1: the directory of the hierarchy holding `controller`; v2: the one directory.
    fn dir(&self, controller: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|d| d.controllers.is_empty() || d.controllers.iter().any(|c| c == controller))
            .map(|d| d.path.as_path())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Limits this host cannot apply, each named (shown by `doctor` and the log).
    pub fn absent(&self) -> &[String] {
        &self.absent
    }

    /// Where it is, for the log: one path, or v1's paths.
    pub fn describe(&self) -> String {
        let paths: Vec<String> = self
            .dirs
            .iter()
            .map(|d| d.path.display().to_string())
            .collect();
        format!("{} {}", self.backend, paths.join(", "))
    }

    /// Every directory the cgroup's owner touches after [`Cgroup::create`]:
    /// the cgroup's own (read for usage, removed at the end; their parents
    /// too, for the removal) and the ones it came from (written to move back).
    /// A confinement of the supervisor (Landlock) must leave these open.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for d in &self.dirs {
            out.push(d.path.clone());
            if let Some(parent) = d.path.parent() {
                out.push(parent.to_path_buf());
            }
            out.push(d.origin.clone());
        }
        out.dedup();
        out
    }

    /// Moves process `pid` (all its threads) into the cgroup.
    pub fn enter(&self, pid: u32) -> Result<(), CgroupError> {
        if self.backend == Backend::SystemdScope {
            return Ok(());
        }
        for d in &self.dirs {
            write(&d.path.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// What the sandbox uses now. Files that cannot be read are `None`.
    pub fn usage(&self) -> Usage {
        let file =
            |controller: &str, name: &str| self.dir(controller).and_then(|d| read(&d.join(name)));
        match self.backend {
            Backend::V2 | Backend::SystemdScope | Backend::Delegated => {
                let io = file("io", "io.stat").map(|s| parse::io_stat(&s));
                let current = file("memory", "memory.current").and_then(|s| parse::single(&s));
                let inactive = file("memory", "memory.stat")
                    .and_then(|s| parse::keyed(&s, "inactive_file"))
                    .unwrap_or(0);
                Usage {
                    cpu_usec: file("cpu", "cpu.stat").and_then(|s| parse::keyed(&s, "usage_usec")),
                    memory_bytes: current.map(|c| c.saturating_sub(inactive)),
                    pids: file("pids", "pids.current").and_then(|s| parse::single(&s)),
                    io_read_bytes: io.map(|(r, _)| r),
                    io_write_bytes: io.map(|(_, w)| w),
                    oom_kills: file("memory", "memory.events")
                        .and_then(|s| parse::keyed(&s, "oom_kill")),
                    pids_refused: file("pids", "pids.events").and_then(|s| parse::keyed(&s, "max")),
                }
            }
            Backend::V1 => {
                let io = file("blkio", "blkio.throttle.io_service_bytes_recursive")
                    .or_else(|| file("blkio", "blkio.throttle.io_service_bytes"))
                    .map(|s| parse::blkio_bytes(&s));
                let current =
                    file("memory", "memory.usage_in_bytes").and_then(|s| parse::single(&s));
                let inactive = file("memory", "memory.stat")
                    .and_then(|s| parse::keyed(&s, "total_inactive_file"))
                    .unwrap_or(0);
                Usage {
                    cpu_usec: file("cpuacct", "cpuacct.usage")
                        .and_then(|s| parse::single(&s))
                        .map(|ns| ns / 1000),
                    memory_bytes: current.map(|c| c.saturating_sub(inactive)),
                    pids: file("pids", "pids.current").and_then(|s| parse::single(&s)),
                    io_read_bytes: io.map(|(r, _)| r),
                    io_write_bytes: io.map(|(_, w)| w),
                    oom_kills: file("memory", "memory.oom_control")
                        .and_then(|s| parse::keyed(&s, "oom_kill")),
                    pids_refused: file("pids", "pids.events").and_then(|s| parse::keyed(&s, "max")),
                }
            }
        }
    }

    /// Moves this process back where it came from and removes the cgroup,
    /// waiting up to 5 s for its other processes to go (a systemd scope is
    /// left to systemd, which removes it when it empties).
    pub fn remove(self) -> Result<(), CgroupError> {
        if self.backend == Backend::SystemdScope {
            return Ok(());
        }
        let me = std::process::id().to_string();
        for d in &self.dirs {
            write(&d.origin.join("cgroup.procs"), &me)?;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.try_rmdirs() {
                Ok(()) => return Ok(()),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_rmdirs(&self) -> Result<(), CgroupError> {
        for d in &self.dirs {
            match std::fs::remove_dir(&d.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(CgroupError::io(format!("removing {}", d.path.display()), e)),
            }
        }
        Ok(())
    }

    fn rmdirs(&self) {
        let _ = self.try_rmdirs();
    }
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(CgroupError::io(format!("creating {}", path.display()), e)),
    }
}

/// Empties and removes a cgroup left by a supervisor that was killed: its
/// processes (QEMU or a file server that outlived it) belong to no live
/// sandbox, since the caller holds the sandbox's lock.
fn clear_stale(path: &Path) -> Result<(), CgroupError> {
    if !path.exists() {
        return Ok(());
    }
    tracing::info!("removing the stale cgroup {}", path.display());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let procs = read(&path.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                return Err(CgroupError::io(
                    format!("removing the stale cgroup {}", path.display()),
                    e,
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_systemd_scope_carries_the_limits() {
        let args = scope_args("demo", &Limits::for_sandbox(2, 1024), 42).join(" ");
        assert_eq!(
            args,
            "--user --scope --quiet --collect --unit=sandpen-demo-42 --property=CPUQuota=200% \
             --property=MemoryMax=1610612736 --property=TasksMax=1024 --property=IOWeight=50"
        );
    }

    /// Needs a systemd user manager (tests/limits.rs runs one in a guest and
    /// sets `SANDPEN_CGROUP_EXPECT=SystemdScope`): the test runs itself again
    /// through [`systemd_scope_command`], as the supervisor is run, and the
    /// copy inside the scope checks that it finds the scope and its limits.
    #[test]
    fn a_systemd_user_scope_bounds_what_it_wraps() {
        const INSIDE: &str = "SANDPEN_CGROUP_INSIDE_SCOPE";
        let name = "scope-test";
        let limits = Limits::for_sandbox(1, 256);
        if std::env::var_os(INSIDE).is_some() {
            let cg = Cgroup::create(name, &limits).expect("the scope");
            assert_eq!(cg.backend(), Backend::SystemdScope);
            let dir = cg.dir("cpu").expect("its folder").to_path_buf();
            let file = |f: &str| read(&dir.join(f)).unwrap_or_default();
            assert!(
                file("cpu.max").starts_with("100000 "),
                "{}",
                file("cpu.max")
            );
            assert_eq!(file("memory.max").trim(), limits.memory_max.to_string());
            assert_eq!(file("pids.max").trim(), limits.pids_max.to_string());
            assert!(cg.usage().pids.is_some_and(|n| n >= 1));
            cg.remove().expect("left to systemd");
            eprintln!("inside {}", dir.display());
            return;
        }
        if std::env::var("SANDPEN_CGROUP_EXPECT").as_deref() != Ok("SystemdScope") {
            eprintln!("no systemd user manager asked for; skipping");
            return;
        }
        let me = std::env::current_exe().expect("this test binary");
        let mut cmd = systemd_scope_command(
            name,
            &limits,
            &me,
            &[
                "--exact",
                "tests::a_systemd_user_scope_bounds_what_it_wraps",
                "--nocapture",
            ],
        )
        .expect("a normal user with a user manager gets a scope");
        let out = cmd.env(INSIDE, "1").output().expect("systemd-run");
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(
            text.contains("inside /sys/fs/cgroup/") && text.contains(".scope"),
            "{text}"
        );
        eprintln!("{text}");
    }

    /// Needs root on a host with cgroups: makes a real cgroup for a child
    /// process, checks the limits landed and the usage reads, removes it.
    #[test]
    fn a_real_cgroup_bounds_a_child_and_goes_away() {
        // Set where a backend must be had (tests/limits.rs runs this test
        // inside a guest, on cgroup v2, as root and as a delegated user).
        let expected = std::env::var("SANDPEN_CGROUP_EXPECT").ok();
        let backend = match probe() {
            Ok(b @ (Backend::V1 | Backend::V2 | Backend::Delegated)) => b,
            other => {
                assert!(expected.is_none(), "expected {expected:?}, got {other:?}");
                eprintln!("no cgroup to make here ({other:?}); skipping");
                return;
            }
        };
        if let Some(expected) = expected {
            assert_eq!(format!("{backend:?}"), expected);
        }
        eprintln!("backend: {backend}");
        let name = format!("unit-test-{}", std::process::id());
        let limits = Limits::for_sandbox(1, 256);
        let cg = Cgroup::create(&name, &limits).expect("the cgroup");
        assert_eq!(cg.backend(), backend);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        cg.enter(child.id()).expect("entering");
        let usage = cg.usage();
        assert_eq!(usage.pids, Some(1), "{usage:?}");
        assert!(usage.memory_bytes.is_some(), "{usage:?}");
        assert!(usage.cpu_usec.is_some(), "{usage:?}");
        let quota = match backend {
            Backend::V1 => read(&cg.dir("cpu").unwrap().join("cpu.cfs_quota_us")),
            _ => read(&cg.dir("cpu").unwrap().join("cpu.max")),
        }
        .unwrap();
        assert!(quota.starts_with("100000"), "{quota}");
        let mem = match backend {
            Backend::V1 => read(&cg.dir("memory").unwrap().join("memory.limit_in_bytes")),
            _ => read(&cg.dir("memory").unwrap().join("memory.max")),
        }
        .unwrap();
        assert_eq!(mem.trim(), ((256u64 + 512) << 20).to_string());
        let paths: Vec<PathBuf> = cg.dirs.iter().map(|d| d.path.clone()).collect();
        // A stale cgroup (its supervisor killed, a child left in it) is
        // emptied and made again.
        let again = Cgroup::create(&name, &limits).expect("over the stale one");
        assert!(
            child.wait().unwrap().code().is_none(),
            "the leftover was killed"
        );
        assert_eq!(again.usage().pids, Some(0));
        again.remove().expect("removed");
        for p in paths {
            assert!(!p.exists(), "{} is left", p.display());
        }
    }
}
