//! The development environment a workspace asks for, read from the files a
//! developer already has: `mise.toml`, `.tool-versions`, `.nvmrc`,
//! `.node-version`, `package.json` (`engines`, `packageManager`),
//! `.python-version`, `pyproject.toml` (`requires-python`),
//! `rust-toolchain(.toml)`, `go.mod` (`go`, `toolchain`), `.ruby-version`,
//! `.java-version`, `.sdkmanrc` and `.devcontainer/devcontainer.json`.
//! [`detect`] turns them into a [`Plan`]: one version per tool, where it came
//! from, and every disagreement between files. `sandpen env plan` prints it.
//!
//! What is guaranteed (docs/dev-env.md, "Which file wins"):
//!
//! - **The workspace is untrusted input.** Every file is read beneath the
//!   workspace without following a symlink, only if it is a regular file, and
//!   at most 256 KiB of it ([`read`]). A version that reaches the plan matches a
//!   strict grammar ([`Version`]): it can never carry shell syntax, a path or
//!   an option into the guest.
//! - **A bad file never stops a run** and is never silently ignored: each
//!   thing not taken is a [`Warning`] naming the file, the line or key, and why.
//! - **One fixed order decides** ([`Rank`]): the tool manager's own file, then
//!   `.tool-versions`, then a tool's own version file, then a devcontainer
//!   feature, then a manifest's range. A file that loses is still shown, with
//!   whether the winner satisfies it.
//! - Every key of devcontainer.json that sandpen does not honour is named.

pub mod devcontainer;
pub mod read;
pub mod sources;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use devcontainer::DevContainer;
use read::{ReadError, Workspace};
use sources::Parsed;

/// A toolchain sandpen provisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tool {
    Node,
    Pnpm,
    Yarn,
    Python,
    Rust,
    Go,
    Ruby,
    Java,
}

impl Tool {
    /// The name mise and asdf use.
    pub fn name(self) -> &'static str {
        match self {
            Tool::Node => "node",
            Tool::Pnpm => "pnpm",
            Tool::Yarn => "yarn",
            Tool::Python => "python",
            Tool::Rust => "rust",
            Tool::Go => "go",
            Tool::Ruby => "ruby",
            Tool::Java => "java",
        }
    }

    /// A tool as `.tool-versions` or `mise.toml` names it (asdf's plugin
    /// names included).
    pub fn from_manager_name(name: &str) -> Option<Tool> {
        Some(match name {
            "node" | "nodejs" => Tool::Node,
            "pnpm" => Tool::Pnpm,
            "yarn" => Tool::Yarn,
            "python" => Tool::Python,
            "rust" => Tool::Rust,
            "go" | "golang" => Tool::Go,
            "ruby" => Tool::Ruby,
            "java" => Tool::Java,
            _ => return None,
        })
    }
}

impl fmt::Display for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A version as a file states it. Built only through the constructors, which
/// check the grammar: letters, digits and `.-_+` (a channel may also hold
/// `/`, a range also `<>=^~*|,!` and spaces), starting with a letter or digit
/// (never an option), at most 64 bytes (128 for a range).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "text", rename_all = "lowercase")]
pub enum Version {
    /// A version or a prefix of one: `22`, `22.11.0`, `1.88`, `temurin-21`.
    Pinned(String),
    /// A moving name: `lts`, `latest`, `stable`, `nightly`, `lts/iron`.
    Channel(String),
    /// A constraint to resolve against the versions that exist: `>=20 <23`.
    Range(String),
}

const CHANNELS: &[&str] = &["latest", "lts", "stable", "beta", "nightly"];

fn grammar(text: &str, max: usize, extra: &str) -> bool {
    !text.is_empty()
        && text.len() <= max
        && text.starts_with(|c: char| c.is_ascii_alphanumeric() || extra.contains(c))
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_+".contains(c) || extra.contains(c))
}

impl Version {
    pub fn pinned(text: &str) -> Option<Version> {
        grammar(text, 64, "").then(|| Version::Pinned(text.into()))
    }

