//! `sandpen-request`: an agent asks the user, on the host, for a
//! destination or a file rule exception, with a reason (docs/policy.md,
//! "Requests from inside").
//!
//! Two halves, both plumbing:
//!
//! - **PID 1** listens on [`SOCKET`] (any guest user may connect). For each
//!   client it reads one [`GuestRequest`] frame (bounded), opens a stream
//!   on the egress channel with [`GuestOpen::Request`], and hands the host's
//!   [`RequestOutcome`] back. It forwards only requests: nothing it can
//!   send answers one, and no rule is decided here.
//! - **The command** (`sandpen-request`, the same binary installed at
//!   [`INSTALLED`] at setup, chosen by its name): parses the arguments,
//!   sends the request, prints the outcome, and exits 0 when it was
//!   approved (or is already allowed), 1 when it was not, 2 on bad usage.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sandpen_proto::frame::{read_one, FrameStream};
use sandpen_proto::mux::MuxHandle;
use sandpen_proto::{EgressAccepted, GuestOpen, GuestRequest, RequestOutcome};
use tokio::net::{UnixListener, UnixStream};

use crate::log;

/// Where PID 1 listens.
pub const SOCKET: &str = "/run/sandpen/request.sock";
/// Where the command is installed (on every user's PATH).
pub const INSTALLED: &str = "/usr/local/bin/sandpen-request";
/// Largest request frame accepted from a guest process.
const MAX_REQUEST: usize = 8 * 1024;
/// Requests relayed at once; more clients wait in the listen backlog.
const MAX_AT_ONCE: usize = 32;

const USAGE: &str = "usage:
  sandpen-request network HOST:PORT \"why you need it\"
  sandpen-request file read|write PATH \"why you need it\"
  sandpen-request --why HOST      (why was the last connection to HOST refused?)";

/// Copy this binary to [`INSTALLED`] unless the same bytes are there.
pub fn install() {
    let result = (|| -> Result<()> {
        let me = std::fs::read("/proc/self/exe").context("reading /proc/self/exe")?;
        if std::fs::read(INSTALLED).is_ok_and(|there| there == me) {
            return Ok(());
        }
        let tmp = format!("{INSTALLED}.new");
        std::fs::create_dir_all("/usr/local/bin")?;
        std::fs::write(&tmp, &me).with_context(|| format!("writing {tmp}"))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, INSTALLED).with_context(|| format!("installing {INSTALLED}"))?;
        Ok(())
    })();
    if let Err(e) = result {
        log!("sandpen-request not installed: {e:#}");
    }
}

/// PID 1: relay requests from guest processes to the host.
pub fn start(mux: MuxHandle) -> Result<()> {
    std::fs::create_dir_all("/run/sandpen")?;
    std::fs::set_permissions("/run/sandpen", std::fs::Permissions::from_mode(0o755))?;
    let _ = std::fs::remove_file(SOCKET);
    let listener = UnixListener::bind(SOCKET).with_context(|| format!("binding {SOCKET}"))?;
    std::fs::set_permissions(SOCKET, std::fs::Permissions::from_mode(0o666))?;
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_AT_ONCE));
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            let mux = mux.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _ = relay(mux, client).await;
            });
        }
    });
    Ok(())
}

async fn relay(mux: MuxHandle, mut client: UnixStream) -> Result<()> {
    let req: GuestRequest =
        tokio::time::timeout(Duration::from_secs(10), read_one(&mut client, MAX_REQUEST))
            .await
            .context("the client sent nothing")??;
    let outcome = ask_host(&mux, req).await?;
    let mut client = FrameStream::new(client);
    client.send(&outcome).await?;
    Ok(())
}

/// One request to the host, on a stream of its own: its outcome.
pub async fn ask_host(mux: &MuxHandle, req: GuestRequest) -> Result<RequestOutcome> {
    let stream = mux.open().await?;
    let mut host = FrameStream::new(stream);
    host.send(&GuestOpen::Request(req)).await?;
    let _: EgressAccepted = host.expect("the host's acknowledgement").await?;
    Ok(host.expect("the host's answer").await?)
}

