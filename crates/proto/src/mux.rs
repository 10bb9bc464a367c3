//! A yamux session driven by one task, with a cloneable handle to open streams.
//!
//! yamux's `Connection` makes progress only while polled, so one driver future
//! owns it: it opens outbound streams on request, and hands inbound streams to a
//! bounded queue (a guest that opens streams faster than they are taken gets them
//! refused, not buffered without bound).

use std::collections::VecDeque;
use std::future::Future;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use crate::ProtoError;

/// A multiplexed stream, usable with tokio's I/O traits.
pub type MuxStream = Compat<yamux::Stream>;

pub use yamux::Mode;

/// Most streams open at once on one session (each may buffer 256 KiB).
pub const MAX_STREAMS: usize = 256;

/// Most inbound streams waiting to be taken before new ones are dropped.
pub const INBOUND_BACKLOG: usize = 256;

type OpenReply = oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>;

/// Opens new streams on the session. Cheap to clone.
#[derive(Clone)]
pub struct MuxHandle {
    open_tx: mpsc::Sender<OpenReply>,
}

impl MuxHandle {
    pub async fn open(&self) -> Result<MuxStream, ProtoError> {
        let (tx, rx) = oneshot::channel();
        self.open_tx
            .send(tx)
            .await
            .map_err(|_| ProtoError::Violation("the guest channel is closed".into()))?;
        let stream = rx
            .await
            .map_err(|_| ProtoError::Violation("the guest channel is closed".into()))??;
        Ok(stream.compat())
    }
}

/// Starts a session over `io`. Returns the handle for outbound streams, the queue
/// of inbound ones, and the driver future, which must be spawned; it ends when the
/// connection does.
pub fn session<S>(
    io: S,
    mode: Mode,
) -> (
    MuxHandle,
    mpsc::Receiver<MuxStream>,
    impl Future<Output = Result<(), ProtoError>>,
)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Bound what the peer can make this side buffer: yamux's default lets the
    // streams of one connection hold up to 1 GiB unread.
    let mut config = yamux::Config::default();
    config.set_max_num_streams(MAX_STREAMS);
    config.set_max_connection_receive_window(Some(MAX_STREAMS * 256 * 1024));
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
                if in_tx.try_send(stream.compat()).is_err() {
                    tracing::debug!("inbound stream backlog full; dropping a stream");
                }
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(ProtoError::from(e))),
            Poll::Ready(None) => return Poll::Ready(Ok(())),
            Poll::Pending => return Poll::Pending,
        }
    });
    (MuxHandle { open_tx }, in_rx, driver)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn streams_both_ways() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (ha, mut ina, da) = session(a, Mode::Server);
        let (hb, mut inb, db) = session(b, Mode::Client);
        tokio::spawn(da);
        tokio::spawn(db);

        let mut s = ha.open().await.unwrap();
        s.write_all(b"from a").await.unwrap();
        let mut r = inb.recv().await.unwrap();
        let mut buf = [0u8; 6];
        r.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"from a");

        let mut s2 = hb.open().await.unwrap();
        s2.write_all(b"from b").await.unwrap();
        s2.shutdown().await.unwrap();
        let mut r2 = ina.recv().await.unwrap();
        let mut all = Vec::new();
        r2.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"from b");
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
        let (host, _host_inbound, host_driver) = session(a, Mode::Server);
        tokio::spawn(host_driver);
        let b = std::fs::File::from(std::os::fd::OwnedFd::from(b));
        let (_guest, mut guest_inbound, guest_driver) =
            session(crate::fdio::FdStream::new(b).unwrap(), Mode::Client);
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
