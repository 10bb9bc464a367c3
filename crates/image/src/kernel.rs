//! The kernel: find it in the rootfs, read the bzImage setup header, and unpack a
//! zstd payload into the ELF `vmlinux` that QEMU boots through its PVH note.
//!
//! Setup header fields used (Documentation/arch/x86/boot.rst):
//! `setup_sects` (u8 at 0x1f1), the `HdrS` magic (0x202), the protocol version
//! (u16 at 0x206), `payload_offset` (u32 at 0x248) and `payload_length` (u32 at 0x24c).
//! The payload starts at `(setup_sects + 1) * 512 + payload_offset`.

use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{ImageError, IoContext};

const SETUP_SECTS_AT: usize = 0x1f1;
const HDRS_AT: usize = 0x202;
const VERSION_AT: usize = 0x206;
const PAYLOAD_OFFSET_AT: usize = 0x248;
const PAYLOAD_LENGTH_AT: usize = 0x24c;
/// Boot protocol 2.08 added the payload fields.
const MIN_PAYLOAD_VERSION: u16 = 0x0208;

/// The parts of a bzImage setup header that locate the compressed kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BzImageHeader {
    pub setup_sects: u8,
    pub version: u16,
    pub payload_offset: u32,
    pub payload_length: u32,
}

impl BzImageHeader {
    /// Parses the setup header; `Err` says why this is not a usable bzImage.
    pub(crate) fn parse(image: &[u8]) -> Result<Self, String> {
        if image.len() < PAYLOAD_LENGTH_AT + 4 {
            return Err(format!(
                "file is only {} bytes, too short for a bzImage",
                image.len()
            ));
        }
        if &image[HDRS_AT..HDRS_AT + 4] != b"HdrS" {
            return Err("no HdrS magic at 0x202: not a bzImage".into());
        }
        let version = u16::from_le_bytes([image[VERSION_AT], image[VERSION_AT + 1]]);
        if version < MIN_PAYLOAD_VERSION {
            return Err(format!(
                "boot protocol {}.{:02} has no payload fields (needs 2.08)",
                version >> 8,
                version & 0xff
            ));
        }
        Ok(BzImageHeader {
            setup_sects: image[SETUP_SECTS_AT],
            version,
            payload_offset: read_u32(image, PAYLOAD_OFFSET_AT),
            payload_length: read_u32(image, PAYLOAD_LENGTH_AT),
        })
    }

    /// The payload's byte range in the file. A `setup_sects` of 0 means 4.
    pub(crate) fn payload_range(&self, file_len: usize) -> Result<std::ops::Range<usize>, String> {
        let sects = if self.setup_sects == 0 {
            4
        } else {
            usize::from(self.setup_sects)
        };
        let start = (sects + 1) * 512 + self.payload_offset as usize;
        let end = start
            .checked_add(self.payload_length as usize)
            .ok_or("payload range overflows")?;
        if end > file_len || start >= end {
            return Err(format!(
                "payload {start}..{end} lies outside the {file_len}-byte file"
            ));
        }
        Ok(start..end)
    }
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// The compression of a bzImage payload, told by its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PayloadFormat {
    Zstd,
    Gzip,
    Xz,
    Lz4,
    Lzma,
    Bzip2,
    Lzo,
    Unknown,
}

impl PayloadFormat {
    pub(crate) fn detect(payload: &[u8]) -> Self {
        match payload {
            [0x28, 0xb5, 0x2f, 0xfd, ..] => PayloadFormat::Zstd,
            [0x1f, 0x8b, ..] => PayloadFormat::Gzip,
            [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => PayloadFormat::Xz,
            [0x02, 0x21, 0x4c, 0x18, ..] => PayloadFormat::Lz4,
            [0x5d, 0x00, 0x00, ..] => PayloadFormat::Lzma,
            [b'B', b'Z', b'h', ..] => PayloadFormat::Bzip2,
            [0x89, b'L', b'Z', b'O', ..] => PayloadFormat::Lzo,
            _ => PayloadFormat::Unknown,
        }
    }
}

/// What the kernel step produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unpacked {
    /// `vmlinux` was written and is an x86-64 ELF of this many bytes.
    Elf { bytes: u64 },
    /// No ELF; boot the bzImage. The reason is kept in the manifest.
    UseBzImage { reason: String },
}

