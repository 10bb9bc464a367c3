//! End-to-end credential tests: real clients in a real guest (curl, git)
//! send the sentinel; a mock upstream on the host's loopback, reached as
//! `api.anthropic.com` and `github.com` through `--add-host` and trusted
//! through `--upstream-ca`, records what arrives. Then the secret is looked
//! for where it must not be: the guest's memory, its disk, the sandbox's
//! state folder and logs.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

use libtest_mimic::{Arguments, Failed, Trial};

mod common;
use common::{check, text, Cli};

const NAME: &str = "creds";

struct Env {
    cli: Cli,
    root: tempfile::TempDir,
    /// Trusted through --upstream-ca: api.anthropic.com, github.com, other.test.
    good_port: u16,
    /// A certificate from a CA nobody trusts: api.openai.com.
    bad_port: u16,
    anthropic_key: String,
    github_token: String,
    _servers: std::sync::Mutex<Child>,
}

/// Two HTTPS servers. Each request is logged as a JSON line (server, path,
/// headers). `/v1/messages` streams two server-sent events and holds the
/// second until a `release` file appears in the workspace; `/o/r.git/info/refs`
/// answers like a git smart-HTTP server; anything else answers `ok PATH`.
/// Nothing is echoed back, so the key can only reach the guest by a leak.
const SERVERS: &str = r##"
import http.server, ssl, sys, threading, os, json, time
root, ws = sys.argv[1], sys.argv[2]
log = open(os.path.join(root, "requests.jsonl"), "a", buffering=1)
SHA = "8f3c2b1a9d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a"
def pkt(s):
    b = s.encode()
    return ("%04x" % (len(b) + 4)).encode() + b
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.answer()
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.answer()
    def answer(self):
        log.write(json.dumps({"server": self.server.name, "path": self.path,
            "headers": [[k.lower(), v] for k, v in self.headers.items()]}) + "\n")
        if self.path.startswith("/v1/messages"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b"event: first\ndata: {}\n\n")
            self.wfile.flush()
            for _ in range(600):
                if os.path.exists(os.path.join(ws, "release")):
                    break
                time.sleep(0.05)
            self.wfile.write(b"event: last\ndata: {}\n\n")
            self.wfile.flush()
            return
        if "/info/refs" in self.path:
            body = (pkt("# service=git-upload-pack\n") + b"0000"
                + pkt(SHA + " HEAD\0symref=HEAD:refs/heads/main\n")
                + pkt(SHA + " refs/heads/main\n") + b"0000")
            ctype = "application/x-git-upload-pack-advertisement"
        else:
            body = ("ok " + self.path + "\n").encode()
            ctype = "text/plain"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
servers = []
# Credential routes serve port 443 only (a route matches host and port), so
# the mocks listen on 443, each on a loopback address of its own (root, as
# CI runs the tests).
for name, addr in (("good", "127.0.0.2"), ("bad", "127.0.0.3")):
    s = http.server.ThreadingHTTPServer((addr, 443), H)
    s.name = name
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(os.path.join(root, name + ".pem"), os.path.join(root, name + ".key"))
    s.socket = ctx.wrap_socket(s.socket, server_side=True)
    threading.Thread(target=s.serve_forever, daemon=True).start()
    servers.append(s)
print(servers[0].server_address[1], servers[1].server_address[1], flush=True)
threading.Event().wait()
"##;

fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .expect("random bytes");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

static ENV: OnceLock<Env> = OnceLock::new();

fn env() -> &'static Env {
    ENV.get_or_init(|| {
        let (root, ws) = common::workspace("sandpen-creds-", NAME);
        common::make_pki(
            root.path(),
            "good",
            &[
                "api.anthropic.com",
                "github.com",
                "other.test",
                "custom.test",
            ],
        );
        common::make_pki(root.path(), "bad", &["api.openai.com"]);
        // The guest verifies other.test (tunneled, not intercepted) itself.
        // `.crt`, not `.pem`: `*.pem` is among the default deny-read file rules.
        std::fs::copy(root.path().join("good-ca.pem"), ws.join("upstream-ca.crt")).unwrap();
        let mut servers = Command::new("python3")
            .arg("-c")
            .arg(SERVERS)
            .arg(root.path())
            .arg(&ws)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(servers.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let ports: Vec<u16> = line
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        Env {
            cli: Cli::new(ws),
            root,
            good_port: ports[0],
            bad_port: ports[1],
            anthropic_key: format!("sk-ant-e2e-{}", random_hex(16)),
            github_token: format!("ghp_e2e{}", random_hex(16)),
            _servers: std::sync::Mutex::new(servers),
        }
    })
}

