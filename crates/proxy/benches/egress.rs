//! Egress proxy benchmarks, each printed with a baseline measured in the same
//! run: `cargo bench -p sandpen-proxy --bench egress`.
//!
//! The proxy runs in its own process (this binary, re-executed with
//! `__proxy`), in standalone mode (`serve_http_proxy`), which is the code path
//! guest streams take minus the serial link. tinyproxy and squid are measured
//! too when installed (`apt-get install -y tinyproxy squid`). The HTTP origin
//! runs in a process of its own too (`__origin`), as a real server would.
//!
//! - CONNECT tunnel throughput, 1 GiB on loopback: proxy vs direct vs others.
//! - Small HTTP requests (absolute-form GET) at concurrency 64: requests/s,
//!   with a new connection per request and with connections kept alive.
//! - Added latency per request over direct, p50 and p99 (sequential
//!   requests), both ways too.
//! - Proxy RSS with 1,000 open idle CONNECT tunnels.
//!
//! Environment: `BENCH_GIB` (default 1), `BENCH_SECS` (rate run, default 5),
//! `BENCH_BUF` (relay buffer bytes in the proxy), `BENCH_ONLY` (a comma list
//! of `throughput,rate,latency,idle,checks`), `BENCH_CONN` (`close` or `keep-alive`:
//! only that connection mode for requests), `BENCH_LAT_N` (sequential requests
//! per latency figure, default 2000), `BENCH_REFRESH` (set: the proxy
//! runs a refresh hook that `stat`s three files before every decision and
//! every chunk sent up, as the supervisor's policy watch does),
//! `BENCH_PROCESS` (set: the proxy looks up each connection's client
//! process through a hook that answers in 300 µs, as the supervisor asks
//! the guest's PID 1 for the network log's `process`).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sandpen_policy::{AddHost, Mode, Policy, Preset, Rule, RuleSource, Scope, Target};
use sandpen_proxy::{AuditLog, Proxy, ProxyConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("__proxy") {
        return run_proxy_process(args.get(2).cloned().unwrap_or_default());
    }
    if args.get(1).map(String::as_str) == Some("__origin") {
        return run_origin_process();
    }
    // `cargo test --benches` runs benches with no `--bench`: do nothing then.
    if !args.iter().any(|a| a == "--bench") {
        println!("egress bench: run with `cargo bench -p sandpen-proxy --bench egress`");
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bench())
}

// ------------------------------------------------------------ proxy process

/// A helper process ends with the bench: its stdin is a pipe from the
/// bench, which reaches EOF when the bench exits, however it exits.
fn exit_with_parent() {
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
}

fn run_proxy_process(log_dir: String) -> Res<()> {
    exit_with_parent();
    let workers: usize = std::env::var("BENCH_PROXY_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let rt = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()?
    };
    rt.block_on(async move {
        let rule = |id, t: &str| -> Res<Rule> {
            Ok(Rule {
                id,
                scope: Scope::Global,
                action: sandpen_policy::Action::Allow,
                target: Target::parse(t)?,
                source: RuleSource::File {
                    path: "bench".into(),
                    line: id as usize,
                },
            })
        };
        let policy = Policy::from_rules(
            Mode::Enforce,
            Preset::DenyAll,
            vec![rule(1, "127.0.0.1")?, rule(2, "origin.test")?],
        )
        .with_add_hosts([AddHost::parse("origin.test:127.0.0.1")?]);
        let mut cfg = ProxyConfig::new("bench");
        cfg.max_connections = 8192;
        if let Some(b) = std::env::var("BENCH_BUF").ok().and_then(|v| v.parse().ok()) {
            cfg.buffer_size = b;
        }
        cfg.splice = std::env::var_os("BENCH_COPY").is_none();
        let audit = AuditLog::open(Path::new(&log_dir).join("net.jsonl"))?;
        let proxy = Proxy::new(cfg, policy, audit);
        if std::env::var_os("BENCH_REFRESH").is_some() {
            // The supervisor's policy watch when nothing changed: a `stat`
            // of each policy file and of the labels before every decision
            // and every chunk sent up.
            let files: Vec<PathBuf> = ["global.toml", "sandbox.toml", "flow.json"]
                .iter()
                .map(|n| Path::new(&log_dir).join(n))
                .collect();
            for f in &files {
                std::fs::write(f, "")?;
            }
            let stamps: Vec<_> = files
                .iter()
                .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
                .collect();
            proxy.set_refresh(Some(Arc::new(move |_p: &Proxy| {
                for (f, was) in files.iter().zip(&stamps) {
                    let now = std::fs::metadata(f).and_then(|m| m.modified()).ok();
                    assert_eq!(&now, was, "a bench policy file changed");
                }
            })));
        }
        if std::env::var_os("BENCH_PROCESS").is_some() {
            // The supervisor's lookup of each connection's guest process
            // (`Request::Process` to PID 1, docs/egress.md "Audit log"),
            // with PID 1's answer 300 µs away: it runs beside the
            // connection, and its record is written when it ends.
            proxy.set_process_lookup(Some(Arc::new(|port: u16| {
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_micros(300)).await;
                    Some(format!("pid {port} /usr/bin/bench-client --port {port}"))
                })
            })));
        }
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        println!("{}", listener.local_addr()?);
        sandpen_proxy::serve_http_proxy(proxy, listener).await?;
        Ok(())
    })
}

