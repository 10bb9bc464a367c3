//! Ask mode: connections that no rule decides wait here for the user.
//!
//! In ask mode [`sandpen_policy::Policy::check`] marks a denial that only
//! says "no rule decides this" as [`Decision::ask`](sandpen_policy::Decision).
//! The proxy then holds the connection, unanswered and unrefused, in the
//! sandbox's [`AskQueue`] until one of:
//!
//! - the user approves it once ([`Answer::Once`]): this connection alone
//!   goes on, decided by the policy plus an allow rule for exactly its
//!   `host:port` in scope `once` (deny rules, blocked ranges and flow
//!   narrowing still apply);
//! - the policy changed so that a rule now decides it (`approve --always`
//!   adds one, then [`AskQueue::recheck`] runs; [`Answer::Recheck`]): every
//!   connection waiting for that destination is decided again;
//! - the user refuses it ([`Answer::Deny`]): `403`/closed, `ask-denied`;
//! - nobody answered within the policy's `ask_timeout` ([`Answer::Timeout`]):
//!   `ask-timeout`.
//!
//! Guaranteed: nothing from the guest answers an entry. The queue's only
//! writers are the proxy (which adds and removes its own entries) and the
//! supervisor's control socket (the user's CLI). A held connection costs
//! what an idle tunnel costs plus one entry (its id, destination and first
//! line): no buffer is held while it waits (docs/policy.md, "Ask mode").

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot};

/// Text from the guest kept in an entry is cut to this many bytes.
const MAX_TEXT: usize = 300;

/// How long a one-time allowance (`approve --once` on an agent's
/// `sandpen-request network HOST:PORT`) waits for its connection
/// (docs/policy.md, "Requests from inside").
pub const ONCE_WINDOW: Duration = Duration::from_secs(60);

/// One-time allowances kept at once; the oldest goes first beyond this.
const MAX_GRANTS: usize = 64;

/// A one-time allowance: the next connection to exactly `host:port`
/// before `until` that no rule decides is allowed, once.
struct Grant {
    host: String,
    port: u16,
    until: std::time::Instant,
}

/// One waiting connection or request, as `sandpen policy pending` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingInfo {
    /// Unique within the sandbox's supervisor.
    pub id: u64,
    pub sandbox: String,
    pub host: String,
    pub port: u16,
    /// The guest process that opened it, if PID 1 could tell (untrusted).
    #[serde(default)]
    pub process: Option<String>,
    /// The first request line or the TLS SNI (untrusted: guest bytes).
    #[serde(default)]
    pub first: Option<String>,
    /// The reason an agent gave with `sandpen-request` (untrusted text).
    #[serde(default)]
    pub reason: Option<String>,
    /// A file rule exception an agent asked for: `read` or `write`; `host`
    /// is then the path and `port` 0.
    #[serde(default)]
    pub file: Option<String>,
    /// RFC 3339, UTC.
    #[serde(with = "time::serde::rfc3339")]
    pub first_seen: time::OffsetDateTime,
    /// How long it may wait in all, in seconds.
    pub timeout_secs: u64,
}

/// How a held connection was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// `approve --once`: this connection alone.
    Once,
    /// The policy changed and a rule now decides the destination: decide
    /// the connection again.
    Recheck,
    /// `deny ID`.
    Deny,
    /// Nobody answered in time.
    Timeout,
}

/// Why an answer was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AskError {
    #[error("no pending request {0} (answered already, timed out, or the connection closed)")]
    NoSuchEntry(u64),
}

struct Entry {
    info: PendingInfo,
    tx: Option<oneshot::Sender<Answer>>,
}

struct Inner {
    sandbox: String,
    next: AtomicU64,
    entries: Mutex<Vec<Entry>>,
    news: broadcast::Sender<PendingInfo>,
    grants: Mutex<Vec<Grant>>,
    /// Whether `grants` may hold any: a connection checks the flag, not
    /// the lock, when there are none.
    any_grants: std::sync::atomic::AtomicBool,
}

/// The connections of one sandbox waiting for an answer. Cheap to clone;
/// clones share the queue.
#[derive(Clone)]
pub struct AskQueue {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AskQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AskQueue")
            .field("sandbox", &self.inner.sandbox)
            .field("pending", &self.list().len())
            .finish()
    }
}

/// What a caller knows of a connection before it waits.
#[derive(Debug, Clone, Default)]
pub struct Asking {
    pub host: String,
    pub port: u16,
    pub process: Option<String>,
    pub first: Option<String>,
    pub reason: Option<String>,
    pub file: Option<String>,
}

