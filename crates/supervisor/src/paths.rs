//! Where state lives (XDG base directories).

use std::path::{Path, PathBuf};

/// The three roots. Tests point them at temporary directories through the
/// usual XDG variables.
#[derive(Debug, Clone)]
pub struct Dirs {
    /// `$XDG_STATE_HOME/sandpen`: sandboxes.
    pub state: PathBuf,
    /// `$XDG_DATA_HOME/sandpen`: images.
    pub data: PathBuf,
    /// `$XDG_CONFIG_HOME/sandpen`: policy and secrets.
    pub config: PathBuf,
}

fn xdg(var: &str, home_fallback: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(v) if Path::new(&v).is_absolute() => PathBuf::from(v),
        _ => {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| "/".into());
            home.join(home_fallback)
        }
    }
}

impl Dirs {
    pub fn from_env() -> Dirs {
        Dirs {
            state: xdg("XDG_STATE_HOME", ".local/state").join("sandpen"),
            data: xdg("XDG_DATA_HOME", ".local/share").join("sandpen"),
            config: xdg("XDG_CONFIG_HOME", ".config").join("sandpen"),
        }
    }

    pub fn images(&self) -> PathBuf {
        self.data.join("images")
    }

    /// The host's toolchain cache, shared by the user's sandboxes and written
    /// only by their proxies (docs/dev-env.md, "The toolchain cache").
    pub fn toolchains(&self) -> PathBuf {
        self.state.join("toolchains")
    }

    pub fn sandboxes(&self) -> PathBuf {
        self.state.join("sandboxes")
    }

    pub fn sandbox(&self, name: &str) -> SandboxPaths {
        SandboxPaths::new(self.sandboxes().join(name))
    }
}

/// The files of one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxPaths {
    pub dir: PathBuf,
}

impl SandboxPaths {
    pub fn new(dir: PathBuf) -> Self {
        SandboxPaths { dir }
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("sandbox.json")
    }
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    pub fn run(&self) -> PathBuf {
        self.dir.join("run")
    }
    pub fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }
    pub fn lock(&self) -> PathBuf {
        self.run().join("supervisor.lock")
    }
    pub fn control_socket(&self) -> PathBuf {
        self.run().join("control.sock")
    }
    pub fn channel_socket(&self) -> PathBuf {
        self.run().join("channel.sock")
    }
    pub fn egress_socket(&self) -> PathBuf {
        self.run().join("egress.sock")
    }
    pub fn console_socket(&self) -> PathBuf {
        self.run().join("console.sock")
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.run().join("qmp.sock")
    }
    /// The toolchain trees this sandbox was given (docs/dev-env.md, "Shared
    /// toolchain trees"): served read-only when the folder exists at a start.
    pub fn toolchain_view(&self) -> PathBuf {
        self.dir.join("toolchains")
    }
    pub fn share_socket(&self, index: usize) -> PathBuf {
        self.run().join(format!("fs{index}.sock"))
    }
    pub fn pid_file(&self) -> PathBuf {
        self.run().join("supervisor.pid")
    }
    pub fn console_log(&self) -> PathBuf {
        self.logs().join("console.log")
    }
    pub fn supervisor_log(&self) -> PathBuf {
        self.logs().join("supervisor.log")
    }
    pub fn fs_log(&self) -> PathBuf {
        self.logs().join("fs.log")
    }
}
