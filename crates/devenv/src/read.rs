//! Reading one file of the workspace, the way a hostile workspace cannot turn
//! into a read of something else.
//!
//! The workspace is written by someone else and, while a sandbox runs, by the
//! guest itself, concurrently. So a file is opened with `openat2` relative to
//! the workspace folder with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS`: no component of the path may be a symlink, and
//! nothing outside the workspace is ever opened, whatever is swapped in
//! between a check and the open (there is no check: the kernel resolves once).
//! Where the kernel has no `openat2` (before 5.6) each component is opened in
//! turn with `O_NOFOLLOW`, which gives the same guarantee. Only a regular file
//! is read, and at most [`MAX_FILE_BYTES`] of it.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags, ResolveFlags};

/// The most sandpen reads of one workspace file. Version files are a line;
/// a `package.json` or a `devcontainer.json` is a few KiB.
pub const MAX_FILE_BYTES: u64 = 256 * 1024;

/// Why a workspace file was not read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("not there")]
    Missing,
    #[error("a symlink (sandpen does not follow symlinks in a workspace)")]
    Symlink,
    #[error("not a regular file")]
    NotAFile,
    #[error("larger than {} KiB", MAX_FILE_BYTES / 1024)]
    TooLarge,
    #[error("not UTF-8 text")]
    NotText,
    #[error("{0}")]
    Io(io::Error),
}

impl From<rustix::io::Errno> for ReadError {
    fn from(e: rustix::io::Errno) -> Self {
        match e {
            rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR => ReadError::Missing,
            // ELOOP: a symlink met with RESOLVE_NO_SYMLINKS or O_NOFOLLOW;
            // EXDEV: RESOLVE_BENEATH refused to leave the folder.
            rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => ReadError::Symlink,
            other => ReadError::Io(other.into()),
        }
    }
}

/// An open workspace folder that files are read beneath.
pub struct Workspace {
    dir: OwnedFd,
}

impl Workspace {
    /// Opens `root` (the user named it; it may itself be reached through a
    /// symlink, as `sandpen run` in a symlinked folder is).
    pub fn open(root: &Path) -> io::Result<Workspace> {
        let dir = rustix::fs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Workspace { dir })
    }

    /// The text of `relative` (a path with no `..`, written by sandpen, such as
    /// `.devcontainer/devcontainer.json`).
    pub fn read(&self, relative: &str) -> Result<String, ReadError> {
        let fd = self.open_beneath(relative)?;
        let stat = rustix::fs::fstat(&fd)?;
        if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(ReadError::NotAFile);
        }
        let mut text = Vec::new();
        File::from(fd)
            .take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(ReadError::Io)?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(ReadError::TooLarge);
        }
        String::from_utf8(text).map_err(|_| ReadError::NotText)
    }

    fn open_beneath(&self, relative: &str) -> Result<OwnedFd, ReadError> {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        match rustix::fs::openat2(
            &self.dir,
            relative,
            flags,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        ) {
            Err(rustix::io::Errno::NOSYS) => self.open_each_component(relative, flags),
            other => Ok(other?),
        }
    }

    /// The fallback for kernels without `openat2`: one `O_NOFOLLOW` open per
    /// component, each relative to the folder opened before it.
    fn open_each_component(&self, relative: &str, flags: OFlags) -> Result<OwnedFd, ReadError> {
        let parts: Vec<&str> = relative.split('/').filter(|p| !p.is_empty()).collect();
        if parts.iter().any(|p| *p == ".." || *p == ".") {
            return Err(ReadError::Missing);
        }
        let Some((last, folders)) = parts.split_last() else {
            return Err(ReadError::Missing);
        };
        let mut dir: Option<OwnedFd> = None;
        for folder in folders {
            let at = dir.as_ref().map_or(self.dir.as_fd(), |d| d.as_fd());
            let opened = rustix::fs::openat(
                at,
                *folder,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            );
            dir = Some(match opened {
                // O_DIRECTORY is checked before O_NOFOLLOW: a symlink to a
                // folder gives ENOTDIR. Say what it was (it was not followed).
                Err(rustix::io::Errno::NOTDIR) => {
                    let stat =
                        rustix::fs::statat(at, *folder, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)?;
                    return Err(
                        if rustix::fs::FileType::from_raw_mode(stat.st_mode)
                            == rustix::fs::FileType::Symlink
                        {
                            ReadError::Symlink
                        } else {
                            ReadError::Missing
                        },
                    );
                }
                other => other?,
            });
        }
        let at = dir.as_ref().map_or(self.dir.as_fd(), |d| d.as_fd());
        Ok(rustix::fs::openat(at, *last, flags, Mode::empty())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_anywhere_on_the_path_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "22\n").unwrap();
        let ws = tempfile::tempdir().unwrap();
        symlink(outside.path().join("secret"), ws.path().join(".nvmrc")).unwrap();
        symlink(outside.path(), ws.path().join(".devcontainer")).unwrap();
        std::fs::create_dir(ws.path().join("sub")).unwrap();
        std::fs::write(ws.path().join("sub/ok"), "fine").unwrap();
        let w = Workspace::open(ws.path()).unwrap();
        assert!(matches!(w.read(".nvmrc"), Err(ReadError::Symlink)));
        assert!(matches!(
            w.read(".devcontainer/secret"),
            Err(ReadError::Symlink)
        ));
        assert!(matches!(w.read("../secret"), Err(ReadError::Symlink)));
        assert!(matches!(w.read("missing"), Err(ReadError::Missing)));
        assert!(matches!(w.read("sub"), Err(ReadError::NotAFile)));
        assert_eq!(w.read("sub/ok").unwrap(), "fine");
        // The fallback walk gives the same answers.
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        assert!(matches!(
            w.open_each_component(".devcontainer/secret", flags),
            Err(ReadError::Symlink)
        ));
        assert!(matches!(
            w.open_each_component(".nvmrc", flags),
            Err(ReadError::Symlink)
        ));
        assert!(matches!(
            w.open_each_component("../secret", flags),
            Err(ReadError::Missing)
        ));
        assert!(w.open_each_component("sub/ok", flags).is_ok());
    }

    #[test]
    fn large_fifo_and_binary_files_are_not_read() {
        let ws = tempfile::tempdir().unwrap();
        std::fs::write(ws.path().join("big"), vec![b'1'; 300 * 1024]).unwrap();
        std::fs::write(ws.path().join("bin"), [0xff, 0xfe, 0x00]).unwrap();
        nix_mkfifo(&ws.path().join("fifo"));
        let w = Workspace::open(ws.path()).unwrap();
        assert!(matches!(w.read("big"), Err(ReadError::TooLarge)));
        assert!(matches!(w.read("bin"), Err(ReadError::NotText)));
        // A FIFO would block a reader forever; it is refused before any read.
        assert!(matches!(w.read("fifo"), Err(ReadError::NotAFile)));
    }

    fn nix_mkfifo(path: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
    }
}
