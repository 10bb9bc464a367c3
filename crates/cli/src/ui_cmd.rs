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

/// Opens the page where there is a desktop to open it on; quietly nothing
/// elsewhere (the address is printed). The browser is handed a file, not
/// the URL: a process's arguments are readable by every local user (in
/// `/proc`), and a browser started by `xdg-open` keeps its arguments for
/// its whole life. The file (0600, in the user's runtime folder) sends the
/// browser on to the URL and is removed a minute later.
fn open_browser(url: &str) {
    let desktop =
        std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some();
    let Some(xdg_open) = sandpen_vm::which("xdg-open") else {
        return;
    };
    if !desktop {
        return;
    }
    let Some(file) = redirect_file(url) else {
        return;
    };
    let _ = std::process::Command::new(xdg_open)
        .arg(&file)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(60));
        let _ = std::fs::remove_file(file);
    });
}

/// A page that only redirects to `url`, readable by this user alone.
fn redirect_file(url: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(std::path::PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let port = url.rsplit(':').next()?.split('/').next()?;
    let path = dir.join(format!("sandpen-ui-{port}.html"));
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .ok()?;
    // The URL is ours: digits, hex and fixed text, nothing to escape.
    write!(
        f,
        "<!doctype html><meta charset=utf-8><meta http-equiv=refresh content=\"0;url={url}\">\
         <title>sandpen</title><a href=\"{url}\">Open sandpen</a>"
    )
    .ok()?;
    Some(path)
}
