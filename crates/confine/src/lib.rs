//! Confinement primitives shared by the file server (`sandpen_fs::confine`)
//! and QEMU's jail (`sandpen_supervisor::jail`); each of those decides
//! *what* its process may do, this crate only says *how* it is enforced.
//!
//! Guarantees:
//! - [`drop_caps`] leaves the permitted and effective sets at most the kept
//!   set, and the inheritable and ambient sets empty.
//! - [`deny_list_program`] refuses (with `EPERM`) every call it is given,
//!   every x32 call on x86-64, and kills the process on any other
//!   architecture; everything else is allowed.
//! - [`landlock_outcome`] reports what the kernel enforced, never more.

use std::collections::BTreeMap;
use std::io;

pub use caps::Capability;
pub use landlock;
pub use seccompiler;

use landlock::{LandlockStatus, RestrictionStatus, RulesetStatus};

/// Whether and how Landlock was enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LandlockOutcome {
    /// Enforced with the kernel's ABI `abi`; `full` when every right asked
    /// for exists at that ABI (a newer kernel than this code).
    Enforced { abi: i32, full: bool },
    /// Not enforced, and why.
    NotEnforced(String),
}

impl LandlockOutcome {
    pub fn enforced(&self) -> bool {
        matches!(self, LandlockOutcome::Enforced { .. })
    }
}

impl std::fmt::Display for LandlockOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LandlockOutcome::Enforced { abi, full: true } => write!(f, "landlock ABI {abi}"),
            LandlockOutcome::Enforced { abi, full: false } => write!(
                f,
                "landlock ABI {abi} (the rights of later ABIs are not on this kernel)"
            ),
            LandlockOutcome::NotEnforced(why) => write!(f, "no landlock ({why})"),
        }
    }
}

/// What `restrict_self` reported, as an outcome. `not_enforced` is the
/// reason given when the kernel has Landlock but enforced nothing of this
/// ruleset.
pub fn landlock_outcome(status: RestrictionStatus, not_enforced: &str) -> LandlockOutcome {
    let abi = match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => effective_abi as i32,
        LandlockStatus::NotEnabled => {
            return LandlockOutcome::NotEnforced(
                "Landlock is built into the kernel but not enabled (lsm= on its command line)"
                    .into(),
            )
        }
        LandlockStatus::NotImplemented => {
            return LandlockOutcome::NotEnforced("the kernel has no Landlock".into())
        }
    };
    match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockOutcome::Enforced { abi, full: true },
        RulesetStatus::PartiallyEnforced => LandlockOutcome::Enforced { abi, full: false },
        RulesetStatus::NotEnforced => {
            LandlockOutcome::NotEnforced(format!("ABI {abi}: {not_enforced}"))
        }
    }
}

/// The running kernel's Landlock ABI (0: none, or not enabled).
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

/// Sets `PR_SET_NO_NEW_PRIVS` for the calling thread (and what it runs).
pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes integers only and touches no
    // memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `PR_SET_NO_NEW_PRIVS` is set for the calling thread.
pub fn no_new_privs() -> bool {
    // SAFETY: prctl(PR_GET_NO_NEW_PRIVS) takes integers only.
    unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1 }
}

/// The process's threads (1 if `/proc` cannot tell).
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(1)
}

