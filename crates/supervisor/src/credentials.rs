//! Credentials for one sandbox: its CA, the secret store and routes the
//! proxy reads on each intercepted connection, and what the guest is told
//! (the CA certificate and the sentinel environment). No secret value ever
//! goes into the guest, the sandbox's state or a log.

use std::path::PathBuf;
use std::sync::Arc;

use sandpen_credentials::{CustomRoutes, FileStore, Found, Keyring, Route, RouteTable, SandboxCa};
use sandpen_proto::{GUEST_CA_BUNDLE, GUEST_EXTRA_CA};
use sandpen_proxy::mitm::{upstream_tls, CredentialSource, Mitm};

use crate::paths::{Dirs, SandboxPaths};
use crate::sandbox::SandboxConfig;
use crate::SupervisorError;

/// The user's secret store: its index in `$XDG_CONFIG_HOME/sandpen/secrets`,
/// and its values in the OS keyring when one answers, else in that file
/// (0600). `SANDPEN_SECRET_STORE=file` skips the keyring.
pub fn store(dirs: &Dirs) -> FileStore {
    store_and_keyring_status(dirs).0
}

/// The store, and why no keyring is used (`None` when one is).
pub fn store_and_keyring_status(dirs: &Dirs) -> (FileStore, Option<String>) {
    let file = FileStore::new(dirs.config.join("secrets"));
    if std::env::var("SANDPEN_SECRET_STORE").as_deref() == Ok("file") {
        return (file, Some("SANDPEN_SECRET_STORE=file".into()));
    }
    match Keyring::detect() {
        Ok(k) => (file.with_keyring(k), None),
        Err(why) => (file, Some(why)),
    }
}

/// The user's custom routes: `$XDG_CONFIG_HOME/sandpen/credential-routes.json`.
pub fn custom_routes(dirs: &Dirs) -> CustomRoutes {
    CustomRoutes::new(dirs.config.join("credential-routes.json"))
}

/// The sandbox's CA folder.
pub fn ca_dir(paths: &SandboxPaths) -> PathBuf {
    paths.dir.join("ca")
}

/// The sandbox's CA; made now for a sandbox created before CAs existed.
pub fn ensure_ca(paths: &SandboxPaths) -> Result<SandboxCa, SupervisorError> {
    let dir = ca_dir(paths);
    let ca = if dir.join("ca.pem").exists() {
        SandboxCa::load(&dir)
    } else {
        SandboxCa::create(&dir)
    };
    ca.map_err(|e| SupervisorError::Invalid(format!("the sandbox CA: {e}")))
}

/// Reads the store and the custom routes at each call, so `sandpen secret
/// set|rm` applies to running sandboxes from their next connection on.
struct StoreSource {
    sandbox: String,
    store: FileStore,
    routes: CustomRoutes,
}

impl CredentialSource for StoreSource {
    fn route_for(&self, host: &str) -> Option<Route> {
        if let Some(r) = sandpen_credentials::route_for(host) {
            return Some(r.clone());
        }
        match self.routes.table() {
            Ok(t) => t.route_for(host).cloned(),
            Err(e) => {
                tracing::warn!("custom credential routes not used: {e}");
                None
            }
        }
    }

    fn secret(&self, service: &str) -> Result<Option<Found>, String> {
        self.store
            .get(service, Some(&self.sandbox))
            .map_err(|e| e.to_string())
    }
}

/// The interception engine: the sandbox CA, the upstream trust (platform
/// roots plus the sandbox's `--upstream-ca` files), and the store.
pub fn mitm(dirs: &Dirs, ca: SandboxCa, config: &SandboxConfig) -> Result<Mitm, SupervisorError> {
    let tls = upstream_tls(&config.upstream_cas)
        .map_err(|e| SupervisorError::Invalid(format!("--upstream-ca: {e}")))?;
    let source = StoreSource {
        sandbox: config.name.clone(),
        store: store(dirs),
        routes: custom_routes(dirs),
    };
    Ok(Mitm::new(Arc::new(ca), tls, Arc::new(source)))
}

/// The guest environment for credentials: where the CA is, for the clients
/// that do not read the system bundle by default, and the sentinel of each
/// route whose secret is set now (a variable is only there when it works).
pub fn guest_env(dirs: &Dirs, name: &str) -> Vec<(String, String)> {
    let mut env = vec![(
        "NODE_EXTRA_CA_CERTS".to_string(),
        GUEST_EXTRA_CA.to_string(),
    )];
    for key in [
        "SSL_CERT_FILE",
        "CURL_CA_BUNDLE",
        "REQUESTS_CA_BUNDLE",
        "GIT_SSL_CAINFO",
    ] {
        env.push((key.to_string(), GUEST_CA_BUNDLE.to_string()));
    }
    let table = custom_routes(dirs).table().unwrap_or_else(|e| {
        tracing::warn!("custom credential routes not used: {e}");
        RouteTable::new()
    });
    let store = store(dirs);
    for route in table.routes() {
        let Some(var) = &route.guest_env else {
            continue;
        };
        if env.iter().any(|(k, _)| k == var) {
            continue;
        }
        match store.get(&route.service, Some(name)) {
            Ok(Some(_)) => env.push((var.clone(), route.sentinel.clone())),
            Ok(None) => {}
            Err(e) => tracing::warn!("secret store: {e}"),
        }
    }
    env
}
