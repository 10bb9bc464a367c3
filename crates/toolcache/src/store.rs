//! The blob store (docs/dev-env.md, "The toolchain cache").
//!
//! What is guaranteed:
//!
//! - **Only the proxy writes it**, with what an upstream sent over TLS that
//!   the proxy verified itself (platform roots plus `--upstream-ca`). No
//!   guest byte is ever stored: a guest chooses which URL it asks for, never
//!   what is kept for it. The folder is the host user's, mode 0700, and no
//!   sandbox shares or mounts it.
//! - **Content-addressed**: a body is kept as `blobs/SHA256` (the sha256 of
//!   the bytes the proxy received, computed as they passed); the index
//!   entry `index/KEY.json` names the hash. A body is only kept when it
//!   arrived whole (a `200` with its `Content-Length`, no `Content-Encoding`,
//!   for a `GET` without `Range` or conditions). Files appear by rename, so
//!   a reader never sees half of one.
//! - **Verified on every use**: a hit is read and hashed before its first
//!   byte is sent; a blob whose bytes no longer match its name (disk error,
//!   a local process) is removed and the request goes upstream.
//! - **Keyed by URL and by upstream trust**: the key is the sha256 of the
//!   URL (with its port when not 443) and of the sandbox's upstream identity (its `--add-host` overrides
//!   and `--upstream-ca` files, empty for a sandbox with neither), so a
//!   sandbox pointed at a mirror of its own never fills the cache of a
//!   sandbox that talks to the vendor.
//! - **Only versioned artifacts** ([`ARTIFACT_HOSTS`]): `/dist/v22.11.0/…`
//!   on nodejs.org, never `index.json`, which changes with every release.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A host whose versioned downloads are cached, and which of its paths are
/// such downloads.
pub struct ArtifactHost {
    pub host: &'static str,
    /// The toolchain it serves.
    pub tool: &'static str,
    /// Whether a path (without its query) names an immutable artifact.
    pub artifact: fn(&str) -> bool,
}

/// `/dist/v22.11.0/node-v22.11.0-linux-x64.tar.gz`, `…/SHASUMS256.txt`.
fn node_artifact(path: &str) -> bool {
    path.strip_prefix("/dist/v")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(version, file)| {
            version.starts_with(|c: char| c.is_ascii_digit())
                && version.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                && !file.is_empty()
        })
}

/// `/dist/2025-06-26/rust-1.88.0-x86_64-unknown-linux-gnu.tar.xz`: the
/// dated folders; the channel manifests at `/dist/channel-*` move.
fn rust_artifact(path: &str) -> bool {
    path.strip_prefix("/dist/")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(date, file)| {
            date.len() == 10
                && date.bytes().enumerate().all(|(i, b)| {
                    if i == 4 || i == 7 {
                        b == b'-'
                    } else {
                        b.is_ascii_digit()
                    }
                })
                && !file.is_empty()
        })
}

/// `/go/go1.24.4.linux-amd64.tar.gz`.
fn go_artifact(path: &str) -> bool {
    path.strip_prefix("/go/go")
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()) && !rest.contains('/'))
}

/// The hosts whose downloads are cached; each is in the `balanced` preset.
pub const ARTIFACT_HOSTS: &[ArtifactHost] = &[
    ArtifactHost {
        host: "nodejs.org",
        tool: "node",
        artifact: node_artifact,
    },
    ArtifactHost {
        host: "static.rust-lang.org",
        tool: "rust",
        artifact: rust_artifact,
    },
    ArtifactHost {
        host: "dl.google.com",
        tool: "go",
        artifact: go_artifact,
    },
];

/// The artifact host `host` is, if any (exact name, any case).
pub fn artifact_host(host: &str) -> Option<&'static ArtifactHost> {
    ARTIFACT_HOSTS
        .iter()
        .find(|h| h.host.eq_ignore_ascii_case(host.trim_end_matches('.')))
}

/// One index entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub(crate) url: String,
    pub(crate) sha256: String,
    pub(crate) size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
}

/// The cache, as one sandbox's proxy uses it.
#[derive(Debug, Clone)]
pub struct ToolCache {
    dir: PathBuf,
    /// Who the sandbox trusts upstream (see the module docs).
    identity: String,
}

