//! Built-in rule sets.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Action, Rule, RuleSource, Scope, Target};

/// A built-in set of rules that a policy file names with `preset = "..."`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// No rules: everything is denied unless a file allows it.
    #[default]
    DenyAll,
    /// The agents' model APIs and sign-ins, package registries, git hosts and
    /// toolchain vendors, on 443 (and Debian's mirrors on 80, which apt uses).
    Balanced,
    /// `allow **`: everything except the blocked address ranges.
    AllowAll,
}

/// The `balanced` preset's targets. Order is stable: a rule's id is its
/// position + 1.
const BALANCED: &[&str] = &[
    // Model APIs of the supported agents.
    "api.anthropic.com:443",
    "api.openai.com:443",
    "chatgpt.com:443", // codex signs in and talks to its backend here
    "generativelanguage.googleapis.com:443",
    // Package registries.
    "registry.npmjs.org:443",
    "pypi.org:443",
    "files.pythonhosted.org:443",
    "crates.io:443",
    "static.crates.io:443",
    "index.crates.io:443",
    "deb.debian.org:443",
    "deb.debian.org:80",
    "security.debian.org:443",
    "security.debian.org:80",
    // Git hosts.
    "github.com:443",
    "*.github.com:443",
    "*.githubusercontent.com:443",
    "gitlab.com:443",
    "*.gitlab.com:443",
    // Toolchain vendors, for the workspace's toolchains (docs/dev-env.md,
    // "Provisioning"): node, rust (rustup and its dist server), go (go.dev
    // lists, dl.google.com serves). Python's prebuilt builds come from GitHub
    // releases, above.
    "nodejs.org:443",
    "static.rust-lang.org:443",
    "go.dev:443",
    "dl.google.com:443",
    // The Kiro CLI: its model API, its sign-in (AWS Builder ID / IAM
    // Identity Center tokens, social logins) and its release manifest, in
    // us-east-1, where Kiro's service runs.
    "q.us-east-1.amazonaws.com:443",
    "oidc.us-east-1.amazonaws.com:443",
    "*.auth.desktop.kiro.dev:443",
    "desktop-release.q.us-east-1.amazonaws.com:443",
];

impl Preset {
    pub const ALL: [Preset; 3] = [Preset::DenyAll, Preset::Balanced, Preset::AllowAll];

    pub fn as_str(self) -> &'static str {
        match self {
            Preset::DenyAll => "deny-all",
            Preset::Balanced => "balanced",
            Preset::AllowAll => "allow-all",
        }
    }

    pub fn parse(s: &str) -> Option<Preset> {
        Preset::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// The preset's rules, in scope [`Scope::Preset`], ids from 1.
    pub fn rules(self) -> Vec<Rule> {
        let targets: &[&str] = match self {
            Preset::DenyAll => &[],
            Preset::Balanced => BALANCED,
            Preset::AllowAll => &["**"],
        };
        targets
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                // The table is static and tested; a bad entry is skipped, never widened.
                let target = Target::parse(t).ok()?;
                Some(Rule {
                    id: u32::try_from(i + 1).ok()?,
                    scope: Scope::Preset,
                    action: Action::Allow,
                    target,
                    source: RuleSource::Preset(self),
                })
            })
            .collect()
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_tables_all_parse() {
        assert_eq!(Preset::Balanced.rules().len(), BALANCED.len());
        assert!(Preset::DenyAll.rules().is_empty());
        assert_eq!(Preset::AllowAll.rules()[0].target.to_string(), "**");
        for p in Preset::ALL {
            assert_eq!(Preset::parse(p.as_str()), Some(p));
        }
    }
}
