//! End-to-end tests: the real `sandpen` binary booting real VMs (TCG where KVM is
//! not usable). One sandbox is booted and shared; the tests run in order, the
//! lifecycle ones (stop, kill -9, rm) last.
//!
//! The image comes from `$SANDPEN_TEST_DATA_HOME` (see scripts/test), or is built
//! on first use if missing.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};

mod common;
use common::{check, expect_ok, text, Cli};

struct Env {
    cli: Cli,
    /// Parent of the workspace; the workspace itself is `<root>/proj`.
    _root: tempfile::TempDir,
}

const NAME: &str = "proj";

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let (root, ws) = common::workspace("sandpen-e2e-", NAME);
        Env {
            cli: Cli::new(ws),
            _root: root,
        }
    })
}

fn cmd(args: &[&str]) -> Command {
    env().cli.command(args)
}

fn sandpen(args: &[&str]) -> Output {
    cmd(args).output().expect("running sandpen")
}

fn guest(sh: &str) -> Result<String, Failed> {
    expect_ok(&sandpen(&["exec", NAME, "--", "sh", "-c", sh]), sh)
}

fn status_of(name: &str) -> Result<String, Failed> {
    Ok(status_and_reason(name)?.0)
}

/// `ls --json`'s status of `name`, and the reason of a `failed` one.
fn status_and_reason(name: &str) -> Result<(String, String), Failed> {
    env().cli.status_of(name)
}

// ---- errors (no VM needed) ----

fn errors_are_one_line_and_125() -> Result<(), Failed> {
    let cases: [(&[&str], &str); 4] = [
        (
            &["exec", "no-such-sandbox", "--", "true"],
            "no sandbox named",
        ),
        (&["start", "no-such-sandbox"], "no sandbox named"),
        (&["create", "--memory", "lots"], "invalid memory size"),
        (&["create", "--image", "no-such-image"], "not found"),
    ];
    for (args, needle) in cases {
        let out = sandpen(args);
        let err = text(&out.stderr);
        check(
            out.status.code() == Some(125),
            format!("{args:?}: exit {:?}, {err}", out.status.code()),
        )?;
        check(
            err.trim().lines().count() == 1,
            format!("{args:?}: not one line: {err:?}"),
        )?;
        check(
            err.contains(needle),
            format!("{args:?}: {err:?} lacks {needle:?}"),
        )?;
    }
    check(
        status_of(NAME)? == "absent",
        "a failed create left a sandbox behind",
    )
}

// ---- the shared sandbox ----

fn run_prints_and_exits_with_status() -> Result<(), Failed> {
    let t = Instant::now();
    let out = sandpen(&[
        "run",
        "--cpus",
        "1",
        "--memory",
        "1G",
        "--",
        "sh",
        "-c",
        "echo hi; exit 7",
    ]);
    eprintln!(
        "    first run (create + cold boot): {:.1} s",
        t.elapsed().as_secs_f64()
    );
    check(
        out.status.code() == Some(7),
        format!("exit {:?}; stderr {}", out.status.code(), text(&out.stderr)),
    )?;
    check(
        text(&out.stdout) == "hi\n",
        format!("stdout {:?}", text(&out.stdout)),
    )
}

fn run_pwd_is_the_host_path() -> Result<(), Failed> {
    let out = expect_ok(&sandpen(&["run", "--", "pwd"]), "run -- pwd")?;
    check(
        out.trim() == env().cli.ws.to_str().unwrap(),
        format!("pwd {out:?} vs {:?}", env().cli.ws),
    )
}

fn second_run_reuses_the_sandbox() -> Result<(), Failed> {
    let out = expect_ok(&sandpen(&["ls", "--json"]), "ls")?;
    let rows: serde_json::Value = serde_json::from_str(&out)?;
    check(
        rows.as_array().map(|a| a.len()) == Some(1),
        format!("expected one sandbox: {out}"),
    )
}

fn guest_kernel_is_not_the_hosts() -> Result<(), Failed> {
    let guest_release = guest("uname -r")?;
    let host = text(&Command::new("uname").arg("-r").output()?.stdout);
    check(
        guest_release.trim() != host.trim() && !guest_release.trim().is_empty(),
        format!("guest {guest_release:?} host {host:?}"),
    )
}

