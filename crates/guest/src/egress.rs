//! The guest's way out, all plumbing: a DNS stub that hands out synthetic
//! addresses (its answers are `sandpen_guest::dns`), an nftables redirect of every outgoing TCP connection to a
//! transparent listener, and an HTTP proxy port. Each accepted connection becomes
//! one stream to the host, where the policy is decided. Nothing here decides.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use sandpen_guest::dns::{handle, FakeDns, Handled};
use sandpen_proto::frame::{read_one, FrameStream};
use sandpen_proto::mux::MuxHandle;
use sandpen_proto::{
    EgressAccepted, EgressMode, EgressOpen, GuestOpen, GuestRequest, RequestOutcome,
    EGRESS_ACCEPTED_MAX,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::log;
use crate::nftables::{Chain, ChainType, InetHook, Rule, Table};

pub const DNS_STUB: &str = "127.0.0.53:53";
/// Where containers' DNS queries are redirected to (any local address).
pub const BRIDGE_DNS_PORT: u16 = 15053;
pub const TRANSPARENT_PORT: u16 = 15001;
pub const HTTP_PROXY_PORT: u16 = 3128;
/// `TXT` questions waiting for the host at once; more get no reply.
const MAX_WHY_AT_ONCE: usize = 8;
/// How long a `TXT` question waits for the host (clients retry after 5 s).
const WHY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4);

/// Installs the route and the nftables redirect. Slow-ish (the kernel loads the
/// nf_tables modules), so it runs at boot in parallel with the handshake.
pub fn prepare() -> tokio::task::JoinHandle<Result<()>> {
    tokio::task::spawn_blocking(install_redirect)
}

/// Starts the stub and both listeners, once [`prepare`] is done.
pub async fn start(mux: MuxHandle, prepared: tokio::task::JoinHandle<Result<()>>) -> Result<()> {
    prepared.await.context("installing the redirect")??;
    let table = Arc::new(Mutex::new(FakeDns::default()));
    std::fs::write("/etc/resolv.conf", "nameserver 127.0.0.53\noptions edns0\n")
        .context("writing /etc/resolv.conf")?;
    let dns = UdpSocket::bind(DNS_STUB)
        .await
        .context("binding the DNS stub")?;
    let bridge_dns = UdpSocket::bind(("0.0.0.0", BRIDGE_DNS_PORT))
        .await
        .context("binding the DNS stub for containers")?;
    // `TXT` questions wait for the host (docs/egress.md, "The guest
    // side"); at most this many at once, the others get no reply.
    let whys = Arc::new(tokio::sync::Semaphore::new(MAX_WHY_AT_ONCE));
    for socket in [dns, bridge_dns] {
        let (t, m, whys) = (table.clone(), mux.clone(), whys.clone());
        let socket = Arc::new(socket);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1500];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                match handle(&buf[..n], &t) {
                    Some(Handled::Reply(reply)) => {
                        let _ = socket.send_to(&reply, peer).await;
                    }
                    Some(Handled::Why(why)) => {
                        let Ok(permit) = whys.clone().try_acquire_owned() else {
                            continue;
                        };
                        let (m, socket) = (m.clone(), socket.clone());
                        tokio::spawn(async move {
                            let _permit = permit;
                            let req = GuestRequest::Why {
                                host: why.host.clone(),
                            };
                            let asked = crate::request::ask_host(&m, req);
                            let text = match tokio::time::timeout(WHY_TIMEOUT, asked).await {
                                Ok(Ok(RequestOutcome::Why { text })) => Some(text),
                                Ok(Ok(RequestOutcome::Invalid { why })) => {
                                    Some(format!("sandpen: {why}\n"))
                                }
                                _ => None,
                            };
                            if let Some(reply) = why.reply(text.as_deref()) {
                                let _ = socket.send_to(&reply, peer).await;
                            }
                        });
                    }
                    None => {}
                }
            }
        });
    }

    let transparent = TcpListener::bind(("0.0.0.0", TRANSPARENT_PORT))
        .await
        .context("binding the transparent listener")?;
    let (m, t) = (mux.clone(), table.clone());
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = transparent.accept().await else {
                continue;
            };
            let (m, t) = (m.clone(), t.clone());
            tokio::spawn(async move {
                let Some(dst) = original_destination(&conn) else {
                    return;
                };
                let host = t
                    .lock()
                    .ok()
                    .and_then(|t| t.name_of(*dst.ip()).map(str::to_string))
                    .unwrap_or_else(|| dst.ip().to_string());
                relay(m, conn, EgressMode::Transparent, host, dst.port()).await;
            });
        }
    });

    let proxy = TcpListener::bind(("127.0.0.1", HTTP_PROXY_PORT))
        .await
        .context("binding the HTTP proxy listener")?;
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = proxy.accept().await else {
                continue;
            };
            let m = mux.clone();
            tokio::spawn(relay(m, conn, EgressMode::HttpProxy, String::new(), 0));
        }
    });
    Ok(())
}

