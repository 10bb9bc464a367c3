//! `sandpen`: arguments and output. The work is done by the library crates.

mod attach;
mod commands;
mod cp_cmd;
mod fs_serve;
mod policy_cmd;
mod secret_cmd;
mod stats_cmd;
mod ui_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Exit status for sandpen's own errors (Docker's convention).
pub const EXIT_SANDPEN_ERROR: u8 = 125;

#[derive(Parser)]
#[command(
    name = "sandpen",
    version,
    about = "Run AI coding agents unsupervised in a microVM per workspace",
    long_about = None,
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone, Debug)]
pub struct CreateArgs {
    /// Name of the sandbox (default: from the workspace folder)
    #[arg(long)]
    pub name: Option<String>,
    /// Virtual CPUs, and the host CPU time the sandbox may use (a quota of
    /// as many CPUs; `SANDPEN_LIMITS=off` starts it without limits)
    #[arg(long, default_value_t = sandpen_supervisor::sandbox::DEFAULT_CPUS)]
    pub cpus: u32,
    /// Guest memory, e.g. 2G or 512M (the sandbox's host memory limit is
    /// this plus 512 MiB)
    #[arg(long, default_value = "2G")]
    pub memory: String,
    /// Disk size of the sandbox in GiB (copy-on-write; grows as used, never
    /// past it: a full disk shows as `disk full` in `ls`)
    #[arg(long, default_value_t = sandpen_supervisor::sandbox::DEFAULT_DISK_GIB)]
    pub disk: u32,
    /// Image to boot (default: the agent's image, built on first use; "default" for shell)
    #[arg(long)]
    pub image: Option<String>,
    /// Accelerator: auto, kvm or tcg
    #[arg(long, env = "SANDPEN_ACCEL", default_value = "auto")]
    pub accel: String,
    /// Resolve NAME to IP in the egress proxy, like `docker run --add-host`
    /// (also permits that address, even in a blocked range)
    #[arg(long = "add-host", value_name = "NAME:IP")]
    pub add_hosts: Vec<String>,
    /// When the sandbox's own Docker engine starts: on-demand (first use of
    /// the docker socket), boot, or off
    #[arg(long, default_value = "on-demand")]
    pub docker: String,
    /// Share another host folder at the same path, read-write or `:ro`
    /// (served with the same file rules as the workspace)
    #[arg(long = "mount", value_name = "PATH[:ro]")]
    pub mounts: Vec<String>,
    /// Also trust this CA (PEM) for upstreams that the proxy re-encrypts to
    /// on credential hosts (private upstreams, tests)
    #[arg(long = "upstream-ca", value_name = "FILE")]
    pub upstream_cas: Vec<PathBuf>,
    /// Refuse to start when a layer of QEMU's jail (namespaces, Landlock,
    /// seccomp, capabilities) cannot be had on this host
    #[arg(long, env = "SANDPEN_REQUIRE_JAIL")]
    pub require_jail: bool,
    /// Publish a guest port on the host, like `docker run -p`: the host
    /// listens (on 127.0.0.1 unless HOST_IP says otherwise) and carries each
    /// connection to GUEST_PORT (default HOST_PORT) on the guest's loopback
    #[arg(
        short = 'p',
        long = "publish",
        value_name = "[HOST_IP:]HOST_PORT[:GUEST_PORT]",
        value_parser = sandpen_supervisor::ports::parse_flag
    )]
    pub ports: Vec<sandpen_supervisor::ports::PortMapping>,
}

