//! Credentials for one sandbox: its CA, the secret store and routes the
//! proxy reads on each intercepted connection, and what the guest is told
//! (the CA certificate and the sentinel environment). No secret value ever
//! goes into the guest, the sandbox's state or a log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sandpen_credentials::{
    CustomRoutes, FileStore, Found, Keyring, Route, RouteTable, SandboxCa, Scope,
};
use sandpen_proto::GUEST_CA_BUNDLE;
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

/// The store as the supervisor reads it: like [`store`], but the keyring is
/// not probed, so nothing talks to the session bus until a guest request
/// needs a value held there. The supervisor confines itself right after the
/// boot; on kernels before Landlock ABI 8 only the threads started after
/// that are in its Landlock domain, and the D-Bus client starts two
/// (docs/architecture.md, "The supervisor's confinement").
pub fn reading_store(dirs: &Dirs) -> FileStore {
    let file = FileStore::new(dirs.config.join("secrets"));
    if std::env::var("SANDPEN_SECRET_STORE").as_deref() == Ok("file") {
        return file;
    }
    file.with_keyring(Keyring::unprobed())
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

/// The store and the custom routes, as the proxy sees them. Both are read
/// again only when their file changes (a new inode or mtime: every write is
/// an atomic rename), so a guest opening connections cannot make the host
/// re-read files, query the keyring, or write a warning each time; `sandpen
/// secret set|rm` still applies from the next connection on.
struct StoreSource {
    sandbox: String,
    store: FileStore,
    routes: CustomRoutes,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    routes_stamp: Option<Stamp>,
    table: Option<RouteTable>,
    secrets_stamp: Option<Stamp>,
    secrets: HashMap<String, Option<Found>>,
    /// The last store error, kept briefly so that a failing keyring is not
    /// asked again on every connection.
    failure: Option<(Instant, String)>,
}

/// How long a store error is served from the cache.
const FAILURE_TTL: Duration = Duration::from_secs(10);

type Stamp = (u64, SystemTime);

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.modified().ok()?))
}

impl StoreSource {
    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        // The cache holds no invariant a panic could break.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl CredentialSource for StoreSource {
    fn route_for(&self, host: &str) -> Option<Route> {
        if let Some(r) = sandpen_credentials::route_for(host) {
            return Some(r.clone());
        }
        let now = stamp(self.routes.path());
        let mut cache = self.cache();
        if cache.table.is_none() || cache.routes_stamp != now {
            cache.routes_stamp = now;
            cache.table = Some(self.routes.table().unwrap_or_else(|e| {
                // Once per change of the file, not per connection.
                tracing::warn!("custom credential routes not used: {e}");
                RouteTable::new()
            }));
        }
        cache
            .table
            .as_ref()
            .and_then(|t| t.route_for(host).cloned())
    }

