//! A vendor's download host in a test: static files from a folder over
//! HTTPS (HTTP/1.1, keep-alive), on `ADDR:443`, with a leaf from a test CA
//! that a sandbox trusts upstream through `--upstream-ca`. Reached through
//! `--add-host VENDOR:ADDR`, it stands in for the vendor on exactly the path
//! a user's machine takes: guest, proxy (policy, interception, cache), TLS
//! to the "vendor". Every request is recorded (`requests()`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running mirror; it stops when dropped.
pub struct Mirror {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Mirror {
    /// Serves `root` on `addr` with `cert`/`key` (PEM files).
    pub fn start(
        root: &Path,
        addr: SocketAddr,
        cert: &Path,
        key: &Path,
    ) -> std::io::Result<Mirror> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(std::io::Error::other)?
            .collect::<Result<_, _>>()
            .map_err(std::io::Error::other)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(std::io::Error::other)?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(std::io::Error::other)?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind(addr))?;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let root = root.to_path_buf();
        let log = requests.clone();
        runtime.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, root, log) = (acceptor.clone(), root.clone(), log.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = serve(tls, &root, &log).await;
                    }
                });
            }
        });
        Ok(Mirror {
            addr,
            requests,
            _runtime: runtime,
        })
    }

    /// `GET /dist/index.json`, one per request, in order.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

async fn serve<S>(mut io: S, root: &Path, log: &Mutex<Vec<String>>) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = io.read(&mut chunk).await?;
            if n == 0 || buf.len() > 64 * 1024 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let mut words = head.lines().next().unwrap_or("").split_whitespace();
        let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        if let Ok(mut l) = log.lock() {
            l.push(format!("{method} {target}"));
        }
        let path = target.split('?').next().unwrap_or("");
        let file: Option<PathBuf> = (!path.split('/').any(|c| c == ".." || c == "."))
            .then(|| root.join(path.trim_start_matches('/')))
            .filter(|p| p.is_file());
        match file.and_then(|p| std::fs::read(p).ok()) {
            Some(body) if method == "GET" || method == "HEAD" => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
                    body.len()
                );
                io.write_all(head.as_bytes()).await?;
                if method == "GET" {
                    io.write_all(&body).await?;
                }
            }
            _ => {
                io.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\nnot found\n")
                    .await?;
            }
        }
        io.flush().await?;
    }
}
