//! A terminal over a websocket: the same exec request and frames as
//! `sandpen exec -it` (docs/api.md#terminal). Browser to server: binary
//! messages are stdin; text messages are JSON `{"resize":{"rows":R,"cols":C}}`
//! or `{"signal":N}`. Server to browser: binary messages are the
//! terminal's output; one text message `{"exit":CODE}` or `{"error":TEXT}`
//! ends it. A closed socket hangs the process up (SIGHUP).

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use sandpen_proto::frame::FrameStream;
use sandpen_proto::{ExecEvent, ExecInput, WinSize};
use serde::Deserialize;
use tokio::net::UnixStream;

use super::{App, HttpError};
use crate::{sandboxes, ApiError};

#[derive(Deserialize)]
pub struct ExecQuery {
    rows: Option<u16>,
    cols: Option<u16>,
    /// A JSON array of strings; default a login shell.
    argv: Option<String>,
    user: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Control {
    resize: Option<WinSize>,
    signal: Option<i32>,
}

pub async fn upgrade(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    Query(q): Query<ExecQuery>,
    ws: WebSocketUpgrade,
) -> Result<Response, HttpError> {
    let config = sandpen_supervisor::sandbox::load(&app.dirs, &name).map_err(ApiError::from)?;
    let argv = match &q.argv {
        Some(json) => serde_json::from_str::<Vec<String>>(json)
            .ok()
            .filter(|a| !a.is_empty())
            .ok_or(ApiError::BadArgv)?,
        None => vec!["/bin/bash".into(), "-l".into()],
    };
    let size = WinSize {
        rows: q.rows.unwrap_or(24).clamp(2, 1000),
        cols: q.cols.unwrap_or(80).clamp(2, 1000),
    };
    let req = sandboxes::exec_request(
        &config,
        argv,
        vec![("TERM".into(), "xterm-256color".into())],
        q.user,
        None,
        Some(size),
    );
    let frames = sandboxes::exec(&app.dirs, &name, req).await?;
    Ok(ws.on_upgrade(move |socket| relay(socket, frames)))
}

async fn relay(socket: WebSocket, frames: FrameStream<UnixStream>) {
    let (mut events, mut input) = frames.split();
    let (mut to_browser, mut from_browser) = socket.split();
    let out = async {
        loop {
            let msg = match events.recv::<ExecEvent>().await {
                Ok(Some(ExecEvent::Started { .. })) => continue,
                Ok(Some(ExecEvent::Stdout(d) | ExecEvent::Stderr(d))) => Message::Binary(d.into()),
                Ok(Some(ExecEvent::Exit(status))) => Message::Text(
                    serde_json::json!({ "exit": status.shell_code() })
                        .to_string()
                        .into(),
                ),
                Ok(Some(ExecEvent::Failed { message, .. })) => {
                    Message::Text(serde_json::json!({ "error": message }).to_string().into())
                }
                Ok(None) | Err(_) => Message::Text(
                    serde_json::json!({ "error": "the sandbox closed the session (did it stop?)" })
                        .to_string()
                        .into(),
                ),
            };
            let last = matches!(msg, Message::Text(_));
            if to_browser.send(msg).await.is_err() || last {
                let _ = to_browser.close().await;
                return;
            }
        }
    };
    let inp = async {
        while let Some(Ok(msg)) = from_browser.next().await {
            let frame = match msg {
                Message::Binary(b) => ExecInput::Stdin(b.to_vec()),
                Message::Text(t) => match serde_json::from_str::<Control>(t.as_str()) {
                    Ok(Control {
                        resize: Some(size), ..
                    }) => ExecInput::Resize(size),
                    Ok(Control {
                        signal: Some(sig), ..
                    }) => ExecInput::Signal(sig),
                    _ => continue,
                },
                Message::Close(_) => break,
                _ => continue,
            };
            if input.send(&frame).await.is_err() {
                return;
            }
        }
        let _ = input
            .send(&ExecInput::Signal(nix::sys::signal::Signal::SIGHUP as i32))
            .await;
        let _ = input.send(&ExecInput::StdinEof).await;
    };
    tokio::select! {
        _ = out => {}
        _ = inp => {}
    }
}
