//! The logs of sandboxes: the network log (`logs/net.jsonl`, one record per
//! connection or request), the file log (`logs/files.jsonl`: denied
//! operations and label changes), the console and supervisor logs; read
//! whole, or followed line by line ([`Follow`]).

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sandpen_fs::FileRecord;
use sandpen_proxy::audit::{read_log, ConnectionReport, LogFilter};
use sandpen_supervisor::{sandbox, Dirs};

use crate::ApiError;

/// The sandboxes a log read covers: one (checked) or all.
pub fn names(dirs: &Dirs, name: Option<&str>) -> Result<Vec<String>, ApiError> {
    Ok(match name {
        Some(n) => {
            sandbox::load(dirs, n)?;
            vec![n.to_string()]
        }
        None => sandbox::list(dirs)?.into_iter().map(|c| c.name).collect(),
    })
}

pub fn network_log_path(dirs: &Dirs, name: &str) -> PathBuf {
    dirs.sandbox(name).logs().join("net.jsonl")
}

pub fn file_log_path(dirs: &Dirs, name: &str) -> PathBuf {
    dirs.sandbox(name).logs().join("files.jsonl")
}

/// The last `limit` network records of these sandboxes, in time order.
pub fn network(
    dirs: &Dirs,
    names: &[String],
    limit: usize,
) -> Result<Vec<ConnectionReport>, ApiError> {
    let mut records = Vec::new();
    for n in names {
        records.extend(read_log(
            &network_log_path(dirs, n),
            &LogFilter {
                sandbox: None,
                limit: Some(limit),
            },
        )?);
    }
    records.sort_by_key(|r| r.time);
    let skip = records.len().saturating_sub(limit);
    records.drain(..skip);
    Ok(records)
}

/// The last `limit` file records (denied operations, label changes).
pub fn files(dirs: &Dirs, names: &[String], limit: usize) -> Result<Vec<FileRecord>, ApiError> {
    let mut records = Vec::new();
    for n in names {
        let path = file_log_path(dirs, n);
        records.extend(
            sandpen_fs::read_records(&path)
                .map_err(|e| ApiError::io(format!("reading {}", path.display()), e))?,
        );
    }
    records.sort_by(|a, b| a.time.cmp(&b.time));
    let skip = records.len().saturating_sub(limit);
    records.drain(..skip);
    Ok(records)
}

/// The console (or supervisor) log's path.
pub fn text_log_path(dirs: &Dirs, name: &str, supervisor: bool) -> Result<PathBuf, ApiError> {
    sandbox::load(dirs, name)?;
    let paths = dirs.sandbox(name);
    Ok(if supervisor {
        paths.supervisor_log()
    } else {
        paths.console_log()
    })
}

/// Follows a file that is appended to and replaced by rotation: each
/// [`Follow::poll`] returns the whole lines written since the last one.
/// A file that shrank (truncated) or was replaced (another inode) is read
/// again from its start.
#[derive(Debug)]
pub struct Follow {
    path: PathBuf,
    file: Option<std::fs::File>,
    ino: u64,
    pos: u64,
    partial: Vec<u8>,
}

/// At most this much is read per poll, so that a huge log cannot stall a
/// follower (the rest comes at the next poll).
const POLL_MAX: u64 = 4 << 20;

impl Follow {
    /// Starts at the end of what is there now.
    pub fn from_end(path: &Path) -> Follow {
        let mut f = Follow {
            path: path.to_path_buf(),
            file: None,
            ino: 0,
            pos: 0,
            partial: Vec::new(),
        };
        if let Ok(file) = std::fs::File::open(path) {
            if let Ok(meta) = file.metadata() {
                f.ino = meta.ino();
                f.pos = meta.len();
            }
            f.file = Some(file);
        }
        f
    }

    /// Starts at the file's beginning.
    pub fn from_start(path: &Path) -> Follow {
        Follow {
            path: path.to_path_buf(),
            file: None,
            ino: 0,
            pos: 0,
            partial: Vec::new(),
        }
    }

    /// New bytes since the last poll, cut after the last newline (a line
    /// being written is kept for the next poll).
    pub fn poll_bytes(&mut self) -> std::io::Result<Vec<u8>> {
        let on_disk = match std::fs::metadata(&self.path) {
            Ok(m) => Some((m.ino(), m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        if let Some((ino, len)) = on_disk {
            if self.file.is_none() || ino != self.ino {
                // First sight, or rotated: finish the old file, then the new one from 0.
                if let Some(old) = self.file.as_mut() {
                    old.read_to_end(&mut out)?;
                }
                self.file = Some(std::fs::File::open(&self.path)?);
                self.ino = ino;
                self.pos = 0;
            } else if len < self.pos {
                self.pos = 0;
            }
        }
        if let Some(file) = self.file.as_mut() {
            file.seek(SeekFrom::Start(self.pos))?;
            let n = file.take(POLL_MAX).read_to_end(&mut out)?;
            self.pos += n as u64;
        }
        let mut all = std::mem::take(&mut self.partial);
        all.extend_from_slice(&out);
        match all.iter().rposition(|b| *b == b'\n') {
            Some(end) => {
                self.partial = all.split_off(end + 1);
                Ok(all)
            }
            None => {
                self.partial = all;
                Ok(Vec::new())
            }
        }
    }

    /// New whole lines, without their newline.
    pub fn poll_lines(&mut self) -> std::io::Result<Vec<String>> {
        let bytes = self.poll_bytes()?;
        Ok(bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect())
    }
}

/// Polls a follower every so often, for callers that wait.
pub const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn follow_sees_appends_rotation_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("net.jsonl");
        std::fs::write(&path, "old\n").unwrap();
        let mut f = Follow::from_end(&path);
        assert!(f.poll_lines().unwrap().is_empty());
        let mut w = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        w.write_all(b"one\ntw").unwrap();
        assert_eq!(f.poll_lines().unwrap(), ["one"]);
        w.write_all(b"o\n").unwrap();
        assert_eq!(f.poll_lines().unwrap(), ["two"]);
        // Rotation: the old file renamed away after a last line, a new one made.
        w.write_all(b"last\n").unwrap();
        std::fs::rename(&path, dir.path().join("net.jsonl.1")).unwrap();
        std::fs::write(&path, "new\n").unwrap();
        assert_eq!(f.poll_lines().unwrap(), ["last", "new"]);
        // Truncation in place.
        std::fs::write(&path, "x\n").unwrap();
        assert_eq!(f.poll_lines().unwrap(), ["x"]);
        // A file that appears later is read from its start.
        let late = dir.path().join("late");
        let mut g = Follow::from_end(&late);
        assert!(g.poll_lines().unwrap().is_empty());
        std::fs::write(&late, "first\n").unwrap();
        assert_eq!(g.poll_lines().unwrap(), ["first"]);
    }
}
