//! The agents sandpen runs, in one table: how each is installed into an image,
//! how it is started unattended, which credential services it uses, and which
//! settings are written into its home so that the proxy-managed sentinel works
//! without a login or onboarding prompt.
//!
//! Everything here is data. The image crate installs [`Install::Npm`]
//! packages and the pinned tool manager [`MISE`]; the CLI launches with
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
    /// Not installable from the registries sandpen can reach, with the reason.
    Unavailable { reason: &'static str },
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
        install: Install::Unavailable {
            reason: "the Kiro CLI is not published on npm (registry.npmjs.org answers 404 for \
                     kiro-cli and @kirodotdev/cli) nor as a Debian package; it is distributed only \
                     through the install script at cli.kiro.dev, which is not a package registry \
                     sandpen builds images from",
        },
        binary: "kiro-cli",
        unattended_args: &[],
        services: &[],
        env: &[],
        config: &[],
    },
];

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
    /// The npm package, or why there is none.
    pub fn npm_package(&self) -> Result<&'static str, &'static str> {
        match self.install {
            Install::Npm { package, .. } => Ok(package),
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
    fn every_installable_agent_needs_a_credential_service() {
        for a in AGENTS {
            if a.npm_package().is_ok() {
                assert!(!a.services.is_empty(), "{}", a.name);
            }
        }
        assert!(find("kiro").unwrap().npm_package().is_err());
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
