//! Toolchain provisioning at a start (docs/dev-env.md, "Provisioning"),
//! for `sandpen run`/`start` and the page's start alike: every line (mise's
//! progress included) goes to the caller's `say`.
//!
//! The workspace's plan (`sandpen_devenv::detect`) is handed to the image's
//! mise as `TOOL@VERSION` arguments, never as files: only versions that
//! passed the devenv grammar reach the guest, as argv (no shell sees them).
//! mise runs as root in the guest, with the version host off, its installs
//! under `/opt/mise` (readable by the sandbox user), their `bin/` linked into
//! `/usr/local/bin`, so every `exec` finds them with no shell profile. Its
//! downloads leave through the sandbox's proxy like any other connection:
//! the policy decides, and the host's toolchain cache answers what another
//! sandbox already fetched. A failed install never stops the start; it is
//! named, and a refused download names the host and the rule to add.

use sandpen_devenv::{Choice, Plan, Tool, Version};
use sandpen_proto::messages::{ExecEvent, ExecInput};
use sandpen_supervisor::sandbox::SandboxConfig;
use sandpen_supervisor::{control, Dirs};

use std::os::unix::fs::DirBuilderExt;

use crate::ApiError;

/// Where the lines go: the CLI's stderr, a page job's lines.
pub type Say<'a> = &'a (dyn Fn(&str) + Sync);

/// The guest's side, one script in two steps (`$1`):
///
/// - `resolve SPEC…`: first mounts again the trees recorded in
///   `/opt/mise/.sandpen-trees` (an overlay over the read-only tree, its
///   changes on the guest's disk; a record whose tree is missing is kept,
///   with those changes, and said; one that mise replaced by a real
///   install is dropped); then
///   prints, per `TOOL@VERSION`, `have SPEC` when mise has it, `want SPEC
///   VERSION` with the exact version mise resolves it to (from the vendor's
///   list, through the policy), or `unknown SPEC`.
/// - `install ARG…`: each `tree:TOOL:VERSION:NAME` is mounted from the
///   host's tree NAME and recorded (installed by mise when that fails);
///   every other `TOOL@VERSION` mise lacks goes to one `mise install` (its
///   progress on stderr). Then each install's `bin/` is linked into
///   `/usr/local/bin` (never over a file that is not such a link), and
///   `SPEC DIR` is printed per tool on stdout.
const GUEST_SCRIPT: &str = r#"set -u
command -v mise >/dev/null 2>&1 || { echo "sandpen: this image has no mise (built before sandpen provisioned toolchains): rebuild it with sandpen image build" >&2; exit 90; }
trees=/opt/sandpen/toolchains
record=/opt/mise/.sandpen-trees
mount_tree() {
  dest=/opt/mise/installs/$1/$2
  up=/opt/mise/.sandpen-upper/$1-$2
  mkdir -p "$dest" "$up/data" "$up/work" &&
    mount -t overlay -o "lowerdir=$trees/$3,upperdir=$up/data,workdir=$up/work" "sandpen-$1-$2" "$dest"
}
step=$1
shift
if [ "$step" = resolve ]; then
  if [ -f "$record" ]; then
    : > "$record.new"
    while read -r tool version name; do
      dest=/opt/mise/installs/$tool/$version
      if mountpoint -q "$dest"; then
        echo "$tool $version $name" >> "$record.new"
      elif [ -n "$(ls -A "$dest" 2>/dev/null)" ]; then
        # mise installed it for real meanwhile: that install wins.
        continue
      elif [ -d "$trees/$name" ] && mount_tree "$tool" "$version" "$name"; then
        echo "$tool $version $name" >> "$record.new"
      else
        # Kept, with the changes made over it (.sandpen-upper), for a start
        # that has the tree again; the empty folder goes, or mise would take
        # it for an install.
        rmdir "$dest" 2>/dev/null
        echo "$tool $version $name" >> "$record.new"
        echo "sandpen: toolchains: $tool $version's shared tree is not in this sandbox this start; it is installed anew if the workspace asks for it" >&2
      fi
    done < "$record"
    mv "$record.new" "$record"
  fi
  for spec in "$@"; do
    if mise where "$spec" >/dev/null 2>&1; then
      echo "have $spec"
    elif version=$(mise latest "$spec" 2>/dev/null) && [ -n "$version" ]; then
      echo "want $spec $version"
    else
      echo "unknown $spec"
    fi
  done
  exit 0
