//! Root trees kept between builds, so that images share the slow work:
//!
//! ```text
//! images_root/.trees/base-KEY/root       debootstrap of the base packages, host CAs trusted,
//!                                        modules unsigned      (every image of a suite+mirror+CA set)
//! images_root/.trees/packages-KEY/root   a copy of base plus `apt-get install` of the extra
//!                                        packages              (every agent image shares one)
//! ```
//!
//! An image's own root is an overlay mount (upper directory in the build
//! directory) over one of these trees; its changes (npm packages, trimming,
//! host-neutral `/etc`) never reach the cached tree. Where overlayfs cannot be
//! mounted the tree is copied instead.

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{ImageError, IoContext};
use crate::fsutil;
use crate::spec::{ImageSpec, BASE_PACKAGES, RECIPE_VERSION};

/// Folder under the images root holding the cached trees.
pub const TREES_DIR: &str = ".trees";
/// Written into a tree folder once it is complete.
const DONE_FILE: &str = "done";

/// The two cached stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TreeKind {
    Base,
    Packages,
}

impl TreeKind {
    fn prefix(self) -> &'static str {
        match self {
            TreeKind::Base => "base",
            TreeKind::Packages => "packages",
        }
    }
}

/// The cache key of the base tree: everything debootstrap and the CA step see.
pub(crate) fn base_key(spec: &ImageSpec) -> String {
    #[derive(Serialize)]
    struct Input<'a> {
        recipe_version: u32,
        suite: &'a str,
        mirror: &'a str,
        packages: &'a [&'a str],
        ca_certs: Vec<(String, String)>,
    }
    let input = Input {
        recipe_version: RECIPE_VERSION,
        suite: &spec.suite,
        mirror: spec.mirror.trim_end_matches('/'),
        packages: BASE_PACKAGES,
        ca_certs: spec.ca_cert_digests(),
    };
    hash(&input)
}

/// The cache key of the packages tree: the base tree's key and the extra packages.
pub(crate) fn packages_key(spec: &ImageSpec) -> String {
    #[derive(Serialize)]
    struct Input<'a> {
        base: String,
        packages: Vec<&'a str>,
    }
    hash(&Input {
        base: base_key(spec),
        packages: spec.extra_packages(),
    })
}

fn hash(input: &impl Serialize) -> String {
    // Serializing plain strings and numbers cannot fail.
    let canonical = serde_json::to_vec(input).unwrap_or_default();
    hex::encode(Sha256::digest(&canonical))[..24].to_string()
}

/// `images_root/.trees/KIND-KEY`.
pub(crate) fn tree_dir(images_root: &Path, kind: TreeKind, key: &str) -> PathBuf {
    images_root
        .join(TREES_DIR)
        .join(format!("{}-{key}", kind.prefix()))
}

/// The tree's root folder when the tree is complete.
pub(crate) fn cached(images_root: &Path, kind: TreeKind, key: &str) -> Option<PathBuf> {
    let dir = tree_dir(images_root, kind, key);
    dir.join(DONE_FILE).is_file().then(|| dir.join("root"))
}

/// A fresh folder to build a tree in: `.trees/.KIND-KEY.tmp-PID`.
pub(crate) fn staging_dir(images_root: &Path, kind: TreeKind, key: &str) -> PathBuf {
    images_root.join(TREES_DIR).join(format!(
        ".{}-{key}.tmp-{}",
        kind.prefix(),
        std::process::id()
    ))
}

/// Marks a staged tree complete, moves it into place and removes older trees
/// of the same kind. Another build that finished the same tree first wins.
pub(crate) fn commit(
    images_root: &Path,
    kind: TreeKind,
    key: &str,
    staged: &Path,
) -> Result<PathBuf, ImageError> {
    fs::write(staged.join(DONE_FILE), b"")
        .ctx(|| format!("writing {}", staged.join(DONE_FILE).display()))?;
    let dir = tree_dir(images_root, kind, key);
    if cached(images_root, kind, key).is_some() {
        fsutil::remove_tree(staged)?;
    } else {
        let _ = fsutil::remove_tree(&dir);
        fs::rename(staged, &dir)
            .ctx(|| format!("moving {} to {}", staged.display(), dir.display()))?;
    }
    prune(images_root, kind, key);
    Ok(dir.join("root"))
}

/// Removes trees of `kind` other than `keep`, and staging folders of dead builds.
fn prune(images_root: &Path, kind: TreeKind, keep: &str) {
    let Ok(entries) = fs::read_dir(images_root.join(TREES_DIR)) else {
        return;
    };
    let keep_name = format!("{}-{keep}", kind.prefix());
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale_stage = name
            .rsplit_once(".tmp-")
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        let older = name.starts_with(&format!("{}-", kind.prefix())) && name != keep_name;
        if stale_stage || older {
            if let Err(e) = fsutil::remove_tree(&entry.path()) {
                tracing::warn!("could not remove the old tree {name}: {e}");
            }
        }
    }
}

/// A mount that is undone when dropped (lazily, so a busy one never blocks).
pub(crate) struct MountGuard {
    target: PathBuf,
}

