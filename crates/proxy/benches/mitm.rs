//! Credential interception cost, printed with its baseline from the same run:
//! `cargo bench -p sandpen-proxy --bench mitm`.
//!
//! A mock model API (HTTPS, HTTP/1.1, keep-alive) answers small requests.
//! The same client measures it directly over TLS, then through the proxy in
//! standalone mode (`serve_http_proxy`, CONNECT, then TLS to the sandbox CA's
//! leaf, with the sentinel swapped on every request). The leaf cache is warm.
//!
//! - Added latency per request (sequential, one keep-alive connection): p50, p99.
//! - Requests per second at concurrency 16 (16 keep-alive connections).
//!
//! Each side runs on its own thread with its own runtime: client, proxy,
//! upstream. `BENCH_SECS` sets the rate run (default 3), `BENCH_N` the number
//! of latency samples (default 2000).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use sandpen_credentials::{Found, Route, SandboxCa, Scope, SecretValue};
use sandpen_policy::{AddHost, Mode, Policy, PolicyFile};
use sandpen_proxy::mitm::{upstream_tls, CredentialSource, Mitm};
use sandpen_proxy::{AuditLog, Proxy, ProxyConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::{self, pki_types};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const HOST: &str = "api.anthropic.com";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The built-in routes, served on the mock upstream's port.
struct Source {
    port: u16,
}

impl CredentialSource for Source {
    fn route_for(&self, host: &str) -> Option<Route> {
        let mut r = sandpen_credentials::route_for(host).cloned()?;
        r.port = self.port;
        Some(r)
    }
    fn secret(&self, _service: &str) -> Result<Option<Found>, String> {
        Ok(Some(Found {
            scope: Scope::Global,
            value: SecretValue::new("sk-ant-bench-0123456789abcdef"),
            set_at: time::OffsetDateTime::now_utc(),
        }))
    }
}

/// Runs `f` on a new thread with its own current-thread runtime.
fn spawn_runtime<F>(f: impl FnOnce() -> F + Send + 'static)
where
    F: std::future::Future<Output = ()> + 'static,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(f());
    });
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("mitm bench: run with `cargo bench -p sandpen-proxy --bench mitm`");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;

    // The upstream: a test CA and a leaf for HOST.
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let up_ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
    let leaf_key = rcgen::KeyPair::generate()?;
    let leaf =
        rcgen::CertificateParams::new(vec![HOST.to_string()])?.signed_by(&leaf_key, &up_ca)?;
    let up_ca_path = dir.path().join("upstream-ca.pem");
    std::fs::write(&up_ca_path, up_ca.pem())?;
    let key = pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let mut server_cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)?;
    server_cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let upstream = std::net::TcpListener::bind("127.0.0.1:0")?;
    let upstream_addr = upstream.local_addr()?;
    upstream.set_nonblocking(true)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    spawn_runtime(move || async move {
        let l = TcpListener::from_std(upstream).expect("listener");
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                        b"{\"ok\":true}",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });

    // The proxy, standalone, with interception on.
    let text = "[[network]]\nid = 1\naction = \"allow\"\ntarget = \"**\"\n";
    let f = PolicyFile::parse(
        text.into(),
        std::path::Path::new("/bench/policy.toml"),
        sandpen_policy::Scope::Global,
    )?;
    let policy = Policy::from_files(Some(&f), None)
        .with_mode(Mode::Enforce)
        .with_add_hosts([AddHost::parse(&format!("{HOST}:127.0.0.1"))?]);
    let proxy = Proxy::new(
        ProxyConfig::new("bench"),
        policy,
        AuditLog::open(dir.path().join("net.jsonl"))?,
    );
    let ca = Arc::new(SandboxCa::create(dir.path().join("ca"))?);
    proxy.set_mitm(Some(Mitm::new(
        ca.clone(),
        upstream_tls(&[up_ca_path])?,
        Arc::new(Source {
            port: upstream_addr.port(),
        }),
    )));
    let proxy_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let proxy_addr = proxy_listener.local_addr()?;
    proxy_listener.set_nonblocking(true)?;
    spawn_runtime(move || async move {
        let l = TcpListener::from_std(proxy_listener).expect("listener");
        let _ = sandpen_proxy::serve_http_proxy(proxy, l).await;
    });

    let mut direct_roots = rustls::RootCertStore::empty();
    direct_roots.add(up_ca.der().clone())?;
    let mut sandbox_roots = rustls::RootCertStore::empty();
    sandbox_roots.add(ca.cert_der().clone())?;
    let direct = Target {
        via: None,
        upstream: upstream_addr,
        roots: Arc::new(direct_roots),
    };
    let mitm = Target {
        via: Some(proxy_addr),
        upstream: upstream_addr,
        roots: Arc::new(sandbox_roots),
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let n: usize = env_or("BENCH_N", 2000);
    let secs: u64 = env_or("BENCH_SECS", 3);
    rt.block_on(async {
        // Warm: the leaf cache and both paths.
        latencies(&mitm, 50).await?;
        latencies(&direct, 50).await?;
        let (d50, d99) = latencies(&direct, n).await?;
        let (m50, m99) = latencies(&mitm, n).await?;
        println!("MITM latency per request ({n} sequential, keep-alive, leaf cache warm)");
        println!("  direct TLS    p50 {:>8.1} µs   p99 {:>8.1} µs", d50, d99);
        println!("  through MITM  p50 {:>8.1} µs   p99 {:>8.1} µs", m50, m99);
        println!(
            "  added         p50 {:>8.1} µs   p99 {:>8.1} µs   (target: p50 ≤ 1000 µs)",
            m50 - d50,
            m99 - d99
        );
        let d = rate(&direct, 16, secs).await?;
        let m = rate(&mitm, 16, secs).await?;
        println!("MITM request rate (concurrency 16, keep-alive, {secs} s)");
        println!("  direct TLS    {:>9.0} req/s", d);
        println!("  through MITM  {:>9.0} req/s   = {:.2}× direct", m, m / d);
        Res::Ok(())
    })?;
    Ok(())
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Target {
    via: Option<SocketAddr>,
    upstream: SocketAddr,
    roots: Arc<rustls::RootCertStore>,
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// A keep-alive HTTP/1.1 connection to HOST, directly or through CONNECT.
async fn connect(t: &Target) -> Res<Sender> {
    let port = t.upstream.port();
    let tcp = match t.via {
        None => TcpStream::connect(t.upstream).await?,
        Some(proxy) => {
            let mut s = TcpStream::connect(proxy).await?;
            s.write_all(
                format!("CONNECT {HOST}:{port} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n").as_bytes(),
            )
            .await?;
            let mut buf = Vec::new();
            let mut byte = [0u8; 1];
            while !buf.ends_with(b"\r\n\r\n") {
                if s.read(&mut byte).await? == 0 {
                    return Err("proxy closed".into());
                }
                buf.push(byte[0]);
            }
            if !buf.starts_with(b"HTTP/1.1 200") {
                return Err(format!("CONNECT refused: {}", String::from_utf8_lossy(&buf)).into());
            }
            s
        }
    };
    tcp.set_nodelay(true)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(t.roots.clone())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(pki_types::ServerName::try_from(HOST)?, tcp)
        .await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::task::spawn_local(conn);
    Ok(sender)
}

async fn one(s: &mut Sender, port: u16) -> Res<()> {
    let req = hyper::Request::builder()
        .uri("/v1/messages")
        .header("host", format!("{HOST}:{port}"))
        .header("x-api-key", "proxy-managed")
        .body(Empty::new())?;
    let resp = s.send_request(req).await?;
    if resp.status() != 200 {
        return Err(format!("status {}", resp.status()).into());
    }
    resp.into_body().collect().await?;
    Ok(())
}

async fn latencies(t: &Target, n: usize) -> Res<(f64, f64)> {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let mut s = connect(t).await?;
            let mut us = Vec::with_capacity(n);
            for _ in 0..n {
                let start = Instant::now();
                one(&mut s, t.upstream.port()).await?;
                us.push(start.elapsed().as_secs_f64() * 1e6);
            }
            us.sort_by(f64::total_cmp);
            let pick = |q: f64| us[((us.len() as f64 - 1.0) * q) as usize];
            Ok((pick(0.5), pick(0.99)))
        })
        .await
}

async fn rate(t: &Target, conns: usize, secs: u64) -> Res<f64> {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let done = Arc::new(AtomicU64::new(0));
            let deadline = Instant::now() + Duration::from_secs(secs);
            let mut tasks = Vec::new();
            for _ in 0..conns {
                let mut s = connect(t).await?;
                let done = done.clone();
                let port = t.upstream.port();
                tasks.push(tokio::task::spawn_local(async move {
                    while Instant::now() < deadline {
                        if one(&mut s, port).await.is_err() {
                            break;
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
            let start = Instant::now();
            for task in tasks {
                let _ = task.await;
            }
            Ok(done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
        })
        .await
}
