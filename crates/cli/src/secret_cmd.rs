//! `sandpen secret ...`: the secrets the proxy swaps in for the guest's
//! sentinel. Values come from a prompt without echo or from stdin, never
//! from argv, and are never printed.

use std::io::{IsTerminal, Read};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use sandpen_credentials::{Route, Scope, SecretValue};
use sandpen_supervisor::Dirs;

use crate::policy_cmd::ScopeArgs;

#[derive(Subcommand, Debug)]
pub enum SecretCommand {
    /// Store a service's secret: anthropic, openai, github, google, or a custom one
    /// (the value is read from a prompt without echo, or from stdin; never from arguments)
    Set {
        service: String,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// Store a secret for your own API: the host it goes to, and the header
    /// and format it travels in; prints the placeholder to use in the guest
    SetCustom {
        /// The only host the secret goes to, as HOST or HOST:PORT (443
        /// when no port is given; no other port of the host gets it)
        #[arg(long, value_name = "HOST[:PORT]")]
        host: String,
        /// The header that carries it, e.g. Authorization
        #[arg(long)]
        header: String,
        /// How the value is written, with {} for the secret
        #[arg(long, default_value = "{}")]
        format: String,
        /// A name for the credential (letters, digits, '-', '_', '.')
        service: String,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// List the stored secrets (never their values)
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove a secret
    Rm {
        service: String,
        #[command(flatten)]
        scope: ScopeArgs,
    },
}

pub fn run(dirs: &Dirs, cmd: SecretCommand) -> Result<i32> {
    match cmd {
        SecretCommand::Set { service, scope } => {
            let scope = scope_of(dirs, &scope)?;
            // Before the prompt: an unknown service is said at once.
            sandpen_api::secrets::routed_hosts(dirs, &service)?;
            let value = read_value(&service)?;
            report(sandpen_api::secrets::set(dirs, &service, scope, value)?)
        }
        SecretCommand::SetCustom {
            host,
            header,
            format,
            service,
            scope,
        } => {
            let scope = scope_of(dirs, &scope)?;
            let route = Route::custom(&service, &host, &header, &format)?;
            // The value first: a cancelled prompt leaves nothing behind.
            let value = read_value(&service)?;
            report(sandpen_api::secrets::set_custom(
                dirs,
                route.clone(),
                scope,
                value,
            )?)?;
            println!(
                "placeholder: {}\nput it where the client in the sandbox reads its key; the proxy replaces it in the {} header",
                route.sentinel, header
            );
            Ok(0)
        }
        SecretCommand::Ls { json } => list(dirs, json),
        SecretCommand::Rm { service, scope } => {
            let scope = scope_of(dirs, &scope)?;
            sandpen_api::secrets::remove(dirs, &service, &scope)?;
            println!("removed the {service} secret ({scope})");
            Ok(0)
        }
    }
}

fn scope_of(dirs: &Dirs, scope: &ScopeArgs) -> Result<Scope> {
    Ok(sandpen_api::secrets::scope_of(dirs, scope.name.as_deref())?)
}

/// The value, from a prompt without echo at a terminal, else all of stdin
/// (one trailing newline dropped).
fn read_value(service: &str) -> Result<SecretValue> {
    // Every copy is zeroed when dropped; `SecretValue` keeps the last one.
    let mut raw = zeroize::Zeroizing::new(if std::io::stdin().is_terminal() {
        rpassword::prompt_password(format!("{service} secret (input hidden): "))
            .context("reading the secret from the terminal")?
    } else {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the secret from stdin")?;
        s
    });
    for suffix in ["\n", "\r"] {
        if raw.ends_with(suffix) {
            let len = raw.len() - suffix.len();
            raw.truncate(len);
        }
    }
    let value = SecretValue::new(raw.as_str());
    if value.expose().is_empty() {
        bail!("the secret is empty; nothing stored");
    }
    Ok(value)
}

fn report(stored: sandpen_api::secrets::Stored) -> Result<i32> {
    if let (Some(why), Some(path)) = (&stored.no_keyring, &stored.store_path) {
        eprintln!(
            "sandpen: warning: no OS keyring answers ({why}); secrets are kept in {path} (mode 0600)"
        );
    }
    println!(
        "stored the {} secret ({}) in the {}; it goes to {} only, in place of the sandbox's placeholder",
        stored.service,
        stored.scope,
        stored.backend,
        stored.hosts.join(", ")
    );
    Ok(0)
}

fn list(dirs: &Dirs, json: bool) -> Result<i32> {
    let entries = sandpen_api::secrets::list(dirs)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(0);
    }
    let mut rows = vec![[
        "SERVICE".to_string(),
        "SCOPE".to_string(),
        "HOSTS".to_string(),
        "SET-AT".to_string(),
    ]];
    for e in entries {
        rows.push([e.service, e.scope, e.hosts.join(","), e.set_at]);
    }
    crate::commands::print_table(&rows);
    Ok(0)
}
