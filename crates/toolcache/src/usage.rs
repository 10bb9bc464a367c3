//! What the cache holds, and taking it back (`sandpen cache ls`, `sandpen
//! cache prune`; docs/dev-env.md, "Cache size").
//!
//! What is guaranteed:
//!
//! - **Pruning never breaks a sandbox or an image.** A sandbox's view and a
//!   saved image's `toolchains/` hold hard links (or copies) of a tree's
//!   files, never the cache's names: removing a tree leaves them whole.
//!   A removed blob is downloaded again by the next sandbox that asks.
//! - **Nothing half-written is taken from a running start.** Temporary
//!   files and unpacks (`tmp/`) are removed only an hour after they were
//!   last changed.
//! - A tree is **in use** when one of its files has another link: a
//!   sandbox's view or an image keeps it.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::store::{is_sha256_hex, Entry};
use crate::tree::remove_tree;

/// A temporary older than this is a leftover, not a start in progress.
const STALE_TMP: Duration = Duration::from_secs(3600);

/// One downloaded archive.
#[derive(Debug, Clone, Serialize)]
pub struct BlobUsage {
    pub sha256: String,
    pub size: u64,
    /// The URLs it was downloaded from (one per upstream identity).
    pub urls: Vec<String>,
}

/// One unpacked tree.
#[derive(Debug, Clone, Serialize)]
pub struct TreeUsage {
    pub sha256: String,
    pub size: u64,
    /// A sandbox's view or a saved image links its files.
    pub in_use: bool,
}

/// The cache's contents.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Usage {
    pub blobs: Vec<BlobUsage>,
    pub trees: Vec<TreeUsage>,
}

impl Usage {
    /// Bytes of blobs and trees together.
    pub fn total(&self) -> u64 {
        self.blobs.iter().map(|b| b.size).sum::<u64>()
            + self.trees.iter().map(|t| t.size).sum::<u64>()
    }
}

/// What [`prune`] removed.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Pruned {
    pub blobs: usize,
    pub trees: usize,
    pub bytes: u64,
}

/// The names (sha256) of the entries of `dir`, sorted; none when it is
/// missing.
fn hashes(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_sha256_hex(n))
        .collect();
    names.sort();
    names
}

/// Bytes of the regular files below `dir`, and whether one has another link.
fn tree_size(dir: &Path) -> io::Result<(u64, bool)> {
    let (mut size, mut linked) = (0, false);
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            let (s, l) = tree_size(&entry.path())?;
            size += s;
            linked |= l;
        } else if meta.is_file() {
            size += meta.len();
            linked |= meta.nlink() > 1;
        }
    }
    Ok((size, linked))
}

/// What the cache in `dir` holds.
pub fn usage(dir: &Path) -> io::Result<Usage> {
    let mut entries: Vec<Entry> = Vec::new();
    for entry in fs::read_dir(dir.join("index")).into_iter().flatten() {
        let path = entry?.path();
        if let Ok(e) = fs::read(&path).map(|b| serde_json::from_slice::<Entry>(&b)) {
            entries.extend(e.ok());
        }
    }
    let mut out = Usage::default();
    for sha256 in hashes(&dir.join("blobs")) {
        let size = fs::symlink_metadata(dir.join("blobs").join(&sha256))?.len();
        let mut urls: Vec<String> = entries
            .iter()
            .filter(|e| e.sha256 == sha256)
            .map(|e| e.url.clone())
            .collect();
        urls.sort();
        urls.dedup();
        out.blobs.push(BlobUsage { sha256, size, urls });
    }
    for sha256 in hashes(&dir.join("trees")) {
        let (size, in_use) = tree_size(&dir.join("trees").join(&sha256))?;
        out.trees.push(TreeUsage {
            sha256,
            size,
            in_use,
        });
    }
    Ok(out)
}

