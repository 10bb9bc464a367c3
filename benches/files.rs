//! Workspace file server benchmark: sandpen's own server (with the default
//! rules in force) against virtiofsd on the same files, and both against the
//! guest's own disk, all in one run.
//!
//! In each of two sandboxes (one per server), the same guest script runs on
//! the share and on the guest disk (`/root`, ext4 on the qcow2 overlay):
//!
//! - sequential 64 MiB write (`dd conv=fsync`) and read (after dropping the
//!   guest's caches);
//! - 10,000 small files created, stat'ed and deleted;
//! - a git checkout of a real repository (this one) between two commits and
//!   back (the clone is made once; on the share by the host, since `git
//!   clone` on the share fails in the guest: it writes `.git/config`, which
//!   the default rules keep read-only);
//! - a build: `cargo build` of a small library crate with the host's Rust
//!   toolchain shared read-only (`--mount`), if rustup has one.
//!
//! Both sandboxes run side by side and the rounds alternate between them
//! (every other round in the other order), so that load from other work on
//! the host falls on both alike. Each figure is
//! the best of `SANDPEN_BENCH_ROUNDS` (default 2) rounds.
//! `cargo bench -p sandpen --bench files`. Needs the default image (see
//! benches/spine.rs) and virtiofsd (`SANDPEN_VIRTIOFSD` names one).
//! `SANDPEN_BENCH_RESERVE=256MiB` lowers the disk reserve where the host
//! has less than about 1.5 GiB free.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

// Shared with the end-to-end tests; the bench uses only part of it.
#[allow(dead_code)]
#[path = "../tests/common/mod.rs"]
mod common;

/// The guest script: `bench DIR` prints `NAME SECONDS` lines.
const SCRIPT: &str = r#"
set -e
t() { date +%s.%N; }
el() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.4f", b - a }'; }
d=$1; tc=$2; rounds=$3
git config --global --add safe.directory '*'
mkdir -p "$d"; cd "$d"
for r in $(seq "$rounds"); do
  rm -rf b; mkdir b; cd b
  s=$(t); dd if=/dev/zero of=big bs=1M count=64 conv=fsync status=none; e=$(t)
  echo "write64 $(el "$s" "$e")"
  sync; echo 3 > /proc/sys/vm/drop_caches
  s=$(t); dd if=big of=/dev/null bs=1M status=none; e=$(t)
  echo "read64 $(el "$s" "$e")"
  rm big
  mkdir small
  s=$(t); (cd small && seq 10000 | xargs touch); e=$(t)
  echo "create10k $(el "$s" "$e")"
  sync; echo 3 > /proc/sys/vm/drop_caches
  s=$(t); find small -type f | xargs stat -c %s > /dev/null; e=$(t)
  echo "stat10k $(el "$s" "$e")"
  s=$(t); rm -rf small; e=$(t)
  echo "delete10k $(el "$s" "$e")"
  # One clone for all rounds, beside b/: on the share the host made it
  # (`git clone` on the share fails in the guest, docs/files.md#rules), on
  # the guest disk the guest makes it here. Its pack is read first, as a
  # fresh clone would have it in the page cache.
  [ -d "$d/repo" ] || git clone -q --no-checkout "$4" "$d/repo"
  cd "$d/repo"
  git checkout -q "$5"
  find .git/objects -type f -exec cat {} + > /dev/null
  s=$(t); git checkout -q "$6"; git checkout -q "$5"; e=$(t)
  echo "checkout $(el "$s" "$e")"
  cd "$d/b"
  if [ -n "$tc" ]; then
    cp -r "$7" crate
    s=$(t); (cd crate && PATH="$tc/bin:$PATH" CARGO_HOME=/tmp/cargo-home cargo build -q --offline); e=$(t)
    echo "build $(el "$s" "$e")"
  fi
  cd ..
done
rm -rf b
"#;

struct Run {
    bin: PathBuf,
    state: tempfile::TempDir,
    config: tempfile::TempDir,
    data: PathBuf,
}

impl Run {
    fn sandpen(&self, ws: &Path, server: &str, args: &[&str]) -> std::process::Output {
        Command::new(&self.bin)
            .args(args)
            .current_dir(ws)
            .env("XDG_STATE_HOME", self.state.path())
            .env("XDG_DATA_HOME", &self.data)
            .env("XDG_CONFIG_HOME", self.config.path())
            .env("SANDPEN_FILE_SERVER", server)
            .stdin(Stdio::null())
            .output()
            .expect("running sandpen")
    }

