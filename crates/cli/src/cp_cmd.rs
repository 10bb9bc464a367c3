//! `sandpen cp`: files and folders between a sandbox and the host, with
//! Docker's syntax (`NAME:PATH host` or `host NAME:PATH`).
//!
//! A stopped sandbox is started for the copy and stopped again after it
//! (its devcontainer start commands do not run), since only the guest can
//! read its own disk.
//!
//! The guest's PID 1 reads or writes the guest side (a tar stream over the
//! channel). What the file rules say is decided on the host, twice
//! (docs/dev-env.md, "Ports, cp and templates"):
//!
//! - here, before anything moves: a guest path inside a share (the
//!   workspace or a `--mount`, at the same path on both sides) is checked
//!   against that share's rules, by its name and by where it leads on the
//!   host: a deny-read path is not copied out or written, a read-only one
//!   not written. This is what gives the user a line naming the rule.
//! - by the file server, on every read and write the guest makes in a
//!   share: a deny-read file does not exist for the guest, so no guest, even
//!   one that ignores the request, has its content to send; a read-only one
//!   cannot be written.
//!
//! What comes from the guest is hostile: it is unpacked with every path
//! component opened without following symlinks (`O_NOFOLLOW`) beneath the
//! destination, only files, folders and symlinks, no set-id bits, so an
//! archive cannot write outside the destination. And it is bounded: a copy
//! out never takes more than the sandbox could hold (its disk plus its
//! memory), nor the host file system's reserve (1 GiB or 5 %, as the file
//! server keeps), so a guest that sends without end cannot fill the host.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use sandpen_policy::files::EntryKind;
use sandpen_policy::FileRules;
use sandpen_proto::{CopyChunk, CopyEvent, IO_CHUNK};
use sandpen_supervisor::control::{self, ControlRequest, State};
use sandpen_supervisor::sandbox::{self, SandboxConfig};
use sandpen_supervisor::Dirs;
use tokio::sync::mpsc;

/// Why a copy did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CpError {
    #[error("name one side as NAME:PATH (a sandbox) and the other as a host path")]
    NoSandboxSide,
    #[error("copying between two sandboxes is not supported; copy through the host")]
    TwoSandboxes,
    #[error("sandbox {0} is starting or stopping; try again when `sandpen ls` shows it running or stopped")]
    Busy(String),
    #[error("starting {name} for the copy: {source}")]
    Start {
        name: String,
        #[source]
        source: Box<sandpen_api::ApiError>,
    },
    #[error(
        "the sandbox sent more than it can hold ({} MiB: its disk and its memory); the copy was stopped",
        cap >> 20
    )]
    TooLarge { cap: u64 },
    #[error(
        "{}: the host file system is down to its reserve; the copy was stopped to keep it free",
        path.display()
    )]
    HostDiskFull { path: PathBuf },
    #[error("{path}: the guest path leaves / with `..`")]
    AboveRoot { path: String },
    #[error("cannot copy {path} out of the sandbox: it is hidden by {rule}")]
    Hidden { path: PathBuf, rule: String },
    #[error("cannot copy into {path}: it is hidden by {rule}")]
    HiddenTarget { path: PathBuf, rule: String },
    #[error("cannot copy into {path}: it is read-only ({by})")]
    ReadOnly { path: PathBuf, by: String },
    #[error("{}: {source}", path.display())]
    Host {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a file or a folder", path.display())]
    NotCopyable { path: PathBuf },
    #[error("{}: the folder to copy into does not exist", path.display())]
    NoDestination { path: PathBuf },
    #[error("the sandbox: {0}")]
    Guest(String),
    #[error("the sandbox sent an unsafe archive: {0}")]
    BadArchive(String),
    #[error(transparent)]
    Supervisor(#[from] sandpen_supervisor::SupervisorError),
    #[error(transparent)]
    Proto(#[from] sandpen_proto::ProtoError),
}

fn host_err(path: &Path) -> impl FnOnce(std::io::Error) -> CpError + '_ {
    move |source| CpError::Host {
        path: path.to_path_buf(),
        source,
    }
}

/// One side of `sandpen cp`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Side {
    Host(PathBuf),
    Guest { name: String, path: String },
}

