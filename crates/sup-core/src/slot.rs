//! The state machine of one instance slot.
//!
//! A slot is a place for one worker: it owns the slot's current worker, a
//! replacement being started beside it during a rollout, and old workers
//! still draining. All transitions happen in its task (`SlotTask`), each logged with a
//! reason and published to a `watch` channel that `status` reads without
//! waiting on this task.
//!
//! ```text
//!            spawn              ready
//! Stopped ──────────▶ Starting ───────▶ Ready
//!    ▲                  │  ▲             │ exit (crash)
//!    │ stop             │  │ delay over  ▼
//! Stopping ◀── stop ────┘  └────────── Backoff ──(crash loop)──▶ Errored
//! ```
//!
//! Stop always wins. Every command that starts a worker carries the app's
//! *fence* as it was when the operation was asked for; a stop raises the
//! slot's fence, and a start or replacement carrying an older fence is
//! answered [`SlotError::Cancelled`] instead of starting anything. So an
//! operation interrupted by a stop (its rollback included) can never start a
//! worker the stop has already reached. A slot whose handles are all dropped
//! stops its workers and never restarts them.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sup_config::RestartPolicy;
use sup_proto::{RestartReason, WorkerState};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::logs::tail_lines;
use crate::reaper::ExitInfo;
use crate::spec::AppSpec;
use crate::worker::{Failure, WorkerEvent, WorkerEventKind, WorkerHandle};

/// What `status` shows of a slot; published on every transition.
#[derive(Debug, Clone)]
pub struct SlotView {
    /// Slot number.
    pub slot: u32,
    /// State.
    pub state: WorkerState,
    /// Current worker's pid.
    pub pid: Option<i32>,
    /// When the current worker was spawned.
    pub since: Option<std::time::Instant>,
    /// Restarts so far.
    pub restarts: u32,
    /// Why the slot is in its state.
    pub reason: String,
    /// Last `STATUS=` text of the current worker.
    pub status_text: Option<String>,
    /// Why it was last restarted.
    pub last_restart_reason: Option<RestartReason>,
    /// Configuration version of the current worker.
    pub version: u64,
    /// Its pinned release directory.
    pub release: Option<std::path::PathBuf>,
}

/// A successful start or replacement.
#[derive(Debug, Clone)]
pub struct Replaced {
    /// The worker that was replaced, if any.
    pub old_pid: Option<i32>,
    /// The new worker.
    pub new_pid: i32,
    /// Milliseconds from spawn to ready.
    pub ready_ms: u64,
}

/// The pids one lifecycle log line is about: `pid` is the process the line
/// concerns (the one that died, stopped or became ready); when a second one
/// is involved (a crash and its respawn, a replacement and the worker it
/// drains), `old_pid` and `new_pid` name both.
#[derive(Debug, Clone, Copy, Default)]
struct Pids {
    pid: Option<i32>,
    old_pid: Option<i32>,
    new_pid: Option<i32>,
}

impl Pids {
    fn one(pid: Option<i32>) -> Pids {
        Pids { pid, ..Pids::default() }
    }

    /// `old` gave way to `new`; the line is about `subject`.
    fn two(subject: i32, old: i32, new: i32) -> Pids {
        Pids { pid: Some(subject), old_pid: Some(old), new_pid: Some(new) }
    }
}

/// Why a start or replacement did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    /// A stop reached the slot first; nothing was (or will be) started.
    #[error("cancelled by stop")]
    Cancelled,
    /// The new worker was started and failed (exit, not ready in time); the message has its last output.
    #[error("{0}")]
    Failed(String),
    /// The new worker could not be started at all.
    #[error("cannot start the new worker: {0}")]
    Spawn(String),
    /// The slot is still stopping its worker.
    #[error("slot is stopping; try again when it has stopped")]
    Stopping,
    /// The slot's task has ended (its app was removed).
    #[error("the slot was removed")]
    Gone,
}

/// The answer to a start or replace command.
pub type ReplaceResult = Result<Replaced, SlotError>;

/// A future a [`SlotEnv`] returns.
pub type EnvFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a slot needs from the world: starting workers, its sockets, counters.
///
/// The real one spawns processes on the slot's sockets; the unit tests use a
/// fake that records every call, under tokio's paused clock.
pub trait SlotEnv: Send + Sync + 'static {
    /// The app's name, for logs.
    fn app(&self) -> &str;
    /// Starts a worker running `spec` in `slot`, reporting to `events`.
    fn launch(
        &self,
        spec: Arc<AppSpec>,
        slot: u32,
        events: mpsc::UnboundedSender<WorkerEvent>,
    ) -> EnvFuture<'_, Result<WorkerHandle, String>>;
    /// Nobody will accept on the slot's sockets any more: close them, so clients are refused rather than left waiting.
    fn close_sockets(&self);
    /// A worker became ready after `ms` milliseconds.
    fn on_ready(&self, ms: u64);
    /// A worker was restarted or replaced.
    fn on_restart(&self, reason: RestartReason);
    /// A lifecycle event of this slot (`crash`, `memory`, `watchdog`, `canary_crashed`).
    fn on_event(&self, _slot: u32, _kind: &str, _message: String) {}
}

