//! The QEMU command line of a sandbox VM.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::Accel;

/// QEMU's own seccomp filter: no obsolete syscalls, no privilege changes, no
/// spawning, no resource-control calls.
pub const SECCOMP: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Where the serial console goes.
#[derive(Debug, Clone)]
pub enum Console {
    /// Appended to a file by QEMU (unbounded: only for short-lived VMs).
    File(PathBuf),
    /// A unix socket QEMU listens on; the supervisor copies it into a log it
    /// caps, since the guest can write to its console without end.
    Socket(Socket),
}

/// Where QEMU finds one of its unix sockets.
#[derive(Debug, Clone)]
pub enum Socket {
    /// QEMU binds (a server chardev) or connects to (a client) this path.
    Path(PathBuf),
    /// A descriptor QEMU inherits: a listening socket for a server chardev,
    /// a connected one for a client. The jailed QEMU makes no socket of its
    /// own (docs/architecture.md, "QEMU's jail").
    Fd(i32),
}

impl Socket {
    /// The chardev option that names it.
    fn option(&self) -> String {
        match self {
            Socket::Path(p) => format!("path={}", p.display()),
            Socket::Fd(fd) => format!("fd={fd}"),
        }
    }
}

/// TCG translation-cache size (MiB), for the software-emulation path only.
/// QEMU's default grows to hundreds of MiB per VM; 16 MiB made the guest
/// retranslate constantly (process starts took twice as long); 32 MiB costs
/// little speed.
pub const TCG_TB_SIZE_MIB: u32 = 32;

/// TCG threading mode, `$SANDPEN_TCG_THREAD`: `multi` (the default: one host
/// thread per vCPU) or `single` (every vCPU of the VM in turn on one host
/// thread). Under `multi`, QEMU 7.2 can let the guest kernel die with `Oops:
/// int3` while it patches its own text (e.g. as runc makes a cpuset cgroup);
/// `single` removed that oops in the soak, but the soak still saw another
/// one, and Docker's on-demand start timed out under it, so it is not the
/// default yet (docs/architecture.md, "TCG and kernel text patching").
pub fn tcg_thread() -> &'static str {
    match std::env::var("SANDPEN_TCG_THREAD").as_deref() {
        Ok("single") => "single",
        _ => "multi",
    }
}

/// A vhost-user-fs share: the guest mounts `tag`; the file server listens on `socket`.
#[derive(Debug, Clone)]
pub struct FsShare {
    pub tag: String,
    pub socket: Socket,
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub name: String,
    pub accel: Accel,
    pub cpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disk: PathBuf,
    /// The control port's socket ([`sandpen_proto::PORT_NAME`]).
    pub channel_socket: Socket,
    /// The egress port's socket ([`sandpen_proto::EGRESS_PORT_NAME`]).
    pub egress_socket: Socket,
    pub qmp_socket: Socket,
    pub console: Console,
    pub shares: Vec<FsShare>,
    /// Extra kernel command-line words (benchmarks use `sandpen.bare`).
    pub extra_cmdline: Vec<String>,
    /// Host TSC frequency. Under TCG the guest cannot calibrate its clock on
    /// microvm without it and hangs at boot.
    pub tsc_khz: Option<u64>,
}

