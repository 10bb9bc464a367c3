//! The one error type of this crate. Every variant says what failed and what to do.

use std::path::PathBuf;

/// Everything that can go wrong while building, loading or using an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {name:?} not found: run `sandpen image build` first")]
    NotFound { name: String },

    #[error(
        "invalid image name {name:?}: use letters, digits, '.', '_' or '-', \
         starting with a letter or digit (at most 64 characters)"
    )]
    InvalidName { name: String },

    #[error("invalid {field} {value:?} in the image spec: {reason}")]
    InvalidSpec {
        field: &'static str,
        value: String,
        reason: &'static str,
    },

    #[error("the {agent} agent cannot be installed: {reason}")]
    AgentUnavailable { agent: String, reason: String },

    #[error("`{tool}` not found in PATH: install the Debian package `{package}` (apt-get install {package})")]
    MissingTool { tool: String, package: String },

    #[error(
        "building an image needs root, because debootstrap does: run `sudo -E sandpen image build` \
         (an unprivileged build through mmdebstrap is not supported yet)"
    )]
    NotRoot,

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "`{tool}` failed ({status}): {hint}; full log: {}\n--- last lines ---\n{tail}",
        log.display(),
        hint = command_hint(tool)
    )]
    CommandFailed {
        tool: String,
        status: String,
        log: PathBuf,
        tail: String,
    },

    #[error(
        "{package}@{version} from {url} does not match its pinned integrity \
         (expected {expected}, got {got}): the download was altered or the pin is wrong; \
         nothing was installed"
    )]
    Integrity {
        package: String,
        version: String,
        url: String,
        expected: String,
        got: String,
    },

    #[error("an image named {name:?} exists already: pick another name, or remove it with `sandpen image rm {name}`")]
    Exists { name: String },

    #[error("{what} is still in the saved image after it was taken out; the image was not saved")]
    Scrub { what: String },

    #[error("dumpe2fs printed no block count, free blocks or block size for {}", path.display())]
    FsGeometry { path: PathBuf },

    #[error("kernel {}: {reason}", path.display())]
    Kernel { path: PathBuf, reason: String },

    #[error("boot module {module}: {reason}")]
    Module { module: String, reason: String },

    #[error("manifest {}: {source}; rebuild with `sandpen image build`", path.display())]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error(
        "{} still has mounts under it ({mounts}); unmount them (umount -R) and remove it by hand",
        dir.display()
    )]
    StillMounted { dir: PathBuf, mounts: String },

    #[error(
        "downloading {url} failed; the build needs HTTPS to {host} (allow it where this host's \
         network is filtered, or name a mirror with --add-host {host}:IP and --upstream-ca): {detail}"
    )]
    ReleaseDownload {
        url: String,
        host: String,
        detail: String,
    },

    #[error("the vendor's manifest {url} gives no archive to trust: {source}")]
    ReleaseManifest {
        url: String,
        #[source]
        source: crate::release::ManifestError,
    },

    #[error(
        "{url} is not what its vendor published: sha256 {got}, the manifest lists {expected}; \
         nothing was installed"
    )]
    ReleaseChecksum {
        url: String,
        expected: String,
        got: String,
    },
}

/// What to look at when a build command fails.
fn command_hint(tool: &str) -> &'static str {
    match tool {
        "debootstrap" => {
            "check the suite name, the mirror and the network \
             (debootstrap honours http_proxy when a proxy is needed)"
        }
        "mkfs.ext4" => "check the free space where images are kept",
        _ => "it ran inside the new rootfs; see its output below",
    }
}

impl ImageError {
    /// Wraps an I/O error with a sentence naming the file and the action.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Adds context to `io::Result` in one call.
pub(crate) trait IoContext<T> {
    /// Maps the error to [`ImageError::Io`] with a lazily built context.
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, ImageError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, ImageError> {
        self.map_err(|source| ImageError::io(context(), source))
    }
}
