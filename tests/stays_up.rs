//! End-to-end: a sandbox stays up whatever the guest does, a part that dies
//! is noticed and named, and concurrent callers share one sandbox (see
//! docs/architecture.md, "Failure handling"). Everything the guest does here
//! it does as root, the way an injected agent would.
//!
//! The tests share one sandbox (`up`) and run in order; the kill -9 tests
//! come last.

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};

mod common;
use common::{check, text, Cli};

const NAME: &str = "up";
/// Chunks of the write that a part is killed under: 30 of 10 MiB.
const CHUNK_MIB: u64 = 10;
const CHUNKS: u64 = 30;

struct Env {
    cli: Cli,
    _root: tempfile::TempDir,
    /// A TCP server on the host's loopback (`h.test` in the guest) that takes
    /// every connection and holds it open.
    port: u16,
    accepted: Arc<AtomicUsize>,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let (root, ws) = common::workspace("sandpen-up-", NAME);
        let listener = TcpListener::bind("127.0.0.1:0").expect("a listener");
        let port = listener.local_addr().expect("its address").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            // Held until there are too many: bounded, whatever the guest does.
            let mut held: Vec<TcpStream> = Vec::new();
            for conn in listener.incoming().flatten() {
                count.fetch_add(1, Ordering::Relaxed);
                held.push(conn);
                if held.len() > 4000 {
                    held.drain(..2000);
                }
            }
        });
        Env {
            cli: Cli::new(ws),
            _root: root,
            port,
            accepted,
        }
    })
}

fn sandpen(args: &[&str]) -> Output {
    env().cli.run(args)
}

fn ok(args: &[&str]) -> Result<String, Failed> {
    env().cli.ok(args)
}

/// `sh -c SCRIPT` as root in the guest.
fn root_sh(script: &str) -> Result<String, Failed> {
    ok(&["exec", "-u", "root", NAME, "--", "sh", "-c", script])
}

fn ready() -> Result<(), Failed> {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| setup().map_err(|e| format!("setting up the sandbox: {e:?}")))
        .clone()
        .map_err(Failed::from)
}

fn setup() -> Result<(), Failed> {
    ok(&["policy", "init", "deny-all"])?;
    ok(&["create", "--memory", "1G", "--add-host", "h.test:127.0.0.1"])?;
    ok(&["policy", "allow", "network", "h.test raw", NAME])?;
    ok(&["start", NAME])?;
    Ok(())
}

