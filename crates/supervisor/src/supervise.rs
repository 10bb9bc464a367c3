//! The supervisor process: one per running sandbox, detached from the CLI.
//!
//! It holds `run/supervisor.lock` for its whole life, starts the file server and
//! QEMU as children that die with it, brings the guest up over the channel, then
//! serves the control API until QEMU exits or a stop is asked for.
//!
//! It reports the outcome of the boot on its stdout (`ready` or `error: ...`),
//! which the starting CLI reads; everything else goes to `logs/supervisor.log`.

use std::fs::OpenOptions;
use std::io::Write;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sandpen_proto::frame::FrameStream;
use sandpen_proto::mux::{self, Channel, MuxHandle, Side};
use sandpen_proto::{
    handshake, Ack, GuestSetup, GuestUser, Request, SetupReply, ShareMount, WORKSPACE_TAG,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::control::{ControlReply, ControlRequest, RuntimeStatus};
use crate::fileserver::{self, RunningShare, ShareSpec};
use crate::paths::{Dirs, SandboxPaths};
use crate::sandbox::{self, SandboxConfig, GUEST_USER};
use crate::SupervisorError;

/// How long a boot may take before it is given up. Generous: under software
/// emulation on a loaded host a boot takes seconds, not milliseconds.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// Process lookups (a network record's `process`) on the control channel at
/// once; a connection past them is logged without its process.
const PROCESS_LOOKUPS: usize = 16;
/// How long a guest gets to power off after a stop before QEMU is told to quit.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
/// Console logs above this size are rotated at start.
const CONSOLE_LOG_MAX: u64 = 8 << 20;

/// Makes a child die when the supervisor does, so a killed supervisor never
/// leaves a VM running with nobody to answer for it.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory
    // of the parent; it runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Entry point of `sandpen supervise NAME`.
pub fn main(name: &str) -> Result<(), SupervisorError> {
    // One thread: children get PR_SET_PDEATHSIG from the thread that forks them,
    // so that thread must live as long as the supervisor does.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| SupervisorError::io("starting the runtime", e))?;
    rt.block_on(supervise(name))
}

fn report(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn supervise(name: &str) -> Result<(), SupervisorError> {
    let dirs = Dirs::from_env();
    let config = sandbox::load(&dirs, name)?;
    let paths = dirs.sandbox(name);
    for d in [paths.run(), paths.logs()] {
        std::fs::create_dir_all(&d)
            .map_err(|e| SupervisorError::io(format!("creating {}", d.display()), e))?;
    }
    let _lock = take_lock(&paths)?;
    // Into the sandbox's cgroup before anything is started, so that the file
    // servers and QEMU inherit it (docs/architecture.md, "Resource limits").
    if let Some(note) = crate::resources::enter_cgroup(&config, &paths) {
        report(&format!("note: {note}"));
    }
    clean_run_dir(&paths);
    crate::exit::clear(&paths);
    rotate(&paths.console_log());
    std::fs::write(paths.pid_file(), std::process::id().to_string())
        .map_err(|e| SupervisorError::io("writing the pid file", e))?;

    let booted = boot(&dirs, &config, &paths).await;
    let result = match booted {
        Ok(vm) => {
            // Everything is started: from here on the supervisor runs
            // nothing and reaches only its own files (see confine.rs).
            let threads = sandpen_confine::thread_count();
            let confined = crate::confine::confine(&dirs, &vm.config, &paths);
            tracing::info!(threads, "supervisor confined: {}", confined.applied_line());
            let refused = match confined.missing_line() {
                Some(line) if vm.config.require_jail || crate::jail::required_by_env() => {
                    Some(line)
                }
                Some(line) => {
                    tracing::warn!("{line}");
                    report(&format!(
                        "note: {line} (`sandpen doctor` says more; --require-jail refuses such a start)"
                    ));
                    None
                }
                None => None,
            };
            match refused {
                // QEMU dies with the supervisor (kill_on_drop and the
                // parent-death signal): nothing runs half-confined.
                Some(line) => {
                    let e = SupervisorError::JailIncomplete(line);
                    report(&format!("error: {e}"));
                    Err(e)
                }
                None => {
                    report("ready");
                    tracing::info!(ready_ms = vm.status.ready_ms, "sandbox {name} is running");
                    serve(vm, &paths).await
                }
            }
        }
        Err(e) => {
            report(&format!("error: {e}"));
            Err(e)
        }
    };
    if let Err(e) = &result {
        crate::exit::record_failure(&paths, &e.to_string());
    }
    clean_run_dir(&paths);
    crate::resources::release();
    result
}

fn take_lock(paths: &SandboxPaths) -> Result<nix::fcntl::Flock<std::fs::File>, SupervisorError> {
    use nix::fcntl::{Flock, FlockArg};
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .read(true)
            .open(paths.lock())
            .map_err(|e| SupervisorError::io("opening the lock file", e))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            // A CLI probing liveness holds a shared lock for an instant.
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => {
                return Err(SupervisorError::Invalid(
                    "this sandbox already has a supervisor".into(),
                ))
            }
        }
    }
}

