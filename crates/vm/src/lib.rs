//! The VMM side of a sandbox: which accelerator to use, the QEMU command line,
//! the copy-on-write disk, and a small QMP client.
//!
//! QEMU (from the distribution) is the VMM. It runs with its own seccomp sandbox
//! on, with no network device: the guest's only ways out are the virtio-serial
//! channel and the vhost-user-fs shares, both served by sandpen.

pub mod accel;
pub mod disk;
pub mod qemu;
pub mod qmp;

pub use accel::{choose_accel, Accel, AccelChoice, AccelDecision};
pub use qemu::{Console, FsShare, Socket, VmConfig};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    Accel(String),
    #[error("{tool} was not found; install the Debian package {package}")]
    MissingTool { tool: String, package: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed: {message}")]
    ToolFailed { tool: String, message: String },
    #[error("QMP: {0}")]
    Qmp(String),
}

impl VmError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        VmError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Finds an executable on `PATH`.
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}
