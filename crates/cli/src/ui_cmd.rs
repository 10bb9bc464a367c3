//! `sandpen ui` (alias `serve`): the local web page (docs/ui.md), its API
//! (docs/api.md) served by `sandpen_api::http` on this runtime.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{bail, Result};
use clap::Args;
use sandpen_supervisor::Dirs;

#[derive(Args, Debug)]
pub struct UiArgs {
    /// Address to listen on (default 127.0.0.1 on a free port); loopback only
    #[arg(long, value_name = "IP:PORT")]
    pub listen: Option<SocketAddr>,
    /// Print the address without opening a browser
    #[arg(long)]
    pub no_open: bool,
}

pub async fn run(dirs: Dirs, args: UiArgs) -> Result<i32> {
    let addr = args
        .listen
        .unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0));
    if !addr.ip().is_loopback() {
        bail!(
            "--listen {addr}: the page controls sandboxes and secrets, so it listens on a \
             loopback address only (127.0.0.1 or ::1)"
        );
    }
    let server = sandpen_api::http::Server::bind(dirs, addr).await?;
    let url = server.url();
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "sandpen ui: {url}")?;
        writeln!(
            out,
            "(the address carries this session's key: keep it to yourself; Ctrl-C stops the page)"
        )?;
        out.flush()?;
    }
    if !args.no_open {
        open_browser(&url);
    }
    tokio::select! {
        served = server.serve() => served?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(0)
}

/// `xdg-open URL` where there is a desktop to open it on; quietly nothing
/// elsewhere (the address is printed).
fn open_browser(url: &str) {
    let desktop =
        std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some();
    let Some(xdg_open) = sandpen_vm::which("xdg-open") else {
        return;
    };
    if !desktop {
        return;
    }
    let _ = std::process::Command::new(xdg_open)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
}
