//! `sandpen save`: a stopped sandbox's disk (its qcow2 overlay over its
//! image's ext4) made into a new image, a template for `run --image`.
//!
//! Guarantees (docs/dev-env.md, "Ports, cp and templates"):
//!
//! - The new image stands alone: `qemu-img convert` flattens the overlay and
//!   its backing file into a new raw ext4 (shrunk to its content with
//!   `resize2fs -M`; the guest grows it again at boot), so removing or
//!   rebuilding the parent never changes it. The kernel and boot modules
//!   are the parent's (hard links where the file system allows).
//! - Its manifest names its parent image and the sandbox it was saved from.
//! - Only the disk is read: the sandbox's folder (secrets are never in it;
//!   the CA key, flow labels, policy and logs are) is never copied, but for
//!   the toolchain trees it was given ([`SaveSpec::toolchains`]: vendor
//!   files, read-only in the guest), which its disk's installs are mounted
//!   from; the image keeps linked copies of them in `toolchains/`. The
//!   sandbox CA's certificate, which the guest installs at every boot, is
//!   taken out of the image ([`SaveSpec::remove_certs`]) and its absence
//!   checked before the image is published.
//! - The image appears under its name only when it is whole (built in a
//!   hidden folder, then renamed), and never replaces an existing image.
//!
//! What the guest wrote to its disk is in the image: a template is as
//! trustworthy as the sandbox it came from.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use time::OffsetDateTime;

use crate::build::find_tool;
use crate::error::{ImageError, IoContext};
use crate::fsutil;
use crate::manifest::FileEntry;
use crate::store::{
    self, Image, MODULES_DIR, ROOTFS_FILE, TOOLCHAINS_DIR, VMLINUX_FILE, VMLINUZ_FILE,
};

/// Where the guest keeps the sandbox CA: `sandpen_proto::GUEST_EXTRA_CA`
/// (this crate does not depend on the protocol; the CLI's tests check that
/// the two agree).
pub const GUEST_EXTRA_CA: &str = "/usr/local/share/ca-certificates/sandpen-sandbox-ca.crt";
/// The guest's CA bundle the sandbox CA is appended to:
/// `sandpen_proto::GUEST_CA_BUNDLE`.
pub const GUEST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What to save.
pub struct SaveSpec<'a> {
    /// The sandbox's image (the overlay's backing file is its rootfs).
    pub parent: &'a Image,
    /// The sandbox's `disk.qcow2`.
    pub disk: &'a Path,
    /// The new image's name.
    pub name: &'a str,
    /// The sandbox's name, recorded in the manifest.
    pub sandbox: &'a str,
    /// PEM certificates to take out of the guest's trust (the sandbox CA).
    pub remove_certs: &'a [String],
    /// The sandbox's view of shared toolchain trees, if it has one.
    pub toolchains: Option<&'a Path>,
}