    fn ok(&self, ws: &Path, server: &str, args: &[&str]) -> String {
        let out = self.sandpen(ws, server, args);
        assert!(
            out.status.success(),
            "sandpen {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn git(args: &[&str], dir: &Path) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git");
    assert!(out.status.success(), "git {args:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One sandbox under test: its workspace (a bare clone of this repository, a
/// small crate and the script) and its file server.
struct Bench<'a> {
    run: &'a Run,
    server: &'static str,
    name: String,
    ws: PathBuf,
    bare: PathBuf,
    old: String,
    new: String,
    krate: PathBuf,
    toolchain: String,
    _root: tempfile::TempDir,
}

impl Drop for Bench<'_> {
    /// The sandbox goes however the run ends.
    fn drop(&mut self) {
        let _ = self
            .run
            .sandpen(&self.ws, self.server, &["rm", "-f", &self.name]);
    }
}

fn prepare<'a>(run: &'a Run, server: &'static str) -> Bench<'a> {
    let root = tempfile::Builder::new()
        .prefix("sandpen-fsbench-")
        .tempdir()
        .unwrap();
    let name = format!("fsbench-{server}");
    let ws = root.path().join(&name);
    std::fs::create_dir(&ws).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let bare = ws.join("src.git");
    let status = Command::new("git")
        .args(["clone", "-q", "--bare", "--no-local"])
        .arg(&src)
        .arg(&bare)
        .status()
        .unwrap();
    assert!(status.success());
    let new = git(&["rev-parse", "HEAD"], &bare);
    let old = git(&["rev-list", "--max-count=1", "--skip=40", "HEAD"], &bare);
    let old = if old.is_empty() { new.clone() } else { old };
    let krate = ws.join("crate-src");
    std::fs::create_dir_all(krate.join("src")).unwrap();
    std::fs::write(
        krate.join("Cargo.toml"),
        "[package]\nname = \"benchcrate\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[lib]\npath = \"src/lib.rs\"\n",
    )
    .unwrap();
    // Enough code that the compiler's own work and its file access both count.
    let mut lib = String::new();
    for i in 0..40 {
        lib.push_str(&format!("pub mod m{i};\n"));
        std::fs::write(
            krate.join(format!("src/m{i}.rs")),
            format!(
                "#[derive(Debug, Clone, PartialEq)]\npub struct S{i} {{ pub a: Vec<u64>, pub b: String }}\n\
                 impl S{i} {{ pub fn sum(&self) -> u64 {{ self.a.iter().map(|x| x * {i}).sum() }} }}\n\
                 pub fn f(v: &[S{i}]) -> Vec<String> {{ v.iter().map(|s| format!(\"{{:?}}{{}}\", s, s.sum())).collect() }}\n"
            ),
        )
        .unwrap();
    }
    std::fs::write(krate.join("src/lib.rs"), lib).unwrap();
    std::fs::write(ws.join("bench.sh"), SCRIPT).unwrap();
    // The share's clone, made on the host (see the module docs); the guest
    // disk's is made by the script.
    std::fs::create_dir(ws.join("b-share")).unwrap();
    let status = Command::new("git")
        .args(["clone", "-q", "--no-checkout"])
        .arg(&bare)
        .arg(ws.join("b-share/repo"))
        .status()
        .unwrap();
    assert!(status.success());

    let tc = common::toolchain();
    let mut create = vec![
        "create".to_string(),
        "--name".into(),
        name.clone(),
        "--cpus".into(),
        "1".into(),
        "--memory".into(),
        "1G".into(),
    ];
    if let Some(tc) = &tc {
        create.push("--mount".into());
        create.push(format!("{}:ro", tc.display()));
    }
    let create: Vec<&str> = create.iter().map(String::as_str).collect();
    run.ok(&ws, server, &create);
    if server == "virtiofsd" {
        // virtiofsd cannot enforce rules: this sandbox runs without any.
        std::fs::write(
            run.state
                .path()
                .join("sandpen/sandboxes")
                .join(&name)
                .join("policy.toml"),
            "[files]\ndefaults = false\n",
        )
        .unwrap();
    }
    let bench = Bench {
        run,
        server,
        name,
        ws,
        bare,
        old,
        new,
        krate,
        toolchain: tc.map(|p| p.display().to_string()).unwrap_or_default(),
        _root: root,
    };
    run.ok(&bench.ws, server, &["start", &bench.name]);
    bench
}

impl Bench<'_> {
    /// One round of the script in `dir` (on the share or the guest disk).
    fn round(&self, dir: &Path) -> BTreeMap<String, f64> {
        let out = self.run.ok(
            &self.ws,
            self.server,
            &[
                "exec",
                "-u",
                "root",
                &self.name,
                "--",
                "sh",
                &format!("{}/bench.sh", self.ws.display()),
                &dir.display().to_string(),
                &self.toolchain,
                "1",
                &self.bare.display().to_string(),
                &self.old,
                &self.new,
                &self.krate.display().to_string(),
            ],
        );
        let mut figures = BTreeMap::new();
        for line in out.lines() {
            let mut it = line.split_whitespace();
            if let (Some(k), Some(v)) = (it.next(), it.next().and_then(|v| v.parse::<f64>().ok())) {
                figures.insert(k.to_string(), v);
            }
        }
        figures
    }
}

