//! The file server's confinement, attacked from the host side: a child
//! process (this binary again, single-threaded like `sandpen fs-serve`)
//! opens what the server opens, confines itself with
//! `sandpen_fs::confine::confine`, then tries to reach host files outside
//! its share, run programs, connect to sockets, and also does what a server
//! must still be able to do. It prints one line per attempt; the parent
//! checks each against what is expected.
//!
//! `harness = false`: the test harness runs tests on threads, and a process
//! with more than one thread refuses to confine itself.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use sandpen_fs::confine::{self, Confinement, LandlockOutcome};
use sandpen_policy::{Label, LabelStore};

const CHILD: &str = "SANDPEN_CONFINE_TEST_CHILD";
const OUTSIDE: &str = "HOST-ONLY-outside";

/// One attempt: "ok", or the errno's number.
fn outcome(r: std::io::Result<()>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => match e.raw_os_error() {
            Some(n) => format!("errno{n}"),
            None => format!("error:{e}"),
        },
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).expect("no NUL in test paths")
}

fn last_err<T>(rc: i64) -> std::io::Result<T>
where
    T: Default,
{
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(T::default())
    }
}

/// The child: `tmp` holds `share/`, `state/flow/`, `outside.txt`,
/// `log.txt`, `sock`; `writable` says how the share is confined.
fn child(tmp: &Path, writable: bool) -> i32 {
    let share = tmp.join("share");
    let flow_dir = tmp.join("state/flow");
    // What the server opens before it confines itself.
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(tmp.join("log.txt"))
        .expect("log");
    let proc_fd = std::fs::File::open("/proc/self/fd").expect("/proc/self/fd");
    let inside = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(share.join("file.txt"))
        .expect("O_PATH inside");
    let outside = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(tmp.join("outside.txt"))
        .expect("O_PATH outside");
    let confined = match confine::confine(&Confinement {
        root: share.clone(),
        writable,
        state_dirs: vec![flow_dir.clone()],
    }) {
        Ok(c) => c,
        Err(e) => {
            println!("confine error:{e}");
            return 1;
        }
    };
    match &confined.landlock {
        LandlockOutcome::Enforced { abi, .. } => println!("landlock {abi}"),
        LandlockOutcome::NotEnforced(why) => println!("landlock none:{why}"),
    }
    println!(
        "seccomp {}",
        if confined.seccomp.is_ok() {
            "on"
        } else {
            "off"
        }
    );
    println!(
        "no_new_privs {}",
        if confine::no_new_privs() { "on" } else { "off" }
    );
    let sys_admin = caps::has_cap(
        None,
        caps::CapSet::Permitted,
        caps::Capability::CAP_SYS_ADMIN,
    )
    .unwrap_or(true);
    println!("cap_sys_admin {}", if sys_admin { "yes" } else { "no" });

    let mut tries: Vec<(&str, std::io::Result<()>)> = Vec::new();
    // Host files outside the share.
    tries.push((
        "read_etc_hostname",
        std::fs::File::open("/etc/hostname").map(drop),
    ));
    tries.push((
        "read_outside",
        std::fs::read_to_string(tmp.join("outside.txt")).map(|s| assert_ne!(s, "")),
    ));
    tries.push(("list_parent", std::fs::read_dir(tmp).map(drop)));
    tries.push((
        "create_outside",
        std::fs::File::create(tmp.join("new.txt")).map(drop),
    ));
    tries.push((
        "create_beside_state",
        std::fs::File::create(tmp.join("state/sandbox.json")).map(drop),
    ));
    tries.push(("exec", Command::new("/bin/true").status().map(drop)));
    tries.push((
        "tcp_connect",
        std::env::var("PORT")
            .map_err(std::io::Error::other)
            .and_then(|p| std::net::TcpStream::connect(format!("127.0.0.1:{p}")).map(drop)),
    ));
    tries.push((
        "unix_connect",
        std::os::unix::net::UnixStream::connect(tmp.join("sock")).map(drop),
    ));
    tries.push((
        "thread_read_etc_hostname",
        std::thread::spawn(|| std::fs::File::open("/etc/hostname").map(drop))
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("thread panicked"))),
    ));
    // The passthrough layer's reopen through /proc/self/fd: allowed for a
    // file in the share, refused for one outside (the server holds none).
    let reopen = |fd: &std::fs::File| {
        let name = CString::new(fd.as_raw_fd().to_string()).expect("digits");
        // SAFETY: openat with a valid descriptor and a NUL-terminated name;
        // the returned descriptor is closed at once.
        let rc = unsafe { libc::openat(proc_fd.as_raw_fd(), name.as_ptr(), libc::O_RDONLY) };
        if rc >= 0 {
            // SAFETY: rc is a descriptor this function just opened.
            unsafe { libc::close(rc) };
        }
        last_err::<()>(rc.into())
    };
    tries.push(("reopen_inside_via_proc", reopen(&inside)));
    tries.push(("reopen_outside_via_proc", reopen(&outside)));
    // What the server still needs.
    tries.push(("log_append", log.write_all(b"line\n")));
    tries.push((
        "set_label",
        LabelStore::at(flow_dir.join("flow.json"))
            .set(Label::SecretRead, "2026-01-01T00:00:00Z", "/x")
            .map(drop)
            .map_err(std::io::Error::other),
    ));
    tries.push((
        "read_share",
        std::fs::read_to_string(share.join("file.txt")).map(drop),
    ));
    tries.push(("list_share", std::fs::read_dir(share.join("sub")).map(drop)));
    tries.push((
        "write_share",
        std::fs::OpenOptions::new()
            .append(true)
            .open(share.join("file.txt"))
            .and_then(|mut f| f.write_all(b"more\n")),
    ));
    tries.push((
        "create_share",
        std::fs::File::create(share.join("sub/new.txt")).map(drop),
    ));
    tries.push(("mkdir_share", std::fs::create_dir(share.join("d"))));
    tries.push((
        "symlink_share",
        std::os::unix::fs::symlink("file.txt", share.join("l")),
    ));
    tries.push((
        "rename_across_folders_share",
        std::fs::rename(share.join("sub/keep.txt"), share.join("moved.txt")),
    ));
    tries.push((
        "hard_link_share",
        std::fs::hard_link(share.join("file.txt"), share.join("sub/hl")),
    ));
    tries.push((
        "remove_share",
        std::fs::remove_file(share.join("sub/gone.txt")),
    ));
    let dev = cstr(&share.join("dev"));
    // SAFETY: mknod with a NUL-terminated path; no memory is written.
    let rc = unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) };
    tries.push(("mknod_char_share", last_err(rc.into())));
    // As root the server acts as other users per request (setresuid on the
    // thread, as fuse-backend-rs does), and must be able to come back.
    if nix_is_root() {
        let as_user = || -> std::io::Result<()> {
            // SAFETY: setresuid with integers; -1 keeps a value.
            last_err::<()>(unsafe { libc::syscall(libc::SYS_setresuid, -1, 1000, -1) })?;
            let made = std::fs::File::create(share.join("sub/by1000.txt"));
            // SAFETY: as above; back to root.
            let back = unsafe { libc::syscall(libc::SYS_setresuid, -1, 0, -1) };
            last_err::<()>(back)?;
            made.map(drop)
        };
        tries.push(("as_other_user_share", as_user()));
    }
    for (name, r) in tries {
        println!("{name} {}", outcome(r));
    }
    0
}