/// Removes sockets and the pid file left by a supervisor that died.
fn clean_run_dir(paths: &SandboxPaths) {
    if let Ok(entries) = std::fs::read_dir(paths.run()) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".sock") || name == "supervisor.pid" {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn rotate(log: &std::path::Path) {
    if std::fs::metadata(log)
        .map(|m| m.len() > CONSOLE_LOG_MAX)
        .unwrap_or(false)
    {
        let _ = std::fs::rename(log, log.with_extension("log.1"));
    }
}

struct Vm {
    config: SandboxConfig,
    /// Fires, with the reason, when the control channel ends (the guest can
    /// kill it).
    channel_closed: tokio::sync::oneshot::Receiver<String>,
    /// The egress proxy's accept loop: it ends only if it panics.
    proxy_task: tokio::task::JoinHandle<()>,
    /// The egress proxy (its ask queue answers `policy pending/approve`).
    proxy: sandpen_proxy::Proxy,
    qemu: Child,
    shares: Vec<RunningShare>,
    mux: MuxHandle,
    status: RuntimeStatus,
    listener: Option<UnixListener>,
    /// The published ports' listeners, bound at the boot's start.
    ports: Option<crate::ports::Listeners>,
}

async fn boot(
    dirs: &Dirs,
    config: &SandboxConfig,
    paths: &SandboxPaths,
) -> Result<Vm, SupervisorError> {
    // Published ports first: a host port in use stops the start before
    // anything else is started, and they must be bound before the
    // supervisor confines itself (its Landlock forbids TCP bind).
    let ports = crate::ports::Listeners::bind(&config.ports)?;
    // A malformed policy stops the boot here, before anything starts.
    let proxy = crate::egress::start_proxy(dirs, paths, config)?;
    // Only the certificate goes to the guest; the key stays in `ca/`.
    let ca_pem = crate::credentials::ensure_ca(paths)?.cert_pem().to_string();
    let image = sandpen_image::load(&dirs.images(), &config.image)?;
    let initrd = image.ensure_initrd(&crate::guest_binary()?)?;
    let accel = sandpen_vm::choose_accel(config.accel)?;
    tracing::info!(accel = %accel.accel, reason = %accel.reason, "accelerator");

    if !config.workspace.is_dir() {
        return Err(SupervisorError::Invalid(format!(
            "the workspace {} no longer exists",
            config.workspace.display()
        )));
    }
    let shares = start_shares(dirs, config, paths).await?;

    // QEMU makes no socket of its own (its jail refuses it): the supervisor
    // binds the ones QEMU serves and connects the file servers' ones, and
    // QEMU inherits them (docs/architecture.md, "QEMU's jail").
    let mut passed: Vec<std::os::fd::OwnedFd> = Vec::new();
    let mut pass = |fd: std::os::fd::OwnedFd| {
        passed.push(fd);
        sandpen_vm::Socket::Fd(crate::jail::passed_fd(passed.len() - 1))
    };
    let listen = |path: std::path::PathBuf| {
        let _ = std::fs::remove_file(&path);
        std::os::unix::net::UnixListener::bind(&path)
            .map(std::os::fd::OwnedFd::from)
            .map_err(|e| SupervisorError::io(format!("binding {}", path.display()), e))
    };
    let channel_socket = pass(listen(paths.channel_socket())?);
    let egress_socket = pass(listen(paths.egress_socket())?);
    let qmp_socket = pass(listen(paths.qmp_socket())?);
    let console_socket = pass(listen(paths.console_socket())?);
    let mut fs_shares = Vec::new();
    for share in &shares {
        let conn = connect_file_server(&share.spec.socket).await?;
        fs_shares.push(sandpen_vm::FsShare {
            tag: share.spec.tag.clone(),
            socket: pass(conn.into()),
        });
    }
    let vm_config = sandpen_vm::VmConfig {
        name: config.name.clone(),
        accel: accel.accel,
        cpus: config.cpus,
        memory_mib: config.memory_mib,
        kernel: image.kernel(),
        initrd: initrd.clone(),
        disk: paths.disk(),
        channel_socket,
        egress_socket,
        qmp_socket,
        console: sandpen_vm::Console::Socket(console_socket),
        shares: fs_shares,
        tsc_khz: sandpen_vm::qemu::host_tsc_khz(),
        extra_cmdline: vec![format!("sandpen.docker={}", config.docker.as_str())],
    };
    let qemu_bin = sandpen_vm::which("qemu-system-x86_64").ok_or_else(|| {
        SupervisorError::Vm(sandpen_vm::VmError::MissingTool {
            tool: "qemu-system-x86_64".into(),
            package: "qemu-system-x86".into(),
        })
    })?;
    let qemu_log = paths.logs().join("qemu.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&qemu_log)
        .map_err(|e| SupervisorError::io(format!("opening {}", qemu_log.display()), e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| SupervisorError::io("log handle", e))?;
    let spec = crate::jail::JailSpec::for_qemu(
        &qemu_bin,
        vm_config.args(),
        &config.name,
        &[image.kernel(), initrd, image.rootfs()],
        &paths.disk(),
        accel.accel,
    );
    let launcher =
        std::env::current_exe().map_err(|e| SupervisorError::io("finding sandpen", e))?;
    let mut cmd = spec.command(&launcher)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .kill_on_drop(true);
    die_with_parent(&mut cmd);
    let started = Instant::now();
    let started_at_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let launched = crate::jail::spawn(cmd, passed)?;
    let (mut qemu, jail) = launched.report().await?;
    tracing::info!(pid = jail.pid, "QEMU jailed: {}", jail.applied);
    if let Some(line) = jail.missing_line() {
        if config.require_jail || crate::jail::required_by_env() {
            let _ = qemu.kill().await;
            return Err(SupervisorError::JailIncomplete(line));
        }
        tracing::warn!("{line}");
        report(&format!(
            "note: {line} (`sandpen doctor` says more; --require-jail refuses such a start)"
        ));
    }
    let qemu_pid = jail.pid;
    let died = |status: std::process::ExitStatus| {
        SupervisorError::Boot(format!(
            "QEMU exited during boot ({status}); see {}, {} and {}",
            qemu_log.display(),
            paths.console_log().display(),
            paths.fs_log().display()
        ))
    };

    tokio::spawn(pump_console(paths.console_socket(), paths.console_log()));

    // The channel sockets appear once QEMU has parsed its arguments.
    let mut control = None;
    let mut egress = None;
    while control.is_none() || egress.is_none() {
        if let Ok(Some(status)) = qemu.try_wait() {
            return Err(died(status));
        }
        if started.elapsed() > BOOT_TIMEOUT {
            return Err(SupervisorError::Boot(
                "QEMU did not open the guest channel".into(),
            ));
        }
        for (slot, socket) in [
            (&mut control, paths.channel_socket()),
            (&mut egress, paths.egress_socket()),
        ] {
            if slot.is_none() {
                *slot = UnixStream::connect(socket).await.ok();
            }
        }
        if control.is_none() || egress.is_none() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let (Some(mut control), Some(mut egress)) = (control, egress) else {
        unreachable!("the loop ends with both connected");
    };
    let handshakes =
        async { tokio::try_join!(handshake::host(&mut control), handshake::host(&mut egress)) };
    tokio::select! {
        r = tokio::time::timeout(BOOT_TIMEOUT, handshakes) => match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                // A channel that closes early is mostly QEMU going away: say
                // so, and where its reason is.
                if let Ok(Ok(status)) =
                    tokio::time::timeout(Duration::from_secs(2), qemu.wait()).await
                {
                    return Err(died(status));
                }
                return Err(SupervisorError::Boot(format!(
                    "{e}; see {} and {}",
                    paths.console_log().display(),
                    qemu_log.display()
                )));
            }
            Err(_) => return Err(SupervisorError::Boot(format!(
                "the guest did not answer within {BOOT_TIMEOUT:?}; see {}",
                paths.console_log().display()
            ))),
        },
        status = qemu.wait() => {
            let status = status.map_err(|e| SupervisorError::io("waiting for QEMU", e))?;
            return Err(died(status));
        }
    }
    let channel_ms = started.elapsed().as_millis() as u64;
    // Control and egress never share fate (docs/architecture.md): the guest
    // can end its egress session, and exec, ping and stop still work.
    let (handle, _, driver) = mux::session(control, Channel::Control, Side::Host);
    let (_, egress_inbound, egress_driver) = mux::session(egress, Channel::Egress, Side::Host);
    let control_proxy = proxy.clone();
    // Every guest connection's process, for its log record and ask mode's
    // entry: asked of PID 1 beside the connection (docs/egress.md, "Audit
    // log").
    // At most PROCESS_LOOKUPS at once; past it a record goes without its
    // process: a burst of connections must not crowd the control channel,
    // whose streams exec and stop need (and whose yamux session a flood of
    // short streams the guest has not caught up with would end).
    let lookup_mux = handle.clone();
    let lookups = Arc::new(tokio::sync::Semaphore::new(PROCESS_LOOKUPS));
    proxy.set_process_lookup(Some(Arc::new(move |src_port| {
        let mux = lookup_mux.clone();
        let permit = lookups.clone().try_acquire_owned().ok();
        Box::pin(async move {
            let _permit = permit?;
            guest_process(&mux, src_port).await
        })
    })));
    let proxy_task = tokio::spawn(crate::egress::serve(
        egress_inbound,
        proxy,
        dirs.clone(),
        paths.clone(),
        config.clone(),
    ));
    tokio::spawn(async move {
        match egress_driver.await {
            Ok(()) => tracing::info!("the guest closed its egress channel"),
            Err(e) => tracing::warn!(
                "the guest broke its egress channel ({e}); it has no network until the sandbox restarts"
            ),
        }
    });
    let (channel_closed_tx, channel_closed) = tokio::sync::oneshot::channel::<String>();
    tokio::spawn(async move {
        let reason = match driver.await {
            Ok(()) => "the guest closed its control channel".to_string(),
            Err(e) => format!("the guest broke its control channel: {e}"),
        };
        let _ = channel_closed_tx.send(reason);
    });

    let setup = GuestSetup {
        hostname: config.name.clone(),
        user: GuestUser {
            name: GUEST_USER.into(),
            uid: config.guest_uid,
            gid: config.guest_gid,
        },
        mounts: shares
            .iter()
            .map(|s| ShareMount {
                tag: s.spec.tag.clone(),
                path: s.spec.guest_path.to_string_lossy().into_owned(),
                read_only: s.spec.read_only,
            })
            .collect(),
        env: guest_env(dirs, &config.name),
        ca_certs: vec![ca_pem],
    };
    let reply = tokio::select! {
        r = tokio::time::timeout(BOOT_TIMEOUT, send_setup(&handle, setup)) => r
            .map_err(|_| SupervisorError::Boot("the guest did not finish its setup".into()))??,
        status = qemu.wait() => {
            let status = status.map_err(|e| SupervisorError::io("waiting for QEMU", e))?;
            return Err(died(status));
        }
    };
    let kernel_release = match reply {
        SetupReply::Ok { kernel_release } => kernel_release,
        SetupReply::Failed { message } => {
            return Err(SupervisorError::Boot(format!(
                "guest setup failed: {message}"
            )))
        }
    };
    let listener = UnixListener::bind(paths.control_socket()).map_err(|e| {
        SupervisorError::io(format!("binding {}", paths.control_socket().display()), e)
    })?;
    let ready_ms = started.elapsed().as_millis() as u64;
    let status = RuntimeStatus {
        supervisor_pid: std::process::id(),
        qemu_pid,
        file_server_pids: shares.iter().filter_map(|s| s.child.id()).collect(),
        started_at_unix_ms,
        accel: accel.accel.to_string(),
        accel_reason: accel.reason,
        kernel_release,
        channel_ms,
        ready_ms,
        stopping: false,
        jail: jail.applied,
        jail_missing: jail.missing,
    };
    Ok(Vm {
        config: config.clone(),
        channel_closed,
        proxy_task,
        proxy: control_proxy,
        qemu,
        shares,
        mux: handle,
        status,
        listener: Some(listener),
        ports: Some(ports),
    })
}

/// Connects to a file server's socket for QEMU. The socket file appears at
/// the server's `bind`, a moment before its `listen`: a refused connection
/// is tried again for a while.
async fn connect_file_server(
    socket: &std::path::Path,
) -> Result<std::os::unix::net::UnixStream, SupervisorError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(conn) => return Ok(conn),
            Err(e)
                if Instant::now() < deadline
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                    ) =>
            {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(e) => {
                return Err(SupervisorError::io(
                    format!("connecting to the file server at {}", socket.display()),
                    e,
                ))
            }
        }
    }
}

