//! The secret store: one JSON file, mode 0600, rewritten atomically, and
//! the OS keyring when one answers ([`FileStore::with_keyring`]): then the
//! file is only the index and the values live in the keyring.
//!
//! The caller passes the path (`$XDG_CONFIG_HOME/sandpen/secrets`). Each call
//! reads the file afresh, so separate `sandpen` processes see each other's
//! changes. Values are held in [`SecretValue`], whose `Debug` prints `***`;
//! no error of this module contains a value.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::fsutil::{create_private_parent, mode_of, with_lock, write_atomic};
use crate::keyring::Keyring;

const FORMAT_VERSION: u32 = 1;

/// A secret value. `Debug` prints `***`; there is no `Display`. The memory
/// is zeroed on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        SecretValue(Zeroizing::new(value.into()))
    }

    /// The value itself, for the one place that needs it (the proxy's swap).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for SecretValue {
    fn from(value: String) -> Self {
        SecretValue::new(value)
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where a secret applies: every sandbox, or one sandbox by name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Every sandbox.
    Global,
    /// One sandbox, by name.
    Sandbox(String),
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Global => f.write_str("global"),
            Scope::Sandbox(name) => f.write_str(name),
        }
    }
}

/// A listed entry: everything but the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo {
    pub service: String,
    pub scope: Scope,
    pub set_at: OffsetDateTime,
}

/// A secret found by [`FileStore::get`], with the scope it came from (for
/// the audit line `credential: anthropic (global)`).
#[derive(Debug, Clone)]
pub struct Found {
    pub scope: Scope,
    pub value: SecretValue,
    pub set_at: OffsetDateTime,
}

/// Errors of the store. None contains a secret value.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {op} secret store {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "refusing to read secret store {}: its mode is {mode:04o}, readable or writable by group or others; run `chmod 600 {}`",
        path.display(), path.display()
    )]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error("secret store {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("secret store {} is corrupt (JSON error at line {line}, column {column})", path.display())]
    Corrupt {
        path: PathBuf,
        line: usize,
        column: usize,
    },
    #[error("secret store {} has format version {version}; this sandpen reads version {FORMAT_VERSION}", path.display())]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("the OS keyring cannot {op}: {reason}")]
    Keyring { op: &'static str, reason: String },
    #[error("the {service} secret is in the OS keyring, which does not answer here; unlock it, or set the secret again with SANDPEN_SECRET_STORE=file")]
    KeyringUnavailable { service: String },
    #[error("the {service} secret ({scope}) is missing from the OS keyring; set it again")]
    MissingFromKeyring { service: String, scope: String },
    #[error("invalid service name {0:?}: use 1-64 letters, digits, '-', '_' or '.'")]
    InvalidService(String),
    #[error("invalid sandbox scope {0:?}")]
    InvalidScope(String),
    #[error("the secret for {service} is {reason}")]
    InvalidValue {
        service: String,
        reason: &'static str,
    },
}

#[derive(Serialize, Deserialize)]
struct FileDoc<V> {
    version: u32,
    secrets: Vec<FileEntry<V>>,
}

#[derive(Serialize, Deserialize)]
struct FileEntry<V> {
    service: String,
    scope: Scope,
    /// Absent when the value is in the OS keyring (serde reads a missing
    /// `Option` as `None`).
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<V>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    in_keyring: bool,
    #[serde(with = "time::serde::rfc3339")]
    set_at: OffsetDateTime,
}

struct Entry {
    service: String,
    scope: Scope,
    value: Stored,
    set_at: OffsetDateTime,
}

/// Where an entry's value is.
enum Stored {
    File(SecretValue),
    Keyring,
}

/// The keyring account of an entry: `SERVICE@SCOPE`.
fn account(service: &str, scope: &Scope) -> String {
    format!("{service}@{scope}")
}

/// The file-backed secret store.
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
    keyring: Option<Keyring>,
}

