//! `manifest.json`: what an image is, what it was built from, and its files.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::{ImageError, IoContext};
use crate::fsutil;

/// The manifest's file name inside an image directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Version of the manifest's own layout.
pub const MANIFEST_FORMAT: u32 = 1;

/// Describes a built image. Written last, atomically: an image without one is not done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout version of this file ([`MANIFEST_FORMAT`]).
    pub format: u32,
    pub name: String,
    pub suite: String,
    pub mirror: String,
    /// The spec's cache key ([`crate::ImageSpec::key`]).
    pub key: String,
    /// [`crate::RECIPE_VERSION`] at build time.
    pub recipe_version: u32,
    /// `uname -r` of the image's kernel.
    pub kernel_release: String,
    /// The file to boot: `vmlinux` (ELF) or `vmlinuz` (bzImage).
    pub kernel_file: String,
    /// Why there is no `vmlinux`, when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_note: Option<String>,
    /// Boot module file names under `modules/`, in load order.
    pub boot_modules: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Version of sandpen that built it.
    pub sandpen_version: String,
    /// Every package passed to debootstrap's `--include`.
    pub packages: Vec<String>,
    /// Installed versions of those packages, from dpkg.
    #[serde(default)]
    pub package_versions: BTreeMap<String, String>,
    /// Agents installed (name → version of its npm package); empty for images
    /// without agents.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub agents: BTreeMap<String, String>,
    /// The version of mise at `/usr/local/bin/mise` (docs/dev-env.md,
    /// "Provisioning"); none in an image built before sandpen provisioned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mise: Option<String>,
    /// Hashes and sizes of the image's files (paths relative to the image directory).
    pub files: Vec<FileEntry>,
    pub sizes: Sizes,
    /// The image this one was saved from (`sandpen save`); none for a built one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The sandbox whose disk it was saved from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_from: Option<String>,
    /// Wall-clock seconds the build took.
    #[serde(default)]
    pub build_seconds: f64,
    /// How long each build step took.
    #[serde(default)]
    pub steps: Vec<StepTiming>,
}

/// The duration of one build step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepTiming {
    pub step: String,
    pub seconds: f64,
}

/// One file of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the image directory, e.g. `rootfs.img`, `modules/virtio_blk.ko.xz`.
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// Size figures, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sizes {
    /// Disk usage of the root tree that went into the ext4.
    pub rootfs_content: u64,
    /// Apparent size of `rootfs.img` (the filesystem's size).
    pub rootfs_image: u64,
    /// Blocks `rootfs.img` occupies on the host (it is sparse).
    pub rootfs_allocated: u64,
    /// Size of the kernel file that is booted.
    pub kernel: u64,
    /// Total size of the boot modules.
    pub boot_modules: u64,
}

impl Manifest {
    /// Reads `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Manifest, ImageError> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = fs::read(&path).ctx(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).map_err(|source| ImageError::Manifest { path, source })
    }

    /// Writes `dir/manifest.json` atomically (temporary file, then rename).
    pub fn write(&self, dir: &Path) -> Result<(), ImageError> {
        let path = dir.join(MANIFEST_FILE);
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|source| ImageError::Manifest {
            path: path.clone(),
            source,
        })?;
        bytes.push(b'\n');
        fsutil::atomic_write(&path, &bytes)
    }

    /// Whether every listed file exists in `dir` with its recorded size (no hashing).
    pub fn files_present(&self, dir: &Path) -> bool {
        self.files.iter().all(|f| {
            fs::metadata(dir.join(&f.name)).is_ok_and(|m| m.is_file() && m.len() == f.size)
        })
    }

    /// The entry for `name`, if listed.
    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(name: &str) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            name: name.into(),
            suite: "trixie".into(),
            mirror: "http://deb.debian.org/debian".into(),
            key: "ab".repeat(32),
            recipe_version: crate::RECIPE_VERSION,
            kernel_release: "6.12.0-test".into(),
            kernel_file: "vmlinux".into(),
            kernel_note: None,
            boot_modules: vec!["virtio_mmio.ko.xz".into()],
            created_at: OffsetDateTime::UNIX_EPOCH,
            sandpen_version: env!("CARGO_PKG_VERSION").into(),
            packages: vec!["curl".into()],
            package_versions: BTreeMap::from([("curl".into(), "8.14.1-2".into())]),
            agents: BTreeMap::new(),
            mise: None,
            files: vec![FileEntry {
                name: "vmlinux".into(),
                size: 3,
                sha256: "00".repeat(32),
            }],
            sizes: Sizes::default(),
            build_seconds: 1.5,
            parent: None,
            saved_from: None,
            steps: vec![StepTiming {
                step: "debootstrap trixie".into(),
                seconds: 1.0,
            }],
        }
    }

    #[test]
    fn round_trips_through_json_with_rfc3339_time() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = sample("default");
        manifest.write(dir.path()).unwrap();
        let text = fs::read_to_string(dir.path().join(MANIFEST_FILE)).unwrap();
        assert!(
            text.contains("\"created_at\": \"1970-01-01T00:00:00Z\""),
            "{text}"
        );
        assert_eq!(Manifest::read(dir.path()).unwrap(), manifest);
    }

    #[test]
    fn write_is_atomic_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        sample("a").write(dir.path()).unwrap();
        sample("b").write(dir.path()).unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap().name, "b");
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [MANIFEST_FILE]);
    }

    #[test]
    fn corrupt_manifest_error_names_file_and_fix() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(MANIFEST_FILE), b"{ not json").unwrap();
        let err = Manifest::read(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("manifest.json") && err.contains("sandpen image build"),
            "{err}"
        );
    }

    #[test]
    fn files_present_checks_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = sample("a");
        assert!(!manifest.files_present(dir.path()));
        fs::write(dir.path().join("vmlinux"), b"abc").unwrap();
        assert!(manifest.files_present(dir.path()));
        fs::write(dir.path().join("vmlinux"), b"abcd").unwrap();
        assert!(!manifest.files_present(dir.path()));
    }
}
