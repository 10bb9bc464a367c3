//! The user's acceptance of a workspace's `.sandpen.toml`: `sandpen policy
//! trust NAME` records the hash of the file's text in the sandbox's own
//! folder (`workspace-trust.json`, outside the share), and the widening parts
//! of the file (`flow.trusted_sinks`, `flow.trusted`, allow rules) apply
//! only while the file still has that hash. See
//! [`Policy::with_workspace`](sandpen_policy::Policy::with_workspace).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::paths::SandboxPaths;
use crate::SupervisorError;

/// What the user trusted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trusted {
    /// The workspace file, as it was when trusted.
    pub file: PathBuf,
    /// Hex SHA-256 of its text.
    pub sha256: String,
    /// RFC 3339.
    pub at: String,
}

pub fn trust_file(paths: &SandboxPaths) -> PathBuf {
    paths.dir.join("workspace-trust.json")
}

/// The recorded trust, if any. A damaged record is an error, never a trust.
pub fn load(paths: &SandboxPaths) -> Result<Option<Trusted>, SupervisorError> {
    let path = trust_file(paths);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| SupervisorError::Invalid(format!("{} is damaged: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SupervisorError::io(
            format!("reading {}", path.display()),
            e,
        )),
    }
}

/// Records `sha256` of `file` as trusted (replacing an earlier record).
pub fn save(paths: &SandboxPaths, file: &Path, sha256: &str) -> Result<Trusted, SupervisorError> {
    let t = Trusted {
        file: file.to_path_buf(),
        sha256: sha256.to_string(),
        at: sandpen_fs::events::now(),
    };
    let json = serde_json::to_vec_pretty(&t)
        .map_err(|e| SupervisorError::Invalid(format!("encoding the trust record: {e}")))?;
    crate::sandbox::write_atomic(&trust_file(paths), &json)?;
    Ok(t)
}

/// Forgets the trust.
pub fn remove(paths: &SandboxPaths) -> Result<bool, SupervisorError> {
    match std::fs::remove_file(trust_file(paths)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(SupervisorError::io("removing the trust record", e)),
    }
}