impl FileStore {
    /// A store at `path`. Nothing is read or created until used.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileStore {
            path: path.into(),
            keyring: None,
        }
    }

    /// New values go to `keyring`; the file keeps the index.
    pub fn with_keyring(mut self, keyring: Keyring) -> Self {
        self.keyring = Some(keyring);
        self
    }

    /// Where new values go: `OS keyring` or `file`.
    pub fn backend(&self) -> &'static str {
        if self.keyring.is_some() {
            "OS keyring"
        } else {
            "file"
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets `service`'s secret in `scope`, replacing any value there.
    pub fn set(&self, service: &str, scope: Scope, value: SecretValue) -> Result<(), StoreError> {
        check_service(service)?;
        check_scope(&scope)?;
        let v = value.expose();
        if v.is_empty() {
            return Err(invalid_value(service, "empty"));
        }
        if v.bytes().any(|b| b.is_ascii_control()) {
            return Err(invalid_value(
                service,
                "not allowed to contain control characters or newlines",
            ));
        }
        self.ensure_folder()?;
        with_lock(&self.path, self.io("lock"), || {
            let mut entries = self.load()?;
            let stored = match &self.keyring {
                Some(k) => {
                    k.set(&account(service, &scope), &value)?;
                    Stored::Keyring
                }
                None => {
                    // A value that moves from the keyring to the file must not
                    // stay behind in the keyring.
                    let was_in_keyring = entries.iter().any(|e| {
                        e.service == service
                            && e.scope == scope
                            && matches!(e.value, Stored::Keyring)
                    });
                    if was_in_keyring {
                        return Err(StoreError::KeyringUnavailable {
                            service: service.to_string(),
                        });
                    }
                    Stored::File(value)
                }
            };
            let in_keyring = matches!(stored, Stored::Keyring);
            let acct = account(service, &scope);
            entries.retain(|e| !(e.service == service && e.scope == scope));
            entries.push(Entry {
                service: service.to_string(),
                scope,
                value: stored,
                set_at: OffsetDateTime::now_utc(),
            });
            let saved = self.save(&entries);
            if let (Err(_), true, Some(k)) = (&saved, in_keyring, &self.keyring) {
                // No index entry points at it: do not leave it behind.
                let _ = k.delete(&acct);
            }
            saved
        })
    }

    /// `service`'s secret for `sandbox`: the sandbox's own entry first, then
    /// the global one. With `sandbox` `None`, only the global entry.
    pub fn get(&self, service: &str, sandbox: Option<&str>) -> Result<Option<Found>, StoreError> {
        let entries = self.load()?;
        let pick = |scope: &Scope| -> Result<Option<Found>, StoreError> {
            let Some(e) = entries
                .iter()
                .find(|e| e.service == service && e.scope == *scope)
            else {
                return Ok(None);
            };
            let value = match &e.value {
                Stored::File(v) => v.clone(),
                Stored::Keyring => {
                    let k =
                        self.keyring
                            .as_ref()
                            .ok_or_else(|| StoreError::KeyringUnavailable {
                                service: service.to_string(),
                            })?;
                    k.get(&account(&e.service, &e.scope))?.ok_or_else(|| {
                        StoreError::MissingFromKeyring {
                            service: service.to_string(),
                            scope: e.scope.to_string(),
                        }
                    })?
                }
            };
            Ok(Some(Found {
                scope: e.scope.clone(),
                value,
                set_at: e.set_at,
            }))
        };
        if let Some(name) = sandbox {
            if let Some(found) = pick(&Scope::Sandbox(name.to_string()))? {
                return Ok(Some(found));
            }
        }
        pick(&Scope::Global)
    }

    /// Every entry, without values, sorted by service then scope.
    pub fn list(&self) -> Result<Vec<EntryInfo>, StoreError> {
        let mut out: Vec<EntryInfo> = self
            .load()?
            .into_iter()
            .map(|e| EntryInfo {
                service: e.service,
                scope: e.scope,
                set_at: e.set_at,
            })
            .collect();
        out.sort_by(|a, b| (&a.service, &a.scope).cmp(&(&b.service, &b.scope)));
        Ok(out)
    }

    /// Removes `service`'s secret in `scope`; `false` if there was none.
    pub fn remove(&self, service: &str, scope: &Scope) -> Result<bool, StoreError> {
        if !self.path.exists() {
            return Ok(false);
        }
        self.ensure_folder()?;
        with_lock(&self.path, self.io("lock"), || {
            let mut entries = self.load()?;
            let Some(pos) = entries
                .iter()
                .position(|e| e.service == service && e.scope == *scope)
            else {
                return Ok(false);
            };
            if matches!(entries[pos].value, Stored::Keyring) {
                let k = self
                    .keyring
                    .as_ref()
                    .ok_or_else(|| StoreError::KeyringUnavailable {
                        service: service.to_string(),
                    })?;
                k.delete(&account(service, scope))?;
            }
            entries.remove(pos);
            self.save(&entries)?;
            Ok(true)
        })
    }

    fn ensure_folder(&self) -> Result<(), StoreError> {
        create_private_parent(&self.path).map_err(self.io("create the folder of"))
    }

    fn io(&self, op: &'static str) -> impl FnOnce(io::Error) -> StoreError + '_ {
        move |source| StoreError::Io {
            op,
            path: self.path.clone(),
            source,
        }
    }

    fn load(&self) -> Result<Vec<Entry>, StoreError> {
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io("open")(e)),
        };
        // Checked on the open file, so a swap between check and read is moot.
        let meta = file.metadata().map_err(self.io("stat"))?;
        if !meta.is_file() {
            return Err(StoreError::NotAFile {
                path: self.path.clone(),
            });
        }
        let mode = mode_of(&file).map_err(self.io("stat"))?;
        if mode & 0o077 != 0 {
            return Err(StoreError::InsecurePermissions {
                path: self.path.clone(),
                mode,
            });
        }
        let mut buf = Zeroizing::new(Vec::new());
        file.read_to_end(&mut buf).map_err(self.io("read"))?;
        // serde_json's messages can quote input, so keep only the position.
        let doc: FileDoc<String> =
            serde_json::from_slice(&buf).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                line: e.line(),
                column: e.column(),
            })?;
        if doc.version != FORMAT_VERSION {
            return Err(StoreError::UnsupportedVersion {
                path: self.path.clone(),
                version: doc.version,
            });
        }
        Ok(doc
            .secrets
            .into_iter()
            .map(|e| Entry {
                value: match (e.value, e.in_keyring) {
                    (Some(v), false) => Stored::File(SecretValue::new(v)),
                    _ => Stored::Keyring,
                },
                service: e.service,
                scope: e.scope,
                set_at: e.set_at,
            })
            .collect())
    }

    /// Callers hold the lock, so the folder exists.
    fn save(&self, entries: &[Entry]) -> Result<(), StoreError> {
        let doc = FileDoc {
            version: FORMAT_VERSION,
            secrets: entries
                .iter()
                .map(|e| FileEntry {
                    service: e.service.clone(),
                    scope: e.scope.clone(),
                    value: match &e.value {
                        Stored::File(v) => Some(v.expose()),
                        Stored::Keyring => None,
                    },
                    in_keyring: matches!(e.value, Stored::Keyring),
                    set_at: e.set_at,
                })
                .collect(),
        };
        let bytes =
            Zeroizing::new(serde_json::to_vec_pretty(&doc).map_err(|e| StoreError::Io {
                op: "encode",
                path: self.path.clone(),
                source: io::Error::other(e.to_string()),
            })?);
        write_atomic(&self.path, &bytes, 0o600).map_err(self.io("write"))
    }
}

