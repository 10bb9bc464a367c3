//! Kernel modules the initramfs loads before it can mount the root disk, resolved
//! through the rootfs's `modules.dep` so dependencies load first.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{ImageError, IoContext};
use crate::fsutil;

/// Modules the guest needs to reach its root disk on QEMU's microvm. Everything
/// else it needs at boot (ext4, virtiofs, fuse, virtio_console) is built in.
/// `virtio_rng` seeds the guest's entropy pool at boot: without it (and with no
/// RDRAND, as under TCG) `getrandom` blocks for a long time.
pub const BOOT_MODULES: &[&str] = &["virtio_mmio", "virtio_blk", "virtio_rng"];

/// The name of the file listing module file names in load order.
pub const LOAD_ORDER_FILE: &str = "load-order";

/// `modules.dep` parsed: module name → (relative path, dependency paths).
#[derive(Debug, Default)]
pub(crate) struct ModuleDeps {
    by_name: BTreeMap<String, (String, Vec<String>)>,
    name_of_path: BTreeMap<String, String>,
}

impl ModuleDeps {
    /// Parses lines of the form `kernel/x/a.ko.xz: kernel/y/b.ko.xz kernel/z/c.ko.xz`.
    pub(crate) fn parse(text: &str) -> Self {
        let mut deps = ModuleDeps::default();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((path, rest)) = line.split_once(':') else {
                continue;
            };
            let path = path.trim().to_string();
            let needs: Vec<String> = rest.split_whitespace().map(str::to_string).collect();
            let name = module_name(&path);
            deps.name_of_path.insert(path.clone(), name.clone());
            deps.by_name.insert(name, (path, needs));
        }
        deps
    }

    /// The relative paths to load for `wanted`, each dependency before its users,
    /// each once. Names are normalized (`-` and `_` are the same). A name in
    /// `builtin` is skipped; any other unknown name is an error.
    pub(crate) fn resolve(
        &self,
        wanted: &[&str],
        builtin: &HashSet<String>,
    ) -> Result<Vec<String>, ImageError> {
        let mut order = Vec::new();
        let mut done = HashSet::new();
        for want in wanted {
            let name = normalize(want);
            if !self.by_name.contains_key(&name) {
                if builtin.contains(&name) {
                    continue;
                }
                return Err(ImageError::Module {
                    module: name,
                    reason: "neither in modules.dep nor in modules.builtin of the image's kernel"
                        .into(),
                });
            }
            let mut in_progress = Vec::new();
            self.visit(&name, &mut done, &mut in_progress, &mut order)?;
        }
        Ok(order)
    }

    /// Depth-first, post-order: a module is emitted after all it depends on.
    fn visit(
        &self,
        name: &str,
        done: &mut HashSet<String>,
        in_progress: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<(), ImageError> {
        if done.contains(name) {
            return Ok(());
        }
        if in_progress.iter().any(|n| n == name) {
            return Err(ImageError::Module {
                module: name.to_string(),
                reason: format!("dependency cycle: {} -> {name}", in_progress.join(" -> ")),
            });
        }
        let Some((path, needs)) = self.by_name.get(name) else {
            return Err(ImageError::Module {
                module: name.to_string(),
                reason: format!(
                    "needed by {} but missing from modules.dep",
                    in_progress.last().map(String::as_str).unwrap_or("?")
                ),
            });
        };
        in_progress.push(name.to_string());
        for dep_path in needs {
            let dep = self
                .name_of_path
                .get(dep_path)
                .cloned()
                .unwrap_or_else(|| module_name(dep_path));
            self.visit(&dep, done, in_progress, order)?;
        }
        in_progress.pop();
        done.insert(name.to_string());
        order.push(path.clone());
        Ok(())
    }
}

/// `kernel/drivers/virtio/virtio_mmio.ko.xz` → `virtio_mmio`.
pub(crate) fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split_once(".ko").map(|(s, _)| s).unwrap_or(file);
    normalize(stem)
}

fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Names of built-in modules from `modules.builtin` text.
pub(crate) fn parse_builtin(text: &str) -> HashSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(module_name)
        .collect()
}

