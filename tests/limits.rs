//! End-to-end: a sandbox's host resources are bounded (docs/architecture.md,
//! "Resource limits"). The guest attacks as root, the way an injected agent
//! would: a fork bomb, and a disk filled to the last block.
//!
//! Run as root on a host with cgroups (CI here: cgroup v1 on a hybrid
//! hierarchy). Where limits cannot be applied, the tests check that `start`
//! says so in one line, and check the rest without them.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::Value;

mod common;
use common::{check, text, Cli};

struct Env {
    cli: Cli,
    _root: tempfile::TempDir,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let (root, ws) = common::workspace("sandpen-limits-", "limits");
        Env {
            cli: Cli::new(ws),
            _root: root,
        }
    })
}

fn sandpen(args: &[&str]) -> Output {
    env().cli.run(args)
}

fn ok(args: &[&str]) -> Result<String, Failed> {
    env().cli.ok(args)
}

/// `sh -c SCRIPT` as root in sandbox `name`.
fn root_sh(name: &str, script: &str) -> Result<String, Failed> {
    ok(&["exec", "-u", "root", name, "--", "sh", "-c", script])
}

/// Whether this host can give a sandbox its own cgroup (root with cgroups).
fn limits_expected() -> bool {
    nix::unistd::geteuid().is_root()
        && std::env::var("SANDPEN_LIMITS").map_or(true, |v| v != "off")
        && PathBuf::from("/sys/fs/cgroup").is_dir()
}

/// Creates and starts sandbox `name`; checks what `start` said about limits.
fn start(name: &str, extra: &[&str]) -> Result<(), Failed> {
    let mut args = vec!["create", "--name", name];
    args.extend_from_slice(extra);
    ok(&args)?;
    let out = sandpen(&["start", name]);
    let stderr = text(&out.stderr);
    env().cli.expect_ok(&out, &format!("start {name}"))?;
    let notes = stderr
        .lines()
        .filter(|l| l.contains("resource limits not applied"))
        .count();
    if limits_expected() {
        check(notes == 0, format!("limits should apply here: {stderr}"))
    } else {
        check(notes == 1, format!("start should say once why: {stderr}"))
    }
}

/// `ls --json`'s row for `name`.
fn ls_row(name: &str) -> Result<Value, Failed> {
    let out = ok(&["ls", "--json"])?;
    let rows: Value = serde_json::from_str(&out).map_err(|e| format!("ls --json: {e}: {out}"))?;
    rows.as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == name).cloned())
        .ok_or_else(|| format!("{name} is not in ls: {out}").into())
}

fn supervisor_pid(name: &str) -> Result<u32, Failed> {
    let path = env()
        .cli
        .state
        .path()
        .join(format!("sandpen/sandboxes/{name}/run/supervisor.pid"));
    std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| format!("no pid in {}", path.display()).into())
}

/// The process's cgroup lines (`/proc/PID/cgroup`).
fn cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default()
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The cgroup directories of a process's sandbox cgroup (v1: one per
/// hierarchy; v2: one), from its `/proc/PID/cgroup`: `sandpen/NAME-HASH`,
/// HASH being 8 hex digits of the state folder's (resources::cgroup_name).
fn sandbox_cgroup_dirs(cgroup: &str, name: &str) -> Vec<PathBuf> {
    let prefix = format!("/sandpen/{name}-");
    cgroup
        .lines()
        .filter_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, ctrl, path) = (p.next()?, p.next()?, p.next()?);
            let (head, hash) = path.rsplit_once('-')?;
            let ours = format!("{head}-").ends_with(&prefix)
                && hash.len() == 8
                && hash.chars().all(|c| c.is_ascii_hexdigit());
            if !ours {
                return None;
            }
            let base = if ctrl.is_empty() {
                if PathBuf::from("/sys/fs/cgroup/cgroup.controllers").exists() {
                    PathBuf::from("/sys/fs/cgroup")
                } else {
                    PathBuf::from("/sys/fs/cgroup/unified")
                }
            } else {
                PathBuf::from("/sys/fs/cgroup").join(ctrl.split(',').next()?)
            };
            Some(base.join(path.trim_start_matches('/')))
        })
        .filter(|p| p.is_dir())
        .collect()
}

/// A host process that spins, and how much CPU it gets.
struct Spinner(Child);

