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

/// A QEMU release, as `qemu-system-x86_64 --version` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

impl QemuVersion {
    /// The oldest QEMU whose multi-threaded TCG was measured not to run
    /// stale translations of patched kernel text; 7.2 was measured to
    /// (docs/architecture.md, "TCG and kernel text patching").
    pub const TCG_TEXT_PATCHING_GOOD: QemuVersion = QemuVersion {
        major: 10,
        minor: 0,
        micro: 0,
    };

    /// Parses `QEMU emulator version 10.0.2 (Debian …)`.
    pub fn parse(text: &str) -> Option<QemuVersion> {
        let rest = text.split("QEMU emulator version ").nth(1)?;
        let version = rest.split_whitespace().next()?;
        let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
        Some(QemuVersion {
            major: parts.next()??,
            minor: parts.next()??,
            micro: parts.next().flatten().unwrap_or(0),
        })
    }

    /// The version of `qemu` (a path), if it runs and says one.
    pub fn of(qemu: &std::path::Path) -> Option<QemuVersion> {
        let out = std::process::Command::new(qemu)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        QemuVersion::parse(&String::from_utf8_lossy(&out.stdout))
    }
}

/// The warning for a QEMU older than [`QemuVersion::TCG_TEXT_PATCHING_GOOD`]
/// running a guest under TCG, or `None` when there is nothing to say.
pub fn tcg_warning(accel: Accel, version: Option<QemuVersion>) -> Option<String> {
    let v = version?;
    (accel == Accel::Tcg && v < QemuVersion::TCG_TEXT_PATCHING_GOOD).then(|| {
        format!(
            "QEMU {v} under TCG can run stale kernel text on a guest with several vCPUs and crash it \
             (Oops: int3) when Docker starts containers; QEMU {} or later does not: on Debian 12, \
             scripts/install-deps installs it from bookworm-backports",
            QemuVersion::TCG_TEXT_PATCHING_GOOD.major
        )
    })
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

#[cfg(test)]
mod version_tests {
    use super::*;

    #[test]
    fn qemu_versions_and_the_tcg_warning() {
        let v72 = QemuVersion::parse(
            "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright",
        )
        .unwrap();
        assert_eq!(v72.to_string(), "7.2.22");
        let v10 =
            QemuVersion::parse("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)").unwrap();
        assert!(v72 < v10 && v10 >= QemuVersion::TCG_TEXT_PATCHING_GOOD);
        assert_eq!(
            QemuVersion::parse("QEMU emulator version 9.1").map(|v| v.micro),
            Some(0)
        );
        assert_eq!(QemuVersion::parse("garbage"), None);
        assert!(tcg_warning(Accel::Tcg, Some(v72))
            .unwrap()
            .starts_with("QEMU 7.2.22 under TCG"));
        assert_eq!(tcg_warning(Accel::Tcg, Some(v10)), None);
        assert_eq!(tcg_warning(Accel::Kvm, Some(v72)), None);
        assert_eq!(tcg_warning(Accel::Tcg, None), None);
    }
}
