//! Trees: a cached toolchain archive unpacked once on the host, then served
//! read-only to every sandbox that needs it (docs/dev-env.md, "Shared
//! toolchain trees").
//!
//! What is guaranteed:
//!
//! - **Only from a verified blob.** A tree is unpacked from a body the proxy
//!   stored and [`ToolCache::lookup`] has just hashed again: a vendor's
//!   bytes, never a guest's. Its name is that blob's sha256
//!   (`trees/SHA256/`), so two sandboxes of different upstream identities
//!   that fetched the same bytes share one tree, and different bytes never
//!   share a name.
//! - **Whole or absent.** It is unpacked into `tmp/`, then renamed into
//!   place; a reader never sees half of one, and a failed unpack leaves
//!   nothing behind.
//! - **Nothing but files, folders and links inside itself.** An entry that
//!   is a device, a FIFO or anything else fails the unpack; a path with `..`
//!   or an absolute one is refused, and a hard link must point inside the
//!   archive (the `tar` crate's `unpack_in`). Set-uid, set-gid and sticky
//!   bits are dropped, and no file keeps a write bit. The unpacked size is
//!   bounded ([`MAX_TREE_BYTES`]).
//! - **A sandbox sees only the trees it was given.** [`publish`] makes a
//!   sandbox's view (`SANDBOX/toolchains/SHA256/`): the tree's folders
//!   made anew and its files hard-linked (copied across file systems), so
//!   a sandbox never lists what other sandboxes use. The view is served by
//!   a read-only file server; the guest mounts an overlay over it, so what
//!   it changes lands on its own disk.

use std::fs::{self, File};
use std::io::{self, BufReader};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::{is_sha256_hex, ToolCache};

/// The most a tree may take once unpacked (a toolchain is a few hundred MB;
/// the bound is against an archive that expands without end).
pub const MAX_TREE_BYTES: u64 = 4 << 30;

/// Where a sandbox's view of its trees is mounted in the guest.
pub const GUEST_VIEW: &str = "/opt/sandpen/toolchains";

/// A toolchain the host can serve as a tree: where the archive of one of
/// its versions is, as the guest's tool manager downloads it.
pub struct TreeTool {
    /// mise's name for it.
    pub tool: &'static str,
    /// The archive's URL for an exact version, `None` for a version that is
    /// not one.
    pub archive: fn(&str) -> Option<String>,
}

/// The tools served as trees. Node's archive is what mise's node backend
/// fetches (`node-vX.Y.Z-linux-ARCH.tar.gz` from nodejs.org). Other tools
/// are installed by the guest (docs/dev-env.md says why).
pub const TREE_TOOLS: &[TreeTool] = &[TreeTool {
    tool: "node",
    archive: node_archive,
}];

/// An exact release version: `X.Y.Z`, digits only.
fn exact_version(v: &str) -> bool {
    let parts: Vec<&str> = v.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 6 && p.bytes().all(|b| b.is_ascii_digit()))
}

fn node_archive(version: &str) -> Option<String> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "x64",
        "aarch64" => "arm64",
        _ => return None,
    };
    exact_version(version)
        .then(|| format!("https://nodejs.org/dist/v{version}/node-v{version}-linux-{arch}.tar.gz"))
}

fn tree_tool(tool: &str) -> Option<&'static TreeTool> {
    TREE_TOOLS.iter().find(|t| t.tool == tool)
}

/// Whether `tool` (mise's name) is served as a tree.
pub fn is_tree_tool(tool: &str) -> bool {
    tree_tool(tool).is_some()
}

/// The archive of `tool` at `version`, if that tool is served as a tree and
/// `version` is an exact one.
pub fn archive_url(tool: &str, version: &str) -> Option<String> {
    tree_tool(tool).and_then(|t| (t.archive)(version))
}

