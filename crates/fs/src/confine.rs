//! The file server confines itself before it answers the first request.
//!
//! The server parses requests a hostile guest kernel writes, so a bug in it
//! (or in `fuse-backend-rs`, `vhost-user-backend`, `vm-memory`) is a way
//! from the guest onto the host. The policy layer keeps every path beneath
//! the share's root; this module makes the kernel keep the *process* there
//! too, so such a bug gains little:
//!
//! - **`PR_SET_NO_NEW_PRIVS`**: nothing it could run gains privileges.
//! - **Landlock** (ABI negotiated, best effort): file access only beneath
//!   the share's root (read-write, or read-only for a `:ro` mount) and the
//!   folders named in [`Confinement::state_dirs`] (the flow label folder),
//!   no execution anywhere, no device nodes, no ioctl on devices, no TCP
//!   (UDP and connecting to UNIX sockets by path too, on kernels that can
//!   restrict them), no abstract UNIX sockets or signals outside the server.
//!   Everything the server needs elsewhere is opened before: the log files,
//!   the vhost-user socket, `/proc/self/fd` (the passthrough layer reopens
//!   its `O_PATH` descriptors through it, and Landlock checks such a reopen
//!   against the file it lands on, which is inside the share).
//! - **seccomp** (a deny list, `EPERM`): no new sockets and no `connect`
//!   (Landlock before ABI 9 does not cover UNIX sockets by path: the QMP
//!   socket, an ssh agent, docker.sock), no `execve`, no `ptrace`, no
//!   `io_uring` (its operations bypass seccomp), no `bpf`,
//!   `perf_event_open`, `userfaultfd`, keyrings, mounts, namespaces, modules,
//!   `open_by_handle_at` and other calls the server never makes. A deny list
//!   rather than an allow list: the server's calls come from several crates
//!   and glibc and differ by version; a call it does make that an allow list
//!   forgot would fail one guest operation in a rare path. Only the x86-64
//!   ABI is allowed (32-bit and x32 calls are refused).
//! - **Capabilities** (when the server runs as root): it keeps only what
//!   serving files as other users takes (`CHOWN`, `DAC_OVERRIDE`,
//!   `DAC_READ_SEARCH`, `FOWNER`, `FSETID`, `SETUID`, `SETGID`); no
//!   `SYS_ADMIN`, `SYS_MODULE`, `SYS_PTRACE`, `NET_*`, `SYS_RESOURCE` (so the
//!   guest cannot eat a file system's space reserved for root), `MKNOD`, …
//!
//! Landlock and seccomp apply to the calling thread and the threads it
//! starts afterwards (all threads at once needs Landlock ABI 8), so
//! [`confine`] refuses to run while the process has more than one thread.
//! On a kernel without Landlock or seccomp the server still runs (with the
//! policy layer as its only fence) and says so once at warning level.

use std::io;
use std::path::{Path, PathBuf};

use sandpen_confine::landlock::{
    self, Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd,
    RestrictSelfAttr, RulesetAttr, RulesetCreatedAttr, Scope, ABI,
};
use sandpen_confine::Capability;

/// What the server may reach once it is confined.
#[derive(Debug, Clone)]
pub struct Confinement {
    /// The share's root (canonical: Landlock binds the rule to the folder
    /// this path names when the rule is made).
    pub root: PathBuf,
    /// Whether the server may change files beneath the root (`false` for a
    /// `:ro` mount).
    pub writable: bool,
    /// Folders where the server creates, replaces and removes its own files
    /// after the start: the flow label folder (`flow.json` is replaced by
    /// rename, under `flow.lock`).
    pub state_dirs: Vec<PathBuf>,
}

pub use sandpen_confine::{kernel_landlock_abi, no_new_privs, LandlockOutcome};

/// What [`confine`] did.
#[derive(Debug, Clone)]
pub struct Confined {
    pub no_new_privs: bool,
    pub landlock: LandlockOutcome,
    /// `Err` holds why the filter is not installed.
    pub seccomp: Result<(), String>,
    /// The capabilities kept (empty for an ordinary user, who has none).
    pub caps: Vec<String>,
}

