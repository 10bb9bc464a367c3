//! Credential routes: which secret may go to which host, in which header.
//!
//! A route is plain data. [`apply`] is a pure function over a request's
//! headers; [`route_for`] and [`RouteTable::route_for`] match the request's
//! host exactly, so a request to any other host never gets a route, and so
//! never gets the secret. A route also names its port (443 unless a custom
//! route says otherwise): the proxy intercepts, and sends the secret, only
//! on that port ([`Route::serves`]).

use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The value the guest sees in place of a built-in route's secret.
pub const SENTINEL: &str = "proxy-managed";

/// Prefix of a custom route's generated placeholder.
pub const CUSTOM_PLACEHOLDER_PREFIX: &str = "sandpen-cs-";

/// How the secret is written into a header that the route adds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueFormat {
    /// The first `{}` is replaced by the secret, e.g. `Bearer {}`.
    Template(String),
    /// HTTP Basic auth with a fixed user and the secret as password, the
    /// form git uses (`x-access-token:SECRET`).
    Basic {
        /// The user name before the colon.
        user: String,
    },
}

impl ValueFormat {
    /// The header value for `secret`.
    pub fn render(&self, secret: &str) -> Vec<u8> {
        match self {
            ValueFormat::Template(t) => t.replacen("{}", secret, 1).into_bytes(),
            ValueFormat::Basic { user } => {
                format!("Basic {}", B64.encode(format!("{user}:{secret}"))).into_bytes()
            }
        }
    }
}

/// A header in which a route's sentinel is swapped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderRule {
    /// Header name, lowercase (matched case-insensitively).
    pub name: String,
    /// Format used when the route adds this header.
    pub format: ValueFormat,
}

/// One credential route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Service name: the key of the secret in the store (`anthropic`, …).
    pub service: String,
    /// Exact host names, lowercase, without port.
    pub hosts: Vec<String>,
    /// The one port the route serves (HTTPS: 443).
    #[serde(default = "https_port")]
    pub port: u16,
    /// Headers where the sentinel is swapped. The first one is added when
    /// the request carries none of them.
    pub headers: Vec<HeaderRule>,
    /// What the guest sees instead of the secret.
    pub sentinel: String,
    /// Guest environment variable set to the sentinel, if any.
    pub guest_env: Option<String>,
}

impl Route {
    /// A custom route for one host, with a fresh `sandpen-cs-<16 hex>`
    /// placeholder as its sentinel. `format` must contain `{}`.
    pub fn custom(
        service: &str,
        host: &str,
        header: &str,
        format: &str,
    ) -> Result<Route, RouteError> {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).map_err(|e| RouteError::Random(e.to_string()))?;
        let placeholder = format!(
            "{CUSTOM_PLACEHOLDER_PREFIX}{}",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        Route::custom_with_placeholder(service, host, header, format, &placeholder)
    }

    /// Like [`Route::custom`] with a known placeholder (to rebuild a saved
    /// route).
    pub fn custom_with_placeholder(
        service: &str,
        host: &str,
        header: &str,
        format: &str,
        placeholder: &str,
    ) -> Result<Route, RouteError> {
        if service.is_empty()
            || !service
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(RouteError::InvalidService(service.to_string()));
        }
        // `host` or `host:port`.
        let (host, port) = match host.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => match p.parse::<u16>() {
                Ok(p) if p != 0 => (h, p),
                _ => return Err(RouteError::InvalidHost(host.to_string())),
            },
            _ => (host, https_port()),
        };
        let host = normalize_host(host);
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'[' | b']'))
        {
            return Err(RouteError::InvalidHost(host));
        }
        if header.is_empty() || !header.bytes().all(is_token_byte) {
            return Err(RouteError::InvalidHeader(header.to_string()));
        }
        if !format.contains("{}") || format.bytes().any(|b| b.is_ascii_control()) {
            return Err(RouteError::InvalidFormat(format.to_string()));
        }
        if placeholder.len() < 8 || !placeholder.bytes().all(is_token_byte) {
            return Err(RouteError::InvalidPlaceholder);
        }
        Ok(Route {
            service: service.to_string(),
            hosts: vec![host],
            port,
            headers: vec![HeaderRule {
                name: header.to_ascii_lowercase(),
                format: ValueFormat::Template(format.to_string()),
            }],
            sentinel: placeholder.to_string(),
            guest_env: None,
        })
    }

    /// Whether this route serves `host` (exact match, case-insensitive,
    /// one trailing dot ignored), on any port.
    pub fn matches_host(&self, host: &str) -> bool {
        let host = normalize_host(host);
        self.hosts.contains(&host)
    }

    /// Whether this route serves `host` on `port`: only then does a
    /// connection get the secret.
    pub fn serves(&self, host: &str, port: u16) -> bool {
        port == self.port && self.matches_host(host)
    }
}

