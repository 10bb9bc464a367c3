//! A rename's cost against the number of inodes the server knows: the
//! policy layer keeps inodes as a tree of (folder, name) links, so a rename
//! changes one link (docs/files.md, "Rules follow the file, not its name").
//! Prints the time per rename with few and with many known inodes, and the
//! ratio (about 1 when the cost does not grow with them).
//!
//! Both servers are set up first, then batches of renames alternate between
//! them and each figure is the fastest batch, so that load from other work
//! on the host (a spike lasts longer than a batch) falls on both alike.
//!
//! `cargo bench -p sandpen-fs --bench rename`

use std::ffi::CString;
use std::sync::Arc;
use std::time::Instant;

use fuse_backend_rs::api::filesystem::{Context, FileSystem, FsOptions, ROOT_ID};
use fuse_backend_rs::passthrough::PassthroughFs;
use sandpen_fs::{Events, Guarded, IdMap, ServeConfig};
use sandpen_policy::files::compile;

/// Renames per batch.
const BATCH: u32 = 200;
/// Batches per server.
const BATCHES: u32 = 25;

/// A server over a temporary workspace with `known` inodes looked up below
/// the folder `d` that is renamed.
struct Fixture {
    fs: Guarded<PassthroughFs>,
    /// Which name the folder has now.
    at_d: bool,
    _dir: tempfile::TempDir,
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

impl Fixture {
    fn new(known: usize) -> Fixture {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let root = dir.path().join("ws");
        std::fs::create_dir_all(root.join("d/many")).unwrap();
        for i in 0..known {
            std::fs::write(root.join(format!("d/many/f{i}")), "").unwrap();
        }
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let cfg = ServeConfig {
            root: root.clone(),
            socket: dir.path().join("s.sock"),
            rules: compile(&[], false).unwrap(),
            ids: IdMap {
                guest_uid: 1000,
                guest_gid: 1000,
                host_uid: uid,
                host_gid: gid,
            },
            events: Arc::new(Events::new("bench", None, None).unwrap()),
            confine: None,
            reserve: None,
        };
        let fs = sandpen_fs::guarded_fs(&cfg).unwrap();
        fs.init(FsOptions::empty()).unwrap();
        let ctx = Context::new();
        let d = fs.lookup(&ctx, ROOT_ID, &c("d")).unwrap().inode;
        let many = fs.lookup(&ctx, d, &c("many")).unwrap().inode;
        for i in 0..known {
            fs.lookup(&ctx, many, &c(&format!("f{i}"))).unwrap();
        }
        Fixture {
            fs,
            at_d: true,
            _dir: dir,
        }
    }

    /// Seconds per rename over one batch of the folder renamed back and forth.
    fn batch(&mut self) -> f64 {
        let ctx = Context::new();
        let (d, e) = (c("d"), c("e"));
        let start = Instant::now();
        for _ in 0..BATCH {
            let (a, b) = if self.at_d { (&d, &e) } else { (&e, &d) };
            self.fs.rename(&ctx, ROOT_ID, a, ROOT_ID, b, 0).unwrap();
            self.at_d = !self.at_d;
        }
        start.elapsed().as_secs_f64() / f64::from(BATCH)
    }
}

fn main() {
    // Each known inode is a descriptor in the passthrough layer.
    let limit = sandpen_fs::raise_fd_limit().expect("the open-file limit");
    let n = usize::try_from(limit.saturating_sub(2000))
        .unwrap_or(usize::MAX)
        .min(100_000);
    let mut few = Fixture::new(10);
    let mut many = Fixture::new(n);
    let (mut best_few, mut best_many) = (f64::MAX, f64::MAX);
    for _ in 0..BATCHES {
        best_few = best_few.min(few.batch());
        best_many = best_many.min(many.batch());
    }
    println!(
        "rename of a folder: {:.1} µs with 10 known inodes, {:.1} µs with {n} ({:.2}x; fastest of {BATCHES} batches of {BATCH}, alternating)",
        best_few * 1e6,
        best_many * 1e6,
        best_many / best_few
    );
}
