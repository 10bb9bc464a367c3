//! Tunnels between two TCP sockets without copying through the proxy:
//! `splice(2)` moves each chunk from one socket into a pipe and from the
//! pipe into the other socket, inside the kernel.
//!
//! Used when the guest end of a tunnel is itself a TCP socket (standalone
//! mode, [`crate::serve_http_proxy`]); guest streams that arrive over the
//! sandbox channel go through [`crate::relay::copy_both`]. The semantics are
//! the same: each direction moves bytes until EOF and then shuts its writer
//! down, bytes are counted in the connection's [`Activity`], and every chunk
//! going up passes the connection's [`LiveCheck`] before it is sent on (a
//! refused chunk stays in its pipe, which is closed).
//!
//! A direction holds a pipe only while bytes are in flight: when its source
//! has nothing to read, the empty pipe goes back to a small shared stock, so
//! an idle tunnel holds no pipe (and no descriptors beyond its sockets).

use std::future::poll_fn;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::task::{ready, Context, Poll};

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::sys::socket::{shutdown, Shutdown};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::relay::Activity;
use crate::LiveCheck;

/// Empty pipes kept for the next burst, across all tunnels.
const STOCK: usize = 64;

static PIPES: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// A non-blocking pipe, empty whenever it is in the stock.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What it holds at most.
    capacity: usize,
}

impl Pipe {
    /// One from the stock, or a new one asking for `size` bytes of room.
    fn take(size: usize) -> io::Result<Pipe> {
        if let Some(p) = lock_stock().pop() {
            return Ok(p);
        }
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // A larger pipe means fewer system calls per byte. The kernel may
        // refuse (the user's pipe budget, `fs.pipe-max-size`): then the
        // default 64 KiB serves.
        let asked = i32::try_from(size).unwrap_or(i32::MAX);
        let capacity = match fcntl(write.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(asked)) {
            Ok(n) => usize::try_from(n).unwrap_or(64 * 1024),
            Err(_) => match fcntl(write.as_raw_fd(), FcntlArg::F_GETPIPE_SZ) {
                Ok(n) => usize::try_from(n).unwrap_or(64 * 1024),
                Err(_) => 64 * 1024,
            },
        };
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }

    /// Back to the stock; only called when the pipe is empty.
    fn give_back(self) {
        let mut stock = lock_stock();
        if stock.len() < STOCK {
            stock.push(self);
        }
    }
}

fn lock_stock() -> std::sync::MutexGuard<'static, Vec<Pipe>> {
    match PIPES.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

/// One direction of a spliced tunnel.
struct Pump {
    pipe: Option<Pipe>,
    /// Bytes in the pipe not yet written on.
    in_pipe: usize,
    read_done: bool,
    done: bool,
    size: usize,
}

impl Pump {
    fn new(size: usize) -> Self {
        Pump {
            pipe: None,
            in_pipe: 0,
            read_done: false,
            done: false,
            size,
        }
    }

    /// Move bytes from `src` to `dst` until `src` has none to give or `dst`
    /// takes no more; `on_read` sees every chunk read and may refuse it.
    fn poll_move(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        on_read: &mut impl FnMut(usize) -> io::Result<()>,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.in_pipe == 0 && !self.read_done {
                if src.poll_read_ready(cx)?.is_pending() {
                    // Quiet: the empty pipe goes back to the stock.
                    if let Some(p) = self.pipe.take() {
                        p.give_back();
                    }
                    return Poll::Pending;
                }
                let pipe = match &mut self.pipe {
                    Some(p) => p,
                    None => self.pipe.insert(Pipe::take(self.size)?),
                };
                let len = pipe.capacity;
                let moved = src.try_io(Interest::READABLE, || {
                    splice(src.as_fd(), None, pipe.write.as_fd(), None, len, FLAGS)
                        .map_err(io::Error::from)
                });
                match moved {
                    Ok(0) => {
                        self.read_done = true;
                        if let Some(p) = self.pipe.take() {
                            p.give_back();
                        }
                    }
                    Ok(n) => {
                        self.in_pipe = n;
                        // A refused chunk never leaves its pipe, and the pipe
                        // is closed with it.
                        if let Err(e) = on_read(n) {
                            self.pipe = None;
                            return Poll::Ready(Err(e));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            while self.in_pipe > 0 {
                ready!(dst.poll_write_ready(cx))?;
                let Some(pipe) = &self.pipe else {
                    return Poll::Ready(Err(io::Error::other("spliced bytes without a pipe")));
                };
                let len = self.in_pipe;
                let moved = dst.try_io(Interest::WRITABLE, || {
                    splice(pipe.read.as_fd(), None, dst.as_fd(), None, len, FLAGS)
                        .map_err(io::Error::from)
                });
                match moved {
                    Ok(0) => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            "the peer accepts no more bytes",
                        )))
                    }
                    Ok(n) => self.in_pipe -= n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if self.read_done {
                match shutdown(dst.as_raw_fd(), Shutdown::Write) {
                    Ok(()) | Err(Errno::ENOTCONN) => {}
                    Err(e) => return Poll::Ready(Err(e.into())),
                }
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Move bytes `guest` → `upstream` and back until both directions reach
/// EOF. Bytes up are counted and checked by `live` chunk by chunk (a refusal
/// is a `PermissionDenied` error with its reason); bytes down are counted.
/// `size` is the most a direction has in flight.
pub async fn splice_both(
    guest: &TcpStream,
    upstream: &TcpStream,
    act: &Activity,
    mut live: LiveCheck,
    size: usize,
) -> io::Result<()> {
    let mut up = Pump::new(size);
    let mut down = Pump::new(size);
    let mut check_up = |n: usize| {
        act.add_up(n);
        live.check()
            .map_err(|reason| io::Error::new(io::ErrorKind::PermissionDenied, reason))
    };
    let mut count_down = |n: usize| {
        act.add_down(n);
        Ok(())
    };
    poll_fn(|cx| {
        if !up.done {
            if let Poll::Ready(r) = up.poll_move(cx, guest, upstream, &mut check_up) {
                r?;
                up.done = true;
            }
        }
        if !down.done {
            if let Poll::Ready(r) = down.poll_move(cx, upstream, guest, &mut count_down) {
                r?;
                down.done = true;
            }
        }
        if up.done && down.done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}
