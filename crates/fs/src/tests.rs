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
    fixture_with(&[(FileRuleKind::Secret, "secrets/**")], &[])
}

/// The defaults, `extra` rules, and `files` besides the usual ones.
fn fixture_with(extra: &[(FileRuleKind, &str)], files: &[&str]) -> Fixture {
    fixture_reserving(extra, files, None)
}

/// [`fixture_with`], keeping `reserve` free on the state folder's disk.
fn fixture_reserving(
    extra: &[(FileRuleKind, &str)],
    files: &[&str],
    reserve: Option<sandpen_policy::Reserve>,
) -> Fixture {
    fixture_full(extra, files, reserve, &[])
}

/// [`fixture_with`] and exceptions to the deny-read rules.
fn fixture_excepting(extra: &[(FileRuleKind, &str)], files: &[&str], allow: &[&str]) -> Fixture {
    fixture_full(extra, files, None, allow)
}

fn fixture_full(
    extra: &[(FileRuleKind, &str)],
    files: &[&str],
    reserve: Option<sandpen_policy::Reserve>,
    allow: &[&str],
) -> Fixture {
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
    for p in files {
        let p = root.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, "x").unwrap();
    }
    std::fs::write(dir.path().join("outside"), "HOST").unwrap();
    std::os::unix::fs::symlink(dir.path().join("outside"), root.join("link")).unwrap();
    let mut rules = compile(&[], false).unwrap();
    for (kind, pattern) in extra {
        rules.push(PathRule::new(*kind, pattern, FileRuleSource::Text("test".into())).unwrap());
    }
    for p in allow {
        rules.push_read_exception(p.into(), FileRuleSource::Text("test".into()));
    }
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
fn a_secret_keeps_its_name_and_paths_follow_renames() {
    let f = fixture();
    let store = LabelStore::in_dir(&f.state);
    // A secret moved to an ordinary name is EXDEV (`mv` then copies it,
    // reading it through the rules); nothing moved, nothing read.
    let secrets = f.path("secrets").unwrap().inode;
    assert_eq!(
        code(f.fs.rename(&ctx(), secrets, &c("token"), ROOT_ID, &c("plain"), 0)),
        libc::EXDEV
    );
    assert!(f.root.join("secrets/token").exists());
    assert!(store.load().unwrap().get(Label::SecretRead).is_none());
    // Within the secret folder it moves.
    f.fs.rename(&ctx(), secrets, &c("token"), secrets, &c("t2"), 0)
        .unwrap();
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
    assert_eq!(
        code(f.fs.link(&ctx(), token, ROOT_ID, &c("plain"))),
        libc::EXDEV
    );
    assert!(!f.root.join("plain").exists());
    // A second name inside the secret folder is fine, and still a secret.
    let secrets = f.path("secrets").unwrap().inode;
    f.fs.link(&ctx(), token, secrets, &c("again")).unwrap();
    let again = f.path("secrets/again").unwrap().inode;
    f.fs.open(&ctx(), again, libc::O_RDONLY as u32, 0).unwrap();
    assert!(store.load().unwrap().get(Label::SecretRead).is_some());
}

fn rules_for_renames() -> Fixture {
    fixture_with(
        &[
            (FileRuleKind::DenyRead, "private/**"),
            (FileRuleKind::DenyRead, "work/private/**"),
            (FileRuleKind::DenyRead, "**/vault/**"),
            (FileRuleKind::ReadOnly, "ci/*.yml"),
            (FileRuleKind::Secret, "secrets/**"),
            (FileRuleKind::Secret, "**/keys/**"),
        ],
        &[
            "private/x",
            "work/private/x",
            "top/vault/x",
            "ci/a.yml",
            "home/keys/id",
            "public/y",
            "sub/.git/config",
            "sub/.git/hooks/pre-commit",
            "sub/plain/z",
        ],
    )
}