/// Resolves [`BOOT_MODULES`] in the rootfs and copies them, still compressed, into
/// `dest`, with a `load-order` file. Returns the file names in load order.
pub(crate) fn copy_boot_modules(
    root: &Path,
    release: &str,
    dest: &Path,
) -> Result<Vec<String>, ImageError> {
    let dir = crate::kernel::modules_dir(root, release);
    let dep_path = dir.join("modules.dep");
    let dep_text =
        fs::read_to_string(&dep_path).ctx(|| format!("reading {}", dep_path.display()))?;
    let builtin_path = dir.join("modules.builtin");
    let builtin = match fs::read_to_string(&builtin_path) {
        Ok(text) => parse_builtin(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
        Err(e) => {
            return Err(ImageError::io(
                format!("reading {}", builtin_path.display()),
                e,
            ))
        }
    };
    let order = ModuleDeps::parse(&dep_text).resolve(BOOT_MODULES, &builtin)?;
    fs::create_dir_all(dest).ctx(|| format!("creating {}", dest.display()))?;
    let mut names = Vec::new();
    for rel in &order {
        let src = dir.join(rel);
        let file_name = file_name_of(rel);
        if names.contains(&file_name) {
            return Err(ImageError::Module {
                module: module_name(rel),
                reason: format!("two boot modules share the file name {file_name}"),
            });
        }
        fsutil::copy_file(&src, &dest.join(&file_name))?;
        names.push(file_name);
    }
    let mut list = names.join("\n");
    list.push('\n');
    fsutil::atomic_write(&dest.join(LOAD_ORDER_FILE), list.as_bytes())?;
    Ok(names)
}

fn file_name_of(rel: &str) -> String {
    rel.rsplit('/').next().unwrap_or(rel).to_string()
}

/// Reads `load-order` from an image's `modules/` directory.
pub(crate) fn read_load_order(dir: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let path = dir.join(LOAD_ORDER_FILE);
    let text = fs::read_to_string(&path).ctx(|| {
        format!(
            "reading {}; rebuild the image with `sandpen image build`",
            path.display()
        )
    })?;
    let mut files = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains('/') || line.starts_with('.') {
            return Err(ImageError::Module {
                module: line.to_string(),
                reason: format!("bad entry in {}", path.display()),
            });
        }
        files.push(dir.join(line));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/net/llc/llc.ko.xz:
kernel/net/802/stp.ko.xz: kernel/net/llc/llc.ko.xz
kernel/net/bridge/bridge.ko.xz: kernel/net/802/stp.ko.xz kernel/net/llc/llc.ko.xz
kernel/net/bridge/br_netfilter.ko.xz: kernel/net/bridge/bridge.ko.xz kernel/net/802/stp.ko.xz kernel/net/llc/llc.ko.xz
kernel/drivers/virtio/virtio_mmio.ko.xz:
kernel/drivers/block/virtio_blk.ko.xz:
kernel/drivers/char/hw_random/virtio-rng.ko.xz:
kernel/lib/crc-foo.ko.xz:
kernel/fs/needs-crc.ko.xz: kernel/lib/crc-foo.ko.xz
kernel/x/broken.ko.xz: kernel/x/gone.ko.xz
";

    fn names(paths: &[String]) -> Vec<String> {
        paths.iter().map(|p| module_name(p)).collect()
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let deps = ModuleDeps::parse(DEP);
        let order = deps
            .resolve(&["br_netfilter", "bridge", "virtio_blk"], &HashSet::new())
            .unwrap();
        assert_eq!(
            names(&order),
            ["llc", "stp", "bridge", "br_netfilter", "virtio_blk"]
        );
    }

    #[test]
    fn boot_modules_have_no_deps() {
        let order = ModuleDeps::parse(DEP)
            .resolve(BOOT_MODULES, &HashSet::new())
            .unwrap();
        assert_eq!(
            order,
            [
                "kernel/drivers/virtio/virtio_mmio.ko.xz",
                "kernel/drivers/block/virtio_blk.ko.xz",
                "kernel/drivers/char/hw_random/virtio-rng.ko.xz"
            ]
        );
    }

    #[test]
    fn dashes_and_underscores_are_the_same_name() {
        let order = ModuleDeps::parse(DEP)
            .resolve(&["needs_crc"], &HashSet::new())
            .unwrap();
        assert_eq!(names(&order), ["crc_foo", "needs_crc"]);
    }

    #[test]
    fn builtin_modules_are_skipped_and_unknown_ones_fail() {
        let builtin = parse_builtin("kernel/fs/ext4/ext4.ko\nkernel/fs/fuse/virtiofs.ko\n");
        let order = ModuleDeps::parse(DEP)
            .resolve(&["ext4", "virtio_blk"], &builtin)
            .unwrap();
        assert_eq!(names(&order), ["virtio_blk"]);
        let err = ModuleDeps::parse(DEP)
            .resolve(&["nope"], &builtin)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nope") && err.contains("modules.builtin"),
            "{err}"
        );
    }

    #[test]
    fn missing_dependency_and_cycle_are_errors() {
        let err = ModuleDeps::parse(DEP)
            .resolve(&["broken"], &HashSet::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("gone") && err.contains("broken"), "{err}");

        let cyclic = "a.ko: b.ko\nb.ko: a.ko\n";
        let err = ModuleDeps::parse(cyclic)
            .resolve(&["a"], &HashSet::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("cycle"), "{err}");
    }

    #[test]
    fn copies_modules_and_writes_load_order() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let mods = crate::kernel::modules_dir(&root, "6.12.0-test");
        for rel in [
            "kernel/drivers/virtio/virtio_mmio.ko.xz",
            "kernel/drivers/block/virtio_blk.ko.xz",
            "kernel/drivers/char/hw_random/virtio-rng.ko.xz",
        ] {
            let path = mods.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, rel.as_bytes()).unwrap();
        }
        fs::write(mods.join("modules.dep"), DEP).unwrap();
        let dest = dir.path().join("modules");
        let names = copy_boot_modules(&root, "6.12.0-test", &dest).unwrap();
        assert_eq!(
            names,
            ["virtio_mmio.ko.xz", "virtio_blk.ko.xz", "virtio-rng.ko.xz"]
        );
        assert_eq!(
            fs::read_to_string(dest.join(LOAD_ORDER_FILE)).unwrap(),
            "virtio_mmio.ko.xz\nvirtio_blk.ko.xz\nvirtio-rng.ko.xz\n"
        );
        let files = read_load_order(&dest).unwrap();
        assert_eq!(
            files,
            [
                dest.join("virtio_mmio.ko.xz"),
                dest.join("virtio_blk.ko.xz"),
                dest.join("virtio-rng.ko.xz")
            ]
        );
    }

    #[test]
    fn load_order_with_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(LOAD_ORDER_FILE), "../../etc/shadow\n").unwrap();
        assert!(read_load_order(dir.path()).is_err());
    }

    #[test]
    fn real_modules_dep_resolves_if_present() {
        let root = Path::new("/var/tmp/explore/root");
        let Ok((release, _)) = crate::kernel::find_kernel(root) else {
            eprintln!("note: no rootfs at {}; skipping", root.display());
            return;
        };
        let text =
            fs::read_to_string(crate::kernel::modules_dir(root, &release).join("modules.dep"))
                .unwrap();
        let order = ModuleDeps::parse(&text)
            .resolve(&["br_netfilter", "virtio_blk"], &HashSet::new())
            .unwrap();
        let order = names(&order);
        let pos = |n: &str| order.iter().position(|m| m == n).unwrap();
        assert!(
            pos("llc") < pos("stp")
                && pos("stp") < pos("bridge")
                && pos("bridge") < pos("br_netfilter"),
            "{order:?}"
        );
    }
}