fn https_port() -> u16 {
    443
}

/// Errors building a route.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("invalid service name {0:?}: use letters, digits, '-', '_' or '.'")]
    InvalidService(String),
    #[error("invalid host {0:?}")]
    InvalidHost(String),
    #[error("invalid header name {0:?}")]
    InvalidHeader(String),
    #[error("invalid format {0:?}: it must contain {{}} and no control characters")]
    InvalidFormat(String),
    #[error("invalid placeholder")]
    InvalidPlaceholder,
    #[error("host {host} already has a credential route ({service})")]
    HostTaken { host: String, service: String },
    #[error("no random numbers for a placeholder: {0}")]
    Random(String),
}

/// What [`apply`] did to the headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The sentinel was replaced in this many header values.
    Swapped(usize),
    /// None of the route's headers was present; the first was added.
    Added,
    /// The route's header was present without the sentinel; nothing changed.
    Unchanged,
}

/// Errors from [`apply`]. They never contain the secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApplyError {
    #[error("the secret for {service} is empty")]
    EmptySecret { service: String },
    #[error("the secret for {service} contains control characters and cannot go in a header")]
    ControlCharacters { service: String },
    #[error("route {service} names no header")]
    NoHeader { service: String },
}

/// Swaps `route`'s sentinel for `secret` in the route's headers only.
///
/// - In each of the route's headers, every occurrence of the sentinel is
///   replaced; in a `Basic` value, the sentinel is also replaced inside the
///   base64-decoded `user:password`.
/// - If none of the route's headers is present, the first is added.
/// - Every other header is left byte for byte as it was.
///
/// The caller must have chosen `route` with [`route_for`] for the request's
/// host; this function does not look at the host.
pub fn apply(
    route: &Route,
    headers: &mut Vec<(String, Vec<u8>)>,
    secret: &str,
) -> Result<Applied, ApplyError> {
    if secret.is_empty() {
        return Err(ApplyError::EmptySecret {
            service: route.service.clone(),
        });
    }
    if secret.bytes().any(|b| b.is_ascii_control()) {
        return Err(ApplyError::ControlCharacters {
            service: route.service.clone(),
        });
    }
    let first = route.headers.first().ok_or_else(|| ApplyError::NoHeader {
        service: route.service.clone(),
    })?;
    let sentinel = route.sentinel.as_bytes();
    let mut present = false;
    let mut swapped = 0;
    for (name, value) in headers.iter_mut() {
        if !route
            .headers
            .iter()
            .any(|r| r.name.eq_ignore_ascii_case(name))
        {
            continue;
        }
        present = true;
        if let Some(new) = swap_value(value, sentinel, secret.as_bytes()) {
            *value = new;
            swapped += 1;
        }
    }
    if swapped > 0 {
        Ok(Applied::Swapped(swapped))
    } else if present {
        Ok(Applied::Unchanged)
    } else {
        headers.push((first.name.clone(), first.format.render(secret)));
        Ok(Applied::Added)
    }
}

