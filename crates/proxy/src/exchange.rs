//! Pieces shared by the two paths that speak HTTP through hyper: plain-HTTP
//! forwarding (`forward`) and credential interception (`mitm`).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::audit::ConnectionReport;
use crate::relay::Activity;
use crate::{LiveCheck, Proxy};

/// The body of every response the proxy sends the guest.
pub(crate) type ReplyBody = BoxBody<Bytes, hyper::Error>;

/// The guest side of a connection that speaks HTTP through hyper: replays
/// the bytes already read (a ClientHello, a request head), then reads the
/// guest; counts both directions. Request records held in its [`Outbox`] go
/// to the audit log after each write to the guest and before each read, and
/// when it is dropped.
pub(crate) struct GuestIo<'a, S> {
    pub(crate) first: Bytes,
    pub(crate) inner: &'a mut S,
    pub(crate) act: &'a Activity,
    pub(crate) outbox: Outbox,
}

impl<S> Drop for GuestIo<'_, S> {
    fn drop(&mut self) {
        self.outbox.send();
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for GuestIo<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.outbox.send();
        if !self.first.is_empty() {
            let n = self.first.len().min(buf.remaining());
            let head = self.first.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.act.add_up(n);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for GuestIo<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut *self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.act.add_down(*n);
            self.outbox.send();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// What a request body fails with when the policy cuts it.
pub(crate) type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A request body on its way upstream: counts its data bytes into a shared
/// counter and, given a [`LiveCheck`], passes every chunk by it first. A
/// chunk the policy in force refuses (a `secret-read` label set while a
/// long upload is still going) ends the body with an error instead, so the
/// upstream never gets it; hyper then abandons the request and its
/// connection. The refusing decision is in the check's cut slot.
pub(crate) struct Counted<B> {
    pub(crate) inner: B,
    pub(crate) count: Arc<AtomicU64>,
    pub(crate) live: Option<LiveCheck>,
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BodyError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref() {
            this.count.fetch_add(data.len() as u64, Ordering::Relaxed);
            if let Some(live) = this.live.as_mut() {
                if let Err(reason) = live.check() {
                    return Poll::Ready(Some(Err(reason.into())));
                }
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and those a `Connection` header
/// names: they describe one hop and are not forwarded.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
        header::TRAILER,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// A response made by the proxy itself, with the reason code in
/// `X-Sandpen-Reason` like the plain-HTTP deny page.
pub(crate) fn own_reply(status: StatusCode, reason: &str) -> Response<ReplyBody> {
    let code = reason.split(':').next().unwrap_or_default();
    let mut resp = Response::new(
        Full::new(Bytes::from(format!("sandpen: {reason}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if let Ok(v) = HeaderValue::from_str(code) {
        h.insert("x-sandpen-reason", v);
    }
    resp
}

pub(crate) fn millis(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Request records of one guest connection on their way to the audit log.
///
/// A record is complete when its response body ends, which is before hyper
/// writes the last of the response out; written then, the log write would
/// sit between the upstream's answer and the guest. Held here instead, it
/// is written right after the guest connection's next write (the response
/// itself) or read (hyper reads again once a response is out), and at the
/// latest when the connection ends ([`GuestIo`]'s drop).
#[derive(Clone)]
pub(crate) struct Outbox {
    proxy: Proxy,
    held: Arc<Mutex<Vec<ConnectionReport>>>,
}

impl Outbox {
    pub(crate) fn new(proxy: Proxy) -> Self {
        Outbox {
            proxy,
            held: Arc::default(),
        }
    }

    fn hold(&self, rec: ConnectionReport) {
        lock(&self.held).push(rec);
    }

    /// Write the held records to the audit log.
    pub(crate) fn send(&self) {
        let held = std::mem::take(&mut *lock(&self.held));
        for rec in &held {
            self.proxy.write_record(rec);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Where request records go: the connection's [`Outbox`] and, for plain
/// HTTP, the connection's note of its latest request (which becomes what
/// [`Proxy::handle`] returns).
#[derive(Clone)]
pub(crate) struct RequestLog {
    outbox: Outbox,
    latest: Option<Arc<Mutex<Option<ConnectionReport>>>>,
}

impl RequestLog {
    pub(crate) fn new(outbox: Outbox) -> Self {
        RequestLog {
            outbox,
            latest: None,
        }
    }

    /// Also keep each record in `latest`.
    pub(crate) fn keeping_latest(
        outbox: Outbox,
        latest: Arc<Mutex<Option<ConnectionReport>>>,
    ) -> Self {
        RequestLog {
            outbox,
            latest: Some(latest),
        }
    }

    pub(crate) fn write(&self, rec: &ConnectionReport) {
        self.outbox.hold(rec.clone());
        if let Some(latest) = &self.latest {
            let mut slot = match latest.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            *slot = Some(rec.clone());
        }
    }
}

/// A response body that writes its request's audit record when it ends
/// (or the guest drops it), with the bytes that went each way.
pub(crate) struct Audited<B = Incoming> {
    pub(crate) inner: B,
    /// Bytes down so far (the head's, then the body's data).
    pub(crate) down: u64,
    pub(crate) up: Arc<AtomicU64>,
    pub(crate) rec: Option<ConnectionReport>,
    pub(crate) started: Instant,
    pub(crate) log: RequestLog,
    /// Released when the response ends.
    pub(crate) _permit: Option<OwnedSemaphorePermit>,
}

impl<B> Body for Audited<B>
where
    B: Body<Data = Bytes, Error = hyper::Error> + Unpin,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &r {
            if let Some(data) = frame.data_ref() {
                self.down += data.len() as u64;
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Audited<B> {
    fn drop(&mut self) {
        if let Some(mut rec) = self.rec.take() {
            rec.bytes_up = self.up.load(Ordering::Relaxed);
            rec.bytes_down = self.down;
            rec.duration_ms = millis(self.started);
            self.log.write(&rec);
        }
    }
}

/// The record of a request whose answer has not come yet; written with
/// reason `guest-cancelled` if the guest drops the request first.
pub(crate) struct Pending {
    pub(crate) rec: Option<ConnectionReport>,
    pub(crate) up: Arc<AtomicU64>,
    pub(crate) started: Instant,
    pub(crate) log: RequestLog,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(mut rec) = self.rec.take() {
            rec.reason = "guest-cancelled: before the upstream answered".into();
            rec.bytes_up = self.up.load(Ordering::Relaxed);
            rec.duration_ms = millis(self.started);
            self.log.write(&rec);
        }
    }
}