/// The tag of the toolchain trees' share.
const TOOLCHAINS_TAG: &str = "toolchains";

/// The shares: the workspace (tag `workspace`), then each `--mount` (tags
/// `mount1`, `mount2`, …), every one served with the sandbox's file rules.
async fn start_shares(
    dirs: &Dirs,
    config: &SandboxConfig,
    paths: &SandboxPaths,
) -> Result<Vec<RunningShare>, SupervisorError> {
    // The servers write `secret-read` there and may write nowhere else in
    // the sandbox's folder: it must exist (and an earlier version's file be
    // moved in) before they start.
    crate::own::check_shares(dirs, config)?;
    let labels = sandpen_policy::LabelStore::in_dir(&paths.dir);
    labels
        .prepare()
        .map_err(|e| SupervisorError::Invalid(format!("flow labels: {e}")))?;
    let policy = crate::egress::load_policy(dirs, paths, config)?;
    let rules = policy
        .file_rules()
        .map_err(|e| SupervisorError::Invalid(format!("file rules: {e}")))?;
    let rules_json = sandpen_fs::rules_to_json(&rules);
    let has_rules = rules.all().next().is_some();
    tracing::info!("file rules: {}", rules.summary());
    let kind = fileserver::ServerKind::from_env()?;
    let mut list = vec![(WORKSPACE_TAG.to_string(), config.workspace.clone(), false)];
    for (i, m) in config.mounts.iter().enumerate() {
        if !m.path.is_dir() {
            return Err(SupervisorError::Invalid(format!(
                "the extra mount {} no longer exists",
                m.path.display()
            )));
        }
        list.push((format!("mount{}", i + 1), m.path.clone(), m.read_only));
    }
    let mut shares = Vec::new();
    for (i, (tag, host_path, read_only)) in list.into_iter().enumerate() {
        let spec = ShareSpec {
            tag,
            guest_path: host_path.clone(),
            host_path,
            socket: paths.share_socket(i),
            read_only,
            guest_uid: config.guest_uid,
            guest_gid: config.guest_gid,
            rules_json: rules_json.clone(),
            has_rules,
            sandbox: config.name.clone(),
            files_log: paths.logs().join("files.jsonl"),
            flow_state: labels.path().to_path_buf(),
            reserve: policy.reserve().to_string(),
        };
        shares.push(fileserver::start(&spec, &paths.fs_log(), kind).await?);
    }
    // The toolchain trees the host gave this sandbox: vendor files, served
    // read-only and owned by the guest's root, under no file rule (they are
    // not the user's files). The folder exists once a start provisioned a
    // toolchain (docs/dev-env.md, "Shared toolchain trees").
    let view = paths.toolchain_view();
    if view.is_dir() && kind == fileserver::ServerKind::Sandpen {
        let spec = ShareSpec {
            tag: TOOLCHAINS_TAG.into(),
            host_path: view,
            guest_path: sandpen_toolcache::GUEST_VIEW.into(),
            socket: paths.share_socket(shares.len()),
            read_only: true,
            guest_uid: 0,
            guest_gid: 0,
            rules_json: sandpen_fs::rules_to_json(&sandpen_policy::FileRules::default()),
            has_rules: false,
            sandbox: config.name.clone(),
            files_log: paths.logs().join("files.jsonl"),
            flow_state: labels.path().to_path_buf(),
            reserve: policy.reserve().to_string(),
        };
        shares.push(fileserver::start(&spec, &paths.fs_log(), kind).await?);
    }
    Ok(shares)
}

