//! Running a process for the host: pipes or a pseudo-terminal, signals, resize,
//! and the exit status after all output.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sandpen_proto::frame::{FrameStream, FrameWriter};
use sandpen_proto::{ExecEvent, ExecInput, ExecRequest, GuestSetup, WinSize, IO_CHUNK};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

use crate::channel::GuestState;
use crate::reaper::Reaper;
use crate::users::{self, Account};

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long output is still collected after the process exits, for descendants
/// that keep its stdout open.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);

pub async fn run<S>(frames: FrameStream<S>, req: ExecRequest, state: Arc<GuestState>) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let setup = state.setup.read().ok().and_then(|s| s.clone());
    run_with(frames, req, &state.reaper, setup.as_ref()).await
}

/// The environment a process starts with: the user's basics, then the sandbox's,
/// then the request's.
fn environment(
    account: &Account,
    setup: Option<&GuestSetup>,
    req: &ExecRequest,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), account.home.clone()),
        ("USER".into(), account.name.clone()),
        ("LOGNAME".into(), account.name.clone()),
        ("SHELL".into(), account.shell.clone()),
        ("LANG".into(), "C.UTF-8".into()),
    ];
    if req.tty.is_some() {
        env.push(("TERM".into(), "xterm-256color".into()));
    }
    let extra = setup.map(|s| s.env.as_slice()).unwrap_or(&[]);
    for (k, v) in extra.iter().chain(req.env.iter()) {
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

fn failed(code: u8, message: String) -> ExecEvent {
    ExecEvent::Failed { code, message }
}

pub async fn run_with<S>(
    frames: FrameStream<S>,
    req: ExecRequest,
    reaper: &Arc<Reaper>,
    setup: Option<&GuestSetup>,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut input, mut output) = frames.split();
    let Some(program) = req.argv.first() else {
        output.send(&failed(125, "no command given".into())).await?;
        return Ok(());
    };
    let who = req
        .user
        .clone()
        .or_else(|| setup.map(|s| s.user.name.clone()))
        .unwrap_or_else(|| "root".into());
    let Some(account) = users::lookup(&who) else {
        output
            .send(&failed(125, format!("unknown user {who:?} in the sandbox")))
            .await?;
        return Ok(());
    };
    let cwd = req
        .cwd
        .clone()
        .or_else(|| setup.and_then(|s| s.mounts.first().map(|m| m.path.clone())))
        .unwrap_or_else(|| account.home.clone());
    if !std::path::Path::new(&cwd).is_dir() {
        output
            .send(&failed(
                126,
                format!("working directory {cwd}: no such directory in the sandbox"),
            ))
            .await?;
        return Ok(());
    }

    let mut cmd = Command::new(program);
    cmd.args(&req.argv[1..])
        .env_clear()
        .envs(environment(&account, setup, &req))
        .current_dir(&cwd);

    let mut pty_master: Option<Arc<AsyncFd<OwnedFd>>> = None;
    if let Some(size) = req.tty {
        let pty = nix::pty::openpty(Some(&winsize(size)), None)?;
        // openpty does not set close-on-exec: without it every process started
        // meanwhile would inherit this session's terminal.
        set_cloexec(pty.master.as_raw_fd())?;
        set_cloexec(pty.slave.as_raw_fd())?;
        let slave = pty.slave;
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        set_nonblocking(pty.master.as_raw_fd())?;
        // SAFETY: the OwnedFd is moved into the AsyncFd, so the descriptor stays
        // open and refers to the same pty master for the AsyncFd's whole life.
        let master = unsafe { AsyncFd::register(pty.master) }.map_err(io::Error::from)?;
        pty_master = Some(Arc::new(master));
    } else {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    }
    let tty = req.tty.is_some();
    let (uid, gid, groups) = (account.uid, account.gid, account.groups.clone());
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (setsid, ioctl, setgroups, setgid, setuid);
    // it does not allocate (the groups vector was built before the fork).
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid()?;
            if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }

    let spawned = {
        let mut registration = reaper.lock();
        cmd.spawn().map(|child| {
            let exit = registration.register(child.id());
            (child, exit)
        })
    };
    drop(cmd);
    let (mut child, mut exit) = match spawned {
        Ok(c) => c,
        Err(e) => {
            let (code, what) = match e.raw_os_error() {
                Some(libc::ENOENT) => (127, "command not found"),
                Some(libc::EACCES) | Some(libc::ENOEXEC) | Some(libc::EISDIR) => {
                    (126, "cannot execute")
                }
                _ => (126, "cannot start"),
            };
            output
                .send(&failed(code, format!("{program}: {what}: {e}")))
                .await?;
            return Ok(());
        }
    };
    let pid = child.id() as i32;
    output.send(&ExecEvent::Started { pid: pid as u32 }).await?;

    // Output sources.
    let mut stdout: Option<Source> = None;
    let mut stderr: Option<Source> = None;
    let (stdin_tx, stdin_rx) = mpsc::channel::<Vec<u8>>(16);
    let stdin_task;
    if let Some(master) = &pty_master {
        stdout = Some(Source::Pty(master.clone()));
        stdin_task = tokio::spawn(write_stdin(StdinSink::Pty(master.clone()), stdin_rx));
    } else {
        if let Some(o) = child.stdout.take() {
            stdout = Some(Source::Pipe(pipe::Receiver::from_owned_fd(OwnedFd::from(
                o,
            ))?));
        }
        if let Some(e) = child.stderr.take() {
            stderr = Some(Source::Pipe(pipe::Receiver::from_owned_fd(OwnedFd::from(
                e,
            ))?));
        }
        let sink = match child.stdin.take() {
            Some(i) => StdinSink::Pipe(pipe::Sender::from_owned_fd(OwnedFd::from(i))?),
            None => StdinSink::Closed,
        };
        stdin_task = tokio::spawn(write_stdin(sink, stdin_rx));
    }
    let master_fd = pty_master.as_ref().map(|m| m.get_ref().as_raw_fd());
    let input_task = tokio::spawn(async move {
        let mut stdin_tx = Some(stdin_tx);
        loop {
            match input.recv::<ExecInput>().await {
                Ok(Some(ExecInput::Stdin(data))) => {
                    if let Some(tx) = &stdin_tx {
                        if tx.send(data).await.is_err() {
                            stdin_tx = None;
                        }
                    }
                }
                Ok(Some(ExecInput::StdinEof)) => {
                    if let (Some(tx), Some(_)) = (&stdin_tx, master_fd) {
                        // A terminal has no EOF of its own: send the EOF character.
                        let _ = tx.send(vec![4]).await;
                    }
                    stdin_tx = None;
                }
                Ok(Some(ExecInput::Resize(size))) => {
                    if let Some(fd) = master_fd {
                        resize(fd, size);
                    }
                }
                Ok(Some(ExecInput::Signal(sig))) => {
                    if let Ok(sig) = Signal::try_from(sig) {
                        let _ = kill(Pid::from_raw(-pid), sig);
                    }
                }
                Ok(None) | Err(_) => {
                    // The host went away: hang up on the process group.
                    let _ = kill(Pid::from_raw(-pid), Signal::SIGHUP);
                    return;
                }
            }
        }
    });

    let mut buf_out = vec![0u8; IO_CHUNK];
    let mut buf_err = vec![0u8; IO_CHUNK];
    let status = loop {
        tokio::select! {
            n = read_opt(&mut stdout, &mut buf_out) => {
                forward(&mut output, &mut stdout, n, &buf_out, ExecEvent::Stdout).await?;
            }
            n = read_opt(&mut stderr, &mut buf_err) => {
                forward(&mut output, &mut stderr, n, &buf_err, ExecEvent::Stderr).await?;
            }
            status = &mut exit => {
                break status.unwrap_or(sandpen_proto::ExitStatus::Code(125));
            }
        }
    };
    // The pid may be reused from here on: no more signals or input for it.
    input_task.abort();
    let drain = tokio::time::sleep(DRAIN_AFTER_EXIT);
    tokio::pin!(drain);
    while stdout.is_some() || stderr.is_some() {
        tokio::select! {
            n = read_opt(&mut stdout, &mut buf_out) => {
                forward(&mut output, &mut stdout, n, &buf_out, ExecEvent::Stdout).await?;
            }
            n = read_opt(&mut stderr, &mut buf_err) => {
                forward(&mut output, &mut stderr, n, &buf_err, ExecEvent::Stderr).await?;
            }
            _ = &mut drain => break,
        }
    }
    output.send(&ExecEvent::Exit(status)).await?;
    output.close().await?;
    input_task.abort();
    stdin_task.abort();
    Ok(())
}