impl Confined {
    /// One line for the log.
    pub fn summary(&self) -> String {
        let landlock = self.landlock.to_string();
        let seccomp = match &self.seccomp {
            Ok(()) => "seccomp deny list".to_string(),
            Err(why) => format!("no seccomp ({why})"),
        };
        let caps = if self.caps.is_empty() {
            "no capabilities".to_string()
        } else {
            format!("capabilities {}", self.caps.join(","))
        };
        format!(
            "{landlock}; {seccomp}; no_new_privs {}; {caps}",
            if self.no_new_privs { "on" } else { "off" }
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("confining the file server: it has {0} threads; it must confine itself before it starts any")]
    Threads(usize),
    #[error("confining the file server: setting no_new_privs: {0}")]
    NoNewPrivs(io::Error),
    #[error("confining the file server: {} cannot be opened for its Landlock rule: {source}", path.display())]
    Path { path: PathBuf, source: io::Error },
    #[error("confining the file server: Landlock: {0}")]
    Landlock(#[from] landlock::RulesetError),
    #[error("confining the file server: capabilities: {0}")]
    Caps(String),
    #[error("confining the file server: seccomp: {0}")]
    Seccomp(String),
}

/// The Landlock ABI this code was written against: every right up to it is
/// asked for, and the kernel's own ABI decides what is enforced.
const TARGET_ABI: ABI = ABI::V10;

/// The rights beneath the share's root.
pub fn share_access(writable: bool) -> BitFlags<AccessFs> {
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    if !writable {
        return read;
    }
    // Not: Execute (the server runs nothing), MakeChar and MakeBlock (the
    // policy layer refuses device nodes; a rename whiteout is one),
    // IoctlDev (no devices), ResolveUnix (it connects to nothing).
    read | AccessFs::WriteFile
        | AccessFs::Truncate
        | AccessFs::MakeReg
        | AccessFs::MakeDir
        | AccessFs::MakeSym
        | AccessFs::MakeFifo
        | AccessFs::MakeSock
        | AccessFs::RemoveFile
        | AccessFs::RemoveDir
        | AccessFs::Refer
}

/// The rights in a state folder: write a temporary file, rename it over the
/// old one (same folder, so no `Refer`), take the lock, and open the folder
/// itself to fsync the rename (`ReadDir`: the listing of the label folder
/// tells nothing).
pub fn state_access() -> BitFlags<AccessFs> {
    AccessFs::ReadFile
        | AccessFs::ReadDir
        | AccessFs::WriteFile
        | AccessFs::Truncate
        | AccessFs::MakeReg
        | AccessFs::RemoveFile
}

/// Confines the calling process (see the module's documentation). Call it
/// once everything outside the share is open and before any thread starts.
pub fn confine(c: &Confinement) -> Result<Confined, ConfineError> {
    let threads = sandpen_confine::thread_count();
    if threads > 1 {
        return Err(ConfineError::Threads(threads));
    }
    let caps = sandpen_confine::drop_caps(&KEEP_CAPS).map_err(ConfineError::Caps)?;
    sandpen_confine::set_no_new_privs().map_err(ConfineError::NoNewPrivs)?;
    let landlock = landlock(c)?;
    let seccomp = seccomp();
    Ok(Confined {
        no_new_privs: no_new_privs(),
        landlock,
        seccomp,
        caps,
    })
}

fn path_fd(path: &Path) -> Result<PathFd, ConfineError> {
    PathFd::new(path).map_err(|e| ConfineError::Path {
        path: path.to_path_buf(),
        source: io::Error::other(e.to_string()),
    })
}

fn landlock(c: &Confinement) -> Result<LandlockOutcome, ConfineError> {
    let mut ruleset = landlock::Ruleset::default();
    if c.writable {
        // Before ABI 2 Landlock refuses every rename and link across
        // folders: the guest could not `mv a/x b/`. Rather no Landlock than
        // a share that breaks.
        ruleset = ruleset
            .set_compatibility(CompatLevel::SoftRequirement)
            .handle_access(AccessFs::Refer)?;
    }
    let mut created = ruleset
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(TARGET_ABI))?
        .handle_access(AccessNet::from_all(TARGET_ABI))?
        .scope(Scope::from_all(TARGET_ABI))?
        .create()?
        .add_rule(PathBeneath::new(
            path_fd(&c.root)?,
            share_access(c.writable),
        ))?;
    for dir in &c.state_dirs {
        created = created.add_rule(PathBeneath::new(path_fd(dir)?, state_access()))?;
    }
    // All threads at once where the kernel can (ABI 8); there is only one
    // thread anyway (checked above).
    let status = created.all_threads(true)?.restrict_self()?;
    Ok(sandpen_confine::landlock_outcome(
        status,
        "the kernel's Landlock cannot rename across folders",
    ))
}

/// What a file server as root needs to act as other users on their files.
const KEEP_CAPS: [Capability; 7] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETUID,
    Capability::CAP_SETGID,
];

/// The calls the server never makes after it is confined.
fn denied_syscalls() -> Vec<i64> {
    let mut calls = vec![
        // New sockets and connections: the vhost-user connection is
        // accepted on a listener made before.
        libc::SYS_socket,
        libc::SYS_connect,
        libc::SYS_bind,
        libc::SYS_listen,
        // Running anything.
        libc::SYS_execve,
        libc::SYS_execveat,
    ];
    calls.extend(sandpen_confine::common_denied_syscalls());
    calls
}

/// The deny list as a BPF program for `arch` (see [`seccomp`]).
pub fn seccomp_program(arch: &str) -> Result<sandpen_confine::seccompiler::BpfProgram, String> {
    sandpen_confine::deny_list_program(arch, &denied_syscalls(), &[])
}

/// Installs the deny list on every thread; `Err` says why it is not.
fn seccomp() -> Result<(), String> {
    sandpen_confine::install(&seccomp_program(std::env::consts::ARCH)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_only_share_gets_no_right_to_change_anything() {
        let ro = share_access(false);
        assert_eq!(ro, AccessFs::ReadFile | AccessFs::ReadDir);
        let rw = share_access(true);
        for never in [
            AccessFs::Execute,
            AccessFs::MakeChar,
            AccessFs::MakeBlock,
            AccessFs::IoctlDev,
            AccessFs::ResolveUnix,
        ] {
            assert!(!rw.contains(never), "{never:?}");
        }
        assert!(!state_access().contains(AccessFs::Refer));
        assert!(!state_access().contains(AccessFs::MakeDir));
    }

    #[test]
    fn the_summary_names_the_abi() {
        let c = Confined {
            no_new_privs: true,
            landlock: LandlockOutcome::Enforced {
                abi: 7,
                full: false,
            },
            seccomp: Ok(()),
            caps: vec![],
        };
        let s = c.summary();
        assert!(s.starts_with("landlock ABI 7 "), "{s}");
        assert!(
            s.contains("seccomp deny list") && s.contains("no_new_privs on"),
            "{s}"
        );
    }
}
