//! The host side of sandpen's egress: every connection the guest opens
//! arrives here as a stream with an [`EgressOpen`] header, and leaves (or not)
//! by the rules of [`sandpen_policy`].
//!
//! For each connection [`Proxy::handle`]:
//!
//! 1. takes the claimed `host:port` from the header (transparent mode) or from
//!    the client's proxy request (`CONNECT host:port` or `GET http://host/...`);
//! 2. calls [`decide`]: the policy on the name, host-side resolution
//!    (`--add-host` overrides first), and the policy again on the addresses
//!    (blocked ranges). `sandpen policy check` calls the same function;
//! 3. reads the client's first bytes (bounded in size and time): a TLS
//!    ClientHello's SNI must equal the claimed name (`sni-mismatch`); a plain
//!    HTTP request's Host must equal it (`host-mismatch`), a request line
//!    being recognized in any case and however split (`http::classify`);
//!    other bytes are raw TCP, which a name rule must allow with ` raw`
//!    (`raw-refused`);
//! 4. connects to exactly an address that was checked, forwards the peeked
//!    bytes once they pass the live check (the policy and labels in force
//!    when they leave decide them, see [`LiveCheck`]) and relays byte for
//!    byte, every chunk checked the same way (a bidirectional copy with
//!    adaptive buffers, see `relay`; from a TCP socket to a TCP socket, as
//!    in standalone mode, with `splice(2)` instead, see `splice`);
//! 5. writes one audit record ([`ConnectionReport`]) and returns it (plain
//!    HTTP: one per request).
//!
//! Plain HTTP is served request by request, each checked and logged, with
//! connections kept alive both ways and upstream connections shared by the
//! sandbox's guest connections (see `forward` and `upstream`).
//! Server-first protocols (SMTP, MySQL) work on ports other than 80 and 443
//! under a ` raw` rule: when the client has said nothing after
//! [`ProxyConfig::server_first_after`], the proxy connects and relays raw
//! bytes; the client's first bytes are still told apart and checked.

pub mod ask;
pub mod audit;
pub mod denial;
mod exchange;
mod forward;
pub mod http;
pub mod mitm;
mod relay;
mod splice;
pub mod tls;
pub mod toolcache;
mod upstream;

use std::any::Any;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use sandpen_policy::{Decision, Host, Policy, Verdict};
use sandpen_proto::messages::{EgressMode, EgressOpen};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{timeout_at, Instant};

pub use ask::{Answer, AskError, AskQueue, Asking, PendingInfo, ONCE_WINDOW};
pub use audit::{read_log, AuditError, AuditLog, ConnectionReport, GuestProcess, LogFilter};
use http::{FirstBytes, HeadError, RequestHead};
use mitm::Mitm;
use relay::{Activity, Dir, Tracked};
use tls::Hello;

/// Limits and timeouts of one sandbox's proxy.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Written into every audit record.
    pub sandbox: String,
    /// Time allowed for a proxy request head, a ClientHello or an HTTP head.
    pub handshake_timeout: Duration,
    /// On ports other than 80 and 443, how long the client may stay silent
    /// before the proxy treats the protocol as server-first and connects.
    pub server_first_after: Duration,
    /// A relayed connection with no byte either way for this long is closed.
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// Connections handled at once; beyond it new ones are refused
    /// (`too-many-connections`) with a warning in the log.
    pub max_connections: usize,
    /// The most a tunnel direction buffers while bytes flow (an idle tunnel
    /// holds no buffer; see `relay`).
    pub buffer_size: usize,
    /// Idle plain-HTTP upstream connections kept for the sandbox's later
    /// guest connections (see `upstream`); 0 keeps none.
    pub pool_max_idle: usize,
    /// How long such a connection is kept unused.
    pub pool_idle_timeout: Duration,
    /// A tunnel between two TCP sockets (standalone mode) moves its bytes
    /// with splice(2) rather than copying them (see `splice`).
    pub splice: bool,
}

impl ProxyConfig {
    /// Defaults: 10 s handshake, 1 s server-first wait, 5 min idle, 10 s
    /// connect, 512 connections, 256 KiB buffers at most, 64 idle upstream
    /// connections kept for 30 s.
    pub fn new(sandbox: impl Into<String>) -> Self {
        ProxyConfig {
            sandbox: sandbox.into(),
            handshake_timeout: Duration::from_secs(10),
            server_first_after: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            max_connections: 512,
            buffer_size: 256 * 1024,
            pool_max_idle: 64,
            pool_idle_timeout: Duration::from_secs(30),
            splice: true,
        }
    }
}

/// Time allowed for a host-side name lookup.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A decision and, when it permits the connection, the addresses that were
/// checked (the only ones the proxy may connect to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub decision: Decision,
    pub addrs: Vec<IpAddr>,
}

/// Decide a connection to `host:port` exactly as the proxy does: the policy
/// on the name, then host-side resolution (`--add-host` overrides, else the
/// system resolver; a denied name is never looked up), then the policy on
/// the addresses. `sandpen policy check` must call this, not `Policy::check`
/// alone, so that it agrees with the proxy.
pub async fn decide(policy: &Policy, host: &str, port: u16) -> Checked {
    let deny = |decision| Checked {
        decision,
        addrs: Vec::new(),
    };
    let first = policy.check(host, port, None);
    if !first.permits() {
        return deny(first);
    }
    let addrs = match resolve(policy, host, port).await {
        Ok(a) => a,
        Err(e) => return deny(Decision::deny(format!("resolve-failed: {e}"))),
    };
    let decision = policy.check(host, port, Some(&addrs));
    if decision.permits() {
        Checked { decision, addrs }
    } else {
        deny(decision)
    }
}