fn no_network_card_only_loopback() -> Result<(), Failed> {
    let links = guest("ip -o link")?;
    let names: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(str::trim))
        .collect();
    check(names == ["lo"], format!("links: {links}"))
}

fn runs_as_agent_with_sudo() -> Result<(), Failed> {
    let who = guest("id -un; sudo -n id -u; hostname")?;
    check(who == format!("agent\n0\n{NAME}\n"), format!("got {who:?}"))
}

fn workspace_files_keep_host_ownership() -> Result<(), Failed> {
    let ws = &env().cli.ws;
    // Guest -> host.
    guest("echo from-guest > made-in-guest.txt")?;
    let meta = std::fs::metadata(ws.join("made-in-guest.txt"))?;
    let me = nix_uid();
    check(
        meta.uid() == me,
        format!("guest file owned by {} on the host, want {me}", meta.uid()),
    )?;
    check(
        std::fs::read_to_string(ws.join("made-in-guest.txt"))? == "from-guest\n",
        "content",
    )?;
    // Host -> guest.
    std::fs::write(ws.join("made-on-host.txt"), "from-host\n")?;
    let seen =
        guest("stat -c %U made-on-host.txt; cat made-on-host.txt; echo more >> made-on-host.txt")?;
    check(seen == "agent\nfrom-host\n", format!("guest saw {seen:?}"))?;
    check(
        std::fs::read_to_string(ws.join("made-on-host.txt"))? == "from-host\nmore\n",
        "the guest's append did not reach the host",
    )
}

fn nix_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}

fn ls_json_has_the_fields() -> Result<(), Failed> {
    let out = expect_ok(&sandpen(&["ls", "--json"]), "ls --json")?;
    let rows: serde_json::Value = serde_json::from_str(&out)?;
    let row = &rows[0];
    for field in [
        "name",
        "status",
        "workspace",
        "image",
        "cpus",
        "memory_mib",
        "uptime_secs",
    ] {
        check(!row[field].is_null(), format!("missing {field}: {row}"))?;
    }
    check(
        row["status"] == "running" && row["cpus"] == 1 && row["memory_mib"] == 1024,
        format!("{row}"),
    )?;
    check(
        row["workspace"] == env().cli.ws.to_str().unwrap(),
        format!("{row}"),
    )?;
    let table = expect_ok(&sandpen(&["ls"]), "ls")?;
    check(
        table.starts_with("NAME") && table.contains("UPTIME") && table.contains(NAME),
        format!("table: {table}"),
    )
}

fn exec_works_while_run_is_attached() -> Result<(), Failed> {
    let marker = env().cli.ws.join("release-run");
    let _ = std::fs::remove_file(&marker);
    let run = cmd(&[
        "run",
        "--",
        "sh",
        "-c",
        "while [ ! -e release-run ]; do sleep 0.1; done; echo run-done",
    ])
    .stdout(Stdio::piped())
    .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let out = guest("echo concurrent")?;
    check(out == "concurrent\n", format!("exec got {out:?}"))?;
    std::fs::write(&marker, "")?;
    let run = run.wait_with_output()?;
    check(
        run.status.success() && text(&run.stdout) == "run-done\n",
        format!("run: {:?}", text(&run.stdout)),
    )
}

