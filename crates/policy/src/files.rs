//! File rules and flow settings: `[files]` and `[flow]` in the policy files
//! and in a workspace's `.sandpen.toml`.
//!
//! # Patterns
//!
//! A pattern is a glob over the path relative to the share's root, with `/`
//! as separator (`*` and `?` never cross a `/`, `**` does):
//!
//! - a pattern without `/` matches the last component at any depth: `*.pem`
//!   matches `a.pem` and `x/y/a.pem`;
//! - a pattern with a `/` is anchored at the root: `.git/config` matches only
//!   the top-level one, `secrets/**` everything below the top-level `secrets`;
//!   a leading `/` or `./` is ignored, `**/x` matches `x` at any depth.
//!
//! # What each list does
//!
//! - `deny_read`: the path and everything below it do not exist for the guest.
//! - `read_only`: the path cannot be changed.
//! - `flow.secret`: opening the file for reading sets the `secret-read` label.
//! - the git guard (with the defaults): a non-folder named `.git` (a gitfile)
//!   cannot be created, changed or removed, and no symlink can be made at or
//!   below a `.git` folder; with the default read-only patterns this keeps
//!   everything the host's git runs or reads its configuration from out of
//!   the guest's reach, at any depth (docs/files.md).
//!
//! # Rules follow the file, not its name
//!
//! A rename moves a whole subtree to new names, so [`FileRules::rename`]
//! decides it by what the rules say about *everything* the move carries, not
//! only about the two names: each pattern is also run as a small automaton
//! over path components, and the set of pattern positions still open after a
//! folder's path says which names below it the pattern can match. A move
//! is refused when it would leave something below the folder uncovered by a
//! deny-read or secret rule that covered it, or change in any way what a
//! read-only rule (or the git guard) covers below it. This costs the length
//! of the two paths times the number of rules, whatever the tree holds.
//!
//! Every rule is evaluated only here, by [`FileRules`]; the file server asks
//! it and never matches a pattern itself.

use std::fmt;
use std::path::{Path, PathBuf};

use globset::{Glob, GlobBuilder, GlobMatcher};

/// The deny-read rules every sandbox gets: the conventional names of
/// credential files. They match without regard to case (`.ENV`, `KEY.PEM`).
/// All are deny-read rather than `flow.secret`: a secret file the guest may
/// read is a file the guest holds, and the defaults are files no build needs
/// to read (see docs/files.md).
pub const DEFAULT_DENY_READ: &[&str] = &[
    ".env",
    ".env.*",
    ".envrc",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    ".netrc",
    ".npmrc",
    ".pypirc",
    ".git-credentials",
];
/// Added to the deny-read defaults when a share is a home folder or holds
/// one: the home-level credential stores, at any depth (a home inside the
/// share is at some depth). Case-insensitive like the other defaults.
pub const HOME_DENY_READ: &[&str] = &[
    ".ssh",
    ".aws",
    "**/.config/gh",
    "**/.docker/config.json",
    ".kube",
    ".gnupg",
    ".netrc",
    ".git-credentials",
];
/// The read-only rules every sandbox gets: whatever the host's git executes
/// or takes configuration from, under a `.git` folder at any depth (and in
/// the repositories of submodules and linked worktrees it holds), and
/// `.sandpen.toml`, so that the agent cannot widen the rules its next start
/// will read.
pub const DEFAULT_READ_ONLY: &[&str] = &[
    "**/.git/config",
    "**/.git/config.worktree",
    "**/.git/hooks/**",
    "**/.git/info/**",
    "**/.git/commondir",
    "**/.git/objects/info/alternates",
    "**/.git/objects/info/http-alternates",
    "**/.git/modules/**/config",
    "**/.git/modules/**/config.worktree",
    "**/.git/modules/**/hooks/**",
    "**/.git/modules/**/info/**",
    "**/.git/modules/**/commondir",
    "**/.git/modules/**/objects/info/alternates",
    "**/.git/modules/**/objects/info/http-alternates",
    "**/.git/worktrees/**",
    ".sandpen.toml",
];

/// The name of git's metadata folder (or gitfile).
pub const GIT_DIR: &str = ".git";

/// The workspace file that can add rules.
pub const WORKSPACE_FILE: &str = ".sandpen.toml";

/// What a file rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRuleKind {
    DenyRead,
    ReadOnly,
    Secret,
}

impl FileRuleKind {
    pub fn parse(s: &str) -> Option<FileRuleKind> {
        [
            FileRuleKind::DenyRead,
            FileRuleKind::ReadOnly,
            FileRuleKind::Secret,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FileRuleKind::DenyRead => "deny_read",
            FileRuleKind::ReadOnly => "read_only",
            FileRuleKind::Secret => "flow.secret",
        }
    }
}

/// Where a file rule was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileRuleSource {
    Default,
    File {
        path: PathBuf,
        line: usize,
    },
    /// Carried as text (to the file server process): shown as is.
    Text(String),
}

impl fmt::Display for FileRuleSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileRuleSource::Default => f.write_str("default"),
            FileRuleSource::File { path, line } => write!(f, "{}:{line}", path.display()),
            FileRuleSource::Text(t) => f.write_str(t),
        }
    }
}

