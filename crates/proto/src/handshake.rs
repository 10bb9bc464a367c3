//! The line handshake that precedes the multiplexer.
//!
//! virtio-serial drops what the guest writes while the host end is not connected,
//! and what the host writes while the guest has the port closed. So the guest,
//! which opens the port first, repeats `SANDPEN-GUEST <v>` until the host answers
//! `SANDPEN-HOST <v> OK` (or `MISMATCH`). The guest then writes `SANDPEN-START`
//! and the yamux session begins on both sides. Extra hello lines that were in
//! flight are skipped by the host. Lines are bounded; garbage is ignored.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{ProtoError, PROTOCOL_VERSION};

const GUEST_HELLO: &str = "SANDPEN-GUEST";
const HOST_REPLY: &str = "SANDPEN-HOST";
const START: &str = "SANDPEN-START";
const MAX_LINE: usize = 128;

/// Reads one line byte by byte (so nothing after it is consumed). Over-long
/// lines are returned truncated; the caller ignores what it does not recognise.
async fn read_line<R: AsyncRead + Unpin>(io: &mut R) -> Result<String, ProtoError> {
    let mut line = Vec::with_capacity(32);
    loop {
        let b = match io.read_u8().await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ProtoError::UnexpectedEof("the handshake"))
            }
            Err(e) => return Err(e.into()),
        };
        if b == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if line.len() < MAX_LINE {
            line.push(b);
        }
    }
}

fn parse_version(line: &str, prefix: &str) -> Option<(u32, String)> {
    let rest = line.strip_prefix(prefix)?.strip_prefix(' ')?;
    let mut words = rest.split(' ');
    let v = words.next()?.parse().ok()?;
    Some((v, words.collect::<Vec<_>>().join(" ")))
}

/// Host side. Returns once the guest has said `SANDPEN-START`; the stream is then
/// positioned at the first yamux byte.
pub async fn host<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) -> Result<(), ProtoError> {
    let guest_version = loop {
        let line = read_line(io).await?;
        if let Some((v, _)) = parse_version(&line, GUEST_HELLO) {
            break v;
        }
    };
    if guest_version != PROTOCOL_VERSION {
        io.write_all(format!("{HOST_REPLY} {PROTOCOL_VERSION} MISMATCH\n").as_bytes())
            .await?;
        io.flush().await?;
        return Err(ProtoError::VersionMismatch {
            guest: guest_version,
            host: PROTOCOL_VERSION,
        });
    }
    io.write_all(format!("{HOST_REPLY} {PROTOCOL_VERSION} OK\n").as_bytes())
        .await?;
    io.flush().await?;
    loop {
        let line = read_line(io).await?;
        if line == START {
            return Ok(());
        }
    }
}

/// Guest side. `retry` is how long to wait for an answer before saying hello again.
pub async fn guest<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    retry: Duration,
) -> Result<(), ProtoError> {
    let hello = format!("{GUEST_HELLO} {PROTOCOL_VERSION}\n");
    let reply = loop {
        io.write_all(hello.as_bytes()).await?;
        io.flush().await?;
        if let Ok(line) = tokio::time::timeout(retry, read_line(io)).await {
            let line = line?;
            if let Some(parsed) = parse_version(&line, HOST_REPLY) {
                break parsed;
            }
        }
    };
    match reply {
        (v, status) if v == PROTOCOL_VERSION && status == "OK" => {
            io.write_all(format!("{START}\n").as_bytes()).await?;
            io.flush().await?;
            Ok(())
        }
        (v, _) => Err(ProtoError::VersionMismatch {
            guest: PROTOCOL_VERSION,
            host: v,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn handshake_succeeds_and_leaves_stream_positioned() {
        let (mut h, mut g) = tokio::io::duplex(1024);
        let guest = tokio::spawn(async move {
            guest(&mut g, Duration::from_millis(20)).await.unwrap();
            g.write_all(b"payload").await.unwrap();
            g
        });
        // Noise from an earlier boot must be ignored.
        host(&mut h).await.unwrap();
        let mut buf = [0u8; 7];
        h.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"payload");
        drop(guest.await.unwrap());
    }

    #[tokio::test]
    async fn host_skips_garbage_and_repeated_hellos() {
        let (mut h, mut g) = tokio::io::duplex(4096);
        g.write_all(b"\x00\x01garbage that is much longer than anything we expect to see on a line, repeated repeated repeated repeated repeated\n")
            .await
            .unwrap();
        g.write_all(format!("{GUEST_HELLO} {PROTOCOL_VERSION}\n").as_bytes())
            .await
            .unwrap();
        g.write_all(format!("{GUEST_HELLO} {PROTOCOL_VERSION}\n{START}\nX").as_bytes())
            .await
            .unwrap();
        host(&mut h).await.unwrap();
        assert_eq!(h.read_u8().await.unwrap(), b'X');
    }

    #[tokio::test]
    async fn version_mismatch_is_reported_on_both_sides() {
        let (mut h, mut g) = tokio::io::duplex(1024);
        g.write_all(format!("{GUEST_HELLO} 999\n").as_bytes())
            .await
            .unwrap();
        let err = host(&mut h).await.unwrap_err();
        assert!(
            matches!(
                err,
                ProtoError::VersionMismatch {
                    guest: 999,
                    host: PROTOCOL_VERSION
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("version 999"));
        let line = read_line(&mut g).await.unwrap();
        assert!(line.ends_with("MISMATCH"));
    }
}
