//! Policy files: TOML, loaded strictly, edited in place.
//!
//! ```toml
//! # The global file is $XDG_CONFIG_HOME/sandpen/policy.toml; a sandbox's file
//! # has the same format. Every key is optional.
//! mode = "enforce"          # enforce | learn | ask
//! preset = "balanced"       # deny-all | balanced | allow-all
//! ask_timeout = 120         # ask mode: seconds a connection waits for an answer
//!
//! [[network]]
//! id = 1                    # stable; `sandpen policy` writes it
//! action = "allow"          # allow | deny
//! target = "*.example.org:443"
//!
//! [[network]]
//! id = 2
//! action = "deny"
//! target = "evil.example"
//! ```
//!
//! - A sandbox file's `mode` and `preset` override the global file's. With no
//!   `preset` anywhere, the preset is `deny-all`. Rules of both files apply.
//! - `id` is unique within a file. A hand-written table without `id` gets the
//!   next free id after the file's largest, in file order.
//! - Anything else is an error that names the file, line and column: a TOML
//!   syntax error, an unknown key, a wrong type, a bad target, a duplicate id.
//!   A file that cannot be read as a policy is never treated as empty.
//! - Edits ([`PolicyFile::add_rule`], [`PolicyFile::remove_rule`],
//!   [`PolicyFile::set_mode`], [`PolicyFile::init_preset`]) go through
//!   `toml_edit`, so comments, order and formatting survive; [`PolicyFile::save`]
//!   writes atomically.

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml_edit::{value, ArrayOfTables, Document, DocumentMut, Item, Table};

use crate::files::{
    FileRuleKind, FileRuleSource, FilesSection, FlowSection, PathRule, PatternEntry, Reserve,
};
use crate::{Action, Mode, Preset, Rule, RuleSource, Scope, Target, TargetError};

/// Errors from loading, editing or saving a policy file.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file is not a valid policy; `line` and `column` count from 1.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("cannot read policy file {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write policy file {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("{}: no network rule with id {id}", path.display())]
    NoSuchRule { path: PathBuf, id: u32 },
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    ExceptionPath(#[from] crate::files::ExceptionPathError),
}

/// The global policy file: `$XDG_CONFIG_HOME/sandpen/policy.toml`, or
/// `$HOME/.config/sandpen/policy.toml`. `None` when neither variable is set.
pub fn global_policy_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        })?;
    Some(base.join("sandpen").join("policy.toml"))
}

const NEW_FILE_HEADER: &str = "\
# sandpen network policy. Format: docs/policy.md.
# Edit by hand or with `sandpen policy allow|deny|rm|mode|init`.
";

/// One policy file, parsed and validated, with its text kept for edits.
#[derive(Debug, Clone)]
pub struct PolicyFile {
    path: PathBuf,
    scope: Scope,
    text: String,
    mode: Option<Mode>,
    preset: Option<Preset>,
    ask_timeout: Option<u64>,
    rules: Vec<Rule>,
    files: FilesSection,
    flow: FlowSection,
}

/// Line and column (from 1) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// A `[[network]]` table before ids are assigned.
struct Entry {
    /// The explicit id and the span of its value.
    id: Option<(u32, Option<Range<usize>>)>,
    action: Action,
    target: Target,
    line: usize,
}

