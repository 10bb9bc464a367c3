//! The control API between the CLI and a sandbox's supervisor, over
//! `run/control.sock`. Host-internal: both ends are the same user's sandpen.
//!
//! An exec turns the connection into a relay: after [`ControlReply::ExecStarted`]
//! the CLI speaks the guest's exec frames directly, and the supervisor copies
//! bytes between the CLI and one multiplexed guest stream.

use std::fs::OpenOptions;
use std::time::Duration;

use sandpen_proto::frame::FrameStream;
use sandpen_proto::ExecRequest;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

use crate::paths::SandboxPaths;
use crate::SupervisorError;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControlRequest {
    Status,
    Exec(ExecRequest),
    Stop,
    /// A round trip to the guest's PID 1 and back.
    Ping,
    /// Resource usage and limits, egress bytes, the disk's state.
    Stats,
    /// `sandpen cp NAME:PATH ...`: answered with `ExecStarted`, then the
    /// guest's [`sandpen_proto::CopyEvent`] frames.
    CopyOut {
        path: String,
    },
    /// `sandpen cp ... NAME:PATH`: answered with `ExecStarted`; the CLI then
    /// sends [`sandpen_proto::CopyChunk`] frames and reads one
    /// [`sandpen_proto::CopyEvent`]. What is made belongs to the guest user.
    CopyIn {
        path: String,
    },
    /// Ask mode: the connections waiting for an answer.
    Pending,
    /// Ask mode: answer one of them.
    Answer {
        id: u64,
        answer: sandpen_proxy::Answer,
    },
    /// Ask mode: the policy files changed (`approve --always`): re-read
    /// them and release what a rule now decides.
    Recheck,
    /// Ask mode: a [`ControlReply::NewPending`] frame for each connection
    /// that starts to wait, until the CLI hangs up (an attached `run`).
    WatchPending,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControlReply {
    Status(RuntimeStatus),
    ExecStarted,
    Stopping,
    Error(String),
    Pong {
        guest_uptime_ms: u64,
    },
    Stats(crate::resources::Stats),
    Pending(Vec<sandpen_proxy::PendingInfo>),
    Answered(sandpen_proxy::PendingInfo),
    /// How many held connections a rule now decides.
    Rechecked(usize),
    Watching,
    NewPending(sandpen_proxy::PendingInfo),
}

/// A running sandbox, as its supervisor reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeStatus {
    pub supervisor_pid: u32,
    pub qemu_pid: u32,
    pub file_server_pids: Vec<u32>,
    pub started_at_unix_ms: u64,
    pub accel: String,
    pub accel_reason: String,
    pub kernel_release: String,
    /// From starting QEMU to the guest answering the handshake, and to setup done.
    pub channel_ms: u64,
    pub ready_ms: u64,
    /// A stop is under way.
    pub stopping: bool,
    /// The layers of QEMU's jail, one line (docs/architecture.md).
    #[serde(default)]
    pub jail: String,
    /// The layers this host could not give QEMU, with the reason each.
    #[serde(default)]
    pub jail_missing: Vec<String>,
}

/// What `ls` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Stopped,
    /// Not running, because a part failed (the reason, see [`crate::exit`]).
    /// `start` works as from `Stopped`.
    Failed(String),
    /// A supervisor holds the lock but does not answer yet (booting).
    Starting,
    Running(RuntimeStatus),
    /// The guest is shutting down.
    Stopping,
    /// A supervisor holds the lock but did not answer in time.
    Unresponsive,
}

impl State {
    pub fn label(&self) -> &'static str {
        match self {
            State::Stopped => "stopped",
            State::Failed(_) => "failed",
            State::Starting => "starting",
            State::Running(_) => "running",
            State::Stopping => "stopping",
            State::Unresponsive => "unresponsive",
        }
    }
}

/// True while a supervisor process holds the sandbox's lock. The kernel drops a
/// flock when its holder dies, so a crashed supervisor reads as not alive.
pub fn supervisor_alive(paths: &SandboxPaths) -> bool {
    use nix::fcntl::{Flock, FlockArg};
    let Ok(file) = OpenOptions::new().read(true).open(paths.lock()) else {
        return false;
    };
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_shared) => false,
        Err((_, errno)) => errno == nix::errno::Errno::EWOULDBLOCK,
    }
}

async fn connect(paths: &SandboxPaths) -> Result<FrameStream<UnixStream>, SupervisorError> {
    let sock = paths.control_socket();
    let stream = UnixStream::connect(&sock)
        .await
        .map_err(|e| SupervisorError::io(format!("connecting to {}", sock.display()), e))?;
    Ok(FrameStream::new(stream))
}

async fn request(
    paths: &SandboxPaths,
    req: &ControlRequest,
) -> Result<(FrameStream<UnixStream>, ControlReply), SupervisorError> {
    let mut frames = connect(paths).await?;
    frames.send(req).await?;
    let reply = frames
        .expect::<ControlReply>("the supervisor's reply")
        .await?;
    if let ControlReply::Error(e) = reply {
        return Err(SupervisorError::Boot(e));
    }
    Ok((frames, reply))
}