fi
link_bins() {
  for bin in "$1"/bin/*; do
    [ -e "$bin" ] || continue
    link=/usr/local/bin/${bin##*/}
    if [ -e "$link" ] && [ ! -L "$link" ]; then continue; fi
    case "$(readlink "$link" 2>/dev/null)" in ""|/opt/mise/*|/opt/sandpen-pm/*) ln -sfn "$bin" "$link" ;; esac
  done
}
missing=""
specs=""
pms=""
for arg in "$@"; do
  case $arg in
    tree:*)
      rest=${arg#tree:}
      tool=${rest%%:*}
      rest=${rest#*:}
      version=${rest%%:*}
      name=${rest#*:}
      spec=$tool@$version
      if [ -d "$trees/$name" ] && mount_tree "$tool" "$version" "$name" && mise where "$spec" >/dev/null 2>&1; then
        { grep -v "^$tool $version " "$record" 2>/dev/null; echo "$tool $version $name"; } > "$record.new" && mv "$record.new" "$record"
        echo "sandpen: toolchains: $spec from the host's shared tree (read-only; changes stay in this sandbox)" >&2
      else
        umount "/opt/mise/installs/$tool/$version" 2>/dev/null
        rmdir "/opt/mise/installs/$tool/$version" 2>/dev/null
        missing="$missing $spec"
      fi
      ;;
    pm:*)
      pms="$pms $arg"
      continue
      ;;
    *)
      spec=$arg
      mise where "$spec" >/dev/null 2>&1 || missing="$missing $spec"
      ;;
  esac
  specs="$specs $spec"
done
if [ -n "$missing" ]; then
  # $missing is split on purpose: each word is one checked TOOL@VERSION.
  mise install $missing || exit $?
fi
# $specs too: each word is one checked TOOL@VERSION.
for spec in $specs; do
  dir=$(mise where "$spec") || exit 91
  link_bins "$dir"
  echo "$spec $dir"
done
# Package managers (packageManager): the package's tarball from the npm
# registry (as corepack fetches it, without the package's metadata), its
# digest checked as corepack checks it, then installed with the sandbox's
# npm under its own prefix. A failure is a line, not an exit.
for pm in $pms; do
  rest=${pm#pm:}
  name=${rest%%:*}
  rest=${rest#*:}
  version=${rest%%:*}
  rest=${rest#*:}
  package=${rest%%:*}
  digest=${rest#*:}
  dir=/opt/sandpen-pm/$name/$version
  # An install is taken as it is only when it was checked against this
  # same digest (a pin added or changed later is checked again).
  if [ ! -x "$dir/bin/$name" ] || [ "$(cat "$dir/.sandpen-digest" 2>/dev/null)" != "$digest" ]; then
    if ! command -v npm >/dev/null 2>&1; then
      echo "sandpen: toolchains: $name $version needs npm, and this sandbox has none: name a node version (.nvmrc, engines.node)" >&2
      continue
    fi
    tmp=$(mktemp -d)
    tgz=$tmp/$name-$version.tgz
    url=https://registry.npmjs.org/$package/-/${package##*/}-$version.tgz
    if ! curl -fsSL --retry 2 -o "$tgz" "$url"; then
      echo "sandpen: toolchains: $name $version: $url could not be fetched" >&2
      rm -rf "$tmp"
      continue
    fi
    if [ "$digest" != - ]; then
      # What corepack hashes: the tarball, or for yarn 2 and later the
      # bin/yarn.js inside it.
      hashed=$tgz
      what="the registry's tarball"
      if [ "$package" = @yarnpkg/cli-dist ]; then
        tar -xzf "$tgz" -C "$tmp" package/bin/yarn.js 2>/dev/null
        hashed=$tmp/package/bin/yarn.js
        what="the registry's bin/yarn.js"
      fi
      got=$("${digest%%.*}sum" "$hashed" 2>/dev/null | cut -d' ' -f1)
      if [ "$got" != "${digest#*.}" ]; then
        echo "sandpen: toolchains: $name $version: $what has ${digest%%.*} ${got:-(none)}, not the $digest that packageManager pins; not installed" >&2
        rm -rf "$tmp"
        continue
      fi
    fi
    rm -rf "$dir"
    if ! npm install --global --prefix "$dir" --no-fund --no-audit --no-update-notifier "$tgz" >&2; then
      echo "sandpen: toolchains: $name $version: npm install failed" >&2
      rm -rf "$tmp" "$dir"
      continue
    fi
    echo "$digest" > "$dir/.sandpen-digest"
    rm -rf "$tmp"
  fi
  link_bins "$dir"
  echo "$name@$version $dir"
