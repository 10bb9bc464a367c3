//! `sandpen stats`: like `docker stats`, each running sandbox's CPU, memory,
//! disk I/O, host tasks and egress rate, refreshed every second; and the
//! usage columns of `ls`.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use sandpen_supervisor::control::{self, State};
use sandpen_supervisor::resources::Stats;
use sandpen_supervisor::{sandbox, Dirs};
use serde::Serialize;

/// Bytes as `512B`, `1.5K`, `612.0M`, `2.5G` (powers of 1024, like `docker stats`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

/// CPU % (100 = one whole CPU) between two readings of a CPU-time counter
/// (µs) taken `wall` apart.
pub fn cpu_percent(before_usec: u64, after_usec: u64, wall: Duration) -> f64 {
    let wall_us = wall.as_micros() as f64;
    if wall_us <= 0.0 {
        return 0.0;
    }
    after_usec.saturating_sub(before_usec) as f64 * 100.0 / wall_us
}

/// Bytes per second between two readings of a byte counter.
pub fn rate(before: u64, after: u64, wall: Duration) -> u64 {
    let secs = wall.as_secs_f64();
    if secs <= 0.0 {
        return 0;
    }
    (after.saturating_sub(before) as f64 / secs) as u64
}

/// One sandbox in `stats`.
#[derive(Debug, Serialize)]
struct Row {
    name: String,
    cpu_percent: Option<f64>,
    cpu_limit: Option<f64>,
    memory_bytes: Option<u64>,
    memory_limit_bytes: Option<u64>,
    io_read_bytes: Option<u64>,
    io_write_bytes: Option<u64>,
    pids: Option<u64>,
    pids_limit: Option<u64>,
    egress_up_bytes_per_sec: u64,
    egress_down_bytes_per_sec: u64,
    egress_up_bytes: u64,
    egress_down_bytes: u64,
    guest_tasks: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disk_full: Option<String>,
    /// Why limits are not applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    limits_note: Option<String>,
}

fn row(name: &str, before: Option<&(Instant, Stats)>, now: &(Instant, Stats)) -> Row {
    let (t1, s) = now;
    let wall = before.map(|(t0, _)| t1.duration_since(*t0));
    let prev = before.map(|(_, p)| p);
    Row {
        name: name.to_string(),
        cpu_percent: match (prev.and_then(|p| p.usage.cpu_usec), s.usage.cpu_usec, wall) {
            (Some(a), Some(b), Some(w)) => Some(cpu_percent(a, b, w)),
            _ => None,
        },
        cpu_limit: s.limits.map(|l| l.cpus()),
        memory_bytes: s.usage.memory_bytes,
        memory_limit_bytes: s.limits.map(|l| l.memory_max),
        io_read_bytes: s.usage.io_read_bytes,
        io_write_bytes: s.usage.io_write_bytes,
        pids: s.usage.pids,
        pids_limit: s.limits.map(|l| l.pids_max),
        egress_up_bytes_per_sec: match (prev, wall) {
            (Some(p), Some(w)) => rate(p.egress_up_bytes, s.egress_up_bytes, w),
            _ => 0,
        },
        egress_down_bytes_per_sec: match (prev, wall) {
            (Some(p), Some(w)) => rate(p.egress_down_bytes, s.egress_down_bytes, w),
            _ => 0,
        },
        egress_up_bytes: s.egress_up_bytes,
        egress_down_bytes: s.egress_down_bytes,
        guest_tasks: s.guest.map(|g| g.tasks),
        disk_full: s.disk_full.map(|d| d.to_string()),
        limits_note: s.note.clone(),
    }
}

fn opt(v: Option<String>) -> String {
    v.unwrap_or_else(|| "-".into())
}