/// Keeps only `keep` (of the capabilities the process has) in the permitted
/// and effective sets; clears the inheritable and ambient sets; empties the
/// bounding set where allowed. Returns the names of the kept ones.
pub fn drop_caps(keep: &[Capability]) -> Result<Vec<String>, String> {
    use caps::CapSet;
    let e = |what: &str, err: caps::errors::CapsError| format!("{what}: {err}");
    let permitted = caps::read(None, CapSet::Permitted).map_err(|x| e("reading", x))?;
    let keep: caps::CapsHashSet = keep
        .iter()
        .copied()
        .filter(|c| permitted.contains(c))
        .collect();
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in caps::all() {
            // The bounding set only matters at exec, where no_new_privs and
            // an empty permitted set already keep privileges from coming
            // back; a failure here changes nothing that matters.
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

/// Calls that neither the file server nor QEMU makes once it runs: other
/// processes' memory, kernel attack surface, and the system's configuration.
/// Each user adds its own (sockets, exec) on top.
pub fn common_denied_syscalls() -> Vec<i64> {
    let mut calls = vec![
        // Other processes.
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_pidfd_getfd,
        libc::SYS_kcmp,
        // Kernel attack surface (io_uring's operations also bypass seccomp).
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
        // The system's configuration (as root, or in a user namespace).
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

use libc::SECCOMP_RET_USER_NOTIF;
/// The `SECCOMP_RET_TRACE` data that marks the calls to hand to a listener
/// in a program built by [`deny_list_program`] (seccompiler has no
/// user-notification action; the marker is rewritten after compiling).
const NOTIFY_MARKER: u32 = 0x5e9;

/// A deny list as a BPF program for `arch`: each call in `denied` fails
/// with `EPERM`, each call in `notify` waits for a listener's answer
/// ([`install_with_listener`]), everything else is allowed. Only `arch`'s
/// ABI is allowed (32-bit and x32 calls are refused).
pub fn deny_list_program(
    arch: &str,
    denied: &[i64],
    notify: &[i64],
) -> Result<seccompiler::BpfProgram, String> {
    use seccompiler::{SeccompAction, SeccompFilter, SeccompRule, TargetArch};
    let target = TargetArch::try_from(arch).map_err(|e| format!("{e}"))?;
    // An empty rule list matches the call whatever its arguments; the
    // notified calls match an always-true condition so that they take the
    // filter's match action of their own (see below).
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        denied.iter().map(|nr| (*nr, Vec::new())).collect();
    for nr in notify {
        rules.remove(nr);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        target,
    )
    .map_err(|e| format!("{e}"))?;
    let mut program: seccompiler::BpfProgram = filter.try_into().map_err(|e| format!("{e}"))?;
    if !notify.is_empty() {
        let notify_filter = SeccompFilter::new(
            notify.iter().map(|nr| (*nr, Vec::new())).collect(),
            SeccompAction::Allow,
            SeccompAction::Trace(NOTIFY_MARKER),
            target,
        )
        .map_err(|e| format!("{e}"))?;
        let notify_program: seccompiler::BpfProgram =
            notify_filter.try_into().map_err(|e| format!("{e}"))?;
        program = chain(program, notify_program)?;
    }
    #[cfg(target_arch = "x86_64")]
    if target == TargetArch::x86_64 {
        refuse_x32(&mut program)?;
    }
    Ok(program)
}

// BPF_LD | BPF_W | BPF_ABS, BPF_JMP | BPF_JEQ | BPF_K,
// BPF_JMP | BPF_JGE | BPF_K, BPF_RET | BPF_K (linux/bpf_common.h).
const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const RET_K: u16 = 0x06;

/// One program out of two seccompiler programs: where the first would
/// allow, the second decides. Every `RET ALLOW` of the first becomes a jump
/// to the second's start; the notify marker becomes a user notification.
fn chain(
    first: seccompiler::BpfProgram,
    second: seccompiler::BpfProgram,
) -> Result<seccompiler::BpfProgram, String> {
    use seccompiler::sock_filter;
    let len = first.len();
    let mut out = Vec::with_capacity(len + second.len());
    for (i, insn) in first.into_iter().enumerate() {
        if insn.code == RET_K && insn.k == libc::SECCOMP_RET_ALLOW {
            // BPF_JMP | BPF_JA: an unconditional jump of k instructions.
            let skip = u32::try_from(len - i - 1).map_err(|_| "program too long")?;
            out.push(sock_filter {
                code: 0x05,
                jt: 0,
                jf: 0,
                k: skip,
            });
        } else {
            out.push(insn);
        }
    }
    for mut insn in second {
        if insn.code == RET_K && insn.k == (libc::SECCOMP_RET_TRACE | NOTIFY_MARKER) {
            insn.k = SECCOMP_RET_USER_NOTIF;
        }
        out.push(insn);
    }
    Ok(out)
}

/// x32 system calls on x86-64 have this bit set in their number.
#[cfg(target_arch = "x86_64")]
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

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
    const JGE_K: u16 = 0x35;
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

/// Installs `program` on every thread of the process.
pub fn install(program: &seccompiler::BpfProgram) -> Result<(), String> {
    seccompiler::apply_filter_all_threads(program).map_err(|e| format!("{e}"))
}

/// Installs `program` on the calling thread and returns the listener of its
/// user notifications (`SECCOMP_FILTER_FLAG_NEW_LISTENER`). Needs
/// no_new_privs (or `CAP_SYS_ADMIN`).
pub fn install_with_listener(
    program: &seccompiler::BpfProgram,
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len()).map_err(|_| io::Error::other("program too long"))?,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: seccomp(SECCOMP_SET_MODE_FILTER) reads `prog` and the
    // instructions it points to, both alive for the call; seccompiler's
    // `sock_filter` has libc's layout (both are linux/filter.h's struct).
    let fd = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &prog as *const libc::sock_fprog,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// How a listener answers one notified call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The call goes on as if no filter had stopped it.
    Continue,
    /// The call fails with this errno.
    Fail(i32),
}

/// Receives one notified call on `listener` and answers it with
/// `decide(call number)`. `Ok(false)`: nothing was answered (the caller
/// died meanwhile, or a signal came); call it again when the listener is
/// readable.
pub fn answer_one(
    listener: &std::os::fd::OwnedFd,
    decide: impl FnOnce(i32) -> Verdict,
) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    // linux/seccomp.h: SECCOMP_IOCTL_NOTIF_RECV = _IOWR('!', 0, struct
    // seccomp_notif) (80 bytes), SECCOMP_IOCTL_NOTIF_SEND = _IOWR('!', 1,
    // struct seccomp_notif_resp) (24 bytes).
    const NOTIF_RECV: libc::c_ulong = 0xc050_2100;
    const NOTIF_SEND: libc::c_ulong = 0xc018_2101;
    const FLAG_CONTINUE: u32 = libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32;
    let mut req: libc::seccomp_notif = unsafe_zeroed_notif();
    // SAFETY: NOTIF_RECV writes one `struct seccomp_notif` into `req`,
    // which is zeroed (the kernel requires it) and of that size.
    let rc = unsafe { libc::ioctl(listener.as_raw_fd(), NOTIF_RECV, &mut req) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EINTR) | Some(libc::ENOENT) => Ok(false),
            _ => Err(err),
        };
    }
    let (error, flags) = match decide(req.data.nr) {
        Verdict::Continue => (0, FLAG_CONTINUE),
        Verdict::Fail(errno) => (-errno, 0),
    };
    let resp = libc::seccomp_notif_resp {
        id: req.id,
        val: 0,
        error,
        flags,
    };
    // SAFETY: NOTIF_SEND reads one `struct seccomp_notif_resp`.
    let rc = unsafe { libc::ioctl(listener.as_raw_fd(), NOTIF_SEND, &resp) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        // ENOENT: the caller died before the answer.
        if err.raw_os_error() != Some(libc::ENOENT) {
            return Err(err);
        }
        return Ok(false);
    }
    Ok(true)
}