done
"#;

/// The most of the guest script's stdout the host keeps.
const MAX_STDOUT: usize = 64 * 1024;

/// mise's settings in the guest: the version host off (versions are listed
/// by the vendor itself, through the policy), no prompts, plain output.
const MISE_ENV: &[(&str, &str)] = &[
    ("MISE_DATA_DIR", "/opt/mise"),
    ("MISE_CACHE_DIR", "/var/cache/mise"),
    ("MISE_STATE_DIR", "/var/lib/mise"),
    ("MISE_CONFIG_DIR", "/etc/mise"),
    ("MISE_USE_VERSIONS_HOST", "false"),
    ("MISE_YES", "1"),
    ("MISE_COLOR", "0"),
    ("MISE_PARANOID", "0"),
    ("HOME", "/root"),
];

/// What a choice becomes on mise's command line, `Ok(None)` for a range
/// still to be resolved against the vendor's list ([`resolve_range`]), or
/// why it is not provisioned.
pub fn mise_spec(choice: &Choice) -> Result<Option<String>, String> {
    let tool = choice.tool;
    if matches!(tool, Tool::Pnpm | Tool::Yarn) {
        return Err(format!(
            "{tool} {} ({}): a package manager is not a mise tool (see package_manager_arg)",
            choice.chosen.version,
            choice.chosen.origin()
        ));
    }
    let version = match &choice.chosen.version {
        Version::Pinned(v) => v.clone(),
        Version::Channel(c) => c.clone(),
        Version::Range(_) if matches!(tool, Tool::Node | Tool::Python) => return Ok(None),
        Version::Range(r) => {
            return Err(format!(
                "{tool} {r} ({}): a range of {tool} is not provisioned yet; pin a version in a version file",
                choice.chosen.origin()
            ))
        }
    };
    Ok(Some(format!("{}@{version}", tool.name())))
}

/// The install step's argument for a package manager `packageManager`
/// names (pnpm, yarn): `pm:NAME:VERSION:PACKAGE:DIGEST`, the npm package
/// (`yarn` for yarn 1, `@yarnpkg/cli-dist` after) and the digest to check
/// its tarball against (`-` for none). Only a pinned version is taken: a
/// range (`engines.pnpm`) names no release.
pub fn package_manager_arg(choice: &Choice) -> Result<String, String> {
    let tool = choice.tool;
    let Version::Pinned(version) = &choice.chosen.version else {
        return Err(format!(
            "{tool} {} ({}): only a pinned version (packageManager) is provisioned",
            choice.chosen.version,
            choice.chosen.origin()
        ));
    };
    let package = match tool {
        Tool::Pnpm => "pnpm",
        Tool::Yarn if version == "1" || version.starts_with("1.") => "yarn",
        Tool::Yarn => "@yarnpkg/cli-dist",
        _ => return Err(format!("{tool} is not a package manager")),
    };
    let digest = match &choice.chosen.digest {
        None => "-".to_string(),
        // The plan only keeps a digest that parses.
        Some(d) if sandpen_devenv::sources::package_digest(d).is_some() => d.clone(),
        Some(d) => return Err(format!("{tool} {version}: {d:?} is not a digest")),
    };
    Ok(format!("pm:{}:{version}:{package}:{digest}", tool.name()))
}

