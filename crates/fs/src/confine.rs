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

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, LandlockStatus, PathBeneath,
    PathFd, RestrictSelfAttr, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

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

/// Whether and how Landlock was enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LandlockOutcome {
    /// Enforced with the kernel's ABI `abi`; `full` when every right this
    /// module asks for exists at that ABI (a newer kernel than this code).
    Enforced { abi: i32, full: bool },
    /// Not enforced, and why.
    NotEnforced(String),
}

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
        let landlock = match &self.landlock {
            LandlockOutcome::Enforced { abi, full: true } => format!("landlock ABI {abi}"),
            LandlockOutcome::Enforced { abi, full: false } => {
                format!("landlock ABI {abi} (the rights of later ABIs are not on this kernel)")
            }
            LandlockOutcome::NotEnforced(why) => format!("no landlock ({why})"),
        };
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
    let threads = thread_count();
    if threads > 1 {
        return Err(ConfineError::Threads(threads));
    }
    let caps = drop_caps()?;
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes integers only and touches no
    // memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(ConfineError::NoNewPrivs(io::Error::last_os_error()));
    }
    let landlock = landlock(c)?;
    let seccomp = seccomp();
    Ok(Confined {
        no_new_privs: no_new_privs(),
        landlock,
        seccomp,
        caps,
    })
}

/// The running kernel's Landlock ABI (0: none, or not enabled). For
/// `sandpen doctor`; [`confine`] negotiates through the `landlock` crate.
pub fn kernel_landlock_abi() -> i64 {
    // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    // reads and writes no memory; it returns the ABI or -1.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    v.max(0)
}

/// Whether `PR_SET_NO_NEW_PRIVS` is set for the calling thread.
pub fn no_new_privs() -> bool {
    // SAFETY: prctl(PR_GET_NO_NEW_PRIVS) takes integers only.
    unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1 }
}

/// The process's threads (1 if `/proc` cannot tell).
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(1)
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
    let abi = match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => effective_abi as i32,
        LandlockStatus::NotEnabled => {
            return Ok(LandlockOutcome::NotEnforced(
                "Landlock is built into the kernel but not enabled (lsm= on its command line)"
                    .into(),
            ))
        }
        LandlockStatus::NotImplemented => {
            return Ok(LandlockOutcome::NotEnforced(
                "the kernel has no Landlock".into(),
            ))
        }
    };
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockOutcome::Enforced { abi, full: true },
        RulesetStatus::PartiallyEnforced => LandlockOutcome::Enforced { abi, full: false },
        RulesetStatus::NotEnforced => LandlockOutcome::NotEnforced(format!(
            "the kernel's Landlock ABI {abi} cannot rename across folders"
        )),
    })
}

/// What a file server as root needs to act as other users on their files.
const KEEP_CAPS: [caps::Capability; 7] = [
    caps::Capability::CAP_CHOWN,
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_DAC_READ_SEARCH,
    caps::Capability::CAP_FOWNER,
    caps::Capability::CAP_FSETID,
    caps::Capability::CAP_SETUID,
    caps::Capability::CAP_SETGID,
];

