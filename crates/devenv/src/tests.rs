use super::*;
use std::os::unix::fs::symlink;

fn workspace(files: &[(&str, &str)]) -> tempfile::TempDir {
    let ws = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let p = ws.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    ws
}

fn chosen(plan: &Plan, tool: Tool) -> (String, String) {
    let c = plan
        .tools
        .iter()
        .find(|c| c.tool == tool)
        .unwrap_or_else(|| panic!("no {tool} in {plan}"));
    (c.chosen.version.to_string(), c.chosen.origin())
}

#[test]
fn the_issue_s_workspace() {
    let ws = workspace(&[
        (".nvmrc", "22\n"),
        (".python-version", "3.12\n"),
        ("rust-toolchain.toml", "[toolchain]\nchannel = \"1.88\"\n"),
        (
            ".devcontainer/devcontainer.json",
            r#"{ "features": { "ghcr.io/devcontainers/features/node:1": {"version": "22"} },
                 "forwardPorts": [3000], "postCreateCommand": "npm ci" }"#,
        ),
    ]);
    let plan = detect(ws.path()).unwrap();
    assert_eq!(chosen(&plan, Tool::Node), ("22".into(), ".nvmrc".into()));
    assert_eq!(
        chosen(&plan, Tool::Python),
        ("3.12".into(), ".python-version".into())
    );
    assert_eq!(
        chosen(&plan, Tool::Rust),
        (
            "1.88".into(),
            "rust-toolchain.toml toolchain.channel".into()
        )
    );
    assert_eq!(
        plan.summary().unwrap(),
        "node 22, python 3.12, rust 1.88 (from .nvmrc, .python-version, rust-toolchain.toml)"
    );
    let (_, dc) = plan.devcontainer.as_ref().unwrap();
    assert_eq!(dc.forward_ports, [3000]);
    // The devcontainer alone (what every exec reads) is the same one.
    assert_eq!(
        devcontainer(ws.path()).unwrap().as_ref(),
        plan.devcontainer.as_ref()
    );
    assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
    assert!(plan.conflicts().is_empty());
    let text = plan.to_string();
    assert!(text.contains(".devcontainer/devcontainer.json features.ghcr.io/devcontainers/features/node:1: 22 (agrees)"), "{text}");
}