/// Why a tree could not be made or given.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("reading the archive {url}: {source}")]
    Read {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("the archive {url} holds {path} ({kind}), which a toolchain never has")]
    Entry {
        url: String,
        path: String,
        kind: String,
    },
    #[error("unpacking the archive {url}: {source}")]
    Unpack {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("the archive {url} unpacks to more than {MAX_TREE_BYTES} bytes")]
    TooLarge { url: String },
    #[error("{name:?} is not a tree's name (a sha256)")]
    Name { name: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> TreeError + '_ {
    move |source| TreeError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// An unpacked tree.
#[derive(Debug, Clone)]
pub struct Tree {
    /// The sha256 of the archive it came from: its name.
    pub sha256: String,
    /// `trees/SHA256/`.
    pub dir: PathBuf,
}

/// A name no other process or thread picks.
fn unique(prefix: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

impl ToolCache {
    /// The tree of the cached archive at `url`, unpacked now if it was not
    /// yet. `Ok(None)` when the archive is not in the cache (for this
    /// sandbox's upstream identity).
    pub fn tree(&self, url: &str) -> Result<Option<Tree>, TreeError> {
        let Some(hit) = self.lookup(url) else {
            return Ok(None);
        };
        let trees = self.dir().join("trees");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&trees)
            .map_err(write_err(&trees))?;
        let dir = trees.join(&hit.sha256);
        if dir.is_dir() {
            return Ok(Some(Tree {
                sha256: hit.sha256,
                dir,
            }));
        }
        let staging = self.dir().join("tmp").join(unique("tree"));
        let result = unpack(hit.file, url, &staging).and_then(|root| {
            match fs::rename(&root, &dir) {
                Ok(()) => Ok(()),
                // Another start unpacked the same archive meanwhile.
                Err(_) if dir.is_dir() => Ok(()),
                Err(e) => Err(write_err(&dir)(e)),
            }
        });
        let _ = remove_tree(&staging);
        result?;
        tracing::info!("toolchain cache: unpacked {url} as trees/{}", hit.sha256);
        Ok(Some(Tree {
            sha256: hit.sha256,
            dir,
        }))
    }
}

/// Unpacks the gzip'd tar `file` into `staging`; returns the tree's root:
/// the archive's one top folder when it has exactly one, as toolchain
/// archives do (`node-v22.23.5-linux-x64/`), `staging` otherwise.
fn unpack(file: File, url: &str, staging: &Path) -> Result<PathBuf, TreeError> {
    let read = |source| TreeError::Read {
        url: url.to_string(),
        source,
    };
    fs::DirBuilder::new()
        .mode(0o755)
        .create(staging)
        .map_err(write_err(staging))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(BufReader::new(file)));
    let mut total = 0u64;
    for entry in archive.entries().map_err(read)? {
        let mut entry = entry.map_err(read)?;
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Regular
            | tar::EntryType::Continuous
            | tar::EntryType::Directory
            | tar::EntryType::Symlink
            | tar::EntryType::Link => {}
            // Metadata for the entries around it, not a file.
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => continue,
            other => {
                return Err(TreeError::Entry {
                    url: url.to_string(),
                    path: entry.path_bytes().escape_ascii().to_string(),
                    kind: format!("{other:?}"),
                })
            }
        }
        total = total.saturating_add(entry.size());
        if total > MAX_TREE_BYTES {
            return Err(TreeError::TooLarge {
                url: url.to_string(),
            });
        }
        // Set-uid, set-gid, sticky and every write bit but the owner's
        // (folders must stay writable while they fill) are dropped.
        entry.set_mask(0o7022);
        entry.set_preserve_mtime(true);
        let unpacked = entry
            .unpack_in(staging)
            .map_err(|source| TreeError::Unpack {
                url: url.to_string(),
                source,
            })?;
        if !unpacked {
            return Err(TreeError::Entry {
                url: url.to_string(),
                path: entry.path_bytes().escape_ascii().to_string(),
                kind: "path leaving the archive's folder".into(),
            });
        }
    }
    seal(staging).map_err(write_err(staging))?;
    let mut top = fs::read_dir(staging)
        .map_err(write_err(staging))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(write_err(staging))?;
    if top.len() == 1 && top[0].file_type().map(|t| t.is_dir()).unwrap_or(false) {
        if let Some(only) = top.pop() {
            return Ok(only.path());
        }
    }
    Ok(staging.to_path_buf())
}

/// Drops the owner's write bit from every file below `dir` (folders keep
/// theirs, so that the host user can remove the tree).
fn seal(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let path = entry.path();
        if kind.is_dir() {
            seal(&path)?;
        } else if kind.is_file() {
            let mode = entry.metadata()?.permissions().mode() & 0o555;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}

/// Removes a tree or a view (its files carry no write bit; its folders do).
pub fn remove_tree(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Gives `tree` to a sandbox: `view/SHA256/`, the tree's folders made anew
/// and its files hard-linked (copied when `view` is on another file
/// system). Returns the name the guest finds it under, in [`GUEST_VIEW`].
pub fn publish(tree: &Tree, view: &Path) -> Result<String, TreeError> {
    give(&tree.dir, view, &tree.sha256)?;
    Ok(tree.sha256.clone())
}

/// Puts a linked copy of `from` in `view` under `name` (a tree's sha256),
/// whole or not at all; nothing when `view` has it already. A saved image
/// keeps the trees of the sandbox it came from this way, and gives them to
/// the sandboxes started from it.
pub fn give(from: &Path, view: &Path, name: &str) -> Result<(), TreeError> {
    if !is_sha256_hex(name) {
        return Err(TreeError::Name {
            name: name.to_string(),
        });
    }
    let target = view.join(name);
    if target.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(view)
        .map_err(write_err(view))?;
    let staging = view.join(format!(".{}", unique("view")));
    let made = sandpen_fsutil::link_tree(from, &staging).map_err(write_err(&staging));
    let made = made.and_then(|()| match fs::rename(&staging, &target) {
        Ok(()) => Ok(()),
        Err(_) if target.is_dir() => Ok(()),
        Err(e) => Err(write_err(&target)(e)),
    });
    let _ = remove_tree(&staging);
    made
}

/// The names of the trees in a view (or in a saved image's `toolchains/`).
pub fn trees_in(view: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(view)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_sha256_hex(n) && view.join(n).is_dir())
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests;
