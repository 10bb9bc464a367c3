//! One sandbox's life.
//!
//! - [`sandbox`]: what a sandbox is, on disk (config, disk overlay, names).
//! - [`supervise`]: the detached supervisor process that owns QEMU and the file
//!   server for as long as the sandbox runs, and serves the control API.
//! - [`control`]: the control API, as the CLI uses it (status, exec, stop).
//! - [`lifecycle`]: starting a supervisor and waiting until the guest is ready.
//! - [`fileserver`]: the seam where the workspace file server plugs in.
//! - [`exit`]: why the last run failed, for `ls`.
//! - [`resources`]: the sandbox's cgroup, egress counters and disk state.
//! - [`ports`]: published ports (`-p`), carried to the guest over the channel.

pub mod confine;
pub mod control;
pub mod credentials;
pub mod egress;
pub mod exit;
pub mod fileserver;
pub mod jail;
pub mod lifecycle;
pub mod own;
pub mod paths;
pub mod ports;
pub mod resources;
pub mod sandbox;
pub mod supervise;
pub mod trust;

pub use paths::{Dirs, SandboxPaths};
pub use sandbox::SandboxConfig;

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("no sandbox named {0:?}; `sandpen ls` lists the sandboxes")]
    UnknownSandbox(String),
    #[error("sandbox {0} is not running; start it with `sandpen start {0}`")]
    NotRunning(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Image(#[from] sandpen_image::ImageError),
    #[error(transparent)]
    Vm(#[from] sandpen_vm::VmError),
    #[error(transparent)]
    Proto(#[from] sandpen_proto::ProtoError),
    #[error("{0}")]
    Boot(String),
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    /// A published port (`-p`) cannot be bound.
    #[error(transparent)]
    Publish(#[from] crate::ports::BindError),
    /// `--require-jail`, and a layer is missing.
    #[error("{0}; the sandbox requires the whole jail (--require-jail)")]
    JailIncomplete(String),
    /// A share holds sandpen's own files (or lies inside them).
    #[error(
        "cannot share {}: it overlaps sandpen's {what} {} (the guest could read sandpen's secrets \
         and rewrite its policy); run sandpen in a project folder, or move that folder with {var}",
        share.display(), folder.display()
    )]
    OwnFiles {
        share: std::path::PathBuf,
        what: &'static str,
        folder: std::path::PathBuf,
        var: &'static str,
    },
}

impl SupervisorError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        SupervisorError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Finds `sandpen-guest`, the static binary that becomes the VM's PID 1:
/// `$SANDPEN_GUEST_BIN`, next to this executable, in the cargo target folder
/// beside it (a development build), or under `/usr/lib/sandpen`.
pub fn guest_binary() -> Result<std::path::PathBuf, SupervisorError> {
    if let Some(p) = std::env::var_os("SANDPEN_GUEST_BIN") {
        let p = std::path::PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        return Err(SupervisorError::Invalid(format!(
            "SANDPEN_GUEST_BIN={} does not exist",
            p.display()
        )));
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("sandpen-guest"));
            // A development tree: target/{debug,release}[/deps]/X ->
            // target/x86_64-unknown-linux-gnu/release/sandpen-guest
            for target in dir.ancestors().skip(1).take(2) {
                for profile in ["release", "debug"] {
                    candidates.push(
                        target
                            .join("x86_64-unknown-linux-gnu")
                            .join(profile)
                            .join("sandpen-guest"),
                    );
                }
            }
        }
    }
    candidates.push("/usr/local/lib/sandpen/sandpen-guest".into());
    candidates.push("/usr/lib/sandpen/sandpen-guest".into());
    // A development tree also has a dynamically linked host build of the guest
    // (from `cargo build`/`cargo test`); only a static one can be the VM's init.
    candidates
        .into_iter()
        .find(|p| p.is_file() && sandpen_image::check_static(p).is_ok())
        .ok_or_else(|| {
            SupervisorError::Invalid(
                "a static sandpen-guest (the VM's init) was not found next to sandpen; \
                 build it with scripts/build, or set SANDPEN_GUEST_BIN"
                    .into(),
            )
        })
}
