//! `sandpen secret ...`: the secrets the proxy swaps in for the guest's
//! sentinel. Values come from a prompt without echo or from stdin, never
//! from argv, and are never printed.

use std::io::{IsTerminal, Read};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use sandpen_credentials::{builtin_routes, Route, Scope, SecretValue};
use sandpen_supervisor::credentials::{custom_routes, store, store_and_keyring_status};
use sandpen_supervisor::{sandbox, Dirs};

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
            let hosts = hosts_of(dirs, &service)?;
            if hosts.is_empty() {
                let builtin: Vec<&str> = builtin_names();
                bail!(
                    "unknown service {service}: use one of {}, or `sandpen secret set-custom` for your own API",
                    builtin.join(", ")
                );
            }
            let value = read_value(&service)?;
            save(dirs, &service, scope, value, &hosts)
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
            let routes = custom_routes(dirs);
            // The value first: a cancelled prompt leaves nothing behind.
            let value = read_value(&service)?;
            routes.put(route.clone())?;
            save(dirs, &service, scope, value, &route.hosts)?;
            println!(
                "placeholder: {}\nput it where the client in the sandbox reads its key; the proxy replaces it in the {} header",
                route.sentinel, header
            );
            Ok(0)
        }
        SecretCommand::Ls { json } => list(dirs, json),
        SecretCommand::Rm { service, scope } => {
            let scope = scope_of(dirs, &scope)?;
            let store = store(dirs);
            if !store.remove(&service, &scope)? {
                bail!("no {service} secret in scope {scope}; see `sandpen secret ls`");
            }
            // A custom route without any secret left goes too.
            let left = store.list()?.iter().any(|e| e.service == service);
            if !left {
                custom_routes(dirs).remove(&service)?;
            }
            println!("removed the {service} secret ({scope})");
            Ok(0)
        }
    }
}

fn builtin_names() -> Vec<&'static str> {
    let mut names: Vec<&str> = builtin_routes()
        .iter()
        .map(|r| r.service.as_str())
        .collect();
    names.dedup();
    names
}

fn scope_of(dirs: &Dirs, scope: &ScopeArgs) -> Result<Scope> {
    match &scope.name {
        Some(name) => {
            sandbox::load(dirs, name)?;
            Ok(Scope::Sandbox(name.clone()))
        }
        None => Ok(Scope::Global),
    }
}

/// The hosts a service's secret goes to (built-in and custom routes).
fn hosts_of(dirs: &Dirs, service: &str) -> Result<Vec<String>> {
    let table = custom_routes(dirs).table()?;
    Ok(table
        .routes()
        .iter()
        .filter(|r| r.service == service)
        .flat_map(|r| r.hosts.iter().cloned())
        .collect())
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

fn save(
    dirs: &Dirs,
    service: &str,
    scope: Scope,
    value: SecretValue,
    hosts: &[String],
) -> Result<i32> {
    let (store, no_keyring) = store_and_keyring_status(dirs);
    let first = !store.path().exists();
    store.set(service, scope.clone(), value)?;
    if let (true, Some(why)) = (first, &no_keyring) {
        eprintln!(
            "sandpen: warning: no OS keyring answers ({why}); secrets are kept in {} (mode 0600)",
            store.path().display()
        );
    }
    println!(
        "stored the {service} secret ({scope}) in the {}; it goes to {} only, in place of the sandbox's placeholder",
        store.backend(),
        hosts.join(", ")
    );
    Ok(0)
}

fn list(dirs: &Dirs, json: bool) -> Result<i32> {
    let entries = store(dirs).list()?;
    let table = custom_routes(dirs).table()?;
    let hosts = |service: &str| -> Vec<String> {
        table
            .routes()
            .iter()
            .filter(|r| r.service == service)
            .flat_map(|r| r.hosts.iter().cloned())
            .collect()
    };
    let when = |t: &time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    if json {
        let rows: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                serde_json::json!({
                    "service": e.service,
                    "scope": e.scope.to_string(),
                    "hosts": hosts(&e.service),
                    "set_at": when(&e.set_at),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    let mut rows = vec![[
        "SERVICE".to_string(),
        "SCOPE".to_string(),
        "HOSTS".to_string(),
        "SET-AT".to_string(),
    ]];
    for e in &entries {
        rows.push([
            e.service.clone(),
            e.scope.to_string(),
            hosts(&e.service).join(","),
            when(&e.set_at),
        ]);
    }
    crate::commands::print_table(&rows);
    Ok(0)
}
