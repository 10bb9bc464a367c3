//! Small system helpers: mounts, power-off, device waits.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::mount::{mount, MsFlags};

use crate::log;

pub fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    std::fs::create_dir_all(target).with_context(|| format!("mkdir {target}"))?;
    mount(Some(source), target, Some(fstype), flags, data)
        .with_context(|| format!("mount {fstype} {source} on {target}"))
}

/// Waits for a device node to appear (devtmpfs creates it when the driver binds).
pub fn wait_for(path: &Path, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > timeout {
            anyhow::bail!("{} did not appear within {:?}", path.display(), timeout);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // reboot(2) does not return on success; if it failed, there is nothing left to do.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Stops every other process, flushes and unmounts what it can, and powers off.
pub fn shutdown_and_power_off() -> ! {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    log!("shutting down");
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && other_processes_remain() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    // Let the killed processes close their files before / goes read-only.
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline && other_processes_remain() {
        std::thread::sleep(Duration::from_millis(10));
    }
    nix::unistd::sync();
    for m in crate::setup::mounted_shares() {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
    if let Err(e) = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        log!("remounting / read-only failed: {e}");
    }
    power_off()
}

/// True while any process other than PID 1 and kernel threads is alive.
fn other_processes_remain() -> bool {
    // Reap whatever has exited so it does not count.
    while let Ok(status) = nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG))
    {
        if status == nix::sys::wait::WaitStatus::StillAlive {
            break;
        }
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            return false;
        };
        // Kernel threads have an empty cmdline.
        pid != 1
            && std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| !c.is_empty())
                .unwrap_or(false)
    })
}

pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The root file system's size and free space, and the task count, for the
/// host's `ls` and `stats` (zeros where a figure cannot be read).
pub fn usage() -> sandpen_proto::GuestUsage {
    let (total, free, avail) = nix::sys::statvfs::statvfs("/")
        .map(|s| {
            let f = s.fragment_size();
            (
                s.blocks().saturating_mul(f),
                s.blocks_free().saturating_mul(f),
                s.blocks_available().saturating_mul(f),
            )
        })
        .unwrap_or((0, 0, 0));
    sandpen_proto::GuestUsage {
        root_total_bytes: total,
        root_free_bytes: free,
        root_avail_bytes: avail,
        tasks: std::fs::read_to_string("/proc/loadavg")
            .ok()
            .as_deref()
            .and_then(loadavg_tasks)
            .unwrap_or(0),
    }
}

/// The task count of `/proc/loadavg` (`0.00 0.01 0.05 1/123 4567`: 123).
fn loadavg_tasks(s: &str) -> Option<u64> {
    s.split_whitespace().nth(3)?.split_once('/')?.1.parse().ok()
}

pub fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|x| x.parse::<f64>().ok())
        })
        .map(|secs| (secs * 1000.0) as u64)
        .unwrap_or(0)
}

/// The process that holds the TCP socket whose local port is `port`
/// Lookups of the process behind an egress client's source port, started
/// when the guest's listeners accept its connection ([`start_process_lookup`])
/// so that the process is found while its socket is still open, and
/// answered to the host's `Request::Process` ([`process_for_port`]).
/// Kept [`LOOKUP_KEEP`]; plumbing, like everything PID 1 says about
/// processes (docs/egress.md, "Audit log").
type Lookup = tokio::sync::watch::Receiver<Option<Option<String>>>;
static LOOKUPS: std::sync::Mutex<Option<std::collections::HashMap<u16, (Instant, Lookup)>>> =
    std::sync::Mutex::new(None);
/// How long a lookup's answer is kept for the host to ask.
const LOOKUP_KEEP: Duration = Duration::from_secs(10);
/// Lookups scanning `/proc` at once; the others queue.
static SCANS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

