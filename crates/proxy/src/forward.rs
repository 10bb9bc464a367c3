//! Plain HTTP/1: each request checked on its own, connections kept alive
//! both ways.
//!
//! The guest's connection is served by hyper's HTTP/1 server, and every
//! request on it is checked before anything of it goes upstream:
//!
//! - **http-proxy mode:** the request names its target in absolute form (only
//!   `http://`; HTTPS goes through CONNECT), the Host header must agree, and
//!   the policy decides that `host:port` ([`crate::decide`]; a repeat of the
//!   previous request's `host:port` reuses its decision while the policy is
//!   unchanged).
//! - **transparent mode:** the connection was decided on the claimed name
//!   when it opened; each request's Host header (and absolute-form target, if
//!   it uses one) must name that host and port.
//!
//! Either way, when the policy changed since (a `secret-read` label, a rule
//! removed), the request's `host:port` is decided again by the policy in
//! force before it is forwarded.
//!
//! A request goes upstream on a kept-alive HTTP/1.1 connection to an address
//! the policy checked for its `host:port`: the one the guest connection
//! used last if it fits, else one from the sandbox's pool of idle ones
//! (`upstream`), else a new one. hyper parses the guest's
//! request and writes it out anew, so framing the guest made ambiguous never
//! reaches the upstream as sent (no request smuggling past the checks).
//! Hop-by-hop headers are dropped both ways, protocol upgrades are refused,
//! and a refused request ends the connection. Each request is one audit
//! record, written once its response has gone out (or was abandoned; see
//! `exchange::Outbox`).

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use sandpen_policy::Policy;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::audit::ConnectionReport;
use crate::exchange::{
    millis, own_reply, strip_hop_by_hop, Audited, Counted, GuestIo, Outbox, Pending, ReplyBody,
    RequestLog,
};
use crate::relay::Activity;
use crate::upstream::Upstream;
use crate::{
    decide, http as h1, narrow, take_refusal, truncate, Checked, LiveCheck, Proxy, POLICY_CHANGED,
};

/// Largest request head (hyper's read buffer; it cannot be smaller than
/// 8 KiB).
const MAX_BUF: usize = h1::MAX_HEAD;

/// A transparent connection's claimed destination, decided when it opened.
pub(crate) struct Bound {
    pub host: String,
    pub port: u16,
    pub checked: Checked,
    /// The user approved the connection once (ask mode).
    pub once: bool,
}

/// How the served connection ended.
pub(crate) struct Served {
    /// The latest request's record, if any request was served.
    pub latest: Option<ConnectionReport>,
    /// Why the connection ended, if not by an orderly close. A malformed
    /// head has already been answered by hyper itself (400 or 431).
    pub error: Option<String>,
}

/// State shared by the requests of one guest connection.
struct Session {
    proxy: Proxy,
    bound: Option<Bound>,
    /// Sandbox and mode (and, when bound, the decision): each request's
    /// record starts from it.
    template: ConnectionReport,
    log: RequestLog,
    /// Taken by a request and put back once its response head has come.
    upstream: Mutex<Option<Upstream>>,
    /// The previous request's decision and the policy that made it.
    decided: Mutex<Option<Decided>>,
    requests: AtomicU64,
    /// Ask mode: the `host:port` the user approved once for this
    /// connection.
    once: Mutex<Option<(String, u16)>>,
}

/// A decision kept for the next request to the same `host:port`.
struct Decided {
    host: String,
    port: u16,
    checked: Checked,
    by: Arc<Policy>,
}

/// A request the checks let through: its origin-form target, the addresses
/// it may go to, and the policy that allowed it.
struct Allowed {
    origin: Uri,
    addrs: Vec<IpAddr>,
    by: Arc<Policy>,
}

/// Why a request is refused: status, reason, and whether a policy rule
/// decided it (then the record keeps the rule).
struct Refusal {
    status: StatusCode,
    reason: String,
    by_rule: bool,
}

impl Refusal {
    fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        Refusal {
            status,
            reason: reason.into(),
            by_rule: false,
        }
    }
}

