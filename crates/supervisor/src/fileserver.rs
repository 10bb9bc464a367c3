//! The workspace file server seam.
//!
//! Every share is served by sandpen's own policy-enforcing vhost-user-fs
//! server (`sandpen fs-serve`, crate `sandpen-fs`), one process per share.
//! `virtiofsd` can still be chosen with `SANDPEN_FILE_SERVER=virtiofsd`, for
//! comparison (the benchmark does): it enforces no file rule and sets no
//! flow label, so it is refused unless the share has no rules at all.

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
    /// Where the guest mounts it: the host path itself for the workspace
    /// and `--mount`s.
    pub guest_path: PathBuf,
    pub socket: PathBuf,
    pub read_only: bool,
    /// Guest uid/gid that stand for the invoking host user (see `SandboxConfig`).
    pub guest_uid: u32,
    pub guest_gid: u32,
    /// The share's file rules, as `sandpen_fs::rules_to_json` wrote them.
    pub rules_json: String,
    /// Whether any rule is set (virtiofsd cannot serve a share with rules).
    pub has_rules: bool,
    pub sandbox: String,
    /// The file audit log (`logs/files.jsonl`) and the label store
    /// (`flow/flow.json`) the server writes to.
    pub files_log: PathBuf,
    pub flow_state: PathBuf,
    /// Free space kept on the flow label folder's file system (`[files]
    /// reserve` of the user's policy).
    pub reserve: String,
}

/// Which program serves the shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// `sandpen fs-serve`: the rules are enforced.
    Sandpen,
    /// virtiofsd: no rules; only for comparison.
    Virtiofsd,
}

impl ServerKind {
    /// `$SANDPEN_FILE_SERVER` (`sandpen`, the default, or `virtiofsd`).
    pub fn from_env() -> Result<ServerKind, SupervisorError> {
        match std::env::var("SANDPEN_FILE_SERVER").ok().as_deref() {
            None | Some("") | Some("sandpen") => Ok(ServerKind::Sandpen),
            Some("virtiofsd") => Ok(ServerKind::Virtiofsd),
            Some(other) => Err(SupervisorError::Invalid(format!(
                "SANDPEN_FILE_SERVER={other:?}: use sandpen or virtiofsd"
            ))),
        }
    }
}

/// The arguments of `sandpen fs-serve` for `spec`.
pub fn fs_serve_args(spec: &ShareSpec) -> Vec<String> {
    let mut args = vec![
        "fs-serve".to_string(),
        "--socket".into(),
        spec.socket.display().to_string(),
        "--root".into(),
        spec.host_path.display().to_string(),
        "--guest-uid".into(),
        spec.guest_uid.to_string(),
        "--guest-gid".into(),
        spec.guest_gid.to_string(),
        "--sandbox".into(),
        spec.sandbox.clone(),
        "--files-log".into(),
        spec.files_log.display().to_string(),
        "--flow-state".into(),
        spec.flow_state.display().to_string(),
        "--rules".into(),
        spec.rules_json.clone(),
        "--reserve".into(),
        spec.reserve.clone(),
    ];
    if spec.read_only {
        args.push("--all-read-only".into());
    }
    args
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
pub async fn start(
    spec: &ShareSpec,
    log: &Path,
    kind: ServerKind,
) -> Result<RunningShare, SupervisorError> {
    let (binary, args) =
        match kind {
            ServerKind::Sandpen => (
                std::env::current_exe()
                    .map_err(|e| SupervisorError::io("finding the sandpen binary", e))?,
                fs_serve_args(spec),
            ),
            ServerKind::Virtiofsd if spec.has_rules => return Err(SupervisorError::Invalid(
                "SANDPEN_FILE_SERVER=virtiofsd cannot enforce file rules, and this share has some \
                 (the defaults count; `defaults = false` in your policy drops them)"
                    .into(),
            )),
            ServerKind::Virtiofsd => (
                virtiofsd()?,
                virtiofsd_args(
                    spec,
                    nix::unistd::getuid().as_raw(),
                    nix::unistd::getgid().as_raw(),
                ),
            ),
        };
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
    cmd.args(args)
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
            guest_path: "/home/me/p".into(),
            socket: "/s/run/fs0.sock".into(),
            read_only: false,
            guest_uid: 1000,
            guest_gid: 1000,
            rules_json: "[]".into(),
            has_rules: false,
            sandbox: "p".into(),
            files_log: "/s/logs/files.jsonl".into(),
            flow_state: "/s/flow/flow.json".into(),
            reserve: "default".into(),
        }
    }

    #[test]
    fn fs_serve_gets_the_share_and_its_rules() {
        let mut s = spec();
        s.read_only = true;
        let a = fs_serve_args(&s);
        assert_eq!(a[0], "fs-serve");
        let pos = |k: &str| a.iter().position(|x| x == k).unwrap();
        assert_eq!(a[pos("--root") + 1], "/home/me/p");
        assert_eq!(a[pos("--rules") + 1], "[]");
        assert_eq!(a[pos("--reserve") + 1], "default");
        assert!(a.contains(&"--all-read-only".to_string()));
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
