//! End-to-end: the Kiro CLI, which its vendor publishes only as a release
//! archive (docs/agents.md, "Kiro"). A fixture mirror stands in for
//! `desktop-release.q.us-east-1.amazonaws.com` (no vendor host is reachable
//! here), reached exactly as the vendor would be, through `--add-host` and
//! `--upstream-ca`: the same curl, the same manifest check, the same unpack.
//!
//! The mirror (tests/common/mirror.rs, on a free 127.0.0.x:443) serves the
//! pinned version's manifest and a small archive laid
//! out as the vendor's (`kirocli/bin/kiro-cli`, `-chat`, `-term`), whose
//! `kiro-cli --version` prints the version. Then: the image builds and
//! records the version, `run kiro -- --version` prints it, a manifest that
//! lists another sha256 stops the build before anything is unpacked, and a
//! vendor that cannot be reached is named with its URL and host.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;

use libtest_mimic::{Arguments, Failed, Trial};

mod common;
use common::{check, text, Cli};

const VENDOR: &str = "desktop-release.q.us-east-1.amazonaws.com";
const VERSION: &str = sandpen_agents::KIRO_RELEASE.version;

struct Env {
    cli: Cli,
    root: tempfile::TempDir,
    mirror: common::mirror::Mirror,
    /// Image names, unique: the data home is shared.
    image: String,
    bad_image: String,
}

fn sh(script: &str) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("sh");
    assert!(out.status.success(), "{script}: {}", text(&out.stderr));
}

/// The vendor's archive layout with a `kiro-cli` that prints its version,
/// and the pinned version's manifest listing it (plus a musl build and a
/// macOS one, as the vendor's does).
fn make_mirror(root: &Path) {
    let dir = root.join("mirror").join(VERSION);
    let bin = root.join("build/kirocli/bin");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    for program in ["kiro-cli", "kiro-cli-chat", "kiro-cli-term"] {
        std::fs::write(
            bin.join(program),
            format!(
                "#!/bin/sh\ncase \"$1\" in --version) echo \"{program} {VERSION}\";; \
                 *) echo \"{program} (fixture): $*\";; esac\n"
            ),
        )
        .unwrap();
    }
    sh(&format!(
        "chmod 755 {b}/* && tar -czf {d}/kirocli-x86_64-linux.tar.gz -C {r}/build kirocli",
        b = bin.display(),
        d = dir.display(),
        r = root.display()
    ));
    write_manifest(root, &sha256(&dir.join("kirocli-x86_64-linux.tar.gz")));
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    text(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

fn write_manifest(root: &Path, linux_sha256: &str) {
    let manifest = serde_json::json!({
        "version": VERSION,
        "packages": [
            {"os": "macos", "architecture": "universal", "fileType": "dmg",
             "sha256": "0".repeat(64)},
            {"os": "linux", "architecture": "x86_64", "fileType": "tarGz", "variant": "headless",
             "targetTriple": "x86_64-unknown-linux-musl", "sha256": "1".repeat(64)},
            {"os": "linux", "architecture": "x86_64", "fileType": "tarGz", "variant": "headless",
             "targetTriple": "x86_64-unknown-linux-gnu", "sha256": linux_sha256},
        ]
    });
    std::fs::write(
        root.join("mirror").join(VERSION).join("manifest.json"),
        manifest.to_string(),
    )
    .unwrap();
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let (root, ws) = common::workspace("sandpen-kiro-", "kiro");
        common::make_pki(root.path(), "release", &[VENDOR]);
        make_mirror(root.path());
        // Port 443 as the vendor's, on a loopback address no other test
        // binary holds (they may run side by side on a shared machine).
        let mirror = (90..140u8)
            .find_map(|last| {
                let addr: SocketAddr = format!("127.0.0.{last}:443").parse().unwrap();
                common::mirror::Mirror::start(
                    &root.path().join("mirror"),
                    addr,
                    &root.path().join("release.pem"),
                    &root.path().join("release.key"),
                )
                .ok()
            })
            .expect("the mirror on a free 127.0.0.x:443 (the tests run as root)");
        Env {
            cli: Cli::new(ws),
            root,
            mirror,
            image: format!("test-kiro-{}", std::process::id()),
            bad_image: format!("test-kiro-bad-{}", std::process::id()),
        }
    })
}

fn sandpen(args: &[&str]) -> Output {
    env().cli.run(args)
}

fn ok(args: &[&str]) -> Result<String, Failed> {
    env().cli.ok(args)
}

fn build_args<'a>(name: &'a str, ca: &'a str, ip: &'a str) -> Vec<String> {
    vec![
        "image".into(),
        "build".into(),
        "--agent".into(),
        "kiro".into(),
        "--name".into(),
        name.into(),
        "--add-host".into(),
        format!("{VENDOR}:{ip}"),
        "--upstream-ca".into(),
        ca.into(),
    ]
}