    pub fn channel(text: &str) -> Option<Version> {
        (grammar(text, 64, "/") && text.starts_with(|c: char| c.is_ascii_alphanumeric()))
            .then(|| Version::Channel(text.into()))
    }

    pub fn range(text: &str) -> Option<Version> {
        let text = text.trim();
        grammar(text, 128, "<>=^~*|,! ").then(|| Version::Range(text.into()))
    }

    /// A version as a tool manager's file writes it: a channel word or a
    /// version.
    pub fn from_manager(text: &str) -> Option<Version> {
        if CHANNELS.contains(&text) {
            Version::channel(text)
        } else {
            Version::pinned(text)
        }
    }

    pub fn text(&self) -> &str {
        match self {
            Version::Pinned(t) | Version::Channel(t) | Version::Range(t) => t,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text())
    }
}

/// How much a file's statement weighs; the lowest wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rank {
    /// `mise.toml`: written for the tool manager that provisions.
    ToolManager,
    /// `.tool-versions`: the same, for asdf and mise.
    ToolVersions,
    /// A tool's own version file (`.nvmrc`, `.python-version`,
    /// `rust-toolchain.toml`, go.mod's `toolchain`, `packageManager`, ...):
    /// the version the developer runs.
    VersionFile,
    /// A devcontainer feature: the project's container, one step removed.
    DevContainer,
    /// A manifest's range (`engines`, `requires-python`, go.mod's `go`): what
    /// the code is compatible with, not what it runs on.
    Manifest,
}

/// One statement: `tool` at `version`, from `file` (under `key`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Request {
    pub tool: Tool,
    pub version: Version,
    pub file: String,
    pub key: String,
    pub rank: Rank,
    /// The download's digest the file pins (`packageManager`'s
    /// `sha512.HEX`), checked when it is provisioned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

impl Request {
    /// `.nvmrc` or `package.json engines.node`.
    pub fn origin(&self) -> String {
        if self.key.is_empty() {
            self.file.clone()
        } else {
            format!("{} {}", self.file, self.key)
        }
    }
}

/// How a statement that lost relates to the one that won.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Agreement {
    /// The same version, or one a prefix of the other (`22`, `22.11.0`).
    Same,
    /// The winner is inside the loser's range.
    Satisfied,
    /// They disagree: the winner is used, and the user is told.
    Conflict,
    /// A channel or a range on both sides: only provisioning can tell.
    Unknown,
}

impl Agreement {
    pub fn as_str(self) -> &'static str {
        match self {
            Agreement::Same => "agrees",
            Agreement::Satisfied => "satisfied",
            Agreement::Conflict => "CONFLICT",
            Agreement::Unknown => "not checked",
        }
    }
}

/// The version a tool gets, and every other statement about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Choice {
    pub tool: Tool,
    pub chosen: Request,
    pub others: Vec<(Request, Agreement)>,
}

/// Something in the workspace that was not taken, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    pub file: String,
    pub what: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file, self.what)
    }
}

/// What a workspace asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub tools: Vec<Choice>,
    /// The devcontainer.json found, with what sandpen takes from it.
    pub devcontainer: Option<(String, DevContainer)>,
    pub warnings: Vec<Warning>,
}

/// Why a workspace could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("cannot open the workspace {path}: {source}")]
    Workspace {
        path: PathBuf,
        source: std::io::Error,
    },
}

struct SourceKind {
    file: &'static str,
    parse: fn(&str) -> Parsed,
    rank: fn(&str) -> Rank,
}

