//! The workspace file server seam.
//!
//! Today every share is served by `virtiofsd` (from crates.io). sandpen's own
//! policy-enforcing vhost-user-fs server replaces it behind [`start`] without
//! anything else changing: the VM only sees a vhost-user socket and a tag.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::SupervisorError;

/// One directory shared into the guest.
#[derive(Debug, Clone)]
pub struct ShareSpec {
    pub tag: String,
    pub host_path: PathBuf,
    pub socket: PathBuf,
    pub read_only: bool,
    /// Guest uid/gid that stand for the invoking host user (see `SandboxConfig`).
    pub guest_uid: u32,
    pub guest_gid: u32,
}

pub struct RunningShare {
    pub spec: ShareSpec,
    pub child: Child,
}

/// The virtiofsd binary: `$SANDPEN_VIRTIOFSD`, `PATH`, the distribution's
/// libexec paths, or `~/.cargo/bin`.
pub fn virtiofsd() -> Result<PathBuf, SupervisorError> {
    if let Some(p) = std::env::var_os("SANDPEN_VIRTIOFSD") {
        return Ok(PathBuf::from(p));
    }
    let mut found = sandpen_vm::which("virtiofsd");
    if found.is_none() {
        found = ["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"]
            .iter()
            .map(PathBuf::from)
            .chain(std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/virtiofsd")))
            .find(|p| p.is_file());
    }
    found.ok_or_else(|| {
        SupervisorError::Invalid(
            "virtiofsd was not found; install it with `cargo install virtiofsd` \
             (needs the Debian packages libseccomp-dev libcap-ng-dev pkg-config) or `apt install virtiofsd`"
                .into(),
        )
    })
}

/// The file server's arguments. As root, files the guest writes are translated to
/// the host user (uid 0) and host files show as the guest user's; as an ordinary
/// user, the server can only create files as that user, which is the guest
/// user's uid already.
pub fn virtiofsd_args(spec: &ShareSpec, host_uid: u32, host_gid: u32) -> Vec<String> {
    let mut args = vec![
        format!("--socket-path={}", spec.socket.display()),
        format!("--shared-dir={}", spec.host_path.display()),
        "--cache=auto".into(),
        "--log-level=warn".into(),
    ];
    if spec.read_only {
        args.push("--readonly".into());
    }
    if host_uid == 0 {
        args.push(format!("--translate-uid=map:{}:0:1", spec.guest_uid));
        args.push(format!(
            "--translate-gid=map:{}:{}:1",
            spec.guest_gid, host_gid
        ));
    } else {
        // Without privileges there are no other uids to switch to, and the
        // namespace sandbox needs user namespaces that hosts often restrict.
        args.push("--sandbox=none".into());
    }
    args
}

/// Starts the server for `spec` and waits until its socket is listening.
pub async fn start(spec: &ShareSpec, log: &Path) -> Result<RunningShare, SupervisorError> {
    let binary = virtiofsd()?;
    let _ = std::fs::remove_file(&spec.socket);
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| SupervisorError::io(format!("opening {}", log.display()), e))?;
    let log_err = log_file
        .try_clone()
        .map_err(|e| SupervisorError::io("duplicating a log handle", e))?;
    let mut cmd = Command::new(&binary);
    cmd.args(virtiofsd_args(
        spec,
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    ))
    .stdin(Stdio::null())
    .stdout(Stdio::from(log_file))
    .stderr(Stdio::from(log_err))
    .kill_on_drop(true);
    crate::supervise::die_with_parent(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| SupervisorError::io(format!("starting {}", binary.display()), e))?;
    let start = Instant::now();
    while !spec.socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(SupervisorError::Boot(format!(
                "the file server exited at start ({status}); see {}",
                log.display()
            )));
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(SupervisorError::Boot(format!(
                "the file server did not listen within 10 s; see {}",
                log.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(RunningShare {
        spec: spec.clone(),
        child,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ShareSpec {
        ShareSpec {
            tag: "workspace".into(),
            host_path: "/home/me/p".into(),
            socket: "/s/run/fs0.sock".into(),
            read_only: false,
            guest_uid: 1000,
            guest_gid: 1000,
        }
    }

    #[test]
    fn root_host_maps_guest_user_to_root() {
        let a = virtiofsd_args(&spec(), 0, 0).join(" ");
        assert!(a.contains("--translate-uid=map:1000:0:1"), "{a}");
        assert!(a.contains("--translate-gid=map:1000:0:1"), "{a}");
        assert!(!a.contains("--sandbox=none"));
    }

    #[test]
    fn ordinary_user_needs_no_translation() {
        let mut s = spec();
        s.guest_uid = 1234;
        s.read_only = true;
        let a = virtiofsd_args(&s, 1234, 1234).join(" ");
        assert!(!a.contains("translate"), "{a}");
        assert!(a.contains("--sandbox=none") && a.contains("--readonly"));
    }
}
