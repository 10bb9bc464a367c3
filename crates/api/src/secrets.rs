//! Secrets: values go in, names come out (docs/credentials.md). Nothing here
//! returns a value or part of one; `set` takes it as a [`SecretValue`],
//! which zeroes its memory when dropped.

use sandpen_credentials::{builtin_routes, Route, Scope, SecretValue};
use sandpen_supervisor::credentials::{custom_routes, store, store_and_keyring_status};
use sandpen_supervisor::{sandbox, Dirs};
use serde::Serialize;

use crate::ApiError;

/// The scope of a secret: a sandbox's own (which must exist) or global.
pub fn scope_of(dirs: &Dirs, name: Option<&str>) -> Result<Scope, ApiError> {
    match name {
        Some(name) => {
            sandbox::load(dirs, name)?;
            Ok(Scope::Sandbox(name.to_string()))
        }
        None => Ok(Scope::Global),
    }
}

/// The built-in services' names.
pub fn builtin_names() -> Vec<&'static str> {
    let mut names: Vec<&str> = builtin_routes()
        .iter()
        .map(|r| r.service.as_str())
        .collect();
    names.dedup();
    names
}

/// The hosts a service's secret goes to (built-in and custom routes).
pub fn hosts_of(dirs: &Dirs, service: &str) -> Result<Vec<String>, ApiError> {
    let table = custom_routes(dirs).table()?;
    Ok(table
        .routes()
        .iter()
        .filter(|r| r.service == service)
        .flat_map(|r| r.hosts.iter().cloned())
        .collect())
}

/// What a `set` did: never the value.
#[derive(Debug, Clone, Serialize)]
pub struct Stored {
    pub service: String,
    pub scope: String,
    /// `OS keyring` or `file`.
    pub backend: &'static str,
    pub hosts: Vec<String>,
    /// Why no OS keyring answered, on the first secret kept in the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_keyring: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_path: Option<String>,
}

/// The hosts of a service that has a route; an unknown service is an error
/// (checked before a value is asked for).
pub fn routed_hosts(dirs: &Dirs, service: &str) -> Result<Vec<String>, ApiError> {
    let hosts = hosts_of(dirs, service)?;
    if hosts.is_empty() {
        return Err(ApiError::UnknownService {
            service: service.to_string(),
            builtin: builtin_names().join(", "),
        });
    }
    Ok(hosts)
}

/// Stores a built-in (or already routed custom) service's secret.
pub fn set(
    dirs: &Dirs,
    service: &str,
    scope: Scope,
    value: SecretValue,
) -> Result<Stored, ApiError> {
    let hosts = routed_hosts(dirs, service)?;
    save(dirs, service, scope, value, hosts)
}

/// Stores a secret for the user's own API, with its route; the route's
/// placeholder is in [`Route::sentinel`].
pub fn set_custom(
    dirs: &Dirs,
    route: Route,
    scope: Scope,
    value: SecretValue,
) -> Result<Stored, ApiError> {
    if value.expose().is_empty() {
        return Err(ApiError::EmptySecret);
    }
    custom_routes(dirs).put(route.clone())?;
    save(dirs, &route.service, scope, value, route.hosts.clone())
}

fn save(
    dirs: &Dirs,
    service: &str,
    scope: Scope,
    value: SecretValue,
    hosts: Vec<String>,
) -> Result<Stored, ApiError> {
    if value.expose().is_empty() {
        return Err(ApiError::EmptySecret);
    }
    let (store, no_keyring) = store_and_keyring_status(dirs);
    let first = !store.path().exists();
    store.set(service, scope.clone(), value)?;
    Ok(Stored {
        service: service.to_string(),
        scope: scope.to_string(),
        backend: store.backend(),
        hosts,
        store_path: Some(store.path().display().to_string()),
        no_keyring: if first { no_keyring } else { None },
    })
}

/// One stored secret: its name, scope, hosts and when it was set.
#[derive(Debug, Clone, Serialize)]
pub struct SecretInfo {
    pub service: String,
    pub scope: String,
    pub hosts: Vec<String>,
    pub set_at: String,
}

pub fn list(dirs: &Dirs) -> Result<Vec<SecretInfo>, ApiError> {
    let entries = store(dirs).list()?;
    let table = custom_routes(dirs).table()?;
    let hosts = |service: &str| -> Vec<String> {
        table
            .routes()
            .iter()
            .filter(|r| r.service == service)
            .flat_map(|r| r.hosts.iter().cloned())
            .collect()
    };
    Ok(entries
        .iter()
        .map(|e| SecretInfo {
            service: e.service.clone(),
            scope: e.scope.to_string(),
            hosts: hosts(&e.service),
            set_at: e
                .set_at
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
        })
        .collect())
}

/// Removes a secret (and a custom route left without any).
pub fn remove(dirs: &Dirs, service: &str, scope: &Scope) -> Result<(), ApiError> {
    let store = store(dirs);
    if !store.remove(service, scope)? {
        return Err(ApiError::NoSuchSecret {
            service: service.to_string(),
            scope: scope.to_string(),
        });
    }
    let left = store.list()?.iter().any(|e| e.service == service);
    if !left {
        custom_routes(dirs).remove(service)?;
    }
    Ok(())
}