/// Removes the entry when the wait ends, however it ends (the connection's
/// task may be dropped while it waits).
struct Remove<'a> {
    queue: &'a AskQueue,
    id: u64,
}

impl Drop for Remove<'_> {
    fn drop(&mut self) {
        self.queue.lock().retain(|e| e.info.id != self.id);
    }
}

impl AskQueue {
    pub fn new(sandbox: impl Into<String>) -> AskQueue {
        let (news, _) = broadcast::channel(64);
        AskQueue {
            inner: Arc::new(Inner {
                sandbox: sandbox.into(),
                next: AtomicU64::new(1),
                entries: Mutex::new(Vec::new()),
                news,
                grants: Mutex::new(Vec::new()),
                any_grants: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        match self.inner.entries.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Wait for an answer to `asking`, at most `timeout`.
    pub async fn hold(&self, asking: Asking, timeout: Duration) -> Answer {
        let (tx, rx) = oneshot::channel();
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let info = PendingInfo {
            id,
            sandbox: self.inner.sandbox.clone(),
            host: clip(&asking.host),
            port: asking.port,
            process: asking.process.as_deref().map(clip),
            first: asking.first.as_deref().map(clip),
            reason: asking.reason.as_deref().map(clip),
            file: asking.file.as_deref().map(clip),
            first_seen: time::OffsetDateTime::now_utc(),
            timeout_secs: timeout.as_secs(),
        };
        self.lock().push(Entry {
            info: info.clone(),
            tx: Some(tx),
        });
        let _remove = Remove { queue: self, id };
        // Nobody may be listening.
        let _ = self.inner.news.send(info);
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer,
            // The queue was dropped: nobody can answer any more.
            Ok(Err(_)) => Answer::Deny,
            Err(_) => Answer::Timeout,
        }
    }

    /// Everything waiting, oldest first.
    pub fn list(&self) -> Vec<PendingInfo> {
        self.lock().iter().map(|e| e.info.clone()).collect()
    }

    /// Answer entry `id`.
    pub fn answer(&self, id: u64, answer: Answer) -> Result<PendingInfo, AskError> {
        let mut entries = self.lock();
        let e = entries
            .iter_mut()
            .find(|e| e.info.id == id && e.tx.is_some())
            .ok_or(AskError::NoSuchEntry(id))?;
        if let Some(tx) = e.tx.take() {
            let _ = tx.send(answer);
        }
        Ok(e.info.clone())
    }

    /// After a policy change: release, to be decided again, every entry for
    /// a destination that a rule now decides (or that the policy no longer
    /// holds, e.g. the mode changed). Returns how many.
    pub fn recheck(&self, policy: &sandpen_policy::Policy) -> usize {
        // Requests from the guest wait in any mode: "undecided" is what ask
        // mode would hold.
        // Held connections follow the mode (leaving ask mode releases them).
        let asking;
        let for_requests = if policy.mode() == sandpen_policy::Mode::Ask {
            policy
        } else {
            asking = policy.clone().with_mode(sandpen_policy::Mode::Ask);
            &asking
        };
        let mut n = 0;
        for e in self.lock().iter_mut() {
            if e.info.file.is_some() {
                continue;
            }
            let by = if e.info.reason.is_some() {
                for_requests
            } else {
                policy
            };
            if !by.check(&e.info.host, e.info.port, None).ask {
                if let Some(tx) = e.tx.take() {
                    let _ = tx.send(Answer::Recheck);
                    n += 1;
                }
            }
        }
        n
    }

    /// The user approved an agent's request for `host:port` once: the next
    /// connection to exactly that destination within `window` that no rule
    /// decides goes through, once ([`AskQueue::take_grant`]). Only the
    /// host's answer to a request calls this.
    pub fn grant_once(&self, host: &str, port: u16, window: Duration) {
        let now = std::time::Instant::now();
        let mut grants = lock_grants(&self.inner.grants);
        grants.retain(|g| g.until > now);
        if grants.len() >= MAX_GRANTS {
            grants.remove(0);
        }
        grants.push(Grant {
            host: grant_key(host),
            port,
            until: now + window,
        });
        self.inner.any_grants.store(true, Ordering::Release);
    }

    /// Uses up the one-time allowance for exactly `host:port`, if one is
    /// there and not expired. Cheap (one atomic load) when there is none.
    pub fn take_grant(&self, host: &str, port: u16) -> bool {
        if !self.inner.any_grants.load(Ordering::Acquire) {
            return false;
        }
        let now = std::time::Instant::now();
        let key = grant_key(host);
        let mut grants = lock_grants(&self.inner.grants);
        grants.retain(|g| g.until > now);
        let found = grants.iter().position(|g| g.host == key && g.port == port);
        if let Some(i) = found {
            grants.remove(i);
        }
        if grants.is_empty() {
            self.inner.any_grants.store(false, Ordering::Release);
        }
        found.is_some()
    }

    /// Whether a one-time allowance may be waiting (expired ones included).
    pub fn has_grants(&self) -> bool {
        self.inner.any_grants.load(Ordering::Acquire)
    }

    /// New entries as they come (for a terminal line or a notification).
    pub fn subscribe(&self) -> broadcast::Receiver<PendingInfo> {
        self.inner.news.subscribe()
    }
}

fn lock_grants(m: &Mutex<Vec<Grant>>) -> std::sync::MutexGuard<'_, Vec<Grant>> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// A destination's host as allowances compare it: a name normalized (case,
/// trailing dot), an address as given.
fn grant_key(host: &str) -> String {
    sandpen_policy::normalize_name(host).unwrap_or_else(|_| host.to_ascii_lowercase())
}

/// Keep guest text short and on one line.
fn clip(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandpen_policy::{Mode, Policy, Preset};

    fn asking(host: &str) -> Asking {
        Asking {
            host: host.into(),
            port: 443,
            first: Some("TLS SNI x\u{1b}[2J".into()),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn an_answer_reaches_the_waiting_connection_and_the_entry_goes() {
        let q = AskQueue::new("s");
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.hold(asking("a.test"), Duration::from_secs(30)).await }
        });
        let mut news = q.subscribe();
        let info = loop {
            if let Some(i) = q.list().into_iter().next() {
                break i;
            }
            tokio::task::yield_now().await;
        };
        let _ = news.try_recv();
        assert_eq!(info.host, "a.test");
        assert!(!info.first.as_deref().unwrap_or("").contains('\u{1b}'));
        q.answer(info.id, Answer::Once).unwrap();
        assert_eq!(waiter.await.unwrap(), Answer::Once);
        assert!(q.list().is_empty());
        assert_eq!(
            q.answer(info.id, Answer::Once),
            Err(AskError::NoSuchEntry(info.id))
        );
    }

    #[test]
    fn a_one_time_allowance_is_used_once_for_exactly_its_destination() {
        let q = AskQueue::new("s");
        assert!(!q.has_grants() && !q.take_grant("a.test", 443));
        q.grant_once("A.test.", 443, Duration::from_secs(60));
        assert!(!q.take_grant("a.test", 80), "another port");
        assert!(!q.take_grant("b.a.test", 443), "another name");
        assert!(q.take_grant("a.test", 443));
        assert!(!q.take_grant("a.test", 443), "used up");
        assert!(!q.has_grants());
        q.grant_once("a.test", 443, Duration::ZERO);
        assert!(!q.take_grant("a.test", 443), "expired");
    }

    #[tokio::test]
    async fn nobody_answers_then_timeout() {
        let q = AskQueue::new("s");
        let a = q.hold(asking("a.test"), Duration::from_millis(50)).await;
        assert_eq!(a, Answer::Timeout);
        assert!(q.list().is_empty());
    }

    #[tokio::test]
    async fn a_rule_releases_every_connection_waiting_for_it() {
        let q = AskQueue::new("s");
        let mut waiters = Vec::new();
        for host in ["a.test", "a.test", "b.test"] {
            let q = q.clone();
            waiters.push(tokio::spawn(async move {
                q.hold(asking(host), Duration::from_secs(30)).await
            }));
        }
        while q.list().len() < 3 {
            tokio::task::yield_now().await;
        }
        let ask = Policy::from_rules(Mode::Ask, Preset::DenyAll, Vec::new());
        assert_eq!(q.recheck(&ask), 0);
        let mut f = sandpen_policy::PolicyFile::empty(
            std::path::Path::new("/x/policy.toml"),
            sandpen_policy::Scope::Sandbox,
        );
        f.add_rule(sandpen_policy::Action::Allow, "a.test:443")
            .unwrap();
        let allowed = Policy::from_files(None, Some(&f)).with_mode(Mode::Ask);
        assert_eq!(q.recheck(&allowed), 2);
        let b = waiters.pop().unwrap();
        for w in waiters {
            assert_eq!(w.await.unwrap(), Answer::Recheck);
        }
        assert_eq!(q.list().len(), 1);
        b.abort();
        let _ = b.await;
        assert!(q.list().is_empty(), "a dropped wait leaves no entry");
    }
}
