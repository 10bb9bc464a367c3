//! Credential interception against a real HTTPS upstream on loopback: the
//! guest's sentinel becomes the real key only on the route's host, bodies
//! stream, a wrong upstream certificate fails closed, and the key never
//! reaches the audit log.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sandpen_credentials::{Found, Route, SandboxCa, Scope, SecretValue};
use sandpen_policy::{AddHost, FlowLabels, Label, LabelSet, Mode, Policy, PolicyFile};
use sandpen_proto::messages::{EgressMode, EgressOpen};
use sandpen_proxy::mitm::{upstream_tls, CredentialSource, Mitm};
use sandpen_proxy::{read_log, AuditLog, ConnectionReport, LogFilter, Proxy, ProxyConfig};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_rustls::rustls::{self, pki_types};

const SECRET: &str = "sk-ant-REAL-7f3e9d2c1b";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A CA and a leaf for the given names; the CA PEM is written to `dir`.
struct TestPki {
    ca_pem_path: std::path::PathBuf,
    server: Arc<rustls::ServerConfig>,
}

fn pki(dir: &std::path::Path, file: &str, names: &[&str]) -> TestPki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("upstream test CA {file}"),
    );
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
    let ca_pem_path = dir.join(file);
    std::fs::write(&ca_pem_path, ca.pem()).unwrap();
    let key = pki_types::PrivateKeyDer::Pkcs8(pki_types::PrivatePkcs8KeyDer::from(
        leaf_key.serialize_der(),
    ));
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    TestPki {
        ca_pem_path,
        server: Arc::new(server),
    }
}

/// What the mock upstream saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    version: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// A mock model API over HTTPS (HTTP/1.1 and HTTP/2). `/v1/messages`
/// answers with two server-sent events and holds the second until `release`
/// is notified; anything else answers `ok`.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    release: Arc<Notify>,
    /// Body bytes of `/v1/upload` requests, as they arrive.
    uploaded: Arc<Mutex<Vec<u8>>>,
    /// TCP connections accepted.
    accepted: Arc<AtomicUsize>,
}

