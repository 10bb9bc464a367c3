//! The one error type of the shared operations: one variant per cause a
//! user can act on, the crates' own errors as sources. Its Display is the
//! one readable sentence both the CLI and the page show.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no sandbox named {0:?}; `sandpen ls` lists the sandboxes")]
    UnknownSandbox(String),
    #[error("sandbox {0} is running; stop it first, or use `sandpen rm -f {0}`")]
    Running(String),
    #[error("sandbox {0} is not running; start it with `sandpen start {0}`")]
    NotRunning(String),
    #[error("workspace {}: {source}", path.display())]
    Workspace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("workspace {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("unknown agent {name:?}: use one of {choices}")]
    UnknownAgent { name: String, choices: String },
    #[error("{title} cannot run in sandpen: {reason}")]
    AgentCannotRun { title: String, reason: String },
    #[error("unknown preset {0:?}: use deny-all, balanced or allow-all")]
    UnknownPreset(String),
    #[error("unknown mode {0:?}: use enforce, learn or ask")]
    UnknownMode(String),
    #[error("unknown action {0:?}: use allow or deny")]
    UnknownAction(String),
    #[error("{0}")]
    BadTarget(String),
    #[error("add host {host}: {reason}")]
    BadAddHost { host: String, reason: String },
    #[error("argv must be a JSON array of strings, not empty")]
    BadArgv,
    #[error(
        "unknown service {service}: use one of {builtin}, or `sandpen secret set-custom` for your own API"
    )]
    UnknownService { service: String, builtin: String },
    #[error("nothing is waiting as {sandbox}/{id}; it was answered or timed out (`sandpen policy pending`)")]
    NoSuchPending { sandbox: String, id: u64 },
    #[error("{what}: {why}")]
    FileException { what: String, why: FileRefusal },
    /// A suggestion selection (`1,3`, `2-4`) that does not fit the list.
    #[error("{0}")]
    Selection(String),
    #[error("the suggestions of {0} changed since they were shown (new records came in); look at them again")]
    SuggestionsChanged(String),
    #[error(transparent)]
    History(#[from] sandpen_policy::history::HistoryError),
    #[error("the secret is empty; nothing stored")]
    EmptySecret,
    #[error("no {service} secret in scope {scope}; see `sandpen secret ls`")]
    NoSuchSecret { service: String, scope: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Supervisor(#[from] sandpen_supervisor::SupervisorError),
    #[error(transparent)]
    Policy(#[from] sandpen_policy::PolicyError),
    #[error(transparent)]
    Pattern(#[from] sandpen_policy::files::PatternError),
    #[error(transparent)]
    Flow(#[from] sandpen_policy::flow::FlowError),
    #[error(transparent)]
    Image(#[from] sandpen_image::ImageError),
    #[error(transparent)]
    Vm(#[from] sandpen_vm::VmError),
    #[error(transparent)]
    Store(#[from] sandpen_credentials::StoreError),
    #[error(transparent)]
    Route(#[from] sandpen_credentials::RouteError),
    #[error(transparent)]
    CustomRoutes(#[from] sandpen_credentials::CustomRoutesError),
    #[error(transparent)]
    Audit(#[from] sandpen_proxy::audit::AuditError),
    #[error(transparent)]
    Proto(#[from] sandpen_proto::ProtoError),
    /// The packaged root image build (pkexec) did not succeed.
    #[error("building image {image} with administrator rights failed: {reason}")]
    RootBuild { image: String, reason: String },
    #[error("the sandbox closed the session before the command exited (did it stop?)")]
    ExecClosed,
    #[error("the operation's worker failed: {0}")]
    Worker(String),
    /// A command in the guest did not run to its end (docs/dev-env.md).
    #[error("{0}")]
    GuestCommand(String),
}

/// Why an answer to an agent's file request (`sandpen-request file read|write
/// PATH`) writes no exception (docs/policy.md, "Requests from inside").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileRefusal {
    #[error(
        "a one-time file exception is not offered: the file server takes its rules when the sandbox \
         starts, so there is no single read to let through; `--always` writes an exception that applies \
         from the sandbox's next start, `deny` refuses"
    )]
    Once,
    #[error(
        "a file exception names a path in this sandbox's shares, so it goes in the sandbox's own \
         policy file only; approve it without -g"
    )]
    Global,
    #[error(
        "sandpen writes no exception to the read-only rules (they keep what the host's git runs or \
         reads out of the guest's reach); change [files] read_only of the sandbox's policy.toml \
         yourself if you mean it, and deny the request"
    )]
    Write,
    #[error("it is not inside the sandbox's workspace or one of its mounts; deny the request")]
    OutsideShares,
    #[error("no deny-read rule hides it, so there is nothing to except; deny the request")]
    NotHidden,
    #[error(
        "a folder above it is hidden by {0}; an exception for one path below a hidden folder is not \
         offered; deny the request"
    )]
    HiddenAbove(String),
    #[error("{0}; deny the request")]
    BadPath(String),
}

impl ApiError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        ApiError::Io {
            what: what.into(),
            source,
        }
    }

    /// The error's kind for an HTTP status: not found, conflict, bad input
    /// or a failure of the host.
    pub fn kind(&self) -> ErrorKind {
        use sandpen_supervisor::SupervisorError as S;
        match self {
            ApiError::UnknownSandbox(_) | ApiError::Supervisor(S::UnknownSandbox(_)) => {
                ErrorKind::NotFound
            }
            ApiError::NoSuchSecret { .. } | ApiError::NoSuchPending { .. } => ErrorKind::NotFound,
            ApiError::FileException { .. } | ApiError::SuggestionsChanged(_) => ErrorKind::Conflict,
            ApiError::Running(_)
            | ApiError::NotRunning(_)
            | ApiError::Supervisor(S::NotRunning(_)) => ErrorKind::Conflict,
            ApiError::Workspace { .. }
            | ApiError::NotADirectory(_)
            | ApiError::UnknownAgent { .. }
            | ApiError::AgentCannotRun { .. }
            | ApiError::UnknownPreset(_)
            | ApiError::UnknownMode(_)
            | ApiError::UnknownAction(_)
            | ApiError::BadTarget(_)
            | ApiError::BadAddHost { .. }
            | ApiError::BadArgv
            | ApiError::Selection(_)
            | ApiError::UnknownService { .. }
            | ApiError::EmptySecret
            | ApiError::Policy(_)
            | ApiError::Pattern(_)
            | ApiError::Route(_)
            | ApiError::Supervisor(S::Invalid(_) | S::OwnFiles { .. }) => ErrorKind::BadInput,
            _ => ErrorKind::Host,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    Conflict,
    BadInput,
    Host,
}

/// An error and its causes on one line, each said once (a cause whose text
/// the line already ends with is not repeated).
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(cause) = next {
        let text = cause.to_string();
        if !line.ends_with(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        next = cause.source();
    }
    line
}
