//! The agents sandpen runs, in one table: how each is installed into an image,
//! how it is started unattended, which credential services it uses, and which
//! settings are written into its home so that the proxy-managed sentinel works
//! without a login or onboarding prompt.
//!
//! Everything here is data. The image crate installs [`Install::Npm`]
//! packages, [`Install::Release`] archives and the pinned tool manager
//! [`MISE`]; the CLI launches with
//! [`Agent::launch_argv`].

/// Debian packages every agent image carries on top of the base image: Node for
/// the npm-installed agents, a private Docker engine, and the tools agents reach
/// for (compilers, Python, ripgrep, jq).
pub const AGENT_APT_PACKAGES: &[&str] = &[
    "nodejs",
    "npm",
    "docker.io",
    "docker-cli",
    "jq",
    "build-essential",
    "python3",
    "python3-venv",
    "ripgrep",
    "openssh-client",
    "unzip",
    "xz-utils",
];

/// How an agent gets into an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// `npm install -g PACKAGE`, then the listed paths (relative to the
    /// package's folder under the global `node_modules`) are deleted: copies
    /// for other platforms that npm 9 installs anyway.
    Npm {
        package: &'static str,
        trim: &'static [&'static str],
    },
    /// A vendor's own release archive, pinned by version and verified at
    /// download time against the sha256 the vendor publishes for it.
    Release(Release),
    /// Not installable from the registries sandpen can reach, with the reason.
    Unavailable { reason: &'static str },
}

/// A release a vendor publishes outside the package registries: the version
/// is pinned here; the archive's sha256 is the one the vendor's own manifest
/// for that version lists, fetched from the same host at download time and
/// recorded in the image's manifest (docs/agents.md, "Kiro").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Release {
    /// The vendor's release host (HTTPS only).
    pub host: &'static str,
    pub version: &'static str,
    /// The path of the vendor's manifest for `version` on `host`.
    pub manifest_path: &'static str,
    /// The path of the archive (a `.tar.gz`) on `host`.
    pub archive_path: &'static str,
    /// How the manifest lists the archive: its `os`, `architecture` and
    /// `fileType` (the glibc build, not `-musl`).
    pub listing: (&'static str, &'static str, &'static str),
    /// Programs inside the archive, linked into `/usr/local/bin` by name.
    pub programs: &'static [&'static str],
}

impl Release {
    pub fn manifest_url(&self) -> String {
        format!("https://{}{}", self.host, self.manifest_path)
    }

    pub fn archive_url(&self) -> String {
        format!("https://{}{}", self.host, self.archive_path)
    }
}

/// How a settings file in the agent's home is written before each launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// Only when the file does not exist: the user's edits win.
    IfMissing,
    /// Deep-merged over the existing JSON (our keys win), so the agent's own
    /// state in the same file is kept.
    MergeJson,
}

/// A file in the agent's home. `{workspace}` in `content` is replaced by the
/// workspace path (JSON-escaped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigFile {
    /// Relative to `$HOME`.
    pub path: &'static str,
    pub write: Write,
    pub content: &'static str,
}

/// One agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agent {
    /// What users type: `sandpen run NAME`.
    pub name: &'static str,
    pub title: &'static str,
    pub install: Install,
    /// The command in the guest's PATH.
    pub binary: &'static str,
    /// Arguments that turn its permission prompts off (the VM is the boundary).
    pub unattended_args: &'static [&'static str],
    /// What runs when the user gives no arguments (`sandpen run NAME`), for an
    /// agent whose unattended switch belongs to a subcommand.
    pub default_args: &'static [&'static str],
    /// How it signs in when it takes no key the proxy can swap (`services`
    /// is empty): its own login, run in the sandbox.
    pub login: Option<&'static str>,
    /// Credential services (see `sandpen-credentials`) it can use; a launch
    /// needs a secret for at least one.
    pub services: &'static [&'static str],
    /// Extra environment for the agent.
    pub env: &'static [(&'static str, &'static str)],
    pub config: &'static [ConfigFile],
}

const CLAUDE_STATE: &str = r#"{
  "hasCompletedOnboarding": true,
  "bypassPermissionsModeAccepted": true,
  "autoUpdates": false,
  "customApiKeyResponses": {"approved": ["proxy-managed"], "rejected": []},
  "projects": {"{workspace}": {"hasTrustDialogAccepted": true, "hasCompletedProjectOnboarding": true}}
}"#;

const CLAUDE_SETTINGS: &str = r#"{
  "skipDangerousModePermissionPrompt": true
}"#;

