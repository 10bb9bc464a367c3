//! Sandboxes: list, create (building the image on first use), start, stop,
//! rm, and the exec request of a terminal. The CLI's `ls`, `create`, `run`,
//! `start`, `stop`, `rm` and the page's API call these.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use indicatif::MultiProgress;
use sandpen_image::ImageSpec;
use sandpen_proto::{ExecRequest, WinSize};
use sandpen_supervisor::control::{self, State};
use sandpen_supervisor::sandbox::{self, CreateOptions, SandboxConfig, GUEST_USER};
use sandpen_supervisor::{lifecycle, Dirs};
use serde::Serialize;

use crate::ApiError;

/// One sandbox as `ls` and the page show it.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxInfo {
    pub name: String,
    pub status: String,
    pub workspace: PathBuf,
    pub image: String,
    pub agent: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub uptime_secs: Option<u64>,
    pub accel: Option<String>,
    pub created_at: String,
    /// Published ports (`-p`), as `sandpen ports` prints them.
    pub ports: Vec<String>,
    /// Why the last run failed (status `failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A running sandbox's limits, usage, egress bytes and disk state
    /// (`disk_full`), as `stats` shows them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<sandpen_supervisor::resources::Stats>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Every sandbox with its state, uptime and (running) resource usage.
pub async fn list(dirs: &Dirs) -> Result<Vec<SandboxInfo>, ApiError> {
    let mut rows = Vec::new();
    for c in sandbox::list(dirs)? {
        rows.push(info(dirs, c).await);
    }
    Ok(rows)
}

/// One sandbox, as [`list`] shows it.
pub async fn get(dirs: &Dirs, name: &str) -> Result<SandboxInfo, ApiError> {
    let c = sandbox::load(dirs, name)?;
    Ok(info(dirs, c).await)
}

async fn info(dirs: &Dirs, c: SandboxConfig) -> SandboxInfo {
    let paths = dirs.sandbox(&c.name);
    let state = control::state(&paths).await;
    let (uptime_secs, accel) = match &state {
        State::Running(s) => (
            Some(now_ms().saturating_sub(s.started_at_unix_ms) / 1000),
            Some(s.accel.clone()),
        ),
        _ => (None, None),
    };
    let reason = match &state {
        State::Failed(reason) => Some(reason.clone()),
        _ => None,
    };
    let resources = match &state {
        State::Running(_) => control::stats(&paths).await.ok(),
        _ => None,
    };
    SandboxInfo {
        reason,
        resources,
        status: state.label().to_string(),
        name: c.name,
        workspace: c.workspace,
        image: c.image,
        agent: c.agent,
        cpus: c.cpus,
        memory_mib: c.memory_mib,
        uptime_secs,
        accel,
        created_at: c.created_at,
        ports: c.ports.iter().map(|m| m.to_string()).collect(),
    }
}

/// A workspace folder, checked: it exists and is a directory. Returns its
/// canonical path (the path the guest sees it at).
pub fn workspace_path(path: &Path) -> Result<PathBuf, ApiError> {
    let canonical = path.canonicalize().map_err(|source| ApiError::Workspace {
        path: path.to_path_buf(),
        source,
    })?;
    if !canonical.is_dir() {
        return Err(ApiError::NotADirectory(canonical));
    }
    Ok(canonical)
}

/// The agent called `name`, or an error that says why it cannot be used.
pub fn agent_or_explain(name: &str) -> Result<&'static sandpen_agents::Agent, ApiError> {
    let agent = sandpen_agents::find(name).ok_or_else(|| ApiError::UnknownAgent {
        name: name.to_string(),
        choices: sandpen_agents::run_names().join(", "),
    })?;
    if let Err(reason) = agent.installable() {
        return Err(ApiError::AgentCannotRun {
            title: agent.title.to_string(),
            reason: reason.to_string(),
        });
    }
    Ok(agent)
}

/// Loads an image, building on first use the default one and the image named
/// after an agent (`claude`: the base, Node, Docker and Claude Code). `say`
/// gets one line before a build starts; `progress` draws the build.
pub fn ensure_image(
    dirs: &Dirs,
    name: &str,
    progress: &MultiProgress,
    say: &dyn Fn(&str),
) -> Result<sandpen_image::Image, ApiError> {
    match sandpen_image::load(&dirs.images(), name) {
        Ok(image) => Ok(image),
        Err(sandpen_image::ImageError::NotFound { .. }) if name == "default" => {
            say("building the default image (first use; a few minutes)");
            let outcome =
                sandpen_image::build(&dirs.images(), &ImageSpec::default_for(name), progress)?;
            Ok(outcome.into_image())
        }
        Err(sandpen_image::ImageError::NotFound { .. }) if sandpen_agents::find(name).is_some() => {
            agent_or_explain(name)?;
            say(&format!(
                "building the {name} image (first use: Debian, Node, Docker and the agent; \
                 several minutes, then cached)"
            ));
            let spec = ImageSpec::for_agents(name, &[name]);
            let outcome = sandpen_image::build(&dirs.images(), &spec, progress)?;
            Ok(outcome.into_image())
        }
        Err(e) => Err(e.into()),
    }
}

