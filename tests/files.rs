//! End-to-end tests of the workspace file server: every file rule attacked
//! from inside a real guest as root, the flow label narrowing egress, and
//! real tools (git, cargo, npm) over the share. One sandbox is shared by all
//! tests but the npm one, which needs Node.js: it has a sandbox of its own on
//! the `test-agents` image (scripts/test builds it). One test needs no VM:
//! the real `sandpen fs-serve` confines itself before it serves.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

use libtest_mimic::{Arguments, Failed, Trial};

mod common;
use common::{check, text, Cli};

const NAME: &str = "files";
/// The sandbox of the npm test, on the image with Node.js.
const NPM_NAME: &str = "files-npm";
const NPM_IMAGE: &str = "test-agents";
/// Content of a host file outside the workspace; must never reach the guest.
const OUTSIDE: &str = "HOST-ONLY-9f31c2";
/// Content of the workspace's deny-read files; must never reach the guest.
const PRIVATE: &str = "PRIVATE-5c1e07\n";
/// The sandbox of the resource caps test (caps lowered for it).
const CAPS_NAME: &str = "files-caps";
/// The workspace's `.sandpen.toml`, as a cloned repository brings it: it
/// narrows (a secret) and widens (a trusted sink, an allow rule).
const WORKSPACE_FILE: &str = "[files]\ndeny_read = [\"private/**\", \"**/vault/**\"]\n\
[flow]\nsecret = [\"secrets/**\", \"**/keys/**\"]\ntrusted_sinks = [\"api.anthropic.com\"]\n\
[[network]]\naction = \"allow\"\ntarget = \"widened.test\"\n";
/// What setup saw before the user trusted the workspace file: `run`'s
/// stderr and a guest's request to `widened.test`.
static BEFORE_TRUST: OnceLock<(String, i32, String)> = OnceLock::new();

struct Env {
    cli: Cli,
    root: tempfile::TempDir,
    http_port: u16,
    server: std::sync::Mutex<Child>,
    /// The host's Rust toolchain, shared read-only for the cargo test.
    toolchain: Option<PathBuf>,
}

const SERVER: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers
    def do_GET(self):
        body = ("hello " + self.headers.get("Host", "") + self.path + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

fn write(path: &Path, content: &str) {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(path, content).unwrap();
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let (root, ws) = common::workspace("sandpen-files-", NAME);
        write(&ws.join(".env"), "API_KEY=sk-live-host\n");
        write(&ws.join("app/.env.local"), "X=1\n");
        write(&ws.join("server.pem"), "-----BEGIN-----\n");
        // The defaults match without regard to case, and cover more names.
        write(&ws.join(".ENV"), "UPPER=sk-upper-1\n");
        write(&ws.join("KEY.PEM"), "-----BEGIN-UPPER-----\n");
        write(
            &ws.join("deploy/.netrc"),
            "machine x login y password netrc-pw\n",
        );
        write(&ws.join("deploy/cert.P12"), "p12-bytes\n");
        write(&ws.join(".git/hooks/pre-commit"), "#!/bin/sh\necho hook\n");
        write(&ws.join(".git/config"), "[core]\n\tbare = false\n");
        write(&ws.join("secrets/token"), "tok-123\n");
        write(&ws.join("README"), "hello\n");
        write(&ws.join("private/x"), PRIVATE);
        write(&ws.join("proj/vault/x"), PRIVATE);
        write(&ws.join("proj/keys/token"), "key-456\n");
        write(&ws.join("public/y"), "public\n");
        write(&ws.join("nested/.git/config"), "[core]\n\tbare = false\n");
        write(&ws.join(".sandpen.toml"), WORKSPACE_FILE);
        let outside = root.path().join("outside.txt");
        write(&outside, OUTSIDE);
        std::os::unix::fs::symlink(&outside, ws.join("hostlink")).unwrap();
        std::os::unix::fs::symlink("../outside.txt", ws.join("rellink")).unwrap();
        let mut server = Command::new("python3")
            .arg("-c")
            .arg(SERVER)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(server.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        Env {
            cli: Cli::new(ws),
            root,
            http_port: line.trim().parse().unwrap(),
            server: std::sync::Mutex::new(server),
            toolchain: common::toolchain(),
        }
    })
}

fn sandpen(args: &[&str]) -> Output {
    env().cli.run(args)
}

fn ok(args: &[&str]) -> Result<String, Failed> {
    env().cli.ok(args)
}

/// Runs `sh` in the guest as root, in the workspace; (exit code, stdout + stderr).
fn guest(sh: &str) -> (i32, String) {
    let out = sandpen(&["exec", "-u", "root", NAME, "--", "sh", "-c", sh]);
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout) + &text(&out.stderr),
    )
}

fn ready() -> Result<(), Failed> {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| setup().map_err(|e| format!("setting up the sandbox: {e:?}")))
        .clone()
        .map_err(Failed::from)
}