/// Unpacks `bzimage`'s payload into `vmlinux` when it is zstd. Anything that makes
/// the ELF unobtainable (another compression, a corrupt payload) is not an error:
/// the caller boots the bzImage instead. Only failing to read or write files is.
pub(crate) fn unpack_vmlinux(bzimage: &Path, vmlinux: &Path) -> Result<Unpacked, ImageError> {
    let image = fs::read(bzimage).ctx(|| format!("reading kernel {}", bzimage.display()))?;
    let payload = match BzImageHeader::parse(&image).and_then(|h| h.payload_range(image.len())) {
        Ok(range) => &image[range],
        Err(reason) => return Ok(Unpacked::UseBzImage { reason }),
    };
    let format = PayloadFormat::detect(payload);
    if format != PayloadFormat::Zstd {
        return Ok(Unpacked::UseBzImage {
            reason: format!("payload is {format:?}, only zstd is unpacked"),
        });
    }
    let result = decompress_zstd(payload, vmlinux);
    let outcome = match result {
        Ok(bytes) => {
            match check_payload_size(payload, bytes).and_then(|()| check_elf_file(vmlinux)) {
                Ok(()) => Unpacked::Elf { bytes },
                Err(reason) => Unpacked::UseBzImage { reason },
            }
        }
        Err(DecompressError::Decode(e)) => Unpacked::UseBzImage {
            reason: format!("zstd payload did not decompress: {e}"),
        },
        Err(DecompressError::Write(e)) => {
            let _ = fs::remove_file(vmlinux);
            return Err(ImageError::io(format!("writing {}", vmlinux.display()), e));
        }
    };
    if matches!(outcome, Unpacked::UseBzImage { .. }) {
        let _ = fs::remove_file(vmlinux);
    }
    Ok(outcome)
}

enum DecompressError {
    Decode(io::Error),
    Write(io::Error),
}

/// Decompresses one zstd frame into `out`. The kernel's frame needs a window
/// larger than the default limit, hence `window_log_max(31)`.
fn decompress_zstd(payload: &[u8], out: &Path) -> Result<u64, DecompressError> {
    let mut decoder = zstd::stream::read::Decoder::with_buffer(payload)
        .map_err(DecompressError::Decode)?
        .single_frame();
    decoder
        .window_log_max(31)
        .map_err(DecompressError::Decode)?;
    let file = fs::File::create(out).map_err(DecompressError::Write)?;
    let mut writer = BufWriter::new(file);
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DecompressError::Decode(e)),
        };
        writer
            .write_all(&buf[..n])
            .map_err(DecompressError::Write)?;
        total += n as u64;
    }
    writer
        .into_inner()
        .map_err(|e| DecompressError::Write(e.into_error()))?
        .sync_all()
        .map_err(DecompressError::Write)?;
    Ok(total)
}

/// The kernel build appends the uncompressed size (u32 LE) to the payload; when it is
/// there it must match what we got.
fn check_payload_size(payload: &[u8], got: u64) -> Result<(), String> {
    let Some(tail) = payload.len().checked_sub(4).map(|at| &payload[at..]) else {
        return Ok(());
    };
    let recorded = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    if recorded != got {
        return Err(format!(
            "payload decompressed to {got} bytes but its trailer says {recorded}"
        ));
    }
    Ok(())
}

/// Checks that `path` starts like a 64-bit little-endian x86-64 ELF.
pub(crate) fn check_elf_file(path: &Path) -> Result<(), String> {
    let mut head = [0u8; 20];
    let mut file = fs::File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    file.read_exact(&mut head)
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    check_elf_header(&head)
}

