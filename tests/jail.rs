//! QEMU's jail, attacked: a probe (this binary again, with
//! `SANDPEN_JAIL_PROBE` set) is started by exactly the launcher that starts
//! QEMU (`sandpen __jail`, through `sandpen_supervisor::jail::spawn`), with
//! exactly QEMU's spec (`JailSpec::for_qemu`), in QEMU's place. It tries
//! what a guest that took QEMU over would try: read `~/.ssh` and the secret
//! store, read another sandbox's disk, connect to a TCP address and to
//! another sandbox's unix socket, run a shell (directly, and through the
//! ELF interpreter), and checks its capabilities. It also does what QEMU
//! must still do: read and write its own disk, use a descriptor passed in.
//!
//! Every layer is run alone too, and each must refuse the attacks it is
//! there for: turning any one layer off in the code fails a test. With no
//! layer at all every attack succeeds, so the probe can tell.
//!
//! `harness = false`: the probe is this binary's `main`.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use libtest_mimic::{Arguments, Failed, Trial};
use sandpen_supervisor::jail::{self, JailSpec, Layers};

mod common;
use common::{check, text, Cli};

const PROBE: &str = "SANDPEN_JAIL_PROBE";

/// What the probe is told to attack (paths and addresses of the host side).
#[derive(serde::Serialize, serde::Deserialize)]
struct Targets {
    ssh_key: PathBuf,
    secret_store: PathBuf,
    other_disk: PathBuf,
    own_disk: PathBuf,
    tcp: String,
    other_socket: PathBuf,
}

// ------------------------------------------------------------------ probe

fn outcome(r: std::io::Result<()>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => match e.raw_os_error() {
            Some(n) => format!("errno{n}"),
            None => format!("error:{e}"),
        },
    }
}

/// Runs `argv` in a child (exec, then the program's exit status 0 means it
/// ran): "ok", or the errno of the exec.
fn exec_in_child(argv: &[&str]) -> String {
    let args: Vec<CString> = argv.iter().map(|a| CString::new(*a).unwrap()).collect();
    // SAFETY: the probe has one thread; the child only calls execv and
    // _exit.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            let err = nix::unistd::execv(&args[0], &args).unwrap_err();
            // SAFETY: ending the child without running anything else.
            unsafe { libc::_exit(100 + err as i32) }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            match nix::sys::wait::waitpid(child, None) {
                Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => "ok".into(),
                Ok(nix::sys::wait::WaitStatus::Exited(_, c)) if c > 100 => {
                    format!("errno{}", c - 100)
                }
                other => format!("other:{other:?}"),
            }
        }
        Err(e) => format!("fork:{e}"),
    }
}

fn probe() -> i32 {
    let targets: Targets = serde_json::from_str(&std::env::var(PROBE).unwrap()).unwrap();
    let read = |p: &Path| outcome(std::fs::read(p).map(|_| ()));
    let mut out = BTreeMap::new();
    out.insert("read-ssh", read(&targets.ssh_key));
    out.insert("read-secrets", read(&targets.secret_store));
    out.insert("read-other-disk", read(&targets.other_disk));
    out.insert(
        "write-own-disk",
        outcome(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&targets.own_disk)
                .and_then(|mut f| f.write_all(b"qcow")),
        ),
    );
    out.insert(
        "tcp-connect",
        outcome(std::net::TcpStream::connect(&targets.tcp).map(|_| ())),
    );
    out.insert(
        "unix-connect-other",
        outcome(std::os::unix::net::UnixStream::connect(&targets.other_socket).map(|_| ())),
    );
    out.insert("exec-shell", exec_in_child(&["/bin/sh", "-c", "exit 0"]));
    let interp = jail::elf_interpreter(Path::new("/bin/sh"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.insert(
        "exec-shell-via-interpreter",
        exec_in_child(&[&interp, "/bin/sh", "-c", "exit 0"]),
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    out.insert(
        "caps",
        if field("CapEff:").trim_start_matches('0').is_empty() {
            "none".into()
        } else {
            "some".into()
        },
    );
    out.insert("no-new-privs", field("NoNewPrivs:"));
    // The descriptor the launcher passed (the first passed one).
    // SAFETY: descriptor 4 was passed in by the launcher, for this process.
    let mut passed = unsafe {
        <std::os::unix::net::UnixStream as std::os::fd::FromRawFd>::from_raw_fd(jail::passed_fd(0))
    };
    out.insert("passed-fd", outcome(passed.write_all(b"hello")));
    for (ns, link) in [("net", "/proc/self/ns/net"), ("pid", "/proc/self/ns/pid")] {
        out.insert(
            if ns == "net" { "ns-net" } else { "ns-pid" },
            std::fs::read_link(link)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
    }
    for (k, v) in out {
        println!("{k} {v}");
    }
    0
}

// ----------------------------------------------------------------- parent

struct Fixture {
    _tmp: tempfile::TempDir,
    targets: Targets,
    _tcp: std::net::TcpListener,
    _other: std::os::unix::net::UnixListener,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let file = |rel: &str, mode: u32| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"HOST-ONLY").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    };
    let ssh_key = file("home/.ssh/id_ed25519", 0o600);
    // Another user's key: only capabilities (DAC_OVERRIDE) let root read it.
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(&ssh_key, Some(4242), Some(4242)).unwrap();
    }
    let secret_store = file("home/.local/share/sandpen/secrets/store.json", 0o600);
    let other_disk = file("state/sandpen/sandboxes/other/disk.qcow2", 0o600);
    let own_disk = file("state/sandpen/sandboxes/probe/disk.qcow2", 0o600);
    let other_socket = root.join("state/sandpen/sandboxes/other/run/control.sock");
    std::fs::create_dir_all(other_socket.parent().unwrap()).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&other_socket).unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    Fixture {
        targets: Targets {
            ssh_key,
            secret_store,
            other_disk,
            own_disk,
            tcp: tcp.local_addr().unwrap().to_string(),
            other_socket,
        },
        _tmp: tmp,
        _tcp: tcp,
        _other: other,
    }
}