impl Spinner {
    fn start() -> Spinner {
        Spinner(
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .stdout(Stdio::null())
                .spawn()
                .expect("a host busy loop"),
        )
    }

    /// CPU seconds used so far (utime + stime from /proc/PID/stat).
    fn cpu_secs(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.0.id())).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        ticks / hz.max(1.0)
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A guest that forks without end, as root: the host stays responsive, the
/// sandbox's CPU stays within its quota, and `ls` shows the host tasks
/// against their limit.
fn a_fork_bomb_leaves_the_host_responsive() -> Result<(), Failed> {
    start("bomb", &["--cpus", "1", "--memory", "512M"])?;
    start("calm", &["--cpus", "1", "--memory", "512M"])?;
    // QEMU and the file server are in the supervisor's cgroup, which is the
    // sandbox's own.
    let sup = supervisor_pid("bomb")?;
    let sup_cg = cgroup_of(sup);
    let dirs = sandbox_cgroup_dirs(&sup_cg, "bomb");
    if limits_expected() {
        check(
            !dirs.is_empty(),
            format!("the supervisor is not in sandpen/bomb: {sup_cg}"),
        )?;
        let kids = children(sup);
        check(kids.len() >= 2, format!("QEMU and a file server: {kids:?}"))?;
        for kid in kids {
            check(
                cgroup_of(kid) == sup_cg,
                format!("child {kid} is elsewhere: {}", cgroup_of(kid)),
            )?;
        }
        let row = ls_row("bomb")?;
        let limits = &row["resources"]["limits"];
        check(
            limits["cpu_quota_us"] == 100_000 && limits["pids_max"] == 1024,
            format!("ls --json limits: {row}"),
        )?;
        check(
            limits["memory_max"] == (512u64 + 512) << 20,
            format!("memory limit: {row}"),
        )?;
    }
    // Seed the guest's task count before it gets busy.
    ls_row("bomb")?;
    let spinner = Spinner::start();
    root_sh(
        "bomb",
        // Forks without end, and every child spins: the worst of both.
        "setsid bash -c 'while :; do (while :; do :; done) & done' </dev/null >/dev/null 2>&1 & echo started",
    )?;
    std::thread::sleep(Duration::from_secs(10));
    // The sandbox's CPU stays at its quota of one CPU.
    if limits_expected() {
        let out = ok(&["stats", "--no-stream", "--json", "bomb"])?;
        let rows: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
        let cpu = rows[0]["cpu_percent"].as_f64().unwrap_or(f64::NAN);
        check(
            cpu <= 120.0,
            format!("the bomb uses {cpu}% CPU past its quota of 100%: {out}"),
        )?;
        eprintln!("  bomb sandbox CPU under the fork bomb: {cpu:.1}%");
    }
    // The host answers: a busy loop keeps getting CPU, `ls` and an exec into
    // the other sandbox answer.
    let cpu0 = spinner.cpu_secs();
    let t0 = Instant::now();
    let out = sandpen(&["ls"]);
    let ls_time = t0.elapsed();
    let table = env().cli.expect_ok(&out, "ls under the fork bomb")?;
    eprintln!("  ls under the fork bomb: {ls_time:?}\n{table}");
    let line = table
        .lines()
        .find(|l| l.starts_with("bomb "))
        .unwrap_or_default();
    if limits_expected() {
        check(
            line.contains("/1024"),
            format!("ls shows no host tasks against their limit: {line}"),
        )?;
    }
    let t1 = Instant::now();
    let echoed = ok(&["exec", "calm", "--", "echo", "calm"])?;
    eprintln!("  exec into the other sandbox: {:?}", t1.elapsed());
    check(echoed.trim() == "calm", format!("exec said {echoed:?}"))?;
    std::thread::sleep(Duration::from_secs(5));
    let spun = spinner.cpu_secs() - cpu0;
    let wall = t0.elapsed().as_secs_f64();
    eprintln!("  host busy loop: {spun:.1} CPU s in {wall:.1} s");
    check(
        spun >= 0.1 * wall,
        format!("a host process got {spun:.1} CPU s in {wall:.1} s"),
    )?;
    let row = ls_row("bomb")?;
    let r = &row["resources"];
    eprintln!(
        "  bomb: host tasks {} / {}, guest tasks {}",
        r["usage"]["pids"], r["limits"]["pids_max"], r["guest"]["tasks"]
    );
    if limits_expected() {
        let pids = r["usage"]["pids"].as_u64().unwrap_or(u64::MAX);
        check(pids <= 1024, format!("host tasks {pids}"))?;
    }
    drop(spinner);
    // It stops (the guest kills every process), and its cgroup goes with it.
    ok(&["stop", "bomb"])?;
    for d in &dirs {
        check(!d.exists(), format!("{} is left after stop", d.display()))?;
    }
    // A start makes it again (and `rm` leaves nothing).
    ok(&["start", "bomb"])?;
    let again = sandbox_cgroup_dirs(&cgroup_of(supervisor_pid("bomb")?), "bomb");
    check(
        again.len() == dirs.len(),
        format!("after restart: {again:?}"),
    )?;
    ok(&["rm", "-f", "bomb", "calm"])?;
    for d in &again {
        check(!d.exists(), format!("{} is left after rm", d.display()))?;
    }
    Ok(())
}