/// Whether `ip` is in Docker's address pools (a container's connection).
fn from_container(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            (o[0] == 172 && (16..32).contains(&o[1])) || (o[0] == 192 && o[1] == 168)
        }
        std::net::IpAddr::V6(_) => false,
    }
}

/// The address a redirected connection was meant for (`SO_ORIGINAL_DST`).
fn original_destination(conn: &TcpStream) -> Option<SocketAddrV4> {
    let addr = nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::OriginalDst).ok()?;
    let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
    Some(SocketAddrV4::new(ip, u16::from_be(addr.sin_port)))
}

async fn relay(mux: MuxHandle, mut conn: TcpStream, mode: EgressMode, host: String, port: u16) {
    let peer = conn.peer_addr().ok();
    let src_port = peer.map_or(0, |a| a.port());
    // The client's process, looked up now while its socket is open (the
    // host asks for it for the log). A container's client is in another
    // network namespace, where its port names nothing of ours.
    if peer.is_some_and(|a| !from_container(a.ip())) {
        crate::sys::start_process_lookup(src_port);
    }
    let stream = match mux.open().await {
        Ok(s) => s,
        Err(e) => {
            // Past the channel's stream limit (or the channel is gone): this
            // connection alone is refused, with a reset.
            refused(&conn, &e);
            return;
        }
    };
    let mut frames = FrameStream::new(stream);
    if frames
        .send(&GuestOpen::Connect(EgressOpen {
            mode,
            host,
            port,
            src_port,
        }))
        .await
        .is_err()
    {
        return;
    }
    let stream = frames.into_inner();
    let (mut from_host, mut to_host) = tokio::io::split(stream);
    let (mut from_client, mut to_client) = conn.split();
    let up = async {
        tokio::io::copy(&mut from_client, &mut to_host).await?;
        to_host.shutdown().await
    };
    let down = async {
        read_one::<EgressAccepted, _>(&mut from_host, EGRESS_ACCEPTED_MAX)
            .await
            .map_err(std::io::Error::other)?;
        tokio::io::copy(&mut from_host, &mut to_client).await?;
        to_client.shutdown().await
    };
    let _ = tokio::try_join!(up, down);
}

/// Resets a connection the channel could not take, and says so on the
/// console at most once a second.
fn refused(conn: &TcpStream, e: &sandpen_proto::ProtoError) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let count = COUNT.fetch_add(1, Ordering::Relaxed) + 1;
    let now = crate::sys::uptime_ms() / 1000 + 1;
    if LAST.swap(now, Ordering::Relaxed) != now {
        crate::log!("egress: a connection refused ({count} so far): {e}");
    }
    // SO_LINGER 0: the close sends a reset, as a full accept queue would.
    let _ = nix::sys::socket::setsockopt(
        conn,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
}

