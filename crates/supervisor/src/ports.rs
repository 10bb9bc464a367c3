//! Published ports (`-p [HOST_IP:]HOST_PORT[:GUEST_PORT]`, Docker's syntax):
//! the supervisor listens on the host and carries each accepted connection
//! to the guest over the control channel ([`sandpen_proto::Request::Forward`]).
//!
//! Guarantees (docs/dev-env.md, "Ports, cp and templates"):
//!
//! - Only the sandbox's configuration (`sandbox.json`, written by `create`
//!   or `run -p`) names listeners. The guest can never ask the host to
//!   listen or to connect anywhere: the forward stream is opened by the host,
//!   and the guest only answers it.
//! - Every listener is bound at the start, before the supervisor confines
//!   itself (its Landlock forbids TCP `bind` from then on); a host port that
//!   is taken fails the start with a line naming it.
//! - The listeners close when the supervisor exits (stop, failure).
//! - At most [`MAX_FORWARDED`] forwarded connections are open at once, so
//!   that they never take the control channel's streams from exec and stop.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Forwarded connections open at once, per sandbox: a quarter of the control
/// channel's 256 streams stays for exec, ping, stats and stop.
pub const MAX_FORWARDED: usize = 192;

/// How long the guest has to say whether it reached its port (its own
/// connect gives up after 5 s).
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// One `-p`: where the host listens, and the guest port it reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortMapping {
    pub host_ip: IpAddr,
    pub host_port: u16,
    pub guest_port: u16,
}

impl PortMapping {
    pub fn host_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host_ip, self.host_port)
    }

    /// The mapping as a `-p` value in full: `127.0.0.1:8080:3000`,
    /// `[::1]:8080:3000`.
    pub fn flag(&self) -> String {
        format!("{}:{}", self.host_addr(), self.guest_port)
    }
}

/// Why a `-p` value does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error(
        "expected [HOST_IP:]HOST_PORT[:GUEST_PORT], e.g. 3000, 8080:3000 or 127.0.0.1:8080:3000"
    )]
    Shape,
    #[error("{0:?} is not a port: use 1 to 65535")]
    Port(String),
    #[error("{0:?} is not an IP address")]
    Ip(String),
    #[error("only TCP can be published (there is no UDP out of the sandbox)")]
    NotTcp,
}

fn port(s: &str) -> Result<u16, PortError> {
    match s.parse::<u16>() {
        Ok(p) if p != 0 && !s.starts_with('+') => Ok(p),
        _ => Err(PortError::Port(s.to_string())),
    }
}

fn ip(s: &str) -> Result<IpAddr, PortError> {
    let bare = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    bare.parse().map_err(|_| PortError::Ip(s.to_string()))
}

impl FromStr for PortMapping {
    type Err = PortError;

    /// `3000`, `8080:3000`, `127.0.0.1:8080:3000`, `[::1]:8080:3000`,
    /// `0.0.0.0:3000` (host IP and port, the same port in the guest); a
    /// `/tcp` suffix is accepted, `/udp` refused.
    fn from_str(s: &str) -> Result<Self, PortError> {
        let s = match s.rsplit_once('/') {
            Some((rest, "tcp")) => rest,
            Some((_, "udp" | "sctp")) => return Err(PortError::NotTcp),
            Some(_) => return Err(PortError::Shape),
            None => s,
        };
        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
        // A bracketed IPv6 address first: its colons are not separators.
        let (host_ip, rest) = match s.strip_prefix('[') {
            Some(r) => {
                let (addr, rest) = r.split_once(']').ok_or(PortError::Shape)?;
                let rest = rest.strip_prefix(':').ok_or(PortError::Shape)?;
                (Some(ip(addr)?), rest)
            }
            None => (None, s),
        };
        let parts: Vec<&str> = rest.split(':').collect();
        let (host_ip, host_port, guest_port) = match (host_ip, parts.as_slice()) {
            (Some(a), [h]) => (a, port(h)?, port(h)?),
            (Some(a), [h, g]) => (a, port(h)?, port(g)?),
            (None, [h]) => (local, port(h)?, port(h)?),
            (None, [a, h]) if a.contains('.') => (ip(a)?, port(h)?, port(h)?),
            (None, [h, g]) => (local, port(h)?, port(g)?),
            (None, [a, h, g]) => (ip(a)?, port(h)?, port(g)?),
            _ => return Err(PortError::Shape),
        };
        Ok(PortMapping {
            host_ip,
            host_port,
            guest_port,
        })
    }
}

