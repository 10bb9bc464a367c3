//! A writer for the "newc" cpio format, the one the Linux kernel unpacks as an
//! initramfs. Each entry is a 110-byte ASCII header, the NUL-terminated name and
//! the data, the last two padded to 4 bytes; a `TRAILER!!!` entry ends the archive.

use std::io::{self, Read, Write};

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;

/// Writes newc entries to `out`. Inode numbers are assigned in order and mtimes
/// are 0, so the same inputs always give the same bytes.
pub(crate) struct NewcWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

impl<W: Write> NewcWriter<W> {
    pub(crate) fn new(out: W) -> Self {
        NewcWriter {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    /// Adds a directory with the given permission bits.
    pub(crate) fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        let header = Header::new(S_IFDIR | (perm & 0o7777), 2);
        self.entry(name, header, None::<io::Empty>)
    }

    /// Adds a character device node.
    pub(crate) fn char_device(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> io::Result<()> {
        let mut header = Header::new(S_IFCHR | (perm & 0o7777), 1);
        header.rdev_major = major;
        header.rdev_minor = minor;
        self.entry(name, header, None::<io::Empty>)
    }

    /// Adds a regular file of exactly `size` bytes read from `data`.
    pub(crate) fn file(
        &mut self,
        name: &str,
        perm: u32,
        size: u64,
        data: impl Read,
    ) -> io::Result<()> {
        let size32 = u32::try_from(size).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name} is {size} bytes; newc cpio holds at most 4 GiB per file"),
            )
        })?;
        let mut header = Header::new(S_IFREG | (perm & 0o7777), 1);
        header.file_size = size32;
        self.entry(name, header, Some(data))
    }

    /// Writes the trailer and returns the inner writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        let mut header = Header::new(0, 1);
        header.ino = 0;
        self.write_header_and_name("TRAILER!!!", &header)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(&mut self, name: &str, mut header: Header, data: Option<impl Read>) -> io::Result<()> {
        check_name(name)?;
        header.ino = self.next_ino;
        self.next_ino += 1;
        self.write_header_and_name(name, &header)?;
        if let Some(data) = data {
            let expected = u64::from(header.file_size);
            let copied = io::copy(&mut data.take(expected), &mut self.out)?;
            if copied != expected {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{name}: expected {expected} bytes, got {copied} (did the file change?)"
                    ),
                ));
            }
            self.written += copied;
            self.pad()?;
        }
        Ok(())
    }

    fn write_header_and_name(&mut self, name: &str, header: &Header) -> io::Result<()> {
        let name_size = name.len() as u32 + 1;
        let text = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            header.ino,
            header.mode,
            0, // uid: root
            0, // gid: root
            header.nlink,
            0, // mtime
            header.file_size,
            0, // dev major
            0, // dev minor
            header.rdev_major,
            header.rdev_minor,
            name_size,
            0, // check (unused by newc)
        );
        debug_assert_eq!(text.len(), 110);
        self.out.write_all(text.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.written += 110 + u64::from(name_size);
        self.pad()
    }

    /// Pads the stream to a multiple of 4 bytes.
    fn pad(&mut self) -> io::Result<()> {
        let rem = (self.written % 4) as usize;
        if rem != 0 {
            let fill = 4 - rem;
            self.out.write_all(&[0u8; 3][..fill])?;
            self.written += fill as u64;
        }
        Ok(())
    }
}

/// The header fields that vary between entries.
struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    file_size: u32,
    rdev_major: u32,
    rdev_minor: u32,
}

impl Header {
    fn new(mode: u32, nlink: u32) -> Self {
        Header {
            ino: 0,
            mode,
            nlink,
            file_size: 0,
            rdev_major: 0,
            rdev_minor: 0,
        }
    }
}

/// Names are relative ("dev/console"), non-empty, without NUL or `..`.
fn check_name(name: &str) -> io::Result<()> {
    let bad = name.is_empty()
        || name.starts_with('/')
        || name.contains('\0')
        || name.split('/').any(|part| part.is_empty() || part == "..")
        || name == "TRAILER!!!";
    if bad {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad cpio entry name {name:?}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn sample() -> Vec<u8> {
        let mut w = NewcWriter::new(Vec::new());
        w.dir("dev", 0o755).unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        w.file("init", 0o755, 5, &b"hello"[..]).unwrap();
        w.file("empty", 0o644, 0, &b""[..]).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn layout_is_aligned_and_starts_with_magic() {
        let bytes = sample();
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("TRAILER!!!"));
    }

    #[test]
    fn same_input_gives_same_bytes() {
        assert_eq!(sample(), sample());
    }

    #[test]
    fn short_data_is_an_error() {
        let mut w = NewcWriter::new(Vec::new());
        let err = w.file("init", 0o755, 10, &b"abc"[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn bad_names_are_refused() {
        let mut w = NewcWriter::new(Vec::new());
        for name in ["", "/abs", "a/../b", "a//b", "TRAILER!!!"] {
            assert!(w.dir(name, 0o755).is_err(), "{name:?} accepted");
        }
    }

    /// Round-trips through GNU cpio when it is installed.
    #[test]
    fn gnu_cpio_lists_and_extracts_what_we_wrote() {
        if Command::new("cpio").arg("--version").output().is_err() {
            eprintln!("note: cpio not installed; skipping the round trip");
            return;
        }
        let bytes = sample();
        let listing = run_cpio(&["-itv", "--quiet"], &bytes);
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 4, "{listing}");
        assert!(
            lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" dev"),
            "{listing}"
        );
        assert!(lines[1].starts_with("crw-------"), "{listing}");
        assert!(
            lines[1].contains("5,") && lines[1].ends_with(" dev/console"),
            "{listing}"
        );
        assert!(
            lines[2].starts_with("-rwxr-xr-x") && lines[2].ends_with(" init"),
            "{listing}"
        );
        assert!(
            lines[3].starts_with("-rw-r--r--") && lines[3].ends_with(" empty"),
            "{listing}"
        );

        // Extract the file and compare contents.
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new("cpio")
            .args(["-i", "--quiet", "--no-absolute-filenames", "init"])
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(std::fs::read(dir.path().join("init")).unwrap(), b"hello");
    }

    pub(crate) fn run_cpio(args: &[&str], input: &[u8]) -> String {
        let mut child = Command::new("cpio")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "cpio {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
