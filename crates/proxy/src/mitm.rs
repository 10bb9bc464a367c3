//! TLS interception for hosts with a credential route (docs/credentials.md).
//!
//! A connection is intercepted only when the claimed host and port have a
//! credential route *and* a secret is set for that route's service; every
//! other connection stays a byte tunnel. Then:
//!
//! - the guest's TLS is terminated with a leaf minted by the sandbox CA for
//!   the claimed host (whose ClientHello SNI was already checked);
//! - each HTTP request (HTTP/1.1 or HTTP/2, as ALPN chose) must name the
//!   same host, gets the route's sentinel swapped for the secret by
//!   [`sandpen_credentials::apply`], and goes to the real upstream over a new
//!   TLS connection verified against the platform roots plus any
//!   `--upstream-ca`, at an address the policy checked;
//! - bodies stream frame by frame both ways (SSE arrives chunk by chunk);
//! - once the sandbox carries `secret-read`, a request that carries any
//!   credential other than the sentinel (another key in the route's header,
//!   another credential header, `?key=`) is refused, `403` and
//!   `flow: foreign-credential`: a trusted sink takes only the user's own
//!   credential, so the guest cannot upload a secret to an account of its own;
//!   its `Cookie` headers are dropped (a cookie can be another account's
//!   session; a client's cookie jar holding the CDN's cookies keeps working);
//! - each request is one audit record, with `credential: SERVICE (SCOPE)`.
//!   The secret itself is never logged: it only ever sits in the outgoing
//!   header, marked sensitive so HTTP/2 never indexes it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sandpen_credentials::{
    apply, foreign_credential, Applied, Found, Route, SandboxCa, SecretValue,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::audit::ConnectionReport;
use crate::exchange::{
    millis, own_reply, strip_hop_by_hop, Audited, Counted, GuestIo, Outbox, Pending, ReplyBody,
    RequestLog,
};
use crate::relay::Activity;
use crate::toolcache::{self, ArtifactHost, FileBody, Teed, ToolCache};
use crate::{http as h1, truncate, LiveCheck, Proxy, POLICY_CHANGED};
use sandpen_policy::Label;

/// Where the proxy gets credential routes and secrets. The supervisor reads
/// its secret store here on each intercepted connection, so `sandpen secret
/// set` applies from the next connection on.
pub trait CredentialSource: Send + Sync {
    /// The credential route for `host`, if any (exact host match).
    fn route_for(&self, host: &str) -> Option<Route>;
    /// The secret for `service` as this sandbox sees it (its own scope
    /// first, then global). An error fails the connection closed.
    fn secret(&self, service: &str) -> Result<Option<Found>, String>;
}

