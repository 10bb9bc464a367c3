//! `sandpen ui`: the local web page and its JSON API (docs/api.md,
//! docs/ui.md), served on the loopback only.
//!
//! The page can change the policy and run commands in sandboxes, so the
//! server is an attack surface of its own. What it guarantees:
//!
//! - It binds `127.0.0.1` (or the `--listen` address), never a wildcard
//!   unless told to.
//! - Every request but the two that carry no data (`GET /`, the bootstrap
//!   page, and `GET /boot.js`, which moves the token from the URL fragment
//!   into a cookie) needs the token: the `X-Sandpen-Token` header, or the
//!   `HttpOnly; SameSite=Strict` cookie that `POST /session` sets from it.
//!   Without it: 401. The token is 32 random bytes, compared in constant time.
//! - A `Host` other than the bound address is refused with 403 (DNS
//!   rebinding), and so is an `Origin` other than the page's own, on every
//!   request, the two open ones included; and a `Sec-Fetch-Site:
//!   cross-site` (CSRF) on every request but those two, which carry no data
//!   and which the browser reaches from the local file `sandpen ui` opens.
//! - No CORS headers, ever; every response carries a strict
//!   Content-Security-Policy, `X-Frame-Options: DENY`, `no-store`.
//! - Secrets go in (`POST /api/secrets`) and never come out: no handler
//!   returns a value ([`crate::secrets`] has none to return).

mod assets;
mod events;
mod exec;
mod jobs;
mod routes;

pub use routes::{served, Verb};

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use sandpen_supervisor::Dirs;

use crate::error::{one_line, ErrorKind};
use crate::ApiError;

/// The header that carries the token (from the page's URL fragment).
pub const TOKEN_HEADER: &str = "x-sandpen-token";

/// What every handler shares.
pub struct App {
    pub dirs: Dirs,
    pub guard: Guard,
    pub jobs: jobs::Jobs,
}

/// The request checks: token, Host, Origin.
pub struct Guard {
    token: String,
    /// `127.0.0.1:PORT` as the browser writes it in `Host`.
    host: String,
    /// `http://127.0.0.1:PORT`.
    origin: String,
    /// The cookie's name carries the port: cookies are not kept apart by
    /// port, and two servers on one host must not overwrite each other's.
    cookie: String,
}

impl Guard {
    pub fn new(addr: SocketAddr, token: String) -> Guard {
        let host = addr.to_string();
        Guard {
            token,
            origin: format!("http://{host}"),
            host,
            cookie: format!("sandpen-ui-{}", addr.port()),
        }
    }

    /// The URL to open: the token in the fragment, which the browser never sends.
    pub fn url(&self) -> String {
        format!("{}/#{}", self.origin, self.token)
    }

    fn token_ok(&self, headers: &HeaderMap) -> bool {
        let given = headers
            .get(TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| self.cookie_token(headers));
        given.is_some_and(|g| constant_time_eq(g.as_bytes(), self.token.as_bytes()))
    }

    fn cookie_token(&self, headers: &HeaderMap) -> Option<String> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == self.cookie)
            .map(|(_, v)| v.to_string())
    }

    /// Why a request is refused before its token is looked at, if it is.
    /// `open` (the bootstrap page) may be a navigation from another site:
    /// the page `sandpen ui` hands the browser is a local file.
    fn foreign(&self, headers: &HeaderMap, open: bool) -> Option<&'static str> {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        if host != Some(self.host.as_str()) {
            return Some("the Host header is not this server's address");
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            if origin.to_str().ok() != Some(self.origin.as_str()) {
                return Some("the request comes from another origin");
            }
        }
        if let Some(site) = headers.get("sec-fetch-site").filter(|_| !open) {
            if site.as_bytes() == b"cross-site" {
                return Some("the request comes from another site");
            }
        }
        None
    }

    pub fn set_cookie(&self) -> String {
        format!(
            "{}={}; Path=/; HttpOnly; SameSite=Strict",
            self.cookie, self.token
        )
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A new random token (64 hex digits).
pub fn new_token() -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| ApiError::io("no random numbers for the token", std::io::Error::other(e)))?;
    Ok(hex::encode(bytes))
}

/// An error as the API returns it: `{"error": "one readable sentence"}`
/// with a status from its kind.
pub struct HttpError {
    status: StatusCode,
    message: String,
}

impl HttpError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> HttpError {
        HttpError {
            status,
            message: message.into(),
        }
    }
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> HttpError {
        let status = match e.kind() {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::BadInput => StatusCode::BAD_REQUEST,
            ErrorKind::Host => StatusCode::INTERNAL_SERVER_ERROR,
        };
        HttpError::new(status, one_line(&e))
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

/// The checks every request passes, and the headers every response gets.
async fn guard(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let open = req.method() == Method::GET && matches!(req.uri().path(), "/" | "/boot.js");
    let refused = if let Some(why) = app.guard.foreign(req.headers(), open) {
        Some(HttpError::new(StatusCode::FORBIDDEN, why))
    } else if !open && !app.guard.token_ok(req.headers()) {
        Some(HttpError::new(
            StatusCode::UNAUTHORIZED,
            "no valid token: open the address that `sandpen ui` printed",
        ))
    } else {
        None
    };
    let mut resp = match refused {
        Some(e) => e.into_response(),
        None => next.run(req).await,
    };
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
             img-src 'self' data:; font-src 'self'; connect-src 'self'; \
             frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    resp
}

/// A bound, not yet serving, page server.
pub struct Server {
    listener: tokio::net::TcpListener,
    app: Arc<App>,
}

impl Server {
    /// Binds `addr` (port 0: a free one) with a new token.
    pub async fn bind(dirs: Dirs, addr: SocketAddr) -> Result<Server, ApiError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| ApiError::io(format!("listening on {addr}"), e))?;
        let local = listener
            .local_addr()
            .map_err(|e| ApiError::io("reading the bound address", e))?;
        let app = Arc::new(App {
            dirs,
            guard: Guard::new(local, new_token()?),
            jobs: jobs::Jobs::default(),
        });
        Ok(Server { listener, app })
    }

    /// `http://127.0.0.1:PORT/#TOKEN`.
    pub fn url(&self) -> String {
        self.app.guard.url()
    }

    /// Serves until the process ends.
    pub async fn serve(self) -> Result<(), ApiError> {
        let router = routes::router(self.app.clone()).layer(axum::middleware::from_fn_with_state(
            self.app.clone(),
            guard,
        ));
        axum::serve(self.listener, router)
            .await
            .map_err(|e| ApiError::io("serving the page", e))
    }
}

