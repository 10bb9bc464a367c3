//! `sandpen cp` and published ports, the guest's half: plumbing only.
//!
//! Copies are tar streams in [`CopyEvent`] / [`CopyChunk`] frames; the guest
//! reads and writes its own file system as root, so a path in a share goes
//! through the host's file server, which enforces the file rules (a
//! deny-read file does not exist here, a read-only one cannot be written):
//! no rule is checked on this side (docs/dev-env.md).
//!
//! A forwarded connection is one the host accepted on a port its own
//! configuration publishes; this side only connects to the guest's loopback.

use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sandpen_proto::frame::FrameStream;
use sandpen_proto::{CopyChunk, CopyEvent, ForwardReply, IO_CHUNK};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// How long a connect to the guest's loopback may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Carries one host-accepted connection to `127.0.0.1:port` (or `[::1]`).
pub async fn forward<S>(mut frames: FrameStream<S>, port: u16) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let connect = |addr: std::net::SocketAddr| async move {
        tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")))
    };
    let v4 = connect((std::net::Ipv4Addr::LOCALHOST, port).into()).await;
    let conn = match v4 {
        Ok(c) => Ok(c),
        Err(e4) => connect((std::net::Ipv6Addr::LOCALHOST, port).into())
            .await
            .map_err(|_| e4),
    };
    let mut conn = match conn {
        Ok(c) => c,
        Err(e) => {
            frames
                .send(&ForwardReply::Failed {
                    message: format!("nothing answers on port {port} in the sandbox: {e}"),
                })
                .await?;
            frames.close().await?;
            return Ok(());
        }
    };
    frames.send(&ForwardReply::Connected).await?;
    let (mut host, early) = frames.into_parts();
    if !early.is_empty() {
        tokio::io::AsyncWriteExt::write_all(&mut conn, &early).await?;
    }
    let _ = tokio::io::copy_bidirectional(&mut host, &mut conn).await;
    Ok(())
}

/// A `Write` that hands chunks to the async side.
struct ChunkWriter {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        while self.buf.len() >= IO_CHUNK {
            let rest = self.buf.split_off(IO_CHUNK);
            let chunk = std::mem::replace(&mut self.buf, rest);
            self.tx
                .blocking_send(chunk)
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the host went away"))?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = std::mem::take(&mut self.buf);
            self.tx
                .blocking_send(chunk)
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the host went away"))?;
        }
        Ok(())
    }
}

/// The archive of `path`: one top-level entry named after its last
/// component. The path itself is followed if it is a symlink; symlinks
/// below a folder are archived as symlinks.
fn archive(path: &Path, out: ChunkWriter) -> Result<()> {
    let real = path
        .canonicalize()
        .with_context(|| format!("{}", path.display()))?;
    let meta = std::fs::metadata(&real).with_context(|| format!("{}", path.display()))?;
    let name = top_name(path)?;
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    if meta.is_dir() {
        builder
            .append_dir_all(&name, &real)
            .with_context(|| format!("archiving {}", path.display()))?;
    } else if meta.is_file() {
        let mut file =
            std::fs::File::open(&real).with_context(|| format!("opening {}", path.display()))?;
        builder
            .append_file(&name, &mut file)
            .with_context(|| format!("archiving {}", path.display()))?;
    } else {
        bail!("{} is not a file or a folder", path.display());
    }
    let mut out = builder.into_inner().context("finishing the archive")?;
    out.flush()?;
    Ok(())
}

/// The last normal component of an absolute path (`/` has none).
fn top_name(path: &Path) -> Result<PathBuf> {
    match path.components().next_back() {
        Some(Component::Normal(n)) => Ok(PathBuf::from(n)),
        _ => bail!("{}: name a file or a folder, not /", path.display()),
    }
}

/// Sends `path` as a tar stream.
pub async fn copy_out<S>(mut frames: FrameStream<S>, path: String) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
    let path = PathBuf::from(path);
    let work = tokio::task::spawn_blocking(move || {
        archive(
            &path,
            ChunkWriter {
                tx,
                buf: Vec::with_capacity(IO_CHUNK),
            },
        )
    });
    while let Some(chunk) = rx.recv().await {
        frames.send(&CopyEvent::Data(chunk)).await?;
    }
    let outcome = work
        .await
        .map_err(|e| anyhow::anyhow!("the archiver panicked: {e}"))
        .and_then(|r| r);
    let last = match outcome {
        Ok(()) => CopyEvent::Done,
        Err(e) => CopyEvent::Failed(format!("{e:#}")),
    };
    frames.send(&last).await?;
    frames.close().await?;
    Ok(())
}

