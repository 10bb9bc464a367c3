//! QEMU's jail: the one launcher through which the supervisor starts QEMU
//! (docs/architecture.md, "QEMU's jail").
//!
//! The launcher is the `sandpen` binary again (`sandpen __jail`, see
//! [`launcher_main`]), started by [`JailSpec::command`] with the spec in its
//! environment. It is not setuid and is no daemon: it lives exactly as long
//! as the program it jails.
//!
//! What the jailed program gets, layer by layer ([`Layers`]):
//!
//! - **Namespaces**: a new user namespace (the caller's uid and gid mapped to
//!   themselves; root too, so that its capabilities count only there), then
//!   new mount (propagation private), PID (the program is PID 1 of its
//!   own), IPC, UTS and network namespaces. The network namespace has only a
//!   `lo` that is down: QEMU needs no network, its sockets are descriptors
//!   passed in ([`sandpen_vm::Socket::Fd`]).
//! - **Landlock** (all rights of every ABI handled, the kernel's ABI
//!   decides): read beneath [`JailSpec::read`], read and write the files in
//!   [`JailSpec::write`], read, write and ioctl on [`JailSpec::devices`]
//!   (`/dev/kvm`), execute only the program and its ELF interpreter. No TCP,
//!   no signals to and no abstract sockets of processes outside the jail.
//! - **Capabilities**: none, in any set (the bounding set is emptied where
//!   allowed).
//! - **seccomp**: a deny list on top of QEMU's own `-sandbox on`: no new
//!   sockets and no `connect` or `bind`; no `ptrace`, `bpf`,
//!   `io_uring`, `userfaultfd`, keyrings, mounts, namespaces, modules. And
//!   one exec: every `execve`/`execveat` waits on a listener held by the
//!   launcher, which lets the first one (the launcher's own exec of the
//!   program) go on and refuses every later one with `EPERM`. A program
//!   taken over by the guest cannot run a shell, not even through the ELF
//!   interpreter that Landlock must let it execute.
//! - **no_new_privs**, always (seccomp needs it without `CAP_SYS_ADMIN`).
//!
//! Where a layer cannot be had (no unprivileged user namespaces, no
//! Landlock), the program still starts; the [`JailReport`] names what is
//! missing, and the supervisor refuses to boot when the sandbox asks for
//! `--require-jail`.
//!
//! The launcher stays as the program's parent outside its PID namespace: it
//! answers the exec listener, passes `SIGTERM`, `SIGINT` and `SIGHUP` on,
//! and ends the way the program ended (the same exit code, or killed by the
//! same signal), so that its own parent sees the program's end. The program
//! dies with the launcher (`PR_SET_PDEATHSIG`).

use std::ffi::{CString, OsString};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use sandpen_confine::landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd,
    RulesetAttr, RulesetCreatedAttr, Scope, ABI,
};
use sandpen_confine::LandlockOutcome;
use serde::{Deserialize, Serialize};

/// The environment variable that carries the spec to the launcher.
const SPEC_ENV: &str = "SANDPEN_JAIL_SPEC";
/// How many descriptors [`spawn`] passed (from [`passed_fd`]`(0)` on).
const FDS_ENV: &str = "SANDPEN_JAIL_FDS";
/// The launcher's report goes to this descriptor; the program's own start
/// at `FIRST_PASSED_FD + 1` and on.
const REPORT_FD: RawFd = 3;
/// Where descriptors wait between the spawn and the launcher's exec: above
/// every target, so that moving them into place never overwrites one.
const STAGING_FD_MIN: RawFd = 100;
/// The Landlock ABI this code was written against.
const TARGET_ABI: ABI = ABI::V10;

/// Which layers the launcher applies. The supervisor always asks for all of
/// them; the jail's tests turn single layers off to show each one holds on
/// its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layers {
    pub namespaces: bool,
    pub landlock: bool,
    pub seccomp: bool,
    pub caps: bool,
}

