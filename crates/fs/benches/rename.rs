//! A rename's cost against the number of inodes the server knows: the
//! policy layer keeps inodes as a tree of (folder, name) links, so a rename
//! changes one link (docs/files.md, "Rules follow the file, not its name").
//! Prints the time per rename with few and with many known inodes, and the
//! ratio (about 1 when the cost does not grow with them).
//!
//! `cargo bench -p sandpen-fs --bench rename`

use std::ffi::CString;
use std::sync::Arc;
use std::time::Instant;

use fuse_backend_rs::api::filesystem::{Context, FileSystem, FsOptions, ROOT_ID};
use sandpen_fs::{Events, IdMap, ServeConfig};
use sandpen_policy::files::compile;

fn per_rename(known: usize) -> f64 {
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
    let c = |s: &str| CString::new(s).unwrap();
    let d = fs.lookup(&ctx, ROOT_ID, &c("d")).unwrap().inode;
    let many = fs.lookup(&ctx, d, &c("many")).unwrap().inode;
    for i in 0..known {
        fs.lookup(&ctx, many, &c(&format!("f{i}"))).unwrap();
    }
    // Rename the folder holding them back and forth.
    let rounds = 2000;
    let start = Instant::now();
    for i in 0..rounds {
        let (a, b) = if i % 2 == 0 { ("d", "e") } else { ("e", "d") };
        fs.rename(&ctx, ROOT_ID, &c(a), ROOT_ID, &c(b), 0).unwrap();
    }
    start.elapsed().as_secs_f64() / f64::from(rounds)
}

fn main() {
    // Each known inode is a descriptor in the passthrough layer.
    let limit = sandpen_fs::raise_fd_limit().expect("the open-file limit");
    let n = usize::try_from(limit.saturating_sub(2000))
        .unwrap_or(usize::MAX)
        .min(100_000);
    let few = per_rename(10);
    let many = per_rename(n);
    println!(
        "rename of a folder: {:.1} µs with 10 known inodes, {:.1} µs with {n} ({:.2}x)",
        few * 1e6,
        many * 1e6,
        many / few
    );
}