/// `.nvmrc` against `engines`: the version file wins (it is what the project
/// runs; `engines` is what it is compatible with), and a disagreement is said.
#[test]
fn nvmrc_against_engines() {
    let ws = workspace(&[
        (".nvmrc", "v18.19.0\n"),
        ("package.json", r#"{"engines": {"node": ">=20"}}"#),
    ]);
    let plan = detect(ws.path()).unwrap();
    assert_eq!(
        chosen(&plan, Tool::Node),
        ("18.19.0".into(), ".nvmrc".into())
    );
    assert_eq!(
        plan.conflicts(),
        ["node: .nvmrc says 18.19.0, package.json engines.node says >=20; using 18.19.0 (.nvmrc wins, docs/dev-env.md)"]
    );
    let ws = workspace(&[
        (".nvmrc", "22\n"),
        ("package.json", r#"{"engines": {"node": ">=20 <23"}}"#),
    ]);
    let plan = detect(ws.path()).unwrap();
    assert_eq!(plan.tools[0].others[0].1, Agreement::Satisfied);
    // Only engines: the range itself is the plan, to resolve when provisioning.
    let ws = workspace(&[("package.json", r#"{"engines": {"node": "^20.10"}}"#)]);
    let plan = detect(ws.path()).unwrap();
    assert_eq!(
        plan.tools[0].chosen.version,
        Version::Range("^20.10".into())
    );
}

#[test]
fn python_version_against_requires_python() {
    let ws = workspace(&[
        (".python-version", "3.10\n"),
        (
            "pyproject.toml",
            "[project]\nrequires-python = \">=3.11\"\n",
        ),
    ]);
    let plan = detect(ws.path()).unwrap();
    assert_eq!(plan.tools[0].others[0].1, Agreement::Conflict);
    let ws = workspace(&[
        (".python-version", "3.12\n"),
        (
            "pyproject.toml",
            "[project]\nrequires-python = \">=3.12.2\"\n",
        ),
    ]);
    let plan = detect(ws.path()).unwrap();
    assert_eq!(plan.tools[0].others[0].1, Agreement::Satisfied);
}

#[test]
fn the_order_of_ranks() {
    let ws = workspace(&[
        ("mise.toml", "[tools]\nnode = \"21\"\n"),
        (".tool-versions", "nodejs 20.1.0\npython 3.11.9\n"),
        (".nvmrc", "19\n"),
        (".python-version", "3.12\n"),
        ("go.mod", "module m\ngo 1.21\ntoolchain go1.22.3\n"),
        (
            ".devcontainer.json",
            r#"{"features": {"ghcr.io/devcontainers/features/ruby:1": "3.2"}}"#,
        ),
        (".ruby-version", "ruby-3.3.0\n"),
    ]);
    let plan = detect(ws.path()).unwrap();
    assert_eq!(chosen(&plan, Tool::Node).1, "mise.toml tools.node");
    let node = plan.tools.iter().find(|c| c.tool == Tool::Node).unwrap();
    let losers: Vec<_> = node
        .others
        .iter()
        .map(|(r, a)| (r.file.as_str(), *a))
        .collect();
    assert_eq!(
        losers,
        [
            (".tool-versions", Agreement::Conflict),
            (".nvmrc", Agreement::Conflict)
        ]
    );
    assert_eq!(
        chosen(&plan, Tool::Python),
        ("3.11.9".into(), ".tool-versions python".into())
    );
    assert_eq!(
        chosen(&plan, Tool::Go),
        ("1.22.3".into(), "go.mod toolchain".into())
    );
    let go = plan.tools.iter().find(|c| c.tool == Tool::Go).unwrap();
    assert_eq!(go.others[0].1, Agreement::Satisfied);
    assert_eq!(
        chosen(&plan, Tool::Ruby),
        ("3.3.0".into(), ".ruby-version".into())
    );
}

#[test]
fn package_manager_java_and_the_older_rust_file() {
    let ws = workspace(&[
        (
            "package.json",
            r#"{"packageManager": "yarn@4.1.1", "engines": {"yarn": ">=4"}}"#,
        ),
        (".java-version", "21\n"),
        (".sdkmanrc", "java=17.0.10-tem\n"),
        ("rust-toolchain", "nightly-2024-05-01\n"),
    ]);
    let plan = detect(ws.path()).unwrap();
    assert_eq!(
        chosen(&plan, Tool::Yarn),
        ("4.1.1".into(), "package.json packageManager".into())
    );
    let yarn = plan.tools.iter().find(|c| c.tool == Tool::Yarn).unwrap();
    assert_eq!(yarn.others[0].1, Agreement::Satisfied);
    assert_eq!(
        chosen(&plan, Tool::Java),
        ("21".into(), ".java-version".into())
    );
    assert_eq!(
        chosen(&plan, Tool::Rust),
        ("nightly-2024-05-01".into(), "rust-toolchain".into())
    );
}

/// A cloned repository's version file that is a symlink to a host file is not
/// read: its first line never reaches the plan (or the guest).
#[test]
fn hostile_files_are_warnings_never_reads() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("id_rsa"), "SECRETKEYLINE\n").unwrap();
    let ws = workspace(&[
        (".python-version", "3.12; rm -rf /\n"),
        ("go.mod", "go $(id)\n"),
    ]);
    symlink(outside.path().join("id_rsa"), ws.path().join(".nvmrc")).unwrap();
    symlink(outside.path(), ws.path().join(".devcontainer")).unwrap();
    std::fs::write(outside.path().join("devcontainer.json"), "{}").unwrap();
    let plan = detect(ws.path()).unwrap();
    assert!(plan.tools.is_empty(), "{plan}");
    assert!(plan.devcontainer.is_none());
    let text = plan.to_string();
    assert!(!text.contains("SECRETKEYLINE"), "{text}");
    for needle in [
        "warning: .nvmrc: not read: a symlink",
        "warning: .devcontainer/devcontainer.json: not read: a symlink",
        "warning: .python-version: line 1: \"3.12; rm -rf /\" is not a version",
        "warning: go.mod: line 1: \"$(id)\" is not a version",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
}

#[test]
fn an_empty_workspace_asks_for_nothing_and_a_missing_one_is_an_error() {
    let ws = tempfile::tempdir().unwrap();
    let plan = detect(ws.path()).unwrap();
    assert!(plan.summary().is_none());
    assert!(plan.to_string().starts_with("toolchains: none asked for"));
    let err = detect(&ws.path().join("gone")).unwrap_err().to_string();
    assert!(err.starts_with("cannot open the workspace"), "{err}");
}

#[test]
fn the_version_grammar() {
    for good in [
        "22",
        "22.11.0",
        "1.88",
        "temurin-21",
        "3.13.0rc1",
        "pypy3.10-7.3",
    ] {
        assert!(Version::pinned(good).is_some(), "{good}");
    }
    for bad in [
        "",
        "-rf",
        "22 23",
        "a/b",
        "$(id)",
        "`x`",
        "x;y",
        "a\nb",
        &"9".repeat(65),
    ] {
        assert!(Version::pinned(bad).is_none(), "{bad:?}");
    }
    assert!(Version::range(">=18 <21 || ^22").is_some());
    assert!(Version::range(">=18 && reboot").is_none());
    assert!(Version::channel("lts/iron").is_some());
    assert!(Version::channel("/etc").is_none());
}

#[test]
fn a_range_resolves_to_the_newest_release_it_allows() {
    use crate::{newest_in_range, Tool};
    let node = [
        "18.20.4",
        "20.18.0",
        "22.11.0",
        "22.23.5",
        "23.1.0",
        "24.0.0-rc.1",
    ];
    assert_eq!(
        newest_in_range(Tool::Node, ">=20 <23", &node).as_deref(),
        Some("22.23.5")
    );
    assert_eq!(
        newest_in_range(Tool::Node, "^20.10", &node).as_deref(),
        Some("20.18.0")
    );
    assert_eq!(newest_in_range(Tool::Node, ">=25", &node), None);
    let python = ["3.11.9", "3.12.7", "3.13.0", "3.14.0a1"];
    assert_eq!(
        newest_in_range(Tool::Python, ">=3.11,<3.13", &python).as_deref(),
        Some("3.12.7")
    );
    // Ranges of tools whose ranges are not checked are not resolved.
    assert_eq!(newest_in_range(Tool::Go, ">=1.22", &["1.22.0"]), None);
}