fn build(name: &str, ip: &str) -> Output {
    let ca = env().root.path().join("release-ca.pem");
    let args = build_args(name, ca.to_str().unwrap(), ip);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    sandpen(&args)
}

fn image_builds_from_the_mirror_and_runs() -> Result<(), Failed> {
    let e = env();
    let out = build(&e.image, &e.mirror.addr.ip().to_string());
    let built = e.cli.expect_ok(&out, "image build --agent kiro")?;
    eprintln!("    {}", built.trim());
    let asked = e.mirror.requests();
    check(
        asked
            .iter()
            .any(|r| r.contains(&format!("/{VERSION}/manifest.json")))
            && asked
                .iter()
                .any(|r| r.contains(&format!("/{VERSION}/kirocli-x86_64-linux.tar.gz"))),
        format!("the mirror was not asked for the manifest and the archive: {asked:?}"),
    )?;
    check(
        built.contains(&format!("agents kiro {VERSION}")),
        format!("the build does not name kiro {VERSION}: {built}"),
    )?;
    let out = sandpen(&["run", "--image", &e.image, "kiro", "--", "--version"]);
    let printed = e.cli.expect_ok(&out, "run kiro -- --version")?;
    check(
        printed.trim() == format!("kiro-cli {VERSION}"),
        format!("run kiro -- --version printed {printed:?}"),
    )?;
    check(
        text(&out.stderr).contains("signs in by itself"),
        format!(
            "run kiro said nothing of its sign-in: {}",
            text(&out.stderr)
        ),
    )?;
    // The unattended default: `chat --trust-all-tools` when no arguments.
    let bare = ok(&["run", "--image", &e.image, "kiro"])?;
    check(
        bare.contains("kiro-cli (fixture): chat --trust-all-tools"),
        format!("run kiro without arguments ran {bare:?}"),
    )
}

fn a_manifest_that_lists_other_bytes_stops_the_build() -> Result<(), Failed> {
    let e = env();
    write_manifest(e.root.path(), &"a".repeat(64));
    let out = build(&e.bad_image, &e.mirror.addr.ip().to_string());
    let err = text(&out.stderr);
    check(!out.status.success(), "the build went on")?;
    check(
        err.contains("is not what its vendor published")
            && err.contains(&format!(
                "https://{VENDOR}/{VERSION}/kirocli-x86_64-linux.tar.gz"
            )),
        format!("the build's error: {err}"),
    )?;
    let images = ok(&["image", "ls"])?;
    check(
        !images.contains(&e.bad_image),
        format!("an image was made: {images}"),
    )
}

fn an_unreachable_vendor_is_named() -> Result<(), Failed> {
    let e = env();
    // Nothing listens on this address: as a machine without the vendor.
    let silent = (140..190u8)
        .map(|last| format!("127.0.0.{last}"))
        .find(|ip| TcpListener::bind(format!("{ip}:443")).is_ok())
        .ok_or("no free loopback address")?;
    let out = build(&format!("{}-offline", e.bad_image), &silent);
    let err = text(&out.stderr);
    check(!out.status.success(), "the build went on")?;
    check(
        err.contains(&format!(
            "downloading https://{VENDOR}/{VERSION}/manifest.json failed"
        )) && err.contains(&format!("needs HTTPS to {VENDOR}")),
        format!("the build's error: {err}"),
    )
}

type TestFn = fn() -> Result<(), Failed>;

fn main() {
    let args = Arguments {
        test_threads: Some(1),
        ..Arguments::from_args()
    };
    let tests: Vec<(&str, TestFn)> = vec![
        (
            "image_builds_from_the_mirror_and_runs",
            image_builds_from_the_mirror_and_runs,
        ),
        (
            "a_manifest_that_lists_other_bytes_stops_the_build",
            a_manifest_that_lists_other_bytes_stops_the_build,
        ),
        (
            "an_unreachable_vendor_is_named",
            an_unreachable_vendor_is_named,
        ),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, f)| Trial::test(name, f))
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    let e = env();
    let out = sandpen(&["ls", "--json"]);
    if let Ok(rows) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
        for row in rows.as_array().into_iter().flatten() {
            if let Some(name) = row["name"].as_str() {
                let _ = sandpen(&["rm", "-f", name]);
            }
        }
    }
    for image in [&e.image, &e.bad_image] {
        let _ = sandpen(&["image", "rm", image]);
    }
    for failed in [e.bad_image.clone(), format!("{}-offline", e.bad_image)] {
        let _ = std::fs::remove_file(
            e.cli
                .data
                .join(format!("sandpen/images/.{failed}.failed-build.log")),
        );
    }
    conclusion.exit();
}