/// `NAME:PATH` is a sandbox path; a path that starts with `/` or `.`, or
/// has no `:` or no valid sandbox name before it, is a host path (as in
/// Docker, `./a:b` names a host file with a colon).
fn side(arg: &str) -> Side {
    if arg.starts_with('/') || arg.starts_with('.') {
        return Side::Host(arg.into());
    }
    match arg.split_once(':') {
        Some((name, path)) if sandbox::validate_name(name).is_ok() => Side::Guest {
            name: name.to_string(),
            path: path.to_string(),
        },
        _ => Side::Host(arg.into()),
    }
}

/// A guest path made absolute (from the workspace) and normalised: `.` and
/// `..` resolved by name, as the path the host checks is the one the guest
/// is asked for.
fn guest_path(workspace: &Path, path: &str) -> Result<PathBuf, CpError> {
    let joined = if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        workspace.join(path)
    };
    let mut out = PathBuf::from("/");
    for c in joined.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                if !out.pop() {
                    return Err(CpError::AboveRoot { path: path.into() });
                }
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Ok(out)
}

/// The shares of a sandbox with their rules: the workspace, then each mount.
struct Shares(Vec<(PathBuf, FileRules)>);

impl Shares {
    fn load(dirs: &Dirs, config: &SandboxConfig) -> anyhow::Result<Shares> {
        let policy =
            sandpen_supervisor::egress::load_policy(dirs, &dirs.sandbox(&config.name), config)?;
        let rules = policy.file_rules()?;
        let mut list = vec![(config.workspace.clone(), rules.clone())];
        for m in &config.mounts {
            list.push((
                m.path.clone(),
                rules.clone().with_all_read_only(m.read_only),
            ));
        }
        Ok(Shares(list))
    }

    /// The share holding `path`, and the path relative to it (the deepest
    /// share wins: a mount inside the workspace is its own share).
    fn find(&self, path: &Path) -> Option<(&FileRules, PathBuf)> {
        self.0
            .iter()
            .filter_map(|(root, rules)| {
                path.strip_prefix(root)
                    .ok()
                    .map(|rel| (root.as_os_str().len(), rules, rel.to_path_buf()))
            })
            .max_by_key(|(len, _, _)| *len)
            .map(|(_, rules, rel)| (rules, rel))
    }

    /// Is a share at or below `path` (which is then a folder in the guest)?
    fn below(&self, path: &Path) -> bool {
        self.0.iter().any(|(root, _)| root.starts_with(path))
    }

    /// The deny-read rule that hides `path` from the guest, by its name or
    /// by where it leads on the host (a symlink inside a share; the share
    /// is at the same path on both sides).
    fn hidden(&self, path: &Path) -> Option<String> {
        let by_name = self
            .find(path)
            .and_then(|(rules, rel)| rules.hidden(&rel).map(|r| r.to_string()));
        by_name.or_else(|| {
            // Only a share is the same on both sides.
            self.find(path)?;
            let real = path.canonicalize().ok()?;
            let (rules, rel) = self.find(&real)?;
            rules
                .hidden(&rel)
                .map(|r| format!("{r}, through {}", real.display()))
        })
    }

    /// Why an entry of `kind` cannot be made at `path`, if a rule says so:
    /// by its name, and by where its folder leads on the host.
    fn refuses(&self, path: &Path, kind: EntryKind) -> Option<CpError> {
        let check = |p: &Path| -> Option<CpError> {
            let (rules, rel) = self.find(p)?;
            if rel.as_os_str().is_empty() {
                return None;
            }
            if let Some(r) = rules.hidden(&rel) {
                return Some(CpError::HiddenTarget {
                    path: path.to_path_buf(),
                    rule: r.to_string(),
                });
            }
            rules
                .creatable_entry(&rel, kind)
                .err()
                .map(|by| CpError::ReadOnly {
                    path: path.to_path_buf(),
                    by: by.to_string(),
                })
        };
        check(path).or_else(|| {
            self.find(path)?;
            let real = path.parent()?.canonicalize().ok()?.join(path.file_name()?);
            (real != path).then(|| check(&real)).flatten()
        })
    }
}