/// The environment every process in the guest starts with: the sandbox's name
/// and the guest's HTTP proxy port, for clients that do not go through the
/// transparent redirect.
fn guest_env(dirs: &Dirs, name: &str) -> Vec<(String, String)> {
    let proxy = "http://127.0.0.1:3128".to_string();
    let no_proxy = "localhost,127.0.0.1,::1".to_string();
    let mut env = vec![("SANDPEN_SANDBOX".to_string(), name.to_string())];
    for key in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        env.push((key.to_string(), proxy.clone()));
    }
    for key in ["NO_PROXY", "no_proxy"] {
        env.push((key.to_string(), no_proxy.clone()));
    }
    env.extend(crate::credentials::guest_env(dirs, name));
    env
}

/// Copies the guest's serial console into `logs/console.log`, starting a new
/// file (and keeping one old one) past [`CONSOLE_LOG_MAX`]: the guest can write
/// to its console without end, and must not fill the host's disk.
async fn pump_console(socket: std::path::PathBuf, log: std::path::PathBuf) {
    use tokio::io::AsyncReadExt;
    let mut conn = None;
    for _ in 0..2000 {
        match UnixStream::connect(&socket).await {
            Ok(c) => {
                conn = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    let Some(mut conn) = conn else {
        tracing::warn!("no console socket at {}", socket.display());
        return;
    };
    let open = |log: &std::path::Path| OpenOptions::new().create(true).append(true).open(log);
    let Ok(mut file) = open(&log) else { return };
    let mut written = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if written + n as u64 > CONSOLE_LOG_MAX {
            let _ = std::fs::rename(&log, log.with_extension("log.1"));
            let Ok(f) = open(&log) else { return };
            file = f;
            written = 0;
        }
        if file.write_all(&buf[..n]).is_err() {
            return;
        }
        written += n as u64;
    }
}

async fn send_setup(handle: &MuxHandle, setup: GuestSetup) -> Result<SetupReply, SupervisorError> {
    let stream = handle.open().await?;
    let mut frames = FrameStream::new(stream);
    frames.send(&Request::Setup(setup)).await?;
    Ok(frames.expect::<SetupReply>("the setup reply").await?)
}

async fn serve(mut vm: Vm, paths: &SandboxPaths) -> Result<(), SupervisorError> {
    let (stop_tx, mut stop_rx) = mpsc::channel::<()>(1);
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| SupervisorError::io("watching SIGTERM", e))?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|e| SupervisorError::io("watching SIGINT", e))?;
    let status = Arc::new(vm.status.clone());
    let stopping = Arc::new(AtomicBool::new(false));
    let port_tasks = vm
        .ports
        .take()
        .map(|p| p.serve(vm.mux.clone()))
        .unwrap_or_default();
    let owner = (vm.config.guest_uid, vm.config.guest_gid);
    // Control connections are served by their own task, so that status keeps
    // being answered ("stopping") while the guest shuts down.
    let accept_task = vm.listener.take().map(|listener| {
        let (mux, stop_tx, status, stopping, proxy) = (
            vm.mux.clone(),
            stop_tx.clone(),
            status.clone(),
            stopping.clone(),
            vm.proxy.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    // Out of descriptors, say: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let (mux, stop_tx, status, stopping, proxy) = (
                    mux.clone(),
                    stop_tx.clone(),
                    status.clone(),
                    stopping.clone(),
                    proxy.clone(),
                );
                tokio::spawn(async move {
                    if let Err(e) =
                        handle_control(conn, mux, stop_tx, status, stopping, owner, proxy).await
                    {
                        tracing::debug!("control connection: {e}");
                    }
                });
            }
        })
    });
    // Every part is watched: QEMU, the control channel, each file server and
    // the egress proxy. A part that dies stops the sandbox at once, with the
    // reason in the log and in `last-exit.json` for `ls` (a vhost-user-fs
    // device cannot take a new server back in QEMU, so restarting the file
    // server is not an option; stopping ends every guest I/O on the share
    // with an error instead of a hang).
    let shares = &mut vm.shares;
    let file_server_died = async move {
        if shares.is_empty() {
            return std::future::pending::<String>().await;
        }
        let waits = shares.iter_mut().map(|share| {
            let path = share.spec.host_path.clone();
            Box::pin(async move {
                let status = share.child.wait().await;
                (path, status)
            })
        });
        let ((path, status), _, _) = futures::future::select_all(waits).await;
        match status {
            Ok(status) => format!(
                "the file server for {} {}",
                path.display(),
                crate::exit::describe(status)
            ),
            Err(e) => format!("waiting for the file server for {}: {e}", path.display()),
        }
    };
    // The proxy's loop ends by itself when the egress channel does (which the
    // guest may do: it then has no network); only a panic is a failure.
    let proxy_task = &mut vm.proxy_task;
    let proxy_failed = async move {
        match proxy_task.await {
            Err(e) if e.is_panic() => format!("the egress proxy failed: {e}"),
            _ => std::future::pending::<String>().await,
        }
    };
    enum Ending {
        Qemu(std::io::Result<std::process::ExitStatus>),
        /// The control channel or a file server ended; QEMU gets `grace` to
        /// show whether it was the cause.
        PartDied {
            reason: String,
            grace: Duration,
        },
        Proxy(String),
        Asked,
    }
    let ending = tokio::select! {
        st = vm.qemu.wait() => Ending::Qemu(st),
        reason = &mut vm.channel_closed => Ending::PartDied {
            reason: reason.unwrap_or_else(|_| "the control channel's task ended".into()),
            grace: Duration::from_secs(2),
        },
        reason = file_server_died => Ending::PartDied {
            reason,
            grace: Duration::from_millis(200),
        },
        reason = proxy_failed => Ending::Proxy(reason),
        _ = stop_rx.recv() => Ending::Asked,
        _ = sigterm.recv() => Ending::Asked,
        _ = sigint.recv() => Ending::Asked,
    };
    stopping.store(true, Ordering::Relaxed);
    // The published ports close as soon as the sandbox is on its way down.
    for task in &port_tasks {
        task.abort();
    }
    let exit = match ending {
        Ending::Qemu(Ok(s)) if s.success() => {
            tracing::info!("the guest powered off");
            Ok(())
        }
        Ending::Qemu(Ok(s)) => {
            let reason = format!(
                "QEMU {}; see {}",
                crate::exit::describe(s),
                paths.logs().join("qemu.log").display()
            );
            tracing::warn!("{reason}");
            Err(SupervisorError::Boot(reason))
        }
        Ending::Qemu(Err(e)) => Err(SupervisorError::io("waiting for QEMU", e)),
        Ending::PartDied { reason, grace } => {
            // A QEMU that died takes the channel and the file servers with
            // it: if it is gone, it is the cause to name. A guest that powers
            // itself off closes its channel a moment before QEMU exits: that
            // is a stop, not a failure. A file server that died leaves QEMU
            // running: a short grace.
            match tokio::time::timeout(grace, vm.qemu.wait()).await {
                Ok(Ok(s)) if s.success() => {
                    tracing::info!("the guest powered off");
                    Ok(())
                }
                Ok(Ok(s)) => {
                    let reason = format!(
                        "QEMU {}; see {}",
                        crate::exit::describe(s),
                        paths.logs().join("qemu.log").display()
                    );
                    tracing::warn!("{reason}");
                    Err(SupervisorError::Boot(reason))
                }
                _ => {
                    tracing::warn!("{reason}; stopping the VM");
                    end_qemu(&mut vm, paths).await;
                    Err(SupervisorError::Boot(reason))
                }
            }
        }
        Ending::Proxy(reason) => {
            tracing::error!("{reason}; stopping the sandbox");
            shutdown(&mut vm, paths).await;
            Err(SupervisorError::Boot(reason))
        }
        Ending::Asked => {
            shutdown(&mut vm, paths).await;
            Ok(())
        }
    };
    if let Some(task) = accept_task {
        task.abort();
    }
    vm.proxy_task.abort();
    for share in &mut vm.shares {
        let _ = share.child.start_kill();
        let _ = share.child.wait().await;
    }
    tracing::info!("sandbox {} stopped", vm.config.name);
    exit
}