/// The newest release of `choice`'s tool its range allows, from the
/// vendor's list as the guest's mise fetches it (through the policy).
async fn resolve_range(
    dirs: &Dirs,
    config: &SandboxConfig,
    choice: &Choice,
    say: Say<'_>,
) -> Result<String, String> {
    let tool = choice.tool;
    let range = choice.chosen.version.text();
    let argv = vec!["mise".into(), "ls-remote".into(), tool.name().into()];
    let listed = match guest(dirs, config, argv, say).await {
        Ok((0, out)) => out,
        Ok((code, _)) => {
            return Err(format!(
                "{tool} {range} ({}): listing the releases failed (mise exited with {code})",
                choice.chosen.origin()
            ))
        }
        Err(e) => return Err(e.to_string()),
    };
    let released: Vec<&str> = listed.lines().collect();
    match sandpen_devenv::newest_in_range(tool, range, &released) {
        Some(v) => Ok(format!("{}@{v}", tool.name())),
        None => Err(format!(
            "{tool} {range} ({}): no release of the {} listed satisfies it",
            choice.chosen.origin(),
            released.len()
        )),
    }
}

/// Provisions the plan's toolchains in the running sandbox; prints what it
/// did. Never fails the start: an error is a line.
pub async fn provision(dirs: &Dirs, config: &SandboxConfig, plan: &Plan, say: Say<'_>) {
    let started = std::time::Instant::now();
    let since = time::OffsetDateTime::now_utc();
    let mut specs = Vec::new();
    let mut managers = Vec::new();
    let mut origins = Vec::new();
    for choice in &plan.tools {
        if matches!(choice.tool, Tool::Pnpm | Tool::Yarn) {
            match package_manager_arg(choice) {
                Ok(arg) => {
                    managers.push(arg);
                    origins.push(choice.chosen.file.clone());
                }
                Err(why) => say(&format!("sandpen: toolchains: {why}")),
            }
            continue;
        }
        let spec = match mise_spec(choice) {
            Ok(Some(spec)) => Ok(spec),
            Ok(None) => resolve_range(dirs, config, choice, say)
                .await
                .inspect(|spec| {
                    say(&format!(
                        "sandpen: toolchains: {} {} ({}) is {spec}, the newest release it allows",
                        choice.tool,
                        choice.chosen.version,
                        choice.chosen.origin()
                    ))
                }),
            Err(why) => Err(why),
        };
        match spec {
            Ok(spec) => {
                specs.push(spec);
                origins.push(choice.chosen.file.clone());
            }
            Err(why) => say(&format!("sandpen: toolchains: {why}")),
        }
    }
    if specs.is_empty() && managers.is_empty() {
        remount_trees(dirs, config, say).await;
        for line in refused_downloads(dirs, &config.name, since) {
            say(&line);
        }
        return;
    }
    let named: Vec<String> = managers
        .iter()
        .filter_map(|m| {
            let mut f = m.split(':').skip(1);
            Some(format!("{}@{}", f.next()?, f.next()?))
        })
        .collect();
    say(&format!(
        "sandpen: toolchains: provisioning {}",
        specs
            .iter()
            .chain(&named)
            .cloned()
            .collect::<Vec<_>>()
            .join(" ")
    ));
    // Only a tool served as a tree is resolved first (`mise latest` lists
    // the vendor's releases: a round trip the others need not make).
    let tree_specs: Vec<String> = specs
        .iter()
        .filter(|spec| {
            sandpen_toolcache::tree::is_tree_tool(spec.split('@').next().unwrap_or(spec))
        })
        .cloned()
        .collect();
    let mut args = specs.clone();
    if tree_specs.is_empty() {
        remount_trees(dirs, config, say).await;
    } else if let Ok((0, resolved)) = step(dirs, config, "resolve", &tree_specs, say).await {
        args = with_trees(dirs, config, &specs, &resolved, say).await;
    }
    // (Otherwise the install step says what is wrong: an image without mise.)
    args.extend(managers);
    match step(dirs, config, "install", &args, say).await {
        Ok((0, stdout)) => {
            let installed: Vec<String> = stdout
                .lines()
                .filter_map(|l| l.split_once(' '))
                .map(|(spec, dir)| {
                    let tool = spec.split('@').next().unwrap_or(spec);
                    let version = dir.rsplit('/').next().unwrap_or(dir);
                    format!("{tool} {version}")
                })
                .collect();
            origins.dedup();
            say(&format!(
                "sandpen: toolchains: {} (from {}) in {:.1} s",
                installed.join(", "),
                origins.join(", "),
                started.elapsed().as_secs_f64()
            ));
        }
        Ok((code, _)) => {
            say(&format!(
                "sandpen: toolchains: mise exited with {code}; the image's own toolchains are used"
            ));
            for line in refused_downloads(dirs, &config.name, since) {
                say(&line);
            }
        }
        Err(e) => say(&format!(
            "sandpen: toolchains: {}",
            crate::error::one_line(&e)
        )),
    }
}

