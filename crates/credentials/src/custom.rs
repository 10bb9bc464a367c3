//! Custom credential routes (`sandpen secret set-custom`), kept in a JSON
//! file next to the secret store. A custom route names no secret value; the
//! value is in the store under the route's service name.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil::{create_private_parent, with_lock, write_atomic};
use crate::routes::{builtin_routes, Route, RouteError, RouteTable, ValueFormat};

const FORMAT_VERSION: u32 = 1;

/// Errors of the custom-route file.
#[derive(Debug, thiserror::Error)]
pub enum CustomRoutesError {
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is malformed at line {line}, column {column}: {message}", path.display())]
    Malformed {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{} has format version {version}; this sandpen reads version {FORMAT_VERSION}", path.display())]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{}: custom route {service}: {why}", path.display())]
    Invalid {
        path: PathBuf,
        service: String,
        why: String,
    },
    #[error("{service} is a built-in service; pick another name for a custom route")]
    Builtin { service: String },
    #[error(transparent)]
    Route(#[from] RouteError),
}

#[derive(Serialize, Deserialize)]
struct Doc {
    version: u32,
    routes: Vec<Route>,
}

/// The file of custom routes.
#[derive(Debug, Clone)]
pub struct CustomRoutes {
    path: PathBuf,
}

impl CustomRoutes {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        CustomRoutes { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, op: &'static str) -> impl FnOnce(io::Error) -> CustomRoutesError + '_ {
        move |source| CustomRoutesError::Io {
            op,
            path: self.path.clone(),
            source,
        }
    }