    fn secret(&self, service: &str) -> Result<Option<Found>, String> {
        let now = stamp(self.store.path());
        {
            let mut cache = self.cache();
            if cache.secrets_stamp != now {
                cache.secrets_stamp = now;
                cache.secrets.clear();
                cache.failure = None;
            }
            if let Some(found) = cache.secrets.get(service) {
                return Ok(found.clone());
            }
            if let Some((at, e)) = &cache.failure {
                if at.elapsed() < FAILURE_TTL {
                    return Err(e.clone());
                }
            }
        }
        // Not under the lock: a keyring may take a while to answer.
        match self.store.get(service, Some(&self.sandbox)) {
            Ok(found) => {
                let mut cache = self.cache();
                if cache.secrets_stamp == now {
                    cache.secrets.insert(service.to_string(), found.clone());
                }
                Ok(found)
            }
            Err(e) => {
                let e = e.to_string();
                self.cache().failure = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }
}

/// The interception engine: the sandbox CA, the upstream trust (platform
/// roots plus the sandbox's `--upstream-ca` files), and the store.
pub fn mitm(dirs: &Dirs, ca: SandboxCa, config: &SandboxConfig) -> Result<Mitm, SupervisorError> {
    let tls = upstream_tls(&config.upstream_cas)
        .map_err(|e| SupervisorError::Invalid(format!("--upstream-ca: {e}")))?;
    let source = StoreSource {
        sandbox: config.name.clone(),
        store: reading_store(dirs),
        routes: custom_routes(dirs),
        cache: Mutex::new(Cache::default()),
    };
    Ok(Mitm::new(Arc::new(ca), tls, Arc::new(source)))
}

/// The guest environment for credentials: where the CAs are, for the
/// clients that do not read the system bundle by default, and the sentinel
/// of each route whose secret is set now (a variable is only there when it
/// works). Node gets the whole system bundle, not the sandbox CA alone: it
/// holds the sandbox CA (appended at boot) and the CAs of a TLS-intercepting
/// proxy in front of the host (installed at image build), without which
/// npm in the guest fails with `SELF_SIGNED_CERT_IN_CHAIN` behind one.
pub fn guest_env(dirs: &Dirs, name: &str) -> Vec<(String, String)> {
    let mut env = vec![(
        "NODE_EXTRA_CA_CERTS".to_string(),
        GUEST_CA_BUNDLE.to_string(),
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
    // The index only: no value is read (nor a keyring asked) for this.
    let set: Vec<(String, Scope)> = match reading_store(dirs).list() {
        Ok(entries) => entries.into_iter().map(|e| (e.service, e.scope)).collect(),
        Err(e) => {
            tracing::warn!("secret store: {e}");
            Vec::new()
        }
    };
    let own = Scope::Sandbox(name.to_string());
    for route in table.routes() {
        let Some(var) = &route.guest_env else {
            continue;
        };
        let has_secret = set.iter().any(|(svc, scope)| {
            *svc == route.service && (*scope == Scope::Global || *scope == own)
        });
        if has_secret && !env.iter().any(|(k, _)| k == var) {
            env.push((var.clone(), route.sentinel.clone()));
        }
    }
    env
}

/// A trusted sink that only the workspace's `.sandpen.toml` names and that
/// will not (fully) count as a sink after `secret-read`: such a sink stays
/// open only for connections the proxy intercepts, that is to a credential
/// route's host whose secret is set (docs/egress.md, "After `secret-read`,
/// trusted sinks take only the user's credential"). `sandpen run` and
/// `start` print one line per such sink (its Display).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeakSink {
    /// The target as the workspace file names it.
    pub target: String,
    /// Hosts under it that are intercepted, for which it does hold.
    pub holds_for: Vec<String>,
    /// Services with a route to a host under it but no secret set.
    pub no_secret: Vec<String>,
    /// The user's own policy file, where a sink needs no interception.
    pub own_file: PathBuf,
}

impl std::fmt::Display for WeakSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the workspace's trusted sink {} holds after secret-read only through \
             credential interception (only .sandpen.toml names it), ",
            self.target
        )?;
        if self.holds_for.is_empty() {
            f.write_str("so it will not count as a sink")?;
        } else {
            write!(f, "so it counts only for {}", self.holds_for.join(", "))?;
        }
        match self.no_secret.as_slice() {
            [] => f.write_str("; no credential route serves it")?,
            services => {
                let set: Vec<String> = services
                    .iter()
                    .map(|s| format!("`sandpen secret set {s}`"))
                    .collect();
                write!(f, "; no secret is set for it ({})", set.join(", "))?;
            }
        }
        write!(
            f,
            "; to make it a sink, name it in [flow] trusted_sinks of {}",
            self.own_file.display()
        )
    }
}

/// The workspace-only sinks of `policy` that interception does not cover,
/// given the credential routes and the services with a secret for this
/// sandbox (`(service, scope)` from the store's index). A sink for one exact
/// host holds when a route serves that host and its secret is set; a
/// pattern (`*.corp.example`, `**`) holds only for such hosts under it, so
/// it is always named.
pub fn weak_sinks(
    policy: &sandpen_policy::Policy,
    routes: &RouteTable,
    secrets: &[(String, Scope)],
    sandbox: &str,
    own_file: &Path,
) -> Vec<WeakSink> {
    use sandpen_policy::{Host, HostPattern, Target};
    let own = Scope::Sandbox(sandbox.to_string());
    let has_secret = |service: &str| {
        secrets
            .iter()
            .any(|(s, scope)| s == service && (*scope == Scope::Global || *scope == own))
    };
    let mut out = Vec::new();
    for target in policy.workspace_only_sinks() {
        let mut holds_for = Vec::new();
        let mut no_secret = Vec::new();
        for route in routes.routes() {
            for host in &route.hosts {
                let Ok(h) = Host::parse(host) else { continue };
                if !target.matches_host(&h, route.port) {
                    continue;
                }
                if has_secret(&route.service) {
                    holds_for.push(host.clone());
                } else if !no_secret.contains(&route.service) {
                    no_secret.push(route.service.clone());
                }
            }
        }
        let exact = matches!(
            target,
            Target::Host {
                pattern: HostPattern::Exact(_),
                ..
            }
        );
        if exact && !holds_for.is_empty() {
            continue;
        }
        out.push(WeakSink {
            target: target.to_string(),
            holds_for,
            no_secret,
            own_file: own_file.to_path_buf(),
        });
    }
    out
}

