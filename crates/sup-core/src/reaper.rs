//! Reaping of every child of supd.
//!
//! One thread owns the waiting. On each SIGCHLD it peeks at an exited child
//! (`waitid(.., WNOWAIT)`), which leaves it a zombie: while it is one, its pid,
//! and so its process group id, cannot be reused. For a registered child (a
//! worker) the reaper then takes it out of the table, SIGKILLs its process
//! group, so whatever the worker left behind dies with it, reaps it and hands
//! the status to whoever registered it. [`Reaper::signal_group`] signals only
//! groups still in the table, under the table's lock, so no signal of supd
//! ever reaches a process that merely inherited a worker's number.
//!
//! Registration happens under the same lock the spawner holds across `fork`,
//! so a child is always registered before the reaper looks it up. Unknown pids
//! are orphaned grandchildren re-parented to us (supd is a child subreaper);
//! they are reaped and forgotten, so no zombie survives.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
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
    /// Waiting runs on a thread of its own, never on the event loop: the
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

    /// Sends `sig` to process group `pgid` while `pgid` is a registered child
    /// not yet being reaped; returns whether the signal was sent.
    ///
    /// Workers must be signalled this way, never with a bare `killpg`: once a
    /// worker is reaped its number may belong to a new process group.
    pub fn signal_group(&self, pgid: i32, sig: i32) -> bool {
        if pgid <= 1 {
            return false;
        }
        // The reaper takes a child out of the table before reaping it, under
        // this lock, so while we hold it a registered pid is not yet reused.
        let waiters = self.lock();
        if !waiters.contains_key(&pgid) {
            return false;
        }
        // SAFETY: killpg has no memory-safety preconditions.
        unsafe { libc::killpg(pgid, sig) == 0 }
    }

    /// Whether worker `pid` has exited as far as the kernel knows, even if its
    /// exit has not reached its slot yet: it is no longer in the table (the
    /// reaper took it), or it is a zombie waiting to be reaped. Never blocks.
    pub fn has_exited(&self, pid: i32) -> bool {
        // Under the lock: the reaper takes a child out of the table before
        // reaping it, so a registered pid is still ours to peek at.
        let waiters = self.lock();
        if !waiters.contains_key(&pid) {
            return true;
        }
        loop {
            // SAFETY: siginfo_t is plain data; all zeroes is a valid value.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
            // SAFETY: waitid writes only into `info`, which we own; WNOWAIT leaves the child to the reaper.
            if unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) } != 0 {
                match Errno::last() {
                    Errno::EINTR => continue,
                    // Not our child any more: reaped by someone.
                    _ => return true,
                }
            }
            // SAFETY: after a successful waitid the pid field is set (zero while the child runs).
            return unsafe { info.si_pid() } != 0;
        }
    }

    /// Reaps every exited child without blocking.
    fn reap_all(&self) {
        loop {
            let (pid, info) = match peek_exited() {
                Ok(Some(exited)) => exited,
                Ok(None) => return,
                Err(e) => {
                    tracing::error!("waitid failed: {e}");
                    return;
                }
            };
            // The child exited before we peeked, so its fork is done; if the
            // spawner still holds the lock, it registers the child before
            // letting go. Removed, not marked: once reaped the pid may be
            // reused by a child forked at once, whose registration must stay.
            let watcher = self.lock().remove(&pid);
            if watcher.is_some() {
                // Still a zombie: its group id cannot be reused yet, so this
                // reaches only what the worker left behind in its group.
                // SAFETY: killpg has no memory-safety preconditions.
                unsafe { libc::killpg(pid, libc::SIGKILL) };
            }
            // Outside the lock: a slow reap must not hold up forks or signals.
            let reaped = reap(pid);
            match watcher {
                // The watcher may be gone already (supd shutting down); nothing to tell.
                Some(tx) => drop(tx.send(info)),
                None => tracing::debug!(pid, "reaped orphaned descendant: {info}"),
            }
            if !reaped {
                // Peeking again would find the same child; wait for the next SIGCHLD.
                return;
            }
        }
    }
}