pub async fn run(dirs: &Dirs, src: &str, dest: &str) -> anyhow::Result<i32> {
    let (name, guest, host, out) = match (side(src), side(dest)) {
        (Side::Guest { name, path }, Side::Host(host)) => (name, path, host, true),
        (Side::Host(host), Side::Guest { name, path }) => (name, path, host, false),
        (Side::Guest { .. }, Side::Guest { .. }) => return Err(CpError::TwoSandboxes.into()),
        (Side::Host(_), Side::Host(_)) => return Err(CpError::NoSandboxSide.into()),
    };
    let config = sandbox::load(dirs, &name)?;
    let paths = dirs.sandbox(&name);
    let guest = guest_path(&config.workspace, &guest)?;
    let shares = Shares::load(dirs, &config)?;
    let started_for_copy = match control::state(&paths).await {
        State::Running(_) => false,
        State::Stopped | State::Failed(_) => {
            eprintln!(
                "sandpen: {name} is stopped; starting it for the copy (it stops again after)"
            );
            let started = sandpen_api::sandboxes::start(dirs, &name)
                .await
                .map_err(|source| CpError::Start {
                    name: name.clone(),
                    source: Box::new(source),
                })?;
            for note in started.notes {
                eprintln!("sandpen: note: {note}");
            }
            true
        }
        State::Starting | State::Stopping | State::Unresponsive => {
            return Err(CpError::Busy(name).into())
        }
    };
    let cap = budget_cap(&config);
    let stdio = host == Path::new("-");
    let copied = match (out, stdio) {
        (true, false) => copy_out(&paths, &shares, &guest, Some(&host), cap).await,
        (true, true) => copy_out(&paths, &shares, &guest, None, cap).await,
        (false, false) => copy_in(&paths, &shares, &host, &guest).await,
        (false, true) => copy_in_stdin(&paths, shares, &guest).await,
    };
    if started_for_copy {
        let stopped = sandpen_api::sandboxes::stop(dirs, &name, STOP_AFTER_COPY).await;
        if let Err(e) = stopped {
            // The copy's own outcome matters more; say this one and go on.
            eprintln!("sandpen: stopping {name} after the copy: {e}");
        }
    }
    copied?;
    Ok(0)
}

/// How long a sandbox started for a copy gets to shut down (as `sandpen stop`).
const STOP_AFTER_COPY: std::time::Duration = std::time::Duration::from_secs(30);

/// The most a copy out may bring: what the sandbox could hold, its disk and
/// its memory (a guest claiming more is sending without end).
fn budget_cap(config: &SandboxConfig) -> u64 {
    (u64::from(config.disk_gib) << 30) + (u64::from(config.memory_mib) << 20)
}

/// What a copy out may still take from the host.
struct Budget {
    cap: u64,
    left: u64,
    /// The destination's file system and its reserve (`None`: stdout).
    reserve: Option<sandpen_fs::reserve::DiskReserve>,
}

impl Budget {
    fn new(cap: u64, dest: Option<&Path>) -> Result<Budget, CpError> {
        let reserve = dest
            .map(|dir| {
                sandpen_fs::reserve::DiskReserve::open(dir, sandpen_policy::Reserve::Default)
                    .map_err(host_err(dir))
            })
            .transpose()?;
        Ok(Budget {
            cap,
            left: cap,
            reserve,
        })
    }

    /// Takes `bytes` for what is written at `shown`.
    fn take(&mut self, bytes: u64, shown: &Path) -> Result<(), CpError> {
        self.left = self
            .left
            .checked_sub(bytes)
            .ok_or(CpError::TooLarge { cap: self.cap })?;
        if let Some(reserve) = &self.reserve {
            reserve.admit(bytes).map_err(|_| CpError::HostDiskFull {
                path: shown.to_path_buf(),
            })?;
        }
        Ok(())
    }
}

/// Copies `guest` out: unpacked at `host`, or as a tar stream on stdout
/// (`-`, as `docker cp`).
async fn copy_out(
    paths: &sandpen_supervisor::SandboxPaths,
    shares: &Shares,
    guest: &Path,
    host: Option<&Path>,
    cap: u64,
) -> Result<(), CpError> {
    if let Some(rule) = shares.hidden(guest) {
        return Err(CpError::Hidden {
            path: guest.to_path_buf(),
            rule,
        });
    }
    let Some(host) = host else {
        return copy_out_stdout(paths, guest, cap).await;
    };
    let target = Target::for_host(host, guest)?;
    let budget = Budget::new(cap, Some(&target.base_path))?;
    let mut frames = control::copy(
        paths,
        ControlRequest::CopyOut {
            path: guest.to_string_lossy().into_owned(),
        },
    )
    .await?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
    let unpacker = tokio::task::spawn_blocking(move || {
        unpack(
            target,
            Chunks {
                rx,
                buf: Vec::new(),
                pos: 0,
            },
            budget,
        )
    });
    let mut result = Ok(());
    loop {
        match frames.recv::<CopyEvent>().await? {
            Some(CopyEvent::Data(bytes)) => {
                // A send fails when the unpacker stopped: at the archive's
                // end, or at an error it reports below. Nothing more is read
                // (a guest could send without end).
                if tx.send(bytes).await.is_err() {
                    break;
                }
            }
            Some(CopyEvent::Done) => break,
            Some(CopyEvent::Failed(why)) => {
                result = Err(CpError::Guest(why));
                break;
            }
            None => {
                result = Err(CpError::Guest("the sandbox ended the copy early".into()));
                break;
            }
        }
    }
    drop(tx);
    let unpacked = unpacker
        .await
        .map_err(|e| CpError::BadArchive(format!("the unpacker panicked: {e}")))?;
    result?;
    unpacked
}