impl Layers {
    pub const ALL: Layers = Layers {
        namespaces: true,
        landlock: true,
        seccomp: true,
        caps: true,
    };
    pub const NONE: Layers = Layers {
        namespaces: false,
        landlock: false,
        seccomp: false,
        caps: false,
    };
}

/// What to run in the jail, and what it may reach.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JailSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Files and folders the program may read (beneath, for a folder).
    /// Paths that do not exist are left out.
    pub read: Vec<PathBuf>,
    /// Files the program may read and write.
    pub write: Vec<PathBuf>,
    /// Device nodes it may read, write and ioctl (`/dev/kvm`).
    pub devices: Vec<PathBuf>,
    /// The UTS namespace's host name.
    pub hostname: String,
    pub layers: Layers,
}

/// What the launcher did, read by [`Launched::report`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JailReport {
    /// The jailed program's pid, as the supervisor's PID namespace sees it.
    pub pid: u32,
    /// The layers applied, for the log: one line.
    pub applied: String,
    /// One entry per layer asked for and not had, with the reason.
    pub missing: Vec<String>,
}

impl JailReport {
    /// One line for `run` and the log: what is missing, or that nothing is.
    pub fn missing_line(&self) -> Option<String> {
        (!self.missing.is_empty()).then(|| {
            format!(
                "QEMU's jail is incomplete on this host: {}",
                self.missing.join("; ")
            )
        })
    }
}

