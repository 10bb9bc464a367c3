//! Child reaping for PID 1.
//!
//! As PID 1 we inherit every orphan, so one task calls `waitpid(-1)` on SIGCHLD
//! and hands the statuses of the processes we spawned to whoever waits for them.
//! Spawning happens under the same lock the reaper takes before it waits, so a
//! child that exits at once is never reaped before it is registered.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use sandpen_proto::ExitStatus;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

use crate::log;

#[derive(Default)]
pub struct Reaper {
    waiting: Mutex<HashMap<i32, oneshot::Sender<ExitStatus>>>,
}

pub struct Registration<'a> {
    guard: MutexGuard<'a, HashMap<i32, oneshot::Sender<ExitStatus>>>,
}

impl Reaper {
    /// Locks the table; spawn while holding it, then [`Registration::register`].
    pub fn lock(&self) -> Registration<'_> {
        Registration {
            guard: self.waiting.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    fn reap_all(&self) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(s) => s,
            };
            let (pid, exit) = match status {
                WaitStatus::Exited(pid, code) => (pid, ExitStatus::Code(code)),
                WaitStatus::Signaled(pid, sig, _) => (pid, ExitStatus::Signal(sig as i32)),
                _ => continue,
            };
            if let Some(tx) = waiting.remove(&pid.as_raw()) {
                let _ = tx.send(exit);
            }
        }
    }
}

impl Reaper {
    /// Like [`Command::output`], but the exit status comes from the reaper, which
    /// would otherwise race `Command::wait` for it. Blocks: not for async contexts.
    pub fn output(&self, cmd: &mut Command) -> std::io::Result<Output> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (mut child, status) = {
            let mut reg = self.lock();
            let child = cmd.spawn()?;
            let rx = reg.register(child.id());
            (child, rx)
        };
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let err_thread = std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(e) = stderr.as_mut() {
                let _ = e.read_to_end(&mut buf);
            }
            buf
        });
        let mut out = Vec::new();
        if let Some(o) = stdout.as_mut() {
            let _ = o.read_to_end(&mut out);
        }
        let err = err_thread.join().unwrap_or_default();
        let status = status
            .blocking_recv()
            .map_err(|_| std::io::Error::other("the reaper stopped"))?;
        let raw = match status {
            ExitStatus::Code(c) => (c & 0xff) << 8,
            ExitStatus::Signal(s) => s & 0x7f,
        };
        Ok(Output {
            status: std::process::ExitStatus::from_raw(raw),
            stdout: out,
            stderr: err,
        })
    }
}

impl Registration<'_> {
    pub fn register(&mut self, pid: u32) -> oneshot::Receiver<ExitStatus> {
        let (tx, rx) = oneshot::channel();
        self.guard.insert(pid as i32, tx);
        rx
    }
}

pub fn spawn_reaper_task(reaper: Arc<Reaper>) {
    tokio::spawn(async move {
        let mut sigchld = match signal(SignalKind::child()) {
            Ok(s) => s,
            Err(e) => {
                log!("cannot watch SIGCHLD: {e}");
                return;
            }
        };
        loop {
            reaper.reap_all();
            if sigchld.recv().await.is_none() {
                return;
            }
        }
    });
}

/// One process-wide reaper driven by polling, for tests that are not PID 1 and run
/// in several runtimes at once (two SIGCHLD-driven reapers would steal each
/// other's children).
#[cfg(test)]
pub fn shared_for_tests() -> Arc<Reaper> {
    static SHARED: std::sync::OnceLock<Arc<Reaper>> = std::sync::OnceLock::new();
    SHARED
        .get_or_init(|| {
            let reaper = Arc::new(Reaper::default());
            let r = reaper.clone();
            std::thread::spawn(move || loop {
                r.reap_all();
                std::thread::sleep(std::time::Duration::from_millis(2));
            });
            reaper
        })
        .clone()
}
