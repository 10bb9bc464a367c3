//! Sandboxes on disk: configuration, names, creation and removal.

use std::path::{Path, PathBuf};

use sandpen_vm::AccelChoice;
use serde::{Deserialize, Serialize};

use crate::paths::{Dirs, SandboxPaths};
use crate::SupervisorError;

/// What a sandbox is. Written at create time; the runtime state is asked of the
/// supervisor, never stored here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxConfig {
    pub name: String,
    pub workspace: PathBuf,
    pub image: String,
    pub agent: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub disk_gib: u32,
    pub accel: AccelChoice,
    /// The invoking host user, who owns the files the guest writes.
    pub host_uid: u32,
    pub host_gid: u32,
    /// The guest user `agent`: the host uid, or 1000 when the host user is root.
    pub guest_uid: u32,
    pub guest_gid: u32,
    pub created_at: String,
    /// `NAME:IP` resolution overrides for the egress proxy (`--add-host`).
    #[serde(default)]
    pub add_hosts: Vec<String>,
    /// Extra CA files the proxy trusts for upstreams it re-originates TLS to
    /// (`--upstream-ca`: private upstreams and tests).
    #[serde(default)]
    pub upstream_cas: Vec<PathBuf>,
    /// When the guest's Docker engine starts (images that carry one).
    #[serde(default)]
    pub docker: DockerStart,
    /// Extra folders shared at the same path (`--mount PATH[:ro]`).
    #[serde(default)]
    pub mounts: Vec<ExtraMount>,
    /// Refuse to boot when a layer of QEMU's jail is missing on this host
    /// (`--require-jail`).
    #[serde(default)]
    pub require_jail: bool,
    /// Published ports (`-p`): the only listeners the supervisor opens on
    /// the host for this sandbox.
    #[serde(default)]
    pub ports: Vec<crate::ports::PortMapping>,
}

/// When dockerd starts in the guest. It travels to the guest on the kernel
/// command line as `sandpen.docker=VALUE`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DockerStart {
    /// When the first client connects to `/var/run/docker.sock`.
    #[default]
    OnDemand,
    /// Right after boot.
    Boot,
    /// Never.
    Off,
}

impl DockerStart {
    pub fn as_str(self) -> &'static str {
        match self {
            DockerStart::OnDemand => "on-demand",
            DockerStart::Boot => "boot",
            DockerStart::Off => "off",
        }
    }
}

impl std::str::FromStr for DockerStart {
    type Err = SupervisorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on-demand" => Ok(DockerStart::OnDemand),
            "boot" => Ok(DockerStart::Boot),
            "off" => Ok(DockerStart::Off),
            _ => Err(SupervisorError::Invalid(format!(
                "invalid --docker {s:?}: use on-demand, boot or off"
            ))),
        }
    }
}

/// `--mount PATH[:ro]`: a host folder shared at the same path in the guest,
/// served with the same file rules as the workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtraMount {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

impl ExtraMount {
    /// Parse `PATH` or `PATH:ro` (also `:rw`); the folder must exist.
    pub fn parse(s: &str) -> Result<ExtraMount, SupervisorError> {
        let (path, read_only) = match s.rsplit_once(':') {
            Some((p, "ro")) => (p, true),
            Some((p, "rw")) => (p, false),
            _ => (s, false),
        };
        let canonical = Path::new(path)
            .canonicalize()
            .map_err(|e| SupervisorError::Invalid(format!("--mount {s}: {path}: {e}")))?;
        if !canonical.is_dir() {
            return Err(SupervisorError::Invalid(format!(
                "--mount {s}: {} is not a folder",
                canonical.display()
            )));
        }
        if canonical == Path::new("/") {
            return Err(SupervisorError::Invalid(format!(
                "--mount {s}: the whole host file system cannot be shared"
            )));
        }
        Ok(ExtraMount {
            path: canonical,
            read_only,
        })
    }
}

/// Replace a stopped sandbox's extra mounts.
pub fn set_mounts(
    dirs: &Dirs,
    name: &str,
    mounts: Vec<ExtraMount>,
) -> Result<SandboxConfig, SupervisorError> {
    update(dirs, name, |c| c.mounts = mounts)
}