/// Trailer of a signed kernel module.
const SIGNATURE_MARKER: &[u8] = b"~Module signature appended~\n";

/// A module without its appended signature (unchanged if it has none).
///
/// Layout: `module | signature | struct module_signature (12 bytes, the last
/// four the big-endian signature length) | marker`.
pub(crate) fn strip_signature(data: &[u8]) -> &[u8] {
    let Some(info_end) = data.len().checked_sub(SIGNATURE_MARKER.len()) else {
        return data;
    };
    if !data.ends_with(SIGNATURE_MARKER) || info_end < 12 {
        return data;
    }
    let info = &data[info_end - 12..info_end];
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    match (info_end - 12).checked_sub(sig_len) {
        Some(start) => &data[..start],
        None => data,
    }
}

/// Decompresses every module of the rootfs and strips its signature, then the
/// caller re-runs depmod.
///
/// Checking a module's signature costs about 100 ms per module under software
/// emulation, and it protects nothing here: the guest kernel is on the untrusted
/// side of the boundary, and its root may load any module anyway (signatures are
/// not enforced). The egress rules alone need nine modules at every boot.
pub(crate) fn unsign_modules(root: &Path, release: &str, xz: &Path) -> Result<usize, ImageError> {
    let dir = crate::kernel::modules_dir(root, release);
    let mut compressed = Vec::new();
    let mut plain = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).ctx(|| format!("reading {}", d.display()))? {
            let entry = entry.ctx(|| format!("reading {}", d.display()))?;
            let path = entry.path();
            let kind = entry
                .file_type()
                .ctx(|| format!("reading {}", path.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if kind.is_dir() {
                stack.push(path);
            } else if name.ends_with(".ko.xz") {
                compressed.push(path);
            } else if name.ends_with(".ko") {
                plain.push(path);
            }
        }
    }
    for chunk in compressed.chunks(256) {
        let out = std::process::Command::new(xz)
            .args(["-d", "-q", "-f", "--"])
            .args(chunk)
            .output()
            .ctx(|| format!("running {}", xz.display()))?;
        if !out.status.success() {
            return Err(ImageError::Module {
                module: chunk[0].display().to_string(),
                reason: format!(
                    "xz -d failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
    }
    plain.extend(compressed.iter().map(|p| p.with_extension("")));
    for path in &plain {
        let data = fs::read(path).ctx(|| format!("reading {}", path.display()))?;
        let stripped = strip_signature(&data);
        if stripped.len() != data.len() {
            fs::write(path, stripped).ctx(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(plain.len())
}

#[cfg(test)]
mod signature_tests {
    use super::*;

    #[test]
    fn strips_an_appended_signature_and_only_that() {
        let module = b"\x7fELF module body".to_vec();
        let sig = vec![0xAB; 37];
        let mut signed = module.clone();
        signed.extend(&sig);
        signed.extend([0, 0, 2, 0, 0, 0, 0, 0]);
        signed.extend((sig.len() as u32).to_be_bytes());
        signed.extend(SIGNATURE_MARKER);
        assert_eq!(strip_signature(&signed), &module[..]);
        assert_eq!(strip_signature(&module), &module[..]);
        // A marker with an impossible length leaves the data alone.
        let mut bogus = b"short".to_vec();
        bogus.extend([0u8; 8]);
        bogus.extend(1000u32.to_be_bytes());
        bogus.extend(SIGNATURE_MARKER);
        assert_eq!(strip_signature(&bogus), &bogus[..]);
    }
}