impl MountGuard {
    /// Mounts a fresh procfs on `root/proc` for commands in the chroot.
    pub(crate) fn proc(root: &Path) -> Result<MountGuard, ImageError> {
        let target = root.join("proc");
        fs::create_dir_all(&target).ctx(|| format!("creating {}", target.display()))?;
        nix::mount::mount(
            Some("proc"),
            &target,
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(|e| ImageError::io(format!("mounting proc on {}", target.display()), e.into()))?;
        Ok(MountGuard { target })
    }

    /// Mounts an overlay at `merged` with `lower` read-only below `upper`.
    pub(crate) fn overlay(
        lower: &Path,
        upper: &Path,
        work: &Path,
        merged: &Path,
    ) -> Result<MountGuard, ImageError> {
        for dir in [upper, work, merged] {
            fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        }
        let bad = |p: &Path| p.to_string_lossy().contains([',', ':', '\\']);
        if [lower, upper, work].iter().any(|p| bad(p)) {
            return Err(ImageError::io(
                "overlayfs options cannot name paths with ',' ':' or '\\'",
                std::io::Error::from(std::io::ErrorKind::InvalidInput),
            ));
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        nix::mount::mount(
            Some("overlay"),
            merged,
            Some("overlay"),
            MsFlags::empty(),
            Some(options.as_str()),
        )
        .map_err(|e| {
            ImageError::io(
                format!("mounting an overlay on {}", merged.display()),
                e.into(),
            )
        })?;
        Ok(MountGuard {
            target: merged.to_path_buf(),
        })
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.target, MntFlags::MNT_DETACH) {
            tracing::warn!("unmounting {}: {e}", self.target.display());
        }
    }
}

/// Writes the host's resolver configuration into the chroot for a step that
/// needs the network, and empties it again when dropped (images carry an empty
/// one; the guest writes its own at boot).
pub(crate) struct HostDns {
    path: PathBuf,
}

impl HostDns {
    pub(crate) fn install(root: &Path) -> Result<HostDns, ImageError> {
        let path = root.join("etc/resolv.conf");
        let host = fs::read("/etc/resolv.conf").unwrap_or_default();
        if fs::symlink_metadata(&path).is_ok() {
            fs::remove_file(&path).ctx(|| format!("replacing {}", path.display()))?;
        }
        fs::write(&path, host).ctx(|| format!("writing {}", path.display()))?;
        Ok(HostDns { path })
    }
}

impl Drop for HostDns {
    fn drop(&mut self) {
        if let Err(e) = fs::write(&self.path, b"") {
            tracing::warn!("emptying {}: {e}", self.path.display());
        }
    }
}

/// `invoke-rc.d` asks this script whether to start a service: never, in a chroot.
pub(crate) struct NoServices {
    path: PathBuf,
}

impl NoServices {
    pub(crate) fn install(root: &Path) -> Result<NoServices, ImageError> {
        use std::os::unix::fs::PermissionsExt;
        let path = root.join("usr/sbin/policy-rc.d");
        fs::write(&path, b"#!/bin/sh\nexit 101\n").ctx(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .ctx(|| format!("setting mode of {}", path.display()))?;
        Ok(NoServices { path })
    }
}

impl Drop for NoServices {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ImageSpec {
        let mut s = ImageSpec::default_for("t");
        s.mirror = "http://deb.debian.org/debian".into();
        s.extra_ca_certs = Vec::new();
        s
    }

    #[test]
    fn agent_images_share_both_trees_and_extras_change_only_the_second() {
        let claude = ImageSpec {
            agents: vec!["claude".into()],
            ..spec()
        };
        let codex = ImageSpec {
            agents: vec!["codex".into()],
            name: "codex".into(),
            ..spec()
        };
        assert_eq!(base_key(&claude), base_key(&spec()));
        assert_eq!(packages_key(&claude), packages_key(&codex));
        assert_ne!(claude.key(), codex.key());
        let mut extra = claude.clone();
        extra.packages.push("vim".into());
        assert_eq!(base_key(&extra), base_key(&claude));
        assert_ne!(packages_key(&extra), packages_key(&claude));
    }

    #[test]
    fn commit_moves_into_place_and_prunes_older_trees() {
        let root = tempfile::tempdir().unwrap();
        let old = tree_dir(root.path(), TreeKind::Base, "old");
        fs::create_dir_all(old.join("root")).unwrap();
        fs::write(old.join(DONE_FILE), b"").unwrap();
        let other_kind = tree_dir(root.path(), TreeKind::Packages, "x");
        fs::create_dir_all(&other_kind).unwrap();
        let staged = staging_dir(root.path(), TreeKind::Base, "new");
        fs::create_dir_all(staged.join("root/etc")).unwrap();
        let got = commit(root.path(), TreeKind::Base, "new", &staged).unwrap();
        assert_eq!(
            got,
            tree_dir(root.path(), TreeKind::Base, "new").join("root")
        );
        assert!(got.join("etc").is_dir());
        assert!(cached(root.path(), TreeKind::Base, "new").is_some());
        assert!(!old.exists(), "the older base tree is pruned");
        assert!(other_kind.exists(), "trees of another kind stay");
        assert!(!staged.exists());
    }
}
