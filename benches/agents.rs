//! Agent benchmarks, each figure beside a baseline from the same run:
//!
//! - `sandpen run claude -- --version` to its output, cold (sandbox stopped)
//!   and warm, with dockerd started at boot and on demand; baseline: `sandpen
//!   run shell -- true` in the same sandbox (the VM and exec path without the
//!   agent);
//! - the first `docker info` after start in each mode;
//! - idle host memory of an agent sandbox in each mode; baseline: an idle
//!   sandbox of the default image;
//! - image build time and size per agent (with `--builds`: builds
//!   `bench-AGENT` images, which reuse the cached trees); baseline: the
//!   default image.
//!
//! `cargo bench -p sandpen --bench agents [-- --builds]`. Needs an image with
//! Claude Code: `$SANDPEN_BENCH_AGENT_IMAGE` (default `test-agents`, which
//! scripts/test builds), found through `$SANDPEN_TEST_DATA_HOME` or
//! `$XDG_DATA_HOME`, and a static `sandpen-guest` (scripts/build).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sandpen_supervisor::control::{self, State};
use sandpen_supervisor::Dirs;

const NAME: &str = "agentbench";

struct Ctx {
    bin: PathBuf,
    state: tempfile::TempDir,
    config: tempfile::TempDir,
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
            .env("XDG_CONFIG_HOME", self.config.path())
            .env("SANDPEN_SECRET_STORE", "file")
            .stdin(Stdio::null())
            .output()
            .expect("running sandpen")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.sandpen(args);
        assert!(
            out.status.success(),
            "sandpen {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn timed(&self, args: &[&str]) -> f64 {
        let t = Instant::now();
        self.ok(args);
        t.elapsed().as_secs_f64()
    }

