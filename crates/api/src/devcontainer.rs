//! What a workspace's devcontainer.json and version files ask of a start
//! (docs/dev-env.md): the CLI's `run` and `start` and the page's start
//! (`POST /api/sandboxes/{name}/start`, and create with `start`) all call
//! [`after_start`] once the sandbox runs, so that a sandbox started from
//! either gets the same steps.
//!
//! Guarantees: `postCreateCommand` runs once per sandbox (until it
//! succeeds) and `postStartCommand` at every start, each inside the sandbox
//! as `agent` in the workspace, never on the host; the workspace's
//! `forwardPorts` are only named (a workspace never opens a listener on the
//! host by itself); the keys sandpen does not honour are named. Every line
//! and every byte the commands print goes to the caller's [`StartOutput`]:
//! the CLI's stderr and stdout, or the page's job lines.

use std::sync::Mutex;

use sandpen_devenv::devcontainer::{DevContainer, LifecycleCommand};
use sandpen_proto::ExecEvent;
use sandpen_supervisor::sandbox::SandboxConfig;
use sandpen_supervisor::{control, Dirs};

use crate::ApiError;

/// Where the steps after a start report.
pub trait StartOutput: Sync {
    /// One line of sandpen's own (`note: …`, `postCreateCommand: sh -c …`),
    /// without a `sandpen: ` prefix.
    fn line(&self, line: &str);
    /// Output of a lifecycle command, as it comes (`stderr` or stdout).
    fn output(&self, stderr: bool, bytes: &[u8]);
}

/// A [`StartOutput`] that turns everything into whole lines for `say`: the
/// page's job lines. Call [`LineOutput::finish`] for a last line without a
/// newline.
pub struct LineOutput<'a> {
    say: &'a (dyn Fn(&str) + Sync),
    /// Partial lines of stdout and stderr.
    pending: Mutex<[Vec<u8>; 2]>,
}

impl<'a> LineOutput<'a> {
    pub fn new(say: &'a (dyn Fn(&str) + Sync)) -> LineOutput<'a> {
        LineOutput {
            say,
            pending: Mutex::new([Vec::new(), Vec::new()]),
        }
    }

    fn emit(&self, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        let text = text.trim_end_matches('\r');
        (self.say)(text);
    }

    /// Says what is left of a line without a newline.
    pub fn finish(&self) {
        let rest: Vec<Vec<u8>> = match self.pending.lock() {
            Ok(mut p) => p.iter_mut().map(std::mem::take).collect(),
            Err(_) => return,
        };
        for r in rest.iter().filter(|r| !r.is_empty()) {
            self.emit(r);
        }
    }
}

impl StartOutput for LineOutput<'_> {
    fn line(&self, line: &str) {
        (self.say)(line);
    }

    fn output(&self, stderr: bool, bytes: &[u8]) {
        let lines: Vec<Vec<u8>> = {
            let Ok(mut pending) = self.pending.lock() else {
                return;
            };
            let buf = &mut pending[usize::from(stderr)];
            buf.extend_from_slice(bytes);
            let mut out = Vec::new();
            while let Some(i) = buf.iter().position(|&b| b == b'\n') {
                let rest = buf.split_off(i + 1);
                let mut line = std::mem::replace(buf, rest);
                line.pop();
                out.push(line);
            }
            out
        };
        for l in lines {
            self.emit(&l);
        }
    }
}

/// The steps after a start: the workspace's toolchains provisioned
/// ([`crate::provision`]), the keys of devcontainer.json not honoured, the
/// `forwardPorts` not published, then `postCreateCommand` (once per sandbox,
/// until it succeeds) and `postStartCommand`, each run inside the sandbox.
/// A lifecycle command that fails is said, not an error: the sandbox runs.
pub async fn after_start(
    dirs: &Dirs,
    config: &SandboxConfig,
    out: &dyn StartOutput,
) -> Result<(), ApiError> {
    // Its lines are whole and carry their own prefix (mise's progress,
    // `sandpen: toolchains: …`): passed on as output.
    let say = |l: &str| out.output(true, format!("{l}\n").as_bytes());
    let plan = match sandpen_devenv::detect(&config.workspace) {
        Ok(plan) => plan,
        Err(e) => {
            out.line(&format!("note: {e}"));
            crate::provision::remount_trees(dirs, config, &say).await;
            return Ok(());
        }
    };
    if plan.tools.is_empty() {
        crate::provision::remount_trees(dirs, config, &say).await;
    } else {
        crate::provision::provision(dirs, config, &plan, &say).await;
    }
    let Some((file, dc)) = plan.devcontainer else {
        return Ok(());
    };
    if !dc.not_honoured.is_empty() {
        let keys: Vec<&str> = dc.not_honoured.iter().map(|(k, _)| k.as_str()).collect();
        out.line(&format!(
            "{file}: not honoured: {} (`sandpen env plan` says why)",
            keys.join(", ")
        ));
    }
    // A workspace never opens a listener on the host by itself: a cloned
    // repository's forwardPorts could squat a local service's port (a
    // stopped database's 5432) and collect what host clients send it.
    let unpublished: Vec<u16> = dc
        .forward_ports
        .iter()
        .copied()
        .filter(|p| !config.ports.iter().any(|m| m.guest_port == *p))
        .collect();
    if !unpublished.is_empty() {
        let list: Vec<String> = unpublished.iter().map(u16::to_string).collect();
        let flags: Vec<String> = unpublished.iter().map(|p| format!("-p {p}")).collect();
        out.line(&format!(
            "{file} forwards {}: publish with `{}` (a workspace does not open \
             ports on the host by itself)",
            list.join(", "),
            flags.join(" ")
        ));
    }
    let env = devcontainer_env(&dc);
    let created_marker = dirs.sandbox(&config.name).dir.join("devcontainer-created");
    if let Some(cmd) = dc.post_create.as_ref().filter(|_| !created_marker.exists()) {
        if lifecycle(dirs, config, "postCreateCommand", cmd, &env, out).await? {
            sandpen_fsutil::write_atomic(&created_marker, b"", sandpen_fsutil::MODE_STATE)
                .map_err(|e| ApiError::io(format!("writing {}", created_marker.display()), e))?;
        }
    }
    if let Some(cmd) = &dc.post_start {
        lifecycle(dirs, config, "postStartCommand", cmd, &env, out).await?;
    }
    Ok(())
}

