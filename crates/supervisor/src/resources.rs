//! What the sandbox takes from the host: its cgroup (limits and usage), the
//! egress byte counters, and the state of its disk, for `ls` and `stats`
//! (docs/architecture.md, "Resource limits").
//!
//! The supervisor moves itself into its sandbox's cgroup first thing
//! ([`enter_cgroup`]), before it starts the file servers and QEMU, which inherit
//! it; it moves back out and removes the cgroup last thing ([`release`]).
//! Where the cgroup cannot be had, the sandbox runs without limits and
//! [`enter_cgroup`] returns the one line that says why.
//!
//! One supervisor process serves one sandbox, so this state is process-wide.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll};

use sandpen_cgroup::{Cgroup, Limits, Usage};
use sandpen_proto::GuestUsage;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::paths::SandboxPaths;
use crate::sandbox::SandboxConfig;

static CGROUP: Mutex<Option<Cgroup>> = Mutex::new(None);
/// The sandbox's folder (the overlay's host file system is measured there).
static DIR: Mutex<Option<std::path::PathBuf>> = Mutex::new(None);
static NOTE: Mutex<Option<String>> = Mutex::new(None);
/// Bytes the guest sent out through the egress proxy, and received.
static EGRESS_UP: AtomicU64 = AtomicU64::new(0);
static EGRESS_DOWN: AtomicU64 = AtomicU64::new(0);
/// The guest's last report (kept for when it is too busy to answer).
static GUEST: Mutex<Option<GuestUsage>> = Mutex::new(None);

/// A guest root file system with less than this free for its users is full.
pub const GUEST_FULL_BELOW: u64 = 8 << 20;
/// A host file system holding the overlay with less than this free is full
/// (the overlay can no longer grow: the guest's writes fail).
pub const HOST_FULL_BELOW: u64 = 64 << 20;

/// The sandbox's limits.
pub fn limits(config: &SandboxConfig) -> Limits {
    Limits::for_sandbox(config.cpus, config.memory_mib)
}

/// The name of a sandbox's cgroup (and of its systemd scope): the sandbox's
/// name and 8 hex digits of the SHA-256 of its state folder. Names are unique
/// only within one state folder, and cgroups are host-wide: two state
/// folders (two users as root, a test's private one) with a sandbox of the
/// same name must never share a cgroup, or empty each other's as stale.
pub fn cgroup_name(config: &SandboxConfig, paths: &SandboxPaths) -> String {
    use sha2::Digest;
    use std::os::unix::ffi::OsStrExt;
    let digest = sha2::Sha256::digest(paths.dir.as_os_str().as_bytes());
    format!("{}-{}", config.name, hex::encode(&digest[..4]))
}

/// Makes the sandbox's cgroup and moves this process into it. Returns why
/// limits are not applied, if they are not (said once by `run`/`start`).
/// The caller holds the supervisor lock.
pub fn enter_cgroup(config: &SandboxConfig, paths: &SandboxPaths) -> Option<String> {
    if let Ok(mut dir) = DIR.lock() {
        *dir = Some(paths.dir.clone());
    }
    let made = Cgroup::create(&cgroup_name(config, paths), &limits(config)).and_then(|cg| match cg
        .enter(std::process::id())
    {
        Ok(()) => Ok(cg),
        Err(e) => {
            let _ = cg.remove();
            Err(e)
        }
    });
    let note = match made {
        Ok(cg) => {
            let l = cg.limits();
            tracing::info!(
                "resource limits: {}: {} CPUs, memory {} MiB, {} tasks, IO weight {}",
                cg.describe(),
                l.cpus(),
                l.memory_max >> 20,
                l.pids_max,
                l.io_weight
            );
            for a in cg.absent() {
                tracing::info!("resource limit not available here: {a}");
            }
            if let Ok(mut slot) = CGROUP.lock() {
                *slot = Some(cg);
            }
            None
        }
        Err(e) => {
            tracing::warn!("resource limits not applied: {e}");
            Some(format!("resource limits not applied: {e}"))
        }
    };
    if let Ok(mut slot) = NOTE.lock() {
        slot.clone_from(&note);
    }
    note
}

/// The cgroup folders the supervisor reads and writes after [`enter_cgroup`]
/// (see `sandpen_cgroup::Cgroup::paths`): a confinement of the supervisor
/// must leave them open, or `stats` reads nothing and [`release`] leaves the
/// cgroup for the next start to remove.
pub fn cgroup_paths() -> Vec<std::path::PathBuf> {
    CGROUP
        .lock()
        .ok()
        .and_then(|c| c.as_ref().map(|c| c.paths()))
        .unwrap_or_default()
}

/// Moves this process out of the sandbox's cgroup and removes it (its
/// children have exited by now).
pub fn release() {
    let cg = CGROUP.lock().ok().and_then(|mut slot| slot.take());
    if let Some(cg) = cg {
        let what = cg.describe();
        if let Err(e) = cg.remove() {
            tracing::warn!("removing the cgroup {what}: {e}");
        }
    }
}

