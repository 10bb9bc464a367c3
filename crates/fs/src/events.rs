//! What the file server reports: denied operations and label changes, as
//! JSON lines in the sandbox's `logs/files.jsonl`, and the `secret-read`
//! label in its `flow.json`.
//!
//! Reads are not logged. The guest decides how often an operation is denied,
//! so the log is bounded: each (operation, path, error) is written once per
//! server run, at most [`MAX_DISTINCT`] of them, and the file stops growing
//! at [`MAX_BYTES`].
//!
//! The label is written to `flow.json` (fsynced, then renamed into place and
//! the folder fsynced) before the open or read that set it returns to the
//! guest, so no byte of the secret can reach the guest before the proxy
//! knows about it (the proxy reloads the labels before every decision).
//! When the label cannot be written, [`Events::secret_read`] fails and the
//! caller fails the request with `EIO`: it fails closed.
//!
//! The log file gets its [`MAX_BYTES`] allocated beyond its end when it is
//! opened (`fallocate` with `KEEP_SIZE`, best effort), so that the record of
//! a label that could not be written because the disk is full can still be
//! written.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sandpen_policy::{Label, LabelStore};
use serde::{Deserialize, Serialize};

/// Distinct denied operations logged per server run.
pub const MAX_DISTINCT: usize = 4096;
/// Bytes this server run may add to `files.jsonl`.
pub const MAX_BYTES: u64 = 4 << 20;

/// One line of `files.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// RFC 3339, UTC.
    pub time: String,
    pub sandbox: String,
    /// `denied` or `label`.
    pub kind: String,
    /// The FUSE operation (`open`, `rename`, …) or the label (`secret-read`).
    pub op: String,
    /// The host path.
    pub path: String,
    /// The rule that decided.
    pub rule: String,
    /// `ENOENT`, `EROFS`, `EACCES`; empty for a label.
    #[serde(default)]
    pub error: String,
}

/// Reads the records of a `files.jsonl`, skipping lines that do not parse.
pub fn read_records(path: &Path) -> std::io::Result<Vec<FileRecord>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

struct Log {
    file: Option<File>,
    written: u64,
    seen: HashSet<(String, PathBuf, &'static str)>,
}

/// The server's reporting side.
pub struct Events {
    sandbox: String,
    log: Mutex<Log>,
    labels: Option<LabelStore>,
}

impl Events {
    /// `log`: the `files.jsonl` to append to; `labels`: the sandbox's label
    /// store. Either may be absent (tests, a bare server).
    pub fn new(
        sandbox: &str,
        log: Option<&Path>,
        labels: Option<LabelStore>,
    ) -> std::io::Result<Events> {
        let file = match log {
            Some(p) => {
                let f = OpenOptions::new().create(true).append(true).open(p)?;
                preallocate(&f);
                Some(f)
            }
            None => None,
        };
        Ok(Events {
            sandbox: sandbox.to_string(),
            log: Mutex::new(Log {
                file,
                written: 0,
                seen: HashSet::new(),
            }),
            labels,
        })
    }

    fn write(&self, log: &mut Log, rec: &FileRecord) {
        let Some(file) = log.file.as_mut() else {
            return;
        };
        let Ok(mut line) = serde_json::to_vec(rec) else {
            return;
        };
        line.push(b'\n');
        if log.written + line.len() as u64 > MAX_BYTES {
            return;
        }
        // One write per line on an O_APPEND file: lines of several servers
        // do not interleave.
        if file.write_all(&line).is_ok() {
            log.written += line.len() as u64;
        }
    }

    /// A denied operation.
    pub fn denied(&self, op: &str, path: &Path, rule: &str, error: &'static str) {
        tracing::debug!(op, path = %path.display(), rule, error, "denied");
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if log.seen.len() >= MAX_DISTINCT {
            return;
        }
        if !log.seen.insert((op.to_string(), path.to_path_buf(), error)) {
            return;
        }
        let rec = FileRecord {
            time: now(),
            sandbox: self.sandbox.clone(),
            kind: "denied".into(),
            op: op.into(),
            path: path.to_string_lossy().into_owned(),
            rule: rule.into(),
            error: error.into(),
        };
        self.write(&mut log, &rec);
    }

