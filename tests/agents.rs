//! End-to-end tests of agent sandboxes: the real agent CLIs from npm inside a
//! real VM, launched by `sandpen run AGENT`, and the sandbox's own Docker
//! engine with its containers' egress going through the host policy.
//!
//! One image with three agents (`test-agents`, built by scripts/test with
//! `sandpen image build --agent claude --agent codex --agent gemini --name
//! test-agents`, or here on first use) and one sandbox, shared by the tests in
//! order: `run claude` creates it, `run codex` and `run gemini` attach to it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};

mod common;
use common::{check, expect_ok, text};

/// The sandbox's name (from the workspace folder's name).
const NAME: &str = "agents";
/// The image the tests use: all three agents in one, so one build serves all.
const IMAGE: &str = "test-agents";
/// What the test puts in the secret store; the guest must never see it.
const REAL_KEY: &str = "sk-sandpen-test-real-key-0123456789";

struct Env {
    bin: PathBuf,
    state: tempfile::TempDir,
    config: tempfile::TempDir,
    data: PathBuf,
    root: tempfile::TempDir,
    ws: PathBuf,
    http_port: u16,
    server: std::sync::Mutex<Child>,
}

/// A plain HTTP server on 127.0.0.1 that logs each request path.
const SERVER: &str = r#"
import http.server, sys, os
log = open(os.path.join(sys.argv[1], "requests.log"), "a", buffering=1)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        log.write(self.path + "\n")
        body = ("hello from the host " + self.path + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let (root, ws) = common::workspace("sandpen-agents-", NAME);
        let mut server = Command::new("python3")
            .arg("-c")
            .arg(SERVER)
            .arg(root.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(server.stdout.take().expect("server stdout"))
            .read_line(&mut line)
            .expect("the server's port");
        let config = tempfile::Builder::new()
            .prefix("sandpen-config-")
            .tempdir()
            .expect("config dir");
        let store =
            sandpen_credentials::FileStore::new(config.path().join("sandpen").join("secrets"));
        for service in ["anthropic", "openai", "google"] {
            store
                .set(
                    service,
                    sandpen_credentials::Scope::Global,
                    sandpen_credentials::SecretValue::new(REAL_KEY),
                )
                .expect("storing a test secret");
        }
        Env {
            bin: PathBuf::from(env!("CARGO_BIN_EXE_sandpen")),
            state: tempfile::Builder::new()
                .prefix("sandpen-state-")
                .tempdir()
                .expect("state dir"),
            config,
            data: common::data_home(),
            ws,
            http_port: line.trim().parse().expect("a port number"),
            root,
            server: std::sync::Mutex::new(server),
        }
    })
}

fn command(args: &[&str]) -> Command {
    let e = env();
    let mut c = Command::new(&e.bin);
    c.args(args)
        .current_dir(&e.ws)
        .env("XDG_STATE_HOME", e.state.path())
        .env("XDG_DATA_HOME", &e.data)
        .env("XDG_CONFIG_HOME", e.config.path())
        .env_remove("SANDPEN_ACCEL")
        .stdin(Stdio::null());
    c
}

fn sandpen(args: &[&str]) -> Output {
    command(args).output().expect("running sandpen")
}

fn ok(args: &[&str]) -> Result<String, Failed> {
    expect_ok(&sandpen(args), &format!("sandpen {args:?}"))
}

/// Runs `sh` in the guest as the sandbox user `agent`.
fn guest(sh: &str) -> Result<String, Failed> {
    ok(&["exec", NAME, "--", "sh", "-c", sh])
}

/// The image is built once (scripts/test does it before the tests, with its
/// progress shown); here only when it is missing.
fn image_ready() -> Result<(), Failed> {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| {
            let out = sandpen(&[
                "image", "build", "--agent", "claude", "--agent", "codex", "--agent", "gemini",
                "--name", IMAGE,
            ]);
            expect_ok(&out, "building the test agent image")
                .map(|_| ())
                .map_err(|e| format!("{e:?}"))
        })
        .clone()
        .map_err(Failed::from)
}