const CODEX_CONFIG: &str = r#"# Written by sandpen: the VM is the boundary, so Codex runs without approvals
# and without its own sandbox. The API key is the proxy-managed sentinel in
# OPENAI_API_KEY; the host swaps in the real key on requests to api.openai.com.
approval_policy = "never"
sandbox_mode = "danger-full-access"
"#;

const GEMINI_SETTINGS: &str = r#"{
  "security": {"auth": {"selectedType": "gemini-api-key"}},
  "general": {"disableAutoUpdate": true},
  "privacy": {"usageStatisticsEnabled": false}
}"#;

const OPENCODE_CONFIG: &str = r#"{
  "$schema": "https://opencode.ai/config.json",
  "autoupdate": false,
  "permission": {"edit": "allow", "bash": "allow", "webfetch": "allow"}
}"#;

/// Every agent `sandpen run` knows, besides `shell`.
pub const AGENTS: &[Agent] = &[
    Agent {
        name: "claude",
        title: "Claude Code",
        install: Install::Npm {
            package: "@anthropic-ai/claude-code",
            // npm 9 ignores the `libc` field and installs the musl build (369 MB) too.
            trim: &[
                "node_modules/@anthropic-ai/claude-code-linux-x64-musl",
                "node_modules/@anthropic-ai/claude-code-linux-arm64-musl",
            ],
        },
        binary: "claude",
        unattended_args: &["--dangerously-skip-permissions"],
        default_args: &[],
        login: None,
        services: &["anthropic"],
        env: &[
            ("DISABLE_AUTOUPDATER", "1"),
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
        ],
        config: &[
            ConfigFile {
                path: ".claude.json",
                write: Write::MergeJson,
                content: CLAUDE_STATE,
            },
            ConfigFile {
                path: ".claude/settings.json",
                write: Write::MergeJson,
                content: CLAUDE_SETTINGS,
            },
        ],
    },
    Agent {
        name: "codex",
        title: "Codex CLI",
        install: Install::Npm {
            package: "@openai/codex",
            trim: &[],
        },
        binary: "codex",
        unattended_args: &["--dangerously-bypass-approvals-and-sandbox"],
        default_args: &[],
        login: None,
        services: &["openai"],
        env: &[],
        config: &[ConfigFile {
            path: ".codex/config.toml",
            write: Write::IfMissing,
            content: CODEX_CONFIG,
        }],
    },
    Agent {
        name: "gemini",
        title: "Gemini CLI",
        install: Install::Npm {
            package: "@google/gemini-cli",
            trim: &[],
        },
        binary: "gemini",
        unattended_args: &["--yolo"],
        default_args: &[],
        login: None,
        services: &["google"],
        env: &[],
        config: &[ConfigFile {
            path: ".gemini/settings.json",
            write: Write::MergeJson,
            content: GEMINI_SETTINGS,
        }],
    },
    Agent {
        name: "opencode",
        title: "OpenCode",
        install: Install::Npm {
            package: "opencode-ai",
            trim: &[
                "node_modules/opencode-linux-x64-musl",
                "node_modules/opencode-linux-x64-baseline-musl",
                "node_modules/opencode-linux-arm64-musl",
            ],
        },
        binary: "opencode",
        // Its permissions come from the config file below.
        unattended_args: &[],
        default_args: &[],
        login: None,
        services: &["anthropic", "openai", "google"],
        env: &[],
        config: &[ConfigFile {
            path: ".config/opencode/opencode.json",
            write: Write::IfMissing,
            content: OPENCODE_CONFIG,
        }],
    },
    Agent {
        name: "kiro",
        title: "Kiro CLI",
        install: Install::Release(KIRO_RELEASE),
        binary: "kiro-cli",
        unattended_args: &[],
        // `--trust-all-tools` is an option of `chat`, so it is the default
        // command rather than a prefix of every command (`run kiro -- login`).
        default_args: &["chat", "--trust-all-tools"],
        // KIRO_API_KEY exists for headless use, but where the CLI sends it is
        // not documented, so the proxy cannot swap it in; the device flow
        // signs in from inside the sandbox (docs/agents.md, "Kiro").
        login: Some("kiro-cli login --use-device-flow"),
        services: &[],
        env: &[],
        config: &[],
    },
];

/// The Kiro CLI's Linux release (glibc, x86-64): the vendor's archive and
/// its manifest, which lists each file's sha256.
pub const KIRO_RELEASE: Release = Release {
    host: "desktop-release.q.us-east-1.amazonaws.com",
    version: "2.13.0",
    manifest_path: "/2.13.0/manifest.json",
    archive_path: "/2.13.0/kirocli-x86_64-linux.tar.gz",
    listing: ("linux", "x86_64", "tarGz"),
    programs: &[
        "kirocli/bin/kiro-cli",
        "kirocli/bin/kiro-cli-chat",
        "kirocli/bin/kiro-cli-term",
    ],
};