/// Runs one step of the guest script as root (see [`guest`]).
async fn step(
    dirs: &Dirs,
    config: &SandboxConfig,
    step: &str,
    args: &[String],
    say: Say<'_>,
) -> Result<(i32, String), ApiError> {
    let mut argv = vec![
        "/bin/sh".to_string(),
        "-c".into(),
        GUEST_SCRIPT.into(),
        "sandpen-provision".into(),
        step.into(),
    ];
    argv.extend(args.iter().cloned());
    guest(dirs, config, argv, say).await
}

/// Makes the sandbox's view of toolchain trees (`SANDBOX/toolchains/`)
/// before a start, so that the start serves it (docs/dev-env.md, "Shared
/// toolchain trees"): when its workspace names a tool served as a tree, or
/// its image (a saved template) kept trees, which are given to it here.
pub fn prepare_view(dirs: &Dirs, config: &SandboxConfig) -> Vec<String> {
    let mut notes = Vec::new();
    let view = dirs.sandbox(&config.name).toolchain_view();
    let kept = sandpen_image::load(&dirs.images(), &config.image)
        .map(|image| image.dir.join(sandpen_image::TOOLCHAINS_DIR))
        .ok();
    let kept_trees = kept
        .as_deref()
        .map(sandpen_toolcache::tree::trees_in)
        .unwrap_or_default();
    let wants_tree = sandpen_devenv::detect(&config.workspace).is_ok_and(|plan| {
        plan.tools
            .iter()
            .any(|c| sandpen_toolcache::tree::is_tree_tool(c.tool.name()))
    });
    if wants_tree || !kept_trees.is_empty() {
        if let Err(e) = std::fs::DirBuilder::new().mode(0o755).create(&view) {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                notes.push(format!(
                    "toolchains: {} could not be made ({e}); no shared tree is served this start",
                    view.display()
                ));
            }
        }
    }
    if let Some(kept) = kept {
        for name in kept_trees {
            if let Err(e) = sandpen_toolcache::tree::give(&kept.join(&name), &view, &name) {
                notes.push(format!(
                    "toolchains: image {}'s tree {} was not given to this sandbox: {e}",
                    config.image,
                    &name[..12]
                ));
            }
        }
    }
    notes
}

/// Mounts again the trees the sandbox's disk records, for a start that
/// provisions nothing (a template whose workspace names no tool): its
/// installs are there, their files in the trees.
pub async fn remount_trees(dirs: &Dirs, config: &SandboxConfig, say: Say<'_>) {
    let view = dirs.sandbox(&config.name).toolchain_view();
    if sandpen_toolcache::tree::trees_in(&view).is_empty() {
        return;
    }
    match step(dirs, config, "resolve", &[], say).await {
        Ok((0, _)) => {}
        Ok((code, _)) => say(&format!(
            "sandpen: toolchains: mounting the shared trees exited with {code}"
        )),
        Err(e) => say(&format!(
            "sandpen: toolchains: {}",
            crate::error::one_line(&e)
        )),
    }
}

