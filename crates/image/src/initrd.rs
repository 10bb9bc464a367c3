//! The initramfs: `/init` is the guest binary, plus the boot modules. It is an
//! uncompressed newc cpio (fastest to unpack under emulation).
//!
//! Guarantee: the initramfs a start boots holds exactly the guest binary that
//! start asked for. Each one is content-addressed, `initrd-KEY.img` with KEY a
//! hash of the layout, the guest binary and the module list, and written once
//! (tmp + rename), so two sandpen builds sharing one image folder (two versions
//! on one machine, two worktrees) never boot each other's guest. Only the
//! [`KEEP`] most recently used ones are kept per folder.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::cpio::NewcWriter;
use crate::error::{ImageError, IoContext};
use crate::fsutil;
use crate::modules::{self, LOAD_ORDER_FILE};
use crate::store::Image;

/// Version of the initramfs layout; a change gives every initramfs a new name.
const INITRD_LAYOUT: u32 = 2;

/// How many initramfs files a folder keeps: the newest by last use.
const KEEP: usize = 4;

/// What an image folder held before initramfs files were content-addressed;
/// removed when a new one is written.
const LEGACY_FILES: [&str; 2] = ["initrd.img", "initrd.json"];

impl Image {
    /// Returns the initramfs for `guest_binary`, writing it if no start has yet:
    /// `initrd-KEY.img` in the image folder, or, when this user cannot write
    /// there (an image built by root), in `$XDG_CACHE_HOME/sandpen/initrd/`.
    /// Cheap when it exists: one hash of the guest binary.
    pub fn ensure_initrd(&self, guest_binary: &Path) -> Result<PathBuf, ImageError> {
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
        let key = initrd_key(&guest_sha256, &module_names);

        let (dir, name, shared) = if dir_writable(&self.dir) {
            (self.dir.clone(), format!("initrd-{key}.img"), true)
        } else {
            // A shared image (built by root, say) that this user cannot update:
            // keep a private initramfs for it instead.
            let image_key: String = self.manifest.key.chars().take(16).collect();
            (
                user_cache_dir(),
                format!("{}-{image_key}-{key}.img", self.name),
                false,
            )
        };
        let path = dir.join(&name);
        if path.is_file() {
            mark_used(&path);
            return Ok(path);
        }
        check_static(guest_binary)?;
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        write_initrd(&path, guest_binary, &module_paths).map_err(|e| hint_permission(e, &dir))?;
        if shared {
            for legacy in LEGACY_FILES {
                let _ = fs::remove_file(self.dir.join(legacy));
            }
            prune(&dir, "initrd-", &name);
        } else {
            prune(&dir, &format!("{}-", self.name), &name);
        }
        Ok(path)
    }
}

/// The first 16 hex digits of sha256(layout, guest binary hash, module names).
fn initrd_key(guest_sha256: &str, module_names: &[String]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(INITRD_LAYOUT.to_le_bytes());
    hasher.update(guest_sha256.as_bytes());
    for name in module_names {
        hasher.update([0]);
        hasher.update(name.as_bytes());
    }
    hasher
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `$XDG_CACHE_HOME/sandpen/initrd` (or `~/.cache/…`).
fn user_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| Path::new(v).is_absolute())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("sandpen/initrd")
}

/// Records a use as the file's modification time, which [`prune`] orders by.
/// Best effort: a file this user cannot touch is simply pruned sooner.
fn mark_used(path: &Path) {
    if let Ok(file) = File::options().append(true).open(path) {
        let _ = file.set_modified(SystemTime::now());
    }
}

/// Removes all but the [`KEEP`] most recently used `PREFIX*.img` files in `dir`,
/// never `keep`. A start that already handed its file to QEMU is unaffected (QEMU
/// reads the initramfs once, at launch), and one whose file went writes it again.
fn prune(dir: &Path, prefix: &str, keep: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut found: Vec<(SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(prefix) && name.ends_with(".img") && name != keep
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    found.sort_by_key(|entry| std::cmp::Reverse(entry.0));
    for (_, path) in found.into_iter().skip(KEEP - 1) {
        let _ = fs::remove_file(path);
    }
}

/// Whether this process may create files in `dir`.
fn dir_writable(dir: &Path) -> bool {
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok()
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
    use crate::store::MODULES_DIR;
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
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let image = image_with_modules(tmp.path());
        let guest = tmp.path().join("sandpen-guest");
        fs::write(&guest, static_elf(b"v1")).unwrap();
        fs::write(image.dir.join("initrd.img"), b"from an older sandpen").unwrap();

        let v1 = image.ensure_initrd(&guest).unwrap();
        assert_eq!(v1.parent(), Some(image.dir.as_path()));
        let name = v1.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("initrd-") && name.ends_with(".img"),
            "{name}"
        );
        assert!(!image.dir.join("initrd.img").exists(), "legacy file kept");

        // Unchanged guest: the same file, not rewritten (same inode).
        let ino = fs::metadata(&v1).unwrap().ino();
        assert_eq!(image.ensure_initrd(&guest).unwrap(), v1);
        assert_eq!(fs::metadata(&v1).unwrap().ino(), ino);

        // Another guest binary (a second sandpen build sharing the folder): its own
        // file, and the first one is left as it was for the build that uses it.
        let guest2 = tmp.path().join("sandpen-guest-2");
        fs::write(&guest2, static_elf(b"version two")).unwrap();
        let v2 = image.ensure_initrd(&guest2).unwrap();
        assert_ne!(v1, v2);
        assert_eq!(fs::metadata(&v1).unwrap().ino(), ino);
        assert!(cpio_listing_contains(&v2, "version two"));
        assert_eq!(image.ensure_initrd(&guest).unwrap(), v1);

        // Many builds: only the most recently used few are kept, and the one just
        // used is among them.
        for i in 0..6 {
            let g = tmp.path().join(format!("guest-{i}"));
            fs::write(&g, static_elf(format!("build {i}").as_bytes())).unwrap();
            image.ensure_initrd(&g).unwrap();
        }
        let kept: Vec<_> = fs::read_dir(&image.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("initrd-"))
            .collect();
        assert_eq!(kept.len(), KEEP, "{kept:?}");

        // No temporary files left behind.
        let leftovers: Vec<_> = fs::read_dir(&image.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    fn cpio_listing_contains(path: &Path, needle: &str) -> bool {
        let bytes = fs::read(path).unwrap();
        bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
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
        let written: Vec<_> = fs::read_dir(&image.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with("initrd"))
            .collect();
        assert!(written.is_empty(), "{written:?}");
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