/// A file taken from one pinned npm tarball: the registry's URL, the
/// tarball's `dist.integrity` (sha512, checked on the bytes before anything
/// is unpacked), and the path of the file inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NpmPin {
    pub package: &'static str,
    pub version: &'static str,
    /// `sha512-BASE64`, as `npm view PACKAGE@VERSION dist.integrity` prints it.
    pub integrity: &'static str,
    pub tarball: &'static str,
    /// Inside the tarball (npm packs everything under `package/`).
    pub file: &'static str,
}

/// The tool manager every image carries at `/usr/local/bin/mise`, which
/// provisions the workspace's toolchains (docs/dev-env.md, "Provisioning").
/// mise's own npm package: one static-enough binary (glibc), 150 MB
/// unstripped (stripping breaks it).
pub const MISE: NpmPin = NpmPin {
    package: "@jdxcode/mise-linux-x64",
    version: "2026.9.15",
    integrity: "sha512-ButPFGyztN0Rk/HOHvHuf+W80CkvQRAjbDWHvhGJc3PnL3e2KhCYZIOyjx8wPkhr9VJa/7sJZXpxtt5JLjsfaQ==",
    tarball: "https://registry.npmjs.org/@jdxcode/mise-linux-x64/-/mise-linux-x64-2026.9.15.tgz",
    file: "package/bin/mise",
};

/// The agent called `name`, if sandpen knows it.
pub fn find(name: &str) -> Option<&'static Agent> {
    AGENTS.iter().find(|a| a.name == name)
}

/// The names `sandpen run` accepts: `shell` and every agent.
pub fn run_names() -> Vec<&'static str> {
    std::iter::once("shell")
        .chain(AGENTS.iter().map(|a| a.name))
        .collect()
}

impl Agent {
    /// The npm package, if it comes from npm.
    pub fn npm_package(&self) -> Option<&'static str> {
        match self.install {
            Install::Npm { package, .. } => Some(package),
            Install::Release(_) | Install::Unavailable { .. } => None,
        }
    }

    /// Whether an image can carry it, or why not.
    pub fn installable(&self) -> Result<(), &'static str> {
        match self.install {
            Install::Npm { .. } | Install::Release(_) => Ok(()),
            Install::Unavailable { reason } => Err(reason),
        }
    }

    /// The argv of one guest process that writes the agent's settings and then
    /// `exec`s the agent with its unattended flags and the user's arguments:
    /// one exec round trip per launch.
    pub fn launch_argv(&self, workspace: &str, user_args: &[String]) -> Vec<String> {
        let mut script = String::from("set -e\n");
        for file in self.config {
            let content = file
                .content
                .replace("{workspace}", &json_escape_inner(workspace));
            let path = format!("$HOME/{}", file.path);
            script.push_str(&format!("mkdir -p \"$(dirname \"{path}\")\"\n"));
            match file.write {
                Write::IfMissing => script.push_str(&format!(
                    "[ -e \"{path}\" ] || printf '%s\\n' {} > \"{path}\"\n",
                    shell_quote(&content)
                )),
                Write::MergeJson => script.push_str(&format!(
                    "sandpen_merge {} \"{path}\"\n",
                    shell_quote(&content)
                )),
            }
        }
        // Merge with jq; an existing file that is not JSON is kept aside.
        let prelude = concat!(
            "sandpen_merge() {\n",
            "  if [ -s \"$2\" ] && printf '%s' \"$1\" | jq -s '.[0] * .[1]' \"$2\" - >\"$2.sandpen-new\" 2>/dev/null\n",
            "  then mv \"$2.sandpen-new\" \"$2\"\n",
            "  else rm -f \"$2.sandpen-new\"; [ ! -s \"$2\" ] || mv \"$2\" \"$2.sandpen-bad\"; printf '%s\\n' \"$1\" >\"$2\"\n",
            "  fi\n",
            "}\n",
        );
        let script = format!("{prelude}{script}exec \"$@\"\n");
        let mut argv = vec![
            "/bin/sh".to_string(),
            "-c".to_string(),
            script,
            format!("sandpen-{}", self.name),
            self.binary.to_string(),
        ];
        argv.extend(self.unattended_args.iter().map(|s| s.to_string()));
        if user_args.is_empty() {
            argv.extend(self.default_args.iter().map(|s| s.to_string()));
        }
        argv.extend(user_args.iter().cloned());
        argv
    }
}

