//! Plain-HTTP upstream connections: opened to an address the policy checked,
//! kept alive between requests, and shared by the guest connections of one
//! sandbox.
//!
//! A guest connection keeps its upstream connection while it lives (see
//! `forward`). When it ends, a connection that can take another request goes
//! to the sandbox's [`Pool`], where the next guest connection to the same
//! `host:port` finds it, provided the policy in force still allows that
//! address for that name. So a client that opens a connection per request
//! (or many clients, one after another) does not pay an upstream connect
//! each time. The pool holds at most [`ProxyConfig::pool_max_idle`]
//! connections, each for at most [`ProxyConfig::pool_idle_timeout`].
//!
//! [`ProxyConfig::pool_max_idle`]: crate::ProxyConfig::pool_max_idle
//! [`ProxyConfig::pool_idle_timeout`]: crate::ProxyConfig::pool_idle_timeout

use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::task::Poll;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1::{Builder, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::exchange::Counted;

/// Upstream responses may carry larger heads (many cookies).
const MAX_UPSTREAM_BUF: usize = 64 * 1024;

/// What an upstream connection carries: the guest's request bodies, counted.
pub(crate) type Sender = SendRequest<Counted<Incoming>>;

/// One HTTP/1.1 connection to an upstream server.
pub(crate) struct Upstream {
    pub host: String,
    pub port: u16,
    /// The checked address it is connected to.
    pub addr: SocketAddr,
    pub sender: Sender,
    /// Drives the connection; aborted when this is dropped.
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// Connect to the first of `addrs` (all checked for `host`) that answers.
    pub async fn connect(
        host: &str,
        port: u16,
        addrs: &[IpAddr],
        connect_timeout: Duration,
    ) -> Result<Upstream, String> {
        let mut last = String::from("no address");
        for ip in addrs {
            let addr = SocketAddr::new(*ip, port);
            let tcp = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    last = format!("{addr}: {e}");
                    continue;
                }
                Err(_) => {
                    last = format!("{addr}: timed out");
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (sender, conn) = Builder::new()
                .max_buf_size(MAX_UPSTREAM_BUF)
                .title_case_headers(true)
                .preserve_header_case(true)
                .handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| format!("upstream-error: {e}"))?;
            let task = tokio::spawn(async move {
                let _ = conn.await;
            });
            return Ok(Upstream {
                host: host.to_string(),
                port,
                addr,
                sender,
                task,
            });
        }
        Err(format!("connect-failed: {last}"))
    }

    /// Does it go to `host:port` at one of `addrs`?
    pub fn goes_to(&self, host: &str, port: u16, addrs: &[IpAddr]) -> bool {
        self.host == host && self.port == port && addrs.contains(&self.addr.ip())
    }

    /// Can it take a request now, without waiting? One that is still busy
    /// with an abandoned response, or closed, cannot.
    async fn ready_now(&mut self) -> bool {
        poll_fn(|cx| match self.sender.poll_ready(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(true),
            Poll::Ready(Err(_)) | Poll::Pending => Poll::Ready(false),
        })
        .await
    }
}

/// Idle upstream connections of one sandbox, most recently used last.
pub(crate) struct Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    max_idle: usize,
    idle_timeout: Duration,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    idle: Vec<Idle>,
    /// Closes connections idle too long; runs while any is idle.
    reaper: Option<JoinHandle<()>>,
}

struct Idle {
    upstream: Upstream,
    since: Instant,
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        if let Some(reaper) = lock(&self.state).reaper.take() {
            reaper.abort();
        }
    }
}

