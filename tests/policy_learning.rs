//! End-to-end tests of the policy that learns from the user (issue 15): ask
//! mode holds what no rule decides until the user answers from the host,
//! and denials carry text an agent can act on. Every request is made from
//! inside a real guest, as root, against an HTTP server on the host's
//! loopback reached as `*.test` names through `--add-host`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};

mod common;
use common::{check, text, Cli};

const NAME: &str = "learning";

struct Env {
    cli: Cli,
    root: tempfile::TempDir,
    port: u16,
    server: std::sync::Mutex<Child>,
}

/// A plain HTTP server on 127.0.0.1 that answers `hello PATH` and logs
/// every path to `requests.log`.
const SERVER: &str = r#"
import http.server, sys, threading, os
log = open(os.path.join(sys.argv[1], "requests.log"), "a", buffering=1)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        log.write(self.headers.get("Host", "") + self.path + "\n")
        body = ("hello " + self.path + "\n").encode()
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
        let (root, ws) = common::workspace("sandpen-learning-", NAME);
        let mut server = Command::new("python3")
            .arg("-c")
            .arg(SERVER)
            .arg(root.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(server.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the server's port");
        Env {
            cli: Cli::new(ws),
            root,
            port: line.trim().parse().expect("a port"),
            server: std::sync::Mutex::new(server),
        }
    })
}

fn sandpen(args: &[&str]) -> Output {
    env().cli.run(args)
}

fn ok(args: &[&str]) -> Result<String, Failed> {
    env().cli.ok(args)
}

/// A `sandpen exec` in the background; killed and reaped if the test
/// returns before [`finish`] took it.
struct Background(Option<Child>);

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `sh` in the guest as root, in the background.
fn guest_spawn(sh: &str) -> Background {
    Background(Some(
        env()
            .cli
            .command(&["exec", "-u", "root", NAME, "--", "sh", "-c", sh])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sandpen exec"),
    ))
}

/// `sh` in the guest as root: (exit code, stdout + stderr).
fn guest(sh: &str) -> (i32, String) {
    let out = sandpen(&["exec", "-u", "root", NAME, "--", "sh", "-c", sh]);
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout) + &text(&out.stderr),
    )
}

fn finish(mut bg: Background) -> (i32, String) {
    let Some(child) = bg.0.take() else {
        return (-1, String::new());
    };
    let out = child.wait_with_output().expect("waiting for sandpen exec");
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout) + &text(&out.stderr),
    )
}

fn requests_seen() -> String {
    std::fs::read_to_string(env().root.path().join("requests.log")).unwrap_or_default()
}

fn sandbox_file() -> std::path::PathBuf {
    env()
        .cli
        .state
        .path()
        .join("sandpen/sandboxes")
        .join(NAME)
        .join("policy.toml")
}