/// Headers that carry an API credential, besides a route's own: the
/// generic ones, Azure's (`api-key`, `ocp-apim-subscription-key`), Google's
/// (`x-goog-api-key`), GitLab's (`private-token`), Cloudflare's
/// (`x-auth-key`) and an AWS session token. `Proxy-Authorization` never
/// reaches an upstream (it is hop-by-hop), and `Cookie` is dropped rather
/// than refused (see `crates/proxy/src/mitm.rs`).
const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "x-auth-token",
    "x-access-token",
    "x-api-token",
    "ocp-apim-subscription-key",
    "private-token",
    "x-auth-key",
    "x-amz-security-token",
];

/// Query parameters that carry an API credential (`?key=` for Google's),
/// or sign a request for an account (pre-signed S3 and GCS URLs, Azure SAS
/// `sig`).
const CREDENTIAL_PARAMS: &[&str] = &[
    "key",
    "api_key",
    "apikey",
    "access_token",
    "token",
    "auth",
    "auth_token",
    "access_key",
    "private_token",
    "client_secret",
    "sig",
    "signature",
    "x-amz-credential",
    "x-amz-signature",
    "x-amz-security-token",
    "x-goog-credential",
    "x-goog-signature",
];

/// A credential in a request that is not `route`'s sentinel: a route header
/// whose value is not one of the sentinel's forms, another credential
/// header, or a credential query parameter. `None` when the request carries
/// only the sentinel (or no credential, so that [`apply`] adds the user's).
/// After `secret-read` the proxy refuses such a request
/// (`flow: foreign-credential`): the guest could otherwise upload a secret
/// to a trusted sink under an account of its own. Names, never values, come
/// back.
pub fn foreign_credential(
    route: &Route,
    headers: &[(String, Vec<u8>)],
    query: Option<&str>,
) -> Option<String> {
    let sentinel = route.sentinel.as_bytes();
    for (name, value) in headers {
        let own = route
            .headers
            .iter()
            .any(|r| r.name.eq_ignore_ascii_case(name));
        if own {
            if swap_value(value, sentinel, b"x").is_none() {
                return Some(format!("header {}", name.to_ascii_lowercase()));
            }
        } else if CREDENTIAL_HEADERS
            .iter()
            .any(|c| c.eq_ignore_ascii_case(name))
        {
            return Some(format!("header {}", name.to_ascii_lowercase()));
        }
    }
    // The server reads `%6Bey` and `key;x` (some split on `;` too) as `key`.
    for pair in query.unwrap_or_default().split(['&', ';']) {
        let raw = pair.split('=').next().unwrap_or_default();
        let key = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
        let key = key.trim();
        if CREDENTIAL_PARAMS
            .iter()
            .any(|c| c.eq_ignore_ascii_case(key))
        {
            return Some(format!("query parameter {}", key.to_ascii_lowercase()));
        }
    }
    None
}

/// The swapped value, or `None` when `value` is not one of the forms the
/// sentinel may take. Only whole forms are swapped: the sentinel alone,
/// `SCHEME SENTINEL` (`Bearer`, `token`, a custom format's prefix), or
/// `Basic base64(user:SENTINEL)`. A guest that wraps the sentinel in its own
/// text (`Bearer XXproxy-managed`) gets nothing: an upstream that quotes part
/// of a bad key back would otherwise leak the secret's characters to it.
fn swap_value(value: &[u8], sentinel: &[u8], secret: &[u8]) -> Option<Vec<u8>> {
    let value = value.trim_ascii();
    if value == sentinel {
        return Some(secret.to_vec());
    }
    let (scheme, rest) = split_scheme(value)?;
    let rest = rest.trim_ascii();
    if rest == sentinel {
        let mut out = scheme.to_vec();
        out.push(b' ');
        out.extend_from_slice(secret);
        return Some(out);
    }
    // `Basic base64(user:password)`: the sentinel is hidden by base64.
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let decoded = B64.decode(rest).ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    if &decoded[colon + 1..] != sentinel {
        return None;
    }
    let mut plain = decoded[..=colon].to_vec();
    plain.extend_from_slice(secret);
    let mut out = scheme.to_vec();
    out.push(b' ');
    out.extend_from_slice(B64.encode(plain).as_bytes());
    Some(out)
}