/// Allocated bytes of a file on the host.
fn allocated(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// A guest that fills its disk: the overlay stops at `--disk`, `ls` says
/// `disk full`, exec still answers, and stop and start work.
fn filling_the_overlay_says_disk_full() -> Result<(), Failed> {
    start("full", &["--disk", "2"])?;
    let disk = env()
        .cli
        .state
        .path()
        .join("sandpen/sandboxes/full/disk.qcow2");
    let (status, _) = env().cli.status_of("full")?;
    check(status == "running", format!("status {status}"))?;
    check(
        !ok(&["ls"])?.contains("disk full"),
        "disk full before any write",
    )?;
    let out = root_sh(
        "full",
        "dd if=/dev/zero of=/fill bs=1M 2>&1 | grep -o 'No space left on device'; sync; df -B1 / | tail -n 1",
    )?;
    eprintln!("  guest: {}", out.trim());
    check(
        out.contains("No space left on device"),
        format!("dd did not run out of space: {out}"),
    )?;
    let table = ok(&["ls"])?;
    let line = table
        .lines()
        .find(|l| l.starts_with("full "))
        .unwrap_or_default();
    check(
        line.contains("running (disk full)"),
        format!("ls does not say disk full: {table}"),
    )?;
    let row = ls_row("full")?;
    check(
        row["resources"]["disk_full"] == "GuestRoot",
        format!("ls --json: {row}"),
    )?;
    // The overlay never grows past its size (plus qcow2's own metadata).
    let size = allocated(&disk);
    eprintln!("  disk.qcow2 holds {} MiB for --disk 2", size >> 20);
    check(
        size <= (2u64 << 30) + (64 << 20),
        format!("the overlay grew to {size} bytes past --disk 2"),
    )?;
    // The sandbox keeps answering, as root and as the agent.
    let echoed = ok(&["exec", "full", "--", "echo", "alive"])?;
    check(echoed.trim() == "alive", format!("exec said {echoed:?}"))?;
    ok(&["stop", "full"])?;
    ok(&["start", "full"])?;
    check(
        ok(&["ls"])?.contains("disk full"),
        "a disk still full after a restart is still reported",
    )?;
    root_sh("full", "rm /fill && sync")?;
    check(
        !ok(&["ls"])?.contains("disk full"),
        "disk full after the file was removed",
    )?;
    ok(&["rm", "-f", "full"])?;
    Ok(())
}

/// Runs `cmd`, killing it after `secs`: a VM that QEMU paused would make an
/// exec wait for ever.
fn output_within(mut cmd: Command, secs: u64) -> Result<Output, Failed> {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning: {e}"))?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(out) => out.map_err(|e| format!("waiting: {e}").into()),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            Err(format!("no answer within {secs} s (a paused VM?)").into())
        }
    }
}

