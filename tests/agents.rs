//! End-to-end tests of agent sandboxes: the real agent CLIs from npm inside a
//! real VM, launched by `sandpen run AGENT`, and the sandbox's own Docker
//! engine with its containers' egress going through the host policy.
//!
//! One image with three agents (`test-agents`, built by scripts/test with
//! `sandpen image build --agent claude --agent codex --agent gemini --name
//! test-agents`, or here on first use) and one sandbox, shared by the tests in
//! order: `run claude` creates it, `run codex` and `run gemini` attach to it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};

mod common;
use common::{check, expect_ok, text, Cli};

/// The sandbox's name (from the workspace folder's name).
const NAME: &str = "agents";
/// The image the tests use: all three agents in one, so one build serves all.
const IMAGE: &str = "test-agents";
/// What the test puts in the secret store; the guest must never see it.
const REAL_KEY: &str = "sk-sandpen-test-real-key-0123456789";

struct Env {
    cli: Cli,
    root: tempfile::TempDir,
    http_port: u16,
    model_port: u16,
    server: std::sync::Mutex<Child>,
}

/// Two servers, plain HTTP on 127.0.0.1 (`hello from the host PATH`, each path
/// logged to `requests.log`), and a mock model API over TLS on 127.0.0.4:443 for
/// `api.anthropic.com` and `api.openai.com` (certificate from a test CA the
/// sandbox trusts upstream through `--upstream-ca`). The mock speaks the
/// Anthropic Messages API (streaming server-sent events, or JSON) and the
/// OpenAI Responses API (streaming), always answering [`MOCK_TEXT`], and logs
/// every request with its headers to `model-requests.jsonl`.
const SERVERS: &str = r##"
import http.server, ssl, sys, threading, os, json
root = sys.argv[1]
paths = open(os.path.join(root, "requests.log"), "a", buffering=1)
log = open(os.path.join(root, "model-requests.jsonl"), "a", buffering=1)
TEXT = "Hi from the mock model"
def sse(events):
    return b"".join(("event: %s\ndata: %s\n\n" % (e, json.dumps(d))).encode() for e, d in events)
def anthropic_stream():
    return sse([
        ("message_start", {"type": "message_start", "message": {"id": "msg_mock", "type": "message", "role": "assistant",
            "model": "claude-sonnet-4-5", "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": TEXT}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 6}}),
        ("message_stop", {"type": "message_stop"}),
    ])
def anthropic_json():
    return json.dumps({"id": "msg_mock", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": TEXT}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 6}}).encode()
def openai_stream():
    item = {"id": "msg_mock", "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": TEXT, "annotations": []}]}
    resp = {"id": "resp_mock", "object": "response", "created_at": 1, "status": "completed", "model": "gpt-5",
            "output": [item], "usage": {"input_tokens": 10, "output_tokens": 6, "total_tokens": 16,
            "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}}
    return sse([
        ("response.created", {"type": "response.created", "sequence_number": 0, "response": dict(resp, status="in_progress", output=[])}),
        ("response.output_item.added", {"type": "response.output_item.added", "sequence_number": 1, "output_index": 0,
            "item": dict(item, status="in_progress", content=[])}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": 2, "item_id": "msg_mock",
            "output_index": 0, "content_index": 0, "delta": TEXT}),
        ("response.output_item.done", {"type": "response.output_item.done", "sequence_number": 3, "output_index": 0, "item": item}),
        ("response.completed", {"type": "response.completed", "sequence_number": 4, "response": resp}),
    ])
class Model(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.handle_any(b"")
    def do_POST(self):
        self.handle_any(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
    def handle_any(self, body):
        log.write(json.dumps({"host": self.headers.get("Host", ""), "method": self.command, "path": self.path,
            "headers": [[k.lower(), v] for k, v in self.headers.items()]}) + "\n")
        try:
            req = json.loads(body or b"{}")
        except Exception:
            req = {}
        path = self.path.split("?")[0]
        if path == "/v1/messages":
            if req.get("stream"):
                self.reply(200, "text/event-stream", anthropic_stream())
            else:
                self.reply(200, "application/json", anthropic_json())
        elif path == "/v1/responses":
            self.reply(200, "text/event-stream", openai_stream())
        else:
            self.reply(404, "application/json", b'{"type":"error","error":{"type":"not_found_error","message":"mock"}}')
    def reply(self, code, ctype, data):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *a):
        pass
class Plain(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        paths.write(self.path + "\n")
        body = ("hello from the host " + self.path + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Plain)
# Credential routes serve port 443 only (a route matches host and port): the
# model mock listens there, on a loopback address of its own (root, as CI).
model = http.server.ThreadingHTTPServer(("127.0.0.4", 443), Model)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(os.path.join(root, "model.pem"), os.path.join(root, "model.key"))
model.socket = ctx.wrap_socket(model.socket, server_side=True)
for s in (plain, model):
    threading.Thread(target=s.serve_forever, daemon=True).start()
print(plain.server_address[1], model.server_address[1], flush=True)
threading.Event().wait()
"##;

/// What the mock model answers.
const MOCK_TEXT: &str = "Hi from the mock model";

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let (root, ws) = common::workspace("sandpen-agents-", NAME);
        common::make_pki(
            root.path(),
            "model",
            &["api.anthropic.com", "api.openai.com"],
        );
        let mut server = Command::new("python3")
            .arg("-c")
            .arg(SERVERS)
            .arg(root.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(server.stdout.take().expect("server stdout"))
            .read_line(&mut line)
            .expect("the servers' ports");
        let ports: Vec<u16> = line
            .split_whitespace()
            .map(|p| p.parse().expect("a port number"))
            .collect();
        let cli = Cli::new(ws);
        let store =
            sandpen_credentials::FileStore::new(cli.config.path().join("sandpen").join("secrets"));
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
            cli,
            http_port: ports[0],
            model_port: ports[1],
            root,
            server: std::sync::Mutex::new(server),
        }
    })
}