/// Saves `spec.disk` as the image `spec.name` under `images_root`.
pub fn save(images_root: &Path, spec: &SaveSpec<'_>) -> Result<Image, ImageError> {
    store::validate_name(spec.name)?;
    let dest = images_root.join(spec.name);
    if dest.exists() {
        return Err(ImageError::Exists {
            name: spec.name.to_string(),
        });
    }
    let tmp = images_root.join(format!(".{}.save-{}", spec.name, std::process::id()));
    let _ = fsutil::remove_tree(&tmp);
    fs::create_dir_all(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
    let result = save_into(&tmp, spec).and_then(|()| {
        // Never over an image made meanwhile.
        if dest.exists() {
            return Err(ImageError::Exists {
                name: spec.name.to_string(),
            });
        }
        fs::rename(&tmp, &dest).ctx(|| format!("publishing {}", dest.display()))
    });
    if let Err(e) = result {
        let _ = fsutil::remove_tree(&tmp);
        return Err(e);
    }
    store::load(images_root, spec.name)
}

fn save_into(dir: &Path, spec: &SaveSpec<'_>) -> Result<(), ImageError> {
    let started = Instant::now();
    let log = dir.join("save.log");
    let rootfs = dir.join(ROOTFS_FILE);
    let tool = |name: &str, package: &str| {
        find_tool(name).ok_or_else(|| ImageError::MissingTool {
            tool: name.into(),
            package: package.into(),
        })
    };
    let qemu_img = tool("qemu-img", "qemu-utils")?;
    let e2fsck = tool("e2fsck", "e2fsprogs")?;
    let resize2fs = tool("resize2fs", "e2fsprogs")?;
    let debugfs = tool("debugfs", "e2fsprogs")?;
    let dumpe2fs = tool("dumpe2fs", "e2fsprogs")?;

    let mut convert = Command::new(&qemu_img);
    convert
        .args(["convert", "-O", "raw"])
        .arg(spec.disk)
        .arg(&rootfs);
    run(convert, "qemu-img convert", &log, &[0])?;
    // 0: clean, 1: errors corrected (a guest powered off mid-write).
    let mut fsck = Command::new(&e2fsck);
    fsck.args(["-f", "-y"]).arg(&rootfs);
    run(fsck, "e2fsck", &log, &[0, 1])?;
    let mut shrink = Command::new(&resize2fs);
    shrink.arg("-M").arg(&rootfs);
    run(shrink, "resize2fs", &log, &[0])?;
    let geometry = Geometry::read(&dumpe2fs, &rootfs, &log)?;
    fs::OpenOptions::new()
        .write(true)
        .open(&rootfs)
        .and_then(|f| f.set_len(geometry.bytes()))
        .ctx(|| format!("truncating {}", rootfs.display()))?;

    scrub(&debugfs, &rootfs, dir, &log, spec.remove_certs)?;

    // The parent's kernel and boot modules.
    let parent = &spec.parent.dir;
    for name in [VMLINUZ_FILE, VMLINUX_FILE] {
        if parent.join(name).is_file() {
            link_or_copy(&parent.join(name), &dir.join(name))?;
        }
    }
    if let Some(view) = spec.toolchains.filter(|v| v.is_dir()) {
        // Each tree; not a hidden staging folder a crash left behind.
        let kept = dir.join(TOOLCHAINS_DIR);
        fs::create_dir_all(&kept).ctx(|| format!("creating {}", kept.display()))?;
        for entry in fs::read_dir(view).ctx(|| format!("reading {}", view.display()))? {
            let entry = entry.ctx(|| format!("reading {}", view.display()))?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') || !entry.path().is_dir() {
                continue;
            }
            sandpen_fsutil::link_tree(&entry.path(), &kept.join(&name))
                .ctx(|| format!("keeping {} in {}", entry.path().display(), kept.display()))?;
        }
    }
    let modules = parent.join(MODULES_DIR);
    fs::create_dir_all(dir.join(MODULES_DIR)).ctx(|| "creating modules/".to_string())?;
    for entry in fs::read_dir(&modules).ctx(|| format!("reading {}", modules.display()))? {
        let entry = entry.ctx(|| format!("reading {}", modules.display()))?;
        link_or_copy(
            &entry.path(),
            &dir.join(MODULES_DIR).join(entry.file_name()),
        )?;
    }

    let mut manifest = spec.parent.manifest.clone();
    let sha = fsutil::sha256_file(&rootfs, |_| {})?;
    manifest.name = spec.name.to_string();
    manifest.key = format!("saved-{sha}");
    manifest.parent = Some(spec.parent.name.clone());
    manifest.saved_from = Some(spec.sandbox.to_string());
    manifest.created_at = OffsetDateTime::now_utc();
    manifest.sandpen_version = env!("CARGO_PKG_VERSION").to_string();
    let meta = fs::metadata(&rootfs).ctx(|| format!("reading {}", rootfs.display()))?;
    manifest.files.retain(|f| f.name != ROOTFS_FILE);
    manifest.files.push(FileEntry {
        name: ROOTFS_FILE.into(),
        size: meta.len(),
        sha256: sha,
    });
    manifest.files.retain(|f| dir.join(&f.name).is_file());
    {
        use std::os::unix::fs::MetadataExt;
        manifest.sizes.rootfs_image = meta.len();
        manifest.sizes.rootfs_allocated = meta.blocks() * 512;
    }
    manifest.sizes.rootfs_content = geometry.used_bytes();
    manifest.build_seconds = started.elapsed().as_secs_f64();
    manifest.steps = Vec::new();
    manifest.write(dir)
}

