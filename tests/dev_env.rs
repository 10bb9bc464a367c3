//! End-to-end tests of the development-environment commands: published ports
//! (`-p`, `ports`), `cp` both ways under the file rules, and templates
//! (`save`, then `run --image`). Real VMs, run in order.
//!
//! Two sandboxes: `devweb` (image `test-agents`, which has python3) for ports
//! and cp, and `devtmpl` (image `default`) saved as a template.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};

mod common;
use common::{check, text, Cli};

const WEB: &str = "devweb";
const TMPL: &str = "devtmpl";
const FROM_TMPL: &str = "devtmpl2";
const SECRET: &str = "SECRET-ENV-7d41aa";
const API_KEY: &str = "sk-ant-devenv-SECRET-19c0";
const TOKEN: &str = "tok-devenv-55e2";

struct Env {
    cli: Cli,
    _root: tempfile::TempDir,
    /// Host folder outside the workspace, for cp's host side.
    host: tempfile::TempDir,
    /// The host port `devweb` publishes (guest port 8000).
    port: u16,
    /// The saved image's name (unique: the data home is shared).
    image: String,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let (root, ws) = common::workspace("sandpen-devenv-", "devenv");
        std::fs::write(ws.join(".env"), format!("TOKEN={SECRET}\n")).unwrap();
        std::fs::write(ws.join("hello.txt"), "hello from the workspace\n").unwrap();
        std::fs::create_dir_all(ws.join("secrets")).unwrap();
        std::fs::write(ws.join("secrets/token"), TOKEN).unwrap();
        std::fs::write(
            ws.join(".sandpen.toml"),
            "[flow]\nsecret = [\"secrets/**\"]\n",
        )
        .unwrap();
        Env {
            cli: Cli::new(ws),
            _root: root,
            host: tempfile::tempdir().unwrap(),
            port: free_port(),
            image: format!("devenv-test-{}", std::process::id()),
        }
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn sandpen(args: &[&str]) -> Output {
    env().cli.run(args)
}

fn ok(args: &[&str]) -> Result<String, Failed> {
    env().cli.ok(args)
}

/// A sandpen command that must fail with 125 and one line containing `needle`.
fn refused(args: &[&str], needle: &str) -> Result<String, Failed> {
    let out = sandpen(args);
    let err = text(&out.stderr);
    check(
        out.status.code() == Some(125),
        format!("{args:?}: exit {:?}\n{err}", out.status.code()),
    )?;
    check(
        err.contains(needle),
        format!("{args:?}: {err:?} lacks {needle:?}"),
    )?;
    Ok(err)
}

fn guest(name: &str, sh: &str) -> Result<String, Failed> {
    ok(&["exec", name, "--", "sh", "-c", sh])
}

fn root(name: &str, sh: &str) -> Result<String, Failed> {
    ok(&["exec", "-u", "root", name, "--", "sh", "-c", sh])
}

fn ws() -> &'static Path {
    &env().cli.ws
}

fn wsp(rel: &str) -> String {
    format!("{}:{}/{rel}", WEB, ws().display())
}

/// `curl` on the host, as a user would check it.
fn curl(port: u16, path: &str) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "10", "--noproxy", "*"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .stdin(Stdio::null())
        .output()
        .expect("running curl")
}

// ---- ports ----

/// The socket inode of the TCP listener on 127.0.0.1:`port`, from /proc/net/tcp.
fn listening_inode(port: u16) -> Result<Option<String>, Failed> {
    let table = std::fs::read_to_string("/proc/net/tcp")?;
    let local = format!("0100007F:{port:04X}");
    Ok(table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A"))
            .then(|| f.get(9).map(|s| s.to_string()))
            .flatten()
    }))
}

