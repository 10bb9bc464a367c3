//! The share's disk reserve: while the host file system that holds the
//! sandbox's state is below a floor of free space, the guest's writes
//! through the share fail with `ENOSPC`, so the guest can never starve
//! sandpen's own writes (the `secret-read` label above all: a label that
//! cannot be written fails the read, see [`crate::events`]).
//!
//! # Cost
//!
//! The free space is asked of the kernel (`fstatvfs`, about a microsecond)
//! at most every [`RECHECK`] and whenever the bytes admitted since the last
//! look could have crossed the floor; between looks, each admitted write
//! subtracts its size from the last figure, so a stream of writes costs one
//! mutex and a subtraction per request. Near the floor every write looks
//! again (a refusal must not rest on a stale figure).
//!
//! What counts: `write` (its size), `fallocate` (its length, unless it
//! punches a hole), `create`, `mknod`, `mkdir`, `symlink`, `link` (one
//! block each), `setattr` that grows a file. Overwrites are counted as if
//! they grew the file: conservative, never short.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sandpen_policy::Reserve;

/// Longest time a free-space figure is trusted.
pub const RECHECK: Duration = Duration::from_millis(100);
/// What a new entry (file, folder, link) is counted as.
pub const ENTRY_BYTES: u64 = 4096;

/// Free space as last seen.
#[derive(Debug, Clone, Copy)]
struct Seen {
    at: Instant,
    /// Bytes an unprivileged user may still allocate (`f_bavail`).
    avail: u64,
    /// The floor on this file system.
    floor: u64,
    /// Admitted since `at`.
    admitted: u64,
}

/// Where free space is measured and how much is kept.
pub struct DiskReserve {
    /// A descriptor of a folder on the file system to watch (the flow
    /// label folder), opened before the server confines itself.
    dir: OwnedFd,
    reserve: Reserve,
    seen: Mutex<Option<Seen>>,
}

/// Free bytes and total bytes of the file system holding `fd`.
fn statvfs(fd: &OwnedFd) -> io::Result<(u64, u64)> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: fstatvfs writes one struct statvfs into the pointer we pass,
    // which points to enough room for it.
    let rc = unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatvfs returned 0, so it filled the struct.
    let st = unsafe { st.assume_init() };
    let frsize = st.f_frsize;
    Ok((
        st.f_bavail.saturating_mul(frsize),
        st.f_blocks.saturating_mul(frsize),
    ))
}

impl DiskReserve {
    /// Watches the file system that holds `dir`.
    pub fn open(dir: &Path, reserve: Reserve) -> io::Result<DiskReserve> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(dir)?;
        let r = DiskReserve {
            dir: f.into(),
            reserve,
            seen: Mutex::new(None),
        };
        r.look()?;
        Ok(r)
    }

    fn look(&self) -> io::Result<Seen> {
        let (avail, total) = statvfs(&self.dir)?;
        let seen = Seen {
            at: Instant::now(),
            avail,
            floor: self.reserve.floor(total),
            admitted: 0,
        };
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(seen);
        Ok(seen)
    }

    /// The floor and the free space now (asks the kernel).
    pub fn status(&self) -> io::Result<(u64, u64)> {
        let s = self.look()?;
        Ok((s.floor, s.avail))
    }

    /// May the guest add up to `bytes` to the file system? `ENOSPC` when
    /// that would leave less than the floor free.
    pub fn admit(&self, bytes: u64) -> io::Result<()> {
        let fits = |s: &Seen| {
            s.avail
                .saturating_sub(s.admitted)
                .checked_sub(bytes)
                .is_some_and(|left| left >= s.floor)
        };
        {
            let mut guard = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = guard.as_mut() {
                if s.at.elapsed() < RECHECK && fits(s) {
                    s.admitted = s.admitted.saturating_add(bytes);
                    return Ok(());
                }
            }
        }
        // Stale, or near the floor: look again before deciding.
        let s = self.look().map_err(|e| {
            tracing::warn!("cannot measure the free space of the state folder: {e}");
            io::Error::from_raw_os_error(libc::ENOSPC)
        })?;
        if !fits(&s) {
            tracing::debug!(bytes, avail = s.avail, floor = s.floor, "reserve: ENOSPC");
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let mut guard = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cur) = guard.as_mut() {
            cur.admitted = cur.admitted.saturating_add(bytes);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_refused_below_the_floor_and_admitted_above() {
        let dir = tempfile::tempdir().unwrap();
        let (_, avail) = DiskReserve::open(dir.path(), Reserve::Bytes(0))
            .unwrap()
            .status()
            .unwrap();
        // A floor above what is free: everything that adds is refused.
        let high = DiskReserve::open(dir.path(), Reserve::Bytes(avail + (1 << 40))).unwrap();
        let e = high.admit(1).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert!(high.admit(0).is_err(), "below the floor even nothing more");
        // No floor: anything that fits is admitted, and what does not is not.
        let none = DiskReserve::open(dir.path(), Reserve::Bytes(0)).unwrap();
        none.admit(4096).unwrap();
        assert!(none.admit(u64::MAX / 2).is_err());
        // Admitted bytes count against the last figure until the next look:
        // a floor 1 MiB under the free space admits 1 MiB at most.
        let (_, avail) = none.status().unwrap();
        let near = DiskReserve::open(dir.path(), Reserve::Bytes(avail - (1 << 20))).unwrap();
        near.admit(512 << 10).unwrap();
        // Whatever else this machine wrote meanwhile, 2 MiB more cannot fit.
        assert!(near.admit(2 << 20).is_err());
    }
}