enum SlotCmd {
    Start {
        spec: Arc<AppSpec>,
        fence: u64,
        why: String,
        counts: Option<RestartReason>,
        reply: oneshot::Sender<ReplaceResult>,
    },
    Replace {
        spec: Arc<AppSpec>,
        reason: RestartReason,
        fence: u64,
        window: Duration,
        reply: oneshot::Sender<ReplaceResult>,
    },
    Stop {
        fence: u64,
        keep_sockets: bool,
        reply: oneshot::Sender<()>,
    },
    Kill,
    Signal {
        sig: i32,
        reply: oneshot::Sender<bool>,
    },
    MemoryExceeded {
        pid: i32,
    },
    Hold {
        prev: Option<Arc<AppSpec>>,
    },
}

/// Cheap handle to a slot task.
#[derive(Clone)]
pub struct SlotHandle {
    /// Slot number.
    pub slot: u32,
    tx: mpsc::UnboundedSender<SlotCmd>,
    /// Latest view of the slot.
    pub view: watch::Receiver<SlotView>,
}

impl SlotHandle {
    /// Starts the slot if it is not running; resolves when its worker is ready or failed.
    ///
    /// `fence` is the app's stop fence when the operation was asked for. The
    /// command is sent at once; await the result to wait for it.
    pub fn start(&self, spec: Arc<AppSpec>, fence: u64) -> impl Future<Output = ReplaceResult> {
        self.start_for(spec, fence, "start requested".into(), None)
    }

    /// Like [`SlotHandle::start`]; `why` is what the slot logs as the reason
    /// (say, a scale-up), and a start that `counts` as a restart (an
    /// operator's `restart`) is counted in the slot's restarts with that reason.
    pub fn start_for(
        &self,
        spec: Arc<AppSpec>,
        fence: u64,
        why: String,
        counts: Option<RestartReason>,
    ) -> impl Future<Output = ReplaceResult> {
        let (reply, rx) = oneshot::channel();
        self.send(SlotCmd::Start { spec, fence, why, counts, reply });
        async move { rx.await.unwrap_or(Err(SlotError::Gone)) }
    }

    /// Replaces the running worker: new one ready first, then the old one
    /// drains. With a health `window`, the answer waits until the new worker
    /// has stayed up (and passed its probe) that long after ready; if it
    /// fails inside the window the slot goes back to the version it replaced.
    pub fn replace(
        &self,
        spec: Arc<AppSpec>,
        reason: RestartReason,
        fence: u64,
        window: Duration,
    ) -> impl Future<Output = ReplaceResult> {
        let (reply, rx) = oneshot::channel();
        self.send(SlotCmd::Replace { spec, reason, fence, window, reply });
        async move { rx.await.unwrap_or(Err(SlotError::Gone)) }
    }

    /// Stops every worker of the slot gracefully and cancels whatever was
    /// asked with a fence below `fence`; resolves when all have exited.
    /// `keep_sockets` leaves the slot's sockets open so clients wait for the
    /// next start (used by restart).
    pub fn stop(&self, fence: u64, keep_sockets: bool) -> impl Future<Output = ()> {
        let (reply, rx) = oneshot::channel();
        self.send(SlotCmd::Stop { fence, keep_sockets, reply });
        async move {
            let _ = rx.await;
        }
    }

    /// SIGKILLs every worker of the slot.
    pub fn kill(&self) {
        self.send(SlotCmd::Kill);
    }

    /// Sends `sig` to the current worker's process group; resolves to whether one was running.
    pub fn signal(&self, sig: i32) -> impl Future<Output = bool> {
        let (reply, rx) = oneshot::channel();
        self.send(SlotCmd::Signal { sig, reply });
        async move { rx.await.unwrap_or(false) }
    }

    /// While a canary is paused: the version a crash sends the slot back to (`None` ends it).
    pub fn hold(&self, prev: Option<Arc<AppSpec>>) {
        self.send(SlotCmd::Hold { prev });
    }

    /// The monitor saw worker `pid` over its memory limit for the configured samples.
    pub fn memory_exceeded(&self, pid: i32) {
        self.send(SlotCmd::MemoryExceeded { pid });
    }

    fn send(&self, cmd: SlotCmd) {
        // A closed channel answers through the dropped reply.
        let _ = self.tx.send(cmd);
    }
}

/// The slot's state; each variant carries the data valid in it.
enum State {
    Stopped { reason: String },
    Starting { worker: WorkerHandle },
    Ready { worker: WorkerHandle },
    Stopping { worker: WorkerHandle },
    Backoff { until: Instant },
    Errored { reason: String },
}

impl State {
    fn kind(&self) -> WorkerState {
        match self {
            State::Stopped { .. } => WorkerState::Stopped,
            State::Starting { .. } => WorkerState::Starting,
            State::Ready { .. } => WorkerState::Ready,
            State::Stopping { .. } => WorkerState::Stopping,
            State::Backoff { .. } => WorkerState::Backoff,
            State::Errored { .. } => WorkerState::Errored,
        }
    }