fn split_scheme(value: &[u8]) -> Option<(&[u8], &[u8])> {
    let sp = value.iter().position(|&b| b == b' ')?;
    let scheme = &value[..sp];
    if scheme.is_empty() || !scheme.iter().all(|&b| is_token_byte(b)) {
        return None;
    }
    Some((scheme, &value[sp + 1..]))
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn normalize_host(host: &str) -> String {
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

fn template(name: &str, format: &str) -> HeaderRule {
    HeaderRule {
        name: name.to_string(),
        format: ValueFormat::Template(format.to_string()),
    }
}

fn builtin(service: &str, hosts: &[&str], headers: Vec<HeaderRule>, env: &str) -> Route {
    Route {
        service: service.to_string(),
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        port: https_port(),
        headers,
        sentinel: SENTINEL.to_string(),
        guest_env: Some(env.to_string()),
    }
}

/// The built-in routes. GitHub has two: the API (`Bearer`; `gh` sends
/// `token …`, which the swap also covers) and git over HTTPS on
/// `github.com` (Basic with `x-access-token`). Both use the `github` secret.
pub fn builtin_routes() -> &'static [Route] {
    static ROUTES: OnceLock<Vec<Route>> = OnceLock::new();
    ROUTES.get_or_init(|| {
        vec![
            builtin(
                "anthropic",
                &["api.anthropic.com"],
                // OAuth tokens travel as `Authorization: Bearer`.
                vec![
                    template("x-api-key", "{}"),
                    template("authorization", "Bearer {}"),
                ],
                "ANTHROPIC_API_KEY",
            ),
            builtin(
                "openai",
                &["api.openai.com"],
                vec![template("authorization", "Bearer {}")],
                "OPENAI_API_KEY",
            ),
            builtin(
                "github",
                &["api.github.com"],
                vec![template("authorization", "Bearer {}")],
                "GH_TOKEN",
            ),
            builtin(
                "github",
                &["github.com"],
                vec![HeaderRule {
                    name: "authorization".to_string(),
                    format: ValueFormat::Basic {
                        user: "x-access-token".to_string(),
                    },
                }],
                "GH_TOKEN",
            ),
            builtin(
                "google",
                &["generativelanguage.googleapis.com"],
                vec![template("x-goog-api-key", "{}")],
                "GEMINI_API_KEY",
            ),
        ]
    })
}

/// The built-in route for `host`, if any (exact host match).
pub fn route_for(host: &str) -> Option<&'static Route> {
    builtin_routes().iter().find(|r| r.matches_host(host))
}

/// Built-in routes plus custom ones; at most one route per host.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl Default for RouteTable {
    fn default() -> Self {
        RouteTable {
            routes: builtin_routes().to_vec(),
        }
    }
}

impl RouteTable {
    /// The built-in routes only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a custom route; refuses a host that already has a route.
    pub fn add(&mut self, route: Route) -> Result<(), RouteError> {
        for host in &route.hosts {
            if let Some(existing) = self.route_for(host) {
                return Err(RouteError::HostTaken {
                    host: host.clone(),
                    service: existing.service.clone(),
                });
            }
        }
        self.routes.push(route);
        Ok(())
    }