enum Source {
    Pipe(pipe::Receiver),
    Pty(Arc<AsyncFd<OwnedFd>>),
}

enum StdinSink {
    Pipe(pipe::Sender),
    Pty(Arc<AsyncFd<OwnedFd>>),
    Closed,
}

async fn read_opt(src: &mut Option<Source>, buf: &mut [u8]) -> io::Result<usize> {
    match src {
        None => std::future::pending().await,
        Some(Source::Pipe(p)) => p.read(buf).await,
        Some(Source::Pty(m)) => loop {
            let mut guard = m.readable().await?;
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_raw_fd(), buf).map_err(io::Error::from)
            }) {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        },
    }
}

async fn forward<S>(
    output: &mut FrameWriter<S>,
    src: &mut Option<Source>,
    n: io::Result<usize>,
    buf: &[u8],
    wrap: fn(Vec<u8>) -> ExecEvent,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match n {
        Ok(0) | Err(_) => *src = None,
        Ok(n) => output.send(&wrap(buf[..n].to_vec())).await?,
    }
    Ok(())
}

async fn write_stdin(sink: StdinSink, mut rx: mpsc::Receiver<Vec<u8>>) {
    match sink {
        StdinSink::Closed => {}
        StdinSink::Pipe(mut p) => {
            while let Some(data) = rx.recv().await {
                if p.write_all(&data).await.is_err() {
                    return;
                }
            }
            // Dropping the sender closes the pipe: the process sees EOF.
        }
        StdinSink::Pty(m) => {
            while let Some(data) = rx.recv().await {
                let mut rest = &data[..];
                while !rest.is_empty() {
                    let Ok(mut guard) = m.writable().await else {
                        return;
                    };
                    match guard.try_io(|fd| {
                        nix::unistd::write(fd.get_ref(), rest).map_err(io::Error::from)
                    }) {
                        Ok(Ok(n)) => rest = &rest[n..],
                        Ok(Err(_)) => return,
                        Err(_would_block) => continue,
                    }
                }
            }
        }
    }
}

