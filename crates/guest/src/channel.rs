//! The host channel: find the port, handshake, serve multiplexed streams.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use sandpen_proto::fdio::FdStream;
use sandpen_proto::frame::FrameStream;
use sandpen_proto::mux::{self, Mode, MuxHandle, MuxStream};
use sandpen_proto::{handshake, Ack, GuestSetup, Pong, Request, SetupReply, PORT_NAME};
use tokio::sync::Notify;

use crate::reaper::Reaper;
use crate::{log, setup, sys};

/// What every stream handler shares.
pub struct GuestState {
    pub reaper: Arc<Reaper>,
    /// Opens guest -> host streams (egress).
    pub mux: MuxHandle,
    pub setup: RwLock<Option<GuestSetup>>,
    /// The egress redirect being installed since boot; taken by the setup.
    egress: std::sync::Mutex<Option<tokio::task::JoinHandle<Result<()>>>>,
    shutdown: Notify,
}

/// Finds `/dev/vportNpM` whose name is [`PORT_NAME`] (there is no udev to make
/// `/dev/virtio-ports/NAME`).
fn find_port() -> Result<PathBuf> {
    for _ in 0..500 {
        if let Ok(entries) = std::fs::read_dir("/sys/class/virtio-ports") {
            for e in entries.flatten() {
                let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
                if name.trim() == PORT_NAME {
                    return Ok(PathBuf::from("/dev").join(e.file_name()));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    anyhow::bail!("no virtio-serial port named {PORT_NAME}")
}

pub async fn serve(reaper: Arc<Reaper>) -> Result<()> {
    let egress = crate::egress::prepare();
    let port = find_port()?;
    sys::wait_for(&port, Duration::from_secs(5))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&port)
        .with_context(|| format!("opening {}", port.display()))?;
    let mut io = FdStream::new(file)?;
    handshake::guest(&mut io, Duration::from_millis(100)).await?;
    log!("host channel up at {} ms", sys::uptime_ms());

    let (handle, mut inbound, driver) = mux::session(io, Mode::Client);
    let driver = tokio::spawn(driver);
    let state = Arc::new(GuestState {
        reaper,
        mux: handle,
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
            let mut result = tokio::task::spawn_blocking(move || setup::apply(&applied, &reaper))
                .await
                .map_err(|e| anyhow::anyhow!("setup panicked: {e}"))
                .and_then(|r| r);
            let prepared = state.egress.lock().ok().and_then(|mut e| e.take());
            if let (Ok(()), Some(prepared)) = (&result, prepared) {
                result = crate::egress::start(state.mux.clone(), prepared)
                    .await
                    .context("starting the egress plumbing");
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
        Request::Shutdown => {
            frames.send(&Ack).await?;
            frames.close().await?;
            state.shutdown.notify_one();
        }
    }
    Ok(())
}
