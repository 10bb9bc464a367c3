//! File helpers: atomic writes, streaming hashes, disk usage, and a removal that
//! refuses to descend into mount points.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{ImageError, IoContext};

/// Writes `bytes` to `path` atomically and durably (see
/// `sandpen_fsutil::write_atomic`): readers see the old or the new content,
/// never a partial one.
pub(crate) fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    sandpen_fsutil::write_atomic(path, bytes, sandpen_fsutil::MODE_STATE)
        .ctx(|| format!("writing {}", path.display()))
}

/// A temporary name next to `path`, unique to this process.
pub(crate) fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// The sha256 (hex) of everything `reader` yields; `on_bytes` is told each chunk's length.
pub(crate) fn sha256_reader(
    mut reader: impl Read,
    mut on_bytes: impl FnMut(u64),
) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        on_bytes(n as u64);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The sha256 (hex) of a file, read in a streaming way.
pub(crate) fn sha256_file(path: &Path, on_bytes: impl FnMut(u64)) -> Result<String, ImageError> {
    let file = fs::File::open(path).ctx(|| format!("opening {} to hash it", path.display()))?;
    sha256_reader(file, on_bytes).ctx(|| format!("reading {} to hash it", path.display()))
}

/// What a directory tree occupies on disk.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TreeUsage {
    /// Allocated bytes (st_blocks * 512), each inode counted once.
    pub bytes: u64,
    /// Distinct inodes (files, directories, links, nodes).
    pub inodes: u64,
}

/// Walks `root` without following symlinks and adds up allocated blocks, counting
/// hard-linked inodes once. With `same_dev_only` it stays on `root`'s
/// filesystem; without, it also counts files that report another device, as
/// files seen through an overlay mount may report their layer's.
pub(crate) fn tree_usage_with(root: &Path, same_dev_only: bool) -> Result<TreeUsage, ImageError> {
    let root_meta = fs::symlink_metadata(root).ctx(|| format!("reading {}", root.display()))?;
    let mut seen = HashSet::new();
    let mut usage = TreeUsage::default();
    let mut stack = vec![root.to_path_buf()];
    seen.insert((root_meta.dev(), root_meta.ino()));
    usage.bytes += root_meta.blocks() * 512;
    usage.inodes += 1;
    while let Some(dir) = stack.pop() {
        let entries = fs::read_dir(&dir).ctx(|| format!("listing {}", dir.display()))?;
        for entry in entries {
            let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).ctx(|| format!("reading {}", path.display()))?;
            if same_dev_only && meta.dev() != root_meta.dev() {
                continue;
            }
            if !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            usage.bytes += meta.blocks() * 512;
            usage.inodes += 1;
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    Ok(usage)
}

/// Mount points at or below `dir`, deepest first, read from /proc/self/mountinfo.
pub(crate) fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let info = match fs::read_to_string("/proc/self/mountinfo") {
        Ok(s) => s,
        // Without /proc we cannot see mounts; a build root holds none unless
        // debootstrap left some, which needs /proc anyway.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ImageError::io("reading /proc/self/mountinfo", e)),
    };
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut found: Vec<PathBuf> = parse_mountinfo_points(&info)
        .into_iter()
        .filter(|p| p.starts_with(&dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

/// The mount point column (5th) of each mountinfo line, with octal escapes decoded.
pub(crate) fn parse_mountinfo_points(info: &str) -> Vec<PathBuf> {
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|raw| PathBuf::from(unescape_octal(raw)))
        .collect()
}

/// Decodes the `\040`-style escapes the kernel uses in mountinfo.
fn unescape_octal(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(v) = u8::try_from(value) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes a directory tree that may have held a chroot. Mounts left under it
/// (by a debootstrap that died) are unmounted first; if any remain, nothing is
/// deleted, so a bind-mounted host /dev can never be emptied.
pub(crate) fn remove_tree(dir: &Path) -> Result<(), ImageError> {
    if fs::symlink_metadata(dir).is_err() {
        return Ok(());
    }
    for mount in mounts_under(dir)? {
        let status = Command::new("umount").arg("--lazy").arg(&mount).status();
        if let Err(e) = status {
            tracing::warn!("umount {} failed to start: {e}", mount.display());
        }
    }
    let left = mounts_under(dir)?;
    if !left.is_empty() {
        let mounts = left
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(ImageError::StillMounted {
            dir: dir.to_path_buf(),
            mounts,
        });
    }
    fs::remove_dir_all(dir).ctx(|| format!("removing {}", dir.display()))
}

/// Copies a file, creating the parent directory of `to` when needed.
pub(crate) fn copy_file(from: &Path, to: &Path) -> Result<u64, ImageError> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
    }
    fs::copy(from, to).ctx(|| format!("copying {} to {}", from.display(), to.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");
        atomic_write(&path, b"first version, longer").unwrap();
        atomic_write(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("manifest.json")]);
    }

    #[test]
    fn atomic_write_into_missing_dir_fails_with_path_in_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope").join("manifest.json");
        let err = atomic_write(&path, b"x").unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn sha256_of_known_input() {
        let hash = sha256_reader(&b"abc"[..], |_| {}).unwrap();
        assert_eq!(
            hash,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn tree_usage_counts_hard_links_once() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), vec![1u8; 10_000]).unwrap();
        let once = tree_usage_with(dir.path(), true).unwrap();
        fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        let twice = tree_usage_with(dir.path(), true).unwrap();
        assert_eq!(once, twice);
        assert!(once.bytes >= 10_000);
        assert_eq!(once.inodes, 2);
    }

    #[test]
    fn mountinfo_points_are_unescaped() {
        let info = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
                    30 22 0:5 / /var/tmp/with\\040space rw - tmpfs tmpfs rw\n";
        let points = parse_mountinfo_points(info);
        assert_eq!(
            points,
            vec![PathBuf::from("/"), PathBuf::from("/var/tmp/with space")]
        );
    }

    #[test]
    fn remove_tree_removes_plain_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("x/y");
        fs::create_dir_all(&victim).unwrap();
        fs::write(victim.join("f"), b"1").unwrap();
        remove_tree(&dir.path().join("x")).unwrap();
        assert!(!dir.path().join("x").exists());
        // Removing what is not there is fine.
        remove_tree(&dir.path().join("x")).unwrap();
    }
}