async fn upstream(pki: &TestPki) -> Upstream {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let release = Arc::new(Notify::new());
    let uploaded: Arc<Mutex<Vec<u8>>> = Arc::default();
    let accepted: Arc<AtomicUsize> = Arc::default();
    let counter = accepted.clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
    let (s, r, u) = (seen.clone(), release.clone(), uploaded.clone());
    tokio::spawn(async move {
        loop {
            let (sock, _) = l.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            let (acceptor, s, r, u) = (acceptor.clone(), s.clone(), r.clone(), u.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(sock).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (s, r, u) = (s.clone(), r.clone(), u.clone());
                        async move {
                            s.lock().unwrap().push(Seen {
                                path: req.uri().path().to_string(),
                                version: format!("{:?}", req.version()),
                                headers: req
                                    .headers()
                                    .iter()
                                    .map(|(n, v)| {
                                        (
                                            n.to_string(),
                                            String::from_utf8_lossy(v.as_bytes()).into(),
                                        )
                                    })
                                    .collect(),
                            });
                            if req.uri().path() == "/v1/upload" {
                                let mut body = req.into_body();
                                while let Some(Ok(f)) = body.frame().await {
                                    if let Some(d) = f.data_ref() {
                                        u.lock().unwrap().extend_from_slice(d);
                                    }
                                }
                                let ok = http_body_util::Full::new(Bytes::from("ok"))
                                    .map_err(|n: Infallible| match n {})
                                    .boxed();
                                return Ok(hyper::Response::new(ok));
                            }
                            let body = if req.uri().path() == "/v1/messages" {
                                let (tx, rx) = tokio::sync::mpsc::channel::<
                                    Result<Frame<Bytes>, Infallible>,
                                >(4);
                                tokio::spawn(async move {
                                    let _ = tx
                                        .send(Ok(Frame::data(Bytes::from(
                                            "event: first\ndata: {}\n\n",
                                        ))))
                                        .await;
                                    r.notified().await;
                                    let _ = tx
                                        .send(Ok(Frame::data(Bytes::from(
                                            "event: last\ndata: {}\n\n",
                                        ))))
                                        .await;
                                });
                                let mut rx = rx;
                                let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
                                StreamBody::new(stream).boxed()
                            } else {
                                http_body_util::Full::new(Bytes::from("ok"))
                                    .map_err(|n: Infallible| match n {})
                                    .boxed()
                            };
                            let mut resp = hyper::Response::new(body);
                            if req.uri().path() == "/v1/messages" {
                                resp.headers_mut()
                                    .insert("content-type", "text/event-stream".parse().unwrap());
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    Upstream {
        addr,
        seen,
        release,
        uploaded,
        accepted,
    }
}

/// The built-in routes, each served on the port of the mock upstream its
/// host is mapped to (a route serves one port; see `a_route_serves_its_port_only`).
struct Source {
    /// api.anthropic.com's mock.
    good_port: u16,
    /// api.openai.com's mock.
    bad_port: u16,
}

impl CredentialSource for Source {
    fn route_for(&self, host: &str) -> Option<Route> {
        let mut r = sandpen_credentials::route_for(host).cloned()?;
        r.port = if r.service == "openai" {
            self.bad_port
        } else {
            self.good_port
        };
        Some(r)
    }
    fn secret(&self, service: &str) -> Result<Option<Found>, String> {
        Ok(
            (service == "anthropic" || service == "openai").then(|| Found {
                scope: Scope::Global,
                value: SecretValue::new(SECRET),
                set_at: time::OffsetDateTime::now_utc(),
            }),
        )
    }
}

struct Harness {
    proxy: Proxy,
    ca: Arc<SandboxCa>,
    log: std::path::PathBuf,
    good: Upstream,
    bad: Upstream,
    /// Like `good` (same certificate), on another port: no route serves it.
    spare: Upstream,
    other_ca: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// A global policy file's rules in enforce mode, with the test hosts mapped
/// to loopback.
fn policy(text: &str) -> Policy {
    let f = PolicyFile::parse(
        text.into(),
        std::path::Path::new("/t/policy.toml"),
        sandpen_policy::Scope::Global,
    )
    .unwrap();
    Policy::from_files(Some(&f), None)
        .with_mode(Mode::Enforce)
        .with_add_hosts(
            [
                "api.anthropic.com:127.0.0.1",
                "other.test:127.0.0.1",
                "api.openai.com:127.0.0.1",
            ]
            .iter()
            .map(|s| AddHost::parse(s).unwrap()),
        )
}

/// api.anthropic.com and other.test go to `good` (its CA passed as
/// `--upstream-ca`); api.openai.com goes to `bad`, whose CA is not trusted.
async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let good_pki = pki(
        dir.path(),
        "good-ca.pem",
        &["api.anthropic.com", "other.test"],
    );
    let bad_pki = pki(dir.path(), "bad-ca.pem", &["api.openai.com"]);
    let good = upstream(&good_pki).await;
    let bad = upstream(&bad_pki).await;
    let spare = upstream(&good_pki).await;
    let policy = policy("[[network]]\nid = 1\naction = \"allow\"\ntarget = \"**\"\n");
    let log = dir.path().join("net.jsonl");
    let proxy = Proxy::new(
        ProxyConfig::new("box"),
        policy,
        AuditLog::open(&log).unwrap(),
    );
    let ca = Arc::new(SandboxCa::create(dir.path().join("ca")).unwrap());
    let tls = upstream_tls(std::slice::from_ref(&good_pki.ca_pem_path)).unwrap();
    let source = Source {
        good_port: good.addr.port(),
        bad_port: bad.addr.port(),
    };
    proxy.set_mitm(Some(Mitm::new(ca.clone(), tls, Arc::new(source))));
    Harness {
        proxy,
        ca,
        log,
        good,
        bad,
        spare,
        other_ca: good_pki.ca_pem_path,
        _dir: dir,
    }
}

enum Proto {
    H1,
    H2,
}

impl Harness {
    /// A guest connection to `host:port` through the transparent path, with
    /// TLS verified against `roots`.
    async fn connect(
        &self,
        host: &str,
        port: u16,
        roots: rustls::RootCertStore,
        proto: Proto,
    ) -> (Sender, tokio::task::JoinHandle<ConnectionReport>) {
        let alpn = match proto {
            Proto::H1 => b"http/1.1".to_vec(),
            Proto::H2 => b"h2".to_vec(),
        };
        let (tls, report) = self.connect_tls(host, port, roots, alpn).await;
        let io = TokioIo::new(tls);
        let sender = match proto {
            Proto::H1 => {
                let (s, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
                tokio::spawn(conn);
                Sender::H1(s)
            }
            Proto::H2 => {
                let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                Sender::H2(s)
            }
        };
        (sender, report)
    }

    /// The guest's TLS stream to `host:port`, offering `alpn`.
    async fn connect_tls(
        &self,
        host: &str,
        port: u16,
        roots: rustls::RootCertStore,
        alpn: Vec<u8>,
    ) -> (
        tokio_rustls::client::TlsStream<tokio::io::DuplexStream>,
        tokio::task::JoinHandle<ConnectionReport>,
    ) {
        let (guest, host_end) = tokio::io::duplex(64 * 1024);
        let p = self.proxy.clone();
        let open = EgressOpen {
            mode: EgressMode::Transparent,
            host: host.into(),
            port,
            src_port: 0,
        };
        let report = tokio::spawn(async move { p.handle(host_end, open).await });
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![alpn];
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(
                pki_types::ServerName::try_from(host.to_string()).unwrap(),
                guest,
            )
            .await
            .expect("guest TLS handshake");
        (tls, report)
    }

    fn sandbox_roots(&self) -> rustls::RootCertStore {
        let mut r = rustls::RootCertStore::empty();
        r.add(self.ca.cert_der().clone()).unwrap();
        r
    }

    fn upstream_roots(&self) -> rustls::RootCertStore {
        let mut r = rustls::RootCertStore::empty();
        for c in sandpen_proxy::mitm::read_pem_certs(&self.other_ca).unwrap() {
            r.add(c).unwrap();
        }
        r
    }

    fn records(&self) -> Vec<ConnectionReport> {
        read_log(&self.log, &LogFilter::default()).unwrap()
    }

    /// The audit record of the request for `path`.
    fn record_for(&self, path: &str) -> ConnectionReport {
        self.records()
            .into_iter()
            .find(|r| r.path.as_deref() == Some(path))
            .unwrap_or_else(|| panic!("no record for {path}"))
    }

    /// Whether the trusted upstream got a request for `path`.
    fn upstream_saw(&self, path: &str) -> bool {
        self.good
            .seen
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.path == path)
    }
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    async fn send(
        &mut self,
        req: hyper::Request<Empty<Bytes>>,
    ) -> hyper::Response<hyper::body::Incoming> {
        match self {
            Sender::H1(s) => s.send_request(req).await.unwrap(),
            Sender::H2(s) => s.send_request(req).await.unwrap(),
        }
    }
}

fn request(
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    h2: bool,
) -> hyper::Request<Empty<Bytes>> {
    let mut b = hyper::Request::builder();
    if h2 {
        b = b.uri(format!("https://{host}{path}"));
    } else {
        b = b.uri(path).header("host", host);
    }
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(Empty::new()).unwrap()
}

async fn body_text(resp: hyper::Response<hyper::body::Incoming>) -> String {
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&b).into_owned()
}

#[tokio::test]
async fn sentinel_becomes_the_key_on_the_route_host_only_h1_and_h2() {
    let h = harness().await;
    let port = h.good.addr.port();
    let host = "api.anthropic.com";

    let (mut s, _) = h.connect(host, port, h.sandbox_roots(), Proto::H1).await;
    let resp = s
        .send(request(
            &format!("{host}:{port}"),
            "/v1/models",
            &[("x-api-key", "proxy-managed"), ("x-other", "proxy-managed")],
            false,
        ))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(body_text(resp).await, "ok");
    // A second request on the same connection is swapped too.
    let resp = s
        .send(request(
            &format!("{host}:{port}"),
            "/v1/models?x=1",
            &[],
            false,
        ))
        .await;
    assert_eq!(resp.status(), 200);
    body_text(resp).await;

    let (mut s2, _) = h.connect(host, port, h.sandbox_roots(), Proto::H2).await;
    let resp = s2
        .send(request(
            &format!("{host}:{port}"),
            "/v1/h2",
            &[("authorization", "Bearer proxy-managed")],
            true,
        ))
        .await;
    assert_eq!(resp.status(), 200);
    body_text(resp).await;

    // other.test has no route: tunneled byte for byte, so the guest sees the
    // upstream's own certificate and its sentinel arrives unchanged.
    let (mut s3, _) = h
        .connect("other.test", port, h.upstream_roots(), Proto::H1)
        .await;
    let resp = s3
        .send(request(
            &format!("other.test:{port}"),
            "/other",
            &[("x-api-key", "proxy-managed")],
            false,
        ))
        .await;
    assert_eq!(resp.status(), 200);
    body_text(resp).await;

    let seen = h.good.seen.lock().unwrap().clone();
    let by_path = |p: &str| {
        seen.iter()
            .find(|s| s.path == p)
            .cloned()
            .unwrap_or_else(|| panic!("{p} not seen: {seen:?}"))
    };
    let first = by_path("/v1/models");
    assert_eq!(first.header("x-api-key"), vec![SECRET.to_string()]);
    assert_eq!(
        first.header("x-other"),
        vec!["proxy-managed".to_string()],
        "only the route's headers change"
    );
    // The header was absent: the route's first header is added.
    let second = seen
        .iter()
        .filter(|s| s.path == "/v1/models")
        .nth(1)
        .unwrap();
    assert_eq!(second.header("x-api-key"), vec![SECRET.to_string()]);
    let h2 = by_path("/v1/h2");
    assert_eq!(h2.header("authorization"), vec![format!("Bearer {SECRET}")]);
    let other = by_path("/other");
    assert_eq!(other.header("x-api-key"), vec!["proxy-managed".to_string()]);

    drop((s, s2, s3));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = std::fs::read_to_string(&h.log).unwrap();
    assert!(!log.contains(SECRET), "the key is in the audit log");
    let recs = h.records();
    let req = recs
        .iter()
        .find(|r| r.path.as_deref() == Some("/v1/models"))
        .expect("a record per intercepted request");
    assert_eq!(req.credential.as_deref(), Some("anthropic (global)"));
    assert_eq!(req.status, Some(200));
    assert_eq!(req.method.as_deref(), Some("GET"));
    assert!(recs
        .iter()
        .any(|r| r.path.as_deref() == Some("/v1/h2") && r.proto.as_deref() == Some("h2")));
}

#[tokio::test]
async fn sse_streams_chunk_by_chunk() {
    let h = harness().await;
    let port = h.good.addr.port();
    let (mut s, _) = h
        .connect("api.anthropic.com", port, h.sandbox_roots(), Proto::H1)
        .await;
    let resp = s
        .send(request(
            &format!("api.anthropic.com:{port}"),
            "/v1/messages",
            &[("x-api-key", "proxy-managed")],
            false,
        ))
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // The first event must arrive while the mock still holds the last one.
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("the first event arrived before the last was sent")
        .unwrap()
        .unwrap();
    assert_eq!(
        first.data_ref().map(|d| d.as_ref()),
        Some(&b"event: first\ndata: {}\n\n"[..])
    );
    h.good.release.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"event: last\ndata: {}\n\n");
}

#[tokio::test]
async fn wrong_upstream_certificate_fails_closed() {
    let h = harness().await;
    let port = h.bad.addr.port();
    let (mut s, _) = h
        .connect("api.openai.com", port, h.sandbox_roots(), Proto::H1)
        .await;
    let resp = s
        .send(request(
            &format!("api.openai.com:{port}"),
            "/v1/responses",
            &[("authorization", "Bearer proxy-managed")],
            false,
        ))
        .await;
    assert_eq!(resp.status(), 502);
    assert_eq!(
        resp.headers().get("x-sandpen-reason").unwrap(),
        "upstream-tls"
    );
    body_text(resp).await;
    assert!(
        h.bad.seen.lock().unwrap().is_empty(),
        "the untrusted upstream got a request"
    );
    let recs = h.records();
    let r = recs
        .iter()
        .find(|r| r.path.as_deref() == Some("/v1/responses"))
        .unwrap();
    assert!(
        r.reason
            .starts_with("upstream-tls: invalid peer certificate"),
        "{}",
        r.reason
    );
    assert_eq!(r.status, Some(502));
}

#[tokio::test]
async fn a_policy_change_refuses_the_next_request_on_an_intercepted_connection() {
    let h = harness().await;
    let port = h.good.addr.port();
    let (mut s, _) = h
        .connect("api.anthropic.com", port, h.sandbox_roots(), Proto::H1)
        .await;
    let host = format!("api.anthropic.com:{port}");
    let resp = s
        .send(request(
            &host,
            "/v1/before",
            &[("x-api-key", "proxy-managed")],
            false,
        ))
        .await;
    assert_eq!(resp.status(), 200);
    body_text(resp).await;
    // A rule now denies the host, on the connection already open.
    h.proxy.set_policy(policy(
        "[[network]]\nid = 9\naction = \"deny\"\ntarget = \"api.anthropic.com\"\n",
    ));
    let resp = s
        .send(request(
            &host,
            "/v1/after",
            &[("x-api-key", "proxy-managed")],
            false,
        ))
        .await;
    assert_eq!(resp.status(), 403);
    body_text(resp).await;
    assert!(!h.upstream_saw("/v1/after"));
    let r = h.record_for("/v1/after");
    assert_eq!(r.reason, "policy-changed: denied-by-rule");
    assert_eq!(r.rule.as_deref(), Some("deny api.anthropic.com"));
}

/// A later guest connection to the same credential host reuses the upstream
/// TLS connection an earlier one left idle (no second handshake upstream);
/// each request is still swapped, checked and logged with its address.
#[tokio::test]
async fn guest_connections_share_idle_upstream_tls_connections() {
    let h = harness().await;
    let port = h.good.addr.port();
    let host = format!("api.anthropic.com:{port}");
    for path in ["/v1/first", "/v1/second"] {
        let (mut s, report) = h
            .connect("api.anthropic.com", port, h.sandbox_roots(), Proto::H1)
            .await;
        let resp = s
            .send(request(
                &host,
                path,
                &[("x-api-key", "proxy-managed")],
                false,
            ))
            .await;
        assert_eq!(resp.status(), 200);
        body_text(resp).await;
        drop(s);
        report.await.unwrap();
    }
    assert_eq!(h.good.accepted.load(Ordering::SeqCst), 1);
    for path in ["/v1/first", "/v1/second"] {
        let r = h.record_for(path);
        assert_eq!(r.addr, Some(format!("127.0.0.1:{port}")), "{r:?}");
        let seen = h.good.seen.lock().unwrap();
        let req = seen.iter().find(|s| s.path == path).unwrap();
        assert!(req
            .headers
            .iter()
            .any(|(n, v)| n == "x-api-key" && v == SECRET));
    }
}

/// An upload to a credential host that started before the policy changed
/// stops there: the rest of its body never reaches the upstream.
#[tokio::test]
async fn a_policy_change_stops_an_intercepted_request_body_half_way() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = harness().await;
    let port = h.good.addr.port();
    let (mut tls, _) = h
        .connect_tls(
            "api.anthropic.com",
            port,
            h.sandbox_roots(),
            b"http/1.1".to_vec(),
        )
        .await;
    tls.write_all(
        format!(
            "POST /v1/upload HTTP/1.1\r\nHost: api.anthropic.com:{port}\r\nx-api-key: proxy-managed\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut arrived = false;
    for _ in 0..400 {
        if h.good.uploaded.lock().unwrap().ends_with(b"first") {
            arrived = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(arrived, "the first chunk went up");
    h.proxy.set_policy(policy(
        "[[network]]\nid = 9\naction = \"deny\"\ntarget = \"api.anthropic.com\"\n",
    ));
    tls.write_all(b"4\r\nleak\r\n0\r\n\r\n").await.unwrap();
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut resp)).await;
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(&h.good.uploaded.lock().unwrap()[..], b"first");
    let r = h.record_for("/v1/upload");
    assert_eq!(r.reason, "policy-changed: denied-by-rule", "{r:?}");
    assert_eq!(r.rule.as_deref(), Some("deny api.anthropic.com"));
    assert_eq!(r.status, Some(403));
}

#[tokio::test]
async fn a_request_for_another_host_inside_the_tunnel_is_refused() {
    let h = harness().await;
    let port = h.good.addr.port();
    let (mut s, _) = h
        .connect("api.anthropic.com", port, h.sandbox_roots(), Proto::H1)
        .await;
    let resp = s
        .send(request(
            &format!("other.test:{port}"),
            "/steal",
            &[("x-api-key", "proxy-managed")],
            false,
        ))
        .await;
    assert_eq!(resp.status(), 421);
    body_text(resp).await;
    assert!(!h.upstream_saw("/steal"));
    let r = h.record_for("/steal");
    assert_eq!(r.reason_code(), "host-mismatch");
    assert_eq!(r.decision, sandpen_policy::Verdict::Deny);
}

#[tokio::test]
async fn upstream_sees_http2_when_it_offers_it() {
    let h = harness().await;
    let port = h.good.addr.port();
    let (mut s, _) = h
        .connect("api.anthropic.com", port, h.sandbox_roots(), Proto::H1)
        .await;
    let resp = s
        .send(request(
            &format!("api.anthropic.com:{port}"),
            "/v",
            &[],
            false,
        ))
        .await;
    body_text(resp).await;
    let seen = h.good.seen.lock().unwrap().clone();
    assert_eq!(
        seen.last().unwrap().version,
        "HTTP/2.0",
        "ALPN upstream picks h2"
    );
}

/// The harness's policy (`allow **`) after the guest read a secret, with
/// api.anthropic.com a trusted sink named in the user's own file.
fn after_secret_read() -> Policy {
    policy("[[network]]\nid = 1\naction = \"allow\"\ntarget = \"**\"\n")
        .with_trusted_sinks(vec![
            sandpen_policy::Target::parse("api.anthropic.com").unwrap()
        ])
        .with_labels(FlowLabels {
            labels: vec![LabelSet {
                label: Label::SecretRead,
                at: "2026-12-04T12:00:00Z".into(),
                by: "/w/secrets/token".into(),
            }],
        })
}

#[tokio::test]
async fn after_secret_read_a_trusted_sink_takes_only_the_users_credential() {
    let h = harness().await;
    h.proxy.set_policy(after_secret_read());
    let port = h.good.addr.port();
    let host = "api.anthropic.com";
    let authority = format!("{host}:{port}");
    let (mut s, _) = h.connect(host, port, h.sandbox_roots(), Proto::H1).await;
    // The sentinel: the user's own key goes up.
    let resp = s
        .send(request(
            &authority,
            "/v1/mine",
            &[("x-api-key", "proxy-managed")],
            false,
        ))
        .await;
    assert_eq!(resp.status(), 200);
    body_text(resp).await;
    assert!(h.upstream_saw("/v1/mine"));

    // The attacker's own key, in every place a key may go: refused, and
    // nothing reaches the upstream.
    let attempts: [(&str, &[(&str, &str)]); 12] = [
        ("/v1/files", &[("x-api-key", "sk-attacker")]),
        (
            "/v1/files-2",
            &[
                ("x-api-key", "proxy-managed"),
                ("authorization", "Bearer sk-attacker"),
            ],
        ),
        ("/v1/files-3?key=sk-attacker", &[]),
        ("/v1/files-4", &[("x-goog-api-key", "sk-attacker")]),
        ("/v1/files-5", &[("api-key", "attacker")]),
        ("/v1/files-6", &[("Ocp-Apim-Subscription-Key", "attacker")]),
        ("/v1/files-7", &[("private-token", "glpat-attacker")]),
        ("/v1/files-8", &[("x-api-token", "attacker")]),
        ("/v1/files-9", &[("x-amz-security-token", "attacker")]),
        // A percent-encoded name is the same parameter to the server.
        ("/v1/files-10?%6Bey=sk-attacker", &[]),
        (
            "/v1/files-11?X-Amz-Credential=AKIA%2Fx&X-Amz-Signature=ab",
            &[],
        ),
        ("/v1/files-12?sv=2024&sig=attacker", &[]),
    ];
    for (path, headers) in attempts {
        let (mut s, _) = h.connect(host, port, h.sandbox_roots(), Proto::H1).await;
        let resp = s.send(request(&authority, path, headers, false)).await;
        assert_eq!(resp.status(), 403, "{path}");
        assert_eq!(
            resp.headers()
                .get("x-sandpen-reason")
                .map(|v| v.to_str().unwrap()),
            Some("flow"),
            "{path}"
        );
        let text = body_text(resp).await;
        assert!(text.contains("flow: foreign-credential"), "{path}: {text}");
        let bare = path.split('?').next().unwrap();
        assert!(!h.upstream_saw(bare), "{path} reached the upstream");
        let rec = h.record_for(path);
        assert_eq!(rec.decision, sandpen_policy::Verdict::Deny, "{rec:?}");
        assert!(
            rec.reason.starts_with("flow: foreign-credential"),
            "{rec:?}"
        );
    }
    let log = std::fs::read_to_string(&h.log).unwrap();
    assert!(!log.contains(SECRET), "the key is in the audit log");
}

/// After `secret-read`, a cookie (possibly a session of the attacker's
/// account) never reaches a trusted sink: the request goes up without it,
/// under the user's key, and the record says so; `Proxy-Authorization` is
/// never forwarded at all. Before the label, cookies pass as they are.
#[tokio::test]
async fn after_secret_read_cookies_and_proxy_authorization_do_not_reach_a_sink() {
    let h = harness().await;
    let port = h.good.addr.port();
    let host = "api.anthropic.com";
    let authority = format!("{host}:{port}");
    let seen = |path: &str| {
        h.good
            .seen
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.path == path)
            .map(|s| {
                (
                    s.header("cookie"),
                    s.header("proxy-authorization"),
                    s.header("x-api-key"),
                )
            })
    };
    let cookie_headers: &[(&str, &str)] = &[
        ("x-api-key", "proxy-managed"),
        ("cookie", "sessionKey=sk-ant-sid-attacker"),
        ("cookie", "__cf_bm=abc"),
        ("proxy-authorization", "Basic YXR0YWNrZXI6cHc="),
    ];
    let (mut s, _) = h.connect(host, port, h.sandbox_roots(), Proto::H1).await;
    let resp = s
        .send(request(&authority, "/v1/before", cookie_headers, false))
        .await;
    assert_eq!(resp.status(), 200);
    body_text(resp).await;
    let (cookies, proxy_auth, key) = seen("/v1/before").expect("the upstream got it");
    assert_eq!(
        cookies.len(),
        2,
        "before the label cookies pass: {cookies:?}"
    );
    assert!(proxy_auth.is_empty(), "{proxy_auth:?}");
    assert_eq!(key, [SECRET]);

    h.proxy.set_policy(after_secret_read());
    for (path, proto) in [("/v1/after-h1", Proto::H1), ("/v1/after-h2", Proto::H2)] {
        let h2 = matches!(proto, Proto::H2);
        let (mut s, _) = h.connect(host, port, h.sandbox_roots(), proto).await;
        let resp = s.send(request(&authority, path, cookie_headers, h2)).await;
        assert_eq!(resp.status(), 200, "{path}");
        body_text(resp).await;
        let (cookies, proxy_auth, key) = seen(path).expect("the upstream got it");
        assert!(cookies.is_empty(), "{path}: a cookie went up: {cookies:?}");
        assert!(proxy_auth.is_empty(), "{path}: {proxy_auth:?}");
        assert_eq!(key, [SECRET], "{path}: the user's key, and only it");
        let rec = h.record_for(path);
        assert_eq!(rec.decision, sandpen_policy::Verdict::Allow, "{rec:?}");
        assert!(
            rec.credential
                .as_deref()
                .is_some_and(|c| c.ends_with("; cookies dropped after secret-read")),
            "{rec:?}"
        );
    }
    let log = std::fs::read_to_string(&h.log).unwrap();
    assert!(
        !log.contains("sk-ant-sid-attacker"),
        "a cookie is in the audit log"
    );
}

#[tokio::test]
async fn a_routes_key_is_not_sent_to_another_port_of_its_host() {
    let h = harness().await;
    // The route serves `good`'s port; `spare` listens on another port of the
    // same host (127.0.0.1 for api.anthropic.com), allowed by `**`.
    let port = h.spare.addr.port();
    let host = "api.anthropic.com";
    // Not intercepted: the guest sees the upstream's own certificate (the
    // sandbox CA's would fail here) and its sentinel arrives as sent.
    let (mut s, rep) = h.connect(host, port, h.upstream_roots(), Proto::H1).await;
    let resp = s
        .send(request(
            &format!("{host}:{port}"),
            "/v1/other-port",
            &[("x-api-key", "proxy-managed")],
            false,
        ))
        .await;
    assert_eq!(resp.status(), 200);
    body_text(resp).await;
    drop(s);
    let seen = h.spare.seen.lock().unwrap().clone();
    let got = seen
        .iter()
        .find(|s| s.path == "/v1/other-port")
        .expect("the request arrived");
    assert_eq!(got.header("x-api-key"), vec!["proxy-managed".to_string()]);
    assert!(
        !seen
            .iter()
            .any(|s| s.headers.iter().any(|(_, v)| v.contains(SECRET))),
        "the key reached another port"
    );
    let rep = rep.await.unwrap();
    assert_eq!(rep.proto.as_deref(), Some("tls"), "{rep:?}");
    assert_eq!(rep.credential, None, "{rep:?}");
}

/// No credential routes: only the toolchain cache intercepts.
struct NoRoutes;

impl CredentialSource for NoRoutes {
    fn route_for(&self, _host: &str) -> Option<Route> {
        None
    }
    fn secret(&self, _service: &str) -> Result<Option<Found>, String> {
        Ok(None)
    }
}

/// nodejs.org played by a mock upstream (`good`), its CA trusted upstream,
/// with the toolchain cache in `cache` for upstream identity `identity`.
async fn toolchain_harness(cache: &std::path::Path, identity: &str) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let vendor = pki(dir.path(), "vendor-ca.pem", &["nodejs.org"]);
    let good = upstream(&vendor).await;
    let bad = upstream(&vendor).await;
    let spare = upstream(&vendor).await;
    let f = PolicyFile::parse(
        "[[network]]\nid = 1\naction = \"allow\"\ntarget = \"**\"\n".into(),
        std::path::Path::new("/t/policy.toml"),
        sandpen_policy::Scope::Global,
    )
    .unwrap();
    let policy = Policy::from_files(Some(&f), None)
        .with_mode(Mode::Enforce)
        .with_add_hosts(std::iter::once(
            AddHost::parse("nodejs.org:127.0.0.1").unwrap(),
        ));
    let log = dir.path().join("net.jsonl");
    let proxy = Proxy::new(
        ProxyConfig::new("box"),
        policy,
        AuditLog::open(&log).unwrap(),
    );
    let ca = Arc::new(SandboxCa::create(dir.path().join("ca")).unwrap());
    let tls = upstream_tls(std::slice::from_ref(&vendor.ca_pem_path)).unwrap();
    let cache = sandpen_proxy::toolcache::ToolCache::open(cache, identity).unwrap();
    proxy.set_mitm(Some(
        Mitm::new(ca.clone(), tls, Arc::new(NoRoutes)).with_cache(cache),
    ));
    Harness {
        proxy,
        ca,
        log,
        good,
        bad,
        spare,
        other_ca: vendor.ca_pem_path,
        _dir: dir,
    }
}

impl Harness {
    /// One request on a new guest connection to nodejs.org through the
    /// sandbox CA: (status, body, the request's audit record).
    async fn toolchain_get(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        proto: Proto,
    ) -> (u16, String, ConnectionReport) {
        let port = self.good.addr.port();
        let h2 = matches!(proto, Proto::H2);
        let (mut s, _) = self
            .connect("nodejs.org", port, self.sandbox_roots(), proto)
            .await;
        let mut req = request(&format!("nodejs.org:{port}"), path, headers, h2);
        *req.method_mut() = method.parse().unwrap();
        let resp = s.send(req).await;
        let status = resp.status().as_u16();
        let body = body_text(resp).await;
        drop(s);
        // The record is written when the response body ends.
        let rec = loop {
            let found =
                self.records().into_iter().rev().find(|r| {
                    r.path.as_deref() == Some(path) && r.method.as_deref() == Some(method)
                });
            if let Some(r) = found {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        (status, body, rec)
    }

    fn upstream_count(&self, path: &str) -> usize {
        self.good
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path == path)
            .count()
    }
}

#[tokio::test]
async fn a_toolchain_download_is_kept_once_and_answered_from_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let h = toolchain_harness(cache.path(), "").await;
    let art = "/dist/v22.1.0/node-v22.1.0-linux-x64.tar.gz";

    let (status, body, rec) = h.toolchain_get("GET", art, &[], Proto::H1).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert_eq!(rec.cache.as_deref(), Some("fill"), "{rec:?}");
    assert_eq!(rec.proto.as_deref(), Some("http/1.1"), "{rec:?}");
    assert_eq!(rec.credential, None, "{rec:?}");
    // An HTTP/2 request, asking for gzip, is answered from the cache too.
    let (_, _, _) = h
        .toolchain_get("GET", art, &[("accept-encoding", "gzip")], Proto::H2)
        .await;
    assert_eq!(h.upstream_count(art), 1, "the second GET went upstream");
    let (status, body, rec) = h.toolchain_get("GET", art, &[], Proto::H1).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    let ok_sha = "2689367b205c16ce32ed4200942b8b8b1e262dfc70d9bc9fbc77c49699a4f1df";
    assert_eq!(
        rec.cache.as_deref(),
        Some(format!("hit sha256 {ok_sha}").as_str()),
        "{rec:?}"
    );
    assert_eq!(rec.bytes_down, 2, "{rec:?}");
    assert_eq!(h.upstream_count(art), 1);
    assert_eq!(
        std::fs::read(cache.path().join("blobs").join(ok_sha)).unwrap(),
        b"ok"
    );

    // Another upstream identity (a sandbox with a mirror of its own) misses.
    let other = toolchain_harness(cache.path(), "add-host nodejs.org=10.9.9.9").await;
    let (_, _, rec) = other.toolchain_get("GET", art, &[], Proto::H1).await;
    assert_eq!(rec.cache.as_deref(), Some("fill"), "{rec:?}");
    assert_eq!(other.upstream_count(art), 1);
}

#[tokio::test]
async fn partial_uploaded_and_moving_bodies_are_never_kept() {
    let cache = tempfile::tempdir().unwrap();
    let h = toolchain_harness(cache.path(), "").await;
    let art = "/dist/v22.1.0/SHASUMS256.txt";
    let index = "/dist/index.json";

    // A Range request passes through, uncached.
    let (status, _, rec) = h
        .toolchain_get("GET", art, &[("range", "bytes=0-0")], Proto::H1)
        .await;
    assert_eq!(status, 200);
    assert_eq!(rec.cache, None, "{rec:?}");
    // A guest's POST or PUT to an artifact URL is the guest's own business.
    for method in ["POST", "PUT"] {
        let (_, _, rec) = h.toolchain_get(method, art, &[], Proto::H1).await;
        assert_eq!(rec.cache, None, "{method}: {rec:?}");
    }
    // The index moves: always asked of the vendor.
    for _ in 0..2 {
        let (_, _, rec) = h.toolchain_get("GET", index, &[], Proto::H1).await;
        assert_eq!(rec.cache, None, "{rec:?}");
    }
    assert_eq!(h.upstream_count(index), 2);
    assert_eq!(h.upstream_count(art), 3);
    assert_eq!(
        std::fs::read_dir(cache.path().join("blobs"))
            .unwrap()
            .count(),
        0,
        "something was kept"
    );
    // Then a whole GET is kept, and served. What is kept is the body
    // itself: the guest's Accept-Encoding does not reach the vendor.
    h.toolchain_get("GET", art, &[("accept-encoding", "gzip")], Proto::H1)
        .await;
    let last = h.good.seen.lock().unwrap().last().cloned().unwrap();
    assert!(last.header("accept-encoding").is_empty(), "{last:?}");
    let (_, _, rec) = h.toolchain_get("GET", art, &[], Proto::H1).await;
    assert!(
        rec.cache.as_deref().is_some_and(|c| c.starts_with("hit ")),
        "{rec:?}"
    );
    assert_eq!(h.upstream_count(art), 4);
}

#[tokio::test]
async fn after_secret_read_a_toolchain_host_is_no_sink_for_being_intercepted() {
    let cache = tempfile::tempdir().unwrap();
    let h = toolchain_harness(cache.path(), "").await;
    // The cache's interception carries no credential: it never makes its
    // host a trusted sink. Here the workspace's (trusted) .sandpen.toml names
    // nodejs.org, which counts only through credential interception.
    let ws = sandpen_policy::WorkspaceFile::parse(
        "[flow]\ntrusted_sinks = [\"nodejs.org\"]\n",
        std::path::Path::new("/w/.sandpen.toml"),
    )
    .unwrap();
    h.proxy.set_policy(
        Policy::from_files(
            Some(
                &PolicyFile::parse(
                    "[[network]]\nid = 1\naction = \"allow\"\ntarget = \"**\"\n".into(),
                    std::path::Path::new("/t/policy.toml"),
                    sandpen_policy::Scope::Global,
                )
                .unwrap(),
            ),
            None,
        )
        .with_mode(Mode::Enforce)
        .with_add_hosts(std::iter::once(
            AddHost::parse("nodejs.org:127.0.0.1").unwrap(),
        ))
        .with_trusted_sinks(vec![
            sandpen_policy::Target::parse("api.anthropic.com").unwrap()
        ])
        .with_labels(FlowLabels {
            labels: vec![LabelSet {
                label: Label::SecretRead,
                at: "2026-12-04T12:00:00Z".into(),
                by: "/w/secrets/token".into(),
            }],
        })
        .with_workspace(Some(ws.clone()), Some(&ws.sha256)),
    );
    let (guest, host_end) = tokio::io::duplex(64 * 1024);
    let p = h.proxy.clone();
    let open = EgressOpen {
        mode: EgressMode::Transparent,
        host: "nodejs.org".into(),
        port: h.good.addr.port(),
        src_port: 0,
    };
    let report = tokio::spawn(async move { p.handle(host_end, open).await });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(h.sandbox_roots())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let handshake = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            pki_types::ServerName::try_from("nodejs.org".to_string()).unwrap(),
            guest,
        )
        .await;
    assert!(handshake.is_err(), "the connection was intercepted");
    let rep = report.await.unwrap();
    assert_eq!(rep.decision, sandpen_policy::Verdict::Deny, "{rep:?}");
    assert!(rep.reason.starts_with("flow"), "{rep:?}");
    assert!(h.good.seen.lock().unwrap().is_empty());
}
