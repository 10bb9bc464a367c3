//! The policy layer: a [`FileSystem`] that wraps the passthrough file system
//! and puts every FUSE operation through the share's [`FileRules`].
//!
//! The guest speaks in inodes, the rules in paths. The layer keeps, for every
//! inode it has handed out, its file type and its names as links (folder
//! inode, name), so a path is built by walking up to the root and a rename
//! changes one link whatever is known below it. A folder stays known while
//! something below it is. Names that come from the guest are checked before
//! they reach the passthrough layer: no `/`, no `.` or `..`, not empty.
//!
//! Rules follow the file, not its name: a rename or hard link that would
//! take anything out from under a rule is refused (see
//! [`FileRules::rename`]), so what a rule covers keeps its rule whatever it
//! is called later.
//!
//! What the guest gets:
//!
//! - a hidden (deny-read) path: `ENOENT` for lookup, getattr, open, xattr,
//!   unlink and rename (either side), and it is left out of directory
//!   listings; creating something there is `EACCES` whether or not it exists.
//! - a read-only path: `EROFS` for every change (write-open, truncate,
//!   create, mknod, mkdir, symlink, link, unlink, rmdir, rename to or from,
//!   setattr, setxattr, removexattr, fallocate), and for a rename of a
//!   folder that would change what a read-only rule covers below it.
//! - a rename that would move something hidden or secret out from under its
//!   rule (the folder above a `private/**`, a secret file to an ordinary
//!   name): `EXDEV`, so `mv` copies instead, file by file, through the rules;
//!   a hard link to a secret under an ordinary name: `EXDEV`.
//! - past the caps ([`Limits`]): `ENFILE` for a lookup of one more inode or
//!   an open of one more handle.
//! - never: a device node (nor a rename with `RENAME_WHITEOUT`, which makes
//!   one: `EPERM`), an open of anything but a regular file or a
//!   folder (a symlink is only ever read with readlink, so the host never
//!   follows it), a set-uid or set-gid bit, an ioctl, a DAX mapping.

use std::collections::HashMap;
use std::ffi::{CStr, OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, FsOptions, GetxattrReply, ListxattrReply,
    OpenOptions, SetattrValid, ZeroCopyReader, ZeroCopyWriter, ROOT_ID,
};
use sandpen_policy::files::{EntryKind, MoveRefused, ReadOnlyBy};
use sandpen_policy::FileRules;

use crate::events::Events;
use crate::reserve::{DiskReserve, ENTRY_BYTES};

/// How guest ids and host ids correspond.
#[derive(Debug, Clone, Copy)]
pub struct IdMap {
    /// The guest user that stands for the invoking host user.
    pub guest_uid: u32,
    pub guest_gid: u32,
    /// The invoking host user (the server's own ids).
    pub host_uid: u32,
    pub host_gid: u32,
}

impl IdMap {
    fn show_to_guest(&self, st: &mut stat64) {
        if st.st_uid == self.host_uid {
            st.st_uid = self.guest_uid;
        }
        if st.st_gid == self.host_gid {
            st.st_gid = self.guest_gid;
        }
    }

    fn uid_to_host(&self, uid: u32) -> u32 {
        if uid == self.guest_uid {
            self.host_uid
        } else {
            uid
        }
    }

    fn gid_to_host(&self, gid: u32) -> u32 {
        if gid == self.guest_gid {
            self.host_gid
        } else {
            gid
        }
    }
}

/// The most names one inode is remembered under (hard links; a name the
/// guest removed stays until the inode is forgotten, so that an open
/// deleted file keeps its rules).
const MAX_NAMES: usize = 16;
/// Folders above a node, at most (a guard against a cycle in the records).
const MAX_DEPTH: usize = 4096;

/// The caps on what the guest can make the server hold (docs/files.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Inodes known at once (each is an `O_PATH` descriptor in the
    /// passthrough layer); a lookup past it is `ENFILE`.
    pub inodes: usize,
    /// Open files and folders at once (each a descriptor); an open past it
    /// is `ENFILE`.
    pub handles: usize,
}

impl Limits {
    /// The default caps: 262144 inodes and 16384 handles, less when the
    /// process may not have that many descriptors (a quarter of the limit
    /// for handles, the rest less 256 for inodes).
    pub fn for_fd_limit(fds: u64) -> Limits {
        let fds = usize::try_from(fds).unwrap_or(usize::MAX);
        let handles = (fds / 4).clamp(64, 16384);
        let inodes = fds.saturating_sub(handles + 256).clamp(256, 262_144);
        Limits { inodes, handles }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::for_fd_limit(u64::MAX)
    }
}