async fn shutdown(vm: &mut Vm, paths: &SandboxPaths) {
    let asked = tokio::time::timeout(Duration::from_secs(5), async {
        let stream = vm.mux.open().await?;
        let mut frames = FrameStream::new(stream);
        frames.send(&Request::Shutdown).await?;
        frames.expect::<Ack>("the shutdown ack").await?;
        Ok::<(), SupervisorError>(())
    })
    .await;
    if !matches!(asked, Ok(Ok(()))) {
        tracing::warn!("the guest did not acknowledge the shutdown: {asked:?}");
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, vm.qemu.wait())
        .await
        .is_ok()
    {
        return;
    }
    tracing::warn!("the guest did not power off in {SHUTDOWN_GRACE:?}; telling QEMU to quit");
    end_qemu(vm, paths).await;
}

/// QMP `quit`, then SIGKILL if QEMU does not go within seconds.
async fn end_qemu(vm: &mut Vm, paths: &SandboxPaths) {
    let quit = async {
        if let Ok(mut qmp) = sandpen_vm::qmp::Qmp::connect(&paths.qmp_socket()).await {
            let _ = qmp.execute("quit", None).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), quit).await;
    if tokio::time::timeout(Duration::from_secs(5), vm.qemu.wait())
        .await
        .is_err()
    {
        let _ = vm.qemu.start_kill();
        let _ = vm.qemu.wait().await;
    }
}