fn stdin_stdout_stderr_are_separate() -> Result<(), Failed> {
    let mut child = cmd(&[
        "exec",
        "-i",
        NAME,
        "--",
        "sh",
        "-c",
        "tr a-z A-Z; echo to-stderr >&2",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()?;
    child.stdin.take().unwrap().write_all(b"hello stdin\n")?;
    let out = child.wait_with_output()?;
    check(
        text(&out.stdout) == "HELLO STDIN\n",
        format!("stdout {:?}", text(&out.stdout)),
    )?;
    check(
        text(&out.stderr) == "to-stderr\n",
        format!("stderr {:?}", text(&out.stderr)),
    )
}

fn exit_codes_follow_the_shell() -> Result<(), Failed> {
    let code = |args: &[&str]| sandpen(args).status.code();
    check(
        code(&["exec", NAME, "--", "no-such-command"]) == Some(127),
        "not found should be 127",
    )?;
    check(
        code(&["exec", NAME, "--", "/etc/hostname"]) == Some(126),
        "not executable should be 126",
    )?;
    check(
        code(&["exec", NAME, "--", "sh", "-c", "kill -KILL $$"]) == Some(137),
        "SIGKILL should be 137",
    )?;
    check(
        code(&[
            "exec",
            "-u",
            "root",
            NAME,
            "--",
            "sh",
            "-c",
            "test $(id -u) = 0",
        ]) == Some(0),
        "-u root",
    )?;
    check(
        code(&[
            "exec",
            "-w",
            "/tmp",
            "-e",
            "A=b",
            NAME,
            "--",
            "sh",
            "-c",
            "test $PWD = /tmp && test $A = b",
        ]) == Some(0),
        "-w and -e",
    )
}

/// A terminal: raw mode, the guest sees a tty with our size, and ^C typed at the
/// terminal reaches the guest process as SIGINT.
fn tty_and_ctrl_c() -> Result<(), Failed> {
    let e = env();
    let script = r#"
import os, pty, sys, time, select, struct, fcntl, termios
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], [sys.argv[1], "exec", "-it", sys.argv[2], "--", "sh", "-c",
        "stty size; tty; trap 'echo got-sigint; exit 3' INT; echo ready; sleep 60"])
fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
buf = b""
deadline = time.time() + 60
sent = False
while time.time() < deadline:
    r, _, _ = select.select([fd], [], [], 0.2)
    if r:
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        buf += data
    if b"ready" in buf and not sent:
        time.sleep(0.3)
        os.write(fd, b"\x03")
        sent = True
_, status = os.waitpid(pid, 0)
sys.stdout.write(buf.decode(errors="replace"))
sys.stdout.write("\nEXIT=%d\n" % os.waitstatus_to_exitcode(status))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&e.cli.bin)
        .arg(NAME)
        .current_dir(&e.cli.ws)
        .env("XDG_STATE_HOME", e.cli.state.path())
        .env("XDG_DATA_HOME", &e.cli.data)
        .env("XDG_CONFIG_HOME", e.cli.config.path())
        .output()?;
    let s = text(&out.stdout);
    check(s.contains("33 111"), format!("window size not passed: {s}"))?;
    check(s.contains("/dev/pts/"), format!("no tty in the guest: {s}"))?;
    check(
        s.contains("got-sigint"),
        format!("^C did not reach the guest: {s}"),
    )?;
    check(s.contains("EXIT=3"), format!("exit status not passed: {s}"))
}