/// Errors preparing interception.
#[derive(Debug, thiserror::Error)]
pub enum MitmError {
    #[error("cannot read upstream CA {}: {source}", path.display())]
    ReadCa { path: PathBuf, source: io::Error },
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("bad certificate in {}: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// The interception engine of one sandbox: its CA, the upstream trust, and
/// the credential source.
pub struct Mitm {
    ca: Arc<SandboxCa>,
    upstream: tokio_rustls::TlsConnector,
    source: Arc<dyn CredentialSource>,
    /// Intercepted requests in flight in this sandbox, across connections.
    inflight: Arc<Semaphore>,
    clients: Arc<UpstreamClients>,
    /// The host's toolchain cache, when the sandbox uses one
    /// (docs/dev-env.md): its artifact hosts are intercepted too.
    cache: Option<Arc<ToolCache>>,
}

/// The upstream clients of one sandbox's intercepted connections, one per
/// host, port and set of checked addresses. A new guest connection to a
/// model API reuses the TLS connections (and HTTP/2 sessions) that earlier
/// ones left idle, rather than paying a handshake to a distant server; each
/// of its requests is still checked and logged on its own.
#[derive(Default)]
struct UpstreamClients {
    by_target: Mutex<HashMap<ClientKey, UpstreamClient>>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    host: String,
    port: u16,
    addrs: Vec<IpAddr>,
}

/// Upstream clients kept per sandbox.
const MAX_UPSTREAM_CLIENTS: usize = 16;
/// Idle upstream connections each of them keeps: as many as the guest
/// connections of a busy agent use at once (HTTP/1.1 needs one per request
/// in flight).
const MAX_IDLE_PER_TARGET: usize = 32;

impl UpstreamClients {
    fn get_or_build(
        &self,
        key: ClientKey,
        build: impl FnOnce() -> UpstreamClient,
    ) -> UpstreamClient {
        let mut map = match self.by_target.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(c) = map.get(&key) {
            return c.clone();
        }
        if map.len() >= MAX_UPSTREAM_CLIENTS {
            // Any one makes room; its idle connections close with it.
            if let Some(old) = map.keys().next().cloned() {
                map.remove(&old);
            }
        }
        let client = build();
        map.insert(key, client.clone());
        client
    }
}

/// Intercepted requests one sandbox may have in flight at once; each can
/// hold an upstream connection and stream buffers.
pub const MAX_INFLIGHT_REQUESTS: usize = 256;
/// HTTP/2 streams per intercepted guest connection.
const MAX_GUEST_STREAMS: u32 = 32;
/// Bytes HTTP/2 buffers per stream toward a guest that stops reading.
const MAX_GUEST_SEND_BUF: usize = 64 * 1024;
/// HTTP/2 flow-control windows toward upstreams.
const UPSTREAM_STREAM_WINDOW: u32 = 256 * 1024;
const UPSTREAM_CONN_WINDOW: u32 = 1024 * 1024;

impl std::fmt::Debug for Mitm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mitm").field("ca", &self.ca).finish()
    }
}

impl Mitm {
    /// Interception with the sandbox's CA, the TLS client configuration for
    /// upstreams (see [`upstream_tls`]), and where secrets come from.
    pub fn new(
        ca: Arc<SandboxCa>,
        upstream: rustls::ClientConfig,
        source: Arc<dyn CredentialSource>,
    ) -> Mitm {
        Mitm {
            ca,
            upstream: tokio_rustls::TlsConnector::from(Arc::new(upstream)),
            source,
            inflight: Arc::new(Semaphore::new(MAX_INFLIGHT_REQUESTS)),
            clients: Arc::default(),
            cache: None,
        }
    }

    /// Intercepts the toolchain hosts of [`crate::toolcache::ARTIFACT_HOSTS`]
    /// too (those without a credential route), answering their versioned
    /// downloads from `cache` and filling it with what the vendor sends.
    pub fn with_cache(mut self, cache: ToolCache) -> Mitm {
        self.cache = Some(Arc::new(cache));
        self
    }

    /// The route and secret for `host:port`, when it is to be intercepted:
    /// a route's host on another port than the route's is a plain tunnel,
    /// and gets no secret.
    pub(crate) fn plan(&self, host: &str, port: u16) -> Result<Option<Plan>, String> {
        let credential = match self.source.route_for(host).filter(|r| r.serves(host, port)) {
            Some(route) => self
                .source
                .secret(&route.service)?
                .map(|found| (route, found)),
            None => None,
        };
        let cache = match (&self.cache, toolcache::artifact_host(host)) {
            (Some(cache), Some(artifacts)) => Some((cache.clone(), artifacts)),
            _ => None,
        };
        if credential.is_none() && cache.is_none() {
            return Ok(None);
        }
        Ok(Some(Plan {
            credential,
            cache,
            ca: self.ca.clone(),
            upstream: self.upstream.clone(),
            inflight: self.inflight.clone(),
            clients: self.clients.clone(),
        }))
    }
}

