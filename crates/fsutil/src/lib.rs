//! The one way sandpen writes a state file: [`write_atomic`].
//!
//! Every file whose loss or tearing would lose a user's setting or a security
//! decision (`sandbox.json`, `policy.toml`, the flow labels, the secret store,
//! image manifests, a sandbox's exit record) is written through it, so they
//! all share one guarantee (see docs/architecture.md, "Where state lives"):
//!
//! - a reader, or a sandpen killed at any instant (`kill -9`, power loss
//!   after the call returned), finds the old file or the new one, whole, never
//!   a mix and never an empty file;
//! - once the call returns, the new file survives a crash of the machine
//!   (the data and the rename are both on disk: the file and then its folder
//!   are fsynced);
//! - the file has exactly the mode asked for, whatever the umask, and was never
//!   readable with a wider one (a secret store is never briefly 0644);
//! - a failed write leaves the old file as it was and removes its temporary.
//!
//! And the one way a folder is shared without being copied: [`link_tree`]
//! (a toolchain tree given to a sandbox, and kept by a saved image).

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Mode of ordinary state files.
pub const MODE_STATE: u32 = 0o644;
/// Mode of files only the user may read (secrets, keys).
pub const MODE_PRIVATE: u32 = 0o600;

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `data` to `path` atomically with permission bits `mode`: a new
/// temporary file in the same folder (created exclusively, never a file an
/// attacker placed there), its data fsynced, renamed over `path`, then the
/// folder fsynced so that the rename itself is durable.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent_of(path);
    let tmp = temporary_sibling(path)?;
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have cleared bits asked for (0644): set them exactly.
        f.set_permissions(Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// fsyncs a folder, making the entries created, renamed or removed in it
/// durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// `.NAME.tmp.PID.N` beside `path`: unique within the process and between
/// processes, and hidden from listings that skip dot files.
fn temporary_sibling(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?
        .to_string_lossy();
    Ok(parent_of(path).join(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    )))
}

/// Makes `to`, which must not exist, a copy of the folder `from` whose
/// regular files are hard links to `from`'s (copies when the two are on
/// different file systems): the files' bytes are stored once, and a file
/// removed on one side stays on the other. Folders are made anew (mode
/// 0755), symlinks are copied as links (their targets untouched), anything
/// else (a FIFO, a socket, a device) is left out.
pub fn link_tree(from: &Path, to: &Path) -> io::Result<()> {
    fs::DirBuilder::new().create(to)?;
    fs::set_permissions(to, Permissions::from_mode(0o755))?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if kind.is_dir() {
            link_tree(&src, &dst)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src)?, &dst)?;
        } else if kind.is_file() {
            match fs::hard_link(&src, &dst) {
                Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
                    fs::copy(&src, &dst)?;
                }
                other => other?,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn replaces_the_whole_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sandbox.json");
        write_atomic(&p, b"one", MODE_STATE).unwrap();
        write_atomic(&p, b"two", MODE_STATE).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn sets_the_mode_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secrets");
        write_atomic(&p, b"k", MODE_PRIVATE).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        write_atomic(&p, b"k", MODE_STATE).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o644);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("policy.toml");
        write_atomic(&p, b"old", MODE_STATE).unwrap();
        // A folder where the file should be: the rename fails.
        let q = dir.path().join("sub");
        fs::create_dir(&q).unwrap();
        fs::write(q.join("x"), b"x").unwrap();
        assert!(write_atomic(&q, b"new", MODE_STATE).is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(write_atomic(&dir.path().join("missing/f"), b"x", MODE_STATE).is_err());
    }

    /// `kill -9` at any point: a child process rewrites the file in a loop
    /// and is killed at varying moments; the file is always one whole version.
    #[test]
    fn a_writer_killed_at_any_moment_leaves_old_or_new() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        let a = vec![b'a'; 64 * 1024];
        let b = vec![b'b'; 96 * 1024];
        write_atomic(&p, &a, MODE_STATE).unwrap();
        for round in 0..20u64 {
            // SAFETY: the child only loops on write_atomic until it is killed;
            // if fork caught another test thread holding the allocator's lock,
            // the child blocks and is killed all the same.
            match unsafe { libc::fork() } {
                0 => loop {
                    let _ = write_atomic(&p, &b, MODE_STATE);
                    let _ = write_atomic(&p, &a, MODE_STATE);
                },
                pid => {
                    std::thread::sleep(std::time::Duration::from_micros(300 + round * 200));
                    kill9(pid);
                }
            }
            let got = fs::read(&p).unwrap();
            assert!(got == a || got == b, "a torn file of {} bytes", got.len());
        }
    }

    fn kill9(pid: libc::pid_t) {
        let mut status = 0;
        // SAFETY: plain syscalls on a child pid this test owns.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, &mut status, 0);
        }
    }

    #[test]
    fn a_linked_tree_shares_files_and_copies_links() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("from");
        fs::create_dir_all(from.join("bin")).unwrap();
        fs::write(from.join("bin/tool"), b"tool").unwrap();
        std::os::unix::fs::symlink("bin/tool", from.join("link")).unwrap();
        let to = dir.path().join("to");
        link_tree(&from, &to).unwrap();
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        assert_eq!(ino(&to.join("bin/tool")), ino(&from.join("bin/tool")));
        assert_eq!(
            fs::read_link(to.join("link")).unwrap(),
            Path::new("bin/tool")
        );
        // `to` must not exist.
        assert!(link_tree(&from, &to).is_err());
        // A file removed on one side stays on the other.
        fs::remove_file(from.join("bin/tool")).unwrap();
        assert_eq!(fs::read(to.join("bin/tool")).unwrap(), b"tool");
    }
}