fn publish_reaches_a_server_in_the_guest() -> Result<(), Failed> {
    let e = env();
    let p = format!("{}:8000", e.port);
    let t = Instant::now();
    ok(&[
        "run",
        "--name",
        WEB,
        "--image",
        "test-agents",
        "-p",
        &p,
        "--",
        "true",
    ])?;
    eprintln!(
        "    run (create + boot): {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let shown = ok(&["ports", WEB])?;
    check(
        shown == format!("8000/tcp -> 127.0.0.1:{}\n", e.port),
        format!("ports: {shown:?}"),
    )?;
    let ls = ok(&["ls"])?;
    check(
        ls.lines().next().is_some_and(|h| h.contains("PORTS"))
            && ls.lines().any(|l| {
                l.starts_with(&format!("{WEB} "))
                    && l.contains(&format!("8000/tcp -> 127.0.0.1:{}", e.port))
            }),
        format!("ls does not show the published port: {ls}"),
    )?;
    // Before anything listens in the guest, the connection is closed.
    let before = curl(e.port, "/hello.txt");
    check(
        !before.status.success(),
        format!(
            "curl succeeded with nothing listening: {}",
            text(&before.stdout)
        ),
    )?;
    guest(
        WEB,
        "nohup python3 -m http.server 8000 --bind 127.0.0.1 >/tmp/http.log 2>&1 </dev/null &",
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = curl(e.port, "/hello.txt");
        if out.status.success() {
            check(
                text(&out.stdout) == "hello from the workspace\n",
                format!("body {:?}", text(&out.stdout)),
            )?;
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "curl never reached the guest's server: {}\n{}",
                text(&out.stderr),
                guest(WEB, "cat /tmp/http.log").unwrap_or_default()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // Several connections at once, and a bigger body both ways.
    let big: String = "0123456789abcdef".repeat(64 * 1024);
    std::fs::write(ws().join("big.txt"), &big)?;
    let handles: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(move || curl(env().port, "/big.txt")))
        .collect();
    for h in handles {
        let out = h.join().map_err(|_| "a curl thread panicked")?;
        check(
            out.stdout.len() == big.len() && text(&out.stdout) == big,
            format!("big body: {} bytes of {}", out.stdout.len(), big.len()),
        )?;
    }
    // The listener is the supervisor's own, kept through its confinement
    // (Landlock there forbids any later TCP bind).
    let dir = e.cli.state.path().join("sandpen/sandboxes").join(WEB);
    let pid = std::fs::read_to_string(dir.join("run/supervisor.pid"))?;
    let inode = listening_inode(e.port)?.ok_or("nothing listens on the published port")?;
    let owned = std::fs::read_dir(format!("/proc/{}/fd", pid.trim()))?
        .flatten()
        .any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|l| l.to_string_lossy() == format!("socket:[{inode}]"))
        });
    check(
        owned,
        "the published port's listener is not the supervisor's",
    )?;
    let log = std::fs::read_to_string(dir.join("logs/supervisor.log"))?;
    let confined = log
        .lines()
        .rfind(|l| l.contains("supervisor confined:"))
        .unwrap_or_default();
    check(
        confined.contains("landlock ABI") || sandpen_confine::kernel_landlock_abi() == 0,
        format!("the supervisor is not under Landlock: {confined:?}"),
    )?;
    // No network card appeared for it.
    let links = guest(WEB, "ls /sys/class/net")?;
    check(links.trim() == "lo", format!("links: {links}"))
}

fn bad_and_taken_ports_are_clear_errors() -> Result<(), Failed> {
    // Bad input: clap's usage error, one reason.
    for (arg, needle) in [
        ("0", "is not a port"),
        ("8080:70000", "is not a port"),
        ("1.2.3:80:80", "is not an IP address"),
        ("53/udp", "only TCP"),
    ] {
        let out = sandpen(&["create", "--name", "devbad", "-p", arg]);
        let err = text(&out.stderr);
        check(
            !out.status.success() && err.contains(needle),
            format!("-p {arg}: exit {:?}, {err}", out.status.code()),
        )?;
    }
    // A host port someone else holds: the start fails and says which.
    let holder = TcpListener::bind("127.0.0.1:0")?;
    let taken = holder.local_addr()?.port();
    let p = format!("{taken}:80");
    ok(&["create", "--name", "devtaken", "-p", &p])?;
    let err = refused(&["start", "devtaken"], "already in use")?;
    check(
        err.contains(&format!("127.0.0.1:{taken}")),
        format!("the address is not named: {err}"),
    )?;
    let (status, _) = env().cli.status_of("devtaken")?;
    check(status != "running", format!("devtaken is {status}"))?;
    // The other sandbox's port is taken too while it runs.
    let p = format!("{}:8000", env().port);
    ok(&["create", "--name", "devtaken2", "-p", &p])?;
    refused(&["start", "devtaken2"], "already in use")?;
    ok(&["rm", "-f", "devtaken", "devtaken2"])?;
    Ok(())
}

// ---- cp ----