/// Every version file, in the order a tie within a rank is broken.
const SOURCES: &[SourceKind] = &[
    SourceKind {
        file: "mise.toml",
        parse: sources::mise_toml,
        rank: |_| Rank::ToolManager,
    },
    SourceKind {
        file: ".mise.toml",
        parse: sources::mise_toml,
        rank: |_| Rank::ToolManager,
    },
    SourceKind {
        file: ".config/mise.toml",
        parse: sources::mise_toml,
        rank: |_| Rank::ToolManager,
    },
    SourceKind {
        file: ".tool-versions",
        parse: sources::tool_versions,
        rank: |_| Rank::ToolVersions,
    },
    SourceKind {
        file: ".nvmrc",
        parse: sources::node_version_file,
        rank: |_| Rank::VersionFile,
    },
    SourceKind {
        file: ".node-version",
        parse: sources::node_version_file,
        rank: |_| Rank::VersionFile,
    },
    SourceKind {
        file: ".python-version",
        parse: sources::python_version_file,
        rank: |_| Rank::VersionFile,
    },
    SourceKind {
        file: "rust-toolchain.toml",
        parse: sources::rust_toolchain,
        rank: |_| Rank::VersionFile,
    },
    SourceKind {
        file: "rust-toolchain",
        parse: sources::rust_toolchain,
        rank: |_| Rank::VersionFile,
    },
    SourceKind {
        file: "go.mod",
        parse: sources::go_mod,
        rank: |key| match key {
            "toolchain" => Rank::VersionFile,
            _ => Rank::Manifest,
        },
    },
    SourceKind {
        file: ".ruby-version",
        parse: sources::ruby_version_file,
        rank: |_| Rank::VersionFile,
    },
    SourceKind {
        file: ".java-version",
        parse: sources::java_version_file,
        rank: |_| Rank::VersionFile,
    },
    SourceKind {
        file: ".sdkmanrc",
        parse: sources::sdkmanrc,
        rank: |_| Rank::VersionFile,
    },
    SourceKind {
        file: "package.json",
        parse: sources::package_json,
        rank: |key| match key {
            "packageManager" => Rank::VersionFile,
            _ => Rank::Manifest,
        },
    },
    SourceKind {
        file: "pyproject.toml",
        parse: sources::pyproject,
        rank: |_| Rank::Manifest,
    },
];

/// Where devcontainer.json may be, in the spec's order.
const DEVCONTAINER_FILES: &[&str] = &[".devcontainer/devcontainer.json", ".devcontainer.json"];

/// Reads `root`'s version files and devcontainer.json into a plan.
pub fn detect(root: &Path) -> Result<Plan, DetectError> {
    let ws = Workspace::open(root).map_err(|source| DetectError::Workspace {
        path: root.to_path_buf(),
        source,
    })?;
    let mut requests = Vec::new();
    let mut plan = Plan::default();
    let mut take = |file: &str, parsed: Parsed, rank: &dyn Fn(&str) -> Rank, plan: &mut Plan| {
        for found in parsed.found {
            requests.push(Request {
                tool: found.tool,
                rank: rank(&found.key),
                version: found.version,
                file: file.into(),
                key: found.key,
                digest: found.digest,
            });
        }
        for skipped in parsed.skipped {
            plan.warnings.push(Warning {
                file: file.into(),
                what: skipped.to_string(),
            });
        }
    };
    for source in SOURCES {
        if let Some(text) = read_or_warn(&ws, source.file, &mut plan) {
            take(source.file, (source.parse)(&text), &source.rank, &mut plan);
        }
    }
    for file in DEVCONTAINER_FILES {
        let Some(text) = read_or_warn(&ws, file, &mut plan) else {
            continue;
        };
        match devcontainer::parse(&text) {
            Ok((dc, tools)) => {
                take(file, tools, &|_| Rank::DevContainer, &mut plan);
                plan.devcontainer = Some((file.to_string(), dc));
            }
            Err(e) => plan.warnings.push(Warning {
                file: file.to_string(),
                what: e.to_string(),
            }),
        }
        break;
    }
    plan.tools = resolve(requests);
    Ok(plan)
}

/// Only the workspace's devcontainer.json, as [`detect`] finds it, without
/// reading the version files: what every command started in the sandbox
/// needs (its variables). `None` when there is none, or it does not parse
/// (`sandpen env plan` says why).
pub fn devcontainer(root: &Path) -> Result<Option<(String, DevContainer)>, DetectError> {
    let ws = Workspace::open(root).map_err(|source| DetectError::Workspace {
        path: root.to_path_buf(),
        source,
    })?;
    for file in DEVCONTAINER_FILES {
        if let Ok(text) = ws.read(file) {
            return Ok(devcontainer::parse(&text)
                .ok()
                .map(|(dc, _)| (file.to_string(), dc)));
        }
    }
    Ok(None)
}