/// Runs `cmd` with its output appended to `log`; an exit status outside `ok`
/// is [`ImageError::CommandFailed`] with the log's tail.
fn run(mut cmd: Command, tool: &str, log: &Path, ok: &[i32]) -> Result<String, ImageError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .ctx(|| format!("starting {tool}"))?;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .ctx(|| format!("opening {}", log.display()))?;
    let _ = writeln!(f, "$ {cmd:?}");
    let _ = f.write_all(&out.stdout);
    let _ = f.write_all(&out.stderr);
    if out.status.code().is_some_and(|c| ok.contains(&c)) {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    Err(ImageError::CommandFailed {
        tool: tool.to_string(),
        status: out.status.to_string(),
        log: log.to_path_buf(),
        tail: lines[lines.len().saturating_sub(10)..].join("\n"),
    })
}

/// The ext4's size and use, from `dumpe2fs -h`.
struct Geometry {
    blocks: u64,
    free: u64,
    block_size: u64,
}

impl Geometry {
    fn read(dumpe2fs: &Path, image: &Path, log: &Path) -> Result<Geometry, ImageError> {
        let mut cmd = Command::new(dumpe2fs);
        cmd.arg("-h").arg(image);
        let out = run(cmd, "dumpe2fs", log, &[0])?;
        Geometry::parse(&out).ok_or_else(|| ImageError::FsGeometry {
            path: image.to_path_buf(),
        })
    }

    fn parse(out: &str) -> Option<Geometry> {
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_start_matches(':').trim().parse::<u64>().ok())
        };
        Some(Geometry {
            blocks: field("Block count")?,
            free: field("Free blocks")?,
            block_size: field("Block size")?,
        })
    }

    fn bytes(&self) -> u64 {
        self.blocks * self.block_size
    }

    fn used_bytes(&self) -> u64 {
        self.blocks.saturating_sub(self.free) * self.block_size
    }
}

/// Takes the sandbox CA out of the image: the guest's copy of it, and its
/// certificates from the bundle; then checks that none is left.
fn scrub(
    debugfs: &Path,
    rootfs: &Path,
    dir: &Path,
    log: &Path,
    certs: &[String],
) -> Result<(), ImageError> {
    let bundle_copy = dir.join("ca-bundle.scrub");
    let dump = |to: &Path| -> Result<Option<String>, ImageError> {
        let _ = fs::remove_file(to);
        let mut cmd = Command::new(debugfs);
        cmd.arg("-R")
            .arg(format!("dump {GUEST_CA_BUNDLE} {}", to.display()))
            .arg(rootfs);
        run(cmd, "debugfs", log, &[0])?;
        Ok(fs::read_to_string(to).ok())
    };
    let mut script = format!("rm {GUEST_EXTRA_CA}\n");
    let before = dump(&bundle_copy)?;
    if let Some(bundle) = &before {
        let cleaned = remove_pems(bundle, certs);
        if cleaned != *bundle {
            fs::write(&bundle_copy, &cleaned)
                .ctx(|| format!("writing {}", bundle_copy.display()))?;
            let (folder, file) = GUEST_CA_BUNDLE
                .rsplit_once('/')
                .unwrap_or(("/", GUEST_CA_BUNDLE));
            script.push_str(&format!(
                "cd {folder}\nrm {file}\nwrite {} {file}\nsif {file} mode 0100644\nsif {file} uid 0\nsif {file} gid 0\n",
                bundle_copy.display()
            ));
        }
    }
    let script_path = dir.join("scrub.debugfs");
    fs::write(&script_path, &script).ctx(|| format!("writing {}", script_path.display()))?;
    let mut cmd = Command::new(debugfs);
    cmd.arg("-w").arg("-f").arg(&script_path).arg(rootfs);
    run(cmd, "debugfs", log, &[0])?;
    // Checked, not assumed: a bundle that was there must still be readable.
    let after = match (dump(&bundle_copy)?, &before) {
        (Some(after), _) => after,
        (None, None) => String::new(),
        (None, Some(_)) => {
            return Err(ImageError::Scrub {
                what: format!("{GUEST_CA_BUNDLE} (unreadable after the change)"),
            })
        }
    };
    let _ = fs::remove_file(&bundle_copy);
    let _ = fs::remove_file(&script_path);
    let mut cmd = Command::new(debugfs);
    cmd.arg("-R")
        .arg(format!("stat {GUEST_EXTRA_CA}"))
        .arg(rootfs);
    let stat = cmd.output().ctx(|| "running debugfs".to_string())?;
    let still_there = String::from_utf8_lossy(&stat.stdout).contains("Inode:");
    if still_there
        || certs
            .iter()
            .any(|c| !c.trim().is_empty() && after.contains(c.trim()))
    {
        return Err(ImageError::Scrub {
            what: "the sandbox CA certificate".into(),
        });
    }
    Ok(())
}

