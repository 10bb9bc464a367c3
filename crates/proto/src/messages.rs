//! Messages. Field order is wire format: append, never reorder, and bump
//! [`crate::PROTOCOL_VERSION`] when a type changes.

use serde::{Deserialize, Serialize};

/// The first frame of every host-opened stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Configure the guest once after boot. Answered with [`SetupReply`].
    Setup(GuestSetup),
    /// Run a process. Followed by [`ExecInput`] frames from the host and
    /// [`ExecEvent`] frames from the guest.
    Exec(ExecRequest),
    /// Liveness and facts about the guest. Answered with [`Pong`].
    Ping,
    /// Stop every process, flush disks and power off. Answered with [`Ack`] just
    /// before the power-off.
    Shutdown,
    /// The guest's root file system and task count. Answered with
    /// [`GuestUsage`] (the host shows `disk full` from it).
    Usage,
    /// Carry one TCP connection the host accepted on a published port
    /// (`-p`) to `127.0.0.1:port` (or `[::1]:port`) inside the guest.
    /// Answered with one [`ForwardReply`]; raw bytes follow both ways after
    /// [`ForwardReply::Connected`]. Only the host opens these (it accepted
    /// the connection on a listener its own config names): the guest can
    /// never ask for a listener or a connection on the host.
    Forward { port: u16 },
    /// Send the file or folder at `path` (absolute, in the guest) as a tar
    /// stream whose one top-level entry is named after the path's last
    /// component (symlinks are archived as symlinks, not followed). Answered
    /// with [`CopyEvent`] frames: `Data`..., then `Done` or `Failed`.
    CopyOut { path: String },
    /// Receive a tar stream ([`CopyChunk`] frames) and unpack it at `path`
    /// like `docker cp`: into `path` when it is an existing folder, else as
    /// `path` (its top-level entry renamed). What is created belongs to
    /// `owner` (uid, gid). Answered with one [`CopyEvent`]: `Done` or
    /// `Failed`.
    CopyIn { path: String, owner: (u32, u32) },
    /// Which guest process has the TCP socket with this local port (the
    /// client of an egress connection)? Answered with [`ProcessInfo`]. Shown
    /// to the user in ask mode; a hostile guest may lie, so it decides nothing.
    Process { src_port: u16 },
}

/// The guest's answer to [`Request::Forward`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForwardReply {
    Connected,
    /// Nothing listens on the port in the guest, or the connect failed.
    Failed {
        message: String,
    },
}

/// Guest -> host frames of a copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CopyEvent {
    /// Part of the tar stream (`CopyOut`), at most [`IO_CHUNK`] bytes.
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The whole stream was sent (`CopyOut`) or unpacked (`CopyIn`).
    Done,
    /// The copy failed: the reason, one line.
    Failed(String),
}

/// Host -> guest frames of [`Request::CopyIn`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CopyChunk {
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The end of the tar stream.
    End,
}

/// The answer to [`Request::Process`]: `pid 1234 curl -sS https://...`, or
/// nothing when PID 1 cannot tell (a container's socket, a closed one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub process: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestSetup {
    pub hostname: String,
    pub user: GuestUser,
    pub mounts: Vec<ShareMount>,
    /// Environment added to every exec'd process (before the request's own).
    pub env: Vec<(String, String)>,
    /// PEM certificates the guest trusts in addition to its system roots:
    /// the sandbox CA that signs the proxy's credential interception. Never
    /// a key.
    pub ca_certs: Vec<String>,
}

/// Where the guest installs [`GuestSetup::ca_certs`] (Debian's place for
/// local CAs, kept by `update-ca-certificates`).
pub const GUEST_EXTRA_CA: &str = "/usr/local/share/ca-certificates/sandpen-sandbox-ca.crt";
/// The guest's system bundle, which gets the same certificates appended;
/// `SSL_CERT_FILE`, `CURL_CA_BUNDLE`, `REQUESTS_CA_BUNDLE`, `GIT_SSL_CAINFO`
/// and `NODE_EXTRA_CA_CERTS` name it.
pub const GUEST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// A virtiofs share and where it goes in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareMount {
    pub tag: String,
    pub path: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetupReply {
    Ok { kernel_release: String },
    Failed { message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    pub uptime_ms: u64,
    pub kernel_release: String,
}

/// What the guest reports about itself for `ls` and `stats`. Facts from a
/// hostile guest: the host shows them, and decides nothing from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestUsage {
    /// `statvfs("/")`: size, free, and free for non-root users, in bytes.
    pub root_total_bytes: u64,
    pub root_free_bytes: u64,
    pub root_avail_bytes: u64,
    /// Tasks (processes and threads) in the guest, from `/proc/loadavg`.
    pub tasks: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Added after the guest's defaults for the user (HOME, USER, PATH, ...).
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// User name or numeric uid; `None` means the sandbox user.
    pub user: Option<String>,
    /// Allocate a pseudo-terminal of this size; stdout carries the merged output.
    pub tty: Option<WinSize>,
}