fn unsafe_zeroed_notif() -> libc::seccomp_notif {
    // SAFETY: `seccomp_notif` is plain integers and arrays of integers; all
    // zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_x86_64_program_refuses_x32_calls_right_after_the_arch_check() {
        let p = deny_list_program("x86_64", &[libc::SYS_bpf], &[]).unwrap();
        assert_eq!(p[3].k, 0, "load the call number");
        assert_eq!((p[4].k, p[4].jt, p[4].jf), (X32_SYSCALL_BIT, 0, 1));
        assert_eq!(p[5].k, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32);
        // Then seccompiler's own program, which loads the number again.
        assert_eq!((p[6].code, p[6].k), (0x20, 0));
    }

    #[test]
    fn notified_calls_end_in_a_user_notification_and_nothing_allows_before_the_second_program() {
        let p = deny_list_program(
            std::env::consts::ARCH,
            &[libc::SYS_bpf, libc::SYS_execve],
            &[libc::SYS_execve, libc::SYS_execveat],
        )
        .unwrap();
        let notifies = p
            .iter()
            .filter(|i| i.code == RET_K && i.k == SECCOMP_RET_USER_NOTIF)
            .count();
        assert!(notifies >= 1, "{p:?}");
        // No trace marker survives.
        assert!(!p
            .iter()
            .any(|i| i.code == RET_K && i.k & 0xffff_0000 == libc::SECCOMP_RET_TRACE));
    }

    #[test]
    fn outcome_display_names_the_abi() {
        let s = LandlockOutcome::Enforced {
            abi: 7,
            full: false,
        }
        .to_string();
        assert!(s.starts_with("landlock ABI 7 "), "{s}");
    }
}