fn command(args: &[&str]) -> Command {
    env().cli.command(args)
}

fn sandpen(args: &[&str]) -> Output {
    env().cli.run(args)
}

fn ok(args: &[&str]) -> Result<String, Failed> {
    env().cli.ok(args)
}

/// `sandpen ARGS` with `input` on stdin (not a terminal).
fn with_stdin(args: &[&str], input: &str) -> Result<String, Failed> {
    let mut child = command(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running sandpen");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    common::expect_ok(&out, &format!("sandpen {args:?}"))
}

/// Runs `sh` in the guest as root; returns (exit code, stdout + stderr).
fn guest(sh: &str) -> (i32, String) {
    let out = sandpen(&["exec", "-u", "root", NAME, "--", "sh", "-c", sh]);
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout) + &text(&out.stderr),
    )
}

/// What the mock saw for requests whose path starts with `prefix`.
fn seen(prefix: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(env().root.path().join("requests.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["path"].as_str().is_some_and(|p| p.starts_with(prefix)))
        .collect()
}

fn header(req: &serde_json::Value, name: &str) -> Vec<String> {
    req["headers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h[0] == name)
        .filter_map(|h| h[1].as_str().map(str::to_string))
        .collect()
}

fn ready() -> Result<(), Failed> {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| setup().map_err(|e| format!("setting up the sandbox: {e:?}")))
        .clone()
        .map_err(Failed::from)
}

fn setup() -> Result<(), Failed> {
    let e = env();
    let good_ca = e.root.path().join("good-ca.pem");
    ok(&["policy", "init", "deny-all"])?;
    ok(&[
        "create",
        "--cpus",
        "1",
        "--memory",
        "768M",
        "--add-host",
        "api.anthropic.com:127.0.0.2",
        "--add-host",
        "github.com:127.0.0.2",
        "--add-host",
        "other.test:127.0.0.2",
        "--add-host",
        "api.openai.com:127.0.0.3",
        "--add-host",
        "custom.test:127.0.0.2",
        "--upstream-ca",
        good_ca.to_str().unwrap(),
    ])?;
    for host in [
        "api.anthropic.com",
        "github.com",
        "other.test",
        "api.openai.com",
        "custom.test",
    ] {
        ok(&["policy", "allow", "network", host, NAME])?;
    }
    with_stdin(
        &["secret", "set", "anthropic"],
        &format!("{}\n", e.anthropic_key),
    )?;
    with_stdin(&["secret", "set", "github", NAME], &e.github_token)?;
    with_stdin(&["secret", "set", "openai"], "sk-openai-e2e-unused\n")?;
    ok(&["start", NAME])?;
    Ok(())
}

fn the_guest_sees_only_sentinels_and_trusts_the_sandbox_ca() -> Result<(), Failed> {
    ready()?;
    let (code, out) = guest(
        "echo A=$ANTHROPIC_API_KEY G=$GH_TOKEN O=$OPENAI_API_KEY M=${GEMINI_API_KEY-unset}; \
         echo N=$NODE_EXTRA_CA_CERTS S=$SSL_CERT_FILE; \
         grep -c 'BEGIN CERTIFICATE' $NODE_EXTRA_CA_CERTS; \
         grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt; \
         env | grep -c -e sk-ant -e ghp_ || true",
    );
    check(code == 0, format!("exit {code}: {out}"))?;
    check(
        out.contains("A=proxy-managed G=proxy-managed O=proxy-managed M=unset"),
        format!("guest environment: {out}"),
    )?;
    check(
        out.contains("N=/etc/ssl/certs/ca-certificates.crt")
            && out.contains("S=/etc/ssl/certs/ca-certificates.crt"),
        format!("CA environment: {out}"),
    )?;
    let e = env();
    check(
        !out.contains(&e.anthropic_key) && !out.contains(&e.github_token),
        "a secret is in the guest environment",
    )?;
    let ca = std::fs::read_to_string(
        e.cli
            .state
            .path()
            .join("sandpen/sandboxes")
            .join(NAME)
            .join("ca/ca.pem"),
    )?;
    let (_, guest_ca) = guest("cat /usr/local/share/ca-certificates/sandpen-sandbox-ca.crt");
    check(
        guest_ca.trim() == ca.trim(),
        "the guest's CA file is not the sandbox CA",
    )?;
    let (_, keys) = guest("grep -rl 'PRIVATE KEY' /usr/local/share/ca-certificates /etc/ssl/certs 2>/dev/null | wc -l");
    check(
        keys.trim() == "0",
        format!("a private key in the guest trust store: {keys}"),
    )
}

fn curl_sentinel_becomes_the_key_only_on_the_route_host() -> Result<(), Failed> {
    ready()?;
    let e = env();
    let port = e.good_port;
    // Through the transparent path and through HTTPS_PROXY.
    for (path, flags) in [
        ("/v1/models-transparent", "--noproxy '*'"),
        ("/v1/models-proxy", ""),
    ] {
        let (code, out) = guest(&format!(
            "curl -sS -m 20 {flags} -H 'x-api-key: proxy-managed' https://api.anthropic.com:{port}{path}"
        ));
        check(
            code == 0 && out.contains(&format!("ok {path}")),
            format!("{path}: {code} {out}"),
        )?;
        let reqs = seen(path);
        let got = reqs
            .first()
            .map(|r| header(r, "x-api-key"))
            .unwrap_or_default();
        check(
            got == vec![e.anthropic_key.clone()],
            format!("{path}: the mock got x-api-key {got:?}"),
        )?;
    }
    // Another allowed host: tunneled, the sentinel goes out unchanged.
    let (code, out) = guest(&format!(
        "curl -sS -m 20 --cacert {}/upstream-ca.crt -H 'x-api-key: proxy-managed' https://other.test:{port}/other",
        e.cli.ws.display()
    ));
    check(
        code == 0 && out.contains("ok /other"),
        format!("other.test: {code} {out}"),
    )?;
    let got = seen("/other")
        .first()
        .map(|r| header(r, "x-api-key"))
        .unwrap_or_default();
    check(
        got == vec!["proxy-managed".to_string()],
        format!("other.test got {got:?}"),
    )?;
    // The request's log line names the credential, never its value.
    let log = ok(&["policy", "log", NAME, "--json", "--limit", "1000"])?;
    let line = log
        .lines()
        .find(|l| l.contains("/v1/models-transparent"))
        .unwrap_or_default();
    check(
        line.contains("\"credential\":\"anthropic (global)\"") && line.contains("\"status\":200"),
        format!("log line: {line}"),
    )?;
    check(
        !log.contains(&e.anthropic_key),
        "the key is in the network log",
    )
}

fn git_over_https_gets_the_token() -> Result<(), Failed> {
    ready()?;
    let e = env();
    let (code, out) = guest(&format!(
        "cd /tmp && git ls-remote https://github.com:{}/o/r.git",
        e.good_port
    ));
    check(
        code == 0 && out.contains("refs/heads/main"),
        format!("git ls-remote: {code} {out}"),
    )?;
    let reqs = seen("/o/r.git/info/refs");
    let auth = reqs
        .first()
        .map(|r| header(r, "authorization"))
        .unwrap_or_default();
    use base64::Engine as _;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD
            .encode(format!("x-access-token:{}", e.github_token))
    );
    check(
        auth == vec![expected],
        format!("git's request carried {auth:?}"),
    )
}

fn sse_arrives_chunk_by_chunk() -> Result<(), Failed> {
    ready()?;
    let e = env();
    let ws = e.cli.ws.display();
    let _ = std::fs::remove_file(e.cli.ws.join("release"));
    // The guest waits for the first event while the mock holds the last; only
    // then does it let the mock go on.
    let (code, out) = guest(&format!(
        "curl -sSN -m 60 -X POST -H 'x-api-key: proxy-managed' https://api.anthropic.com:{}/v1/messages > /tmp/sse & \
         for i in $(seq 300); do grep -q first /tmp/sse && break; sleep 0.1; done; \
         grep -q last /tmp/sse && echo LAST-TOO-EARLY; \
         grep -q first /tmp/sse && echo FIRST-ARRIVED; \
         touch {ws}/release; wait; cat /tmp/sse",
        e.good_port
    ));
    let _ = std::fs::remove_file(e.cli.ws.join("release"));
    check(
        code == 0
            && out.contains("FIRST-ARRIVED")
            && !out.contains("LAST-TOO-EARLY")
            && out.contains("event: last"),
        format!("SSE: {code} {out}"),
    )
}

fn a_wrong_upstream_certificate_fails_closed() -> Result<(), Failed> {
    ready()?;
    let port = env().bad_port;
    let (code, out) = guest(&format!(
        "curl -sS -m 20 -o /dev/null -w '%{{http_code}}' -H 'authorization: Bearer proxy-managed' https://api.openai.com:{port}/v1/responses"
    ));
    check(
        code == 0 && out.trim() == "502",
        format!("curl: {code} {out}"),
    )?;
    check(
        seen("/v1/responses").is_empty(),
        "the untrusted upstream got the request",
    )?;
    let log = ok(&["policy", "log", NAME, "--json", "--limit", "1000"])?;
    let line = log
        .lines()
        .find(|l| l.contains("/v1/responses"))
        .unwrap_or_default();
    check(
        line.contains("upstream-tls: invalid peer certificate"),
        format!("log line: {line}"),
    )
}

/// `secret set-custom` prints a placeholder; the guest sends it, and only
/// custom.test's request carries the value, in the given header and format.
fn a_custom_route_swaps_its_placeholder() -> Result<(), Failed> {
    ready()?;
    let e = env();
    let value = format!("custom-{}", random_hex(8));
    // A route serves one port: the mock's.
    let host = format!("custom.test:{}", e.good_port);
    let out = with_stdin(
        &[
            "secret",
            "set-custom",
            "--host",
            &host,
            "--header",
            "X-Custom-Key",
            "--format",
            "Token {}",
            "mine",
        ],
        &value,
    )?;
    let placeholder = out
        .split_whitespace()
        .find(|w| w.starts_with("sandpen-cs-"))
        .ok_or_else(|| format!("no placeholder in: {out}"))?
        .to_string();
    let (code, out) = guest(&format!(
        "curl -sS -m 20 -H 'X-Custom-Key: Token {placeholder}' https://custom.test:{}/custom",
        e.good_port
    ));
    if code != 0 {
        let log = ok(&["policy", "log", NAME, "--json", "--limit", "1000"])?;
        let last: Vec<&str> = log.lines().rev().take(3).collect();
        return Err(format!("curl: {code} {out}; log: {last:?}").into());
    }
    check(out.contains("ok /custom"), format!("curl: {out}"))?;
    let got = seen("/custom")
        .first()
        .map(|r| header(r, "x-custom-key"))
        .unwrap_or_default();
    check(
        got == vec![format!("Token {value}")],
        format!("custom.test got {got:?}"),
    )?;
    let ls = ok(&["secret", "ls"])?;
    check(
        ls.contains("mine") && ls.contains("custom.test") && !ls.contains(&value),
        format!("secret ls: {ls}"),
    )
}

fn secret_ls_never_prints_a_value() -> Result<(), Failed> {
    ready()?;
    let e = env();
    let out = ok(&["secret", "ls"])?;
    let json = ok(&["secret", "ls", "--json"])?;
    check(
        out.contains("anthropic") && out.contains("api.anthropic.com") && out.contains(NAME),
        format!("secret ls: {out}"),
    )?;
    for v in [&e.anthropic_key, &e.github_token] {
        check(
            !out.contains(v.as_str()) && !json.contains(v.as_str()),
            "secret ls printed a value",
        )?;
        // Not even a prefix past the public part.
        check(!out.contains(&v[..14]), "secret ls printed part of a value")?;
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(e.cli.config.path().join("sandpen/secrets"))?
        .permissions()
        .mode();
    check(
        mode & 0o777 == 0o600,
        format!("secret store mode {:o}", mode & 0o777),
    )
}

/// Runs last: after the key was used, it is in no copy of guest memory, on
/// no disk, in no state file and in no log.
fn the_key_is_nowhere_but_the_store() -> Result<(), Failed> {
    ready()?;
    let e = env();
    // Make sure the key was used in this boot.
    let (code, out) = guest(&format!(
        "curl -sS -m 20 -H 'x-api-key: proxy-managed' https://api.anthropic.com:{}/v1/final",
        e.good_port
    ));
    check(code == 0, format!("curl: {code} {out}"))?;
    check(
        seen("/v1/final").first().map(|r| header(r, "x-api-key"))
            == Some(vec![e.anthropic_key.clone()]),
        "the key was not used",
    )?;
    let _ = guest("sync");
    let sandbox = e.cli.state.path().join("sandpen/sandboxes").join(NAME);
    let dump = e.root.path().join("guest-memory.dump");
    let qmp = sandbox.join("run/qmp.sock");
    let status = Command::new("python3")
        .arg("-c")
        .arg(QMP_DUMP)
        .arg(&qmp)
        .arg(&dump)
        .status()?;
    check(status.success(), "dump-guest-memory failed")?;
    let size = std::fs::metadata(&dump)?.len();
    check(
        size > 512 << 20,
        format!("the memory dump is only {size} bytes"),
    )?;
    let secrets = [e.anthropic_key.as_str(), e.github_token.as_str()];
    for s in secrets {
        check(!contains(&dump, s), "a secret is in the guest's memory")?;
    }
    // A control: the dump does hold what the guest did see.
    check(
        contains(&dump, "proxy-managed"),
        "the dump holds no sentinel: is it a real dump?",
    )?;
    std::fs::remove_file(&dump)?;

    let logs = ok(&["logs", NAME])? + &ok(&["logs", "--supervisor", NAME])?;
    ok(&["stop", NAME])?;
    for s in secrets {
        check(!logs.contains(s), "a secret is in `sandpen logs`")?;
        let hits = Command::new("grep")
            .args(["-r", "-a", "-l", "-F", s])
            .arg(&sandbox)
            .output()?;
        check(
            hits.stdout.is_empty(),
            format!("a secret is under the state folder: {}", text(&hits.stdout)),
        )?;
        let hits = Command::new("grep")
            .args(["-r", "-a", "-l", "-F", s])
            .arg(e.cli.config.path())
            .output()?;
        let files = text(&hits.stdout);
        check(
            files.trim()
                == e.cli
                    .config
                    .path()
                    .join("sandpen/secrets")
                    .to_string_lossy(),
            format!("the secret is in config files other than the store: {files}"),
        )?;
    }
    // The disk was really searched: it holds what the guest wrote.
    check(sandbox.join("disk.qcow2").exists(), "no disk to search")?;
    ok(&["start", NAME])?;
    Ok(())
}

const QMP_DUMP: &str = r#"
import socket, json, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rw")
def read():
    while True:
        m = json.loads(f.readline())
        if "event" not in m:
            return m
read()
# QEMU's jail lets it open no file of ours: the dump goes to a descriptor
# passed over QMP (getfd), as libvirt does.
out = open(sys.argv[2], "wb")
def send(cmd, fds=()):
    data = (json.dumps(cmd) + "\n").encode()
    if fds:
        s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(__import__("array").array("i", fds))))])
    else:
        s.sendall(data)
    m = read()
    if "error" in m:
        print(m, file=sys.stderr); sys.exit(1)