fn cp_both_ways() -> Result<(), Failed> {
    let host = env().host.path();
    // Host -> guest, a folder outside the workspace.
    let src = host.join("src");
    std::fs::create_dir_all(src.join("sub"))?;
    std::fs::write(src.join("a.txt"), "alpha\n")?;
    std::fs::write(src.join("sub/b.txt"), "beta\n")?;
    std::os::unix::fs::symlink("a.txt", src.join("link"))?;
    ok(&["cp", src.to_str().unwrap(), &format!("{WEB}:/tmp/in")])?;
    let seen = guest(
        WEB,
        "cat /tmp/in/a.txt /tmp/in/sub/b.txt; readlink /tmp/in/link; stat -c %U /tmp/in/sub/b.txt",
    )?;
    check(
        seen == "alpha\nbeta\na.txt\nagent\n",
        format!("the guest saw {seen:?}"),
    )?;
    // Into an existing folder: it lands inside it.
    ok(&[
        "cp",
        src.join("a.txt").to_str().unwrap(),
        &format!("{WEB}:/tmp/in/sub"),
    ])?;
    check(
        guest(WEB, "cat /tmp/in/sub/a.txt")? == "alpha\n",
        "a.txt did not land in the folder",
    )?;
    // Guest -> host, a file and a folder.
    guest(WEB, "echo '<h1>report</h1>' > /tmp/report.html")?;
    ok(&[
        "cp",
        &format!("{WEB}:/tmp/report.html"),
        host.to_str().unwrap(),
    ])?;
    check(
        std::fs::read_to_string(host.join("report.html"))? == "<h1>report</h1>\n",
        "report.html",
    )?;
    let back = host.join("back");
    ok(&["cp", &format!("{WEB}:/tmp/in"), back.to_str().unwrap()])?;
    check(
        std::fs::read_to_string(back.join("sub/b.txt"))? == "beta\n"
            && std::fs::read_link(back.join("link"))? == Path::new("a.txt"),
        "the folder did not come back whole",
    )?;
    // `-`: a tar stream on stdout, and from stdin, as in Docker.
    let out = sandpen(&["cp", &format!("{WEB}:/tmp/in"), "-"]);
    check(
        out.status.success(),
        format!("cp to -: {}", text(&out.stderr)),
    )?;
    let listed = pipe(Command::new("tar").args(["-tf", "-"]), &out.stdout)?;
    check(
        listed.lines().any(|l| l == "in/sub/b.txt"),
        format!("the tar on stdout lists {listed:?}"),
    )?;
    let tarball = Command::new("tar")
        .args(["-cf", "-", "--exclude", "./link", "-C"])
        .arg(&src)
        .arg(".")
        .output()?
        .stdout;
    let mut child = env()
        .cli
        .command(&["cp", "-", &format!("{WEB}:/tmp")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().ok_or("no stdin")?.write_all(&tarball)?;
    env()
        .cli
        .expect_ok(&child.wait_with_output()?, "cp - NAME:/tmp")?;
    check(
        guest(WEB, "cat /tmp/a.txt /tmp/sub/b.txt")? == "alpha\nbeta\n",
        "the tar from stdin did not land in /tmp",
    )?;
    // Into the workspace: the host user owns it, as with the guest's own writes.
    let file = host.join("note.txt");
    std::fs::write(&file, "note\n")?;
    ok(&["cp", file.to_str().unwrap(), &wsp("note.txt")])?;
    check(
        std::fs::read_to_string(ws().join("note.txt"))? == "note\n",
        "note.txt is not in the workspace",
    )?;
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::metadata("/proc/self")?.uid();
    check(
        std::fs::metadata(ws().join("note.txt"))?.uid() == me,
        "a file copied into the workspace is not the host user's",
    )
}

/// `cmd` with `input` on its stdin; its stdout.
fn pipe(cmd: &mut Command, input: &[u8]) -> Result<String, Failed> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().ok_or("no stdin")?.write_all(input)?;
    common::expect_ok(&child.wait_with_output()?, &format!("{cmd:?}"))
}

/// Nothing under the host folder holds the secret.
fn no_secret_on_host(dir: &Path) -> Result<(), Failed> {
    let out = Command::new("grep")
        .args(["-rl", SECRET])
        .arg(dir)
        .output()?;
    check(
        text(&out.stdout).trim().is_empty(),
        format!("the secret reached the host: {}", text(&out.stdout)),
    )
}

fn cp_refuses_deny_read_and_read_only() -> Result<(), Failed> {
    let host = env().host.path().join("stolen");
    std::fs::create_dir_all(&host)?;
    let to = |n: &str| host.join(n).to_string_lossy().into_owned();
    // By name.
    refused(&["cp", &wsp(".env"), &to("a")], "deny_read .env")?;
    // Relative to the workspace, and through `..`.
    refused(&["cp", &format!("{WEB}:.env"), &to("b")], "deny_read .env")?;
    refused(&["cp", &wsp("sub/../.env"), &to("c")], "deny_read .env")?;
    // A symlink the guest (root) makes in the workspace, relative and absolute.
    root(
        WEB,
        &format!(
            "cd {ws} && ln -sf .env link && ln -sf {ws}/.env abs && mkdir -p d && ln -sf ../.env d/up",
            ws = ws().display()
        ),
    )?;
    refused(&["cp", &wsp("link"), &to("d")], "deny_read .env")?;
    refused(&["cp", &wsp("abs"), &to("e")], "deny_read .env")?;
    // A folder holding a symlink to it: the symlink comes as a symlink, the
    // secret does not come at all.
    ok(&["cp", &wsp("d"), &to("f")])?;
    // A symlink outside the workspace (the host never sees it): the guest
    // reads through the file server, which hides the file.
    root(WEB, &format!("ln -sf {}/.env /tmp/evil", ws().display()))?;
    let out = sandpen(&["cp", &format!("{WEB}:/tmp/evil"), &to("g")]);
    check(
        out.status.code() == Some(125),
        format!(
            "cp of /tmp/evil: exit {:?}: {}",
            out.status.code(),
            text(&out.stderr)
        ),
    )?;
    // And the guest, root, cannot read it to send it any other way.
    let out = sandpen(&[
        "exec",
        "-u",
        "root",
        WEB,
        "--",
        "cat",
        &format!("{}/.env", ws().display()),
    ]);
    check(!out.status.success(), "guest root read .env")?;
    no_secret_on_host(&host)?;
    for n in ["a", "b", "c", "d", "e", "g"] {
        check(!host.join(n).exists(), format!("{n} was written"))?;
    }
    // A folder holding a deny-read file: the rest goes in, that one does not.
    let bundle = env().host.path().join("bundle");
    std::fs::create_dir_all(&bundle)?;
    std::fs::write(bundle.join("ok.txt"), "fine\n")?;
    std::fs::write(bundle.join(".env"), "TOKEN=from-the-host\n")?;
    let out = sandpen(&["cp", bundle.to_str().unwrap(), &wsp("")]);
    let err = text(&out.stderr);
    check(
        out.status.success() && err.contains("left out") && err.contains("deny_read .env"),
        format!(
            "cp of a folder with .env: exit {:?}: {err}",
            out.status.code()
        ),
    )?;
    check(
        ws().join("bundle/ok.txt").is_file() && !ws().join("bundle/.env").exists(),
        "the folder did not arrive without its .env",
    )?;
    // The same as a tar stream on stdin.
    let tarball = Command::new("tar")
        .args(["-cf", "-", "-C"])
        .arg(&bundle)
        .args([".env", "ok.txt"])
        .output()?
        .stdout;
    let mut child = env()
        .cli
        .command(&["cp", "-", &wsp("")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().ok_or("no stdin")?.write_all(&tarball)?;
    let out = child.wait_with_output()?;
    let err = text(&out.stderr);
    check(
        out.status.success() && err.contains("left out .env") && ws().join("ok.txt").is_file(),
        format!(
            "cp - into the workspace: exit {:?}: {err}",
            out.status.code()
        ),
    )?;
    check(
        std::fs::read_to_string(ws().join(".env"))? == format!("TOKEN={SECRET}\n"),
        ".env was overwritten from stdin",
    )?;
    // The same folder copied into a folder above the workspace: the check
    // follows it to where it lands.
    let parent = ws().parent().ok_or("the workspace has no parent")?;
    let deep = env().host.path().join("deep");
    let ws_name = ws().file_name().ok_or("no workspace name")?;
    std::fs::create_dir_all(deep.join(ws_name).join("bundle2"))?;
    std::fs::write(deep.join(ws_name).join("bundle2/.env"), "TOKEN=deep\n")?;
    std::fs::write(deep.join(ws_name).join("bundle2/ok.txt"), "fine\n")?;
    let out = sandpen(&[
        "cp",
        deep.join(ws_name).to_str().unwrap(),
        &format!("{WEB}:{}", parent.display()),
    ]);
    let err = text(&out.stderr);
    check(
        out.status.success() && err.contains("left out") && err.contains("deny_read .env"),
        format!(
            "cp into the workspace's parent: exit {:?}: {err}",
            out.status.code()
        ),
    )?;
    check(
        ws().join("bundle2/ok.txt").is_file() && !ws().join("bundle2/.env").exists(),
        "bundle2 did not arrive without its .env",
    )?;
    // Into a deny-read or a read-only path.
    let file = env().host.path().join("x.txt");
    std::fs::write(&file, "overwrite\n")?;
    refused(
        &["cp", file.to_str().unwrap(), &wsp(".env")],
        "deny_read .env",
    )?;
    refused(
        &["cp", file.to_str().unwrap(), &wsp(".sandpen.toml")],
        "read-only",
    )?;
    check(
        std::fs::read_to_string(ws().join(".env"))? == format!("TOKEN={SECRET}\n"),
        ".env changed",
    )?;
    check(
        std::fs::read_to_string(ws().join(".sandpen.toml"))?.starts_with("[flow]"),
        ".sandpen.toml changed",
    )
}

fn stop_closes_the_port() -> Result<(), Failed> {
    let port = env().port;
    check(
        TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "the port is not open while the sandbox runs",
    )?;
    ok(&["stop", WEB])?;
    match TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
        Err(e) => Err(format!("after stop: {e}").into()),
        Ok(mut s) => {
            let mut buf = [0u8; 1];
            let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
            Err(format!(
                "something still listens on {port} after stop (read {:?})",
                s.read(&mut buf)
            )
            .into())
        }
    }
}

/// Docker copies to and from a stopped container; sandpen starts the sandbox
/// for the copy (only its guest reads its disk) and stops it again.
fn cp_with_a_stopped_sandbox() -> Result<(), Failed> {
    let host = env().host.path();
    let file = host.join("while-stopped.txt");
    std::fs::write(&file, "written while stopped\n")?;
    let stopped = |what: &str| -> Result<(), Failed> {
        let (state, _) = env().cli.status_of(WEB)?;
        check(state == "stopped", format!("{WEB} is {state} after {what}"))
    };
    stopped("the stop")?;
    let out = sandpen(&["cp", file.to_str().unwrap(), &format!("{WEB}:/var/tmp")]);
    env().cli.expect_ok(&out, "cp into a stopped sandbox")?;
    check(
        text(&out.stderr).contains("starting it for the copy"),
        format!(
            "cp did not say it starts the sandbox: {}",
            text(&out.stderr)
        ),
    )?;
    stopped("the copy in")?;
    let back = host.join("came-back.txt");
    ok(&[
        "cp",
        &format!("{WEB}:/var/tmp/while-stopped.txt"),
        back.to_str().unwrap(),
    ])?;
    check(
        std::fs::read_to_string(&back)? == "written while stopped\n",
        "the file did not survive a stop on the sandbox's disk",
    )?;
    stopped("the copy out")
}

// ---- templates ----

fn ca_pem(name: &str) -> Result<String, Failed> {
    let path: PathBuf = env()
        .cli
        .state
        .path()
        .join("sandpen/sandboxes")
        .join(name)
        .join("ca/ca.pem");
    Ok(std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?)
}

fn save_then_run_image() -> Result<(), Failed> {
    let e = env();
    ok(&["run", "--name", TMPL, "--", "true"])?;
    let mut child = env()
        .cli
        .command(&["secret", "set", "anthropic", TMPL])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(format!("{API_KEY}\n").as_bytes())?;
    env()
        .cli
        .expect_ok(&child.wait_with_output()?, "secret set")?;
    // A tool installed in the sandbox, and a flow label on it.
    root(
        TMPL,
        "printf '#!/bin/sh\\necho tool-v1\\n' > /usr/local/bin/mytool && chmod 755 /usr/local/bin/mytool",
    )?;
    guest(TMPL, "cat secrets/token >/dev/null")?;
    let labels = ok(&["flow", "show", TMPL])?;
    check(
        labels.contains("secret-read"),
        format!("no label: {labels}"),
    )?;
    // A running sandbox cannot be saved.
    refused(&["save", TMPL, &e.image], "stop it first")?;
    ok(&["stop", TMPL])?;
    let t = Instant::now();
    let out = ok(&["save", TMPL, &e.image])?;
    eprintln!(
        "    save: {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        out.trim()
    );
    refused(&["save", TMPL, &e.image], "exists already")?;
    let images = ok(&["image", "ls"])?;
    let row = images
        .lines()
        .find(|l| l.starts_with(&format!("{} ", e.image)))
        .ok_or_else(|| format!("image ls lacks {}: {images}", e.image))?;
    check(row.contains(" default "), format!("no lineage: {row}"))?;
    let json = ok(&["image", "ls", "--json"])?;
    let all: serde_json::Value = serde_json::from_str(&json)?;
    let manifest = all
        .as_array()
        .and_then(|a| a.iter().find(|m| m["name"] == e.image.as_str()))
        .ok_or("no manifest")?;
    check(
        manifest["parent"] == "default" && manifest["saved_from"] == TMPL,
        format!("manifest: {manifest}"),
    )?;
    let parent_size = all
        .as_array()
        .and_then(|a| a.iter().find(|m| m["name"] == "default"))
        .and_then(|m| m["sizes"]["rootfs_image"].as_u64())
        .ok_or("no default image")?;
    let size = manifest["sizes"]["rootfs_image"]
        .as_u64()
        .unwrap_or(u64::MAX);
    check(
        size < parent_size + (512 << 20),
        format!("the saved rootfs is {size} bytes (the parent's {parent_size}): not shrunk"),
    )?;
    // `--image` on an existing sandbox of another image is refused.
    refused(
        &["run", "--name", TMPL, "--image", &e.image, "--", "true"],
        &format!("runs image default, not {}", e.image),
    )?;
    // A new sandbox from it.
    ok(&[
        "run", "--name", FROM_TMPL, "--image", &e.image, "--", "true",
    ])?;
    check(
        guest(FROM_TMPL, "mytool")? == "tool-v1\n",
        "the tool installed before the save is missing",
    )?;
    let found = root(
        FROM_TMPL,
        &format!(
            "grep -rlI -e '{API_KEY}' -e 'PRIVATE KEY' /root /home /etc /usr/local /var/lib 2>/dev/null; true"
        ),
    )?;
    check(
        found.trim().is_empty(),
        format!("secret material in the image: {found}"),
    )?;
    // The old sandbox's CA is gone; the new one's is what the guest trusts.
    // Whole certificates: two sandbox CAs share their subject, so a line
    // of one can be in the other.
    let old = ca_pem(TMPL)?.trim().to_string();
    let new = ca_pem(FROM_TMPL)?.trim().to_string();
    check(old != new, "both sandboxes have the same CA")?;
    let trust = root(
        FROM_TMPL,
        "cat /etc/ssl/certs/ca-certificates.crt /usr/local/share/ca-certificates/sandpen-sandbox-ca.crt",
    )?;
    check(
        !old.is_empty() && !trust.contains(&old),
        "the saved sandbox's CA is still trusted",
    )?;
    check(trust.contains(&new), "the new sandbox's CA is not trusted")?;
    let labels = ok(&["flow", "show", FROM_TMPL])?;
    check(
        labels.contains("no flow labels"),
        format!("labels came along: {labels}"),
    )?;
    let ls = ok(&["ls"])?;
    check(
        ls.lines()
            .any(|l| l.starts_with(FROM_TMPL) && l.contains(&e.image)),
        format!("ls: {ls}"),
    )?;
    // The saved image no longer needs its sandbox.
    ok(&["rm", "-f", TMPL])?;
    ok(&["exec", FROM_TMPL, "--", "true"])?;
    Ok(())
}

type TestFn = fn() -> Result<(), Failed>;

fn main() {
    let args = Arguments {
        test_threads: Some(1),
        ..Arguments::from_args()
    };
    let tests: Vec<(&str, TestFn)> = vec![
        (
            "publish_reaches_a_server_in_the_guest",
            publish_reaches_a_server_in_the_guest,
        ),
        (
            "bad_and_taken_ports_are_clear_errors",
            bad_and_taken_ports_are_clear_errors,
        ),
        ("cp_both_ways", cp_both_ways),
        (
            "cp_refuses_deny_read_and_read_only",
            cp_refuses_deny_read_and_read_only,
        ),
        ("stop_closes_the_port", stop_closes_the_port),
        ("cp_with_a_stopped_sandbox", cp_with_a_stopped_sandbox),
        ("save_then_run_image", save_then_run_image),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, f)| Trial::test(name, f))
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    for name in [WEB, TMPL, FROM_TMPL, "devtaken", "devtaken2", "devbad"] {
        let _ = sandpen(&["rm", "-f", name]);
    }
    let _ = sandpen(&["image", "rm", &env().image]);
    conclusion.exit();
}
