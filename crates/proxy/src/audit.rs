//! The audit log: one JSON line per connection or request in `logs/net.jsonl`, rotated
//! by size, and the reader behind `sandpen policy log`.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sandpen_policy::{Decision, Scope, Verdict};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// One audit record: a connection, or one HTTP request the proxy saw (plain
/// HTTP, intercepted TLS). [`crate::Proxy::handle`] returns the connection's
/// (for plain HTTP: its latest request's, with the connection's bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionReport {
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub sandbox: String,
    /// `transparent` or `http-proxy`.
    pub mode: String,
    pub decision: Verdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_scope: Option<Scope>,
    /// `ACTION TARGET` of the rule that decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// A reason code (`allowed-by-rule`, `no-matching-rule`, `blocked-address`,
    /// `sni-mismatch`, `host-mismatch`, `too-many-connections`, ...), optionally
    /// followed by `: detail`.
    pub reason: String,
    /// The claimed host (name or literal IP), as the guest gave it.
    pub host: String,
    pub port: u16,
    /// The address the proxy connected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// `tls`, `http` or `tcp`, once the first bytes were seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The upstream's HTTP status, for requests the proxy saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// `SERVICE (SCOPE)` when a credential was swapped in (never the value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// The toolchain cache's part (docs/dev-env.md): `hit sha256 HEX` when
    /// the body came from it, `fill` when the vendor's body is being kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
    /// The guest process that opened the connection, when PID 1 could tell
    /// (untrusted: the guest may lie). See [`GuestProcess`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<GuestProcess>,
    /// The lookup of [`process`](Self::process) under way (not part of the
    /// record; see [`crate::Proxy::write_record`]).
    #[serde(skip)]
    pub(crate) lookup: Option<ProcessSlot>,
    /// Guest to upstream.
    pub bytes_up: u64,
    /// Upstream to guest.
    pub bytes_down: u64,
    pub duration_ms: u64,
}

/// The guest process behind a connection, as the network log records it:
/// `"process": {"pid": 1234, "name": "curl"}`. Both come from the guest's
/// PID 1 (the client socket's owner, found through `/proc`), so they are
/// untrusted; `name` is the program of its command line (the last `/`
/// component of the first word), printable, at most 64 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestProcess {
    pub pid: u32,
    pub name: String,
}

impl GuestProcess {
    /// From PID 1's answer (`pid 1234 /usr/bin/curl -sS https://...`,
    /// `sandpen_proto::ProcessInfo`); `None` for anything else.
    pub fn parse(text: &str) -> Option<GuestProcess> {
        let rest = text.strip_prefix("pid ")?;
        let (pid, cmd) = rest.split_once(' ').unwrap_or((rest, ""));
        let pid = pid.parse().ok()?;
        let program = cmd.split_whitespace().next().unwrap_or("");
        let program = program.rsplit('/').next().unwrap_or(program);
        let mut name: String = program
            .chars()
            .filter(|c| !c.is_control())
            .take(64)
            .collect();
        while name.len() > 64 {
            name.pop();
        }
        Some(GuestProcess { pid, name })
    }
}

/// A lookup of a connection's guest process started when it opened
/// (`Proxy::handle`), shared by its records. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct ProcessSlot(tokio::sync::watch::Receiver<Option<Option<String>>>);

impl ProcessSlot {
    pub(crate) fn new() -> (
        tokio::sync::watch::Sender<Option<Option<String>>>,
        ProcessSlot,
    ) {
        let (tx, rx) = tokio::sync::watch::channel(None);
        (tx, ProcessSlot(rx))
    }

    /// The answer, if the lookup is done.
    pub(crate) fn ready(&self) -> Option<Option<String>> {
        self.0.borrow().clone()
    }

    /// The answer, once the lookup is done (`None` if it was dropped).
    pub(crate) async fn wait(&self) -> Option<String> {
        let mut rx = self.0.clone();
        let found = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().flatten(),
            Err(_) => None,
        };
        found
    }
}

/// Not part of the record: any two are equal.
impl PartialEq for ProcessSlot {
    fn eq(&self, _: &ProcessSlot) -> bool {
        true
    }
}

impl Eq for ProcessSlot {}

impl ConnectionReport {
    pub(crate) fn new(sandbox: &str, mode: &str, host: &str, port: u16) -> Self {
        ConnectionReport {
            time: OffsetDateTime::now_utc(),
            sandbox: sandbox.to_string(),
            mode: mode.to_string(),
            decision: Verdict::Deny,
            rule_id: None,
            rule_scope: None,
            rule: None,
            reason: String::new(),
            host: host.to_string(),
            port,
            addr: None,
            proto: None,
            sni: None,
            method: None,
            path: None,
            status: None,
            credential: None,
            cache: None,
            process: None,
            lookup: None,
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
        }
    }

