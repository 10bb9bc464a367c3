//! A guest CPU stress in one sandbox (`--cpus 1`) against a second sandbox's
//! `exec` latency and a host process's throughput, with resource limits and
//! without them (`SANDPEN_LIMITS=off`), in the same run (docs/benchmarks.md,
//! "Resource limits").
//!
//! The stress is busy loops as root (`for i in 1 2; do while :; do :; done &
//! done`). Each mode measures, with the stressed sandbox idle and then busy:
//! the p50 of `sandpen exec B true`, and the iterations per second of a
//! fixed busy loop in this process. It prints each figure and the ratios
//! busy/idle, and limits/no limits.
//!
//! `SANDPEN_BENCH_STRESS=host` adds to the busy loops a write-and-read loop
//! through the workspace share, so that A's host threads (the file server,
//! QEMU's I/O) want CPU beside its one vCPU: the case where the quota binds
//! on a 2-core host. A's CPU is then also read from /proc (its supervisor
//! and every process below it), which works in both modes.
//!
//! `cargo bench -p sandpen --bench limits`. Needs the default image (scripts/test
//! builds it), found through `$SANDPEN_TEST_DATA_HOME`, and root for the
//! cgroups (otherwise both modes run without limits, and it says so).

use std::hint::black_box;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `exec` round trips per figure.
const EXECS: usize = 21;
/// Seconds the host busy loop is measured for.
const SPIN_SECS: u64 = 8;

struct Ctx {
    bin: PathBuf,
    ws: PathBuf,
    state: tempfile::TempDir,
    config: tempfile::TempDir,
    data: PathBuf,
}

impl Ctx {
    fn run(&self, args: &[&str], limits: bool) -> Output {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .current_dir(&self.ws)
            .env("XDG_STATE_HOME", self.state.path())
            .env("XDG_CONFIG_HOME", self.config.path())
            .env("XDG_DATA_HOME", &self.data)
            .stdin(Stdio::null());
        if !limits {
            c.env("SANDPEN_LIMITS", "off");
        }
        c.output().expect("sandpen")
    }

