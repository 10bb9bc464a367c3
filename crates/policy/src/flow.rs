//! Flow labels: what a sandbox has touched, set only by the host.
//!
//! - `secret-read`: the file server served a file matching `flow.secret`.
//!   From then on egress is narrowed to `flow.trusted_sinks` (see
//!   [`Policy::check`](crate::Policy::check), the one place this is decided).
//! - `untrusted-input`: content came from a host outside `flow.trusted`.
//!   Recorded only.
//!
//! Labels live in the sandbox's `flow.json` and survive stop and start; only
//! the user clears them (`sandpen flow reset`). Several writers (one file
//! server per share, the supervisor, the CLI) take an exclusive `flock` on
//! `flow.lock` beside it and write the file atomically.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The labels a sandbox can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Label {
    SecretRead,
    UntrustedInput,
}

impl Label {
    pub fn as_str(self) -> &'static str {
        match self {
            Label::SecretRead => "secret-read",
            Label::UntrustedInput => "untrusted-input",
        }
    }
}

/// One label that is set: when, and by what (a host path or a host name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelSet {
    pub label: Label,
    /// RFC 3339, UTC.
    pub at: String,
    pub by: String,
}

/// The labels of one sandbox. At most one entry per label: the first setter
/// is kept (it is the one that matters for the reason).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowLabels {
    #[serde(default)]
    pub labels: Vec<LabelSet>,
}

impl FlowLabels {
    pub fn get(&self, label: Label) -> Option<&LabelSet> {
        self.labels.iter().find(|l| l.label == label)
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// `flow.json` and its lock.
#[derive(Debug, Clone)]
pub struct LabelStore {
    path: PathBuf,
}

/// Errors from reading or writing the labels.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: not a flow label file: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

struct Locked(File);

impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: flock on a descriptor this struct owns; no memory is touched.
        unsafe {
            libc::flock(self.0.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

impl LabelStore {
    /// The store for a sandbox folder: `DIR/flow.json`.
    pub fn in_dir(dir: &Path) -> LabelStore {
        LabelStore {
            path: dir.join("flow.json"),
        }
    }

    pub fn at(path: PathBuf) -> LabelStore {
        LabelStore { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, source: io::Error) -> FlowError {
        FlowError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn lock(&self) -> Result<Locked, FlowError> {
        let lock_path = self.path.with_extension("lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| self.err(e))?;
        // SAFETY: flock on a descriptor we own; blocks until the lock is ours.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(self.err(io::Error::last_os_error()));
        }
        Ok(Locked(f))
    }

    /// The labels; none when the file does not exist.
    pub fn load(&self) -> Result<FlowLabels, FlowError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| FlowError::Parse {
                path: self.path.clone(),
                source,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(FlowLabels::default()),
            Err(e) => Err(self.err(e)),
        }
    }

    fn save(&self, labels: &FlowLabels) -> Result<(), FlowError> {
        let tmp = self
            .path
            .with_extension(format!("json.tmp.{}", std::process::id()));
        let text = serde_json::to_vec_pretty(labels).map_err(|source| FlowError::Parse {
            path: self.path.clone(),
            source,
        })?;
        std::fs::write(&tmp, text).map_err(|e| self.err(e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            self.err(e)
        })
    }

    /// Set `label` unless it is set already. Returns the entry that is now in
    /// force and whether this call set it.
    pub fn set(&self, label: Label, at: &str, by: &str) -> Result<(LabelSet, bool), FlowError> {
        let _lock = self.lock()?;
        let mut labels = self.load()?;
        if let Some(l) = labels.get(label) {
            return Ok((l.clone(), false));
        }
        let entry = LabelSet {
            label,
            at: at.to_string(),
            by: by.to_string(),
        };
        labels.labels.push(entry.clone());
        self.save(&labels)?;
        Ok((entry, true))
    }

    /// Clear every label; returns the ones that were set.
    pub fn reset(&self) -> Result<FlowLabels, FlowError> {
        let _lock = self.lock()?;
        let old = self.load()?;
        self.save(&FlowLabels::default())?;
        Ok(old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_set_once_and_reset() {
        let dir = tempfile::tempdir().unwrap();
        let store = LabelStore::in_dir(dir.path());
        assert!(store.load().unwrap().is_empty());
        let (l, new) = store
            .set(Label::SecretRead, "2026-01-01T00:00:00Z", "/w/.env")
            .unwrap();
        assert!(new);
        assert_eq!(l.by, "/w/.env");
        let (l, new) = store
            .set(Label::SecretRead, "2026-01-02T00:00:00Z", "/w/other")
            .unwrap();
        assert!(!new, "the first setter is kept");
        assert_eq!(l.by, "/w/.env");
        // A second handle (another process) sees it.
        let again = LabelStore::in_dir(dir.path()).load().unwrap();
        assert_eq!(
            again.get(Label::SecretRead).unwrap().at,
            "2026-01-01T00:00:00Z"
        );
        let old = store.reset().unwrap();
        assert_eq!(old.labels.len(), 1);
        assert!(store.load().unwrap().is_empty());
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_an_empty_set() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("flow.json"), "{nope").unwrap();
        assert!(LabelStore::in_dir(dir.path()).load().is_err());
    }
}
