//! One function per command.

use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sandpen_image::{BuildOutcome, ImageSpec};
use sandpen_supervisor::control::{self, State};
use sandpen_supervisor::sandbox::{self, CreateOptions, SandboxConfig};
use sandpen_supervisor::Dirs;

use crate::{attach, Command, CreateArgs, EnvCommand, ImageCommand, EXIT_SANDPEN_ERROR};

/// An error as one line: the outermost context and its causes.
/// An error and its causes on one line, each said once: a cause whose text
/// the message before it already ends with (an error that prints its source,
/// as `SupervisorError::Io` does) is not repeated.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain().map(|c| c.to_string()) {
        if line.ends_with(&cause) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&cause);
    }
    line
}

pub fn supervise(name: &str) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SANDPEN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    match sandpen_supervisor::supervise::main(name) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(EXIT_SANDPEN_ERROR)
        }
    }
}

pub async fn dispatch(command: Command) -> Result<i32> {
    let dirs = Dirs::from_env();
    match command {
        Command::Run {
            agent,
            workspace,
            create,
            args,
        } => run(&dirs, agent, workspace, create, args).await,
        Command::Create { workspace, create } => {
            let ws = workspace_path(workspace)?;
            let _lock = sandbox::lock_creation(&dirs)?;
            let config = create_sandbox(&dirs, &ws, &create, "shell").await?;
            println!("{}", config.name);
            Ok(0)
        }
        Command::Start { name } => {
            let config = sandbox::load(&dirs, &name)?;
            // A policy that does not load stops the start itself, with its line.
            if let Ok(policy) =
                sandpen_supervisor::egress::load_policy(&dirs, &dirs.sandbox(&config.name), &config)
            {
                print_weak_sinks(&dirs, &config, &policy);
            }
            start(&dirs, &name).await?;
            Ok(0)
        }
        Command::Stop { name, time } => {
            stop(&dirs, &name, Duration::from_secs(time)).await?;
            Ok(0)
        }
        Command::Rm { names, force } => {
            for name in names {
                rm(&dirs, &name, force).await?;
            }
            Ok(0)
        }
        Command::Ls { json } => ls(&dirs, json).await,
        Command::Stats {
            names,
            no_stream,
            json,
        } => crate::stats_cmd::run(&dirs, names, no_stream, json).await,
        Command::Logs {
            name,
            follow,
            supervisor,
        } => logs(&dirs, &name, follow, supervisor).await,
        Command::Exec {
            interactive,
            tty,
            user,
            workdir,
            env,
            name,
            command,
        } => {
            let config = sandbox::load(&dirs, &name)?;
            let paths = dirs.sandbox(&name);
            if !matches!(control::state(&paths).await, State::Running(_)) {
                bail!("sandbox {name} is not running; start it with `sandpen start {name}`");
            }
            let user_env = env
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .with_context(|| format!("-e {kv}: expected K=V"))
                })
                .collect::<Result<Vec<_>>>()?;
            // devcontainer.json's variables, then the user's `-e` (which win).
            let mut env = workspace_env(&config);
            env.extend(user_env);
            exec(
                &dirs,
                &config,
                command,
                env,
                user,
                workdir,
                tty,
                interactive,
            )
            .await
        }
        Command::Ports { name, guest_port } => {
            let config = sandbox::load(&dirs, &name)?;
            let shown: Vec<_> = config
                .ports
                .iter()
                .filter(|m| guest_port.is_none_or(|p| p == m.guest_port))
                .collect();
            if shown.is_empty() {
                if let Some(p) = guest_port {
                    bail!("sandbox {name} does not publish guest port {p}");
                }
            }
            for m in shown {
                println!("{m}");
            }
            Ok(0)
        }
        Command::Cp { src, dest } => crate::cp_cmd::run(&dirs, &src, &dest).await,
        Command::Save { name, image } => save(&dirs, &name, &image),
        Command::Image(cmd) => image(&dirs, cmd).await,
        Command::Policy(cmd) => crate::policy_cmd::run(&dirs, cmd).await,
        Command::Flow(cmd) => flow(&dirs, cmd),
        Command::Secret(cmd) => crate::secret_cmd::run(&dirs, cmd),
        Command::Doctor => doctor(&dirs),
        Command::Env(EnvCommand::Plan { path, json }) => env_plan(path, json),
        Command::Cache(cmd) => cache(&dirs, cmd),
        Command::Ui(args) => crate::ui_cmd::run(dirs, args).await,
        Command::Supervise { .. } | Command::FsServe(_) | Command::Jail => {
            unreachable!("handled before the runtime starts")
        }
    }
}

