//! Flow labels (docs/files.md#flow-labels): what a sandbox carries, and the
//! reset that clears them.

use sandpen_policy::{FlowLabels, LabelStore};
use sandpen_supervisor::{sandbox, Dirs};

use crate::ApiError;

pub fn show(dirs: &Dirs, name: &str) -> Result<FlowLabels, ApiError> {
    sandbox::load(dirs, name)?;
    Ok(LabelStore::in_dir(&dirs.sandbox(name).dir).load()?)
}

/// Clears every label; returns the labels that were set.
pub fn reset(dirs: &Dirs, name: &str) -> Result<FlowLabels, ApiError> {
    sandbox::load(dirs, name)?;
    Ok(LabelStore::in_dir(&dirs.sandbox(name).dir).reset()?)
}
