//! The terminal side of an exec: raw mode, window size, stdin, signals, and the
//! exit status.

use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;

use anyhow::{Context, Result};
use nix::sys::termios::{self, SetArg, Termios};
use sandpen_proto::frame::FrameStream;
use sandpen_proto::{ExecEvent, ExecInput, WinSize, IO_CHUNK};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

/// Puts the terminal in raw mode and restores it when dropped.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter() -> Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).context("reading terminal settings")?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)
            .context("setting the terminal to raw mode")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

pub fn terminal_size() -> Option<WinSize> {
    let mut ws = nix::pty::Winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `struct winsize` into the pointer, which points
    // to a live value of that type.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0).then_some(WinSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// Whether a command should get a terminal: both ends of ours are one.
pub fn want_tty() -> bool {
    std::io::stdin().is_terminal() && std::io::stdout().is_terminal()
}

/// Drives an exec until the process exits; returns its shell-style status.
pub async fn attach(
    frames: FrameStream<UnixStream>,
    tty: bool,
    forward_stdin: bool,
) -> Result<i32> {
    let _raw = if tty { Some(RawMode::enter()?) } else { None };
    let (mut events, mut input) = frames.split();
    let (tx, mut rx) = mpsc::channel::<ExecInput>(16);

    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if input.send(&msg).await.is_err() {
                break;
            }
        }
    });

    // Stdin.
    let stdin_tx = tx.clone();
    let stdin_task = tokio::spawn(async move {
        if forward_stdin {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; IO_CHUNK];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stdin_tx
                            .send(ExecInput::Stdin(buf[..n].to_vec()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        }
        let _ = stdin_tx.send(ExecInput::StdinEof).await;
    });

    // Window size changes, and signals to pass on when there is no terminal (with
    // one, ^C is a byte the guest's terminal turns into SIGINT).
    let sig_tx = tx.clone();
    let signal_task = tokio::spawn(async move {
        let (Ok(mut winch), Ok(mut int), Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::window_change()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            return;
        };
        loop {
            let msg = tokio::select! {
                _ = winch.recv() => match terminal_size() {
                    Some(size) if tty => ExecInput::Resize(size),
                    _ => continue,
                },
                _ = int.recv() => ExecInput::Signal(libc::SIGINT),
                _ = term.recv() => ExecInput::Signal(libc::SIGTERM),
                _ = hup.recv() => ExecInput::Signal(libc::SIGHUP),
            };
            if sig_tx.send(msg).await.is_err() {
                return;
            }
        }
    });
    drop(tx);

    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let result = loop {
        match events.recv::<ExecEvent>().await {
            Ok(Some(ExecEvent::Started { .. })) => {}
            Ok(Some(ExecEvent::Stdout(d))) => {
                let _ = stdout.write_all(&d);
                let _ = stdout.flush();
            }
            Ok(Some(ExecEvent::Stderr(d))) => {
                let _ = stderr.write_all(&d);
                let _ = stderr.flush();
            }
            Ok(Some(ExecEvent::Failed { code, message })) => {
                drop(_raw);
                eprintln!("sandpen: {message}");
                break Ok(i32::from(code));
            }
            Ok(Some(ExecEvent::Exit(status))) => break Ok(status.shell_code()),
            Ok(None) => {
                break Err(anyhow::anyhow!(
                    "the sandbox closed the session before the command exited (did it stop?)"
                ))
            }
            Err(e) => break Err(anyhow::Error::new(e).context("reading from the sandbox")),
        }
    };
    stdin_task.abort();
    signal_task.abort();
    writer.abort();
    result
}
