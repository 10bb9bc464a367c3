//! The per-sandbox CA: made with rcgen, kept in the sandbox's `ca/` folder
//! (`ca.pem` 0644 for the guest's trust store, `ca.key` 0600 that never
//! leaves the host), and a bounded in-memory cache of per-host leaves.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs::{self, DirBuilder, File};
use std::io::{self, Read};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::fsutil::{mode_of, write_atomic};

/// File name of the CA certificate (PEM, 0644).
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key (PKCS#8 PEM, 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// Default number of leaves kept in memory.
pub const DEFAULT_CACHE_CAPACITY: usize = 256;

const CA_COMMON_NAME: &str = "sandpen sandbox CA";
const CA_ORGANIZATION: &str = "sandpen";
const CA_VALIDITY: time::Duration = time::Duration::days(3650);
const LEAF_VALIDITY: time::Duration = time::Duration::days(30);
/// Guest clocks may lag the host's.
const BACKDATE: time::Duration = time::Duration::days(1);
/// A cached leaf older than this is minted again.
const LEAF_REFRESH: Duration = Duration::from_secs(7 * 24 * 3600);

/// Errors of the CA. None contains key material.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("a CA already exists in {}", dir.display())]
    AlreadyExists { dir: PathBuf },
    #[error(
        "refusing to use CA key {}: its mode is {mode:04o}, readable or writable by group or others",
        path.display()
    )]
    InsecureKey { path: PathBuf, mode: u32 },
    #[error("{} holds no usable PEM certificate", path.display())]
    BadCertificate { path: PathBuf },
    #[error("{} holds no usable private key: {source}", path.display())]
    BadKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("the CA key in {} does not match its certificate", dir.display())]
    KeyMismatch { dir: PathBuf },
    #[error("cannot make the CA certificate: {0}")]
    Create(#[source] rcgen::Error),
    #[error("cannot mint a certificate for host {host:?}: {reason}")]
    Leaf { host: String, reason: String },
}

struct Leaf {
    key: Arc<CertifiedKey>,
    minted: Instant,
}

#[derive(Default)]
struct LeafCache {
    map: HashMap<String, Leaf>,
    order: VecDeque<String>,
}

/// A sandbox's CA, loaded in memory. Share it behind an `Arc`; minting and
/// the cache are thread-safe.
pub struct SandboxCa {
    dir: PathBuf,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    cache: Mutex<LeafCache>,
    capacity: usize,
}

impl fmt::Debug for SandboxCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxCa")
            .field("dir", &self.dir)
            .field("key", &"***")
            .finish_non_exhaustive()
    }
}