async fn resolve(policy: &Policy, host: &str, port: u16) -> Result<Vec<IpAddr>, String> {
    let name = match Host::parse(host).map_err(|e| e.to_string())? {
        Host::Ip(ip) => return Ok(vec![ip]),
        Host::Name(n) => n,
    };
    let overrides = policy.overrides_for(&name);
    if !overrides.is_empty() {
        return Ok(overrides);
    }
    let found = tokio::time::timeout(
        RESOLVE_TIMEOUT,
        tokio::net::lookup_host((name.as_str(), port)),
    )
    .await
    .map_err(|_| "timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let mut ips: Vec<IpAddr> = Vec::new();
    for a in found {
        if !ips.contains(&a.ip()) {
            ips.push(a.ip());
        }
    }
    if ips.is_empty() {
        return Err("no addresses".into());
    }
    Ok(ips)
}

/// Ask mode: which guest process opened the connection whose client has
/// this source port (asked of PID 1 only when a connection is held; the
/// answer is shown, never trusted).
pub type ProcessLookup = Arc<
    dyn Fn(u16) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<String>> + Send>>
        + Send
        + Sync,
>;

/// Brings the proxy's policy up to date, e.g. by re-reading the policy files
/// and flow labels when they changed and calling [`Proxy::set_policy`]. Called
/// before every decision, and before each chunk a live connection sends up.
pub type Refresh = Arc<dyn Fn(&Proxy) + Send + Sync>;

struct Inner {
    config: ProxyConfig,
    policy: RwLock<Arc<Policy>>,
    refresh: RwLock<Option<Refresh>>,
    mitm: RwLock<Option<Arc<Mitm>>>,
    audit: AuditLog,
    limiter: Arc<Semaphore>,
    /// Idle plain-HTTP upstream connections.
    pool: upstream::Pool,
    last_limit_warning: AtomicU64,
    started: Instant,
    /// Ask mode: connections waiting for the user.
    ask: AskQueue,
    process_lookup: RwLock<Option<ProcessLookup>>,
}

/// One sandbox's egress proxy. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("config", &self.inner.config)
            .finish()
    }
}

/// Why a connection ended early; becomes the record's reason.
enum Stop {
    /// A hard deny by the proxy, with the HTTP status to answer (if the
    /// client speaks HTTP to us) and the reason.
    Deny(Option<u16>, String),
    /// The connection was allowed but ended for this reason.
    End(String),
}

/// Decides a live connection again when the policy changed since it was
/// decided (a `secret-read` label set by a file read, a rule removed): the
/// guest must not keep sending through a connection that the policy in force
/// would refuse. Cheap when nothing changed: the refresh hook (a few `stat`s
/// in the supervisor) and a pointer comparison. Clones share the cut slot.
#[derive(Clone)]
pub(crate) struct LiveCheck {
    proxy: Proxy,
    host: String,
    port: u16,
    addrs: Vec<IpAddr>,
    decided_with: Arc<Policy>,
    /// The decision that cut the connection, for its record.
    cut: Arc<Mutex<Option<Decision>>>,
    /// The proxy swaps the user's credential in (see [`narrow`]).
    intercepted: bool,
    /// The connection carries bytes that are neither HTTP nor TLS.
    raw: bool,
    /// The user approved this connection once (ask mode): it is decided
    /// again with that approval (`Policy::with_once`).
    once: bool,
}

impl LiveCheck {
    pub(crate) fn new(
        proxy: &Proxy,
        host: &str,
        port: u16,
        addrs: &[IpAddr],
        decided_with: Arc<Policy>,
        cut: Arc<Mutex<Option<Decision>>>,
    ) -> Self {
        LiveCheck {
            proxy: proxy.clone(),
            host: host.to_string(),
            port,
            addrs: addrs.to_vec(),
            decided_with,
            cut,
            intercepted: false,
            raw: false,
            once: false,
        }
    }

    /// The user approved this connection once: policy changes decide it
    /// with that approval.
    pub(crate) fn approved_once(mut self, once: bool) -> Self {
        self.once = once;
        self
    }

    /// The connection is intercepted: a trusted sink named only by the
    /// workspace stays open for it.
    pub(crate) fn intercepted(mut self) -> Self {
        self.intercepted = true;
        self
    }

    /// The connection carries raw bytes: a name rule must say ` raw`.
    pub(crate) fn carrying_raw(mut self, raw: bool) -> Self {
        self.raw = raw;
        self
    }

    /// The addresses the connection may use.
    pub(crate) fn addrs(&self) -> &[IpAddr] {
        &self.addrs
    }

    /// The decision that refused the connection, once [`check`](Self::check)
    /// has.
    pub(crate) fn take_cut(&self) -> Option<Decision> {
        take_refusal(&self.cut)
    }

    /// `Err(reason)` if the policy in force now refuses the connection.
    pub(crate) fn check(&mut self) -> Result<(), String> {
        let now = self.proxy.current_policy();
        if Arc::ptr_eq(&now, &self.decided_with) {
            return Ok(());
        }
        let effective = match self.once {
            true => now.with_once(&self.host, self.port).map(Arc::new),
            false => None,
        };
        let by = effective.as_deref().unwrap_or(&now);
        let mut d = by.check(&self.host, self.port, None);
        if d.permits() {
            d = by.check(&self.host, self.port, Some(&self.addrs));
        }
        let d = narrow(by, d, &self.host, self.intercepted, self.raw);
        self.decided_with = now;
        if d.verdict == Verdict::WouldDeny {
            // Learn mode lets it go on; the connection's record notes it.
            if let Ok(mut cut) = self.cut.lock() {
                cut.get_or_insert(d);
            }
            return Ok(());
        }
        if d.permits() {
            return Ok(());
        }
        let reason = format!("{POLICY_CHANGED}: {}", d.reason);
        if let Ok(mut cut) = self.cut.lock() {
            *cut = Some(d);
        }
        Err(reason)
    }
}

/// What a permitting decision still requires of the connection, now that
/// the proxy knows what it carries (docs/egress.md):
///
/// - raw bytes (neither HTTP nor TLS) need an address rule or a name rule
///   that says ` raw` (`raw-refused`, in every mode: like the Host check, it
///   keeps the name the policy allowed the name the server sees);
/// - after `secret-read`, a trusted sink that only the workspace names stays
///   open only for an intercepted connection, which carries the user's own
///   credential (`flow`, `would-deny` in learn mode).
pub(crate) fn narrow(
    policy: &Policy,
    d: Decision,
    host: &str,
    intercepted: bool,
    raw: bool,
) -> Decision {
    if d.verdict != Verdict::Allow {
        return d;
    }
    if raw && !d.raw {
        return Decision::new(
            Verdict::Deny,
            d.rule,
            format!("{RAW_REFUSED}: neither HTTP nor TLS; a rule allowing the name must say `raw`"),
        );
    }
    if d.sink_if_intercepted && !intercepted {
        let verdict = if policy.mode() == sandpen_policy::Mode::Learn {
            Verdict::WouldDeny
        } else {
            Verdict::Deny
        };
        return Decision::new(
            verdict,
            d.rule,
            format!(
                "{}: after secret-read {} is a trusted sink only through interception \
                 (only the workspace's .sandpen.toml names it)",
                sandpen_policy::reason::FLOW,
                truncate(host)
            ),
        );
    }
    d
}

