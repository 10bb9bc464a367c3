//! The routes of the page and its JSON API (docs/api.md). Each handler
//! parses its input into typed values, calls the operation the CLI calls,
//! and returns its typed value as JSON.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::{asset, assets, events, exec, App, HttpError};
use crate::policy::Where;
use crate::{decisions, flow, logs, policy, sandboxes, secrets, ApiError};
use sandpen_policy::history::Who;

type Res<T> = Result<T, HttpError>;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", assets::BOOT_HTML) }),
        )
        .route(
            "/boot.js",
            get(|| async { asset("text/javascript", assets::BOOT_JS) }),
        )
        .route("/session", post(session))
        .route(
            "/app",
            get(|| async { asset("text/html; charset=utf-8", assets::INDEX_HTML) }),
        )
        .route("/static/{file}", get(static_file))
        .route("/api/setup", get(setup))
        .route("/api/folder", post(folder))
        .route("/api/sandboxes", get(list).post(create))
        .route("/api/sandboxes/{name}", get(one).delete(rm))
        .route("/api/sandboxes/{name}/start", post(start))
        .route("/api/sandboxes/{name}/stop", post(stop))
        .route("/api/sandboxes/{name}/exec", get(exec::upgrade))
        .route(
            "/api/sandboxes/{name}/events",
            get(events::network_and_files),
        )
        .route("/api/sandboxes/{name}/logs", get(events::text_log))
        .route("/api/sandboxes/{name}/flow", get(flow_show))
        .route("/api/sandboxes/{name}/flow/reset", post(flow_reset))
        .route("/api/jobs/{id}", get(job))
        .route("/api/policy", get(policy_show))
        .route("/api/policy/rules", post(rule_add))
        .route("/api/policy/rules/{id}", delete(rule_rm))
        .route("/api/policy/check", post(check))
        .route("/api/policy/preset", post(preset))
        .route("/api/secrets", get(secret_list).post(secret_set))
        .route("/api/secrets/{service}", delete(secret_rm))
        .route("/api/logs/network", get(network_log))
        .route("/api/logs/files", get(file_log))
        .route("/api/decisions", get(decisions))
        .route("/api/decisions/{name}/{id}", post(decide))
        .with_state(app)
}

/// `POST /session` with the token header: the same token as an HttpOnly,
/// SameSite=Strict cookie, so that the page's later requests (and its
/// websocket and event streams, which cannot carry a header) have it.
async fn session(State(app): State<Arc<App>>) -> Response {
    (
        StatusCode::NO_CONTENT,
        [(header::SET_COOKIE, app.guard.set_cookie())],
    )
        .into_response()
}

async fn static_file(Path(file): Path<String>) -> Res<Response> {
    let (ty, body) = assets::find(&file)
        .ok_or_else(|| HttpError::new(StatusCode::NOT_FOUND, format!("no file {file}")))?;
    Ok(asset(ty, body))
}

/// What the first run offers: agents, the services their keys are for,
/// presets in plain words, and whether a network policy exists.
async fn setup(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let agents: Vec<_> = sandpen_agents::run_names()
        .into_iter()
        .filter_map(|name| match name {
            "shell" => Some(serde_json::json!({
                "name": "shell", "title": "A shell (no agent)", "services": [],
            })),
            name => {
                let a = sandpen_agents::find(name)?;
                Some(serde_json::json!({
                    "name": a.name, "title": a.title, "services": a.services,
                    "unavailable": a.npm_package().err().map(|e| e.to_string()),
                }))
            }
        })
        .collect();
    Json(serde_json::json!({
        "agents": agents,
        "services": secrets::builtin_names(),
        "presets": [
            {"name": "balanced", "words": "The agents' model APIs, package registries (npm, PyPI, crates.io, Debian), GitHub and GitLab. Everything else is refused until you allow it. Recommended."},
            {"name": "deny-all", "words": "Nothing at all until you allow it, one address at a time."},
            {"name": "allow-all", "words": "Any public address on the internet; never this computer or your local network."},
        ],
        "has_policy": policy::has_global(&app.dirs),
        "decisions": true,
    }))
}