pub async fn state(paths: &SandboxPaths) -> State {
    if !supervisor_alive(paths) {
        return match crate::exit::last_failure(paths) {
            Some(reason) => State::Failed(reason),
            None => State::Stopped,
        };
    }
    if !paths.control_socket().exists() {
        return State::Starting;
    }
    match tokio::time::timeout(
        Duration::from_secs(3),
        request(paths, &ControlRequest::Status),
    )
    .await
    {
        Ok(Ok((_, ControlReply::Status(s)))) if s.stopping => State::Stopping,
        Ok(Ok((_, ControlReply::Status(s)))) => State::Running(s),
        Ok(_) if !supervisor_alive(paths) => match crate::exit::last_failure(paths) {
            Some(reason) => State::Failed(reason),
            None => State::Stopped,
        },
        Ok(Err(_)) => State::Starting,
        Ok(Ok(_)) | Err(_) => State::Unresponsive,
    }
}

/// Starts an exec; the returned stream then carries `ExecInput` / `ExecEvent` frames.
pub async fn exec(
    paths: &SandboxPaths,
    req: ExecRequest,
) -> Result<FrameStream<UnixStream>, SupervisorError> {
    match request(paths, &ControlRequest::Exec(req)).await? {
        (frames, ControlReply::ExecStarted) => Ok(frames),
        (_, other) => Err(SupervisorError::Boot(format!("unexpected reply {other:?}"))),
    }
}

/// Starts a copy (`CopyOut` or `CopyIn`); the returned stream then carries
/// the guest's copy frames.
pub async fn copy(
    paths: &SandboxPaths,
    req: ControlRequest,
) -> Result<FrameStream<UnixStream>, SupervisorError> {
    match request(paths, &req).await? {
        (frames, ControlReply::ExecStarted) => Ok(frames),
        (_, other) => Err(SupervisorError::Boot(format!("unexpected reply {other:?}"))),
    }
}

/// One round trip CLI -> supervisor -> guest PID 1 and back; returns the guest's uptime.
pub async fn ping(paths: &SandboxPaths) -> Result<u64, SupervisorError> {
    match request(paths, &ControlRequest::Ping).await? {
        (_, ControlReply::Pong { guest_uptime_ms }) => Ok(guest_uptime_ms),
        (_, other) => Err(SupervisorError::Boot(format!("unexpected reply {other:?}"))),
    }
}

/// The sandbox's resource usage and limits (`ls`, `stats`).
pub async fn stats(paths: &SandboxPaths) -> Result<crate::resources::Stats, SupervisorError> {
    match request(paths, &ControlRequest::Stats).await? {
        (_, ControlReply::Stats(s)) => Ok(s),
        (_, other) => Err(SupervisorError::Boot(format!("unexpected reply {other:?}"))),
    }
}

/// Ask mode: the sandbox's held connections.
pub async fn pending(
    paths: &SandboxPaths,
) -> Result<Vec<sandpen_proxy::PendingInfo>, SupervisorError> {
    match request(paths, &ControlRequest::Pending).await? {
        (_, ControlReply::Pending(list)) => Ok(list),
        (_, other) => Err(SupervisorError::Boot(format!("unexpected reply {other:?}"))),
    }
}

/// Ask mode: answer held connection `id`.
pub async fn answer(
    paths: &SandboxPaths,
    id: u64,
    answer: sandpen_proxy::Answer,
) -> Result<sandpen_proxy::PendingInfo, SupervisorError> {
    match request(paths, &ControlRequest::Answer { id, answer }).await? {
        (_, ControlReply::Answered(info)) => Ok(info),
        (_, other) => Err(SupervisorError::Boot(format!("unexpected reply {other:?}"))),
    }
}

/// Ask mode: after a policy edit, release what a rule now decides.
pub async fn recheck(paths: &SandboxPaths) -> Result<usize, SupervisorError> {
    match request(paths, &ControlRequest::Recheck).await? {
        (_, ControlReply::Rechecked(n)) => Ok(n),
        (_, other) => Err(SupervisorError::Boot(format!("unexpected reply {other:?}"))),
    }
}

/// Ask mode: a stream of the connections that start to wait.
pub async fn watch_pending(
    paths: &SandboxPaths,
) -> Result<FrameStream<UnixStream>, SupervisorError> {
    match request(paths, &ControlRequest::WatchPending).await? {
        (frames, ControlReply::Watching) => Ok(frames),
        (_, other) => Err(SupervisorError::Boot(format!("unexpected reply {other:?}"))),
    }
}

/// Asks the supervisor to shut the guest down, and waits until it has exited.
pub async fn stop(paths: &SandboxPaths, timeout: Duration) -> Result<(), SupervisorError> {
    let (mut frames, _) = request(paths, &ControlRequest::Stop).await?;
    // The supervisor closes the connection when it exits.
    let _ = tokio::time::timeout(timeout, frames.recv::<ControlReply>()).await;
    let deadline = tokio::time::Instant::now() + timeout;
    while supervisor_alive(paths) {
        if tokio::time::Instant::now() > deadline {
            return Err(SupervisorError::Boot(format!(
                "the supervisor did not exit within {timeout:?}; see {}",
                paths.supervisor_log().display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Kills a supervisor that does not answer (its QEMU and file server die with it).
pub fn kill_supervisor(paths: &SandboxPaths) {
    if let Ok(pid) = std::fs::read_to_string(paths.pid_file()) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            if supervisor_alive(paths) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}