/// Reason code of raw bytes on a connection a name rule without ` raw`
/// allowed.
pub(crate) const RAW_REFUSED: &str = "raw-refused";

/// The refusing decision in a [`LiveCheck`]'s cut slot, if it holds one. A
/// learn-mode `would-deny` stays there: it cut nothing, and the
/// connection's record notes it at the end.
pub(crate) fn take_refusal(slot: &Mutex<Option<Decision>>) -> Option<Decision> {
    let mut slot = slot.lock().ok()?;
    if slot.as_ref().is_some_and(|d| !d.permits()) {
        slot.take()
    } else {
        None
    }
}

/// Reason code of a live connection cut because the policy changed.
pub(crate) const POLICY_CHANGED: &str = "policy-changed";

/// The reason a relay ended: a cut by [`LiveCheck`] is a deny.
fn relay_stop(e: io::Error) -> Stop {
    let text = e.to_string();
    if e.kind() == io::ErrorKind::PermissionDenied && text.starts_with(POLICY_CHANGED) {
        Stop::Deny(None, text)
    } else {
        Stop::End(format!("relay-error: {text}"))
    }
}

impl Proxy {
    pub fn new(config: ProxyConfig, policy: Policy, audit: AuditLog) -> Proxy {
        let sandbox = config.sandbox.clone();
        let limiter = Arc::new(Semaphore::new(config.max_connections.max(1)));
        let pool = upstream::Pool::new(config.pool_max_idle, config.pool_idle_timeout);
        Proxy {
            inner: Arc::new(Inner {
                config,
                policy: RwLock::new(Arc::new(policy)),
                refresh: RwLock::new(None),
                mitm: RwLock::new(None),
                audit,
                limiter,
                pool,
                last_limit_warning: AtomicU64::new(0),
                started: Instant::now(),
                ask: AskQueue::new(sandbox),
                process_lookup: RwLock::new(None),
            }),
        }
    }

    /// Install the hook that brings the policy up to date (see [`Refresh`]).
    pub fn set_refresh(&self, refresh: Option<Refresh>) {
        match self.inner.refresh.write() {
            Ok(mut r) => *r = refresh,
            Err(poisoned) => *poisoned.into_inner() = refresh,
        }
    }

    /// The policy in force after running the refresh hook.
    pub fn current_policy(&self) -> Arc<Policy> {
        let hook = match self.inner.refresh.read() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        if let Some(refresh) = hook {
            refresh(self);
        }
        self.policy()
    }

    /// Replace the policy. Connections that start afterwards are decided
    /// by it, and open ones are decided again before they send more (see
    /// [`LiveCheck`]).
    pub fn set_policy(&self, policy: Policy) {
        let policy = Arc::new(policy);
        match self.inner.policy.write() {
            Ok(mut p) => *p = policy.clone(),
            Err(poisoned) => *poisoned.into_inner() = policy.clone(),
        }
        // A rule that now decides a held destination releases it.
        self.inner.ask.recheck(&policy);
    }

    /// Install the hook that names a held connection's guest process.
    pub fn set_process_lookup(&self, lookup: Option<ProcessLookup>) {
        match self.inner.process_lookup.write() {
            Ok(mut l) => *l = lookup,
            Err(poisoned) => *poisoned.into_inner() = lookup,
        }
    }

    /// Starts looking up the guest process behind `src_port` (the hook, at
    /// most 2 s), alongside the connection: nothing waits for it but the
    /// records' writing ([`Proxy::write_record`]) and ask mode's entry.
    /// `None`, at no cost, without a hook or a port.
    fn start_lookup(&self, src_port: u16) -> Option<audit::ProcessSlot> {
        if src_port == 0 {
            return None;
        }
        let hook = match self.inner.process_lookup.read() {
            Ok(l) => l.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }?;
        let (tx, slot) = audit::ProcessSlot::new();
        tokio::spawn(async move {
            let found = tokio::time::timeout(Duration::from_secs(2), hook(src_port))
                .await
                .ok()
                .flatten();
            let _ = tx.send(Some(found));
        });
        Some(slot)
    }

    /// The guest process of the connection whose record is `rec`, once its
    /// lookup is done (ask mode names it).
    pub(crate) async fn process_of(&self, rec: &ConnectionReport) -> Option<String> {
        rec.lookup.as_ref()?.wait().await
    }