/// Replace a stopped sandbox's published ports.
pub fn set_ports(
    dirs: &Dirs,
    name: &str,
    ports: Vec<crate::ports::PortMapping>,
) -> Result<SandboxConfig, SupervisorError> {
    crate::ports::check_distinct(&ports)?;
    update(dirs, name, |c| c.ports = ports)
}

fn update(
    dirs: &Dirs,
    name: &str,
    change: impl FnOnce(&mut SandboxConfig),
) -> Result<SandboxConfig, SupervisorError> {
    let mut config = load(dirs, name)?;
    change(&mut config);
    let data = serde_json::to_vec_pretty(&config)
        .map_err(|e| SupervisorError::Invalid(format!("encoding the sandbox: {e}")))?;
    write_atomic(&dirs.sandbox(name).config(), &data)?;
    Ok(config)
}

pub const GUEST_USER: &str = "agent";
pub const DEFAULT_CPUS: u32 = 2;
pub const DEFAULT_MEMORY_MIB: u32 = 2048;
pub const DEFAULT_DISK_GIB: u32 = 32;

/// Options of `create` (and `run`, which creates on first use).
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub name: Option<String>,
    pub workspace: PathBuf,
    pub image: String,
    pub agent: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub disk_gib: u32,
    pub accel: AccelChoice,
    pub add_hosts: Vec<String>,
    pub docker: DockerStart,
    pub mounts: Vec<ExtraMount>,
    pub upstream_cas: Vec<PathBuf>,
    /// `--require-jail`.
    pub require_jail: bool,
    /// `-p`.
    pub ports: Vec<crate::ports::PortMapping>,
}

/// Parses sizes like `2048`, `512M`, `2G`, `2GiB` into MiB.
pub fn parse_memory_mib(s: &str) -> Result<u32, SupervisorError> {
    let bad = || {
        SupervisorError::Invalid(format!(
            "invalid memory size {s:?}: use a number of MiB or a size such as 512M or 2G (at least 128M)"
        ))
    };
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mib = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => n,
        "g" | "gb" | "gib" => n.checked_mul(1024).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    if !(128..=1024 * 1024).contains(&mib) {
        return Err(bad());
    }
    Ok(mib as u32)
}

pub fn validate_cpus(cpus: u32) -> Result<u32, SupervisorError> {
    if cpus == 0 || cpus > 64 {
        return Err(SupervisorError::Invalid(format!(
            "invalid --cpus {cpus}: use 1 to 64"
        )));
    }
    Ok(cpus)
}

/// A name made from the workspace folder: lower case, `[a-z0-9._-]`.
pub fn name_from_workspace(workspace: &Path) -> String {
    let base = workspace
        .file_name()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let mut name: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    name = name
        .trim_matches(|c| c == '-' || c == '.')
        .chars()
        .take(40)
        .collect();
    if name.is_empty() {
        name = "sandbox".into();
    }
    name
}

pub fn validate_name(name: &str) -> Result<(), SupervisorError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(SupervisorError::Invalid(format!(
            "invalid sandbox name {name:?}: use letters, digits, '-', '_' and '.', up to 63 characters"
        )))
    }
}

/// Writes `data` to `path` atomically (see `sandpen_fsutil::write_atomic`).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), SupervisorError> {
    sandpen_fsutil::write_atomic(path, data, sandpen_fsutil::MODE_STATE)
        .map_err(|e| SupervisorError::io(format!("writing {}", path.display()), e))
}

/// An exclusive `flock` on `path` (created if missing), waited for: the
/// kernel drops it when the holder exits, however it exits.
pub type Lock = nix::fcntl::Flock<std::fs::File>;

/// Waits for an exclusive lock on `path`.
pub fn lock_exclusive(path: &Path) -> Result<Lock, SupervisorError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| SupervisorError::io(format!("creating {}", dir.display()), e))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| SupervisorError::io(format!("opening {}", path.display()), e))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, errno)| {
        SupervisorError::io(
            format!("locking {}", path.display()),
            std::io::Error::from(errno),
        )
    })
}

