//! Starting a sandbox: spawn its supervisor, detached, and wait for the boot outcome.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::control::{self, State};
use crate::paths::Dirs;
use crate::SupervisorError;

/// What a start did.
#[derive(Debug, Default)]
pub struct Started {
    /// False when the sandbox was running already.
    pub booted: bool,
    /// Lines the supervisor asked to be said once (`note: ...`): resource
    /// limits that could not be applied.
    pub notes: Vec<String>,
}

/// Starts the sandbox unless it runs already. Blocks until the guest is ready or
/// the boot failed; the supervisor then lives on by itself.
pub async fn start(dirs: &Dirs, name: &str) -> Result<Started, SupervisorError> {
    let config = crate::sandbox::load(dirs, name)?;
    // Before anything runs: sandpen's own files never go into a sandbox
    // (the environment that names them may differ from create's).
    crate::own::check_shares(dirs, &config)?;
    let paths = dirs.sandbox(name);
    // One start at a time: a concurrent caller waits here, then finds the
    // sandbox running and uses it.
    let lock_path = paths.dir.join("start.lock");
    let _start_lock =
        tokio::task::spawn_blocking(move || crate::sandbox::lock_exclusive(&lock_path))
            .await
            .map_err(|e| SupervisorError::Invalid(format!("waiting for the start lock: {e}")))??;
    // A sandbox still shutting down is waited for, then started again.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut state = control::state(&paths).await;
    while state == State::Stopping && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        state = control::state(&paths).await;
    }
    match state {
        State::Running(_) => return Ok(Started::default()),
        State::Stopping => {
            return Err(SupervisorError::Invalid(format!(
                "sandbox {name} is still stopping; try again when `sandpen ls` says stopped"
            )))
        }
        State::Starting => {
            return Err(SupervisorError::Invalid(format!(
                "sandbox {name} is starting already"
            )))
        }
        State::Unresponsive => {
            return Err(SupervisorError::Invalid(format!(
            "sandbox {name} has a supervisor that does not answer; `sandpen stop {name}` ends it"
        )))
        }
        State::Stopped | State::Failed(_) => {}
    }
    for d in [paths.run(), paths.logs()] {
        std::fs::create_dir_all(&d)
            .map_err(|e| SupervisorError::io(format!("creating {}", d.display()), e))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(paths.supervisor_log())
        .map_err(|e| SupervisorError::io("opening the supervisor log", e))?;
    let exe = std::env::current_exe().map_err(|e| SupervisorError::io("finding sandpen", e))?;
    // A normal user on cgroup v2 gets the supervisor started in a systemd
    // user scope that bounds it (docs/architecture.md, "Resource limits");
    // otherwise the supervisor makes its cgroup itself, or says why not.
    let limits = crate::resources::limits(&config);
    let cgroup = crate::resources::cgroup_name(&config, &paths);
    let mut cmd =
        sandpen_cgroup::systemd_scope_command(&cgroup, &limits, &exe, &["supervise", name])
            .unwrap_or_else(|| {
                let mut c = Command::new(&exe);
                c.arg("supervise").arg(name);
                c
            });
    // A long-lived process should not hold the user's current folder busy.
    cmd.current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    // SAFETY: setsid is async-signal-safe; it detaches the supervisor from the
    // CLI's session so that closing the terminal does not stop the sandbox.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| SupervisorError::io("starting the supervisor", e))?;
    let stdout = child.stdout.take();
    // `note: ...` lines, then `ready` or `error: ...`.
    let (notes, outcome) = tokio::task::spawn_blocking(move || {
        let mut notes = Vec::new();
        let mut line = String::new();
        if let Some(out) = stdout {
            let mut out = BufReader::new(out);
            loop {
                line.clear();
                if out.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                match line.trim().strip_prefix("note: ") {
                    Some(note) if notes.len() < 8 => notes.push(note.to_string()),
                    Some(_) => {}
                    None => break,
                }
            }
        }
        (notes, line)
    })
    .await
    .unwrap_or_default();
    // Reap it if it already exited; otherwise it runs on, detached.
    let _ = child.try_wait();
    let line = outcome.trim();
    if line == "ready" {
        return Ok(Started {
            booted: true,
            notes,
        });
    }
    let reason = line.strip_prefix("error: ").unwrap_or(line);
    let reason = if reason.is_empty() {
        format!(
            "the supervisor exited without a word; see {}",
            paths.supervisor_log().display()
        )
    } else {
        reason.to_string()
    };
    Err(SupervisorError::Boot(reason))
}