#[derive(Deserialize)]
struct FolderReq {
    path: PathBuf,
}

/// Checks a folder the user typed: it exists and is a directory.
async fn folder(Json(req): Json<FolderReq>) -> Res<Json<serde_json::Value>> {
    let path = sandboxes::workspace_path(&req.path)?;
    Ok(Json(serde_json::json!({ "path": path })))
}

async fn list(State(app): State<Arc<App>>) -> Res<Json<Vec<sandboxes::SandboxInfo>>> {
    Ok(Json(sandboxes::list(&app.dirs).await?))
}

async fn one(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> Res<Json<sandboxes::SandboxInfo>> {
    Ok(Json(sandboxes::get(&app.dirs, &name).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateReq {
    workspace: PathBuf,
    #[serde(default = "shell")]
    agent: String,
    name: Option<String>,
    /// Start it once made (the first run does).
    #[serde(default)]
    start: bool,
    cpus: Option<u32>,
    /// `2G`, `512M`.
    memory: Option<String>,
    /// `NAME:IP`, as `--add-host`.
    #[serde(default)]
    add_hosts: Vec<String>,
}

fn shell() -> String {
    "shell".into()
}

fn job_started(id: u64) -> Response {
    (StatusCode::ACCEPTED, Json(serde_json::json!({ "job": id }))).into_response()
}

/// `POST /api/sandboxes`: a job that builds the image on first use (its
/// progress in the job's lines), creates the sandbox and, with `start`,
/// boots it.
async fn create(State(app): State<Arc<App>>, Json(req): Json<CreateReq>) -> Res<Response> {
    // Everything the user typed is checked before the job starts.
    let ws = sandboxes::workspace_path(&req.workspace)?;
    if req.agent != "shell" {
        sandboxes::agent_or_explain(&req.agent)?;
    }
    let mut opts = sandboxes::default_options(ws, &req.agent);
    opts.name = req.name;
    if let Some(c) = req.cpus {
        opts.cpus = sandpen_supervisor::sandbox::validate_cpus(c).map_err(ApiError::from)?;
    }
    if let Some(m) = &req.memory {
        opts.memory_mib =
            sandpen_supervisor::sandbox::parse_memory_mib(m).map_err(ApiError::from)?;
    }
    for h in &req.add_hosts {
        sandpen_policy::AddHost::parse(h).map_err(|e| ApiError::BadAddHost {
            host: h.clone(),
            reason: e.to_string(),
        })?;
    }
    opts.add_hosts = req.add_hosts;
    let dirs = app.dirs.clone();
    let start = req.start;
    let id = app
        .jobs
        .spawn("create", opts.name.clone(), move |lines| async move {
            if sandboxes::wants_root_build(&dirs, &opts.image) {
            lines.say(&format!(
                "building the {} image: this needs administrator rights once (a password dialog opens)",
                opts.image
            ));
            sandboxes::build_image_as_root(&opts.image, &|l| lines.say(l)).await?;
        }
        let made_dirs = dirs.clone();
            let made_lines = lines.clone();
            let config = tokio::task::spawn_blocking(move || {
                let _lock = sandpen_supervisor::sandbox::lock_creation(&made_dirs)?;
                let progress = made_lines.progress();
                sandboxes::create(&made_dirs, &opts, &progress, &|s| made_lines.say(s))
            })
            .await
            .map_err(|e| ApiError::Worker(e.to_string()))??;
            lines.say(&format!("created sandbox {}", config.name));
            if start {
                lines.say(&format!("starting {} (booting the VM)", config.name));
                let started = sandboxes::start(&dirs, &config.name).await?;
                for note in started.notes {
                    lines.say(&format!("note: {note}"));
                }
                lines.say(&format!("{} is running", config.name));
            }
            Ok(serde_json::json!({ "name": config.name }))
        });
    Ok(job_started(id))
}

async fn start(State(app): State<Arc<App>>, Path(name): Path<String>) -> Res<Response> {
    sandpen_supervisor::sandbox::load(&app.dirs, &name).map_err(ApiError::from)?;
    let dirs = app.dirs.clone();
    let n = name.clone();
    let id = app
        .jobs
        .spawn("start", Some(name), move |lines| async move {
            lines.say(&format!("starting {n} (booting the VM)"));
            let started = sandboxes::start(&dirs, &n).await?;
            for note in started.notes {
                lines.say(&format!("note: {note}"));
            }
            lines.say(&format!("{n} is running"));
            Ok(serde_json::json!({ "name": n }))
        });
    Ok(job_started(id))
}

async fn stop(State(app): State<Arc<App>>, Path(name): Path<String>) -> Res<Response> {
    sandpen_supervisor::sandbox::load(&app.dirs, &name).map_err(ApiError::from)?;
    let dirs = app.dirs.clone();
    let n = name.clone();
    let id = app.jobs.spawn("stop", Some(name), move |lines| async move {
        lines.say(&format!("stopping {n}"));
        sandboxes::stop(&dirs, &n, Duration::from_secs(30)).await?;
        lines.say(&format!("{n} is stopped"));
        Ok(serde_json::json!({ "name": n }))
    });
    Ok(job_started(id))
}

#[derive(Deserialize)]
struct RmQuery {
    #[serde(default)]
    force: bool,
}

async fn rm(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    Query(q): Query<RmQuery>,
) -> Res<Response> {
    sandpen_supervisor::sandbox::load(&app.dirs, &name).map_err(ApiError::from)?;
    let dirs = app.dirs.clone();
    let n = name.clone();
    let id = app.jobs.spawn("rm", Some(name), move |lines| async move {
        sandboxes::rm(&dirs, &n, q.force).await?;
        lines.say(&format!("removed {n}"));
        Ok(serde_json::json!({ "name": n }))
    });
    Ok(job_started(id))
}

async fn job(State(app): State<Arc<App>>, Path(id): Path<u64>) -> Res<Json<super::jobs::JobView>> {
    app.jobs
        .view(id)
        .map(Json)
        .ok_or_else(|| HttpError::new(StatusCode::NOT_FOUND, format!("no job {id}")))
}

async fn flow_show(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> Res<Json<sandpen_policy::FlowLabels>> {
    Ok(Json(flow::show(&app.dirs, &name)?))
}

async fn flow_reset(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> Res<Json<serde_json::Value>> {
    let old = flow::reset(&app.dirs, &name)?;
    Ok(Json(serde_json::json!({ "cleared": old })))
}

#[derive(Deserialize)]
struct SandboxQuery {
    sandbox: Option<String>,
}

async fn policy_show(
    State(app): State<Arc<App>>,
    Query(q): Query<SandboxQuery>,
) -> Res<Json<policy::PolicyInfo>> {
    Ok(Json(policy::show(&app.dirs, q.sandbox.as_deref())?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleReq {
    action: String,
    target: String,
    sandbox: Option<String>,
}

async fn rule_add(
    State(app): State<Arc<App>>,
    Json(req): Json<RuleReq>,
) -> Res<Json<policy::RuleInfo>> {
    let action = policy::parse_action(&req.action)?;
    let place = Where::from_name(req.sandbox);
    Ok(Json(
        policy::add_rule(&app.dirs, &place, action, &req.target, Who::Web, "")?.rule,
    ))
}

async fn rule_rm(
    State(app): State<Arc<App>>,
    Path(id): Path<u32>,
    Query(q): Query<SandboxQuery>,
) -> Res<Json<policy::RuleInfo>> {
    let place = Where::from_name(q.sandbox);
    Ok(Json(policy::remove_rule(
        &app.dirs,
        &place,
        id,
        Who::Web,
        "",
    )?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckReq {
    target: String,
    sandbox: Option<String>,
}

async fn check(
    State(app): State<Arc<App>>,
    Json(req): Json<CheckReq>,
) -> Res<Json<policy::CheckResult>> {
    Ok(Json(
        policy::check(&app.dirs, req.sandbox.as_deref(), &req.target).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PresetReq {
    preset: String,
    sandbox: Option<String>,
}

async fn preset(
    State(app): State<Arc<App>>,
    Json(req): Json<PresetReq>,
) -> Res<Json<serde_json::Value>> {
    let place = Where::from_name(req.sandbox);
    let path = policy::init_preset(&app.dirs, &place, &req.preset, Who::Web, "")?;
    Ok(Json(
        serde_json::json!({ "preset": req.preset, "file": path }),
    ))
}

async fn secret_list(State(app): State<Arc<App>>) -> Res<Json<Vec<secrets::SecretInfo>>> {
    Ok(Json(secrets::list(&app.dirs)?))
}

/// The value is taken once and handed to the store; the answer names the
/// service, scope and hosts only.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretReq {
    service: String,
    value: String,
    sandbox: Option<String>,
}

async fn secret_set(
    State(app): State<Arc<App>>,
    Json(req): Json<SecretReq>,
) -> Res<Json<secrets::Stored>> {
    let value = sandpen_credentials::SecretValue::new(req.value);
    let scope = secrets::scope_of(&app.dirs, req.sandbox.as_deref())?;
    let dirs = app.dirs.clone();
    let service = req.service;
    // The keyring is D-Bus: blocking calls.
    let stored = tokio::task::spawn_blocking(move || secrets::set(&dirs, &service, scope, value))
        .await
        .map_err(|e| ApiError::Worker(e.to_string()))??;
    Ok(Json(stored))
}

async fn secret_rm(
    State(app): State<Arc<App>>,
    Path(service): Path<String>,
    Query(q): Query<SandboxQuery>,
) -> Res<Json<serde_json::Value>> {
    let scope = secrets::scope_of(&app.dirs, q.sandbox.as_deref())?;
    secrets::remove(&app.dirs, &service, &scope)?;
    Ok(Json(
        serde_json::json!({ "removed": service, "scope": scope.to_string() }),
    ))
}

#[derive(Deserialize)]
struct LogQuery {
    sandbox: Option<String>,
    limit: Option<usize>,
}

async fn network_log(
    State(app): State<Arc<App>>,
    Query(q): Query<LogQuery>,
) -> Res<Json<Vec<sandpen_proxy::audit::ConnectionReport>>> {
    let names = logs::names(&app.dirs, q.sandbox.as_deref())?;
    Ok(Json(logs::network(
        &app.dirs,
        &names,
        q.limit.unwrap_or(200).min(10_000),
    )?))
}

async fn file_log(
    State(app): State<Arc<App>>,
    Query(q): Query<LogQuery>,
) -> Res<Json<Vec<sandpen_fs::FileRecord>>> {
    let names = logs::names(&app.dirs, q.sandbox.as_deref())?;
    Ok(Json(logs::files(
        &app.dirs,
        &names,
        q.limit.unwrap_or(200).min(10_000),
    )?))
}

/// Ask mode: what waits in every running sandbox (docs/policy.md, "Ask
/// mode"). Hosts, first lines and the agent's reasons come from the guest:
/// the page shows them as text, the reason marked as the agent's.
async fn decisions(
    State(app): State<Arc<App>>,
    Query(q): Query<SandboxQuery>,
) -> Res<Json<serde_json::Value>> {
    let pending = decisions::pending(&app.dirs, q.sandbox.as_deref()).await?;
    Ok(Json(serde_json::json!({ "pending": pending })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecideReq {
    decision: decisions::Decision,
}

/// The user's answer to one pending entry: `once`, `always` or `deny`.
async fn decide(
    State(app): State<Arc<App>>,
    Path((name, id)): Path<(String, u64)>,
    Json(req): Json<DecideReq>,
) -> Res<Json<serde_json::Value>> {
    let said = decisions::decide(&app.dirs, &name, id, req.decision, Who::Web).await?;
    Ok(Json(serde_json::json!({ "done": said })))
}
