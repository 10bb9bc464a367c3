//! Flow labels: what a sandbox has touched, set only by the host.
//!
//! - `secret-read`: the file server served a file matching `flow.secret`.
//!   From then on egress is narrowed to `flow.trusted_sinks` (see
//!   [`Policy::check`](crate::Policy::check), the one place this is decided).
//! - `untrusted-input`: content came from a host outside `flow.trusted`.
//!   Recorded only.
//!
//! Labels live in the sandbox's `flow/flow.json` and survive stop and start;
//! only the user clears them (`sandpen flow reset`). Several writers (one
//! file server per share, the supervisor, the CLI) take an exclusive `flock`
//! on `flow.lock` beside it and write the file atomically (a temporary file
//! renamed over it).
//!
//! The labels have a folder of their own because the file server, which sets
//! `secret-read`, is confined to its share and this folder (crates/fs,
//! `confine`): writing a file atomically takes the right to create and
//! remove files in its folder, and the sandbox's own folder holds
//! `sandbox.json`, `policy.toml` and the disk, which the server must not be
//! able to touch. A sandbox made by an earlier version has `flow.json` in its
//! own folder: the first locked access moves it in, and reads fall back to it
//! until then.

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
    /// Where an earlier version kept the file (`DIR/flow.json`).
    legacy: Option<PathBuf>,
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
    /// The store for a sandbox folder: `DIR/flow/flow.json` (and, from an
    /// earlier version, `DIR/flow.json`, moved in at the first locked access).
    pub fn in_dir(dir: &Path) -> LabelStore {
        LabelStore {
            path: dir.join("flow").join("flow.json"),
            legacy: Some(dir.join("flow.json")),
        }
    }

    /// The store at exactly `path` (the file server's `--flow-state`).
    pub fn at(path: PathBuf) -> LabelStore {
        LabelStore { path, legacy: None }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The folder of the file, its lock and its temporary files: the one
    /// place a writer of labels needs to create, replace and remove files.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Creates the folder and moves a file of an earlier version in. The
    /// supervisor calls this before it starts the file servers, which may
    /// not create folders or touch the sandbox's own folder.
    pub fn prepare(&self) -> Result<(), FlowError> {
        self.lock().map(drop)
    }

    /// Under the lock: `DIR/flow.json` of an earlier version becomes
    /// `DIR/flow/flow.json` unless that exists already.
    fn migrate(&self) -> Result<(), FlowError> {
        let Some(legacy) = &self.legacy else {
            return Ok(());
        };
        if self.path.exists() || !legacy.exists() {
            return Ok(());
        }
        std::fs::rename(legacy, &self.path).map_err(|e| self.err(e))?;
        let _ = std::fs::remove_file(legacy.with_extension("lock"));
        Ok(())
    }

    fn err(&self, source: io::Error) -> FlowError {
        FlowError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn lock(&self) -> Result<Locked, FlowError> {
        std::fs::create_dir_all(self.dir()).map_err(|e| self.err(e))?;
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
        let locked = Locked(f);
        self.migrate()?;
        Ok(locked)
    }

    /// The labels; none when the file does not exist.
    pub fn load(&self) -> Result<FlowLabels, FlowError> {
        match Self::read(&self.path)? {
            Some(labels) => Ok(labels),
            None => match &self.legacy {
                Some(legacy) => Ok(Self::read(legacy)?.unwrap_or_default()),
                None => Ok(FlowLabels::default()),
            },
        }
    }

    fn read(path: &Path) -> Result<Option<FlowLabels>, FlowError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| FlowError::Parse {
                        path: path.to_path_buf(),
                        source,
                    })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(FlowError::Io {
                path: path.to_path_buf(),
                source: e,
            }),
        }
    }

    fn save(&self, labels: &FlowLabels) -> Result<(), FlowError> {
        let text = serde_json::to_vec_pretty(labels).map_err(|source| FlowError::Parse {
            path: self.path.clone(),
            source,
        })?;
        // Durable before it is in place, and in place durably: a label the
        // file server reported set must survive a host crash (docs/files.md,
        // "fail closed"). The one atomic-write helper does both.
        sandpen_fsutil::write_atomic(&self.path, &text, sandpen_fsutil::MODE_STATE)
            .map_err(|e| self.err(e))
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
        std::fs::create_dir(dir.path().join("flow")).unwrap();
        std::fs::write(dir.path().join("flow/flow.json"), "{nope").unwrap();
        assert!(LabelStore::in_dir(dir.path()).load().is_err());
        // The same in an earlier version's place.
        let old = tempfile::tempdir().unwrap();
        std::fs::write(old.path().join("flow.json"), "{nope").unwrap();
        assert!(LabelStore::in_dir(old.path()).load().is_err());
    }

    #[test]
    fn labels_of_an_earlier_version_are_read_and_moved_in() {
        let dir = tempfile::tempdir().unwrap();
        let old = LabelStore::at(dir.path().join("flow.json"));
        old.set(Label::SecretRead, "2026-01-01T00:00:00Z", "/w/.env")
            .unwrap();
        let store = LabelStore::in_dir(dir.path());
        assert_eq!(store.path(), dir.path().join("flow/flow.json"));
        // Read before anything moved it: the label is not lost.
        assert!(store.load().unwrap().get(Label::SecretRead).is_some());
        store.prepare().unwrap();
        assert!(!dir.path().join("flow.json").exists());
        assert!(!dir.path().join("flow.lock").exists());
        assert!(store.path().is_file());
        let again = LabelStore::at(store.path().to_path_buf()).load().unwrap();
        assert_eq!(again.get(Label::SecretRead).unwrap().by, "/w/.env");
        // Everything the store writes stays in its folder.
        store.reset().unwrap();
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["flow"]);
    }
}
