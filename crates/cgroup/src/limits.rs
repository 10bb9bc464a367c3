//! The limits of one sandbox, from its `--cpus` and `--memory`
//! (docs/architecture.md, "Resource limits").

use serde::{Deserialize, Serialize};

/// The CFS period every quota is expressed in (the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;

/// Host memory a sandbox may use beyond its guest RAM. The figure and its
/// parts are in docs/architecture.md ("Resource limits"): TCG's translation
/// cache (32 MiB, `sandpen_vm::qemu::TCG_TB_SIZE_MIB`), QEMU's own heap and
/// mappings (an idle sandbox uses 56.2 MiB beyond guest RAM, the cache
/// included: docs/benchmarks.md), the supervisor (12 MiB idle, plus at most
/// 256 MiB of channel windows a hostile guest can make it hold), the file
/// servers (8 MiB idle each; their inode and handle tables are capped), and
/// page cache, which the kernel reclaims at the limit rather than failing.
pub const MEMORY_OVERHEAD_MIB: u64 = 512;

/// Tasks (processes and threads) of the sandbox's host side: the supervisor
/// and its runtime threads, QEMU (one thread per vCPU, up to 64 I/O worker
/// threads, RCU and the main loop) and each file server's threads. A guest
/// cannot make the host fork: this bounds a compromised QEMU or file server.
pub const PIDS_MAX: u64 = 1024;

/// cgroup v2 `io.weight` (1..=10000, default 100): under contention a
/// sandbox's disk I/O gets half of what a default group gets, so the user's
/// own work comes first.
pub const IO_WEIGHT: u16 = 50;

/// What one sandbox may take from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// CPU time per [`Limits::cpu_period_us`]: `--cpus` whole CPUs.
    pub cpu_quota_us: u64,
    pub cpu_period_us: u64,
    /// Bytes: guest RAM plus [`MEMORY_OVERHEAD_MIB`].
    pub memory_max: u64,
    pub pids_max: u64,
    /// On cgroup v2's scale (1..=10000, default 100); v1's `blkio.weight`
    /// gets the same share of its default (see [`Limits::blkio_weight`]).
    pub io_weight: u16,
}

impl Limits {
    /// The limits of a sandbox with `cpus` vCPUs and `memory_mib` of guest RAM.
    pub fn for_sandbox(cpus: u32, memory_mib: u32) -> Limits {
        Limits {
            cpu_quota_us: u64::from(cpus.max(1)) * CPU_PERIOD_US,
            cpu_period_us: CPU_PERIOD_US,
            memory_max: (u64::from(memory_mib) + MEMORY_OVERHEAD_MIB) << 20,
            pids_max: PIDS_MAX,
            io_weight: IO_WEIGHT,
        }
    }

    /// The quota in CPUs (1.0 = one whole CPU).
    pub fn cpus(&self) -> f64 {
        self.cpu_quota_us as f64 / self.cpu_period_us.max(1) as f64
    }

    /// v2's `cpu.max`: `QUOTA PERIOD`.
    pub fn cpu_max(&self) -> String {
        format!("{} {}", self.cpu_quota_us, self.cpu_period_us)
    }

    /// v1's `blkio.weight` (10..=1000, default 500): the v2 weight scaled so
    /// that a default weight maps to a default weight.
    pub fn blkio_weight(&self) -> u64 {
        (u64::from(self.io_weight) * 5).clamp(10, 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_become_a_quota_and_memory_gets_the_overhead() {
        let l = Limits::for_sandbox(1, 2048);
        assert_eq!(l.cpu_quota_us, 100_000);
        assert_eq!(l.cpu_max(), "100000 100000");
        assert_eq!(l.cpus(), 1.0);
        assert_eq!(l.memory_max, (2048 + 512) << 20);
        let l = Limits::for_sandbox(4, 512);
        assert_eq!(l.cpu_max(), "400000 100000");
        assert_eq!(l.memory_max, 1024 << 20);
        assert_eq!(l.pids_max, 1024);
        // Zero vCPUs is refused by create; the quota never becomes 0 (which
        // v1 would refuse and v2 would read as no CPU at all).
        assert_eq!(Limits::for_sandbox(0, 128).cpu_quota_us, 100_000);
    }

    #[test]
    fn io_weight_maps_between_versions() {
        let l = Limits::for_sandbox(2, 1024);
        assert_eq!(l.io_weight, 50);
        assert_eq!(l.blkio_weight(), 250);
        let default = Limits {
            io_weight: 100,
            ..l
        };
        assert_eq!(default.blkio_weight(), 500);
        let huge = Limits {
            io_weight: 10_000,
            ..l
        };
        assert_eq!(huge.blkio_weight(), 1000);
    }
}
