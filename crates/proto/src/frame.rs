//! Length-delimited postcard frames over one stream.

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::ProtoError;

/// Largest frame either side accepts. Data chunks are far smaller
/// ([`crate::IO_CHUNK`]); this bounds what a hostile peer can make us buffer.
pub const MAX_FRAME: usize = 1024 * 1024;

/// Reads exactly one frame of at most `max` bytes from `io`, consuming
/// nothing after it, so the stream can carry raw bytes from there on.
pub async fn read_one<T, R>(io: &mut R, max: usize) -> Result<T, ProtoError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let len = io.read_u32().await? as usize;
    let max = max.min(MAX_FRAME);
    if len > max {
        return Err(ProtoError::Violation(format!(
            "a frame of {len} bytes exceeds the limit of {max}"
        )));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(postcard::from_bytes(&buf)?)
}

/// Writes one frame to `io` the way [`FrameStream::send`] frames it (a
/// big-endian `u32` length, then the postcard bytes), and flushes it.
pub async fn write_one<T, W>(io: &mut W, msg: &T) -> Result<(), ProtoError>
where
    T: Serialize,
    W: AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let bytes = postcard::to_stdvec(msg)?;
    let len = u32::try_from(bytes.len())
        .map_err(|_| ProtoError::Violation("a frame over 4 GiB".into()))?;
    let mut out = Vec::with_capacity(4 + bytes.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&bytes);
    io.write_all(&out).await?;
    io.flush().await?;
    Ok(())
}

/// A typed frame channel over a byte stream.
pub struct FrameStream<S> {
    inner: Framed<S, LengthDelimitedCodec>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> FrameStream<S> {
    pub fn new(io: S) -> Self {
        let codec = LengthDelimitedCodec::builder()
            .max_frame_length(MAX_FRAME)
            .new_codec();
        FrameStream {
            inner: Framed::new(io, codec),
        }
    }

    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), ProtoError> {
        let bytes = postcard::to_stdvec(msg)?;
        self.inner.send(Bytes::from(bytes)).await?;
        Ok(())
    }

    /// Next frame, or `None` at a clean end of stream.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ProtoError> {
        match self.inner.next().await {
            None => Ok(None),
            Some(frame) => Ok(Some(postcard::from_bytes(&frame?)?)),
        }
    }

    /// Next frame; end of stream is an error naming what was expected.
    pub async fn expect<T: DeserializeOwned>(
        &mut self,
        what: &'static str,
    ) -> Result<T, ProtoError> {
        self.recv().await?.ok_or(ProtoError::UnexpectedEof(what))
    }

    /// Flush and shut down the write side.
    pub async fn close(&mut self) -> Result<(), ProtoError> {
        SinkExt::<Bytes>::close(&mut self.inner).await?;
        Ok(())
    }

    pub fn into_inner(self) -> S {
        self.inner.into_inner()
    }

    /// The stream and any bytes already read past the last frame, for a caller
    /// that switches from frames to raw bytes.
    pub fn into_parts(self) -> (S, bytes::BytesMut) {
        let parts = self.inner.into_parts();
        (parts.io, parts.read_buf)
    }

    /// Split into independent read and write halves.
    pub fn split(self) -> (FrameReader<S>, FrameWriter<S>) {
        let (w, r) = self.inner.split();
        (FrameReader { inner: r }, FrameWriter { inner: w })
    }
}

pub struct FrameReader<S> {
    inner: futures::stream::SplitStream<Framed<S, LengthDelimitedCodec>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> FrameReader<S> {
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ProtoError> {
        match self.inner.next().await {
            None => Ok(None),
            Some(frame) => Ok(Some(postcard::from_bytes(&frame?)?)),
        }
    }
}

pub struct FrameWriter<S> {
    inner: futures::stream::SplitSink<Framed<S, LengthDelimitedCodec>, Bytes>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> FrameWriter<S> {
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), ProtoError> {
        let bytes = postcard::to_stdvec(msg)?;
        self.inner.send(Bytes::from(bytes)).await?;
        Ok(())
    }

    pub async fn close(&mut self) -> Result<(), ProtoError> {
        self.inner.close().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ExecEvent, ExecInput, ExitStatus, Request};

    #[tokio::test]
    async fn round_trip_and_split() {
        let (a, b) = tokio::io::duplex(4096);
        let mut a = FrameStream::new(a);
        let mut b = FrameStream::new(b);
        a.send(&Request::Ping).await.unwrap();
        assert_eq!(b.recv::<Request>().await.unwrap(), Some(Request::Ping));
        let (mut br, mut bw) = b.split();
        bw.send(&ExecEvent::Exit(ExitStatus::Code(7)))
            .await
            .unwrap();
        a.send(&ExecInput::Stdin(b"hi".to_vec())).await.unwrap();
        assert_eq!(
            a.recv::<ExecEvent>().await.unwrap(),
            Some(ExecEvent::Exit(ExitStatus::Code(7)))
        );
        assert_eq!(
            br.recv::<ExecInput>().await.unwrap(),
            Some(ExecInput::Stdin(b"hi".to_vec()))
        );
        drop(a);
        assert_eq!(br.recv::<ExecInput>().await.unwrap(), None);
    }

    #[tokio::test]
    async fn oversized_frame_is_rejected_without_buffering_it() {
        use tokio::io::AsyncWriteExt;
        let (mut raw, b) = tokio::io::duplex(64);
        let mut b = FrameStream::new(b);
        let writer = tokio::spawn(async move {
            // Claim a 64 MiB frame; the reader must refuse at the header.
            let _ = raw.write_all(&(64u32 * 1024 * 1024).to_be_bytes()).await;
            let _ = raw.write_all(&[0u8; 32]).await;
            raw
        });
        assert!(b.recv::<Request>().await.is_err());
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn read_one_leaves_the_rest_of_the_stream() {
        use tokio::io::AsyncReadExt;
        let (a, mut b) = tokio::io::duplex(4096);
        let mut a = FrameStream::new(a);
        a.send(&Request::Ping).await.unwrap();
        let mut raw = a.into_inner();
        tokio::io::AsyncWriteExt::write_all(&mut raw, b"raw bytes")
            .await
            .unwrap();
        assert_eq!(
            read_one::<Request, _>(&mut b, 64).await.unwrap(),
            Request::Ping
        );
        let mut rest = [0u8; 9];
        b.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"raw bytes");
    }

    #[tokio::test]
    async fn garbage_is_a_decode_error_not_a_panic() {
        let (a, b) = tokio::io::duplex(4096);
        let mut a = FrameStream::new(a);
        let mut b = FrameStream::new(b);
        a.inner
            .send(Bytes::from_static(&[0xff, 0xff, 0xff, 0x7f]))
            .await
            .unwrap();
        assert!(matches!(
            b.recv::<Request>().await,
            Err(ProtoError::Decode(_))
        ));
    }
}