/// Set `ask_timeout` in the sandbox's policy file (by hand, as a user
/// would; the running sandbox reads it at the next connection).
fn set_ask_timeout(secs: u64) -> Result<(), Failed> {
    let path = sandbox_file();
    let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
    let rest: String = text
        .lines()
        .filter(|l| !l.starts_with("ask_timeout"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&path, format!("ask_timeout = {secs}\n{rest}")).map_err(|e| e.to_string())?;
    Ok(())
}

/// The held entries for `host`, waiting up to `within` for at least one.
fn pending_for(host: &str, within: Duration) -> Result<Vec<serde_json::Value>, Failed> {
    let deadline = Instant::now() + within;
    loop {
        let out = ok(&["policy", "pending", NAME, "--json"])?;
        let all: Vec<serde_json::Value> =
            serde_json::from_str(&out).map_err(|e| format!("pending --json: {e}: {out}"))?;
        let found: Vec<_> = all.into_iter().filter(|p| p["host"] == host).collect();
        if !found.is_empty() || Instant::now() > deadline {
            return Ok(found);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The newest log record for `host:port`, waiting briefly for it.
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

fn ready() -> Result<(), Failed> {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| setup().map_err(|e| format!("setting up the sandbox: {e:?}")))
        .clone()
        .map_err(Failed::from)
}

/// Names the tests use, all mapped to the host's loopback server.
const HOSTS: [&str; 7] = [
    "once.test",
    "granted.test",
    "always.test",
    "late.test",
    "denied.test",
    "narrowed.test",
    "quiet.test",
];

fn setup() -> Result<(), Failed> {
    ok(&["policy", "init", "deny-all"])?;
    let mut args = vec!["create", "--cpus", "1", "--memory", "1G"];
    let maps: Vec<String> = HOSTS.iter().map(|h| format!("{h}:127.0.0.1")).collect();
    for m in &maps {
        args.extend(["--add-host", m.as_str()]);
    }
    ok(&args)?;
    ok(&["policy", "deny", "network", "denied.test", NAME])?;
    ok(&["policy", "allow", "network", "narrowed.test", NAME])?;
    ok(&["policy", "mode", "ask", NAME])?;
    set_ask_timeout(90)?;
    let ws = &env().cli.ws;
    std::fs::write(
        ws.join(".sandpen.toml"),
        "[flow]\nsecret = [\"secrets/**\"]\n",
    )?;
    std::fs::create_dir_all(ws.join("secrets"))?;
    std::fs::write(ws.join("secrets/token"), "tok\n")?;
    ok(&["start", NAME])?;
    Ok(())
}

/// In ask mode a guest curl to an undecided host waits; `approve --once`
/// lets that one finish with the server's answer; the next curl waits again.
fn approve_once_lets_one_connection_through() -> Result<(), Failed> {
    ready()?;
    let port = env().port;
    let curl = format!("curl -sS -m 80 --noproxy '*' http://once.test:{port}/first");
    let waiting = guest_spawn(&curl);
    let held = pending_for("once.test", Duration::from_secs(30))?;
    check(held.len() == 1, format!("one held entry: {held:?}"))?;
    let entry = &held[0];
    check(
        entry["port"] == port && entry["first"] == "GET /first HTTP/1.1",
        format!("the entry names the destination and request line: {entry}"),
    )?;
    let process = entry["process"].as_str().unwrap_or("");
    check(
        process.starts_with("pid ") && process.contains("curl") && process.contains("/first"),
        format!("the entry names the guest process: {entry}"),
    )?;
    check(
        !requests_seen().contains("/first"),
        "nothing reached the server while it waited",
    )?;
    let id = entry["id"].as_u64().ok_or("an id")?.to_string();
    let said = ok(&["policy", "approve", &id, "--once"])?;
    check(said.contains("approved once"), said)?;
    let (code, out) = finish(waiting);
    check(
        code == 0 && out.contains("hello /first"),
        format!("the approved curl: {code} {out}"),
    )?;
    let r = last_record("once.test", port)?;
    check(
        r["decision"] == "allow" && r["rule_scope"] == "once",
        format!("the record names the one-time approval: {r}"),
    )?;
    // The approval was for that connection alone.
    let again = guest_spawn(&format!(
        "curl -sS -m 80 --noproxy '*' http://once.test:{port}/second"
    ));
    let held = pending_for("once.test", Duration::from_secs(30))?;
    check(
        held.len() == 1,
        format!("the second curl waits too: {held:?}"),
    )?;
    let id = held[0]["id"].as_u64().ok_or("an id")?.to_string();
    ok(&["policy", "deny", &id])?;
    let (code, out) = finish(again);
    check(
        out.contains("(ask-denied") && !requests_seen().contains("/second"),
        format!("the refused curl gets the deny page: {code} {out}"),
    )?;
    let r = last_record("once.test", port)?;
    check(
        r["decision"] == "deny" && r["reason"].as_str().unwrap_or("").starts_with("ask-denied"),
        r.to_string(),
    )
}

/// `approve --always` adds a sandbox rule and releases the waiting curl; the
/// next curl goes through at once, and `policy ls` lists the rule.
fn approve_always_adds_a_rule() -> Result<(), Failed> {
    ready()?;
    let port = env().port;
    // Through the guest's HTTP proxy port this time.
    let curl =
        format!("curl -sS -m 80 --noproxy '' -x http://127.0.0.1:3128 http://always.test:{port}/a");
    let waiting = guest_spawn(&curl);
    let held = pending_for("always.test", Duration::from_secs(30))?;
    check(held.len() == 1, format!("one held entry: {held:?}"))?;
    check(
        held[0]["first"]
            .as_str()
            .unwrap_or("")
            .starts_with(&format!("GET http://always.test:{port}/a")),
        held[0].to_string(),
    )?;
    let id = held[0]["id"].as_u64().ok_or("an id")?.to_string();
    let said = ok(&["policy", "approve", &id, "--always"])?;
    check(said.contains("allow always.test"), said)?;
    let (code, out) = finish(waiting);
    check(
        code == 0 && out.contains("hello /a"),
        format!("{code} {out}"),
    )?;
    let started = Instant::now();
    let (code, out) = guest(&format!(
        "curl -sS -m 20 --noproxy '*' http://always.test:{port}/b"
    ));
    check(
        code == 0 && out.contains("hello /b") && started.elapsed() < Duration::from_secs(15),
        format!(
            "the next curl passes at once: {code} {out} in {:?}",
            started.elapsed()
        ),
    )?;
    let ls = ok(&["policy", "ls", NAME, "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&ls).map_err(|e| e.to_string())?;
    let rule = v["rules"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|r| r["target"] == format!("always.test:{port}"))
        })
        .cloned();
    check(
        rule.as_ref().is_some_and(|r| {
            r["scope"] == "sandbox"
                && r["action"] == "allow"
                && r["added_by"] == "approval"
                && r["reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("GET http://always.test")
        }),
        format!("the rule is listed with its provenance: {ls}"),
    )
}

/// `policy undo` of the approval takes the rule away again: `policy check`
/// says so, and the next curl waits for an answer again.
fn undo_restores_the_previous_verdict() -> Result<(), Failed> {
    ready()?;
    let port = env().port;
    let dest = format!("always.test:{port}");
    if !ok(&["policy", "ls", NAME])?.contains(&dest) {
        approve_always_adds_a_rule()?;
    }
    let history = ok(&["policy", "history", NAME, "--json"])?;
    let change = history
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|c| c["who"] == "approval" && c["edit"]["target"] == dest.as_str())
        .ok_or(format!("no approval of {dest} in the history: {history}"))?;
    let n = change["n"].as_u64().ok_or("a change number")?.to_string();
    let said = ok(&["policy", "check", "network", &dest, NAME])?;
    check(said.contains("allowed"), said)?;
    ok(&["policy", "undo", &n, NAME])?;
    let out = sandpen(&["policy", "check", "network", &dest, NAME]);
    check(
        text(&out.stdout).contains("denied: no-matching-rule"),
        format!("after undo: {}", text(&out.stdout)),
    )?;
    let history = ok(&["policy", "history", NAME])?;
    check(
        history.contains(&format!("(undoes {n})")),
        format!("the undo is in the history: {history}"),
    )?;
    let waiting = guest_spawn(&format!(
        "curl -sS -m 80 --noproxy '*' http://always.test:{port}/after-undo"
    ));
    let held = pending_for("always.test", Duration::from_secs(30))?;
    check(held.len() == 1, format!("the curl waits again: {held:?}"))?;
    let id = held[0]["id"].as_u64().ok_or("an id")?.to_string();
    ok(&["policy", "deny", &id])?;
    let (_, out) = finish(waiting);
    check(
        !requests_seen().contains("/after-undo"),
        format!("it went through: {out}"),
    )
}

/// Nobody answers: the curl gets a 403 that says `ask-timeout` and how to
/// ask, and the supervisor's log and the network log say so.
fn a_timeout_denies_with_ask_timeout() -> Result<(), Failed> {
    ready()?;
    let port = env().port;
    set_ask_timeout(3)?;
    let result = (|| {
        let started = Instant::now();
        let (code, out) = guest(&format!(
            "curl -sS -m 60 --noproxy '' -x http://127.0.0.1:3128 -w 'code=%{{http_code}}\\n' http://late.test:{port}/late"
        ));
        check(
            out.contains("code=403") && out.contains("ask-timeout"),
            format!("{code} {out}"),
        )?;
        check(
            out.contains(&format!("sandpen-request network late.test:{port}")),
            format!("the body says how to ask: {out}"),
        )?;
        check(
            started.elapsed() >= Duration::from_secs(3),
            format!("it waited: {:?}", started.elapsed()),
        )?;
        let r = last_record("late.test", port)?;
        check(
            r["decision"] == "deny"
                && r["reason"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("ask-timeout"),
            r.to_string(),
        )?;
        let log = std::fs::read_to_string(
            env()
                .cli
                .state
                .path()
                .join("sandpen/sandboxes")
                .join(NAME)
                .join("logs/supervisor.log"),
        )
        .unwrap_or_default();
        check(
            log.lines()
                .any(|l| l.contains("ask-timeout") && l.contains("late.test")),
            "the supervisor's log has an ask-timeout line",
        )
    })();
    set_ask_timeout(90)?;
    result
}

/// A host a rule denies, a blocked range and a host the flow label narrows
/// are refused at once, never held.
fn denials_are_never_held() -> Result<(), Failed> {
    ready()?;
    let port = env().port;
    let quick = |url: &str| -> Result<String, Failed> {
        let started = Instant::now();
        let (code, out) = guest(&format!(
            "curl -sS -m 30 --noproxy '' -x http://127.0.0.1:3128 -w 'code=%{{http_code}}\\n' {url}"
        ));
        check(
            started.elapsed() < Duration::from_secs(15),
            format!("{url} was held: {:?}: {out}", started.elapsed()),
        )?;
        check(out.contains("code=403"), format!("{url}: {code} {out}"))?;
        Ok(out)
    };
    let out = quick(&format!("http://denied.test:{port}/d"))?;
    check(out.contains("denied-by-rule"), out)?;
    let out = quick("http://169.254.169.254/latest/meta-data/")?;
    check(out.contains("blocked-address"), out)?;
    let out = quick("http://10.1.2.3/")?;
    check(out.contains("blocked-address"), out)?;
    // Transparent too: a literal private address.
    let started = Instant::now();
    let _ = guest("curl -sS -m 30 --noproxy '*' http://10.1.2.3/");
    check(
        started.elapsed() < Duration::from_secs(15),
        "a blocked address was held",
    )?;
    let (_, read) = guest(&format!("cat {}/secrets/token", env().cli.ws.display()));
    check(read.contains("tok"), read)?;
    // An allowed host the label narrows, and an undecided one: neither is
    // held (a rule could not open either while the label is set).
    let result = quick(&format!("http://narrowed.test:{port}/n"))
        .and_then(|out| check(out.contains("(flow: secret-read"), out))
        .and_then(|_| quick(&format!("http://quiet.test:{port}/q")))
        .and_then(|out| check(out.contains("no-matching-rule"), out))
        .and_then(|_| {
            let held = pending_for("quiet.test", Duration::from_millis(1))?;
            check(held.is_empty(), format!("held: {held:?}"))
        });
    ok(&["flow", "reset", NAME])?;
    result?;
    let out = ok(&["policy", "pending", NAME, "--json"])?;
    check(out.trim() == "[]", format!("nothing is held: {out}"))
}

/// A 403 the proxy answers names the rule and the request line, and says
/// what to do.
fn the_403_body_names_the_rule_and_the_request_line() -> Result<(), Failed> {
    ready()?;
    let port = env().port;
    let (_, out) = guest(&format!(
        "curl -sS -m 20 --noproxy '' -x http://127.0.0.1:3128 http://denied.test:{port}/body"
    ));
    let expected = format!(
        "sandpen: `GET http://denied.test:{port}/body HTTP/1.1` was refused: denied.test:{port} is not allowed for this sandbox (denied-by-rule, rule 1 (sandbox: deny denied.test))."
    );
    check(
        out.contains(&expected),
        format!("{out}\nexpected: {expected}"),
    )?;
    check(
        out.contains(&format!("sandpen-request network denied.test:{port}")),
        out.clone(),
    )?;
    // The transparent path answers plain HTTP with the same page.
    let (_, out) = guest(&format!(
        "curl -sS -m 20 --noproxy '*' http://denied.test:{port}/direct"
    ));
    check(
        out.contains("`GET /direct` was refused")
            && out.contains("rule 1 (sandbox: deny denied.test)"),
        out,
    )?;
    // CONNECT.
    let (_, out) = guest(&format!(
        "curl -sS -m 20 -v --noproxy '' -x http://127.0.0.1:3128 https://denied.test:{port}/tls 2>&1"
    ));
    check(
        out.contains("403") && out.contains(&format!("CONNECT denied.test:{port}")),
        out,
    )
}

/// `sandpen-request` from the guest shows on the host with its reason,
/// marked untrusted, and waits; as root in the guest, nothing sent to PID
/// 1's request socket or the channel's ports answers it; the user's answer
/// on the host does.
fn a_request_from_the_guest_waits_for_the_user() -> Result<(), Failed> {
    ready()?;
    let reason = "install requests for the failing test";
    let waiting = guest_spawn(&format!(
        "sandpen-request network pypi.example:443 \"{reason}\"; echo exit=$?"
    ));
    let held = pending_for("pypi.example", Duration::from_secs(30))?;
    check(held.len() == 1, format!("one held request: {held:?}"))?;
    check(
        held[0]["reason"] == reason && held[0]["port"] == 443,
        held[0].to_string(),
    )?;
    let table = ok(&["policy", "pending", NAME])?;
    check(
        table.contains("(untrusted)") && table.contains(&format!("\"{reason}\"")),
        format!("the reason is shown as untrusted text: {table}"),
    )?;
    let id = held[0]["id"].as_u64().ok_or("an id")?;
    // The guest, as root, tries to answer it itself: forged frames on the
    // request socket (an `Approved` outcome, garbage, an HTTP request),
    // more requests for the same host, and the channel's ports.
    let attack = r#"
        for bytes in '\x00\x00\x00\x03\x00\x01\x00' '\x00\x00\x00\x03\x00\x01\x01' 'approve 1\n' '\xff\xff\xff\xff'; do
          perl -MIO::Socket::UNIX -e '$s = IO::Socket::UNIX->new(Peer => "/run/sandpen/request.sock") or die "connect: $!"; print $s eval(qq("$ARGV[0]")); sleep 1' "$bytes"
        done
        curl -s -m 3 --unix-socket /run/sandpen/request.sock http://x/approve/1 || true
        timeout 3 sandpen-request --why pypi.example
        for p in /dev/vport*; do (printf 'approve\n' > "$p") 2>&1 | head -1; done
        echo attacked
    "#;
    let (_, out) = guest(attack);
    check(
        out.contains("attacked")
            && !out.contains("not found")
            && !out.contains("connect:")
            && out.contains("no refused connection to pypi.example"),
        format!("the attack ran as written: {out}"),
    )?;
    let still = pending_for("pypi.example", Duration::from_millis(1))?;
    check(
        still.iter().any(|p| p["id"] == id),
        format!("after the guest's attempts the request still waits: {still:?}\n{out}"),
    )?;
    let said = ok(&["policy", "approve", &id.to_string(), "--always"])?;
    check(said.contains("allow pypi.example:443"), said)?;
    let (_, out) = finish(waiting);
    check(
        out.contains("waiting for the user… approved (always, sandbox scope)")
            && out.contains("exit=0"),
        format!("the guest's side: {out}"),
    )?;
    // A refused one says so, and exits 1.
    let refused = guest_spawn("sandpen-request network other.example:443 'more'; echo exit=$?");
    let held = pending_for("other.example", Duration::from_secs(30))?;
    let id = held
        .first()
        .and_then(|p| p["id"].as_u64())
        .ok_or("a held request")?;
    ok(&["policy", "deny", &id.to_string()])?;
    let (_, out) = finish(refused);
    check(
        out.contains("denied (ask-denied") && out.contains("exit=1"),
        format!("the guest's side: {out}"),
    )
}

/// `approve --once` on an agent's `sandpen-request network HOST:PORT` is a
/// one-time allowance: the next connection to exactly that destination
/// goes through at once (ask mode would hold it), and the one after waits
/// again.
fn approve_once_on_a_request_allows_one_connection() -> Result<(), Failed> {
    ready()?;
    let port = env().port;
    let dest = format!("granted.test:{port}");
    let asking = guest_spawn(&format!(
        "sandpen-request network {dest} 'fetch one file'; echo exit=$?"
    ));
    let held = pending_for("granted.test", Duration::from_secs(30))?;
    let id = held
        .first()
        .and_then(|p| p["id"].as_u64())
        .ok_or(format!("a held request: {held:?}"))?;
    let said = ok(&["policy", "approve", &id.to_string(), "--once"])?;
    check(said.contains("within 60 s"), said)?;
    let (_, out) = finish(asking);
    check(
        out.contains(&format!(
            "approved (once): the next connection to {dest} within 60 s is allowed, once"
        )) && out.contains("exit=0"),
        format!("the guest's side: {out}"),
    )?;
    // Not held: 20 s is far less than the 90 s the sandbox would wait.
    let (code, out) = guest(&format!(
        "curl -sS -m 20 --noproxy '*' http://{dest}/granted"
    ));
    check(
        code == 0 && out.contains("hello /granted"),
        format!("the allowed connection: {code} {out}"),
    )?;
    let r = last_record("granted.test", port)?;
    check(
        r["decision"] == "allow" && r["rule_scope"] == "once",
        format!("the record names the one-time approval: {r}"),
    )?;
    let again = guest_spawn(&format!("curl -sS -m 80 --noproxy '*' http://{dest}/again"));
    let held = pending_for("granted.test", Duration::from_secs(30))?;
    check(
        held.len() == 1,
        format!("the second curl waits again: {held:?}"),
    )?;
    let id = held[0]["id"].as_u64().ok_or("an id")?.to_string();
    ok(&["policy", "deny", &id])?;
    let (_, out) = finish(again);
    check(
        !requests_seen().contains("/again"),
        format!("the second went through: {out}"),
    )
}

/// `sandpen-request file read PATH`: as root in the guest, no sequence of
/// channel messages writes the exception; `--once` is refused on the host
/// with the reason; `approve --always` writes `[files] allow_read` in the
/// sandbox's file, recorded with who and why, and from the next start the
/// guest reads that file and still not `.env`; `undo` hides it again.
fn a_file_exception_is_written_only_by_the_user() -> Result<(), Failed> {
    ready()?;
    let ws = env().cli.ws.clone();
    std::fs::write(ws.join(".env.example"), "API_URL=\n")?;
    std::fs::write(ws.join(".env"), "API_KEY=hunter2\n")?;
    let example = format!("{}/.env.example", ws.display());
    let cat = format!("cat {example}; cat {}/.env", ws.display());
    let (_, out) = guest(&cat);
    check(
        !out.contains("API_URL") && !out.contains("hunter2"),
        format!("both hidden at first: {out}"),
    )?;
    let asking = guest_spawn(&format!(
        "sandpen-request file read {example} 'the variable names'; echo exit=$?"
    ));
    let held = pending_for(&example, Duration::from_secs(30))?;
    let id = held
        .first()
        .and_then(|p| p["id"].as_u64())
        .ok_or(format!("a held file request: {held:?}"))?;
    check(held[0]["file"] == "read", held[0].to_string())?;
    // The guest, as root, tries to get the exception written by itself:
    // forged answer frames and garbage on the request socket, more file
    // requests, writes to the channel's ports, and `allow_read` in the
    // workspace's own file.
    let attack = format!(
        r#"
        for bytes in '\x00\x00\x00\x03\x00\x01\x00' '\x00\x00\x00\x03\x00\x01\x01' 'approve {id} --always\n' '\xff\xff\xff\xff'; do
          perl -MIO::Socket::UNIX -e '$s = IO::Socket::UNIX->new(Peer => "/run/sandpen/request.sock") or die "connect: $!"; print $s eval(qq("$ARGV[0]")); sleep 1' "$bytes"
        done
        for i in 1 2 3; do timeout 2 sandpen-request file read {example} 'again'; done
        timeout 2 sandpen-request file read {ws}/.env 'and this'
        for p in /dev/vport*; do (printf 'approve {id} --always\n' > "$p") 2>&1 | head -1; done
        printf '[files]\nallow_read = [".env.example", ".env"]\n' >> {ws}/.sandpen.toml 2>&1
        echo attacked
    "#,
        ws = ws.display()
    );
    let (_, out) = guest(&attack);
    check(
        out.contains("attacked") && !out.contains("connect:"),
        format!("the attack ran as written: {out}"),
    )?;
    let policy = std::fs::read_to_string(sandbox_file()).unwrap_or_default();
    let history = ok(&["policy", "history", NAME, "--json"])?;
    check(
        !policy.contains("allow_read") && !history.contains("read-exception"),
        format!("the guest wrote an exception: {policy}\n{history}"),
    )?;
    check(
        !std::fs::read_to_string(ws.join(".sandpen.toml"))?.contains("allow_read"),
        "the workspace file took the guest's write",
    )?;
    let still = pending_for(&example, Duration::from_millis(1))?;
    check(
        still.iter().any(|p| p["id"] == id),
        format!("after the guest's attempts the request still waits: {still:?}"),
    )?;
    let once = sandpen(&["policy", "approve", &id.to_string(), "--once"]);
    check(
        !once.status.success()
            && text(&once.stderr).contains("a one-time file exception is not offered"),
        format!("--once: {}", text(&once.stderr)),
    )?;
    let said = ok(&["policy", "approve", &id.to_string(), "--always"])?;
    check(
        said.contains("added the file exception allow_read .env.example")
            && said.contains("next start"),
        said,
    )?;
    let (_, out) = finish(asking);
    check(
        out.contains("approved (always, sandbox scope)")
            && out.contains("next start")
            && out.contains("exit=0"),
        format!("the guest's side: {out}"),
    )?;
    let history = ok(&["policy", "history", NAME, "--json"])?;
    let change = history
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|c| c["edit"]["op"] == "add-read-exception")
        .ok_or(format!("no exception in the history: {history}"))?;
    check(
        change["who"] == "approval"
            && change["edit"]["path"] == ".env.example"
            && change["scope"] == "sandbox"
            && change["reason"]
                .as_str()
                .unwrap_or("")
                .contains("the agent's reason (untrusted): the variable names"),
        change.to_string(),
    )?;
    // From the next start.
    ok(&["stop", NAME])?;
    ok(&["start", NAME])?;
    let (_, out) = guest(&cat);
    check(
        out.contains("API_URL") && !out.contains("hunter2"),
        format!("after the restart: {out}"),
    )?;
    let n = change["n"].as_u64().ok_or("a change number")?.to_string();
    ok(&["policy", "undo", &n, NAME])?;
    ok(&["stop", NAME])?;
    ok(&["start", NAME])?;
    let (_, out) = guest(&cat);
    check(
        !out.contains("API_URL") && !out.contains("hunter2"),
        format!("after the undo and a restart: {out}"),
    )?;
    // A write exception is not written.
    let writing = guest_spawn(&format!(
        "sandpen-request file write {}/.git/config 'fix the remote'; echo exit=$?",
        ws.display()
    ));
    let held = pending_for(
        &format!("{}/.git/config", ws.display()),
        Duration::from_secs(30),
    )?;
    let id = held
        .first()
        .and_then(|p| p["id"].as_u64())
        .ok_or("a held write request")?
        .to_string();
    let refused = sandpen(&["policy", "approve", &id, "--always"]);
    check(
        !refused.status.success()
            && text(&refused.stderr).contains("sandpen writes no exception to the read-only rules"),
        text(&refused.stderr),
    )?;
    ok(&["policy", "deny", &id])?;
    let (_, out) = finish(writing);
    check(out.contains("denied (ask-denied"), out)
}

/// `sandpen-request --why HOST` explains the last refusal of HOST, for TLS
/// through the transparent path, which carries no deny page.
fn why_explains_the_last_denial() -> Result<(), Failed> {
    ready()?;
    let port = env().port;
    let _ = guest(&format!(
        "curl -sS -m 20 --noproxy '*' https://denied.test:{port}/tls"
    ));
    let (code, out) = guest("sandpen-request --why denied.test");
    check(
        code == 0
            && out.contains(&format!("denied.test:{port} is not allowed for this sandbox (denied-by-rule, rule 1 (sandbox: deny denied.test))")),
        format!("{code} {out}"),
    )
}

/// On the transparent TLS path, which carries no deny page, the guest's DNS
/// stub explains the last refusal too: `dig TXT HOST` and `nslookup
/// -type=txt HOST` answer with the two lines `sandpen-request --why HOST`
/// prints.
fn dns_txt_explains_the_last_denial() -> Result<(), Failed> {
    ready()?;
    let port = env().port;
    let _ = guest(&format!(
        "curl -sS -m 20 --noproxy '*' https://denied.test:{port}/tls"
    ));
    let (_, why) = guest("sandpen-request --why denied.test");
    let fact = format!(
        "denied.test:{port} is not allowed for this sandbox (denied-by-rule, rule 1 (sandbox: deny denied.test))"
    );
    check(why.contains(&fact), format!("--why: {why}"))?;
    let lines: Vec<&str> = why.lines().filter(|l| !l.trim().is_empty()).collect();
    check(lines.len() == 2, format!("two lines: {why}"))?;
    let (code, out) = guest("dig +short +time=5 +tries=1 TXT denied.test");
    // dig quotes each record's text; the quotes inside are escaped.
    let unquoted: Vec<String> = out
        .lines()
        .map(|l| {
            let l = l.trim();
            let l = l.strip_prefix('"').unwrap_or(l);
            l.strip_suffix('"').unwrap_or(l).replace("\\\"", "\"")
        })
        .collect();
    check(
        code == 0 && unquoted == lines,
        format!("dig TXT: {code} {out}\nexpected: {lines:?}"),
    )?;
    let (_, out) = guest("dig +short +time=5 +tries=1 TXT _sandpen-why.denied.test");
    check(out.contains(&fact), format!("_sandpen-why: {out}"))?;
    let (_, out) = guest("nslookup -type=txt denied.test");
    check(
        out.contains(&fact) && out.contains("on purpose"),
        format!("nslookup: {out}"),
    )
}

/// Every network log record names the guest process that opened the
/// connection, a refused one (written at once) and an allowed one alike,
/// when PID 1 finds it: a client still connected while PID 1 looks.
fn the_network_log_names_the_guest_process() -> Result<(), Failed> {
    ready()?;
    let port = env().port;
    // A client that keeps its socket a second after its request.
    let hold = |host: &str, path: &str| {
        format!(
            "perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(\"{host}:{port}\") or die \"connect: $!\"; print $s \"GET {path} HTTP/1.1\\r\\nHost: {host}:{port}\\r\\n\\r\\n\"; sleep 1; sysread($s, $b, 12); print \"$b\\n\"'"
        )
    };
    let mut seen = Vec::new();
    for (host, path, cmd, name) in [
        (
            "denied.test",
            "/refused",
            hold("denied.test", "/refused"),
            "perl",
        ),
        (
            "narrowed.test",
            "/allowed",
            hold("narrowed.test", "/allowed"),
            "perl",
        ),
        (
            "narrowed.test",
            "/curl",
            format!("curl -sS -m 20 --noproxy '*' http://narrowed.test:{port}/curl"),
            "curl",
        ),
    ] {
        let (code, out) = guest(&cmd);
        let r = last_record(host, port).map_err(|e| format!("{e:?}\n{cmd}: {code} {out}"))?;
        seen.push(format!("{path}: {} ({code} {out})", r));
        let process = &r["process"];
        check(
            r["path"] == path
                && process["name"] == name
                && process["pid"].as_u64().is_some_and(|p| p > 1),
            format!("the record names {name}:\n{}", seen.join("\n")),
        )?;
    }
    Ok(())
}

/// `policy suggest` over a learn-mode log (the fixture the unit tests use:
/// an `npm ci`, a `pip install`, a `git clone` and an agent's side trips):
/// the clean suggestions applied with `--apply` become rules whose
/// provenance is the suggestion; the flagged ones are listed with why.
fn suggest_applies_rules_from_a_learn_log() -> Result<(), Failed> {
    ready()?;
    let other = "learned";
    ok(&["create", "--name", other, "--cpus", "1", "--memory", "512M"])?;
    let result = (|| {
        let logs = env()
            .cli
            .state
            .path()
            .join("sandpen/sandboxes")
            .join(other)
            .join("logs");
        std::fs::create_dir_all(&logs)?;
        std::fs::copy(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../api/testdata/learn-npm-pip-git.jsonl"
            ),
            logs.join("net.jsonl"),
        )?;
        let out = ok(&["policy", "suggest", other, "--json"])?;
        let all: Vec<serde_json::Value> =
            serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
        let clean: Vec<String> = all
            .iter()
            .filter(|s| s["flags"].as_array().is_some_and(|f| f.is_empty()))
            .map(|s| s["n"].to_string())
            .collect();
        let flagged: Vec<&serde_json::Value> = all
            .iter()
            .filter(|s| s["flags"].as_array().is_some_and(|f| !f.is_empty()))
            .collect();
        check(
            clean.len() == 6 && flagged.len() == 2,
            format!("6 clean and 2 flagged suggestions: {out}"),
        )?;
        let table = ok(&["policy", "suggest", other])?;
        check(
            table.contains("! pastebin.com is a paste or drop site"),
            table,
        )?;
        ok(&["policy", "suggest", other, "--apply", &clean.join(",")])?;
        let ls = ok(&["policy", "ls", other, "--json"])?;
        let v: serde_json::Value = serde_json::from_str(&ls).map_err(|e| e.to_string())?;
        let rules = v["rules"].as_array().cloned().unwrap_or_default();
        for t in [
            "registry.npmjs.org:443",
            "pypi.org:443",
            "files.pythonhosted.org:443",
            "github.com:443",
        ] {
            check(
                rules
                    .iter()
                    .any(|r| r["target"] == t && r["added_by"] == "suggestion"),
                format!("{t} added by the suggestion: {ls}"),
            )?;
        }
        check(
            !ls.contains("pastebin") && !ls.contains("evil.example"),
            format!("flagged ones were not applied: {ls}"),
        )?;
        let out = ok(&["policy", "suggest", other, "--json"])?;
        let left: Vec<serde_json::Value> = serde_json::from_str(&out).map_err(|e| e.to_string())?;
        check(
            left.len() == 2,
            format!("only the flagged ones are left: {out}"),
        )
    })();
    let _ = sandpen(&["rm", "-f", other]);
    result
}

/// An attached `run` prints a line on its terminal for a connection that
/// starts to wait.
fn an_attached_run_says_what_waits() -> Result<(), Failed> {
    ready()?;
    let port = env().port;
    let run = Background(Some(
        env()
            .cli
            .command(&[
                "run",
                "--",
                "curl",
                "-sS",
                "-m",
                "80",
                "--noproxy",
                "*",
                &format!("http://once.test:{port}/from-run"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sandpen run"),
    ));
    let held = pending_for("once.test", Duration::from_secs(30))?;
    let id = held
        .first()
        .and_then(|p| p["id"].as_u64())
        .ok_or("a held connection")?;
    // The line is written when the entry appears; give it a moment.
    std::thread::sleep(Duration::from_secs(1));
    ok(&["policy", "approve", &id.to_string(), "--once"])?;
    let (code, out) = finish(run);
    check(
        code == 0
            && out.contains("hello /from-run")
            && out.contains(&format!(
                "sandpen: {NAME}: once.test:{port} is waiting for your answer (GET /from-run HTTP/1.1): `sandpen policy approve {id} --once|--always`"
            )),
        format!("{code} {out}"),
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
            "a_request_from_the_guest_waits_for_the_user",
            a_request_from_the_guest_waits_for_the_user,
        ),
        ("why_explains_the_last_denial", why_explains_the_last_denial),
        (
            "the_network_log_names_the_guest_process",
            the_network_log_names_the_guest_process,
        ),
        (
            "dns_txt_explains_the_last_denial",
            dns_txt_explains_the_last_denial,
        ),
        (
            "a_file_exception_is_written_only_by_the_user",
            a_file_exception_is_written_only_by_the_user,
        ),
        (
            "approve_once_on_a_request_allows_one_connection",
            approve_once_on_a_request_allows_one_connection,
        ),
        (
            "suggest_applies_rules_from_a_learn_log",
            suggest_applies_rules_from_a_learn_log,
        ),
        (
            "approve_once_lets_one_connection_through",
            approve_once_lets_one_connection_through,
        ),
        ("approve_always_adds_a_rule", approve_always_adds_a_rule),
        (
            "an_attached_run_says_what_waits",
            an_attached_run_says_what_waits,
        ),
        (
            "undo_restores_the_previous_verdict",
            undo_restores_the_previous_verdict,
        ),
        (
            "a_timeout_denies_with_ask_timeout",
            a_timeout_denies_with_ask_timeout,
        ),
        ("denials_are_never_held", denials_are_never_held),
        (
            "the_403_body_names_the_rule_and_the_request_line",
            the_403_body_names_the_rule_and_the_request_line,
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