/// A verified cached body, ready to be sent.
pub struct Hit {
    pub file: File,
    pub size: u64,
    pub sha256: String,
    pub content_type: Option<String>,
}

impl ToolCache {
    /// The cache in `dir` (made, mode 0700, with its three folders), for a
    /// sandbox whose upstream identity is `identity`.
    pub fn open(dir: &Path, identity: &str) -> io::Result<ToolCache> {
        for sub in ["", "blobs", "index", "tmp"] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir.join(sub))?;
        }
        Ok(ToolCache {
            dir: dir.to_path_buf(),
            identity: identity.to_string(),
        })
    }

    /// Where it lives.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn key(&self, url: &str) -> String {
        let mut h = Sha256::new();
        h.update(self.identity.as_bytes());
        h.update(b"\n");
        h.update(url.as_bytes());
        hex(&h.finalize())
    }

    fn index_path(&self, url: &str) -> PathBuf {
        self.dir
            .join("index")
            .join(format!("{}.json", self.key(url)))
    }

    fn blob_path(&self, sha256: &str) -> PathBuf {
        self.dir.join("blobs").join(sha256)
    }

    /// The cached body of `url`, verified: its bytes hash to the name its
    /// index entry gives. `None` (and the bad entry removed) otherwise.
    pub fn lookup(&self, url: &str) -> Option<Hit> {
        let index = self.index_path(url);
        let bytes = fs::read(&index).ok()?;
        let Ok(entry) = serde_json::from_slice::<Entry>(&bytes) else {
            let _ = fs::remove_file(&index);
            return None;
        };
        if entry.url != url || !is_sha256_hex(&entry.sha256) {
            let _ = fs::remove_file(&index);
            return None;
        }
        let blob = self.blob_path(&entry.sha256);
        let mut file = open_regular(&blob).ok()?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut size = 0u64;
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    h.update(&buf[..n]);
                    size += n as u64;
                }
                Err(_) => return None,
            }
        }
        if hex(&h.finalize()) != entry.sha256 || size != entry.size {
            tracing::warn!(
                "toolchain cache: {} does not hash to its name; removed",
                blob.display()
            );
            let _ = fs::remove_file(&blob);
            let _ = fs::remove_file(&index);
            return None;
        }
        file.seek(SeekFrom::Start(0)).ok()?;
        Some(Hit {
            file,
            size,
            sha256: entry.sha256,
            content_type: entry.content_type,
        })
    }

    /// A new file that fills as a response body passes, for `url`.
    pub fn filling(
        &self,
        url: &str,
        expected: u64,
        content_type: Option<String>,
    ) -> io::Result<Filling> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = self.dir.join("tmp").join(format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc_nofollow())
            .open(&tmp)?;
        Ok(Filling {
            cache: self.clone(),
            url: url.to_string(),
            tmp: Some(tmp),
            file,
            hasher: Sha256::new(),
            len: 0,
            expected,
            content_type,
        })
    }
}

fn libc_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

/// Opens a regular file without following a symlink.
pub(crate) fn open_regular(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc_nofollow())
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    Ok(file)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A body on its way into the cache: the bytes are hashed as they are
/// written; [`Filling::finish`] keeps them only if exactly `expected`
/// arrived. Dropped unfinished, the temporary file is removed.
pub struct Filling {
    cache: ToolCache,
    url: String,
    tmp: Option<PathBuf>,
    file: File,
    hasher: Sha256,
    len: u64,
    expected: u64,
    content_type: Option<String>,
}