/// `docker port`'s line: `3000/tcp -> 127.0.0.1:8080`.
impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/tcp -> {}", self.guest_port, self.host_addr())
    }
}

/// Parses a `-p` value for clap: the error text is the reason alone.
pub fn parse_flag(s: &str) -> Result<PortMapping, String> {
    s.parse().map_err(|e: PortError| e.to_string())
}

/// Two mappings on one host address, which the second bind would refuse.
pub fn check_distinct(ports: &[PortMapping]) -> Result<(), crate::SupervisorError> {
    for (i, a) in ports.iter().enumerate() {
        if let Some(b) = ports[..i].iter().find(|b| b.host_addr() == a.host_addr()) {
            return Err(crate::SupervisorError::Invalid(format!(
                "-p: host address {} is published twice (to guest ports {} and {})",
                a.host_addr(),
                b.guest_port,
                a.guest_port
            )));
        }
    }
    Ok(())
}

/// The listeners of a sandbox, bound (and so holding their ports) before the
/// supervisor confines itself.
pub struct Listeners(Vec<(PortMapping, std::net::TcpListener)>);

/// A host port that cannot be had.
#[derive(Debug, thiserror::Error)]
#[error("cannot publish {addr} (-p {}): {cause}", mapping.flag())]
pub struct BindError {
    pub addr: SocketAddr,
    pub mapping: PortMapping,
    pub cause: BindCause,
}

/// Why a listener could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindCause {
    #[error(
        "the host port is already in use (by another sandbox or program; `ss -ltnp` shows \
         which); publish another host port"
    )]
    InUse,
    #[error("this host has no such address")]
    NoSuchAddress,
    #[error("ports below 1024 need root")]
    Privileged,
    #[error("{0}")]
    Other(std::io::Error),
}

impl From<std::io::Error> for BindCause {
    fn from(e: std::io::Error) -> BindCause {
        match e.kind() {
            std::io::ErrorKind::AddrInUse => BindCause::InUse,
            std::io::ErrorKind::AddrNotAvailable => BindCause::NoSuchAddress,
            std::io::ErrorKind::PermissionDenied => BindCause::Privileged,
            _ => BindCause::Other(e),
        }
    }
}

impl Listeners {
    /// Binds every mapping. A port in use is named with what to do.
    pub fn bind(ports: &[PortMapping]) -> Result<Listeners, BindError> {
        let mut out = Vec::new();
        for m in ports {
            let addr = m.host_addr();
            let failed = |e: std::io::Error| BindError {
                addr,
                mapping: *m,
                cause: e.into(),
            };
            let listener = std::net::TcpListener::bind(addr).map_err(failed)?;
            listener.set_nonblocking(true).map_err(failed)?;
            out.push((*m, listener));
        }
        Ok(Listeners(out))
    }

    /// Serves every listener until the returned tasks are aborted (the
    /// supervisor's end). Each accepted connection opens one forward stream.
    pub fn serve(self, mux: sandpen_proto::mux::MuxHandle) -> Vec<tokio::task::JoinHandle<()>> {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_FORWARDED));
        self.0
            .into_iter()
            .filter_map(|(m, l)| match tokio::net::TcpListener::from_std(l) {
                Ok(l) => Some((m, l)),
                Err(e) => {
                    tracing::warn!("port {m}: {e}");
                    None
                }
            })
            .map(|(m, listener)| {
                let (mux, slots) = (mux.clone(), slots.clone());
                tokio::spawn(accept_loop(m, listener, mux, slots))
            })
            .collect()
    }
}

async fn accept_loop(
    m: PortMapping,
    listener: tokio::net::TcpListener,
    mux: sandpen_proto::mux::MuxHandle,
    slots: Arc<tokio::sync::Semaphore>,
) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => {
                // Out of descriptors, say: do not spin.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("port {m}: {MAX_FORWARDED} connections are open; refusing {peer}");
            continue;
        };
        let mux = mux.clone();
        tokio::spawn(async move {
            if let Err(e) = forward(conn, m.guest_port, &mux).await {
                tracing::debug!("port {m}: connection from {peer}: {e}");
            }
            drop(slot);
        });
    }
}