/// `mv private p2 && cat p2/x`, for every kind of rule, the folder above
/// the match and the one above that, `**/` rules included.
#[test]
fn renaming_a_parent_or_grandparent_never_escapes_a_rule() {
    let f = rules_for_renames();
    let store = LabelStore::in_dir(&f.state);
    let mv = |from: &str, to: &str| {
        let (fd, fname) = from.rsplit_once('/').unwrap_or(("", from));
        let (td, tname) = to.rsplit_once('/').unwrap_or(("", to));
        let dir = |d: &str| {
            if d.is_empty() {
                ROOT_ID
            } else {
                f.path(d).unwrap().inode
            }
        };
        code(f.fs.rename(&ctx(), dir(fd), &c(fname), dir(td), &c(tname), 0))
    };
    for (from, to, want, what) in [
        ("private", "p2", libc::EXDEV, "deny_read, parent"),
        ("work", "w2", libc::EXDEV, "deny_read, grandparent"),
        (
            "work/private",
            "work/p2",
            libc::EXDEV,
            "deny_read, parent, deeper",
        ),
        ("top/vault", "top/v2", libc::EXDEV, "deny_read **/, parent"),
        ("secrets", "s2", libc::EXDEV, "flow.secret, parent"),
        (
            "home/keys",
            "home/k2",
            libc::EXDEV,
            "flow.secret **/, parent",
        ),
        ("ci", "c2", libc::EROFS, "read_only, parent"),
        (
            "sub/.git",
            "sub/g",
            libc::EROFS,
            "read_only **/.git/config, parent",
        ),
        (
            "sub/.git/hooks",
            "sub/h",
            libc::EROFS,
            "read_only **/.git/hooks/**, parent",
        ),
        (
            "sub/plain",
            "sub/.git/modules",
            libc::EROFS,
            "a folder into .git",
        ),
        ("sub/plain", ".git", libc::EROFS, "a folder becoming a .git"),
    ] {
        assert_eq!(mv(from, to), want, "{what}: {from} -> {to}");
    }
    for p in [
        "private/x",
        "work/private/x",
        "top/vault/x",
        "secrets/token",
        "home/keys/id",
        "ci/a.yml",
        "sub/.git/config",
    ] {
        assert!(f.root.join(p).exists(), "{p} moved");
    }
    assert!(store.load().unwrap().get(Label::SecretRead).is_none());
    // Moves that keep every rule over what they carry still work: the
    // grandparent of a `**/` match, a nested repository as a whole.
    assert_eq!(mv("top", "t2"), 0);
    assert_eq!(
        code(f.path("t2/vault/x")),
        libc::ENOENT,
        "hidden after the move"
    );
    let config = f.path("sub/.git/config").unwrap().inode;
    assert_eq!(mv("sub", "sub2"), 0);
    assert_eq!(
        code(f.fs.open(&ctx(), config, libc::O_WRONLY as u32, 0)),
        libc::EROFS,
        "the known inode follows the move"
    );
    assert_eq!(f.fs.known(config).0, vec![Path::new("sub2/.git/config")]);
    // Into a rule is allowed where it only hides or labels more.
    assert_eq!(mv("public", "secrets/public"), 0);
    let log = std::fs::read_to_string(f.state.join("files.jsonl")).unwrap();
    assert!(
        log.contains("\"op\":\"rename\"") && log.contains("EXDEV") && log.contains("private/**"),
        "{log}"
    );
}

#[test]
fn rename_exchange_and_whiteout() {
    let f = rules_for_renames();
    let public = f.path("public").unwrap().inode;
    let y = f.path("public/y").unwrap().inode;
    let exchange = |a: &str, b: &str| {
        code(f.fs.rename(
            &ctx(),
            ROOT_ID,
            &c(a),
            ROOT_ID,
            &c(b),
            libc::RENAME_EXCHANGE,
        ))
    };
    // A protected folder and an unprotected one, either way round.
    assert_eq!(exchange("private", "public"), libc::EXDEV);
    assert_eq!(exchange("public", "private"), libc::EXDEV);
    assert_eq!(exchange("secrets", "public"), libc::EXDEV);
    assert_eq!(exchange("ci", "public"), libc::EROFS);
    assert_eq!(exchange("public", "ci"), libc::EROFS);
    let sub = f.path("sub").unwrap().inode;
    assert_eq!(
        code(f.fs.rename(
            &ctx(),
            sub,
            &c(".git"),
            sub,
            &c("plain"),
            libc::RENAME_EXCHANGE
        )),
        libc::EROFS
    );
    assert!(f.root.join("private/x").exists() && f.root.join("public/y").exists());
    // Two ordinary folders swap, and the known inodes below follow.
    std::fs::create_dir_all(f.root.join("other")).unwrap();
    assert_eq!(exchange("public", "other"), 0);
    assert!(f.root.join("other/y").exists());
    assert_eq!(f.fs.known(y).0, vec![Path::new("other/y")]);
    assert_eq!(f.fs.known(public).0, vec![Path::new("other")]);
    // A whiteout would leave a device node behind.
    assert_eq!(
        code(f.fs.rename(
            &ctx(),
            ROOT_ID,
            &c("other"),
            ROOT_ID,
            &c("o2"),
            libc::RENAME_WHITEOUT
        )),
        libc::EPERM
    );
}

