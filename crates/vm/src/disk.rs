//! A sandbox's disk: a qcow2 overlay over the image's read-only ext4.

use std::path::Path;
use std::process::Command;

use crate::{which, VmError};

/// Creates `overlay` backed by `base` (raw), with `virtual_gib` of room; the
/// guest grows its filesystem into it. Costs milliseconds, whatever the size.
pub fn create_overlay(base: &Path, overlay: &Path, virtual_gib: u32) -> Result<(), VmError> {
    let qemu_img = which("qemu-img").ok_or_else(|| VmError::MissingTool {
        tool: "qemu-img".into(),
        package: "qemu-utils".into(),
    })?;
    let base_size = std::fs::metadata(base)
        .map_err(|e| VmError::io(format!("reading {}", base.display()), e))?
        .len();
    let size = (u64::from(virtual_gib) << 30).max(base_size);
    let out = Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(overlay)
        .arg(size.to_string())
        .output()
        .map_err(|e| VmError::io("running qemu-img", e))?;
    if !out.status.success() {
        return Err(VmError::ToolFailed {
            tool: "qemu-img create".into(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_is_small_and_points_at_its_base() {
        if which("qemu-img").is_none() {
            eprintln!("qemu-img not installed; skipping");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let overlay = dir.path().join("disk.qcow2");
        create_overlay(&base, &overlay, 4).unwrap();
        assert!(std::fs::metadata(&overlay).unwrap().len() < 1 << 20);
        let info = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&overlay)
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["virtual-size"], 4u64 << 30);
        assert!(info["backing-filename"]
            .as_str()
            .unwrap()
            .ends_with("base.img"));
    }
}