    /// Ask mode's queue of held connections (see [`ask`]).
    pub fn ask(&self) -> &AskQueue {
        &self.inner.ask
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        match self.inner.policy.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Turn credential interception on (or off with `None`); connections
    /// that start afterwards use it.
    pub fn set_mitm(&self, mitm: Option<Mitm>) {
        let mitm = mitm.map(Arc::new);
        match self.inner.mitm.write() {
            Ok(mut m) => *m = mitm,
            Err(poisoned) => *poisoned.into_inner() = mitm,
        }
    }

    fn mitm(&self) -> Option<Arc<Mitm>> {
        match self.inner.mitm.read() {
            Ok(m) => m.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Append one record to the audit log; a failure is a warning. A record
    /// whose guest process is still being looked up is written when the
    /// lookup ends (at most 2 s later; docs/egress.md, "Audit log"), by a
    /// task of its own: the connection never waits for it.
    pub(crate) fn write_record(&self, rec: &ConnectionReport) {
        let Some(slot) = rec.lookup.as_ref().filter(|_| rec.process.is_none()) else {
            return self.append_record(rec);
        };
        if let Some(found) = slot.ready() {
            let mut rec = rec.clone();
            rec.process = found.as_deref().and_then(GuestProcess::parse);
            return self.append_record(&rec);
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return self.append_record(rec);
        };
        let (proxy, slot, mut rec) = (self.clone(), slot.clone(), rec.clone());
        rt.spawn(async move {
            rec.process = slot.wait().await.as_deref().and_then(GuestProcess::parse);
            proxy.append_record(&rec);
        });
    }

    fn append_record(&self, rec: &ConnectionReport) {
        if let Err(e) = self.inner.audit.write(rec) {
            tracing::warn!(sandbox = %rec.sandbox, error = %e, "egress audit record not written");
        }
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.inner.config
    }

    pub(crate) fn pool(&self) -> &upstream::Pool {
        &self.inner.pool
    }

    /// Handle one guest connection to its end and return (and log) its
    /// record. When `stream` is a [`TcpStream`] (standalone mode), tunnels
    /// move their bytes with `splice(2)` (see [`ProxyConfig::splice`]).
    pub async fn handle<S>(&self, stream: S, open: EgressOpen) -> ConnectionReport
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let started = Instant::now();
        let cfg = &self.inner.config;
        let mode = match open.mode {
            EgressMode::Transparent => "transparent",
            EgressMode::HttpProxy => "http-proxy",
        };
        let mut rec = ConnectionReport::new(&cfg.sandbox, mode, &open.host, open.port);
        rec.lookup = self.start_lookup(open.src_port);
        let mut logged = false;
        match self.inner.limiter.clone().try_acquire_owned() {
            Ok(permit) => {
                let act = Activity::new();
                let mut conn = Conn {
                    proxy: self,
                    rec: &mut rec,
                    act: &act,
                    policy: self.current_policy(),
                    decision: None,
                    cut: Arc::default(),
                    logged: false,
                    once: false,
                };
                conn.run(stream, open).await;
                logged = conn.logged;
                rec.bytes_up = act.up();
                rec.bytes_down = act.down();
                drop(permit);
            }
            Err(_) => {
                self.warn_limit();
                rec.deny(format!(
                    "too-many-connections: {} connections open",
                    cfg.max_connections
                ));
            }
        }
        rec.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if !logged {
            self.write_record(&rec);
        }
        // The audit log (rotated) is the record; this line is for debugging only,
        // since the guest can trigger it at will.
        if rec.decision == sandpen_policy::Verdict::Deny {
            tracing::debug!(
                sandbox = %rec.sandbox, host = %rec.host, port = rec.port,
                rule = ?rec.rule_id, reason = %rec.reason, "egress denied"
            );
        }
        rec
    }

    /// At most one warning a second while the cap is hit.
    fn warn_limit(&self) {
        let now = self.inner.started.elapsed().as_secs() + 1;
        let last = self.inner.last_limit_warning.swap(now, Ordering::Relaxed);
        if last != now {
            tracing::warn!(
                sandbox = %self.inner.config.sandbox,
                limit = self.inner.config.max_connections,
                "egress connection limit reached: refusing new connections from the sandbox"
            );
        }
    }
}

/// Accept HTTP proxy clients on `listener` and run each through
/// [`Proxy::handle`] in `http-proxy` mode. Runs until the task is dropped.
pub async fn serve_http_proxy(proxy: Proxy, listener: TcpListener) -> io::Result<()> {
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and similar: back off instead of spinning.
                tracing::warn!(error = %e, "egress proxy accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let p = proxy.clone();
        tokio::spawn(async move {
            let open = EgressOpen {
                mode: EgressMode::HttpProxy,
                host: String::new(),
                port: 0,
                // Named to the process lookup hook, if one is installed.
                src_port: peer.port(),
            };
            p.handle(sock, open).await;
        });
    }
}

/// One connection's state.
struct Conn<'a> {
    proxy: &'a Proxy,
    rec: &'a mut ConnectionReport,
    act: &'a Activity,
    /// The policy the connection was decided by.
    policy: Arc<Policy>,
    /// The decision, once made.
    decision: Option<Decision>,
    /// Set when a policy change cut the live connection.
    cut: Arc<Mutex<Option<Decision>>>,
    /// Its requests wrote their own records (plain HTTP): the connection
    /// writes none.
    logged: bool,
    /// The user approved it once in ask mode.
    once: bool,
}

/// The plain-HTTP deny page; `body` is its text.
fn http_error(status: u16, reason: &str, body: &str) -> Vec<u8> {
    let text = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        _ => "Error",
    };
    let code = reason.split(':').next().unwrap_or_default();
    format!(
        "HTTP/1.1 {status} {text}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\nX-Sandpen-Reason: {code}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn is_web_port(port: u16) -> bool {
    port == 80 || port == 443
}

impl Conn<'_> {
    fn cfg(&self) -> &ProxyConfig {
        &self.proxy.inner.config
    }