    /// Take verdict, rule and reason from a policy decision.
    pub(crate) fn set_decision(&mut self, d: &Decision) {
        self.decision = d.verdict;
        self.rule_id = d.rule.as_ref().map(|r| r.id);
        self.rule_scope = d.rule.as_ref().map(|r| r.scope);
        self.rule = d.rule.as_ref().map(|r| r.text.clone());
        self.reason = d.reason.clone();
    }

    /// A hard deny by the proxy (protocol check, limit, timeout): no rule
    /// decided it, so any rule that allowed the name is dropped from the record.
    pub(crate) fn deny(&mut self, reason: impl Into<String>) {
        self.decision = Verdict::Deny;
        self.rule_id = None;
        self.rule_scope = None;
        self.rule = None;
        self.reason = reason.into();
    }

    /// The reason code without its detail.
    pub fn reason_code(&self) -> &str {
        self.reason.split(':').next().unwrap_or_default()
    }
}

/// Errors from the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit log {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot write audit log {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read audit log {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
}

/// Default size at which `net.jsonl` is rotated.
pub const DEFAULT_MAX_BYTES: u64 = 10 * 1024 * 1024;
/// Default number of rotated files kept (`net.jsonl.1` .. `.3`).
pub const DEFAULT_KEEP: usize = 3;

struct Writer {
    file: File,
    size: u64,
}

/// An append-only JSON-lines log, rotated by size: `net.jsonl` is renamed to
/// `net.jsonl.1`, `.1` to `.2`, and so on; the oldest beyond `keep` is dropped.
pub struct AuditLog {
    path: Option<PathBuf>,
    max_bytes: u64,
    keep: usize,
    writer: Mutex<Option<Writer>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish()
    }
}

impl AuditLog {
    /// Append to `path` (creating it and its directory), rotating at 10 MiB
    /// and keeping 3 old files.
    pub fn open(path: impl Into<PathBuf>) -> Result<AuditLog, AuditError> {
        AuditLog::with_rotation(path, DEFAULT_MAX_BYTES, DEFAULT_KEEP)
    }

