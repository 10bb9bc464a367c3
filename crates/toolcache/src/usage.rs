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
//!   last changed. A tree leaves `trees/` in one rename before it is
//!   deleted, so a start linking it at that moment fails (and installs
//!   with mise) rather than giving a sandbox half a tree.
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
    /// Bytes the disk got back: a tree a sandbox or an image still links
    /// is out of the cache but not off the disk.
    pub bytes: u64,
}

/// Why the cache could not be listed or pruned.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct UsageError {
    pub path: std::path::PathBuf,
    #[source]
    pub source: io::Error,
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> UsageError + '_ {
    move |source| UsageError {
        path: path.to_path_buf(),
        source,
    }
}

/// `Ok(None)` for a file that vanished meanwhile (a prune, a bad blob removed).
fn present<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
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

/// What the cache in `dir` holds (what vanishes while it is read is left
/// out).
pub fn usage(dir: &Path) -> Result<Usage, UsageError> {
    let mut entries: Vec<Entry> = Vec::new();
    for entry in fs::read_dir(dir.join("index"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(e) = fs::read(entry.path()).map(|b| serde_json::from_slice::<Entry>(&b)) {
            entries.extend(e.ok());
        }
    }
    let mut out = Usage::default();
    for sha256 in hashes(&dir.join("blobs")) {
        let path = dir.join("blobs").join(&sha256);
        let Some(meta) = present(fs::symlink_metadata(&path)).map_err(at(&path))? else {
            continue;
        };
        let size = meta.len();
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
        let path = dir.join("trees").join(&sha256);
        let Some((size, in_use)) = present(tree_size(&path)).map_err(at(&path))? else {
            continue;
        };
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
pub fn prune(dir: &Path, all: bool) -> Result<Pruned, UsageError> {
    let before = usage(dir)?;
    let mut pruned = Pruned::default();
    for (i, tree) in before.trees.iter().filter(|t| all || !t.in_use).enumerate() {
        let path = dir.join("trees").join(&tree.sha256);
        // Out of `trees/` in one step, then deleted.
        let doomed = dir.join("tmp").join(format!(
            "pruned-{}-{i}-{}",
            std::process::id(),
            &tree.sha256[..12]
        ));
        if present(fs::rename(&path, &doomed))
            .map_err(at(&path))?
            .is_none()
        {
            continue;
        }
        remove_tree(&doomed).map_err(at(&doomed))?;
        pruned.trees += 1;
        if !tree.in_use {
            pruned.bytes += tree.size;
        }
    }
    if all {
        let index = dir.join("index");
        for entry in fs::read_dir(&index).into_iter().flatten().flatten() {
            present(fs::remove_file(entry.path())).map_err(at(&entry.path()))?;
        }
        for blob in &before.blobs {
            let path = dir.join("blobs").join(&blob.sha256);
            if present(fs::remove_file(&path))
                .map_err(at(&path))?
                .is_some()
            {
                pruned.blobs += 1;
                pruned.bytes += blob.size;
            }
        }
    }
    let now = SystemTime::now();
    let tmp = dir.join("tmp");
    for entry in fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let Some(meta) = present(entry.metadata()).map_err(at(&entry.path()))? else {
            continue;
        };
        let age = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .unwrap_or_default();
        if age >= STALE_TMP {
            let path = entry.path();
            if meta.is_dir() {
                remove_tree(&path).map_err(at(&path))?;
            } else {
                present(fs::remove_file(&path)).map_err(at(&path))?;
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
        // The tree's bytes stay on the disk: the view links them.
        assert_eq!(pruned.bytes, bytes.len() as u64);
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
