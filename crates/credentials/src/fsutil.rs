//! Small file helpers shared by the store and the CA.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `data` to `path` atomically: a new temporary file in the same
/// folder with `mode`, fsync, rename over `path`, fsync of the folder.
/// A reader sees the old file or the new one, never a partial one.
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?
        .to_string_lossy();
    let tmp = dir.join(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have cleared bits we want (0644) or left none we
        // forbid; set the mode exactly.
        f.set_permissions(Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates the folder that holds `path` (and its parents), 0700.
pub(crate) fn create_private_parent(path: &Path) -> io::Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => DirBuilder::new().recursive(true).mode(0o700).create(dir),
        None => Ok(()),
    }
}

/// The permission bits (`0o777`) of an open file.
pub(crate) fn mode_of(f: &File) -> io::Result<u32> {
    Ok(f.metadata()?.permissions().mode() & 0o777)
}

/// Runs `f` holding an exclusive `flock` on `PATH.lock` (created 0600), so
/// that two processes editing the same file do not lose each other's write.
/// The lock file's folder must exist.
pub(crate) fn with_lock<T, E>(
    path: &Path,
    on_io: impl FnOnce(io::Error) -> E,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let file = match OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
    {
        Ok(f) => f,
        Err(e) => return Err(on_io(e)),
    };
    let _lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive) {
        Ok(l) => l,
        Err((_, errno)) => return Err(on_io(io::Error::from(errno))),
    };
    f()
}