/// The guest's tar stream, as it comes, on stdout (`sandpen cp NAME:PATH -`).
async fn copy_out_stdout(
    paths: &sandpen_supervisor::SandboxPaths,
    guest: &Path,
    cap: u64,
) -> Result<(), CpError> {
    use tokio::io::AsyncWriteExt;
    let mut frames = control::copy(
        paths,
        ControlRequest::CopyOut {
            path: guest.to_string_lossy().into_owned(),
        },
    )
    .await?;
    let mut stdout = tokio::io::stdout();
    let mut budget = Budget::new(cap, None)?;
    let stdout_err = |e| CpError::Host {
        path: "stdout".into(),
        source: e,
    };
    loop {
        match frames.recv::<CopyEvent>().await? {
            Some(CopyEvent::Data(bytes)) => {
                budget.take(bytes.len() as u64, Path::new("stdout"))?;
                stdout.write_all(&bytes).await.map_err(stdout_err)?
            }
            Some(CopyEvent::Done) => return stdout.flush().await.map_err(stdout_err),
            Some(CopyEvent::Failed(why)) => return Err(CpError::Guest(why)),
            None => return Err(CpError::Guest("the sandbox ended the copy early".into())),
        }
    }
}

/// Where a copy out goes on the host, as `docker cp` decides it.
struct Target {
    /// An open folder the archive's entries go beneath.
    base: OwnedFd,
    base_path: PathBuf,
    /// The top-level entry's new name (`None`: keep the archive's).
    rename: Option<std::ffi::OsString>,
}

impl Target {
    /// Into `host` when it is a folder, else as `host` (its folder must exist).
    fn for_host(host: &Path, guest: &Path) -> Result<Target, CpError> {
        if guest.file_name().is_none() {
            return Err(CpError::NotCopyable {
                path: guest.to_path_buf(),
            });
        }
        let (base_path, rename) = if host.is_dir() {
            (host.to_path_buf(), None)
        } else {
            let name = host.file_name().ok_or_else(|| CpError::NotCopyable {
                path: host.to_path_buf(),
            })?;
            let parent = match host.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if !parent.is_dir() {
                return Err(CpError::NoDestination { path: parent });
            }
            (parent, Some(name.to_os_string()))
        };
        let fd = nix::fcntl::open(
            &base_path,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| CpError::Host {
            path: base_path.clone(),
            source: e.into(),
        })?;
        // SAFETY: `open` returned a new descriptor that nothing else owns.
        let base = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Target {
            base,
            base_path,
            rename,
        })
    }
}