/// Unmounts a test's file system, whatever happened.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The host file system under `disk.qcow2` fills up while the guest
/// writes: the guest gets an I/O error (QEMU does not pause the VM), the
/// sandbox keeps answering, and `ls` says why.
fn a_full_host_file_system_is_an_error_not_a_pause() -> Result<(), Failed> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("  needs root to mount a small file system; skipping");
        return Ok(());
    }
    let (root, ws) = common::workspace("sandpen-hostfull-", "hostfull");
    let cli = Cli::new(ws);
    // The sandbox's state folder, disk.qcow2 included, on a 768 MiB ext4
    // (a loop device: a tmpfs's pages would be charged to the sandbox's
    // memory limit).
    let state = cli.state.path().to_path_buf();
    let image = root.path().join("small.ext4");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(768 << 20))
        .map_err(|e| format!("{}: {e}", image.display()))?;
    let made = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&image)
        .status()
        .map_err(|e| format!("mkfs.ext4: {e}"))?;
    check(made.success(), "mkfs.ext4 of the small file system")?;
    let mounted = Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(&state)
        .status()
        .map_err(|e| format!("mount: {e}"))?;
    check(mounted.success(), "mounting the small file system")?;
    let _unmount = Unmount(state);
    let result = fill_the_host(&cli);
    // Whatever happened (a paused VM included), nothing is left running.
    let _ = cli.run(&["rm", "-f", "hostfull"]);
    result
}

fn fill_the_host(cli: &Cli) -> Result<(), Failed> {
    cli.ok(&["create", "--name", "hostfull", "--disk", "4"])?;
    cli.ok(&["start", "hostfull"])?;
    let out = output_within(
        cli.command(&[
            "exec",
            "-u",
            "root",
            "hostfull",
            "--",
            "sh",
            "-c",
            // dmesg and grep run once first, and dd writes around the page
            // cache (oflag=direct): 1.2 GB of cached writes would evict
            // their pages, and reading them back from a disk whose writes
            // fail can fail too (seen once: `dmesg: Input/output error`).
            "dmesg | grep -c 'I/O error' >/dev/null; \
             dd if=/dev/zero of=/fill bs=1M count=1200 oflag=direct conv=fsync 2>&1 | tail -n 1; \
             dmesg | grep -c 'I/O error'",
        ]),
        600,
    )?;
    let said = text(&out.stdout);
    eprintln!("  guest: {} {}", said.trim(), text(&out.stderr).trim());
    // The guest saw the failed writes as I/O errors: dd's own, or the
    // kernel's count of them.
    let errors: u64 = said
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    check(
        errors > 0 || said.contains("Input/output error"),
        format!("the guest saw no I/O error: {said}"),
    )?;
    let alive = output_within(
        cli.command(&["exec", "hostfull", "--", "echo", "alive"]),
        120,
    )?;
    check(
        text(&alive.stdout).trim() == "alive",
        format!("exec after the host filled: {alive:?}\n{}", cli.log_tails()),
    )?;
    let table = cli.ok(&["ls"])?;
    eprintln!("{table}");
    check(
        table.contains("running (disk full: the host file system holding disk.qcow2 is full)"),
        format!("ls does not say why: {table}"),
    )?;
    let qemu_log = std::fs::read_to_string(
        cli.state
            .path()
            .join("sandpen/sandboxes/hostfull/logs/qemu.log"),
    )
    .unwrap_or_default();
    eprintln!("  qemu.log: {}", qemu_log.trim());
    Ok(())
}

/// Bytes the host sends each connection in the egress test.
const EGRESS_BYTES: usize = 8 << 20;