/// `landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)`: the
/// kernel's Landlock ABI, or 0.
fn kernel_landlock_abi() -> i64 {
    // SAFETY: with a null attribute, size 0 and the VERSION flag the call
    // reads and writes no memory.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    v.max(0)
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn write(p: &Path, s: &str) {
    std::fs::create_dir_all(p.parent().expect("a parent")).expect("mkdir");
    std::fs::write(p, s).expect("write");
}

/// Runs the child over a fresh folder; its lines as name → outcome.
fn run(writable: bool) -> (PathBuf, tempfile::TempDir, BTreeMap<String, String>) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let t = tmp.path().canonicalize().expect("canonical");
    write(&t.join("share/file.txt"), "inside\n");
    write(&t.join("share/sub/keep.txt"), "keep\n");
    write(&t.join("share/sub/gone.txt"), "gone\n");
    write(&t.join("outside.txt"), OUTSIDE);
    write(&t.join("log.txt"), "");
    std::fs::create_dir_all(t.join("state/flow")).expect("flow dir");
    // Uid 1000 (the root case) must pass ordinary permissions to reach
    // share/sub: only Landlock may stop it.
    use std::os::unix::fs::PermissionsExt;
    for (p, mode) in [
        (&t, 0o755),
        (&t.join("share"), 0o755),
        (&t.join("share/sub"), 0o777),
    ] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
    let _unix = std::os::unix::net::UnixListener::bind(t.join("sock")).expect("unix");
    let out = Command::new(std::env::current_exe().expect("this test"))
        .env(CHILD, &t)
        .env("WRITABLE", if writable { "1" } else { "0" })
        .env("PORT", tcp.local_addr().expect("port").port().to_string())
        .output()
        .expect("running the child");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "child failed: {:?}\n{stdout}",
        out.status
    );
    let lines = stdout
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (t, tmp, lines)
}