/// `sandpen cache ls|prune`: the host's toolchain cache (docs/dev-env.md,
/// "Cache size").
fn cache(dirs: &Dirs, cmd: crate::CacheCommand) -> Result<i32> {
    use crate::stats_cmd::human_bytes;
    let dir = dirs.toolchains();
    match cmd {
        crate::CacheCommand::Ls { json } => {
            let usage = sandpen_toolcache::usage::usage(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&usage)?);
                return Ok(0);
            }
            println!("{:<6} {:<12} {:>8}  USE", "KIND", "SHA256", "SIZE");
            for blob in &usage.blobs {
                let urls = if blob.urls.is_empty() {
                    "(no index entry)".to_string()
                } else {
                    blob.urls.join(" ")
                };
                println!(
                    "{:<6} {:<12} {:>8}  {urls}",
                    "blob",
                    &blob.sha256[..12],
                    human_bytes(blob.size)
                );
            }
            for tree in &usage.trees {
                println!(
                    "{:<6} {:<12} {:>8}  {}",
                    "tree",
                    &tree.sha256[..12],
                    human_bytes(tree.size),
                    if tree.in_use {
                        "in use (a sandbox or an image links it)"
                    } else {
                        "unused"
                    }
                );
            }
            println!("total {} in {}", human_bytes(usage.total()), dir.display());
            Ok(0)
        }
        crate::CacheCommand::Prune { all } => {
            let pruned = sandpen_toolcache::usage::prune(&dir, all)?;
            println!(
                "removed {} archive(s) and {} tree(s): {} freed",
                pruned.blobs,
                pruned.trees,
                human_bytes(pruned.bytes)
            );
            Ok(0)
        }
    }
}

/// `sandpen env plan`: the toolchains and devcontainer settings the workspace
/// asks for (docs/dev-env.md).
fn env_plan(path: Option<PathBuf>, json: bool) -> Result<i32> {
    let ws = workspace_path(path)?;
    let plan = sandpen_devenv::detect(&ws)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        println!("workspace {}", ws.display());
        print!("{plan}");
        for conflict in plan.conflicts() {
            println!("conflict: {conflict}");
        }
        // What a start hands to the image's mise (docs/dev-env.md).
        for choice in &plan.tools {
            match sandpen_api::provision::mise_spec(choice) {
                Ok(Some(spec)) => println!("provision: mise install {spec}"),
                Ok(None) => println!(
                    "provision: mise install {}@(the newest release {} allows, at the start)",
                    choice.tool, choice.chosen.version
                ),
                Err(why) => println!("provision: {why}"),
            }
        }
    }
    Ok(0)
}

fn workspace_path(arg: Option<PathBuf>) -> Result<PathBuf> {
    let path = match arg {
        Some(p) => p,
        None => std::env::current_dir().context("reading the current directory")?,
    };
    Ok(sandpen_api::sandboxes::workspace_path(&path)?)
}

fn create_options(ws: &Path, args: &CreateArgs, agent: &str) -> Result<CreateOptions> {
    Ok(CreateOptions {
        name: args.name.clone(),
        workspace: ws.to_path_buf(),
        image: args.image.clone().unwrap_or_else(|| match agent {
            "shell" => "default".to_string(),
            agent => agent.to_string(),
        }),
        agent: agent.to_string(),
        cpus: sandbox::validate_cpus(args.cpus)?,
        memory_mib: sandbox::parse_memory_mib(&args.memory)?,
        disk_gib: args.disk,
        accel: args.accel.parse()?,
        add_hosts: args
            .add_hosts
            .iter()
            .map(|h| {
                sandpen_policy::AddHost::parse(h)
                    .map(|_| h.clone())
                    .map_err(|e| anyhow::anyhow!("--add-host {h}: {e}"))
            })
            .collect::<Result<_>>()?,
        docker: args.docker.parse()?,
        mounts: parse_mounts(&args.mounts)?,
        upstream_cas: args.upstream_cas.clone(),
        require_jail: args.require_jail,
        ports: args.ports.clone(),
    })
}

fn parse_mounts(list: &[String]) -> Result<Vec<sandbox::ExtraMount>> {
    Ok(list
        .iter()
        .map(|m| sandbox::ExtraMount::parse(m))
        .collect::<Result<Vec<_>, _>>()?)
}

/// `sandpen flow show|reset NAME`.
fn flow(dirs: &Dirs, cmd: crate::FlowCommand) -> Result<i32> {
    match cmd {
        crate::FlowCommand::Show { name, json } => {
            let labels = sandpen_api::flow::show(dirs, &name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&labels)?);
                return Ok(0);
            }
            if labels.is_empty() {
                println!("{name}: no flow labels");
                return Ok(0);
            }
            let mut rows = vec![["LABEL".to_string(), "SET-AT".into(), "BY".into()]];
            for l in &labels.labels {
                rows.push([l.label.as_str().into(), l.at.clone(), l.by.clone()]);
            }
            print_table(&rows);
            Ok(0)
        }
        crate::FlowCommand::Reset { name } => {
            let old = sandpen_api::flow::reset(dirs, &name)?;
            if old.is_empty() {
                println!("{name}: no flow labels were set");
            } else {
                let names: Vec<_> = old.labels.iter().map(|l| l.label.as_str()).collect();
                println!("{name}: cleared {}", names.join(", "));
            }
            Ok(0)
        }
    }
}