/// One name of a node: the folder it is in, and its name there.
type Link = (u64, OsString);

struct Node {
    /// `st_mode & S_IFMT`.
    kind: u32,
    /// Lookups handed out to the guest and not yet forgotten.
    refs: u64,
    /// Known nodes whose names are in this folder: a folder stays known
    /// while something below it is, so their paths can be built.
    children: u64,
    /// The passthrough layer holds one lookup of this node for the layer
    /// itself (the guest forgot it while it had children), so its inode
    /// number stays the same.
    pinned: bool,
    /// Its names, first the first one; a folder has one (the root none).
    links: Vec<Link>,
}

/// The inodes handed out and their names, as a tree of (folder, name)
/// links: a rename changes one link, whatever the tree holds below it.
struct Tree {
    nodes: HashMap<u64, Node>,
    /// Which node each (folder, name) is now.
    dentries: HashMap<Link, u64>,
    max: usize,
}

impl Tree {
    fn new(max: usize) -> Tree {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT_ID,
            Node {
                kind: libc::S_IFDIR,
                refs: 1,
                children: 0,
                pinned: false,
                links: Vec::new(),
            },
        );
        Tree {
            nodes,
            dentries: HashMap::new(),
            max,
        }
    }

    /// The path of a folder, relative to the root.
    fn dir_path(&self, mut inode: u64) -> io::Result<PathBuf> {
        let mut names = Vec::new();
        while inode != ROOT_ID {
            let node = self.nodes.get(&inode).ok_or_else(|| err(libc::ENOENT))?;
            let (parent, name) = node.links.first().ok_or_else(|| err(libc::ENOENT))?;
            if names.len() >= MAX_DEPTH {
                return Err(err(libc::ENAMETOOLONG));
            }
            names.push(name.as_os_str());
            inode = *parent;
        }
        Ok(names.iter().rev().collect())
    }

    /// Every path of a node (one per name), and its type.
    fn paths(&self, inode: u64) -> io::Result<(Vec<PathBuf>, u32)> {
        let node = self.nodes.get(&inode).ok_or_else(|| err(libc::ENOENT))?;
        if inode == ROOT_ID {
            return Ok((vec![PathBuf::new()], node.kind));
        }
        let mut out = Vec::with_capacity(node.links.len());
        for (parent, name) in &node.links {
            out.push(self.dir_path(*parent)?.join(name));
        }
        Ok((out, node.kind))
    }

    fn kind_at(&self, parent: u64, name: &OsStr) -> Option<u32> {
        let ino = self.dentries.get(&(parent, name.to_os_string()))?;
        self.nodes.get(ino).map(|n| n.kind)
    }

    fn add_link(&mut self, inode: u64, link: Link) {
        if let Some(p) = self.nodes.get_mut(&link.0) {
            p.children += 1;
        }
        self.dentries.insert(link.clone(), inode);
        if let Some(n) = self.nodes.get_mut(&inode) {
            n.links.push(link);
        }
    }

    /// Takes one name from a node; what that leaves unneeded is dropped, and
    /// the lookups to give back to the passthrough layer are added to `back`.
    fn remove_link(&mut self, inode: u64, link: &Link, back: &mut Vec<u64>) {
        let Some(n) = self.nodes.get_mut(&inode) else {
            return;
        };
        let Some(i) = n.links.iter().position(|l| l == link) else {
            return;
        };
        n.links.remove(i);
        if self.dentries.get(link) == Some(&inode) {
            self.dentries.remove(link);
        }
        self.child_gone(link.0, back);
    }

    fn child_gone(&mut self, parent: u64, back: &mut Vec<u64>) {
        if let Some(p) = self.nodes.get_mut(&parent) {
            p.children = p.children.saturating_sub(1);
        }
        self.drop_if_unused(parent, back);
    }

    /// Drops a node nothing holds any more (and then maybe its folders).
    fn drop_if_unused(&mut self, inode: u64, back: &mut Vec<u64>) {
        let mut todo = vec![inode];
        while let Some(ino) = todo.pop() {
            if ino == ROOT_ID {
                continue;
            }
            let unused = matches!(self.nodes.get(&ino), Some(n) if n.refs == 0 && n.children == 0);
            if !unused {
                continue;
            }
            let Some(node) = self.nodes.remove(&ino) else {
                continue;
            };
            if node.pinned {
                back.push(ino);
            }
            for link in node.links {
                if self.dentries.get(&link) == Some(&ino) {
                    self.dentries.remove(&link);
                }
                if let Some(p) = self.nodes.get_mut(&link.0) {
                    p.children = p.children.saturating_sub(1);
                }
                todo.push(link.0);
            }
        }
    }

    /// Records one lookup of `inode` under `link`. `ENFILE` for a new
    /// inode past the cap, `EMLINK` past the cap on names.
    fn record(&mut self, inode: u64, kind: u32, link: Link, back: &mut Vec<u64>) -> io::Result<()> {
        if !self.nodes.contains_key(&inode) {
            if self.nodes.len() >= self.max {
                return Err(err(libc::ENFILE));
            }
            self.nodes.insert(
                inode,
                Node {
                    kind,
                    refs: 0,
                    children: 0,
                    pinned: false,
                    links: Vec::new(),
                },
            );
        }
        let (has, first, count) = {
            let n = &self.nodes[&inode];
            (
                n.links.contains(&link),
                n.links.first().cloned(),
                n.links.len(),
            )
        };
        if kind == libc::S_IFDIR {
            // A folder has one name; a new one means it moved on the host.
            if first.as_ref() != Some(&link) {
                if let Some(old) = first {
                    self.add_link(inode, link);
                    self.remove_link(inode, &old, back);
                } else {
                    self.add_link(inode, link);
                }
            }
        } else if !has {
            if count >= MAX_NAMES {
                // Forget the refs taken so far only if the node is new.
                self.drop_if_unused(inode, back);
                return Err(err(libc::EMLINK));
            }
            self.add_link(inode, link);
        } else {
            // The name is current again (it may have been replaced).
            self.dentries.insert(link, inode);
        }
        if let Some(n) = self.nodes.get_mut(&inode) {
            n.kind = kind;
            n.refs = n.refs.saturating_add(1);
        }
        Ok(())
    }

    /// The guest forgets `count` lookups; returns how many to pass on to
    /// the passthrough layer (one is kept while the node has children).
    fn forget(&mut self, inode: u64, count: u64, back: &mut Vec<u64>) -> u64 {
        if inode == ROOT_ID {
            return 0;
        }
        let Some(n) = self.nodes.get_mut(&inode) else {
            return 0;
        };
        let c = count.min(n.refs);
        n.refs -= c;
        let mut pass = c;
        if n.refs == 0 && n.children > 0 && !n.pinned && c > 0 {
            n.pinned = true;
            pass -= 1;
        }
        self.drop_if_unused(inode, back);
        pass
    }

    /// A lookup the passthrough layer already gave back (a listing entry
    /// that did not fit).
    fn unrecord(&mut self, inode: u64, back: &mut Vec<u64>) {
        if let Some(n) = self.nodes.get_mut(&inode) {
            n.refs = n.refs.saturating_sub(1);
        }
        self.drop_if_unused(inode, back);
    }

    /// The name (parent, name) no longer exists; the node keeps it.
    fn unlinked(&mut self, link: &Link) {
        self.dentries.remove(link);
    }

    fn relink(&mut self, inode: u64, from: &Link, to: Link, back: &mut Vec<u64>) {
        self.add_link(inode, to);
        self.remove_link(inode, from, back);
    }

    /// After a rename: one link changes, whatever is below.
    fn renamed(&mut self, from: Link, to: Link, exchange: bool, back: &mut Vec<u64>) {
        let a = self.dentries.get(&from).copied();
        let b = self.dentries.get(&to).copied();
        if !exchange {
            // What was at `to` is gone (it keeps the name while held).
            self.dentries.remove(&to);
        }
        if let Some(a) = a {
            self.relink(a, &from, to.clone(), back);
        }
        if exchange {
            if let Some(b) = b {
                self.relink(b, &to, from.clone(), back);
            }
            if let Some(a) = a {
                self.dentries.insert(to, a);
            }
        }
    }
}