/// Counts what passes through one egress stream (the guest's side of it).
pub struct Counted<S>(pub S);

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.0).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        EGRESS_UP.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.0).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            EGRESS_DOWN.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Why the sandbox's disk is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskFull {
    /// The guest filled its root file system (the overlay's `--disk` size).
    GuestRoot,
    /// The host file system holding `disk.qcow2` has no room for it to grow.
    HostFs,
}

impl std::fmt::Display for DiskFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskFull::GuestRoot => "disk full",
            DiskFull::HostFs => "disk full: the host file system holding disk.qcow2 is full",
        })
    }
}

/// Whether the disk is full, from the guest's report and the host's free
/// space under the overlay.
pub fn disk_full(guest: Option<&GuestUsage>, host_avail: Option<u64>) -> Option<DiskFull> {
    if host_avail.is_some_and(|a| a < HOST_FULL_BELOW) {
        return Some(DiskFull::HostFs);
    }
    match guest {
        Some(g) if g.root_total_bytes > 0 && g.root_avail_bytes < GUEST_FULL_BELOW => {
            Some(DiskFull::GuestRoot)
        }
        _ => None,
    }
}

/// What `ControlRequest::Stats` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// The limits in force; `None` when none could be applied (see `note`).
    pub limits: Option<Limits>,
    /// `cgroup v1`, `cgroup v2`, ...
    pub backend: Option<String>,
    /// Why limits are not applied.
    pub note: Option<String>,
    pub usage: Usage,
    pub egress_up_bytes: u64,
    pub egress_down_bytes: u64,
    /// The guest's root file system and task count (its last answer).
    pub guest: Option<GuestUsage>,
    /// Free bytes on the host file system holding the overlay.
    pub host_disk_avail_bytes: Option<u64>,
    pub disk_full: Option<DiskFull>,
}

/// The sandbox's figures now; `guest` is a fresh answer from the guest, or
/// `None` when it did not answer (its last one is used).
pub fn stats(guest: Option<GuestUsage>) -> Stats {
    let guest = match guest {
        Some(g) => {
            if let Ok(mut slot) = GUEST.lock() {
                *slot = Some(g);
            }
            Some(g)
        }
        None => GUEST.lock().ok().and_then(|g| *g),
    };
    let dir = DIR.lock().ok().and_then(|d| d.clone());
    let host_avail = dir
        .and_then(|d| nix::sys::statvfs::statvfs(&d).ok())
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()));
    let cg = CGROUP.lock().ok();
    let cg = cg.as_ref().and_then(|c| c.as_ref());
    Stats {
        limits: cg.map(|c| *c.limits()),
        backend: cg.map(|c| c.backend().to_string()),
        note: NOTE.lock().ok().and_then(|n| n.clone()),
        usage: cg.map(|c| c.usage()).unwrap_or_default(),
        egress_up_bytes: EGRESS_UP.load(Ordering::Relaxed),
        egress_down_bytes: EGRESS_DOWN.load(Ordering::Relaxed),
        guest,
        host_disk_avail_bytes: host_avail,
        disk_full: disk_full(guest.as_ref(), host_avail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(total: u64, avail: u64) -> GuestUsage {
        GuestUsage {
            root_total_bytes: total,
            root_free_bytes: avail,
            root_avail_bytes: avail,
            tasks: 100,
        }
    }

    #[test]
    fn full_disks_are_named() {
        let gib = 1u64 << 30;
        assert_eq!(disk_full(Some(&guest(4 * gib, gib)), Some(100 * gib)), None);
        assert_eq!(
            disk_full(Some(&guest(4 * gib, 0)), Some(100 * gib)),
            Some(DiskFull::GuestRoot)
        );
        assert_eq!(
            disk_full(Some(&guest(4 * gib, gib)), Some(1 << 20)),
            Some(DiskFull::HostFs)
        );
        // No answer yet, or a guest that reports nothing: not full.
        assert_eq!(disk_full(None, None), None);
        assert_eq!(disk_full(Some(&guest(0, 0)), None), None);
        assert_eq!(DiskFull::GuestRoot.to_string(), "disk full");
    }

    #[tokio::test]
    async fn egress_bytes_are_counted_both_ways() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::io::duplex(64);
        let mut counted = Counted(a);
        let up0 = EGRESS_UP.load(Ordering::Relaxed);
        let down0 = EGRESS_DOWN.load(Ordering::Relaxed);
        b.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        counted.read_exact(&mut buf).await.unwrap();
        counted.write_all(b"hi").await.unwrap();
        assert!(EGRESS_UP.load(Ordering::Relaxed) - up0 >= 5);
        assert!(EGRESS_DOWN.load(Ordering::Relaxed) - down0 >= 2);
    }
}