#[test]
fn a_hard_link_never_takes_a_file_out_from_under_a_rule() {
    let f = rules_for_renames();
    let id = f.path("home/keys/id").unwrap().inode;
    let yml = f.path("ci/a.yml").unwrap().inode;
    let config = f.path("sub/.git/config").unwrap().inode;
    let y = f.path("public/y").unwrap().inode;
    let plain = f.path("sub/plain").unwrap().inode;
    let sub = f.path("sub").unwrap().inode;
    assert_eq!(code(f.fs.link(&ctx(), id, ROOT_ID, &c("id"))), libc::EXDEV);
    assert_eq!(
        code(f.fs.link(&ctx(), yml, ROOT_ID, &c("a.yml"))),
        libc::EROFS
    );
    assert_eq!(
        code(f.fs.link(&ctx(), config, ROOT_ID, &c("cfg"))),
        libc::EROFS
    );
    // Nor a gitfile, nor a file into the protected git metadata.
    assert_eq!(code(f.fs.link(&ctx(), y, plain, &c(".git"))), libc::EROFS);
    let git = f.path("sub/.git").unwrap().inode;
    assert_eq!(
        code(f.fs.link(&ctx(), y, git, &c("commondir"))),
        libc::EROFS
    );
    assert_eq!(code(f.fs.link(&ctx(), y, sub, &c("y"))), 0);
    for p in ["id", "a.yml", "cfg", "sub/plain/.git", "sub/.git/commondir"] {
        assert!(!f.root.join(p).exists(), "{p} was made");
    }
}