/// The policy layer over `F`.
pub struct Guarded<F> {
    inner: F,
    rules: FileRules,
    ids: IdMap,
    /// The share's root on the host (for the audit log).
    root: PathBuf,
    tree: Mutex<Tree>,
    /// Open handles, with the path of the ones on files that match
    /// `flow.secret`: every read through one sets the label again (it may
    /// have been reset since the open).
    handles: Mutex<HashMap<u64, Option<PathBuf>>>,
    limits: Limits,
    events: Arc<Events>,
    /// Writes that would take the state folder's disk below its floor fail
    /// with `ENOSPC` (see [`crate::reserve`]).
    reserve: Option<Arc<DiskReserve>>,
}

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

const S_IFMT: u32 = libc::S_IFMT;

fn is_write_open(flags: u32) -> bool {
    let f = flags as i32;
    let acc = f & libc::O_ACCMODE;
    acc == libc::O_WRONLY || acc == libc::O_RDWR || f & (libc::O_TRUNC | libc::O_APPEND) != 0
}

fn is_read_open(flags: u32) -> bool {
    let acc = flags as i32 & libc::O_ACCMODE;
    acc == libc::O_RDONLY || acc == libc::O_RDWR
}

/// No set-uid or set-gid bit on anything the guest creates or re-modes: the
/// host user may be root, and the file lives on the host.
fn strip_mode(mode: u32) -> u32 {
    mode & !(libc::S_ISUID | libc::S_ISGID)
}