/// The CA's distinguished name and usages. `load` rebuilds the issuer from
/// these, so they must stay the same as when the CA was made.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, CA_ORGANIZATION);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn random_serial() -> Result<SerialNumber, String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| format!("no random numbers: {e}"))?;
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte to strip
    Ok(SerialNumber::from_slice(&bytes))
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CaError + 'a {
    move |source| CaError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl SandboxCa {
    /// Makes a new CA in `dir` (created 0700 if missing): `ca.pem` 0644 and
    /// `ca.key` 0600. Refuses to replace an existing CA.
    pub fn create(dir: impl AsRef<Path>) -> Result<SandboxCa, CaError> {
        let dir = dir.as_ref();
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        if key_path.exists() || cert_path.exists() {
            return Err(CaError::AlreadyExists {
                dir: dir.to_path_buf(),
            });
        }
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("create", dir))?;

        let key = KeyPair::generate().map_err(CaError::Create)?;
        let mut params = ca_params();
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial().map_err(|reason| CaError::Leaf {
            host: CA_COMMON_NAME.to_string(),
            reason,
        })?);
        let cert = params.self_signed(&key).map_err(CaError::Create)?;

        let key_pem = Zeroizing::new(key.serialize_pem());
        write_atomic(&key_path, key_pem.as_bytes(), 0o600).map_err(io_err("write", &key_path))?;
        let cert_pem = cert.pem();
        write_atomic(&cert_path, cert_pem.as_bytes(), 0o644)
            .map_err(io_err("write", &cert_path))?;

        Ok(SandboxCa {
            dir: dir.to_path_buf(),
            cert_der: cert.der().clone(),
            cert_pem,
            issuer: Issuer::new(ca_params(), key),
            cache: Mutex::new(LeafCache::default()),
            capacity: DEFAULT_CACHE_CAPACITY,
        })
    }

    /// Loads the CA from `dir`. Refuses a key file that group or others can
    /// read or write, and a key that does not match the certificate.
    pub fn load(dir: impl AsRef<Path>) -> Result<SandboxCa, CaError> {
        let dir = dir.as_ref();
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);

        let mut f = File::open(&key_path).map_err(io_err("open", &key_path))?;
        let mode = mode_of(&f).map_err(io_err("stat", &key_path))?;
        if mode & 0o077 != 0 {
            return Err(CaError::InsecureKey {
                path: key_path,
                mode,
            });
        }
        let mut key_pem = Zeroizing::new(String::new());
        f.read_to_string(&mut key_pem)
            .map_err(io_err("read", &key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| CaError::BadKey {
            path: key_path.clone(),
            source,
        })?;

        let cert_pem = fs::read_to_string(&cert_path).map_err(io_err("read", &cert_path))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|_| {
            CaError::BadCertificate {
                path: cert_path.clone(),
            }
        })?;

        // The key must be the certificate's key, or leaves would not chain.
        let signer = signer_for(&key).map_err(|_| CaError::KeyMismatch {
            dir: dir.to_path_buf(),
        })?;
        CertifiedKey::new(vec![cert_der.clone()], signer)
            .keys_match()
            .map_err(|_| CaError::KeyMismatch {
                dir: dir.to_path_buf(),
            })?;

        Ok(SandboxCa {
            dir: dir.to_path_buf(),
            cert_der,
            cert_pem,
            issuer: Issuer::new(ca_params(), key),
            cache: Mutex::new(LeafCache::default()),
            capacity: DEFAULT_CACHE_CAPACITY,
        })
    }

    /// Sets how many leaves the cache keeps (at least 1).
    pub fn with_cache_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// The folder holding `ca.pem` and `ca.key`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of `ca.pem`, the file to install in the guest.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CA_CERT_FILE)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// A leaf certificate and key for `host` (DNS name or IP address),
    /// signed by this CA, from the cache or minted now. The chain holds the
    /// leaf only: the guest trusts the CA itself.
    pub fn leaf_for(&self, host: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        if ServerName::try_from(host.as_str()).is_err() {
            return Err(CaError::Leaf {
                host,
                reason: "not a valid DNS name or IP address".to_string(),
            });
        }
        {
            let cache = self.lock_cache();
            if let Some(leaf) = cache.map.get(&host) {
                if leaf.minted.elapsed() < LEAF_REFRESH {
                    return Ok(leaf.key.clone());
                }
            }
        }
        // Minted without the lock held; a race only mints twice.
        let key = Arc::new(self.mint(&host)?);
        let mut cache = self.lock_cache();
        if cache.map.contains_key(&host) {
            cache.order.retain(|h| *h != host);
        }
        while cache.map.len() >= self.capacity && !cache.map.contains_key(&host) {
            match cache.order.pop_front() {
                Some(old) => {
                    cache.map.remove(&old);
                }
                None => break,
            }
        }
        cache.order.push_back(host.clone());
        cache.map.insert(
            host,
            Leaf {
                key: key.clone(),
                minted: Instant::now(),
            },
        );
        Ok(key)
    }

    /// Number of leaves in the cache.
    pub fn cached_leaves(&self) -> usize {
        self.lock_cache().map.len()
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, LeafCache> {
        // A panic while holding the lock leaves a consistent map; go on.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mint(&self, host: &str) -> Result<CertifiedKey, CaError> {
        let fail = |reason: String| CaError::Leaf {
            host: host.to_string(),
            reason,
        };
        let key = KeyPair::generate().map_err(|e| fail(e.to_string()))?;
        let mut params =
            CertificateParams::new(vec![host.to_string()]).map_err(|e| fail(e.to_string()))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + LEAF_VALIDITY;
        params.serial_number = Some(random_serial().map_err(fail)?);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| fail(e.to_string()))?;
        let signer = signer_for(&key).map_err(|e| fail(e.to_string()))?;
        Ok(CertifiedKey::new(vec![cert.der().clone()], signer))
    }
}