/// `stats` and `ls --json` count the bytes a guest pulls through the
/// egress proxy.
fn stats_count_egress_bytes() -> Result<(), Failed> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut line = [0u8; 64];
                let n = conn.read(&mut line).unwrap_or(0);
                let chunk = vec![b'x'; 64 << 10];
                for _ in 0..EGRESS_BYTES / chunk.len() {
                    if conn.write_all(&chunk).is_err() {
                        return;
                    }
                }
                let _ = n;
            });
        }
    });
    ok(&["policy", "init", "deny-all"])?;
    ok(&["create", "--name", "net", "--add-host", "h.test:127.0.0.1"])?;
    ok(&["policy", "allow", "network", "h.test raw", "net"])?;
    ok(&["start", "net"])?;
    let got = ok(&[
        "exec",
        "net",
        "--",
        "bash",
        "-c",
        &format!(
            "exec 3<>/dev/tcp/h.test/{port}; echo hello >&3; head -c {EGRESS_BYTES} <&3 | wc -c"
        ),
    ])?;
    check(
        got.trim() == EGRESS_BYTES.to_string(),
        format!("the guest read {got:?}"),
    )?;
    let row = ls_row("net")?;
    let r = &row["resources"];
    let (up, down) = (
        r["egress_up_bytes"].as_u64().unwrap_or(0),
        r["egress_down_bytes"].as_u64().unwrap_or(0),
    );
    eprintln!("  egress: {up} bytes up, {down} down");
    check(
        down >= EGRESS_BYTES as u64 && down < 2 * EGRESS_BYTES as u64,
        format!("down {down} for {EGRESS_BYTES} read"),
    )?;
    check(up >= 6, format!("up {up} for the 6 bytes written"))?;
    let out = ok(&["stats", "--no-stream", "--json", "net"])?;
    let rows: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
    check(
        rows[0]["egress_down_bytes"].as_u64() >= Some(down)
            && rows[0]["egress_down_bytes_per_sec"].is_u64(),
        format!("stats --json: {out}"),
    )?;
    let table = ok(&["stats", "--no-stream", "net"])?;
    check(
        table.starts_with("NAME") && table.contains("NET UP / DOWN") && table.contains("net "),
        format!("stats: {table}"),
    )?;
    ok(&["rm", "-f", "net"])?;
    Ok(())
}

type TestFn = fn() -> Result<(), Failed>;

/// The cgroup crate's unit-test binary (`cargo test -p sandpen-cgroup --lib
/// --no-run`): its real-cgroup test, run inside a guest.
fn cgroup_unit_tests() -> Result<PathBuf, Failed> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(cargo)
        .args([
            "test",
            "-p",
            "sandpen-cgroup",
            "--lib",
            "--no-run",
            "--message-format=json",
        ])
        .current_dir(&root)
        .stderr(Stdio::inherit())
        .output()?;
    check(out.status.success(), "building the cgroup crate's tests")?;
    text(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "sandpen_cgroup")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| "cargo named no test executable for sandpen-cgroup".into())
}