/// One accepted connection, carried to the guest's port.
async fn forward(
    mut conn: tokio::net::TcpStream,
    guest_port: u16,
    mux: &sandpen_proto::mux::MuxHandle,
) -> Result<(), crate::SupervisorError> {
    use sandpen_proto::frame::FrameStream;
    use sandpen_proto::{ForwardReply, Request};
    let stream = mux.open().await?;
    let mut frames = FrameStream::new(stream);
    frames.send(&Request::Forward { port: guest_port }).await?;
    // A guest that never answers must not hold a connection slot for ever.
    let reply = tokio::time::timeout(
        REPLY_TIMEOUT,
        frames.expect::<ForwardReply>("the forward reply"),
    )
    .await
    .map_err(|_| {
        crate::SupervisorError::Boot(format!("the guest did not answer within {REPLY_TIMEOUT:?}"))
    })??;
    match reply {
        ForwardReply::Connected => {}
        ForwardReply::Failed { message } => {
            // The client sees the connection close, as with nothing listening.
            return Err(crate::SupervisorError::Boot(message));
        }
    }
    let (mut guest, early) = frames.into_parts();
    if !early.is_empty() {
        tokio::io::AsyncWriteExt::write_all(&mut conn, &early)
            .await
            .map_err(|e| crate::SupervisorError::io("relaying to the client", e))?;
    }
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut guest).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<(String, u16, u16), String> {
        parse_flag(s).map(|m| (m.host_ip.to_string(), m.host_port, m.guest_port))
    }

    #[test]
    fn docker_forms_parse() {
        assert_eq!(p("3000").unwrap(), ("127.0.0.1".into(), 3000, 3000));
        assert_eq!(p("8080:3000").unwrap(), ("127.0.0.1".into(), 8080, 3000));
        assert_eq!(
            p("0.0.0.0:8080:3000").unwrap(),
            ("0.0.0.0".into(), 8080, 3000)
        );
        assert_eq!(
            p("127.0.0.2:3000").unwrap(),
            ("127.0.0.2".into(), 3000, 3000)
        );
        assert_eq!(p("[::1]:8080:3000").unwrap(), ("::1".into(), 8080, 3000));
        assert_eq!(p("[::]:3000").unwrap(), ("::".into(), 3000, 3000));
        assert_eq!(
            p("8080:3000/tcp").unwrap(),
            ("127.0.0.1".into(), 8080, 3000)
        );
    }

    #[test]
    fn bad_input_says_why() {
        assert_eq!(p("0").unwrap_err(), "\"0\" is not a port: use 1 to 65535");
        assert_eq!(
            p("70000").unwrap_err(),
            "\"70000\" is not a port: use 1 to 65535"
        );
        assert_eq!(
            p("http").unwrap_err(),
            "\"http\" is not a port: use 1 to 65535"
        );
        assert_eq!(
            p("+80").unwrap_err(),
            "\"+80\" is not a port: use 1 to 65535"
        );
        assert_eq!(
            p("1.2.3:80:80").unwrap_err(),
            "\"1.2.3\" is not an IP address"
        );
        assert_eq!(p("[::1:80").unwrap_err(), PortError::Shape.to_string());
        assert_eq!(p("a:b:c:d").unwrap_err(), PortError::Shape.to_string());
        assert_eq!(p("").unwrap_err(), "\"\" is not a port: use 1 to 65535");
        assert_eq!(p("53/udp").unwrap_err(), PortError::NotTcp.to_string());
        assert_eq!(p("53/xyz").unwrap_err(), PortError::Shape.to_string());
        // An unbracketed IPv6 address is ambiguous, as in Docker.
        assert!(p("::1:80:80").is_err());
    }

    #[test]
    fn docker_port_style() {
        let m: PortMapping = "8080:3000".parse().unwrap();
        assert_eq!(m.to_string(), "3000/tcp -> 127.0.0.1:8080");
        let m: PortMapping = "[::1]:8080:3000".parse().unwrap();
        assert_eq!(m.to_string(), "3000/tcp -> [::1]:8080");
        assert_eq!(m.flag(), "[::1]:8080:3000");
        assert_eq!(m.flag().parse::<PortMapping>().unwrap(), m);
    }

    #[test]
    fn a_taken_port_is_named() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let m: PortMapping = port.to_string().parse().unwrap();
        let err = Listeners::bind(&[m]).err().unwrap().to_string();
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
        assert!(err.contains("already in use"), "{err}");
    }

    #[test]
    fn one_host_address_twice_is_refused() {
        let a: PortMapping = "8080:3000".parse().unwrap();
        let b: PortMapping = "8080:4000".parse().unwrap();
        let c: PortMapping = "0.0.0.0:8080:4000".parse().unwrap();
        assert!(check_distinct(&[a, b]).is_err());
        assert!(check_distinct(&[a, c]).is_ok());
    }
}