/// Held while a caller looks for a workspace's sandbox and creates it if
/// there is none, so that concurrent `run`s and `create`s in one workspace
/// make one sandbox and all use it.
pub fn lock_creation(dirs: &Dirs) -> Result<Lock, SupervisorError> {
    lock_exclusive(&dirs.state.join("create.lock"))
}

pub fn load(dirs: &Dirs, name: &str) -> Result<SandboxConfig, SupervisorError> {
    validate_name(name)?;
    let path = dirs.sandbox(name).config();
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SupervisorError::UnknownSandbox(name.to_string()))
        }
        Err(e) => {
            return Err(SupervisorError::io(
                format!("reading {}", path.display()),
                e,
            ))
        }
    };
    serde_json::from_slice(&data)
        .map_err(|e| SupervisorError::Invalid(format!("{} is damaged: {e}", path.display())))
}

/// Every sandbox, sorted by name. Unreadable entries are skipped with a warning.
pub fn list(dirs: &Dirs) -> Result<Vec<SandboxConfig>, SupervisorError> {
    let root = dirs.sandboxes();
    let entries = match std::fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => {
            return Err(SupervisorError::io(
                format!("reading {}", root.display()),
                e,
            ))
        }
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        match load(dirs, &name) {
            Ok(c) => out.push(c),
            Err(e) => tracing::warn!("skipping sandbox {name}: {e}"),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

pub fn find_by_workspace(
    dirs: &Dirs,
    workspace: &Path,
) -> Result<Option<SandboxConfig>, SupervisorError> {
    Ok(list(dirs)?.into_iter().find(|c| c.workspace == workspace))
}

pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Creates the sandbox's folder, configuration and disk overlay.
pub fn create(
    dirs: &Dirs,
    opts: &CreateOptions,
    image_rootfs: &Path,
) -> Result<SandboxConfig, SupervisorError> {
    let workspace = opts
        .workspace
        .canonicalize()
        .map_err(|e| SupervisorError::io(format!("workspace {}", opts.workspace.display()), e))?;
    if !workspace.is_dir() {
        return Err(SupervisorError::Invalid(format!(
            "workspace {} is not a directory",
            workspace.display()
        )));
    }
    validate_cpus(opts.cpus)?;
    crate::ports::check_distinct(&opts.ports)?;
    let own = crate::own::own_folders(dirs);
    crate::own::check_share(&workspace, &own)?;
    for m in &opts.mounts {
        crate::own::check_share(&m.path, &own)?;
    }
    let mut upstream_cas = Vec::new();
    for ca in &opts.upstream_cas {
        let path = ca
            .canonicalize()
            .map_err(|e| SupervisorError::io(format!("--upstream-ca {}", ca.display()), e))?;
        sandpen_proxy::mitm::read_pem_certs(&path)
            .map_err(|e| SupervisorError::Invalid(format!("--upstream-ca: {e}")))?;
        upstream_cas.push(path);
    }
    std::fs::create_dir_all(dirs.sandboxes())
        .map_err(|e| SupervisorError::io(format!("creating {}", dirs.sandboxes().display()), e))?;
    let name = match &opts.name {
        Some(n) => {
            validate_name(n)?;
            if dirs.sandbox(n).dir.exists() {
                return Err(SupervisorError::Invalid(format!(
                    "a sandbox named {n} already exists; pick another --name or `sandpen rm {n}`"
                )));
            }
            n.clone()
        }
        None => unique_name(dirs, &name_from_workspace(&workspace)),
    };
    let paths = dirs.sandbox(&name);
    // Build in a temporary folder and rename, so a crash never leaves half a sandbox.
    let tmp = SandboxPaths::new(
        dirs.sandboxes()
            .join(format!(".{name}.creating-{}", std::process::id())),
    );
    let result = (|| {
        for d in [tmp.dir.clone(), tmp.run(), tmp.logs()] {
            std::fs::create_dir_all(&d)
                .map_err(|e| SupervisorError::io(format!("creating {}", d.display()), e))?;
        }
        sandpen_vm::disk::create_overlay(image_rootfs, &tmp.disk(), opts.disk_gib)?;
        sandpen_credentials::SandboxCa::create(crate::credentials::ca_dir(&tmp))
            .map_err(|e| SupervisorError::Invalid(format!("the sandbox CA: {e}")))?;
        let host_uid = nix::unistd::getuid().as_raw();
        let host_gid = nix::unistd::getgid().as_raw();
        let (guest_uid, guest_gid) = if host_uid == 0 {
            (1000, 1000)
        } else {
            (host_uid, host_gid)
        };
        let config = SandboxConfig {
            name: name.clone(),
            workspace: workspace.clone(),
            image: opts.image.clone(),
            agent: opts.agent.clone(),
            cpus: opts.cpus,
            memory_mib: opts.memory_mib,
            disk_gib: opts.disk_gib,
            accel: opts.accel,
            host_uid,
            host_gid,
            guest_uid,
            guest_gid,
            created_at: now_rfc3339(),
            add_hosts: opts.add_hosts.clone(),
            docker: opts.docker,
            mounts: opts.mounts.clone(),
            upstream_cas,
            require_jail: opts.require_jail,
            ports: opts.ports.clone(),
        };
        let json = serde_json::to_vec_pretty(&config)
            .map_err(|e| SupervisorError::Invalid(format!("serializing the sandbox: {e}")))?;
        write_atomic(&tmp.config(), &json)?;
        std::fs::rename(&tmp.dir, &paths.dir)
            .map_err(|e| SupervisorError::io(format!("creating {}", paths.dir.display()), e))?;
        Ok(config)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp.dir);
    }
    result
}

fn unique_name(dirs: &Dirs, base: &str) -> String {
    if !dirs.sandbox(base).dir.exists() {
        return base.to_string();
    }
    (2..)
        .map(|i| format!("{base}-{i}"))
        .find(|n| !dirs.sandbox(n).dir.exists())
        .unwrap_or_else(|| base.to_string())
}

/// Deletes every trace of a stopped sandbox.
pub fn remove(dirs: &Dirs, name: &str) -> Result<(), SupervisorError> {
    validate_name(name)?;
    let paths = dirs.sandbox(name);
    if !paths.dir.exists() {
        return Err(SupervisorError::UnknownSandbox(name.to_string()));
    }
    // Rename first so a half-finished removal never looks like a sandbox.
    let doomed = dirs
        .sandboxes()
        .join(format!(".{name}.removing-{}", std::process::id()));
    std::fs::rename(&paths.dir, &doomed)
        .map_err(|e| SupervisorError::io(format!("removing {}", paths.dir.display()), e))?;
    std::fs::remove_dir_all(&doomed)
        .map_err(|e| SupervisorError::io(format!("removing {}", doomed.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_mib("2048").unwrap(), 2048);
        assert_eq!(parse_memory_mib("512M").unwrap(), 512);
        assert_eq!(parse_memory_mib("2G").unwrap(), 2048);
        assert_eq!(parse_memory_mib("1GiB").unwrap(), 1024);
        for bad in ["", "lots", "2T", "-1", "64M", "99999999999G"] {
            let e = parse_memory_mib(bad).unwrap_err().to_string();
            assert!(e.contains("invalid memory size"), "{bad}: {e}");
        }
    }

    #[test]
    fn names_from_folders() {
        assert_eq!(
            name_from_workspace(Path::new("/home/me/src/myproject")),
            "myproject"
        );
        assert_eq!(
            name_from_workspace(Path::new("/x/My Project!")),
            "my-project"
        );
        assert_eq!(name_from_workspace(Path::new("/")), "sandbox");
        assert!(validate_name("../etc").is_err());
        assert!(validate_name("ok-name_1.2").is_ok());
    }

    #[test]
    fn atomic_write_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sandbox.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn unknown_and_damaged_sandboxes() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = Dirs {
            state: dir.path().join("state"),
            data: dir.path().join("data"),
            config: dir.path().join("config"),
        };
        let e = load(&dirs, "nope").unwrap_err();
        assert!(matches!(e, SupervisorError::UnknownSandbox(_)));
        std::fs::create_dir_all(dirs.sandbox("bad").dir).unwrap();
        std::fs::write(dirs.sandbox("bad").config(), b"{").unwrap();
        assert!(load(&dirs, "bad")
            .unwrap_err()
            .to_string()
            .contains("damaged"));
        assert!(list(&dirs).unwrap().is_empty());
    }
}
