//! Spine benchmarks: each figure is printed beside a baseline measured in the
//! same run.
//!
//! - cold `sandpen run -- true` vs a bare boot of the same kernel and initramfs
//!   to `/init` (QEMU started by hand, the guest powers off at once);
//! - `exec -- true` round trip (through the CLI, and in-process through the
//!   control API) vs a bare unix socket round trip;
//! - host memory of an idle sandbox (supervisor + QEMU + file server) over the
//!   guest RAM it touched.
//!
//! `cargo bench -p sandpen --bench spine`. Needs a built image (scripts/test or
//! `sandpen image build`), found through `$SANDPEN_TEST_DATA_HOME` or
//! `$XDG_DATA_HOME`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sandpen_proto::{ExecEvent, ExecInput, ExecRequest};
use sandpen_supervisor::control::{self, State};
use sandpen_supervisor::Dirs;

const NAME: &str = "bench";

struct Ctx {
    bin: PathBuf,
    state: tempfile::TempDir,
    data: PathBuf,
    ws: PathBuf,
    _root: tempfile::TempDir,
}

impl Ctx {
    fn sandpen(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.bin)
            .args(args)
            .current_dir(&self.ws)
            .env("XDG_STATE_HOME", self.state.path())
            .env("XDG_DATA_HOME", &self.data)
            .stdin(Stdio::null())
            .output()
            .expect("running sandpen")
    }

    fn ok(&self, args: &[&str]) {
        let out = self.sandpen(args);
        assert!(
            out.status.success(),
            "sandpen {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn dirs(&self) -> Dirs {
        Dirs {
            state: self.state.path().join("sandpen"),
            data: self.data.join("sandpen"),
            config: self.state.path().join("config"),
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// QEMU with the sandbox's machine, kernel and initramfs, told to stop at /init.
fn bare_boot(ctx: &Ctx, image: &sandpen_image::Image, initrd: &Path) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    sandpen_vm::disk::create_overlay(&image.rootfs(), &disk, 4).unwrap();
    let config = sandpen_vm::VmConfig {
        name: "bare".into(),
        accel: sandpen_vm::choose_accel(sandpen_vm::AccelChoice::Auto)
            .unwrap()
            .accel,
        cpus: 1,
        memory_mib: 1024,
        kernel: image.kernel(),
        initrd: initrd.to_path_buf(),
        disk,
        channel_socket: sandpen_vm::Socket::Path(dir.path().join("channel.sock")),
        egress_socket: sandpen_vm::Socket::Path(dir.path().join("egress.sock")),
        qmp_socket: sandpen_vm::Socket::Path(dir.path().join("qmp.sock")),
        console: sandpen_vm::Console::File(dir.path().join("console.log")),
        shares: vec![],
        tsc_khz: sandpen_vm::qemu::host_tsc_khz(),
        extra_cmdline: vec!["sandpen.bare".into()],
    };
    let t = Instant::now();
    let status = Command::new("qemu-system-x86_64")
        .args(config.args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("qemu");
    let secs = t.elapsed().as_secs_f64();
    let console = std::fs::read_to_string(dir.path().join("console.log")).unwrap_or_default();
    assert!(
        status.success() && console.contains("bare boot"),
        "bare boot failed: {console}"
    );
    let _ = ctx;
    secs
}

fn unix_round_trip_us(n: usize) -> f64 {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        while b.read_exact(&mut byte).is_ok() {
            if b.write_all(&byte).is_err() {
                break;
            }
        }
    });
    let mut samples = Vec::with_capacity(n);
    let mut byte = [0u8; 1];
    for _ in 0..n {
        let t = Instant::now();
        a.write_all(b"x").unwrap();
        a.read_exact(&mut byte).unwrap();
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(a);
    let _ = echo.join();
    median(samples)
}

/// Milliseconds to the exit status of `true`, and to the `Started` event (the
/// guest has forked and exec'd the process).
async fn exec_true_in_process(ctx: &Ctx) -> (f64, f64) {
    let paths = ctx.dirs().sandbox(NAME);
    let t = Instant::now();
    let mut frames = control::exec(
        &paths,
        ExecRequest {
            argv: vec!["true".into()],
            env: vec![],
            cwd: None,
            user: None,
            tty: None,
        },
    )
    .await
    .unwrap();
    frames.send(&ExecInput::StdinEof).await.unwrap();
    let mut started = 0.0;
    loop {
        match frames.recv::<ExecEvent>().await.unwrap() {
            Some(ExecEvent::Exit(_)) | None => break,
            Some(ExecEvent::Started { .. }) => started = t.elapsed().as_secs_f64() * 1e3,
            Some(_) => {}
        }
    }
    (t.elapsed().as_secs_f64() * 1e3, started)
}

struct Rss {
    total: u64,
    anon: u64,
    shmem: u64,
}

fn rss_kib(pid: u32) -> Rss {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Rss {
        total: field("VmRSS:"),
        anon: field("RssAnon:"),
        shmem: field("RssShmem:"),
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; there are no tests here.
    }
    let data = std::env::var_os("SANDPEN_TEST_DATA_HOME")
        .or_else(|| std::env::var_os("XDG_DATA_HOME"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".local/share"));
    let root = tempfile::tempdir().unwrap();
    let ws = root.path().join(NAME);
    std::fs::create_dir(&ws).unwrap();
    let ctx = Ctx {
        bin: PathBuf::from(env!("CARGO_BIN_EXE_sandpen")),
        state: tempfile::tempdir().unwrap(),
        data,
        ws,
        _root: root,
    };
    let image =
        sandpen_image::load(&ctx.dirs().images(), "default").expect("build the image first");
    let initrd = image
        .ensure_initrd(
            &sandpen_supervisor::guest_binary().expect("build sandpen-guest first (scripts/build)"),
        )
        .unwrap();
    let accel = sandpen_vm::choose_accel(sandpen_vm::AccelChoice::Auto).unwrap();
    println!(
        "sandpen spine benchmark — accelerator {} ({})",
        accel.accel, accel.reason
    );
    const ROUNDS: usize = 5;

    // Cold start.
    ctx.ok(&["create", "--cpus", "1", "--memory", "1G"]);
    let mut bare = Vec::new();
    let mut cold = Vec::new();
    for _ in 0..ROUNDS {
        bare.push(bare_boot(&ctx, &image, &initrd));
        let t = Instant::now();
        ctx.ok(&["run", "--", "true"]);
        cold.push(t.elapsed().as_secs_f64());
        ctx.ok(&["stop", NAME]);
    }
    let (bare, cold) = (median(bare), median(cold));
    println!(
        "cold start: `run -- true` {cold:.2} s vs bare boot to /init {bare:.2} s (median of {ROUNDS}): {:.2}x (target <= 1.5x)",
        cold / bare
    );

    // Exec latency on a warm sandbox.
    ctx.ok(&["start", NAME]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for _ in 0..5 {
        rt.block_on(exec_true_in_process(&ctx));
    }
    let n = 100;
    let runs: Vec<(f64, f64)> = (0..n)
        .map(|_| rt.block_on(exec_true_in_process(&ctx)))
        .collect();
    let in_process: Vec<f64> = runs.iter().map(|r| r.0).collect();
    let to_started = median(runs.iter().map(|r| r.1).collect());
    let cli: Vec<f64> = (0..30)
        .map(|_| {
            let t = Instant::now();
            ctx.ok(&["exec", NAME, "--", "true"]);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let host_spawn: Vec<f64> = (0..30)
        .map(|_| {
            let t = Instant::now();
            Command::new(&ctx.bin)
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let sock_us = unix_round_trip_us(10_000);
    let pings: Vec<f64> = (0..100)
        .map(|_| {
            let t = Instant::now();
            rt.block_on(control::ping(&ctx.dirs().sandbox(NAME)))
                .unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let ping_ms = median(pings);
    // What one process start costs inside this guest (a shell running `true`).
    let spawn_loop = |n: usize| {
        let t = Instant::now();
        ctx.ok(&[
            "exec",
            NAME,
            "--",
            "sh",
            "-c",
            &format!("i=0; while [ $i -lt {n} ]; do /bin/true; i=$((i+1)); done"),
        ]);
        t.elapsed().as_secs_f64() * 1e3
    };
    let guest_spawn_ms = (spawn_loop(41) - spawn_loop(1)) / 40.0;
    let (p50, p99) = (median(in_process.clone()), percentile(in_process, 0.99));
    println!(
        "exec -- true (control API, in process): p50 {p50:.2} ms, p99 {p99:.2} ms vs bare unix socket round trip {sock_us:.1} µs: {:.0}x (target <= 15 ms)",
        p50 * 1e3 / sock_us
    );
    println!(
        "  of which: request to process started {to_started:.2} ms, process run and exit {:.2} ms; a bare ping to the guest's PID 1 over the same path takes {ping_ms:.2} ms",
        p50 - to_started
    );
    println!(
        "  the guest itself needs {guest_spawn_ms:.2} ms to start and reap one `true` (a shell loop, same run): sandpen adds {:.2} ms",
        p50 - guest_spawn_ms
    );
    println!(
        "exec -- true (sandpen CLI): p50 {:.2} ms, of which starting the CLI process itself is {:.2} ms",
        median(cli),
        median(host_spawn)
    );

    // Memory of an idle sandbox.
    std::thread::sleep(Duration::from_secs(3));
    let State::Running(status) = rt.block_on(control::state(&ctx.dirs().sandbox(NAME))) else {
        panic!("sandbox not running");
    };
    let sup = rss_kib(status.supervisor_pid);
    let qemu = rss_kib(status.qemu_pid);
    let fs: Vec<Rss> = status
        .file_server_pids
        .iter()
        .map(|p| rss_kib(*p))
        .collect();
    let fs_anon: u64 = fs.iter().map(|r| r.anon).sum();
    let fs_total: u64 = fs.iter().map(|r| r.total).sum();
    let private = sup.anon + qemu.anon + fs_anon;
    let total_beyond_ram = sup.total + (qemu.total - qemu.shmem) + fs_total;
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "idle memory: guest RAM touched {:.0} MiB of 1024 (QEMU's shared memfd); beyond it: supervisor {:.1} MiB, QEMU {:.1} MiB, file server {:.1} MiB",
        mib(qemu.shmem),
        mib(sup.total),
        mib(qemu.total - qemu.shmem),
        mib(fs_total)
    );
    println!(
        "  overhead beyond guest RAM: {:.1} MiB private (anonymous) memory (target <= 40 MiB); {:.1} MiB counting file-backed pages shared with the page cache (the kernel image, binaries)",
        mib(private),
        mib(total_beyond_ram)
    );
    ctx.ok(&["rm", "-f", NAME]);
}
