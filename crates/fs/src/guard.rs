//! The policy layer: a [`FileSystem`] that wraps the passthrough file system
//! and puts every FUSE operation through the share's [`FileRules`].
//!
//! The guest speaks in inodes, the rules in paths. The layer keeps, for every
//! inode it has handed out, the path (relative to the share's root) under
//! which it was handed out and its file type; a rename moves the paths of
//! everything below. Names that come from the guest are checked before they
//! reach the passthrough layer: no `/`, no `.` or `..`, not empty.
//!
//! What the guest gets:
//!
//! - a hidden (deny-read) path: `ENOENT` for lookup, getattr, open, xattr,
//!   unlink and rename (either side), and it is left out of directory
//!   listings; creating something there is `EACCES` whether or not it exists.
//! - a read-only path: `EROFS` for every change (write-open, truncate,
//!   create, mknod, mkdir, symlink, link, unlink, rmdir, rename to or from,
//!   setattr, setxattr, removexattr, fallocate).
//! - never: a device node, an open of anything but a regular file or a
//!   folder (a symlink is only ever read with readlink, so the host never
//!   follows it), a set-uid or set-gid bit, an ioctl, a DAX mapping.

use std::collections::HashMap;
use std::ffi::CStr;
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
use sandpen_policy::files::ReadOnlyBy;
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

/// The most ordinary names one inode is remembered under (hard links); names
/// a rule covers are always kept.
const MAX_NAMES: usize = 16;

struct Node {
    /// The paths the inode was handed out under, first the first one. More
    /// than one for a hard-linked file: every rule is checked against each,
    /// so a second name never makes a protected or secret file ordinary.
    rels: Vec<PathBuf>,
    /// `st_mode & S_IFMT`.
    kind: u32,
    /// Lookups handed out and not yet forgotten.
    refs: u64,
}

