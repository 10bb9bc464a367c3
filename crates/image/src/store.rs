//! Images on disk: `images_root/NAME/` with a manifest; load, list, remove.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{ImageError, IoContext};
use crate::fsutil;
use crate::manifest::{Manifest, MANIFEST_FILE};

/// The bzImage as Debian ships it.
pub const VMLINUZ_FILE: &str = "vmlinuz";
/// The ELF kernel unpacked from it (booted through PVH).
pub const VMLINUX_FILE: &str = "vmlinux";
/// The raw ext4 root filesystem.
pub const ROOTFS_FILE: &str = "rootfs.img";
/// Boot modules (`.ko.xz`) and their `load-order`.
pub const MODULES_DIR: &str = "modules";
/// The toolchain trees a saved image keeps from its sandbox (linked copies;
/// docs/dev-env.md, "Shared toolchain trees").
pub const TOOLCHAINS_DIR: &str = "toolchains";

/// A built image.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub name: String,
    /// `images_root/NAME`.
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Image {
    /// The kernel to boot: `vmlinux` (ELF) when it was extracted, else `vmlinuz`.
    pub fn kernel(&self) -> PathBuf {
        let vmlinux = self.dir.join(VMLINUX_FILE);
        if self.manifest.kernel_file == VMLINUX_FILE && vmlinux.is_file() {
            vmlinux
        } else {
            self.dir.join(VMLINUZ_FILE)
        }
    }

    /// The raw ext4 root filesystem (the backing file of each sandbox's overlay).
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join(ROOTFS_FILE)
    }

    /// The directory holding the boot modules and `load-order`.
    pub fn modules_dir(&self) -> PathBuf {
        self.dir.join(MODULES_DIR)
    }
}

/// Image names are one path component: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`.
pub(crate) fn validate_name(name: &str) -> Result<(), ImageError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ImageError::InvalidName {
            name: name.to_string(),
        })
    }
}

/// Loads the image `name`. A missing image (or one whose build never finished, so
/// has no manifest) is [`ImageError::NotFound`].
pub fn load(images_root: &Path, name: &str) -> Result<Image, ImageError> {
    validate_name(name)?;
    let dir = images_root.join(name);
    match fs::metadata(dir.join(MANIFEST_FILE)) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ImageError::NotFound {
                name: name.to_string(),
            })
        }
        Err(e) => {
            return Err(ImageError::io(
                format!("reading {}", dir.join(MANIFEST_FILE).display()),
                e,
            ))
        }
    }
    let manifest = Manifest::read(&dir)?;
    Ok(Image {
        name: name.to_string(),
        dir,
        manifest,
    })
}

/// All images under `images_root`, by name. Directories without a readable manifest
/// (builds in progress, broken images) are skipped with a warning in the log.
pub fn list(images_root: &Path) -> Result<Vec<Image>, ImageError> {
    let entries = match fs::read_dir(images_root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(ImageError::io(
                format!("listing images in {}", images_root.display()),
                e,
            ))
        }
    };
    let mut images = Vec::new();
    for entry in entries {
        let entry = entry.ctx(|| format!("listing images in {}", images_root.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if validate_name(&name).is_err() || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        match load(images_root, &name) {
            Ok(image) => images.push(image),
            Err(ImageError::NotFound { .. }) => {}
            Err(e) => tracing::warn!("skipping image {name}: {e}"),
        }
    }
    images.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(images)
}

/// Removes the image `name`. Sandboxes whose overlays use its rootfs stop working.
pub fn remove(images_root: &Path, name: &str) -> Result<(), ImageError> {
    validate_name(name)?;
    let dir = images_root.join(name);
    if !fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
        return Err(ImageError::NotFound {
            name: name.to_string(),
        });
    }
    // Rename first so a half-removed image is never seen under its name.
    let doomed = images_root.join(format!(".{name}.removing-{}", std::process::id()));
    fs::rename(&dir, &doomed).ctx(|| format!("removing image {}", dir.display()))?;
    fsutil::remove_tree(&doomed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample;

    fn put(root: &Path, name: &str) -> PathBuf {
        let dir = root.join(name);
        fs::create_dir_all(&dir).unwrap();
        sample(name).write(&dir).unwrap();
        fs::write(dir.join(VMLINUX_FILE), b"abc").unwrap();
        dir
    }

    #[test]
    fn not_found_says_what_to_run() {
        let root = tempfile::tempdir().unwrap();
        let err = load(root.path(), "default").unwrap_err();
        assert!(matches!(err, ImageError::NotFound { .. }));
        assert_eq!(
            err.to_string(),
            "image \"default\" not found: run `sandpen image build` first"
        );
        // A directory without a manifest (an unfinished build) is not an image.
        fs::create_dir_all(root.path().join("default")).unwrap();
        assert!(matches!(
            load(root.path(), "default"),
            Err(ImageError::NotFound { .. })
        ));
    }

    #[test]
    fn names_are_one_safe_path_component() {
        for good in ["default", "agents-2", "a.b_c"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "../x", "a/b", "-x", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        let root = tempfile::tempdir().unwrap();
        assert!(matches!(
            load(root.path(), "../etc"),
            Err(ImageError::InvalidName { .. })
        ));
    }

    #[test]
    fn load_list_remove() {
        let root = tempfile::tempdir().unwrap();
        let dir = put(root.path(), "zeta");
        put(root.path(), "alpha");
        fs::create_dir_all(root.path().join(".alpha.build-123")).unwrap();
        fs::create_dir_all(root.path().join("unfinished")).unwrap();
        fs::create_dir_all(root.path().join("broken")).unwrap();
        fs::write(root.path().join("broken").join(MANIFEST_FILE), b"{").unwrap();

        let image = load(root.path(), "zeta").unwrap();
        assert_eq!(image.dir, dir);
        assert_eq!(image.kernel(), dir.join(VMLINUX_FILE));
        assert_eq!(image.rootfs(), dir.join(ROOTFS_FILE));

        let names: Vec<String> = list(root.path())
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
        assert_eq!(names, ["alpha", "zeta"]);

        remove(root.path(), "zeta").unwrap();
        assert!(!dir.exists());
        assert!(matches!(
            remove(root.path(), "zeta"),
            Err(ImageError::NotFound { .. })
        ));
        assert!(list(&root.path().join("missing")).unwrap().is_empty());
    }

    #[test]
    fn kernel_falls_back_to_vmlinuz() {
        let root = tempfile::tempdir().unwrap();
        let dir = put(root.path(), "a");
        fs::remove_file(dir.join(VMLINUX_FILE)).unwrap();
        let image = load(root.path(), "a").unwrap();
        assert_eq!(image.kernel(), dir.join(VMLINUZ_FILE));
        let mut image = image;
        image.manifest.kernel_file = "../../etc/passwd".into();
        assert_eq!(image.kernel(), dir.join(VMLINUZ_FILE));
    }
}