/// Serve plain HTTP on `client` (whose first bytes, already read, are in
/// `first`; `bound` for a transparent connection, and the client's source
/// port in the guest) until the guest closes, a request is refused, or the connection
/// idles out.
pub(crate) async fn serve<S>(
    proxy: &Proxy,
    policy: Arc<Policy>,
    client: &mut S,
    first: Vec<u8>,
    template: &ConnectionReport,
    act: &Activity,
    bound: Option<Bound>,
) -> Served
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let cfg = proxy.config();
    let latest = Arc::new(Mutex::new(None));
    let mut template = template.clone();
    template.proto = Some("http".into());
    // A transparent connection's decision serves its requests until the
    // policy changes.
    let decided = bound.as_ref().map(|b| Decided {
        host: b.host.clone(),
        port: b.port,
        checked: b.checked.clone(),
        by: policy.clone(),
    });
    let once = bound
        .as_ref()
        .filter(|b| b.once)
        .map(|b| (b.host.clone(), b.port));
    let outbox = Outbox::new(proxy.clone());
    let session = Arc::new(Session {
        proxy: proxy.clone(),
        bound,
        template,
        log: RequestLog::keeping_latest(outbox.clone(), latest.clone()),
        upstream: Mutex::new(None),
        decided: Mutex::new(decided),
        requests: AtomicU64::new(0),
        once: Mutex::new(once),
    });
    let service = {
        let session = session.clone();
        hyper::service::service_fn(move |req| {
            let s = session.clone();
            async move { Ok::<_, Infallible>(s.forward(req).await) }
        })
    };
    let io = TokioIo::new(GuestIo {
        first: Bytes::from(first),
        inner: client,
        act,
        outbox,
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.handshake_timeout)
        .max_buf_size(MAX_BUF)
        .title_case_headers(true)
        .preserve_header_case(true)
        .serve_connection(io, service);
    let requests = || session.requests.load(Ordering::Relaxed);
    let error = tokio::select! {
        r = conn => match r {
            Ok(()) => None,
            Err(e) if e.is_parse_too_large() => Some(format!(
                "bad-request: request head larger than {MAX_BUF} bytes"
            )),
            Err(e) if e.is_parse() => Some(format!("bad-request: {e}")),
            // Waiting for the next request: an orderly end.
            Err(e) if e.is_timeout() && requests() > 0 => None,
            Err(e) if e.is_timeout() => Some("handshake-timeout".into()),
            Err(e) if e.is_incomplete_message() && requests() > 0 => {
                Some("client-closed: during a request".into())
            }
            Err(e) => Some(format!("client-error: {e}")),
        },
        _ = act.idle(cfg.idle_timeout) => Some("idle-timeout".into()),
    };
    // The upstream connection outlives the guest's, for the sandbox's next
    // connection to the same server.
    if let Some(u) = lock(&session.upstream).take() {
        proxy.pool().put(u);
    }
    drop(session);
    let latest = match latest.lock() {
        Ok(mut g) => g.take(),
        Err(poisoned) => poisoned.into_inner().take(),
    };
    Served { latest, error }
}

impl Session {
    /// Check one request and forward it; a refusal is answered here.
    async fn forward(&self, req: Request<Incoming>) -> Response<ReplyBody> {
        let started = Instant::now();
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut rec = self.template.clone();
        rec.time = time::OffsetDateTime::now_utc();
        rec.method = Some(truncate(req.method().as_str()));
        rec.path = Some(truncate(
            req.uri().path_and_query().map_or("/", |p| p.as_str()),
        ));
        let up_head = head_len_request(&req);
        let line = format!(
            "{} {} {:?}",
            req.method(),
            truncate(&req.uri().to_string()),
            req.version()
        );
        match self.check(&req, &mut rec).await {
            Ok(allowed) => self.send(req, rec, allowed, started, up_head).await,
            Err(r) => {
                if r.by_rule {
                    // Keeps the rule the decision named.
                    rec.reason = r.reason.clone();
                } else {
                    rec.deny(r.reason.clone());
                }
                rec.status = Some(r.status.as_u16());
                rec.bytes_up = up_head;
                rec.duration_ms = millis(started);
                let body = (r.status == StatusCode::FORBIDDEN)
                    .then(|| crate::denial::explain(&rec, Some(&line)));
                self.log.write(&rec);
                let mut resp = closing_reply(r.status, &r.reason);
                if let Some(body) = body {
                    *resp.body_mut() = http_body_util::Full::new(Bytes::from(body))
                        .map_err(|never| match never {})
                        .boxed();
                }
                resp
            }
        }
    }

