//! Reaping of every child of supd.
//!
//! One thread owns `waitpid`: on each SIGCHLD it reaps every exited child and
//! hands the status to whoever registered that pid. Registration happens under
//! the same lock the spawner holds across `fork`, so a child can never be
//! reaped before its watcher is registered. Unknown pids are orphaned
//! grandchildren re-parented to us (supd is a child subreaper); they are reaped
//! and forgotten, so no zombie survives.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitInfo {
    /// It called `exit` with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl ExitInfo {
    /// True for exit code 0.
    pub fn success(self) -> bool {
        self == ExitInfo::Code(0)
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitInfo::Code(c) => write!(f, "exited with code {c}"),
            ExitInfo::Signal(s) => match nix::sys::signal::Signal::try_from(s) {
                Ok(sig) => write!(f, "killed by {}", sig.as_str()),
                Err(_) => write!(f, "killed by signal {s}"),
            },
        }
    }
}

type Waiters = HashMap<i32, oneshot::Sender<ExitInfo>>;

/// Shared handle to the reaper; clone freely.
#[derive(Clone, Default)]
pub struct Reaper {
    waiters: Arc<Mutex<Waiters>>,
}

impl Reaper {
    /// Installs the SIGCHLD stream and starts the reaping thread. Call inside a runtime.
    ///
    /// `waitpid` runs on a thread of its own, never on the event loop: the
    /// kernel can take seconds to tear a dead process down (flushing its /proc
    /// entries while /proc is busy), and the control API, timers and watchdogs
    /// must not wait for that.
    pub fn start() -> std::io::Result<Reaper> {
        let reaper = Reaper::default();
        let mut sigchld = signal(SignalKind::child())?;
        // One pending wake is enough: each wake reaps every child that has exited.
        let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
        let task = reaper.clone();
        std::thread::Builder::new().name("supd-reaper".into()).spawn(move || {
            // Children may have exited before the stream existed.
            task.reap_all();
            while woken.recv().is_ok() {
                task.reap_all();
            }
        })?;
        tokio::spawn(async move {
            while sigchld.recv().await.is_some() {
                let _ = wake.try_send(());
            }
        });
        Ok(reaper)
    }

    /// Locks the waiter table; the spawner holds this across `fork`.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Waiters> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reaps every exited child without blocking.
    fn reap_all(&self) {
        loop {
            // Outside the lock: a slow waitpid must not hold up forks. A child
            // reaped before its watcher is registered is still found: the
            // spawner registers it before it lets go of the lock taken below.
            let status = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!("waitpid failed: {e}");
                    return;
                }
                Ok(s) => s,
            };
            let (pid, info) = match status {
                WaitStatus::Exited(pid, code) => (pid, ExitInfo::Code(code)),
                WaitStatus::Signaled(pid, sig, _) => (pid, ExitInfo::Signal(sig as i32)),
                _ => continue,
            };
            match self.lock().remove(&pid.as_raw()) {
                // The watcher may be gone already (supd shutting down); nothing to tell.
                Some(tx) => drop(tx.send(info)),
                None => tracing::debug!(pid = pid.as_raw(), "reaped orphaned descendant: {info}"),
            }
        }
    }
}
