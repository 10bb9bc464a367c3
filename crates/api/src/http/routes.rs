//! The routes of the page and its JSON API (docs/api.md). Each handler
//! parses its input into typed values, calls the operation the CLI calls,
//! and returns its typed value as JSON.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::handler::Handler;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{Json, Router};
use serde::Deserialize;

use super::{asset, assets, events, exec, App, HttpError};
use crate::policy::Where;
use crate::{decisions, flow, logs, policy, sandboxes, secrets, suggest, ApiError};
use sandpen_policy::history::Who;

type Res<T> = Result<T, HttpError>;

/// An HTTP method the server answers on a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verb {
    Get,
    Post,
    Delete,
}

impl Verb {
    /// As OpenAPI writes it (`get`, `post`, `delete`).
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::Post => "post",
            Verb::Delete => "delete",
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            Verb::Get => MethodFilter::GET,
            Verb::Post => MethodFilter::POST,
            Verb::Delete => MethodFilter::DELETE,
        }
    }
}

/// One route: a method on a path (axum's `{param}` syntax, which is
/// OpenAPI's), and its handler.
struct Route {
    verb: Verb,
    path: &'static str,
    handler: MethodRouter<Arc<App>>,
}

fn route<H, T>(verb: Verb, path: &'static str, handler: H) -> Route
where
    H: Handler<T, Arc<App>>,
    T: 'static,
{
    Route {
        verb,
        path,
        handler: on(verb.filter(), handler),
    }
}

/// Every route the server answers, in one place: [`router`] is built from
/// it, and docs/openapi.json is checked against it ([`served`]).
fn table() -> Vec<Route> {
    use Verb::{Delete, Get, Post};
    vec![
        route(Get, "/", boot_page),
        route(Get, "/boot.js", boot_js),
        route(Post, "/session", session),
        route(Get, "/app", app_page),
        route(Get, "/static/{file}", static_file),
        route(Get, "/api/setup", setup),
        route(Post, "/api/folder", folder),
        route(Get, "/api/sandboxes", list),
        route(Post, "/api/sandboxes", create),
        route(Get, "/api/sandboxes/{name}", one),
        route(Delete, "/api/sandboxes/{name}", rm),
        route(Post, "/api/sandboxes/{name}/start", start),
        route(Post, "/api/sandboxes/{name}/stop", stop),
        route(Get, "/api/sandboxes/{name}/exec", exec::upgrade),
        route(
            Get,
            "/api/sandboxes/{name}/events",
            events::network_and_files,
        ),
        route(Get, "/api/sandboxes/{name}/logs", events::text_log),
        route(Get, "/api/sandboxes/{name}/flow", flow_show),
        route(Post, "/api/sandboxes/{name}/flow/reset", flow_reset),
        route(Get, "/api/sandboxes/{name}/suggestions", suggestions),
        route(
            Post,
            "/api/sandboxes/{name}/suggestions/apply",
            suggestions_apply,
        ),
        route(Get, "/api/jobs/{id}", job),
        route(Get, "/api/policy", policy_show),
        route(Post, "/api/policy/rules", rule_add),
        route(Delete, "/api/policy/rules/{id}", rule_rm),
        route(Post, "/api/policy/check", check),
        route(Post, "/api/policy/preset", preset),
        route(Get, "/api/secrets", secret_list),
        route(Post, "/api/secrets", secret_set),
        route(Delete, "/api/secrets/{service}", secret_rm),
        route(Get, "/api/logs/network", network_log),
        route(Get, "/api/logs/files", file_log),
        route(Get, "/api/decisions", decisions),
        route(Post, "/api/decisions/{name}/{id}", decide),
    ]
}

pub fn router(app: Arc<App>) -> Router {
    table()
        .into_iter()
        .fold(Router::new(), |r, rt| r.route(rt.path, rt.handler))
        .with_state(app)
}

/// Every method and path the server answers (GET also answers HEAD).
pub fn served() -> Vec<(Verb, &'static str)> {
    table().into_iter().map(|r| (r.verb, r.path)).collect()
}

async fn boot_page() -> Response {
    asset("text/html; charset=utf-8", assets::BOOT_HTML)
}

async fn boot_js() -> Response {
    asset("text/javascript", assets::BOOT_JS)
}

async fn app_page() -> Response {
    asset("text/html; charset=utf-8", assets::INDEX_HTML)
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
                    "unavailable": a.installable().err().map(|e| e.to_string()),
                }))
            }
        })
        .collect();
    Json(serde_json::json!({
        "agents": agents,
        "services": secrets::builtin_names(),
        "presets": [
            {"name": "balanced", "words": "The agents' model APIs, package registries (npm, PyPI, crates.io, Debian), GitHub and GitLab, and the toolchain vendors (nodejs.org, Rust, Go) for the workspace's toolchains. Everything else is refused until you allow it. Recommended."},
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
                start_and_after(&dirs, &config.name, &lines).await?;
            }
            Ok(serde_json::json!({ "name": config.name }))
        });
    Ok(job_started(id))
}