/// Keeps the smallest time per figure.
fn best(into: &mut BTreeMap<String, f64>, from: BTreeMap<String, f64>) {
    for (k, v) in from {
        let e = into.entry(k).or_insert(f64::MAX);
        *e = e.min(v);
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let data = std::env::var_os("SANDPEN_TEST_DATA_HOME")
        .or_else(|| std::env::var_os("XDG_DATA_HOME"))
        .map(PathBuf::from)
        .expect("set SANDPEN_TEST_DATA_HOME or XDG_DATA_HOME to where the image is");
    let rounds: u32 = std::env::var("SANDPEN_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(2);
    let run = Run {
        bin: PathBuf::from(env!("CARGO_BIN_EXE_sandpen")),
        state: tempfile::tempdir().unwrap(),
        config: tempfile::tempdir().unwrap(),
        data,
    };
    std::fs::create_dir_all(run.config.path().join("sandpen")).unwrap();
    // `SANDPEN_BENCH_RESERVE` (say `256MiB`) lowers the disk reserve for a
    // host with little free space (the default 1 GiB floor refuses the
    // share's writes there with ENOSPC); its cost does not depend on it.
    let mut policy = "preset = \"deny-all\"\n".to_string();
    if let Ok(r) = std::env::var("SANDPEN_BENCH_RESERVE") {
        policy.push_str(&format!("[files]\nreserve = {r:?}\n"));
    }
    std::fs::write(run.config.path().join("sandpen/policy.toml"), policy).unwrap();
    // Both sandboxes run side by side and the rounds alternate between
    // them, so that the load other work puts on the host falls on both.
    let sp = prepare(&run, "sandpen");
    let vf = prepare(&run, "virtiofsd");
    let (mut sp_share, mut sp_disk, mut vf_share, mut vf_disk) = Default::default();
    for r in 1..=rounds {
        let mut order = [
            ("sandpen share", &sp, sp.ws.join("b-share"), &mut sp_share),
            ("virtiofsd share", &vf, vf.ws.join("b-share"), &mut vf_share),
            (
                "disk (sandpen's VM)",
                &sp,
                PathBuf::from("/root/fsbench"),
                &mut sp_disk,
            ),
            (
                "disk (virtiofsd's VM)",
                &vf,
                PathBuf::from("/root/fsbench"),
                &mut vf_disk,
            ),
        ];
        if r % 2 == 0 {
            // Every other round virtiofsd goes first, so that neither server
            // always follows the same work (the other VM's writeback, say).
            order.swap(0, 1);
            order.swap(2, 3);
        }
        for (label, bench, dir, into) in order {
            let figures = bench.round(&dir);
            eprintln!("round {r}, {label}: {figures:?}");
            best(into, figures);
        }
    }
    println!(
        "\n{:<11} {:>10} {:>10} {:>10} {:>10} {:>13} {:>13}",
        "figure", "sandpen", "virtiofsd", "disk(sp)", "disk(vf)", "sp/virtiofsd", "sp/disk"
    );
    for (k, sp) in &sp_share {
        let vf = vf_share.get(k).copied().unwrap_or(f64::NAN);
        let d1 = sp_disk.get(k).copied().unwrap_or(f64::NAN);
        let d2 = vf_disk.get(k).copied().unwrap_or(f64::NAN);
        println!(
            "{k:<11} {sp:>9.3}s {vf:>9.3}s {d1:>9.3}s {d2:>9.3}s {:>12.2}x {:>12.2}x",
            sp / vf,
            sp / d1
        );
    }
    println!("(seconds, best of {rounds}; lower is better; 64 MiB for write64/read64)");
}
