//! `sandpen fs-serve`: the file server of one share, as a process of its own
//! (started by the supervisor, one per share; see crates/fs).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use sandpen_policy::LabelStore;

#[derive(Args, Debug, Clone)]
pub struct FsServeArgs {
    /// The vhost-user socket to listen on
    #[arg(long)]
    pub socket: PathBuf,
    /// The folder to serve
    #[arg(long)]
    pub root: PathBuf,
    /// The guest user that stands for the invoking host user
    #[arg(long)]
    pub guest_uid: u32,
    #[arg(long)]
    pub guest_gid: u32,
    /// The sandbox's name (for the audit log)
    #[arg(long, default_value = "")]
    pub sandbox: String,
    /// Where denied operations and label changes are appended
    #[arg(long)]
    pub files_log: Option<PathBuf>,
    /// The sandbox's flow label file
    #[arg(long)]
    pub flow_state: Option<PathBuf>,
    /// The file rules, as JSON ([{kind, pattern, source}])
    #[arg(long, default_value = "[]")]
    pub rules: String,
    /// Refuse every change (`--mount PATH:ro`)
    #[arg(long)]
    pub all_read_only: bool,
    /// Keep this much free on the flow label folder's file system: writes
    /// that would go below get ENOSPC (`1GiB`, `5%`, `default`, `0`)
    #[arg(long)]
    pub reserve: Option<String>,
}

pub fn main(args: &FsServeArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SANDPEN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    match serve(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", crate::commands::one_line(&e));
            ExitCode::from(crate::EXIT_SANDPEN_ERROR)
        }
    }
}

fn serve(args: &FsServeArgs) -> Result<()> {
    let rules = sandpen_fs::rules_from_json(&args.rules)?.with_all_read_only(args.all_read_only);
    let labels = args.flow_state.clone().map(LabelStore::at);
    // The label folder is the one place outside the share the server
    // writes to once confined; it must exist before (the supervisor makes
    // it, this covers a server started by hand).
    let mut state_dirs = Vec::new();
    if let Some(store) = &labels {
        let dir = store.dir();
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the flow label folder {}", dir.display()))?;
        state_dirs.push(dir.to_path_buf());
    }
    let reserve = match (&args.reserve, state_dirs.first()) {
        (Some(spec), Some(dir)) => {
            let r = sandpen_policy::Reserve::parse(spec).map_err(anyhow::Error::msg)?;
            let reserve = sandpen_fs::reserve::DiskReserve::open(dir, r)
                .with_context(|| format!("measuring the free space of {}", dir.display()))?;
            let (floor, avail) = reserve.status()?;
            tracing::info!(
                "disk reserve {r}: writes through the share stop while less than {} MiB is free on the state folder's file system ({} MiB free now)",
                floor >> 20,
                avail >> 20
            );
            Some(Arc::new(reserve))
        }
        (Some(_), None) => anyhow::bail!("--reserve needs --flow-state (the folder it protects)"),
        (None, _) => None,
    };
    let events = sandpen_fs::Events::new(&args.sandbox, args.files_log.as_deref(), labels)
        .context("opening the file audit log")?;
    let cfg = sandpen_fs::ServeConfig {
        root: args.root.clone(),
        socket: args.socket.clone(),
        rules,
        ids: sandpen_fs::IdMap {
            guest_uid: args.guest_uid,
            guest_gid: args.guest_gid,
            host_uid: nix::unistd::getuid().as_raw(),
            host_gid: nix::unistd::getgid().as_raw(),
        },
        events: Arc::new(events),
        reserve,
        confine: Some(sandpen_fs::ConfineSpec {
            read_only: args.all_read_only,
            state_dirs,
        }),
    };
    tracing::info!(root = %cfg.root.display(), "serving");
    sandpen_fs::serve(cfg)?;
    tracing::info!("QEMU disconnected; exiting");
    Ok(())
}