/// The HTTP origin on a single-threaded runtime of its own, as a server
/// process would be: sharing the client's runtime, it would often answer on
/// the client's own thread with no wake-up at all, which no real server does.
fn run_origin_process() -> Res<()> {
    exit_with_parent();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let addr = origin_server().await?;
        println!("{addr}");
        std::future::pending::<()>().await;
        Ok(())
    })
}

/// A helper process of this binary, killed when dropped.
struct Helper {
    child: Child,
    addr: SocketAddr,
}

impl Helper {
    fn start(role: &str) -> Res<Helper> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg(role)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        let addr = line.trim().parse()?;
        Ok(Helper { child, addr })
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A proxy under test: ours, tinyproxy or squid, in its own process.
struct Subject {
    name: &'static str,
    addr: SocketAddr,
    child: Child,
    /// Processes whose RSS counts (squid forks workers).
    dir: PathBuf,
}

impl Drop for Subject {
    fn drop(&mut self) {
        // Only the process we started, by its id.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn scratch(name: &str) -> Res<PathBuf> {
    let dir = std::env::temp_dir().join(format!("sandpen-bench-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // tinyproxy and squid drop privileges; let them write their logs here.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
    Ok(dir)
}

/// Ours; with `copy`, tunnels copy through the proxy as guest streams do,
/// instead of splicing socket to socket.
fn start_sandpen(copy: bool) -> Res<Subject> {
    let name = if copy { "sandpen-copy" } else { "sandpen" };
    let dir = scratch(name)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("__proxy")
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    if copy {
        cmd.env("BENCH_COPY", "1");
    }
    let mut child = cmd.spawn()?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    Ok(Subject {
        name,
        addr: line.trim().parse()?,
        child,
        dir,
    })
}

fn free_port() -> Res<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_listening(addr: SocketAddr) -> bool {
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn start_tinyproxy() -> Res<Option<Subject>> {
    let Some(bin) = which("tinyproxy") else {
        return Ok(None);
    };
    let dir = scratch("tinyproxy")?;
    let port = free_port()?;
    let conf = dir.join("tinyproxy.conf");
    std::fs::write(
        &conf,
        format!(
            "User nobody\nGroup nogroup\nPort {port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 4096\n\
             LogLevel Critical\nLogFile \"{}/tinyproxy.log\"\nPidFile \"{}/tinyproxy.pid\"\n",
            dir.display(),
            dir.display()
        ),
    )?;
    let child = Command::new(bin)
        .arg("-d")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let s = Subject {
        name: "tinyproxy",
        addr,
        child,
        dir,
    };
    Ok(wait_listening(addr).then_some(s))
}

fn start_squid() -> Res<Option<Subject>> {
    let Some(bin) = which("squid") else {
        return Ok(None);
    };
    let dir = scratch("squid")?;
    let port = free_port()?;
    let conf = dir.join("squid.conf");
    std::fs::write(
        &conf,
        format!(
            "http_port 127.0.0.1:{port}\n\
             acl CONNECT method CONNECT\n\
             http_access allow all\n\
             cache deny all\n\
             cache_mem 8 MB\n\
             access_log none\n\
             cache_store_log none\n\
             cache_log {d}/cache.log\n\
             pid_filename {d}/squid.pid\n\
             coredump_dir {d}\n\
             max_filedescriptors 16384\n\
             shutdown_lifetime 0 seconds\n",
            d = dir.display()
        ),
    )?;
    let child = Command::new(bin)
        .arg("-N")
        .arg("-f")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let s = Subject {
        name: "squid",
        addr,
        child,
        dir,
    };
    Ok(wait_listening(addr).then_some(s))
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Resident memory of a process and its children (KiB).
fn rss_tree_kib(pid: u32) -> u64 {
    let mut total = rss_kib(pid);
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // Field 4 (after the parenthesised name) is the parent pid.
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(pid) {
                total += rss_tree_kib(child);
            }
        }
    }
    total
}

/// CPU time (user + system, all threads) of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    /// `/proc/PID/stat` counts in USER_HZ, 100 on Linux's x86 ABI.
    const USER_HZ: f64 = 100.0;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the parenthesised name, utime and stime are the 12th and 13th.
    let fields: Vec<f64> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    (fields.get(11).unwrap_or(&0.0) + fields.get(12).unwrap_or(&0.0)) / USER_HZ
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

// ------------------------------------------------------------ servers

/// Reads an 8-byte length, then that many bytes, then answers with the
/// count. No half-close needed (tinyproxy closes both ways on one FIN).
async fn sink_server() -> Res<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut len = [0u8; 8];
                if s.read_exact(&mut len).await.is_err() {
                    return;
                }
                let want = u64::from_be_bytes(len);
                let mut buf = vec![0u8; 256 * 1024];
                let mut n: u64 = 0;
                while n < want {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k as u64,
                    }
                }
                let _ = s.write_all(&n.to_be_bytes()).await;
            });
        }
    });
    Ok(addr)
}