/// A `Read` over chunks from the async side.
struct Chunks {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for Chunks {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
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

fn nix_err(path: &Path) -> impl FnOnce(nix::errno::Errno) -> CpError + '_ {
    move |e| CpError::Host {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// Opens (making it if missing) the folder `name` in `dir`, never through a
/// symlink.
fn open_dir_in(dir: &OwnedFd, name: &std::ffi::OsStr, shown: &Path) -> Result<OwnedFd, CpError> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = match nix::fcntl::openat(Some(dir.as_raw_fd()), name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => {
            nix::sys::stat::mkdirat(Some(dir.as_raw_fd()), name, Mode::from_bits_truncate(0o755))
                .map_err(nix_err(shown))?;
            nix::fcntl::openat(Some(dir.as_raw_fd()), name, flags, Mode::empty())
                .map_err(nix_err(shown))?
        }
        Err(nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR) => {
            return Err(CpError::BadArchive(format!(
                "{} is not a folder (a symlink or a file), and the archive puts entries beneath it",
                shown.display()
            )))
        }
        Err(e) => return Err(nix_err(shown)(e)),
    };
    // SAFETY: `openat` returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Removes a non-folder `name` in `dir` if there is one (to be replaced).
fn remove_file_in(dir: &OwnedFd, name: &std::ffi::OsStr, shown: &Path) -> Result<(), CpError> {
    match nix::unistd::unlinkat(
        Some(dir.as_raw_fd()),
        name,
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    ) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(nix::errno::Errno::EISDIR) => Err(CpError::BadArchive(format!(
            "{} is a folder on the host and a file in the archive",
            shown.display()
        ))),
        Err(e) => Err(nix_err(shown)(e)),
    }
}

/// Unpacks a hostile archive beneath `target`, within `budget`.
fn unpack(target: Target, input: Chunks, mut budget: Budget) -> Result<(), CpError> {
    let mut archive = tar::Archive::new(input);
    let entries = archive
        .entries()
        .map_err(|e| CpError::BadArchive(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| CpError::BadArchive(e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| CpError::BadArchive(e.to_string()))?
            .into_owned();
        let mut comps: Vec<std::ffi::OsString> = Vec::new();
        for c in path.components() {
            match c {
                Component::Normal(n) => comps.push(n.to_os_string()),
                Component::CurDir => {}
                _ => {
                    return Err(CpError::BadArchive(format!(
                        "the path {} leaves the destination",
                        path.display()
                    )))
                }
            }
        }
        if let (Some(first), Some(name)) = (comps.first_mut(), &target.rename) {
            *first = name.clone();
        }
        let Some((last, parents)) = comps.split_last() else {
            continue;
        };
        let mut shown = target.base_path.clone();
        let mut dir: Option<OwnedFd> = None;
        for c in parents {
            shown.push(c);
            let parent = dir.as_ref().unwrap_or(&target.base);
            dir = Some(open_dir_in(parent, c, &shown)?);
        }
        shown.push(last);
        budget.take(sandpen_fs::reserve::ENTRY_BYTES, &shown)?;
        let dir = dir.as_ref().unwrap_or(&target.base);
        let header = entry.header();
        // No set-id or sticky bits from the guest.
        let mode = header.mode().unwrap_or(0o644) & 0o777;
        match header.entry_type() {
            tar::EntryType::Directory => {
                let fd = open_dir_in(dir, last, &shown)?;
                nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode | 0o700))
                    .map_err(nix_err(&shown))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                remove_file_in(dir, last, &shown)?;
                let fd = nix::fcntl::openat(
                    Some(dir.as_raw_fd()),
                    last.as_os_str(),
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(nix_err(&shown))?;
                // SAFETY: `openat` returned a new descriptor that nothing else owns.
                let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                let mut chunk = vec![0u8; IO_CHUNK];
                loop {
                    let n = entry.read(&mut chunk).map_err(host_err(&shown))?;
                    if n == 0 {
                        break;
                    }
                    budget.take(n as u64, &shown)?;
                    file.write_all(&chunk[..n]).map_err(host_err(&shown))?;
                }
                nix::sys::stat::fchmod(file.as_raw_fd(), Mode::from_bits_truncate(mode))
                    .map_err(nix_err(&shown))?;
                if let Ok(mtime) = entry.header().mtime() {
                    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
                    let _ = file.set_modified(t);
                }
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(|e| CpError::BadArchive(e.to_string()))?
                    .ok_or_else(|| CpError::BadArchive("a symlink without a target".into()))?;
                remove_file_in(dir, last, &shown)?;
                nix::unistd::symlinkat(link.as_ref(), Some(dir.as_raw_fd()), last.as_os_str())
                    .map_err(nix_err(&shown))?;
            }
            other => {
                return Err(CpError::BadArchive(format!(
                    "{} is of type {other:?}; only files, folders and symlinks are copied",
                    path.display()
                )))
            }
        }
    }
    Ok(())
}

/// One entry to send: its name in the archive and where it is on the host.
struct Item {
    name: PathBuf,
    host: PathBuf,
    kind: EntryKind,
}

/// The entries of `src` (followed if it is a symlink; symlinks below it are
/// sent as symlinks), the top one named after `src`.
fn items(src: &Path) -> Result<Vec<Item>, CpError> {
    let top = src
        .file_name()
        .map(PathBuf::from)
        .ok_or_else(|| CpError::NotCopyable {
            path: src.to_path_buf(),
        })?;
    let real = src.canonicalize().map_err(host_err(src))?;
    let meta = std::fs::metadata(&real).map_err(host_err(src))?;
    let mut out = Vec::new();
    if meta.is_file() {
        out.push(Item {
            name: top,
            host: real,
            kind: EntryKind::File,
        });
    } else if meta.is_dir() {
        walk(&real, &top, &mut out)?;
    } else {
        return Err(CpError::NotCopyable {
            path: src.to_path_buf(),
        });
    }
    Ok(out)
}

fn walk(dir: &Path, name: &Path, out: &mut Vec<Item>) -> Result<(), CpError> {
    out.push(Item {
        name: name.to_path_buf(),
        host: dir.to_path_buf(),
        kind: EntryKind::Dir,
    });
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(host_err(dir))?
        .collect::<Result<_, _>>()
        .map_err(host_err(dir))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let t = e.file_type().map_err(host_err(&path))?;
        let child = name.join(e.file_name());
        if t.is_dir() {
            walk(&path, &child, out)?;
        } else if t.is_file() || t.is_symlink() {
            out.push(Item {
                name: child,
                host: path,
                kind: if t.is_symlink() {
                    EntryKind::Symlink
                } else {
                    EntryKind::File
                },
            });
        } else {
            eprintln!(
                "sandpen: cp: left out {}: not a file, folder or symlink",
                path.display()
            );
        }
    }
    Ok(())
}

/// A `Write` that hands chunks to the async side.
struct Sink(mpsc::Sender<Vec<u8>>);

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        for chunk in data.chunks(IO_CHUNK) {
            self.0.blocking_send(chunk.to_vec()).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the copy ended")
            })?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn copy_in(
    paths: &sandpen_supervisor::SandboxPaths,
    shares: &Shares,
    host: &Path,
    guest: &Path,
) -> Result<(), CpError> {
    let list = items(host)?;
    // Where the top entry lands: into a folder that exists, else as `guest`.
    // A share path is the same on both sides, and the folders above a share
    // exist in the guest (its mount point is made there). Elsewhere the host
    // cannot see the guest's folders; no share is below such a path by name,
    // and a guest symlink from there into a share meets the file server.
    let into = if shares.find(guest).is_some() {
        guest.is_dir()
    } else {
        shares.below(guest)
    };
    let top = if into {
        list.first().map(|i| guest.join(&i.name))
    } else {
        Some(guest.to_path_buf())
    };
    let mut sent = Vec::new();
    let mut left_out: Vec<PathBuf> = Vec::new();
    for (i, item) in list.into_iter().enumerate() {
        let Some(top) = &top else { break };
        // Below a folder that was left out, nothing is sent either.
        if left_out.iter().any(|d| item.name.starts_with(d)) {
            continue;
        }
        let below_top: PathBuf = item.name.components().skip(1).collect();
        let lands = top.join(below_top);
        if let Some(refused) = shares.refuses(&lands, item.kind) {
            if i == 0 {
                return Err(refused);
            }
            eprintln!("sandpen: cp: left out {}: {refused}", item.host.display());
            left_out.push(item.name);
            continue;
        }
        sent.push(item);
    }
    let frames = control::copy(
        paths,
        ControlRequest::CopyIn {
            path: guest.to_string_lossy().into_owned(),
        },
    )
    .await?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
    let packer = tokio::task::spawn_blocking(move || -> Result<(), CpError> {
        let mut builder = tar::Builder::new(Sink(tx));
        builder.follow_symlinks(false);
        builder.mode(tar::HeaderMode::Complete);
        for item in &sent {
            builder
                .append_path_with_name(&item.host, &item.name)
                .map_err(host_err(&item.host))?;
        }
        builder
            .finish()
            .map_err(host_err(Path::new("the archive")))?;
        Ok(())
    });
    send_archive(frames, rx, packer, "packer").await
}