/// One line on the file rules a sandbox runs with, and one on what of the
/// workspace file was not applied, and why.
fn print_file_rules(dirs: &Dirs, config: &SandboxConfig) -> Result<()> {
    sandpen_supervisor::own::check_shares(dirs, config)?;
    let policy =
        sandpen_supervisor::egress::load_policy(dirs, &dirs.sandbox(&config.name), config)?;
    let rules = policy.file_rules()?;
    eprintln!("sandpen: files: {}", rules.summary());
    if let Some(held) = policy.held_back() {
        eprintln!(
            "sandpen: {held}; `sandpen policy trust {}` applies it",
            config.name
        );
    }
    print_weak_sinks(dirs, config, &policy);
    Ok(())
}

/// One line per trusted sink that only the workspace file names and that
/// will not count as a sink after `secret-read` for want of interception
/// (docs/egress.md).
fn print_weak_sinks(dirs: &Dirs, config: &SandboxConfig, policy: &sandpen_policy::Policy) {
    for weak in sandpen_supervisor::credentials::weak_sinks_of(dirs, config, policy) {
        eprintln!("sandpen: {weak}");
    }
}

async fn create_sandbox(
    dirs: &Dirs,
    ws: &Path,
    args: &CreateArgs,
    agent: &str,
) -> Result<SandboxConfig> {
    let opts = create_options(ws, args, agent)?;
    let progress = indicatif::MultiProgress::new();
    let config =
        sandpen_api::sandboxes::create(dirs, &opts, &progress, &|s| eprintln!("sandpen: {s}"))?;
    first_run_policy(dirs)?;
    Ok(config)
}

/// On the first sandbox, with no network policy yet: ask which preset to start
/// from (at a terminal), or say how the sandbox's network stands.
fn first_run_policy(dirs: &Dirs) -> Result<()> {
    use sandpen_policy::Preset;
    let path = dirs.config.join("policy.toml");
    if path.exists() {
        return Ok(());
    }
    if !(std::io::stdin().is_terminal() && std::io::stderr().is_terminal()) {
        eprintln!(
            "sandpen: note: there is no network policy yet, so sandboxes reach nothing; \
             `sandpen policy init balanced` allows the model APIs, package registries and git hosts"
        );
        return Ok(());
    }
    eprint!(
        "No network policy yet. What may sandboxes reach?\n  \
         1) balanced: the agents' model APIs, package registries, GitHub and GitLab, toolchain vendors (recommended)\n  \
         2) deny-all: nothing until you allow it\n  \
         3) allow-all: everything but local and private addresses\n\
         Choose [1]: "
    );
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .context("reading the answer")?;
    let preset = match answer.trim() {
        "" | "1" | "balanced" => Preset::Balanced,
        "2" | "deny-all" => Preset::DenyAll,
        "3" | "allow-all" => Preset::AllowAll,
        other => {
            bail!("unknown choice {other:?}; run `sandpen policy init balanced|deny-all|allow-all`")
        }
    };
    std::fs::create_dir_all(&dirs.config)
        .with_context(|| format!("creating {}", dirs.config.display()))?;
    // Through the API, so that the choice is in the policy's history like
    // every other edit (docs/policy.md, "History").
    sandpen_api::policy::init_preset(
        dirs,
        &sandpen_api::policy::Where::Global,
        preset.as_str(),
        sandpen_policy::history::Who::Cli,
        "chosen at the first run's prompt",
    )?;
    eprintln!(
        "sandpen: network policy {} saved in {}; change it with `sandpen policy`",
        preset.as_str(),
        path.display()
    );
    Ok(())
}

async fn start(dirs: &Dirs, name: &str) -> Result<()> {
    let config = sandbox::load(dirs, name)?;
    let decision = sandpen_vm::choose_accel(config.accel)?;
    if decision.accel == sandpen_vm::Accel::Tcg && std::io::stderr().is_terminal() {
        eprintln!("sandpen: {}", decision.reason);
    }
    if decision.accel == sandpen_vm::Accel::Tcg && config.cpus > 1 {
        let version = sandpen_vm::which("qemu-system-x86_64")
            .as_deref()
            .and_then(sandpen_vm::QemuVersion::of);
        if let Some(warning) = sandpen_vm::tcg_warning(decision.accel, version) {
            eprintln!("sandpen: note: {warning}");
        }
    }
    let spinner = std::io::stderr().is_terminal().then(|| {
        let s = indicatif::ProgressBar::new_spinner();
        s.set_message(format!("starting {name}"));
        s.enable_steady_tick(Duration::from_millis(100));
        s
    });
    let started = sandpen_api::sandboxes::start(dirs, name).await;
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    let started = started.with_context(|| format!("starting sandbox {name}"))?;
    for note in started.notes {
        eprintln!("sandpen: note: {note}");
    }
    Ok(sandpen_api::devcontainer::after_start(dirs, &config, &TerminalOutput).await?)
}

/// The steps after a start (docs/dev-env.md): on this terminal, sandpen's
/// lines on stderr and the lifecycle commands' output on stdout and stderr.
struct TerminalOutput;