struct Checker<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Checker<'_> {
    fn err(&self, span: Option<Range<usize>>, message: impl Into<String>) -> PolicyError {
        let (line, column) = line_col(self.text, span.map_or(0, |s| s.start));
        PolicyError::Invalid {
            path: self.path.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }

    fn string<'i>(&self, item: &'i Item, what: &str) -> Result<&'i str, PolicyError> {
        item.as_str()
            .ok_or_else(|| self.err(item.span(), format!("`{what}` must be a string")))
    }

    /// An array of strings, each with its span.
    fn strings(&self, item: &Item, what: &str) -> Result<Vec<(String, usize)>, PolicyError> {
        let arr = item.as_array().ok_or_else(|| {
            self.err(item.span(), format!("`{what}` must be an array of strings"))
        })?;
        let mut out = Vec::new();
        for v in arr.iter() {
            let s = v.as_str().ok_or_else(|| {
                self.err(v.span(), format!("`{what}` must be an array of strings"))
            })?;
            let span = v.span();
            out.push((s.to_string(), span.map_or(0, |s| s.start)));
        }
        Ok(out)
    }

    fn patterns(
        &self,
        item: &Item,
        what: &str,
        kind: FileRuleKind,
    ) -> Result<Vec<PatternEntry>, PolicyError> {
        let mut out = Vec::new();
        for (pattern, at) in self.strings(item, what)? {
            let (line, column) = line_col(self.text, at);
            PathRule::new(kind, &pattern, FileRuleSource::Default).map_err(|e| {
                PolicyError::Invalid {
                    path: self.path.to_path_buf(),
                    line,
                    column,
                    message: e.to_string(),
                }
            })?;
            out.push(PatternEntry { pattern, line });
        }
        Ok(out)
    }

    fn table<'i>(
        &self,
        item: &'i Item,
        key_span: Option<Range<usize>>,
        name: &str,
    ) -> Result<&'i dyn toml_edit::TableLike, PolicyError> {
        item.as_table_like()
            .ok_or_else(|| self.err(key_span, format!("`{name}` must be a table ([{name}])")))
    }

    /// `[files]`: `deny_read`, `read_only`, and (in the user's own files
    /// only) `defaults`.
    pub(crate) fn files_table(
        &self,
        item: &Item,
        key_span: Option<Range<usize>>,
        allow_defaults: bool,
    ) -> Result<FilesSection, PolicyError> {
        let t = self.table(item, key_span, "files")?;
        let mut files = FilesSection::default();
        for (key, v) in t.iter() {
            let span = t.key(key).and_then(|k| k.span()).or_else(|| v.span());
            match key {
                "deny_read" => files.deny_read = self.patterns(v, key, FileRuleKind::DenyRead)?,
                "read_only" => files.read_only = self.patterns(v, key, FileRuleKind::ReadOnly)?,
                "allow_read" if allow_defaults => {
                    for (path, at) in self.strings(v, key)? {
                        let (line, column) = line_col(self.text, at);
                        crate::files::exception_path(&path).map_err(|e| {
                            PolicyError::Invalid {
                                path: self.path.to_path_buf(),
                                line,
                                column,
                                message: e.to_string(),
                            }
                        })?;
                        files.allow_read.push(PatternEntry {
                            pattern: path,
                            line,
                        });
                    }
                }
                "allow_read" => {
                    return Err(self.err(
                        span,
                        "a workspace file cannot make exceptions to the file rules; \
                         only your own policy can (`sandpen policy approve ID --always` on a file request)",
                    ))
                }
                "defaults" if allow_defaults => {
                    files.defaults =
                        Some(v.as_bool().ok_or_else(|| {
                            self.err(v.span(), "`defaults` must be true or false")
                        })?)
                }
                "defaults" => {
                    return Err(self.err(
                        span,
                        "a workspace file cannot drop the default file rules; \
                         only your own policy (sandpen policy files) can",
                    ))
                }
                "reserve" if allow_defaults => {
                    let text = self.string(v, "reserve")?;
                    files.reserve =
                        Some(Reserve::parse(text).map_err(|why| self.err(v.span(), why))?);
                }
                "reserve" => {
                    return Err(self.err(
                        span,
                        "a workspace file cannot set the disk reserve; only your own policy can",
                    ))
                }
                other => {
                    return Err(self.err(
                        span,
                        format!(
                            "unknown key `{other}` in [files] (expected deny_read, read_only{})",
                            if allow_defaults {
                                ", allow_read, defaults, reserve"
                            } else {
                                ""
                            }
                        ),
                    ))
                }
            }
        }
        Ok(files)
    }

    /// `[flow]`: `secret` (path patterns), `trusted_sinks` and `trusted`
    /// (network targets).
    pub(crate) fn flow_table(
        &self,
        item: &Item,
        key_span: Option<Range<usize>>,
    ) -> Result<FlowSection, PolicyError> {
        let t = self.table(item, key_span, "flow")?;
        let mut flow = FlowSection::default();
        for (key, v) in t.iter() {
            let span = t.key(key).and_then(|k| k.span()).or_else(|| v.span());
            match key {
                "secret" => flow.secret = self.patterns(v, key, FileRuleKind::Secret)?,
                "trusted_sinks" | "trusted" => {
                    let mut targets = Vec::new();
                    for (s, at) in self.strings(v, key)? {
                        let target = Target::parse(&s).map_err(|e| {
                            let (line, column) = line_col(self.text, at);
                            PolicyError::Invalid {
                                path: self.path.to_path_buf(),
                                line,
                                column,
                                message: e.to_string(),
                            }
                        })?;
                        targets.push(target);
                    }
                    if key == "trusted" {
                        flow.trusted = targets;
                    } else {
                        flow.trusted_sinks = targets;
                    }
                }
                other => {
                    return Err(self.err(
                        span,
                        format!(
                        "unknown key `{other}` in [flow] (expected secret, trusted_sinks, trusted)"
                    ),
                    ))
                }
            }
        }
        Ok(flow)
    }
}

