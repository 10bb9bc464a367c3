//! The host's toolchain cache (docs/dev-env.md, "The toolchain cache" and
//! "Shared toolchain trees").
//!
//! Two layers, both under `$XDG_STATE_HOME/sandpen/toolchains/`, mode 0700,
//! written only by host processes:
//!
//! - [`store`]: the vendors' downloads, kept by the egress proxy under their
//!   sha256 as they pass to a guest, and verified again on every use.
//! - [`tree`]: a cached archive unpacked once, and given to a sandbox as a
//!   read-only view that its guest mounts, so the second sandbox that needs
//!   a toolchain neither downloads nor unpacks it.
//!
//! [`usage`] lists both and takes them back (`sandpen cache`).
//!
//! A guest never writes either: it chooses which URL it asks for, never
//! what is kept for it.

pub mod store;
pub mod tree;
pub mod usage;

pub use store::{
    artifact_host, upstream_identity, ArtifactHost, Filling, Hit, ToolCache, ARTIFACT_HOSTS,
};
pub use tree::{archive_url, publish, Tree, TreeError, GUEST_VIEW};