const EACCES: &str = "errno13";
const EPERM: &str = "errno1";

fn expect(lines: &BTreeMap<String, String>, name: &str, want: &str, failures: &mut Vec<String>) {
    let got = lines.get(name).map(String::as_str).unwrap_or("(missing)");
    if got != want {
        failures.push(format!("{name}: expected {want}, got {got}"));
    }
}

fn main() {
    if let Some(dir) = std::env::var_os(CHILD) {
        let writable = std::env::var("WRITABLE").as_deref() == Ok("1");
        std::process::exit(child(Path::new(&dir), writable));
    }
    // Asked of the kernel here, not of the code under test: where the kernel
    // has Landlock (ABI 2 or later, the first that can rename across
    // folders) the child must have enforced it.
    let kernel_abi = kernel_landlock_abi();
    let require =
        kernel_abi >= 2 || std::env::var("SANDPEN_REQUIRE_LANDLOCK").as_deref() == Ok("1");
    println!("the kernel's Landlock ABI: {kernel_abi}");
    let mut failures = Vec::new();
    for writable in [true, false] {
        let (t, _keep, lines) = run(writable);
        let mode = if writable { "read-write" } else { "read-only" };
        println!("confine ({mode} share): {lines:?}");
        let landlock = lines.get("landlock").cloned().unwrap_or_default();
        if !require {
            println!("SKIPPED the Landlock checks: the kernel has none ({landlock})");
        } else {
            let f = &mut failures;
            if kernel_abi >= 2 && landlock != kernel_abi.min(10).to_string() {
                f.push(format!(
                    "Landlock: the kernel has ABI {kernel_abi}, the child enforced {landlock}"
                ));
            }
            // Nothing on the host outside the share and the label folder.
            for name in [
                "read_etc_hostname",
                "read_outside",
                "list_parent",
                "create_outside",
                "create_beside_state",
                "thread_read_etc_hostname",
                "reopen_outside_via_proc",
                "mknod_char_share",
            ] {
                expect(&lines, name, EACCES, f);
            }
            for name in [
                "reopen_inside_via_proc",
                "log_append",
                "set_label",
                "read_share",
                "list_share",
            ] {
                expect(&lines, name, "ok", f);
            }
            let change = [
                "write_share",
                "create_share",
                "mkdir_share",
                "symlink_share",
                "rename_across_folders_share",
                "hard_link_share",
                "remove_share",
                "as_other_user_share",
            ];
            for name in change {
                if name == "as_other_user_share" && !nix_is_root() {
                    continue;
                }
                expect(&lines, name, if writable { "ok" } else { EACCES }, f);
            }
            if !t.join("outside.txt").exists() || t.join("new.txt").exists() {
                f.push("the host folder outside the share changed".into());
            }
            if writable && nix_is_root() {
                let owner = std::fs::metadata(t.join("share/sub/by1000.txt"))
                    .map(|m| m.uid())
                    .ok();
                if owner != Some(1000) {
                    f.push(format!("a file made as uid 1000 is owned by {owner:?}"));
                }
            }
        }
        // seccomp: no new socket, no exec (whatever Landlock did).
        for name in ["exec", "tcp_connect", "unix_connect"] {
            expect(&lines, name, EPERM, &mut failures);
        }
        expect(&lines, "seccomp", "on", &mut failures);
        expect(&lines, "no_new_privs", "on", &mut failures);
        expect(&lines, "cap_sys_admin", "no", &mut failures);
    }
    if failures.is_empty() {
        println!("test confine ... ok");
    } else {
        eprintln!("test confine ... FAILED");
        for f in &failures {
            eprintln!("  {f}");
        }
        std::process::exit(101);
    }
}