impl sandpen_api::devcontainer::StartOutput for TerminalOutput {
    fn line(&self, line: &str) {
        eprintln!("sandpen: {line}");
    }

    fn output(&self, stderr: bool, bytes: &[u8]) {
        if stderr {
            let mut e = std::io::stderr();
            let _ = e.write_all(bytes);
            let _ = e.flush();
        } else {
            let mut o = std::io::stdout();
            let _ = o.write_all(bytes);
            let _ = o.flush();
        }
    }
}

/// The workspace's devcontainer variables, for a command in the sandbox.
fn workspace_env(config: &SandboxConfig) -> Vec<(String, String)> {
    sandpen_api::devcontainer::workspace_env(config)
}

async fn stop(dirs: &Dirs, name: &str, timeout: Duration) -> Result<()> {
    Ok(sandpen_api::sandboxes::stop(dirs, name, timeout).await?)
}

async fn rm(dirs: &Dirs, name: &str, force: bool) -> Result<()> {
    Ok(sandpen_api::sandboxes::rm(dirs, name, force).await?)
}

#[allow(clippy::too_many_arguments)]
async fn exec(
    dirs: &Dirs,
    config: &SandboxConfig,
    argv: Vec<String>,
    mut env: Vec<(String, String)>,
    user: Option<String>,
    workdir: Option<String>,
    tty: bool,
    interactive: bool,
) -> Result<i32> {
    let size = if tty { attach::terminal_size() } else { None };
    if tty {
        if let Ok(term) = std::env::var("TERM") {
            env.insert(0, ("TERM".into(), term));
        }
    }
    let req = sandpen_api::sandboxes::exec_request(
        config,
        argv,
        env,
        user,
        workdir,
        tty.then_some(size.unwrap_or(sandpen_proto::WinSize { rows: 24, cols: 80 })),
    );
    let frames = control::exec(&dirs.sandbox(&config.name), req).await?;
    attach::attach(frames, tty, interactive || tty).await
}

/// `sandpen save NAME IMAGE`: the stopped sandbox's disk becomes an image.
fn save(dirs: &Dirs, name: &str, image: &str) -> Result<i32> {
    let config = sandbox::load(dirs, name)?;
    let paths = dirs.sandbox(name);
    // No start while the disk is read.
    let _start = sandbox::lock_exclusive(&paths.dir.join("start.lock"))?;
    if control::supervisor_alive(&paths) {
        bail!("sandbox {name} is running; stop it first (`sandpen stop {name}`): a running disk changes under the copy");
    }
    let parent = sandpen_image::load(&dirs.images(), &config.image)?;
    let ca = sandpen_supervisor::credentials::ensure_ca(&paths)?;
    let started = std::time::Instant::now();
    eprintln!(
        "sandpen: saving sandbox {name} as image {image} (from image {})",
        parent.name
    );
    let saved = sandpen_image::save(
        &dirs.images(),
        &sandpen_image::SaveSpec {
            parent: &parent,
            disk: &paths.disk(),
            name: image,
            sandbox: name,
            remove_certs: &[ca.cert_pem().to_string()],
            toolchains: Some(&paths.toolchain_view()),
        },
    )?;
    println!(
        "saved image {} from sandbox {name} in {:.0} s: {} MiB of content, parent {} ({})",
        saved.name,
        started.elapsed().as_secs_f64(),
        saved.manifest.sizes.rootfs_content >> 20,
        parent.name,
        saved.dir.display()
    );
    Ok(0)
}