send({"execute": "qmp_capabilities"})
send({"execute": "getfd", "arguments": {"fdname": "dump"}}, [out.fileno()])
send({"execute": "dump-guest-memory", "arguments": {"paging": False, "protocol": "fd:dump"}})
"#;

fn contains(file: &Path, needle: &str) -> bool {
    Command::new("grep")
        .args(["-a", "-q", "-F", needle])
        .arg(file)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

type TestFn = fn() -> Result<(), Failed>;

fn main() {
    let args = Arguments {
        test_threads: Some(1),
        ..Arguments::from_args()
    };
    let tests: Vec<(&str, TestFn)> = vec![
        (
            "the_guest_sees_only_sentinels_and_trusts_the_sandbox_ca",
            the_guest_sees_only_sentinels_and_trusts_the_sandbox_ca,
        ),
        (
            "curl_sentinel_becomes_the_key_only_on_the_route_host",
            curl_sentinel_becomes_the_key_only_on_the_route_host,
        ),
        (
            "git_over_https_gets_the_token",
            git_over_https_gets_the_token,
        ),
        ("sse_arrives_chunk_by_chunk", sse_arrives_chunk_by_chunk),
        (
            "a_wrong_upstream_certificate_fails_closed",
            a_wrong_upstream_certificate_fails_closed,
        ),
        (
            "a_custom_route_swaps_its_placeholder",
            a_custom_route_swaps_its_placeholder,
        ),
        (
            "secret_ls_never_prints_a_value",
            secret_ls_never_prints_a_value,
        ),
        (
            "the_key_is_nowhere_but_the_store",
            the_key_is_nowhere_but_the_store,
        ),
    ];
    let trials = tests.into_iter().map(|(n, f)| Trial::test(n, f)).collect();
    let conclusion = libtest_mimic::run(&args, trials);
    let _ = sandpen(&["rm", "-f", NAME]);
    // The mock upstreams hold 127.0.0.2:443 and 127.0.0.3:443: a next run
    // could not bind them if they outlived this one.
    if let Some(env) = ENV.get() {
        if let Ok(mut servers) = env._servers.lock() {
            let _ = servers.kill();
            let _ = servers.wait();
        }
    }
    conclusion.exit();
}