/// Keeps only [`KEEP_CAPS`] (of those the process has) in the permitted and
/// effective sets; clears the inheritable and ambient sets; empties the
/// bounding set where allowed. Returns the names of the kept ones.
fn drop_caps() -> Result<Vec<String>, ConfineError> {
    use caps::CapSet;
    let e = |what: &str, err: caps::errors::CapsError| ConfineError::Caps(format!("{what}: {err}"));
    let permitted = caps::read(None, CapSet::Permitted).map_err(|x| e("reading", x))?;
    let keep: caps::CapsHashSet = KEEP_CAPS
        .iter()
        .copied()
        .filter(|c| permitted.contains(c))
        .collect();
    if caps::has_cap(None, CapSet::Effective, caps::Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in caps::all() {
            // Only exec would use the bounding set, and exec is refused; a
            // failure here changes nothing that matters.
            let _ = caps::drop(None, CapSet::Bounding, cap);
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(|x| e("clearing the ambient set", x))?;
    caps::clear(None, CapSet::Inheritable).map_err(|x| e("clearing the inheritable set", x))?;
    let effective = caps::read(None, CapSet::Effective).map_err(|x| e("reading", x))?;
    let effective: caps::CapsHashSet = effective.intersection(&keep).copied().collect();
    caps::set(None, CapSet::Effective, &effective).map_err(|x| e("the effective set", x))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(|x| e("the permitted set", x))?;
    let mut names: Vec<String> = keep.iter().map(|c| c.to_string()).collect();
    names.sort();
    Ok(names)
}

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
        // Other processes.
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_pidfd_getfd,
        libc::SYS_kcmp,
        // Kernel attack surface it has no use for.
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_fanotify_init,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        // The system's configuration (as root).
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_mount_setattr,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_syslog,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_sethostname,
        libc::SYS_setdomainname,
        libc::SYS_vhangup,
        libc::SYS_personality,
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([
        libc::SYS_iopl,
        libc::SYS_ioperm,
        libc::SYS_uselib,
        libc::SYS_modify_ldt,
    ]);
    calls
}

/// x32 system calls on x86-64 have this bit set in their number.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// The deny list as a BPF program for `arch` (see [`seccomp`]).
pub fn seccomp_program(arch: &str) -> Result<seccompiler::BpfProgram, String> {
    use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
    let target = TargetArch::try_from(arch).map_err(|e| format!("{e}"))?;
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = denied_syscalls()
        .into_iter()
        // An empty rule list matches the call whatever its arguments.
        .map(|nr| (nr, Vec::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        target,
    )
    .map_err(|e| format!("{e}"))?;
    #[allow(unused_mut)]
    let mut program: seccompiler::BpfProgram = filter.try_into().map_err(|e| format!("{e}"))?;
    #[cfg(target_arch = "x86_64")]
    if target == TargetArch::x86_64 {
        refuse_x32(&mut program)?;
    }
    Ok(program)
}

/// seccompiler checks the architecture (x86-64, so 32-bit calls are killed)
/// but x32 calls share it, with [`X32_SYSCALL_BIT`] set in the number: a
/// deny list by number would let `socket | X32_SYSCALL_BIT` through on a
/// kernel with x32 enabled. Right after seccompiler's three instructions of
/// architecture check, three more refuse every such number. The check of
/// the prefix makes a seccompiler that changed its layout an error, not a
/// broken filter.
#[cfg(target_arch = "x86_64")]
fn refuse_x32(program: &mut seccompiler::BpfProgram) -> Result<(), String> {
    use seccompiler::sock_filter;
    // BPF_LD | BPF_W | BPF_ABS, BPF_JMP | BPF_JEQ | BPF_K,
    // BPF_JMP | BPF_JGE | BPF_K, BPF_RET | BPF_K (linux/bpf_common.h).
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const JGE_K: u16 = 0x35;
    const RET_K: u16 = 0x06;
    // offsetof(struct seccomp_data, arch) and (…, nr).
    const ARCH_OFFSET: u32 = 4;
    const NR_OFFSET: u32 = 0;
    let prefix_ok = program.len() > 3
        && program[0].code == LD_W_ABS
        && program[0].k == ARCH_OFFSET
        && program[1].code == JEQ_K
        && program[1].jt == 1
        && program[1].jf == 0
        && program[2].code == RET_K
        && program[2].k == libc::SECCOMP_RET_KILL_PROCESS;
    if !prefix_ok {
        return Err(
            "seccompiler's program does not start with the expected architecture check".into(),
        );
    }
    let x32 = [
        sock_filter {
            code: LD_W_ABS,
            jt: 0,
            jf: 0,
            k: NR_OFFSET,
        },
        sock_filter {
            code: JGE_K,
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        },
        sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
    ];
    program.splice(3..3, x32);
    Ok(())
}

/// Installs the deny list on every thread; `Err` says why it is not.
fn seccomp() -> Result<(), String> {
    let program = seccomp_program(std::env::consts::ARCH)?;
    seccompiler::apply_filter_all_threads(&program).map_err(|e| format!("{e}"))
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

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_x86_64_program_refuses_x32_calls_right_after_the_arch_check() {
        let p = seccomp_program("x86_64").unwrap();
        assert_eq!(p[3].k, 0, "load the call number");
        assert_eq!((p[4].k, p[4].jt, p[4].jf), (X32_SYSCALL_BIT, 0, 1));
        assert_eq!(p[5].k, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32);
        // Then seccompiler's own program, which loads the number again.
        assert_eq!((p[6].code, p[6].k), (0x20, 0));
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
