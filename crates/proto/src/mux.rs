//! A yamux session driven by one task, with a cloneable handle to open streams.
//!
//! yamux's `Connection` makes progress only while polled, so one driver future
//! owns it: it opens outbound streams on request, and hands inbound streams to a
//! bounded queue (a guest that opens streams faster than they are taken gets them
//! refused, not buffered without bound).
//!
//! Guarantees, per [`Channel`]:
//!
//! - Only one side opens streams (the host on [`Channel::Control`], the guest
//!   on [`Channel::Egress`]); a stream the other side opens is reset at once.
//! - The opener has at most [`Channel::open_limit`] streams open at once,
//!   counted by this module (a permit travels with each [`MuxStream`] and is
//!   given back when it is dropped). Past it, [`MuxHandle::open`] fails at
//!   once with [`ProtoError::TooManyStreams`] for that one stream (the guest
//!   refuses that one connection, the host that one exec) and the session
//!   lives on. yamux itself must never see its own limit: in yamux 0.13 an
//!   open past `max_num_streams` ends the whole connection, on the opening
//!   side as well as the accepting one. So both sides give yamux
//!   [`Channel::yamux_limit`], four times the open limit: the margin covers
//!   streams one side has dropped and the other has not processed yet.
//!   Only a peer that ignores its own limit (a hostile guest writing its own
//!   yamux) can end a session, and then only the session of that port.
//! - Memory: yamux gives each stream a fixed 256 KiB receive window (the
//!   connection window is exactly that times the stream limit, so no stream
//!   grows past it), so what the peer can make this side buffer is at most
//!   256 KiB times the streams this side holds: the egress proxy's caps bound
//!   those on the host (docs/architecture.md).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use yamux::Mode;

use crate::ProtoError;

/// A multiplexed stream, usable with tokio's I/O traits. A stream this side
/// opened holds one of the session's open permits until it is dropped.
pub struct MuxStream {
    inner: Compat<yamux::Stream>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl MuxStream {
    fn new(stream: yamux::Stream, permit: Option<OwnedSemaphorePermit>) -> MuxStream {
        MuxStream {
            inner: stream.compat(),
            _permit: permit,
        }
    }
}

impl AsyncRead for MuxStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// yamux's receive window per stream (`yamux::DEFAULT_CREDIT`, not settable).
pub const STREAM_WINDOW: usize = 256 * 1024;

/// The port a session runs on: it says which side opens the streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// Setup, exec, ping, shutdown: the host opens every stream.
    Control,
    /// One stream per outbound guest connection: the guest opens every stream.
    Egress,
}

/// Which end of the channel this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Host,
    Guest,
}

impl Channel {
    /// The side that opens this channel's streams.
    pub fn opener(self) -> Side {
        match self {
            Channel::Control => Side::Host,
            Channel::Egress => Side::Guest,
        }
    }

    /// Streams the opener may have open at once: exec sessions (plus pings
    /// and the like) on control, guest connections on egress.
    pub fn open_limit(self) -> usize {
        match self {
            Channel::Control => 256,
            Channel::Egress => 1024,
        }
    }

    /// What both sides tell yamux: far above what a peer keeping to
    /// [`open_limit`](Self::open_limit) can reach.
    pub fn yamux_limit(self) -> usize {
        4 * self.open_limit()
    }
}

/// Most inbound streams waiting to be taken before new ones are dropped.
pub const INBOUND_BACKLOG: usize = 256;

type OpenReply = oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>;

/// Opens new streams on the session. Cheap to clone.
#[derive(Clone)]
pub struct MuxHandle {
    open_tx: mpsc::Sender<OpenReply>,
    permits: Arc<Semaphore>,
    limit: usize,
}

impl MuxHandle {
    /// Opens a stream, or fails at once if this side has
    /// [`Channel::open_limit`] streams open already.
    pub async fn open(&self) -> Result<MuxStream, ProtoError> {
        let permit = self
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| ProtoError::TooManyStreams(self.limit))?;
        let (tx, rx) = oneshot::channel();
        self.open_tx
            .send(tx)
            .await
            .map_err(|_| ProtoError::Violation("the guest channel is closed".into()))?;
        let stream = rx
            .await
            .map_err(|_| ProtoError::Violation("the guest channel is closed".into()))??;
        Ok(MuxStream::new(stream, Some(permit)))
    }
}