impl VmConfig {
    pub fn kernel_cmdline(&self) -> String {
        let mut words = vec![
            "console=ttyS0",
            "quiet",
            "panic=-1",
            "mitigations=off",
            "cryptomgr.notests",
            "8250.nr_uarts=1",
            "random.trust_cpu=on",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        if self.accel == Accel::Tcg {
            if let Some(khz) = self.tsc_khz {
                words.push(format!("tsc_early_khz={khz}"));
                words.push("tsc=reliable".into());
            }
        }
        words.extend(self.extra_cmdline.iter().cloned());
        words.join(" ")
    }

    /// Arguments for `qemu-system-x86_64`.
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(OsString::from(s));
        let mem = format!("{}M", self.memory_mib);
        push("-name");
        push(&format!(
            "sandpen-{},process=sandpen-qemu-{}",
            self.name, self.name
        ));
        push("-M");
        push("microvm,x-option-roms=off,pit=off,pic=off,rtc=on,acpi=on,memory-backend=mem");
        // qboot loads the kernel from fw_cfg itself. Named, because the
        // default `bios-microvm.bin` is qboot in Debian's QEMU 7.2 but SeaBIOS
        // in its QEMU 10, which without option ROMs finds no bootable disk
        // (docs/architecture.md, "TCG and kernel text patching").
        push("-bios");
        push("qboot.rom");
        push("-object");
        push(&format!("memory-backend-memfd,id=mem,size={mem},share=on"));
        push("-m");
        push(&mem);
        push("-smp");
        push(&self.cpus.to_string());
        match self.accel {
            Accel::Kvm => {
                push("-accel");
                push("kvm");
                push("-cpu");
                push("host");
            }
            Accel::Tcg => {
                // Bound the translation cache: QEMU's default grows to hundreds of
                // MiB of host memory per VM. The threading mode: see
                // `tcg_thread` (docs/architecture.md, "TCG and kernel text
                // patching").
                push("-accel");
                push(&format!(
                    "tcg,tb-size={TCG_TB_SIZE_MIB},thread={}",
                    tcg_thread()
                ));
                // Every instruction set extension TCG can emulate. The default
                // (qemu64) has no SSE4.2 or AVX2, and agents' native binaries
                // (Claude Code is a Bun executable built for x86-64-v3) die
                // with SIGILL on it.
                push("-cpu");
                push("max");
            }
        }
        for s in [
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-sandbox",
            SECCOMP,
        ] {
            push(s);
        }
        push("-chardev");
        push(&match &self.console {
            Console::File(path) => format!("file,id=console,path={},append=on", path.display()),
            Console::Socket(socket) => {
                format!("socket,id=console,{},server=on,wait=off", socket.option())
            }
        });
        push("-serial");
        push("chardev:console");
        push("-kernel");
        push(&self.kernel.to_string_lossy());
        push("-initrd");
        push(&self.initrd.to_string_lossy());
        push("-append");
        push(&self.kernel_cmdline());
        // A write the host cannot do (its file system is full) fails in the
        // guest with an I/O error: QEMU's default (`werror=enospc`) pauses
        // the VM until someone resumes it, which nobody would. The guest's
        // own limit is the overlay's virtual size (`--disk`).
        push("-drive");
        push(&format!(
            "file={},format=qcow2,if=none,id=root,discard=unmap,cache=writeback,werror=report,rerror=report",
            self.disk.display()
        ));
        push("-device");
        push("virtio-blk-device,drive=root");
        // Entropy: without it the guest's getrandom blocks where the CPU has no RDRAND.
        push("-device");
        push("virtio-rng-device");
        push("-device");
        push("virtio-serial-device,id=vser0");
        // Two ports, so that control never shares fate with egress (see
        // docs/architecture.md, "Host <-> guest protocol").
        for (id, socket, name) in [
            ("channel", &self.channel_socket, sandpen_proto::PORT_NAME),
            (
                "egress",
                &self.egress_socket,
                sandpen_proto::EGRESS_PORT_NAME,
            ),
        ] {
            push("-chardev");
            push(&format!(
                "socket,id={id},{},server=on,wait=off",
                socket.option()
            ));
            push("-device");
            push(&format!(
                "virtserialport,bus=vser0.0,chardev={id},name={name}"
            ));
        }
        for (i, share) in self.shares.iter().enumerate() {
            push("-chardev");
            push(&format!("socket,id=fs{i},{}", share.socket.option()));
            push("-device");
            push(&format!(
                "vhost-user-fs-device,chardev=fs{i},tag={}",
                share.tag
            ));
        }
        push("-chardev");
        push(&format!(
            "socket,id=qmp,{},server=on,wait=off",
            self.qmp_socket.option()
        ));
        push("-mon");
        push("chardev=qmp,mode=control");
        a
    }
}