/// Sends what `producer` puts in `rx` as the archive of a copy in, then its
/// end, and returns the guest's verdict. A producer's error ends the copy
/// before the end is sent: dropping the stream tells the guest that the
/// archive ended early.
async fn send_archive(
    mut frames: sandpen_proto::frame::FrameStream<tokio::net::UnixStream>,
    mut rx: mpsc::Receiver<Vec<u8>>,
    producer: tokio::task::JoinHandle<Result<(), CpError>>,
    what: &str,
) -> Result<(), CpError> {
    while let Some(chunk) = rx.recv().await {
        frames.send(&CopyChunk::Data(chunk)).await?;
    }
    producer
        .await
        .map_err(|e| CpError::Guest(format!("the {what} panicked: {e}")))??;
    frames.send(&CopyChunk::End).await?;
    match frames.recv::<CopyEvent>().await? {
        Some(CopyEvent::Done) => Ok(()),
        Some(CopyEvent::Failed(why)) => Err(CpError::Guest(why)),
        Some(CopyEvent::Data(_)) | None => Err(CpError::Guest(
            "the sandbox ended the copy without a word".into(),
        )),
    }
}

/// A tar stream from stdin unpacked into the folder `guest`
/// (`sandpen cp - NAME:DIR`, as `docker cp`). Each entry is checked against
/// the rules where it lands; the ones they forbid are left out.
async fn copy_in_stdin(
    paths: &sandpen_supervisor::SandboxPaths,
    shares: Shares,
    guest: &Path,
) -> Result<(), CpError> {
    let frames = control::copy(
        paths,
        ControlRequest::CopyIn {
            path: guest.to_string_lossy().into_owned(),
        },
    )
    .await?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
    let dest = guest.to_path_buf();
    let filter = tokio::task::spawn_blocking(move || filter_stdin(&shares, &dest, Sink(tx)));
    send_archive(frames, rx, filter, "filter").await
}