/// Host -> guest frames after [`Request::Exec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecInput {
    Stdin(#[serde(with = "serde_bytes")] Vec<u8>),
    StdinEof,
    Resize(WinSize),
    Signal(i32),
}

/// Guest -> host frames after [`Request::Exec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecEvent {
    Started {
        pid: u32,
    },
    /// The process could not be started. `code` follows the shell convention:
    /// 127 not found, 126 not executable, 125 anything else.
    Failed {
        code: u8,
        message: String,
    },
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
    Exit(ExitStatus),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    /// The status a shell would report: the code, or 128 + signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => s.saturating_add(128),
        }
    }
}

/// Largest chunk of stdin/stdout/stderr put into one frame.
pub const IO_CHUNK: usize = 32 * 1024;

/// The first frame of every guest-opened stream (protocol 5): a connection
/// or a request to the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestOpen {
    /// One outbound connection; see [`EgressOpen`].
    Connect(EgressOpen),
    /// `sandpen-request`: the agent asks the user for something. The host
    /// answers with one [`EgressAccepted`] frame at once and one
    /// [`RequestOutcome`] frame when the user (or the timeout) has decided.
    /// Nothing the guest sends answers a request.
    Request(GuestRequest),
}

/// What an agent asks the user for, with its reason (untrusted text, shown
/// as such on the host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestRequest {
    /// Reach `host:port`.
    Network {
        host: String,
        port: u16,
        reason: String,
    },
    /// An exception to a file rule (read a denied file such as `.env.example`,
    /// or write a read-only one).
    File {
        path: String,
        write: bool,
        reason: String,
    },
    /// Why was the last connection to `host` refused? (`sandpen-request --why`)
    Why { host: String },
}

/// The host's answer to a [`GuestRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestOutcome {
    /// The user approved it: with a rule (`always`; `global` scope or the
    /// sandbox's), or once.
    Approved { always: bool, global: bool },
    /// Refused, with the reason (`ask-timeout`, `ask-denied`, a rule).
    Denied { reason: String },
    /// Already decided, no question asked (`allowed by rule 3 (...)`, or a
    /// denial no user answer can change).
    Decided { allowed: bool, text: String },
    /// The answer to [`GuestRequest::Why`].
    Why { text: String },
    /// The request itself was malformed.
    Invalid { why: String },
}

/// The first frame of a guest-opened connection stream: one outbound
/// connection that the guest wants the host to make. The host answers with
/// one [`EgressAccepted`] frame; raw bytes follow in both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressOpen {
    pub mode: EgressMode,
    /// The name the guest resolved through its DNS stub, or a literal IP when
    /// the guest connected to an address it did not get from the stub.
    pub host: String,
    pub port: u16,
    /// The client's source port in the guest (0 if unknown): what the host
    /// names in [`Request::Process`] to ask PID 1 which process opened it.
    pub src_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EgressMode {
    /// Redirected by nftables; the bytes are the client's own (TLS or HTTP).
    Transparent,
    /// Accepted on the guest's HTTP proxy port; the bytes start with the client's
    /// proxy request (CONNECT or an absolute-form request).
    HttpProxy,
}

/// The host's first frame on an egress stream, sent as soon as it has read
/// the [`EgressOpen`]: it acknowledges the stream at the multiplexer (yamux
/// lets a side have only 256 streams the peer has not acknowledged, and an
/// idle connection would otherwise never be). The guest reads it before it
/// relays any byte from the host to the client. Whether the connection is
/// allowed is decided after it, by the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressAccepted;

/// Largest [`EgressAccepted`] frame (it is empty; room for a later version).
pub const EGRESS_ACCEPTED_MAX: usize = 64;