/// Removes the trees no sandbox or image uses (made again from their blob
/// when needed) and stale temporaries; with `all`, every tree and every
/// blob with its index entries too (downloaded again when needed).
pub fn prune(dir: &Path, all: bool) -> io::Result<Pruned> {
    let before = usage(dir)?;
    let mut pruned = Pruned::default();
    for tree in before.trees.iter().filter(|t| all || !t.in_use) {
        remove_tree(&dir.join("trees").join(&tree.sha256))?;
        pruned.trees += 1;
        pruned.bytes += tree.size;
    }
    if all {
        for entry in fs::read_dir(dir.join("index")).into_iter().flatten() {
            fs::remove_file(entry?.path())?;
        }
        for blob in &before.blobs {
            fs::remove_file(dir.join("blobs").join(&blob.sha256))?;
            pruned.blobs += 1;
            pruned.bytes += blob.size;
        }
    }
    let now = SystemTime::now();
    for entry in fs::read_dir(dir.join("tmp")).into_iter().flatten() {
        let entry = entry?;
        let meta = entry.metadata()?;
        let age = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .unwrap_or_default();
        if age >= STALE_TMP {
            if meta.is_dir() {
                remove_tree(&entry.path())?;
            } else {
                fs::remove_file(entry.path())?;
            }
        }
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ToolCache;
    use crate::tree::publish;
    use std::io::Write;

    const URL: &str = "https://nodejs.org/dist/v22.23.5/node-v22.23.5-linux-x64.tar.gz";

    fn node_archive() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o755);
        h.set_size(4);
        b.append_data(&mut h, "node-v22.23.5-linux-x64/bin/node", &b"node"[..])
            .unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&b.into_inner().unwrap()).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn prune_takes_unused_trees_and_all_takes_everything_but_views_stay() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ToolCache::open(&dir.path().join("toolchains"), "").unwrap();
        let bytes = node_archive();
        let mut f = cache.filling(URL, bytes.len() as u64, None).unwrap();
        f.write(&bytes).unwrap();
        f.finish().unwrap();
        let tree = cache.tree(URL).unwrap().unwrap();

        let held = usage(cache.dir()).unwrap();
        assert_eq!(held.blobs.len(), 1);
        assert_eq!(held.blobs[0].urls, vec![URL.to_string()]);
        assert_eq!(held.blobs[0].size, bytes.len() as u64);
        assert_eq!((held.trees.len(), held.trees[0].in_use), (1, false));
        assert_eq!(held.trees[0].size, 4);

        // Given to a sandbox, the tree is in use: a plain prune keeps it.
        let view = dir.path().join("sandbox/toolchains");
        let name = publish(&tree, &view).unwrap();
        assert!(usage(cache.dir()).unwrap().trees[0].in_use);
        assert_eq!(prune(cache.dir(), false).unwrap().trees, 0);
        assert!(tree.dir.is_dir());

        // --all takes everything; the sandbox's view is whole.
        let pruned = prune(cache.dir(), true).unwrap();
        assert_eq!((pruned.blobs, pruned.trees), (1, 1));
        assert_eq!(pruned.bytes, bytes.len() as u64 + 4);
        let after = usage(cache.dir()).unwrap();
        assert!(after.blobs.is_empty() && after.trees.is_empty());
        assert!(cache.lookup(URL).is_none());
        assert_eq!(
            fs::read(view.join(&name).join("bin/node")).unwrap(),
            b"node"
        );

        // An unused tree goes with a plain prune; a fresh temporary stays.
        let mut f = cache.filling(URL, bytes.len() as u64, None).unwrap();
        f.write(&bytes).unwrap();
        f.finish().unwrap();
        cache.tree(URL).unwrap().unwrap();
        fs::write(cache.dir().join("tmp/in-flight"), b"x").unwrap();
        let pruned = prune(cache.dir(), false).unwrap();
        assert_eq!((pruned.blobs, pruned.trees), (0, 1));
        assert!(cache.lookup(URL).is_some());
        assert!(cache.dir().join("tmp/in-flight").exists());
    }
}