/// The packaged image build (`packaging/image-build`), the one command the
/// polkit action `org.sandpen.image-build` lets a desktop user run as root
/// through pkexec (docs/ui.md, "How an image build gets root").
pub const ROOT_IMAGE_BUILD: &str = "/usr/lib/sandpen/image-build";

/// Whether `image` is missing, this process cannot build it (not root), and
/// the packaged root build can: the default image or one agent's, with
/// pkexec and the helper installed.
pub fn wants_root_build(dirs: &Dirs, image: &str) -> bool {
    let missing = matches!(
        sandpen_image::load(&dirs.images(), image),
        Err(sandpen_image::ImageError::NotFound { .. })
    );
    let buildable = image == "default" || sandpen_agents::find(image).is_some();
    missing
        && buildable
        && !nix::unistd::geteuid().is_root()
        && Path::new(ROOT_IMAGE_BUILD).is_file()
        && sandpen_vm::which("pkexec").is_some()
}

/// Builds `image` (the default one, or an agent's) through pkexec and the
/// packaged helper, which asks for an administrator's password once (polkit
/// keeps it for a few minutes); each line it prints goes to `say`.
pub async fn build_image_as_root(image: &str, say: &(dyn Fn(&str) + Sync)) -> Result<(), ApiError> {
    use tokio::io::AsyncBufReadExt;
    let pkexec = sandpen_vm::which("pkexec").ok_or_else(|| ApiError::RootBuild {
        image: image.to_string(),
        reason: "pkexec is not installed".into(),
    })?;
    let mut cmd = tokio::process::Command::new(pkexec);
    cmd.arg(ROOT_IMAGE_BUILD);
    if image != "default" {
        cmd.arg(image);
    }
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| ApiError::io("starting pkexec", e))?;
    let mut out = child
        .stdout
        .take()
        .map(|o| tokio::io::BufReader::new(o).lines());
    let mut err = child
        .stderr
        .take()
        .map(|e| tokio::io::BufReader::new(e).lines());
    let mut last = String::new();
    loop {
        let line = tokio::select! {
            l = async { out.as_mut()?.next_line().await.ok().flatten() }, if out.is_some() => {
                if l.is_none() { out = None; }
                l
            }
            l = async { err.as_mut()?.next_line().await.ok().flatten() }, if err.is_some() => {
                if l.is_none() { err = None; }
                l
            }
            else => break,
        };
        if let Some(l) = line {
            let l = l.trim().to_string();
            if !l.is_empty() {
                say(&l);
                last = l;
            }
        }
    }
    let status = child
        .wait()
        .await
        .map_err(|e| ApiError::io("waiting for pkexec", e))?;
    match status.code() {
        Some(0) => Ok(()),
        // pkexec's own: the dialog was dismissed, or the password refused.
        Some(126 | 127)
            if last.is_empty() || last.contains("pkexec") || last.contains("Not authorized") =>
        {
            Err(ApiError::RootBuild {
                image: image.to_string(),
                reason: "the administrator password was not given".into(),
            })
        }
        _ => Err(ApiError::RootBuild {
            image: image.to_string(),
            reason: if last.is_empty() {
                format!("pkexec ended with {status}")
            } else {
                last
            },
        }),
    }
}

/// Creates a sandbox: checks its shares, builds its image on first use (a
/// blocking call: run it off the async threads), and writes it.
pub fn create(
    dirs: &Dirs,
    opts: &CreateOptions,
    progress: &MultiProgress,
    say: &dyn Fn(&str),
) -> Result<SandboxConfig, ApiError> {
    // Before anything slow (an image build) or anything made.
    let own = sandpen_supervisor::own::own_folders(dirs);
    sandpen_supervisor::own::check_share(&opts.workspace, &own)?;
    for m in &opts.mounts {
        sandpen_supervisor::own::check_share(&m.path, &own)?;
    }
    let image = ensure_image(dirs, &opts.image, progress, say)?;
    Ok(sandbox::create(dirs, opts, &image.rootfs())?)
}

/// The options of a sandbox made with every default, for `agent` (`shell`
/// or an agent's name).
pub fn default_options(workspace: PathBuf, agent: &str) -> CreateOptions {
    CreateOptions {
        name: None,
        workspace,
        image: match agent {
            "shell" => "default".to_string(),
            agent => agent.to_string(),
        },
        agent: agent.to_string(),
        cpus: sandbox::DEFAULT_CPUS,
        memory_mib: sandbox::DEFAULT_MEMORY_MIB,
        disk_gib: sandbox::DEFAULT_DISK_GIB,
        accel: sandpen_vm::AccelChoice::Auto,
        add_hosts: Vec::new(),
        docker: sandbox::DockerStart::OnDemand,
        mounts: Vec::new(),
        upstream_cas: Vec::new(),
        require_jail: false,
        ports: Vec::new(),
    }
}

