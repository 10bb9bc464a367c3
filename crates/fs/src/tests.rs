//! The policy layer driven directly with FUSE operations, as a hostile guest
//! kernel could send them (no guest-side checks in between), over a real
//! passthrough file system on a temporary folder.

use std::ffi::CString;
use std::io;
use std::path::Path;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{stat64, CreateIn};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, SetattrValid, ROOT_ID,
};
use fuse_backend_rs::passthrough::PassthroughFs;
use sandpen_policy::files::{compile, FileRuleKind, FileRuleSource, PathRule};
use sandpen_policy::{Label, LabelStore};

use crate::{Events, Guarded, IdMap, ServeConfig};

struct Fixture {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    state: std::path::PathBuf,
    fs: Guarded<PassthroughFs>,
}

fn fixture() -> Fixture {
    fixture_with(None)
}

/// A fixture whose share keeps `reserve` free on the state folder's disk.
fn fixture_with(reserve: Option<sandpen_policy::Reserve>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ws");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    for (p, c) in [
        (".env", "SECRET"),
        ("src/main.rs", "fn main() {}"),
        (".git/hooks/pre-commit", "#!/bin/sh"),
        (".git/config", "[core]"),
        ("secrets/token", "tok"),
    ] {
        let p = root.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, c).unwrap();
    }
    std::fs::write(dir.path().join("outside"), "HOST").unwrap();
    std::os::unix::fs::symlink(dir.path().join("outside"), root.join("link")).unwrap();
    let mut rules = compile(&[], false).unwrap();
    rules.push(
        PathRule::new(
            FileRuleKind::Secret,
            "secrets/**",
            FileRuleSource::Text("test".into()),
        )
        .unwrap(),
    );
    let events = Events::new(
        "t",
        Some(&state.join("files.jsonl")),
        Some(LabelStore::in_dir(&state)),
    )
    .unwrap();
    let uid = nix_ids();
    let cfg = ServeConfig {
        root: root.clone(),
        socket: dir.path().join("s.sock"),
        rules,
        ids: IdMap {
            guest_uid: 1000,
            guest_gid: 1000,
            host_uid: uid.0,
            host_gid: uid.1,
        },
        events: Arc::new(events),
        confine: None,
        reserve: reserve.map(|r| Arc::new(crate::reserve::DiskReserve::open(&state, r).unwrap())),
    };
    let fs = crate::guarded_fs(&cfg).unwrap();
    fs.init(FsOptions::empty()).unwrap();
    Fixture {
        _dir: dir,
        root,
        state,
        fs,
    }
}