/// The install step's arguments: each spec the guest resolved to an exact
/// version whose archive the host's cache holds becomes
/// `tree:TOOL:VERSION:NAME`, with the tree unpacked (once) and given to
/// this sandbox; every other spec stays as it is, for mise. The guest's
/// lines are untrusted: only a spec of this plan and a version the tree
/// table accepts (digits and dots) are used.
async fn with_trees(
    dirs: &Dirs,
    config: &SandboxConfig,
    specs: &[String],
    resolved: &str,
    say: Say<'_>,
) -> Vec<String> {
    let view = dirs.sandbox(&config.name).toolchain_view();
    let mut args = specs.to_vec();
    if !view.is_dir() {
        return args;
    }
    let mut handled = Vec::new();
    for line in resolved.lines() {
        let mut words = line.split(' ');
        let (Some("want"), Some(spec), Some(version), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            continue;
        };
        let Some(i) = specs.iter().position(|s| s == spec) else {
            continue;
        };
        // One answer per spec: a guest repeating a line makes no more work.
        if handled.contains(&i) {
            continue;
        }
        handled.push(i);
        let tool = spec.split('@').next().unwrap_or(spec);
        let Some(url) = sandpen_toolcache::archive_url(tool, version) else {
            continue;
        };
        let (dirs2, config2, view2) = (dirs.clone(), config.clone(), view.clone());
        let given = tokio::task::spawn_blocking(move || -> Result<Option<String>, String> {
            let cache = sandpen_supervisor::egress::toolchain_cache(&dirs2, &config2)
                .map_err(|e| format!("the toolchain cache: {e}"))?;
            let Some(tree) = cache.tree(&url).map_err(|e| e.to_string())? else {
                return Ok(None);
            };
            sandpen_toolcache::publish(&tree, &view2)
                .map(Some)
                .map_err(|e| e.to_string())
        })
        .await;
        match given {
            Ok(Ok(Some(name))) => args[i] = format!("tree:{tool}:{version}:{name}"),
            Ok(Ok(None)) => {}
            Ok(Err(why)) => say(&format!(
                "sandpen: toolchains: {tool} {version}: the host's shared tree could not be given ({why}); mise installs it"
            )),
            Err(e) => say(&format!("sandpen: toolchains: {tool} {version}: {e}")),
        }
    }
    args
}

/// Runs `argv` in the guest as root with mise's settings; its stderr
/// (mise's progress) goes to `say` line by line, its stdout is returned.
async fn guest(
    dirs: &Dirs,
    config: &SandboxConfig,
    argv: Vec<String>,
    say: Say<'_>,
) -> Result<(i32, String), ApiError> {
    let env = MISE_ENV
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let req = crate::sandboxes::exec_request(
        config,
        argv,
        env,
        Some("root".into()),
        Some("/".into()),
        None,
    );
    let frames = control::exec(&dirs.sandbox(&config.name), req).await?;
    let (mut events, mut input) = frames.split();
    input.send(&ExecInput::StdinEof).await?;
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    // Each complete line (mise ends its progress lines with \n or \r).
    let flush = |buf: &mut Vec<u8>, all: bool| {
        while let Some(i) = buf.iter().position(|b| *b == b'\n' || *b == b'\r') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            if !line.trim().is_empty() {
                say(&line);
            }
        }
        if all && !buf.is_empty() {
            say(&String::from_utf8_lossy(buf));
            buf.clear();
        }
    };
    loop {
        match events.recv::<ExecEvent>().await? {
            Some(ExecEvent::Started { .. }) => {}
            // The script prints a line per tool; what a guest adds past
            // the bound is dropped, not kept in the host's memory.
            Some(ExecEvent::Stdout(d)) => {
                let room = MAX_STDOUT.saturating_sub(stdout.len());
                stdout.extend_from_slice(&d[..d.len().min(room)]);
            }
            Some(ExecEvent::Stderr(d)) => {
                stderr.extend_from_slice(&d);
                flush(&mut stderr, false);
            }
            Some(ExecEvent::Failed { code, message }) => {
                flush(&mut stderr, true);
                return Err(ApiError::GuestCommand(format!("{message} (exit {code})")));
            }
            Some(ExecEvent::Exit(status)) => {
                flush(&mut stderr, true);
                return Ok((
                    status.shell_code(),
                    String::from_utf8_lossy(&stdout).into_owned(),
                ));
            }
            None => {
                flush(&mut stderr, true);
                return Err(ApiError::GuestCommand(
                    "the sandbox closed the session before mise exited".into(),
                ));
            }
        }
    }
}