/// A pattern that does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid path pattern `{pattern}`: {why}")]
pub struct PatternError {
    pub pattern: String,
    pub why: String,
}

/// One component of a pattern, for following it along a path.
#[derive(Debug, Clone)]
enum Comp {
    /// `**`: any number of components.
    AnyDepth,
    /// One component.
    One(GlobMatcher),
}

/// One compiled path pattern.
#[derive(Debug, Clone)]
pub struct PathRule {
    pub kind: FileRuleKind,
    /// As written.
    pub pattern: String,
    pub source: FileRuleSource,
    /// Matched without regard to case (the defaults).
    pub ignore_case: bool,
    matcher: GlobMatcher,
    /// The same pattern one component at a time (see [`PathRule::open_after`]).
    comps: Vec<Comp>,
}

fn glob(pattern: &str, ignore_case: bool) -> Result<Glob, globset::Error> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .case_insensitive(ignore_case)
        .build()
}

/// Splits a pattern at the `/` that separate components; `None` when a `/`
/// sits inside `{…}` or `[…]`, where it would not.
fn split_components(p: &str) -> Option<Vec<&str>> {
    let mut out = Vec::new();
    let (mut braces, mut bracket, mut escaped, mut start) = (0usize, false, false, 0);
    for (i, ch) in p.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match ch {
            '\\' => escaped = true,
            '[' if !bracket => bracket = true,
            ']' if bracket => bracket = false,
            '{' if !bracket => braces += 1,
            '}' if !bracket => braces = braces.saturating_sub(1),
            '/' if braces > 0 || bracket => return None,
            '/' => {
                out.push(&p[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&p[start..]);
    Some(out)
}

impl PathRule {
    /// A rule that matches case-sensitively, as users write them.
    pub fn new(
        kind: FileRuleKind,
        pattern: &str,
        source: FileRuleSource,
    ) -> Result<PathRule, PatternError> {
        PathRule::with_case(kind, pattern, source, false)
    }

    /// A rule that matches without regard to case when `ignore_case`.
    pub fn with_case(
        kind: FileRuleKind,
        pattern: &str,
        source: FileRuleSource,
        ignore_case: bool,
    ) -> Result<PathRule, PatternError> {
        let bad = |why: &str| PatternError {
            pattern: pattern.to_string(),
            why: why.to_string(),
        };
        let mut p = pattern.trim();
        if p.is_empty() {
            return Err(bad("empty pattern"));
        }
        if let Some(rest) = p.strip_prefix("./") {
            p = rest;
        }
        let anchored = p.trim_end_matches('/').contains('/');
        let p = p.trim_start_matches('/').trim_end_matches('/');
        if p.is_empty() {
            return Err(bad("the pattern names the root itself"));
        }
        if p.split('/').any(|c| c == ".." || c == ".") {
            return Err(bad("`.` and `..` are not allowed in a pattern"));
        }
        let full = if anchored {
            p.to_string()
        } else {
            format!("**/{p}")
        };
        let matcher = glob(&full, ignore_case)
            .map_err(|e| bad(&e.kind().to_string()))?
            .compile_matcher();
        let parts = split_components(&full).ok_or_else(|| {
            bad("a `/` inside `{…}` or `[…]` is not supported: write one pattern per alternative")
        })?;
        let comps = parts
            .into_iter()
            .map(|c| {
                if c == "**" {
                    Ok(Comp::AnyDepth)
                } else {
                    glob(c, ignore_case)
                        .map(|g| Comp::One(g.compile_matcher()))
                        .map_err(|e| bad(&e.kind().to_string()))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PathRule {
            kind,
            pattern: pattern.to_string(),
            source,
            ignore_case,
            matcher,
            comps,
        })
    }

    /// Does the pattern match `rel` (a path relative to the root, no leading
    /// `/`), or a folder above it?
    fn matches(&self, rel: &Path) -> bool {
        rel.ancestors()
            .filter(|a| !a.as_os_str().is_empty())
            .any(|a| self.matcher.is_match(a))
    }

    /// Adds the positions reachable without a component (past a `**`).
    fn closure(&self, mut states: Vec<usize>) -> Vec<usize> {
        let mut i = 0;
        while i < states.len() {
            let s = states[i];
            if matches!(self.comps.get(s), Some(Comp::AnyDepth)) && !states.contains(&(s + 1)) {
                states.push(s + 1);
            }
            i += 1;
        }
        states.sort_unstable();
        states.dedup();
        states
    }

    /// The positions of the pattern still open after the components of the
    /// folder `rel`: what the pattern can match below `rel` depends on `rel`
    /// only through this set, so two folders with the same set (or the
    /// second with more) have the same names below them covered.
    fn open_after(&self, rel: &Path) -> Vec<usize> {
        let mut states = self.closure(vec![0]);
        for c in rel.components() {
            let name = Path::new(c.as_os_str());
            let next = states
                .iter()
                .filter_map(|&s| match self.comps.get(s) {
                    Some(Comp::AnyDepth) => Some(s),
                    Some(Comp::One(m)) if m.is_match(name) => Some(s + 1),
                    _ => None,
                })
                .collect();
            states = self.closure(next);
            if states.is_empty() {
                break;
            }
        }
        states.retain(|&s| s < self.comps.len());
        states
    }

    /// Would moving `from` (a folder when `dir`, whose contents go along)
    /// to `to` take something out from under this rule? With `both_ways`,
    /// bringing something under it counts too.
    fn move_changes(&self, from: &Path, to: &Path, dir: bool, both_ways: bool) -> bool {
        let (was, will) = (self.matches(from), self.matches(to));
        if will {
            return both_ways && !was;
        }
        if was {
            return true;
        }
        if !dir {
            return false;
        }
        let (before, after) = (self.open_after(from), self.open_after(to));
        if both_ways {
            before != after
        } else {
            !before.iter().all(|s| after.contains(s))
        }
    }
}

impl fmt::Display for PathRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} ({})",
            self.kind.as_str(),
            self.pattern,
            self.source
        )
    }
}

/// An exception to the deny-read rules (`[files] allow_read`, written by
/// `sandpen policy approve ID --always` on an agent's `sandpen-request
/// file read PATH`): exactly one path, relative to the share's root, that
/// no deny-read rule hides. It reaches that path alone: not what is below
/// it (a folder's entries are decided by their own names), and not through
/// a folder above it that a rule hides. It lifts nothing else: a
/// `flow.secret` rule still labels a read of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadException {
    pub path: PathBuf,
    pub source: FileRuleSource,
}