async fn ping_guest(mux: &MuxHandle) -> Result<sandpen_proto::Pong, SupervisorError> {
    let ping = async {
        let stream = mux.open().await?;
        let mut frames = FrameStream::new(stream);
        frames.send(&Request::Ping).await?;
        Ok(frames.expect::<sandpen_proto::Pong>("the pong").await?)
    };
    tokio::time::timeout(Duration::from_secs(10), ping)
        .await
        .map_err(|_| SupervisorError::Boot("no answer within 10 s".into()))?
}

/// The guest process whose socket has local port `src_port` (PID 1's
/// answer, shown in `policy pending`, never trusted).
async fn guest_process(mux: &MuxHandle, src_port: u16) -> Option<String> {
    let stream = mux.open().await.ok()?;
    let mut frames = FrameStream::new(stream);
    frames.send(&Request::Process { src_port }).await.ok()?;
    let info = frames
        .expect::<sandpen_proto::ProcessInfo>("the process")
        .await
        .ok()?;
    info.process
        .map(|p| p.chars().filter(|c| !c.is_control()).take(200).collect())
}

/// The guest's root file system and task count; a guest too busy to answer
/// within 2 s gets its last answer shown.
async fn guest_usage(mux: &MuxHandle) -> Result<sandpen_proto::GuestUsage, SupervisorError> {
    let ask = async {
        let stream = mux.open().await?;
        let mut frames = FrameStream::new(stream);
        frames.send(&Request::Usage).await?;
        Ok(frames
            .expect::<sandpen_proto::GuestUsage>("the guest's usage")
            .await?)
    };
    tokio::time::timeout(Duration::from_secs(2), ask)
        .await
        .map_err(|_| SupervisorError::Boot("no answer within 2 s".into()))?
}