fn table(rows: &[Row]) -> Vec<[String; 8]> {
    let mut out = vec![[
        "NAME".to_string(),
        "CPU %".into(),
        "MEM USAGE / LIMIT".into(),
        "MEM %".into(),
        "DISK READ / WRITE".into(),
        "PIDS".into(),
        "NET UP / DOWN".into(),
        "NOTE".into(),
    ]];
    for r in rows {
        let mem = match (r.memory_bytes, r.memory_limit_bytes) {
            (Some(m), Some(l)) => format!("{} / {}", human_bytes(m), human_bytes(l)),
            (Some(m), None) => format!("{} / -", human_bytes(m)),
            _ => "-".into(),
        };
        let mem_pct = match (r.memory_bytes, r.memory_limit_bytes) {
            (Some(m), Some(l)) if l > 0 => format!("{:.1}%", m as f64 * 100.0 / l as f64),
            _ => "-".into(),
        };
        let io = match (r.io_read_bytes, r.io_write_bytes) {
            (Some(rd), Some(wr)) => format!("{} / {}", human_bytes(rd), human_bytes(wr)),
            _ => "-".into(),
        };
        let pids = match (r.pids, r.pids_limit) {
            (Some(p), Some(l)) => format!("{p} / {l}"),
            (Some(p), None) => p.to_string(),
            _ => "-".into(),
        };
        let note = [r.disk_full.clone(), r.limits_note.clone()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join("; ");
        out.push([
            r.name.clone(),
            opt(r.cpu_percent.map(|c| format!("{c:.1}%"))),
            mem,
            mem_pct,
            io,
            pids,
            format!(
                "{}/s / {}/s",
                human_bytes(r.egress_up_bytes_per_sec),
                human_bytes(r.egress_down_bytes_per_sec)
            ),
            if note.is_empty() { "-".into() } else { note },
        ]);
    }
    out
}

/// `sandpen stats [NAME...] [--no-stream] [--json]`.
pub async fn run(dirs: &Dirs, names: Vec<String>, no_stream: bool, json: bool) -> Result<i32> {
    let names = if names.is_empty() {
        let mut running = Vec::new();
        for c in sandbox::list(dirs)? {
            if matches!(
                control::state(&dirs.sandbox(&c.name)).await,
                State::Running(_)
            ) {
                running.push(c.name);
            }
        }
        running
    } else {
        for n in &names {
            sandbox::load(dirs, n)?;
        }
        names
    };
    if names.is_empty() {
        bail!("no sandbox is running");
    }
    let clear = !no_stream && !json && std::io::stdout().is_terminal();
    let sample = |names: Vec<String>| async move {
        let mut out = Vec::new();
        for n in names {
            let s = control::stats(&dirs.sandbox(&n)).await.ok();
            out.push((n, s.map(|s| (Instant::now(), s))));
        }
        out
    };
    let mut prev = sample(names.clone()).await;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = sample(names.clone()).await;
        let rows: Vec<Row> = now
            .iter()
            .zip(&prev)
            .filter_map(|((n, s), (_, p))| s.as_ref().map(|s| row(n, p.as_ref(), s)))
            .collect();
        let mut stdout = std::io::stdout().lock();
        if json {
            let _ = writeln!(stdout, "{}", serde_json::to_string(&rows)?);
        } else {
            if clear {
                let _ = write!(stdout, "\x1b[2J\x1b[H");
            }
            drop(stdout);
            crate::commands::print_table(&table(&rows));
            for n in now.iter().filter(|(_, s)| s.is_none()).map(|(n, _)| n) {
                println!("{n}: not running");
            }
        }
        let _ = std::io::stdout().flush();
        if no_stream {
            return Ok(0);
        }
        prev = now;
    }
}

/// The usage columns `ls` shows for a running sandbox: CPU time, memory in
/// use of its limit, host tasks of its limit.
pub fn ls_columns(s: &Stats) -> [String; 3] {
    let cpu = s
        .usage
        .cpu_usec
        .map(|us| format!("{:.1}s", us as f64 / 1e6))
        .unwrap_or_else(|| "-".into());
    let mem = match (s.usage.memory_bytes, s.limits) {
        (Some(m), Some(l)) => format!("{}/{}", human_bytes(m), human_bytes(l.memory_max)),
        (Some(m), None) => human_bytes(m),
        _ => "-".into(),
    };
    let pids = match (s.usage.pids, s.limits) {
        (Some(p), Some(l)) => format!("{p}/{}", l.pids_max),
        (Some(p), None) => p.to_string(),
        _ => "-".into(),
    };
    [cpu, mem, pids]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_percentages() {
        assert_eq!(cpu_percent(0, 1_000_000, Duration::from_secs(1)), 100.0);
        assert_eq!(cpu_percent(0, 500_000, Duration::from_secs(2)), 25.0);
        // A counter that went back (a new cgroup) is 0, not a wrap-around.
        assert_eq!(cpu_percent(10, 5, Duration::from_secs(1)), 0.0);
        assert_eq!(cpu_percent(0, 5, Duration::ZERO), 0.0);
        assert_eq!(rate(1000, 3048, Duration::from_secs(2)), 1024);
        assert_eq!(rate(5, 1, Duration::from_secs(1)), 0);
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(1536), "1.5K");
        assert_eq!(human_bytes((2048 + 512) << 20), "2.5G");
    }
}