impl fmt::Display for ReadException {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "allow_read {} ({})", self.path.display(), self.source)
    }
}

/// Why an `allow_read` entry is not one exact relative path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid allow_read path `{path}`: {why}")]
pub struct ExceptionPathError {
    pub path: String,
    pub why: &'static str,
}

/// An `allow_read` entry: one exact path relative to the share's root
/// (`.env.example`, `config/.env.example`), no glob, no `.` or `..`, no
/// empty component, not absolute.
pub fn exception_path(s: &str) -> Result<PathBuf, ExceptionPathError> {
    let bad = |why| ExceptionPathError {
        path: s.to_string(),
        why,
    };
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if s.starts_with('/') {
        return Err(bad("it must be relative to the share's root"));
    }
    if s.contains(['*', '?', '[', ']', '{', '}', '\\', '\0']) {
        return Err(bad(
            "an exception names one path; glob characters are not allowed",
        ));
    }
    for c in s.split('/') {
        match c {
            "" => return Err(bad("empty component (`//` or a trailing `/`)")),
            "." | ".." => return Err(bad("`.` and `..` are not allowed")),
            _ => {}
        }
    }
    Ok(PathBuf::from(s))
}

/// The file rules of one share, compiled.
#[derive(Debug, Clone, Default)]
pub struct FileRules {
    deny_read: Vec<PathRule>,
    read_only: Vec<PathRule>,
    secret: Vec<PathRule>,
    /// `allow_read`: exact paths the deny-read rules do not hide.
    allow_read: Vec<ReadException>,
    /// The whole share is read-only (`--mount PATH:ro`).
    all_read_only: bool,
    /// The git guard (on with the defaults, see the module docs).
    git: bool,
}

/// What kind of entry a name is, for the rules that depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    Symlink,
    /// A regular file, FIFO or socket.
    File,
}

impl EntryKind {
    /// From `st_mode`.
    pub fn from_mode(mode: u32) -> EntryKind {
        match mode & 0o170000 {
            0o040000 => EntryKind::Dir,
            0o120000 => EntryKind::Symlink,
            _ => EntryKind::File,
        }
    }
}

/// Is `rel` a `.git` folder or below one?
fn in_git(rel: &Path) -> bool {
    rel.components().any(|c| c.as_os_str() == GIT_DIR)
}

impl FileRules {
    /// Rules from already compiled lists.
    pub fn new(rules: impl IntoIterator<Item = PathRule>) -> FileRules {
        let mut r = FileRules::default();
        for rule in rules {
            r.push(rule);
        }
        r
    }

    pub fn push(&mut self, rule: PathRule) {
        let list = match rule.kind {
            FileRuleKind::DenyRead => &mut self.deny_read,
            FileRuleKind::ReadOnly => &mut self.read_only,
            FileRuleKind::Secret => &mut self.secret,
        };
        if !list.iter().any(|r| r.pattern == rule.pattern) {
            list.push(rule);
        }
    }

    /// Add an exception to the deny-read rules (see [`ReadException`]).
    pub fn push_read_exception(&mut self, path: PathBuf, source: FileRuleSource) {
        if !self.allow_read.iter().any(|e| e.path == path) {
            self.allow_read.push(ReadException { path, source });
        }
    }

    /// The exceptions to the deny-read rules.
    pub fn read_exceptions(&self) -> &[ReadException] {
        &self.allow_read
    }

    /// Make every path of the share read-only.
    pub fn with_all_read_only(mut self, yes: bool) -> FileRules {
        self.all_read_only = yes;
        self
    }

    pub fn all_read_only(&self) -> bool {
        self.all_read_only
    }