#[test]
fn git_metadata_is_read_only_at_any_depth() {
    let f = fixture_with(
        &[],
        &[
            "sub/.git/HEAD",
            "sub/.git/config",
            ".git/modules/lib/config",
            ".git/worktrees/w/HEAD",
            "plain/readme",
            "mod/.git",
        ],
    );
    let args = || CreateIn {
        flags: libc::O_WRONLY as u32,
        mode: 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    let git = f.path(".git").unwrap().inode;
    let sub_git = f.path("sub/.git").unwrap().inode;
    let modules_lib = f.path(".git/modules/lib").unwrap().inode;
    let wt = f.path(".git/worktrees/w").unwrap().inode;
    let plain = f.path("plain").unwrap().inode;
    for (dir, name) in [
        (git, "commondir"),
        (sub_git, "commondir"),
        (wt, "gitdir"),
        (modules_lib, "config.worktree"),
    ] {
        assert_eq!(
            code(f.fs.create(&ctx(), dir, &c(name), args())),
            libc::EROFS,
            "{name}"
        );
    }
    for p in [
        "sub/.git/config",
        ".git/modules/lib/config",
        ".git/worktrees/w/HEAD",
    ] {
        let ino = f.path(p).unwrap().inode;
        assert_eq!(
            code(f.fs.open(&ctx(), ino, libc::O_WRONLY as u32, 0)),
            libc::EROFS,
            "{p}"
        );
    }
    // `objects/info/alternates` and a missing hooks folder made a symlink.
    let objects =
        f.fs.mkdir(&ctx(), sub_git, &c("objects"), 0o755, 0)
            .unwrap();
    let info =
        f.fs.mkdir(&ctx(), objects.inode, &c("info"), 0o755, 0)
            .unwrap();
    assert_eq!(
        code(f.fs.create(&ctx(), info.inode, &c("alternates"), args())),
        libc::EROFS
    );
    assert_eq!(
        code(f.fs.create(&ctx(), info.inode, &c("packs"), args())),
        0
    );
    for (dir, name) in [(sub_git, "hooks"), (git, "x"), (info.inode, "l")] {
        assert_eq!(
            code(f.fs.symlink(&ctx(), &c("../../evil"), dir, &c(name))),
            libc::EROFS,
            "{name}"
        );
    }
    // A gitfile anywhere: created, made by mknod, renamed into place.
    assert_eq!(
        code(f.fs.create(&ctx(), plain, &c(".git"), args())),
        libc::EROFS
    );
    assert_eq!(
        code(f.fs.mknod(&ctx(), plain, &c(".git"), libc::S_IFREG | 0o644, 0, 0)),
        libc::EROFS
    );
    assert_eq!(
        code(f.fs.symlink(&ctx(), &c("../sub/.git"), plain, &c(".git"))),
        libc::EROFS
    );
    assert_eq!(
        code(f.fs.rename(&ctx(), plain, &c("readme"), plain, &c(".git"), 0)),
        libc::EROFS
    );
    assert!(!f.root.join("plain/.git").exists());
    // An existing gitfile (a submodule's) is neither changed nor removed.
    let gitfile = f.path("mod/.git").unwrap().inode;
    assert_eq!(
        code(f.fs.open(&ctx(), gitfile, libc::O_WRONLY as u32, 0)),
        libc::EROFS
    );
    let m = f.path("mod").unwrap().inode;
    assert_eq!(code(f.fs.unlink(&ctx(), m, &c(".git"))), libc::EROFS);
    assert_eq!(
        code(f.fs.rename(&ctx(), m, &c(".git"), m, &c("g"), 0)),
        libc::EROFS
    );
    // A folder `.git` is ordinary, and what git itself does there works.
    let g = f.fs.mkdir(&ctx(), plain, &c(".git"), 0o755, 0).unwrap();
    let (e, _, _, _) =
        f.fs.create(&ctx(), sub_git, &c("index.lock"), args())
            .unwrap();
    f.fs.rename(&ctx(), sub_git, &c("index.lock"), sub_git, &c("index"), 0)
        .unwrap();
    assert_eq!(f.fs.known(e.inode).0, vec![Path::new("sub/.git/index")]);
    assert_eq!(code(f.fs.create(&ctx(), g.inode, &c("HEAD"), args())), 0);
}

#[test]
fn the_guest_cannot_make_the_server_hold_more_than_the_caps() {
    let many: Vec<String> = (0..20).map(|i| format!("many/f{i}")).collect();
    let names: Vec<&str> = many.iter().map(String::as_str).collect();
    let f = fixture_with(&[], &names);
    let fs = f.fs;
    let fs = fs.with_limits(crate::Limits {
        inodes: 8,
        handles: 4,
    });
    let dir = fs.lookup(&ctx(), ROOT_ID, &c("many")).unwrap().inode;
    // Lookups without a FORGET: the root, `many` and six more, then ENFILE.
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..20 {
        match fs.lookup(&ctx(), dir, &c(&format!("f{i}"))) {
            Ok(e) => held.push(e.inode),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENFILE));
                refused += 1;
            }
        }
    }
    assert_eq!((held.len(), refused), (6, 14));
    assert_eq!(fs.known(ROOT_ID).1, 8);
    // A listing past the cap still lists every name, without holding them.
    let (h, _) = fs.opendir(&ctx(), dir, 0).unwrap();
    let mut listed = 0;
    fs.readdirplus(&ctx(), dir, h.unwrap(), 65536, 0, &mut |_, _| {
        listed += 1;
        Ok(1)
    })
    .unwrap();
    assert_eq!(listed, 20);
    assert_eq!(fs.known(ROOT_ID).1, 8);
    fs.releasedir(&ctx(), dir, 0, h.unwrap()).unwrap();
    // A FORGET makes room again (the lookup, and the listing's).
    fs.forget(&ctx(), held[0], 2);
    assert!(fs.lookup(&ctx(), dir, &c("f19")).is_ok());
    // Handles: four open, the fifth refused, a release makes room.
    let mut handles = Vec::new();
    for _ in 0..4 {
        let (h, _, _) = fs.open(&ctx(), held[1], libc::O_RDONLY as u32, 0).unwrap();
        handles.push(h.unwrap());
    }
    assert_eq!(
        code(fs.open(&ctx(), held[1], libc::O_RDONLY as u32, 0)),
        libc::ENFILE
    );
    assert_eq!(code(fs.opendir(&ctx(), dir, 0)), libc::ENFILE);
    // A made-up handle frees nothing.
    assert!(fs
        .release(&ctx(), held[1], 0, 999_999, false, false, None)
        .is_err());
    assert_eq!(
        code(fs.open(&ctx(), held[1], libc::O_RDONLY as u32, 0)),
        libc::ENFILE
    );
    fs.release(&ctx(), held[1], 0, handles[0], false, false, None)
        .unwrap();
    assert!(fs.open(&ctx(), held[1], libc::O_RDONLY as u32, 0).is_ok());
}