/// The host's TSC frequency in kHz, from the kernel log line or /proc/cpuinfo.
pub fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    parse_cpu_mhz(&cpuinfo)
}

fn parse_cpu_mhz(cpuinfo: &str) -> Option<u64> {
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    Some((mhz * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(accel: Accel) -> VmConfig {
        VmConfig {
            name: "demo".into(),
            accel,
            cpus: 2,
            memory_mib: 1024,
            kernel: "/img/vmlinux".into(),
            initrd: "/img/initrd.img".into(),
            disk: "/s/disk.qcow2".into(),
            channel_socket: Socket::Fd(4),
            egress_socket: Socket::Path("/s/run/egress.sock".into()),
            qmp_socket: Socket::Fd(5),
            console: Console::Socket(Socket::Fd(6)),
            shares: vec![FsShare {
                tag: "workspace".into(),
                socket: Socket::Fd(7),
            }],
            tsc_khz: Some(2_596_134),
            extra_cmdline: vec![],
        }
    }

    fn joined(c: &VmConfig) -> String {
        c.args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn no_network_device_and_seccomp_on() {
        let line = joined(&config(Accel::Tcg));
        assert!(line.contains("-nodefaults"));
        assert!(!line.contains("netdev") && !line.contains("virtio-net") && !line.contains("-nic"));
        assert!(line.contains(&format!("-sandbox {SECCOMP}")));
        assert!(line.contains("vhost-user-fs-device,chardev=fs0,tag=workspace"));
        assert!(line.contains("virtserialport,bus=vser0.0,chardev=channel,name=sandpen "));
        assert!(line.contains("virtserialport,bus=vser0.0,chardev=egress,name=sandpen-egress"));
        assert!(line.contains("memory-backend-memfd,id=mem,size=1024M,share=on"));
        // A full host file system is an error in the guest, not a paused VM.
        assert!(line.contains(",werror=report,rerror=report"));
        // The firmware that boots the kernel itself, whatever QEMU calls its default.
        assert!(line.contains("-bios qboot.rom"));
    }

    #[test]
    fn sockets_by_descriptor_or_path() {
        let line = joined(&config(Accel::Tcg));
        assert!(line.contains("-chardev socket,id=channel,fd=4,server=on,wait=off"));
        assert!(line.contains("-chardev socket,id=egress,path=/s/run/egress.sock,server=on"));
        assert!(line.contains(
            "-chardev socket,id=qmp,fd=5,server=on,wait=off -mon chardev=qmp,mode=control"
        ));
        assert!(line.contains("-chardev socket,id=console,fd=6,server=on"));
        assert!(line.contains("-chardev socket,id=fs0,fd=7 "));
    }

    #[test]
    fn accel_specific_options() {
        let tcg = config(Accel::Tcg);
        assert!(joined(&tcg).contains(&format!(
            "-accel tcg,tb-size={TCG_TB_SIZE_MIB},thread={} -cpu max",
            tcg_thread()
        )));
        // Agents' native binaries need x86-64-v3 (AVX2), which qemu64 lacks.
        assert!(joined(&tcg).contains("-cpu max"));
        assert!(tcg.kernel_cmdline().contains("tsc_early_khz=2596134"));
        let kvm = config(Accel::Kvm);
        assert!(joined(&kvm).contains("-accel kvm -cpu host"));
        // The TCG-only threading mode never reaches a KVM command line.
        assert!(!joined(&kvm).contains("thread="));
        assert!(!joined(&kvm).contains("tcg"));
        assert!(!kvm.kernel_cmdline().contains("tsc_early_khz"));
    }

    #[test]
    fn cpu_mhz_parsing() {
        assert_eq!(
            parse_cpu_mhz("model\t: x\ncpu MHz\t\t: 2596.134\n"),
            Some(2_596_134)
        );
        assert_eq!(parse_cpu_mhz("nothing"), None);
    }
}