    /// Switch the git guard on or off (on with the defaults).
    pub fn with_git_guard(mut self, yes: bool) -> FileRules {
        self.git = yes;
        self
    }

    pub fn git_guard(&self) -> bool {
        self.git
    }

    /// Every rule: deny-read, read-only, then secret.
    pub fn all(&self) -> impl Iterator<Item = &PathRule> {
        self.deny_read
            .iter()
            .chain(&self.read_only)
            .chain(&self.secret)
    }

    /// The rules of one kind, in order.
    pub fn list(&self, kind: FileRuleKind) -> &[PathRule] {
        match kind {
            FileRuleKind::DenyRead => &self.deny_read,
            FileRuleKind::ReadOnly => &self.read_only,
            FileRuleKind::Secret => &self.secret,
        }
    }

    /// The deny-read rule that hides `rel`, if one does. `rel` is relative
    /// to the share's root; the root itself (`""`) is never hidden.
    ///
    /// A path named by an `allow_read` exception is hidden only by a rule
    /// that hides a folder above it.
    pub fn hidden(&self, rel: &Path) -> Option<&PathRule> {
        if self.allow_read.iter().any(|e| e.path == rel) {
            return self.hidden_above(rel);
        }
        self.deny_read.iter().find(|r| r.matches(rel))
    }

    /// The deny-read rule that hides a folder above `rel`, if one does.
    pub fn hidden_above(&self, rel: &Path) -> Option<&PathRule> {
        let parent = rel.parent().filter(|p| !p.as_os_str().is_empty())?;
        self.deny_read.iter().find(|r| r.matches(parent))
    }

    /// May `rel` (which exists or is about to) be changed: written, created,
    /// removed, re-moded? `Err` names the rule that forbids it; a share
    /// mounted read-only forbids everything.
    pub fn writable(&self, rel: &Path) -> Result<(), ReadOnlyBy<'_>> {
        if self.all_read_only {
            return Err(ReadOnlyBy::Share);
        }
        match self.read_only.iter().find(|r| r.matches(rel)) {
            Some(r) => Err(ReadOnlyBy::Rule(r)),
            None => Ok(()),
        }
    }

    /// May the entry `rel`, of `kind`, be changed or removed? Like
    /// [`writable`](Self::writable), and a gitfile (a non-folder named
    /// `.git`) never is under the git guard.
    pub fn writable_entry(&self, rel: &Path, kind: EntryKind) -> Result<(), ReadOnlyBy<'_>> {
        self.writable(rel)?;
        if self.git && kind != EntryKind::Dir && rel.file_name() == Some(GIT_DIR.as_ref()) {
            return Err(ReadOnlyBy::Git);
        }
        Ok(())
    }

    /// May an entry of `kind` be created at `rel` (by create, mknod, mkdir,
    /// symlink, link or a rename)? Like [`writable`](Self::writable), and
    /// under the git guard no gitfile and no symlink at or below a `.git`.
    pub fn creatable_entry(&self, rel: &Path, kind: EntryKind) -> Result<(), ReadOnlyBy<'_>> {
        self.writable_entry(rel, kind)?;
        if self.git && kind == EntryKind::Symlink && in_git(rel) {
            return Err(ReadOnlyBy::Git);
        }
        Ok(())
    }

    /// May the entry `from` (of `kind`; a folder's contents go along) be
    /// renamed to `to`? Refused when the move would change what a read-only
    /// rule or the git guard covers at or below it, or take anything there
    /// out from under a deny-read or secret rule (see the module docs). Hidden
    /// names themselves are the caller's to refuse first (as `ENOENT`).
    pub fn rename(&self, from: &Path, to: &Path, kind: EntryKind) -> Result<(), MoveRefused<'_>> {
        self.writable_entry(from, kind)
            .map_err(MoveRefused::ReadOnly)?;
        self.creatable_entry(to, kind)
            .map_err(MoveRefused::ReadOnly)?;
        let dir = kind == EntryKind::Dir;
        if let Some(r) = self
            .read_only
            .iter()
            .find(|r| r.move_changes(from, to, dir, true))
        {
            return Err(MoveRefused::ReadOnly(ReadOnlyBy::Rule(r)));
        }
        if self.git && dir && in_git(from) != in_git(to) {
            return Err(MoveRefused::ReadOnly(ReadOnlyBy::Git));
        }
        if let Some(r) = self
            .deny_read
            .iter()
            .find(|r| r.move_changes(from, to, dir, false))
        {
            return Err(MoveRefused::Hidden(r));
        }
        if let Some(r) = self
            .secret
            .iter()
            .find(|r| r.move_changes(from, to, dir, false))
        {
            return Err(MoveRefused::Secret(r));
        }
        // A folder moved so that an exception's path falls on something
        // the deny-read rules hide where it is now would reveal it.
        if dir {
            for e in &self.allow_read {
                let Ok(rest) = e.path.strip_prefix(to) else {
                    continue;
                };
                if rest.as_os_str().is_empty() {
                    continue;
                }
                if let Some(r) = self.hidden(&from.join(rest)) {
                    return Err(MoveRefused::Hidden(r));
                }
            }
        }
        Ok(())
    }

    /// The `flow.secret` rule that `rel` matches, if any.
    pub fn secret(&self, rel: &Path) -> Option<&PathRule> {
        self.secret.iter().find(|r| r.matches(rel))
    }

    /// One line for `sandpen run`: `files: deny-read .env .env.* …; read-only …; secret …`.
    pub fn summary(&self) -> String {
        let join = |l: &[PathRule]| {
            if l.is_empty() {
                "-".to_string()
            } else {
                l.iter()
                    .map(|r| r.pattern.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            }
        };
        let mut s = format!(
            "deny-read {}; read-only {}",
            join(&self.deny_read),
            join(&self.read_only)
        );
        if !self.secret.is_empty() {
            s.push_str(&format!("; secret {}", join(&self.secret)));
        }
        if !self.allow_read.is_empty() {
            let paths: Vec<String> = self
                .allow_read
                .iter()
                .map(|e| e.path.display().to_string())
                .collect();
            s.push_str(&format!("; allow-read {}", paths.join(" ")));
        }
        s
    }
}