/// A host where namespaces cannot be made (user namespaces off, as some
/// distributions ship): the test refuses `unshare` to the launcher (and to
/// the whole `sandpen` it starts) with a seccomp filter put on from outside.
fn without_namespaces(cmd: &mut impl PreExec) {
    let program =
        sandpen_confine::deny_list_program(std::env::consts::ARCH, &[libc::SYS_unshare], &[])
            .expect("a filter");
    cmd.pre_exec_filter(program);
}

trait PreExec {
    fn pre_exec_filter(&mut self, program: sandpen_confine::seccompiler::BpfProgram);
}

/// Installs `program` between fork and exec with raw system calls only
/// (the program was built before the fork).
fn install_raw(program: &[sandpen_confine::seccompiler::sock_filter]) -> std::io::Result<()> {
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl and seccomp take integers and a pointer to `prog`,
    // alive for the call; both are async-signal-safe.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &prog) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl PreExec for tokio::process::Command {
    fn pre_exec_filter(&mut self, program: sandpen_confine::seccompiler::BpfProgram) {
        // SAFETY: see install_raw.
        unsafe { self.pre_exec(move || install_raw(&program)) };
    }
}

impl PreExec for std::process::Command {
    fn pre_exec_filter(&mut self, program: sandpen_confine::seccompiler::BpfProgram) {
        use std::os::unix::process::CommandExt;
        // SAFETY: see install_raw.
        unsafe { self.pre_exec(move || install_raw(&program)) };
    }
}

/// Runs the probe in the jail with `layers`: its report and what it found.
fn run_probe(layers: Layers) -> Result<(jail::JailReport, BTreeMap<String, String>), Failed> {
    run_probe_on(layers, false)
}

fn run_probe_on(
    layers: Layers,
    no_namespaces: bool,
) -> Result<(jail::JailReport, BTreeMap<String, String>), Failed> {
    let f = fixture();
    let me = std::env::current_exe()?;
    let mut spec = JailSpec::for_qemu(
        &me,
        vec![],
        "probe",
        &[],
        &f.targets.own_disk,
        sandpen_vm::Accel::Tcg,
    );
    spec.layers = layers;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (report, stdout) = rt.block_on(async {
        let mut cmd = spec
            .command(Path::new(env!("CARGO_BIN_EXE_sandpen")))
            .map_err(|e| e.to_string())?;
        cmd.env(PROBE, serde_json::to_string(&f.targets).unwrap())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit());
        if no_namespaces {
            without_namespaces(&mut cmd);
        }
        let launched = jail::spawn(cmd, vec![theirs.into()]).map_err(|e| e.to_string())?;
        let (child, report) = launched.report().await.map_err(|e| e.to_string())?;
        let out = child.wait_with_output().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((report, out))
    })?;
    let mut found: BTreeMap<String, String> = String::from_utf8_lossy(&stdout.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut hello = [0u8; 5];
    let mut ours = ours;
    ours.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    found.insert(
        "passed-fd-host".into(),
        match ours.read_exact(&mut hello) {
            Ok(()) if &hello == b"hello" => "ok".into(),
            other => format!("{other:?}"),
        },
    );
    if !stdout.status.success() {
        return Err(format!("the probe ended with {}: {found:?}", stdout.status).into());
    }
    Ok((report, found))
}