    async fn run<S>(&mut self, mut client: S, open: EgressOpen)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let result = match open.mode {
            EgressMode::Transparent => self.transparent(&mut client, &open.host, open.port).await,
            EgressMode::HttpProxy => self.http_proxy(&mut client).await,
        };
        match result {
            Ok(()) => {}
            Err(Stop::Deny(status, reason)) => {
                // A cut by a policy change keeps the rule that made it.
                let cut = self.cut.lock().ok().and_then(|mut c| c.take());
                if let Some(d) = cut.filter(|_| reason.starts_with(POLICY_CHANGED)) {
                    self.rec.set_decision(&d);
                    self.rec.reason = reason.clone();
                }
                if let Some(status) = status {
                    let body = if status == 403 {
                        let mut r = self.rec.clone();
                        if r.reason != reason {
                            r.deny(reason.clone());
                        }
                        let line = match (r.method.as_deref(), r.path.as_deref()) {
                            (Some(m), _) if m.eq_ignore_ascii_case("CONNECT") => {
                                Some(format!("{m} {}:{}", r.host, r.port))
                            }
                            (Some(m), Some(p)) => Some(format!("{m} {p}")),
                            _ => None,
                        };
                        denial::explain(&r, line.as_deref())
                    } else {
                        format!("sandpen: {}:{} {reason}\n", self.rec.host, self.rec.port)
                    };
                    let page = http_error(status, &reason, &body);
                    let deadline = Instant::now() + Duration::from_secs(1);
                    let _ = timeout_at(deadline, client.write_all(&page)).await;
                    let _ = timeout_at(deadline, client.shutdown()).await;
                }
                // A policy deny is already in the record, with its rule.
                let from_policy =
                    self.rec.decision == sandpen_policy::Verdict::Deny && self.rec.reason == reason;
                if !from_policy {
                    self.rec.deny(reason);
                }
            }
            Err(Stop::End(reason)) => self.rec.reason = reason,
        }
        // Learn mode: a policy change that enforce mode would have cut is
        // logged as `would-deny`, with its rule (the connection went on).
        let learned = self.cut.lock().ok().and_then(|mut c| c.take());
        if let Some(d) = learned.filter(|d| d.verdict == Verdict::WouldDeny) {
            if self.rec.decision == Verdict::Allow {
                self.rec.set_decision(&d);
                self.rec.reason = format!("{POLICY_CHANGED}: {}", d.reason);
            }
        }
    }

    /// Decide `host:port` and record the decision; the checked addresses if
    /// the connection may proceed.
    async fn decide(
        &mut self,
        host: &str,
        port: u16,
        first: Option<String>,
    ) -> Result<Vec<IpAddr>, Stop> {
        let mut checked = decide(&self.policy, host, port).await;
        if let Some(asked) = granted(self.proxy, &self.policy, host, port, &checked).await {
            (checked, self.policy, self.once) = (asked.checked, asked.policy, asked.once);
        } else if checked.decision.ask {
            let process = self.proxy.process_of(self.rec).await;
            let asked = ask_user(self.proxy, host, port, first, process, checked).await;
            (checked, self.policy, self.once) = (asked.checked, asked.policy, asked.once);
        }
        self.rec.set_decision(&checked.decision);
        self.decision = Some(checked.decision.clone());
        if checked.decision.permits() {
            Ok(checked.addrs)
        } else {
            // The record already carries the decision; keep its rule.
            Err(Stop::Deny(Some(403), checked.decision.reason))
        }
    }

    async fn transparent<S>(&mut self, client: &mut S, host: &str, port: u16) -> Result<(), Stop>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // Ask mode: what the client says first (its SNI or request line)
        // is shown to the user, so it is read before the connection waits.
        let mut first = Vec::new();
        let mut said = None;
        if self.policy.check(host, port, None).ask {
            (first, said) = self.peek_first(client, port).await?;
        }
        let addrs = match self.decide(host, port, said).await {
            Ok(a) => a,
            Err(Stop::Deny(_, r)) => {
                // A client that speaks plain HTTP gets the deny page (an
                // agent can read it); any other is closed without a byte.
                if first.is_empty() {
                    first = self
                        .peek_first(client, port)
                        .await
                        .map(|f| f.0)
                        .unwrap_or_default();
                }
                if http::classify(&first) != FirstBytes::Http {
                    return Err(Stop::Deny(None, r));
                }
                let line = String::from_utf8_lossy(&first);
                let mut words = line.split_whitespace();
                if let (Some(m), Some(t)) = (words.next(), words.next()) {
                    self.rec.method = Some(truncate(m));
                    self.rec.path = Some(truncate(t));
                }
                self.rec.proto = Some("http".into());
                return Err(Stop::Deny(Some(403), r));
            }
            Err(other) => return Err(other),
        };
        self.inspect_and_relay(client, first, host, port, &addrs)
            .await
    }

    /// The client's first bytes (within the handshake timeout on ports 80
    /// and 443, the server-first wait elsewhere; none if it stays silent)
    /// and what they say, for the user: `TLS SNI NAME` or the request line.
    async fn peek_first<S>(
        &mut self,
        client: &mut S,
        port: u16,
    ) -> Result<(Vec<u8>, Option<String>), Stop>
    where
        S: AsyncRead + Unpin,
    {
        let deadline = Instant::now() + self.cfg().handshake_timeout;
        let wait = if is_web_port(port) {
            deadline
        } else {
            Instant::now() + self.cfg().server_first_after
        };
        let mut first = Vec::with_capacity(2048);
        match timeout_at(wait, client.read_buf(&mut first)).await {
            Ok(Ok(0)) => return Err(Stop::End("client-closed".into())),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(Stop::End(format!("client-error: {e}"))),
            Err(_) => return Ok((first, None)),
        }
        if first.first() == Some(&0x16) {
            loop {
                match tls::parse_client_hello(&first) {
                    Hello::Complete(Some(sni)) => {
                        return Ok((first, Some(format!("TLS SNI {}", truncate(&sni)))))
                    }
                    Hello::Complete(None) => return Ok((first, Some("TLS, no SNI".into()))),
                    Hello::Malformed(_) => return Ok((first, None)),
                    Hello::Incomplete => {
                        if read_more(client, &mut first, tls::MAX_HELLO, deadline)
                            .await
                            .is_err()
                        {
                            return Ok((first, None));
                        }
                    }
                }
            }
        }
        let line = first
            .split(|b| *b == b'\n')
            .find(|l| !l.iter().all(|b| b.is_ascii_whitespace()))
            .map(|l| String::from_utf8_lossy(l).trim().to_string());
        Ok((first, line))
    }

    async fn http_proxy<S>(&mut self, client: &mut S) -> Result<(), Stop>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let deadline = Instant::now() + self.cfg().handshake_timeout;
        let mut buf = Vec::with_capacity(1024);
        let head = read_head(client, &mut buf, deadline).await?;
        self.rec.method = Some(head.method.clone());
        if head.method.eq_ignore_ascii_case("CONNECT") {
            let (host, port) = http::split_authority(&head.target, 0)
                .ok()
                .filter(|(_, port)| *port != 0)
                .ok_or_else(|| {
                    Stop::Deny(
                        Some(400),
                        format!(
                            "bad-request: CONNECT target `{}` is not HOST:PORT",
                            truncate(&head.target)
                        ),
                    )
                })?;
            self.rec.host = host.clone();
            self.rec.port = port;
            // The policy in force now: the CONNECT may come long after the
            // stream opened (after a `secret-read`).
            self.policy = self.proxy.current_policy();
            let said = format!("CONNECT {}", truncate(&head.target));
            let addrs = self.decide(&host, port, Some(said)).await?;
            write_all_by(
                client,
                b"HTTP/1.1 200 Connection established\r\n\r\n",
                deadline,
            )
            .await
            .map_err(|e| Stop::End(format!("client-error: {e}")))?;
            let early = buf.split_off(head.len);
            drop(buf);
            drop(head);
            return self
                .inspect_and_relay(client, early, &host, port, &addrs)
                .await;
        }
        drop(head);
        self.plain_http(client, buf, None).await
    }

    /// Serve plain HTTP (see [`forward`]) and take the latest request's
    /// record as the connection's; the requests' records are the log lines.
    async fn plain_http<S>(
        &mut self,
        client: &mut S,
        first: Vec<u8>,
        bound: Option<forward::Bound>,
    ) -> Result<(), Stop>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        self.rec.proto = Some("http".into());
        let served = forward::serve(
            self.proxy,
            self.policy.clone(),
            client,
            first,
            self.rec,
            self.act,
            bound,
        )
        .await;
        if let Some(latest) = served.latest {
            let keep = (self.rec.time, self.rec.mode.clone());
            *self.rec = latest;
            (self.rec.time, self.rec.mode) = keep;
            self.logged = true;
            // A malformed request after good ones gets a line of its own.
            if let Some(e) = served.error.filter(|e| e.starts_with("bad-request")) {
                (self.rec.method, self.rec.path, self.rec.status) = (None, None, None);
                self.logged = false;
                return Err(Stop::Deny(None, e));
            }
            return Ok(());
        }
        match served.error {
            // hyper has answered a malformed head itself.
            Some(e) if e.starts_with("bad-request") || e == "handshake-timeout" => {
                Err(Stop::Deny(None, e))
            }
            Some(e) => Err(Stop::End(e)),
            None => Err(Stop::End("client-closed".into())),
        }
    }

    /// Read and check the client's first bytes, then connect and relay.
    async fn inspect_and_relay<S>(
        &mut self,
        client: &mut S,
        mut first: Vec<u8>,
        host: &str,
        port: u16,
        addrs: &[IpAddr],
    ) -> Result<(), Stop>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let deadline = Instant::now() + self.cfg().handshake_timeout;
        if first.is_empty() {
            let wait = if is_web_port(port) {
                deadline
            } else {
                Instant::now() + self.cfg().server_first_after
            };
            first.reserve(2048);
            match timeout_at(wait, client.read_buf(&mut first)).await {
                Ok(Ok(0)) => return Err(Stop::End("client-closed".into())),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(Stop::End(format!("client-error: {e}"))),
                Err(_) if is_web_port(port) => {
                    return Err(Stop::Deny(None, "handshake-timeout".into()))
                }
                Err(_) => {
                    // A server-first protocol (SMTP, MySQL): raw bytes.
                    self.rec.proto = Some("tcp".into());
                    self.carries(host, false, true)?;
                    return self.server_first_relay(client, host, addrs).await;
                }
            }
        }

        match classify_first(client, &mut first, deadline).await? {
            FirstBytes::Tls => {}
            FirstBytes::Http => {
                // Each request is narrowed (and refused with a page of its
                // own) in `forward`.
                let bound = forward::Bound {
                    host: host.to_string(),
                    port,
                    checked: Checked {
                        decision: self
                            .decision
                            .clone()
                            .unwrap_or_else(|| Decision::deny("internal: no decision")),
                        addrs: addrs.to_vec(),
                    },
                    once: self.once,
                };
                return self.plain_http(client, first, Some(bound)).await;
            }
            FirstBytes::Other | FirstBytes::Undecided => {
                self.rec.proto = Some("tcp".into());
                self.carries(host, false, true)?;
                return self.relay(client, first, addrs, true).await;
            }
        }

        self.rec.proto = Some("tls".into());
        let sni = loop {
            match tls::parse_client_hello(&first) {
                Hello::Complete(sni) => break sni,
                Hello::Malformed(why) => {
                    return Err(Stop::Deny(None, format!("bad-client-hello: {why}")))
                }
                Hello::Incomplete => {
                    read_more(client, &mut first, tls::MAX_HELLO, deadline)
                        .await
                        .map_err(handshake_stop)?;
                }
            }
        };
        if let Some(sni) = sni {
            self.rec.sni = Some(truncate(&sni));
            if !http::same_host(&sni, host) {
                return Err(Stop::Deny(
                    None,
                    format!("sni-mismatch: SNI {} for {host}", truncate(&sni)),
                ));
            }
        }
        if let Some(m) = self.proxy.mitm() {
            // The store may be a file or a D-Bus call: off the async thread.
            let claimed = host.to_string();
            // Bounded: a keyring that hangs (a prompt nobody answers)
            // fails this connection closed instead of holding it.
            let lookup = tokio::task::spawn_blocking(move || m.plan(&claimed, port));
            let plan = match tokio::time::timeout(self.cfg().handshake_timeout, lookup).await {
                Ok(Ok(plan)) => plan,
                Ok(Err(e)) => Err(format!("lookup failed: {e}")),
                Err(_) => Err("lookup timed out".to_string()),
            };
            match plan {
                Err(e) => return Err(Stop::Deny(None, format!("credential-store: {e}"))),
                Ok(Some(plan)) => {
                    // A toolchain download intercepted for the cache is no
                    // credential sink: it is decided as a tunnel would be.
                    let sink = plan.label().is_some();
                    self.carries(host, sink, false)?;
                    self.rec.proto = Some("tls-mitm".into());
                    self.rec.credential = plan.label();
                    let rec = self.rec.clone();
                    let live = self.live_check(addrs);
                    let live = if sink { live.intercepted() } else { live };
                    return mitm::intercept(self.proxy, plan, client, first, &rec, self.act, live)
                        .await
                        .map_err(Stop::End);
                }
                Ok(None) => {}
            }
        }
        self.carries(host, false, false)?;
        self.relay(client, first, addrs, false).await
    }

    /// Narrow the connection's decision by what it carries (see
    /// [`narrow`]); a refusal is recorded with its rule.
    fn carries(&mut self, host: &str, intercepted: bool, raw: bool) -> Result<(), Stop> {
        let Some(d) = self.decision.clone() else {
            return Err(Stop::Deny(None, "internal: no decision".into()));
        };
        let d = narrow(&self.policy, d, host, intercepted, raw);
        self.rec.set_decision(&d);
        let permits = d.permits();
        let reason = d.reason.clone();
        self.decision = Some(d);
        if permits {
            Ok(())
        } else {
            Err(Stop::Deny(None, reason))
        }
    }

    /// The check a live connection to `addrs` passes before each chunk it
    /// sends up.
    fn live_check(&self, addrs: &[IpAddr]) -> LiveCheck {
        LiveCheck::new(
            self.proxy,
            &self.rec.host,
            self.rec.port,
            addrs,
            self.policy.clone(),
            self.cut.clone(),
        )
        .approved_once(self.once)
    }

    async fn connect(&mut self, addrs: &[IpAddr]) -> Result<TcpStream, Stop> {
        let mut last = String::from("no address");
        for ip in addrs {
            let sa = SocketAddr::new(*ip, self.rec.port);
            match tokio::time::timeout(self.cfg().connect_timeout, TcpStream::connect(sa)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    self.rec.addr = Some(sa.to_string());
                    return Ok(s);
                }
                Ok(Err(e)) => last = format!("{sa}: {e}"),
                Err(_) => last = format!("{sa}: timed out"),
            }
        }
        Err(Stop::End(format!("connect-failed: {last}")))
    }

    /// Connect, send the peeked bytes, then relay both ways until both sides
    /// are done or the connection is idle too long. The peeked bytes pass
    /// the live check first, like every later chunk: the policy in force
    /// when they leave is what decides them, not the one of the moment the
    /// connection opened.
    async fn relay<S>(
        &mut self,
        client: &mut S,
        first: Vec<u8>,
        addrs: &[IpAddr],
        raw: bool,
    ) -> Result<(), Stop>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut live = self.live_check(addrs).carrying_raw(raw);
        let mut upstream = self.connect(addrs).await?;
        if !first.is_empty() {
            // Right before they go (the connect took time).
            live.check().map_err(|r| Stop::Deny(None, r))?;
            upstream
                .write_all(&first)
                .await
                .map_err(|e| Stop::End(format!("upstream-error: {e}")))?;
            self.act.add_up(first.len());
        }
        drop(first);
        let size = self.cfg().buffer_size;
        let idle = self.cfg().idle_timeout;
        // Standalone mode: a socket to a socket moves in the kernel.
        let socket = (client as &mut dyn Any).downcast_mut::<TcpStream>();
        if let Some(guest) = socket.filter(|_| self.cfg().splice) {
            return tokio::select! {
                r = splice::splice_both(guest, &upstream, self.act, live, size) => match r {
                    Ok(_) => Ok(()),
                    Err(e) => Err(relay_stop(e)),
                },
                _ = self.act.idle(idle) => Err(Stop::End("idle-timeout".into())),
            };
        }
        let mut c = Tracked::new(client, self.act, Dir::Up).checked_by(live);
        let mut u = Tracked::new(&mut upstream, self.act, Dir::Down);
        tokio::select! {
            r = relay::copy_both(&mut c, &mut u, size) => match r {
                Ok(_) => Ok(()),
                Err(e) => Err(relay_stop(e)),
            },
            _ = self.act.idle(idle) => Err(Stop::End("idle-timeout".into())),
        }
    }

    /// Relay a connection whose client waited for the server to speak. The
    /// client's first bytes are still checked when they come, within the
    /// handshake timeout of the first of them: a TLS ClientHello must carry
    /// the claimed name (else a client could wait out the first-bytes timer
    /// and then front another site), an HTTP request is refused (HTTP
    /// clients speak first; one that waits is dodging the Host check), and
    /// they pass the live check before they go up, like every later chunk.
    async fn server_first_relay<S>(
        &mut self,
        client: &mut S,
        host: &str,
        addrs: &[IpAddr],
    ) -> Result<(), Stop>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut live = self.live_check(addrs).carrying_raw(true);
        live.check().map_err(|r| Stop::Deny(None, r))?;
        let mut upstream = self.connect(addrs).await?;
        let act = self.act;
        let size = self.cfg().buffer_size;
        let idle = self.cfg().idle_timeout;
        let handshake = self.cfg().handshake_timeout;
        let (mut ur, mut uw) = upstream.split();
        let (mut cr, mut cw) = tokio::io::split(client);
        let up = async {
            // Bounded by the idle timeout (below) until the first byte, and
            // by the handshake timeout from it until the bytes are told apart.
            let mut first = Vec::with_capacity(2048);
            match cr.read_buf(&mut first).await {
                Ok(0) => {
                    let _ = uw.shutdown().await;
                    return Ok(None);
                }
                Ok(_) => {}
                Err(e) => return Err(Stop::End(format!("client-error: {e}"))),
            }
            let deadline = Instant::now() + handshake;
            let kind = classify_first(&mut cr, &mut first, deadline).await;
            act.add_up(first.len());
            let mut sni = None;
            match kind? {
                FirstBytes::Tls => loop {
                    match tls::parse_client_hello(&first) {
                        Hello::Complete(s) => {
                            sni = s;
                            break;
                        }
                        // A record that starts like TLS but does not parse is
                        // refused, as on the normal path: relaying it raw would
                        // skip the SNI check.
                        Hello::Malformed(why) => {
                            return Err(Stop::Deny(None, format!("bad-client-hello: {why}")))
                        }
                        Hello::Incomplete => {
                            let before = first.len();
                            read_more(&mut cr, &mut first, tls::MAX_HELLO, deadline)
                                .await
                                .map_err(handshake_stop)?;
                            act.add_up(first.len() - before);
                        }
                    }
                },
                FirstBytes::Http => {
                    return Err(Stop::Deny(
                        None,
                        "bad-request: HTTP request after the server-first wait".into(),
                    ))
                }
                FirstBytes::Other | FirstBytes::Undecided => {}
            }
            if let Some(name) = &sni {
                if !http::same_host(name, host) {
                    return Err(Stop::Deny(
                        None,
                        format!("sni-mismatch: SNI {} for {host}", truncate(name)),
                    ));
                }
            }
            live.check().map_err(|r| Stop::Deny(None, r))?;
            uw.write_all(&first)
                .await
                .map_err(|e| Stop::End(format!("upstream-error: {e}")))?;
            drop(first);
            let mut r = Tracked::new(&mut cr, act, Dir::Up).checked_by(live);
            relay::copy_one(&mut r, &mut uw, size)
                .await
                .map_err(relay_stop)?;
            Ok(sni)
        };
        let down = async {
            let mut r = Tracked::new(&mut ur, act, Dir::Down);
            relay::copy_one(&mut r, &mut cw, size).await
        };
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        while !(up_done && down_done) {
            tokio::select! {
                r = &mut up, if !up_done => {
                    up_done = true;
                    if let Some(name) = r? {
                        self.rec.proto = Some("tls".into());
                        self.rec.sni = Some(truncate(&name));
                    }
                }
                r = &mut down, if !down_done => {
                    down_done = true;
                    r.map_err(|e| Stop::End(format!("relay-error: {e}")))?;
                }
                _ = act.idle(idle) => return Err(Stop::End("idle-timeout".into())),
            }
        }
        Ok(())
    }
}

