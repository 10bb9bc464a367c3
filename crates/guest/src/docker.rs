//! The sandbox's private Docker engine, in images that carry `dockerd`.
//!
//! `sandpen.docker=` on the kernel command line says when it starts:
//! - `on-demand` (the default): PID 1 listens on `/run/docker.sock` itself and
//!   starts dockerd, handing it that socket (systemd-style activation,
//!   `-H fd://`), when the first client connects. The client waits in the
//!   socket's backlog meanwhile.
//! - `boot`: dockerd starts right after the guest setup.
//! - `off`: never.
//!
//! dockerd runs with `HTTP(S)_PROXY` pointing at the guest's proxy port, so
//! `docker pull` leaves like every other connection, and it trusts the system
//! store. It does not touch iptables: the guest's own nftables rules send its
//! containers' TCP to the transparent listener and their DNS to the stub (see
//! `egress.rs`). Plumbing only: what leaves is decided on the host.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::log;
use crate::reaper::Reaper;

const DOCKERD: &str = "/usr/sbin/dockerd";
const SOCKET: &str = "/run/docker.sock";
const LOG: &str = "/var/log/sandpen-dockerd.log";
/// Modules dockerd needs: overlay2 storage, the bridge and veth pairs. The
/// netfilter ones are loaded for the egress redirect already.
const MODULES: &[&str] = &["overlay", "bridge", "veth"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    OnDemand,
    Boot,
    Off,
}

impl Start {
    /// From the kernel command line (`sandpen.docker=boot|on-demand|off`).
    pub fn from_cmdline(cmdline: &str) -> Start {
        let value = cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix("sandpen.docker="));
        match value {
            Some("boot") => Start::Boot,
            Some("off") => Start::Off,
            _ => Start::OnDemand,
        }
    }
}

/// Starts dockerd now or arms the socket, as the command line says; nothing
/// when the image has no dockerd. Call after the setup (the user, the egress
/// plumbing and the trust store are in place).
pub fn arm(reaper: Arc<Reaper>) {
    if !Path::new(DOCKERD).exists() {
        return;
    }
    let start = Start::from_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    match start {
        Start::Off => {}
        Start::Boot => {
            std::thread::spawn(move || {
                if let Err(e) = launch(&reaper, None) {
                    log!("dockerd not started: {e:#}");
                }
            });
        }
        Start::OnDemand => {
            tokio::spawn(async move {
                if let Err(e) = on_demand(reaper).await {
                    log!("docker socket activation failed: {e:#}");
                }
            });
        }
    }
}

async fn on_demand(reaper: Arc<Reaper>) -> Result<()> {
    let _ = std::fs::remove_file(SOCKET);
    let listener = std::os::unix::net::UnixListener::bind(SOCKET)
        .with_context(|| format!("binding {SOCKET}"))?;
    if let Some(gid) = crate::users::group_id("docker") {
        nix::unistd::chown(
            SOCKET,
            Some(nix::unistd::Uid::from_raw(0)),
            Some(gid.into()),
        )
        .with_context(|| format!("chown {SOCKET}"))?;
    }
    std::fs::set_permissions(SOCKET, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod {SOCKET}"))?;
    // Wait for the first client without accepting it: dockerd will.
    let listener = tokio::task::spawn_blocking(move || -> Result<_> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        loop {
            let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(n) if n > 0 => return Ok(listener),
                Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e).context("waiting for a docker client"),
            }
        }
    })
    .await??;
    log!(
        "first docker client at {} ms: starting dockerd",
        crate::sys::uptime_ms()
    );
    tokio::task::spawn_blocking(move || {
        // dockerd has its own copy from here on; ours closes on return.
        launch(&reaper, Some(listener.as_raw_fd()))
    })
    .await??;
    Ok(())
}

/// Loads the modules and starts dockerd, on `listen_fd` when given (as fd 3,
/// `LISTEN_FDS=1`) or on its default socket.
fn launch(reaper: &Reaper, listen_fd: Option<RawFd>) -> Result<()> {
    let t0 = crate::sys::uptime_ms();
    crate::boot::load_rootfs_modules(MODULES).context("loading the modules dockerd needs")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(LOG)
        .with_context(|| format!("opening {LOG}"))?;
    let log2 = log.try_clone()?;
    // systemd's activation protocol wants LISTEN_PID to be dockerd's own pid:
    // the shell sets it to its pid and then becomes dockerd.
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(match listen_fd {
            Some(_) => "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$@\"",
            None => "exec \"$@\"",
        })
        .arg("sandpen-dockerd")
        .arg(DOCKERD)
        .args(["--iptables=false", "--ip6tables=false"])
        // Containers' DNS is redirected to the guest's stub whatever server
        // they ask; name one so dockerd does not go looking for systemd-resolved's
        // file (the guest's resolv.conf names 127.0.0.53). TEST-NET-1: never real.
        .args(["--dns", "192.0.2.53"])
        .args(match listen_fd {
            Some(_) => ["-H", "fd://"],
            None => ["-H", "unix:///run/docker.sock"],
        })
        .env_clear()
        .env("PATH", crate::exec::DEFAULT_PATH)
        .env("HTTP_PROXY", "http://127.0.0.1:3128")
        .env("HTTPS_PROXY", "http://127.0.0.1:3128")
        .env("NO_PROXY", "localhost,127.0.0.1,::1")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    if let Some(fd) = listen_fd {
        // SAFETY: runs in the forked child before exec and only calls dup2 and
        // fcntl, which are async-signal-safe; `fd` is an open socket owned by
        // the parent, valid in the child's copy of the descriptor table.
        unsafe {
            cmd.pre_exec(move || {
                if fd == 3 {
                    if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let exited = {
        let mut reg = reaper.lock();
        let child = cmd.spawn().context("starting dockerd")?;
        reg.register(child.id())
    };
    log!(
        "dockerd started at {} ms (modules {} ms)",
        crate::sys::uptime_ms(),
        crate::sys::uptime_ms() - t0
    );
    std::thread::spawn(move || {
        if let Ok(status) = exited.blocking_recv() {
            log!("dockerd exited: {status:?}; see {LOG}");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_mode_from_cmdline() {
        assert_eq!(
            Start::from_cmdline("quiet sandpen.docker=boot x"),
            Start::Boot
        );
        assert_eq!(Start::from_cmdline("sandpen.docker=off"), Start::Off);
        assert_eq!(Start::from_cmdline("quiet"), Start::OnDemand);
        assert_eq!(Start::from_cmdline("sandpen.docker=bogus"), Start::OnDemand);
    }
}
