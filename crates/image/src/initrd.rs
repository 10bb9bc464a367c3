//! The initramfs: `/init` is the guest binary, plus the boot modules. It is an
//! uncompressed newc cpio (fastest to unpack under emulation), rewritten only when
//! the guest binary or the module list changes.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cpio::NewcWriter;
use crate::error::{ImageError, IoContext};
use crate::fsutil;
use crate::modules::{self, LOAD_ORDER_FILE};
use crate::store::{Image, INITRD_RECORD_FILE};

/// Version of the initramfs layout; a change forces a rewrite.
const INITRD_LAYOUT: u32 = 1;

/// `initrd.json`: what `initrd.img` was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitrdRecord {
    pub layout: u32,
    /// sha256 of the guest binary that is `/init`.
    pub guest_sha256: String,
    /// Module file names under `/sandpen/modules`, in load order.
    pub modules: Vec<String>,
    /// Size of `initrd.img` when it was written.
    pub size: u64,
}

impl Image {
    /// (Re)writes `initrd.img` when the guest binary's sha256 differs from the one
    /// recorded in `initrd.json` (atomic: tmp + rename); returns its path. Cheap when
    /// current: one hash of the guest binary.
    pub fn ensure_initrd(&self, guest_binary: &Path) -> Result<PathBuf, ImageError> {
        let initrd = self.initrd();
        let guest_sha256 = fsutil::sha256_file(guest_binary, |_| {}).map_err(|e| match e {
            ImageError::Io { context, source } => ImageError::Io {
                context: format!(
                    "{context} (the guest binary; build it with `cargo build -p sandpen-guest`)"
                ),
                source,
            },
            other => other,
        })?;
        let module_paths = modules::read_load_order(&self.modules_dir())?;
        let module_names: Vec<String> = module_paths
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();

        let record_path = self.dir.join(INITRD_RECORD_FILE);
        if let Some(record) = read_record(&record_path) {
            let current = record.layout == INITRD_LAYOUT
                && record.guest_sha256 == guest_sha256
                && record.modules == module_names
                && fs::metadata(&initrd).is_ok_and(|m| m.len() == record.size);
            if current {
                return Ok(initrd);
            }
        }

        check_static(guest_binary)?;
        if !dir_writable(&self.dir) {
            // A shared image (built by root, say) that this user cannot update:
            // keep a private initramfs for this guest binary instead.
            return self.user_initrd(guest_binary, &guest_sha256, &module_paths);
        }
        let size = write_initrd(&initrd, guest_binary, &module_paths)
            .map_err(|e| hint_permission(e, &self.dir))?;
        let record = InitrdRecord {
            layout: INITRD_LAYOUT,
            guest_sha256,
            modules: module_names,
            size,
        };
        let mut bytes =
            serde_json::to_vec_pretty(&record).map_err(|source| ImageError::Manifest {
                path: record_path.clone(),
                source,
            })?;
        bytes.push(b'\n');
        fsutil::atomic_write(&record_path, &bytes).map_err(|e| hint_permission(e, &self.dir))?;
        Ok(initrd)
    }
}

impl Image {
    /// `$XDG_CACHE_HOME/sandpen/initrd/NAME-KEY-GUEST.img`: content-addressed by
    /// the image key and the guest binary's hash, so it never needs a record.
    fn user_initrd(
        &self,
        guest_binary: &Path,
        guest_sha256: &str,
        modules: &[PathBuf],
    ) -> Result<PathBuf, ImageError> {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| Path::new(v).is_absolute())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(std::env::temp_dir)
            .join("sandpen/initrd");
        let key: String = self.manifest.key.chars().take(16).collect();
        let guest: String = guest_sha256.chars().take(16).collect();
        let path = cache.join(format!("{}-{key}-{guest}.img", self.name));
        if path.is_file() {
            return Ok(path);
        }
        fs::create_dir_all(&cache).ctx(|| format!("creating {}", cache.display()))?;
        write_initrd(&path, guest_binary, modules)?;
        Ok(path)
    }
}

/// Whether this process may create files in `dir`.
fn dir_writable(dir: &Path) -> bool {
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok()
}

