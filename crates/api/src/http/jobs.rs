//! Long operations (create with its image build, start, stop, rm) run as
//! jobs: the request returns a job id at once, and the page polls
//! `GET /api/jobs/{id}` for the progress lines and the outcome.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::error::one_line;
use crate::progress::Lines;
use crate::ApiError;

/// Finished jobs kept for the page to read.
const KEEP: usize = 64;

#[derive(Default)]
pub struct Jobs {
    next: AtomicU64,
    jobs: Mutex<BTreeMap<u64, Arc<Job>>>,
}

pub struct Job {
    pub kind: &'static str,
    pub sandbox: Option<String>,
    pub lines: Lines,
    outcome: Mutex<Option<Result<serde_json::Value, String>>>,
}

#[derive(Serialize)]
pub struct JobView {
    pub id: u64,
    pub kind: &'static str,
    pub sandbox: Option<String>,
    pub done: bool,
    pub ok: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    pub lines: Vec<String>,
}

impl Jobs {
    /// Runs `work` in the background; returns the job's id.
    pub fn spawn<F, Fut>(&self, kind: &'static str, sandbox: Option<String>, work: F) -> u64
    where
        F: FnOnce(Lines) -> Fut,
        Fut: Future<Output = Result<serde_json::Value, ApiError>> + Send + 'static,
    {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let job = Arc::new(Job {
            kind,
            sandbox,
            lines: Lines::default(),
            outcome: Mutex::new(None),
        });
        {
            let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            jobs.insert(id, job.clone());
            // Forget the oldest finished ones.
            while jobs.len() > KEEP {
                let Some(old) = jobs
                    .iter()
                    .find(|(_, j)| j.outcome.lock().is_ok_and(|o| o.is_some()))
                    .map(|(id, _)| *id)
                else {
                    break;
                };
                jobs.remove(&old);
            }
        }
        let fut = work(job.lines.clone());
        tokio::spawn(async move {
            let outcome = fut.await.map_err(|e| one_line(&e));
            if let Err(e) = &outcome {
                job.lines.say(&format!("error: {e}"));
            }
            *job.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
        });
        id
    }

    pub fn view(&self, id: u64) -> Option<JobView> {
        let job = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)?
            .clone();
        let outcome = job
            .outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Some(JobView {
            id,
            kind: job.kind,
            sandbox: job.sandbox.clone(),
            done: outcome.is_some(),
            ok: outcome.as_ref().map(Result::is_ok),
            error: outcome.as_ref().and_then(|o| o.as_ref().err().cloned()),
            result: outcome.and_then(Result::ok),
            lines: job.lines.snapshot(),
        })
    }
}