impl Filling {
    /// The URL whose body this is.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.len += data.len() as u64;
        if self.len > self.expected {
            return Err(io::Error::other("more bytes than Content-Length"));
        }
        self.hasher.update(data);
        self.file.write_all(data)
    }

    /// Moves the file to `blobs/SHA256` and writes the index entry; returns
    /// the hash.
    pub fn finish(mut self) -> io::Result<String> {
        if self.len != self.expected {
            return Err(io::Error::other(format!(
                "{} of {} bytes arrived",
                self.len, self.expected
            )));
        }
        let sha = hex(&std::mem::take(&mut self.hasher).finalize());
        let Some(tmp) = self.tmp.take() else {
            return Err(io::Error::other("finished twice"));
        };
        let blob = self.cache.blob_path(&sha);
        if let Err(e) = fs::rename(&tmp, &blob) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let entry = Entry {
            url: self.url.clone(),
            sha256: sha.clone(),
            size: self.len,
            content_type: self.content_type.clone(),
        };
        let index = self.cache.index_path(&self.url);
        let body = serde_json::to_vec(&entry).map_err(io::Error::other)?;
        let tmp_index =
            self.cache
                .dir
                .join("tmp")
                .join(format!("{}.index-{}", std::process::id(), &sha[..16]));
        fs::write(&tmp_index, body)?;
        fs::rename(&tmp_index, &index)?;
        Ok(sha)
    }
}

impl Drop for Filling {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// The upstream identity of a sandbox: its `--add-host` overrides and the
/// hashes of its `--upstream-ca` files' contents, sorted; empty for neither.
pub fn upstream_identity(add_hosts: &[String], cas: &[Vec<u8>]) -> String {
    let mut parts: Vec<String> = add_hosts
        .iter()
        .map(|h| format!("add-host {}", h.to_ascii_lowercase()))
        .collect();
    parts.extend(
        cas.iter()
            .map(|pem| format!("upstream-ca {}", hex(&Sha256::digest(pem)))),
    );
    parts.sort();
    parts.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_versioned_artifacts_are_cached() {
        let node = artifact_host("nodejs.org").unwrap();
        assert!((node.artifact)(
            "/dist/v22.11.0/node-v22.11.0-linux-x64.tar.gz"
        ));
        assert!((node.artifact)("/dist/v22.11.0/SHASUMS256.txt"));
        for no in [
            "/dist/index.json",
            "/dist/latest/x",
            "/dist/v22/",
            "/dist/vx/a",
            "/",
        ] {
            assert!(!(node.artifact)(no), "{no}");
        }
        let rust = artifact_host("static.rust-lang.org").unwrap();
        assert!((rust.artifact)(
            "/dist/2025-06-26/rust-1.88.0-x86_64-unknown-linux-gnu.tar.xz"
        ));
        assert!(!(rust.artifact)("/dist/channel-rust-stable.toml"));
        let go = artifact_host("DL.google.com.").unwrap();
        assert!((go.artifact)("/go/go1.24.4.linux-amd64.tar.gz"));
        assert!(!(go.artifact)("/go/other/x"));
        assert!(artifact_host("evil.nodejs.org").is_none());
    }

    #[test]
    fn a_body_is_kept_under_its_hash_only_whole_and_verified_on_use() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ToolCache::open(dir.path(), "").unwrap();
        let url = "https://nodejs.org/dist/v22.1.0/SHASUMS256.txt";
        assert!(cache.lookup(url).is_none());

        // Short: not kept.
        let mut f = cache.filling(url, 10, None).unwrap();
        f.write(b"12345").unwrap();
        assert!(f.finish().is_err());
        assert!(cache.lookup(url).is_none());
        // Too long: refused.
        let mut f = cache.filling(url, 3, None).unwrap();
        assert!(f.write(b"12345").is_err());
        drop(f);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);

        let mut f = cache.filling(url, 5, Some("text/plain".into())).unwrap();
        f.write(b"hello").unwrap();
        let sha = f.finish().unwrap();
        assert_eq!(sha, hex(&Sha256::digest(b"hello")));
        let mut hit = cache.lookup(url).unwrap();
        let mut body = String::new();
        hit.file.read_to_string(&mut body).unwrap();
        assert_eq!((body.as_str(), hit.size), ("hello", 5));

        // Another upstream identity (a mirror of the sandbox's own) does not see it.
        let other = ToolCache::open(dir.path(), "add-host nodejs.org=127.0.0.1").unwrap();
        assert!(other.lookup(url).is_none());

        // A blob changed behind the cache's back is dropped, not served.
        fs::write(dir.path().join("blobs").join(&sha), b"HELLO").unwrap();
        assert!(cache.lookup(url).is_none());
        assert!(!dir.path().join("blobs").join(&sha).exists());
    }
}