    fn ok(&self, args: &[&str], limits: bool) -> String {
        let out = self.run(args, limits);
        assert!(
            out.status.success(),
            "sandpen {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        for line in stderr.lines().filter(|l| l.contains("resource limits")) {
            eprintln!("  ({line})");
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The p50 of `EXECS` `sandpen exec B true`, in ms.
fn exec_p50(ctx: &Ctx) -> f64 {
    let mut times: Vec<f64> = (0..EXECS)
        .map(|_| {
            let t = Instant::now();
            ctx.ok(&["exec", "b", "--", "true"], true);
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

/// Iterations per second of a fixed busy loop on one host thread.
fn host_rate() -> f64 {
    let t = Instant::now();
    let deadline = Duration::from_secs(SPIN_SECS);
    let mut n: u64 = 0;
    let mut x: u64 = 1;
    while t.elapsed() < deadline {
        for _ in 0..100_000 {
            x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        n += 1;
    }
    black_box(x);
    n as f64 * 100_000.0 / t.elapsed().as_secs_f64()
}

/// A's CPU % now (100 = one host CPU), from `stats` (limits on only).
fn cpu_of_a(ctx: &Ctx) -> String {
    let out = ctx.run(&["stats", "--no-stream", "--json", "a"], true);
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    v[0]["cpu_percent"]
        .as_f64()
        .map(|c| format!("{c:.0}%"))
        .unwrap_or_else(|| "- (no cgroup)".into())
}

/// Whether the stress also works the host through the share.
fn host_stress() -> bool {
    std::env::var("SANDPEN_BENCH_STRESS").is_ok_and(|v| v == "host")
}

/// CPU seconds so far of sandbox `name`'s supervisor and every process
/// below it (QEMU's launcher and QEMU, the file servers), from /proc.
fn tree_cpu_secs(ctx: &Ctx, name: &str) -> f64 {
    let pidfile = ctx
        .state
        .path()
        .join(format!("sandpen/sandboxes/{name}/run/supervisor.pid"));
    let Some(root) = std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return 0.0;
    };
    // (pid, ppid, utime + stime in ticks) of every process.
    let procs: Vec<(u32, u32, u64)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let rest = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ppid = f.get(1)?.parse().ok()?;
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some((pid, ppid, ticks))
        })
        .collect();
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(procs.iter().filter(|p| p.1 == parent).map(|p| p.0));
        i += 1;
    }
    let ticks: u64 = procs
        .iter()
        .filter(|p| tree.contains(&p.0))
        .map(|p| p.2)
        .sum();
    // SAFETY: sysconf takes an integer and returns one.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// A's host CPU over the next 4 s, in % of one CPU (from /proc).
fn host_cpu_of_a(ctx: &Ctx) -> f64 {
    let t = Instant::now();
    let before = tree_cpu_secs(ctx, "a");
    std::thread::sleep(Duration::from_secs(4));
    (tree_cpu_secs(ctx, "a") - before) / t.elapsed().as_secs_f64() * 100.0
}

struct Figures {
    /// A's host CPU under stress, % of one CPU (its whole process tree).
    a_cpu: f64,
    exec_idle: f64,
    exec_busy: f64,
    rate_idle: f64,
    rate_busy: f64,
}

fn measure(ctx: &Ctx, limits: bool) -> Figures {
    let label = if limits { "limits" } else { "no limits" };
    eprintln!("-- {label}");
    ctx.ok(&["start", "a"], limits);
    ctx.ok(&["start", "b"], limits);
    std::thread::sleep(Duration::from_secs(5));
    let exec_idle = exec_p50(ctx);
    let rate_idle = host_rate();
    ctx.ok(
        &[
            "exec",
            "-u",
            "root",
            "a",
            "--",
            "sh",
            "-c",
            "for i in 1 2; do (while :; do :; done) >/dev/null 2>&1 & done; echo",
        ],
        true,
    );
    if host_stress() {
        let ws = ctx.ws.display().to_string();
        ctx.ok(
            &[
                "exec",
                "-u",
                "root",
                "a",
                "--",
                "sh",
                "-c",
                &format!(
                    "(while :; do dd if=/dev/zero of={ws}/.bench-io bs=1M count=32 conv=fsync; \
                     cat {ws}/.bench-io; done) >/dev/null 2>&1 & echo"
                ),
            ],
            true,
        );
    }
    std::thread::sleep(Duration::from_secs(3));
    eprintln!("  A under stress: {}", cpu_of_a(ctx));
    let a_cpu = host_cpu_of_a(ctx);
    eprintln!("  A's process tree: {a_cpu:.0}% of a CPU");
    let exec_busy = exec_p50(ctx);
    let rate_busy = host_rate();
    eprintln!("  A under stress: {}", cpu_of_a(ctx));
    ctx.ok(&["stop", "-t", "10", "a"], true);
    ctx.ok(&["stop", "b"], true);
    Figures {
        a_cpu,
        exec_idle,
        exec_busy,
        rate_idle,
        rate_busy,
    }
}

fn main() {
    let data = std::env::var_os("SANDPEN_TEST_DATA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/sandpen-test")
        });
    let root = tempfile::tempdir().expect("a folder");
    let ws = root.path().join("limits");
    std::fs::create_dir(&ws).expect("the workspace");
    let ctx = Ctx {
        bin: PathBuf::from(env!("CARGO_BIN_EXE_sandpen")),
        ws,
        state: tempfile::tempdir().expect("state"),
        config: tempfile::tempdir().expect("config"),
        data,
    };
    ctx.ok(&["policy", "init", "deny-all"], true);
    for name in ["a", "b"] {
        ctx.ok(
            &["create", "--name", name, "--cpus", "1", "--memory", "1G"],
            true,
        );
    }
    // Rounds alternate which mode goes first, so that a change in the
    // host's load (other work on a shared machine) falls on both.
    let rounds: usize = std::env::var("SANDPEN_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    eprintln!(
        "load before: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        if r % 2 == 0 {
            on.push(measure(&ctx, true));
            off.push(measure(&ctx, false));
        } else {
            off.push(measure(&ctx, false));
            on.push(measure(&ctx, true));
        }
    }
    ctx.ok(&["rm", "-f", "a", "b"], true);

    let what = if host_stress() {
        "2 busy loops and a write/read loop through the share, as root"
    } else {
        "2 busy loops as root"
    };
    println!("guest stress in A (--cpus 1, {what}); {EXECS} execs, {SPIN_SECS} s of host spin per figure; {rounds} rounds, modes alternated");
    println!(
        "{:<10} {:>8} {:>14} {:>14} {:>8} {:>16} {:>16} {:>8}",
        "mode",
        "A cpu",
        "exec B idle",
        "exec B busy",
        "ratio",
        "host it/s idle",
        "host it/s busy",
        "ratio"
    );
    let row = |label: &str, f: &Figures| {
        println!(
            "{:<10} {:>7.0}% {:>11.0} ms {:>11.0} ms {:>7.2}x {:>16.3e} {:>16.3e} {:>7.2}x",
            label,
            f.a_cpu,
            f.exec_idle,
            f.exec_busy,
            f.exec_busy / f.exec_idle,
            f.rate_idle,
            f.rate_busy,
            f.rate_busy / f.rate_idle
        );
    };
    for r in 0..rounds {
        row(&format!("limits {}", r + 1), &on[r]);
        row(&format!("off {}", r + 1), &off[r]);
    }
    let median = |v: Vec<f64>| {
        let mut v = v;
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let ratios = |fs: &[Figures]| {
        (
            median(fs.iter().map(|f| f.exec_busy / f.exec_idle).collect()),
            median(fs.iter().map(|f| f.rate_busy / f.rate_idle).collect()),
        )
    };
    println!(
        "median A cpu under stress: limits {:.0}%, no limits {:.0}%",
        median(on.iter().map(|f| f.a_cpu).collect()),
        median(off.iter().map(|f| f.a_cpu).collect())
    );
    let (on_exec, on_rate) = ratios(&on);
    let (off_exec, off_rate) = ratios(&off);
    println!(
        "median busy/idle: limits exec {on_exec:.2}x, host {on_rate:.2}x; no limits exec {off_exec:.2}x, host {off_rate:.2}x"
    );
    println!(
        "median under stress, limits / no limits: exec p50 {:.2}x, host throughput {:.2}x",
        median(on.iter().map(|f| f.exec_busy).collect())
            / median(off.iter().map(|f| f.exec_busy).collect()),
        median(on.iter().map(|f| f.rate_busy).collect())
            / median(off.iter().map(|f| f.rate_busy).collect())
    );
    eprintln!(
        "load after: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}
