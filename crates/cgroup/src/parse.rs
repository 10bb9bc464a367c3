//! Parsers for the kernel's cgroup files. Each takes the file's text and
//! returns typed values; a malformed line is skipped, never a panic.

use std::path::{Path, PathBuf};

/// One line of `/proc/PID/cgroup`: `ID:CONTROLLERS:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// Empty for the v2 line (`0::/path`).
    pub controllers: Vec<String>,
    pub path: String,
}

pub fn proc_cgroup(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            Some(Membership {
                controllers: controllers
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(String::from)
                    .collect(),
                path: path.to_string(),
            })
        })
        .collect()
}

/// A cgroup file system mount from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    /// The part of the hierarchy mounted (`/` outside containers).
    pub root: String,
    pub mount_point: PathBuf,
    pub v2: bool,
    /// v1: the controllers of this hierarchy (`cpu`, `memory`, ...).
    pub controllers: Vec<String>,
}

/// The cgroup and cgroup2 mounts. mountinfo fields: `ID PARENT MAJ:MIN ROOT
/// MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS`; paths have
/// spaces etc. escaped as octal (`\040`).
pub fn mountinfo(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let fstype = *right.first()?;
            let v2 = match fstype {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return None,
            };
            let controllers = if v2 {
                vec![]
            } else {
                right
                    .get(2)?
                    .split(',')
                    .filter(|o| {
                        !matches!(
                            *o,
                            "rw" | "ro"
                                | "xattr"
                                | "noprefix"
                                | "clone_children"
                                | "cpuset_v2_mode"
                        ) && !o.contains('=')
                    })
                    .map(String::from)
                    .collect()
            };
            Some(CgroupMount {
                root: unescape(left.get(3)?),
                mount_point: PathBuf::from(unescape(left.get(4)?)),
                v2,
                controllers,
            })
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where a process's cgroup `path` (from `/proc/PID/cgroup`) is in a mount
/// whose root is `mount_root`: `None` when the mount does not show it.
pub fn dir_in_mount(mount_point: &Path, mount_root: &str, path: &str) -> Option<PathBuf> {
    let rel = if mount_root == "/" {
        path
    } else {
        let rest = path.strip_prefix(mount_root)?;
        if !rest.is_empty() && !rest.starts_with('/') {
            return None;
        }
        rest
    };
    let rel = rel.trim_start_matches('/');
    if rel.split('/').any(|c| c == "..") {
        return None;
    }
    Some(if rel.is_empty() {
        mount_point.to_path_buf()
    } else {
        mount_point.join(rel)
    })
}

/// The value of `KEY VALUE` in a flat-keyed file (`cpu.stat`, `memory.stat`,
/// `memory.events`, `pids.events`, v1's `memory.oom_control`).
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut it = line.split_whitespace();
        (it.next()? == key).then_some(())?;
        it.next()?.parse().ok()
    })
}

/// A single number (`memory.current`, `pids.current`, `cpuacct.usage`);
/// `max` reads as `None`.
pub fn single(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// v2 `io.stat`: `MAJ:MIN rbytes=N wbytes=N rios=N ...` per device; the sums
/// of read and written bytes.
pub fn io_stat(text: &str) -> (u64, u64) {
    let (mut read, mut written) = (0u64, 0u64);
    for line in text.lines() {
        for field in line.split_whitespace().skip(1) {
            match field.split_once('=') {
                Some(("rbytes", v)) => read = read.saturating_add(v.parse().unwrap_or(0)),
                Some(("wbytes", v)) => written = written.saturating_add(v.parse().unwrap_or(0)),
                _ => {}
            }
        }
    }
    (read, written)
}

/// v1 `blkio.throttle.io_service_bytes`: `MAJ:MIN Read N`, `MAJ:MIN Write
/// N`, ... and a `Total N` line; the sums of read and written bytes.
pub fn blkio_bytes(text: &str) -> (u64, u64) {
    let (mut read, mut written) = (0u64, 0u64);
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let [_dev, op, n] = f[..] {
            let n: u64 = n.parse().unwrap_or(0);
            match op {
                "Read" => read = read.saturating_add(n),
                "Write" => written = written.saturating_add(n),
                _ => {}
            }
        }
    }
    (read, written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_cgroup_lines() {
        let m = proc_cgroup(
            "9:name=systemd:/\n4:memory:/process_api/21a0\n2:cpu,cpuacct:/user.slice\n0::/\nbad\n",
        );
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].controllers, ["memory"]);
        assert_eq!(m[1].path, "/process_api/21a0");
        assert_eq!(m[2].controllers, ["cpu", "cpuacct"]);
        assert!(m[3].controllers.is_empty());
        assert_eq!(m[3].path, "/");
    }

    #[test]
    fn mountinfo_finds_v1_and_v2() {
        let text = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
42 31 0:39 /ctr /sys/fs/cgroup/cpu\\040acct rw,relatime shared:5 - cgroup cgroup rw,cpu,cpuacct
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
";
        let m = mountinfo(text);
        assert_eq!(m.len(), 5);
        assert_eq!(m[0].controllers, ["cpu"]);
        assert!(m[2].controllers.is_empty(), "name=systemd is no controller");
        assert_eq!(m[3].mount_point, Path::new("/sys/fs/cgroup/cpu acct"));
        assert_eq!(m[3].root, "/ctr");
        assert_eq!(m[3].controllers, ["cpu", "cpuacct"]);
        assert!(m[4].v2);
    }

    #[test]
    fn paths_inside_mounts() {
        let mp = Path::new("/sys/fs/cgroup/memory");
        assert_eq!(
            dir_in_mount(mp, "/", "/process_api/x").unwrap(),
            mp.join("process_api/x")
        );
        assert_eq!(dir_in_mount(mp, "/", "/").unwrap(), mp);
        assert_eq!(dir_in_mount(mp, "/ctr", "/ctr/a").unwrap(), mp.join("a"));
        assert_eq!(dir_in_mount(mp, "/ctr", "/ctr").unwrap(), mp);
        assert_eq!(dir_in_mount(mp, "/ctr", "/ctrl/a"), None);
        assert_eq!(dir_in_mount(mp, "/ctr", "/other"), None);
        assert_eq!(dir_in_mount(mp, "/", "/../etc"), None);
    }

    #[test]
    fn usage_files() {
        assert_eq!(
            keyed("usage_usec 1234\nuser_usec 1000\n", "usage_usec"),
            Some(1234)
        );
        assert_eq!(keyed("user_usec 1000\n", "usage_usec"), None);
        assert_eq!(
            keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", "oom_kill"),
            Some(3)
        );
        assert_eq!(single("4096\n"), Some(4096));
        assert_eq!(single("max\n"), None);
        assert_eq!(
            io_stat("8:0 rbytes=100 wbytes=20 rios=1 wios=2\n253:1 rbytes=5 wbytes=1 dbytes=0\n"),
            (105, 21)
        );
        assert_eq!(io_stat(""), (0, 0));
        assert_eq!(
            blkio_bytes("8:0 Read 4096\n8:0 Write 512\n8:0 Sync 0\n8:16 Read 4\n8:0 Total 4608\nTotal 4612\n"),
            (4100, 512)
        );
    }
}