fn signer_for(key: &KeyPair) -> Result<Arc<dyn rustls::sign::SigningKey>, rustls::Error> {
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    rustls::crypto::ring::sign::any_supported_type(&der)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls::pki_types::UnixTime;
    use rustls::RootCertStore;
    use std::os::unix::fs::PermissionsExt;

    fn verify(
        ca_der: &CertificateDer<'static>,
        leaf: &CertifiedKey,
        host: &str,
    ) -> Result<(), rustls::Error> {
        let mut roots = RootCertStore::empty();
        roots.add(ca_der.clone())?;
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier
            .verify_server_cert(&leaf.cert[0], &leaf.cert[1..], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn create_writes_files_with_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_dir = dir.path().join("box").join("ca");
        let ca = SandboxCa::create(&ca_dir).expect("create");
        assert_eq!(mode(&ca_dir.join(CA_CERT_FILE)), 0o644);
        assert_eq!(mode(&ca_dir.join(CA_KEY_FILE)), 0o600);
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!format!("{ca:?}").contains("PRIVATE"));
        assert!(matches!(
            SandboxCa::create(&ca_dir),
            Err(CaError::AlreadyExists { .. })
        ));
    }

    #[test]
    fn leaf_chains_to_ca_and_names_host() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = SandboxCa::create(dir.path()).expect("create");
        let leaf = ca.leaf_for("api.anthropic.com").expect("leaf");
        verify(ca.cert_der(), &leaf, "api.anthropic.com").expect("chains and names host");
        // The SAN is the host: another name does not verify.
        assert!(verify(ca.cert_der(), &leaf, "api.openai.com").is_err());
        leaf.keys_match().expect("leaf key matches");
    }

    #[test]
    fn leaf_does_not_chain_to_another_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = SandboxCa::create(dir.path().join("a")).expect("create");
        let b = SandboxCa::create(dir.path().join("b")).expect("create");
        let leaf = a.leaf_for("github.com").expect("leaf");
        assert!(verify(b.cert_der(), &leaf, "github.com").is_err());
    }

    #[test]
    fn loaded_ca_mints_leaves_that_chain_to_saved_cert() {
        let dir = tempfile::tempdir().expect("tempdir");
        let created = SandboxCa::create(dir.path()).expect("create");
        let loaded = SandboxCa::load(dir.path()).expect("load");
        assert_eq!(loaded.cert_der(), created.cert_der());
        let leaf = loaded.leaf_for("github.com").expect("leaf");
        verify(created.cert_der(), &leaf, "github.com").expect("chains");
    }

    #[test]
    fn load_refuses_open_key_and_mismatched_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        SandboxCa::create(dir.path().join("a")).expect("create");
        SandboxCa::create(dir.path().join("b")).expect("create");
        let a_key = dir.path().join("a").join(CA_KEY_FILE);
        fs::set_permissions(&a_key, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            SandboxCa::load(dir.path().join("a")),
            Err(CaError::InsecureKey { .. })
        ));
        fs::set_permissions(&a_key, fs::Permissions::from_mode(0o600)).expect("chmod");
        fs::copy(
            dir.path().join("b").join(CA_CERT_FILE),
            dir.path().join("a").join(CA_CERT_FILE),
        )
        .expect("copy");
        assert!(matches!(
            SandboxCa::load(dir.path().join("a")),
            Err(CaError::KeyMismatch { .. })
        ));
    }

    #[test]
    fn leaves_are_cached_and_cache_is_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = SandboxCa::create(dir.path())
            .expect("create")
            .with_cache_capacity(3);
        let first = ca.leaf_for("a.example").expect("leaf");
        let again = ca.leaf_for("A.Example.").expect("leaf");
        assert!(Arc::ptr_eq(&first, &again));
        for h in ["b.example", "c.example", "d.example", "e.example"] {
            ca.leaf_for(h).expect("leaf");
        }
        assert_eq!(ca.cached_leaves(), 3);
        // The oldest was evicted: a new leaf is minted for it.
        let fresh = ca.leaf_for("a.example").expect("leaf");
        assert!(!Arc::ptr_eq(&first, &fresh));
        assert_eq!(ca.cached_leaves(), 3);
    }

    #[test]
    fn ip_host_and_bad_host() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = SandboxCa::create(dir.path()).expect("create");
        let leaf = ca.leaf_for("127.0.0.1").expect("leaf");
        verify(ca.cert_der(), &leaf, "127.0.0.1").expect("ip SAN");
        for bad in ["bad host", "a\u{7f}b", "", "x..y"] {
            assert!(
                matches!(ca.leaf_for(bad), Err(CaError::Leaf { .. })),
                "{bad:?}"
            );
        }
    }
}