/// `s` as a JSON string's inside (no quotes).
fn json_escape_inner(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// `s` as one single-quoted shell word.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_shell_is_first() {
        let names = run_names();
        assert_eq!(names[0], "shell");
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        assert!(find("claude").is_some() && find("shell").is_none());
    }

    #[test]
    fn unattended_flags_are_the_documented_ones() {
        assert_eq!(
            find("claude").unwrap().unattended_args,
            ["--dangerously-skip-permissions"]
        );
        assert_eq!(find("gemini").unwrap().unattended_args, ["--yolo"]);
        assert_eq!(
            find("codex").unwrap().unattended_args,
            ["--dangerously-bypass-approvals-and-sandbox"]
        );
    }

    #[test]
    fn every_installable_agent_needs_a_credential_service_or_a_login() {
        for a in AGENTS {
            if a.installable().is_ok() {
                assert!(
                    !a.services.is_empty() || a.login.is_some(),
                    "{} has neither a key the proxy swaps nor a login",
                    a.name
                );
            }
        }
        let kiro = find("kiro").unwrap();
        assert!(kiro.installable().is_ok() && kiro.npm_package().is_none());
    }

    #[test]
    fn default_args_only_without_user_args() {
        let kiro = find("kiro").unwrap();
        let bare = kiro.launch_argv("/w", &[]);
        assert_eq!(bare[4..], ["kiro-cli", "chat", "--trust-all-tools"]);
        let version = kiro.launch_argv("/w", &["--version".into()]);
        assert_eq!(version[4..], ["kiro-cli", "--version"]);
        assert_eq!(
            KIRO_RELEASE.archive_url(),
            "https://desktop-release.q.us-east-1.amazonaws.com/2.13.0/kirocli-x86_64-linux.tar.gz"
        );
    }

    #[test]
    fn json_config_is_valid_json_shape() {
        // No serde here: check braces balance and the placeholder is present
        // where the workspace must be trusted.
        for a in AGENTS {
            for f in a.config {
                if f.write == Write::MergeJson {
                    let opens =
                        f.content.matches('{').count() - f.content.matches("{workspace}").count();
                    let closes =
                        f.content.matches('}').count() - f.content.matches("{workspace}").count();
                    assert_eq!(opens, closes, "{} {}", a.name, f.path);
                }
            }
        }
        assert!(CLAUDE_STATE.contains("{workspace}"));
    }

    #[test]
    fn launch_argv_runs_the_agent_with_flags_then_user_args() {
        let argv = find("claude")
            .unwrap()
            .launch_argv("/home/me/it's \"x\"", &["-p".into(), "say hi".into()]);
        assert_eq!(argv[0], "/bin/sh");
        assert_eq!(argv[1], "-c");
        assert!(argv[2].ends_with("exec \"$@\"\n"));
        assert_eq!(
            &argv[4..],
            ["claude", "--dangerously-skip-permissions", "-p", "say hi"]
        );
        // The workspace is JSON-escaped inside a shell-quoted word.
        assert!(argv[2].contains(r#"/home/me/it'\''s \"x\""#), "{}", argv[2]);
    }

    /// Runs the launch prelude for real (with `true` as the agent) in a
    /// temporary home: settings are created, merged into existing JSON
    /// keeping the agent's own keys, and left alone when `IfMissing`.
    #[test]
    fn launch_prelude_writes_and_merges_settings() {
        if std::process::Command::new("jq")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("jq is not installed here; the guest images carry it");
            return;
        }
        let home = std::env::temp_dir().join(format!("sandpen-agents-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&home);
        std::fs::create_dir_all(home.join(".codex")).unwrap();
        std::fs::write(
            home.join(".claude.json"),
            r#"{"numStartups": 3, "projects": {"/other": {"x": 1}}}"#,
        )
        .unwrap();
        std::fs::write(home.join(".codex/config.toml"), "# mine\n").unwrap();
        let run = |agent: &Agent| {
            let mut argv = agent.launch_argv("/work/ws", &[]);
            argv[4] = "true".into();
            let out = std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .env("HOME", &home)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(find("claude").unwrap());
        run(find("codex").unwrap());
        let state = std::fs::read_to_string(home.join(".claude.json")).unwrap();
        for want in [
            r#""numStartups": 3"#,
            r#""/other""#,
            r#""/work/ws""#,
            r#""hasCompletedOnboarding": true"#,
        ] {
            assert!(state.contains(want), "{want} missing in {state}");
        }
        assert!(home.join(".claude/settings.json").is_file());
        assert_eq!(
            std::fs::read_to_string(home.join(".codex/config.toml")).unwrap(),
            "# mine\n"
        );
        let _ = std::fs::remove_dir_all(&home);
    }

    #[test]
    fn shell_quote_survives_quotes() {
        assert_eq!(shell_quote("a'b"), r#"'a'\''b'"#);
    }
}