fn winsize(size: WinSize) -> nix::pty::Winsize {
    nix::pty::Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn resize(fd: RawFd, size: WinSize) {
    let ws = winsize(size);
    // SAFETY: TIOCSWINSZ reads one `struct winsize` from the pointer, which points
    // to a live, correctly laid out value for the duration of the call.
    unsafe {
        libc::ioctl(fd, libc::TIOCSWINSZ, &ws as *const nix::pty::Winsize);
    }
}

fn set_cloexec(fd: RawFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd, FcntlArg::F_GETFL)?;
    fcntl(
        fd,
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandpen_proto::ExitStatus;

    fn me() -> String {
        nix::unistd::getuid().as_raw().to_string()
    }

    async fn exec(argv: &[&str], stdin: &[u8], tty: bool) -> (Vec<u8>, Vec<u8>, Option<ExecEvent>) {
        let reaper = crate::reaper::shared_for_tests();
        let (host, guest) = tokio::io::duplex(256 * 1024);
        let req = ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![("FOO".into(), "bar".into())],
            cwd: Some("/".into()),
            user: Some(me()),
            tty: tty.then_some(WinSize {
                rows: 30,
                cols: 100,
            }),
        };
        let server = tokio::spawn(async move {
            run_with(FrameStream::new(guest), req, &reaper, None)
                .await
                .unwrap();
        });
        let mut host = FrameStream::new(host);
        if !stdin.is_empty() {
            host.send(&ExecInput::Stdin(stdin.to_vec())).await.unwrap();
        }
        host.send(&ExecInput::StdinEof).await.unwrap();
        let (mut out, mut err, mut last) = (Vec::new(), Vec::new(), None);
        while let Some(ev) = host.recv::<ExecEvent>().await.unwrap() {
            match ev {
                ExecEvent::Stdout(d) => out.extend(d),
                ExecEvent::Stderr(d) => err.extend(d),
                ExecEvent::Started { .. } => {}
                other => last = Some(other),
            }
        }
        server.await.unwrap();
        (out, err, last)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn pipes_exit_code_env_and_stdin() {
        let (out, err, last) = exec(
            &["sh", "-c", "echo out $FOO; echo err >&2; cat; exit 7"],
            b"from stdin\n",
            false,
        )
        .await;
        assert_eq!(String::from_utf8_lossy(&out), "out bar\nfrom stdin\n");
        assert_eq!(String::from_utf8_lossy(&err), "err\n");
        assert_eq!(last, Some(ExecEvent::Exit(ExitStatus::Code(7))));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn not_found_is_127_and_signal_is_reported() {
        let (_, _, last) = exec(&["/no/such/binary"], b"", false).await;
        assert!(
            matches!(last, Some(ExecEvent::Failed { code: 127, .. })),
            "{last:?}"
        );
        let (_, _, last) = exec(&["sh", "-c", "kill -TERM $$"], b"", false).await;
        assert_eq!(last, Some(ExecEvent::Exit(ExitStatus::Signal(15))));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn tty_merges_output_and_reports_size() {
        let (out, err, last) = exec(
            &[
                "sh",
                "-c",
                "stty size; echo oops >&2; tty -s && echo isatty",
            ],
            b"",
            true,
        )
        .await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("30 100"), "{text:?}");
        assert!(text.contains("oops") && text.contains("isatty"), "{text:?}");
        assert!(err.is_empty());
        assert_eq!(last, Some(ExecEvent::Exit(ExitStatus::Code(0))));
    }
}
