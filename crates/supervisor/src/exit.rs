//! How a sandbox's last run ended: `last-exit.json` in its folder.
//!
//! The supervisor writes it (atomically) when it ends for any reason other
//! than a stop the user asked for or a guest that powered off, naming the
//! part that failed: `file server for /w killed by signal 9`, `QEMU exited
//! with status 1`, `the guest broke its control channel: ...`. A supervisor
//! that is itself killed cannot write it; its pid file, which it removes on
//! every orderly exit, is then the evidence. `ls` shows either as `failed`
//! with the reason, and the next `start` clears both.

use serde::{Deserialize, Serialize};

use crate::paths::SandboxPaths;

const FILE: &str = "last-exit.json";

/// The record of a run that failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastExit {
    /// RFC 3339, UTC.
    pub at: String,
    /// One sentence, for `ls` and the CLI.
    pub reason: String,
}

/// Records that the run failed, and why.
pub fn record_failure(paths: &SandboxPaths, reason: &str) {
    let exit = LastExit {
        at: crate::sandbox::now_rfc3339(),
        reason: reason.to_string(),
    };
    let result = serde_json::to_vec_pretty(&exit)
        .map_err(std::io::Error::other)
        .and_then(|json| {
            sandpen_fsutil::write_atomic(&paths.dir.join(FILE), &json, sandpen_fsutil::MODE_STATE)
        });
    if let Err(e) = result {
        tracing::warn!("recording why the sandbox stopped: {e}");
    }
}

/// Forgets the last failure (a new run starts).
pub fn clear(paths: &SandboxPaths) {
    let _ = std::fs::remove_file(paths.dir.join(FILE));
}

/// Why the last run failed, if it did: the record, or a pid file that the
/// supervisor did not live to remove. Call only when no supervisor runs.
pub fn last_failure(paths: &SandboxPaths) -> Option<String> {
    if let Ok(bytes) = std::fs::read(paths.dir.join(FILE)) {
        return Some(match serde_json::from_slice::<LastExit>(&bytes) {
            Ok(exit) => exit.reason,
            Err(_) => "the record of the last run is damaged".to_string(),
        });
    }
    paths.pid_file().exists().then(|| {
        format!(
            "the supervisor died without a word (killed?); see {}",
            paths.supervisor_log().display()
        )
    })
}

/// A child's exit in words: `exited with status 1`, `killed by signal 9`.
pub fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => format!("ended ({status})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_a_stale_pid_file_and_a_clean_state() {
        let dir = tempfile::tempdir().unwrap();
        let paths = SandboxPaths::new(dir.path().to_path_buf());
        std::fs::create_dir_all(paths.run()).unwrap();
        assert_eq!(last_failure(&paths), None);
        std::fs::write(paths.pid_file(), "4242").unwrap();
        assert!(last_failure(&paths).unwrap().contains("supervisor died"));
        record_failure(&paths, "file server for /w killed by signal 9");
        assert_eq!(
            last_failure(&paths).as_deref(),
            Some("file server for /w killed by signal 9")
        );
        clear(&paths);
        std::fs::remove_file(paths.pid_file()).unwrap();
        assert_eq!(last_failure(&paths), None);
    }

    #[test]
    fn statuses_in_words() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            describe(std::process::ExitStatus::from_raw(9)),
            "killed by signal 9"
        );
        assert_eq!(
            describe(std::process::ExitStatus::from_raw(1 << 8)),
            "exited with status 1"
        );
    }
}
