//! The history of a policy: every change, who made it, when and why, and
//! how to undo it.
//!
//! One JSON object per line (`policy-history.jsonl`: a sandbox's in its own
//! state folder, the global file's beside the sandboxes). Append-only: a
//! change is never rewritten or removed, and an undo is a change of its own
//! that names the one it undoes. Each append rewrites the file with
//! `sandpen_fsutil::write_atomic`, so a crash leaves the old history or
//! the new one, never a torn line. Reason texts may come from the guest
//! (an agent's `sandpen-request`): they are stored as given and must be
//! shown as untrusted text.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::file::{PolicyError, PolicyFile};
use crate::{Action, Mode, Preset, Scope, Target};

/// Who made a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Who {
    /// A `sandpen policy` command.
    Cli,
    /// `policy approve --always` or `policy deny ID --always` (ask mode).
    Approval,
    /// `policy suggest --apply`.
    Suggestion,
    /// The web page.
    Web,
}

impl Who {
    pub fn as_str(self) -> &'static str {
        match self {
            Who::Cli => "cli",
            Who::Approval => "approval",
            Who::Suggestion => "suggestion",
            Who::Web => "web",
        }
    }
}

impl fmt::Display for Who {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What changed in one policy file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "op")]
pub enum Edit {
    AddRule {
        id: u32,
        action: Action,
        target: String,
    },
    RemoveRule {
        id: u32,
        action: Action,
        target: String,
    },
    SetMode {
        from: Option<Mode>,
        to: Mode,
    },
    SetPreset {
        from: Option<Preset>,
        to: Preset,
    },
    /// `[files] allow_read`: an exception to the deny-read rules for one
    /// path, relative to the shares' roots.
    AddReadException {
        path: String,
    },
    RemoveReadException {
        path: String,
    },
}

impl fmt::Display for Edit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_unset = |m: Option<&str>| m.unwrap_or("(unset)").to_string();
        match self {
            Edit::AddRule { id, action, target } => write!(f, "add rule {id}: {action} {target}"),
            Edit::RemoveRule { id, action, target } => {
                write!(f, "remove rule {id}: {action} {target}")
            }
            Edit::SetMode { from, to } => {
                write!(f, "mode {} -> {to}", or_unset(from.map(Mode::as_str)))
            }
            Edit::SetPreset { from, to } => write!(
                f,
                "preset {} -> {}",
                or_unset(from.map(Preset::as_str)),
                to.as_str()
            ),
            Edit::AddReadException { path } => write!(f, "add file exception: allow_read {path}"),
            Edit::RemoveReadException { path } => {
                write!(f, "remove file exception: allow_read {path}")
            }
        }
    }
}

/// One line of the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// 1, 2, ... within this history.
    pub n: u64,
    /// RFC 3339, UTC.
    pub time: String,
    pub who: Who,
    /// The policy file changed, and its scope.
    pub file: PathBuf,
    pub scope: Scope,
    pub edit: Edit,
    /// Why (the user's `--reason`, the approved request's first line, an
    /// agent's reason: untrusted when it came from the guest).
    #[serde(default)]
    pub reason: String,
    /// The change this one undoes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undoes: Option<u64>,
}

/// Why the history could not be read, written or undone.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a history record: {source}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: no change {n} (see `sandpen policy history`)")]
    NoSuchChange { path: PathBuf, n: u64 },
    #[error("change {n} was undone already by change {by}")]
    AlreadyUndone { n: u64, by: u64 },
    #[error("change {n} cannot be undone: {why}")]
    CannotUndo { n: u64, why: String },
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("encoding a history record: {0}")]
    Encode(#[source] serde_json::Error),
}

/// A history file.
#[derive(Debug, Clone)]
pub struct History {
    path: PathBuf,
}

/// The history file's name, in a sandbox's state folder (or, for the global
/// file, in the state folder of all sandboxes).
pub const HISTORY_FILE: &str = "policy-history.jsonl";

impl History {
    pub fn in_dir(dir: &Path) -> History {
        History {
            path: dir.join(HISTORY_FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every change, oldest first. A missing file is an empty history; a
    /// line that is not a record is an error naming it.
    pub fn read(&self) -> Result<Vec<Change>, HistoryError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(HistoryError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|source| HistoryError::Corrupt {
                    path: self.path.clone(),
                    line: i + 1,
                    source,
                })
            })
            .collect()
    }