/// A name from the guest: one component, never `.` or `..`.
fn component(name: &CStr) -> io::Result<&Path> {
    let b = name.to_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(err(libc::EINVAL));
    }
    Ok(Path::new(std::ffi::OsStr::from_bytes(b)))
}

impl<F> Guarded<F>
where
    F: FileSystem<Inode = u64, Handle = u64>,
{
    pub fn new(inner: F, rules: FileRules, ids: IdMap, root: PathBuf, events: Arc<Events>) -> Self {
        let limits = Limits::default();
        Guarded {
            inner,
            rules,
            ids,
            root,
            tree: Mutex::new(Tree::new(limits.inodes)),
            handles: Mutex::new(HashMap::new()),
            limits,
            events,
            reserve: None,
        }
    }

    /// Keep the disk reserve.
    pub fn with_reserve(mut self, reserve: Option<Arc<DiskReserve>>) -> Self {
        self.reserve = reserve;
        self
    }

    /// `ENOSPC` when adding `bytes` would go below the reserve.
    fn admit(&self, bytes: u64) -> io::Result<()> {
        match &self.reserve {
            Some(r) => r.admit(bytes),
            None => Ok(()),
        }
    }

    /// The same with other caps (before the first request).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self.tree().max = limits.inodes;
        self
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The share's root on the host (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn tree(&self) -> MutexGuard<'_, Tree> {
        // A panic while holding the tree leaves it usable (at worst a count
        // is off, which keeps a node longer), so a poisoned lock is usable.
        self.tree.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handles(&self) -> MutexGuard<'_, HashMap<u64, Option<PathBuf>>> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives lookups back to the passthrough layer.
    fn give_back(&self, back: Vec<u64>) {
        let ctx = Context::new();
        for ino in back {
            self.inner.forget(&ctx, ino, 1);
        }
    }

    /// The paths of a known inode, and how many inodes are known.
    #[cfg(test)]
    pub(crate) fn known(&self, inode: u64) -> (Vec<PathBuf>, usize) {
        let tree = self.tree();
        let paths = tree.paths(inode).map(|p| p.0).unwrap_or_default();
        (paths, tree.nodes.len())
    }

    /// The paths and type of a known inode; `ENOENT` for one never handed out.
    fn node(&self, inode: u64) -> io::Result<(Vec<PathBuf>, u32)> {
        self.tree().paths(inode)
    }

    /// The path of a folder (folders have exactly one).
    fn dir(&self, inode: u64) -> io::Result<PathBuf> {
        let tree = self.tree();
        let kind = tree
            .nodes
            .get(&inode)
            .map(|n| n.kind)
            .ok_or_else(|| err(libc::ENOENT))?;
        if kind != libc::S_IFDIR {
            return Err(err(libc::ENOTDIR));
        }
        tree.dir_path(inode)
    }

    /// The type of the entry `name` in `parent`: from the records, else
    /// asked of the passthrough layer (a lookup given back at once).
    fn kind_at(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<u32> {
        let os = OsStr::from_bytes(name.to_bytes());
        if let Some(kind) = self.tree().kind_at(parent, os) {
            return Ok(kind);
        }
        let e = self.inner.lookup(ctx, parent, name)?;
        if e.inode != 0 {
            self.inner.forget(ctx, e.inode, 1);
        }
        Ok(e.attr.st_mode & S_IFMT)
    }

    fn child(&self, parent: u64, name: &CStr) -> io::Result<PathBuf> {
        let name = component(name)?;
        Ok(self.dir(parent)?.join(name))
    }

    /// [`visible`](Self::visible) for every name of an inode.
    fn visible_all(&self, op: &str, rels: &[PathBuf]) -> io::Result<()> {
        rels.iter().try_for_each(|r| self.visible(op, r))
    }

    /// [`writable_entry`](Self::writable_entry) for every name of an inode
    /// of type `kind` (`S_IF*`).
    fn writable_all(&self, op: &str, rels: &[PathBuf], kind: u32) -> io::Result<()> {
        rels.iter()
            .try_for_each(|r| self.writable_entry(op, r, kind))
    }

    /// The first name of an inode that matches `flow.secret`.
    fn secret_name<'a>(&self, rels: &'a [PathBuf]) -> Option<&'a PathBuf> {
        rels.iter().find(|r| self.rules.secret(r).is_some())
    }

    fn host_path(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    /// `ENOENT` (and an audit line) if `rel` is hidden.
    fn visible(&self, op: &str, rel: &Path) -> io::Result<()> {
        match self.rules.hidden(rel) {
            Some(rule) => {
                self.events
                    .denied(op, &self.host_path(rel), &rule.to_string(), "ENOENT");
                Err(err(libc::ENOENT))
            }
            None => Ok(()),
        }
    }

    /// For creating an entry of type `kind` (`S_IF*`) at `rel`: `EACCES` if
    /// hidden (whether or not something is there, so nothing is revealed),
    /// `EROFS` if read-only or refused by the git guard.
    fn creatable(&self, op: &str, rel: &Path, kind: u32) -> io::Result<()> {
        if let Some(rule) = self.rules.hidden(rel) {
            self.events
                .denied(op, &self.host_path(rel), &rule.to_string(), "EACCES");
            return Err(err(libc::EACCES));
        }
        self.rules
            .creatable_entry(rel, EntryKind::from_mode(kind))
            .map_err(|by| self.erofs(op, rel, by))
    }

    fn erofs(&self, op: &str, rel: &Path, by: ReadOnlyBy<'_>) -> io::Error {
        if !matches!(by, ReadOnlyBy::Share) {
            self.events
                .denied(op, &self.host_path(rel), &by.to_string(), "EROFS");
        }
        err(libc::EROFS)
    }

    /// May the entry `rel` of type `kind` (`S_IF*`) be changed or removed?
    fn writable_entry(&self, op: &str, rel: &Path, kind: u32) -> io::Result<()> {
        self.rules
            .writable_entry(rel, EntryKind::from_mode(kind))
            .map_err(|by| self.erofs(op, rel, by))
    }

    /// A read of `rel` (or a move that would let it be read under another
    /// name): sets `secret-read` if it matches `flow.secret`. `EIO` when the
    /// label cannot be written: nothing is served without it.
    fn note_read(&self, op: &str, rel: &Path) -> io::Result<()> {
        match self.rules.secret(rel) {
            Some(rule) => self
                .events
                .secret_read(op, &self.host_path(rel), &rule.to_string())
                .map_err(|_| err(libc::EIO)),
            None => Ok(()),
        }
    }

    /// Remember an entry handed to the guest (by a lookup the passthrough
    /// layer counted) and put its ids in guest terms. Past a cap the lookup
    /// is given back and the answer is `ENFILE` (or `EMLINK`).
    fn record(&self, mut entry: Entry, parent: u64, name: &CStr) -> io::Result<Entry> {
        self.ids.show_to_guest(&mut entry.attr);
        if entry.inode == 0 || entry.inode == ROOT_ID {
            return Ok(entry);
        }
        let link = (parent, OsStr::from_bytes(name.to_bytes()).to_os_string());
        let kind = entry.attr.st_mode & S_IFMT;
        let mut back = Vec::new();
        let res = self.tree().record(entry.inode, kind, link, &mut back);
        self.give_back(back);
        match res {
            Ok(()) => Ok(entry),
            Err(e) => {
                self.inner.forget(&Context::new(), entry.inode, 1);
                Err(e)
            }
        }
    }

    fn forget_one(&self, ctx: &Context, inode: u64, count: u64) {
        let mut back = Vec::new();
        let pass = self.tree().forget(inode, count, &mut back);
        if pass > 0 {
            self.inner.forget(ctx, inode, pass);
        }
        self.give_back(back);
    }

    /// Counts a handle just opened; past the cap it is closed again.
    fn opened(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
        secret: Option<PathBuf>,
        dir: bool,
    ) -> io::Result<()> {
        let Some(h) = handle else {
            return Ok(());
        };
        let mut handles = self.handles();
        if handles.len() >= self.limits.handles {
            drop(handles);
            let _ = if dir {
                self.inner.releasedir(ctx, inode, 0, h)
            } else {
                self.inner.release(ctx, inode, 0, h, false, false, None)
            };
            return Err(err(libc::ENFILE));
        }
        handles.insert(h, secret);
        Ok(())
    }

    /// `ENFILE` when no handle can be opened now.
    fn handle_room(&self) -> io::Result<()> {
        if self.handles().len() >= self.limits.handles {
            return Err(err(libc::ENFILE));
        }
        Ok(())
    }

    /// `EROFS`, `ENOENT` (never said for a name the guest can see, so
    /// `EXDEV`) or `EXDEV` for a refused rename or link, with an audit line.
    fn refuse_move(&self, op: &str, rel: &Path, why: MoveRefused<'_>) -> io::Error {
        match why {
            MoveRefused::ReadOnly(by) => self.erofs(op, rel, by),
            MoveRefused::Hidden(r) | MoveRefused::Secret(r) => {
                self.events
                    .denied(op, &self.host_path(rel), &r.to_string(), "EXDEV");
                err(libc::EXDEV)
            }
        }
    }
}

impl<F> FileSystem for Guarded<F>
where
    F: FileSystem<Inode = u64, Handle = u64>,
{
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        // What the passthrough layer asks for, plus the protocol features a
        // virtio-fs server should offer: without BIG_WRITES and MAX_PAGES the
        // guest sends writes of at most 8 KiB, one request (a VM exit) each.
        // No HAS_IOCTL_DIR (ioctls are refused) and no SUBMOUNTS.
        let want = self.inner.init(capable)?;
        Ok(want
            | FsOptions::ASYNC_READ
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::BIG_WRITES
            | FsOptions::AUTO_INVAL_DATA
            | FsOptions::ASYNC_DIO
            | FsOptions::ATOMIC_O_TRUNC
            | FsOptions::MAX_PAGES)
    }

    fn destroy(&self) {
        self.inner.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let rel = self.child(parent, name)?;
        self.visible("lookup", &rel)?;
        let entry = self.inner.lookup(ctx, parent, name)?;
        self.record(entry, parent, name)
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        // What the passthrough layer is told is decided by the tree: it
        // keeps one lookup of a folder that still has known children.
        self.forget_one(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        for (inode, count) in requests {
            self.forget_one(ctx, inode, count);
        }
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        let (rels, _) = self.node(inode)?;
        self.visible_all("getattr", &rels)?;
        let (mut st, t) = self.inner.getattr(ctx, inode, handle)?;
        self.ids.show_to_guest(&mut st);
        Ok((st, t))
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        mut attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        let (rels, kind) = self.node(inode)?;
        self.visible_all("setattr", &rels)?;
        self.writable_all("setattr", &rels, kind)?;
        if valid.contains(SetattrValid::UID) {
            attr.st_uid = self.ids.uid_to_host(attr.st_uid);
        }
        if valid.contains(SetattrValid::GID) {
            attr.st_gid = self.ids.gid_to_host(attr.st_gid);
        }
        if valid.contains(SetattrValid::MODE) {
            attr.st_mode = strip_mode(attr.st_mode);
        }
        if valid.contains(SetattrValid::SIZE) && self.admit(0).is_err() {
            // Below the reserve a file may shrink, not grow.
            let (now, _) = self.inner.getattr(ctx, inode, handle)?;
            if attr.st_size > now.st_size {
                return Err(err(libc::ENOSPC));
            }
        }
        let (mut st, t) = self.inner.setattr(ctx, inode, attr, handle, valid)?;
        self.ids.show_to_guest(&mut st);
        Ok((st, t))
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        let (rels, _) = self.node(inode)?;
        self.visible_all("readlink", &rels)?;
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        let rel = self.child(parent, name)?;
        self.creatable("symlink", &rel, libc::S_IFLNK)?;
        self.admit(ENTRY_BYTES)?;
        let entry = self.inner.symlink(ctx, linkname, parent, name)?;
        self.record(entry, parent, name)
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        let rel = self.child(parent, name)?;
        self.creatable("mknod", &rel, mode & S_IFMT)?;
        match mode & S_IFMT {
            libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK => {}
            // Device nodes on the host's disk are the host's business.
            _ => return Err(err(libc::EPERM)),
        }
        self.admit(ENTRY_BYTES)?;
        let entry = self
            .inner
            .mknod(ctx, parent, name, strip_mode(mode), rdev, umask)?;
        self.record(entry, parent, name)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        let rel = self.child(parent, name)?;
        self.creatable("mkdir", &rel, libc::S_IFDIR)?;
        self.admit(ENTRY_BYTES)?;
        // A set-gid folder is ordinary and harmless; only set-uid goes.
        let entry = self
            .inner
            .mkdir(ctx, parent, name, mode & !libc::S_ISUID, umask)?;
        self.record(entry, parent, name)
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        let rel = self.child(parent, name)?;
        self.visible("unlink", &rel)?;
        let kind = self.kind_at(ctx, parent, name)?;
        self.writable_entry("unlink", &rel, kind)?;
        self.inner.unlink(ctx, parent, name)?;
        self.tree()
            .unlinked(&(parent, OsStr::from_bytes(name.to_bytes()).to_os_string()));
        Ok(())
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        let rel = self.child(parent, name)?;
        self.visible("rmdir", &rel)?;
        self.writable_entry("rmdir", &rel, libc::S_IFDIR)?;
        self.inner.rmdir(ctx, parent, name)?;
        self.tree()
            .unlinked(&(parent, OsStr::from_bytes(name.to_bytes()).to_os_string()));
        Ok(())
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        let from = self.child(olddir, oldname)?;
        let to = self.child(newdir, newname)?;
        self.visible("rename", &from)?;
        self.visible("rename", &to)?;
        if flags & libc::RENAME_WHITEOUT != 0 {
            // A whiteout is a character device left at the old name.
            return Err(err(libc::EPERM));
        }
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let kind = EntryKind::from_mode(self.kind_at(ctx, olddir, oldname)?);
        self.rules
            .rename(&from, &to, kind)
            .map_err(|why| self.refuse_move("rename", &from, why))?;
        if exchange {
            // Both move: each must be allowed where the other was.
            let other = EntryKind::from_mode(self.kind_at(ctx, newdir, newname)?);
            self.rules
                .rename(&to, &from, other)
                .map_err(|why| self.refuse_move("rename", &to, why))?;
        } else {
            // What is at `to` now is removed by the rename.
            match self.kind_at(ctx, newdir, newname) {
                Ok(victim) => self.writable_entry("rename", &to, victim)?,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)?;
        let mut back = Vec::new();
        self.tree().renamed(
            (olddir, OsStr::from_bytes(oldname.to_bytes()).to_os_string()),
            (newdir, OsStr::from_bytes(newname.to_bytes()).to_os_string()),
            exchange,
            &mut back,
        );
        self.give_back(back);
        Ok(())
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        let (srcs, kind) = self.node(inode)?;
        let rel = self.child(newparent, newname)?;
        self.visible_all("link", &srcs)?;
        // A second name for a read-only file would make it writable.
        for src in &srcs {
            self.writable_entry("link", src, kind)?;
        }
        self.creatable("link", &rel, kind)?;
        // Nor may a secret get a name that is not one: the rule follows the
        // file, and the layer may forget the secret name before the other.
        if let Some(secret) = self.secret_name(&srcs) {
            if let (Some(rule), None) = (self.rules.secret(secret), self.rules.secret(&rel)) {
                return Err(self.refuse_move("link", secret, MoveRefused::Secret(rule)));
            }
        }
        self.admit(ENTRY_BYTES)?;
        let entry = self.inner.link(ctx, inode, newparent, newname)?;
        self.record(entry, newparent, newname)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let (rels, kind) = self.node(inode)?;
        self.visible_all("open", &rels)?;
        match kind {
            libc::S_IFREG => {}
            libc::S_IFDIR => return Err(err(libc::EISDIR)),
            libc::S_IFLNK => return Err(err(libc::ELOOP)),
            _ => return Err(err(libc::EACCES)),
        }
        if is_write_open(flags) {
            self.writable_all("open", &rels, kind)?;
        }
        let secret = if is_read_open(flags) {
            self.secret_name(&rels).cloned()
        } else {
            None
        };
        self.handle_room()?;
        if let Some(rel) = &secret {
            self.note_read("open", rel)?;
        }
        let opened = self.inner.open(ctx, inode, flags, fuse_flags)?;
        self.opened(ctx, inode, opened.0, secret, false)?;
        Ok(opened)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mut args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        let rel = self.child(parent, name)?;
        self.creatable("create", &rel, libc::S_IFREG)?;
        self.handle_room()?;
        self.admit(ENTRY_BYTES)?;
        args.mode = strip_mode(args.mode);
        let (entry, handle, opts, passthrough) = self.inner.create(ctx, parent, name, args)?;
        let ino = entry.inode;
        let entry = match self.record(entry, parent, name) {
            Ok(e) => e,
            Err(e) => {
                if let Some(h) = handle {
                    let _ = self.inner.release(ctx, ino, 0, h, false, false, None);
                }
                return Err(e);
            }
        };
        if let Err(e) = self.opened(ctx, ino, handle, None, false) {
            self.forget_one(ctx, ino, 1);
            return Err(e);
        }
        Ok((entry, handle, opts, passthrough))
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        let secret = self.handles().get(&handle).cloned().flatten();
        if let Some(rel) = secret {
            self.note_read("read", &rel)?;
        }
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        // The handle was checked when it was opened for writing.
        self.admit(u64::from(size))?;
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        let (rels, kind) = self.node(inode)?;
        self.writable_all("fallocate", &rels, kind)?;
        if mode & libc::FALLOC_FL_PUNCH_HOLE as u32 == 0 {
            self.admit(length)?;
        }
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)?;
        self.handles().remove(&handle);
        Ok(())
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        self.node(inode)?;
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        let (rels, kind) = self.node(inode)?;
        self.visible_all("setxattr", &rels)?;
        self.writable_all("setxattr", &rels, kind)?;
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        let (rels, _) = self.node(inode)?;
        self.visible_all("getxattr", &rels)?;
        self.inner.getxattr(ctx, inode, name, size)
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        let (rels, _) = self.node(inode)?;
        self.visible_all("listxattr", &rels)?;
        self.inner.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        let (rels, kind) = self.node(inode)?;
        self.visible_all("removexattr", &rels)?;
        self.writable_all("removexattr", &rels, kind)?;
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let (rels, kind) = self.node(inode)?;
        self.visible_all("opendir", &rels)?;
        if kind != libc::S_IFDIR {
            return Err(err(libc::ENOTDIR));
        }
        self.handle_room()?;
        let opened = self.inner.opendir(ctx, inode, flags)?;
        self.opened(ctx, inode, opened.0, None, true)?;
        Ok(opened)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let dir = self.dir(inode)?;
        self.inner
            .readdir(ctx, inode, handle, size, offset, &mut |e: DirEntry| {
                let name = Path::new(std::ffi::OsStr::from_bytes(e.name));
                if e.name != b"." && e.name != b".." && self.rules.hidden(&dir.join(name)).is_some()
                {
                    // Skipped, not an error: the listing goes on.
                    return Ok(1);
                }
                add_entry(e)
            })
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let dir = self.dir(inode)?;
        let mut hidden: Vec<u64> = Vec::new();
        let mut later: Vec<u64> = Vec::new();
        let res = self.inner.readdirplus(
            ctx,
            inode,
            handle,
            size,
            offset,
            &mut |e: DirEntry, mut entry: Entry| {
                if e.name == b"." || e.name == b".." {
                    return add_entry(e, entry);
                }
                let rel = dir.join(Path::new(std::ffi::OsStr::from_bytes(e.name)));
                if self.rules.hidden(&rel).is_some() {
                    if entry.inode != 0 {
                        hidden.push(entry.inode);
                    }
                    return Ok(1);
                }
                let ino = entry.inode;
                let name = OsStr::from_bytes(e.name).to_os_string();
                self.ids.show_to_guest(&mut entry.attr);
                if ino == 0 || ino == ROOT_ID {
                    return add_entry(e, entry);
                }
                // Lookups to give back wait until the listing is done (the
                // passthrough layer may hold its inode map meanwhile).
                let res =
                    self.tree()
                        .record(ino, entry.attr.st_mode & S_IFMT, (inode, name), &mut later);
                if res.is_err() {
                    // Past a cap: listed without attributes (node id 0, which
                    // the guest kernel does not hold), the lookup given back.
                    hidden.push(ino);
                    entry.inode = 0;
                    return add_entry(e, entry);
                }
                let n = add_entry(e, entry)?;
                if n == 0 {
                    // Did not fit: the passthrough layer gives its lookup
                    // back itself.
                    self.tree().unrecord(ino, &mut later);
                }
                Ok(n)
            },
        );
        // The passthrough layer counted a lookup for each entry it listed;
        // the hidden ones never reach the guest, so give them back.
        for ino in hidden {
            self.inner.forget(ctx, ino, 1);
        }
        self.give_back(later);
        res
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)?;
        self.handles().remove(&handle);
        Ok(())
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        let (rels, kind) = self.node(inode)?;
        self.visible_all("access", &rels)?;
        if mask & libc::W_OK as u32 != 0 {
            self.writable_all("access", &rels, kind)?;
        }
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    fn getlk(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.inner.getlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlk(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlkw(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlkw(ctx, inode, handle, owner, lock, flags)
    }

    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        if self.ids.host_uid == 0 {
            // As root: the guest user acts as the host user (root), other
            // guest users as themselves.
            ctx.uid = self.ids.uid_to_host(ctx.uid);
            ctx.gid = self.ids.gid_to_host(ctx.gid);
        } else {
            // Without privileges there is no one else to act as: every
            // request runs with the server's own ids (0 tells the passthrough
            // layer not to switch).
            ctx.uid = 0;
            ctx.gid = 0;
        }
        Ok(())
    }
}