/// Boots a sandbox unless it runs already; the notes the supervisor asked
/// to be said (limits or jail layers this host cannot give).
pub async fn start(dirs: &Dirs, name: &str) -> Result<lifecycle::Started, ApiError> {
    let config = sandbox::load(dirs, name)?;
    let notes = crate::provision::prepare_view(dirs, &config);
    let mut started = lifecycle::start(dirs, name).await?;
    started.notes.extend(notes);
    Ok(started)
}

/// Shuts a sandbox down cleanly, forcing it off after `timeout`.
pub async fn stop(dirs: &Dirs, name: &str, timeout: Duration) -> Result<(), ApiError> {
    sandbox::load(dirs, name)?;
    let paths = dirs.sandbox(name);
    // A sandbox that is booting, or busy shutting down after another stop, does
    // not answer yet: give it the timeout before forcing it off, so that a
    // second `stop` never kills a guest in the middle of flushing its disk.
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match control::state(&paths).await {
            State::Stopped | State::Failed(_) => return Ok(()),
            State::Running(_) => return Ok(control::stop(&paths, timeout).await?),
            State::Starting | State::Stopping | State::Unresponsive
                if std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            State::Starting | State::Stopping | State::Unresponsive => {
                control::kill_supervisor(&paths);
                return Ok(());
            }
        }
    }
}

/// Deletes every trace of a sandbox; `force` stops a running one first.
pub async fn rm(dirs: &Dirs, name: &str, force: bool) -> Result<(), ApiError> {
    sandbox::load(dirs, name)?;
    let paths = dirs.sandbox(name);
    if control::supervisor_alive(&paths) {
        if !force {
            return Err(ApiError::Running(name.to_string()));
        }
        if control::stop(&paths, Duration::from_secs(10))
            .await
            .is_err()
        {
            control::kill_supervisor(&paths);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while control::supervisor_alive(&paths) && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    sandbox::remove(dirs, name)?;
    Ok(())
}

/// The exec request `sandpen exec` sends: as `agent` in the workspace
/// unless told otherwise, with a terminal of `tty`'s size.
pub fn exec_request(
    config: &SandboxConfig,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    user: Option<String>,
    workdir: Option<String>,
    tty: Option<WinSize>,
) -> ExecRequest {
    ExecRequest {
        argv,
        env,
        cwd: Some(workdir.unwrap_or_else(|| config.workspace.to_string_lossy().into_owned())),
        user: Some(user.unwrap_or_else(|| GUEST_USER.into())),
        tty,
    }
}

/// Starts an exec in a running sandbox; the stream then carries the
/// guest's exec frames (`ExecInput` one way, `ExecEvent` the other).
pub async fn exec(
    dirs: &Dirs,
    name: &str,
    req: ExecRequest,
) -> Result<sandpen_proto::frame::FrameStream<tokio::net::UnixStream>, ApiError> {
    let paths = dirs.sandbox(name);
    if !matches!(control::state(&paths).await, State::Running(_)) {
        return Err(ApiError::NotRunning(name.to_string()));
    }
    Ok(control::exec(&paths, req).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Mutex;

    fn fake_pkexec(dir: &Path, body: &str) {
        let path = dir.join("pkexec");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn the_root_build_runs_the_helper_says_its_lines_and_names_its_failure() {
        let dir = tempfile::tempdir().unwrap();
        let old = std::env::var_os("PATH");
        std::env::set_var("PATH", dir.path());
        let said = Mutex::new(Vec::<String>::new());
        let say = |l: &str| said.lock().unwrap().push(l.to_string());

        fake_pkexec(
            dir.path(),
            r#"echo "args: $*"; echo "debootstrap done" >&2"#,
        );
        build_image_as_root("claude", &say).await.unwrap();
        build_image_as_root("default", &say).await.unwrap();
        // stdout and stderr are read as they come: each line once, in no set order.
        let mut lines = said.lock().unwrap().clone();
        lines.sort();
        assert_eq!(
            lines,
            [
                "args: /usr/lib/sandpen/image-build",
                "args: /usr/lib/sandpen/image-build claude",
                "debootstrap done",
                "debootstrap done"
            ]
        );

        fake_pkexec(
            dir.path(),
            "echo 'Error executing command as another user: Not authorized' >&2; exit 127",
        );
        let e = build_image_as_root("default", &say).await.unwrap_err();
        assert!(
            e.to_string()
                .ends_with("the administrator password was not given"),
            "{e}"
        );

        fake_pkexec(
            dir.path(),
            "echo 'mkfs.ext4: No space left on device' >&2; exit 1",
        );
        let e = build_image_as_root("default", &say).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "building image default with administrator rights failed: mkfs.ext4: No space left on device"
        );
        match old {
            Some(p) => std::env::set_var("PATH", p),
            None => std::env::remove_var("PATH"),
        }
    }
}