/// A folder the guest forgot while it still holds something below stays
/// known (and keeps its inode number in the passthrough layer), so a later
/// rename of it moves what is below; forgetting everything frees it all.
#[test]
fn folders_stay_known_while_something_below_is() {
    let f = fixture_with(&[], &["a/b/c/f"]);
    let a = f.lookup(ROOT_ID, "a").unwrap().inode;
    let b = f.lookup(a, "b").unwrap().inode;
    let c_ = f.lookup(b, "c").unwrap().inode;
    let file = f.lookup(c_, "f").unwrap().inode;
    let before = f.fs.known(ROOT_ID).1;
    for ino in [a, b, c_] {
        f.fs.forget(&ctx(), ino, 1);
    }
    assert_eq!(f.fs.known(ROOT_ID).1, before);
    // A forget of more than was handed out takes no more.
    f.fs.forget(&ctx(), a, 1000);
    assert_eq!(
        f.lookup(ROOT_ID, "a").unwrap().inode,
        a,
        "the same inode number"
    );
    f.fs.rename(&ctx(), ROOT_ID, &c("a"), ROOT_ID, &c("z"), 0)
        .unwrap();
    assert_eq!(f.fs.known(file).0, vec![Path::new("z/b/c/f")]);
    f.fs.forget(&ctx(), a, 1);
    f.fs.forget(&ctx(), file, 1);
    assert_eq!(f.fs.known(ROOT_ID).1, before - 4);
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
    let f = fixture_reserving(
        &[(FileRuleKind::Secret, "secrets/**")],
        &[],
        Some(sandpen_policy::Reserve::Bytes(u64::MAX / 4)),
    );
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
    let g = fixture_reserving(
        &[(FileRuleKind::Secret, "secrets/**")],
        &[],
        Some(sandpen_policy::Reserve::Bytes(0)),
    );
    let src = g.path("src").unwrap().inode;
    g.fs.create(&ctx(), src, &c("new"), args).unwrap();
}

/// `[files] allow_read` (an approved `sandpen-request file read PATH`):
/// the one path it names is served though a deny-read rule matches it;
/// nothing else is, and the guest cannot move a hidden file onto it.
#[test]
fn a_read_exception_reveals_its_one_path_and_nothing_else() {
    let files = [
        ".env.example",
        "other/.env.example",
        "vault/key",
        "deep/vault/key",
    ];
    let plain = fixture_with(&[(FileRuleKind::DenyRead, "vault")], &files);
    assert_eq!(
        code(plain.lookup(ROOT_ID, ".env.example")),
        libc::ENOENT,
        "hidden without the exception"
    );
    drop(plain);
    let f = fixture_excepting(
        &[(FileRuleKind::DenyRead, "vault")],
        &files,
        &[
            ".env.example",
            "sub/.env.example",
            "vault",
            "deep/vault/key",
        ],
    );
    let e = f.path(".env.example").unwrap();
    let (h, _, _) =
        f.fs.open(&ctx(), e.inode, libc::O_RDONLY as u32, 0)
            .unwrap();
    assert!(h.is_some());
    let names = f.names(ROOT_ID);
    assert!(names.contains(&".env.example".to_string()), "{names:?}");
    assert!(!names.contains(&".env".to_string()), "{names:?}");
    assert_eq!(code(f.lookup(ROOT_ID, ".env")), libc::ENOENT);
    assert_eq!(code(f.path("other/.env.example")), libc::ENOENT);
    // A folder excepted: itself visible, what is in it still decided by
    // the rules (`vault/key` is below a `vault`).
    f.path("vault").unwrap();
    assert_eq!(code(f.path("vault/key")), libc::ENOENT);
    // Below a folder a rule hides, the exception does not reach.
    assert_eq!(code(f.path("deep/vault/key")), libc::ENOENT);
    // Moving a folder that holds a hidden `.env.example` to where the
    // exception points would reveal it: refused, like any move out from
    // under a deny-read rule.
    assert_eq!(
        code(f.fs.rename(&ctx(), ROOT_ID, &c("other"), ROOT_ID, &c("sub"), 0)),
        libc::EXDEV
    );
    assert!(f.root.join("other/.env.example").exists());
    assert_eq!(code(f.path("sub/.env.example")), libc::ENOENT);
    // The same folder to a name no exception covers is fine.
    assert_eq!(
        code(f.fs.rename(&ctx(), ROOT_ID, &c("other"), ROOT_ID, &c("o2"), 0)),
        0
    );
    assert_eq!(code(f.path("o2/.env.example")), libc::ENOENT);
    // The rules travel to the server process with the exceptions.
    let mut rules = compile(&[], false).unwrap();
    rules.push_read_exception(".env.example".into(), FileRuleSource::Text("t".into()));
    let back = crate::rules_from_json(&crate::rules_to_json(&rules)).unwrap();
    assert_eq!(back.read_exceptions().len(), 1);
    assert!(back.hidden(Path::new(".env.example")).is_none());
    assert!(back.hidden(Path::new(".env.local")).is_some());
    assert!(
        crate::rules_from_json(r#"[{"kind":"allow_read","pattern":"../x","source":"t"}]"#).is_err()
    );
}