    fn worker(&self) -> Option<&WorkerHandle> {
        match self {
            State::Starting { worker } | State::Ready { worker } | State::Stopping { worker } => Some(worker),
            _ => None,
        }
    }
}

/// A new worker started beside the current one.
struct Replacement {
    worker: WorkerHandle,
    reason: RestartReason,
    window: Duration,
    reply: oneshot::Sender<ReplaceResult>,
}

/// A finished replacement's reply, waiting for its old worker to drain and
/// for the new one's health window to pass.
struct DrainWait {
    old_id: Option<u64>,
    new_id: u64,
    // While the window runs: when it ends, and the version to go back to.
    healthy_at: Option<(Instant, Arc<AppSpec>)>,
    window: Duration,
    reply: oneshot::Sender<ReplaceResult>,
    done: Replaced,
}

/// The task owning one slot.
struct SlotTask {
    slot: u32,
    env: Arc<dyn SlotEnv>,
    spec: Arc<AppSpec>,
    state: State,
    next: Option<Replacement>,
    // Replacements asked for while another one runs here (say a reload
    // reaching a slot in the middle of its memory replacement): run in order.
    deferred: VecDeque<SlotCmd>,
    draining: Vec<WorkerHandle>,
    drain_waits: Vec<DrainWait>,
    start_waiters: Vec<oneshot::Sender<ReplaceResult>>,
    stop_waiters: Vec<oneshot::Sender<()>>,
    keep_sockets: bool,
    // Starts and replacements asked for with a lower fence are cancelled.
    fence: u64,
    restarts: u32,
    attempt: u32,
    crashes: VecDeque<Instant>,
    // When the current worker became ready: how long it served when it dies.
    ready_at: Option<Instant>,
    mem_attempt: u32,
    mem_not_before: Option<Instant>,
    // A paused canary's previous version: a crash restarts that, not the canary.
    fallback: Option<Arc<AppSpec>>,
    last_restart_reason: Option<RestartReason>,
    status_text: Option<String>,
    events_tx: mpsc::UnboundedSender<WorkerEvent>,
    events_rx: mpsc::UnboundedReceiver<WorkerEvent>,
    cmds: mpsc::UnboundedReceiver<SlotCmd>,
    view: watch::Sender<SlotView>,
}

/// Creates a stopped slot and starts its task; `fence` is the app's stop fence now.
pub fn spawn_slot(slot: u32, env: Arc<dyn SlotEnv>, spec: Arc<AppSpec>, fence: u64) -> SlotHandle {
    let (tx, cmds) = mpsc::unbounded_channel();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let view = SlotView {
        slot,
        state: WorkerState::Stopped,
        pid: None,
        since: None,
        restarts: 0,
        reason: "not started".into(),
        status_text: None,
        last_restart_reason: None,
        version: spec.version,
        release: None,
    };
    let (view_tx, view_rx) = watch::channel(view);
    let task = SlotTask {
        slot,
        env,
        spec,
        state: State::Stopped { reason: "not started".into() },
        next: None,
        deferred: VecDeque::new(),
        draining: Vec::new(),
        drain_waits: Vec::new(),
        start_waiters: Vec::new(),
        stop_waiters: Vec::new(),
        keep_sockets: false,
        fence,
        restarts: 0,
        attempt: 0,
        crashes: VecDeque::new(),
        ready_at: None,
        mem_attempt: 0,
        mem_not_before: None,
        fallback: None,
        last_restart_reason: None,
        status_text: None,
        events_tx,
        events_rx,
        cmds,
        view: view_tx,
    };
    tokio::spawn(task.run());
    SlotHandle { slot, tx, view: view_rx }
}

impl SlotTask {
    async fn run(mut self) {
        let mut closed = false;
        loop {
            let backoff = match &self.state {
                State::Backoff { until } => Some(*until),
                _ => None,
            };
            let window = self.drain_waits.iter().filter_map(|d| d.healthy_at.as_ref().map(|(t, _)| *t)).min();
            tokio::select! {
                _ = tokio::time::sleep_until(window.unwrap_or_else(Instant::now)), if window.is_some() => {
                    let now = Instant::now();
                    for d in &mut self.drain_waits {
                        if d.healthy_at.as_ref().is_some_and(|(t, _)| *t <= now) {
                            d.healthy_at = None;
                        }
                    }
                    self.settle_waits();
                }
                cmd = self.cmds.recv(), if !closed => match cmd {
                    Some(cmd) => self.on_cmd(cmd).await,
                    None => {
                        closed = true;
                        self.close();
                    }
                },
                Some(ev) = self.events_rx.recv() => self.on_event(ev).await,
                _ = tokio::time::sleep_until(backoff.unwrap_or_else(Instant::now)), if backoff.is_some() => {
                    self.spawn_current("backoff delay over".into(), None).await;
                }
            }
            while self.next.is_none() {
                let Some(cmd) = self.deferred.pop_front() else { break };
                self.on_cmd(cmd).await;
            }
            if closed && self.idle() {
                return;
            }
        }
    }

    fn app(&self) -> &str {
        self.env.app()
    }

    fn idle(&self) -> bool {
        self.state.worker().is_none() && self.next.is_none() && self.draining.is_empty()
    }