fn setup() -> Result<(), Failed> {
    let e = env();
    ok(&["policy", "init", "deny-all"])?;
    let mut args = vec![
        "create".to_string(),
        "--cpus".into(),
        "1".into(),
        "--memory".into(),
        "1G".into(),
        "--add-host".into(),
        "api.anthropic.com:127.0.0.1".into(),
        "--add-host".into(),
        "other.test:127.0.0.1".into(),
        "--add-host".into(),
        "widened.test:127.0.0.1".into(),
    ];
    if let Some(tc) = &e.toolchain {
        args.push("--mount".into());
        args.push(format!("{}:ro", tc.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&args)?;
    ok(&["policy", "allow", "network", "api.anthropic.com", NAME])?;
    ok(&["policy", "allow", "network", "other.test", NAME])?;
    // The sink the flow test reaches over plain HTTP after secret-read: named
    // in the user's own (sandbox) file, since a sink only the workspace file
    // names counts only where the proxy intercepts (docs/egress.md).
    let own = e
        .cli
        .state
        .path()
        .join(format!("sandpen/sandboxes/{NAME}/policy.toml"));
    let mut policy = std::fs::read_to_string(&own)?;
    policy.push_str("\n[flow]\ntrusted_sinks = [\"api.anthropic.com\"]\n");
    std::fs::write(&own, policy)?;
    // `run` starts it and says what of the workspace file it left out; the
    // guest cannot reach what only the untrusted file allows. Then the user
    // trusts it, and the running sandbox applies it at once.
    let out = sandpen(&["run", "--", "true"]);
    let stderr = text(&out.stderr);
    env().cli.expect_ok(&out, "sandpen run -- true")?;
    let (code, curl) = guest(&format!(
        "curl -sS -m 10 --noproxy '*' http://widened.test:{}/x",
        e.http_port
    ));
    let _ = BEFORE_TRUST.set((stderr, code, curl));
    ok(&["policy", "trust", NAME])?;
    Ok(())
}

fn file_log() -> Result<String, Failed> {
    ok(&[
        "policy", "log", NAME, "--type", "file", "--json", "--limit", "1000",
    ])
}

fn deny_read_hides_secrets_everywhere() -> Result<(), Failed> {
    ready()?;
    let (code, out) = guest("cat .env");
    check(
        code != 0 && out.contains("No such file"),
        format!("cat .env: {code} {out}"),
    )?;
    let (_, out) = guest("ls -a; ls -a app");
    check(
        !out.contains(".env") && !out.contains("server.pem") && out.contains("README"),
        format!("ls -a lists a hidden file: {out}"),
    )?;
    let (_, out) = guest("find / -name '.env*' 2>/dev/null; find / -name '*.pem' -path \"$PWD/*\" 2>/dev/null; echo done");
    check(
        out.trim() == "done",
        format!("find found hidden files: {out}"),
    )?;
    let (code, out) = guest("stat .env; getfattr -n user.x .env; mv README .env");
    check(
        code != 0 && !out.contains("sk-live"),
        format!("stat/xattr/rename-over: {code} {out}"),
    )?;
    // Creating something at a hidden path is refused, and the host file is intact.
    let (code, _) = guest("echo stolen > .env");
    check(code != 0, "writing over .env succeeded")?;
    let host = std::fs::read_to_string(env().cli.ws.join(".env")).unwrap_or_default();
    check(
        host == "API_KEY=sk-live-host\n",
        format!("host .env changed: {host:?}"),
    )?;
    check(
        std::fs::read_to_string(env().cli.ws.join("README")).is_ok(),
        "README was moved",
    )?;
    let log = file_log()?;
    check(
        log.contains("\"denied\"") && log.contains("/.env") && log.contains("ENOENT"),
        format!("no denied record for .env in the file log:\n{log}"),
    )
}

fn read_only_paths_refuse_every_change() -> Result<(), Failed> {
    ready()?;
    let (code, out) = guest("echo x > .git/hooks/pre-commit");
    check(
        code != 0 && out.contains("Read-only file system"),
        format!("write hook: {code} {out}"),
    )?;
    let (code, out) = guest("chmod +x .git/hooks/pre-commit");
    check(
        code != 0 && out.contains("Read-only file system"),
        format!("chmod hook: {code} {out}"),
    )?;
    let (code, out) = guest("rm .git/config");
    check(
        code != 0 && out.contains("Read-only file system"),
        format!("rm config: {code} {out}"),
    )?;
    for cmd in [
        "touch .git/hooks/post-checkout",
        "ln -s /bin/sh .git/hooks/x",
        "mkfifo .git/hooks/f",
        "cp README .git/config",
    ] {
        let (code, out) = guest(cmd);
        check(
            code != 0 && out.contains("Read-only file system"),
            format!("{cmd}: {code} {out}"),
        )?;
    }
    // Moving the folder out (a copy, then removing the original) and back.
    let (code, out) = guest("mv .git/hooks /tmp/ ; mv /tmp/hooks/pre-commit .git/hooks/pre-commit");
    check(code != 0, format!("mv out and back succeeded: {out}"))?;
    let (code, out) = guest("mv .git/hooks .git/h2; mv .git .git2");
    check(code != 0, format!("renaming a protected folder: {out}"))?;
    let hook =
        std::fs::read_to_string(env().cli.ws.join(".git/hooks/pre-commit")).unwrap_or_default();
    check(
        hook == "#!/bin/sh\necho hook\n",
        format!("the host's hook changed: {hook:?}"),
    )?;
    check(
        !env().cli.ws.join(".git/hooks/post-checkout").exists()
            && env().cli.ws.join(".git/config").exists(),
        "host .git changed",
    )?;
    // Ordinary files stay writable.
    let (code, out) = guest("echo ok > notes.txt && cat notes.txt");
    check(
        code == 0 && out.contains("ok"),
        format!("normal write: {out}"),
    )
}

fn no_escape_from_the_share() -> Result<(), Failed> {
    ready()?;
    let outside = env().root.path().join("outside.txt");
    let (_, out) = guest(&format!(
        "ln -s {} leak; cat leak; cat hostlink; cat rellink; cat hostlink/../outside.txt",
        outside.display()
    ));
    check(
        !out.contains(OUTSIDE),
        format!("a host file outside the share was read: {out}"),
    )?;
    let (code, out) = guest(&format!(
        "ln /etc/passwd hl1; ln {} hl2; ln hostlink hl3 && cat hl3",
        outside.display()
    ));
    check(
        code != 0
            && !out.contains(OUTSIDE)
            && !env().cli.ws.join("hl1").exists()
            && !env().cli.ws.join("hl2").exists(),
        format!("a hard link to outside: {code} {out}"),
    )?;
    // The host's file is untouched by anything the guest did with the links.
    let (_, _) = guest("echo overwritten > hostlink; echo overwritten > rellink");
    let host = std::fs::read_to_string(&outside).unwrap_or_default();
    check(host == OUTSIDE, format!("outside file changed: {host:?}"))?;
    // Every server of this sandbox (the workspace, the :ro toolchain) is
    // confined, so every test here runs against confined servers.
    let log = env()
        .cli
        .state
        .path()
        .join("sandpen/sandboxes")
        .join(NAME)
        .join("logs/fs.log");
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    let shares = 1 + usize::from(env().toolchain.is_some());
    check(
        log.matches("confined: ").count() >= shares && !log.contains("no seccomp"),
        format!("the file servers did not all confine themselves:\n{log}"),
    )
}

fn flow_label_narrows_egress_until_reset() -> Result<(), Failed> {
    ready()?;
    let port = env().http_port;
    let curl = |host: &str| {
        guest(&format!(
            "curl -sS -m 10 --noproxy '*' http://{host}:{port}/x"
        ))
    };
    let (code, out) = curl("other.test");
    check(
        code == 0 && out.contains("hello"),
        format!("before: {code} {out}"),
    )?;
    // A connection opened before the read, kept alive across it: its next
    // request is decided again, under the label.
    let (code, out) = guest(&format!(
        "bash -c 'exec 3<>/dev/tcp/other.test/{port} || exit 9
         printf \"GET /open-before HTTP/1.1\\r\\nHost: other.test:{port}\\r\\n\\r\\n\" >&3
         while read -r line <&3; do case $line in hello*) echo \"$line\"; break;; esac; done
         cat secrets/token
         printf \"GET /open-after HTTP/1.1\\r\\nHost: other.test:{port}\\r\\n\\r\\n\" >&3
         timeout 10 cat <&3'"
    ));
    check(
        code == 0 && out.contains("tok-123"),
        format!("reading the secret: {code} {out}"),
    )?;
    check(
        out.contains("/open-before")
            // The server's echo; the proxy's 403 page quotes the request line.
            && !out.contains(&format!("hello other.test:{port}/open-after"))
            && out.contains("403")
            && out.contains("policy-changed"),
        format!("the open connection after the read: {out}"),
    )?;
    let (code, out) = curl("api.anthropic.com");
    check(
        code == 0 && out.contains("hello"),
        format!("trusted sink after the read: {code} {out}"),
    )?;
    // Refused with the proxy's 403 page, which says why (docs/egress.md).
    let (_, out) = curl("other.test");
    check(
        !out.contains("hello") && out.contains("was refused") && out.contains("flow: secret-read"),
        format!("other.test still reachable after secret-read: {out}"),
    )?;
    let log = ok(&["policy", "log", NAME, "--json", "--limit", "1000"])?;
    let want = "flow: secret-read at";
    let denied = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .rev()
        .find(|r| r["host"] == "other.test")
        .ok_or_else(|| Failed::from(format!("no record for other.test:\n{log}")))?;
    let reason = denied["reason"].as_str().unwrap_or_default();
    check(
        denied["decision"] == "deny"
            && reason.starts_with(want)
            && reason.ends_with("/secrets/token"),
        format!("the denial's reason: {denied}"),
    )?;
    let shown = ok(&["flow", "show", NAME])?;
    check(
        shown.contains("secret-read") && shown.contains("secrets/token"),
        format!("flow show: {shown}"),
    )?;
    // Nothing is in flow.trusted here, so the first answer set untrusted-input.
    check(
        shown.contains("untrusted-input") && shown.contains(&format!("other.test:{port}")),
        format!("flow show without untrusted-input: {shown}"),
    )?;
    let flog = file_log()?;
    check(
        flog.contains("secret-read"),
        format!("no label record in the file log:\n{flog}"),
    )?;
    // Learn mode lets it through and logs what enforce would have done.
    ok(&["policy", "mode", "learn", NAME])?;
    let (code, out) = curl("other.test");
    ok(&["policy", "mode", "enforce", NAME])?;
    check(
        code == 0 && out.contains("hello"),
        format!("learn mode still denied: {out}"),
    )?;
    let log = ok(&["policy", "log", NAME, "--type", "network", "--json"])?;
    let last = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .rev()
        .find(|r| r["host"] == "other.test")
        .ok_or_else(|| Failed::from("no record in learn mode"))?;
    check(
        last["decision"] == "would-deny"
            && last["reason"]
                .as_str()
                .unwrap_or_default()
                .starts_with(want),
        format!("learn mode record: {last}"),
    )?;
    // The label outlives a stop and start.
    ok(&["stop", NAME])?;
    ok(&["start", NAME])?;
    let (_, out) = curl("other.test");
    check(
        !out.contains("hello") && out.contains("was refused"),
        format!("after a restart the label was gone: {out}"),
    )?;
    ok(&["flow", "reset", NAME])?;
    let (code, out) = curl("other.test");
    check(
        code == 0 && out.contains("hello"),
        format!("after reset: {code} {out}"),
    )
}

fn git_clone_commit_checkout_on_the_share() -> Result<(), Failed> {
    ready()?;
    // A real repository: this project's own history, cloned bare onto the share.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let bare = env().cli.ws.join("src.git");
    let st = Command::new("git")
        .args(["clone", "-q", "--bare", "--no-local"])
        .arg(&src)
        .arg(&bare)
        .status()
        .expect("git");
    check(st.success(), "cloning the test repository on the host")?;
    // The working clone is made on the host: a clone in the guest would
    // write `.git/config`, which is read-only (docs/files.md). In the guest:
    // branch, commit on the branch, back to the first branch (the working
    // tree is rewritten both ways), stash, a commit on each branch and a
    // rebase, then check the repository.
    let st = Command::new("git")
        .args(["clone", "-q"])
        .arg(&bare)
        .arg(env().cli.ws.join("work"))
        .status()
        .expect("git");
    check(st.success(), "cloning the working copy on the host")?;
    let (code, out) = guest(
        "set -e; git config --global --add safe.directory '*'; \
         export GIT_AUTHOR_NAME=a GIT_AUTHOR_EMAIL=a@b GIT_COMMITTER_NAME=a GIT_COMMITTER_EMAIL=a@b; \
         cd work; main=$(git branch --show-current); \
         git checkout -q -b t; echo change >> README.md; mkdir -p new/dir; echo x > new/dir/f; \
         git add -A; git commit -qm change; \
         git checkout -q -; test ! -e new/dir/f; git checkout -q t; test -f new/dir/f; \
         echo wip >> README.md; git stash -q; test -z \"$(git status --porcelain)\"; \
         git stash pop -q; git commit -qam wip; \
         git checkout -q \"$main\"; echo other > other.txt; git add other.txt; git commit -qm other; \
         git checkout -q t; git rebase -q \"$main\"; test -f other.txt; test -f new/dir/f; \
         git branch -q gone; git branch -q -D gone; \
         test -z \"$(git status --porcelain)\"; git fsck --no-progress; echo GIT-OK",
    );
    check(
        code == 0 && out.contains("GIT-OK"),
        format!("git: {code} {out}"),
    )
}

fn cargo_build_on_the_share() -> Result<(), Failed> {
    ready()?;
    let Some(tc) = env().toolchain.clone() else {
        return Err("no host Rust toolchain (rustup) to share into the guest".into());
    };
    let dir = env().cli.ws.join("smallcrate");
    write(
        &dir.join("Cargo.toml"),
        "[package]\nname = \"smallcrate\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[lib]\npath = \"src/lib.rs\"\n",
    );
    write(
        &dir.join("src/lib.rs"),
        "pub mod m;\n/// Sum.\npub fn add(a: u64, b: u64) -> u64 { a + m::twice(b) - b }\n",
    );
    write(
        &dir.join("src/m.rs"),
        "pub fn twice(x: u64) -> u64 { x * 2 }\n",
    );
    // A library needs no linker, which the guest image does not have.
    let (code, out) = guest(&format!(
        "cd smallcrate && PATH={}/bin:$PATH CARGO_HOME=/tmp/cargo-home cargo build --offline 2>&1 && ls target/debug/libsmallcrate.rlib",
        tc.display()
    ));
    check(
        code == 0 && out.contains("libsmallcrate.rlib"),
        format!("cargo build: {code} {out}"),
    )?;
    check(
        env()
            .cli
            .ws
            .join("smallcrate/target/debug/libsmallcrate.rlib")
            .is_file(),
        "the build output is not on the host",
    )
}

/// The npm test's own sandbox (`NPM_NAME` on `NPM_IMAGE`), its workspace
/// beside the main one; created and started on first use.
fn npm_sandbox() -> Result<PathBuf, Failed> {
    static READY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    READY
        .get_or_init(|| {
            (|| -> Result<PathBuf, Failed> {
                let images = ok(&["image", "ls", "--json"])?;
                check(
                    images.contains(&format!("\"{NPM_IMAGE}\"")),
                    format!(
                        "no {NPM_IMAGE} image in {}: scripts/test builds it \
                         (sandpen image build --agent claude --agent codex --agent gemini --name {NPM_IMAGE})",
                        env().cli.data.display()
                    ),
                )?;
                let ws = env().root.path().join(NPM_NAME);
                std::fs::create_dir_all(&ws)?;
                let ws = ws.canonicalize()?;
                let ws_arg = ws.display().to_string();
                ok(&[
                    "create", "--name", NPM_NAME, "--image", NPM_IMAGE, "--cpus", "1",
                    "--memory", "1G", "--docker", "off", &ws_arg,
                ])?;
                ok(&["start", NPM_NAME])?;
                Ok(ws)
            })()
            .map_err(|e| format!("setting up the npm sandbox: {e:?}"))
        })
        .clone()
        .map_err(Failed::from)
}

/// A local package set that makes npm do on the share what it does on a
/// disk: nested folders, a scoped package, a bundled dependency (a nested
/// `node_modules` beside a hoisted one of another version), bin links
/// (symlinks in `node_modules/.bin`, targets made executable), a lifecycle
/// script that writes, renames and chmods, and npm's own atomic writes
/// (a temporary file renamed over `package-lock.json`).
fn write_npm_packages(dir: &Path) {
    let files: &[(&str, &str)] = &[
        (
            "src/alpha/package.json",
            r#"{"name":"alpha","version":"1.0.0","main":"lib/index.js","bin":{"alpha":"bin/alpha.js"}}"#,
        ),
        (
            "src/alpha/bin/alpha.js",
            "#!/usr/bin/env node\nconsole.log('alpha-cli ' + require('../lib/index.js').v);\n",
        ),
        (
            "src/alpha/lib/index.js",
            "module.exports = { v: require('./deep/er/most.js') };\n",
        ),
        ("src/alpha/lib/deep/er/most.js", "module.exports = 'alpha-deep';\n"),
        (
            "src/beta/package.json",
            r#"{"name":"beta","version":"1.0.0","main":"index.js","dependencies":{"gamma":"1.0.0"},"bundleDependencies":["gamma"],"bin":{"beta-one":"one.js","beta-two":"two.js"}}"#,
        ),
        ("src/beta/index.js", "module.exports = 'beta+' + require('gamma');\n"),
        ("src/beta/one.js", "#!/usr/bin/env node\nconsole.log('one');\n"),
        ("src/beta/two.js", "#!/usr/bin/env node\nconsole.log('two');\n"),
        (
            "src/beta/node_modules/gamma/package.json",
            r#"{"name":"gamma","version":"1.0.0","main":"index.js"}"#,
        ),
        ("src/beta/node_modules/gamma/index.js", "module.exports = 'gamma1';\n"),
        (
            "src/gamma/package.json",
            r#"{"name":"gamma","version":"2.0.0","main":"index.js"}"#,
        ),
        ("src/gamma/index.js", "module.exports = 'gamma2';\n"),
        (
            "src/delta/package.json",
            r#"{"name":"@sp/delta","version":"1.0.0","main":"index.js","scripts":{"postinstall":"node build.js"}}"#,
        ),
        (
            "src/delta/build.js",
            "const fs = require('fs');\nfs.mkdirSync('out/a/b', { recursive: true });\n\
             fs.writeFileSync('out/a/b/built.tmp', 'built');\n\
             fs.renameSync('out/a/b/built.tmp', 'out/built.txt');\n\
             fs.chmodSync('out/built.txt', 0o755);\n",
        ),
        (
            "src/delta/index.js",
            "module.exports = 'delta:' + require('fs').readFileSync(__dirname + '/out/built.txt', 'utf8');\n",
        ),
        ("app/package.json", r#"{"name":"app","version":"1.0.0","private":true}"#),
    ];
    for (rel, content) in files {
        write(&dir.join(rel), content);
    }
}

fn npm_ci_on_the_share() -> Result<(), Failed> {
    let ws = npm_sandbox()?;
    let dir = ws.join("npm");
    write_npm_packages(&dir);
    // In the guest, as the sandbox user, offline (the guest has no way to a
    // registry here, and needs none): pack the packages into tarballs on the
    // share, `npm install` them (which writes the lock file), then `npm ci`,
    // which deletes that node_modules and installs again from the lock.
    let script = format!(
        "set -e; export npm_config_update_notifier=false npm_config_fund=false npm_config_audit=false; \
         cd {dir}; mkdir -p pkgs; cd pkgs; \
         npm pack --offline --silent ../src/alpha ../src/beta ../src/gamma ../src/delta; \
         cd ../app; \
         npm install --offline --no-audit --no-fund ../pkgs/alpha-1.0.0.tgz ../pkgs/beta-1.0.0.tgz ../pkgs/gamma-2.0.0.tgz ../pkgs/sp-delta-1.0.0.tgz; \
         test -f package-lock.json; touch node_modules/STALE; \
         npm ci --offline --no-audit --no-fund; \
         test ! -e node_modules/STALE; \
         node -e \"const a = require('assert'); \
            a.strictEqual(require('alpha').v, 'alpha-deep'); \
            a.strictEqual(require('beta'), 'beta+gamma1'); \
            a.strictEqual(require('gamma'), 'gamma2'); \
            a.strictEqual(require('@sp/delta'), 'delta:built'); \
            console.log('REQUIRE-OK')\"; \
         ./node_modules/.bin/alpha; ./node_modules/.bin/beta-two; \
         npm ls --offline >/dev/null; echo NPM-OK",
        dir = dir.display()
    );
    let out = sandpen(&["exec", NPM_NAME, "--", "sh", "-c", &script]);
    let all = text(&out.stdout) + &text(&out.stderr);
    check(
        out.status.success()
            && all.contains("REQUIRE-OK")
            && all.contains("alpha-cli alpha-deep")
            && all.contains("NPM-OK"),
        format!("npm ci on the share: {:?}\n{all}", out.status.code()),
    )?;
    // What npm left on the host, seen from the host.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let nm = dir.join("app/node_modules");
    let link = std::fs::symlink_metadata(nm.join(".bin/alpha"))?;
    check(
        link.file_type().is_symlink(),
        "node_modules/.bin/alpha is not a symlink",
    )?;
    let target = std::fs::read_link(nm.join(".bin/alpha"))?;
    check(
        target == Path::new("../alpha/bin/alpha.js"),
        format!("bin link target {}", target.display()),
    )?;
    for exe in [
        "alpha/bin/alpha.js",
        "beta/two.js",
        "@sp/delta/out/built.txt",
    ] {
        let mode = std::fs::metadata(nm.join(exe))?.permissions().mode();
        check(
            mode & 0o111 != 0,
            format!("{exe} is not executable: {mode:o}"),
        )?;
    }
    for (rel, want) in [
        ("gamma/package.json", "\"2.0.0\""),
        ("beta/node_modules/gamma/package.json", "\"1.0.0\""),
    ] {
        let text = std::fs::read_to_string(nm.join(rel))?;
        check(text.contains(want), format!("{rel}: {text}"))?;
    }
    check(
        !nm.join("@sp/delta/out/a/b/built.tmp").exists(),
        "the renamed file is still there",
    )?;
    // Files the guest user made belong to the host user.
    // SAFETY: getuid has no arguments and cannot fail.
    let me = unsafe { libc::getuid() };
    let owner = std::fs::metadata(nm.join("alpha/lib/deep/er/most.js"))?.uid();
    check(owner == me, format!("owned by {owner}, not {me}"))
}

/// The real `sandpen fs-serve`, started as the supervisor starts it,
/// confines itself before it accepts QEMU: no_new_privs, a seccomp filter,
/// Landlock at the kernel's ABI, and (as root) only the capabilities it
/// needs. No VM: the server waits for QEMU already confined.
fn fs_serve_confines_itself_before_serving() -> Result<(), Failed> {
    let tmp = tempfile::tempdir()?;
    let t = tmp.path();
    std::fs::create_dir_all(t.join("share"))?;
    let sock = t.join("fs.sock");
    let log = std::fs::File::create(t.join("fs.log"))?;
    let mut child = Command::new(&env().cli.bin)
        .arg("fs-serve")
        .arg("--socket")
        .arg(&sock)
        .arg("--root")
        .arg(t.join("share"))
        .args([
            "--guest-uid",
            "1000",
            "--guest-gid",
            "1000",
            "--sandbox",
            "t",
        ])
        .arg("--files-log")
        .arg(t.join("files.jsonl"))
        .arg("--flow-state")
        .arg(t.join("state/flow/flow.json"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let result = (|| -> Result<(), Failed> {
        let start = std::time::Instant::now();
        let mut status = String::new();
        // Listening comes before confining, so wait for the log line.
        while start.elapsed() < std::time::Duration::from_secs(10) {
            let log = std::fs::read_to_string(t.join("fs.log"))?;
            if log.contains("confined") || log.contains("ERROR") {
                status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let log = std::fs::read_to_string(t.join("fs.log"))?;
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        check(
            field("NoNewPrivs:") == "1",
            format!("NoNewPrivs: {status}\n{log}"),
        )?;
        check(
            field("Seccomp:") == "2",
            format!("Seccomp: {status}\n{log}"),
        )?;
        // SAFETY: with a null attribute, size 0 and the VERSION flag,
        // landlock_create_ruleset reads and writes no memory.
        let abi = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<u8>(),
                0usize,
                1u32,
            )
        };
        if abi >= 2 {
            check(
                log.contains(&format!("confined: landlock ABI {}", abi.min(10))),
                format!("the kernel has Landlock ABI {abi}; the server logged:\n{log}"),
            )?;
        }
        // SAFETY: geteuid has no arguments and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            // CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID SETGID SETUID.
            check(
                field("CapPrm:") == "00000000000000df" && field("CapBnd:") == "0000000000000000",
                format!("capabilities as root: {status}"),
            )?;
        }
        check(
            t.join("state/flow").is_dir(),
            "the flow label folder was not made",
        )
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn extra_mount_is_read_only() -> Result<(), Failed> {
    ready()?;
    let Some(tc) = env().toolchain.clone() else {
        return Err("no host Rust toolchain to mount".into());
    };
    let (code, out) = guest(&format!("touch {}/x", tc.display()));
    check(
        code != 0 && out.contains("Read-only file system"),
        format!("write to a :ro mount: {code} {out}"),
    )
}

/// `mv private p2 && cat p2/x`, and the same for every kind of rule, from
/// guest root: the folder above a rule's matches cannot be renamed out from
/// under it (a hidden or secret one is `EXDEV`, so `mv` copies file by file
/// through the rules; a read-only one is `EROFS`), nor swapped with an
/// ordinary one, nor a secret linked to an ordinary name.
fn renaming_a_folder_never_escapes_a_rule() -> Result<(), Failed> {
    ready()?;
    let ws = env().cli.ws.clone();
    let secret = PRIVATE.trim();
    for (attack, what) in [
        ("mv private p2; cat p2/x; ls -a p2", "deny_read, parent"),
        ("mv proj/vault proj/v2; cat proj/v2/x", "deny_read **/, parent"),
        ("mv proj proj2; cat proj2/vault/x; mv proj2 proj", "deny_read **/, grandparent"),
        ("perl -e 'my ($a, $b) = (\"private\", \"public\"); syscall(316, -100, $a, -100, $b, 2) == 0 or die \"exchange: $!\\n\"'; cat public/x", "RENAME_EXCHANGE"),
        ("perl -e 'my ($a, $b) = (\"public\", \"private\"); syscall(316, -100, $a, -100, $b, 2) == 0 or die \"exchange: $!\\n\"'; cat public/x", "RENAME_EXCHANGE, the other way"),
    ] {
        let (_, out) = guest(attack);
        check(
            !out.contains(secret),
            format!("{what}: `{attack}` read a hidden file: {out}"),
        )?;
    }
    let (_, out) = guest("perl -e 'my ($a, $b) = (\"private\", \"public\"); syscall(316, -100, $a, -100, $b, 2) == 0 or die \"exchange: $!\\n\"'");
    check(
        out.contains("Invalid cross-device link"),
        format!("RENAME_EXCHANGE of a hidden and an ordinary folder: {out}"),
    )?;
    let (_, out) = guest(
        "perl -e 'my ($a, $b) = (\"public\", \"p3\"); syscall(316, -100, $a, -100, $b, 4) == 0 or die \"whiteout: $!\\n\"'",
    );
    check(
        out.contains("Operation not permitted"),
        format!("RENAME_WHITEOUT: {out}"),
    )?;
    for p in ["private/x", "proj/vault/x"] {
        check(
            std::fs::read_to_string(ws.join(p)).unwrap_or_default() == PRIVATE,
            format!("{p} moved or changed on the host"),
        )?;
    }
    // A read-only rule written `**/.git/config`: move the folder away,
    // edit, move back.
    let (code, out) = guest(
        "mv nested/.git nested/g && echo '[core]' >> nested/g/config; mv nested/g nested/.git",
    );
    check(
        code != 0 && out.contains("Read-only file system"),
        format!("moving a nested .git away: {code} {out}"),
    )?;
    check(
        std::fs::read_to_string(ws.join("nested/.git/config")).unwrap_or_default()
            == "[core]\n\tbare = false\n",
        "nested/.git/config changed",
    )?;
    // Moving the repository as a whole keeps its rules.
    let (code, out) = guest("mv nested n2 && echo x >> n2/.git/config; mv n2 nested");
    check(
        out.contains("Read-only file system") && ws.join("nested/.git/config").is_file(),
        format!("the moved repository's config: {code} {out}"),
    )?;
    // A secret folder: `mv` falls back to copying, which reads the secret
    // through the rules and sets the label.
    ok(&["flow", "reset", NAME])?;
    let (code, out) = guest("ln proj/keys/token proj/t");
    check(
        code != 0 && out.contains("Invalid cross-device link") && !ws.join("proj/t").exists(),
        format!("a hard link to a secret: {code} {out}"),
    )?;
    let shown = ok(&["flow", "show", NAME])?;
    check(
        !shown.contains("secret-read"),
        format!("a refused link set a label: {shown}"),
    )?;
    let (code, out) = guest("mv proj/keys proj/k2 && cat proj/k2/token");
    let shown = ok(&["flow", "show", NAME])?;
    // Put it back as it was for the other tests.
    if ws.join("proj/k2").exists() && !ws.join("proj/keys").exists() {
        std::fs::rename(ws.join("proj/k2"), ws.join("proj/keys"))?;
    }
    ok(&["flow", "reset", NAME])?;
    check(
        !out.contains("key-456") || (shown.contains("secret-read") && shown.contains("keys/token")),
        format!("a secret read under a new name without the label: {code} {out}\n{shown}"),
    )?;
    let log = file_log()?;
    check(
        log.contains("\"op\":\"rename\"") && log.contains("EXDEV") && log.contains("private/**"),
        format!("no rename denial in the file log:\n{log}"),
    )
}

fn host_git(dir: &Path, args: &[&str], home: &Path) -> Result<Output, Failed> {
    Ok(Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "h")
        .env("GIT_AUTHOR_EMAIL", "h@h")
        .env("GIT_COMMITTER_NAME", "h")
        .env("GIT_COMMITTER_EMAIL", "h@h")
        .output()?)
}

fn host_git_ok(dir: &Path, args: &[&str], home: &Path) -> Result<(), Failed> {
    let out = host_git(dir, args, home)?;
    check(
        out.status.success(),
        format!("git {args:?} in {}: {}", dir.display(), text(&out.stderr)),
    )
}

/// Every way the guest could make the host's git run a command of its
/// choosing (`core.fsmonitor` in a config git reads, hooks), tried from guest
/// root, then a real `git status` on the host that must not run it.
fn git_metadata_cannot_make_the_host_run_anything() -> Result<(), Failed> {
    ready()?;
    let ws = env().cli.ws.clone();
    let scratch = tempfile::tempdir()?;
    let home = scratch.path().join("home");
    std::fs::create_dir_all(&home)?;
    let mark = scratch.path().join("ran");
    let repo = ws.join("gitrepo");
    let sub = repo.join("sub");
    let subsrc = scratch.path().join("subsrc");
    for d in [&repo, &sub, &subsrc] {
        std::fs::create_dir_all(d)?;
        host_git_ok(d, &["init", "-q"], &home)?;
        write(&d.join("README"), "r\n");
        host_git_ok(d, &["add", "README"], &home)?;
        host_git_ok(d, &["commit", "-qm", "init"], &home)?;
    }
    host_git_ok(
        &repo,
        &[
            "-c",
            "protocol.file.allow=always",
            "submodule",
            "add",
            "-q",
            &subsrc.display().to_string(),
            "mod",
        ],
        &home,
    )?;
    host_git_ok(&repo, &["commit", "-qm", "mod"], &home)?;
    check(
        repo.join(".git/modules/mod/config").is_file(),
        "no .git/modules/mod/config after submodule add",
    )?;
    // Missing on the host, for the guest to try to make them symlinks.
    std::fs::remove_dir_all(repo.join(".git/hooks"))?;
    std::fs::remove_dir_all(sub.join(".git/hooks"))?;
    let before: Vec<(PathBuf, String)> = [
        repo.join(".git/config"),
        sub.join(".git/config"),
        repo.join(".git/modules/mod/config"),
        repo.join("mod/.git"),
    ]
    .into_iter()
    .map(|p| {
        let t = std::fs::read_to_string(&p).unwrap_or_default();
        (p, t)
    })
    .collect();
    // The command the guest wants run: an executable in the workspace
    // (the same path on the host) that touches a file outside it.
    let evil = ws.join("evil.sh");
    write(&evil, &format!("#!/bin/sh\ntouch {}\n", mark.display()));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&evil, std::fs::Permissions::from_mode(0o755))?;
    // Control: on this host, git does run a configured fsmonitor.
    let control = scratch.path().join("control");
    std::fs::create_dir_all(&control)?;
    host_git_ok(&control, &["init", "-q"], &home)?;
    host_git_ok(
        &control,
        &["config", "core.fsmonitor", &evil.display().to_string()],
        &home,
    )?;
    let _ = host_git(&control, &["status"], &home)?;
    check(
        mark.exists(),
        "control: git on this host did not run a configured core.fsmonitor",
    )?;
    std::fs::remove_file(&mark)?;

    let e = evil.display();
    let cfg = format!("printf '[core]\\n\\tfsmonitor = {e}\\n'");
    let attacks = [
        format!("git -C gitrepo config core.fsmonitor {e}"),
        format!("{cfg} >> gitrepo/.git/config"),
        format!("{cfg} > gitrepo/.git/config.worktree"),
        format!("mkdir -p evilcommon && {cfg} > evilcommon/config && echo ../../evilcommon > gitrepo/.git/commondir"),
        format!("git -C gitrepo/mod config core.fsmonitor {e}"),
        format!("{cfg} >> gitrepo/.git/modules/mod/config"),
        "mkdir -p gitrepo/.git/modules/mod/hooks && echo x > gitrepo/.git/modules/mod/hooks/post-checkout".into(),
        format!("git -C gitrepo/sub config core.fsmonitor {e}"),
        format!("{cfg} >> gitrepo/sub/.git/config"),
        "mkdir -p gitrepo/.git/worktrees/w".into(),
        "echo ../../evilobjects > gitrepo/.git/objects/info/alternates".into(),
        "mkdir -p evilhooks && ln -s ../../evilhooks gitrepo/.git/hooks".into(),
        "ln -s ../../../evilhooks gitrepo/sub/.git/hooks".into(),
        "mkdir -p gitrepo/.git/hooks && ln -s ../../../evil.sh gitrepo/.git/hooks/post-checkout".into(),
        format!("mkdir -p gitless && git init -q --bare gitless/.g && git -C gitless/.g config core.fsmonitor {e} && printf 'gitdir: .g\\n' > gitless/.git"),
        "printf 'gitdir: .g\\n' > gitless/gf && mv gitless/gf gitless/.git".into(),
        "ln -s .g gitless/.git".into(),
        // The submodule's gitfile pointed at the guest's repository.
        "printf 'gitdir: ../../gitless/.g\\n' > gitrepo/mod/.git".into(),
        "rm gitrepo/mod/.git".into(),
        format!("mkdir -p gitrepo/x && {cfg} > gitrepo/x/config && mv gitrepo/x gitrepo/sub/.git/modules"),
    ];
    for attack in &attacks {
        let (code, out) = guest(attack);
        check(code != 0, format!("the guest managed `{attack}`: {out}"))?;
    }
    for (path, text) in &before {
        check(
            std::fs::read_to_string(path).unwrap_or_default() == *text,
            format!("{} changed on the host", path.display()),
        )?;
    }
    for p in [
        "gitrepo/.git/commondir",
        "gitrepo/.git/config.worktree",
        "gitrepo/.git/objects/info/alternates",
        "gitrepo/.git/worktrees/w",
        "gitrepo/sub/.git/hooks",
        "gitrepo/sub/.git/modules",
        "gitless/.git",
    ] {
        check(
            std::fs::symlink_metadata(ws.join(p)).is_err(),
            format!("{p} exists on the host"),
        )?;
    }
    // The guest may make the missing hooks folder, but it stays an empty
    // folder.
    let hooks = repo.join(".git/hooks");
    if let Ok(meta) = std::fs::symlink_metadata(&hooks) {
        check(
            meta.is_dir() && std::fs::read_dir(&hooks)?.next().is_none(),
            "gitrepo/.git/hooks is not an empty folder",
        )?;
    }
    // The user's git on the host, in each repository.
    for dir in [
        repo.clone(),
        sub.clone(),
        repo.join("mod"),
        ws.join("gitless"),
    ] {
        let _ = host_git(&dir, &["status"], &home)?;
    }
    check(
        !mark.exists(),
        "the host's git status ran the guest's command",
    )?;
    // And the ordinary work still goes on in the guest, in the nested
    // repository and in the submodule.
    let (code, out) = guest(
        "set -e; git config --global --add safe.directory '*'; \
         export GIT_AUTHOR_NAME=a GIT_AUTHOR_EMAIL=a@b GIT_COMMITTER_NAME=a GIT_COMMITTER_EMAIL=a@b; \
         cd gitrepo/sub; echo more >> README; git commit -qam more; git checkout -q -b b2; \
         cd ../mod; echo m >> README; git add README; git stash -q; git stash drop -q; echo GIT-OK",
    );
    check(
        code == 0 && out.contains("GIT-OK"),
        format!("ordinary git in the nested repository and the submodule: {code} {out}"),
    )
}

/// A guest that opens files without end, or looks up files and never
/// forgets them, is refused past the server's caps (lowered for this
/// sandbox so the test reaches them quickly) and the server stays up.
fn file_server_caps_hold_and_it_stays_up() -> Result<(), Failed> {
    let ws = env().root.path().join(CAPS_NAME);
    std::fs::create_dir_all(ws.join("many"))?;
    for i in 0..600 {
        write(&ws.join(format!("many/f{i}")), "x");
    }
    write(&ws.join("README"), "still here\n");
    let ws = ws.canonicalize()?;
    let ws_arg = ws.display().to_string();
    ok(&[
        "create", "--name", CAPS_NAME, "--cpus", "1", "--memory", "1G", "--docker", "off", &ws_arg,
    ])?;
    let out = env()
        .cli
        .command(&["start", CAPS_NAME])
        .env("SANDPEN_FS_MAX_HANDLES", "256")
        .env("SANDPEN_FS_MAX_INODES", "512")
        .output()?;
    env().cli.expect_ok(&out, "starting the caps sandbox")?;
    let run = |sh: &str| {
        let out = sandpen(&[
            "exec", "-u", "root", "-w", &ws_arg, CAPS_NAME, "--", "bash", "-c", sh,
        ]);
        (
            out.status.code().unwrap_or(-1),
            text(&out.stdout) + &text(&out.stderr),
        )
    };
    // A million opens, each kept open.
    let (_, out) = run(
        "ulimit -n 1048576; i=0; while [ $i -lt 1000000 ]; do exec {fd}<README || break; i=$((i+1)); done; echo opened=$i",
    );
    let opened: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("opened="))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| Failed::from(format!("the open loop: {out}")))?;
    check(
        opened <= 256 && opened > 200 && out.contains("Too many open files in system"),
        format!("opens past the cap of 256: {opened}\n{out}"),
    )?;
    // Lookups that are never forgotten (the guest kernel keeps them).
    let (_, out) = run(
        "n=0; for i in $(seq 0 599); do stat -c %s many/f$i >/dev/null 2>/tmp/err || break; n=$((n+1)); done; echo looked=$n; cat /tmp/err",
    );
    let looked: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("looked="))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| Failed::from(format!("the lookup loop: {out}")))?;
    check(
        looked <= 512 && looked > 450 && out.contains("Too many open files in system"),
        format!("lookups past the cap of 512: {looked}\n{out}"),
    )?;
    // The server is up; a FORGET (the guest dropping its caches) makes room.
    let (code, out) = run(
        "cat README && sync && echo 2 > /proc/sys/vm/drop_caches && stat -c %s many/f599 && ls many | wc -l",
    );
    check(
        code == 0 && out.contains("still here") && out.contains("600"),
        format!("after the caps: {code} {out}"),
    )?;
    let log = std::fs::read_to_string(
        env()
            .cli
            .state
            .path()
            .join("sandpen/sandboxes")
            .join(CAPS_NAME)
            .join("logs/fs.log"),
    )
    .unwrap_or_default();
    check(
        log.contains("inodes=512") && log.contains("handles=256"),
        format!("the server did not log its caps:\n{log}"),
    )
}