/// Boots a sandbox and runs what its workspace asks of a start
/// ([`crate::devcontainer::after_start`], as `sandpen start` does), every
/// note and the lifecycle commands' output in the job's lines.
async fn start_and_after(
    dirs: &sandpen_supervisor::Dirs,
    name: &str,
    lines: &crate::progress::Lines,
) -> Result<(), ApiError> {
    lines.say(&format!("starting {name} (booting the VM)"));
    let started = sandboxes::start(dirs, name).await?;
    for note in started.notes {
        lines.say(&format!("note: {note}"));
    }
    lines.say(&format!("{name} is running"));
    let config = sandpen_supervisor::sandbox::load(dirs, name)?;
    let say = |l: &str| lines.say(l);
    let out = crate::devcontainer::LineOutput::new(&say);
    let done = crate::devcontainer::after_start(dirs, &config, &out).await;
    out.finish();
    done
}

async fn start(State(app): State<Arc<App>>, Path(name): Path<String>) -> Res<Response> {
    sandpen_supervisor::sandbox::load(&app.dirs, &name).map_err(ApiError::from)?;
    let dirs = app.dirs.clone();
    let n = name.clone();
    let id = app
        .jobs
        .spawn("start", Some(name), move |lines| async move {
            start_and_after(&dirs, &n, &lines).await?;
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SuggestQuery {
    promote_k: Option<usize>,
    unused_days: Option<i64>,
}

impl SuggestQuery {
    fn thresholds(&self) -> suggest::Thresholds {
        let d = suggest::Thresholds::default();
        suggest::Thresholds {
            promote_k: self.promote_k.unwrap_or(d.promote_k),
            unused_days: self.unused_days.unwrap_or(d.unused_days),
        }
    }
}

/// `policy suggest NAME --json`: rules proposed from what the sandbox did,
/// flagged ones (exfiltration look-alikes) last. Hosts, domains and
/// processes come from the guest.
async fn suggestions(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    Query(q): Query<SuggestQuery>,
) -> Res<Json<Vec<suggest::Suggestion>>> {
    Ok(Json(suggest::for_sandbox(
        &app.dirs,
        &name,
        q.thresholds(),
    )?))
}

/// `1,3` as the CLI's `--apply` takes it, or `[1, 3]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Selection {
    Text(String),
    Numbers(Vec<usize>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyReq {
    selection: Selection,
    /// The proposals the page showed for those numbers, in order: nothing
    /// is applied (409) if the list changed since.
    shown: Option<Vec<suggest::Proposal>>,
    promote_k: Option<usize>,
    unused_days: Option<i64>,
}

/// `policy suggest NAME --apply N,...`, recorded as the page's (`who: web`).
async fn suggestions_apply(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    Json(req): Json<ApplyReq>,
) -> Res<Json<serde_json::Value>> {
    let selection = match req.selection {
        Selection::Text(s) => s,
        Selection::Numbers(n) => n.iter().map(usize::to_string).collect::<Vec<_>>().join(","),
    };
    let t = SuggestQuery {
        promote_k: req.promote_k,
        unused_days: req.unused_days,
    }
    .thresholds();
    let applied = suggest::apply(
        &app.dirs,
        &name,
        &selection,
        req.shown.as_deref(),
        t,
        Who::Web,
    )
    .await?;
    Ok(Json(serde_json::json!({ "applied": applied })))
}