/// A static body with its type.
fn asset(content_type: &'static str, body: &'static [u8]) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        Body::from(body),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/openapi.json, the API's description for other clients.
    const OPENAPI: &str = include_str!("../../../../docs/openapi.json");

    /// The file and the server list the same methods on the same paths,
    /// and the file names this version.
    #[test]
    fn openapi_lists_exactly_the_routes_served() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        let methods = ["get", "put", "post", "delete", "patch", "head", "options"];
        let documented: std::collections::BTreeSet<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .unwrap()
                    .keys()
                    .filter(|k| methods.contains(&k.as_str()))
                    .map(move |m| (m.clone(), path.clone()))
            })
            .collect();
        let served: std::collections::BTreeSet<(String, String)> = served()
            .into_iter()
            .map(|(v, p)| (v.as_str().to_string(), p.to_string()))
            .collect();
        let missing: Vec<_> = served.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&served).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "served, not in docs/openapi.json: {missing:?}; in the file, not served: {extra:?}"
        );
        assert!(served.len() > 30, "{served:?}");
    }

    /// One request, as a client sends it; the status and the body.
    async fn request(port: u16, token: &str, method: &str, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let body = if method == "POST" { "{}" } else { "" };
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{TOKEN_HEADER}: {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut raw))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        let raw = String::from_utf8_lossy(&raw).into_owned();
        let status = raw
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = raw
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// Every route of the list reaches a handler of the running server:
    /// axum's own answers for a path or method it does not route (404 with
    /// no body, 405) never come back. Nothing exists in the state folder,
    /// so no request changes anything.
    #[tokio::test]
    async fn every_listed_route_is_served() {
        let root = tempfile::tempdir().unwrap();
        let dirs = Dirs {
            state: root.path().join("state"),
            data: root.path().join("data"),
            config: root.path().join("config"),
        };
        let server = Server::bind(dirs, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let url = server.url();
        let rest = url.strip_prefix("http://127.0.0.1:").unwrap();
        let (port, token) = rest.split_once("/#").unwrap();
        let (port, token): (u16, String) = (port.parse().unwrap(), token.to_string());
        tokio::spawn(server.serve());
        let unrouted =
            |status: u16, body: &str| status == 405 || (status == 404 && body.is_empty());
        // The control: what the router does not have.
        for (method, path) in [("GET", "/api/nosuch"), ("DELETE", "/api/setup")] {
            let (status, body) = request(port, &token, method, path).await;
            assert!(unrouted(status, &body), "{method} {path}: {status} {body}");
        }
        for (verb, path) in served() {
            let path = path
                .replace("{name}", "nosuch")
                .replace("{id}", "1")
                .replace("{file}", "app.js")
                .replace("{service}", "github");
            let method = verb.as_str().to_ascii_uppercase();
            let (status, body) = request(port, &token, &method, &path).await;
            assert!(
                !unrouted(status, &body) && status != 0,
                "{method} {path} is not served: {status} {body:?}"
            );
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn host_origin_and_token_are_checked() {
        let g = Guard::new("127.0.0.1:4000".parse().unwrap(), "t0k".into());
        assert_eq!(
            g.foreign(&headers(&[("host", "127.0.0.1:4000")]), false),
            None
        );
        assert!(g
            .foreign(&headers(&[("host", "evil.test:4000")]), false)
            .is_some());
        assert!(g
            .foreign(&headers(&[("host", "localhost:4000")]), false)
            .is_some());
        assert!(g.foreign(&headers(&[]), false).is_some());
        let cross = [("host", "127.0.0.1:4000"), ("sec-fetch-site", "cross-site")];
        assert!(g.foreign(&headers(&cross), false).is_some());
        assert_eq!(g.foreign(&headers(&cross), true), None);
        assert!(g
            .foreign(
                &headers(&[("host", "127.0.0.1:4000"), ("origin", "http://evil.test")]),
                false
            )
            .is_some());
        assert!(g
            .foreign(
                &headers(&[("host", "127.0.0.1:4000"), ("origin", "null")]),
                false
            )
            .is_some());
        assert_eq!(
            g.foreign(
                &headers(&[
                    ("host", "127.0.0.1:4000"),
                    ("origin", "http://127.0.0.1:4000")
                ]),
                false
            ),
            None
        );
        assert!(g.token_ok(&headers(&[("x-sandpen-token", "t0k")])));
        assert!(!g.token_ok(&headers(&[("x-sandpen-token", "t0K")])));
        assert!(!g.token_ok(&headers(&[])));
        assert!(g.token_ok(&headers(&[("cookie", "a=b; sandpen-ui-4000=t0k")])));
        assert!(!g.token_ok(&headers(&[("cookie", "sandpen-ui-4001=t0k")])));
    }
}
