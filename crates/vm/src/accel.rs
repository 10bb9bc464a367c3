//! Choosing between KVM and QEMU's software emulation (TCG).

use std::fmt;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::VmError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl FromStr for AccelChoice {
    type Err = VmError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            other => Err(VmError::Accel(format!(
                "unknown accelerator {other:?}: use auto, kvm or tcg"
            ))),
        }
    }
}

/// The accelerator picked, and why, in words for `sandpen doctor`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelDecision {
    pub accel: Accel,
    pub reason: String,
}

/// What the host offers, gathered once so the decision itself is pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmProbe {
    Missing,
    NoAccess(String),
    /// `/sys/module/kvm_pvm`: a nested paravirtual KVM that ordinary guest
    /// kernels crawl or fail under.
    Paravirtual,
    BadApi(String),
    Usable,
}

const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
const KVM_API_VERSION: libc::c_int = 12;

pub fn probe_kvm() -> KvmProbe {
    probe_kvm_at(Path::new("/dev/kvm"), Path::new("/sys/module/kvm_pvm"))
}

fn probe_kvm_at(dev: &Path, pvm_marker: &Path) -> KvmProbe {
    if !dev.exists() {
        return KvmProbe::Missing;
    }
    let file = match std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        Ok(f) => f,
        Err(e) => return KvmProbe::NoAccess(e.to_string()),
    };
    if pvm_marker.exists() {
        return KvmProbe::Paravirtual;
    }
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int; the
    // fd is a valid open /dev/kvm for the duration of the call.
    let version = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version != KVM_API_VERSION {
        return KvmProbe::BadApi(format!(
            "KVM API version {version}, expected {KVM_API_VERSION}"
        ));
    }
    KvmProbe::Usable
}

pub fn decide(choice: AccelChoice, probe: &KvmProbe) -> Result<AccelDecision, VmError> {
    let tcg = |why: String| AccelDecision {
        accel: Accel::Tcg,
        reason: why,
    };
    match (choice, probe) {
        (AccelChoice::Tcg, _) => Ok(tcg("TCG (software emulation) was asked for".into())),
        (AccelChoice::Kvm, KvmProbe::Usable) => Ok(AccelDecision {
            accel: Accel::Kvm,
            reason: "KVM was asked for and /dev/kvm is usable".into(),
        }),
        (AccelChoice::Kvm, KvmProbe::Paravirtual) => Ok(AccelDecision {
            accel: Accel::Kvm,
            reason: "KVM was asked for; note /dev/kvm is the nested paravirtual kvm_pvm, \
                     where ordinary guest kernels are very slow or fail"
                .into(),
        }),
        (AccelChoice::Kvm, other) => Err(VmError::Accel(format!(
            "KVM was asked for but is not usable: {}; use --accel tcg or fix /dev/kvm",
            describe(other)
        ))),
        (AccelChoice::Auto, KvmProbe::Usable) => Ok(AccelDecision {
            accel: Accel::Kvm,
            reason: "/dev/kvm is usable: hardware virtualization".into(),
        }),
        (AccelChoice::Auto, other) => Ok(tcg(format!(
            "{}; using TCG (software emulation): sandboxes work, but boot and run several times slower",
            describe(other)
        ))),
    }
}

fn describe(probe: &KvmProbe) -> String {
    match probe {
        KvmProbe::Missing => "/dev/kvm does not exist (no hardware virtualization, or the kvm module is not loaded)".into(),
        KvmProbe::NoAccess(e) => format!(
            "/dev/kvm cannot be opened ({e}); add your user to the kvm group: sudo usermod -aG kvm $USER, then log in again"
        ),
        KvmProbe::Paravirtual => "/dev/kvm is the nested paravirtual kvm_pvm (this host is itself a VM), under which ordinary guest kernels crawl or die".into(),
        KvmProbe::BadApi(e) => format!("/dev/kvm answers oddly: {e}"),
        KvmProbe::Usable => "/dev/kvm is usable".into(),
    }
}

/// `--accel` / `SANDPEN_ACCEL` resolved against this host.
pub fn choose_accel(choice: AccelChoice) -> Result<AccelDecision, VmError> {
    decide(choice, &probe_kvm())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_tcg_unless_kvm_is_really_usable() {
        for probe in [
            KvmProbe::Missing,
            KvmProbe::NoAccess("EACCES".into()),
            KvmProbe::Paravirtual,
            KvmProbe::BadApi("x".into()),
        ] {
            let d = decide(AccelChoice::Auto, &probe).unwrap();
            assert_eq!(d.accel, Accel::Tcg, "{probe:?}");
            assert!(d.reason.contains("TCG"));
        }
        assert_eq!(
            decide(AccelChoice::Auto, &KvmProbe::Usable).unwrap().accel,
            Accel::Kvm
        );
    }

    #[test]
    fn explicit_choices() {
        assert_eq!(
            decide(AccelChoice::Tcg, &KvmProbe::Usable).unwrap().accel,
            Accel::Tcg
        );
        let err = decide(AccelChoice::Kvm, &KvmProbe::Missing).unwrap_err();
        assert!(err.to_string().contains("--accel tcg"));
        let no_access = decide(AccelChoice::Kvm, &KvmProbe::NoAccess("denied".into()))
            .unwrap_err()
            .to_string();
        assert!(no_access.contains("kvm group"), "{no_access}");
        assert!("bogus".parse::<AccelChoice>().is_err());
    }

    #[test]
    fn probe_reads_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            probe_kvm_at(&dir.path().join("kvm"), &dir.path().join("pvm")),
            KvmProbe::Missing
        );
        let fake = dir.path().join("kvm");
        std::fs::write(&fake, b"").unwrap();
        std::fs::create_dir(dir.path().join("pvm")).unwrap();
        assert_eq!(
            probe_kvm_at(&fake, &dir.path().join("pvm")),
            KvmProbe::Paravirtual
        );
    }
}
