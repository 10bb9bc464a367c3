//! Host memory of one sandbox holding 1,000 idle guest connections, against
//! the same sandbox idle, measured in the same run (docs/benchmarks.md).
//!
//! The guest opens the connections (bash `/dev/tcp`, each then idle) to a
//! listener on the host's loopback that an `--add-host` name and an allow
//! rule reach; the proxy holds its limit of them open (the rest are refused,
//! `too-many-connections`). The supervisor's RSS is the figure that the
//! channel and the proxy cost; QEMU's is printed beside it (it also grows with
//! the guest memory the connections touch).
//!
//! With `SANDPEN_BENCH_HELD=1` the sandbox is in ask mode and the name has
//! no rule: the same connections are *held* for an answer instead
//! (docs/policy.md, "Ask mode"), counted with `policy pending`; the figure
//! per held connection compares with the one per idle tunnel.
//!
//! `cargo bench -p sandpen --bench connections`. Needs the default image
//! (scripts/test builds it), found through `$SANDPEN_TEST_DATA_HOME`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const NAME: &str = "conns";
const CONNECTIONS: usize = 1000;

struct Ctx {
    bin: PathBuf,
    ws: PathBuf,
    state: tempfile::TempDir,
    config: tempfile::TempDir,
    data: PathBuf,
}

impl Ctx {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .args(args)
            .current_dir(&self.ws)
            .env("XDG_STATE_HOME", self.state.path())
            .env("XDG_CONFIG_HOME", self.config.path())
            .env("XDG_DATA_HOME", &self.data)
            .stdin(Stdio::null())
            .output()
            .expect("sandpen")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "sandpen {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn pid(&self, what: &str) -> u32 {
        let run = self
            .state
            .path()
            .join(format!("sandpen/sandboxes/{NAME}/run"));
        match what {
            "supervisor" => std::fs::read_to_string(run.join("supervisor.pid"))
                .expect("pid file")
                .trim()
                .parse()
                .expect("a pid"),
            _ => {
                let out = Command::new("pgrep")
                    // Its sockets are descriptors (the jail): found by its disk.
                    .args([
                        "-f",
                        &format!(
                            "qemu-system.*{}/disk.qcow2",
                            run.parent().unwrap_or(&run).display()
                        ),
                    ])
                    .output()
                    .expect("pgrep");
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .next()
                    .and_then(|l| l.trim().parse().ok())
                    .expect("QEMU's pid")
            }
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let data = std::env::var_os("SANDPEN_TEST_DATA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/sandpen-test")
        });
    let root = tempfile::tempdir().expect("a folder");
    let ws = root.path().join(NAME);
    std::fs::create_dir(&ws).expect("the workspace");
    let ctx = Ctx {
        bin: PathBuf::from(env!("CARGO_BIN_EXE_sandpen")),
        ws,
        state: tempfile::tempdir().expect("state"),
        config: tempfile::tempdir().expect("config"),
        data,
    };
    let listener = TcpListener::bind("127.0.0.1:0").expect("a listener");
    let port = listener.local_addr().expect("address").port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().flatten() {
            count.fetch_add(1, Ordering::Relaxed);
            held.push(c);
        }
    });
    ctx.ok(&["policy", "init", "deny-all"]);
    ctx.ok(&["create", "--add-host", "h.test:127.0.0.1"]);
    let held_mode = std::env::var_os("SANDPEN_BENCH_HELD").is_some();
    if held_mode {
        ctx.ok(&["policy", "mode", "ask", NAME]);
        let file = ctx
            .state
            .path()
            .join(format!("sandpen/sandboxes/{NAME}/policy.toml"));
        let text = std::fs::read_to_string(&file).expect("the sandbox's policy");
        std::fs::write(&file, format!("ask_timeout = 900\n{text}")).expect("ask_timeout");
    } else {
        ctx.ok(&["policy", "allow", "network", "h.test raw", NAME]);
    }
    ctx.ok(&["start", NAME]);
    let pending = || -> usize {
        let out = ctx.ok(&["policy", "pending", NAME, "--json"]);
        out.matches("\"id\"").count()
    };
    // Settle, then the idle figures.
    std::thread::sleep(Duration::from_secs(5));
    let sup = ctx.pid("supervisor");
    let qemu = ctx.pid("qemu");
    let (sup_idle, qemu_idle) = (rss_kib(sup), rss_kib(qemu));
    let mut flood = Command::new(&ctx.bin)
        .args(["exec", "-u", "root", NAME, "--", "bash", "-c"])
        .arg(format!(
            "ulimit -n 4096; for i in $(seq 1 {CONNECTIONS}); do \
               (exec 3<>/dev/tcp/h.test/{port} && sleep 60) 2>/dev/null & done; wait"
        ))
        .current_dir(&ctx.ws)
        .env("XDG_STATE_HOME", ctx.state.path())
        .env("XDG_CONFIG_HOME", ctx.config.path())
        .env("XDG_DATA_HOME", &ctx.data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the flood");
    // Wait until the host holds what the proxy lets through (its limit, 512),
    // and settles: a loaded host forks the guest's shells slowly.
    let t = Instant::now();
    let mut last = 0;
    while t.elapsed() < Duration::from_secs(150) {
        std::thread::sleep(Duration::from_secs(3));
        let now = if held_mode {
            pending()
        } else {
            accepted.load(Ordering::Relaxed)
        };
        if now >= 512 && now == last {
            break;
        }
        last = now;
    }
    let held = if held_mode {
        pending()
    } else {
        accepted.load(Ordering::Relaxed)
    };
    let (sup_busy, qemu_busy) = (rss_kib(sup), rss_kib(qemu));
    let _ = flood.kill();
    let _ = flood.wait();
    let _ = ctx.run(&["rm", "-f", NAME]);
    let what = if held_mode {
        "held for an answer (ask mode)"
    } else {
        "held open on the host (idle tunnels)"
    };
    println!("connections opened in the guest: {CONNECTIONS}; {what}: {held}");
    println!(
        "supervisor RSS: idle {:.1} MiB, with the connections {:.1} MiB ({:.2}x; {:.1} KiB per held connection)",
        sup_idle as f64 / 1024.0,
        sup_busy as f64 / 1024.0,
        sup_busy as f64 / sup_idle.max(1) as f64,
        (sup_busy.saturating_sub(sup_idle)) as f64 / held.max(1) as f64
    );
    println!(
        "QEMU RSS: idle {:.1} MiB, with the connections {:.1} MiB ({:.2}x)",
        qemu_idle as f64 / 1024.0,
        qemu_busy as f64 / 1024.0,
        qemu_busy as f64 / qemu_idle.max(1) as f64
    );
}