/// The network policy of the tests: nothing but the two test names.
fn policy_ready() -> Result<(), Failed> {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| {
            (|| -> Result<(), Failed> {
                ok(&["policy", "init", "deny-all", "-g"])?;
                ok(&["policy", "allow", "network", "allowed.test", "-g"])?;
                ok(&["policy", "deny", "network", "denied.test", "-g"])?;
                Ok(())
            })()
            .map_err(|e| format!("{e:?}"))
        })
        .clone()
        .map_err(Failed::from)
}

fn run_agent(agent: &str, args: &[&str]) -> Output {
    let mut argv = vec![
        "run",
        agent,
        "--image",
        IMAGE,
        "--memory",
        "2G",
        "--add-host",
        "allowed.test:127.0.0.1",
        "--add-host",
        "denied.test:127.0.0.1",
        "--",
    ];
    argv.extend_from_slice(args);
    sandpen(&argv)
}

fn sandboxes() -> Result<Vec<serde_json::Value>, Failed> {
    let out = ok(&["ls", "--json"])?;
    let rows: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("ls --json: {e}: {out}"))?;
    Ok(rows.as_array().cloned().unwrap_or_default())
}

// ---- no VM ----

fn run_claude_without_a_secret_says_how_to_set_one() -> Result<(), Failed> {
    let e = env();
    let bare_config = tempfile::tempdir()?;
    let out = Command::new(&e.bin)
        .args(["run", "claude", "--image", IMAGE])
        .current_dir(&e.ws)
        .env("XDG_STATE_HOME", e.state.path())
        .env("XDG_DATA_HOME", &e.data)
        .env("XDG_CONFIG_HOME", bare_config.path())
        .stdin(Stdio::null())
        .output()?;
    let err = text(&out.stderr);
    check(
        out.status.code() == Some(125),
        format!("exit {:?}: {err}", out.status.code()),
    )?;
    check(
        err.contains("sandpen secret set anthropic"),
        format!("no hint how to set the key: {err}"),
    )?;
    check(
        sandboxes()?.iter().all(|r| r["name"] != NAME),
        "a sandbox was created anyway",
    )
}

fn kiro_says_exactly_why_it_cannot_run() -> Result<(), Failed> {
    let out = sandpen(&["run", "kiro"]);
    let err = text(&out.stderr);
    check(out.status.code() == Some(125), format!("exit {:?}", out.status.code()))?;
    check(
        err.contains("Kiro CLI cannot run in sandpen") && err.contains("not published on npm"),
        format!("unclear reason: {err}"),
    )
}

fn image_ls_shows_agent_versions() -> Result<(), Failed> {
    image_ready()?;
    let out = ok(&["image", "ls"])?;
    let line = out
        .lines()
        .find(|l| l.starts_with(IMAGE))
        .ok_or_else(|| format!("no {IMAGE} in:\n{out}"))?;
    for agent in ["claude 2.", "codex 0.", "gemini 0."] {
        check(line.contains(agent), format!("{agent} missing: {line}"))?;
    }
    let json = ok(&["image", "ls", "--json"])?;
    let images: serde_json::Value = serde_json::from_str(&json)?;
    let image = images
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == IMAGE))
        .ok_or("image not in --json")?;
    let content_mib = image["sizes"]["rootfs_content"].as_u64().unwrap_or(0) >> 20;
    // The musl copy of Claude Code (369 MB) and npm's cache (500 MB) are trimmed.
    check(
        (1000..2600).contains(&content_mib),
        format!("rootfs content {content_mib} MiB"),
    )
}

// ---- one sandbox, created by the first `run claude` ----

fn claude_version_in_its_sandbox() -> Result<(), Failed> {
    image_ready()?;
    policy_ready()?;
    let out = run_agent("claude", &["--version"]);
    let stdout = expect_ok(&out, "sandpen run claude -- --version")?;
    check(
        stdout.contains("(Claude Code)"),
        format!("not Claude Code's version: {stdout}"),
    )
}