fn read_or_warn(ws: &Workspace, file: &str, plan: &mut Plan) -> Option<String> {
    match ws.read(file) {
        Ok(text) => Some(text),
        Err(ReadError::Missing) => None,
        Err(e) => {
            plan.warnings.push(Warning {
                file: file.into(),
                what: format!("not read: {e}"),
            });
            None
        }
    }
}

/// One choice per tool: the lowest rank wins, a tie goes to the file listed
/// first in [`SOURCES`] (the order requests arrive in).
pub fn resolve(requests: Vec<Request>) -> Vec<Choice> {
    let mut tools: Vec<Tool> = requests.iter().map(|r| r.tool).collect();
    tools.sort();
    tools.dedup();
    tools
        .into_iter()
        .filter_map(|tool| {
            let mut mine: Vec<Request> = requests
                .iter()
                .filter(|r| r.tool == tool)
                .cloned()
                .collect();
            // A stable sort keeps the file order within a rank.
            mine.sort_by_key(|r| r.rank);
            let mut it = mine.into_iter();
            let chosen = it.next()?;
            let others = it
                .map(|other| {
                    let a = agreement(tool, &chosen.version, &other.version);
                    (other, a)
                })
                .collect();
            Some(Choice {
                tool,
                chosen,
                others,
            })
        })
        .collect()
}

/// Whether `winner` is compatible with `other`, where that can be decided
/// without a list of released versions.
pub fn agreement(tool: Tool, winner: &Version, other: &Version) -> Agreement {
    match (winner, other) {
        (Version::Pinned(a), Version::Pinned(b)) | (Version::Channel(a), Version::Channel(b)) => {
            if a == b || is_prefix(a, b) || is_prefix(b, a) {
                Agreement::Same
            } else if matches!(winner, Version::Pinned(_)) && tool == Tool::Go {
                // go.mod's `go` line is a minimum even though it looks pinned.
                match (numbers(a), numbers(b)) {
                    (Some(x), Some(y)) if x >= y => Agreement::Satisfied,
                    (Some(_), Some(_)) => Agreement::Conflict,
                    _ => Agreement::Unknown,
                }
            } else {
                Agreement::Conflict
            }
        }
        (Version::Pinned(pin), Version::Range(range)) => match tool {
            Tool::Node | Tool::Pnpm | Tool::Yarn => node_range_allows(range, pin),
            Tool::Python => python_range_allows(range, pin),
            _ => Agreement::Unknown,
        },
        _ => Agreement::Unknown,
    }
}

/// The newest release in `released` (any order; what the vendor lists, as
/// `mise ls-remote` prints it) that `range` allows, for the tools whose
/// ranges are checked (node and its package managers: npm semver; python:
/// PEP 440). Pre-releases (anything but digits and dots) are never chosen.
pub fn newest_in_range(tool: Tool, range: &str, released: &[&str]) -> Option<String> {
    let range = Version::range(range)?;
    let mut candidates: Vec<(Vec<u64>, &str)> = released
        .iter()
        .map(|v| v.trim())
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
        .filter_map(|v| numbers(v).map(|n| (n, v)))
        .collect();
    candidates.sort();
    candidates
        .into_iter()
        .rev()
        .map(|(_, v)| v)
        .find(|v| {
            agreement(tool, &Version::Pinned((*v).to_string()), &range) == Agreement::Satisfied
        })
        .map(str::to_string)
}

/// `22` is a prefix of `22.11.0` at a component boundary; `2` is not.
fn is_prefix(short: &str, long: &str) -> bool {
    long.strip_prefix(short)
        .is_some_and(|rest| rest.starts_with('.'))
}

fn numbers(v: &str) -> Option<Vec<u64>> {
    v.split('.').map(|p| p.parse().ok()).collect()
}

fn node_range_allows(range: &str, pin: &str) -> Agreement {
    // A pin like `22` stands for every 22.x: the range must allow one of them.
    match (
        nodejs_semver::Range::parse(range),
        nodejs_semver::Range::parse(pin),
    ) {
        (Ok(range), Ok(pinned)) if range.allows_any(&pinned) => Agreement::Satisfied,
        (Ok(_), Ok(_)) => Agreement::Conflict,
        _ => Agreement::Unknown,
    }
}