    pub fn with_rotation(
        path: impl Into<PathBuf>,
        max_bytes: u64,
        keep: usize,
    ) -> Result<AuditLog, AuditError> {
        let path = path.into();
        let writer = open_append(&path)?;
        Ok(AuditLog {
            path: Some(path),
            max_bytes: max_bytes.max(1),
            keep,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// A log that writes nothing (benchmarks, embedding without a log).
    pub fn disabled() -> AuditLog {
        AuditLog {
            path: None,
            max_bytes: DEFAULT_MAX_BYTES,
            keep: 0,
            writer: Mutex::new(None),
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Append one record as one line.
    pub fn write(&self, rec: &ConnectionReport) -> Result<(), AuditError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let werr = |source| AuditError::Write {
            path: path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(rec).map_err(|e| werr(io::Error::other(e)))?;
        line.push(b'\n');
        let mut guard = self
            .writer
            .lock()
            .map_err(|_| werr(io::Error::other("audit log lock poisoned")))?;
        let needs_rotation = match guard.as_ref() {
            Some(w) => w.size > 0 && w.size + line.len() as u64 > self.max_bytes,
            None => true,
        };
        if needs_rotation {
            *guard = None;
            self.rotate(path).map_err(werr)?;
            *guard = Some(open_append(path)?);
        }
        let Some(w) = guard.as_mut() else {
            return Err(werr(io::Error::other("audit log is not open")));
        };
        w.file.write_all(&line).map_err(werr)?;
        w.size += line.len() as u64;
        Ok(())
    }

    fn rotate(&self, path: &Path) -> io::Result<()> {
        if self.keep == 0 {
            return match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        for i in (1..self.keep).rev() {
            let from = rotated(path, i);
            if from.exists() {
                std::fs::rename(&from, rotated(path, i + 1))?;
            }
        }
        std::fs::rename(path, rotated(path, 1))
    }
}

fn open_append(path: &Path) -> Result<Writer, AuditError> {
    let oerr = |source| AuditError::Open {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(oerr)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(oerr)?;
    let size = file.metadata().map_err(oerr)?.len();
    Ok(Writer { file, size })
}

fn rotated(path: &Path, i: usize) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{i}"));
    PathBuf::from(p)
}

/// What [`read_log`] returns.
#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    /// Only records of this sandbox.
    pub sandbox: Option<String>,
    /// Only the last `limit` matching records.
    pub limit: Option<usize>,
}

/// Read `path` and its rotated files, oldest first, and return the matching
/// records in time order. Lines that are not records (a torn last line after
/// a crash) are skipped. A missing log is empty.
pub fn read_log(path: &Path, filter: &LogFilter) -> Result<Vec<ConnectionReport>, AuditError> {
    let mut files: Vec<PathBuf> = (1..=DEFAULT_KEEP.max(9))
        .rev()
        .map(|i| rotated(path, i))
        .collect();
    files.push(path.to_path_buf());
    let mut out = std::collections::VecDeque::new();
    for file in files {
        let f = match File::open(&file) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(AuditError::Read { path: file, source }),
        };
        for line in BufReader::new(f).split(b'\n') {
            let line = line.map_err(|source| AuditError::Read {
                path: file.clone(),
                source,
            })?;
            let Ok(rec) = serde_json::from_slice::<ConnectionReport>(&line) else {
                continue;
            };
            if filter.sandbox.as_ref().is_some_and(|s| *s != rec.sandbox) {
                continue;
            }
            out.push_back(rec);
            if filter.limit.is_some_and(|l| out.len() > l) {
                out.pop_front();
            }
        }
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_process_is_its_pid_and_program() {
        let p = GuestProcess::parse("pid 812 /usr/bin/curl -sS https://x.test/").unwrap();
        assert_eq!((p.pid, p.name.as_str()), (812, "curl"));
        let p = GuestProcess::parse("pid 9 ").unwrap();
        assert_eq!((p.pid, p.name.as_str()), (9, ""));
        let long = format!("pid 1 /x/{}\u{1b}[2J", "é".repeat(100));
        let p = GuestProcess::parse(&long).unwrap();
        assert!(p.name.len() <= 64 && !p.name.contains('\u{1b}'), "{p:?}");
        assert!(GuestProcess::parse("curl").is_none());
        assert!(GuestProcess::parse("pid x curl").is_none());
        let mut r = ConnectionReport::new("s", "transparent", "a.test", 443);
        r.process = Some(p);
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.contains("\"process\":{\"pid\":1,\"name\":"), "{line}");
        let back: ConnectionReport = serde_json::from_str(&line).unwrap();
        assert_eq!(back.process, r.process);
    }

    fn rec(sandbox: &str, n: u16) -> ConnectionReport {
        let mut r = ConnectionReport::new(sandbox, "transparent", "x.example", n);
        r.reason = "no-matching-rule".into();
        // A fixed time: every line has the same length (sub-second digits vary).
        r.time = time::macros::datetime!(2026-01-02 03:04:05.123456789 UTC);
        r
    }

    #[test]
    fn write_read_filter_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs").join("net.jsonl");
        let log = AuditLog::open(&path).unwrap();
        for i in 0..10 {
            log.write(&rec(if i % 2 == 0 { "a" } else { "b" }, i))
                .unwrap();
        }
        let all = read_log(&path, &LogFilter::default()).unwrap();
        assert_eq!(all.len(), 10);
        assert_eq!(all[3], rec("b", 3).with_time(all[3].time));
        let a = read_log(
            &path,
            &LogFilter {
                sandbox: Some("a".into()),
                limit: Some(2),
            },
        )
        .unwrap();
        let ports: Vec<_> = a.iter().map(|r| r.port).collect();
        assert_eq!(ports, vec![6, 8]);
        // A torn line is skipped.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"time\":")
            .unwrap();
        assert_eq!(read_log(&path, &LogFilter::default()).unwrap().len(), 10);
        assert!(read_log(&dir.path().join("none"), &LogFilter::default())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn rotates_by_size_and_keeps_n() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("net.jsonl");
        // Two-digit ports: every line has the same length.
        let line_len = serde_json::to_vec(&rec("a", 10)).unwrap().len() as u64 + 1;
        let log = AuditLog::with_rotation(&path, line_len * 4, 2).unwrap();
        for i in 10..30 {
            log.write(&rec("a", i)).unwrap();
        }
        assert!(rotated(&path, 1).exists());
        assert!(rotated(&path, 2).exists());
        assert!(!rotated(&path, 3).exists());
        for p in [path.clone(), rotated(&path, 1), rotated(&path, 2)] {
            assert!(std::fs::metadata(&p).unwrap().len() <= line_len * 4);
        }
        let ports: Vec<_> = read_log(&path, &LogFilter::default())
            .unwrap()
            .iter()
            .map(|r| r.port)
            .collect();
        assert_eq!(ports, (18..30).collect::<Vec<_>>());
    }

    impl ConnectionReport {
        fn with_time(mut self, t: OffsetDateTime) -> Self {
            self.time = t;
            self
        }
    }
}