/// Read into `first` until [`http::classify`] can tell what it is, within
/// `deadline` and [`http::MAX_HEAD`] bytes: a client that stops in the middle
/// of what could be a request line (`G`, `GET / HT`) is refused when the
/// time runs out, never relayed unchecked.
async fn classify_first<S>(
    client: &mut S,
    first: &mut Vec<u8>,
    deadline: Instant,
) -> Result<FirstBytes, Stop>
where
    S: AsyncRead + Unpin,
{
    loop {
        match http::classify(first) {
            FirstBytes::Undecided => read_more(client, first, http::MAX_HEAD, deadline)
                .await
                .map_err(handshake_stop)?,
            kind => return Ok(kind),
        }
    }
}

/// What ask mode made of a held connection.
pub(crate) struct Asked {
    pub checked: Checked,
    /// The policy in force after the wait (without the once approval).
    pub policy: Arc<Policy>,
    /// The user approved this connection alone: decide it, now and on a
    /// policy change, with `Policy::with_once`.
    pub once: bool,
}

/// Ask mode: hold a connection that no rule decides until the user answers
/// (see [`ask`]), and decide it by the answer. `checked` is the askable
/// denial.
pub(crate) async fn ask_user(
    proxy: &Proxy,
    host: &str,
    port: u16,
    first: Option<String>,
    process: Option<String>,
    mut checked: Checked,
) -> Asked {
    use sandpen_policy::reason::{ASK_DENIED, ASK_TIMEOUT};
    let mut policy = proxy.current_policy();
    let mut once = false;
    // A recheck that still finds nothing deciding (the rule was removed
    // again) waits again, a bounded number of times.
    for _ in 0..4 {
        if !checked.decision.ask {
            break;
        }
        let asking = Asking {
            host: host.to_string(),
            port,
            first: first.clone(),
            process: process.clone(),
            ..Default::default()
        };
        let timeout = policy.ask_timeout();
        checked = match proxy.ask().hold(asking, timeout).await {
            Answer::Once => match policy.with_once(host, port) {
                Some(p) => {
                    once = true;
                    decide(&p, host, port).await
                }
                None => deny_checked(format!("{ASK_DENIED}: not a valid destination")),
            },
            Answer::Recheck => {
                policy = proxy.current_policy();
                decide(&policy, host, port).await
            }
            Answer::Deny => deny_checked(format!("{ASK_DENIED}: the user refused it")),
            Answer::Timeout => {
                tracing::info!(
                    sandbox = %proxy.config().sandbox, host = %truncate(host), port,
                    "{ASK_TIMEOUT}: no answer within {} s; denied", timeout.as_secs()
                );
                deny_checked(format!(
                    "{ASK_TIMEOUT}: no answer within {} s",
                    timeout.as_secs()
                ))
            }
        };
    }
    if checked.decision.ask {
        checked.decision.ask = false;
    }
    Asked {
        checked,
        policy,
        once,
    }
}

