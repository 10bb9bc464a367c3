//! sandpen's own files are never in a sandbox, and a home folder in a share
//! brings its credential stores under the deny-read defaults.
//!
//! A share (the workspace or a `--mount`) that holds one of sandpen's own
//! folders, or lies inside one, is refused: the config folder (global
//! policy, the file secret store), the state folder (every sandbox's
//! `policy.toml`, flow labels, CA key, disk), the data folder (images, whose
//! kernels and roots other sandboxes boot), the cache folder (private
//! initramfs copies) and the keyring's files (`$XDG_DATA_HOME/keyrings`,
//! `kwalletd`). The folders need not exist yet: a guest that could create
//! `.config/sandpen/policy.toml` would write the next start's global policy.
//! Why refused rather than hidden: see docs/files.md ("sandpen's own files").

use std::path::{Component, Path, PathBuf};

use crate::paths::Dirs;
use crate::sandbox::SandboxConfig;
use crate::SupervisorError;

/// One of sandpen's own folders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnFolder {
    /// `config folder`, `state folder`, ...
    pub what: &'static str,
    pub path: PathBuf,
    /// The variable that moves it (`XDG_CONFIG_HOME`, ...).
    pub var: &'static str,
}

fn xdg_base(var: &str, home_fallback: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(v) if Path::new(&v).is_absolute() => PathBuf::from(v),
        _ => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/".into())
            .join(home_fallback),
    }
}

/// sandpen's folders and the keyring's, as `dirs` and the environment name them.
pub fn own_folders(dirs: &Dirs) -> Vec<OwnFolder> {
    let data_home = dirs
        .data
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| xdg_base("XDG_DATA_HOME", ".local/share"));
    let f = |what, path, var| OwnFolder { what, path, var };
    vec![
        f("config folder", dirs.config.clone(), "XDG_CONFIG_HOME"),
        f("state folder", dirs.state.clone(), "XDG_STATE_HOME"),
        f("data folder", dirs.data.clone(), "XDG_DATA_HOME"),
        f(
            "cache folder",
            xdg_base("XDG_CACHE_HOME", ".cache").join("sandpen"),
            "XDG_CACHE_HOME",
        ),
        f("keyring", data_home.join("keyrings"), "XDG_DATA_HOME"),
        f("keyring", data_home.join("kwalletd"), "XDG_DATA_HOME"),
    ]
}

/// `path` with symlinks resolved as far as it exists, and the rest (which
/// does not exist yet) appended as written, without `.` and `..`.
pub fn resolve(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(c) = existing.canonicalize() {
            let mut out = c;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return out;
        }
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    // Nothing of it exists: keep it lexically clean.
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Refuses a share that holds one of `own`, or lies inside one.
pub fn check_share(share: &Path, own: &[OwnFolder]) -> Result<(), SupervisorError> {
    let share = resolve(share);
    for o in own {
        let folder = resolve(&o.path);
        if folder.starts_with(&share) || share.starts_with(&folder) {
            return Err(SupervisorError::OwnFiles {
                share,
                what: o.what,
                folder,
                var: o.var,
            });
        }
    }
    Ok(())
}

/// Every share of `config` (the workspace, then each `--mount`).
pub fn shares(config: &SandboxConfig) -> impl Iterator<Item = &Path> {
    std::iter::once(config.workspace.as_path())
        .chain(config.mounts.iter().map(|m| m.path.as_path()))
}

/// Refuses the sandbox if any of its shares holds sandpen's own files.
pub fn check_shares(dirs: &Dirs, config: &SandboxConfig) -> Result<(), SupervisorError> {
    let own = own_folders(dirs);
    shares(config).try_for_each(|s| check_share(s, &own))
}

/// Home folders on this host: `$HOME` and the home of every account in
/// `/etc/passwd` (but `/`), resolved.
pub fn home_folders() -> Vec<PathBuf> {
    let mut homes: Vec<PathBuf> = std::env::var_os("HOME")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    if let Ok(passwd) = std::fs::read_to_string("/etc/passwd") {
        homes.extend(
            passwd
                .lines()
                .filter_map(|l| l.split(':').nth(5))
                .map(PathBuf::from),
        );
    }
    let mut out: Vec<PathBuf> = homes
        .iter()
        .filter(|h| h.is_absolute() && h.as_path() != Path::new("/"))
        .filter_map(|h| h.canonicalize().ok())
        .filter(|h| h.as_path() != Path::new("/"))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Is `share` a home folder or does it hold one?
pub fn holds_home(share: &Path, homes: &[PathBuf]) -> bool {
    let share = resolve(share);
    homes.iter().any(|h| h.starts_with(&share))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(root: &Path) -> Dirs {
        Dirs {
            state: root.join(".local/state/sandpen"),
            data: root.join(".local/share/sandpen"),
            config: root.join(".config/sandpen"),
        }
    }

    #[test]
    fn a_share_that_holds_or_lies_in_sandpens_folders_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().canonicalize().unwrap();
        let d = dirs(&home);
        std::fs::create_dir_all(&d.config).unwrap();
        std::fs::create_dir_all(home.join("src/app")).unwrap();
        std::fs::create_dir_all(home.join(".local/share/keyrings")).unwrap();
        let own = own_folders(&d);
        // The home, `.config`, and a folder inside sandpen's own.
        for bad in [
            home.clone(),
            home.join(".config"),
            home.join(".local"),
            d.config.clone(),
            home.join(".local/share/keyrings"),
        ] {
            let e = check_share(&bad, &own).unwrap_err().to_string();
            assert!(!e.contains('\n'), "{e}");
            assert!(e.contains("sandpen") && e.contains("XDG_"), "{e}");
        }
        // The state folder does not exist yet: still refused.
        let e = check_share(&home.join(".local/state"), &own)
            .unwrap_err()
            .to_string();
        assert!(e.contains("state folder"), "{e}");
        assert!(check_share(&home.join("src/app"), &own).is_ok());
        assert!(check_share(&home.join("src"), &own).is_ok());
        // Through a symlink, the same.
        std::os::unix::fs::symlink(&home, home.join("src/back")).unwrap();
        assert!(check_share(&home.join("src/back"), &own).is_err());
    }

    #[test]
    fn xdg_folders_inside_a_workspace_are_caught() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path().canonicalize().unwrap().join("ws");
        std::fs::create_dir_all(&ws).unwrap();
        let d = Dirs {
            state: ws.join(".state/sandpen"),
            data: tmp.path().join("data/sandpen"),
            config: tmp.path().join("cfg/sandpen"),
        };
        let e = check_share(&ws, &own_folders(&d)).unwrap_err().to_string();
        assert!(
            e.contains("state folder") && e.contains("XDG_STATE_HOME"),
            "{e}"
        );
    }

    #[test]
    fn homes_in_a_share() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let alice = root.join("home/alice");
        std::fs::create_dir_all(&alice).unwrap();
        let homes = vec![alice.clone()];
        assert!(holds_home(&alice, &homes));
        assert!(holds_home(&root.join("home"), &homes));
        assert!(!holds_home(&alice.join("src"), &homes));
        assert!(!holds_home(&root.join("other"), &homes));
        assert!(!home_folders().iter().any(|h| h == Path::new("/")));
    }
}