fn default_secret_patterns_ignore_case() -> Result<(), Failed> {
    ready()?;
    let (_, out) = guest("cat .ENV KEY.PEM deploy/.netrc deploy/cert.P12");
    for leak in ["sk-upper-1", "BEGIN-UPPER", "netrc-pw", "p12-bytes"] {
        check(!out.contains(leak), format!("{leak} was served: {out}"))?;
    }
    check(
        out.matches("No such file").count() == 4,
        format!("a hidden file was found: {out}"),
    )?;
    let (_, out) = guest("ls -a . deploy");
    check(
        !out.contains(".ENV")
            && !out.contains("KEY.PEM")
            && !out.contains(".netrc")
            && !out.contains("cert.P12"),
        format!("hidden files were listed: {out}"),
    )
}

fn workspace_file_widens_only_once_trusted() -> Result<(), Failed> {
    ready()?;
    let port = env().http_port;
    let (line, code, curl) = BEFORE_TRUST
        .get()
        .cloned()
        .ok_or_else(|| Failed::from("setup did not run"))?;
    let held = line
        .lines()
        .find(|l| l.contains("not applied"))
        .unwrap_or_default()
        .to_string();
    check(
        held.contains(".sandpen.toml")
            && held.contains("flow.trusted_sinks api.anthropic.com")
            && held.contains("network allow widened.test")
            && held.contains("not trusted")
            && held.contains(&format!("sandpen policy trust {NAME}")),
        format!("run's line on the workspace file: {line}"),
    )?;
    // Refused (the proxy's 403 page), and the server never answered.
    check(
        !curl.contains("hello") && curl.contains("was refused"),
        format!("the untrusted allow rule was applied: {code} {curl}"),
    )?;
    let get = || {
        guest(&format!(
            "curl -sS -m 10 --noproxy '*' http://widened.test:{port}/x"
        ))
    };
    let (code, out) = get();
    check(
        code == 0 && out.contains("hello"),
        format!("after policy trust: {code} {out}"),
    )?;
    // The guest cannot edit the file; the host user can, and an edited file
    // needs a new trust: the running sandbox drops the widening at once.
    let (code, out) = guest("echo '[[network]]' >> .sandpen.toml");
    check(
        code != 0 && out.contains("Read-only"),
        format!("the guest edited .sandpen.toml: {code} {out}"),
    )?;
    let file = env().cli.ws.join(".sandpen.toml");
    write(&file, &format!("{WORKSPACE_FILE}# edited\n"));
    let result = (|| {
        let (code, out) = get();
        check(
            !out.contains("hello") && out.contains("was refused"),
            format!("an edited file kept its trust: {code} {out}"),
        )?;
        let out = sandpen(&["run", "--", "true"]);
        let line = text(&out.stderr);
        check(
            line.contains("changed since you trusted it"),
            format!("run's line after an edit: {line}"),
        )
    })();
    write(&file, WORKSPACE_FILE);
    result
}