/// Parse the command's arguments (without the program name).
pub fn parse_args(args: &[String]) -> Result<GuestRequest> {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["--why", host] | ["why", host] => Ok(GuestRequest::Why {
            host: host.to_string(),
        }),
        ["network", target, reason @ ..] if !reason.is_empty() => {
            let (host, port) = split_target(target)?;
            Ok(GuestRequest::Network {
                host,
                port,
                reason: reason.join(" "),
            })
        }
        ["file", access @ ("read" | "write"), path, reason @ ..] if !reason.is_empty() => {
            Ok(GuestRequest::File {
                path: absolute(path),
                write: *access == "write",
                reason: reason.join(" "),
            })
        }
        _ => bail!("{USAGE}"),
    }
}

/// `host:port`, `[v6]:port`; the port is required.
fn split_target(t: &str) -> Result<(String, u16)> {
    let (host, port) = if let Some(rest) = t.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").context("expected [ADDRESS]:PORT")?;
        (h, p)
    } else {
        t.rsplit_once(':')
            .context("expected HOST:PORT (the port is required: 443 for https)")?
    };
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .with_context(|| format!("bad port `{port}` in {t}"))?;
    if host.is_empty() {
        bail!("no host in {t}");
    }
    Ok((host.to_string(), port))
}

fn absolute(path: &str) -> String {
    if path.starts_with('/') {
        return path.to_string();
    }
    match std::env::current_dir() {
        Ok(d) => d.join(path).to_string_lossy().into_owned(),
        Err(_) => path.to_string(),
    }
}

/// The command: exit status 0 approved (or allowed), 1 not, 2 usage.
pub fn main(args: Vec<String>) -> i32 {
    let req = match parse_args(&args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sandpen-request: {e}");
            return 2;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sandpen-request: {e}");
            return 2;
        }
    };
    let waits = !matches!(req, GuestRequest::Why { .. });
    rt.block_on(async {
        let mut conn = match UnixStream::connect(SOCKET).await {
            Ok(c) => FrameStream::new(c),
            Err(e) => {
                eprintln!("sandpen-request: cannot reach sandpen's PID 1 at {SOCKET}: {e}");
                return 2;
            }
        };
        if conn.send(&req).await.is_err() {
            eprintln!("sandpen-request: the request could not be sent");
            return 2;
        }
        if waits {
            print!("waiting for the user… ");
            let _ = std::io::stdout().flush();
        }
        match conn.expect::<RequestOutcome>("the answer").await {
            Ok(RequestOutcome::Approved { always, global }) => {
                let how = match (always, global) {
                    (true, true) => "always, global scope",
                    (true, false) => "always, sandbox scope",
                    (false, _) => "once",
                };
                println!("approved ({how})");
                0
            }
            Ok(RequestOutcome::Denied { reason }) => {
                println!("denied ({reason})");
                1
            }
            Ok(RequestOutcome::Decided { allowed, text }) => {
                println!("{text}");
                i32::from(!allowed)
            }
            Ok(RequestOutcome::Why { text }) => {
                print!("{text}");
                0
            }
            Ok(RequestOutcome::Invalid { why }) => {
                println!("refused: {why}");
                2
            }
            Err(e) => {
                println!("no answer: {e}");
                1
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn arguments_become_one_request() {
        assert_eq!(
            parse_args(&args(&["network", "pypi.org:443", "install", "requests"])).unwrap(),
            GuestRequest::Network {
                host: "pypi.org".into(),
                port: 443,
                reason: "install requests".into()
            }
        );
        assert_eq!(
            parse_args(&args(&["network", "[2001:db8::1]:22", "x"])).unwrap(),
            GuestRequest::Network {
                host: "2001:db8::1".into(),
                port: 22,
                reason: "x".into()
            }
        );
        assert_eq!(
            parse_args(&args(&[
                "file",
                "read",
                "/w/.env.example",
                "the keys' names"
            ]))
            .unwrap(),
            GuestRequest::File {
                path: "/w/.env.example".into(),
                write: false,
                reason: "the keys' names".into()
            }
        );
        assert_eq!(
            parse_args(&args(&["--why", "pypi.org"])).unwrap(),
            GuestRequest::Why {
                host: "pypi.org".into()
            }
        );
        for bad in [
            &["network", "pypi.org", "no port"][..],
            &["network", "pypi.org:443"],
            &["network", "pypi.org:0", "x"],
            &["file", "exec", "/x", "y"],
            &["approve", "7"],
            &[],
        ] {
            assert!(parse_args(&args(bad)).is_err(), "{bad:?}");
        }
    }
}