/// Why a path is read-only.
#[derive(Debug, Clone, Copy)]
pub enum ReadOnlyBy<'a> {
    Share,
    Rule(&'a PathRule),
    /// A gitfile, a symlink in a `.git`, or a folder moved into or out of one.
    Git,
}

impl fmt::Display for ReadOnlyBy<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadOnlyBy::Share => f.write_str("read-only mount"),
            ReadOnlyBy::Rule(r) => r.fmt(f),
            ReadOnlyBy::Git => f.write_str("git metadata (default)"),
        }
    }
}

/// Why a rename is refused.
#[derive(Debug, Clone, Copy)]
pub enum MoveRefused<'a> {
    /// It would change something read-only, or what a read-only rule covers.
    ReadOnly(ReadOnlyBy<'a>),
    /// It would take something hidden out from under its deny-read rule.
    Hidden(&'a PathRule),
    /// It would take a secret out from under its `flow.secret` rule.
    Secret(&'a PathRule),
}

impl fmt::Display for MoveRefused<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MoveRefused::ReadOnly(by) => by.fmt(f),
            MoveRefused::Hidden(r) | MoveRefused::Secret(r) => r.fmt(f),
        }
    }
}

/// A `[files]` / `[flow]` pattern as written in a file, before compiling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternEntry {
    pub pattern: String,
    pub line: usize,
}

/// The `[files]` table of one file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilesSection {
    pub deny_read: Vec<PatternEntry>,
    pub read_only: Vec<PatternEntry>,
    /// Exceptions to the deny-read rules: exact paths (see
    /// [`ReadException`]; only in the user's own files, never in a
    /// workspace's `.sandpen.toml`).
    pub allow_read: Vec<PatternEntry>,
    /// `defaults = false` drops the built-in rules (only in the user's own
    /// files, never in a workspace's `.sandpen.toml`).
    pub defaults: Option<bool>,
    /// `reserve = "2GiB"` or `"10%"` (only in the user's own files).
    pub reserve: Option<Reserve>,
}

/// The free space the file server keeps on the file system that holds the
/// sandbox's state: below it, the guest's writes through the share fail
/// with `ENOSPC`, so the guest can never starve sandpen's own writes (the
/// flow labels above all). See docs/files.md.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Reserve {
    /// 1 GiB, or 5 % of the file system when that is less (a small disk is
    /// not all reserve).
    #[default]
    Default,
    Bytes(u64),
    /// Per cent of the file system's size, 0 to 100.
    Percent(u8),
}

impl Reserve {
    pub const DEFAULT_BYTES: u64 = 1 << 30;
    pub const DEFAULT_PERCENT: u64 = 5;

    /// `1GiB`, `512M`, `4096` (bytes), `10%`, `0` (no reserve), `default`.
    pub fn parse(s: &str) -> Result<Reserve, String> {
        let t = s.trim();
        let bad = || {
            format!(
                "invalid reserve {s:?}: use a size such as 1GiB or 512M, a share of the disk such as 5%, or 0"
            )
        };
        if t == "default" {
            return Ok(Reserve::Default);
        }
        if let Some(p) = t.strip_suffix('%') {
            let n: u8 = p.trim().parse().map_err(|_| bad())?;
            if n > 100 {
                return Err(bad());
            }
            return Ok(Reserve::Percent(n));
        }
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(Reserve::Bytes).ok_or_else(bad)
    }

    /// The floor in bytes on a file system of `total` bytes.
    pub fn floor(self, total: u64) -> u64 {
        let pct = |p: u64| (total as u128 * p as u128 / 100) as u64;
        match self {
            Reserve::Default => Reserve::DEFAULT_BYTES.min(pct(Reserve::DEFAULT_PERCENT)),
            Reserve::Bytes(b) => b,
            Reserve::Percent(p) => pct(u64::from(p)),
        }
    }
}