    /// Changes the state; the log line names the new state's worker.
    fn set_state(&mut self, state: State, reason: &str) {
        let pids = Pids::one(state.worker().map(|w| w.pid));
        self.transition(state, reason, pids);
    }

    /// The one place where the state changes: logs the transition, naming the
    /// processes it is about, and publishes it.
    fn transition(&mut self, state: State, reason: &str, pids: Pids) {
        // The last published state: callers may have moved the old one out already.
        let from = self.view.borrow().state;
        let to = state.kind();
        self.state = state;
        self.ready_at = matches!(to, WorkerState::Ready).then(Instant::now);
        if matches!(to, WorkerState::Errored) || (matches!(to, WorkerState::Stopped) && !self.keep_sockets) {
            // Nobody will accept here: refuse (or migrate) rather than let clients wait.
            self.env.close_sockets();
        }
        if from == to && to == WorkerState::Stopped {
            // Nothing happened to a process: not a transition worth a line.
            tracing::debug!(app = self.app(), slot = self.slot, "still stopped: {reason}");
        } else {
            tracing::info!(
                app = self.app(),
                slot = self.slot,
                pid = pids.pid,
                old_pid = pids.old_pid,
                new_pid = pids.new_pid,
                "{} -> {}: {reason}",
                from.as_str(),
                to.as_str()
            );
        }
        self.publish(reason);
    }

    fn publish(&mut self, reason: &str) {
        let worker = self.state.worker();
        let view = SlotView {
            slot: self.slot,
            state: self.state.kind(),
            pid: worker.map(|w| w.pid),
            since: worker.map(|w| w.started.into_std()),
            restarts: self.restarts,
            reason: match &self.state {
                State::Stopped { reason } | State::Errored { reason } if !reason.is_empty() => reason.clone(),
                _ => reason.to_string(),
            },
            status_text: self.status_text.clone(),
            last_restart_reason: self.last_restart_reason,
            version: worker.map_or(self.spec.version, |w| w.spec.version),
            release: worker.map_or(&self.spec, |w| &w.spec).release.as_ref().map(|r| r.cwd.clone()),
        };
        self.view.send_replace(view);
    }

    async fn on_cmd(&mut self, cmd: SlotCmd) {
        match cmd {
            SlotCmd::Start { reply, fence, .. } | SlotCmd::Replace { reply, fence, .. } if fence < self.fence => {
                let _ = reply.send(Err(SlotError::Cancelled));
            }
            SlotCmd::Start { spec, reply, why, counts, .. } => match &self.state {
                State::Ready { worker } => {
                    let _ = reply.send(Ok(Replaced { old_pid: None, new_pid: worker.pid, ready_ms: 0 }));
                }
                State::Starting { .. } => self.start_waiters.push(reply),
                State::Stopping { .. } => {
                    let _ = reply.send(Err(SlotError::Stopping));
                }
                State::Stopped { .. } | State::Errored { .. } | State::Backoff { .. } => {
                    self.spec = spec;
                    self.attempt = 0;
                    self.crashes.clear();
                    self.start_waiters.push(reply);
                    if let Some(reason) = counts {
                        self.restarts += 1;
                        self.last_restart_reason = Some(reason);
                        self.env.on_restart(reason);
                    }
                    self.spawn_current(why, None).await;
                }
            },
            cmd @ SlotCmd::Replace { .. } if self.next.is_some() => self.deferred.push_back(cmd),
            SlotCmd::Replace { spec, reason, window, reply, .. } => {
                self.replace(spec, reason, window, Some(reply)).await
            }
            SlotCmd::Stop { fence, keep_sockets, reply } => self.stop(fence, keep_sockets, reply),
            SlotCmd::Kill => self.kill_all(),
            SlotCmd::Signal { sig, reply } => {
                let _ = reply.send(self.state.worker().map(|w| w.signal(sig)).is_some());
            }
            SlotCmd::MemoryExceeded { pid } => self.on_memory(pid).await,
            SlotCmd::Hold { prev } => self.fallback = prev,
        }
    }

    fn stop(&mut self, fence: u64, keep_sockets: bool, reply: oneshot::Sender<()>) {
        self.fence = self.fence.max(fence);
        self.keep_sockets = keep_sockets;
        self.stop_waiters.push(reply);
        self.cancel_pending();
        match std::mem::replace(&mut self.state, State::Stopped { reason: String::new() }) {
            State::Starting { worker } | State::Ready { worker } | State::Stopping { worker } => {
                worker.stop();
                let reason = format!("stop requested (pid {})", worker.pid);
                self.set_state(State::Stopping { worker }, &reason);
            }
            State::Stopped { reason } if !reason.is_empty() => {
                // Already stopped: no transition to log, but the sockets a restart kept open close now.
                self.state = State::Stopped { reason };
                if !keep_sockets {
                    self.env.close_sockets();
                }
            }
            _ => self.set_state(State::Stopped { reason: "stopped by request".into() }, "stopped by request"),
        }
        self.finish_stop();
    }

