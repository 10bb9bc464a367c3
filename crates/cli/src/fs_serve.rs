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