impl Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Pool {
        Pool {
            inner: Arc::new(PoolInner {
                max_idle,
                idle_timeout,
                state: Mutex::default(),
            }),
        }
    }

    /// An idle connection to `host:port` at one of `addrs` that can take a
    /// request now. Closed or busy ones met on the way are dropped.
    pub async fn take(&self, host: &str, port: u16, addrs: &[IpAddr]) -> Option<Upstream> {
        loop {
            let found = {
                let mut state = lock(&self.inner.state);
                let i = state
                    .idle
                    .iter()
                    .rposition(|i| i.upstream.goes_to(host, port, addrs))?;
                state.idle.remove(i)
            };
            let mut upstream = found.upstream;
            if found.since.elapsed() < self.inner.idle_timeout && upstream.ready_now().await {
                return Some(upstream);
            }
        }
    }

    /// Keep `upstream` for a later guest connection, if it is still open
    /// and there is room (the oldest idle connection makes room).
    pub fn put(&self, upstream: Upstream) {
        if self.inner.max_idle == 0 || upstream.sender.is_closed() {
            return;
        }
        let mut state = lock(&self.inner.state);
        state.idle.retain(|i| !i.upstream.sender.is_closed());
        if state.idle.len() >= self.inner.max_idle {
            state.idle.remove(0);
        }
        state.idle.push(Idle {
            upstream,
            since: Instant::now(),
        });
        if state.reaper.is_none() {
            state.reaper = Some(tokio::spawn(reap(Arc::downgrade(&self.inner))));
        }
    }

    /// Idle connections held now.
    #[cfg(test)]
    pub fn idle(&self) -> usize {
        lock(&self.inner.state).idle.len()
    }
}

/// Drop connections idle longer than the timeout (or closed by the server)
/// until none is left; then end, to be started again by the next `put`.
async fn reap(pool: Weak<PoolInner>) {
    loop {
        let wake = {
            let Some(pool) = pool.upgrade() else { return };
            let mut state = lock(&pool.state);
            let timeout = pool.idle_timeout;
            state
                .idle
                .retain(|i| i.since.elapsed() < timeout && !i.upstream.sender.is_closed());
            match state.idle.first() {
                Some(oldest) => oldest.since + timeout,
                None => {
                    state.reaper = None;
                    return;
                }
            }
        };
        tokio::time::sleep_until(wake).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    /// A server that reports each connection's end.
    async fn server() -> (u16, mpsc::UnboundedReceiver<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                    let _ = tx.send(());
                });
            }
        });
        (port, rx)
    }

    const LOCAL: [IpAddr; 1] = [IpAddr::V4(Ipv4Addr::LOCALHOST)];

    async fn conn(port: u16) -> Upstream {
        Upstream::connect("a.test", port, &LOCAL, Duration::from_secs(5))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn holds_at_most_max_idle_and_closes_the_oldest() {
        let (port, mut ended) = server().await;
        let pool = Pool::new(2, Duration::from_secs(60));
        for _ in 0..3 {
            pool.put(conn(port).await);
        }
        assert_eq!(pool.idle(), 2);
        tokio::time::timeout(Duration::from_secs(5), ended.recv())
            .await
            .expect("the oldest connection is closed");
        // Only for its own name, port and a checked address.
        assert!(pool.take("b.test", port, &LOCAL).await.is_none());
        assert!(pool.take("a.test", port + 1, &LOCAL).await.is_none());
        let other = [IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))];
        assert!(pool.take("a.test", port, &other).await.is_none());
        assert!(pool.take("a.test", port, &LOCAL).await.is_some());
        assert_eq!(pool.idle(), 1);
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_timeout() {
        let (port, mut ended) = server().await;
        let pool = Pool::new(4, Duration::from_millis(100));
        pool.put(conn(port).await);
        pool.put(conn(port).await);
        for _ in 0..2 {
            tokio::time::timeout(Duration::from_secs(5), ended.recv())
                .await
                .expect("closed by the reaper");
        }
        assert_eq!(pool.idle(), 0);
        // The reaper starts again for the next one.
        pool.put(conn(port).await);
        tokio::time::timeout(Duration::from_secs(5), ended.recv())
            .await
            .expect("closed by the reaper");
        assert!(pool.take("a.test", port, &LOCAL).await.is_none());
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_not_handed_out() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let pool = Pool::new(4, Duration::from_secs(60));
        let accept = tokio::spawn(async move { l.accept().await.unwrap().0 });
        pool.put(conn(port).await);
        drop(accept.await.unwrap());
        // hyper's connection task reads while idle, so it sees the close
        // (a request racing it is retried on a new connection, see forward).
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(pool.take("a.test", port, &LOCAL).await.is_none());
        assert_eq!(pool.idle(), 0);
    }
}