impl fmt::Display for Reserve {
    /// What [`Reserve::parse`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reserve::Default => f.write_str("default"),
            Reserve::Bytes(b) => write!(f, "{b}"),
            Reserve::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// The `[flow]` table of one file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlowSection {
    pub secret: Vec<PatternEntry>,
    pub trusted_sinks: Vec<crate::Target>,
    pub trusted: Vec<crate::Target>,
}

impl FlowSection {
    pub fn is_empty(&self) -> bool {
        self.secret.is_empty() && self.trusted_sinks.is_empty() && self.trusted.is_empty()
    }
}

/// The file rules of a sandbox's shares, from the defaults and the
/// `[files]`/`[flow]` tables of the given files (in order: global, sandbox,
/// workspace). `home` adds [`HOME_DENY_READ`] to the defaults (a share is a
/// home folder or holds one). Patterns were checked when the files were
/// parsed, so this cannot fail on them.
pub fn compile(
    sections: &[(&Path, &FilesSection, &FlowSection)],
    home: bool,
) -> Result<FileRules, PatternError> {
    let defaults = sections
        .iter()
        .filter_map(|(_, f, _)| f.defaults)
        .next_back()
        .unwrap_or(true);
    let mut rules = FileRules::default().with_git_guard(defaults);
    if defaults {
        let home_list = if home { HOME_DENY_READ } else { &[] };
        for p in DEFAULT_DENY_READ.iter().chain(home_list) {
            rules.push(PathRule::with_case(
                FileRuleKind::DenyRead,
                p,
                FileRuleSource::Default,
                true,
            )?);
        }
        for p in DEFAULT_READ_ONLY {
            rules.push(PathRule::new(
                FileRuleKind::ReadOnly,
                p,
                FileRuleSource::Default,
            )?);
        }
    }
    for (path, files, flow) in sections {
        let src = |line| FileRuleSource::File {
            path: path.to_path_buf(),
            line,
        };
        for (kind, list) in [
            (FileRuleKind::DenyRead, &files.deny_read),
            (FileRuleKind::ReadOnly, &files.read_only),
            (FileRuleKind::Secret, &flow.secret),
        ] {
            for e in list {
                rules.push(PathRule::new(kind, &e.pattern, src(e.line))?);
            }
        }
        for e in &files.allow_read {
            let path = exception_path(&e.pattern).map_err(|x| PatternError {
                pattern: x.path,
                why: x.why.to_string(),
            })?;
            rules.push_read_exception(path, src(e.line));
        }
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(deny: &[&str], ro: &[&str], secret: &[&str]) -> FileRules {
        let mk = |k, p: &&str| PathRule::new(k, p, FileRuleSource::Text("test".into())).unwrap();
        FileRules::new(
            deny.iter()
                .map(|p| mk(FileRuleKind::DenyRead, p))
                .chain(ro.iter().map(|p| mk(FileRuleKind::ReadOnly, p)))
                .chain(secret.iter().map(|p| mk(FileRuleKind::Secret, p))),
        )
    }

    fn defaults() -> FileRules {
        compile(&[], false).unwrap()
    }

    #[test]
    fn defaults_hide_secrets_at_any_depth() {
        let r = defaults();
        for p in [
            ".env",
            ".env.local",
            "a/b/.env",
            "cert.pem",
            "deep/x/server.key",
            "id_rsa",
            "home/.ssh/id_rsa.pub",
            "id_ed25519",
            ".env/inside",
            // Without regard to case.
            ".ENV",
            "KEY.PEM",
            "a/Server.Key",
            ".Env.Local",
            "ID_RSA",
            // The wider list.
            "id_ecdsa",
            "x/id_ecdsa.pub",
            "id_dsa",
            ".netrc",
            "sub/.npmrc",
            ".pypirc",
            ".git-credentials",
            "cert.p12",
            "CERT.PFX",
            ".envrc",
            "a/.ENVRC",
        ] {
            assert!(r.hidden(Path::new(p)).is_some(), "{p} should be hidden");
        }
        for p in [
            "",
            "env",
            "src/main.rs",
            "pem",
            "x.pem.txt",
            "keys/k",
            "npmrc",
            "p12",
            ".ssh/config",
            ".aws/credentials",
        ] {
            assert!(r.hidden(Path::new(p)).is_none(), "{p} should be visible");
        }
    }

    #[test]
    fn reserves_parse_and_give_a_floor() {
        const G: u64 = 1 << 30;
        assert_eq!(Reserve::parse("1GiB").unwrap(), Reserve::Bytes(G));
        assert_eq!(Reserve::parse("512M").unwrap(), Reserve::Bytes(512 << 20));
        assert_eq!(Reserve::parse("0").unwrap(), Reserve::Bytes(0));
        assert_eq!(Reserve::parse("10%").unwrap(), Reserve::Percent(10));
        assert_eq!(Reserve::parse("default").unwrap(), Reserve::Default);
        for bad in ["", "lots", "101%", "-1", "5 parsecs", "99999999999T"] {
            assert!(Reserve::parse(bad).is_err(), "{bad:?}");
        }
        for r in [Reserve::Bytes(4096), Reserve::Percent(7), Reserve::Default] {
            assert_eq!(Reserve::parse(&r.to_string()).unwrap(), r);
        }
        // The default: 1 GiB, or 5 % when that is less.
        assert_eq!(Reserve::Default.floor(100 * G), G);
        assert_eq!(Reserve::Default.floor(10 * G), G / 2);
        assert_eq!(Reserve::Default.floor(256 << 20), (256 << 20) / 20);
        assert_eq!(Reserve::Percent(10).floor(100 * G), 10 * G);
        assert_eq!(Reserve::Bytes(5).floor(0), 5);
    }

    #[test]
    fn user_patterns_keep_their_case() {
        let r = rules(&["Secrets/**"], &[], &["token.txt"]);
        assert!(r.hidden(Path::new("Secrets/a")).is_some());
        assert!(r.hidden(Path::new("secrets/a")).is_none());
        assert!(r.secret(Path::new("TOKEN.TXT")).is_none());
    }

    #[test]
    fn a_home_in_the_share_adds_its_credential_stores() {
        let home = [
            ".ssh/id_rsa_work",
            ".ssh/config",
            ".aws/credentials",
            ".config/gh/hosts.yml",
            ".docker/config.json",
            ".kube/config",
            ".gnupg/private-keys-v1.d/x.key",
            ".netrc",
            ".git-credentials",
        ];
        let with = compile(&[], true).unwrap();
        let without = compile(&[], false).unwrap();
        for base in ["", "alice/", "home/bob/"] {
            for p in home {
                let p = format!("{base}{p}");
                assert!(with.hidden(Path::new(&p)).is_some(), "{p} should be hidden");
            }
        }
        for p in [
            ".ssh/config",
            ".aws/credentials",
            ".kube/config",
            ".config/gh/hosts.yml",
        ] {
            assert!(
                without.hidden(Path::new(p)).is_none(),
                "{p}: no home, no rule"
            );
        }
        for p in [".config/other", ".docker/daemon.json", "src/ssh.rs"] {
            assert!(with.hidden(Path::new(p)).is_none(), "{p} should be visible");
        }
        // `defaults = false` drops them too.
        let files = FilesSection {
            defaults: Some(false),
            ..Default::default()
        };
        let flow = FlowSection::default();
        let none = compile(&[(Path::new("/c/policy.toml"), &files, &flow)], true).unwrap();
        assert!(none.hidden(Path::new(".ssh/id_rsa")).is_none());
    }

    #[test]
    fn defaults_protect_git_metadata_at_any_depth() {
        let r = defaults();
        for p in [
            ".git/hooks/pre-commit",
            ".git/config",
            ".git/info/exclude",
            ".sandpen.toml",
            "sub/.git/config",
            "a/b/.git/hooks/post-checkout",
            "sub/.git/commondir",
            ".git/objects/info/alternates",
            ".git/modules/lib/config",
            ".git/modules/lib/hooks/pre-commit",
            ".git/modules/a/modules/b/config",
            ".git/worktrees/wt/HEAD",
            ".git/worktrees/wt/config.worktree",
            "x/.git/modules/m/info/attributes",
        ] {
            assert!(r.writable(Path::new(p)).is_err(), "{p} should be read-only");
        }
        for p in [
            ".git/HEAD",
            ".git/index",
            ".git/objects/ab/cd",
            ".git/objects/info/packs",
            ".git/refs/heads/main",
            ".git/modules/lib/index",
            "sub/.git/index",
            "src/a.rs",
            ".git/hooks",
            "config",
        ] {
            assert!(r.writable(Path::new(p)).is_ok(), "{p} should be writable");
        }
        let (dir, link, file) = (EntryKind::Dir, EntryKind::Symlink, EntryKind::File);
        // A gitfile is neither made nor changed; a folder `.git` is ordinary.
        for p in [".git", "sub/.git"] {
            assert!(r.creatable_entry(Path::new(p), file).is_err(), "{p}");
            assert!(r.writable_entry(Path::new(p), file).is_err(), "{p}");
            assert!(r.creatable_entry(Path::new(p), dir).is_ok(), "{p}");
        }
        // No symlink at or below a `.git` folder.
        for p in [
            ".git",
            ".git/hooks",
            "sub/.git/refs/heads/x",
            ".git/objects/x",
        ] {
            assert!(r.creatable_entry(Path::new(p), link).is_err(), "{p}");
        }
        assert!(r.creatable_entry(Path::new("src/l"), link).is_ok());
        assert!(r.creatable_entry(Path::new("src/.gitignore"), file).is_ok());
        let no_defaults = rules(&[], &[], &[]);
        assert!(no_defaults.creatable_entry(Path::new(".git"), file).is_ok());
    }

    /// Moving a folder (or a folder above it) would move what a rule covers.
    #[test]
    fn a_rename_never_takes_anything_out_from_under_a_rule() {
        let mut r = rules(
            &["private/**", "**/vault/**"],
            &["ci/*.yml"],
            &["secrets/**", "**/keys/**"],
        )
        .with_git_guard(true);
        for p in DEFAULT_READ_ONLY {
            r.push(PathRule::new(FileRuleKind::ReadOnly, p, FileRuleSource::Default).unwrap());
        }
        let (dir, file, link) = (EntryKind::Dir, EntryKind::File, EntryKind::Symlink);
        let refused =
            |from: &str, to: &str, kind| r.rename(Path::new(from), Path::new(to), kind).is_err();
        for (from, to, what) in [
            ("private", "p2", "deny_read parent"),
            ("x/vault", "x/v2", "deny_read ** parent"),
            ("secrets", "s2", "secret parent"),
            ("x/keys", "x/k2", "secret ** parent"),
            ("ci", "c2", "read_only parent"),
            (".git", "g", "git folder"),
            ("sub/.git", "sub/g", "nested git folder"),
            (".git/hooks", ".git/h", "hooks folder"),
            (".git/modules", ".git/m", "modules folder"),
            (
                "sub/.git/modules/lib",
                "sub/.git/lib",
                "a submodule's git folder",
            ),
            ("evil", ".git", "a folder becoming .git"),
            ("evil", "sub/.git", "a folder becoming a nested .git"),
            ("evil", ".git/hooks", "a folder becoming hooks"),
            ("evil", ".git/refs/x", "a folder moving into .git"),
            (".git/refs", "refs", "a folder moving out of .git"),
        ] {
            assert!(refused(from, to, dir), "{what}: {from} -> {to}");
        }
        // The grandparent: everything above a rule's match.
        let mut r2 = rules(&["a/b/private/**"], &[], &[]);
        r2.push(PathRule::new(FileRuleKind::DenyRead, "*.pem", FileRuleSource::Default).unwrap());
        assert!(r2.rename(Path::new("a"), Path::new("z"), dir).is_err());
        assert!(r2.rename(Path::new("a/b"), Path::new("a/c"), dir).is_err());
        assert!(r2.rename(Path::new("q"), Path::new("z"), dir).is_ok());
        for (from, to, kind, what) in [
            ("secrets/token", "plain", file, "a secret file"),
            ("x/keys/id", "x/id", file, "a secret file under **"),
            ("src/x", ".git", file, "a gitfile"),
            ("src/l", ".git/hooks", link, "a symlink into .git"),
            (".git/config", ".git/c2", file, "a read-only file"),
        ] {
            assert!(refused(from, to, kind), "{what}: {from} -> {to}");
        }
        // What git and ordinary work do still moves.
        for (from, to, kind) in [
            ("src", "src2", dir),
            ("sub", "sub2", dir),
            ("sub/.git", "other/.git", dir),
            ("x/vault/a", "x/vault/b", dir),
            ("secrets/a", "secrets/b", dir),
            ("docs", "secrets/docs", dir),
            (".git/index.lock", ".git/index", file),
            (".git/refs/heads/a.lock", ".git/refs/heads/a", file),
            (".git/rebase-merge", ".git/rebase-apply", dir),
            (".git/objects/tmp", ".git/objects/ab", dir),
            ("a.txt", "b.txt", file),
            ("src/l", "src/m", link),
        ] {
            assert!(
                r.rename(Path::new(from), Path::new(to), kind).is_ok(),
                "{from} -> {to}: {}",
                r.rename(Path::new(from), Path::new(to), kind).unwrap_err()
            );
        }
    }

    #[test]
    fn a_slash_inside_braces_is_refused() {
        let e = PathRule::new(
            FileRuleKind::ReadOnly,
            "{a/b,c}/x",
            FileRuleSource::Text("t".into()),
        )
        .unwrap_err();
        assert!(e.why.contains("one pattern per alternative"), "{e}");
        assert!(PathRule::new(
            FileRuleKind::ReadOnly,
            "{a,b}/[xy]*/z",
            FileRuleSource::Text("t".into())
        )
        .is_ok());
    }

    #[test]
    fn a_read_only_share_refuses_every_change() {
        let r = rules(&[], &[], &[]).with_all_read_only(true);
        assert!(matches!(r.writable(Path::new("a")), Err(ReadOnlyBy::Share)));
        assert!(r.hidden(Path::new("a")).is_none());
    }

    #[test]
    fn bad_patterns_are_errors() {
        for p in ["", "/", "a/../b", "./", "a/[b"] {
            assert!(
                PathRule::new(
                    FileRuleKind::DenyRead,
                    p,
                    FileRuleSource::Text("test".into())
                )
                .is_err(),
                "{p:?}"
            );
        }
    }

    #[test]
    fn user_files_can_drop_defaults_and_add_rules() {
        let files = FilesSection {
            deny_read: vec![PatternEntry {
                pattern: "secrets/**".into(),
                line: 3,
            }],
            read_only: vec![],
            allow_read: vec![],
            defaults: Some(false),
            reserve: None,
        };
        let flow = FlowSection::default();
        let r = compile(&[(Path::new("/c/policy.toml"), &files, &flow)], true).unwrap();
        assert!(r.hidden(Path::new(".env")).is_none());
        let hit = r.hidden(Path::new("secrets/a")).unwrap();
        assert_eq!(hit.to_string(), "deny_read secrets/** (/c/policy.toml:3)");
        assert_eq!(r.summary(), "deny-read secrets/**; read-only -");
    }
}