fn python_range_allows(range: &str, pin: &str) -> Agreement {
    use std::str::FromStr;
    let Ok(specifiers) = pep440_rs::VersionSpecifiers::from_str(range) else {
        return Agreement::Unknown;
    };
    // `3.12` stands for every 3.12.x: test its first and a late patch release.
    let candidates: Vec<String> = match pin.split('.').count() {
        2 => vec![format!("{pin}.0"), format!("{pin}.999")],
        _ => vec![pin.to_string()],
    };
    let versions: Vec<pep440_rs::Version> = candidates
        .iter()
        .filter_map(|c| pep440_rs::Version::from_str(c).ok())
        .collect();
    if versions.is_empty() {
        Agreement::Unknown
    } else if versions.iter().any(|v| specifiers.contains(v)) {
        Agreement::Satisfied
    } else {
        Agreement::Conflict
    }
}

impl Plan {
    /// `node 22.11.0, python 3.12 (from .nvmrc, .python-version)`, or `None`
    /// when the workspace asks for nothing.
    pub fn summary(&self) -> Option<String> {
        if self.tools.is_empty() {
            return None;
        }
        let tools: Vec<String> = self
            .tools
            .iter()
            .map(|c| format!("{} {}", c.tool, c.chosen.version))
            .collect();
        let mut files: Vec<&str> = self.tools.iter().map(|c| c.chosen.file.as_str()).collect();
        files.dedup();
        Some(format!("{} (from {})", tools.join(", "), files.join(", ")))
    }

    /// The disagreements, one line each.
    pub fn conflicts(&self) -> Vec<String> {
        self.tools
            .iter()
            .flat_map(|c| {
                c.others
                    .iter()
                    .filter(|(_, a)| *a == Agreement::Conflict)
                    .map(move |(o, _)| {
                        format!(
                            "{}: {} says {}, {} says {}; using {} ({} wins, docs/dev-env.md)",
                            c.tool,
                            c.chosen.origin(),
                            c.chosen.version,
                            o.origin(),
                            o.version,
                            c.chosen.version,
                            c.chosen.file
                        )
                    })
            })
            .collect()
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tools.is_empty() {
            writeln!(f, "toolchains: none asked for (the image's own are used)")?;
        } else {
            writeln!(f, "toolchains:")?;
        }
        for c in &self.tools {
            writeln!(
                f,
                "  {:<7} {:<16} from {}",
                c.tool.name(),
                c.chosen.version.to_string(),
                c.chosen.origin()
            )?;
            for (o, a) in &c.others {
                writeln!(
                    f,
                    "  {:<7} {:<16} also {}: {}",
                    "",
                    "",
                    o.origin(),
                    match a {
                        Agreement::Same | Agreement::Satisfied | Agreement::Unknown =>
                            format!("{} ({})", o.version, a.as_str()),
                        Agreement::Conflict => format!("{} (CONFLICT: not used)", o.version),
                    }
                )?;
            }
        }
        if let Some((file, dc)) = &self.devcontainer {
            writeln!(f, "devcontainer ({file}):")?;
            let env: Vec<&str> = dc
                .container_env
                .keys()
                .chain(dc.remote_env.keys())
                .map(String::as_str)
                .collect();
            if !env.is_empty() {
                writeln!(f, "  env: {}", env.join(" "))?;
            }
            if let Some(c) = &dc.post_create {
                writeln!(f, "  postCreateCommand (in the sandbox): {c}")?;
            }
            if let Some(c) = &dc.post_start {
                writeln!(f, "  postStartCommand (in the sandbox): {c}")?;
            }
            for p in &dc.forward_ports {
                writeln!(
                    f,
                    "  forwardPorts: {p} (publish with -p {p}: 127.0.0.1:{p} on the host)"
                )?;
            }
            if let Some(u) = &dc.remote_user {
                writeln!(f, "  remoteUser: {u}")?;
            }
            for (key, why) in &dc.not_honoured {
                writeln!(f, "  not honoured: {key}: {why}")?;
            }
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