    /// The request's origin-form target and the addresses it may go to.
    async fn check(
        &self,
        req: &Request<Incoming>,
        rec: &mut ConnectionReport,
    ) -> Result<Allowed, Refusal> {
        if req.method() == Method::CONNECT {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "bad-request: CONNECT on a connection that carries plain HTTP",
            ));
        }
        let upgrade = req.headers().contains_key(header::UPGRADE)
            && req
                .headers()
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        let target = req.uri().to_string();
        let (host, port, origin) = match &self.bound {
            Some(b) => {
                let origin = if req.uri().scheme().is_some() {
                    let t = h1::parse_absolute(&target).map_err(|e| {
                        Refusal::new(StatusCode::BAD_REQUEST, format!("bad-request: {e}"))
                    })?;
                    if !h1::same_host(&t.host, &b.host) || t.port != b.port {
                        return Err(Refusal::new(
                            StatusCode::FORBIDDEN,
                            format!("host-mismatch: URI names {}:{}", truncate(&t.host), t.port),
                        ));
                    }
                    t.origin
                } else if target.starts_with('/') || target == "*" {
                    target
                } else {
                    return Err(Refusal::new(
                        StatusCode::BAD_REQUEST,
                        format!("bad-request: target `{}` is not a path", truncate(&target)),
                    ));
                };
                (b.host.clone(), b.port, origin)
            }
            None => {
                let t = h1::parse_absolute(&target).map_err(|e| {
                    Refusal::new(StatusCode::BAD_REQUEST, format!("bad-request: {e}"))
                })?;
                rec.host = t.host.clone();
                rec.port = t.port;
                (t.host, t.port, t.origin)
            }
        };
        rec.path = Some(truncate(&origin));
        check_host_header(req.headers(), req.version(), &host, port)?;
        if upgrade {
            // After an upgrade bytes flow unframed, so later requests would
            // escape these checks. WebSockets over TLS are tunneled instead.
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "upgrade-refused: plain-HTTP protocol upgrades are not relayed; use TLS",
            ));
        }
        let origin: Uri = origin
            .parse()
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, format!("bad-request: {e}")))?;
        let (mut checked, mut by) = self.decide(&host, port).await;
        if let Some(asked) = crate::granted(&self.proxy, &by, &host, port, &checked).await {
            *lock(&self.once) = Some((host.clone(), port));
            (checked, by) = (asked.checked, asked.policy);
            *lock(&self.decided) = Some(Decided {
                host: host.clone(),
                port,
                checked: checked.clone(),
                by: by.clone(),
            });
        } else if checked.decision.ask {
            let said = format!(
                "{} {} {:?}",
                req.method(),
                truncate(&req.uri().to_string()),
                req.version()
            );
            let process = self.proxy.process_of(&self.template).await;
            let asked =
                crate::ask_user(&self.proxy, &host, port, Some(said), process, checked).await;
            if asked.once {
                *lock(&self.once) = Some((host.clone(), port));
            }
            (checked, by) = (asked.checked, asked.policy);
            *lock(&self.decided) = Some(Decided {
                host: host.clone(),
                port,
                checked: checked.clone(),
                by: by.clone(),
            });
        }
        let by_policy = checked.decision.permits();
        // Plain HTTP is never intercepted.
        checked.decision = narrow(&by, checked.decision, &host, false, false);
        rec.set_decision(&checked.decision);
        if !checked.decision.permits() {
            let reason = match &self.bound {
                // The connection was allowed when it opened.
                Some(_) if !by_policy => format!("{POLICY_CHANGED}: {}", checked.decision.reason),
                _ => checked.decision.reason,
            };
            return Err(Refusal {
                status: StatusCode::FORBIDDEN,
                reason,
                by_rule: true,
            });
        }
        Ok(Allowed {
            origin,
            addrs: checked.addrs,
            by,
        })
    }

    /// [`decide`] by the policy in force, reusing the previous request's
    /// decision when it was for the same `host:port` and the policy has not
    /// changed since; and that policy.
    async fn decide(&self, host: &str, port: u16) -> (Checked, Arc<Policy>) {
        let policy = self.proxy.current_policy();
        let cached = lock(&self.decided)
            .as_ref()
            .filter(|d| d.host == host && d.port == port && Arc::ptr_eq(&d.by, &policy))
            .map(|d| d.checked.clone());
        if let Some(c) = cached {
            return (c, policy);
        }
        let once = lock(&self.once)
            .as_ref()
            .is_some_and(|(h, p)| h == host && *p == port);
        let checked = match policy.with_once(host, port).filter(|_| once) {
            Some(p) => decide(&p, host, port).await,
            None => decide(&policy, host, port).await,
        };
        *lock(&self.decided) = Some(Decided {
            host: host.to_string(),
            port,
            checked: checked.clone(),
            by: policy.clone(),
        });
        (checked, policy)
    }

    async fn send(
        &self,
        req: Request<Incoming>,
        rec: ConnectionReport,
        allowed: Allowed,
        started: Instant,
        up_head: u64,
    ) -> Response<ReplyBody> {
        let host = rec.host.clone();
        let port = rec.port;
        let Allowed { origin, addrs, by } = allowed;
        let (mut parts, body) = req.into_parts();
        let http10 = parts.version == Version::HTTP_10;
        strip_hop_by_hop(&mut parts.headers);
        if http10 && !parts.headers.contains_key(header::HOST) {
            let authority = if port == 80 {
                host.clone()
            } else {
                format!("{host}:{port}")
            };
            if let Ok(v) = HeaderValue::from_str(&authority) {
                parts.headers.insert(header::HOST, v);
            }
        }
        parts.uri = origin;
        parts.version = Version::HTTP_11;
        let up = Arc::new(AtomicU64::new(up_head));
        // The body is checked chunk by chunk against policy changes.
        let cut = Arc::new(Mutex::new(None));
        let once = lock(&self.once)
            .as_ref()
            .is_some_and(|(h, p)| *h == host && *p == port);
        let live =
            LiveCheck::new(&self.proxy, &host, port, &addrs, by, cut.clone()).approved_once(once);
        let body = Counted {
            inner: body,
            count: up.clone(),
            live: Some(live),
        };
        // If the guest gives up before the answer comes, the request is
        // still logged.
        let mut pending = Pending {
            rec: Some(rec),
            up: up.clone(),
            started,
            log: self.log.clone(),
        };
        let (mut upstream, mut reused) = match self.upstream_for(&host, port, &addrs).await {
            Ok(u) => u,
            Err(reason) => {
                let Some(rec) = pending.rec.take() else {
                    return own_reply(StatusCode::INTERNAL_SERVER_ERROR, "internal: record taken");
                };
                return self.fail(rec, &up, started, reason);
            }
        };
        let mut req = Request::from_parts(parts, body);
        let sent = loop {
            if let Some(rec) = pending.rec.as_mut() {
                rec.addr = Some(upstream.addr.to_string());
            }
            match upstream.sender.try_send_request(req).await {
                Ok(resp) => break Ok(resp),
                Err(mut e) => match e.take_message() {
                    // A kept connection the server closed meanwhile; the
                    // request was not sent: once more on a new connection.
                    Some(back) if reused => {
                        req = back;
                        reused = false;
                        let cfg = self.proxy.config();
                        match Upstream::connect(&host, port, &addrs, cfg.connect_timeout).await {
                            Ok(u) => upstream = u,
                            Err(reason) => break Err(reason),
                        }
                    }
                    _ => break Err(format!("upstream-error: {}", deepest(&e.into_error()))),
                },
            }
        };
        let Some(mut rec) = pending.rec.take() else {
            return own_reply(StatusCode::INTERNAL_SERVER_ERROR, "internal: record taken");
        };
        match sent {
            Ok(resp) => {
                // Kept for the next request unless the upstream will close it.
                if !upstream.sender.is_closed() {
                    *lock(&self.upstream) = Some(upstream);
                }
                rec.status = Some(resp.status().as_u16());
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                let down = head_len_response(parts.status, &parts.headers);
                let body = Audited {
                    inner: body,
                    down,
                    up,
                    rec: Some(rec),
                    started,
                    log: self.log.clone(),
                    _permit: None,
                };
                Response::from_parts(parts, body.boxed())
            }
            Err(reason) => match take_refusal(&cut) {
                // The policy changed during the body: what was left of it
                // never went upstream.
                Some(d) => {
                    rec.set_decision(&d);
                    rec.reason = format!("{POLICY_CHANGED}: {}", d.reason);
                    rec.status = Some(StatusCode::FORBIDDEN.as_u16());
                    rec.bytes_up = up.load(Ordering::Relaxed);
                    rec.duration_ms = millis(started);
                    self.log.write(&rec);
                    closing_reply(StatusCode::FORBIDDEN, &rec.reason)
                }
                None => self.fail(rec, &up, started, reason),
            },
        }
    }

    /// A 502 for an allowed request that could not be completed.
    fn fail(
        &self,
        mut rec: ConnectionReport,
        up: &AtomicU64,
        started: Instant,
        reason: String,
    ) -> Response<ReplyBody> {
        rec.reason = reason.clone();
        rec.status = Some(502);
        rec.bytes_up = up.load(Ordering::Relaxed);
        rec.duration_ms = millis(started);
        self.log.write(&rec);
        closing_reply(StatusCode::BAD_GATEWAY, &reason)
    }

    /// The connection's kept upstream connection if it goes to `host:port`
    /// (at a checked address) and is usable, else an idle one from the
    /// sandbox's pool, else a new one; and whether it was used before.
    async fn upstream_for(
        &self,
        host: &str,
        port: u16,
        addrs: &[IpAddr],
    ) -> Result<(Upstream, bool), String> {
        let kept = lock(&self.upstream).take();
        if let Some(mut u) = kept {
            if !u.goes_to(host, port, addrs) {
                self.proxy.pool().put(u);
            } else if u.sender.ready().await.is_ok() {
                return Ok((u, true));
            }
        }
        if let Some(u) = self.proxy.pool().take(host, port, addrs).await {
            return Ok((u, true));
        }
        let timeout = self.proxy.config().connect_timeout;
        Upstream::connect(host, port, addrs, timeout)
            .await
            .map(|u| (u, false))
    }
}