/// `bundle` without the PEM blocks in `certs`.
fn remove_pems(bundle: &str, certs: &[String]) -> String {
    let mut out = bundle.to_string();
    for cert in certs {
        let cert = cert.trim();
        if cert.is_empty() {
            continue;
        }
        while let Some(at) = out.find(cert) {
            let mut end = at + cert.len();
            if out[end..].starts_with('\n') {
                end += 1;
            }
            out.replace_range(at..end, "");
        }
    }
    out
}

fn link_or_copy(from: &Path, to: &Path) -> Result<(), ImageError> {
    if fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    fsutil::copy_file(from, to).map(|_| ())
}

/// The image's ancestors, nearest first (`[parent, grandparent, …]`), as far
/// as the images in `all` go; a loop is cut.
pub fn lineage(image: &Image, all: &[Image]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut next = image.manifest.parent.clone();
    while let Some(name) = next {
        if out.contains(&name) || name == image.name {
            break;
        }
        next = all
            .iter()
            .find(|i| i.name == name)
            .and_then(|i| i.manifest.parent.clone());
        out.push(name);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_from_dumpe2fs() {
        let out = "Filesystem volume name:   <none>\nBlock count:              262144\nReserved block count:     0\nFree blocks:              1000\nBlock size:               4096\n";
        let g = Geometry::parse(out).unwrap();
        assert_eq!(g.bytes(), 262144 * 4096);
        assert_eq!(g.used_bytes(), 261144 * 4096);
        assert!(Geometry::parse("nothing").is_none());
    }

    #[test]
    fn the_sandbox_ca_leaves_the_bundle() {
        let ca = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n".to_string();
        let other = "-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        let bundle = format!("{other}{ca}");
        assert_eq!(remove_pems(&bundle, std::slice::from_ref(&ca)), other);
        assert_eq!(remove_pems(other, &[ca]), other);
    }

    #[test]
    fn lineage_follows_parents_and_stops_at_a_loop() {
        let root = tempfile::tempdir().unwrap();
        let mk = |name: &str, parent: Option<&str>| {
            let mut m = crate::manifest::tests::sample(name);
            m.parent = parent.map(String::from);
            Image {
                name: name.into(),
                dir: root.path().join(name),
                manifest: m,
            }
        };
        let all = vec![
            mk("default", None),
            mk("base", Some("default")),
            mk("web", Some("base")),
            mk("a", Some("b")),
            mk("b", Some("a")),
        ];
        assert_eq!(lineage(&all[2], &all), ["base", "default"]);
        assert!(lineage(&all[0], &all).is_empty());
        assert_eq!(lineage(&all[3], &all), ["b"]);
        // A parent that was removed is still named.
        let orphan = mk("x", Some("gone"));
        assert_eq!(lineage(&orphan, &all), ["gone"]);
    }
}