/// A connection no rule decides (in any mode) that uses up a one-time
/// allowance for exactly its `host:port` (`approve --once` on an agent's
/// request, [`AskQueue::grant_once`]): decided as if approved once, with
/// `Policy::with_once`, so deny rules, blocked addresses and the flow
/// narrowing still apply. `None`, at the cost of one atomic load, when no
/// allowance waits.
pub(crate) async fn granted(
    proxy: &Proxy,
    policy: &Arc<Policy>,
    host: &str,
    port: u16,
    checked: &Checked,
) -> Option<Asked> {
    if checked.decision.permits() || !proxy.ask().has_grants() {
        return None;
    }
    let undecided = checked.decision.ask
        || (**policy)
            .clone()
            .with_mode(sandpen_policy::Mode::Ask)
            .check(host, port, None)
            .ask;
    if !undecided || !proxy.ask().take_grant(host, port) {
        return None;
    }
    let once = policy.with_once(host, port)?;
    Some(Asked {
        checked: decide(&once, host, port).await,
        policy: policy.clone(),
        once: true,
    })
}

fn deny_checked(reason: String) -> Checked {
    Checked {
        decision: Decision::deny(reason),
        addrs: Vec::new(),
    }
}

/// A [`read_more`] failure during the handshake: the client's own end is an
/// end; a timeout or too many bytes is a deny.
fn handshake_stop(e: String) -> Stop {
    if e.starts_with("client-") {
        Stop::End(e)
    } else {
        Stop::Deny(None, e)
    }
}