fn codex_attaches_to_the_workspace_sandbox() -> Result<(), Failed> {
    image_ready()?;
    let out = run_agent("codex", &["--version"]);
    let stdout = expect_ok(&out, "sandpen run codex -- --version")?;
    check(
        stdout.contains("codex-cli"),
        format!("not codex's version: {stdout}"),
    )?;
    let ours: Vec<_> = sandboxes()?
        .into_iter()
        .filter(|r| r["workspace"] == env().ws.to_string_lossy().as_ref())
        .collect();
    check(
        ours.len() == 1 && ours[0]["name"] == NAME && ours[0]["agent"] == "claude",
        format!("expected the one sandbox made by `run claude`: {ours:?}"),
    )
}

fn gemini_version_in_the_same_sandbox() -> Result<(), Failed> {
    image_ready()?;
    let out = run_agent("gemini", &["--version"]);
    let stdout = expect_ok(&out, "sandpen run gemini -- --version")?;
    check(
        stdout.trim().starts_with("0.") || stdout.contains("0."),
        format!("not a gemini version: {stdout}"),
    )
}

fn agent_settings_are_written_for_the_sentinel() -> Result<(), Failed> {
    let ws = env().ws.to_string_lossy().into_owned();
    let out = guest(&format!(
        "jq -r '.hasCompletedOnboarding, .customApiKeyResponses.approved[0], \
         .projects[\"{ws}\"].hasTrustDialogAccepted' ~/.claude.json; \
         grep -c danger-full-access ~/.codex/config.toml; \
         jq -r .security.auth.selectedType ~/.gemini/settings.json; \
         id -nG"
    ))?;
    let lines: Vec<&str> = out.lines().collect();
    check(
        lines.len() >= 6
            && lines[..5] == ["true", "proxy-managed", "true", "1", "gemini-api-key"],
        format!("settings: {out}"),
    )?;
    check(
        lines[5].split_whitespace().any(|g| g == "docker"),
        format!("agent is not in the docker group: {}", lines[5]),
    )
}

fn the_guest_never_sees_the_real_key() -> Result<(), Failed> {
    // The agent's environment holds the sentinel, never the stored value.
    let out = run_agent(
        "claude",
        &["--version"],
    );
    expect_ok(&out, "run claude")?;
    let found = guest(&format!(
        "sudo grep -rl --exclude-dir=proc --exclude-dir=sys -s '{REAL_KEY}' /home /root /etc /tmp /run 2>/dev/null | head -3; true"
    ))?;
    check(found.trim().is_empty(), format!("the real key is in the guest: {found}"))
}

fn docker_info_works() -> Result<(), Failed> {
    let out = guest("docker info --format '{{.ServerVersion}} {{.Driver}} {{.CgroupVersion}}'")?;
    check(
        out.contains("overlay2") && out.trim().ends_with('2'),
        format!("docker info: {out}"),
    )
}

/// A rootfs made in the guest from the guest's own /bin/sh and curl and their
/// libraries, imported into the sandbox's Docker.
const MAKE_ROOTFS: &str = r#"set -e
rm -rf /tmp/mini && mkdir -p /tmp/mini/tmp /tmp/mini/etc
for f in /bin/sh /usr/bin/curl; do
  cp --parents -L "$f" /tmp/mini
  for lib in $(ldd "$f" | grep -o '/[^ ]*'); do cp --parents -L "$lib" /tmp/mini; done
done
tar -C /tmp/mini -cf /tmp/mini.tar .
docker import /tmp/mini.tar sandpen-mini >/dev/null
echo imported"#;

fn docker_import_and_run_prints_from_the_nested_container() -> Result<(), Failed> {
    let out = guest(MAKE_ROOTFS)?;
    check(out.contains("imported"), format!("import: {out}"))?;
    let out = guest(
        "docker run --rm sandpen-mini /bin/sh -c 'echo hello from the nested container'",
    )?;
    check(
        out.contains("hello from the nested container"),
        format!("docker run: {out}"),
    )
}