fn own_ns(kind: &str) -> String {
    std::fs::read_link(format!("/proc/self/ns/{kind}"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn refused(v: Option<&String>) -> bool {
    v.is_some_and(|v| v.starts_with("errno"))
}

/// Checks that each of `attacks` was refused and that QEMU's own work
/// still works.
fn expect(found: &BTreeMap<String, String>, attacks: &[&str]) -> Result<(), Failed> {
    for a in attacks {
        if !refused(found.get(*a)) {
            return Err(format!("{a} was not refused: {found:?}").into());
        }
    }
    for control in ["write-own-disk", "passed-fd", "passed-fd-host"] {
        if found.get(control).map(String::as_str) != Some("ok") {
            return Err(format!("{control} must work in the jail: {found:?}").into());
        }
    }
    Ok(())
}

const FILE_ATTACKS: [&str; 3] = ["read-ssh", "read-secrets", "read-other-disk"];

fn all_layers() -> Result<(), Failed> {
    let (report, found) = run_probe(Layers::ALL)?;
    if !report.missing.is_empty() {
        return Err(format!("this host should give every layer: {:?}", report.missing).into());
    }
    expect(
        &found,
        &[
            "read-ssh",
            "read-secrets",
            "read-other-disk",
            "tcp-connect",
            "unix-connect-other",
            "exec-shell",
            "exec-shell-via-interpreter",
        ],
    )?;
    if found.get("caps").map(String::as_str) != Some("none") {
        return Err(format!("capabilities left: {found:?}").into());
    }
    if found.get("no-new-privs").map(String::as_str) != Some("1") {
        return Err(format!("no_new_privs not set: {found:?}").into());
    }
    for ns in ["net", "pid"] {
        if found.get(&format!("ns-{ns}")) == Some(&own_ns(ns)) {
            return Err(format!("the probe shares the {ns} namespace: {found:?}").into());
        }
    }
    Ok(())
}

/// Without any layer, every attack works: the probe can tell.
fn no_layer() -> Result<(), Failed> {
    let (_, found) = run_probe(Layers::NONE)?;
    for a in [
        "read-ssh",
        "read-secrets",
        "read-other-disk",
        "tcp-connect",
        "unix-connect-other",
        "exec-shell",
        "exec-shell-via-interpreter",
    ] {
        if found.get(a).map(String::as_str) != Some("ok") {
            return Err(format!("{a} fails even without a jail: {found:?}").into());
        }
    }
    Ok(())
}

fn namespaces_alone() -> Result<(), Failed> {
    let (_, found) = run_probe(Layers {
        namespaces: true,
        ..Layers::NONE
    })?;
    // The network namespace has only a `lo` that is down.
    expect(&found, &["tcp-connect"])?;
    if found.get("ns-net") == Some(&own_ns("net")) {
        return Err("no network namespace".into());
    }
    Ok(())
}

fn landlock_alone() -> Result<(), Failed> {
    let (_, found) = run_probe(Layers {
        landlock: true,
        ..Layers::NONE
    })?;
    let mut attacks = FILE_ATTACKS.to_vec();
    attacks.push("exec-shell");
    if sandpen_confine::kernel_landlock_abi() >= 4 {
        attacks.push("tcp-connect");
    }
    expect(&found, &attacks)
}

fn seccomp_alone() -> Result<(), Failed> {
    let (_, found) = run_probe(Layers {
        seccomp: true,
        ..Layers::NONE
    })?;
    expect(
        &found,
        &[
            "tcp-connect",
            "unix-connect-other",
            "exec-shell",
            "exec-shell-via-interpreter",
        ],
    )
}

fn caps_alone() -> Result<(), Failed> {
    let (_, found) = run_probe(Layers {
        caps: true,
        ..Layers::NONE
    })?;
    if found.get("caps").map(String::as_str) != Some("none") {
        return Err(format!("capabilities left: {found:?}").into());
    }
    // As root, another user's 0600 key is readable only with
    // CAP_DAC_OVERRIDE.
    if nix::unistd::geteuid().is_root() {
        expect(&found, &["read-ssh"])?;
    }
    Ok(())
}

/// Where user namespaces cannot be had, the program still starts, the
/// report names every missing namespace, and the other layers still hold.
fn without_namespaces_it_starts_and_says_so() -> Result<(), Failed> {
    let (report, found) = run_probe_on(Layers::ALL, true)?;
    let line = report.missing_line().unwrap_or_default();
    check(
        line.contains("user namespace") && line.contains("network namespace"),
        format!("the report does not name the missing namespaces: {line:?}"),
    )?;
    expect(
        &found,
        &[
            "read-ssh",
            "read-secrets",
            "read-other-disk",
            "unix-connect-other",
            "exec-shell",
            "exec-shell-via-interpreter",
        ],
    )
}

/// `run` on such a host: one note line and a running sandbox; with
/// `--require-jail`, a clear refusal and no sandbox running.
fn run_says_so_and_require_jail_refuses() -> Result<(), Failed> {
    let (_root, ws) = common::workspace("sandpen-jail-", "jailed");
    let cli = Cli::new(ws);
    let filtered = |args: &[&str]| {
        let mut c = cli.command(args);
        without_namespaces(&mut c);
        c.output().expect("running sandpen")
    };
    let out = filtered(&["run", "--require-jail", "--", "echo", "in"]);
    let stderr = text(&out.stderr);
    check(
        out.status.code() == Some(125)
            && stderr.contains("QEMU's jail is incomplete on this host: user namespace")
            && stderr.contains("--require-jail")
            && stderr
                .trim()
                .lines()
                .last()
                .is_some_and(|l| l.contains("error")),
        format!("--require-jail: {:?} {stderr}", out.status),
    )?;
    let (status, _) = cli.status_of("jailed")?;
    check(
        status != "running",
        format!("running after a refusal: {status}"),
    )?;
    // The sandbox keeps `--require-jail`: a new one runs without it.
    let _ = cli.run(&["rm", "-f", "jailed"]);
    let out = filtered(&["run", "--", "echo", "in"]);
    let stderr = text(&out.stderr);
    let notes = stderr
        .lines()
        .filter(|l| l.contains("QEMU's jail is incomplete"))
        .count();
    let result = check(
        out.status.success() && text(&out.stdout) == "in\n" && notes == 1,
        format!(
            "run without the jail's namespaces: {:?} {stderr}",
            out.status
        ),
    );
    let _ = cli.run(&["rm", "-f", "jailed"]);
    result
}

/// A kernel without Landlock (refused to `sandpen` from outside): `run`
/// starts the sandbox, and says for QEMU's jail and for the supervisor's own
/// confinement that Landlock is missing.
fn without_landlock_both_confinements_say_so() -> Result<(), Failed> {
    let (_root, ws) = common::workspace("sandpen-jail-", "nolandlock");
    let cli = Cli::new(ws);
    let mut c = cli.command(&["run", "--", "echo", "in"]);
    let program = sandpen_confine::deny_list_program(
        std::env::consts::ARCH,
        &[libc::SYS_landlock_create_ruleset],
        &[],
    )
    .expect("a filter");
    c.pre_exec_filter(program);
    let out = c.output().expect("running sandpen");
    let stderr = text(&out.stderr);
    let qemu = stderr
        .lines()
        .any(|l| l.contains("QEMU's jail is incomplete on this host: Landlock"));
    let supervisor = stderr
        .lines()
        .any(|l| l.contains("the supervisor's confinement is incomplete on this host: Landlock"));
    let result = check(
        out.status.success() && text(&out.stdout) == "in\n" && qemu && supervisor,
        format!("run without Landlock: {:?} {stderr}", out.status),
    );
    let _ = cli.run(&["rm", "-f", "nolandlock"]);
    result
}

type TestFn = fn() -> Result<(), Failed>;

fn main() {
    if std::env::var_os(PROBE).is_some() {
        std::process::exit(probe());
    }
    let args = Arguments {
        test_threads: Some(1),
        ..Arguments::from_args()
    };
    let tests: Vec<(&str, TestFn)> = vec![
        ("all_layers_refuse_every_attack", all_layers),
        ("without_a_jail_every_attack_works", no_layer),
        ("namespaces_alone_refuse_tcp", namespaces_alone),
        ("landlock_alone_refuses_files_exec_and_tcp", landlock_alone),
        (
            "seccomp_alone_refuses_sockets_and_a_second_exec",
            seccomp_alone,
        ),
        ("capabilities_alone_are_empty", caps_alone),
        (
            "without_namespaces_it_starts_and_says_so",
            without_namespaces_it_starts_and_says_so,
        ),
        (
            "run_says_so_and_require_jail_refuses",
            run_says_so_and_require_jail_refuses,
        ),
        (
            "without_landlock_both_confinements_say_so",
            without_landlock_both_confinements_say_so,
        ),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, f)| Trial::test(name, f))
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