    /// Append a change (its `n` is assigned here) and return it.
    pub fn append(
        &self,
        time: &str,
        who: Who,
        file: &PolicyFile,
        edit: Edit,
        reason: &str,
        undoes: Option<u64>,
    ) -> Result<Change, HistoryError> {
        let old = self.read()?;
        let change = Change {
            n: old.last().map_or(1, |c| c.n + 1),
            time: time.to_string(),
            who,
            file: file.path().to_path_buf(),
            scope: file.scope(),
            edit,
            reason: reason.to_string(),
            undoes,
        };
        let mut text = std::fs::read(&self.path).unwrap_or_default();
        if !text.is_empty() && !text.ends_with(b"\n") {
            text.push(b'\n');
        }
        text.extend(serde_json::to_vec(&change).map_err(HistoryError::Encode)?);
        text.push(b'\n');
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| HistoryError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        sandpen_fsutil::write_atomic(&self.path, &text, sandpen_fsutil::MODE_STATE).map_err(
            |source| HistoryError::Io {
                path: self.path.clone(),
                source,
            },
        )?;
        Ok(change)
    }

    /// Undo change `n`: apply its inverse to its policy file (saved) and
    /// record that as a change of its own by `who`. What the inverse is:
    /// an added rule is removed (if it is still there as added), a removed
    /// rule is added again (with a new id), a mode or preset goes back to
    /// what it was.
    pub fn undo(&self, n: u64, time: &str, who: Who) -> Result<Change, HistoryError> {
        let all = self.read()?;
        let change = all
            .iter()
            .find(|c| c.n == n)
            .ok_or_else(|| HistoryError::NoSuchChange {
                path: self.path.clone(),
                n,
            })?;
        if let Some(by) = all.iter().find(|c| c.undoes == Some(n)) {
            return Err(HistoryError::AlreadyUndone { n, by: by.n });
        }
        let mut file = PolicyFile::load(&change.file, change.scope)?;
        let inverse = match &change.edit {
            Edit::AddRule { id, action, target } => {
                let same = file.rules().iter().any(|r| {
                    r.id == *id
                        && r.action == *action
                        && Target::parse(target).ok().as_ref() == Some(&r.target)
                });
                if !same {
                    return Err(HistoryError::CannotUndo {
                        n,
                        why: format!(
                            "rule {id} ({action} {target}) is no longer in {}",
                            change.file.display()
                        ),
                    });
                }
                let r = file.remove_rule(*id)?;
                Edit::RemoveRule {
                    id: r.id,
                    action: r.action,
                    target: r.target.to_string(),
                }
            }
            Edit::RemoveRule { action, target, .. } => {
                let r = file.add_rule(*action, target)?;
                Edit::AddRule {
                    id: r.id,
                    action: r.action,
                    target: r.target.to_string(),
                }
            }
            Edit::SetMode { from, to } => {
                let now = file.mode();
                match from {
                    Some(m) => file.set_mode(*m)?,
                    None => file.unset_mode()?,
                }
                Edit::SetMode {
                    from: now.or(Some(*to)),
                    to: from.unwrap_or_default(),
                }
            }
            Edit::SetPreset { from, to } => {
                let now = file.preset();
                match from {
                    Some(p) => file.init_preset(*p)?,
                    None => file.unset_preset()?,
                }
                Edit::SetPreset {
                    from: now.or(Some(*to)),
                    to: from.unwrap_or_default(),
                }
            }
            Edit::AddReadException { path } => {
                if !file.remove_read_exception(path)? {
                    return Err(HistoryError::CannotUndo {
                        n,
                        why: format!(
                            "allow_read {path} is no longer in {}",
                            change.file.display()
                        ),
                    });
                }
                Edit::RemoveReadException { path: path.clone() }
            }
            Edit::RemoveReadException { path } => {
                file.add_read_exception(path)?;
                Edit::AddReadException { path: path.clone() }
            }
        };
        file.save()?;
        self.append(
            time,
            who,
            &file,
            inverse,
            &format!("undo change {n}"),
            Some(n),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "2026-12-04T18:00:00Z";

    #[test]
    fn changes_are_recorded_in_order_and_undone() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::in_dir(dir.path());
        let path = dir.path().join("policy.toml");
        let mut f = PolicyFile::load(&path, Scope::Sandbox).unwrap();
        let r = f.add_rule(Action::Allow, "pypi.org:443").unwrap();
        f.save().unwrap();
        let edit = Edit::AddRule {
            id: r.id,
            action: r.action,
            target: r.target.to_string(),
        };
        let c1 = h
            .append(T, Who::Approval, &f, edit, "GET /simple/", None)
            .unwrap();
        assert_eq!(c1.n, 1);
        f.set_mode(Mode::Ask).unwrap();
        f.save().unwrap();
        let c2 = h
            .append(
                T,
                Who::Cli,
                &f,
                Edit::SetMode {
                    from: None,
                    to: Mode::Ask,
                },
                "",
                None,
            )
            .unwrap();
        assert_eq!(c2.n, 2);

        // Undo the rule: gone from the file, and the undo is change 3.
        let u = h.undo(1, T, Who::Cli).unwrap();
        assert_eq!((u.n, u.undoes), (3, Some(1)));
        let f = PolicyFile::load(&path, Scope::Sandbox).unwrap();
        assert!(f.rules().is_empty());
        assert!(matches!(
            h.undo(1, T, Who::Cli),
            Err(HistoryError::AlreadyUndone { n: 1, by: 3 })
        ));
        // Undo the mode: unset again.
        h.undo(2, T, Who::Cli).unwrap();
        assert_eq!(
            PolicyFile::load(&path, Scope::Sandbox).unwrap().mode(),
            None
        );
        // Undo the undo of the rule: the rule is back.
        h.undo(3, T, Who::Cli).unwrap();
        let f = PolicyFile::load(&path, Scope::Sandbox).unwrap();
        assert_eq!(f.rules().len(), 1);
        assert_eq!(f.rules()[0].target.to_string(), "pypi.org:443");

        let all = h.read().unwrap();
        assert_eq!(all.iter().map(|c| c.n).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        assert_eq!(all[0].who, Who::Approval);
        assert!(matches!(
            h.undo(9, T, Who::Cli),
            Err(HistoryError::NoSuchChange { n: 9, .. })
        ));
    }

    /// A file exception (`[files] allow_read`) is written with comments
    /// kept, recorded, undone, and read back into the file rules; a
    /// workspace file may not carry one, and a glob or `..` is refused.
    #[test]
    fn a_read_exception_is_written_recorded_and_undone() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::in_dir(dir.path());
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, "# mine\n[files]\ndeny_read = [\"x\"]\n").unwrap();
        let mut f = PolicyFile::load(&path, Scope::Sandbox).unwrap();
        assert!(f.add_read_exception(".env.example").unwrap());
        assert!(!f.add_read_exception(".env.example").unwrap(), "once");
        for bad in ["*.example", "../x", "/abs", "a//b", ""] {
            assert!(f.add_read_exception(bad).is_err(), "{bad}");
        }
        f.save().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("# mine") && text.contains("allow_read = [\".env.example\"]"),
            "{text}"
        );
        let edit = Edit::AddReadException {
            path: ".env.example".into(),
        };
        let c = h
            .append(T, Who::Approval, &f, edit, "pending 3", None)
            .unwrap();
        assert_eq!(
            c.edit.to_string(),
            "add file exception: allow_read .env.example"
        );
        let rules = crate::Policy::load(None, Some(&path))
            .unwrap()
            .file_rules()
            .unwrap();
        assert!(rules.hidden(std::path::Path::new(".env.example")).is_none());
        assert!(rules.hidden(std::path::Path::new(".env.local")).is_some());
        let u = h.undo(c.n, T, Who::Cli).unwrap();
        assert_eq!(
            u.edit,
            Edit::RemoveReadException {
                path: ".env.example".into()
            }
        );
        let f = PolicyFile::load(&path, Scope::Sandbox).unwrap();
        assert!(f.files().allow_read.is_empty());
        let rules = crate::Policy::load(None, Some(&path))
            .unwrap()
            .file_rules()
            .unwrap();
        assert!(rules.hidden(std::path::Path::new(".env.example")).is_some());
        // Never from the workspace.
        let e = crate::WorkspaceFile::parse(
            "[files]\nallow_read = [\".env\"]\n",
            std::path::Path::new("/w/.sandpen.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("a workspace file cannot make exceptions"), "{e}");
    }

    #[test]
    fn a_corrupt_line_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::in_dir(dir.path());
        std::fs::write(h.path(), "{\"n\":1}\n").unwrap();
        let e = h.read().unwrap_err().to_string();
        assert!(e.contains(":1: not a history record"), "{e}");
    }
}