/// XDG folders pointed inside the workspace, and a `--mount` of sandpen's
/// own folder: refused with one line before anything is made or booted.
fn sandpens_own_files_are_never_shared() -> Result<(), Failed> {
    let (_root, ws) = common::workspace("sandpen-own-", "own");
    let cli = Cli::new(ws.clone());
    let cfg = ws.join(".config");
    let sandpen_in = |args: &[&str], var: &str, dir: &Path| {
        cli.command(args)
            .env(var, dir)
            .output()
            .expect("running sandpen")
    };
    // The file secret store, with a key, inside the workspace.
    let mut set = cli
        .command(&["secret", "set", "anthropic"])
        .env("XDG_CONFIG_HOME", &cfg)
        .stdin(Stdio::piped())
        .spawn()?;
    use std::io::Write as _;
    set.stdin.take().unwrap().write_all(b"sk-ant-own-files\n")?;
    check(set.wait()?.success(), "secret set")?;
    check(
        cfg.join("sandpen/secrets").is_file(),
        "the secret store is not in the workspace",
    )?;
    for (var, dir, what) in [
        ("XDG_CONFIG_HOME", cfg.clone(), "config folder"),
        ("XDG_STATE_HOME", ws.join(".local/state"), "state folder"),
        ("XDG_DATA_HOME", ws.join("data"), "data folder"),
    ] {
        for cmd in [
            &["run", "--", "cat", ".config/sandpen/secrets"][..],
            &["create"][..],
        ] {
            let out = sandpen_in(cmd, var, &dir);
            let err = text(&out.stderr);
            let line = err
                .lines()
                .find(|l| l.contains("cannot share"))
                .unwrap_or_default();
            check(
                out.status.code() == Some(125)
                    && line.contains(&ws.display().to_string())
                    && line.contains(what)
                    && line.contains(var)
                    && !text(&out.stdout).contains("sk-ant"),
                format!(
                    "{var} in the workspace, sandpen {cmd:?}: {:?}\n{err}",
                    out.status
                ),
            )?;
        }
    }
    check(
        !cli.state.path().join("sandpen/sandboxes/own").exists()
            && !ws.join(".local/state/sandpen/sandboxes/own").exists(),
        "a sandbox was made",
    )?;
    // A --mount of the config folder, and of a folder above it.
    let elsewhere = tempfile::tempdir()?;
    let ws2 = elsewhere.path().canonicalize()?.join("plain");
    std::fs::create_dir(&ws2)?;
    let cli2 = Cli::new(ws2);
    for m in [
        cli2.config.path().to_path_buf(),
        cli2.config.path().join("sandpen"),
    ] {
        std::fs::create_dir_all(&m)?;
        let out = cli2.run(&["create", "--mount", &m.display().to_string()]);
        let err = text(&out.stderr);
        check(
            out.status.code() == Some(125)
                && err.contains("cannot share")
                && err.contains("config folder"),
            format!("--mount {}: {:?} {err}", m.display(), out.status),
        )?;
    }
    Ok(())
}