async fn run(
    dirs: &Dirs,
    agent: Option<String>,
    workspace: Option<PathBuf>,
    create: CreateArgs,
    args: Vec<String>,
) -> Result<i32> {
    // `sandpen run ./path` names a workspace, not an agent.
    let names = sandpen_agents::run_names();
    let (agent, workspace) = match (agent, workspace) {
        (Some(a), ws) if names.contains(&a.as_str()) => (a, ws),
        (Some(a), None) => ("shell".to_string(), Some(PathBuf::from(a))),
        (Some(a), Some(_)) => bail!("unknown agent {a:?}: use one of {}", names.join(", ")),
        (None, ws) => ("shell".to_string(), ws),
    };
    let agent_def = match agent.as_str() {
        "shell" => None,
        name => Some(agent_or_explain(name)?),
    };
    let ws = workspace_path(workspace)?;
    // One sandbox per workspace: an existing one is used whatever agent made
    // it. Concurrent `run`s wait here for each other: the first creates it,
    // the others find it.
    let creation_lock = sandbox::lock_creation(dirs)?;
    let existing = match &create.name {
        Some(name) => match sandbox::load(dirs, name) {
            Ok(c) => Some(c),
            Err(sandpen_supervisor::SupervisorError::UnknownSandbox(_)) => None,
            Err(e) => return Err(e.into()),
        },
        None => sandbox::find_by_workspace(dirs, &ws)?,
    };
    // A sandbox's disk is an overlay over its image: `--image` cannot change
    // it, so an existing sandbox of another image is not silently used.
    if let (Some(c), Some(image)) = (&existing, &create.image) {
        if *image != c.image {
            bail!(
                "sandbox {} runs image {}, not {image}; start a new sandbox from it with                  `sandpen run --image {image} --name {}-{image}`, or remove this one first                  (`sandpen rm {}`)",
                c.name,
                c.image,
                c.name,
                c.name
            );
        }
    }
    if let Some(agent) = agent_def {
        check_agent_can_start(dirs, agent, existing.as_ref(), &create, &ws)?;
    }
    let config = match existing {
        Some(c) => c,
        None => {
            // Validate what the user typed before any slow work.
            create_options(&ws, &create, &agent)?;
            create_sandbox(dirs, &ws, &create, &agent).await?
        }
    };
    drop(creation_lock);
    let paths = dirs.sandbox(&config.name);
    let running = matches!(control::state(&paths).await, State::Running(_));
    let mut config = config;
    let mounts = parse_mounts(&create.mounts)?;
    if !create.mounts.is_empty() && mounts != config.mounts {
        if running {
            bail!(
                "sandbox {} is running with other mounts; stop it first to change them",
                config.name
            );
        }
        config = sandbox::set_mounts(dirs, &config.name, mounts)?;
    }
    if !create.ports.is_empty() && create.ports != config.ports {
        if running {
            bail!(
                "sandbox {} is running with other published ports ({}); stop it first to change them",
                config.name,
                if config.ports.is_empty() {
                    "none".to_string()
                } else {
                    config
                        .ports
                        .iter()
                        .map(|m| m.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
        }
        config = sandbox::set_ports(dirs, &config.name, create.ports.clone())?;
    }
    print_file_rules(dirs, &config)?;
    if !running {
        start(dirs, &config.name).await?;
    }
    let tty = attach::want_tty();
    let (argv, agent_vars) = match agent_def {
        None if args.is_empty() => (vec!["/bin/bash".to_string(), "-l".to_string()], vec![]),
        None => (args, vec![]),
        Some(agent) => (
            agent.launch_argv(&config.workspace.to_string_lossy(), &args),
            agent_env(agent),
        ),
    };
    // The agent's own variables come last and win.
    let mut env = workspace_env(&config);
    env.extend(agent_vars);
    let watcher = tokio::spawn(announce_asks(dirs.sandbox(&config.name)));
    let status = exec(dirs, &config, argv, env, None, None, tty, true).await;
    watcher.abort();
    status
}

/// Ask mode, while `run` is attached: a line on the terminal (and a desktop
/// notification where `notify-send` exists) for each connection that starts
/// to wait for an answer.
async fn announce_asks(paths: sandpen_supervisor::SandboxPaths) {
    let Ok(mut frames) = control::watch_pending(&paths).await else {
        return;
    };
    let notify = sandpen_vm::which("notify-send");
    while let Ok(Some(reply)) = frames.recv::<control::ControlReply>().await {
        let control::ControlReply::NewPending(p) = reply else {
            continue;
        };
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect()
        };
        let what = match (&p.reason, &p.first) {
            (Some(r), _) => format!("the agent asks: \"{}\" (untrusted)", clean(r)),
            (None, Some(f)) => clean(f),
            (None, None) => "no request seen".into(),
        };
        let dest = clean(&format!("{}:{}", p.host, p.port));
        let line = format!(
            "sandpen: {}: {dest} is waiting for your answer ({what}): \
             `sandpen policy approve {} --once|--always` or `sandpen policy deny {}` (denied in {} s)",
            p.sandbox, p.id, p.id, p.timeout_secs
        );
        // The terminal may be in raw mode: carriage returns.
        eprint!("\r\n{line}\r\n");
        if let Some(bin) = &notify {
            let _ = tokio::process::Command::new(bin)
                .arg("--app-name=sandpen")
                .arg(format!("sandpen: {} wants {dest}", p.sandbox))
                .arg(format!(
                    "{what}\nsandpen policy approve {} --once|--always",
                    p.id
                ))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn();
        }
    }
}

/// Before anything is created or booted: a secret for the agent, and an
/// image that carries it (an image named after the agent that does not exist
/// yet will be built with it).
fn check_agent_can_start(
    dirs: &Dirs,
    agent: &sandpen_agents::Agent,
    existing: Option<&SandboxConfig>,
    create: &CreateArgs,
    ws: &Path,
) -> Result<()> {
    let sandbox_name = existing
        .map(|c| c.name.clone())
        .or_else(|| create.name.clone())
        .unwrap_or_else(|| sandbox::name_from_workspace(ws));
    require_secret(dirs, agent, &sandbox_name)?;
    let image = match existing {
        Some(c) => c.image.clone(),
        None => create
            .image
            .clone()
            .unwrap_or_else(|| agent.name.to_string()),
    };
    match sandpen_image::load(&dirs.images(), &image) {
        Ok(found) if !found.manifest.agents.contains_key(agent.name) => {
            let what = match existing {
                Some(c) => format!("sandbox {} runs image {image}", c.name),
                None => format!("image {image}"),
            };
            bail!(
                "{what}, which has no {}; run it in a sandbox of its own with \
                 `sandpen run {} --name {sandbox_name}-{}`, or build an image with the agents you \
                 want together (`sandpen image build --agent {} --agent ...`)",
                agent.title,
                agent.name,
                agent.name,
                agent.name,
            );
        }
        Ok(_) => Ok(()),
        Err(sandpen_image::ImageError::NotFound { .. }) if image == agent.name => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The agent's own environment. The credential routes' sentinels
/// (`ANTHROPIC_API_KEY=proxy-managed`, ...) and the sandbox CA variables are
/// in every guest process's environment already (the supervisor's setup).
fn agent_env(agent: &sandpen_agents::Agent) -> Vec<(String, String)> {
    agent
        .env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Refuses to start an agent that has no key: without one the proxy has
/// nothing to swap in, and the agent would start into a login screen or fail
/// on its first request.
fn require_secret(dirs: &Dirs, agent: &sandpen_agents::Agent, sandbox: &str) -> Result<()> {
    if agent.services.is_empty() {
        // It signs in by itself: no key the proxy swaps in (docs/agents.md).
        if let Some(login) = agent.login {
            eprintln!(
                "sandpen: {} signs in by itself; if it asks, run `sandpen run {} -- {}` \
                 (the sign-in stays in this sandbox)",
                agent.title,
                agent.name,
                login
                    .strip_prefix(agent.binary)
                    .unwrap_or(login)
                    .trim_start()
            );
        }
        return Ok(());
    }
    // The index only: no secret value is read (nor a keyring unlocked) to check.
    let store = sandpen_supervisor::credentials::reading_store(dirs);
    let entries = store
        .list()
        .with_context(|| format!("reading the secret store {}", store.path().display()))?;
    let applies = |scope: &sandpen_credentials::Scope| match scope {
        sandpen_credentials::Scope::Global => true,
        sandpen_credentials::Scope::Sandbox(name) => name == sandbox,
    };
    if entries
        .iter()
        .any(|e| agent.services.contains(&e.service.as_str()) && applies(&e.scope))
    {
        return Ok(());
    }
    let first = agent.services.first().copied().unwrap_or("custom");
    let alternatives = if agent.services.len() > 1 {
        format!(" (or any of: {})", agent.services.join(", "))
    } else {
        String::new()
    };
    bail!(
        "no {first} secret is set, so {} would start without a key. Set one with \
         `sandpen secret set {first}`{alternatives} (it asks for the value, or reads it from stdin; \
         it stays on this host and the sandbox only ever sees the placeholder \"proxy-managed\"), \
         then run `sandpen run {}` again",
        agent.title,
        agent.name
    )
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

async fn ls(dirs: &Dirs, json: bool) -> Result<i32> {
    let rows = sandpen_api::sandboxes::list(dirs).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    let mut out = vec![[
        "NAME".to_string(),
        "STATUS".into(),
        "WORKSPACE".into(),
        "IMAGE".into(),
        "CPUS".into(),
        "MEMORY".into(),
        "UPTIME".into(),
        "CPU TIME".into(),
        "MEM USE".into(),
        "PIDS".into(),
        "PORTS".into(),
    ]];
    for r in rows {
        let [cpu, mem, pids] = match &r.resources {
            Some(s) => crate::stats_cmd::ls_columns(s),
            None => ["-".into(), "-".into(), "-".into()],
        };
        let disk_full = r
            .resources
            .as_ref()
            .and_then(|s| s.disk_full)
            .map(|d| d.to_string());
        out.push([
            r.name,
            match (r.reason, disk_full) {
                // The reason in full: `ls` is where a user learns why.
                (Some(reason), _) => format!("{} ({reason})", r.status),
                (None, Some(full)) => format!("{} ({full})", r.status),
                (None, None) => r.status,
            },
            r.workspace.display().to_string(),
            r.image,
            r.cpus.to_string(),
            format!("{}M", r.memory_mib),
            r.uptime_secs
                .map(human_duration)
                .unwrap_or_else(|| "-".into()),
            cpu,
            mem,
            pids,
            if r.ports.is_empty() {
                "-".into()
            } else {
                r.ports.join(", ")
            },
        ]);
    }
    print_table(&out);
    Ok(0)
}

pub fn print_table<const N: usize>(rows: &[[String; N]]) {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut stdout = std::io::stdout().lock();
    for row in rows {
        let line = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        let _ = writeln!(stdout, "{}", line.trim_end());
    }
}

async fn logs(dirs: &Dirs, name: &str, follow: bool, supervisor: bool) -> Result<i32> {
    let path = sandpen_api::logs::text_log_path(dirs, name, supervisor)?;
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !follow => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let mut stdout = std::io::stdout();
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    stdout.write_all(&buf)?;
    stdout.flush()?;
    if !follow {
        return Ok(0);
    }
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let len = file.metadata()?.len();
        let pos = file.stream_position()?;
        if len < pos {
            file.seek(SeekFrom::Start(0))?;
        }
        buf.clear();
        file.read_to_end(&mut buf)?;
        stdout.write_all(&buf)?;
        stdout.flush()?;
    }
}

async fn image(dirs: &Dirs, cmd: ImageCommand) -> Result<i32> {
    match cmd {
        ImageCommand::Build {
            name,
            agents,
            suite,
            mirror,
            packages,
            add_hosts,
            upstream_cas,
        } => {
            for agent in &agents {
                agent_or_explain(agent)?;
            }
            let name = name.unwrap_or_else(|| default_image_name(&agents));
            let mut spec = ImageSpec::default_for(&name);
            spec.agents = agents;
            if let Some(s) = suite {
                spec.suite = s;
            }
            if let Some(m) = mirror {
                spec.mirror = m;
            }
            spec.packages.extend(packages);
            spec.add_hosts = add_hosts;
            spec.upstream_cas = upstream_cas;
            let progress = indicatif::MultiProgress::new();
            match sandpen_image::build(&dirs.images(), &spec, &progress)? {
                BuildOutcome::UpToDate(image) => {
                    println!(
                        "image {} is up to date ({})",
                        image.name,
                        image.dir.display()
                    )
                }
                BuildOutcome::Built(image) => println!(
                    "built image {} in {:.0} s: kernel {}, rootfs {} MiB of content in a {} MiB ext4{} ({})",
                    image.name,
                    image.manifest.build_seconds,
                    image.manifest.kernel_release,
                    image.manifest.sizes.rootfs_content >> 20,
                    image.manifest.sizes.rootfs_image >> 20,
                    agents_column(&image.manifest)
                        .map(|a| format!(", agents {a}"))
                        .unwrap_or_default(),
                    image.dir.display()
                ),
            }
            Ok(0)
        }
        ImageCommand::Ls { json } => {
            let images = sandpen_image::list(&dirs.images())?;
            if json {
                let manifests: Vec<_> = images.iter().map(|i| &i.manifest).collect();
                println!("{}", serde_json::to_string_pretty(&manifests)?);
                return Ok(0);
            }
            let mut rows = vec![[
                "NAME".to_string(),
                "FROM".into(),
                "AGENTS".into(),
                "SUITE".into(),
                "KERNEL".into(),
                "CONTENT".into(),
                "CREATED".into(),
            ]];
            for i in &images {
                let lineage = sandpen_image::lineage(i, &images);
                rows.push([
                    i.name.clone(),
                    if lineage.is_empty() {
                        "-".into()
                    } else {
                        lineage.join(" <- ")
                    },
                    agents_column(&i.manifest).unwrap_or_else(|| "-".into()),
                    i.manifest.suite.clone(),
                    i.manifest.kernel_release.clone(),
                    format!("{} MiB", i.manifest.sizes.rootfs_content >> 20),
                    i.manifest.created_at.date().to_string(),
                ]);
            }
            print_table(&rows);
            Ok(0)
        }
        ImageCommand::Rm { name } => {
            let users: Vec<String> = sandbox::list(dirs)?
                .into_iter()
                .filter(|c| c.image == name)
                .map(|c| c.name)
                .collect();
            if !users.is_empty() {
                bail!(
                    "image {name} is used by sandboxes {}; remove them first (`sandpen rm`)",
                    users.join(", ")
                );
            }
            sandpen_image::remove(&dirs.images(), &name)?;
            Ok(0)
        }
    }
}

/// `claude 2.1.332, codex 0.171.0`, or None for an image without agents.
fn agents_column(manifest: &sandpen_image::Manifest) -> Option<String> {
    (!manifest.agents.is_empty()).then(|| {
        manifest
            .agents
            .iter()
            .map(|(name, version)| format!("{name} {version}"))
            .collect::<Vec<_>>()
            .join(", ")
    })
}

/// The image an agent image is named after by default: `claude`, or
/// `claude-codex` for several.
fn default_image_name(agents: &[String]) -> String {
    if agents.is_empty() {
        return "default".into();
    }
    let mut names: Vec<&str> = agents.iter().map(String::as_str).collect();
    names.sort_unstable();
    names.dedup();
    names.join("-")
}

/// The agent called `name`, or an error that says why it cannot be used.
fn agent_or_explain(name: &str) -> Result<&'static sandpen_agents::Agent> {
    Ok(sandpen_api::sandboxes::agent_or_explain(name)?)
}

/// `doctor`'s line on QEMU's jail: the launcher jails `true` with QEMU's
/// spec and says what it could not apply.
fn jail_check() {
    // Its own thread and runtime: doctor runs inside the CLI's runtime.
    let check = || -> Result<sandpen_supervisor::jail::JailReport, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let truth = sandpen_vm::which("true").ok_or("no `true` program")?;
        let spec = sandpen_supervisor::jail::JailSpec::for_qemu(
            &truth,
            vec![],
            "doctor",
            &[],
            std::path::Path::new("/dev/null"),
            sandpen_vm::Accel::Tcg,
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let mut cmd = spec.command(&exe).map_err(|e| e.to_string())?;
            cmd.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            let launched =
                sandpen_supervisor::jail::spawn(cmd, vec![]).map_err(|e| e.to_string())?;
            let (mut child, report) = launched.report().await.map_err(|e| e.to_string())?;
            let _ = child.wait().await;
            Ok(report)
        })
    };
    let outcome = std::thread::spawn(check)
        .join()
        .unwrap_or_else(|_| Err("the check panicked".into()));
    match outcome {
        Ok(r) => match r.missing_line() {
            None => println!("ok    QEMU's jail: {}", r.applied),
            Some(line) => println!(
                "note  {line}; sandboxes still start (--require-jail refuses them); applied: {}",
                r.applied
            ),
        },
        Err(e) => println!("MISSING QEMU's jail: the launcher failed: {e}"),
    }
}

fn doctor(dirs: &Dirs) -> Result<i32> {
    let mut problems = 0;
    let mut check = |what: &str, found: Option<String>, fix: &str| match found {
        Some(detail) => println!("ok    {what}: {detail}"),
        None => {
            problems += 1;
            println!("MISSING {what}: {fix}");
        }
    };
    let tool = |name: &str| sandpen_vm::which(name).map(|p| p.display().to_string());
    let qemu = sandpen_vm::which("qemu-system-x86_64");
    let qemu_version = qemu.as_deref().and_then(sandpen_vm::QemuVersion::of);
    check(
        "qemu-system-x86_64",
        qemu.as_ref().map(|p| match qemu_version {
            Some(v) => format!("{} (QEMU {v})", p.display()),
            None => p.display().to_string(),
        }),
        "apt install qemu-system-x86",
    );
    check("qemu-img", tool("qemu-img"), "apt install qemu-utils");
    println!("ok    file server: built in (sandpen fs-serve)");
    match sandpen_fs::confine::kernel_landlock_abi() {
        abi if abi >= 2 => println!(
            "ok    file server confinement: Landlock ABI {abi}, seccomp, no_new_privs"
        ),
        abi => println!(
            "note  file server confinement: no usable Landlock in this kernel (ABI {abi};              2 or later is needed): the server runs with seccomp and its file rules only"
        ),
    }
    jail_check();
    match sandpen_supervisor::fileserver::virtiofsd() {
        Ok(p) => println!(
            "note  virtiofsd (optional, benchmarks only): {}",
            p.display()
        ),
        Err(_) => println!(
            "note  virtiofsd not installed (optional: only the file benchmark compares against it)"
        ),
    }
    check(
        "sandpen-guest",
        sandpen_supervisor::guest_binary()
            .ok()
            .map(|p| p.display().to_string()),
        "build it with scripts/build",
    );
    check(
        "debootstrap (image builds)",
        tool("debootstrap"),
        "apt install debootstrap",
    );
    check(
        "mkfs.ext4 (image builds)",
        tool("mkfs.ext4")
            .or_else(|| Some("/usr/sbin/mkfs.ext4".to_string()).filter(|p| Path::new(p).exists())),
        "apt install e2fsprogs",
    );
    match sandpen_cgroup::probe() {
        Ok(backend) => println!(
            "ok    resource limits: {backend} (CPU quota = --cpus, memory = guest RAM + {} MiB, {} tasks, IO weight {})",
            sandpen_cgroup::limits::MEMORY_OVERHEAD_MIB,
            sandpen_cgroup::limits::PIDS_MAX,
            sandpen_cgroup::limits::IO_WEIGHT
        ),
        Err(e) => println!("note  resource limits not applied: {e}; sandboxes run unbounded"),
    }
    let decision = sandpen_vm::choose_accel(sandpen_vm::AccelChoice::Auto)?;
    println!("accel {}: {}", decision.accel, decision.reason);
    if let Some(warning) = sandpen_vm::tcg_warning(decision.accel, qemu_version) {
        println!("note  {warning} (docs/architecture.md, \"TCG and kernel text patching\")");
    }
    match sandpen_image::list(&dirs.images()) {
        Ok(images) if !images.is_empty() => println!(
            "ok    images: {}",
            images
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => println!("note  no images yet: `sandpen run` builds the default one on first use"),
    }
    println!("      state: {}", dirs.state.display());
    println!("      images: {}", dirs.images().display());
    Ok(if problems == 0 { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_scrubs_where_the_guest_puts_the_ca() {
        assert_eq!(sandpen_image::GUEST_EXTRA_CA, sandpen_proto::GUEST_EXTRA_CA);
        assert_eq!(
            sandpen_image::GUEST_CA_BUNDLE,
            sandpen_proto::GUEST_CA_BUNDLE
        );
    }

    #[test]
    fn an_error_that_prints_its_source_says_it_once() {
        let io = std::io::Error::from_raw_os_error(39);
        let e = anyhow::Error::new(sandpen_supervisor::SupervisorError::io(
            "creating /s/sandboxes/race",
            io,
        ));
        let line = one_line(&e);
        assert_eq!(line.matches("os error 39").count(), 1, "{line}");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(one_line(&e), "outer: inner");
    }
}
