//! The whole build, end to end: debootstrap from the network, as root, ≈2 minutes.
//! Run with `cargo test -p sandpen-image -- --ignored --nocapture`.
//! `SANDPEN_TEST_IMAGES_ROOT=DIR` builds there and keeps the result;
//! `SANDPEN_TEST_GUEST=PATH` makes the initramfs around that guest binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressDrawTarget};
use sandpen_image::{build, list, load, remove, BuildOutcome, ImageError, ImageSpec};

/// A minimal static x86-64 ELF header with one PT_LOAD: enough for ensure_initrd.
fn fake_static_guest(path: &Path) {
    let mut elf = vec![0u8; 64 + 56];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[18] = 62;
    elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
    elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
    elf[64..68].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(path, elf).unwrap();
}

fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs) runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "downloads Debian and needs root; about 2 minutes"]
fn full_build_end_to_end() {
    let (_guard, root): (Option<tempfile::TempDir>, PathBuf) =
        match std::env::var_os("SANDPEN_TEST_IMAGES_ROOT") {
            Some(dir) => (None, PathBuf::from(dir)),
            None => {
                let tmp = tempfile::Builder::new()
                    .prefix("sandpen-image-test")
                    .tempdir_in("/var/tmp")
                    .unwrap();
                let root = tmp.path().join("images");
                (Some(tmp), root)
            }
        };
    let spec = ImageSpec::default_for("e2e");
    let progress = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());

    let started = Instant::now();
    let outcome = match build(&root, &spec, &progress) {
        Err(ImageError::NotRoot) => {
            eprintln!("note: not root; the full build test needs root");
            return;
        }
        other => other.unwrap(),
    };
    let wall = started.elapsed();
    let image = match outcome {
        BuildOutcome::Built(image) => image,
        BuildOutcome::UpToDate(image) => {
            eprintln!("note: image was already up to date in {}", root.display());
            image
        }
    };
    let m = &image.manifest;
    eprintln!(
        "build wall time: {:.1} s (manifest says {:.1} s)",
        wall.as_secs_f64(),
        m.build_seconds
    );
    eprintln!("kernel {} → {}", m.kernel_release, image.kernel().display());
    for step in &m.steps {
        eprintln!("  step {:<20} {:>6.1} s", step.step, step.seconds);
    }
    eprintln!("sizes: {:#?}", m.sizes);
    for f in &m.files {
        eprintln!("  {:<32} {:>12} {}", f.name, f.size, &f.sha256[..16]);
    }

    assert_eq!(m.key, spec.key());
    assert!(m.files_present(&image.dir));
    assert!(image.dir.join("build.log").is_file());
    assert!(
        !image.dir.join("root").exists(),
        "the debootstrap tree is removed"
    );
    let head = std::fs::read(image.kernel()).unwrap();
    assert_eq!(
        &head[..4],
        b"\x7fELF",
        "the trixie kernel unpacks to an ELF"
    );
    assert_eq!(m.boot_modules, ["virtio_mmio.ko.xz", "virtio_blk.ko.xz"]);
    assert!(m.package_versions.contains_key("linux-image-cloud-amd64"));

    // The filesystem is clean and holds what we put there.
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(image.rootfs())
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    assert_eq!(debugfs(&image.rootfs(), "cat /etc/hostname"), "sandpen\n");
    assert_eq!(debugfs(&image.rootfs(), "cat /etc/resolv.conf"), "");
    if !spec.extra_ca_certs.is_empty() {
        let listing = debugfs(&image.rootfs(), "ls -l /usr/local/share/ca-certificates");
        assert!(listing.contains(".crt"), "{listing}");
    }
    let boot = debugfs(&image.rootfs(), "ls /boot");
    assert!(!boot.contains("initrd.img-"), "{boot}");

    // A second build is a no-op.
    let again = Instant::now();
    assert!(matches!(
        build(&root, &spec, &progress).unwrap(),
        BuildOutcome::UpToDate(_)
    ));
    assert!(again.elapsed().as_secs() < 5);

    // The initramfs around a guest binary.
    // SANDPEN_TEST_GUEST=PATH puts a real (static) guest binary in as /init.
    let guest = match std::env::var_os("SANDPEN_TEST_GUEST") {
        Some(path) => PathBuf::from(path),
        None => {
            let guest = root.join("fake-guest");
            fake_static_guest(&guest);
            guest
        }
    };
    let initrd = load(&root, "e2e").unwrap().ensure_initrd(&guest).unwrap();
    let listing = Command::new("cpio")
        .args(["-it", "--quiet"])
        .stdin(std::fs::File::open(&initrd).unwrap())
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing
            .lines()
            .any(|l| l == "sandpen/modules/virtio_blk.ko.xz"),
        "{listing}"
    );
    eprintln!(
        "initrd.img: {} bytes",
        std::fs::metadata(&initrd).unwrap().len()
    );

    assert_eq!(list(&root).unwrap().len(), 1);
    if std::env::var_os("SANDPEN_TEST_IMAGES_ROOT").is_none() {
        remove(&root, "e2e").unwrap();
        assert!(list(&root).unwrap().is_empty());
    }
}

#[test]
#[ignore = "needs root and debootstrap"]
fn failed_build_cleans_up_and_keeps_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("images");
    let mut spec = ImageSpec::default_for("broken");
    spec.suite = "no-such-suite".into();
    let progress = MultiProgress::with_draw_target(ProgressDrawTarget::hidden());
    let err = match build(&root, &spec, &progress) {
        Err(ImageError::NotRoot) => {
            eprintln!("note: not root; skipping");
            return;
        }
        Err(err) => err,
        Ok(_) => panic!("a build of a suite that does not exist succeeded"),
    };
    let text = err.to_string();
    eprintln!("{text}");
    let ImageError::CommandFailed {
        tool, log, tail, ..
    } = err
    else {
        panic!("expected CommandFailed, got {text}");
    };
    assert_eq!(tool, "debootstrap");
    assert!(tail.contains("no-such-suite"), "{tail}");
    assert!(
        log.is_file(),
        "the failed build's log is kept at {}",
        log.display()
    );
    let left: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".build-"))
        .collect();
    assert!(left.is_empty(), "build directory left behind: {left:?}");
    assert!(matches!(
        load(&root, "broken"),
        Err(ImageError::NotFound { .. })
    ));
}