    /// Answers every start and replacement still pending with "cancelled by stop".
    fn cancel_pending(&mut self) {
        if let Some(next) = self.next.take() {
            // Not serving yet: no need to let it drain.
            next.worker.kill();
            tracing::info!(app = self.app(), slot = self.slot, pid = next.worker.pid, "replacement cancelled by stop");
            let _ = next.reply.send(Err(SlotError::Cancelled));
            self.draining.push(next.worker);
        }
        for cmd in self.deferred.drain(..) {
            if let SlotCmd::Start { reply, .. } | SlotCmd::Replace { reply, .. } = cmd {
                let _ = reply.send(Err(SlotError::Cancelled));
            }
        }
        for w in self.drain_waits.drain(..) {
            let _ = w.reply.send(Err(SlotError::Cancelled));
        }
        for w in self.start_waiters.drain(..) {
            let _ = w.send(Err(SlotError::Cancelled));
        }
    }

    /// Every handle is gone (the app or the slot was removed): stop, never restart.
    fn close(&mut self) {
        self.fence = u64::MAX;
        self.keep_sockets = false;
        self.cancel_pending();
        match std::mem::replace(&mut self.state, State::Stopped { reason: String::new() }) {
            State::Starting { worker } | State::Ready { worker } | State::Stopping { worker } => {
                worker.stop();
                let reason = format!("slot removed (pid {})", worker.pid);
                self.set_state(State::Stopping { worker }, &reason);
            }
            State::Stopped { reason } if !reason.is_empty() => self.state = State::Stopped { reason },
            _ => self.set_state(State::Stopped { reason: "slot removed".into() }, "slot removed"),
        }
        self.finish_stop();
    }

    fn kill_all(&mut self) {
        if let Some(w) = self.state.worker() {
            w.kill();
        }
        if let Some(n) = &self.next {
            n.worker.kill();
        }
        for w in &self.draining {
            w.kill();
        }
    }

    /// Memory replacement: decided here, so it is ordered with the app's
    /// operations and backs off like crashes do.
    async fn on_memory(&mut self, pid: i32) {
        let State::Ready { worker } = &self.state else { return };
        if worker.pid != pid || self.next.is_some() || !self.deferred.is_empty() {
            return;
        }
        let now = Instant::now();
        if self.mem_not_before.is_some_and(|t| now < t) {
            tracing::debug!(app = self.app(), slot = self.slot, pid, "memory replacement backs off");
            return;
        }
        let cfg = &self.spec.cfg;
        if now.duration_since(worker.started) >= cfg.backoff.reset_after {
            self.mem_attempt = 0;
        }
        self.mem_not_before = Some(now + cfg.backoff.delay(self.mem_attempt.saturating_add(1)));
        self.mem_attempt = self.mem_attempt.saturating_add(1);
        tracing::warn!(app = self.app(), slot = self.slot, pid, "over the memory limit: replacing the worker");
        self.env.on_event(self.slot, "memory", format!("pid {pid} over its memory limit: replacing it"));
        self.replace(self.spec.clone(), RestartReason::Memory, Duration::ZERO, None).await;
    }

    async fn replace(
        &mut self,
        spec: Arc<AppSpec>,
        reason: RestartReason,
        window: Duration,
        reply: Option<oneshot::Sender<ReplaceResult>>,
    ) {
        let reply = reply.unwrap_or_else(|| oneshot::channel().0);
        if !matches!(self.state, State::Ready { .. }) {
            // Nothing serves here: no need to keep an old worker beside the new one.
            match std::mem::replace(&mut self.state, State::Stopped { reason: String::new() }) {
                State::Starting { worker } => {
                    worker.kill();
                    self.draining.push(worker);
                }
                State::Stopping { worker } => self.draining.push(worker),
                _ => {}
            }
            self.spec = spec;
            self.attempt = 0;
            self.crashes.clear();
            self.start_waiters.push(reply);
            self.spawn_current(format!("{} requested", reason.as_str()), None).await;
            return;
        }
        match self.env.launch(spec, self.slot, self.events_tx.clone()).await {
            Ok(worker) => {
                let old_pid = self.state.worker().map(|w| w.pid);
                tracing::info!(
                    app = self.app(),
                    slot = self.slot,
                    pid = worker.pid,
                    new_pid = worker.pid,
                    old_pid,
                    "replacement started ({})",
                    reason.as_str()
                );
                self.next = Some(Replacement { worker, reason, window, reply });
            }
            Err(e) => {
                let _ = reply.send(Err(SlotError::Spawn(e)));
            }
        }
    }