/// Unmounts on drop (lazily: a test that failed may leave a process in it).
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount(args: &[&str], at: &Path) -> Result<Mounted, Failed> {
    let st = Command::new("mount").args(args).arg(at).status()?;
    check(st.success(), format!("mount {args:?} {}", at.display()))?;
    Ok(Mounted(at.to_path_buf()))
}

/// Free bytes of the file system holding `p`, as an unprivileged user sees them.
fn avail(p: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(p).expect("statvfs");
    st.blocks_available() as u64 * st.fragment_size() as u64
}

/// A small tmpfs holds the workspace and the sandbox's flow label folder.
/// The guest fills it: its writes stop at the reserve (ENOSPC) and the
/// label can still be written. Then the host fills the rest: a read of the
/// secret fails with EIO and hands out nothing, and says so in the log.
fn a_full_disk_fails_secret_reads_and_the_reserve_holds() -> Result<(), Failed> {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root, to mount a small tmpfs".into());
    }
    const NAME: &str = "files-disk";
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk");
    std::fs::create_dir(&disk)?;
    let _tmpfs = mount(&["-t", "tmpfs", "-o", "size=64m", "tmpfs"], &disk)?;
    let ws = disk.join(NAME);
    write(&ws.join("secrets/token"), "tok-disk-77\n");
    write(
        &ws.join(".sandpen.toml"),
        "[flow]\nsecret = [\"secrets/**\"]\n",
    );
    std::fs::create_dir(disk.join("flow"))?;
    let cli = Cli::new(ws.clone());
    let run = |args: &[&str]| cli.run(args);
    let gsh = |sh: &str| {
        let out = run(&["exec", "-u", "root", NAME, "--", "sh", "-c", sh]);
        (
            out.status.code().unwrap_or(-1),
            text(&out.stdout) + &text(&out.stderr),
        )
    };
    cli.ok(&["policy", "init", "deny-all"])?;
    cli.ok(&["create", "--cpus", "1", "--memory", "1G"])?;
    let flow_dir = cli
        .state
        .path()
        .join("sandpen/sandboxes")
        .join(NAME)
        .join("flow");
    std::fs::create_dir_all(&flow_dir)?;
    let _bind = mount(
        &["--bind", &disk.join("flow").display().to_string()],
        &flow_dir,
    )?;
    let result = (|| -> Result<(), Failed> {
        cli.ok(&["start", NAME])?;
        // The default reserve on 64 MiB: 5 %.
        let floor = (64u64 << 20) * 5 / 100;
        let (code, out) = gsh("fallocate -l 100M big");
        check(
            code != 0 && out.contains("No space left"),
            format!("fallocate past the reserve: {code} {out}"),
        )?;
        let (_, out) = gsh("i=0; for s in 16M 4M 1M 256K 64K 16K 4K; do \
               while fallocate -l $s f$i 2>/dev/null; do i=$((i+1)); done; done; \
             echo x > more; dd if=/dev/zero of=big2 bs=64k count=1 conv=fsync; mkdir d");
        check(
            out.matches("No space left").count() >= 3,
            format!("writes below the reserve: {out}"),
        )?;
        let left = avail(&disk);
        check(
            left >= floor && left < floor + (1 << 20),
            format!("the guest left {left} bytes free; the floor is {floor}"),
        )?;
        // The label goes into the reserve: the read is served, labelled.
        let (code, out) = gsh("cat secrets/token");
        check(
            code == 0 && out.contains("tok-disk-77"),
            format!("the secret read at the reserve: {code} {out}"),
        )?;
        let shown = cli.ok(&["flow", "show", NAME])?;
        check(shown.contains("secret-read"), format!("flow show: {shown}"))?;
        cli.ok(&["flow", "reset", NAME])?;
        // Now something on the host takes the rest.
        let filler = disk.join("host-filler");
        let f = std::fs::File::create(&filler)?;
        for size in [1u64 << 20, 64 << 10, 4 << 10] {
            while nix::fcntl::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                nix::fcntl::FallocateFlags::empty(),
                f.metadata()?.len() as i64,
                size as i64,
            )
            .is_ok()
            {}
        }
        let (code, out) = gsh("cat secrets/token");
        check(
            code != 0 && out.contains("Input/output error") && !out.contains("tok-disk"),
            format!("the secret read on a full disk: {code} {out}"),
        )?;
        let shown = cli.ok(&["flow", "show", NAME])?;
        check(
            shown.contains("no flow labels"),
            format!("flow show: {shown}"),
        )?;
        let log = cli.ok(&["policy", "log", NAME, "--type", "file", "--json"])?;
        check(
            log.lines()
                .any(|l| l.contains("\"EIO\"") && l.contains("secrets/token")),
            format!("no EIO record in the file log:\n{log}"),
        )?;
        drop(f);
        std::fs::remove_file(&filler)?;
        let (code, out) = gsh("cat secrets/token");
        check(
            code == 0 && out.contains("tok-disk-77"),
            format!("the secret read with room again: {code} {out}"),
        )
    })();
    let _ = run(&["stop", NAME]);
    drop(_bind);
    let _ = run(&["rm", "-f", NAME]);
    result
}