    /// The route for `host`, if any (exact host match).
    pub fn route_for(&self, host: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches_host(host))
    }

    /// All routes.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Guest environment (`NAME`, sentinel), one entry per variable.
    pub fn guest_env(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for r in &self.routes {
            if let Some(var) = &r.guest_env {
                if !out.iter().any(|(v, _)| v == var) {
                    out.push((var.clone(), r.sentinel.clone()));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "sk-REAL-SECRET-123";

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    fn get<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Vec<&'a [u8]> {
        headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    #[test]
    fn anthropic_swaps_sentinel_in_its_header() {
        let route = route_for("api.anthropic.com").expect("route");
        let mut headers = h(&[
            ("Host", "api.anthropic.com"),
            ("X-Api-Key", "proxy-managed"),
        ]);
        assert_eq!(apply(route, &mut headers, SECRET), Ok(Applied::Swapped(1)));
        assert_eq!(get(&headers, "x-api-key"), vec![SECRET.as_bytes()]);
        assert_eq!(get(&headers, "host"), vec![b"api.anthropic.com".as_slice()]);
    }

    #[test]
    fn anthropic_oauth_bearer_is_swapped_without_adding_api_key() {
        let route = route_for("api.anthropic.com").expect("route");
        let mut headers = h(&[("authorization", "Bearer proxy-managed")]);
        assert_eq!(apply(route, &mut headers, SECRET), Ok(Applied::Swapped(1)));
        assert_eq!(
            get(&headers, "authorization"),
            vec![format!("Bearer {SECRET}").as_bytes()]
        );
        assert!(get(&headers, "x-api-key").is_empty());
    }

    #[test]
    fn a_sentinel_wrapped_in_guest_text_is_not_swapped() {
        // Upstreams quote parts of bad keys back; a guest must not be able to
        // frame the secret so that an error message shows it.
        let route = route_for("api.openai.com").expect("route");
        for value in [
            "Bearer XXproxy-managed",
            "Bearer proxy-managedXX",
            "Bearer proxy-managed proxy-managed",
            "proxy-managed-suffix",
        ] {
            let mut headers = h(&[("authorization", value)]);
            assert_eq!(
                apply(route, &mut headers, SECRET),
                Ok(Applied::Unchanged),
                "{value}"
            );
            assert_eq!(get(&headers, "authorization"), vec![value.as_bytes()]);
        }
        let git = route_for("github.com").expect("route");
        let framed = format!("Basic {}", B64.encode("x-access-token:XXproxy-managed"));
        let mut headers = h(&[("authorization", framed.as_str())]);
        assert_eq!(apply(git, &mut headers, SECRET), Ok(Applied::Unchanged));
    }

    #[test]
    fn sentinel_in_another_header_stays_unchanged() {
        let route = route_for("api.openai.com").expect("route");
        let mut headers = h(&[
            ("authorization", "Bearer proxy-managed"),
            ("x-note", "proxy-managed"),
            ("cookie", "a=proxy-managed"),
        ]);
        assert_eq!(apply(route, &mut headers, SECRET), Ok(Applied::Swapped(1)));
        assert_eq!(get(&headers, "x-note"), vec![b"proxy-managed".as_slice()]);
        assert_eq!(get(&headers, "cookie"), vec![b"a=proxy-managed".as_slice()]);
        assert_eq!(
            get(&headers, "authorization"),
            vec![format!("Bearer {SECRET}").as_bytes()]
        );
    }

    #[test]
    fn absent_header_is_added_in_route_format() {
        let route = route_for("api.openai.com").expect("route");
        let mut headers = h(&[("accept", "*/*")]);
        assert_eq!(apply(route, &mut headers, SECRET), Ok(Applied::Added));
        assert_eq!(
            get(&headers, "authorization"),
            vec![format!("Bearer {SECRET}").as_bytes()]
        );
        assert_eq!(get(&headers, "accept"), vec![b"*/*".as_slice()]);

        let google = route_for("generativelanguage.googleapis.com").expect("route");
        let mut headers = Vec::new();
        assert_eq!(apply(google, &mut headers, SECRET), Ok(Applied::Added));
        assert_eq!(get(&headers, "x-goog-api-key"), vec![SECRET.as_bytes()]);
    }

    #[test]
    fn present_header_without_sentinel_is_left_alone() {
        let route = route_for("api.openai.com").expect("route");
        let mut headers = h(&[("authorization", "Bearer guest-own-key")]);
        let before = headers.clone();
        assert_eq!(apply(route, &mut headers, SECRET), Ok(Applied::Unchanged));
        assert_eq!(headers, before);
    }

    #[test]
    fn other_host_gets_nothing() {
        assert!(route_for("evil.example.com").is_none());
        assert!(route_for("api.anthropic.com.evil.example").is_none());
        assert!(route_for("anthropic.com").is_none());
        assert!(route_for("xapi.openai.com").is_none());
        assert!(route_for("gist.github.com").is_none());
        // Same host, other spelling: still the route.
        assert_eq!(
            route_for("API.Anthropic.COM.").map(|r| r.service.as_str()),
            Some("anthropic")
        );
        let table = RouteTable::new();
        assert!(table.route_for("example.org").is_none());
    }

    #[test]
    fn git_basic_auth_with_sentinel_password_is_swapped() {
        let route = route_for("github.com").expect("route");
        let guest = format!("Basic {}", B64.encode("x-access-token:proxy-managed"));
        let mut headers = h(&[("Authorization", &guest)]);
        assert_eq!(apply(route, &mut headers, SECRET), Ok(Applied::Swapped(1)));
        let want = format!("Basic {}", B64.encode(format!("x-access-token:{SECRET}")));
        assert_eq!(get(&headers, "authorization"), vec![want.as_bytes()]);
    }

    #[test]
    fn git_adds_basic_when_absent() {
        let route = route_for("github.com").expect("route");
        let mut headers = Vec::new();
        assert_eq!(apply(route, &mut headers, SECRET), Ok(Applied::Added));
        let want = format!("Basic {}", B64.encode(format!("x-access-token:{SECRET}")));
        assert_eq!(get(&headers, "authorization"), vec![want.as_bytes()]);
    }

    #[test]
    fn basic_without_sentinel_is_unchanged() {
        let route = route_for("github.com").expect("route");
        let guest = format!("Basic {}", B64.encode("me:my-own-password"));
        let mut headers = h(&[("authorization", &guest)]);
        assert_eq!(apply(route, &mut headers, SECRET), Ok(Applied::Unchanged));
        assert_eq!(get(&headers, "authorization"), vec![guest.as_bytes()]);
    }

    #[test]
    fn gh_token_and_bearer_forms_are_swapped() {
        let route = route_for("api.github.com").expect("route");
        for form in ["token", "Bearer"] {
            let mut headers = h(&[("authorization", &format!("{form} proxy-managed"))]);
            assert_eq!(apply(route, &mut headers, SECRET), Ok(Applied::Swapped(1)));
            assert_eq!(
                get(&headers, "authorization"),
                vec![format!("{form} {SECRET}").as_bytes()]
            );
        }
    }

    #[test]
    fn secret_with_newline_is_refused_and_not_echoed() {
        let route = route_for("api.openai.com").expect("route");
        let mut headers = h(&[("authorization", "Bearer proxy-managed")]);
        let err = apply(route, &mut headers, "abc\r\nx-injected: 1").unwrap_err();
        assert!(!err.to_string().contains("abc"));
        assert_eq!(
            get(&headers, "authorization"),
            vec![b"Bearer proxy-managed".as_slice()]
        );
    }

    #[test]
    fn custom_route_uses_generated_placeholder() {
        let route = Route::custom("mytoken", "API.example.com", "Authorization", "Token {}")
            .expect("custom");
        let hex = route
            .sentinel
            .strip_prefix(CUSTOM_PLACEHOLDER_PREFIX)
            .expect("prefix");
        assert_eq!(hex.len(), 16);
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
        let other = Route::custom("mytoken", "api.example.com", "Authorization", "Token {}")
            .expect("custom");
        assert_ne!(route.sentinel, other.sentinel);

        let mut table = RouteTable::new();
        table.add(route.clone()).expect("add");
        let r = table.route_for("api.example.com").expect("route");
        let mut headers = h(&[
            ("authorization", &format!("Token {}", route.sentinel)),
            ("x-api-key", "proxy-managed"),
        ]);
        assert_eq!(apply(r, &mut headers, SECRET), Ok(Applied::Swapped(1)));
        assert_eq!(
            get(&headers, "authorization"),
            vec![format!("Token {SECRET}").as_bytes()]
        );
        assert_eq!(
            get(&headers, "x-api-key"),
            vec![b"proxy-managed".as_slice()]
        );
        // A built-in sentinel does not unlock a custom route.
        let mut headers = h(&[("authorization", "Token proxy-managed")]);
        assert_eq!(apply(r, &mut headers, SECRET), Ok(Applied::Unchanged));
    }

    #[test]
    fn a_route_serves_its_port_only() {
        let r = route_for("api.anthropic.com").unwrap();
        assert!(r.serves("API.anthropic.com.", 443));
        assert!(!r.serves("api.anthropic.com", 8443));
        let c = Route::custom("x", "api.example.com:8443", "Authorization", "{}").unwrap();
        assert_eq!((c.hosts[0].as_str(), c.port), ("api.example.com", 8443));
        assert!(c.serves("api.example.com", 8443));
        assert!(!c.serves("api.example.com", 443));
        assert!(Route::custom("x", "api.example.com:0", "Authorization", "{}").is_err());
        assert!(Route::custom("x", "api.example.com:https", "Authorization", "{}").is_err());
        // A route saved before routes had ports serves 443.
        let old: Route = serde_json::from_str(
            r#"{"service":"x","hosts":["a.example"],"headers":[],"sentinel":"sandpen-cs-00","guest_env":null}"#,
        )
        .unwrap();
        assert_eq!(old.port, 443);
    }

    #[test]
    fn only_the_sentinel_is_not_a_foreign_credential() {
        let r = route_for("api.anthropic.com").unwrap();
        let none: Vec<(String, Vec<u8>)> = Vec::new();
        assert_eq!(foreign_credential(r, &none, None), None);
        assert_eq!(
            foreign_credential(r, &h(&[("X-Api-Key", "proxy-managed")]), Some("a=1")),
            None
        );
        assert_eq!(
            foreign_credential(r, &h(&[("authorization", "Bearer proxy-managed")]), None),
            None
        );
        for (headers, query, what) in [
            (h(&[("x-api-key", "sk-attacker")]), None, "header x-api-key"),
            (
                h(&[
                    ("x-api-key", "proxy-managed"),
                    ("Authorization", "Bearer sk-attacker"),
                ]),
                None,
                "header authorization",
            ),
            (
                h(&[("x-goog-api-key", "AIza-attacker")]),
                None,
                "header x-goog-api-key",
            ),
            (h(&[]), Some("x=1&KEY=AIza-attacker"), "query parameter key"),
            (
                h(&[]),
                Some("x=1&%6Bey=AIza-attacker"),
                "query parameter key",
            ),
            (h(&[]), Some("x=1;key=AIza-attacker"), "query parameter key"),
            (
                h(&[]),
                Some("X-Amz-Credential=AKIA%2F20261204&X-Amz-Signature=ab"),
                "query parameter x-amz-credential",
            ),
            (h(&[]), Some("sv=2024&sig=abc"), "query parameter sig"),
            (
                h(&[("Ocp-Apim-Subscription-Key", "attacker")]),
                None,
                "header ocp-apim-subscription-key",
            ),
            (
                h(&[("PRIVATE-TOKEN", "glpat-attacker")]),
                None,
                "header private-token",
            ),
        ] {
            assert_eq!(
                foreign_credential(r, &headers, query).as_deref(),
                Some(what)
            );
        }
    }

    #[test]
    fn custom_route_validation() {
        assert!(Route::custom("x", "api.example.com", "Authorization", "no placeholder").is_err());
        assert!(Route::custom("x", "api.example.com", "Bad Header", "{}").is_err());
        assert!(Route::custom("x", "", "Authorization", "{}").is_err());
        assert!(Route::custom("", "api.example.com", "Authorization", "{}").is_err());
        let mut table = RouteTable::new();
        let taken = Route::custom("x", "api.openai.com", "Authorization", "{}").expect("route");
        assert!(matches!(
            table.add(taken),
            Err(RouteError::HostTaken { .. })
        ));
    }

    #[test]
    fn guest_env_is_deduplicated_sentinels() {
        let env = RouteTable::new().guest_env();
        let names: Vec<&str> = env.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "ANTHROPIC_API_KEY",
                "OPENAI_API_KEY",
                "GH_TOKEN",
                "GEMINI_API_KEY"
            ]
        );
        assert!(env.iter().all(|(_, v)| v == SENTINEL));
    }
}