/// [`weak_sinks`] for a sandbox, with the user's routes and the store's
/// index (no secret value is read, nor a keyring asked).
pub fn weak_sinks_of(
    dirs: &Dirs,
    config: &SandboxConfig,
    policy: &sandpen_policy::Policy,
) -> Vec<WeakSink> {
    if policy.workspace_only_sinks().is_empty() {
        return Vec::new();
    }
    let table = custom_routes(dirs).table().unwrap_or_else(|e| {
        tracing::warn!("custom credential routes not used: {e}");
        RouteTable::new()
    });
    let secrets: Vec<(String, Scope)> = match reading_store(dirs).list() {
        Ok(entries) => entries.into_iter().map(|e| (e.service, e.scope)).collect(),
        Err(e) => {
            tracing::warn!("secret store: {e}");
            Vec::new()
        }
    };
    let (_, own_file) = crate::egress::policy_files(dirs, &dirs.sandbox(&config.name));
    weak_sinks(policy, &table, &secrets, &config.name, &own_file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandpen_credentials::Route;
    use sandpen_policy::{Policy, PolicyFile, WorkspaceFile};

    fn policy(user_sinks: &str, ws_sinks: &str) -> Policy {
        let dir = tempfile::tempdir().unwrap();
        let user = dir.path().join("policy.toml");
        std::fs::write(&user, format!("[flow]\ntrusted_sinks = [{user_sinks}]\n")).unwrap();
        let user = PolicyFile::load(&user, sandpen_policy::Scope::Sandbox).unwrap();
        let ws = WorkspaceFile::parse(
            &format!("[flow]\ntrusted_sinks = [{ws_sinks}]\n"),
            Path::new("/w/.sandpen.toml"),
        )
        .unwrap();
        let sha = ws.sha256.clone();
        Policy::from_files(None, Some(&user)).with_workspace(Some(ws), Some(&sha))
    }

    #[test]
    fn names_each_workspace_sink_that_interception_does_not_cover() {
        let p = policy(
            r#""uploads.example.org""#,
            r#""api.anthropic.com", "api.openai.com", "uploads.example.org", "sink.example.net", "*.corp.example""#,
        );
        let mut routes = RouteTable::new();
        routes
            .add(Route::custom("corp", "api.corp.example", "authorization", "Bearer {}").unwrap())
            .unwrap();
        let secrets = vec![
            ("anthropic".to_string(), Scope::Global),
            ("corp".to_string(), Scope::Sandbox("box".into())),
            ("openai".to_string(), Scope::Sandbox("another".into())),
        ];
        let own = Path::new("/c/sandboxes/box/policy.toml");
        let weak = weak_sinks(&p, &routes, &secrets, "box", own);
        let lines: Vec<String> = weak.iter().map(ToString::to_string).collect();
        // anthropic: intercepted (global secret); uploads.example.org: the
        // user's own file names it.
        assert_eq!(weak.len(), 3, "{lines:#?}");
        assert_eq!(weak[0].target, "api.openai.com");
        assert_eq!(weak[0].no_secret, ["openai"], "another sandbox's secret");
        assert!(
            lines[0].contains("will not count as a sink"),
            "{}",
            lines[0]
        );
        assert!(
            lines[0].contains("`sandpen secret set openai`"),
            "{}",
            lines[0]
        );
        assert!(
            lines[0].contains("/c/sandboxes/box/policy.toml"),
            "{}",
            lines[0]
        );
        assert_eq!(weak[1].target, "sink.example.net");
        assert!(
            lines[1].contains("no credential route serves it"),
            "{}",
            lines[1]
        );
        assert_eq!(weak[2].target, "*.corp.example");
        assert_eq!(weak[2].holds_for, ["api.corp.example"]);
        assert!(
            lines[2].contains("counts only for api.corp.example"),
            "{}",
            lines[2]
        );
        assert!(lines.iter().all(|l| !l.contains('\n')));
    }
}