async fn handle_control(
    conn: UnixStream,
    mux: MuxHandle,
    stop_tx: mpsc::Sender<()>,
    status: Arc<RuntimeStatus>,
    stopping: Arc<AtomicBool>,
    owner: (u32, u32),
    proxy: sandpen_proxy::Proxy,
) -> Result<(), SupervisorError> {
    let mut frames = FrameStream::new(conn);
    let Some(request) = frames.recv::<ControlRequest>().await? else {
        return Ok(());
    };
    match request {
        ControlRequest::Status => {
            let mut status = (*status).clone();
            status.stopping = stopping.load(Ordering::Relaxed);
            frames.send(&ControlReply::Status(status)).await?;
        }
        ControlRequest::Ping => {
            let reply = match ping_guest(&mux).await {
                Ok(pong) => ControlReply::Pong {
                    guest_uptime_ms: pong.uptime_ms,
                },
                Err(e) => ControlReply::Error(format!("the guest did not answer: {e}")),
            };
            frames.send(&reply).await?;
        }
        ControlRequest::Stats => {
            let guest = guest_usage(&mux).await.ok();
            let stats = crate::resources::stats(guest);
            frames.send(&ControlReply::Stats(stats)).await?;
        }
        ControlRequest::Pending => {
            let list = proxy.ask().list();
            frames.send(&ControlReply::Pending(list)).await?;
        }
        ControlRequest::Answer { id, answer } => {
            let reply = match proxy.ask().answer(id, answer) {
                Ok(info) => {
                    tracing::info!(
                        id, host = %info.host, port = info.port, ?answer,
                        "ask: answered from the CLI"
                    );
                    ControlReply::Answered(info)
                }
                Err(e) => ControlReply::Error(e.to_string()),
            };
            frames.send(&reply).await?;
        }
        ControlRequest::Recheck => {
            // Re-reads the policy files if they changed, and releases what
            // a rule now decides.
            let policy = proxy.current_policy();
            let n = proxy.ask().recheck(&policy);
            frames.send(&ControlReply::Rechecked(n)).await?;
        }
        ControlRequest::WatchPending => {
            let mut news = proxy.ask().subscribe();
            frames.send(&ControlReply::Watching).await?;
            loop {
                match news.recv().await {
                    Ok(info) => frames.send(&ControlReply::NewPending(info)).await?,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        }
        ControlRequest::Stop => {
            frames.send(&ControlReply::Stopping).await?;
            let _ = stop_tx.send(()).await;
            // Hold the connection: it closes when the supervisor exits.
            std::future::pending::<()>().await;
        }
        ControlRequest::Exec(req) => relay(frames, &mux, Request::Exec(req)).await?,
        ControlRequest::CopyOut { path } => relay(frames, &mux, Request::CopyOut { path }).await?,
        ControlRequest::CopyIn { path } => {
            relay(frames, &mux, Request::CopyIn { path, owner }).await?
        }
    }
    Ok(())
}

/// Opens a guest stream, sends `request`, answers `ExecStarted`, then copies
/// bytes both ways: the CLI speaks the guest's frames of that stream.
async fn relay(
    mut frames: FrameStream<UnixStream>,
    mux: &MuxHandle,
    request: Request,
) -> Result<(), SupervisorError> {
    let stream = match mux.open().await {
        Ok(s) => s,
        Err(e) => {
            frames
                .send(&ControlReply::Error(format!("the guest channel: {e}")))
                .await?;
            return Ok(());
        }
    };
    let mut guest = FrameStream::new(stream);
    guest.send(&request).await?;
    frames.send(&ControlReply::ExecStarted).await?;
    let (mut cli, early) = frames.into_parts();
    let mut guest = guest.into_inner();
    if !early.is_empty() {
        guest
            .write_all(&early)
            .await
            .map_err(|e| SupervisorError::io("relaying to the guest", e))?;
    }
    let _ = tokio::io::copy_bidirectional(&mut cli, &mut guest).await;
    Ok(())
}