/// What an intercepted connection uses.
pub(crate) struct Plan {
    /// The credential route and its secret; none for a toolchain host
    /// intercepted only for the cache.
    credential: Option<(Route, Found)>,
    cache: Option<(Arc<ToolCache>, &'static ArtifactHost)>,
    ca: Arc<SandboxCa>,
    upstream: tokio_rustls::TlsConnector,
    inflight: Arc<Semaphore>,
    clients: Arc<UpstreamClients>,
}

impl Plan {
    /// `anthropic (global)`: the audit's credential field.
    pub(crate) fn label(&self) -> Option<String> {
        self.credential
            .as_ref()
            .map(|(route, found)| format!("{} ({})", route.service, found.scope))
    }
}

fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS client configuration for upstreams: the platform's roots (which
/// include a corporate proxy's CA where the host trusts one) plus each
/// `extra` PEM file, ALPN `h2` and `http/1.1`.
pub fn upstream_tls(extra: &[PathBuf]) -> Result<rustls::ClientConfig, MitmError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!("platform certificate not loaded: {e}");
    }
    roots.add_parsable_certificates(native.certs);
    for path in extra {
        for cert in read_pem_certs(path)? {
            roots.add(cert).map_err(|e| MitmError::BadCertificate {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        }
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(crypto())
        .with_safe_default_protocol_versions()
        .map_err(|e| MitmError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Every certificate in a PEM file; at least one.
pub fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, MitmError> {
    let bytes = std::fs::read(path).map_err(|source| MitmError::ReadCa {
        path: path.to_path_buf(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| MitmError::BadCertificate {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(MitmError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Serves the one leaf minted for the claimed host, whatever the SNI (the
/// SNI was checked against the claimed host before interception).
#[derive(Debug)]
struct OneLeaf(Arc<CertifiedKey>);

impl ResolvesServerCert for OneLeaf {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

fn server_tls(leaf: Arc<CertifiedKey>) -> Result<rustls::ServerConfig, String> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(crypto())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(OneLeaf(leaf)));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Connects to the checked addresses only, whatever URI the client asks
/// for (the URI's host is the claimed host: requests for others are refused
/// before they get here), and verifies the upstream's certificate for the
/// claimed host.
#[derive(Clone)]
struct UpstreamConnector {
    host: Arc<str>,
    port: u16,
    addrs: Arc<[IpAddr]>,
    tls: tokio_rustls::TlsConnector,
    timeout: Duration,
}

/// The address an upstream connection went to: hyper puts it in the
/// extensions of every response that came over it, for the audit record.
#[derive(Clone, Copy)]
struct UpstreamAddr(SocketAddr);

/// An upstream TLS connection, telling hyper whether ALPN chose HTTP/2.
struct UpstreamIo {
    io: TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    h2: bool,
    addr: SocketAddr,
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        let c = Connected::new().extra(UpstreamAddr(self.addr));
        if self.h2 {
            c.negotiated_h2()
        } else {
            c
        }
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<UpstreamIo>> + Send>>;

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = UpstreamIo;
    type Error = io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let name = ServerName::try_from(this.host.to_string())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            for ip in this.addrs.iter() {
                let sa = SocketAddr::new(*ip, this.port);
                let tcp = match tokio::time::timeout(this.timeout, TcpStream::connect(sa)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        last = io::Error::new(e.kind(), format!("connect {sa}: {e}"));
                        continue;
                    }
                    Err(_) => {
                        last = io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("connect {sa}: timed out"),
                        );
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let tls = tokio::time::timeout(this.timeout, this.tls.connect(name, tcp))
                    .await
                    .map_err(|_| {
                        io::Error::new(io::ErrorKind::TimedOut, "upstream TLS handshake timed out")
                    })?
                    .map_err(|e| io::Error::new(e.kind(), format!("upstream-tls: {e}")))?;
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                return Ok(UpstreamIo {
                    io: TokioIo::new(tls),
                    h2,
                    addr: sa,
                });
            }
            Err(last)
        })
    }
}

type UpstreamClient = Client<UpstreamConnector, Counted<Incoming>>;

/// State shared by the requests of one intercepted connection.
struct Session {
    host: String,
    port: u16,
    /// The route, its secret and the audit label; none on a toolchain host.
    credential: Option<(Route, SecretValue, String)>,
    cache: Option<(Arc<ToolCache>, &'static ArtifactHost)>,
    client: UpstreamClient,
    /// Sandbox, mode, decision and rule of the connection: each request's
    /// record starts from it.
    template: ConnectionReport,
    proxy: Proxy,
    /// Where its requests' records wait for their responses to go out.
    outbox: Outbox,
    inflight: Arc<Semaphore>,
    /// Each request passes it: a policy change can close the host.
    live: Mutex<LiveCheck>,
}

/// The detail of a refused request that carried a credential of the guest's
/// own to a trusted sink after `secret-read`.
pub(crate) const FOREIGN_CREDENTIAL: &str = "foreign-credential";

/// Intercept one guest connection whose ClientHello (in `first`) named
/// `host`. Returns when the guest closes, or when it stays idle past the
/// proxy's idle timeout.
pub(crate) async fn intercept<S>(
    proxy: &Proxy,
    plan: Plan,
    guest: &mut S,
    first: Vec<u8>,
    rec: &ConnectionReport,
    act: &Activity,
    live: LiveCheck,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let cfg = proxy.config();
    let host = rec.host.clone();
    let leaf = plan
        .ca
        .leaf_for(&host)
        .map_err(|e| format!("mitm-certificate: {e}"))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
        server_tls(leaf).map_err(|e| format!("mitm-tls: {e}"))?,
    ));
    let outbox = Outbox::new(proxy.clone());
    let io = GuestIo {
        first: Bytes::from(first),
        inner: guest,
        act,
        outbox: outbox.clone(),
    };
    let tls = tokio::time::timeout(cfg.handshake_timeout, acceptor.accept(io))
        .await
        .map_err(|_| "handshake-timeout: guest TLS".to_string())?
        .map_err(|e| format!("guest-tls: {e}"))?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");

    let key = ClientKey {
        host: host.clone(),
        port: rec.port,
        addrs: live.addrs().to_vec(),
    };
    let client = plan.clients.get_or_build(key, || {
        let connector = UpstreamConnector {
            host: Arc::from(host.as_str()),
            port: rec.port,
            addrs: Arc::from(live.addrs()),
            tls: plan.upstream.clone(),
            timeout: cfg.connect_timeout,
        };
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(MAX_IDLE_PER_TARGET)
            .http2_initial_stream_window_size(UPSTREAM_STREAM_WINDOW)
            .http2_initial_connection_window_size(UPSTREAM_CONN_WINDOW)
            .http2_max_send_buf_size(MAX_GUEST_SEND_BUF)
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .build(connector)
    });
    let label = plan.label();
    let mut template = rec.clone();
    template.credential = label.clone();
    let credential = plan
        .credential
        .zip(label)
        .map(|((route, found), label)| (route, found.value, label));
    let session = Arc::new(Session {
        host,
        port: rec.port,
        credential,
        cache: plan.cache,
        client,
        template,
        proxy: proxy.clone(),
        outbox,
        inflight: plan.inflight.clone(),
        live: Mutex::new(live),
    });
    let service = hyper::service::service_fn(move |req| {
        let s = session.clone();
        async move { Ok::<_, Infallible>(forward(&s, req).await) }
    });
    let io = TokioIo::new(tls);
    let served = async {
        if h2 {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_GUEST_STREAMS)
                .max_send_buf_size(MAX_GUEST_SEND_BUF)
                .serve_connection(io, service)
                .await
        } else {
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(cfg.idle_timeout)
                .serve_connection(io, service)
                .await
        }
    };
    tokio::select! {
        r = served => r.map_err(|e| format!("guest-http: {e}")),
        _ = act.idle(cfg.idle_timeout) => Err("idle-timeout".into()),
    }
}

/// The authority a request names: its URI's (HTTP/2, absolute form), else
/// its Host header.
fn request_authority(req: &Request<Incoming>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_string());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Forward one guest request upstream with the credential applied.
async fn forward(s: &Session, req: Request<Incoming>) -> Response<ReplyBody> {
    let started = Instant::now();
    let mut rec = s.template.clone();
    rec.time = time::OffsetDateTime::now_utc();
    rec.proto = Some(
        if req.version() == Version::HTTP_2 {
            "h2"
        } else {
            "http/1.1"
        }
        .into(),
    );
    rec.method = Some(truncate(req.method().as_str()));
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    rec.path = Some(truncate(&path));
    let refuse = |mut rec: ConnectionReport, status: StatusCode, reason: String| {
        rec.deny(reason.clone());
        rec.status = Some(status.as_u16());
        rec.duration_ms = millis(started);
        s.proxy.write_record(&rec);
        own_reply(status, &reason)
    };

    // Every request on the connection must be for the host it was decided on.
    match request_authority(&req).map(|a| h1::split_authority(&a, s.port)) {
        Some(Ok((h, p))) if h1::same_host(&h, &s.host) && p == s.port => {}
        Some(Ok((h, p))) => {
            let reason = format!(
                "host-mismatch: request for {}:{p} on {}",
                truncate(&h),
                s.host
            );
            return refuse(rec, StatusCode::MISDIRECTED_REQUEST, reason);
        }
        Some(Err(e)) => return refuse(rec, StatusCode::BAD_REQUEST, format!("bad-request: {e}")),
        None => {
            let reason = "bad-request: request without Host".to_string();
            return refuse(rec, StatusCode::BAD_REQUEST, reason);
        }
    }
    let still = match s.live.lock() {
        Ok(mut l) => l.check().map_err(|reason| (reason, l.take_cut())),
        Err(poisoned) => {
            let mut l = poisoned.into_inner();
            l.check().map_err(|reason| (reason, l.take_cut()))
        }
    };
    if let Err((reason, cut)) = still {
        let mut rec = rec;
        // Refused by a rule of the new policy: the record names it.
        if let Some(d) = cut {
            rec.set_decision(&d);
        }
        rec.reason = reason.clone();
        rec.status = Some(StatusCode::FORBIDDEN.as_u16());
        rec.duration_ms = millis(started);
        s.proxy.write_record(&rec);
        return own_reply(StatusCode::FORBIDDEN, &reason);
    }
    let secret_read = s.proxy.policy().labels().get(Label::SecretRead).is_some();
    if let (true, Some((route, _, _))) = (secret_read, &s.credential) {
        let list: Vec<(String, Vec<u8>)> = req
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
            .collect();
        if let Some(what) = foreign_credential(route, &list, req.uri().query()) {
            let reason = format!(
                "{}: {FOREIGN_CREDENTIAL}: {what} is not the sentinel of {} after secret-read",
                sandpen_policy::reason::FLOW,
                route.service
            );
            return refuse(rec, StatusCode::FORBIDDEN, reason);
        }
    }
    if req.method() == Method::CONNECT || req.headers().contains_key(header::UPGRADE) {
        let reason = "upgrade-refused: protocol upgrades are not relayed on credential hosts";
        return refuse(rec, StatusCode::NOT_IMPLEMENTED, reason.into());
    }
    let uri = match upstream_uri(&s.host, s.port, &path) {
        Ok(u) => u,
        Err(e) => return refuse(rec, StatusCode::BAD_REQUEST, format!("bad-request: {e}")),
    };
    let Ok(permit) = s.inflight.clone().try_acquire_owned() else {
        let reason =
            format!("request-limit: {MAX_INFLIGHT_REQUESTS} intercepted requests in flight");
        return refuse(rec, StatusCode::SERVICE_UNAVAILABLE, reason);
    };

    // The toolchain cache (docs/dev-env.md): a whole GET of a versioned
    // artifact is answered from it when it holds the URL, verified.
    let cached = s.cache.as_ref().and_then(|(cache, artifacts)| {
        toolcache::cacheable_request(artifacts, req.method(), &path, req.headers()).then(|| {
            let url = match s.port {
                443 => format!("https://{}{path}", s.host),
                port => format!("https://{}:{port}{path}", s.host),
            };
            (cache.clone(), url)
        })
    });
    if let Some((cache, url)) = &cached {
        let lookup = {
            let (cache, url) = (cache.clone(), url.clone());
            tokio::task::spawn_blocking(move || cache.lookup(&url)).await
        };
        if let Ok(Some(hit)) = lookup {
            rec.status = Some(StatusCode::OK.as_u16());
            rec.cache = Some(format!("hit sha256 {}", hit.sha256));
            let body = Audited {
                inner: FileBody {
                    file: hit.file,
                    left: hit.size,
                },
                down: 0,
                up: Arc::new(AtomicU64::new(0)),
                rec: Some(rec),
                started,
                log: RequestLog::new(s.outbox.clone()),
                _permit: Some(permit),
            };
            let mut out = Response::new(body.boxed());
            let h = out.headers_mut();
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(hit.size));
            if let Some(ct) = hit
                .content_type
                .and_then(|c| HeaderValue::from_str(&c).ok())
            {
                h.insert(header::CONTENT_TYPE, ct);
            }
            return out;
        }
    }

    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    // After `secret-read` no cookie goes up: one could be a session of an
    // account of the guest's own. Dropped rather than refused: clients
    // with a cookie jar send back what the sink's CDN set (`__cf_bm`), and
    // without cookies the request runs under the user's credential only.
    let cookies_dropped = secret_read && parts.headers.remove(header::COOKIE).is_some();
    let mut list: Vec<(String, Vec<u8>)> = parts
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
        .collect();
    if let Some((route, secret, label)) = &s.credential {
        match apply(route, &mut list, secret.expose()) {
            Ok(Applied::Unchanged) => {
                rec.credential = Some(format!("{} (guest's own value)", route.service));
            }
            Ok(_) => rec.credential = Some(label.clone()),
            Err(e) => {
                return refuse(
                    rec,
                    StatusCode::BAD_GATEWAY,
                    format!("credential-error: {e}"),
                );
            }
        }
    }
    if cookies_dropped {
        rec.credential = rec
            .credential
            .map(|c| format!("{c}; cookies dropped after secret-read"));
    }
    let mut headers = HeaderMap::with_capacity(list.len());
    for (name, value) in list {
        let secret_header = s.credential.as_ref().is_some_and(|(route, _, _)| {
            route
                .headers
                .iter()
                .any(|r| r.name.eq_ignore_ascii_case(&name))
        });
        let (Ok(name), Ok(mut value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(&value),
        ) else {
            continue;
        };
        value.set_sensitive(secret_header);
        headers.append(name, value);
    }
    if cached.is_some() {
        // What is kept must be the body itself, not one encoding of it.
        headers.remove(header::ACCEPT_ENCODING);
    }
    parts.headers = headers;
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    let up = Arc::new(AtomicU64::new(0));
    // The body is checked chunk by chunk against policy changes.
    let live = match s.live.lock() {
        Ok(l) => l.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    let body = Counted {
        inner: body,
        count: up.clone(),
        live: Some(live),
    };
    // If the guest gives up before the answer comes, the request (which
    // carried the secret) is still logged.
    let mut pending = Pending {
        rec: Some(rec),
        up: up.clone(),
        started,
        log: RequestLog::new(s.outbox.clone()),
    };
    let sent = s.client.request(Request::from_parts(parts, body)).await;
    let Some(mut rec) = pending.rec.take() else {
        return own_reply(StatusCode::INTERNAL_SERVER_ERROR, "internal: record taken");
    };
    match sent {
        Ok(resp) => {
            rec.status = Some(resp.status().as_u16());
            rec.addr = resp
                .extensions()
                .get::<UpstreamAddr>()
                .map(|a| a.0.to_string());
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            let fill = cached.and_then(|(cache, url)| {
                let whole = parts.status == StatusCode::OK
                    && !parts.headers.contains_key(header::CONTENT_ENCODING);
                let length = parts
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                let content_type = parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let length = length.filter(|_| whole)?;
                match cache.filling(&url, length, content_type) {
                    Ok(fill) => Some(fill),
                    Err(e) => {
                        tracing::warn!("toolchain cache: {url} not stored: {e}");
                        None
                    }
                }
            });
            if fill.is_some() {
                rec.cache = Some("fill".into());
            }
            let body = Audited {
                inner: Teed { inner: body, fill },
                down: 0,
                up,
                rec: Some(rec),
                started,
                log: RequestLog::new(s.outbox.clone()),
                _permit: Some(permit),
            };
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => {
            let cut = match s.live.lock() {
                Ok(l) => l.take_cut(),
                Err(poisoned) => poisoned.into_inner().take_cut(),
            };
            let (status, reason) = match cut {
                // The policy changed during the body: what was left of it
                // never went upstream.
                Some(d) => {
                    rec.set_decision(&d);
                    (
                        StatusCode::FORBIDDEN,
                        format!("{POLICY_CHANGED}: {}", d.reason),
                    )
                }
                None => (StatusCode::BAD_GATEWAY, upstream_reason(&e)),
            };
            rec.reason = reason.clone();
            rec.status = Some(status.as_u16());
            rec.bytes_up = up.load(Ordering::Relaxed);
            rec.duration_ms = millis(started);
            s.proxy.write_record(&rec);
            own_reply(status, &reason)
        }
    }
}

/// The upstream URI for a guest request's `path`: always the claimed host
/// and port. An HTTP/2 `:path` need not start with `/`, and one like
/// `@evil.example/` would otherwise make the URI's host `evil.example`, which
/// hyper would send as `Host` or `:authority` with the secret attached.
fn upstream_uri(host: &str, port: u16, path: &str) -> Result<Uri, String> {
    if !path.starts_with('/') {
        return Err(format!("request target `{}` is not a path", truncate(path)));
    }
    let authority = if port == 443 {
        host.to_string()
    } else {
        format!("{host}:{port}")
    };
    let uri = Uri::builder()
        .scheme(http::uri::Scheme::HTTPS)
        .authority(authority.as_str())
        .path_and_query(path)
        .build()
        .map_err(|e| e.to_string())?;
    if !uri.host().is_some_and(|h| h1::same_host(h, host)) || uri.port_u16().unwrap_or(443) != port
    {
        return Err(format!(
            "request target `{}` changes the host",
            truncate(path)
        ));
    }
    Ok(uri)
}

/// `upstream-tls: invalid peer certificate: UnknownIssuer` and the like,
/// from the innermost error that says what went wrong.
fn upstream_reason(e: &hyper_util::client::legacy::Error) -> String {
    let mut deepest = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        deepest = s.to_string();
        source = s.source();
    }
    if deepest.starts_with("upstream-tls:") {
        deepest
    } else if e.is_connect() {
        format!("connect-failed: {deepest}")
    } else {
        format!("upstream-error: {deepest}")
    }
}

#[cfg(test)]
mod tests {
    use super::upstream_uri;

    #[test]
    fn the_upstream_uri_always_names_the_claimed_host() {
        let ok = upstream_uri("api.openai.com", 443, "/v1/x?y=@z").unwrap();
        assert_eq!(ok.to_string(), "https://api.openai.com/v1/x?y=@z");
        let port = upstream_uri("api.openai.com", 8443, "/v1").unwrap();
        assert_eq!(port.to_string(), "https://api.openai.com:8443/v1");
        for evil in [
            "@evil.example/v1/x",
            ".evil.example/x",
            ":1/x",
            "",
            "*",
            "evil.example/x",
        ] {
            assert!(upstream_uri("api.openai.com", 443, evil).is_err(), "{evil}");
        }
    }
}