fn main() {
    let args = Arguments {
        test_threads: Some(1),
        ..Arguments::from_args()
    };
    type TestFn = fn() -> Result<(), Failed>;
    let tests: Vec<(&str, TestFn)> = vec![
        (
            "deny_read_hides_secrets_everywhere",
            deny_read_hides_secrets_everywhere,
        ),
        (
            "read_only_paths_refuse_every_change",
            read_only_paths_refuse_every_change,
        ),
        ("no_escape_from_the_share", no_escape_from_the_share),
        (
            "flow_label_narrows_egress_until_reset",
            flow_label_narrows_egress_until_reset,
        ),
        (
            "git_clone_commit_checkout_on_the_share",
            git_clone_commit_checkout_on_the_share,
        ),
        (
            "renaming_a_folder_never_escapes_a_rule",
            renaming_a_folder_never_escapes_a_rule,
        ),
        (
            "git_metadata_cannot_make_the_host_run_anything",
            git_metadata_cannot_make_the_host_run_anything,
        ),
        ("cargo_build_on_the_share", cargo_build_on_the_share),
        ("extra_mount_is_read_only", extra_mount_is_read_only),
        (
            "fs_serve_confines_itself_before_serving",
            fs_serve_confines_itself_before_serving,
        ),
        ("npm_ci_on_the_share", npm_ci_on_the_share),
        (
            "file_server_caps_hold_and_it_stays_up",
            file_server_caps_hold_and_it_stays_up,
        ),
        (
            "default_secret_patterns_ignore_case",
            default_secret_patterns_ignore_case,
        ),
        (
            "workspace_file_widens_only_once_trusted",
            workspace_file_widens_only_once_trusted,
        ),
        (
            "sandpens_own_files_are_never_shared",
            sandpens_own_files_are_never_shared,
        ),
        (
            "a_full_disk_fails_secret_reads_and_the_reserve_holds",
            a_full_disk_fails_secret_reads_and_the_reserve_holds,
        ),
    ];
    let trials = tests.into_iter().map(|(n, f)| Trial::test(n, f)).collect();
    let conclusion = libtest_mimic::run(&args, trials);
    let _ = sandpen(&["rm", "-f", NAME]);
    let _ = sandpen(&["rm", "-f", NPM_NAME]);
    let _ = sandpen(&["rm", "-f", CAPS_NAME]);
    if let Ok(mut s) = env().server.lock() {
        let _ = s.kill();
        let _ = s.wait();
    }
    conclusion.exit();
}
