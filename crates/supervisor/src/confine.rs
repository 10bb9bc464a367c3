//! The supervisor confines itself once the sandbox is up
//! (docs/architecture.md, "The supervisor's confinement").
//!
//! It holds the sandbox's CA key and the user's secrets in memory and
//! parses what the guest sends on the channel, so it is confined as far as
//! its job allows, right after the boot (the file servers and QEMU's
//! launcher are started, the initramfs is built):
//!
//! - **seccomp** on every thread (a deny list, `EPERM`): no `execve` or
//!   `execveat` (it starts nothing after the boot), no `ptrace`,
//!   `process_vm_*`, `bpf`, `perf_event_open`, `userfaultfd`, `io_uring`,
//!   keyrings, mounts, namespaces, modules, `kexec`, and no x32 calls.
//! - **Landlock** (the calling thread and every thread it starts; all
//!   threads at once from ABI 8): read and write beneath the sandbox's own
//!   folder (its logs, labels, sockets, policy), sandpen's config folder
//!   (the policy and the secret store's index) and the toolchain cache
//!   (which only proxies write), not other sandboxes' folders; read beneath its data folder (images), the
//!   workspace and `--mount` folders (the policy file `.sandpen.toml`),
//!   `--upstream-ca` files, the system's libraries, name service and TLS
//!   files, `/proc`, the cgroup tree; nothing else. No execution anywhere.
//!   No TCP `bind` (the proxy only connects out; the published ports'
//!   listeners are bound before this, at the boot's start, and accepting
//!   on them needs no `bind`); TCP `connect` stays, since upstreams are
//!   anywhere the policy allows.
//! - **no_new_privs**.
//!
//! Not restricted, because the job needs them: outgoing TCP and UDP (the
//! egress proxy and its DNS), connecting to unix sockets by path (the
//! Secret Service's D-Bus socket), abstract unix sockets (a session bus may
//! be one), signals to its own children.

use std::path::{Path, PathBuf};

use sandpen_confine::landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd,
    RestrictSelfAttr, Ruleset, RulesetAttr, RulesetCreatedAttr, Scope, ABI,
};
use sandpen_confine::LandlockOutcome;

use crate::paths::{Dirs, SandboxPaths};
use crate::sandbox::SandboxConfig;

const TARGET_ABI: ABI = ABI::V10;

/// What is read beneath the system's folders.
const SYSTEM_READS: &[&str] = &[
    "/usr",
    "/lib",
    "/lib64",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/passwd",
    "/etc/group",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
    "/etc/machine-id",
    "/var/lib/dbus/machine-id",
    "/run/systemd/resolve",
    "/proc",
    "/sys/devices/system",
];

/// What is read and written outside sandpen's folders.
const SYSTEM_WRITES: &[&str] = &["/dev/null", "/dev/urandom", "/sys/fs/cgroup"];

/// What the supervisor's confinement applied, and which layers this host
/// could not give.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Confinement {
    pub applied: Vec<String>,
    pub missing: Vec<String>,
}

impl Confinement {
    /// One line for the log: what was applied.
    pub fn applied_line(&self) -> String {
        self.applied.join("; ")
    }

    /// The line a start prints, and `--require-jail` refuses on, when a
    /// layer is missing.
    pub fn missing_line(&self) -> Option<String> {
        (!self.missing.is_empty()).then(|| {
            format!(
                "the supervisor's confinement is incomplete on this host: {}",
                self.missing.join("; ")
            )
        })
    }
}

/// Confines the calling process: no_new_privs, Landlock, then seccomp.
/// A layer the host cannot give is listed in [`Confinement::missing`], and
/// the others are still applied.
pub fn confine(dirs: &Dirs, config: &SandboxConfig, paths: &SandboxPaths) -> Confinement {
    let mut c = Confinement::default();
    match sandpen_confine::set_no_new_privs() {
        Ok(()) => c.applied.push("no_new_privs".to_string()),
        Err(e) => c.missing.push(format!("no_new_privs ({e})")),
    }
    match landlock(dirs, config, paths) {
        Ok(outcome @ LandlockOutcome::Enforced { .. }) => c.applied.push(outcome.to_string()),
        Ok(LandlockOutcome::NotEnforced(why)) | Err(why) => {
            c.missing.push(format!("Landlock ({why})"))
        }
    }
    let mut denied = vec![libc::SYS_execve, libc::SYS_execveat];
    denied.extend(sandpen_confine::common_denied_syscalls());
    match sandpen_confine::deny_list_program(std::env::consts::ARCH, &denied, &[])
        .and_then(|p| sandpen_confine::install(&p))
    {
        Ok(()) => c.applied.push("seccomp deny list (no exec)".into()),
        Err(e) => c.missing.push(format!("seccomp ({e})")),
    }
    c
}

fn landlock(
    dirs: &Dirs,
    config: &SandboxConfig,
    paths: &SandboxPaths,
) -> Result<LandlockOutcome, String> {
    let err = |e: sandpen_confine::landlock::RulesetError| e.to_string();
    // Not handled, so not restricted: connecting to unix sockets by path
    // (the D-Bus socket of the Secret Service), and executing (seccomp
    // refuses every exec after the boot instead, and the boot itself runs
    // cpio and xz for the initramfs before this).
    let handled = AccessFs::from_all(TARGET_ABI) & !AccessFs::ResolveUnix;
    let mut created = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(handled)
        .map_err(err)?
        .handle_access(AccessNet::BindTcp)
        .map_err(err)?
        .scope(Scope::Signal)
        .map_err(err)?
        .create()
        .map_err(err)?;
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    let write = handled & !AccessFs::Execute;
    let file_only = AccessFs::from_file(TARGET_ABI);
    let mut wanted: Vec<(PathBuf, BitFlags<AccessFs>)> = Vec::new();
    wanted.extend(SYSTEM_READS.iter().map(|p| (PathBuf::from(p), read)));
    wanted.extend(SYSTEM_WRITES.iter().map(|p| (PathBuf::from(p), write)));
    // Of the state folder, only this sandbox's own: another sandbox's disk,
    // CA key and sockets are out of reach.
    wanted.push((dirs.config.clone(), write));
    wanted.push((dirs.data.clone(), read));
    wanted.push((paths.dir.clone(), write));
    // The toolchain cache, filled by this proxy (docs/dev-env.md).
    wanted.push((dirs.toolchains(), write));
    wanted.push((config.workspace.clone(), read));
    wanted.extend(config.mounts.iter().map(|m| (m.path.clone(), read)));
    wanted.extend(config.upstream_cas.iter().map(|p| (p.clone(), read)));
    for (path, access) in wanted {
        let Ok(fd) = PathFd::new(&path) else {
            // A folder or file this host does not have.
            continue;
        };
        let is_dir = Path::new(&path).is_dir();
        let access = if is_dir { access } else { access & file_only };
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(err)?;
    }
    let status = created
        .all_threads(true)
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    Ok(sandpen_confine::landlock_outcome(
        status,
        "it enforced none of the rules",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_missing_line_names_every_missing_layer() {
        let c = Confinement {
            applied: vec!["no_new_privs".into()],
            missing: vec![
                "Landlock (not in this kernel)".into(),
                "seccomp (EINVAL)".into(),
            ],
        };
        assert_eq!(
            c.missing_line().unwrap(),
            "the supervisor's confinement is incomplete on this host: \
             Landlock (not in this kernel); seccomp (EINVAL)"
        );
        assert!(Confinement::default().missing_line().is_none());
    }
}