/// Answers small requests, keeping the connection unless the request says
/// `Connection: close`.
async fn origin_server() -> Res<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut have = 0;
                loop {
                    let end = loop {
                        if let Some(e) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                            break e + 4;
                        }
                        if have == buf.len() {
                            return;
                        }
                        match s.read(&mut buf[have..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => have += k,
                        }
                    };
                    let close = String::from_utf8_lossy(&buf[..end])
                        .to_ascii_lowercase()
                        .contains("connection: close");
                    let resp: &[u8] = if close {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                    } else {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                    };
                    if s.write_all(resp).await.is_err() || close {
                        return;
                    }
                    buf.copy_within(end..have, 0);
                    have -= end;
                }
            });
        }
    });
    Ok(addr)
}

/// Echoes; used for idle tunnels.
async fn echo_server() -> Res<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

// ------------------------------------------------------------ clients

/// Open a CONNECT tunnel through `proxy` to `target`.
async fn connect_via(proxy: SocketAddr, target: SocketAddr) -> Res<TcpStream> {
    let mut s = TcpStream::connect(proxy).await?;
    s.set_nodelay(true)?;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::with_capacity(256);
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await? == 0 {
            return Err("proxy closed during CONNECT".into());
        }
        head.push(b[0]);
        if head.len() > 8192 {
            return Err("CONNECT answer too long".into());
        }
    }
    if !head.starts_with(b"HTTP/1.1 200") && !head.starts_with(b"HTTP/1.0 200") {
        return Err(format!("CONNECT refused: {}", String::from_utf8_lossy(&head)).into());
    }
    Ok(s)
}

async fn transfer(mut s: TcpStream, bytes: u64) -> Res<Duration> {
    let buf = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    s.write_all(&bytes.to_be_bytes()).await?;
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(buf.len() as u64) as usize;
        s.write_all(&buf[..n]).await?;
        sent += n as u64;
    }
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack).await?;
    let elapsed = start.elapsed();
    if u64::from_be_bytes(ack) != bytes {
        return Err(format!("sink got {} of {bytes} bytes", u64::from_be_bytes(ack)).into());
    }
    Ok(elapsed)
}

/// Best of `runs` transfers, in MiB/s.
async fn throughput(
    via: Option<SocketAddr>,
    sink: SocketAddr,
    bytes: u64,
    runs: usize,
) -> Res<f64> {
    let mut best = f64::MAX;
    for _ in 0..runs {
        let s = match via {
            Some(p) => connect_via(p, sink).await?,
            None => TcpStream::connect(sink).await?,
        };
        let t = transfer(s, bytes).await?.as_secs_f64();
        best = best.min(t);
    }
    Ok(bytes as f64 / (1024.0 * 1024.0) / best)
}