    /// The saved routes; none when the file does not exist.
    pub fn load(&self) -> Result<Vec<Route>, CustomRoutesError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io("read")(e)),
        };
        let doc: Doc = serde_json::from_str(&text).map_err(|e| CustomRoutesError::Malformed {
            path: self.path.clone(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?;
        if doc.version != FORMAT_VERSION {
            return Err(CustomRoutesError::UnsupportedVersion {
                path: self.path.clone(),
                version: doc.version,
            });
        }
        Ok(doc.routes)
    }

    /// Saves `route`, replacing a custom route of the same service. Refuses
    /// a built-in service name, or a host that another route serves.
    pub fn put(&self, route: Route) -> Result<(), CustomRoutesError> {
        if builtin_routes().iter().any(|r| r.service == route.service) {
            return Err(CustomRoutesError::Builtin {
                service: route.service,
            });
        }
        self.ensure_folder()?;
        with_lock(&self.path, self.io("lock"), || {
            let mut routes = self.load()?;
            routes.retain(|r| r.service != route.service);
            // RouteTable refuses a host that already has a route.
            let mut table = RouteTable::new();
            for r in &routes {
                table.add(r.clone())?;
            }
            table.add(route.clone())?;
            routes.push(route);
            self.save(&routes)
        })
    }

    /// Removes the custom route of `service`; whether there was one.
    pub fn remove(&self, service: &str) -> Result<bool, CustomRoutesError> {
        if !self.path.exists() {
            return Ok(false);
        }
        with_lock(&self.path, self.io("lock"), || {
            let mut routes = self.load()?;
            let before = routes.len();
            routes.retain(|r| r.service != service);
            if routes.len() == before {
                return Ok(false);
            }
            self.save(&routes)?;
            Ok(true)
        })
    }

    fn ensure_folder(&self) -> Result<(), CustomRoutesError> {
        create_private_parent(&self.path).map_err(self.io("create the folder of"))
    }

    /// Built-in routes plus the saved custom ones. A file edited by hand so
    /// that two routes share a host is an error, not a guess.
    pub fn table(&self) -> Result<RouteTable, CustomRoutesError> {
        let mut table = RouteTable::new();
        for r in self.load()? {
            table.add(self.revalidate(r)?)?;
        }
        Ok(table)
    }

    /// A saved route as `put` would have accepted it: this file decides where
    /// a secret goes, so a hand edit gets no more than the CLI allows (one
    /// host, one header, no built-in service name).
    fn revalidate(&self, r: Route) -> Result<Route, CustomRoutesError> {
        if builtin_routes().iter().any(|b| b.service == r.service) {
            return Err(CustomRoutesError::Builtin { service: r.service });
        }
        let bad = |why: &str| CustomRoutesError::Invalid {
            path: self.path.clone(),
            service: r.service.clone(),
            why: why.to_string(),
        };
        let [host] = r.hosts.as_slice() else {
            return Err(bad("a custom route has exactly one host"));
        };
        let [header] = r.headers.as_slice() else {
            return Err(bad("a custom route has exactly one header"));
        };
        let ValueFormat::Template(format) = &header.format else {
            return Err(bad("a custom route's format is a template"));
        };
        let mut rebuilt =
            Route::custom_with_placeholder(&r.service, host, &header.name, format, &r.sentinel)?;
        rebuilt.guest_env = None;
        if r.port == 0 {
            return Err(bad("port 0 is not a port"));
        }
        rebuilt.port = r.port;
        Ok(rebuilt)
    }

    fn save(&self, routes: &[Route]) -> Result<(), CustomRoutesError> {
        self.ensure_folder()?;
        let doc = Doc {
            version: FORMAT_VERSION,
            routes: routes.to_vec(),
        };
        let mut text = serde_json::to_vec_pretty(&doc)
            .map_err(|e| self.io("encode")(io::Error::new(io::ErrorKind::InvalidData, e)))?;
        text.push(b'\n');
        write_atomic(&self.path, &text, 0o600).map_err(self.io("write"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_route_keeps_its_port() {
        let dir = tempfile::tempdir().unwrap();
        let c = CustomRoutes::new(dir.path().join("routes.json"));
        let r = Route::custom("mytoken", "api.example.com:8443", "Authorization", "{}").unwrap();
        c.put(r).unwrap();
        let table = c.table().unwrap();
        let got = table.route_for("api.example.com").unwrap();
        assert!(got.serves("api.example.com", 8443));
        assert!(!got.serves("api.example.com", 443));
    }

    #[test]
    fn put_load_replace_remove() {
        let dir = tempfile::tempdir().unwrap();
        let c = CustomRoutes::new(dir.path().join("routes.json"));
        assert!(c.load().unwrap().is_empty());
        let r = Route::custom("mytoken", "api.example.com", "Authorization", "Bearer {}").unwrap();
        c.put(r.clone()).unwrap();
        assert_eq!(c.load().unwrap(), vec![r.clone()]);
        assert_eq!(
            c.table()
                .unwrap()
                .route_for("API.example.com")
                .unwrap()
                .sentinel,
            r.sentinel
        );
        // Same service again: replaced, not duplicated.
        let r2 = Route::custom("mytoken", "api2.example.com", "X-Key", "{}").unwrap();
        c.put(r2.clone()).unwrap();
        assert_eq!(c.load().unwrap(), vec![r2]);
        assert!(c.remove("mytoken").unwrap());
        assert!(!c.remove("mytoken").unwrap());
        assert!(c.load().unwrap().is_empty());
    }

    #[test]
    fn refuses_builtin_names_and_taken_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let c = CustomRoutes::new(dir.path().join("routes.json"));
        let r = Route::custom("anthropic", "x.example", "X-Key", "{}").unwrap();
        assert!(matches!(c.put(r), Err(CustomRoutesError::Builtin { .. })));
        let r = Route::custom("mine", "api.openai.com", "X-Key", "{}").unwrap();
        assert!(matches!(c.put(r), Err(CustomRoutesError::Route(_))));
        let a = Route::custom("a", "same.example", "X-Key", "{}").unwrap();
        let b = Route::custom("b", "same.example", "X-Key", "{}").unwrap();
        c.put(a).unwrap();
        assert!(c.put(b).is_err());
    }

    #[test]
    fn a_hand_edited_file_gets_no_more_than_put_allows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("routes.json");
        let route = |service: &str, hosts: &str| {
            format!(
                r#"{{"version":1,"routes":[{{"service":"{service}","hosts":[{hosts}],
                "headers":[{{"name":"x-key","format":{{"template":"{{}}"}}}}],
                "sentinel":"sandpen-cs-0123456789abcdef","guest_env":null}}]}}"#
            )
        };
        std::fs::write(&p, route("anthropic", r#""evil.example""#)).unwrap();
        assert!(matches!(
            CustomRoutes::new(&p).table(),
            Err(CustomRoutesError::Builtin { .. })
        ));
        std::fs::write(&p, route("mine", r#""a.example","b.example""#)).unwrap();
        assert!(CustomRoutes::new(&p).table().is_err());
        std::fs::write(&p, route("mine", r#""bad host!""#)).unwrap();
        assert!(CustomRoutes::new(&p).table().is_err());
        std::fs::write(&p, route("mine", r#""ok.example""#)).unwrap();
        let t = CustomRoutes::new(&p).table().unwrap();
        assert!(t.route_for("ok.example").is_some());
    }

    #[test]
    fn a_malformed_file_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("routes.json");
        std::fs::write(&p, "{\n \"version\": 1,\n \"routes\": [oops]\n}\n").unwrap();
        let e = CustomRoutes::new(&p).load().unwrap_err().to_string();
        assert!(e.contains("line 3"), "{e}");
    }
}