fn command(args: &[&str]) -> Command {
    let mut c = env().cli.command(args);
    // The test writes its secrets into the file store.
    c.env("SANDPEN_SECRET_STORE", "file");
    c
}

fn sandpen(args: &[&str]) -> Output {
    command(args).output().expect("running sandpen")
}

fn ok(args: &[&str]) -> Result<String, Failed> {
    env()
        .cli
        .expect_ok(&sandpen(args), &format!("sandpen {args:?}"))
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
                ok(&["policy", "allow", "network", "api.anthropic.com", "-g"])?;
                ok(&["policy", "allow", "network", "api.openai.com", "-g"])?;
                Ok(())
            })()
            .map_err(|e| format!("{e:?}"))
        })
        .clone()
        .map_err(Failed::from)
}

/// `sandpen run AGENT -- ARGS` with the options the first run creates the
/// sandbox with (later runs attach and ignore them).
fn run_agent(agent: &str, args: &[&str]) -> Output {
    let upstream_ca = env().root.path().join("model-ca.pem");
    let upstream_ca = upstream_ca.to_string_lossy().into_owned();
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
        "--add-host",
        "api.anthropic.com:127.0.0.4",
        "--add-host",
        "api.openai.com:127.0.0.4",
        "--upstream-ca",
        &upstream_ca,
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
    let out = Command::new(&e.cli.bin)
        .args(["run", "claude", "--image", IMAGE])
        .current_dir(&e.cli.ws)
        .env("XDG_STATE_HOME", e.cli.state.path())
        .env("XDG_DATA_HOME", &e.cli.data)
        .env("XDG_CONFIG_HOME", bare_config.path())
        .env("SANDPEN_SECRET_STORE", "file")
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

fn an_image_without_the_agent_is_refused_before_anything_starts() -> Result<(), Failed> {
    let e = env();
    let other = tempfile::tempdir()?;
    let out = Command::new(&e.cli.bin)
        .args(["run", "gemini", "--image", "default", "--", "--version"])
        .current_dir(other.path())
        .env("XDG_STATE_HOME", e.cli.state.path())
        .env("XDG_DATA_HOME", &e.cli.data)
        .env("XDG_CONFIG_HOME", e.cli.config.path())
        // The test writes its secrets into the file store.
        .env("SANDPEN_SECRET_STORE", "file")
        .stdin(Stdio::null())
        .output()?;
    let err = text(&out.stderr);
    check(
        out.status.code() == Some(125) && err.contains("image default, which has no Gemini CLI"),
        format!("exit {:?}: {err}", out.status.code()),
    )?;
    let here = other.path().canonicalize()?;
    check(
        sandboxes()?
            .iter()
            .all(|r| r["workspace"] != here.to_string_lossy().as_ref()),
        "a sandbox was created anyway",
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
        .filter(|r| r["workspace"] == env().cli.ws.to_string_lossy().as_ref())
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
    let ws = env().cli.ws.to_string_lossy().into_owned();
    let out = guest(&format!(
        "jq -r '.hasCompletedOnboarding, .customApiKeyResponses.approved[0], \
         .projects[\"{ws}\"].hasTrustDialogAccepted' ~/.claude.json; \
         grep -c danger-full-access ~/.codex/config.toml; \
         jq -r .security.auth.selectedType ~/.gemini/settings.json; \
         id -nG"
    ))?;
    let lines: Vec<&str> = out.lines().collect();
    check(
        lines.len() >= 6 && lines[..5] == ["true", "proxy-managed", "true", "1", "gemini-api-key"],
        format!("settings: {out}"),
    )?;
    check(
        lines[5].split_whitespace().any(|g| g == "docker"),
        format!("agent is not in the docker group: {}", lines[5]),
    )
}

fn the_guest_never_sees_the_real_key() -> Result<(), Failed> {
    // The agent's environment holds the sentinel, never the stored value.
    let out = run_agent("claude", &["--version"]);
    expect_ok(&out, "run claude")?;
    let found = guest(&format!(
        "sudo grep -rl --exclude-dir=proc --exclude-dir=sys -s '{REAL_KEY}' /home /root /etc /tmp /run 2>/dev/null | head -3; true"
    ))?;
    check(
        found.trim().is_empty(),
        format!("the real key is in the guest: {found}"),
    )
}

/// The mock's requests to `path` so far: (host header, x-api-key, authorization).
fn model_requests(path: &str) -> Vec<(String, String, String)> {
    let text =
        std::fs::read_to_string(env().root.path().join("model-requests.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["path"].as_str().is_some_and(|p| p.starts_with(path)))
        .map(|r| {
            let header = |name: &str| {
                r["headers"]
                    .as_array()
                    .and_then(|h| h.iter().find(|kv| kv[0] == name))
                    .and_then(|kv| kv[1].as_str())
                    .unwrap_or("")
                    .to_string()
            };
            (
                r["host"].as_str().unwrap_or("").to_string(),
                header("x-api-key"),
                header("authorization"),
            )
        })
        .collect()
}

/// The real Claude Code CLI, headless, against the mock Messages API reached
/// as api.anthropic.com: it prints the mock's text, and the mock saw the
/// stored key, never the sentinel. The mock cannot take port 443 on a shared
/// host, so the agent is pointed at its port with ANTHROPIC_BASE_URL in its
/// settings (the host name, and so the credential route, stay the same).
/// Node's own `fetch` (undici, no proxy variables: the transparent path),
/// trusting the sandbox CA through `NODE_EXTRA_CA_CERTS`, sends the sentinel;
/// the mock gets the real key.
fn node_fetch_gets_the_real_key_through_the_proxy() -> Result<(), Failed> {
    image_ready()?;
    policy_ready()?;
    let out = run_agent("claude", &["--version"]);
    expect_ok(&out, "run claude")?;
    let port = env().model_port;
    let before = model_requests("/v1/messages").len();
    let out = guest(&format!(
        "node -e \"fetch('https://api.anthropic.com:{port}/v1/messages?from=node', \
           {{method: 'POST', headers: {{'x-api-key': 'proxy-managed', 'content-type': 'application/json'}}, \
             body: '{{}}'}}).then(r => r.text()).then(t => console.log('status-ok', t.length))\""
    ))?;
    check(out.contains("status-ok"), format!("node fetch: {out}"))?;
    let seen = model_requests("/v1/messages");
    let new: Vec<_> = seen.iter().skip(before).collect();
    check(!new.is_empty(), "the mock got no request from node")?;
    for (host, key, _) in new {
        check(
            host.starts_with("api.anthropic.com") && key == REAL_KEY,
            format!("node's request arrived with x-api-key {key:?} for {host:?}"),
        )?;
    }
    Ok(())
}

fn claude_headless_gets_the_mock_reply_with_the_real_key() -> Result<(), Failed> {
    let port = env().model_port;
    guest(&format!(
        "mkdir -p ~/.claude && jq -n '{{env: {{ANTHROPIC_BASE_URL: \"https://api.anthropic.com:{port}\"}}}}' \
         > ~/.claude/settings.json"
    ))?;
    let out = run_agent("claude", &["-p", "say hi"]);
    let stdout = expect_ok(&out, "sandpen run claude -- -p 'say hi'")?;
    check(
        stdout.contains(MOCK_TEXT),
        format!("Claude Code did not print the mock's reply: {stdout}"),
    )?;
    let seen = model_requests("/v1/messages");
    check(!seen.is_empty(), "the mock got no Messages request")?;
    for (host, key, auth) in &seen {
        check(
            host.starts_with("api.anthropic.com") && key == REAL_KEY,
            format!("the mock got x-api-key {key:?} for host {host:?}"),
        )?;
        check(
            !auth.contains("proxy-managed"),
            format!("the sentinel reached the upstream: {auth}"),
        )?;
    }
    Ok(())
}

/// The real Codex CLI (`codex exec`) against the mock Responses API reached
/// as api.openai.com, through a provider defined on its command line (Codex
/// ignores OPENAI_BASE_URL for its built-in provider).
fn codex_exec_gets_the_mock_reply_with_the_real_key() -> Result<(), Failed> {
    let port = env().model_port;
    let provider = format!(
        "model_providers.mock={{name=\"mock\",base_url=\"https://api.openai.com:{port}/v1\",\
         env_key=\"OPENAI_API_KEY\",wire_api=\"responses\"}}"
    );
    let out = run_agent(
        "codex",
        &[
            "-c",
            "model_provider=mock",
            "-c",
            &provider,
            "exec",
            "--skip-git-repo-check",
            "say hi",
        ],
    );
    let stdout = expect_ok(&out, "sandpen run codex -- exec 'say hi'")?;
    check(
        stdout.contains(MOCK_TEXT),
        format!("Codex did not print the mock's reply: {stdout}"),
    )?;
    let seen = model_requests("/v1/responses");
    check(!seen.is_empty(), "the mock got no Responses request")?;
    for (host, _, auth) in &seen {
        check(
            host.starts_with("api.openai.com") && auth == &format!("Bearer {REAL_KEY}"),
            format!("the mock got authorization {auth:?} for host {host:?}"),
        )?;
    }
    Ok(())
}

/// Runs a command on a pseudo-terminal until `want` shows in its output (ANSI
/// escapes removed) or 120 s pass, then sends ^C three times; prints what it saw.
const ON_A_TTY: &str = r#"
import os, pty, sys, time, select, re
want = sys.argv[1].encode()
pid, fd = pty.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
out, deadline = b"", time.time() + 120
strip = lambda b: re.sub(rb"\x1b\[[0-9;?<>]*[a-zA-Z]|\x1b\][^\x07]*\x07", b"", b)
while time.time() < deadline and want not in strip(out):
    r, _, _ = select.select([fd], [], [], 1)
    if r:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        out += data
for _ in range(3):
    try:
        os.write(fd, b"\x03")
    except OSError:
        break
    time.sleep(1)
sys.stdout.write(strip(out).decode("utf-8", "replace"))
"#;

/// Interactive Claude Code, the way a user starts it, reaches its prompt in
/// bypass-permissions mode with no onboarding, theme, folder-trust or
/// API-key question in between: the settings written at launch hold.
fn interactive_claude_opens_at_its_prompt() -> Result<(), Failed> {
    let e = env();
    let out = Command::new("python3")
        .arg("-c")
        .arg(ON_A_TTY)
        .arg("bypass permissions on")
        .arg(&e.cli.bin)
        .args(["run", "claude"])
        .current_dir(&e.cli.ws)
        .env("XDG_STATE_HOME", e.cli.state.path())
        .env("XDG_DATA_HOME", &e.cli.data)
        .env("XDG_CONFIG_HOME", e.cli.config.path())
        .env("SANDPEN_SECRET_STORE", "file")
        .env("TERM", "xterm-256color")
        .env_remove("SANDPEN_ACCEL")
        .stdin(Stdio::null())
        .output()?;
    let screen = text(&out.stdout);
    let tail: String = {
        let chars: Vec<char> = screen.chars().collect();
        chars[chars.len().saturating_sub(3000)..].iter().collect()
    };
    check(
        screen.contains("bypass permissions on") && screen.contains("Claude Code"),
        format!("Claude Code did not open at its prompt:\n{tail}"),
    )
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
    let out =
        guest("docker run --rm sandpen-mini /bin/sh -c 'echo hello from the nested container'")?;
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
        "-w",
        "\ncode=%{http_code}",
        &format!("http://denied.test:{port}/must-not-arrive"),
    ]);
    // Refused with the proxy's 403 page, which says why (docs/egress.md).
    let body = text(&out.stdout);
    check(
        body.contains("code=403") && body.contains("denied-by-rule") && !body.contains("hello"),
        format!(
            "the denied request was not refused: {:?} {body}",
            out.status
        ),
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
    check(
        out.lines().collect::<Vec<_>>() == ["kept", "true"],
        format!("after restart: {out}"),
    )
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
            "an_image_without_the_agent_is_refused_before_anything_starts",
            an_image_without_the_agent_is_refused_before_anything_starts,
        ),
        (
            "image_ls_shows_agent_versions",
            image_ls_shows_agent_versions,
        ),
        (
            "claude_version_in_its_sandbox",
            claude_version_in_its_sandbox,
        ),
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
        (
            "node_fetch_gets_the_real_key_through_the_proxy",
            node_fetch_gets_the_real_key_through_the_proxy,
        ),
        (
            "claude_headless_gets_the_mock_reply_with_the_real_key",
            claude_headless_gets_the_mock_reply_with_the_real_key,
        ),
        (
            "codex_exec_gets_the_mock_reply_with_the_real_key",
            codex_exec_gets_the_mock_reply_with_the_real_key,
        ),
        (
            "interactive_claude_opens_at_its_prompt",
            interactive_claude_opens_at_its_prompt,
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