/// The policy layer over `F`.
pub struct Guarded<F> {
    inner: F,
    rules: FileRules,
    ids: IdMap,
    /// The share's root on the host (for the audit log).
    root: PathBuf,
    nodes: Mutex<HashMap<u64, Node>>,
    /// Open handles on files that match `flow.secret`: every read through
    /// one sets the label again (it may have been reset since the open).
    secret_handles: Mutex<HashMap<u64, PathBuf>>,
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
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT_ID,
            Node {
                rels: vec![PathBuf::new()],
                kind: libc::S_IFDIR,
                refs: 1,
            },
        );
        Guarded {
            inner,
            rules,
            ids,
            root,
            nodes: Mutex::new(nodes),
            secret_handles: Mutex::new(HashMap::new()),
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

    /// The share's root on the host (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn nodes(&self) -> MutexGuard<'_, HashMap<u64, Node>> {
        // A panic while holding the map leaves it consistent (every update is
        // one insert or one loop of renames), so a poisoned lock is usable.
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The paths and type of a known inode; `ENOENT` for one never handed out.
    fn node(&self, inode: u64) -> io::Result<(Vec<PathBuf>, u32)> {
        self.nodes()
            .get(&inode)
            .map(|n| (n.rels.clone(), n.kind))
            .ok_or_else(|| err(libc::ENOENT))
    }

    /// The path of a folder (folders have exactly one).
    fn dir(&self, inode: u64) -> io::Result<PathBuf> {
        let (rels, kind) = self.node(inode)?;
        if kind != libc::S_IFDIR {
            return Err(err(libc::ENOTDIR));
        }
        rels.into_iter().next().ok_or_else(|| err(libc::ENOENT))
    }

    fn child(&self, parent: u64, name: &CStr) -> io::Result<PathBuf> {
        let name = component(name)?;
        Ok(self.dir(parent)?.join(name))
    }

    /// [`visible`](Self::visible) for every name of an inode.
    fn visible_all(&self, op: &str, rels: &[PathBuf]) -> io::Result<()> {
        rels.iter().try_for_each(|r| self.visible(op, r))
    }

    /// [`writable`](Self::writable) for every name of an inode.
    fn writable_all(&self, op: &str, rels: &[PathBuf]) -> io::Result<()> {
        rels.iter().try_for_each(|r| self.writable(op, r))
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

    /// For creating an entry at `rel`: `EACCES` if hidden (whether or not
    /// something is there, so nothing is revealed), `EROFS` if read-only.
    fn creatable(&self, op: &str, rel: &Path) -> io::Result<()> {
        if let Some(rule) = self.rules.hidden(rel) {
            self.events
                .denied(op, &self.host_path(rel), &rule.to_string(), "EACCES");
            return Err(err(libc::EACCES));
        }
        self.writable(op, rel)
    }

    fn erofs(&self, op: &str, rel: &Path, by: ReadOnlyBy<'_>) -> io::Error {
        if let ReadOnlyBy::Rule(rule) = by {
            self.events
                .denied(op, &self.host_path(rel), &rule.to_string(), "EROFS");
        }
        err(libc::EROFS)
    }

    fn writable(&self, op: &str, rel: &Path) -> io::Result<()> {
        self.rules
            .writable(rel)
            .map_err(|by| self.erofs(op, rel, by))
    }

    fn movable(&self, op: &str, rel: &Path) -> io::Result<()> {
        self.rules
            .movable(rel)
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

    /// Remember an entry handed to the guest and put its ids in guest terms.
    fn record(&self, mut entry: Entry, rel: PathBuf) -> Entry {
        self.ids.show_to_guest(&mut entry.attr);
        if entry.inode != 0 {
            let kind = entry.attr.st_mode & S_IFMT;
            let mut nodes = self.nodes();
            let node = nodes.entry(entry.inode).or_insert(Node {
                rels: Vec::new(),
                kind,
                refs: 0,
            });
            if kind == libc::S_IFDIR {
                // A folder has one name; a new one means it moved.
                node.rels = vec![rel];
            } else if !node.rels.contains(&rel) {
                // Past the cap, only names that a rule covers are kept: those
                // are the ones that must never be lost.
                let ruled = self.rules.hidden(&rel).is_some()
                    || self.rules.writable(&rel).is_err()
                    || self.rules.secret(&rel).is_some();
                if node.rels.len() < MAX_NAMES || ruled {
                    node.rels.push(rel);
                }
            }
            node.kind = kind;
            node.refs = node.refs.saturating_add(1);
        }
        entry
    }

    fn forget_one(&self, inode: u64, count: u64) {
        if inode == ROOT_ID {
            return;
        }
        let mut nodes = self.nodes();
        if let Some(n) = nodes.get_mut(&inode) {
            n.refs = n.refs.saturating_sub(count);
            if n.refs == 0 {
                nodes.remove(&inode);
            }
        }
    }

    /// After a rename: everything at or below `from` is now below `to`.
    fn moved(&self, from: &Path, to: &Path) {
        for n in self.nodes().values_mut() {
            for rel in n.rels.iter_mut() {
                if let Ok(rest) = rel.strip_prefix(from) {
                    *rel = if rest.as_os_str().is_empty() {
                        to.to_path_buf()
                    } else {
                        to.join(rest)
                    };
                }
            }
        }
    }

    /// After RENAME_EXCHANGE: the two paths swap.
    fn swapped(&self, a: &Path, b: &Path) {
        for n in self.nodes().values_mut() {
            for rel in n.rels.iter_mut() {
                if let Ok(rest) = rel.strip_prefix(a) {
                    *rel = b.join(rest);
                } else if let Ok(rest) = rel.strip_prefix(b) {
                    *rel = a.join(rest);
                }
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
        Ok(self.record(entry, rel))
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.forget_one(inode, count);
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        for (inode, count) in &requests {
            self.forget_one(*inode, *count);
        }
        self.inner.batch_forget(ctx, requests)
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
        let (rels, _) = self.node(inode)?;
        self.visible_all("setattr", &rels)?;
        self.writable_all("setattr", &rels)?;
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
        self.creatable("symlink", &rel)?;
        self.admit(ENTRY_BYTES)?;
        let entry = self.inner.symlink(ctx, linkname, parent, name)?;
        Ok(self.record(entry, rel))
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
        self.creatable("mknod", &rel)?;
        match mode & S_IFMT {
            libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK => {}
            // Device nodes on the host's disk are the host's business.
            _ => return Err(err(libc::EPERM)),
        }
        self.admit(ENTRY_BYTES)?;
        let entry = self
            .inner
            .mknod(ctx, parent, name, strip_mode(mode), rdev, umask)?;
        Ok(self.record(entry, rel))
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
        self.creatable("mkdir", &rel)?;
        self.admit(ENTRY_BYTES)?;
        // A set-gid folder is ordinary and harmless; only set-uid goes.
        let entry = self
            .inner
            .mkdir(ctx, parent, name, mode & !libc::S_ISUID, umask)?;
        Ok(self.record(entry, rel))
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        let rel = self.child(parent, name)?;
        self.visible("unlink", &rel)?;
        self.movable("unlink", &rel)?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        let rel = self.child(parent, name)?;
        self.visible("rmdir", &rel)?;
        self.movable("rmdir", &rel)?;
        self.inner.rmdir(ctx, parent, name)
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
        self.movable("rename", &from)?;
        self.movable("rename", &to)?;
        // A secret moved to a name that is not one would be readable without
        // the label: moving it counts as reading it.
        self.note_read("rename", &from)?;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        if exchange {
            self.note_read("rename", &to)?;
        }
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)?;
        if exchange {
            self.swapped(&from, &to);
        } else {
            self.moved(&from, &to);
        }
        Ok(())
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        let (srcs, _) = self.node(inode)?;
        let rel = self.child(newparent, newname)?;
        self.visible_all("link", &srcs)?;
        // A second name for a read-only file would make it writable.
        self.writable_all("link", &srcs)?;
        self.creatable("link", &rel)?;
        if let Some(secret) = self.secret_name(&srcs) {
            self.note_read("link", secret)?;
        }
        self.admit(ENTRY_BYTES)?;
        let entry = self.inner.link(ctx, inode, newparent, newname)?;
        Ok(self.record(entry, rel))
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
            self.writable_all("open", &rels)?;
        }
        let secret = if is_read_open(flags) {
            self.secret_name(&rels).cloned()
        } else {
            None
        };
        if let Some(rel) = &secret {
            self.note_read("open", rel)?;
        }
        let opened = self.inner.open(ctx, inode, flags, fuse_flags)?;
        if let (Some(rel), Some(handle)) = (secret, opened.0) {
            self.secret_handles
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(handle, rel);
        }
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
        self.creatable("create", &rel)?;
        self.admit(ENTRY_BYTES)?;
        args.mode = strip_mode(args.mode);
        let (entry, handle, opts, passthrough) = self.inner.create(ctx, parent, name, args)?;
        Ok((self.record(entry, rel), handle, opts, passthrough))
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
        let secret = self
            .secret_handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&handle)
            .cloned();
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
        let (rels, _) = self.node(inode)?;
        self.writable_all("fallocate", &rels)?;
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
        self.secret_handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&handle);
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
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
        let (rels, _) = self.node(inode)?;
        self.visible_all("setxattr", &rels)?;
        self.writable_all("setxattr", &rels)?;
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
        let (rels, _) = self.node(inode)?;
        self.visible_all("removexattr", &rels)?;
        self.writable_all("removexattr", &rels)?;
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
        self.inner.opendir(ctx, inode, flags)
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
        let res = self.inner.readdirplus(
            ctx,
            inode,
            handle,
            size,
            offset,
            &mut |e: DirEntry, entry: Entry| {
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
                let entry = self.record(entry, rel);
                let n = add_entry(e, entry)?;
                if n == 0 {
                    // Did not fit: the kernel will not hold this lookup.
                    self.forget_one(ino, 1);
                }
                Ok(n)
            },
        );
        // The passthrough layer counted a lookup for each entry it listed;
        // the hidden ones never reach the guest, so give them back.
        for ino in hidden {
            self.inner.forget(ctx, ino, 1);
        }
        res
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        let (rels, _) = self.node(inode)?;
        self.visible_all("access", &rels)?;
        if mask & libc::W_OK as u32 != 0 {
            self.writable_all("access", &rels)?;
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