/// ELF magic, ELFCLASS64, little-endian, e_machine = EM_X86_64 (62).
pub(crate) fn check_elf_header(head: &[u8]) -> Result<(), String> {
    if head.len() < 20 || &head[..4] != b"\x7fELF" {
        return Err("result has no ELF magic".into());
    }
    if head[4] != 2 || head[5] != 1 {
        return Err("result is not a 64-bit little-endian ELF".into());
    }
    let machine = u16::from_le_bytes([head[18], head[19]]);
    if machine != 62 {
        return Err(format!(
            "result is an ELF for machine {machine}, not x86-64"
        ));
    }
    Ok(())
}

/// Finds `boot/vmlinuz-RELEASE` in a rootfs whose `lib/modules/RELEASE/modules.dep`
/// also exists. With several, the highest release (by version order) wins.
pub(crate) fn find_kernel(root: &Path) -> Result<(String, PathBuf), ImageError> {
    let boot = root.join("boot");
    let entries = fs::read_dir(&boot).ctx(|| {
        format!(
            "listing {} (was linux-image-cloud-amd64 installed?)",
            boot.display()
        )
    })?;
    let mut releases = Vec::new();
    for entry in entries {
        let entry = entry.ctx(|| format!("listing {}", boot.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(release) = name.strip_prefix("vmlinuz-") {
            if modules_dir(root, release).join("modules.dep").is_file() {
                releases.push(release.to_string());
            }
        }
    }
    releases.sort_by(|a, b| compare_versions(a, b));
    match releases.pop() {
        Some(release) => {
            let path = boot.join(format!("vmlinuz-{release}"));
            Ok((release, path))
        }
        None => Err(ImageError::Kernel {
            path: boot,
            reason: "no vmlinuz-RELEASE with a matching lib/modules/RELEASE/modules.dep; \
                     the rootfs needs the package linux-image-cloud-amd64"
                .into(),
        }),
    }
}

/// `lib/modules/RELEASE` inside a rootfs.
pub(crate) fn modules_dir(root: &Path, release: &str) -> PathBuf {
    root.join("lib/modules").join(release)
}

/// Orders version strings by their runs of digits numerically and the rest bytewise.
fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for ((da, xa), (db, xb)) in ca.iter().zip(cb.iter()) {
        let ord = if *da && *db {
            let (ta, tb) = (xa.trim_start_matches('0'), xb.trim_start_matches('0'));
            ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb))
        } else {
            xa.cmp(xb)
        };
        if ord.is_ne() {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal x86-64 ELF header followed by filler.
    fn fake_elf(len: usize) -> Vec<u8> {
        let mut elf = vec![0u8; len];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // ELFCLASS64
        elf[5] = 1; // little-endian
        elf[6] = 1;
        elf[18] = 62; // EM_X86_64
        for (i, b) in elf.iter_mut().enumerate().skip(64) {
            *b = (i % 251) as u8;
        }
        elf
    }

    /// Builds a bzImage-shaped file around `payload`.
    fn fake_bzimage(setup_sects: u8, payload_offset: u32, payload: &[u8]) -> Vec<u8> {
        let sects = if setup_sects == 0 {
            4
        } else {
            usize::from(setup_sects)
        };
        let start = (sects + 1) * 512 + payload_offset as usize;
        let mut image = vec![0u8; start];
        image[SETUP_SECTS_AT] = setup_sects;
        image[HDRS_AT..HDRS_AT + 4].copy_from_slice(b"HdrS");
        image[VERSION_AT..VERSION_AT + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        image[PAYLOAD_OFFSET_AT..PAYLOAD_OFFSET_AT + 4]
            .copy_from_slice(&payload_offset.to_le_bytes());
        image[PAYLOAD_LENGTH_AT..PAYLOAD_LENGTH_AT + 4]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image.extend_from_slice(payload);
        image.extend_from_slice(&[0xaa; 100]); // trailing setup data / padding
        image
    }

    /// The payload the kernel build makes: a zstd frame plus the size, u32 LE.
    fn zstd_payload(content: &[u8]) -> Vec<u8> {
        let mut payload = zstd::stream::encode_all(content, 19).unwrap();
        payload.extend_from_slice(&(content.len() as u32).to_le_bytes());
        payload
    }

    #[test]
    fn parses_header_fields_and_payload_range() {
        let payload = zstd_payload(&fake_elf(4096));
        let image = fake_bzimage(3, 100, &payload);
        let header = BzImageHeader::parse(&image).unwrap();
        assert_eq!(header.setup_sects, 3);
        assert_eq!(header.version, 0x020f);
        assert_eq!(header.payload_offset, 100);
        assert_eq!(header.payload_length as usize, payload.len());
        let range = header.payload_range(image.len()).unwrap();
        assert_eq!(range.start, 4 * 512 + 100);
        assert_eq!(&image[range], &payload[..]);
    }

    #[test]
    fn zero_setup_sects_means_four() {
        let image = fake_bzimage(0, 0, b"\x28\xb5\x2f\xfdxxxx");
        let header = BzImageHeader::parse(&image).unwrap();
        assert_eq!(header.payload_range(image.len()).unwrap().start, 5 * 512);
    }

    #[test]
    fn rejects_non_bzimage_and_out_of_range_payloads() {
        assert!(BzImageHeader::parse(&[0u8; 100]).is_err());
        assert!(BzImageHeader::parse(&vec![0u8; 4096])
            .unwrap_err()
            .contains("HdrS"));
        let mut image = fake_bzimage(1, 0, b"abcd");
        image[PAYLOAD_LENGTH_AT..PAYLOAD_LENGTH_AT + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let header = BzImageHeader::parse(&image).unwrap();
        assert!(header.payload_range(image.len()).is_err());
        image[VERSION_AT..VERSION_AT + 2].copy_from_slice(&0x0206u16.to_le_bytes());
        assert!(BzImageHeader::parse(&image).unwrap_err().contains("2.08"));
    }

    #[test]
    fn detects_payload_formats() {
        assert_eq!(
            PayloadFormat::detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            PayloadFormat::Zstd
        );
        assert_eq!(PayloadFormat::detect(&[0x1f, 0x8b, 8]), PayloadFormat::Gzip);
        assert_eq!(
            PayloadFormat::detect(b"\xfd7zXZ\x00rest"),
            PayloadFormat::Xz
        );
        assert_eq!(
            PayloadFormat::detect(&[0x02, 0x21, 0x4c, 0x18]),
            PayloadFormat::Lz4
        );
        assert_eq!(PayloadFormat::detect(b"BZh9"), PayloadFormat::Bzip2);
        assert_eq!(PayloadFormat::detect(b"??"), PayloadFormat::Unknown);
    }

    #[test]
    fn unpacks_synthetic_zstd_bzimage() {
        let dir = tempfile::tempdir().unwrap();
        let elf = fake_elf(300_000);
        let bz = dir.path().join("vmlinuz");
        fs::write(&bz, fake_bzimage(2, 64, &zstd_payload(&elf))).unwrap();
        let out = dir.path().join("vmlinux");
        let result = unpack_vmlinux(&bz, &out).unwrap();
        assert_eq!(
            result,
            Unpacked::Elf {
                bytes: elf.len() as u64
            }
        );
        assert_eq!(fs::read(&out).unwrap(), elf);
    }

    #[test]
    fn other_compressions_fall_back_to_bzimage() {
        let dir = tempfile::tempdir().unwrap();
        let bz = dir.path().join("vmlinuz");
        fs::write(
            &bz,
            fake_bzimage(2, 0, &[0x02, 0x21, 0x4c, 0x18, 1, 2, 3, 4]),
        )
        .unwrap();
        let out = dir.path().join("vmlinux");
        match unpack_vmlinux(&bz, &out).unwrap() {
            Unpacked::UseBzImage { reason } => assert!(reason.contains("Lz4"), "{reason}"),
            other => panic!("expected fallback, got {other:?}"),
        }
        assert!(!out.exists());
    }

    #[test]
    fn non_elf_or_corrupt_payload_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("vmlinux");

        let bz = dir.path().join("not-elf");
        fs::write(&bz, fake_bzimage(2, 0, &zstd_payload(&[7u8; 5000]))).unwrap();
        match unpack_vmlinux(&bz, &out).unwrap() {
            Unpacked::UseBzImage { reason } => assert!(reason.contains("ELF"), "{reason}"),
            other => panic!("expected fallback, got {other:?}"),
        }
        assert!(!out.exists());

        let mut broken = zstd_payload(&fake_elf(50_000));
        let cut = broken.len() / 2;
        broken.truncate(cut);
        let bz = dir.path().join("corrupt");
        fs::write(&bz, fake_bzimage(2, 0, &broken)).unwrap();
        assert!(matches!(
            unpack_vmlinux(&bz, &out).unwrap(),
            Unpacked::UseBzImage { .. }
        ));
        assert!(!out.exists());
    }

    #[test]
    fn elf_header_checks() {
        assert!(check_elf_header(&fake_elf(64)).is_ok());
        assert!(check_elf_header(b"MZ not an elf at all").is_err());
        let mut elf32 = fake_elf(64);
        elf32[4] = 1;
        assert!(check_elf_header(&elf32).is_err());
        let mut arm = fake_elf(64);
        arm[18] = 183;
        assert!(check_elf_header(&arm).unwrap_err().contains("183"));
    }

    #[test]
    fn version_order_is_numeric() {
        use std::cmp::Ordering::*;
        assert_eq!(compare_versions("6.12.9-cloud", "6.12.10-cloud"), Less);
        assert_eq!(compare_versions("6.12.117+deb13", "6.1.0-30"), Greater);
        assert_eq!(compare_versions("6.1", "6.1"), Equal);
    }

    #[test]
    fn finds_kernel_with_modules() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("boot")).unwrap();
        for release in ["6.1.0-1-cloud-amd64", "6.12.9-cloud-amd64", "6.99-orphan"] {
            fs::write(root.join(format!("boot/vmlinuz-{release}")), b"x").unwrap();
        }
        for release in ["6.1.0-1-cloud-amd64", "6.12.9-cloud-amd64"] {
            fs::create_dir_all(modules_dir(root, release)).unwrap();
            fs::write(modules_dir(root, release).join("modules.dep"), b"").unwrap();
        }
        let (release, path) = find_kernel(root).unwrap();
        assert_eq!(release, "6.12.9-cloud-amd64");
        assert_eq!(path, root.join("boot/vmlinuz-6.12.9-cloud-amd64"));

        let empty = tempfile::tempdir().unwrap();
        fs::create_dir_all(empty.path().join("boot")).unwrap();
        let err = find_kernel(empty.path()).unwrap_err().to_string();
        assert!(err.contains("linux-image-cloud-amd64"), "{err}");
    }

    /// Against the real trixie kernel when this machine has it; CI machines do not.
    #[test]
    fn unpacks_real_trixie_kernel_if_present() {
        let root = Path::new("/var/tmp/explore/root");
        let Ok((release, vmlinuz)) = find_kernel(root) else {
            eprintln!(
                "note: no kernel under {}; skipping the real-kernel test",
                root.display()
            );
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("vmlinux");
        let result = unpack_vmlinux(&vmlinuz, &out).unwrap();
        match result {
            Unpacked::Elf { bytes } => {
                assert!(
                    bytes > 10 << 20,
                    "vmlinux of {release} is only {bytes} bytes"
                );
                check_elf_file(&out).unwrap();
            }
            Unpacked::UseBzImage { reason } => {
                panic!("the trixie kernel {release} should unpack to ELF: {reason}")
            }
        }
    }
}