/// Starts `side`'s end of a session on `channel` over `io`. Returns the handle
/// for outbound streams, the queue of inbound ones (always empty on the side
/// that opens), and the driver future, which must be spawned; it ends when the
/// connection does.
pub fn session<S>(
    io: S,
    channel: Channel,
    side: Side,
) -> (
    MuxHandle,
    mpsc::Receiver<MuxStream>,
    impl Future<Output = Result<(), ProtoError>>,
)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Bound what the peer can make this side buffer: yamux's default lets the
    // streams of one connection hold up to 1 GiB unread. (yamux checks the
    // window against the stream count at each call: zero streams first.)
    let max_streams = channel.yamux_limit();
    let mut config = yamux::Config::default();
    config.set_max_num_streams(0);
    config.set_max_connection_receive_window(Some(max_streams * STREAM_WINDOW));
    config.set_max_num_streams(max_streams);
    let mode = match side {
        Side::Host => Mode::Server,
        Side::Guest => Mode::Client,
    };
    let accepts = side != channel.opener();
    let mut conn = yamux::Connection::new(io.compat(), config, mode);
    let (open_tx, mut open_rx) = mpsc::channel::<OpenReply>(64);
    let (in_tx, in_rx) = mpsc::channel::<MuxStream>(INBOUND_BACKLOG);
    let mut waiting: VecDeque<OpenReply> = VecDeque::new();
    let mut handles_gone = false;

    let driver = std::future::poll_fn(move |cx| loop {
        while !handles_gone {
            match open_rx.poll_recv(cx) {
                Poll::Ready(Some(reply)) => waiting.push_back(reply),
                Poll::Ready(None) => handles_gone = true,
                Poll::Pending => break,
            }
        }
        if !waiting.is_empty() {
            if let Poll::Ready(result) = conn.poll_new_outbound(cx) {
                if let Some(reply) = waiting.pop_front() {
                    let _ = reply.send(result);
                }
                continue;
            }
        }
        match conn.poll_next_inbound(cx) {
            Poll::Ready(Some(Ok(stream))) => {
                if !accepts {
                    // Dropping it resets it: this side never takes streams here.
                    tracing::debug!("the peer opened a stream on the {channel:?} channel; reset");
                } else if in_tx.try_send(MuxStream::new(stream, None)).is_err() {
                    tracing::debug!("inbound stream backlog full; dropping a stream");
                }
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(ProtoError::from(e))),
            Poll::Ready(None) => return Poll::Ready(Ok(())),
            Poll::Pending => return Poll::Pending,
        }
    });
    let handle = MuxHandle {
        open_tx,
        permits: Arc::new(Semaphore::new(channel.open_limit())),
        limit: channel.open_limit(),
    };
    (handle, in_rx, driver)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use std::time::Duration;

    type Ends = (
        MuxHandle,
        mpsc::Receiver<MuxStream>,
        tokio::task::JoinHandle<Result<(), ProtoError>>,
    );

    fn pair(channel: Channel) -> (Ends, Ends) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (ha, ina, da) = session(a, channel, Side::Host);
        let (hb, inb, db) = session(b, channel, Side::Guest);
        ((ha, ina, tokio::spawn(da)), (hb, inb, tokio::spawn(db)))
    }

    #[tokio::test]
    async fn each_channel_carries_streams_from_its_opener() {
        let ((host, _, _), (_, mut guest_in, _)) = pair(Channel::Control);
        let mut s = host.open().await.unwrap();
        s.write_all(b"from host").await.unwrap();
        let mut r = guest_in.recv().await.unwrap();
        let mut buf = [0u8; 9];
        r.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"from host");

        let ((_, mut host_in, _), (guest, _, _)) = pair(Channel::Egress);
        let mut s2 = guest.open().await.unwrap();
        s2.write_all(b"from guest").await.unwrap();
        s2.shutdown().await.unwrap();
        let mut r2 = host_in.recv().await.unwrap();
        let mut all = Vec::new();
        r2.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"from guest");
    }

    /// A stream opened the wrong way is reset; the session goes on.
    #[tokio::test]
    async fn a_stream_opened_by_the_wrong_side_is_reset() {
        let ((host, _, host_driver), (guest, mut guest_in, _)) = pair(Channel::Control);
        let mut wrong = guest.open().await.unwrap();
        let _ = wrong.write_all(b"let me in").await;
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), wrong.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the stream was not reset: {read:?}"
        );
        let mut s = host.open().await.unwrap();
        s.write_all(b"x").await.unwrap();
        assert!(guest_in.recv().await.is_some());
        assert!(!host_driver.is_finished());
    }

    /// Takes every inbound stream, acknowledges it with a byte (as the
    /// supervisor's `EgressAccepted` does) and holds it; returns how many
    /// were taken so far.
    fn hold_and_ack(
        mut inbound: mpsc::Receiver<MuxStream>,
    ) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
        let taken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = taken.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(mut s) = inbound.recv().await {
                let _ = s.write_all(b"k").await;
                let _ = s.flush().await;
                held.push(s);
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        taken
    }

    /// The guest opening streams without end (thousands of connections) gets
    /// `TooManyStreams` for those past its limit, one by one; the session, and
    /// the streams already open, live on.
    #[tokio::test]
    async fn past_the_limit_one_open_fails_not_the_session() {
        let ((_, host_in, host_driver), (guest, _, guest_driver)) = pair(Channel::Egress);
        let _taken = hold_and_ack(host_in);
        let limit = Channel::Egress.open_limit();
        let mut open = Vec::new();
        for _ in 0..limit {
            let mut s = tokio::time::timeout(Duration::from_secs(10), guest.open())
                .await
                .expect("an open within the limit waited")
                .unwrap();
            // The SYN leaves with the first frame (the guest's EgressOpen);
            // then read the host's acknowledgement, as the guest's relay does.
            s.write_all(b"h").await.unwrap();
            let mut ack = [0u8; 1];
            s.read_exact(&mut ack).await.unwrap();
            open.push(s);
        }
        for _ in 0..10 {
            let e = guest.open().await.err().expect("an open past the limit");
            assert!(matches!(e, ProtoError::TooManyStreams(1024)), "{e}");
        }
        // One closes: room for a new one.
        drop(open.remove(0));
        let mut again = None;
        for _ in 0..100 {
            if let Ok(s) = guest.open().await {
                again = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(again.is_some(), "no room after a stream closed");
        let mut last = open.pop().unwrap();
        last.write_all(b"still here").await.unwrap();
        assert!(!host_driver.is_finished() && !guest_driver.is_finished());
    }

    /// A guest that ignores its limit (its own yamux, past the host's) ends
    /// the egress session, never more: the host's driver returns, no panic.
    #[tokio::test]
    async fn a_guest_past_the_hosts_limit_ends_only_that_session() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (_, host_in, host_driver) = session(a, Channel::Egress, Side::Host);
        let host_driver = tokio::spawn(host_driver);
        let taken = hold_and_ack(host_in);
        // A guest end that allows itself more than the host accepts.
        let mut config = yamux::Config::default();
        let many = Channel::Egress.yamux_limit() + 8;
        config.set_max_num_streams(0);
        config.set_max_connection_receive_window(Some(many * STREAM_WINDOW));
        config.set_max_num_streams(many);
        let mut rogue = yamux::Connection::new(b.compat(), config, Mode::Client);
        let mut streams = Vec::new();
        let outcome = tokio::time::timeout(
            Duration::from_secs(60),
            std::future::poll_fn(|cx| loop {
                if streams.len() < many {
                    match rogue.poll_new_outbound(cx) {
                        Poll::Ready(Ok(mut s)) => {
                            // A stream's SYN leaves with its first frame.
                            let _ = futures::AsyncWrite::poll_write(
                                std::pin::Pin::new(&mut s),
                                cx,
                                b"x",
                            );
                            streams.push(s);
                            continue;
                        }
                        Poll::Ready(Err(_)) => return Poll::Ready(()),
                        Poll::Pending => {}
                    }
                }
                match rogue.poll_next_inbound(cx) {
                    Poll::Ready(Some(Ok(_))) => continue,
                    Poll::Ready(_) => return Poll::Ready(()),
                    Poll::Pending => return Poll::Pending,
                }
            }),
        )
        .await;
        assert!(outcome.is_ok(), "the rogue session did not end");
        // yamux answers with GoAway and reports the end as a close.
        let _ended = tokio::time::timeout(Duration::from_secs(5), host_driver)
            .await
            .expect("the host session did not end")
            .expect("the host driver panicked");
        let taken = taken.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            taken >= Channel::Egress.open_limit(),
            "the host took only {taken} streams"
        );
    }
}