fn nested_container_egress_goes_through_the_policy() -> Result<(), Failed> {
    let port = env().http_port;
    // Allowed: the container reaches the host's server through the redirect.
    let out = guest(&format!(
        "docker run --rm sandpen-mini /usr/bin/curl -sS -m 30 http://allowed.test:{port}/from-container"
    ))?;
    check(
        out.contains("hello from the host /from-container"),
        format!("allowed request from a container: {out}"),
    )?;
    // Denied: refused, nothing arrives, and the log names the sandbox.
    let out = sandpen(&[
        "exec",
        NAME,
        "--",
        "docker",
        "run",
        "--rm",
        "sandpen-mini",
        "/usr/bin/curl",
        "-sS",
        "-m",
        "30",
        &format!("http://denied.test:{port}/must-not-arrive"),
    ]);
    check(
        !out.status.success(),
        format!("the denied request succeeded: {}", text(&out.stdout)),
    )?;
    let seen = std::fs::read_to_string(env().root.path().join("requests.log")).unwrap_or_default();
    check(
        !seen.contains("must-not-arrive"),
        "the denied request reached the server",
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = ok(&["policy", "log", NAME, "--json", "--limit", "1000"])?;
        let record = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|r| r["host"] == "denied.test" && r["port"] == port);
        if let Some(r) = record {
            return check(
                r["decision"] == "deny" && r["sandbox"] == NAME && r["mode"] == "transparent",
                format!("record: {r}"),
            );
        }
        if Instant::now() > deadline {
            return Err(format!("no log record for denied.test:{port}:\n{log}").into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn agent_home_persists_across_stop_and_start() -> Result<(), Failed> {
    guest("echo kept > ~/.sandpen-persist-check")?;
    ok(&["stop", NAME])?;
    ok(&["start", NAME])?;
    let out = guest("cat ~/.sandpen-persist-check; jq -r .hasCompletedOnboarding ~/.claude.json")?;
    check(out.lines().collect::<Vec<_>>() == ["kept", "true"], format!("after restart: {out}"))
}

type TestFn = fn() -> Result<(), Failed>;

fn main() {
    let args = Arguments {
        test_threads: Some(1),
        ..Arguments::from_args()
    };
    let tests: Vec<(&str, TestFn)> = vec![
        (
            "run_claude_without_a_secret_says_how_to_set_one",
            run_claude_without_a_secret_says_how_to_set_one,
        ),
        (
            "kiro_says_exactly_why_it_cannot_run",
            kiro_says_exactly_why_it_cannot_run,
        ),
        ("image_ls_shows_agent_versions", image_ls_shows_agent_versions),
        ("claude_version_in_its_sandbox", claude_version_in_its_sandbox),
        (
            "codex_attaches_to_the_workspace_sandbox",
            codex_attaches_to_the_workspace_sandbox,
        ),
        (
            "gemini_version_in_the_same_sandbox",
            gemini_version_in_the_same_sandbox,
        ),
        (
            "agent_settings_are_written_for_the_sentinel",
            agent_settings_are_written_for_the_sentinel,
        ),
        (
            "the_guest_never_sees_the_real_key",
            the_guest_never_sees_the_real_key,
        ),
        ("docker_info_works", docker_info_works),
        (
            "docker_import_and_run_prints_from_the_nested_container",
            docker_import_and_run_prints_from_the_nested_container,
        ),
        (
            "nested_container_egress_goes_through_the_policy",
            nested_container_egress_goes_through_the_policy,
        ),
        (
            "agent_home_persists_across_stop_and_start",
            agent_home_persists_across_stop_and_start,
        ),
    ];
    let trials = tests.into_iter().map(|(n, f)| Trial::test(n, f)).collect();
    let conclusion = libtest_mimic::run(&args, trials);
    let _ = sandpen(&["rm", "-f", NAME]);
    if let Ok(mut s) = env().server.lock() {
        let _ = s.kill();
        let _ = s.wait();
    }
    conclusion.exit();
}