fn lookups(
) -> std::sync::MutexGuard<'static, Option<std::collections::HashMap<u16, (Instant, Lookup)>>> {
    match LOOKUPS.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Start finding the process whose socket has local port `port` (a new
/// egress connection's client), replacing an older lookup for the port.
pub fn start_process_lookup(port: u16) {
    if port == 0 {
        return;
    }
    let (tx, rx) = tokio::sync::watch::channel(None);
    {
        let mut map = lookups();
        let map = map.get_or_insert_with(Default::default);
        let now = Instant::now();
        map.retain(|_, (at, _)| now.duration_since(*at) < LOOKUP_KEEP);
        map.insert(port, (now, rx));
    }
    tokio::spawn(async move {
        let Ok(_scan) = SCANS.acquire().await else {
            return;
        };
        let found = tokio::task::spawn_blocking(move || process_of_port(port))
            .await
            .ok()
            .flatten();
        let _ = tx.send(Some(found));
    });
}

/// The process behind `port`: the answer of the lookup started when its
/// connection was accepted; `None` without one (a container's connection,
/// whose port names nothing in this network namespace, or one older than
/// [`LOOKUP_KEEP`]): a lookup now could name an unrelated process that
/// happens to hold the same local port.
pub async fn process_for_port(port: u16) -> Option<String> {
    let started = lookups()
        .as_ref()
        .and_then(|m| m.get(&port))
        .filter(|(at, _)| at.elapsed() < LOOKUP_KEEP)
        .map(|(_, rx)| rx.clone());
    match started {
        Some(mut rx) => {
            let found = match rx.wait_for(Option::is_some).await {
                Ok(v) => v.clone().flatten(),
                Err(_) => None,
            };
            found
        }
        None => None,
    }
}

/// (`pid 1234 curl -sS https://...`, its command line clipped to 200
/// bytes), found through `/proc/net/tcp{,6}` and every process's `fd`
/// folder. `None` when no socket or no process matches (a container's
/// socket is in another network namespace). Plumbing for the host's
/// `policy pending`: a hostile guest may make it say anything.
pub fn process_of_port(port: u16) -> Option<String> {
    if port == 0 {
        return None;
    }
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .find_map(|table| {
            let text = std::fs::read_to_string(table).ok()?;
            text.lines().skip(1).find_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let local_port = f.get(1)?.rsplit(':').next()?;
                let inode = f.get(9)?;
                (u16::from_str_radix(local_port, 16).ok()? == port && *inode != "0")
                    .then(|| inode.to_string())
            })
        })?;
    let wanted = format!("socket:[{inode}]");
    // Newest first: the client of a connection that just opened is most
    // often a process that just started (curl, pip), and it must be found
    // before it exits.
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|d| d.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable_by(|a, b| b.cmp(a));
    for pid in pids {
        let proc_dir = std::path::PathBuf::from(format!("/proc/{pid}"));
        let Ok(fds) = std::fs::read_dir(proc_dir.join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == wanted.as_str())
        });
        if holds {
            let cmdline = std::fs::read(proc_dir.join("cmdline")).unwrap_or_default();
            let mut cmd: String = String::from_utf8_lossy(&cmdline)
                .split('\0')
                .filter(|a| !a.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            if cmd.is_empty() {
                cmd = std::fs::read_to_string(proc_dir.join("comm"))
                    .unwrap_or_default()
                    .trim()
                    .to_string();
            }
            if cmd.len() > 200 {
                let mut end = 200;
                while !cmd.is_char_boundary(end) {
                    end -= 1;
                }
                cmd.truncate(end);
            }
            return Some(format!("pid {pid} {cmd}"));
        }
    }
    None
}

#[cfg(test)]
mod usage_tests {
    #[test]
    fn task_count_from_loadavg() {
        assert_eq!(
            super::loadavg_tasks("0.00 0.01 0.05 1/123 4567\n"),
            Some(123)
        );
        assert_eq!(super::loadavg_tasks("garbage"), None);
    }
}