/// A load client's connection: a fresh one per request (`Connection:
/// close`), or one kept alive as curl, pip, npm and wrk keep theirs (a new
/// one only when the server closes it).
struct Client {
    via: Option<SocketAddr>,
    origin: SocketAddr,
    keep_alive: bool,
    conn: Option<TcpStream>,
}

impl Client {
    fn new(via: Option<SocketAddr>, origin: SocketAddr, keep_alive: bool) -> Self {
        Client {
            via,
            origin,
            keep_alive,
            conn: None,
        }
    }

    /// One small request; returns its latency. The response is read by its
    /// Content-Length.
    async fn request(&mut self) -> Res<Duration> {
        let start = Instant::now();
        let reused = self.conn.is_some();
        match self.exchange().await {
            Ok(()) => {}
            // The server closed a kept connection just as it was reused.
            Err(_) if reused => {
                self.conn = None;
                self.exchange().await?;
            }
            Err(e) => return Err(e),
        }
        Ok(start.elapsed())
    }

    async fn exchange(&mut self) -> Res<()> {
        let (addr, target) = match self.via {
            Some(p) => (p, format!("http://{}/", self.origin)),
            None => (self.origin, "/".to_string()),
        };
        let close = if self.keep_alive {
            ""
        } else {
            "Connection: close\r\n"
        };
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: {}\r\n{close}\r\n",
            self.origin
        );
        let mut s = match self.conn.take() {
            Some(s) => s,
            None => {
                let s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                s
            }
        };
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::with_capacity(512);
        let mut buf = [0u8; 2048];
        let server_closes = loop {
            if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or("response without Content-Length")?;
                if out.len() >= end + 4 + len {
                    if !head.starts_with("http/1.1 200") && !head.starts_with("http/1.0 200") {
                        return Err(format!("bad response: {head}").into());
                    }
                    break head.contains("connection: close") || head.starts_with("http/1.0");
                }
            }
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Err("connection closed before the response".into());
            }
            out.extend_from_slice(&buf[..n]);
        };
        if self.keep_alive && !server_closes {
            self.conn = Some(s);
        }
        Ok(())
    }
}