#[derive(Subcommand)]
enum Command {
    /// Create the workspace's sandbox if missing, start it, and attach to it
    Run {
        /// What to run: shell (default), claude, codex, gemini, kiro, opencode; or a workspace path
        agent: Option<String>,
        /// Workspace folder (default: the current directory)
        workspace: Option<PathBuf>,
        #[command(flatten)]
        create: CreateArgs,
        /// Command (for shell) or agent arguments, after --
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Create a sandbox for a workspace without starting it
    Create {
        /// Workspace folder (default: the current directory)
        workspace: Option<PathBuf>,
        #[command(flatten)]
        create: CreateArgs,
    },
    /// Start a stopped sandbox
    Start { name: String },
    /// Stop a running sandbox (the guest shuts down cleanly)
    Stop {
        name: String,
        /// Seconds to wait before forcing it off
        #[arg(short, long, default_value_t = 30)]
        time: u64,
    },
    /// Remove sandboxes and everything they stored
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
        /// Stop running ones first
        #[arg(short, long)]
        force: bool,
    },
    /// List sandboxes
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Live resource usage of running sandboxes: CPU, memory, disk I/O,
    /// host tasks and the egress rate, refreshed every second
    Stats {
        /// Sandboxes (default: every running one)
        names: Vec<String>,
        /// Print once and exit
        #[arg(long)]
        no_stream: bool,
        /// One JSON array per refresh
        #[arg(long)]
        json: bool,
    },
    /// Show a sandbox's console log
    Logs {
        name: String,
        /// Keep printing new lines
        #[arg(short, long)]
        follow: bool,
        /// The supervisor's log instead of the guest console
        #[arg(long)]
        supervisor: bool,
    },
    /// The sandbox's published ports, like `docker port`: GUEST/tcp -> HOST_IP:HOST_PORT
    Ports {
        name: String,
        /// Only this guest port
        guest_port: Option<u16>,
    },
    /// Copy files or folders between a running sandbox and the host, like
    /// `docker cp`: `NAME:/path host/path` or `host/path NAME:/path`
    /// (a guest path without a leading / is taken from the workspace)
    Cp {
        /// NAME:PATH or a host path
        src: String,
        /// NAME:PATH or a host path
        dest: String,
    },
    /// Make an image of a stopped sandbox's disk (a template for
    /// `run --image`); its manifest names the image it came from
    Save {
        /// The sandbox
        name: String,
        /// The new image's name
        image: String,
    },
    /// Run a command in a running sandbox
    Exec {
        /// Keep stdin open
        #[arg(short, long)]
        interactive: bool,
        /// Allocate a terminal
        #[arg(short, long)]
        tty: bool,
        /// User name or uid (default: agent)
        #[arg(short, long)]
        user: Option<String>,
        /// Working directory (default: the workspace)
        #[arg(short, long)]
        workdir: Option<String>,
        /// Environment variables
        #[arg(short, long = "env", value_name = "K=V")]
        env: Vec<String>,
        name: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Build, list and remove images
    #[command(subcommand)]
    Image(ImageCommand),
    /// Network policy: rules, modes, checks and the log
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCommand),
    /// Flow labels: what the sandbox has touched (secret-read, untrusted-input)
    #[command(subcommand)]
    Flow(FlowCommand),
    /// Secrets the proxy puts in place of the guest's placeholder
    #[command(subcommand)]
    Secret(secret_cmd::SecretCommand),
    /// The development environment a workspace asks for (toolchains, devcontainer.json)
    #[command(subcommand)]
    Env(EnvCommand),
    /// The host's toolchain cache: downloaded archives and the trees unpacked from them
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Check this host: QEMU, KVM or TCG, file server, image tools
    Doctor,
    /// The local web page: first run, sandboxes with a terminal, the live
    /// network log, policy and secrets (prints and opens its address, stays
    /// in the foreground)
    #[command(alias = "serve")]
    Ui(ui_cmd::UiArgs),
    /// Internal: the per-sandbox supervisor process
    #[command(hide = true)]
    Supervise { name: String },
    /// Internal: the file server of one share (started by the supervisor)
    #[command(hide = true)]
    FsServe(fs_serve::FsServeArgs),
    /// Internal: QEMU's jail launcher (started by the supervisor)
    #[command(name = "__jail", hide = true)]
    Jail,
}

#[derive(Subcommand)]
pub enum EnvCommand {
    /// What would be provisioned and why, file by file
    Plan {
        /// The workspace (default: the current directory)
        path: Option<std::path::PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum CacheCommand {
    /// What it holds: each archive (its URL) and tree (in use or not), and the total
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove the trees no sandbox or image uses (remade when needed)
    Prune {
        /// Also every tree and every downloaded archive (fetched again when
        /// needed); sandboxes and images keep the trees they use
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
pub enum FlowCommand {
    /// The labels a sandbox carries: LABEL, SET-AT, BY (path or host)
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Clear every label (egress is no longer narrowed)
    Reset { name: String },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build an image (a no-op when its inputs have not changed)
    Build {
        /// Image name (default: "default", or the agents' names joined by '-')
        #[arg(long)]
        name: Option<String>,
        /// Add an agent: claude, codex, gemini, opencode, kiro (repeatable).
        /// Agent images carry Node, Docker and build tools too.
        #[arg(long = "agent", value_name = "AGENT")]
        agents: Vec<String>,
        /// Debian suite
        #[arg(long)]
        suite: Option<String>,
        /// Debian mirror
        #[arg(long)]
        mirror: Option<String>,
        /// Extra Debian packages
        #[arg(long = "package", value_name = "PKG")]
        packages: Vec<String>,
        /// Fetch a vendor release (kiro) for NAME from IP instead: a mirror
        /// standing in for the vendor (its certificate must be valid for NAME)
        #[arg(long = "add-host", value_name = "NAME:IP")]
        add_hosts: Vec<String>,
        /// Also trust this CA (PEM) for those downloads (not in the image)
        #[arg(long = "upstream-ca", value_name = "FILE")]
        upstream_cas: Vec<PathBuf>,
    },
    /// List images
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove an image
    Rm { name: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Supervise { name } = &cli.command {
        return commands::supervise(name);
    }
    if let Command::FsServe(args) = &cli.command {
        return fs_serve::main(args);
    }
    if let Command::Jail = &cli.command {
        // Returns only when the jail or the program's start failed.
        return ExitCode::from(sandpen_supervisor::jail::launcher_main() as u8);
    }
    if let Command::Run { create, .. } | Command::Create { create, .. } = &cli.command {
        if create.require_jail {
            // The supervisor this command may start checks it too, for a
            // sandbox created without the flag.
            std::env::set_var("SANDPEN_REQUIRE_JAIL", "1");
        }
    }
    // Like other Unix tools, end quietly when the reader of our output goes
    // away (`sandpen ls | head`). Not for the supervisor above, whose stdout
    // pipe closes once the starting CLI has read "ready".
    // SAFETY: restoring a signal's default disposition at start-up, before any
    // other thread exists; no handler is installed.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SANDPEN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sandpen: error: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_SANDPEN_ERROR);
        }
    };
    let result = rt.block_on(commands::dispatch(cli.command));
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sandpen: error: {}", commands::one_line(&e));
            i32::from(EXIT_SANDPEN_ERROR)
        }
    };
    // Stdin may be held by a blocking reader thread; do not wait for it.
    rt.shutdown_background();
    ExitCode::from(code.clamp(0, 255) as u8)
}
