//! The host side of the line handshake (`crates/proto/src/handshake.rs`) on
//! whatever the guest writes: no panic; it ends (the input ends) with a
//! result or an error.
#![no_main]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Reads the guest's bytes; keeps what the host writes.
struct Io<'a> {
    input: &'a [u8],
    written: Vec<u8>,
}

impl AsyncRead for Io<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.input.len().min(buf.remaining());
        let (head, rest) = self.input.split_at(n);
        buf.put_slice(head);
        self.input = rest;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Io<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|data: &[u8]| {
    let mut io = Io {
        input: data,
        written: Vec::new(),
    };
    let _ = futures::executor::block_on(sandpen_proto::handshake::host(&mut io));
});
