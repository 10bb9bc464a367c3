//! What an image is built from, and the cache key over it.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use sandpen_agents::{Agent, Install, AGENT_APT_PACKAGES};

use crate::error::ImageError;
use crate::modules::BOOT_MODULES;

/// Bump when the build recipe changes in a way the inputs below do not show, so
/// that existing images are rebuilt.
pub const RECIPE_VERSION: u32 = 2;

/// The Debian suite images are built from unless told otherwise.
pub const DEFAULT_SUITE: &str = "trixie";

/// The mirror used when the host names none.
pub const FALLBACK_MIRROR: &str = "http://deb.debian.org/debian";

/// Packages every image gets, on top of debootstrap's minbase.
pub const BASE_PACKAGES: &[&str] = &[
    "linux-image-cloud-amd64",
    "ca-certificates",
    "sudo",
    "iproute2",
    "nftables",
    "kmod",
    "procps",
    "curl",
    "git",
    "less",
    "openssl",
    "bash-completion",
    "e2fsprogs",
    // dig and nc: what users (and the egress tests) reach for to see what the
    // network lets through.
    "bind9-dnsutils",
    "netcat-openbsd",
];

/// Where the host keeps locally added CA certificates, and where the rootfs gets them.
pub const HOST_CA_DIR: &str = "/usr/local/share/ca-certificates";

const HOST_DEBIAN_SOURCES: &str = "/etc/apt/sources.list.d/debian.sources";

/// The inputs of a build. Their hash, [`ImageSpec::key`], is the cache key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSpec {
    /// Image name, also the directory name under the images root ("default").
    pub name: String,
    /// Debian suite ("trixie").
    pub suite: String,
    /// Debian mirror URL for debootstrap and the image's apt sources.
    pub mirror: String,
    /// Extra packages passed to debootstrap's `--include`.
    pub packages: Vec<String>,
    /// CA certificates (PEM, `.crt`) to trust inside the image, e.g. for a
    /// TLS-intercepting proxy between the build and the internet.
    pub extra_ca_certs: Vec<PathBuf>,
    /// Agents to install (names from `sandpen_agents::AGENTS`). Any agent makes
    /// it an agent image: [`sandpen_agents::AGENT_APT_PACKAGES`] plus each
    /// agent's npm package.
    #[serde(default)]
    pub agents: Vec<String>,
    /// `HOST:IP`: where the downloads of vendor releases ([`Install::Release`])
    /// connect for HOST, as `run --add-host` does for a sandbox's egress: a
    /// mirror standing in for the vendor. TLS still checks HOST's name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add_hosts: Vec<String>,
    /// CA certificates (PEM) trusted for those downloads as well as the
    /// system's, as `run --upstream-ca`; never installed in the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstream_cas: Vec<PathBuf>,
}

impl ImageSpec {
    /// The spec for `name` on this host: trixie, the host's Debian mirror, and the
    /// host's extra CA certificates.
    pub fn default_for(name: &str) -> ImageSpec {
        ImageSpec {
            name: name.to_string(),
            suite: DEFAULT_SUITE.to_string(),
            mirror: host_mirror(),
            packages: Vec::new(),
            extra_ca_certs: find_ca_certs(Path::new(HOST_CA_DIR)),
            agents: Vec::new(),
            add_hosts: Vec::new(),
            upstream_cas: Vec::new(),
        }
    }

    /// The spec of an agent image on this host: [`ImageSpec::default_for`]
    /// plus `agents`.
    pub fn for_agents(name: &str, agents: &[&str]) -> ImageSpec {
        let mut spec = ImageSpec::default_for(name);
        spec.agents = agents.iter().map(|a| a.to_string()).collect();
        spec
    }