/// This host mounts cgroup v1, but a guest runs cgroup v2: the v2 paths, as
/// root and as a normal user in a subtree delegated to them (no systemd in
/// the guest), run for real there, with the cgroup crate's own real-cgroup
/// test: limits written, a child moved in, usage read, a stale cgroup
/// emptied, everything removed.
fn cgroup_v2_paths_run_in_a_guest() -> Result<(), Failed> {
    let tests = cgroup_unit_tests()?;
    let ws = env().cli.ws.clone();
    std::fs::copy(&tests, ws.join("cgroup-unit-tests"))?;
    let run = |expect: &str| {
        format!(
            "SANDPEN_CGROUP_EXPECT={expect} /tmp/cgroup-unit-tests --exact \
             tests::a_real_cgroup_bounds_a_child_and_goes_away --nocapture --test-threads=1 2>&1"
        )
    };
    // What an administrator or a container runtime does to delegate a
    // subtree: the user owns the folders and their cgroup.procs,
    // cgroup.threads and cgroup.subtree_control, with the controllers
    // enabled above and in it; the user's shell is in a leaf below.
    std::fs::write(
        ws.join("delegate.sh"),
        format!(
            "set -e\n\
             C=/sys/fs/cgroup; D=$C/delegated-to-agent\n\
             mkdir -p $D/shell\n\
             echo '+cpu +memory +pids' > $C/cgroup.subtree_control\n\
             for d in $D $D/shell; do\n\
               chown agent $d $d/cgroup.procs $d/cgroup.threads $d/cgroup.subtree_control\n\
             done\n\
             echo '+cpu +memory +pids' > $D/cgroup.subtree_control\n\
             echo $$ > $D/shell/cgroup.procs\n\
             setpriv --reuid=agent --regid=agent --init-groups env {}\n\
             echo \"left: $(find $D/sandpen -mindepth 1 -maxdepth 1 -type d | wc -l)\"\n",
            run("Delegated")
        ),
    )?;
    start("cg2", &[])?;
    root_sh(
        "cg2",
        &format!(
            "set -e; grep -q cgroup2 /proc/mounts; cp {}/cgroup-unit-tests /tmp/; \
             chmod 755 /tmp/cgroup-unit-tests",
            ws.display()
        ),
    )?;
    let as_root = root_sh("cg2", &run("V2"))?;
    eprintln!("  as root:\n{as_root}");
    check(
        as_root.contains("backend: cgroup v2\n") && as_root.contains("1 passed"),
        format!("the v2 root path: {as_root}"),
    )?;
    let as_user = root_sh("cg2", &format!("sh {}/delegate.sh 2>&1", ws.display()))?;
    eprintln!("  as a delegated user:\n{as_user}");
    check(
        as_user.contains("backend: cgroup v2 (a subtree delegated to this user)")
            && as_user.contains("1 passed")
            && as_user.contains("left: 0"),
        format!("the delegated path: {as_user}"),
    )?;
    // A systemd user manager, as a desktop user has one: the supervisor is
    // run through `systemd-run --user --scope` and finds itself bounded.
    // The guest has systemd's binaries but not systemd as PID 1, so the test
    // starts `systemd --user` in a delegated subtree itself (the marker
    // /run/systemd/system lets it run) and calls from within that subtree,
    // where the manager may move processes without asking PID 1.
    std::fs::write(
        ws.join("user-manager.sh"),
        "set -e\n\
         C=/sys/fs/cgroup; D=$C/user-1000.slice\n\
         mkdir -p /run/systemd/system /run/user/1000 $D/session\n\
         chown agent:agent /run/user/1000; chmod 700 /run/user/1000\n\
         echo '+cpu +memory +pids' > $C/cgroup.subtree_control\n\
         chown -R agent $D\n\
         sh -c \"echo \\$\\$ > $D/cgroup.procs; exec setpriv --reuid=agent --regid=agent \
           --init-groups env XDG_RUNTIME_DIR=/run/user/1000 HOME=/home/agent \
           /usr/lib/systemd/systemd --user\" > /tmp/user-manager.log 2>&1 &\n\
         for i in $(seq 100); do [ -S /run/user/1000/systemd/private ] && break; sleep 0.3; done\n\
         echo $$ > $D/session/cgroup.procs\n\
         setpriv --reuid=agent --regid=agent --init-groups env XDG_RUNTIME_DIR=/run/user/1000 \
           SANDPEN_CGROUP_EXPECT=SystemdScope /tmp/cgroup-unit-tests --exact \
           tests::a_systemd_user_scope_bounds_what_it_wraps --nocapture --test-threads=1 2>&1 \
           || { tail -20 /tmp/user-manager.log; exit 1; }\n",
    )?;
    let scoped = root_sh("cg2", &format!("sh {}/user-manager.sh 2>&1", ws.display()))?;
    eprintln!("  through a systemd user scope:\n{scoped}");
    check(
        scoped.contains("inside /sys/fs/cgroup/user-1000.slice/")
            && scoped.contains("sandpen-scope-test-")
            && scoped.contains("1 passed"),
        format!("the systemd scope path: {scoped}"),
    )?;
    // Without a delegation, a normal user gets the reason.
    let refused = ok(&[
        "exec",
        "cg2",
        "--",
        "sh",
        "-c",
        "/tmp/cgroup-unit-tests --exact tests::a_real_cgroup_bounds_a_child_and_goes_away \
         --nocapture 2>&1",
    ])?;
    check(
        refused.contains("skipping") && refused.contains("NoDelegation"),
        format!("an undelegated user: {refused}"),
    )
}

fn main() {
    let args = Arguments {
        test_threads: Some(1),
        ..Arguments::from_args()
    };
    let tests: Vec<(&str, TestFn)> = vec![
        (
            "a_fork_bomb_leaves_the_host_responsive",
            a_fork_bomb_leaves_the_host_responsive,
        ),
        (
            "filling_the_overlay_says_disk_full",
            filling_the_overlay_says_disk_full,
        ),
        (
            "a_full_host_file_system_is_an_error_not_a_pause",
            a_full_host_file_system_is_an_error_not_a_pause,
        ),
        ("stats_count_egress_bytes", stats_count_egress_bytes),
        (
            "cgroup_v2_paths_run_in_a_guest",
            cgroup_v2_paths_run_in_a_guest,
        ),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, f)| Trial::test(name, f))
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    for name in ["bomb", "calm", "full", "net", "cg2"] {
        let _ = sandpen(&["rm", "-f", name]);
    }
    conclusion.exit();
}