/// The nftables ruleset: every TCP connection leaving the guest, or leaving a
/// container on a Docker bridge inside it, goes to the transparent listener;
/// containers' DNS goes to the stub; other UDP goes nowhere. Traffic between
/// the guest and its containers stays inside: the guest's route to
/// "everywhere" is a local route in the main table, so the bridges' own routes
/// are more specific, and packets for Docker's address pools (172.16.0.0/12,
/// 192.168.0.0/16) are not redirected (a container reaching a literal private
/// address gets a reset; by name it goes through the redirect like any other).
///
/// Its `nft` script is `ruleset().to_string()` (kept in
/// `testdata/egress.nft`, with the bytes `nft` sends for it beside it).
pub fn ruleset() -> Table {
    use crate::nftables::{
        accept, drop, iifname, ip6_daddr, ip_daddr, l4proto, oifname, redirect_to, ret, udp_dport,
        IPPROTO_TCP,
    };
    let loopback = || ip_daddr(Ipv4Addr::new(127, 0, 0, 0), 8);
    Table {
        name: "sandpen",
        chains: vec![
            Chain {
                name: "output_nat",
                kind: ChainType::Nat,
                hook: InetHook::Output,
                priority: -100,
                rules: vec![
                    Rule::new("ip daddr 127.0.0.0/8 return", [loopback(), ret()]),
                    Rule::new("oifname != \"lo\" return", [oifname(false, "lo"), ret()]),
                    Rule::new(
                        "meta l4proto tcp redirect to :15001",
                        [l4proto(IPPROTO_TCP), redirect_to(TRANSPARENT_PORT)],
                    ),
                ],
            },
            Chain {
                name: "prerouting_nat",
                kind: ChainType::Nat,
                hook: InetHook::Prerouting,
                priority: -100,
                rules: vec![
                    Rule::new("iifname \"lo\" return", [iifname(true, "lo"), ret()]),
                    Rule::new(
                        "udp dport 53 redirect to :15053",
                        [udp_dport(53), redirect_to(BRIDGE_DNS_PORT)],
                    ),
                    // Docker's address pools (`nft` would take them as one
                    // anonymous set; two rules are the same match).
                    Rule::new(
                        "ip daddr 172.16.0.0/12 return",
                        [ip_daddr(Ipv4Addr::new(172, 16, 0, 0), 12), ret()],
                    ),
                    Rule::new(
                        "ip daddr 192.168.0.0/16 return",
                        [ip_daddr(Ipv4Addr::new(192, 168, 0, 0), 16), ret()],
                    ),
                    Rule::new(
                        "meta l4proto tcp redirect to :15001",
                        [l4proto(IPPROTO_TCP), redirect_to(TRANSPARENT_PORT)],
                    ),
                ],
            },
            Chain {
                name: "output_filter",
                kind: ChainType::Filter,
                hook: InetHook::Output,
                priority: 0,
                rules: vec![
                    Rule::new("ip daddr 127.0.0.0/8 accept", [loopback(), accept()]),
                    Rule::new(
                        "ip6 daddr ::1 accept",
                        [ip6_daddr(Ipv6Addr::LOCALHOST), accept()],
                    ),
                    Rule::new("oifname != \"lo\" accept", [oifname(false, "lo"), accept()]),
                    Rule::new("meta l4proto tcp accept", [l4proto(IPPROTO_TCP), accept()]),
                    Rule::new("drop", [drop()]),
                ],
            },
            Chain {
                name: "forward_filter",
                kind: ChainType::Filter,
                hook: InetHook::Forward,
                priority: 0,
                rules: vec![Rule::new("drop", [drop()])],
            },
        ],
    }
}