    async fn on_event(&mut self, ev: WorkerEvent) {
        if self.next.as_ref().is_some_and(|n| n.worker.id == ev.id) {
            return self.on_next_event(ev);
        }
        if let Some(i) = self.draining.iter().position(|w| w.id == ev.id) {
            if let WorkerEventKind::Exited { info, .. } = ev.kind {
                let old = self.draining.remove(i);
                tracing::info!(app = self.app(), slot = self.slot, pid = old.pid, "old worker {info}");
                // Only the replies waiting for this worker; others (say a
                // watchdog replacement finished meanwhile) keep waiting for theirs.
                for d in &mut self.drain_waits {
                    if d.old_id == Some(old.id) {
                        d.old_id = None;
                    }
                }
                self.settle_waits();
                self.finish_stop();
            }
            return;
        }
        if self.state.worker().map(|w| w.id) != Some(ev.id) {
            return;
        }
        match ev.kind {
            WorkerEventKind::Status(text) => {
                self.status_text = Some(text);
                let reason = self.view.borrow().reason.clone();
                self.publish(&reason);
            }
            // Only a starting worker becomes ready. A READY that arrives after a
            // stop was requested must leave the stopping worker in place: taking
            // it out of the state would drop its handle, and its exit would then
            // never finish the stop.
            WorkerEventKind::Ready if matches!(self.state, State::Starting { .. }) => {
                if let State::Starting { worker } =
                    std::mem::replace(&mut self.state, State::Stopped { reason: String::new() })
                {
                    let ready_ms = worker.started.elapsed().as_millis() as u64;
                    let done = Replaced { old_pid: None, new_pid: worker.pid, ready_ms };
                    self.env.on_ready(ready_ms);
                    self.set_state(State::Ready { worker }, &format!("ready after {ready_ms} ms"));
                    for w in self.start_waiters.drain(..) {
                        let _ = w.send(Ok(done.clone()));
                    }
                }
            }
            WorkerEventKind::Ready => {}
            WorkerEventKind::Unhealthy(why) => {
                let (id, pid) = self.state.worker().map_or((0, 0), |w| (w.id, w.pid));
                let window = self.drain_waits.iter().find(|d| d.new_id == id).map_or(Duration::ZERO, |d| d.window);
                // The rollout's rollback replaces it, new worker first.
                self.fail_window(
                    id,
                    pid,
                    format!(
                        "worker {pid} failed its health probe within min_healthy_time ({}): {why}",
                        humantime::format_duration(window)
                    ),
                );
            }
            WorkerEventKind::Exited { info, failure } => self.on_current_exit(info, failure).await,
            WorkerEventKind::WatchdogMissed => match &self.state {
                // A hung worker serving nothing still gets a replacement
                // ready before it is stopped.
                State::Ready { worker } if self.next.is_none() => {
                    let msg = format!("pid {} missed its watchdog: replacing it", worker.pid);
                    self.env.on_event(self.slot, "watchdog", msg);
                    self.replace(self.spec.clone(), RestartReason::Watchdog, Duration::ZERO, None).await
                }
                State::Starting { worker } => {
                    tracing::warn!(
                        app = self.app(),
                        slot = self.slot,
                        pid = worker.pid,
                        "watchdog expired before ready: killing"
                    );
                    worker.kill();
                }
                _ => {}
            },
        }
    }

    fn on_next_event(&mut self, ev: WorkerEvent) {
        match ev.kind {
            WorkerEventKind::Status(_) | WorkerEventKind::WatchdogMissed | WorkerEventKind::Unhealthy(_) => {}
            WorkerEventKind::Ready => {
                let Some(next) = self.next.take() else { return };
                let ready_ms = next.worker.started.elapsed().as_millis() as u64;
                let old = match std::mem::replace(&mut self.state, State::Stopped { reason: String::new() }) {
                    State::Starting { worker } | State::Ready { worker } | State::Stopping { worker } => Some(worker),
                    _ => None,
                };
                let new_pid = next.worker.pid;
                let done = Replaced { old_pid: old.as_ref().map(|w| w.pid), new_pid, ready_ms };
                let prev = std::mem::replace(&mut self.spec, next.worker.spec.clone());
                self.restarts += 1;
                self.last_restart_reason = Some(next.reason);
                self.env.on_restart(next.reason);
                self.env.on_ready(ready_ms);
                self.status_text = None;
                let (reason, pids) = match &old {
                    Some(old) => (
                        format!(
                            "{} replacement pid {new_pid} ready after {ready_ms} ms; old pid {} drains",
                            next.reason.as_str(),
                            old.pid
                        ),
                        Pids::two(new_pid, old.pid, new_pid),
                    ),
                    None => (
                        format!("{} replacement pid {new_pid} ready after {ready_ms} ms", next.reason.as_str()),
                        Pids::one(Some(new_pid)),
                    ),
                };
                self.transition(State::Ready { worker: next.worker }, &reason, pids);
                let new_id = self.state.worker().map_or(0, |w| w.id);
                // The old worker drains now: during the window only the new one
                // serves the slot, so its health probe and its crashes are its own.
                let healthy_at = (!next.window.is_zero()).then(|| (Instant::now() + next.window, prev));
                if healthy_at.is_some() {
                    if let Some(w) = self.state.worker() {
                        w.watch_health(next.window);
                    }
                }
                let old_id = old.as_ref().map(|w| w.id);
                if let Some(old) = old {
                    old.stop();
                    self.draining.push(old);
                }
                self.drain_waits.push(DrainWait {
                    old_id,
                    new_id,
                    healthy_at,
                    window: next.window,
                    reply: next.reply,
                    done,
                });
                self.settle_waits();
            }
            WorkerEventKind::Exited { info, failure } => {
                let Some(next) = self.next.take() else { return };
                let msg = failure_message(next.worker.pid, info, failure.as_ref(), &tail_lines(&next.worker.tail));
                tracing::warn!(
                    app = self.app(),
                    slot = self.slot,
                    pid = next.worker.pid,
                    old_pid = self.state.worker().map(|w| w.pid),
                    new_pid = next.worker.pid,
                    "replacement failed: {}; keeping the current worker",
                    describe(info, failure.as_ref())
                );
                let _ = next.reply.send(Err(SlotError::Failed(msg)));
            }
        }
    }