/// Requests per second at `concurrency` for `secs`.
async fn request_rate(
    via: Option<SocketAddr>,
    origin: SocketAddr,
    keep_alive: bool,
    concurrency: usize,
    secs: f64,
) -> Res<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (stop, done, errors) = (stop.clone(), done.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = Client::new(via, origin, keep_alive);
            while !stop.load(Ordering::Relaxed) {
                match client.request().await {
                    Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let counted = done.load(Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    let errs = errors.load(Ordering::Relaxed);
    if errs > 0 {
        println!("    ({errs} failed requests)");
    }
    Ok(counted as f64 / elapsed)
}

/// p50 and p99 of `n` sequential requests, in microseconds.
async fn latencies(
    via: Option<SocketAddr>,
    origin: SocketAddr,
    keep_alive: bool,
    n: usize,
) -> Res<Vec<f64>> {
    let mut client = Client::new(via, origin, keep_alive);
    for _ in 0..50 {
        client.request().await?; // warm up
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(client.request().await?.as_secs_f64() * 1e6);
    }
    Ok(v)
}

/// Open `n` CONNECT tunnels through `proxy`, each carrying one round trip,
/// then leave them idle; returns the proxy's RSS growth per tunnel (KiB).
async fn idle_tunnels(subject: &Subject, echo: SocketAddr, n: usize) -> Res<(f64, u64, u64)> {
    let pid = subject.child.id();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_tree_kib(pid);
    let mut open = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = connect_via(subject.addr, echo).await?;
        s.write_all(b"ping\n").await?;
        let mut b = [0u8; 5];
        s.read_exact(&mut b).await?;
        open.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_tree_kib(pid);
    drop(open);
    Ok((
        after.saturating_sub(before) as f64 / n as f64,
        before,
        after,
    ))
}

// ------------------------------------------------------------ the checks

/// What the checks on every byte cost, each alone, in this process: the
/// refresh hook the supervisor runs before every decision and every chunk
/// sent up (three `stat`s when nothing changed), the first-bytes
/// classifier, and the policy's decision on a name and its address (what a
/// live check does when the policy did change). Minimum of five rounds, so
/// that the other load on the machine counts as little as it can.
fn check_costs() -> Res<()> {
    use std::hint::black_box;
    let dir = std::env::temp_dir().join(format!("sandpen-bench-checks-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let files: Vec<PathBuf> = ["global.toml", "sandbox.toml", "flow.json"]
        .iter()
        .map(|n| dir.join(n))
        .collect();
    for f in &files {
        std::fs::write(f, "")?;
    }
    let policy = Policy::from_rules(
        Mode::Enforce,
        Preset::DenyAll,
        vec![Rule {
            id: 1,
            scope: Scope::Global,
            action: sandpen_policy::Action::Allow,
            target: Target::parse("origin.test")?,
            source: RuleSource::File {
                path: "bench".into(),
                line: 1,
            },
        }],
    )
    .with_add_hosts([AddHost::parse("origin.test:127.0.0.1")?]);
    let addrs = ["127.0.0.1".parse()?];
    let head = b"GET http://origin.test/x HTTP/1.1\r\nHost: origin.test\r\n\r\n";
    let time = |n: u32, f: &mut dyn FnMut()| {
        (0..5)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..n {
                    f();
                }
                t.elapsed().as_nanos() as f64 / f64::from(n)
            })
            .fold(f64::MAX, f64::min)
    };
    let refresh = time(20_000, &mut || {
        for f in &files {
            let _ = black_box(std::fs::metadata(black_box(f)).and_then(|m| m.modified()));
        }
    });
    let classify = time(200_000, &mut || {
        black_box(sandpen_proxy::http::classify(black_box(head)));
    });
    let decide = time(200_000, &mut || {
        black_box(policy.check(black_box("origin.test"), 80, None));
        black_box(policy.check(black_box("origin.test"), 80, Some(&addrs)));
    });
    let _ = std::fs::remove_dir_all(&dir);
    println!("\n## What the checks cost, each alone (min of 5 rounds)");
    println!(
        "  refresh hook (3 stats, nothing changed)  {:8.0} ns  per decision and per chunk sent up",
        refresh
    );
    println!(
        "  first-bytes classifier (request line)    {:8.0} ns  per connection",
        classify
    );
    println!(
        "  policy decision, name + address          {:8.0} ns  per live check after a change",
        decide
    );
    Ok(())
}

// ------------------------------------------------------------ the run

async fn bench() -> Res<()> {
    let gib: f64 = std::env::var("BENCH_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5.0);
    let bytes = (gib * 1024.0 * 1024.0 * 1024.0) as u64;
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let run = |what: &str| only.is_empty() || only.split(',').any(|w| w == what);
    if run("checks") {
        check_costs()?;
    }

    let sink = sink_server().await?;
    let origin_process = Helper::start("__origin")?;
    let origin = origin_process.addr;
    let echo = echo_server().await?;

    let mut subjects = vec![start_sandpen(false)?];
    match start_tinyproxy() {
        Ok(Some(s)) => subjects.push(s),
        Ok(None) => println!("tinyproxy: not installed or did not start; skipped"),
        Err(e) => println!("tinyproxy: could not start: {e}"),
    }
    match start_squid() {
        Ok(Some(s)) => subjects.push(s),
        Ok(None) => println!("squid: not installed or did not start; skipped"),
        Err(e) => println!("squid: could not start: {e}"),
    }
    // Last, so that the sections about plain HTTP, where it is the same
    // code, can leave it out.
    subjects.push(start_sandpen(true)?);
    let http_subjects = &subjects[..subjects.len() - 1];
    println!(
        "machine: {} cores; everything below shares them",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    if run("throughput") {
        throughput_section(&subjects, sink, bytes, gib).await?;
    }
    if run("rate") {
        rate_section(http_subjects, origin, secs).await?;
    }
    if run("latency") {
        latency_section(http_subjects, origin).await?;
    }
    if run("idle") {
        idle_section(&subjects, echo).await?;
    }
    Ok(())
}

async fn throughput_section(
    subjects: &[Subject],
    sink: SocketAddr,
    bytes: u64,
    gib: f64,
) -> Res<()> {
    const ROUNDS: usize = 3;
    println!("\n## CONNECT tunnel throughput, {gib} GiB on loopback (best of {ROUNDS} interleaved rounds)");
    // Round robin over direct and the proxies, so that a change in the
    // host's load is shared by all of them.
    let me = std::process::id();
    let mut direct = 0f64;
    let mut direct_cpu = 0f64;
    let mut best: Vec<Result<f64, String>> = vec![Ok(0.0); subjects.len()];
    let mut cpu = vec![0f64; subjects.len()];
    for _ in 0..ROUNDS {
        let c0 = cpu_secs(me);
        direct = direct.max(throughput(None, sink, bytes, 1).await?);
        direct_cpu += cpu_secs(me) - c0;
        for (i, s) in subjects.iter().enumerate() {
            let Ok(b) = best[i] else { continue };
            let c0 = cpu_secs(s.child.id());
            match throughput(Some(s.addr), sink, bytes, 1).await {
                Ok(v) => best[i] = Ok(b.max(v)),
                Err(e) => best[i] = Err(e.to_string()),
            }
            cpu[i] += cpu_secs(s.child.id()) - c0;
        }
    }
    // Client and sink: one copy into the kernel and one out per byte.
    let direct_cpu = direct_cpu / (ROUNDS as f64 * gib);
    println!("  direct        {direct:9.0} MiB/s   client + sink CPU {direct_cpu:.2} s/GiB");
    let mut tp = Vec::new();
    for ((s, v), cpu) in subjects.iter().zip(&best).zip(&cpu) {
        match v {
            Ok(v) => {
                // What the proxy alone spends per GiB, and so what it could
                // relay with a core of its own.
                let cpu = cpu / (ROUNDS as f64 * gib);
                let capacity = if cpu > 0.0 { 1024.0 / cpu } else { f64::NAN };
                println!(
                    "  {:<12}  {v:9.0} MiB/s  ({:.2}x direct)   proxy CPU {cpu:.2} s/GiB: \
                     {capacity:.0} MiB/s per core ({:.2}x direct)",
                    s.name,
                    v / direct,
                    capacity / direct
                );
                tp.push((s.name, *v));
            }
            Err(e) => println!("  {:<12}  failed: {e}", s.name),
        }
    }
    let find = |name: &str| tp.iter().find(|(n, _)| *n == name).map(|x| x.1);
    if let (Some(o), Some(sq)) = (find("sandpen"), find("squid")) {
        println!("  sandpen / squid = {:.2}x (target >= 1.5x)", o / sq);
    }
    if let Some(o) = find("sandpen") {
        println!("  sandpen / direct = {:.2}x (target >= 0.9x)", o / direct);
    }
    if let (Some(o), Some(sq)) = (find("sandpen-copy"), find("squid")) {
        println!(
            "  sandpen-copy (the guest streams' path) / squid = {:.2}x",
            o / sq
        );
    }
    Ok(())
}

/// How the load client treats its connections, for the section titles.
fn connection_mode(keep_alive: bool) -> &'static str {
    if keep_alive {
        "connections kept alive (as curl, pip, npm and wrk keep them)"
    } else {
        "a new connection per request (Connection: close)"
    }
}

/// The connection modes to run: `BENCH_CONN` = `close`, `keep-alive` or both
/// (the default).
fn connection_modes() -> Vec<bool> {
    match std::env::var("BENCH_CONN").as_deref() {
        Ok("close") => vec![false],
        Ok("keep-alive") => vec![true],
        _ => vec![false, true],
    }
}

async fn rate_section(subjects: &[Subject], origin: SocketAddr, secs: f64) -> Res<()> {
    for keep_alive in connection_modes() {
        rate_rounds(subjects, origin, secs, keep_alive).await?;
    }
    Ok(())
}

async fn rate_rounds(
    subjects: &[Subject],
    origin: SocketAddr,
    secs: f64,
    keep_alive: bool,
) -> Res<()> {
    const ROUNDS: usize = 3;
    println!(
        "\n## Small HTTP requests, concurrency 64, {} \
         (median of {ROUNDS} interleaved rounds of {secs} s)",
        connection_mode(keep_alive)
    );
    // Interleave the subjects so that background load hits them alike.
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); subjects.len() + 1];
    for _ in 0..ROUNDS {
        samples[0].push(request_rate(None, origin, keep_alive, 64, secs).await?);
        for (i, s) in subjects.iter().enumerate() {
            match request_rate(Some(s.addr), origin, keep_alive, 64, secs).await {
                Ok(v) => samples[i + 1].push(v),
                Err(e) => println!("  {:<10}  failed: {e}", s.name),
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let direct_rate = median(&mut samples[0]).ok_or("no direct sample")?;
    println!("  direct      {direct_rate:9.0} req/s");
    let mut rates = Vec::new();
    for (i, s) in subjects.iter().enumerate() {
        let all = samples[i + 1].clone();
        if let Some(v) = median(&mut samples[i + 1]) {
            let all: Vec<String> = all.iter().map(|x| format!("{x:.0}")).collect();
            println!(
                "  {:<10}  {v:9.0} req/s  ({:.2}x direct)  rounds: {}",
                s.name,
                v / direct_rate,
                all.join(" ")
            );
            rates.push((s.name, v));
        }
    }
    let ours_rate = rates.iter().find(|(n, _)| *n == "sandpen").map(|x| x.1);
    for other in ["tinyproxy", "squid"] {
        if let (Some(o), Some((_, r))) = (ours_rate, rates.iter().find(|(n, _)| *n == other)) {
            let target = if other == "tinyproxy" {
                " (target >= 2x)"
            } else {
                ""
            };
            println!("  sandpen / {other} = {:.2}x{target}", o / r);
        }
    }

    Ok(())
}

async fn latency_section(subjects: &[Subject], origin: SocketAddr) -> Res<()> {
    for keep_alive in connection_modes() {
        latency_rounds(subjects, origin, keep_alive).await?;
    }
    Ok(())
}

async fn latency_rounds(subjects: &[Subject], origin: SocketAddr, keep_alive: bool) -> Res<()> {
    let n: usize = std::env::var("BENCH_LAT_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    const ROUNDS: usize = 5;
    println!(
        "\n## Latency per request, sequential, {n} requests in {ROUNDS} interleaved rounds, {}",
        connection_mode(keep_alive)
    );
    // Round robin over direct and the proxies, so that a change in the
    // host's load during the run is shared by all of them.
    let vias: Vec<Option<SocketAddr>> = std::iter::once(None)
        .chain(subjects.iter().map(|s| Some(s.addr)))
        .collect();
    let mut samples: Vec<Result<Vec<f64>, String>> = vec![Ok(Vec::with_capacity(n)); vias.len()];
    for _ in 0..ROUNDS {
        for (via, out) in vias.iter().zip(samples.iter_mut()) {
            let Ok(v) = out else { continue };
            match latencies(*via, origin, keep_alive, n / ROUNDS).await {
                Ok(mut more) => v.append(&mut more),
                Err(e) => *out = Err(e.to_string()),
            }
        }
    }
    let pct = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[v.len() * 99 / 100])
    };
    let (d50, d99) = match &mut samples[0] {
        Ok(v) => pct(v),
        Err(e) => return Err(format!("direct: {e}").into()),
    };
    println!("  direct      p50 {d50:7.1} us  p99 {d99:7.1} us");
    for (s, out) in subjects.iter().zip(samples.iter_mut().skip(1)) {
        match out {
            Ok(v) => {
                let (p50, p99) = pct(v);
                println!(
                    "  {:<10}  p50 {p50:7.1} us  p99 {p99:7.1} us   added p50 {:+7.1} us  p99 {:+7.1} us{}",
                    s.name,
                    p50 - d50,
                    p99 - d99,
                    if s.name == "sandpen" { "  (target: added p50 <= 100 us)" } else { "" }
                )
            }
            Err(e) => println!("  {:<10}  failed: {e}", s.name),
        }
    }
    Ok(())
}

async fn idle_section(subjects: &[Subject], echo: SocketAddr) -> Res<()> {
    println!("\n## RSS with 1,000 open idle CONNECT tunnels (one round trip each)");
    for s in subjects {
        match idle_tunnels(s, echo, 1000).await {
            Ok((per, before, after)) => println!(
                "  {:<10}  {before} KiB -> {after} KiB: {per:.1} KiB per tunnel{}",
                s.name,
                if s.name == "sandpen" {
                    "  (target <= 40 KiB)"
                } else {
                    ""
                }
            ),
            Err(e) => println!("  {:<10}  failed: {e}", s.name),
        }
    }
    Ok(())
}