/// An ordinary host user (not root): the guest user takes its uid, and what the
/// guest writes belongs to it on the host. Runs when the tests run as root,
/// which can make such a user.
fn ordinary_host_user_owns_guest_files() -> Result<(), Failed> {
    if nix_uid() != 0 {
        // Not root: the suite itself already runs as an ordinary user.
        return Ok(());
    }
    let user = "sandpen-e2e";
    if !Command::new("id").arg(user).output()?.status.success() {
        let out = Command::new("useradd").args(["-m", user]).output()?;
        check(
            out.status.success(),
            format!("useradd: {}", text(&out.stderr)),
        )?;
    }
    let uid: u32 = text(&Command::new("id").args(["-u", user]).output()?.stdout)
        .trim()
        .parse()?;
    let e = env();
    // Everything the user runs must be readable by it (root's home is not).
    let home = tempfile::Builder::new().prefix("sandpen-user-").tempdir()?;
    let tools = home.path().join("bin");
    std::fs::create_dir(&tools)?;
    let copy = |from: &Path, name: &str| -> Result<PathBuf, Failed> {
        let to = tools.join(name);
        std::fs::copy(from, &to)?;
        Ok(to)
    };
    let bin = copy(&e.cli.bin, "sandpen")?;
    let guest_bin = copy(&sandpen_guest_binary()?, "sandpen-guest")?;
    // A guest binary other than the one the (root-owned) image's initramfs was
    // made from: the user cannot rewrite that, and gets a private one.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&guest_bin)?
        .write_all(b"\0")?;
    let ws = home.path().join("work");
    std::fs::create_dir(&ws)?;
    Command::new("chown")
        .args(["-R", &format!("{user}:"), home.path().to_str().unwrap()])
        .status()?;
    Command::new("chmod")
        .args(["755", home.path().to_str().unwrap()])
        .status()?;
    let out = Command::new("runuser")
        .args(["-u", user, "--"])
        .arg(&bin)
        .args([
            "run",
            "--cpus",
            "1",
            "--memory",
            "512M",
            "--",
            "sh",
            "-c",
            "id -u; echo hi > from-guest",
        ])
        .current_dir(&ws)
        .env("XDG_STATE_HOME", home.path().join("state"))
        .env("XDG_CONFIG_HOME", home.path().join("config"))
        .env("XDG_CACHE_HOME", home.path().join("cache"))
        .env("XDG_DATA_HOME", &e.cli.data)
        .env("SANDPEN_GUEST_BIN", &guest_bin)
        .stdin(Stdio::null())
        .output()?;
    let _ = Command::new("runuser")
        .args(["-u", user, "--"])
        .arg(&bin)
        .args(["rm", "-f", "work"])
        .env("XDG_STATE_HOME", home.path().join("state"))
        .env("XDG_DATA_HOME", &e.cli.data)
        .output();
    check(
        out.status.success(),
        format!("run as {user}: {}{}", text(&out.stdout), text(&out.stderr)),
    )?;
    check(
        text(&out.stdout).trim() == uid.to_string(),
        format!("guest uid {:?}, host uid {uid}", text(&out.stdout)),
    )?;
    let meta = std::fs::metadata(ws.join("from-guest"))?;
    check(
        meta.uid() == uid,
        format!("owned by {} on the host, want {uid}", meta.uid()),
    )
}

fn sandpen_guest_binary() -> Result<PathBuf, Failed> {
    if let Some(p) = std::env::var_os("SANDPEN_GUEST_BIN") {
        return Ok(p.into());
    }
    let exe = env().cli.bin.clone();
    let target = exe.parent().and_then(Path::parent).ok_or("no target dir")?;
    let p = target.join("x86_64-unknown-linux-gnu/release/sandpen-guest");
    check(
        p.is_file(),
        format!("{} missing: run scripts/build", p.display()),
    )?;
    Ok(p)
}

// ---- lifecycle ----

fn stop_then_start_keeps_the_disk() -> Result<(), Failed> {
    expect_ok(
        &sandpen(&[
            "exec",
            "-u",
            "root",
            NAME,
            "--",
            "sh",
            "-c",
            "echo kept > /root/marker",
        ]),
        "write marker",
    )?;
    // Two stops at once: the second waits for the first instead of forcing
    // the VM off mid-shutdown.
    let second = cmd(&["stop", NAME]).spawn()?;
    expect_ok(&sandpen(&["stop", NAME]), "stop")?;
    check(
        second.wait_with_output()?.status.success(),
        "the second stop failed",
    )?;
    check(status_of(NAME)? == "stopped", "not stopped after stop")?;
    expect_ok(&sandpen(&["start", NAME]), "start")?;
    let out = expect_ok(
        &sandpen(&["exec", "-u", "root", NAME, "--", "cat", "/root/marker"]),
        "read marker",
    )?;
    check(out == "kept\n", format!("marker {out:?}"))
}

fn pid_of(pattern: &str) -> Option<i32> {
    let out = Command::new("pgrep").args(["-f", pattern]).output().ok()?;
    text(&out.stdout).lines().next()?.trim().parse().ok()
}

fn wait_for_status(want: &str) -> Result<(), Failed> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = status_of(NAME)?;
        if s == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("status {s:?}, want {want:?}").into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// QEMU runs in its jail (docs/architecture.md, "QEMU's jail"): no new