/// Re-emits the tar stream on stdin with only the entries the rules allow
/// at `dest/PATH`: files, folders and symlinks.
fn filter_stdin(shares: &Shares, dest: &Path, out: Sink) -> Result<(), CpError> {
    let bad = |e: std::io::Error| CpError::BadArchive(format!("stdin: {e}"));
    let mut archive = tar::Archive::new(std::io::stdin().lock());
    let mut builder = tar::Builder::new(out);
    let mut left_out: Vec<PathBuf> = Vec::new();
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.into_owned();
        let kind = match entry.header().entry_type() {
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Symlink => EntryKind::Symlink,
            tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
            other => {
                eprintln!(
                    "sandpen: cp: left out {}: an entry of type {other:?}",
                    path.display()
                );
                continue;
            }
        };
        if path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(CpError::BadArchive(format!(
                "the path {} leaves the destination",
                path.display()
            )));
        }
        // `./` itself (`tar -C DIR .`): the folder is there already.
        if path.components().all(|c| c == Component::CurDir) {
            continue;
        }
        if left_out.iter().any(|d| path.starts_with(d)) {
            continue;
        }
        if let Some(refused) = shares.refuses(&dest.join(&path), kind) {
            eprintln!("sandpen: cp: left out {}: {refused}", path.display());
            left_out.push(path);
            continue;
        }
        let mut header = entry.header().clone();
        if kind == EntryKind::Symlink {
            let link = entry
                .link_name()
                .map_err(bad)?
                .ok_or_else(|| CpError::BadArchive("a symlink without a target".into()))?
                .into_owned();
            builder
                .append_link(&mut header, &path, &link)
                .map_err(bad)?;
        } else {
            builder
                .append_data(&mut header, &path, &mut entry)
                .map_err(bad)?;
        }
    }
    builder.finish().map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_follow_docker() {
        assert_eq!(
            side("web:/tmp/a"),
            Side::Guest {
                name: "web".into(),
                path: "/tmp/a".into()
            }
        );
        assert_eq!(side("./web:/tmp/a"), Side::Host("./web:/tmp/a".into()));
        assert_eq!(side("/abs/x:y"), Side::Host("/abs/x:y".into()));
        assert_eq!(side("report.html"), Side::Host("report.html".into()));
        assert_eq!(side("Bad Name:/x"), Side::Host("Bad Name:/x".into()));
    }

    #[test]
    fn guest_paths_are_normalised_by_name() {
        let ws = Path::new("/w/proj");
        assert_eq!(guest_path(ws, "src/a").unwrap(), Path::new("/w/proj/src/a"));
        assert_eq!(
            guest_path(ws, "sub/../.env").unwrap(),
            Path::new("/w/proj/.env")
        );
        assert_eq!(
            guest_path(ws, "/tmp/./x/../y").unwrap(),
            Path::new("/tmp/y")
        );
        assert_eq!(guest_path(ws, "../..").unwrap(), Path::new("/"));
        assert!(guest_path(ws, "../../..").is_err());
        assert!(guest_path(ws, "/../x").is_err());
    }

    fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn unpack_bytes(host: &Path, bytes: Vec<u8>) -> Result<(), CpError> {
        unpack_within(host, bytes, 1 << 30)
    }

    fn unpack_within(host: &Path, bytes: Vec<u8>, cap: u64) -> Result<(), CpError> {
        let target = Target::for_host(host, Path::new("/guest/x"))?;
        let budget = Budget {
            cap,
            left: cap,
            reserve: None,
        };
        let (tx, rx) = mpsc::channel(1);
        let feeder = std::thread::spawn(move || {
            let _ = tx.blocking_send(bytes);
        });
        let r = unpack(
            target,
            Chunks {
                rx,
                buf: Vec::new(),
                pos: 0,
            },
            budget,
        );
        feeder.join().unwrap();
        r
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, body: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o4755);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, body).unwrap();
    }

    #[test]
    fn a_hostile_archive_stays_beneath_the_destination() {
        let root = tempfile::tempdir().unwrap();
        let outside = root.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let dest = root.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        // A symlink to outside, then a file through it.
        let bytes = archive(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, "x/link", &outside).unwrap();
            file(b, "x/link/pwned", b"no");
        });
        let err = unpack_bytes(&dest, bytes).unwrap_err();
        assert!(matches!(err, CpError::BadArchive(_)), "{err}");
        assert!(!outside.join("pwned").exists());
        // `..` in a name, written by hand (the tar crate refuses to make one).
        let mut bytes = archive(|b| file(b, "x/aaaaaaaaaaaaaaaaa", b"no"));
        let at = bytes
            .windows(17)
            .position(|w| w == b"aaaaaaaaaaaaaaaaa")
            .unwrap();
        bytes[at..at + 17].copy_from_slice(b"../../outside/pwn");
        let mut h = tar::Header::from_byte_slice(&bytes[..512]).clone();
        h.set_cksum();
        bytes[..512].copy_from_slice(h.as_bytes());
        let err = unpack_bytes(&dest, bytes).unwrap_err();
        assert!(matches!(err, CpError::BadArchive(_)), "{err}");
        assert!(!outside.join("pwn").exists());
        // A plain file: set-id bits dropped, renamed when the destination
        // does not exist.
        let bytes = archive(|b| file(b, "x", b"hello"));
        unpack_bytes(&root.path().join("renamed"), bytes).unwrap();
        let got = root.path().join("renamed");
        assert_eq!(std::fs::read(&got).unwrap(), b"hello");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&got).unwrap().permissions().mode() & 0o7777,
            0o755
        );
    }

    #[test]
    fn a_copy_out_stops_at_what_the_sandbox_could_hold() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        let body = vec![7u8; 200_000];
        let bytes = archive(|b| file(b, "x/big", &body));
        // Two entries (4 KiB each) and the body: 10 KiB short of it is refused,
        // and what was written stays below the cap.
        let cap = 2 * sandpen_fs::reserve::ENTRY_BYTES + body.len() as u64 - 10_000;
        let err = unpack_within(&dest, bytes.clone(), cap).unwrap_err();
        assert!(matches!(err, CpError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("more than it can hold"), "{err}");
        let written = std::fs::metadata(dest.join("x/big")).unwrap().len();
        assert!(
            written <= cap,
            "{written} bytes written past a cap of {cap}"
        );
        // Exactly enough: it all lands.
        let dest2 = root.path().join("dest2");
        std::fs::create_dir(&dest2).unwrap();
        unpack_within(&dest2, bytes, cap + 10_000).unwrap();
        assert_eq!(std::fs::read(dest2.join("x/big")).unwrap(), body);
    }

    #[test]
    fn the_host_reserve_stops_a_copy_out() {
        let root = tempfile::tempdir().unwrap();
        // A reserve of 100 % can never be met: the first entry is refused.
        let mut budget = Budget {
            cap: 1 << 30,
            left: 1 << 30,
            reserve: Some(
                sandpen_fs::reserve::DiskReserve::open(
                    root.path(),
                    sandpen_policy::Reserve::Percent(100),
                )
                .unwrap(),
            ),
        };
        let err = budget.take(1, root.path()).unwrap_err();
        assert!(matches!(err, CpError::HostDiskFull { .. }), "{err}");
    }
}