/// One line of the launcher's report pipe.
#[derive(Debug, Serialize, Deserialize)]
enum ReportLine {
    Pid(u32),
    Applied {
        applied: String,
        missing: Vec<String>,
    },
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("jail: the spec: {0}")]
    Spec(#[from] serde_json::Error),
    #[error("jail: {SPEC_ENV} is not set (sandpen __jail is started by the supervisor)")]
    NoSpec,
    #[error("jail: the launcher died before the program started")]
    LauncherDied,
    #[error("jail: dropping capabilities: {0}")]
    Caps(String),
    #[error("jail: seccomp: {0}")]
    Seccomp(String),
    #[error("jail: the argument {0:?} holds a NUL byte")]
    NulByte(OsString),
    #[error("jail: Landlock: {0}")]
    Landlock(#[from] sandpen_confine::landlock::RulesetError),
    #[error("jail: Landlock: {}: {reason}", path.display())]
    LandlockPath { path: PathBuf, reason: String },
    #[error("jail: the launcher ended before it started the program")]
    NoReport,
    /// The launcher's own words (they name the step that failed).
    #[error("{0}")]
    Failed(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Io { what, source }
}

/// A launcher that was spawned: its process and the pipe it reports on.
pub struct Launched {
    pub child: tokio::process::Child,
    report: std::fs::File,
}

impl Launched {
    /// Waits until the program is started (or failed to be), and says how.
    /// No thread is used (the supervisor confines its one thread later).
    pub async fn report(self) -> Result<(tokio::process::Child, JailReport), JailError> {
        use tokio::io::AsyncBufReadExt;
        let Launched { child, report } = self;
        let pipe = tokio::net::unix::pipe::Receiver::from_file(report)
            .map_err(io_err("reading the launcher's report"))?;
        let mut lines = tokio::io::BufReader::new(pipe).lines();
        let mut out = JailReport::default();
        let mut applied = false;
        // Both ends of the launcher write here and then close it (the
        // program's copy closes at its exec): end of file means it runs.
        while let Some(line) = lines
            .next_line()
            .await
            .map_err(io_err("reading the launcher's report"))?
        {
            match serde_json::from_str::<ReportLine>(&line)? {
                ReportLine::Pid(pid) => out.pid = pid,
                ReportLine::Applied {
                    applied: a,
                    missing,
                } => {
                    out.applied = a;
                    out.missing = missing;
                    applied = true;
                }
                ReportLine::Failed(why) => return Err(JailError::Failed(why)),
            }
        }
        if !applied || out.pid == 0 {
            return Err(JailError::NoReport);
        }
        Ok((child, out))
    }
}

/// `SANDPEN_REQUIRE_JAIL=1`: every sandbox refuses to boot without the
/// whole jail, as if created with `--require-jail`.
pub fn required_by_env() -> bool {
    std::env::var("SANDPEN_REQUIRE_JAIL").is_ok_and(|v| v == "1" || v == "true")
}

/// What QEMU reads besides the files of its sandbox: its own libraries,
/// modules and firmware (beneath `/usr`, and `/lib*` where they are not
/// links to it), the dynamic linker's cache, the time zone, randomness, a
/// few `/proc` and `/sys` files it sizes itself by.
const QEMU_READS: &[&str] = &[
    "/usr",
    "/lib",
    "/lib64",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/dev/urandom",
    "/proc/self",
    "/proc/filesystems",
    "/sys/devices/system/cpu",
    "/sys/devices/system/node",
];

impl JailSpec {
    /// QEMU's jail: `read` holds the kernel, initramfs and base image, and
    /// the only file it writes is `disk`, the sandbox's overlay. `/dev/kvm`
    /// is added for KVM and is the only device.
    pub fn for_qemu(
        qemu: &Path,
        args: Vec<OsString>,
        name: &str,
        read: &[PathBuf],
        disk: &Path,
        accel: sandpen_vm::Accel,
    ) -> JailSpec {
        let mut reads: Vec<PathBuf> = QEMU_READS.iter().map(PathBuf::from).collect();
        // A QEMU installed elsewhere (`/opt/qemu/bin/...`) keeps its
        // modules and firmware beside it.
        if let Ok(real) = std::fs::canonicalize(qemu) {
            if let Some(prefix) = real.parent().and_then(Path::parent) {
                if prefix != Path::new("/") {
                    reads.push(prefix.to_path_buf());
                }
            }
        }
        reads.extend(read.iter().cloned());
        JailSpec {
            program: qemu.to_path_buf(),
            args,
            read: reads,
            write: vec![disk.to_path_buf(), PathBuf::from("/dev/null")],
            devices: if accel == sandpen_vm::Accel::Kvm {
                vec![PathBuf::from("/dev/kvm")]
            } else {
                vec![]
            },
            hostname: format!("sandpen-{name}"),
            layers: Layers::ALL,
        }
    }

    /// The launcher's command: `launcher` (the `sandpen` binary) with this
    /// spec. The caller sets stdio and starts it with [`spawn`], which
    /// passes the program its descriptors.
    pub fn command(&self, launcher: &Path) -> Result<tokio::process::Command, JailError> {
        let mut cmd = tokio::process::Command::new(launcher);
        cmd.arg("__jail")
            .env(SPEC_ENV, serde_json::to_string(self)?);
        Ok(cmd)
    }
}

/// The descriptor number the `index`th passed descriptor gets in the program.
pub fn passed_fd(index: usize) -> RawFd {
    REPORT_FD + 1 + index as RawFd
}

/// Spawns the launcher built by [`JailSpec::command`], moving the report
/// pipe to descriptor 3 and `fds` to 4, 5, … (see [`passed_fd`]) in the
/// child; the program's arguments name them so.
pub fn spawn(mut cmd: tokio::process::Command, fds: Vec<OwnedFd>) -> Result<Launched, JailError> {
    let (report_read, report_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| io_err("making the report pipe")(e.into()))?;
    // Staged copies above every target (close-on-exec: they vanish at the
    // launcher's exec once moved into place).
    let mut staged: Vec<OwnedFd> = Vec::with_capacity(fds.len() + 1);
    for fd in std::iter::once(&report_write).chain(fds.iter()) {
        // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor (or -1) and
        // touches no memory.
        let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, STAGING_FD_MIN) };
        if high < 0 {
            return Err(io_err("staging a descriptor")(
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `high` is a new descriptor nothing else owns.
        staged.push(unsafe { OwnedFd::from_raw_fd(high) });
    }
    let raw: Vec<RawFd> = staged.iter().map(|f| f.as_raw_fd()).collect();
    cmd.env(FDS_ENV, fds.len().to_string());
    // SAFETY: the closure only calls dup2, which is async-signal-safe, on
    // descriptors that stay open until after the spawn (`staged` lives
    // past it); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for (i, fd) in raw.iter().enumerate() {
                if libc::dup2(*fd, REPORT_FD + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(io_err("starting the jail launcher"))?;
    drop(staged);
    drop(fds);
    drop(report_write);
    Ok(Launched {
        child,
        report: std::fs::File::from(report_read),
    })
}

// ------------------------------------------------------------ the launcher

/// Entry point of `sandpen __jail`: applies the spec in the environment and
/// runs the program. Returns only on failure (the program's own end is the
/// launcher's exit).
pub fn launcher_main() -> i32 {
    // SAFETY: REPORT_FD was put there by `spawn`, for this process alone.
    let mut report = unsafe { std::fs::File::from_raw_fd(REPORT_FD) };
    // dup2 made it inheritable; the program must not keep it, or the
    // supervisor would never see the report end.
    // SAFETY: F_SETFD on a descriptor this process owns.
    unsafe { libc::fcntl(REPORT_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    let e = match launch(&mut report) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    let _ = send(&mut report, &ReportLine::Failed(e.to_string()));
    eprintln!("sandpen: {e}");
    125
}

enum Never {}

fn send(report: &mut std::fs::File, line: &ReportLine) -> std::io::Result<()> {
    let mut text = serde_json::to_string(line).map_err(std::io::Error::other)?;
    text.push('\n');
    // One write, below PIPE_BUF: lines of the two processes never mix.
    report.write_all(text.as_bytes())
}

fn launch(report: &mut std::fs::File) -> Result<Never, JailError> {
    let spec: JailSpec =
        serde_json::from_str(&std::env::var(SPEC_ENV).map_err(|_| JailError::NoSpec)?)?;
    std::env::remove_var(SPEC_ENV);
    let passed: RawFd = std::env::var(FDS_ENV)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    std::env::remove_var(FDS_ENV);
    let mut missing = Vec::new();
    let mut applied = Vec::new();
    if spec.layers.namespaces {
        namespaces(&mut applied, &mut missing);
    }
    // The exec listener travels from the program to the launcher over this.
    let (parent_sock, child_sock) = if spec.layers.seccomp {
        let (a, b) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| io_err("making the listener's socket pair")(e.into()))?;
        (Some(a), Some(b))
    } else {
        (None, None)
    };
    let in_pid_namespace = applied.iter().any(|a| a == "pid");
    let launcher_pid = std::process::id() as i32;
    // SAFETY: the launcher has one thread (it was just exec'd and started
    // none), so the child may do anything after fork.
    match unsafe { nix::unistd::fork() }.map_err(|e| io_err("fork")(e.into()))? {
        nix::unistd::ForkResult::Child => {
            // SAFETY: prctl(PR_SET_PDEATHSIG) takes integers only.
            if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
                return Err(io_err("PR_SET_PDEATHSIG")(std::io::Error::last_os_error()));
            }
            drop(parent_sock);
            // In a new PID namespace the parent is outside it (getppid() is
            // 0); otherwise a launcher that already died is noticed here.
            if !in_pid_namespace && nix::unistd::getppid().as_raw() != launcher_pid {
                return Err(JailError::LauncherDied);
            }
            match program(&spec, child_sock, report, applied, missing) {
                Ok(never) => match never {},
                Err(e) => {
                    let _ = send(report, &ReportLine::Failed(e.to_string()));
                    eprintln!("sandpen: {e}");
                    // SAFETY: _exit ends the process without running
                    // anything else (no destructors of the parent's state).
                    unsafe { libc::_exit(127) }
                }
            }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(child_sock);
            // The program's descriptors are its own: a file server must see
            // its connection end when the program does, not when the
            // launcher does.
            for fd in passed_fd(0)..passed_fd(0) + passed {
                // SAFETY: these descriptors were passed for the program;
                // nothing in the launcher uses them.
                unsafe { libc::close(fd) };
            }
            let _ = send(report, &ReportLine::Pid(child.as_raw() as u32));
            // The launcher's copy must close, or the supervisor would wait
            // for its end of file as long as the launcher lives.
            *report = std::fs::File::open("/dev/null").map_err(io_err("opening /dev/null"))?;
            confine_parent();
            reap(child, parent_sock)
        }
    }
}

fn namespaces(applied: &mut Vec<String>, missing: &mut Vec<String>) {
    use nix::sched::{unshare, CloneFlags};
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    match unshare(CloneFlags::CLONE_NEWUSER) {
        Ok(()) => {
            // An unprivileged process must refuse setgroups before it may
            // write its gid map (user_namespaces(7)).
            let maps = std::fs::write("/proc/self/setgroups", "deny")
                .or_else(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .and_then(|()| std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1\n")))
                .and_then(|()| std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1\n")));
            match maps {
                Ok(()) => applied.push("user".to_string()),
                Err(e) => missing.push(format!("user namespace id maps ({e})")),
            }
        }
        Err(e) => missing.push(format!(
            "user namespace ({}{})",
            e.desc(),
            if uid == 0 {
                ""
            } else {
                "; unprivileged user namespaces are off on this host"
            }
        )),
    }
    let each = [
        (CloneFlags::CLONE_NEWNS, "mount"),
        (CloneFlags::CLONE_NEWPID, "pid"),
        (CloneFlags::CLONE_NEWIPC, "ipc"),
        (CloneFlags::CLONE_NEWUTS, "uts"),
        (CloneFlags::CLONE_NEWNET, "network"),
    ];
    for (flag, name) in each {
        match unshare(flag) {
            Ok(()) => applied.push(name.to_string()),
            Err(e) => missing.push(format!("{name} namespace ({})", e.desc())),
        }
    }
}

/// The child: finishes the jail around itself and executes the program.
fn program(
    spec: &JailSpec,
    listener_sock: Option<OwnedFd>,
    report: &mut std::fs::File,
    applied: Vec<String>,
    mut missing: Vec<String>,
) -> Result<Never, JailError> {
    let mut ns_line = if applied.is_empty() {
        String::new()
    } else {
        format!("namespaces {}", applied.join(","))
    };
    if applied.iter().any(|a| a == "mount") {
        // Nothing mounted in here reaches the host, and the other way round.
        if let Err(e) = nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
            None::<&str>,
        ) {
            missing.push(format!("private mount propagation ({})", e.desc()));
        }
    }
    if applied.iter().any(|a| a == "uts") {
        let _ = nix::unistd::sethostname(&spec.hostname);
    }
    let mut lines = Vec::new();
    if !ns_line.is_empty() {
        lines.push(std::mem::take(&mut ns_line));
    }
    sandpen_confine::set_no_new_privs().map_err(io_err("no_new_privs"))?;
    lines.push("no_new_privs".into());
    if spec.layers.landlock {
        match landlock(spec) {
            Ok(outcome @ LandlockOutcome::Enforced { .. }) => lines.push(outcome.to_string()),
            Ok(LandlockOutcome::NotEnforced(why)) => missing.push(format!("Landlock ({why})")),
            Err(e) => return Err(e),
        }
    }
    if spec.layers.caps {
        sandpen_confine::drop_caps(&[]).map_err(JailError::Caps)?;
        lines.push("no capabilities".into());
    }
    if let (true, Some(sock)) = (spec.layers.seccomp, listener_sock) {
        let program = sandpen_confine::deny_list_program(
            std::env::consts::ARCH,
            &denied_syscalls(),
            &[libc::SYS_execve, libc::SYS_execveat],
        )
        .map_err(JailError::Seccomp)?;
        match sandpen_confine::install_with_listener(&program) {
            Ok(listener) => {
                send_fd(&sock, &listener)?;
                lines.push("seccomp deny list, one exec".into());
            }
            Err(e) => missing.push(format!("seccomp ({e})")),
        }
    }
    let _ = send(
        report,
        &ReportLine::Applied {
            applied: lines.join("; "),
            missing,
        },
    );
    exec(spec)
}

fn exec(spec: &JailSpec) -> Result<Never, JailError> {
    let cstr = |s: &std::ffi::OsStr| {
        CString::new(s.as_bytes()).map_err(|_| JailError::NulByte(s.to_os_string()))
    };
    let program = cstr(spec.program.as_os_str())?;
    let mut argv = vec![program.clone()];
    for a in &spec.args {
        argv.push(cstr(a)?);
    }
    let err = nix::unistd::execv(&program, &argv).unwrap_err();
    Err(io_err(format!("executing {}", spec.program.display()))(
        err.into(),
    ))
}

/// The launcher's own half, once the program is forked: from here on it only
/// polls, receives the exec listener, answers it, passes signals on to its
/// child and waits for it. So it gets no_new_privs, a Landlock domain that
/// allows no file and no TCP access at all, and a seccomp deny list (no
/// exec, no new sockets, nothing of [`sandpen_confine::common_denied_syscalls`]).
/// Signals are not scoped: the program sits in a Landlock domain of its own,
/// which a scoped launcher could no longer signal. Best effort: a layer this
/// kernel lacks leaves the others, and the program's own jail, in place
/// (docs/architecture.md, "QEMU's jail").
fn confine_parent() {
    let _ = sandpen_confine::set_no_new_privs();
    let landlocked = (|| -> Result<(), sandpen_confine::landlock::RulesetError> {
        use sandpen_confine::landlock::Ruleset;
        Ruleset::default()
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(AccessFs::from_all(TARGET_ABI))?
            .handle_access(AccessNet::from_all(TARGET_ABI))?
            .scope(Scope::AbstractUnixSocket)?
            .create()?
            .restrict_self()?;
        Ok(())
    })();
    let mut denied = vec![
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_socket,
        libc::SYS_socketpair,
        libc::SYS_connect,
        libc::SYS_bind,
        libc::SYS_listen,
    ];
    denied.extend(sandpen_confine::common_denied_syscalls());
    let filtered = sandpen_confine::deny_list_program(std::env::consts::ARCH, &denied, &[])
        .and_then(|program| sandpen_confine::install(&program));
    if landlocked.is_err() || filtered.is_err() {
        eprintln!(
            "sandpen: the jail launcher is confined only in part (landlock: {:?}, seccomp: {:?})",
            landlocked.err().map(|e| e.to_string()),
            filtered.err()
        );
    }
}

/// What the jailed program may not call (besides the exec gate).
fn denied_syscalls() -> Vec<i64> {
    let mut calls = vec![
        // Its sockets are passed in: it makes, binds and connects none.
        // (`listen` stays: QEMU calls it again on a passed listener, and
        // without `socket` and `bind` there is nothing else to listen on.)
        libc::SYS_socket,
        libc::SYS_connect,
        libc::SYS_bind,
    ];
    calls.extend(sandpen_confine::common_denied_syscalls());
    calls
}

fn send_fd(sock: &OwnedFd, fd: &OwnedFd) -> Result<(), JailError> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let fds = [fd.as_raw_fd()];
    let iov = [std::io::IoSlice::new(b"L")];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| io_err("passing the exec listener")(e.into()))?;
    Ok(())
}

fn recv_fd(sock: &OwnedFd) -> Option<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .ok()?;
    for c in msg.cmsgs().ok()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(fd) = fds.first() {
                // SAFETY: the kernel just installed this descriptor for us.
                return Some(unsafe { OwnedFd::from_raw_fd(*fd) });
            }
        }
    }
    None
}

fn landlock(spec: &JailSpec) -> Result<LandlockOutcome, JailError> {
    use sandpen_confine::landlock::Ruleset;
    let err = JailError::Landlock;
    let mut created = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(TARGET_ABI))
        .map_err(err)?
        .handle_access(AccessNet::from_all(TARGET_ABI))
        .map_err(err)?
        .scope(Scope::from_all(TARGET_ABI))
        .map_err(err)?
        .create()
        .map_err(err)?;
    let file_only = AccessFs::from_file(TARGET_ABI);
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    let rw = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate;
    let device = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev;
    let program = std::fs::canonicalize(&spec.program)
        .map_err(io_err(format!("finding {}", spec.program.display())))?;
    let exec = AccessFs::ReadFile | AccessFs::Execute;
    let mut wanted: Vec<(PathBuf, BitFlags<AccessFs>, bool)> = vec![(program.clone(), exec, true)];
    if let Some(interp) = elf_interpreter(&program) {
        wanted.push((interp, exec, true));
    }
    wanted.extend(spec.read.iter().map(|p| (p.clone(), read, false)));
    wanted.extend(spec.write.iter().map(|p| (p.clone(), rw, true)));
    wanted.extend(spec.devices.iter().map(|p| (p.clone(), device, true)));
    for (path, access, required) in wanted {
        let fd = match PathFd::new(&path) {
            Ok(fd) => fd,
            // An optional path this host does not have.
            Err(_) if !required => continue,
            Err(e) => {
                return Err(JailError::LandlockPath {
                    path,
                    reason: e.to_string(),
                })
            }
        };
        let is_dir = std::fs::metadata(&path)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        let access = if is_dir { access } else { access & file_only };
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(err)?;
    }
    let status = created.restrict_self().map_err(err)?;
    Ok(sandpen_confine::landlock_outcome(
        status,
        "it enforced none of the rules",
    ))
}

