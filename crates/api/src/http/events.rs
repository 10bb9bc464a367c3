//! Server-sent events: the network and file logs of a sandbox as they are
//! written (`net` and `file` events, one JSON record each, after the last
//! 100 of each), and its console or supervisor log (`line` events).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Deserialize;

use super::{App, HttpError};
use crate::logs::{self, Follow, FOLLOW_INTERVAL};

const BACKLOG: usize = 100;

struct Tail {
    queue: VecDeque<Event>,
    sources: Vec<(Follow, Kind)>,
}

#[derive(Clone, Copy)]
enum Kind {
    Net,
    File,
    Line,
}

impl Kind {
    /// The event for one line, or None for a line that is not a record
    /// (a torn line after a crash).
    fn event(self, line: String) -> Option<Event> {
        match self {
            Kind::Net => {
                serde_json::from_str::<sandpen_proxy::audit::ConnectionReport>(&line).ok()?;
                Some(Event::default().event("net").data(line))
            }
            Kind::File => {
                serde_json::from_str::<sandpen_fs::FileRecord>(&line).ok()?;
                Some(Event::default().event("file").data(line))
            }
            // A console line may hold anything the guest printed: sent as
            // JSON text, so that no byte can end the event early.
            Kind::Line => Some(
                Event::default()
                    .event("line")
                    .data(serde_json::to_string(&line).ok()?),
            ),
        }
    }
}

fn stream(tail: Tail) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(tail, |mut t| async move {
        loop {
            if let Some(ev) = t.queue.pop_front() {
                return Some((Ok(ev), t));
            }
            tokio::time::sleep(FOLLOW_INTERVAL).await;
            for (follow, kind) in &mut t.sources {
                let lines = follow.poll_lines().unwrap_or_default();
                t.queue
                    .extend(lines.into_iter().filter_map(|l| kind.event(l)));
            }
        }
    })
}

pub async fn network_and_files(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, HttpError> {
    let names = logs::names(&app.dirs, Some(&name))?;
    // Followers first, then the backlog: a line written in between may come
    // twice, never not at all.
    let sources = vec![
        (
            Follow::from_end(&logs::network_log_path(&app.dirs, &name)),
            Kind::Net,
        ),
        (
            Follow::from_end(&logs::file_log_path(&app.dirs, &name)),
            Kind::File,
        ),
    ];
    let mut queue = VecDeque::new();
    for r in logs::network(&app.dirs, &names, BACKLOG)? {
        if let Ok(json) = serde_json::to_string(&r) {
            queue.push_back(Event::default().event("net").data(json));
        }
    }
    for r in logs::files(&app.dirs, &names, BACKLOG)? {
        if let Ok(json) = serde_json::to_string(&r) {
            queue.push_back(Event::default().event("file").data(json));
        }
    }
    queue.push_back(Event::default().event("live").data("{}"));
    Ok(Sse::new(stream(Tail { queue, sources })).keep_alive(KeepAlive::default()))
}

#[derive(Deserialize)]
pub struct TextLogQuery {
    #[serde(default)]
    supervisor: bool,
}

pub async fn text_log(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    Query(q): Query<TextLogQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, HttpError> {
    let path = logs::text_log_path(&app.dirs, &name, q.supervisor)?;
    let tail = Tail {
        queue: VecDeque::new(),
        sources: vec![(Follow::from_start(&path), Kind::Line)],
    };
    Ok(Sse::new(stream(tail)).keep_alive(KeepAlive::default()))
}