#[cfg(test)]
mod hostile_tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What a hostile guest kernel can write at the raw egress port: random
    /// bytes, a frame header claiming 4 GiB, data for a stream never opened,
    /// a SYN in the host's id space. Each costs the guest its egress session
    /// or the stream it named, never a panic of the host, and a control
    /// session in the same process goes on.
    #[tokio::test]
    async fn garbage_on_the_egress_port_ends_only_that_session() {
        // yamux header: version, type, flags, stream id, length.
        let header = |kind: u8, flags: u16, id: u32, len: u32| {
            let mut h = vec![0u8, kind];
            h.extend_from_slice(&flags.to_be_bytes());
            h.extend_from_slice(&id.to_be_bytes());
            h.extend_from_slice(&len.to_be_bytes());
            h
        };
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut random = |n: usize| {
            (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect::<Vec<u8>>()
        };
        let inputs: Vec<Vec<u8>> = vec![
            random(4096),
            header(0, 0x1, 1, u32::MAX), // SYN with a 4 GiB body
            [header(0, 0, 7, 16), vec![0; 16]].concat(), // a stream never opened
            header(1, 0x1, 2, 0),        // SYN with an id of the host's
            header(0, 0x1, 1, 300 * 1024), // a first body past the window
            [header(1, 0x1, 1, 0), header(1, 0x1, 1, 0)].concat(), // one id twice
        ];
        let (control_host, control_guest) = tokio::io::duplex(64 * 1024);
        let (host, _, host_driver) = session(control_host, Channel::Control, Side::Host);
        tokio::spawn(host_driver);
        let (_, mut guest_in, guest_driver) = session(control_guest, Channel::Control, Side::Guest);
        tokio::spawn(guest_driver);
        for (i, input) in inputs.into_iter().enumerate() {
            let (egress_host, mut raw) = tokio::io::duplex(64 * 1024);
            let (_, _in, driver) = session(egress_host, Channel::Egress, Side::Host);
            let driver = tokio::spawn(driver);
            let _ = raw.write_all(&input).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            // Whether the garbage ended the session or only the stream it
            // named, the session holds nothing once the port closes.
            drop(raw);
            let joined = tokio::time::timeout(Duration::from_secs(10), driver)
                .await
                .unwrap_or_else(|_| panic!("input {i}: the session outlives its port"));
            assert!(joined.is_ok(), "input {i}: the host's driver panicked");
            // The control session is untouched.
            let mut s = host.open().await.unwrap();
            s.write_all(b"ping").await.unwrap();
            let mut r = guest_in.recv().await.unwrap();
            let mut buf = [0u8; 4];
            r.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping", "input {i}");
        }
    }
}

#[cfg(test)]
mod fd_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The guest runs its session over a raw descriptor ([`crate::fdio::FdStream`]).
    #[tokio::test]
    async fn session_over_fd_stream() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let a = tokio::net::UnixStream::from_std(a).unwrap();
        let (host, _host_inbound, host_driver) = session(a, Channel::Control, Side::Host);
        tokio::spawn(host_driver);
        let b = std::fs::File::from(std::os::fd::OwnedFd::from(b));
        let (_guest, mut guest_inbound, guest_driver) = session(
            crate::fdio::FdStream::new(b).unwrap(),
            Channel::Control,
            Side::Guest,
        );
        tokio::spawn(guest_driver);
        let mut s = host.open().await.unwrap();
        s.write_all(b"ping").await.unwrap();
        s.flush().await.unwrap();
        let mut r = tokio::time::timeout(std::time::Duration::from_secs(5), guest_inbound.recv())
            .await
            .expect("the guest got no stream")
            .unwrap();
        let mut buf = [0u8; 4];
        r.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }
}