fn nix_ids() -> (u32, u32) {
    // SAFETY: getuid/getgid cannot fail and touch no memory.
    unsafe { (libc::getuid(), libc::getgid()) }
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn code(r: io::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn ctx() -> Context {
    Context::new()
}

impl Fixture {
    fn lookup(&self, parent: u64, name: &str) -> io::Result<Entry> {
        self.fs.lookup(&ctx(), parent, &c(name))
    }

    fn path(&self, path: &str) -> io::Result<Entry> {
        let mut ino = ROOT_ID;
        let mut last = None;
        for part in path.split('/') {
            let e = self.lookup(ino, part)?;
            ino = e.inode;
            last = Some(e);
        }
        last.ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
    }

    fn names(&self, dir: u64) -> Vec<String> {
        let (h, _) = self.fs.opendir(&ctx(), dir, 0).unwrap();
        let mut names = Vec::new();
        self.fs
            .readdir(&ctx(), dir, h.unwrap_or(0), 65536, 0, &mut |e: DirEntry| {
                names.push(String::from_utf8_lossy(e.name).into_owned());
                Ok(1)
            })
            .unwrap();
        let mut plus = Vec::new();
        self.fs
            .readdirplus(
                &ctx(),
                dir,
                h.unwrap_or(0),
                65536,
                0,
                &mut |e: DirEntry, _| {
                    plus.push(String::from_utf8_lossy(e.name).into_owned());
                    Ok(1)
                },
            )
            .unwrap();
        names.sort();
        plus.sort();
        assert_eq!(names, plus, "readdir and readdirplus disagree");
        names
    }
}

#[test]
fn hidden_files_do_not_exist() {
    let f = fixture();
    assert_eq!(code(f.lookup(ROOT_ID, ".env")), libc::ENOENT);
    let names = f.names(ROOT_ID);
    assert!(!names.contains(&".env".to_string()), "{names:?}");
    assert!(names.contains(&"src".to_string()));
    // Renaming something over it, or it away, is ENOENT too.
    let src = f.path("src").unwrap().inode;
    assert_eq!(
        code(f.fs.rename(&ctx(), src, &c("main.rs"), ROOT_ID, &c(".env"), 0)),
        libc::ENOENT
    );
    assert_eq!(code(f.fs.unlink(&ctx(), ROOT_ID, &c(".env"))), libc::ENOENT);
    // Creating one is refused without saying whether it exists.
    let args = CreateIn {
        flags: libc::O_WRONLY as u32,
        mode: 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    assert_eq!(
        code(f.fs.create(&ctx(), src, &c(".env.local"), args)),
        libc::EACCES
    );
    assert_eq!(
        std::fs::read_to_string(f.root.join(".env")).unwrap(),
        "SECRET"
    );
    let log = std::fs::read_to_string(f.state.join("files.jsonl")).unwrap();
    assert!(
        log.contains("\"op\":\"lookup\"") && log.contains("ENOENT"),
        "{log}"
    );
}

#[test]
fn names_cannot_climb_out() {
    let f = fixture();
    for bad in ["..", ".", "", "a/b", "../outside"] {
        assert_eq!(code(f.lookup(ROOT_ID, bad)), libc::EINVAL, "{bad:?}");
    }
    let src = f.path("src").unwrap().inode;
    assert_eq!(code(f.lookup(src, "..")), libc::EINVAL);
    // An inode number the server never handed out.
    assert_eq!(code(f.fs.getattr(&ctx(), 987_654, None)), libc::ENOENT);
}

#[test]
fn a_symlink_is_never_followed_on_the_host() {
    let f = fixture();
    let link = f.path("link").unwrap();
    assert_eq!(link.attr.st_mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(
        code(f.fs.open(&ctx(), link.inode, libc::O_RDONLY as u32, 0)),
        libc::ELOOP
    );
    // Reading the link gives its text, for the guest to resolve in the guest.
    let target = f.fs.readlink(&ctx(), link.inode).unwrap();
    assert!(String::from_utf8_lossy(&target).ends_with("/outside"));
    // It cannot be used as a folder either.
    assert_eq!(code(f.lookup(link.inode, "x")), libc::ENOTDIR);
}

#[test]
fn read_only_paths_refuse_changes() {
    let f = fixture();
    let hooks = f.path(".git/hooks").unwrap().inode;
    let git = f.path(".git").unwrap().inode;
    let hook = f.path(".git/hooks/pre-commit").unwrap().inode;
    let erofs = libc::EROFS;
    assert_eq!(
        code(f.fs.open(&ctx(), hook, libc::O_WRONLY as u32, 0)),
        erofs
    );
    assert_eq!(
        code(f.fs.open(&ctx(), hook, (libc::O_RDONLY | libc::O_TRUNC) as u32, 0)),
        erofs
    );
    assert_eq!(code(f.fs.open(&ctx(), hook, libc::O_RDONLY as u32, 0)), 0);
    // SAFETY: stat64 is plain data; all zeroes is a valid value.
    let mut attr: stat64 = unsafe { std::mem::zeroed() };
    attr.st_mode = 0o755;
    assert_eq!(
        code(f.fs.setattr(&ctx(), hook, attr, None, SetattrValid::MODE)),
        erofs
    );
    assert_eq!(code(f.fs.unlink(&ctx(), hooks, &c("pre-commit"))), erofs);
    assert_eq!(code(f.fs.unlink(&ctx(), git, &c("config"))), erofs);
    assert_eq!(
        code(f.fs.rename(&ctx(), git, &c("hooks"), ROOT_ID, &c("h"), 0)),
        erofs
    );
    assert_eq!(
        code(f.fs.rename(&ctx(), ROOT_ID, &c(".git"), ROOT_ID, &c("g"), 0)),
        erofs
    );
    assert_eq!(code(f.fs.mkdir(&ctx(), hooks, &c("d"), 0o755, 0)), erofs);
    assert_eq!(
        code(f.fs.symlink(&ctx(), &c("/bin/sh"), hooks, &c("x"))),
        erofs
    );
    // A second name for a protected file would make it writable.
    assert_eq!(code(f.fs.link(&ctx(), hook, ROOT_ID, &c("h2"))), erofs);
    // Moving a file into the protected folder.
    let src = f.path("src").unwrap().inode;
    assert_eq!(
        code(f.fs.rename(&ctx(), src, &c("main.rs"), hooks, &c("post-checkout"), 0)),
        erofs
    );
    assert_eq!(
        std::fs::read_to_string(f.root.join(".git/hooks/pre-commit")).unwrap(),
        "#!/bin/sh"
    );
    assert!(f.root.join("src/main.rs").exists());
}

#[test]
fn no_devices_and_no_setuid() {
    let f = fixture();
    let src = f.path("src").unwrap().inode;
    assert_eq!(
        code(f.fs.mknod(&ctx(), src, &c("null"), libc::S_IFCHR | 0o666, 0x0103, 0)),
        libc::EPERM
    );
    let args = CreateIn {
        flags: libc::O_WRONLY as u32,
        mode: libc::S_IFREG | 0o4755,
        umask: 0,
        fuse_flags: 0,
    };
    let (e, _, _, _) = f.fs.create(&ctx(), src, &c("tool"), args).unwrap();
    assert_eq!(e.attr.st_mode & 0o7000, 0, "set-uid bit kept");
    // SAFETY: stat64 is plain data; all zeroes is a valid value.
    let mut attr: stat64 = unsafe { std::mem::zeroed() };
    attr.st_mode = libc::S_IFREG | 0o6755;
    let (st, _) =
        f.fs.setattr(&ctx(), e.inode, attr, None, SetattrValid::MODE)
            .unwrap();
    assert_eq!(st.st_mode & 0o7000, 0, "chmod u+s went through");
}

#[test]
fn reading_a_secret_sets_the_label_before_the_open_returns() {
    let f = fixture();
    let store = LabelStore::in_dir(&f.state);
    let main = f.path("src/main.rs").unwrap().inode;
    f.fs.open(&ctx(), main, libc::O_RDONLY as u32, 0).unwrap();
    assert!(
        store.load().unwrap().is_empty(),
        "an ordinary file set a label"
    );
    let token = f.path("secrets/token").unwrap().inode;
    f.fs.open(&ctx(), token, libc::O_RDONLY as u32, 0).unwrap();
    let labels = store.load().unwrap();
    let l = labels.get(Label::SecretRead).expect("secret-read set");
    assert!(l.by.ends_with("/ws/secrets/token"), "{l:?}");
    let log = std::fs::read_to_string(f.state.join("files.jsonl")).unwrap();
    assert!(
        log.contains("\"kind\":\"label\"") && log.contains("secret-read"),
        "{log}"
    );
    // After a reset, the next read sets it again.
    store.reset().unwrap();
    f.fs.open(&ctx(), token, libc::O_RDONLY as u32, 0).unwrap();
    assert!(store.load().unwrap().get(Label::SecretRead).is_some());
}

#[test]
fn renaming_a_secret_counts_as_reading_it_and_paths_follow_renames() {
    let f = fixture();
    let store = LabelStore::in_dir(&f.state);
    let secrets = f.path("secrets").unwrap().inode;
    f.fs.rename(&ctx(), secrets, &c("token"), ROOT_ID, &c("plain"), 0)
        .unwrap();
    assert!(store.load().unwrap().get(Label::SecretRead).is_some());
    // A folder renamed under a protected path name keeps being checked by
    // its new path: src -> moved, then moved/main.rs is where it is.
    f.fs.rename(&ctx(), ROOT_ID, &c("src"), ROOT_ID, &c("moved"), 0)
        .unwrap();
    let main = f.path("moved/main.rs").unwrap();
    assert!(Path::new(&f.root).join("moved/main.rs").exists());
    assert_eq!(
        code(f.fs.open(&ctx(), main.inode, libc::O_RDWR as u32, 0)),
        0
    );
}

#[test]
fn a_second_name_does_not_launder_a_secret() {
    let f = fixture();
    let store = LabelStore::in_dir(&f.state);
    let token = f.path("secrets/token").unwrap().inode;
    let e = f.fs.link(&ctx(), token, ROOT_ID, &c("plain")).unwrap();
    assert_eq!(e.inode, token);
    assert!(store.load().unwrap().get(Label::SecretRead).is_some());
    store.reset().unwrap();
    // Opened under its ordinary name, it is still the secret.
    let plain = f.path("plain").unwrap().inode;
    f.fs.open(&ctx(), plain, libc::O_RDONLY as u32, 0).unwrap();
    assert!(store.load().unwrap().get(Label::SecretRead).is_some());
}

#[test]
fn a_secret_is_not_served_when_its_label_cannot_be_written() {
    let f = fixture();
    let token = f.path("secrets/token").unwrap().inode;
    // The label folder cannot be made (a file is in its place), as when the
    // disk is full: the open fails with EIO and nothing is handed out.
    std::fs::write(f.state.join("flow"), "in the way").unwrap();
    assert_eq!(
        code(f.fs.open(&ctx(), token, libc::O_RDONLY as u32, 0)),
        libc::EIO
    );
    let log = std::fs::read_to_string(f.state.join("files.jsonl")).unwrap();
    assert!(
        log.contains("\"EIO\"") && log.contains("secrets/token"),
        "{log}"
    );
    // An ordinary file is still served; a secret one once the label can be
    // written again.
    let main = f.path("src/main.rs").unwrap().inode;
    f.fs.open(&ctx(), main, libc::O_RDONLY as u32, 0).unwrap();
    std::fs::remove_file(f.state.join("flow")).unwrap();
    f.fs.open(&ctx(), token, libc::O_RDONLY as u32, 0).unwrap();
    assert!(LabelStore::in_dir(&f.state)
        .load()
        .unwrap()
        .get(Label::SecretRead)
        .is_some());
}

#[test]
fn below_the_reserve_nothing_grows_and_everything_may_shrink() {
    // A floor far above what any disk has free.
    let f = fixture_with(Some(sandpen_policy::Reserve::Bytes(u64::MAX / 4)));
    let src = f.path("src").unwrap().inode;
    let main = f.path("src/main.rs").unwrap().inode;
    let args = CreateIn {
        flags: libc::O_WRONLY as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    assert_eq!(
        code(f.fs.create(&ctx(), src, &c("new"), args)),
        libc::ENOSPC
    );
    assert_eq!(
        code(f.fs.mkdir(&ctx(), src, &c("d"), 0o755, 0)),
        libc::ENOSPC
    );
    assert_eq!(
        code(f.fs.symlink(&ctx(), &c("main.rs"), src, &c("l"))),
        libc::ENOSPC
    );
    assert_eq!(code(f.fs.link(&ctx(), main, src, &c("hard"))), libc::ENOSPC);
    let (h, _, _) = f.fs.open(&ctx(), main, libc::O_RDWR as u32, 0).unwrap();
    let h = h.unwrap_or(0);
    assert_eq!(
        code(f.fs.fallocate(&ctx(), main, h, 0, 0, 1 << 20)),
        libc::ENOSPC
    );
    // SAFETY: stat64 is plain data; all zeroes is a valid value.
    let mut attr: stat64 = unsafe { std::mem::zeroed() };
    attr.st_size = 1 << 30;
    assert_eq!(
        code(f.fs.setattr(&ctx(), main, attr, None, SetattrValid::SIZE)),
        libc::ENOSPC
    );
    // Freeing space stays possible: shrink, punch a hole, remove.
    attr.st_size = 2;
    f.fs.setattr(&ctx(), main, attr, None, SetattrValid::SIZE)
        .unwrap();
    f.fs.fallocate(
        &ctx(),
        main,
        h,
        (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u32,
        0,
        2,
    )
    .unwrap();
    f.fs.unlink(&ctx(), src, &c("main.rs")).unwrap();
    assert!(!f.root.join("src/main.rs").exists());
    // Without a floor the same create works.
    let g = fixture_with(Some(sandpen_policy::Reserve::Bytes(0)));
    let src = g.path("src").unwrap().inode;
    g.fs.create(&ctx(), src, &c("new"), args).unwrap();
}