/// The innermost cause of an error (hyper's own message is generic).
fn deepest(e: &(dyn std::error::Error + 'static)) -> String {
    let mut deepest = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        deepest = s.to_string();
        source = s.source();
    }
    deepest
}

/// A reply of the proxy's own after which the connection ends.
fn closing_reply(status: StatusCode, reason: &str) -> Response<ReplyBody> {
    let mut resp = own_reply(status, reason);
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// The Host header (required for HTTP/1.1) must name `host`, and its port,
/// if given, `port`.
fn check_host_header(
    headers: &HeaderMap,
    version: Version,
    host: &str,
    port: u16,
) -> Result<(), Refusal> {
    let bad = |why: String| Refusal::new(StatusCode::BAD_REQUEST, format!("bad-request: {why}"));
    let mut values = headers.get_all(header::HOST).iter();
    let Some(value) = values.next() else {
        if version == Version::HTTP_10 {
            return Ok(());
        }
        return Err(bad("HTTP/1.1 request without Host".into()));
    };
    if values.next().is_some() {
        return Err(bad("more than one host header".into()));
    }
    let value = value
        .to_str()
        .map_err(|_| bad("host header is not text".into()))?
        .trim();
    let (h, p) = h1::split_authority(value, port).map_err(bad)?;
    if !h1::same_host(&h, host) || p != port {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!("host-mismatch: Host {} for {host}:{port}", truncate(value)),
        ));
    }
    Ok(())
}

/// Bytes of a request head as it arrived, about (hyper does not expose
/// the raw head): the request line and the headers.
fn head_len_request<B>(req: &Request<B>) -> u64 {
    let line = req.method().as_str().len() + req.uri().to_string().len() + 12;
    (line + headers_len(req.headers())) as u64
}

/// Bytes of a response head as it is sent on, about.
fn head_len_response(status: StatusCode, headers: &HeaderMap) -> u64 {
    let line = 13 + status.canonical_reason().map_or(0, str::len) + 2;
    (line + headers_len(headers)) as u64
}

fn headers_len(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + 2
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}