/// `containerEnv` then `remoteEnv` (the later wins, as in the spec); the
/// names sandpen sets itself were refused when the file was read.
fn devcontainer_env(dc: &DevContainer) -> Vec<(String, String)> {
    dc.container_env
        .iter()
        .chain(dc.remote_env.iter())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The workspace's devcontainer variables, for a command in the sandbox
/// (`exec` and `run` put them before the user's own).
pub fn workspace_env(config: &SandboxConfig) -> Vec<(String, String)> {
    sandpen_devenv::devcontainer(&config.workspace)
        .ok()
        .flatten()
        .map(|(_, dc)| devcontainer_env(&dc))
        .unwrap_or_default()
}

/// Runs one lifecycle command in the sandbox. Named commands (the object
/// form) run one after the other. True when every command exited 0.
async fn lifecycle(
    dirs: &Dirs,
    config: &SandboxConfig,
    what: &str,
    cmd: &LifecycleCommand,
    env: &[(String, String)],
    out: &dyn StartOutput,
) -> Result<bool, ApiError> {
    let argvs: Vec<(String, Vec<String>)> = match cmd {
        LifecycleCommand::Shell(_) | LifecycleCommand::Exec(_) => {
            vec![(what.to_string(), lifecycle_argv(cmd))]
        }
        LifecycleCommand::Parallel(named) => named
            .iter()
            .map(|(name, c)| (format!("{what} {name}"), lifecycle_argv(c)))
            .collect(),
    };
    let mut all_ok = true;
    for (label, argv) in argvs {
        out.line(&format!("{label}: {}", argv.join(" ")));
        let code = run_to_end(dirs, config, argv, env.to_vec(), out).await?;
        if code != 0 {
            out.line(&format!("{label} exited with {code}"));
            all_ok = false;
        }
    }
    Ok(all_ok)
}

fn lifecycle_argv(cmd: &LifecycleCommand) -> Vec<String> {
    match cmd {
        LifecycleCommand::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
        LifecycleCommand::Exec(argv) => argv.clone(),
        // Nested objects are refused when the file is read.
        LifecycleCommand::Parallel(_) => vec!["true".into()],
    }
}

/// Runs a command in the sandbox with no input and no terminal, its output
/// to `out`; returns its shell-style status.
async fn run_to_end(
    dirs: &Dirs,
    config: &SandboxConfig,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    out: &dyn StartOutput,
) -> Result<i32, ApiError> {
    let req = crate::sandboxes::exec_request(config, argv, env, None, None, None);
    let mut frames = control::exec(&dirs.sandbox(&config.name), req).await?;
    frames.send(&sandpen_proto::ExecInput::StdinEof).await?;
    loop {
        match frames.recv::<ExecEvent>().await? {
            Some(ExecEvent::Started { .. }) => {}
            Some(ExecEvent::Stdout(d)) => out.output(false, &d),
            Some(ExecEvent::Stderr(d)) => out.output(true, &d),
            Some(ExecEvent::Failed { code, message }) => {
                out.line(&message);
                return Ok(i32::from(code));
            }
            Some(ExecEvent::Exit(status)) => return Ok(status.shell_code()),
            None => return Err(ApiError::ExecClosed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_becomes_whole_lines() {
        let said = Mutex::new(Vec::<String>::new());
        let say = |l: &str| said.lock().unwrap().push(l.to_string());
        let out = LineOutput::new(&say);
        out.line("postCreateCommand: /bin/sh -c make");
        out.output(false, b"first li");
        out.output(true, b"warning\r\n");
        out.output(false, b"ne\nsecond\nthi");
        out.finish();
        out.finish();
        assert_eq!(
            *said.lock().unwrap(),
            [
                "postCreateCommand: /bin/sh -c make",
                "warning",
                "first line",
                "second",
                "thi"
            ]
        );
    }
}