/// The ELF interpreter (`PT_INTERP`) a dynamically linked program names:
/// the kernel opens it for execution too, so Landlock must allow it. Reads
/// only the header, the program headers and the name, not the whole
/// program (QEMU is tens of MiB, and this runs at every start).
pub fn elf_interpreter(program: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(program).ok()?;
    let read_at = |off: usize, len: usize| {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, u64::try_from(off).ok()?)
            .ok()?;
        Some(buf)
    };
    parse_interp(read_at).map(|p| std::fs::canonicalize(&p).unwrap_or(p))
}

/// `PT_INTERP` of a 64-bit little-endian ELF file, if it has one; `read_at`
/// gives `len` bytes at an offset, or `None` past the end.
fn parse_interp(read_at: impl Fn(usize, usize) -> Option<Vec<u8>>) -> Option<PathBuf> {
    // The 64-byte ELF64 header; offsets in it come from the file, so every
    // sum below is checked.
    let header = read_at(0, 64)?;
    // ELFCLASS64, ELFDATA2LSB.
    if header[0..4] != *b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return None;
    }
    let le = |b: &[u8], o: usize, n: usize| -> Option<u64> {
        let bytes = b.get(o..o.checked_add(n)?)?;
        Some(
            bytes
                .iter()
                .rev()
                .fold(0u64, |acc, x| (acc << 8) | u64::from(*x)),
        )
    };
    let phoff = usize::try_from(le(&header, 0x20, 8)?).ok()?;
    let phentsize = usize::try_from(le(&header, 0x36, 2)?).ok()?;
    let phnum = usize::try_from(le(&header, 0x38, 2)?).ok()?;
    // An ELF64 program header is 56 bytes: p_type at 0, p_offset at 8,
    // p_filesz at 32.
    if phentsize < 56 {
        return None;
    }
    for i in 0..phnum {
        let ph = read_at(phoff.checked_add(i.checked_mul(phentsize)?)?, 56)?;
        // PT_INTERP = 3.
        if le(&ph, 0, 4)? == 3 {
            let off = usize::try_from(le(&ph, 8, 8)?).ok()?;
            // A path, so at most PATH_MAX.
            let size = usize::try_from(le(&ph, 32, 8)?).ok()?.min(4096);
            let raw = read_at(off, size)?;
            let raw = raw.split(|c| *c == 0).next()?;
            return Some(PathBuf::from(std::ffi::OsStr::from_bytes(raw)));
        }
    }
    None
}

