//! One-time configuration after boot: hostname, user, shares.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use nix::mount::MsFlags;
use sandpen_proto::{GuestSetup, GuestUser};
use std::sync::Arc;

use crate::reaper::Reaper;

use crate::log;

static MOUNTED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Paths of the shares mounted so far (unmounted at shutdown).
pub fn mounted_shares() -> Vec<String> {
    MOUNTED.lock().map(|m| m.clone()).unwrap_or_default()
}

/// Runs external commands, so call it from a blocking context.
pub fn apply(setup: &GuestSetup, reaper: &Arc<Reaper>) -> Result<()> {
    set_hostname(&setup.hostname)?;
    install_cas(&setup.ca_certs)?;
    loopback_up();
    ensure_user(reaper, &setup.user)?;
    for m in &setup.mounts {
        mount_share(&m.tag, &m.path, m.read_only)?;
    }
    grow_root_in_background(reaper.clone());
    Ok(())
}

/// Trusts the sandbox CA: its own file (for a later `update-ca-certificates`) and appended to the system bundle, unless the
/// bundle has it already (the disk persists across restarts). Running
/// `update-ca-certificates` instead would cost seconds at every boot.
fn install_cas(pems: &[String]) -> Result<()> {
    use sandpen_proto::{GUEST_CA_BUNDLE, GUEST_EXTRA_CA};
    if pems.is_empty() {
        return Ok(());
    }
    let mut all = String::new();
    for pem in pems {
        all.push_str(pem.trim());
        all.push('\n');
    }
    if let Some(dir) = Path::new(GUEST_EXTRA_CA).parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(GUEST_EXTRA_CA, &all).with_context(|| format!("writing {GUEST_EXTRA_CA}"))?;
    std::fs::set_permissions(GUEST_EXTRA_CA, std::fs::Permissions::from_mode(0o644))?;
    let bundle = std::fs::read_to_string(GUEST_CA_BUNDLE).unwrap_or_default();
    let missing: String = pems
        .iter()
        .filter(|p| !bundle.contains(p.trim()))
        .map(|p| format!("{}\n", p.trim()))
        .collect();
    if !missing.is_empty() {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(GUEST_CA_BUNDLE)
            .with_context(|| format!("opening {GUEST_CA_BUNDLE}"))?;
        if !bundle.is_empty() && !bundle.ends_with('\n') {
            f.write_all(b"\n")?;
        }
        f.write_all(missing.as_bytes())
            .with_context(|| format!("appending to {GUEST_CA_BUNDLE}"))?;
    }
    Ok(())
}

fn set_hostname(name: &str) -> Result<()> {
    nix::unistd::sethostname(name).context("sethostname")?;
    std::fs::write("/etc/hostname", format!("{name}\n")).context("writing /etc/hostname")?;
    let hosts = format!(
        "127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    );
    std::fs::write("/etc/hosts", hosts).context("writing /etc/hosts")?;
    Ok(())
}

fn loopback_up() {
    if let Err(e) = crate::netconf::loopback_up() {
        log!("bringing up lo failed: {e}");
    }
}

fn run(reaper: &Reaper, cmd: &mut Command) -> Result<()> {
    let out = reaper
        .output(cmd)
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Creates (or renumbers) the sandbox user with passwordless sudo.
fn ensure_user(reaper: &Reaper, user: &GuestUser) -> Result<()> {
    let uid = user.uid.to_string();
    let gid = user.gid.to_string();
    match crate::users::lookup(&user.name) {
        Some(a) if a.uid == user.uid && a.gid == user.gid => {}
        Some(_) => {
            run(
                reaper,
                Command::new("groupmod").args(["-g", &gid, &user.name]),
            )?;
            run(
                reaper,
                Command::new("usermod").args(["-u", &uid, "-g", &gid, &user.name]),
            )?;
        }
        None => {
            let group_exists = std::fs::read_to_string("/etc/group")
                .unwrap_or_default()
                .lines()
                .any(|l| l.split(':').nth(2) == Some(gid.as_str()));
            if !group_exists {
                run(
                    reaper,
                    Command::new("groupadd").args(["-g", &gid, &user.name]),
                )?;
            }
            let mut groups = vec!["sudo"];
            if std::fs::read_to_string("/etc/group")
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with("docker:"))
            {
                groups.push("docker");
            }
            run(
                reaper,
                Command::new("useradd").args([
                    "-m",
                    "-u",
                    &uid,
                    "-g",
                    &gid,
                    "-G",
                    &groups.join(","),
                    "-s",
                    "/bin/bash",
                    &user.name,
                ]),
            )?;
        }
    }
    let sudoers = Path::new("/etc/sudoers.d/sandpen");
    let rule = format!("{} ALL=(ALL:ALL) NOPASSWD: ALL\n", user.name);
    if std::fs::read_to_string(sudoers).ok().as_deref() != Some(rule.as_str()) {
        std::fs::create_dir_all("/etc/sudoers.d").ok();
        let mut f = std::fs::File::create(sudoers).context("writing sudoers")?;
        f.write_all(rule.as_bytes())?;
        f.set_permissions(std::fs::Permissions::from_mode(0o440))?;
    }
    Ok(())
}

/// Mounts a virtiofs share at `path`, creating the directories above it so that
/// every user can reach it (the workspace sits at its host path, which may be
/// under a directory such as `/root` that is closed in the image).
fn mount_share(tag: &str, path: &str, read_only: bool) -> Result<()> {
    let target = Path::new(path);
    if !target.is_absolute() {
        bail!("share path {path} is not absolute");
    }
    std::fs::create_dir_all(target).with_context(|| format!("mkdir -p {path}"))?;
    let mut dir = target.parent();
    while let Some(d) = dir {
        if let Ok(meta) = std::fs::metadata(d) {
            let mode = meta.permissions().mode();
            if mode & 0o001 == 0 {
                let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o011));
            }
        }
        dir = d.parent();
    }
    let mut flags = MsFlags::MS_NODEV;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    nix::mount::mount(Some(tag), target, Some("virtiofs"), flags, None::<&str>)
        .with_context(|| format!("mounting share {tag} on {path}"))?;
    if let Ok(mut m) = MOUNTED.lock() {
        m.push(path.to_string());
    }
    Ok(())
}

/// True when the root filesystem leaves more than 1% of its disk unused (the
/// first boot of a sandbox, or after a disk resize).
fn root_smaller_than_disk() -> bool {
    let Ok(sectors) = std::fs::read_to_string("/sys/block/vda/size") else {
        return false;
    };
    let Ok(disk) = sectors.trim().parse::<u64>().map(|s| s * 512) else {
        return false;
    };
    let Ok(fs) = nix::sys::statvfs::statvfs("/") else {
        return false;
    };
    let fs_bytes = fs.blocks() * fs.fragment_size();
    fs_bytes < disk - disk / 100
}

/// The root disk is a qcow2 overlay that may be larger than the image's ext4;
/// grow the filesystem online to fill it.
fn grow_root_in_background(reaper: Arc<Reaper>) {
    if !root_smaller_than_disk() {
        return;
    }
    std::thread::spawn(
        move || match reaper.output(Command::new("resize2fs").arg("/dev/vda")) {
            Ok(out) if out.status.success() => {}
            Ok(out) => log!(
                "resize2fs /dev/vda: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => log!("resize2fs not run: {e}"),
        },
    );
}
