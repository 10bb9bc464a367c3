//! Early boot in the initramfs: essentials, boot modules, root disk, switch root.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::mount::MsFlags;

use crate::log;
use crate::sys::{mount_fs, wait_for};

const MODULES_DIR: &str = "/sandpen/modules";
const ROOT_DEVICE: &str = "/dev/vda";
const NEW_ROOT: &str = "/newroot";

/// `finit_module` flag: the file is compressed and the kernel decompresses it.
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

pub fn early_boot() -> Result<()> {
    let nosuid_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mount_fs("proc", "/proc", "proc", nosuid_noexec, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nosuid_noexec, None)?;

    // Benchmark baseline: the kernel and initramfs have reached /init; stop here.
    if std::fs::read_to_string("/proc/cmdline")
        .map(|c| c.split_whitespace().any(|w| w == "sandpen.bare"))
        .unwrap_or(false)
    {
        log!("bare boot: /init reached at {} ms", crate::sys::uptime_ms());
        crate::sys::power_off();
    }

    load_boot_modules()?;

    wait_for(Path::new(ROOT_DEVICE), Duration::from_secs(20))?;
    mount_fs(ROOT_DEVICE, NEW_ROOT, "ext4", MsFlags::MS_NOATIME, None)
        .context("mounting the root disk")?;
    switch_root()?;
    mount_runtime_filesystems()?;
    Ok(())
}

/// Loads modules (and their dependencies) from the root disk with
/// `finit_module`, without a modprobe process per module: the kernel's
/// on-demand loading spawns one each, which costs seconds under emulation.
pub fn load_rootfs_modules(names: &[&str]) -> Result<()> {
    let release = crate::sys::kernel_release();
    let dir = Path::new("/lib/modules").join(&release);
    let deps_text = std::fs::read_to_string(dir.join("modules.dep"))
        .with_context(|| format!("reading modules.dep for {release}"))?;
    let mut deps: std::collections::HashMap<String, (String, Vec<String>)> = Default::default();
    for line in deps_text.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let name = module_name(path);
        deps.insert(
            name,
            (
                path.to_string(),
                rest.split_whitespace().map(module_name).collect(),
            ),
        );
    }
    let loaded = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    let mut done: std::collections::HashSet<String> = loaded
        .lines()
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();
    fn visit(
        name: &str,
        deps: &std::collections::HashMap<String, (String, Vec<String>)>,
        done: &mut std::collections::HashSet<String>,
        order: &mut Vec<String>,
        depth: usize,
    ) {
        if depth > 32 || done.contains(name) {
            return;
        }
        let Some((path, requires)) = deps.get(name) else {
            return;
        };
        for r in requires {
            visit(r, deps, done, order, depth + 1);
        }
        if done.insert(name.to_string()) {
            order.push(path.clone());
        }
    }
    let mut order = Vec::new();
    for n in names {
        visit(&n.replace('-', "_"), &deps, &mut done, &mut order, 0);
    }
    for rel in order {
        load_module_file(&dir.join(&rel))?;
    }
    Ok(())
}

fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

fn load_module_file(path: &Path) -> Result<()> {
    let name = path.to_string_lossy();
    let file = std::fs::File::open(path).with_context(|| format!("opening module {name}"))?;
    let compressed = name.ends_with(".xz") || name.ends_with(".zst") || name.ends_with(".gz");
    let flags = if compressed {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    let params = CString::default();
    // SAFETY: finit_module reads the module from a valid open fd and a
    // NUL-terminated (empty) parameter string; it touches no memory of ours
    // beyond those arguments.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EEXIST) {
            return Err(err).with_context(|| format!("loading module {name}"));
        }
    }
    Ok(())
}

fn load_boot_modules() -> Result<()> {
    let order = match std::fs::read_to_string(Path::new(MODULES_DIR).join("load-order")) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).context("reading the module load order"),
    };
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        load_module_file(&Path::new(MODULES_DIR).join(name))?;
    }
    Ok(())
}

/// Moves the kernel filesystems into the new root and makes it `/`. PID 1 keeps
/// running from the initramfs copy of itself, which stays in memory.
fn switch_root() -> Result<()> {
    for fs in ["/dev", "/proc", "/sys"] {
        let target = format!("{NEW_ROOT}{fs}");
        std::fs::create_dir_all(&target).with_context(|| format!("mkdir {target}"))?;
        nix::mount::mount(
            Some(fs),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .with_context(|| format!("moving {fs} into the root disk"))?;
    }
    nix::unistd::chdir(NEW_ROOT).context("chdir to the new root")?;
    nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .context("moving the new root to /")?;
    nix::unistd::chroot(".").context("chroot into the new root")?;
    nix::unistd::chdir("/").context("chdir /")?;
    Ok(())
}

fn mount_runtime_filesystems() -> Result<()> {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("gid=5,mode=620,ptmxmode=666"),
    )?;
    mount_fs(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        nosuid_nodev,
        Some("mode=1777"),
    )?;
    mount_fs("tmpfs", "/run", "tmpfs", nosuid_nodev, Some("mode=0755"))?;
    mount_fs("tmpfs", "/tmp", "tmpfs", nosuid_nodev, Some("mode=1777"))?;
    if let Err(e) = mount_fs(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        nosuid_nodev | MsFlags::MS_NOEXEC,
        None,
    ) {
        log!("cgroup2 not mounted: {e:#}");
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    std::fs::create_dir_all("/run/lock").ok();
    Ok(())
}