    async fn on_current_exit(&mut self, info: ExitInfo, failure: Option<Failure>) {
        // STATUS= text belongs to the worker that sent it.
        self.status_text = None;
        // How long it served: only a worker that was ready counts.
        let served = match self.state {
            State::Ready { .. } => self.ready_at.map(|t| t.elapsed()),
            _ => None,
        };
        let old = std::mem::replace(&mut self.state, State::Stopped { reason: String::new() });
        let (worker, was_stopping) = match old {
            State::Stopping { worker } => (worker, true),
            State::Starting { worker } | State::Ready { worker } => (worker, false),
            other => {
                self.state = other;
                return;
            }
        };
        let what = describe(info, failure.as_ref());
        let pid = worker.pid;
        let mut restore = false;
        let window =
            self.drain_waits.iter().find(|d| d.new_id == worker.id && d.healthy_at.is_some()).map(|d| d.window);
        if let Some(window) = window.filter(|_| !was_stopping) {
            let mut msg = format!(
                "worker {pid} {what} within min_healthy_time ({}) after it became ready",
                humantime::format_duration(window)
            );
            append_tail(&mut msg, &tail_lines(&worker.tail));
            if let Some(prev) = self.fail_window(worker.id, pid, msg) {
                // The slot goes back at once to what it ran before the rollout.
                self.spec = prev;
                self.attempt = 0;
                restore = true;
            }
        }
        if !was_stopping {
            self.env.on_event(self.slot, "crash", format!("pid {pid} {what}"));
        }
        if let Some(prev) = self.fallback.take().filter(|_| !was_stopping) {
            self.env.on_event(
                self.slot,
                "canary_crashed",
                format!("canary pid {pid} {what}; back on version {}", prev.version),
            );
            tracing::warn!(
                app = self.app(),
                slot = self.slot,
                pid,
                "canary {what}: back on version {} from version {}",
                prev.version,
                self.spec.version
            );
            self.spec = prev;
            self.attempt = 0;
            restore = true;
        }
        if was_stopping {
            self.transition(
                State::Stopped { reason: format!("stopped ({info})") },
                &format!("pid {pid} stopped ({info})"),
                Pids::one(Some(pid)),
            );
            self.finish_stop();
            return;
        }
        for w in self.start_waiters.drain(..) {
            let _ =
                w.send(Err(SlotError::Failed(failure_message(pid, info, failure.as_ref(), &tail_lines(&worker.tail)))));
        }
        if let Some(next) = self.next.take() {
            // The old worker died mid-rollout: the replacement takes the slot as it is.
            self.start_waiters.push(next.reply);
            let new_pid = next.worker.pid;
            let reason = format!("pid {pid} {what}; replacement pid {new_pid} takes over");
            self.transition(State::Starting { worker: next.worker }, &reason, Pids::two(pid, pid, new_pid));
            return;
        }
        if restore {
            // Back to the version that served, whatever its restart policy:
            // the failure was the new version's, not a crash of this one.
            self.restarts += 1;
            self.last_restart_reason = Some(RestartReason::Crash);
            self.env.on_restart(RestartReason::Crash);
            let reason = format!("pid {pid} {what}; back on version {}", self.spec.version);
            self.spawn_current(reason, Some(pid)).await;
            return;
        }
        let cfg = &self.spec.cfg;
        let clean = failure.is_none()
            && match info {
                ExitInfo::Code(c) => c == 0 || cfg.stop_exit_codes.contains(&c),
                ExitInfo::Signal(_) => false,
            };
        let restart = match cfg.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !clean,
            RestartPolicy::Never => false,
        };
        if !restart {
            let state = if clean {
                State::Stopped { reason: what.clone() }
            } else {
                State::Errored { reason: format!("{what}; restart = never") }
            };
            let reason = format!("pid {pid} {what}; not restarted (restart = {})", policy_word(cfg.restart));
            self.transition(state, &reason, Pids::one(Some(pid)));
            return;
        }
        self.schedule_restart(&format!("pid {pid} {what}"), Some(pid), served).await;
    }

    /// Counts a death and either restarts now, after a backoff delay, or gives up.
    ///
    /// `served` is how long the worker that `died` had been ready. One that
    /// served at least `backoff.reset_after` is no crash loop: it is
    /// restarted at once and the count starts over. Quick deaths (never
    /// ready, or ready for less) grow the delay up to `backoff.max` and count
    /// for `max_restarts`.
    async fn schedule_restart(&mut self, what: &str, died: Option<i32>, served: Option<Duration>) {
        let cfg = &self.spec.cfg;
        let now = Instant::now();
        let stable = served.filter(|s| *s >= cfg.backoff.reset_after);
        let what = match (stable, served) {
            (Some(s), _) => format!("{what} after {} ready", secs(s)),
            (None, Some(s)) => {
                format!("{what} {} after ready, under backoff.reset_after ({})", secs(s), secs(cfg.backoff.reset_after))
            }
            (None, None) => what.to_string(),
        };
        let pids = Pids::one(died);
        if stable.is_some() {
            self.attempt = 0;
            self.crashes.clear();
        } else {
            self.crashes.push_back(now);
            while self.crashes.front().is_some_and(|t| now.duration_since(*t) > cfg.restart_window) {
                self.crashes.pop_front();
            }
            if self.crashes.len() > cfg.max_restarts as usize {
                let reason = format!(
                    "crashed {} times within {}; last: {what}",
                    self.crashes.len(),
                    humantime::format_duration(cfg.restart_window)
                );
                self.transition(State::Errored { reason: reason.clone() }, &reason, pids);
                return;
            }
        }
        let delay = cfg.backoff.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        self.restarts += 1;
        self.last_restart_reason = Some(RestartReason::Crash);
        self.env.on_restart(RestartReason::Crash);
        self.status_text = None;
        if delay.is_zero() {
            self.spawn_current(format!("{what}; restarting now"), died).await;
        } else {
            let until = Instant::now() + delay;
            let reason = format!("{what}; restarting in {}", humantime::format_duration(delay));
            self.transition(State::Backoff { until }, &reason, pids);
        }
    }

    /// Spawns the slot's worker from the current spec; `died` is the worker it replaces, if one just died.
    async fn spawn_current(&mut self, reason: String, died: Option<i32>) {
        self.status_text = None;
        self.keep_sockets = false;
        match self.env.launch(self.spec.clone(), self.slot, self.events_tx.clone()).await {
            Ok(worker) => {
                let new = worker.pid;
                let pids = died.map_or(Pids::one(Some(new)), |old| Pids::two(old, old, new));
                let reason = match died {
                    Some(_) => format!("{reason}: new pid {new}"),
                    None => format!("{reason}: pid {new}"),
                };
                self.transition(State::Starting { worker }, &reason, pids)
            }
            Err(e) => {
                for w in self.start_waiters.drain(..) {
                    let _ = w.send(Err(SlotError::Spawn(e.clone())));
                }
                // A spawn failure counts as a crash: it backs off and ends in errored.
                self.state = State::Stopped { reason: String::new() };
                Box::pin(self.schedule_restart(&format!("cannot start: {e}"), died, None)).await;
            }
        }
    }

    /// Answers every replacement whose old worker has drained and whose new
    /// worker's health window has passed.
    fn settle_waits(&mut self) {
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.drain_waits)
            .into_iter()
            .partition(|d| d.old_id.is_none() && d.healthy_at.is_none());
        self.drain_waits = waiting;
        for d in done {
            let _ = d.reply.send(Ok(d.done));
        }
    }

    /// The worker `id` failed inside its health window: that replacement
    /// fails, and the version it replaced is returned, for the slot to run
    /// again instead of the failed one.
    fn fail_window(&mut self, id: u64, pid: i32, message: String) -> Option<Arc<AppSpec>> {
        let i = self.drain_waits.iter().position(|d| d.new_id == id && d.healthy_at.is_some())?;
        let d = self.drain_waits.remove(i);
        let (_, prev) = d.healthy_at?;
        tracing::warn!(app = self.app(), slot = self.slot, pid, "{message}");
        let _ = d.reply.send(Err(SlotError::Failed(message)));
        Some(prev)
    }

    /// Answers stop requests once nothing of the slot runs any more.
    fn finish_stop(&mut self) {
        if self.idle() {
            for w in self.stop_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }
}