/// The pid and status of one exited child, left a zombie; `None` when no child has exited.
fn peek_exited() -> Result<Option<(i32, ExitInfo)>, Errno> {
    loop {
        // SAFETY: siginfo_t is plain data; all zeroes is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        // SAFETY: waitid writes only into `info`, which we own.
        if unsafe { libc::waitid(libc::P_ALL, 0, &mut info, flags) } != 0 {
            match Errno::last() {
                Errno::EINTR => continue,
                Errno::ECHILD => return Ok(None),
                e => return Err(e),
            }
        }
        // SAFETY: after a successful waitid for WEXITED these fields are set
        // (a zeroed pid meaning no child has exited).
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        // With WEXITED alone, any other code is CLD_KILLED or CLD_DUMPED.
        let exit = if info.si_code == libc::CLD_EXITED { ExitInfo::Code(status) } else { ExitInfo::Signal(status) };
        return Ok(Some((pid, exit)));
    }
}

/// Reaps `pid`, an exited child; false when it could not be.
fn reap(pid: i32) -> bool {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes only into `status`, which we own.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return true;
        }
        if r == 0 {
            tracing::error!(pid, "an exited child could not be reaped yet");
            return false;
        }
        match Errno::last() {
            Errno::EINTR => continue,
            // Someone else reaped it; it is gone either way.
            Errno::ECHILD => return true,
            e => {
                tracing::error!(pid, "waitpid failed: {e}");
                return false;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Read;
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::spawner::{SpawnSpec, Spawner};

    const DEADLINE: Duration = Duration::from_secs(10);

    /// The reaper of the test process. Only one: each waits for every child
    /// of the process, so a second would take the first one's children.
    pub(crate) fn test_reaper() -> Reaper {
        static REAPER: OnceLock<Reaper> = OnceLock::new();
        REAPER
            .get_or_init(|| {
                // Orphaned grandchildren come to the test process, as they come to supd.
                // SAFETY: prctl with these arguments touches no memory.
                unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
                // The SIGCHLD stream lives on a runtime that outlives every test's own.
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    rt.block_on(async {
                        tx.send(Reaper::start().unwrap()).unwrap();
                        std::future::pending::<()>().await
                    })
                });
                rx.recv().unwrap()
            })
            .clone()
    }

    fn sh(script: &str) -> SpawnSpec {
        SpawnSpec {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            fds: Vec::new(),
            listen_pid: false,
            cwd: "/".into(),
            program: None,
            ids: None,
        }
    }

    async fn exit_of(exit: oneshot::Receiver<ExitInfo>) -> ExitInfo {
        tokio::time::timeout(DEADLINE, exit).await.expect("exit within the deadline").expect("exit info")
    }

    fn gone(pid: i32) -> bool {
        // A zombie still answers signal 0: gone means killed and reaped.
        // SAFETY: kill with signal 0 sends nothing.
        unsafe { libc::kill(pid, 0) != 0 && Errno::last() == Errno::ESRCH }
    }

    #[tokio::test]
    async fn leftovers_of_an_exited_worker_die_with_it_and_are_reaped() {
        let spawner = Spawner::start(test_reaper()).unwrap();
        let spawned = spawner.spawn(sh("sleep 100 & echo $!")).await.unwrap();
        let mut out = std::fs::File::from(spawned.stdout);
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while out.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        let grandchild: i32 = String::from_utf8(line).unwrap().trim().parse().unwrap();
        assert_eq!(exit_of(spawned.exit).await, ExitInfo::Code(0));
        let start = Instant::now();
        while !gone(grandchild) {
            assert!(start.elapsed() < DEADLINE, "grandchild {grandchild} outlived its worker");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[tokio::test]
    async fn a_reaped_worker_is_not_signalled() {
        let spawner = Spawner::start(test_reaper()).unwrap();
        let spawned = spawner.spawn(sh("exit 3")).await.unwrap();
        let pid = spawned.pid;
        assert_eq!(exit_of(spawned.exit).await, ExitInfo::Code(3));
        assert!(!spawner.signal_group(pid, libc::SIGKILL), "its number may belong to another group by now");
        // Not a registered child either: nothing is sent to our own group.
        assert!(!spawner.signal_group(std::process::id() as i32, 0));
    }

    #[tokio::test]
    async fn a_live_worker_is_signalled() {
        let spawner = Spawner::start(test_reaper()).unwrap();
        let spawned = spawner.spawn(sh("exec sleep 100")).await.unwrap();
        assert!(spawner.signal_group(spawned.pid, libc::SIGTERM));
        assert_eq!(exit_of(spawned.exit).await, ExitInfo::Signal(libc::SIGTERM));
    }
}
