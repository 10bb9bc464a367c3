//! The host channel: find the port, handshake, serve multiplexed streams.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use sandpen_proto::fdio::FdStream;
use sandpen_proto::frame::FrameStream;
use sandpen_proto::mux::{self, Channel, MuxHandle, MuxStream, Side};
use sandpen_proto::{
    handshake, Ack, GuestSetup, Pong, Request, SetupReply, EGRESS_PORT_NAME, PORT_NAME,
};
use tokio::sync::Notify;

use crate::reaper::Reaper;
use crate::{log, setup, sys};

/// What every stream handler shares.
pub struct GuestState {
    pub reaper: Arc<Reaper>,
    /// Opens guest -> host streams on the egress port.
    pub mux: MuxHandle,
    pub setup: RwLock<Option<GuestSetup>>,
    /// The egress redirect being installed since boot; taken by the setup.
    egress: std::sync::Mutex<Option<tokio::task::JoinHandle<Result<()>>>>,
    shutdown: Notify,
}

/// Finds `/dev/vportNpM` whose name is `wanted` (there is no udev to make
/// `/dev/virtio-ports/NAME`).
fn find_port(wanted: &str) -> Result<PathBuf> {
    for _ in 0..500 {
        if let Ok(entries) = std::fs::read_dir("/sys/class/virtio-ports") {
            for e in entries.flatten() {
                let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
                if name.trim() == wanted {
                    return Ok(PathBuf::from("/dev").join(e.file_name()));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    anyhow::bail!("no virtio-serial port named {wanted}")
}

/// Opens the port named `name` and performs the handshake on it.
async fn open_port(name: &str) -> Result<FdStream> {
    let port = find_port(name)?;
    sys::wait_for(&port, Duration::from_secs(5))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&port)
        .with_context(|| format!("opening {}", port.display()))?;
    let mut io = FdStream::new(file)?;
    handshake::guest(&mut io, Duration::from_millis(100))
        .await
        .with_context(|| format!("the handshake on port {name}"))?;
    Ok(io)
}

pub async fn serve(reaper: Arc<Reaper>) -> Result<()> {
    let egress = crate::egress::prepare();
    // Control and egress on ports of their own: see docs/architecture.md.
    let (control_io, egress_io) =
        tokio::try_join!(open_port(PORT_NAME), open_port(EGRESS_PORT_NAME))?;
    log!("host channel up at {} ms", sys::uptime_ms());

    let (_, mut inbound, driver) = mux::session(control_io, Channel::Control, Side::Guest);
    let driver = tokio::spawn(driver);
    let (egress_handle, _, egress_driver) = mux::session(egress_io, Channel::Egress, Side::Guest);
    tokio::spawn(async move {
        if let Err(e) = egress_driver.await {
            log!("the egress channel ended: {e}");
        }
    });
    let state = Arc::new(GuestState {
        reaper,
        mux: egress_handle,
        setup: RwLock::new(None),
        egress: std::sync::Mutex::new(Some(egress)),
        shutdown: Notify::new(),
    });
    loop {
        tokio::select! {
            stream = inbound.recv() => match stream {
                Some(stream) => {
                    let state = state.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle_stream(stream, state).await {
                            log!("stream: {e:#}");
                        }
                    });
                }
                None => break,
            },
            _ = state.shutdown.notified() => break,
        }
    }
    // Give the last frames (the shutdown ack) a moment to leave.
    tokio::time::sleep(Duration::from_millis(20)).await;
    driver.abort();
    Ok(())
}

async fn handle_stream(stream: MuxStream, state: Arc<GuestState>) -> Result<()> {
    let mut frames = FrameStream::new(stream);
    let request: Request = frames.expect("a request").await?;
    match request {
        Request::Ping => {
            frames
                .send(&Pong {
                    uptime_ms: sys::uptime_ms(),
                    kernel_release: sys::kernel_release(),
                })
                .await?;
            frames.close().await?;
        }
        Request::Setup(setup) => {
            let reaper = state.reaper.clone();
            let applied = setup.clone();
            let mut result = tokio::task::spawn_blocking(move || {
                setup::apply(&applied, &reaper)?;
                crate::request::install();
                Ok(())
            })
            .await
            .map_err(|e| anyhow::anyhow!("setup panicked: {e}"))
            .and_then(|r| r);
            let prepared = state.egress.lock().ok().and_then(|mut e| e.take());
            if let (Ok(()), Some(prepared)) = (&result, prepared) {
                result = crate::egress::start(state.mux.clone(), prepared)
                    .await
                    .context("starting the egress plumbing");
                if let Err(e) = crate::request::start(state.mux.clone()) {
                    log!("sandpen-request's socket: {e:#}");
                }
            }
            let reply = match result {
                Ok(()) => {
                    if let Ok(mut s) = state.setup.write() {
                        *s = Some(setup);
                    }
                    crate::docker::arm(state.reaper.clone());
                    log!("ready at {} ms", sys::uptime_ms());
                    SetupReply::Ok {
                        kernel_release: sys::kernel_release(),
                    }
                }
                Err(e) => SetupReply::Failed {
                    message: format!("{e:#}"),
                },
            };
            frames.send(&reply).await?;
            frames.close().await?;
        }
        Request::Exec(req) => crate::exec::run(frames, req, state).await?,
        Request::Process { src_port } => {
            let process = crate::sys::process_for_port(src_port).await;
            frames.send(&sandpen_proto::ProcessInfo { process }).await?;
            frames.close().await?;
        }
        Request::Usage => {
            frames.send(&sys::usage()).await?;
            frames.close().await?;
        }
        Request::Forward { port } => crate::copy::forward(frames, port).await?,
        Request::CopyOut { path } => crate::copy::copy_out(frames, path).await?,
        Request::CopyIn { path, owner } => crate::copy::copy_in(frames, path, owner).await?,
        Request::Shutdown => {
            frames.send(&Ack).await?;
            frames.close().await?;
            state.shutdown.notify_one();
        }
    }
    Ok(())
}