    /// A file matching `flow.secret` is being served: set `secret-read`
    /// before the data goes out. Not cached: after `sandpen flow reset` the
    /// next read must set it again (secret files are few; this is one small
    /// locked read of `flow.json`). `Err` when the label could not be
    /// written: the caller must not serve the data (it answers `EIO`); the
    /// failure is logged as a denied operation.
    pub fn secret_read(&self, op: &str, path: &Path, rule: &str) -> Result<(), LabelError> {
        let Some(store) = &self.labels else {
            return Ok(());
        };
        let at = now();
        let by = path.to_string_lossy();
        match store.set(Label::SecretRead, &at, &by) {
            Ok((_, new)) => {
                if new {
                    tracing::info!(path = %by, "label secret-read set");
                    let rec = FileRecord {
                        time: at,
                        sandbox: self.sandbox.clone(),
                        kind: "label".into(),
                        op: Label::SecretRead.as_str().into(),
                        path: by.into_owned(),
                        rule: rule.into(),
                        error: String::new(),
                    };
                    let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
                    self.write(&mut log, &rec);
                }
                Ok(())
            }
            Err(source) => {
                let e = LabelError { source };
                tracing::error!("{op} {by} refused (EIO): {e}");
                self.denied(op, path, &format!("{rule}: {e}"), "EIO");
                Err(e)
            }
        }
    }
}

/// The `secret-read` label could not be written, so the secret is not served.
#[derive(Debug, thiserror::Error)]
#[error("the secret-read label cannot be written: {source}")]
pub struct LabelError {
    #[source]
    pub source: sandpen_policy::flow::FlowError,
}

/// Room for this run's records beyond the log's end, so that they can be
/// written on a full disk. Best effort: a file system without `fallocate`
/// just does not get it.
fn preallocate(f: &File) {
    use std::os::fd::AsRawFd;
    let Ok(len) = f.metadata().map(|m| m.len()) else {
        return;
    };
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_KEEP_SIZE,
            len as libc::off_t,
            MAX_BYTES as libc::off_t,
        )
    };
    if rc != 0 {
        tracing::debug!(
            "no room kept for the file log: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_denial_is_logged_once_and_the_log_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("files.jsonl");
        let ev = Events::new("s", Some(&log), None).unwrap();
        for _ in 0..3 {
            ev.denied(
                "open",
                Path::new("/w/.env"),
                "deny_read .env (default)",
                "ENOENT",
            );
        }
        ev.denied(
            "unlink",
            Path::new("/w/.env"),
            "deny_read .env (default)",
            "ENOENT",
        );
        let recs = read_records(&log).unwrap();
        assert_eq!(recs.len(), 2, "{recs:?}");
        assert_eq!(recs[0].op, "open");
        assert_eq!(recs[0].error, "ENOENT");
        // A guest hammering new paths: the number of lines has a ceiling.
        for i in 0..(MAX_DISTINCT + 100) {
            ev.denied("open", Path::new(&format!("/w/{i}.pem")), "r", "ENOENT");
        }
        assert_eq!(read_records(&log).unwrap().len(), MAX_DISTINCT);
    }

    #[test]
    fn a_label_that_cannot_be_written_fails_the_read_and_is_logged() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("files.jsonl");
        // The label file's folder is a file: every write of it fails.
        std::fs::write(dir.path().join("flow"), "not a folder").unwrap();
        let store = LabelStore::at(dir.path().join("flow/flow.json"));
        let ev = Events::new("s", Some(&log), Some(store)).unwrap();
        let e = ev
            .secret_read("open", Path::new("/w/secrets/t"), "flow.secret secrets/**")
            .unwrap_err();
        assert!(e.to_string().contains("cannot be written"), "{e}");
        let recs = read_records(&log).unwrap();
        assert_eq!(recs.len(), 1, "{recs:?}");
        assert_eq!(
            (
                recs[0].kind.as_str(),
                recs[0].op.as_str(),
                recs[0].error.as_str()
            ),
            ("denied", "open", "EIO")
        );
        assert!(recs[0].rule.contains("secret-read label"), "{:?}", recs[0]);
        // Written, it is durable and the read goes on.
        let ok_dir = tempfile::tempdir().unwrap();
        let store = LabelStore::in_dir(ok_dir.path());
        let ev = Events::new("s", None, Some(store.clone())).unwrap();
        ev.secret_read("open", Path::new("/w/secrets/t"), "r")
            .unwrap();
        assert!(store.load().unwrap().get(Label::SecretRead).is_some());
    }
}