/// Brings up `lo`, routes every address to it and installs [`ruleset`], all
/// in process (rtnetlink, nfnetlink): no `ip` or `nft` process on the boot path.
fn install_redirect() -> Result<()> {
    let t0 = std::time::Instant::now();
    // The rules' expressions (meta, cmp, payload, bitwise, immediate) are part
    // of nf_tables; the kernel would ask modprobe for the others, which is
    // slower than loading them here.
    crate::boot::load_rootfs_modules(&["nf_tables", "nft_chain_nat", "nft_redir"])?;
    let t1 = std::time::Instant::now();
    crate::netconf::loopback_up().context("bringing up lo")?;
    crate::netconf::route_everything_local().context("routing every address to lo")?;
    let t2 = std::time::Instant::now();
    crate::nftables::apply(&crate::nftables::replace_table(&ruleset()))
        .context("installing the nftables rules")?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    log!(
        "egress redirect installed at {} ms, in {:.0} ms (modules {:.0} ms, lo and route {:.1} ms, nftables {:.1} ms)",
        crate::sys::uptime_ms(),
        ms(t0.elapsed()),
        ms(t1 - t0),
        ms(t2 - t1),
        ms(t2.elapsed())
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ruleset is the script in testdata/egress.nft, message for message
    /// and byte for byte what `nft -f` sends for it (scripts/nft-golden).
    #[test]
    fn ruleset_is_what_nft_sends() {
        let script = include_str!("testdata/egress.nft");
        assert_eq!(ruleset().to_string(), script);
        let expected: Vec<(u16, String)> = include_str!("testdata/egress.nft.hex")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (t, payload) = l.split_once(' ').unwrap();
                (t.parse().unwrap(), payload.to_string())
            })
            .collect();
        let requests = crate::nftables::replace_table(&ruleset());
        let batch = crate::nftables::encode_batch(&requests, 1);
        let mut actual = vec![];
        let mut at = 0;
        while at < batch.len() {
            let m = netlink_packet_core::NetlinkBuffer::new_checked(&batch[at..]).unwrap();
            let hex: String = m.payload().iter().map(|b| format!("{b:02x}")).collect();
            actual.push((m.message_type(), hex));
            at += m.length() as usize;
        }
        // Without BATCH_BEGIN and BATCH_END, which the file leaves out.
        let actual = &actual[1..actual.len() - 1];
        assert_eq!(actual.len(), expected.len());
        for (i, (a, e)) in actual.iter().zip(&expected).enumerate() {
            assert_eq!(a, e, "message {} ({})", i + 1, requests[i].what);
        }
    }

    /// The kernel takes the batch, twice (the second replaces the first), in a
    /// network namespace of its own; where `nft` is installed, it reads back
    /// the same ruleset as after `nft -f testdata/egress.nft`. Needs root and
    /// nf_tables on the host; skipped otherwise.
    #[test]
    fn kernel_accepts_the_ruleset() {
        use crate::nftables::tests::{in_new_netns, no_nf_tables};
        use std::io::Write;
        use std::process::{Command, Stdio};
        fn nft(args: &[&str], stdin: &str) -> Option<String> {
            let mut child = Command::new("nft")
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .ok()?;
            child.stdin.take()?.write_all(stdin.as_bytes()).ok()?;
            let out = child.wait_with_output().ok()?;
            assert!(out.status.success(), "nft {args:?}");
            Some(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        let result = in_new_netns(|| {
            let requests = crate::nftables::replace_table(&ruleset());
            crate::nftables::apply(&requests)?;
            crate::nftables::apply(&requests)?;
            // nft runs in this thread's namespace.
            let ours = nft(&["list", "ruleset"], "");
            let theirs = nft(&["-f", "-"], include_str!("testdata/egress.nft"))
                .and_then(|_| nft(&["list", "ruleset"], ""));
            Ok(ours.zip(theirs))
        });
        match result {
            None => {}
            Some(Err(e)) if no_nf_tables(&e) => {}
            Some(Err(e)) => panic!("{e}"),
            Some(Ok(None)) => eprintln!("nft is not installed: the ruleset was not read back"),
            Some(Ok(Some((ours, theirs)))) => {
                assert_eq!(ours, theirs);
                assert!(ours.contains("udp dport 53 redirect to :15053"), "{ours}");
            }
        }
    }
}
