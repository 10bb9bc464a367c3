//! The operations that `sandpen`'s commands and the local web page
//! (`sandpen ui`, [`http`]) share, so that the two cannot drift: each takes
//! typed input, does the work through the supervisor, policy, credential and
//! proxy crates, and returns a typed value. Printing is the caller's.
//!
//! - [`sandboxes`]: list, create (with the image build on first use), start,
//!   stop, rm, and the exec request a terminal sends.
//! - [`devcontainer`]: the steps after a start (postCreateCommand,
//!   postStartCommand, notes), for the CLI's start and the page's.
//! - [`policy`]: the rules in force, add, remove, check, preset, the file rules.
//! - [`decisions`]: ask mode: what waits, and the user's answers.
//! - [`suggest`]: rules proposed from what a sandbox did, and applying them.
//! - [`secrets`]: set (values go in), list (names only), remove.
//! - [`flow`]: the flow labels, and their reset.
//! - [`logs`]: the network and file logs, read whole or followed.
//! - [`progress`]: the image build's progress lines, as the CLI draws them.
//! - [`provision`]: the workspace's toolchains, provisioned at a start.
//!
//! Guarantees: no function here returns a secret's value, or any part of
//! one (see docs/credentials.md); text that comes from the guest (hosts,
//! paths in the logs) is returned as it is, and is escaped by whoever shows
//! it (the CLI for a terminal, the page for HTML).

pub mod decisions;
pub mod devcontainer;
pub mod error;
pub mod flow;
pub mod http;
pub mod logs;
pub mod policy;
pub mod progress;
pub mod provision;
pub mod sandboxes;
pub mod secrets;
pub mod suggest;

pub use error::ApiError;