/// How a worker ended, in words: supd's reason when it killed it, else the exit.
fn describe(info: ExitInfo, failure: Option<&Failure>) -> String {
    match failure {
        Some(f) => f.to_string(),
        None => info.to_string(),
    }
}

fn failure_message(pid: i32, info: ExitInfo, failure: Option<&Failure>, tail: &[String]) -> String {
    let mut msg = match failure {
        Some(f @ Failure::NotReady { .. }) => format!("worker {pid} was {f}"),
        None => format!("worker {pid} {info} before becoming ready"),
    };
    append_tail(&mut msg, tail);
    msg
}

/// Appends a failed worker's last output lines (at most 10) to `msg`.
fn append_tail(msg: &mut String, tail: &[String]) {
    if !tail.is_empty() {
        msg.push_str("; last output:");
        for line in tail.iter().rev().take(10).collect::<Vec<_>>().into_iter().rev() {
            msg.push_str("\n  ");
            msg.push_str(line);
        }
    }
}

/// A duration in seconds with one decimal, for log lines (`10.2s`).
fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

fn policy_word(p: RestartPolicy) -> &'static str {
    match p {
        RestartPolicy::Always => "always",
        RestartPolicy::OnFailure => "on-failure",
        RestartPolicy::Never => "never",
    }
}

#[cfg(test)]
mod tests;