fn head_error(e: &HeadError) -> String {
    match e {
        HeadError::Incomplete => "incomplete request head".into(),
        HeadError::TooLarge => format!("request head larger than {} bytes", http::MAX_HEAD),
        HeadError::Bad(s) => s.clone(),
    }
}

/// Keep logged strings short.
fn truncate(s: &str) -> String {
    const MAX: usize = 2048;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Read into `buf` until it holds a complete request head.
async fn read_head<S>(
    client: &mut S,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<RequestHead, Stop>
where
    S: AsyncRead + Unpin,
{
    loop {
        if !buf.is_empty() {
            match RequestHead::parse(buf) {
                Ok(h) => return Ok(h),
                Err(HeadError::Incomplete) => {}
                Err(e @ HeadError::TooLarge) => {
                    return Err(Stop::Deny(
                        Some(431),
                        format!("bad-request: {}", head_error(&e)),
                    ))
                }
                Err(e) => {
                    return Err(Stop::Deny(
                        Some(400),
                        format!("bad-request: {}", head_error(&e)),
                    ))
                }
            }
        }
        read_more(client, buf, http::MAX_HEAD, deadline)
            .await
            .map_err(|e| {
                if e.starts_with("client-") {
                    Stop::End(e)
                } else if e == "handshake-timeout" {
                    Stop::Deny(None, e)
                } else {
                    Stop::Deny(Some(400), e)
                }
            })?;
    }
}

/// Read more bytes into `buf`, never past `limit` bytes in total.
async fn read_more<S>(
    client: &mut S,
    buf: &mut Vec<u8>,
    limit: usize,
    deadline: Instant,
) -> Result<(), String>
where
    S: AsyncRead + Unpin,
{
    if buf.len() >= limit {
        return Err(format!(
            "bad-request: more than {limit} bytes before the handshake ended"
        ));
    }
    let want = (limit - buf.len()).min(4096);
    buf.reserve(want);
    let mut limited = (&mut *client).take(want as u64);
    match timeout_at(deadline, limited.read_buf(buf)).await {
        Ok(Ok(0)) => Err("client-closed: before the handshake ended".into()),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("client-error: {e}")),
        Err(_) => Err("handshake-timeout".into()),
    }
}

async fn write_all_by<S>(client: &mut S, bytes: &[u8], deadline: Instant) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    match timeout_at(deadline, client.write_all(bytes)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")),
    }
}
