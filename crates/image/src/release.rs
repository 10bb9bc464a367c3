//! Vendor releases ([`sandpen_agents::Release`]): which archive the vendor's
//! manifest lists, and whether the bytes fetched are the ones it lists.
//!
//! Guarantee: an archive is unpacked into an image only when its sha256 is
//! the one the vendor's own manifest for the pinned version publishes, and
//! that manifest is the pinned version's. Both come over HTTPS from the
//! vendor's host (or a mirror the user named with `--add-host`, whose
//! certificate must still be valid for the vendor's name). Everything in
//! the manifest is untrusted input: only its `version` and the listed
//! archive's `sha256` are used, and only after their shape is checked.

use sandpen_agents::Release;
use serde_json::Value;

/// Why a vendor manifest gives no archive to trust.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("it is not JSON: {0}")]
    NotJson(String),
    #[error("it is for version {found}, not the pinned {pinned}")]
    OtherVersion { found: String, pinned: String },
    #[error("it lists no {os} {arch} {kind} archive (glibc)")]
    NotListed {
        os: &'static str,
        arch: &'static str,
        kind: &'static str,
    },
    #[error("it lists {0} {os} {arch} {kind} archives and none is named {file}", os = .1, arch = .2, kind = .3, file = .4)]
    Ambiguous(usize, &'static str, &'static str, &'static str, String),
    #[error("its sha256 for the archive is not 64 hex digits: {0:?}")]
    BadDigest(String),
}

/// The sha256 (lower-case hex) the vendor's manifest `text` lists for
/// `release`'s archive.
pub fn listed_sha256(release: &Release, text: &str) -> Result<String, ManifestError> {
    let doc: Value =
        serde_json::from_str(text).map_err(|e| ManifestError::NotJson(e.to_string()))?;
    let found = doc["version"].as_str().unwrap_or("(none)");
    if found != release.version {
        return Err(ManifestError::OtherVersion {
            found: found.chars().take(40).collect(),
            pinned: release.version.into(),
        });
    }
    let (os, arch, kind) = release.listing;
    let file = release
        .archive_path
        .rsplit('/')
        .next()
        .unwrap_or(release.archive_path)
        .to_string();
    let listed: &[Value] = doc["packages"].as_array().map_or(&[], |p| p.as_slice());
    let candidates: Vec<&Value> = listed
        .iter()
        .filter(|p| {
            p["os"] == os
                && p["architecture"] == arch
                && p["fileType"] == kind
                && !p["targetTriple"].as_str().unwrap_or("").contains("musl")
        })
        .collect();
    let names_file = |p: &Value| {
        ["download", "path", "url", "fileName"].iter().any(|k| {
            p[*k]
                .as_str()
                .is_some_and(|v| v.rsplit('/').next() == Some(&file))
        })
    };
    let chosen = match candidates.as_slice() {
        [] => return Err(ManifestError::NotListed { os, arch, kind }),
        [one] => *one,
        many => {
            let named: Vec<&Value> = many.iter().copied().filter(|p| names_file(p)).collect();
            let headless: Vec<&Value> = many
                .iter()
                .copied()
                .filter(|p| p["variant"] == "headless")
                .collect();
            match (named.as_slice(), headless.as_slice()) {
                ([one], _) => *one,
                ([], [one]) => *one,
                _ => return Err(ManifestError::Ambiguous(many.len(), os, arch, kind, file)),
            }
        }
    };
    let digest = chosen["sha256"].as_str().unwrap_or("");
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ManifestError::BadDigest(digest.chars().take(80).collect()));
    }
    Ok(digest.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandpen_agents::KIRO_RELEASE;

    fn manifest(version: &str, packages: &str) -> String {
        format!(r#"{{"version": "{version}", "packages": [{packages}]}}"#)
    }

    const LINUX: &str = r#"{"os": "linux", "architecture": "x86_64", "fileType": "tarGz", "variant": "headless", "targetTriple": "x86_64-unknown-linux-gnu", "sha256": "AB12000000000000000000000000000000000000000000000000000000000000"}"#;
    const MUSL: &str = r#"{"os": "linux", "architecture": "x86_64", "fileType": "tarGz", "variant": "headless", "targetTriple": "x86_64-unknown-linux-musl", "sha256": "cd34000000000000000000000000000000000000000000000000000000000000"}"#;
    const DMG: &str = r#"{"os": "macos", "architecture": "universal", "fileType": "dmg", "sha256": "ef56000000000000000000000000000000000000000000000000000000000000"}"#;

    #[test]
    fn picks_the_glibc_archive_of_the_pinned_version() {
        let text = manifest("2.13.0", &[DMG, MUSL, LINUX].join(","));
        assert_eq!(
            listed_sha256(&KIRO_RELEASE, &text).unwrap(),
            "ab12000000000000000000000000000000000000000000000000000000000000"
        );
    }

    #[test]
    fn refuses_what_it_cannot_trust() {
        let other = manifest("2.14.0", LINUX);
        assert!(matches!(
            listed_sha256(&KIRO_RELEASE, &other),
            Err(ManifestError::OtherVersion { .. })
        ));
        let none = manifest("2.13.0", &[DMG, MUSL].join(","));
        assert!(matches!(
            listed_sha256(&KIRO_RELEASE, &none),
            Err(ManifestError::NotListed { .. })
        ));
        let two = manifest(
            "2.13.0",
            &[LINUX, &LINUX.replace("headless", "full")].join(","),
        );
        assert_eq!(
            listed_sha256(&KIRO_RELEASE, &two).unwrap(),
            "ab12000000000000000000000000000000000000000000000000000000000000"
        );
        let ambiguous = manifest("2.13.0", &[LINUX, LINUX].join(","));
        assert!(matches!(
            listed_sha256(&KIRO_RELEASE, &ambiguous),
            Err(ManifestError::Ambiguous(2, ..))
        ));
        let short = manifest("2.13.0", &LINUX.replace("AB12", "AB1"));
        assert!(matches!(
            listed_sha256(&KIRO_RELEASE, &short),
            Err(ManifestError::BadDigest(_))
        ));
        let injected = manifest("2.13.0", &LINUX.replace("AB12", "$(i"));
        assert!(listed_sha256(&KIRO_RELEASE, &injected).is_err());
        assert!(matches!(
            listed_sha256(&KIRO_RELEASE, "<html>"),
            Err(ManifestError::NotJson(_))
        ));
    }
}