fn invalid_value(service: &str, reason: &'static str) -> StoreError {
    StoreError::InvalidValue {
        service: service.to_string(),
        reason,
    }
}

fn check_service(service: &str) -> Result<(), StoreError> {
    let ok = !service.is_empty()
        && service.len() <= 64
        && service
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidService(service.to_string()))
    }
}

fn check_scope(scope: &Scope) -> Result<(), StoreError> {
    match scope {
        Scope::Global => Ok(()),
        Scope::Sandbox(name) => {
            if name.is_empty()
                || name.len() > 128
                || name.chars().any(|c| c.is_control() || c == '/')
            {
                Err(StoreError::InvalidScope(name.clone()))
            } else {
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    const SECRET: &str = "sk-ant-VERY-SECRET-value-42";

    fn store(dir: &tempfile::TempDir) -> FileStore {
        FileStore::new(dir.path().join("sandpen").join("secrets"))
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn missing_file_is_empty_and_not_created_by_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(&dir);
        assert!(s.list().expect("list").is_empty());
        assert!(s.get("anthropic", Some("box")).expect("get").is_none());
        assert!(!s.remove("anthropic", &Scope::Global).expect("remove"));
        assert!(!s.path().exists());
    }

    #[test]
    fn created_0600_in_0700_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(&dir);
        s.set("anthropic", Scope::Global, SecretValue::new(SECRET))
            .expect("set");
        assert_eq!(mode(s.path()), 0o600);
        assert_eq!(mode(s.path().parent().expect("parent")), 0o700);
    }

    #[test]
    fn refuses_group_or_other_readable_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(&dir);
        s.set("openai", Scope::Global, SecretValue::new(SECRET))
            .expect("set");
        for bad in [0o644, 0o640, 0o604, 0o620] {
            fs::set_permissions(s.path(), fs::Permissions::from_mode(bad)).expect("chmod");
            let err = s.get("openai", None).expect_err("must refuse");
            assert!(
                matches!(err, StoreError::InsecurePermissions { .. }),
                "{err}"
            );
            let msg = err.to_string();
            assert!(msg.contains("chmod 600"), "{msg}");
            assert!(!msg.contains(SECRET));
            assert!(s.set("x", Scope::Global, SecretValue::new("v")).is_err());
        }
        fs::set_permissions(s.path(), fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(s.get("openai", None).expect("get").is_some());
    }

    #[test]
    fn scope_precedence_sandbox_then_global() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(&dir);
        s.set("github", Scope::Global, SecretValue::new("global-token"))
            .expect("set");
        s.set(
            "github",
            Scope::Sandbox("proj".into()),
            SecretValue::new("proj-token"),
        )
        .expect("set");

        let f = s.get("github", Some("proj")).expect("get").expect("found");
        assert_eq!(f.value.expose(), "proj-token");
        assert_eq!(f.scope, Scope::Sandbox("proj".into()));

        let f = s.get("github", Some("other")).expect("get").expect("found");
        assert_eq!(f.value.expose(), "global-token");
        assert_eq!(f.scope, Scope::Global);

        let f = s.get("github", None).expect("get").expect("found");
        assert_eq!(f.value.expose(), "global-token");

        assert!(s.remove("github", &Scope::Global).expect("remove"));
        assert!(s.get("github", Some("other")).expect("get").is_none());
        assert_eq!(
            s.get("github", Some("proj"))
                .expect("get")
                .expect("found")
                .value
                .expose(),
            "proj-token"
        );
    }

    #[test]
    fn set_replaces_and_list_has_no_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(&dir);
        s.set("openai", Scope::Global, SecretValue::new("first"))
            .expect("set");
        s.set("openai", Scope::Global, SecretValue::new(SECRET))
            .expect("set");
        s.set(
            "anthropic",
            Scope::Sandbox("b".into()),
            SecretValue::new(SECRET),
        )
        .expect("set");
        let list = s.list().expect("list");
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].service, "anthropic");
        assert_eq!(list[1].service, "openai");
        assert!(!format!("{list:?}").contains(SECRET));
        assert_eq!(
            s.get("openai", None)
                .expect("get")
                .expect("found")
                .value
                .expose(),
            SECRET
        );
    }

    #[test]
    fn debug_and_errors_redact_value() {
        let v = SecretValue::new(SECRET);
        assert_eq!(format!("{v:?}"), "***");
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(&dir);
        s.set("anthropic", Scope::Global, v).expect("set");
        let found = s.get("anthropic", None).expect("get").expect("found");
        let dbg = format!("{found:?}");
        assert!(dbg.contains("***") && !dbg.contains(SECRET), "{dbg}");

        let err = s
            .set(
                "anthropic",
                Scope::Global,
                SecretValue::new(format!("{SECRET}\n")),
            )
            .expect_err("newline refused");
        assert!(!err.to_string().contains(SECRET));
        assert!(!format!("{err:?}").contains(SECRET));

        // A corrupt file whose JSON error would quote the value.
        let bad = format!(
            r#"{{"version":1,"secrets":[{{"service":"a","scope":"global","value":"{SECRET}","set_at":7}}]}}"#
        );
        fs::write(s.path(), bad).expect("write");
        let err = s.get("a", None).expect_err("corrupt");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(!err.to_string().contains(SECRET));
        assert!(!format!("{err:?}").contains(SECRET));
    }

    #[test]
    fn writes_are_atomic_renames() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(&dir);
        s.set("openai", Scope::Global, SecretValue::new("old-value"))
            .expect("set");
        // A reader that opened the old file keeps a complete old file: the
        // write replaced the name, it did not rewrite the inode in place.
        let mut old = File::open(s.path()).expect("open");
        s.set("openai", Scope::Global, SecretValue::new("new-value"))
            .expect("set");
        let mut text = String::new();
        old.read_to_string(&mut text).expect("read");
        assert!(text.contains("old-value") && !text.contains("new-value"));
        let doc: serde_json::Value = serde_json::from_str(&text).expect("old file complete JSON");
        assert_eq!(doc["version"], 1);
        // No temporary file is left behind (only the lock file), and the
        // mode stays 0600.
        let mut names: Vec<_> = fs::read_dir(s.path().parent().expect("parent"))
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                std::ffi::OsString::from("secrets"),
                std::ffi::OsString::from("secrets.lock")
            ]
        );
        assert_eq!(mode(s.path()), 0o600);
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(&dir);
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for j in 0..5 {
                        s.set(
                            &format!("svc{i}-{j}"),
                            Scope::Global,
                            SecretValue::new(format!("v{i}{j}")),
                        )
                        .expect("set");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("writer");
        }
        assert_eq!(s.list().expect("list").len(), 40);
    }

    #[test]
    fn rejects_bad_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(&dir);
        let v = || SecretValue::new("v");
        assert!(matches!(
            s.set("", Scope::Global, v()),
            Err(StoreError::InvalidService(_))
        ));
        assert!(matches!(
            s.set("a b", Scope::Global, v()),
            Err(StoreError::InvalidService(_))
        ));
        assert!(matches!(
            s.set("a", Scope::Sandbox(String::new()), v()),
            Err(StoreError::InvalidScope(_))
        ));
        assert!(matches!(
            s.set("a", Scope::Global, SecretValue::new("")),
            Err(StoreError::InvalidValue { .. })
        ));
    }
}