/// A `Read` fed by the async side.
struct ChunkReader {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.blocking_recv() {
                Some(chunk) => {
                    self.buf = chunk;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Where an archive entry goes: `dest/PATH` when `dest` is a folder, else
/// `dest` with the top-level component renamed. Only plain components.
fn target(dest: &Path, into: bool, entry: &Path) -> Result<PathBuf> {
    let mut comps = Vec::new();
    for c in entry.components() {
        match c {
            Component::Normal(n) => comps.push(n.to_owned()),
            Component::CurDir => {}
            _ => bail!("the archive holds an unsafe path {}", entry.display()),
        }
    }
    let Some(first) = comps.first_mut() else {
        bail!("the archive holds an empty path");
    };
    if into {
        return Ok(comps.iter().fold(dest.to_path_buf(), |p, c| p.join(c)));
    }
    *first = top_name(dest)?.into_os_string();
    let parent = dest.parent().unwrap_or(Path::new("/"));
    Ok(comps.iter().fold(parent.to_path_buf(), |p, c| p.join(c)))
}

fn unpack(dest: &Path, owner: (u32, u32), input: ChunkReader) -> Result<()> {
    let into = dest.is_dir();
    if !into {
        let parent = dest.parent().unwrap_or(Path::new("/"));
        if !parent.is_dir() {
            bail!("{}: no such folder in the sandbox", parent.display());
        }
    }
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    for entry in archive.entries().context("reading the archive")? {
        let mut entry = entry.context("reading the archive")?;
        let to = target(dest, into, &entry.path().context("an entry's path")?)?;
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Directory | tar::EntryType::Symlink => {}
            other => bail!("the archive holds an entry of type {other:?}; only files, folders and symlinks are copied"),
        }
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        entry
            .unpack(&to)
            .with_context(|| format!("writing {}", to.display()))?;
        let (uid, gid) = owner;
        std::os::unix::fs::lchown(&to, Some(uid), Some(gid))
            .with_context(|| format!("chown {}", to.display()))?;
    }
    Ok(())
}

/// Receives a tar stream and unpacks it at `path`.
pub async fn copy_in<S>(frames: FrameStream<S>, path: String, owner: (u32, u32)) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut input, mut output) = frames.split();
    let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
    let dest = PathBuf::from(&path);
    let work = tokio::task::spawn_blocking(move || {
        let reader = ChunkReader {
            rx,
            buf: Vec::new(),
            pos: 0,
        };
        unpack(&dest, owner, reader)
    });
    let mut failed: Option<String> = None;
    let mut tx = Some(tx);
    loop {
        let chunk = input.recv::<CopyChunk>().await;
        match chunk {
            Ok(Some(CopyChunk::Data(bytes))) => {
                if let Some(t) = &tx {
                    if t.send(bytes).await.is_err() {
                        // The unpacker stopped early (an error): read on to
                        // the end, so that the host gets the reason rather
                        // than a reset stream.
                        tx = None;
                    }
                }
            }
            Ok(Some(CopyChunk::End)) => break,
            Ok(None) => {
                failed = Some("the host ended the copy early".into());
                break;
            }
            Err(e) => {
                failed = Some(format!("{e}"));
                break;
            }
        }
    }
    drop(tx);
    let outcome = work
        .await
        .map_err(|e| anyhow::anyhow!("the unpacker panicked: {e}"))
        .and_then(|r| r);
    let last = match (failed, outcome) {
        (_, Err(e)) => CopyEvent::Failed(format!("{e:#}")),
        (Some(why), Ok(())) => CopyEvent::Failed(why),
        (None, Ok(())) => CopyEvent::Done,
    };
    output.send(&last).await?;
    output.close().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_go_into_a_folder_or_replace_the_named_path() {
        let t = |dest: &str, into, entry: &str| {
            target(Path::new(dest), into, Path::new(entry)).map(|p| p.display().to_string())
        };
        assert_eq!(t("/w/d", true, "src/a.txt").unwrap(), "/w/d/src/a.txt");
        assert_eq!(t("/w/new", false, "src/a.txt").unwrap(), "/w/new/a.txt");
        assert_eq!(t("/w/new", false, "src").unwrap(), "/w/new");
        assert!(t("/w/d", true, "../etc/passwd").is_err());
        assert!(t("/w/d", true, "/etc/passwd").is_err());
        assert!(t("/w/d", true, "a/../../x").is_err());
    }
}