/// A workspace's `.sandpen.toml`: `[files]`, `[flow]` and `[[network]]`.
/// It comes with the repository, so it is untrusted: what in it narrows
/// (deny-read, read-only, `flow.secret`, deny rules) always applies, what
/// widens (`flow.trusted_sinks`, `flow.trusted`, allow rules) only once the
/// user trusted this very text (its [`sha256`](Self::sha256)); see
/// [`Policy::with_workspace`](crate::Policy::with_workspace).
#[derive(Debug, Clone, Default)]
pub struct WorkspaceFile {
    pub path: PathBuf,
    pub files: FilesSection,
    pub flow: FlowSection,
    /// `[[network]]` rules, in scope [`Scope::Workspace`].
    pub network: Vec<Rule>,
    /// Hex SHA-256 of the file's bytes as read.
    pub sha256: String,
}

impl WorkspaceFile {
    /// Read `.sandpen.toml` in `workspace`; `None` when there is none.
    pub fn load(workspace: &Path) -> Result<Option<WorkspaceFile>, PolicyError> {
        let path = workspace.join(crate::files::WORKSPACE_FILE);
        // The workspace is the guest's to write: read it without following a
        // symlink to some other file of the host user's.
        let text = match read_no_follow(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(PolicyError::Read { path, source }),
        };
        WorkspaceFile::parse(&text, &path).map(Some)
    }

    pub fn parse(text: &str, path: &Path) -> Result<WorkspaceFile, PolicyError> {
        let ck = Checker { path, text };
        let doc = Document::parse(text).map_err(|e| ck.err(e.span(), e.message().trim()))?;
        let mut out = WorkspaceFile {
            path: path.to_path_buf(),
            sha256: sha256_hex(text.as_bytes()),
            ..Default::default()
        };
        let mut entries = Vec::new();
        for (key, item) in doc.iter() {
            let key_span = doc.key(key).and_then(|k| k.span()).or_else(|| item.span());
            match key {
                "files" => out.files = ck.files_table(item, key_span, false)?,
                "flow" => out.flow = ck.flow_table(item, key_span)?,
                "network" => {
                    let Some(tables) = item.as_array_of_tables() else {
                        return Err(
                            ck.err(key_span, "`network` must be written as [[network]] tables")
                        );
                    };
                    for table in tables.iter() {
                        entries.push(PolicyFile::check_rule(&ck, table)?);
                    }
                }
                other => {
                    return Err(ck.err(
                        key_span,
                        format!(
                            "unknown key `{other}` in a workspace file (expected [files], [flow] or [[network]])"
                        ),
                    ))
                }
            }
        }
        out.network = assign_ids(&ck, entries, Scope::Workspace)?;
        Ok(out)
    }
}

/// Rules with their ids: explicit ones must be unique, the others get the
/// next free one after the file's largest, in file order.
fn assign_ids(
    ck: &Checker<'_>,
    entries: Vec<Entry>,
    scope: Scope,
) -> Result<Vec<Rule>, PolicyError> {
    let mut used: Vec<u32> = Vec::new();
    for entry in &entries {
        if let Some((id, span)) = &entry.id {
            if used.contains(id) {
                return Err(ck.err(span.clone(), format!("duplicate rule id {id}")));
            }
            used.push(*id);
        }
    }
    let mut next = used.iter().copied().max().unwrap_or(0);
    let mut rules = Vec::with_capacity(entries.len());
    for Entry {
        id,
        action,
        target,
        line,
    } in entries
    {
        let id = match id {
            Some((id, _)) => id,
            None => {
                next = next
                    .checked_add(1)
                    .ok_or_else(|| ck.err(None, "rule ids are exhausted; renumber the file"))?;
                next
            }
        };
        rules.push(Rule {
            id,
            scope,
            action,
            target,
            source: RuleSource::File {
                path: ck.path.to_path_buf(),
                line,
            },
        });
    }
    Ok(rules)
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn read_no_follow(path: &Path) -> io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    let mut text = String::new();
    f.by_ref().take(1 << 20).read_to_string(&mut text)?;
    Ok(text)
}