    fn dirs(&self) -> Dirs {
        Dirs {
            state: self.state.path().join("sandpen"),
            data: self.data.join("sandpen"),
            config: self.config.path().join("sandpen"),
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Host RSS (MiB) of a running sandbox's processes after `settle` of idling.
fn idle_rss_mib(ctx: &Ctx, name: &str, settle: Duration) -> f64 {
    std::thread::sleep(settle);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let State::Running(status) = rt.block_on(control::state(&ctx.dirs().sandbox(name))) else {
        panic!("{name} is not running");
    };
    let pids = [status.supervisor_pid, status.qemu_pid]
        .into_iter()
        .chain(status.file_server_pids.iter().copied());
    pids.map(rss_kib).sum::<u64>() as f64 / 1024.0
}

/// Seconds until `docker info` answers, right after `start`.
fn first_docker_info(ctx: &Ctx, name: &str) -> f64 {
    let t = Instant::now();
    ctx.ok(&[
        "exec",
        name,
        "--",
        "docker",
        "info",
        "--format",
        "{{.ServerVersion}}",
    ]);
    t.elapsed().as_secs_f64()
}

fn builds(ctx: &Ctx) {
    println!(
        "\nimage build per agent (the base and package trees come from the cache when present):"
    );
    let default = sandpen_image::load(&ctx.dirs().images(), "default").ok();
    if let Some(d) = &default {
        println!(
            "  baseline default image: content {} MiB, ext4 {} MiB, built in {:.0} s",
            d.manifest.sizes.rootfs_content >> 20,
            d.manifest.sizes.rootfs_image >> 20,
            d.manifest.build_seconds
        );
    }
    for agent in ["claude", "codex", "gemini", "opencode"] {
        let name = format!("bench-{agent}");
        let _ = ctx.sandpen(&["image", "rm", &name]);
        let t = Instant::now();
        ctx.ok(&["image", "build", "--agent", agent, "--name", &name]);
        let wall = t.elapsed().as_secs_f64();
        let image = sandpen_image::load(&ctx.dirs().images(), &name).expect("the built image");
        let m = &image.manifest;
        let steps: Vec<String> = m
            .steps
            .iter()
            .map(|s| format!("{} {:.0}s", s.step, s.seconds))
            .collect();
        let ratio = default
            .as_ref()
            .map(|d| m.sizes.rootfs_content as f64 / d.manifest.sizes.rootfs_content as f64)
            .unwrap_or(0.0);
        println!(
            "  {agent:<8} {}: built in {wall:.0} s ({}); content {} MiB ({ratio:.1}x default), ext4 {} MiB, {} MiB allocated",
            m.agents.get(agent).map(String::as_str).unwrap_or("?"),
            steps.join(", "),
            m.sizes.rootfs_content >> 20,
            m.sizes.rootfs_image >> 20,
            m.sizes.rootfs_allocated >> 20,
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let data = std::env::var_os("SANDPEN_TEST_DATA_HOME")
        .or_else(|| std::env::var_os("XDG_DATA_HOME"))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".local/share")
        });
    let root = tempfile::tempdir().expect("temp dir");
    let ws = root.path().join(NAME);
    std::fs::create_dir(&ws).expect("workspace");
    let ctx = Ctx {
        bin: PathBuf::from(env!("CARGO_BIN_EXE_sandpen")),
        state: tempfile::tempdir().expect("state dir"),
        config: tempfile::tempdir().expect("config dir"),
        data,
        ws,
        _root: root,
    };
    let image = std::env::var("SANDPEN_BENCH_AGENT_IMAGE").unwrap_or_else(|_| "test-agents".into());
    sandpen_image::load(&ctx.dirs().images(), &image)
        .expect("build the agent image first (scripts/test builds test-agents)");
    sandpen_credentials::FileStore::new(ctx.dirs().config.join("secrets"))
        .set(
            "anthropic",
            sandpen_credentials::Scope::Global,
            sandpen_credentials::SecretValue::new("sk-bench-unused"),
        )
        .expect("a secret");
    ctx.ok(&["policy", "init", "deny-all"]);
    let accel = sandpen_vm::choose_accel(sandpen_vm::AccelChoice::Auto).expect("accel");
    println!(
        "sandpen agent benchmark — image {image}, accelerator {} ({})",
        accel.accel, accel.reason
    );
    const COLD: usize = 3;
    const WARM: usize = 5;

    // Baseline for memory: an idle sandbox of the default image.
    let baseline_rss = sandpen_image::load(&ctx.dirs().images(), "default")
        .ok()
        .map(|_| {
            let ws = ctx._root.path().join("plain");
            std::fs::create_dir_all(&ws).expect("workspace");
            let ws = ws.to_string_lossy().into_owned();
            ctx.ok(&["create", "--name", "plain", &ws]);
            ctx.ok(&["start", "plain"]);
            let rss = idle_rss_mib(&ctx, "plain", Duration::from_secs(15));
            ctx.ok(&["rm", "-f", "plain"]);
            rss
        });

    for mode in ["on-demand", "boot"] {
        ctx.ok(&["create", "--image", &image, "--docker", mode]);
        let (mut cold, mut cold_shell, mut warm, mut warm_shell) = (vec![], vec![], vec![], vec![]);
        for _ in 0..COLD {
            cold_shell.push(ctx.timed(&["run", "shell", "--", "true"]));
            ctx.ok(&["stop", NAME]);
            cold.push(ctx.timed(&["run", "claude", "--", "--version"]));
            ctx.ok(&["stop", NAME]);
        }
        ctx.ok(&["start", NAME]);
        // Idle and warm figures before anything touches Docker, so that
        // on demand they are without dockerd; then the first `docker info`,
        // and the idle memory again with dockerd up in both modes.
        let rss = idle_rss_mib(&ctx, NAME, Duration::from_secs(30));
        for _ in 0..WARM {
            warm_shell.push(ctx.timed(&["run", "shell", "--", "true"]));
            warm.push(ctx.timed(&["run", "claude", "--", "--version"]));
        }
        let docker_first = first_docker_info(&ctx, NAME);
        let rss_docker = idle_rss_mib(&ctx, NAME, Duration::from_secs(20));
        let (cold, cold_shell, warm, warm_shell) = (
            median(cold),
            median(cold_shell),
            median(warm),
            median(warm_shell),
        );
        println!("\ndockerd {mode}:");
        println!(
            "  cold `run claude -- --version` {cold:.1} s vs `run shell -- true` {cold_shell:.1} s (median of {COLD}): +{:.1} s, {:.2}x",
            cold - cold_shell,
            cold / cold_shell
        );
        println!(
            "  warm `run claude -- --version` {warm:.2} s vs `run shell -- true` {warm_shell:.2} s (median of {WARM}): +{:.2} s",
            warm - warm_shell
        );
        println!("  first `docker info` after start: {docker_first:.1} s");
        match baseline_rss {
            Some(base) => println!(
                "  idle host RSS (supervisor + QEMU + file server) after start: {rss:.0} MiB vs default-image sandbox {base:.0} MiB (+{:.0} MiB)",
                rss - base
            ),
            None => println!("  idle host RSS (supervisor + QEMU + file server) after start: {rss:.0} MiB"),
        }
        println!(
            "  idle host RSS once dockerd has answered `docker info`: {rss_docker:.0} MiB (+{:.0} MiB)",
            rss_docker - rss
        );
        ctx.ok(&["rm", "-f", NAME]);
    }

    if std::env::args().any(|a| a == "--builds") {
        builds(&ctx);
    }
    // The workspace sandbox's disks are gone with `rm -f`; the bench-AGENT
    // images stay for `sandpen image ls`.
}
