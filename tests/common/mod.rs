//! Helpers shared by the end-to-end test binaries.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use libtest_mimic::Failed;

#[allow(dead_code)] // only the toolchain and Kiro tests stand in for a vendor
pub mod mirror;

/// Where the test image lives: `$SANDPEN_TEST_DATA_HOME` (scripts/test and CI
/// set it), else `~/.cache/sandpen-test`.
pub fn data_home() -> PathBuf {
    std::env::var_os("SANDPEN_TEST_DATA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
                .join(".cache/sandpen-test")
        })
}

/// A workspace folder named `name` inside a fresh temporary folder (the name
/// becomes the sandbox's).
pub fn workspace(prefix: &str, name: &str) -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("a temporary folder");
    let ws = root.path().join(name);
    std::fs::create_dir(&ws).expect("the workspace folder");
    let ws = ws.canonicalize().expect("the workspace path");
    (root, ws)
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn check(cond: bool, what: impl Into<String>) -> Result<(), Failed> {
    if cond {
        Ok(())
    } else {
        Err(what.into().into())
    }
}

/// The command's stdout if it succeeded; otherwise a failure naming `what`,
/// the exit status and both outputs.
pub fn expect_ok(out: &Output, what: &str) -> Result<String, Failed> {
    check(
        out.status.success(),
        format!(
            "{what}: exit {:?}\nstdout: {}\nstderr: {}",
            out.status.code(),
            text(&out.stdout),
            text(&out.stderr)
        ),
    )?;
    Ok(text(&out.stdout))
}

/// A CA and a leaf for `names`, written to `root` as `NAME-ca.pem`,
/// `NAME.pem` and `NAME.key`: an upstream that a test trusts with
/// `--upstream-ca`.
#[allow(dead_code)] // not every test binary makes certificates
pub fn make_pki(root: &std::path::Path, name: &str, names: &[&str]) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} upstream CA"));
    let ca = rcgen::CertifiedIssuer::self_signed(params, ca_key).expect("CA");
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("leaf params")
            .signed_by(&leaf_key, &ca)
            .expect("leaf");
    std::fs::write(root.join(format!("{name}-ca.pem")), ca.pem()).unwrap();
    std::fs::write(root.join(format!("{name}.pem")), leaf.pem()).unwrap();
    std::fs::write(root.join(format!("{name}.key")), leaf_key.serialize_pem()).unwrap();
}

/// The host's Rust toolchain (its sysroot), to share read-only at the same
/// path: a rustup toolchain, never a system folder such as `/usr`, which
/// would hide the guest's own.
#[allow(dead_code)] // the file-server tests and bench share the toolchain
pub fn toolchain() -> Option<PathBuf> {
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let system = ["/", "/usr", "/usr/local", "/opt"]
        .iter()
        .any(|s| sysroot == Path::new(s));
    Some(sysroot).filter(|p| !system && p.join("bin/cargo").is_file())
}

/// The `sandpen` binary under test, run in one workspace with private state
/// and config homes and the shared test image's data home, so that a test
/// binary never reads or writes the user's own sandboxes or policy.
pub struct Cli {
    pub bin: PathBuf,
    pub ws: PathBuf,
    pub state: tempfile::TempDir,
    pub config: tempfile::TempDir,
    pub data: PathBuf,
}

impl Cli {
    pub fn new(ws: PathBuf) -> Cli {
        let home = |prefix: &str| {
            tempfile::Builder::new()
                .prefix(prefix)
                .tempdir()
                .expect("a temporary folder")
        };
        Cli {
            bin: PathBuf::from(env!("CARGO_BIN_EXE_sandpen")),
            ws,
            state: home("sandpen-state-"),
            config: home("sandpen-config-"),
            data: data_home(),
        }
    }

    /// `sandpen ARGS` in the workspace, stdin from /dev/null. The host's
    /// accelerator choice and file-server override are not inherited.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .current_dir(&self.ws)
            .env("XDG_STATE_HOME", self.state.path())
            .env("XDG_DATA_HOME", &self.data)
            .env("XDG_CONFIG_HOME", self.config.path())
            .env_remove("SANDPEN_ACCEL")
            .env_remove("SANDPEN_FILE_SERVER")
            .stdin(std::process::Stdio::null());
        c
    }

    #[allow(dead_code)] // the agents tests add an environment variable first
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running sandpen")
    }

    /// Its stdout if it succeeded; otherwise a failure with both outputs.
    #[allow(dead_code)] // the agents and VM tests wrap `command` themselves
    pub fn ok(&self, args: &[&str]) -> Result<String, Failed> {
        self.expect_ok(&self.run(args), &format!("sandpen {args:?}"))
    }

    /// [`expect_ok`], plus the tails of the sandboxes' logs when the output
    /// says that the sandbox went away under the command: the tests remove
    /// their sandboxes at the end, and with them the only evidence.
    pub fn expect_ok(&self, out: &Output, what: &str) -> Result<String, Failed> {
        expect_ok(out, what).map_err(|failed| {
            let stderr = text(&out.stderr);
            let gone = ["is not running", "closed the session", "QEMU exited"]
                .iter()
                .any(|s| stderr.contains(s));
            let message = failed.message().unwrap_or_default().to_string();
            if gone {
                format!(
                    "{message}
{}",
                    self.log_tails()
                )
                .into()
            } else {
                message.into()
            }
        })
    }

    /// `ls --json`'s status of `name` (`absent` when it is not listed), and
    /// the reason of a `failed` one.
    #[allow(dead_code)] // the VM and stays-up tests read it
    pub fn status_of(&self, name: &str) -> Result<(String, String), Failed> {
        let out = self.ok(&["ls", "--json"])?;
        let rows: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| format!("ls --json: {e}: {out}"))?;
        let row = rows
            .as_array()
            .and_then(|a| a.iter().find(|r| r["name"] == name));
        Ok(match row {
            Some(r) => (
                r["status"].as_str().unwrap_or("").to_string(),
                r["reason"].as_str().unwrap_or("").to_string(),
            ),
            None => ("absent".into(), String::new()),
        })
    }

    /// The last lines of every sandbox's supervisor, QEMU, console and file
    /// server logs.
    pub fn log_tails(&self) -> String {
        let root = self.state.path().join("sandpen/sandboxes");
        let mut out = String::new();
        let Ok(dirs) = std::fs::read_dir(&root) else {
            return out;
        };
        for dir in dirs.flatten() {
            for log in ["supervisor.log", "qemu.log", "console.log", "fs.log"] {
                let path = dir.path().join("logs").join(log);
                let body = std::fs::read_to_string(&path).unwrap_or_default();
                let lines: Vec<&str> = body.lines().collect();
                let tail = lines[lines.len().saturating_sub(25)..].join("\n");
                out += &format!("--- {} (last 25 lines)\n{tail}\n", path.display());
            }
        }
        out
    }
}