impl PolicyFile {
    /// Read and validate `path`. A missing file is an empty policy file (that
    /// `save` will create); an unreadable or invalid one is an error.
    pub fn load(path: &Path, scope: Scope) -> Result<PolicyFile, PolicyError> {
        match std::fs::read_to_string(path) {
            Ok(text) => PolicyFile::parse(text, path, scope),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(PolicyFile::empty(path, scope)),
            Err(source) => Err(PolicyError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// A file with no settings and no rules, not yet on disk.
    pub fn empty(path: &Path, scope: Scope) -> PolicyFile {
        PolicyFile {
            path: path.to_path_buf(),
            scope,
            text: NEW_FILE_HEADER.to_string(),
            mode: None,
            preset: None,
            ask_timeout: None,
            rules: Vec::new(),
            files: FilesSection::default(),
            flow: FlowSection::default(),
        }
    }

    /// Validate `text` as the contents of `path`.
    pub fn parse(text: String, path: &Path, scope: Scope) -> Result<PolicyFile, PolicyError> {
        let ck = Checker { path, text: &text };
        let doc =
            Document::parse(text.as_str()).map_err(|e| ck.err(e.span(), e.message().trim()))?;
        let mut mode = None;
        let mut preset = None;
        let mut ask_timeout = None;
        let mut entries: Vec<Entry> = Vec::new();
        let mut files = FilesSection::default();
        let mut flow = FlowSection::default();
        for (key, item) in doc.iter() {
            let key_span = doc.key(key).and_then(|k| k.span()).or_else(|| item.span());
            match key {
                "mode" => {
                    let s = ck.string(item, "mode")?;
                    mode = Some(Mode::parse(s).ok_or_else(|| {
                        ck.err(
                            item.span(),
                            format!("unknown mode `{s}` (expected enforce, learn or ask)"),
                        )
                    })?);
                }
                "preset" => {
                    let s = ck.string(item, "preset")?;
                    preset = Some(Preset::parse(s).ok_or_else(|| {
                        ck.err(
                            item.span(),
                            format!(
                                "unknown preset `{s}` (expected deny-all, balanced or allow-all)"
                            ),
                        )
                    })?);
                }
                "ask_timeout" => {
                    let n = item
                        .as_integer()
                        .filter(|n| (1..=MAX_ASK_TIMEOUT as i64).contains(n))
                        .ok_or_else(|| {
                            ck.err(
                                item.span(),
                                format!(
                                    "`ask_timeout` must be a number of seconds from 1 to {MAX_ASK_TIMEOUT}"
                                ),
                            )
                        })?;
                    ask_timeout = Some(n as u64);
                }
                "network" => {
                    let Some(tables) = item.as_array_of_tables() else {
                        return Err(
                            ck.err(key_span, "`network` must be written as [[network]] tables")
                        );
                    };
                    for table in tables.iter() {
                        entries.push(Self::check_rule(&ck, table)?);
                    }
                }
                "files" => files = ck.files_table(item, key_span, true)?,
                "flow" => flow = ck.flow_table(item, key_span)?,
                other => {
                    return Err(ck.err(
                        key_span,
                        format!(
                            "unknown key `{other}` (expected mode, preset, ask_timeout, [[network]], [files] or [flow])"
                        ),
                    ))
                }
            }
        }

        let rules = assign_ids(&ck, entries, scope)?;
        drop(doc);
        Ok(PolicyFile {
            path: path.to_path_buf(),
            scope,
            text,
            mode,
            preset,
            ask_timeout,
            rules,
            files,
            flow,
        })
    }

    fn check_rule(ck: &Checker<'_>, table: &Table) -> Result<Entry, PolicyError> {
        let line = line_col(ck.text, table.span().map_or(0, |s| s.start)).0;
        let mut id = None;
        let mut action = None;
        let mut target = None;
        for (key, item) in table.iter() {
            let key_span = table
                .key(key)
                .and_then(|k| k.span())
                .or_else(|| item.span());
            match key {
                "id" => {
                    let n = item
                        .as_integer()
                        .and_then(|n| u32::try_from(n).ok())
                        .filter(|n| *n > 0)
                        .ok_or_else(|| ck.err(item.span(), "`id` must be a positive integer"))?;
                    id = Some((n, item.span()));
                }
                "action" => {
                    let s = ck.string(item, "action")?;
                    action = Some(match s {
                        "allow" => Action::Allow,
                        "deny" => Action::Deny,
                        _ => {
                            return Err(ck.err(
                                item.span(),
                                format!("unknown action `{s}` (expected allow or deny)"),
                            ))
                        }
                    });
                }
                "target" => {
                    let s = ck.string(item, "target")?;
                    target =
                        Some(Target::parse(s).map_err(|e| ck.err(item.span(), e.to_string()))?);
                }
                other => {
                    return Err(ck.err(
                        key_span,
                        format!(
                            "unknown key `{other}` in [[network]] (expected id, action, target)"
                        ),
                    ))
                }
            }
        }
        let at = table.span();
        let action =
            action.ok_or_else(|| ck.err(at.clone(), "[[network]] rule without `action`"))?;
        let target = target.ok_or_else(|| ck.err(at, "[[network]] rule without `target`"))?;
        Ok(Entry {
            id,
            action,
            target,
            line,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn scope(&self) -> Scope {
        self.scope
    }

    pub fn mode(&self) -> Option<Mode> {
        self.mode
    }

    pub fn preset(&self) -> Option<Preset> {
        self.preset
    }

    /// `ask_timeout`: how long, in seconds, ask mode holds a connection.
    pub fn ask_timeout(&self) -> Option<u64> {
        self.ask_timeout
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The `[files]` table.
    pub fn files(&self) -> &FilesSection {
        &self.files
    }

    /// The `[flow]` table.
    pub fn flow(&self) -> &FlowSection {
        &self.flow
    }

    /// The file's text, with all edits so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    fn edit(&mut self, f: impl FnOnce(&mut DocumentMut)) -> Result<(), PolicyError> {
        let mut doc: DocumentMut = self.text.parse().map_err(|e: toml_edit::TomlError| {
            Checker {
                path: &self.path,
                text: &self.text,
            }
            .err(e.span(), e.message().trim())
        })?;
        // Write the ids of hand-written rules that have none, so that later
        // edits cannot renumber them.
        if let Some(tables) = doc
            .get_mut("network")
            .and_then(|i| i.as_array_of_tables_mut())
        {
            for (table, rule) in tables.iter_mut().zip(&self.rules) {
                if !table.contains_key("id") {
                    table.insert("id", value(i64::from(rule.id)));
                }
            }
        }
        // A comment-only file keeps its comments at the top.
        let header = if doc.is_empty() {
            let h = doc.trailing().as_str().unwrap_or_default().to_string();
            doc.set_trailing("");
            h
        } else {
            String::new()
        };
        f(&mut doc);
        let text = format!("{header}{doc}");
        *self = PolicyFile::parse(text, &self.path, self.scope)?;
        Ok(())
    }

    /// Append a rule (in memory; call [`save`](Self::save)). If the same
    /// action and target is already in the file, that rule is returned and
    /// nothing is added.
    pub fn add_rule(&mut self, action: Action, target: &str) -> Result<Rule, PolicyError> {
        let target = Target::parse(target)?;
        if let Some(r) = self
            .rules
            .iter()
            .find(|r| r.action == action && r.target == target)
        {
            return Ok(r.clone());
        }
        let id = self.rules.iter().map(|r| r.id).max().unwrap_or(0) + 1;
        let text = target.to_string();
        self.edit(|doc| {
            let mut t = Table::new();
            t.insert("id", value(i64::from(id)));
            t.insert("action", value(action.as_str()));
            t.insert("target", value(text));
            let entry = doc
                .entry("network")
                .or_insert(Item::ArrayOfTables(ArrayOfTables::new()));
            if let Some(a) = entry.as_array_of_tables_mut() {
                a.push(t);
            }
        })?;
        self.rules
            .iter()
            .find(|r| r.id == id)
            .cloned()
            .ok_or_else(|| PolicyError::NoSuchRule {
                path: self.path.clone(),
                id,
            })
    }

    /// Remove the rule with this id (in memory; call [`save`](Self::save)).
    pub fn remove_rule(&mut self, id: u32) -> Result<Rule, PolicyError> {
        let index =
            self.rules
                .iter()
                .position(|r| r.id == id)
                .ok_or_else(|| PolicyError::NoSuchRule {
                    path: self.path.clone(),
                    id,
                })?;
        let removed = self.rules[index].clone();
        // Rules are in file order, so the rule's index is its table's index.
        self.edit(|doc| {
            let now_empty = match doc
                .get_mut("network")
                .and_then(|i| i.as_array_of_tables_mut())
            {
                Some(a) => {
                    a.remove(index);
                    a.is_empty()
                }
                None => false,
            };
            if now_empty {
                doc.remove("network");
            }
        })?;
        Ok(removed)
    }

    /// Add `path` to `[files] allow_read` (in memory; call
    /// [`save`](Self::save)): an exception to the deny-read rules for that
    /// one path (see [`crate::files::ReadException`]). `false` when it is
    /// there already.
    pub fn add_read_exception(&mut self, path: &str) -> Result<bool, PolicyError> {
        crate::files::exception_path(path)?;
        if self.files.allow_read.iter().any(|e| e.pattern == path) {
            return Ok(false);
        }
        let path = path.to_string();
        self.edit(|doc| {
            let files = doc.entry("files").or_insert(Item::Table(Table::new()));
            if let Some(t) = files.as_table_like_mut() {
                let list = t
                    .entry("allow_read")
                    .or_insert(value(toml_edit::Array::new()));
                if let Some(a) = list.as_array_mut() {
                    a.push(path);
                }
            }
        })?;
        Ok(true)
    }

    /// Remove `path` from `[files] allow_read` (in memory); `false` when it
    /// was not there.
    pub fn remove_read_exception(&mut self, path: &str) -> Result<bool, PolicyError> {
        if !self.files.allow_read.iter().any(|e| e.pattern == path) {
            return Ok(false);
        }
        self.edit(|doc| {
            let Some(t) = doc.get_mut("files").and_then(|i| i.as_table_like_mut()) else {
                return;
            };
            let now_empty = match t.get_mut("allow_read").and_then(|i| i.as_array_mut()) {
                Some(a) => {
                    a.retain(|v| v.as_str() != Some(path));
                    a.is_empty()
                }
                None => false,
            };
            if now_empty {
                t.remove("allow_read");
            }
        })?;
        Ok(true)
    }

    /// Set `mode` (in memory; call [`save`](Self::save)).
    pub fn set_mode(&mut self, mode: Mode) -> Result<(), PolicyError> {
        self.edit(|doc| set_value(doc, "mode", mode.as_str()))
    }

    /// Remove `mode` (in memory): the global file's, or the default, applies.
    pub fn unset_mode(&mut self) -> Result<(), PolicyError> {
        self.edit(|doc| {
            doc.remove("mode");
        })
    }

    /// Remove `preset` (in memory): the global file's, or `deny-all`, applies.
    pub fn unset_preset(&mut self) -> Result<(), PolicyError> {
        self.edit(|doc| {
            doc.remove("preset");
        })
    }

    /// Set `preset` (in memory; call [`save`](Self::save)). Rules are kept.
    pub fn init_preset(&mut self, preset: Preset) -> Result<(), PolicyError> {
        self.edit(|doc| set_value(doc, "preset", preset.as_str()))
    }

    /// Write the file atomically and durably (`sandpen_fsutil::write_atomic`),
    /// creating its directory.
    pub fn save(&self) -> Result<(), PolicyError> {
        let werr = |source| PolicyError::Write {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(werr)?;
        }
        sandpen_fsutil::write_atomic(&self.path, self.text.as_bytes(), sandpen_fsutil::MODE_STATE)
            .map_err(werr)
    }
}

/// Set a top-level string, keeping its decor (comments) if it exists.
/// The longest `ask_timeout` a file may set: one day.
pub const MAX_ASK_TIMEOUT: u64 = 86_400;

fn set_value(doc: &mut DocumentMut, key: &str, v: &str) {
    match doc.get_mut(key).and_then(|i| i.as_value_mut()) {
        Some(old) => {
            let decor = old.decor().clone();
            *old = v.into();
            *old.decor_mut() = decor;
        }
        None => {
            doc.insert(key, value(v));
        }
    }
}