// ------------------------------------------------------ the launcher's wait

/// The program's pid, for the signal handler.
static PROGRAM_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = PROGRAM_PID.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// The launcher after the fork: answers the exec listener, passes signals
/// on, and ends the way the program ends.
fn reap(child: nix::unistd::Pid, listener_sock: Option<OwnedFd>) -> Result<Never, JailError> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    use nix::sys::wait::{waitpid, WaitStatus};
    PROGRAM_PID.store(child.as_raw(), Ordering::Relaxed);
    let handler = SigAction::new(
        SigHandler::Handler(forward),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: `forward` only loads an atomic and calls kill.
        let _ = unsafe { sigaction(sig, &handler) };
    }
    // One thread: a process that made a new PID namespace for its children
    // can start no thread (clone(2), EINVAL). So one poll loop waits for
    // the listener to arrive, for exec notifications, and for the end.
    // SAFETY: pidfd_open takes integers and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.as_raw(), 0) };
    if pidfd < 0 {
        return Err(io_err("pidfd_open")(std::io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    let mut sock = listener_sock;
    let mut listener: Option<OwnedFd> = None;
    let mut execs_allowed = 1u32;
    loop {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let mut fds = vec![PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        if let Some(s) = &sock {
            fds.push(PollFd::new(s.as_fd(), PollFlags::POLLIN));
        }
        if let Some(l) = &listener {
            fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io_err("poll")(e.into())),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if ready[0] {
            break;
        }
        let mut next = 1;
        if sock.is_some() {
            if ready[next] {
                listener = sock.as_ref().and_then(recv_fd);
                sock = None;
            }
            next += 1;
        }
        if let (Some(l), true) = (&listener, ready.get(next).copied().unwrap_or(false)) {
            let answered = sandpen_confine::answer_one(l, |_nr| {
                if execs_allowed > 0 {
                    execs_allowed -= 1;
                    sandpen_confine::Verdict::Continue
                } else {
                    sandpen_confine::Verdict::Fail(libc::EPERM)
                }
            });
            if answered.is_err() {
                // A broken listener answers nothing: every later exec
                // waits for ever. Close it, so that they fail instead.
                listener = None;
            }
        }
    }
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => std::process::exit(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                // End the same way: default action, then the signal itself.
                // SAFETY: resetting a disposition and raising a signal.
                unsafe {
                    libc::signal(sig as i32, libc::SIG_DFL);
                    libc::raise(sig as i32);
                }
                std::process::exit(128 + sig as i32);
            }
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io_err("waiting for the program")(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_memory(b: &[u8]) -> impl Fn(usize, usize) -> Option<Vec<u8>> + '_ {
        move |off, len| b.get(off..off.checked_add(len)?).map(<[u8]>::to_vec)
    }

    #[test]
    fn finds_the_interpreter_of_a_dynamic_program() {
        let exe = std::env::current_exe().unwrap();
        let interp = elf_interpreter(&exe).expect("test binaries are dynamically linked");
        assert!(interp.to_string_lossy().contains("ld-linux"), "{interp:?}");
    }

    #[test]
    fn garbage_has_no_interpreter() {
        assert_eq!(parse_interp(in_memory(b"")), None);
        assert_eq!(parse_interp(in_memory(b"\x7fELF\x02\x01")), None);
        let mut b = vec![0u8; 128];
        b[..6].copy_from_slice(b"\x7fELF\x02\x01");
        // A program header table far beyond the end.
        b[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        b[0x38] = 10;
        b[0x36] = 56;
        assert_eq!(parse_interp(in_memory(&b)), None);
    }

    #[test]
    fn the_missing_line_lists_every_missing_layer() {
        let r = JailReport {
            pid: 1,
            applied: String::new(),
            missing: vec!["user namespace (EPERM)".into(), "Landlock (none)".into()],
        };
        assert_eq!(
            r.missing_line().unwrap(),
            "QEMU's jail is incomplete on this host: user namespace (EPERM); Landlock (none)"
        );
        assert!(JailReport::default().missing_line().is_none());
    }
}
