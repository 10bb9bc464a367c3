//! Small file helpers shared by the store and the CA.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `data` to `path` atomically with exactly `mode` (the one helper
/// every sandpen state file goes through: `sandpen_fsutil::write_atomic`).
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    sandpen_fsutil::write_atomic(path, data, mode)
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
