//! End-to-end: a workspace's devcontainer.json and version files, the way a
//! cloned repository carries them (docs/dev-env.md). What the file may ask
//! for happens inside the sandbox; what it may not (a command on the host, a
//! host variable copied in, replacing the variables sandpen sets) is named
//! and does not happen.

use std::path::Path;

use libtest_mimic::{Arguments, Failed, Trial};

mod common;
use common::{check, text, Cli};

const NAME: &str = "devcontainer";

fn devcontainer_json(host_marker: &Path) -> String {
    format!(
        r#"{{
  // As an editor writes it: comments and trailing commas.
  "name": "webapp",
  "containerEnv": {{
    "GREETING": "hello from devcontainer",
    "STOLEN": "${{localEnv:SANDPEN_TEST_HOST_SECRET}}",
    "PATH": "/workspace-bin",
  }},
  "remoteEnv": {{ "GREETING2": "remote" }},
  "postCreateCommand": "echo created >> $HOME/lifecycle.log",
  "postStartCommand": ["sh", "-c", "echo started >> $HOME/lifecycle.log"],
  "initializeCommand": "touch {marker}",
  "forwardPorts": [3000],
}}
"#,
        marker = host_marker.display()
    )
}

fn lifecycle_env_and_refusals() -> Result<(), Failed> {
    let (root, ws) = common::workspace("sandpen-devcontainer-", NAME);
    let host_marker = root.path().join("initialize-ran-on-the-host");
    std::fs::create_dir(ws.join(".devcontainer")).map_err(|e| e.to_string())?;
    std::fs::write(
        ws.join(".devcontainer/devcontainer.json"),
        devcontainer_json(&host_marker),
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(ws.join(".nvmrc"), "22\n").map_err(|e| e.to_string())?;
    let cli = Cli::new(ws);
    let result = (|| {
        let show = "printf '%s|%s|%s|%s\\n' \"$GREETING\" \"$GREETING2\" \"$STOLEN\" \"$PATH\"; cat ~/lifecycle.log";
        let out = cli
            .command(&["run", "--", "sh", "-c", show])
            .env("SANDPEN_TEST_HOST_SECRET", "host-only-value")
            .output()
            .map_err(|e| e.to_string())?;
        let stdout = text(&out.stdout);
        let stderr = text(&out.stderr);
        let first = stdout.lines().next().unwrap_or("");
        let (fields, path) = first.rsplit_once('|').unwrap_or((first, ""));
        check(
            out.status.success()
                && fields == "hello from devcontainer|remote|"
                && !path.contains("/workspace-bin")
                && stdout.lines().skip(1).collect::<Vec<_>>() == ["created", "started"],
            format!("run: {:?}\nstdout: {stdout}\nstderr: {stderr}", out.status),
        )?;
        check(
            stderr.contains(
                "not honoured: containerEnv.PATH, containerEnv.STOLEN, initializeCommand",
            ) && stderr.contains("sandpen: toolchains: provisioning node@22")
                && stderr.contains("sandpen: postCreateCommand: /bin/sh -c echo created")
                && stderr.contains("forwards 3000: publish with `-p 3000`"),
            format!("what run says: {stderr}"),
        )?;
        check(!host_marker.exists(), "initializeCommand ran on the host")?;
        // A second start runs postStartCommand again, postCreateCommand not.
        cli.ok(&["stop", NAME])?;
        cli.ok(&["start", NAME])?;
        let log = cli.ok(&[
            "exec",
            NAME,
            "--",
            "sh",
            "-c",
            "cat ~/lifecycle.log; echo \"$GREETING\"",
        ])?;
        check(
            log.lines().collect::<Vec<_>>()
                == ["created", "started", "started", "hello from devcontainer"],
            format!("after stop and start: {log}"),
        )
    })();
    let _ = cli.run(&["rm", "-f", NAME]);
    result
}

fn main() {
    let args = Arguments {
        test_threads: Some(1),
        ..Arguments::from_args()
    };
    let trials = vec![Trial::test(
        "devcontainer_lifecycle_and_env_run_inside_and_the_rest_is_refused",
        lifecycle_env_and_refusals,
    )];
    libtest_mimic::run(&args, trials).exit();
}