/// privileges, a seccomp filter, no capabilities, namespaces of its own, and
/// a network namespace with only `lo`.
fn qemu_is_jailed() -> Result<(), Failed> {
    let state = env().cli.state.path().to_string_lossy().into_owned();
    let qemu = pid_of(&format!("process=sandpen-qemu-{NAME}")).ok_or("QEMU not found")?;
    let status = std::fs::read_to_string(format!("/proc/{qemu}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    check(field("NoNewPrivs:") == "1", format!("NoNewPrivs {status}"))?;
    check(field("Seccomp:") == "2", format!("Seccomp {status}"))?;
    for set in ["CapEff:", "CapPrm:", "CapBnd:", "CapAmb:", "CapInh:"] {
        check(
            field(set).trim_start_matches('0').is_empty(),
            format!("{set} {}", field(set)),
        )?;
    }
    let pidfile = Path::new(&state).join(format!("sandpen/sandboxes/{NAME}/run/supervisor.pid"));
    let supervisor = std::fs::read_to_string(&pidfile)?;
    for ns in ["user", "mnt", "pid", "net", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{qemu}/ns/{ns}"))?;
        let ours = std::fs::read_link(format!("/proc/{}/ns/{ns}", supervisor.trim()))?;
        check(
            theirs != ours,
            format!("QEMU shares the supervisor's {ns} namespace"),
        )?;
    }
    // Its parent, the jail launcher (outside QEMU's PID namespace), is
    // confined too once QEMU runs: no_new_privs and its own seccomp filter.
    let launcher = field("PPid:");
    let parent = std::fs::read_to_string(format!("/proc/{launcher}/status"))?;
    let cmdline = std::fs::read(format!("/proc/{launcher}/cmdline"))?;
    check(
        String::from_utf8_lossy(&cmdline).contains("__jail"),
        format!("QEMU's parent {launcher} is not the launcher"),
    )?;
    check(
        parent.contains("NoNewPrivs:\t1") && parent.contains("Seccomp:\t2"),
        format!("the launcher is not confined: {parent}"),
    )?;
    let dev = std::fs::read_to_string(format!("/proc/{qemu}/net/dev"))?;
    let interfaces: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    check(
        interfaces == ["lo"],
        format!("QEMU's interfaces: {interfaces:?}"),
    )
}

/// The supervisor confines itself after the boot (docs/architecture.md,
/// "The supervisor's confinement"): every thread has no_new_privs and the
/// seccomp filter, and the log says what Landlock enforced.
fn supervisor_is_confined() -> Result<(), Failed> {
    let state = env().cli.state.path().to_string_lossy().into_owned();
    let dir = Path::new(&state).join(format!("sandpen/sandboxes/{NAME}"));
    let pid = std::fs::read_to_string(dir.join("run/supervisor.pid"))?;
    for task in std::fs::read_dir(format!("/proc/{}/task", pid.trim()))? {
        let status = std::fs::read_to_string(task?.path().join("status"))?;
        check(
            status.contains("NoNewPrivs:\t1") && status.contains("Seccomp:\t2"),
            format!("a supervisor thread is not confined: {status}"),
        )?;
    }
    let log = std::fs::read_to_string(dir.join("logs/supervisor.log"))?;
    let line = log
        .lines()
        .rfind(|l| l.contains("supervisor confined:"))
        .unwrap_or_default();
    check(
        line.contains("no_new_privs")
            && line.contains("seccomp deny list (no exec)")
            && (line.contains("landlock ABI") || sandpen_confine::kernel_landlock_abi() == 0),
        format!("the supervisor's confinement: {line:?}"),
    )
}

fn kill_9_qemu_reads_failed_and_starts_again() -> Result<(), Failed> {
    let state = env().cli.state.path().to_string_lossy().into_owned();
    let qemu = pid_of(&format!("sandpen-qemu-{NAME}.*{state}"))
        .or_else(|| pid_of(&format!("sandpen-{NAME},process")));
    let qemu = qemu.ok_or("QEMU not found")?;
    Command::new("kill")
        .args(["-9", &qemu.to_string()])
        .status()?;
    let t = Instant::now();
    wait_for_status("failed")?;
    let ls_time = t.elapsed();
    let (_, reason) = status_and_reason(NAME)?;
    check(
        reason.contains("QEMU killed by signal 9"),
        format!("ls gives the reason {reason:?}"),
    )?;
    expect_ok(&sandpen(&["start", NAME]), "start after kill -9 of QEMU")?;
    check(status_of(NAME)? == "running", "not running after start")?;
    check(guest("echo back")? == "back\n", "guest not back")?;
    check(
        ls_time < Duration::from_secs(10),
        format!("ls took {ls_time:?} to say stopped"),
    )
}

fn kill_9_supervisor_reads_failed_and_starts_again() -> Result<(), Failed> {
    let state = env().cli.state.path().to_string_lossy().into_owned();
    let pidfile = Path::new(&state).join(format!("sandpen/sandboxes/{NAME}/run/supervisor.pid"));
    let pid = std::fs::read_to_string(&pidfile)?;
    Command::new("kill").args(["-9", pid.trim()]).status()?;
    wait_for_status("failed")?;
    let (_, reason) = status_and_reason(NAME)?;
    check(
        reason.contains("supervisor died"),
        format!("ls gives the reason {reason:?}"),
    )?;
    expect_ok(
        &sandpen(&["start", NAME]),
        "start after kill -9 of the supervisor",
    )?;
    check(guest("echo back")? == "back\n", "guest not back")
}

fn rm_f_removes_every_trace() -> Result<(), Failed> {
    let out = sandpen(&["rm", NAME]);
    check(
        out.status.code() == Some(125),
        "rm of a running sandbox without -f must refuse",
    )?;
    expect_ok(&sandpen(&["rm", "-f", NAME]), "rm -f")?;
    let dir = env().cli.state.path().join("sandpen/sandboxes");
    let left: Vec<_> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    check(left.is_empty(), format!("left behind: {left:?}"))?;
    check(status_of(NAME)? == "absent", "still listed")?;
    check(
        pid_of(&format!("sandpen-qemu-{NAME}")).is_none() || !qemu_of_this_run_alive(),
        "QEMU still running",
    )
}

fn qemu_of_this_run_alive() -> bool {
    let state = env().cli.state.path().to_string_lossy().into_owned();
    pid_of(&state).is_some()
}

type TestFn = fn() -> Result<(), Failed>;

fn main() {
    let args = Arguments {
        test_threads: Some(1),
        ..Arguments::from_args()
    };
    let tests: Vec<(&str, TestFn)> = vec![
        ("errors_are_one_line_and_125", errors_are_one_line_and_125),
        (
            "run_prints_and_exits_with_status",
            run_prints_and_exits_with_status,
        ),
        ("run_pwd_is_the_host_path", run_pwd_is_the_host_path),
        (
            "second_run_reuses_the_sandbox",
            second_run_reuses_the_sandbox,
        ),
        (
            "guest_kernel_is_not_the_hosts",
            guest_kernel_is_not_the_hosts,
        ),
        (
            "no_network_card_only_loopback",
            no_network_card_only_loopback,
        ),
        ("runs_as_agent_with_sudo", runs_as_agent_with_sudo),
        (
            "workspace_files_keep_host_ownership",
            workspace_files_keep_host_ownership,
        ),
        ("ls_json_has_the_fields", ls_json_has_the_fields),
        (
            "exec_works_while_run_is_attached",
            exec_works_while_run_is_attached,
        ),
        (
            "stdin_stdout_stderr_are_separate",
            stdin_stdout_stderr_are_separate,
        ),
        ("exit_codes_follow_the_shell", exit_codes_follow_the_shell),
        ("tty_and_ctrl_c", tty_and_ctrl_c),
        (
            "ordinary_host_user_owns_guest_files",
            ordinary_host_user_owns_guest_files,
        ),
        (
            "stop_then_start_keeps_the_disk",
            stop_then_start_keeps_the_disk,
        ),
        ("qemu_is_jailed", qemu_is_jailed),
        ("supervisor_is_confined", supervisor_is_confined),
        (
            "kill_9_qemu_reads_failed_and_starts_again",
            kill_9_qemu_reads_failed_and_starts_again,
        ),
        (
            "kill_9_supervisor_reads_failed_and_starts_again",
            kill_9_supervisor_reads_failed_and_starts_again,
        ),
        ("rm_f_removes_every_trace", rm_f_removes_every_trace),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, f)| Trial::test(name, f))
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    // Whatever happened, leave no VM running.
    let _ = sandpen(&["rm", "-f", NAME]);
    conclusion.exit();
}