    /// sha256 (hex) over a canonical form of every input: the fields above (package
    /// order and duplicates do not matter), the CA files' names and contents, the
    /// base packages, the boot modules and [`RECIPE_VERSION`]. An unreadable CA file
    /// gives a key of its own; the build then fails on it with a clear error.
    pub fn key(&self) -> String {
        #[derive(Serialize)]
        struct KeyInput<'a> {
            recipe_version: u32,
            name: &'a str,
            suite: &'a str,
            mirror: &'a str,
            base_packages: &'a [&'a str],
            packages: Vec<&'a str>,
            boot_modules: &'a [&'a str],
            ca_certs: Vec<(String, String)>,
            /// The tool manager every image carries (docs/dev-env.md).
            mise: (&'a str, &'a str),
            // Absent for images without agents, so their keys stay what they were.
            #[serde(skip_serializing_if = "Vec::is_empty")]
            agents: Vec<AgentKey<'a>>,
            /// Where releases were fetched from, when not the vendor: a mirror
            /// can send other bytes (absent otherwise, keys unchanged).
            #[serde(skip_serializing_if = "Vec::is_empty")]
            release_sources: Vec<String>,
        }
        #[derive(Serialize)]
        struct AgentKey<'a> {
            name: &'a str,
            npm: &'a str,
            trim: &'a [&'a str],
            #[serde(skip_serializing_if = "Option::is_none")]
            release: Option<String>,
        }
        let ca_certs = self.ca_cert_digests();
        let input = KeyInput {
            recipe_version: RECIPE_VERSION,
            name: &self.name,
            suite: &self.suite,
            mirror: self.mirror.trim_end_matches('/'),
            base_packages: BASE_PACKAGES,
            packages: self.extra_packages(),
            boot_modules: BOOT_MODULES,
            ca_certs,
            mise: (sandpen_agents::MISE.version, sandpen_agents::MISE.integrity),
            agents: self
                .agents()
                .iter()
                .map(|agent| match agent.install {
                    Install::Npm { package, trim } => AgentKey {
                        name: agent.name,
                        npm: package,
                        trim,
                        release: None,
                    },
                    Install::Release(release) => AgentKey {
                        name: agent.name,
                        npm: "",
                        trim: &[],
                        release: Some(release.archive_url()),
                    },
                    Install::Unavailable { .. } => AgentKey {
                        name: agent.name,
                        npm: "",
                        trim: &[],
                        release: None,
                    },
                })
                .collect(),
            release_sources: self
                .add_hosts
                .iter()
                .cloned()
                .chain(self.upstream_cas.iter().map(|p| {
                    let digest = fs::read(p)
                        .map(|b| hex::encode(Sha256::digest(&b)))
                        .unwrap_or_else(|e| format!("unreadable: {:?}", e.kind()));
                    format!("ca {digest}")
                }))
                .collect(),
        };
        // Serializing plain strings and numbers cannot fail.
        let canonical = serde_json::to_vec(&input).unwrap_or_default();
        hex::encode(Sha256::digest(&canonical))
    }

    /// (destination name, sha256 of the content) of each extra CA certificate,
    /// sorted. An unreadable file gets a digest of its own.
    pub(crate) fn ca_cert_digests(&self) -> Vec<(String, String)> {
        let mut ca_certs: Vec<(String, String)> = self
            .extra_ca_certs
            .iter()
            .map(|path| {
                let content = match fs::read(path) {
                    Ok(bytes) => hex::encode(Sha256::digest(&bytes)),
                    Err(e) => format!("unreadable: {:?}", e.kind()),
                };
                (ca_dest_name(path), content)
            })
            .collect();
        ca_certs.sort();
        ca_certs
    }

    /// Checks the fields that become debootstrap arguments, so none can pass for
    /// an option or split the `--include` list.
    pub fn validate(&self) -> Result<(), ImageError> {
        let invalid = |field, value: &str, reason| ImageError::InvalidSpec {
            field,
            value: value.to_string(),
            reason,
        };
        let suite_ok = !self.suite.is_empty()
            && self.suite.as_bytes()[0].is_ascii_alphanumeric()
            && self
                .suite
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !suite_ok {
            return Err(invalid(
                "suite",
                &self.suite,
                "use a Debian suite name such as trixie",
            ));
        }
        let mirror_ok = ["http://", "https://", "file:/"]
            .iter()
            .any(|scheme| self.mirror.starts_with(scheme))
            && !self.mirror.chars().any(char::is_whitespace);
        if !mirror_ok {
            return Err(invalid(
                "mirror",
                &self.mirror,
                "use an http://, https:// or file:/ URL such as http://deb.debian.org/debian",
            ));
        }
        for package in &self.packages {
            let name = package.trim();
            // Debian policy: lower case letters, digits, + - . ; at least two characters.
            let ok = name.len() >= 2
                && name.as_bytes()[0].is_ascii_alphanumeric()
                && name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.')
                });
            if !ok {
                return Err(invalid("package", package, "not a Debian package name"));
            }
        }
        for pair in &self.add_hosts {
            let ok = pair.split_once(':').is_some_and(|(host, ip)| {
                host.as_bytes()
                    .first()
                    .is_some_and(u8::is_ascii_alphanumeric)
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'))
                    && ip.parse::<std::net::IpAddr>().is_ok()
            });
            if !ok {
                return Err(invalid(
                    "add-host",
                    pair,
                    "use HOST:IP, such as mirror.example:10.0.0.5",
                ));
            }
        }
        for name in &self.agents {
            match sandpen_agents::find(name) {
                None => {
                    return Err(invalid(
                        "agent",
                        name,
                        "not an agent sandpen knows (claude, codex, gemini, opencode, kiro)",
                    ))
                }
                Some(agent) => {
                    if let Install::Unavailable { reason } = agent.install {
                        return Err(ImageError::AgentUnavailable {
                            agent: agent.name.to_string(),
                            reason: reason.to_string(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// The agents of the spec, sorted, each once (unknown names are left to
    /// [`ImageSpec::validate`]).
    pub fn agents(&self) -> Vec<&'static Agent> {
        let mut agents: Vec<&'static Agent> = self
            .agents
            .iter()
            .filter_map(|name| sandpen_agents::find(name.trim()))
            .collect();
        agents.sort_by_key(|a| a.name);
        agents.dedup_by_key(|a| a.name);
        agents
    }

    /// Whether this is an agent image.
    pub fn has_agents(&self) -> bool {
        !self.agents.is_empty()
    }

    /// `spec.packages` (plus the agent packages for an agent image) trimmed,
    /// sorted, without duplicates or base packages.
    pub(crate) fn extra_packages(&self) -> Vec<&str> {
        let agent_packages: &[&str] = if self.has_agents() {
            AGENT_APT_PACKAGES
        } else {
            &[]
        };
        let mut packages: Vec<&str> = self
            .packages
            .iter()
            .map(|p| p.trim())
            .chain(agent_packages.iter().copied())
            .filter(|p| !p.is_empty() && !BASE_PACKAGES.contains(p))
            .collect();
        packages.sort_unstable();
        packages.dedup();
        packages
    }

    /// Every package passed to `--include`: base first, then the extras.
    pub fn all_packages(&self) -> Vec<String> {
        BASE_PACKAGES
            .iter()
            .copied()
            .chain(self.extra_packages())
            .map(str::to_string)
            .collect()
    }
}

/// The file name a CA certificate gets under the rootfs's `HOST_CA_DIR`: its path
/// below the host's `HOST_CA_DIR` when it is there, else its file name; always `.crt`,
/// which `update-ca-certificates` requires.
pub(crate) fn ca_dest_name(path: &Path) -> String {
    let rel = path
        .strip_prefix(HOST_CA_DIR)
        .ok()
        .filter(|rel| !rel.as_os_str().is_empty())
        .map(|rel| rel.to_string_lossy().into_owned())
        .or_else(|| path.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "extra".to_string());
    if rel.ends_with(".crt") {
        rel
    } else {
        format!("{rel}.crt")
    }
}

/// The host's Debian mirror, or [`FALLBACK_MIRROR`].
fn host_mirror() -> String {
    fs::read_to_string(HOST_DEBIAN_SOURCES)
        .ok()
        .and_then(|text| mirror_from_sources(&text))
        .unwrap_or_else(|| FALLBACK_MIRROR.to_string())
}

/// The first http(s) URI of the first `URIs:` line of a deb822 sources file.
pub(crate) fn mirror_from_sources(text: &str) -> Option<String> {
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(|line| {
            let (field, value) = line.split_once(':')?;
            field.trim().eq_ignore_ascii_case("URIs").then_some(value)
        })
        .flat_map(str::split_whitespace)
        .find(|uri| uri.starts_with("http://") || uri.starts_with("https://"))
        .map(|uri| uri.trim_end_matches('/').to_string())
}

/// `*.crt` files under `dir`, recursively, following symlinks as
/// `update-ca-certificates` does, sorted.
pub(crate) fn find_ca_certs(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut dirs_visited = 0;
    while let Some(dir) = stack.pop() {
        dirs_visited += 1;
        if dirs_visited > 10_000 {
            break; // a symlink loop; what we have is enough
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match fs::metadata(&path) {
                Ok(meta) if meta.is_dir() => stack.push(path),
                Ok(meta) if meta.is_file() && path.extension().is_some_and(|e| e == "crt") => {
                    found.push(path)
                }
                _ => {}
            }
        }
    }
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ImageSpec {
        ImageSpec {
            name: "default".into(),
            suite: "trixie".into(),
            mirror: "http://deb.debian.org/debian".into(),
            packages: vec!["nodejs".into(), "npm".into()],
            extra_ca_certs: Vec::new(),
            agents: Vec::new(),
            add_hosts: Vec::new(),
            upstream_cas: Vec::new(),
        }
    }

    #[test]
    fn a_release_mirror_changes_the_key_and_must_be_host_ip() {
        let mut kiro = spec();
        kiro.agents = vec!["kiro".into()];
        let mut mirrored = kiro.clone();
        mirrored.add_hosts = vec!["desktop-release.q.us-east-1.amazonaws.com:127.0.0.9".into()];
        assert_ne!(kiro.key(), mirrored.key());
        assert_ne!(spec().key(), kiro.key());
        mirrored.validate().unwrap();
        for bad in [
            "host",
            "host:not-an-ip",
            "-o:1.2.3.4",
            "a b:1.2.3.4",
            ":1.2.3.4",
        ] {
            mirrored.add_hosts = vec![bad.into()];
            assert!(mirrored.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn key_is_stable_hex() {
        let key = spec().key();
        assert_eq!(key.len(), 64);
        assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(key, spec().key());
    }

    #[test]
    fn key_ignores_package_order_duplicates_and_trailing_slash() {
        let mut other = spec();
        other.packages = vec!["npm".into(), "nodejs".into(), "npm".into(), "curl".into()];
        other.mirror.push('/');
        assert_eq!(spec().key(), other.key());
    }

    #[test]
    fn key_changes_with_each_input() {
        let base = spec().key();
        let mut s = spec();
        s.name = "agents".into();
        assert_ne!(s.key(), base);
        let mut s = spec();
        s.suite = "forky".into();
        assert_ne!(s.key(), base);
        let mut s = spec();
        s.mirror = "http://mirror.example/debian".into();
        assert_ne!(s.key(), base);
        let mut s = spec();
        s.packages.push("docker.io".into());
        assert_ne!(s.key(), base);
    }

    #[test]
    fn key_follows_ca_file_content() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("corp.crt");
        fs::write(&ca, "one").unwrap();
        let mut s = spec();
        s.extra_ca_certs = vec![ca.clone()];
        let first = s.key();
        assert_ne!(first, spec().key());
        fs::write(&ca, "two").unwrap();
        let second = s.key();
        assert_ne!(first, second);
        fs::remove_file(&ca).unwrap();
        assert_ne!(s.key(), second);
    }

    #[test]
    fn mirror_comes_from_first_http_uri() {
        let text = "Types: deb\n# URIs: http://commented.example/\nURIs: http://deb.debian.org/debian/ http://other\n\
                    Suites: bookworm\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\n";
        assert_eq!(
            mirror_from_sources(text).as_deref(),
            Some("http://deb.debian.org/debian")
        );
        assert_eq!(mirror_from_sources("URIs: cdrom:/x file:/y\n"), None);
        assert_eq!(mirror_from_sources(""), None);
    }

    #[test]
    fn ca_names_keep_subdirs_and_end_in_crt() {
        assert_eq!(
            ca_dest_name(Path::new("/usr/local/share/ca-certificates/corp/a.crt")),
            "corp/a.crt"
        );
        assert_eq!(
            ca_dest_name(Path::new("/home/u/proxy.pem")),
            "proxy.pem.crt"
        );
    }

    #[test]
    fn finds_crt_files_recursively() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("b.crt"), "x").unwrap();
        fs::write(dir.path().join("sub/a.crt"), "x").unwrap();
        fs::write(dir.path().join("readme.txt"), "x").unwrap();
        let found = find_ca_certs(dir.path());
        assert_eq!(
            found,
            vec![dir.path().join("b.crt"), dir.path().join("sub/a.crt")]
        );
        assert!(find_ca_certs(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn validate_refuses_what_could_become_an_option() {
        assert!(spec().validate().is_ok());
        assert!(ImageSpec::default_for("x").validate().is_ok());
        let mut s = spec();
        s.suite = "--foreign".into();
        assert!(s.validate().unwrap_err().to_string().contains("suite"));
        let mut s = spec();
        s.mirror = "ftp://x".into();
        assert!(s.validate().unwrap_err().to_string().contains("mirror"));
        let mut s = spec();
        s.packages = vec!["vim,evil".into()];
        assert!(s.validate().unwrap_err().to_string().contains("vim,evil"));
        let mut s = spec();
        s.packages = vec!["g++".into(), "libstdc++6".into(), " nodejs ".into()];
        assert!(s.validate().is_ok());
    }

    #[test]
    fn agents_change_the_key_and_bring_the_agent_packages() {
        let plain = spec();
        let mut claude = spec();
        claude.agents = vec!["claude".into()];
        assert_ne!(plain.key(), claude.key());
        let mut both = spec();
        both.agents = vec!["codex".into(), "claude".into(), "codex".into()];
        let names: Vec<&str> = both.agents().iter().map(|a| a.name).collect();
        assert_eq!(names, ["claude", "codex"]);
        assert!(claude.all_packages().iter().any(|p| p == "docker.io"));
        assert!(!plain.all_packages().iter().any(|p| p == "docker.io"));
    }

    #[test]
    fn validate_refuses_unknown_and_uninstallable_agents() {
        let mut s = spec();
        s.agents = vec!["claude".into()];
        assert!(s.validate().is_ok());
        s.agents = vec!["nope".into()];
        assert!(s.validate().unwrap_err().to_string().contains("nope"));
        s.agents = vec!["kiro".into()];
        assert!(s.validate().is_ok(), "kiro comes as its vendor's release");
    }

    #[test]
    fn all_packages_puts_base_first() {
        let all = spec().all_packages();
        assert_eq!(all[0], "linux-image-cloud-amd64");
        assert_eq!(&all[all.len() - 2..], ["nodejs", "npm"]);
    }
}