fn read_record(path: &Path) -> Option<InitrdRecord> {
    let bytes = fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Writes the cpio to a temporary file and renames it over `initrd`. Returns its size.
fn write_initrd(
    initrd: &Path,
    guest_binary: &Path,
    modules: &[PathBuf],
) -> Result<u64, ImageError> {
    let tmp = fsutil::tmp_sibling(initrd);
    let result = write_cpio(&tmp, guest_binary, modules).and_then(|size| {
        fs::rename(&tmp, initrd)
            .ctx(|| format!("renaming {} to {}", tmp.display(), initrd.display()))?;
        Ok(size)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn write_cpio(path: &Path, guest_binary: &Path, modules: &[PathBuf]) -> Result<u64, ImageError> {
    let file = File::create(path).ctx(|| format!("creating {}", path.display()))?;
    let writing = || format!("writing initramfs {}", path.display());
    let mut cpio = NewcWriter::new(BufWriter::new(file));
    for dir in [
        "dev",
        "proc",
        "sys",
        "newroot",
        "sandpen",
        "sandpen/modules",
    ] {
        cpio.dir(dir, 0o755).ctx(writing)?;
    }
    cpio.char_device("dev/console", 0o600, 5, 1).ctx(writing)?;
    add_file(&mut cpio, "init", 0o755, guest_binary)?;
    let mut order = String::new();
    for module in modules {
        let name = module
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        add_file(&mut cpio, &format!("sandpen/modules/{name}"), 0o644, module)?;
        order.push_str(&name);
        order.push('\n');
    }
    cpio.file(
        &format!("sandpen/modules/{LOAD_ORDER_FILE}"),
        0o644,
        order.len() as u64,
        order.as_bytes(),
    )
    .ctx(writing)?;
    let file = cpio
        .finish()
        .ctx(writing)?
        .into_inner()
        .map_err(|e| ImageError::io(writing(), e.into_error()))?;
    file.sync_all().ctx(writing)?;
    let size = file.metadata().ctx(writing)?.len();
    Ok(size)
}

fn add_file(
    cpio: &mut NewcWriter<BufWriter<File>>,
    name: &str,
    perm: u32,
    src: &Path,
) -> Result<(), ImageError> {
    let file = File::open(src).ctx(|| format!("opening {} for the initramfs", src.display()))?;
    let size = file
        .metadata()
        .ctx(|| format!("reading {}", src.display()))?
        .len();
    cpio.file(name, perm, size, file)
        .ctx(|| format!("adding {} to the initramfs as /{name}", src.display()))
}

/// The initramfs has no libc, so `/init` must be statically linked: refuse an ELF
/// with a program interpreter (PT_INTERP) before the guest dies at boot.
pub fn check_static(binary: &Path) -> Result<(), ImageError> {
    let not_static = |reason: String| ImageError::Io {
        context: format!(
            "guest binary {} {reason}; the initramfs has no libc, so build sandpen-guest \
             static (e.g. --target x86_64-unknown-linux-musl)",
            binary.display()
        ),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    };
    let mut file =
        File::open(binary).ctx(|| format!("opening guest binary {}", binary.display()))?;
    let mut header = [0u8; 64];
    file.read_exact(&mut header)
        .map_err(|_| not_static("is too short to be an ELF".into()))?;
    crate::kernel::check_elf_header(&header)
        .map_err(|reason| not_static(reason.replace("result", "it")))?;
    let phoff = u64::from_le_bytes(header[0x20..0x28].try_into().unwrap_or_default());
    let phentsize = u16::from_le_bytes([header[0x36], header[0x37]]) as usize;
    let phnum = u16::from_le_bytes([header[0x38], header[0x39]]) as usize;
    if phentsize < 4 || phnum == 0 {
        return Ok(());
    }
    let mut table = vec![0u8; phentsize * phnum];
    file.seek(SeekFrom::Start(phoff))
        .and_then(|_| file.read_exact(&mut table))
        .ctx(|| format!("reading the program headers of {}", binary.display()))?;
    const PT_INTERP: u32 = 3;
    let has_interp = table
        .chunks_exact(phentsize)
        .any(|ph| u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_INTERP);
    if has_interp {
        return Err(not_static("is dynamically linked".into()));
    }
    Ok(())
}

/// Adds a hint when the image directory is not writable by this user.
fn hint_permission(err: ImageError, dir: &Path) -> ImageError {
    match err {
        ImageError::Io { context, source }
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            ImageError::Io {
                context: format!(
                    "{context} ({} is not writable by this user; give it back with \
                     `sudo chown -R $USER {}` or rebuild the image as this user)",
                    dir.display(),
                    dir.display()
                ),
                source,
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample;
    use crate::store::{INITRD_FILE, MODULES_DIR};
    use std::process::{Command, Stdio};

    /// A static x86-64 ELF: header plus one PT_LOAD program header.
    fn static_elf(extra: &[u8]) -> Vec<u8> {
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[18] = 62;
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        elf.extend_from_slice(extra);
        elf
    }

    fn image_with_modules(root: &Path) -> Image {
        let dir = root.join("default");
        let modules = dir.join(MODULES_DIR);
        fs::create_dir_all(&modules).unwrap();
        fs::write(modules.join("virtio_mmio.ko.xz"), b"mmio-module").unwrap();
        fs::write(modules.join("virtio_blk.ko.xz"), b"blk").unwrap();
        fs::write(
            modules.join(LOAD_ORDER_FILE),
            "virtio_mmio.ko.xz\nvirtio_blk.ko.xz\n",
        )
        .unwrap();
        Image {
            name: "default".into(),
            dir,
            manifest: sample("default"),
        }
    }

    fn cpio_listing(path: &Path) -> String {
        let out = Command::new("cpio")
            .args(["-itv", "--quiet"])
            .stdin(File::open(path).unwrap())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn writes_and_reuses_initrd() {
        let tmp = tempfile::tempdir().unwrap();
        let image = image_with_modules(tmp.path());
        let guest = tmp.path().join("sandpen-guest");
        fs::write(&guest, static_elf(b"v1")).unwrap();

        let path = image.ensure_initrd(&guest).unwrap();
        assert_eq!(path, image.dir.join(INITRD_FILE));
        let record: InitrdRecord =
            serde_json::from_slice(&fs::read(image.dir.join(INITRD_RECORD_FILE)).unwrap()).unwrap();
        assert_eq!(record.modules, ["virtio_mmio.ko.xz", "virtio_blk.ko.xz"]);
        assert_eq!(record.size, fs::metadata(&path).unwrap().len());

        // Unchanged guest: the file is not rewritten (same inode).
        use std::os::unix::fs::MetadataExt;
        let ino = fs::metadata(&path).unwrap().ino();
        image.ensure_initrd(&guest).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().ino(), ino);

        // A new guest binary: rewritten.
        fs::write(&guest, static_elf(b"version two")).unwrap();
        image.ensure_initrd(&guest).unwrap();
        assert_ne!(fs::metadata(&path).unwrap().ino(), ino);
        let record2: InitrdRecord =
            serde_json::from_slice(&fs::read(image.dir.join(INITRD_RECORD_FILE)).unwrap()).unwrap();
        assert_ne!(record.guest_sha256, record2.guest_sha256);

        // No temporary files left behind.
        let leftovers: Vec<_> = fs::read_dir(&image.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn initrd_lists_with_gnu_cpio() {
        if Command::new("cpio").arg("--version").output().is_err() {
            eprintln!("note: cpio not installed; skipping");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let image = image_with_modules(tmp.path());
        let guest = tmp.path().join("sandpen-guest");
        fs::write(&guest, static_elf(b"guest")).unwrap();
        let path = image.ensure_initrd(&guest).unwrap();
        let listing = cpio_listing(&path);
        let entry = |name: &str| {
            listing
                .lines()
                .find(|l| l.ends_with(&format!(" {name}")))
                .unwrap_or_else(|| panic!("{name} missing from:\n{listing}"))
                .to_string()
        };
        for dir in [
            "dev",
            "proc",
            "sys",
            "newroot",
            "sandpen",
            "sandpen/modules",
        ] {
            assert!(entry(dir).starts_with("drwxr-xr-x"), "{listing}");
        }
        let console = entry("dev/console");
        assert!(
            console.starts_with("crw-------") && console.contains("5,"),
            "{console}"
        );
        assert!(entry("init").starts_with("-rwxr-xr-x"), "{listing}");
        assert!(entry("sandpen/modules/virtio_mmio.ko.xz").starts_with("-rw-r--r--"));
        assert!(entry("sandpen/modules/virtio_blk.ko.xz").starts_with("-rw-r--r--"));
        assert!(entry("sandpen/modules/load-order").starts_with("-rw-r--r--"));

        // Extract and compare /init and load-order byte for byte.
        let out = tmp.path().join("x");
        fs::create_dir(&out).unwrap();
        let status = Command::new("cpio")
            .args([
                "-id",
                "--quiet",
                "--no-absolute-filenames",
                "init",
                "sandpen/modules/*",
            ])
            .current_dir(&out)
            .stdin(File::open(&path).unwrap())
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(
            fs::read(out.join("init")).unwrap(),
            fs::read(&guest).unwrap()
        );
        assert_eq!(
            fs::read_to_string(out.join("sandpen/modules/load-order")).unwrap(),
            "virtio_mmio.ko.xz\nvirtio_blk.ko.xz\n"
        );
        assert_eq!(
            fs::read(out.join("sandpen/modules/virtio_mmio.ko.xz")).unwrap(),
            b"mmio-module"
        );
    }

    #[test]
    fn dynamic_or_non_elf_guest_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let image = image_with_modules(tmp.path());
        let guest = tmp.path().join("guest");
        let mut dynamic = static_elf(b"");
        dynamic[64..68].copy_from_slice(&3u32.to_le_bytes()); // PT_INTERP
        fs::write(&guest, &dynamic).unwrap();
        let err = image.ensure_initrd(&guest).unwrap_err().to_string();
        assert!(
            err.contains("dynamically linked") && err.contains("musl"),
            "{err}"
        );

        fs::write(
            &guest,
            b"#!/bin/sh\necho not an elf, but long enough to read a header from it....\n",
        )
        .unwrap();
        let err = image.ensure_initrd(&guest).unwrap_err().to_string();
        assert!(err.contains("ELF"), "{err}");
        assert!(!image.initrd().exists());
    }

    #[test]
    fn missing_guest_binary_says_how_to_build_it() {
        let tmp = tempfile::tempdir().unwrap();
        let image = image_with_modules(tmp.path());
        let err = image
            .ensure_initrd(&tmp.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cargo build -p sandpen-guest"), "{err}");
    }
}