/// The sandbox's network refusals since `since`, each as the proxy's own
/// denial line and one sentence naming the rule that would allow it.
pub fn refused_downloads(dirs: &Dirs, name: &str, since: time::OffsetDateTime) -> Vec<String> {
    let records = sandpen_proxy::read_log(
        &dirs.sandbox(name).logs().join("net.jsonl"),
        &sandpen_proxy::LogFilter {
            sandbox: None,
            limit: Some(2000),
        },
    )
    .unwrap_or_default();
    let mut seen = Vec::new();
    let mut lines = Vec::new();
    for rec in records
        .iter()
        .filter(|r| r.time >= since && r.decision == sandpen_policy::Verdict::Deny)
    {
        let dest = (rec.host.clone(), rec.port);
        if seen.contains(&dest) {
            continue;
        }
        seen.push(dest);
        let fact = sandpen_proxy::denial::explain(rec, None);
        if let Some(first) = fact.lines().next() {
            lines.push(first.to_string());
        }
        let allow = if rec.port == 443 {
            rec.host.clone()
        } else {
            format!("{}:{}", rec.host, rec.port)
        };
        lines.push(format!(
            "sandpen: toolchains: the download from {} was refused by this sandbox's network policy; \
             allow it with `sandpen policy allow network {allow}` (the balanced preset allows it) and start again",
            rec.host
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandpen_devenv::{Rank, Request};

    fn choice(tool: Tool, version: Version) -> Choice {
        Choice {
            tool,
            chosen: Request {
                tool,
                version,
                file: ".nvmrc".into(),
                key: String::new(),
                rank: Rank::VersionFile,
                digest: None,
            },
            others: Vec::new(),
        }
    }

    #[test]
    fn versions_and_channels_become_mise_arguments_ranges_are_resolved_or_named() {
        let spec = |t, v| mise_spec(&choice(t, v));
        let some = |s: &str| Ok(Some(s.to_string()));
        assert_eq!(
            spec(Tool::Node, Version::pinned("22").unwrap()),
            some("node@22")
        );
        assert_eq!(
            spec(Tool::Node, Version::channel("lts/iron").unwrap()),
            some("node@lts/iron")
        );
        assert_eq!(
            spec(Tool::Rust, Version::channel("stable").unwrap()),
            some("rust@stable")
        );
        // Node and python ranges are resolved against the vendor's list.
        assert_eq!(
            spec(Tool::Node, Version::range(">=20 <23").unwrap()),
            Ok(None)
        );
        assert_eq!(
            spec(Tool::Python, Version::range(">=3.11").unwrap()),
            Ok(None)
        );
        let go = spec(Tool::Go, Version::range(">=1.22").unwrap()).unwrap_err();
        assert!(go.contains("a range of go is not provisioned yet"), "{go}");
        let pnpm = spec(Tool::Pnpm, Version::pinned("9.1.0").unwrap()).unwrap_err();
        assert!(pnpm.contains("not a mise tool"), "{pnpm}");
    }

    #[test]
    fn package_managers_become_npm_packages_with_their_digest() {
        let arg = |t, v: &str, digest: Option<&str>| {
            let mut c = choice(t, Version::pinned(v).unwrap());
            c.chosen.digest = digest.map(str::to_string);
            package_manager_arg(&c)
        };
        let sha = format!("sha512.{}", "0f".repeat(64));
        assert_eq!(
            arg(Tool::Pnpm, "9.15.0", Some(&sha)),
            Ok(format!("pm:pnpm:9.15.0:pnpm:{sha}"))
        );
        assert_eq!(
            arg(Tool::Yarn, "1.22.22", None),
            Ok("pm:yarn:1.22.22:yarn:-".to_string())
        );
        assert_eq!(
            arg(Tool::Yarn, "4.5.0", None),
            Ok("pm:yarn:4.5.0:@yarnpkg/cli-dist:-".to_string())
        );
        assert!(arg(Tool::Pnpm, "9.15.0", Some("sha512.zz")).is_err());
        let range = package_manager_arg(&choice(Tool::Pnpm, Version::range(">=9").unwrap()));
        assert!(range.unwrap_err().contains("only a pinned version"));
    }
}