/// The proxy's records in the network log.
fn net_records() -> Result<Vec<serde_json::Value>, Failed> {
    let path = env()
        .cli
        .state
        .path()
        .join(format!("sandpen/sandboxes/{NAME}/logs/net.jsonl"));
    let body = std::fs::read_to_string(&path).unwrap_or_default();
    Ok(body
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

fn spawn_guest(script: &str) -> Child {
    env()
        .cli
        .command(&["exec", "-u", "root", NAME, "--", "bash", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sandpen exec")
}

/// 1,000 connections at once to an allowed host: the proxy serves its limit
/// and refuses the rest, each refusal logged; the sandbox stays running and
/// exec works during and after.
fn a_thousand_connections_keep_the_sandbox_up() -> Result<(), Failed> {
    ready()?;
    let port = env().port;
    let before = env().accepted.load(Ordering::Relaxed);
    let mut flood = spawn_guest(&format!(
        "ulimit -n 4096; for i in $(seq 1 1000); do \
           (exec 3<>/dev/tcp/h.test/{port} && sleep 25) 2>/dev/null & \
         done; wait; echo flood-done"
    ));
    // Exec works while they are open.
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut during = false;
    let mut last = String::new();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(3));
        let out = sandpen(&["exec", NAME, "--", "echo", "during"]);
        let accepted = env().accepted.load(Ordering::Relaxed) - before;
        last = format!(
            "exec: {:?} {:?} {:?}; {accepted} connections held",
            out.status.code(),
            text(&out.stdout),
            text(&out.stderr)
        );
        if out.status.success() && text(&out.stdout) == "during\n" && accepted >= 400 {
            during = true;
            break;
        }
        if flood.try_wait()?.is_some() {
            break;
        }
    }
    let status = flood.wait()?;
    check(
        during,
        format!("exec did not work while the connections were open: {last}"),
    )?;
    let mut out = String::new();
    if let Some(mut o) = flood.stdout.take() {
        o.read_to_string(&mut out)?;
    }
    check(
        status.success() && out.contains("flood-done"),
        format!("the flood's exec ended with {status}: {out}"),
    )?;
    let (state, reason) = env().cli.status_of(NAME)?;
    check(state == "running", format!("status {state} {reason}"))?;
    check(root_sh("echo after")? == "after\n", "exec after the flood")?;
    let accepted = env().accepted.load(Ordering::Relaxed) - before;
    let refused = net_records()?
        .iter()
        .filter(|r| {
            r["decision"] == "deny"
                && r["reason"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("too-many-connections"))
        })
        .count();
    check(
        accepted >= 500,
        format!("only {accepted} connections reached the host"),
    )?;
    check(
        refused > 0 && accepted + refused >= 990,
        format!(
            "{accepted} connections reached the host and {refused} refusals are logged, of 1000"
        ),
    )
}

/// 10,000 connect attempts in a burst, and root writing garbage at the
/// channel's ports: the supervisor stays up, the sandbox answers, and so
/// does another sandbox.
fn a_burst_and_port_garbage_take_nothing_down() -> Result<(), Failed> {
    ready()?;
    let (other_root, other_ws) = common::workspace("sandpen-up-other-", "other");
    let other = Cli::new(other_ws);
    other.ok(&["create", "--memory", "512M", "--cpus", "1"])?;
    other.ok(&["start", "other"])?;
    let port = env().port;
    // Perl is in every Debian image (perl-base): non-blocking connects, as
    // fast as the guest can make them, never more than 500 open.
    let burst = format!(
        r#"perl -MIO::Socket::INET -e '
            my @open; my $made = 0;
            for (1..10000) {{
                my $s = IO::Socket::INET->new(PeerAddr => "h.test", PeerPort => {port}, Blocking => 0);
                $made++ if $s;
                push @open, $s if $s;
                @open = () if @open >= 500;
            }}
            print "made $made\n";'"#
    );
    let out = root_sh(&burst)?;
    check(out.starts_with("made "), format!("the burst: {out}"))?;
    // The ports are PID 1's; as root, write garbage at every virtio port.
    let garbage = root_sh(
        "for p in /dev/vport*; do head -c 1048576 /dev/urandom > $p 2>&1 || true; done; \
         ls /sys/class/virtio-ports | wc -l",
    )?;
    check(
        garbage.trim().parse::<u32>().unwrap_or(0) >= 2,
        format!("the guest sees {garbage} ports"),
    )?;
    let (state, reason) = env().cli.status_of(NAME)?;
    check(state == "running", format!("status {state} {reason}"))?;
    check(root_sh("echo alive")? == "alive\n", "exec after the burst")?;
    let other_up = other.ok(&["exec", "other", "--", "echo", "other"]);
    let _ = other.run(&["rm", "-f", "other"]);
    drop(other_root);
    check(other_up? == "other\n", "the other sandbox")
}

/// Three `sandpen run` at the same moment in a new workspace: all three print
/// their output, and there is one sandbox.
fn three_concurrent_runs_share_one_sandbox() -> Result<(), Failed> {
    let (root, ws) = common::workspace("sandpen-up-race-", "race");
    let cli = Cli::new(ws);
    let runs: Vec<Child> = (0..3)
        .map(|i| {
            cli.command(&[
                "run",
                "--memory",
                "512M",
                "--cpus",
                "1",
                "--",
                "echo",
                &format!("x{i}"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sandpen run")
        })
        .collect();
    let mut failures = Vec::new();
    for (i, run) in runs.into_iter().enumerate() {
        let out = run.wait_with_output()?;
        if !out.status.success() || text(&out.stdout) != format!("x{i}\n") {
            failures.push(format!(
                "run {i}: {:?} stdout {:?} stderr {:?}",
                out.status.code(),
                text(&out.stdout),
                text(&out.stderr)
            ));
        }
    }
    let ls = cli.ok(&["ls", "--json"])?;
    let _ = cli.run(&["rm", "-f", "race"]);
    drop(root);
    check(failures.is_empty(), failures.join("\n"))?;
    let rows: serde_json::Value = serde_json::from_str(&ls)?;
    check(
        rows.as_array().map(|a| a.len()) == Some(1),
        format!("ls shows: {ls}"),
    )
}

/// A child killed and reaped however the test ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Which host process a kill -9 test takes down.
#[derive(Clone, Copy, Debug)]
enum Part {
    FileServer,
    Qemu,
    Supervisor,
}

fn pid_of(part: Part) -> Result<i32, Failed> {
    let state = env().cli.state.path().to_string_lossy().into_owned();
    let run = format!("{state}/sandpen/sandboxes/{NAME}/run");
    let pattern = match part {
        Part::FileServer => format!("fs-serve.*{run}/fs0.sock"),
        // QEMU's sockets are descriptors it inherits; its disk is named.
        Part::Qemu => format!("qemu-system.*{}/disk.qcow2", run.trim_end_matches("/run")),
        Part::Supervisor => {
            let pid = std::fs::read_to_string(format!("{run}/supervisor.pid"))?;
            return Ok(pid.trim().parse()?);
        }
    };
    let out = Command::new("pgrep").args(["-f", &pattern]).output()?;
    text(&out.stdout)
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| format!("no process matches {pattern}").into())
}

/// `kill -9` of `part` while the guest writes 300 MiB to the share, one
/// fsynced 10 MiB chunk at a time: the writer's exec returns within 5 s,
/// `ls` says which part died, `start` works, and the host file holds every
/// chunk the guest had fsynced.
fn kill_mid_write(part: Part) -> Result<(), Failed> {
    ready()?;
    let (state, _) = env().cli.status_of(NAME)?;
    if state != "running" {
        ok(&["start", NAME])?;
    }
    let file = env().cli.ws.join(format!("big-{part:?}"));
    let _ = std::fs::remove_file(&file);
    let mut writer = Reaped(spawn_guest(&format!(
        "for i in $(seq 0 {last}); do \
           tr '\\0' 'x' < /dev/zero | head -c {chunk} | \
             dd of={file} bs=1M seek=$((i*{CHUNK_MIB})) conv=notrunc,fsync iflag=fullblock status=none \
             || exit 1; \
           echo synced $((i+1)); \
         done",
        last = CHUNKS - 1,
        chunk = CHUNK_MIB << 20,
        file = file.display(),
    )));
    let writer = &mut writer.0;
    let stdout = writer.stdout.take().ok_or("no stdout")?;
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = lines.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(mut l) = seen.lock() {
                l.push(line);
            }
        }
    });
    let synced = |lines: &Arc<Mutex<Vec<String>>>| -> u64 {
        lines
            .lock()
            .ok()
            .and_then(|l| l.last().cloned())
            .and_then(|l| l.strip_prefix("synced ").and_then(|n| n.parse().ok()))
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while synced(&lines) < 3 {
        if Instant::now() > deadline || writer.try_wait()?.is_some() {
            return Err(format!("the writer did not get going: {:?}", lines.lock().ok()).into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = pid_of(part)?;
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()?;
    let killed = Instant::now();
    let mut returned = None;
    while killed.elapsed() < Duration::from_secs(30) {
        if let Some(status) = writer.try_wait()? {
            returned = Some((status, killed.elapsed()));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = writer.kill();
    let _ = reader.join();
    let mut stderr = String::new();
    if let Some(mut e) = writer.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let (status, took) = returned.ok_or("the writer's exec still hangs 30 s after the kill")?;
    check(
        took < Duration::from_secs(5),
        format!("the writer's exec returned {took:?} after the kill ({status})"),
    )?;
    check(
        !status.success(),
        "the writer's exec succeeded after the kill",
    )?;
    let synced_chunks = synced(&lines);
    // `ls` names the part (the supervisor records it as it stops the VM).
    let want = match part {
        Part::FileServer => "file server",
        Part::Qemu => "QEMU",
        Part::Supervisor => "supervisor died",
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let (state, reason) = loop {
        let (state, reason) = env().cli.status_of(NAME)?;
        if state == "failed" || Instant::now() > deadline {
            break (state, reason);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    check(
        state == "failed"
            && reason.contains(want)
            && reason.contains("signal 9") == !matches!(part, Part::Supervisor),
        format!("ls says {state} ({reason}); stderr of the writer: {stderr}"),
    )?;
    let bytes = std::fs::read(&file)?;
    let need = ((synced_chunks * CHUNK_MIB) << 20) as usize;
    check(
        bytes.len() >= need && bytes[..need].iter().all(|&b| b == b'x'),
        format!(
            "the host file has {} bytes, {synced_chunks} chunks were fsynced",
            bytes.len()
        ),
    )?;
    ok(&["start", NAME])?;
    check(root_sh("echo back")? == "back\n", "exec after start")?;
    let (state, _) = env().cli.status_of(NAME)?;
    check(state == "running", format!("status after start: {state}"))
}

fn kill_9_file_server_mid_write() -> Result<(), Failed> {
    kill_mid_write(Part::FileServer)
}

fn kill_9_qemu_mid_write() -> Result<(), Failed> {
    kill_mid_write(Part::Qemu)
}

fn kill_9_supervisor_mid_write() -> Result<(), Failed> {
    kill_mid_write(Part::Supervisor)
}

type TestFn = fn() -> Result<(), Failed>;

fn main() {
    let args = Arguments {
        test_threads: Some(1),
        ..Arguments::from_args()
    };
    let tests: Vec<(&str, TestFn)> = vec![
        (
            "a_thousand_connections_keep_the_sandbox_up",
            a_thousand_connections_keep_the_sandbox_up,
        ),
        (
            "a_burst_and_port_garbage_take_nothing_down",
            a_burst_and_port_garbage_take_nothing_down,
        ),
        (
            "three_concurrent_runs_share_one_sandbox",
            three_concurrent_runs_share_one_sandbox,
        ),
        ("kill_9_file_server_mid_write", kill_9_file_server_mid_write),
        ("kill_9_qemu_mid_write", kill_9_qemu_mid_write),
        ("kill_9_supervisor_mid_write", kill_9_supervisor_mid_write),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, f)| Trial::test(name, f))
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    let _ = sandpen(&["rm", "-f", NAME]);
    conclusion.exit();
}
