//! The state machine of one instance slot.
//!
//! A slot is a place for one worker: it owns the slot's current worker, a
//! replacement being started beside it during a rollout, and old workers
//! still draining. All transitions happen in [`SlotTask`], each logged with a
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

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sup_config::RestartPolicy;
use sup_proto::{RestartReason, WorkerState};
use tokio::sync::{mpsc, oneshot, watch};

use crate::listeners::SlotSockets;
use crate::logs::tail_lines;
use crate::reaper::ExitInfo;
use crate::worker::{self, AppSpec, WorkerCtx, WorkerEvent, WorkerEventKind, WorkerHandle};

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
    pub since: Option<Instant>,
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

/// The answer to a start or replace command.
pub type ReplaceResult = Result<Replaced, String>;

enum SlotCmd {
    Start { spec: Arc<AppSpec>, reply: oneshot::Sender<ReplaceResult> },
    Replace { spec: Arc<AppSpec>, reason: RestartReason, reply: oneshot::Sender<ReplaceResult> },
    Stop { reply: oneshot::Sender<()>, keep_sockets: bool },
    Kill,
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
    /// The command is sent at once; await the result to wait for it.
    pub fn start(&self, spec: Arc<AppSpec>) -> impl std::future::Future<Output = ReplaceResult> {
        let (reply, rx) = oneshot::channel();
        self.send(SlotCmd::Start { spec, reply });
        async move { rx.await.unwrap_or_else(|_| Err("slot is gone".into())) }
    }

    /// Replaces the running worker: new one ready first, then the old one drains.
    pub fn replace(
        &self,
        spec: Arc<AppSpec>,
        reason: RestartReason,
    ) -> impl std::future::Future<Output = ReplaceResult> {
        let (reply, rx) = oneshot::channel();
        self.send(SlotCmd::Replace { spec, reason, reply });
        async move { rx.await.unwrap_or_else(|_| Err("slot is gone".into())) }
    }

    /// Stops every worker of the slot gracefully; resolves when all have exited.
    pub fn stop(&self) -> impl std::future::Future<Output = ()> {
        self.stop_with(false)
    }

    /// Stops like [`SlotHandle::stop`]; `keep_sockets` leaves the slot's
    /// sockets open so clients wait for the next start (used by restart).
    pub fn stop_with(&self, keep_sockets: bool) -> impl std::future::Future<Output = ()> {
        let (reply, rx) = oneshot::channel();
        self.send(SlotCmd::Stop { reply, keep_sockets });
        async move {
            let _ = rx.await;
        }
    }

    /// SIGKILLs every worker of the slot.
    pub fn kill(&self) {
        self.send(SlotCmd::Kill);
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
    Backoff { until: tokio::time::Instant },
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
    reply: oneshot::Sender<ReplaceResult>,
}

/// A reply waiting for an old worker to finish draining.
struct DrainWait {
    old_id: u64,
    reply: oneshot::Sender<ReplaceResult>,
    done: Replaced,
}

/// The task owning one slot.
pub struct SlotTask {
    slot: u32,
    ctx: Arc<WorkerCtx>,
    fds: Arc<SlotSockets>,
    spec: Arc<AppSpec>,
    state: State,
    next: Option<Replacement>,
    draining: Vec<WorkerHandle>,
    drain_wait: Option<DrainWait>,
    start_waiters: Vec<oneshot::Sender<ReplaceResult>>,
    stop_waiters: Vec<oneshot::Sender<()>>,
    keep_sockets: bool,
    restarts: u32,
    attempt: u32,
    crashes: VecDeque<Instant>,
    last_restart_reason: Option<RestartReason>,
    status_text: Option<String>,
    events_tx: mpsc::UnboundedSender<WorkerEvent>,
    events_rx: mpsc::UnboundedReceiver<WorkerEvent>,
    cmds: mpsc::UnboundedReceiver<SlotCmd>,
    view: watch::Sender<SlotView>,
}

/// Creates a stopped slot and starts its task. `fds` are the slot's listening sockets, owned by the caller.
pub fn spawn_slot(slot: u32, ctx: Arc<WorkerCtx>, spec: Arc<AppSpec>, fds: Arc<SlotSockets>) -> SlotHandle {
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
    };
    let (view_tx, view_rx) = watch::channel(view);
    let task = SlotTask {
        slot,
        ctx,
        fds,
        spec,
        state: State::Stopped { reason: "not started".into() },
        next: None,
        draining: Vec::new(),
        drain_wait: None,
        start_waiters: Vec::new(),
        stop_waiters: Vec::new(),
        keep_sockets: false,
        restarts: 0,
        attempt: 0,
        crashes: VecDeque::new(),
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
            tokio::select! {
                cmd = self.cmds.recv(), if !closed => match cmd {
                    Some(cmd) => self.on_cmd(cmd).await,
                    None => {
                        // Every handle is gone: supd is dropping this slot.
                        closed = true;
                        self.kill_all();
                    }
                },
                Some(ev) = self.events_rx.recv() => self.on_event(ev).await,
                _ = tokio::time::sleep_until(backoff.unwrap_or_else(tokio::time::Instant::now)), if backoff.is_some() => {
                    self.spawn_current("backoff delay over").await;
                }
            }
            if closed && self.state.worker().is_none() && self.next.is_none() && self.draining.is_empty() {
                return;
            }
        }
    }

    fn app(&self) -> &str {
        &self.ctx.app
    }

    /// The one place where the state changes: logs the transition and publishes it.
    fn set_state(&mut self, state: State, reason: &str) {
        // The last published state: callers may have moved the old one out already.
        let from = self.view.borrow().state;
        let to = state.kind();
        self.state = state;
        if matches!(to, WorkerState::Errored) || (matches!(to, WorkerState::Stopped) && !self.keep_sockets) {
            // Nobody will accept here: refuse (or migrate) rather than let clients wait.
            self.fds.close();
        }
        let pid = self.state.worker().map(|w| w.pid);
        tracing::info!(app = self.app(), slot = self.slot, pid, "{} -> {}: {reason}", from.as_str(), to.as_str());
        self.publish(reason);
    }

    fn publish(&mut self, reason: &str) {
        let worker = self.state.worker();
        let view = SlotView {
            slot: self.slot,
            state: self.state.kind(),
            pid: worker.map(|w| w.pid),
            since: worker.map(|w| w.started),
            restarts: self.restarts,
            reason: match &self.state {
                State::Stopped { reason } | State::Errored { reason } if !reason.is_empty() => reason.clone(),
                _ => reason.to_string(),
            },
            status_text: self.status_text.clone(),
            last_restart_reason: self.last_restart_reason,
            version: worker.map_or(self.spec.version, |w| w.spec.version),
        };
        self.view.send_replace(view);
    }

    async fn on_cmd(&mut self, cmd: SlotCmd) {
        match cmd {
            SlotCmd::Start { spec, reply } => match &self.state {
                State::Ready { worker } => {
                    let _ = reply.send(Ok(Replaced { old_pid: None, new_pid: worker.pid, ready_ms: 0 }));
                }
                State::Starting { .. } => self.start_waiters.push(reply),
                State::Stopping { .. } => {
                    let _ = reply.send(Err("slot is stopping; try again when it has stopped".into()));
                }
                State::Stopped { .. } | State::Errored { .. } | State::Backoff { .. } => {
                    self.spec = spec;
                    self.attempt = 0;
                    self.crashes.clear();
                    self.start_waiters.push(reply);
                    self.spawn_current("start requested").await;
                }
            },
            SlotCmd::Replace { spec, reason, reply } => self.replace(spec, reason, reply).await,
            SlotCmd::Stop { reply, keep_sockets } => {
                self.keep_sockets = keep_sockets;
                self.stop_waiters.push(reply);
                if let Some(next) = self.next.take() {
                    next.worker.kill();
                    let _ = next.reply.send(Err("cancelled: the slot was asked to stop".into()));
                    self.draining.push(next.worker);
                }
                for w in self.start_waiters.drain(..) {
                    let _ = w.send(Err("stopped before it became ready".into()));
                }
                match std::mem::replace(&mut self.state, State::Stopped { reason: String::new() }) {
                    State::Starting { worker } | State::Ready { worker } | State::Stopping { worker } => {
                        worker.stop();
                        self.set_state(State::Stopping { worker }, "stop requested");
                    }
                    _ => self.set_state(State::Stopped { reason: "stopped by request".into() }, "stopped by request"),
                }
                self.finish_stop();
            }
            SlotCmd::Kill => self.kill_all(),
        }
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

    async fn replace(&mut self, spec: Arc<AppSpec>, reason: RestartReason, reply: oneshot::Sender<ReplaceResult>) {
        if self.next.is_some() {
            let _ = reply.send(Err("a replacement is already in progress in this slot".into()));
            return;
        }
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
            self.spawn_current(&format!("{} requested", RestartReason::as_str(reason))).await;
            return;
        }
        let fds = match self.fds.open() {
            Ok(fds) => fds,
            Err(e) => {
                let _ = reply.send(Err(e.to_string()));
                return;
            }
        };
        match worker::start(&self.ctx, spec, self.slot, &fds, self.events_tx.clone()).await {
            Ok(worker) => {
                tracing::info!(
                    app = self.app(),
                    slot = self.slot,
                    pid = worker.pid,
                    "replacement started ({})",
                    RestartReason::as_str(reason)
                );
                self.next = Some(Replacement { worker, reason, reply });
            }
            Err(e) => {
                let _ = reply.send(Err(format!("cannot start the new worker: {e}")));
            }
        }
    }

    async fn on_event(&mut self, ev: WorkerEvent) {
        if self.next.as_ref().is_some_and(|n| n.worker.id == ev.id) {
            return self.on_next_event(ev).await;
        }
        if let Some(i) = self.draining.iter().position(|w| w.id == ev.id) {
            if let WorkerEventKind::Exited { info, .. } = ev.kind {
                let old = self.draining.remove(i);
                tracing::info!(app = self.app(), slot = self.slot, pid = old.pid, "old worker {info}");
                if self.drain_wait.as_ref().is_some_and(|d| d.old_id == old.id) {
                    if let Some(d) = self.drain_wait.take() {
                        let _ = d.reply.send(Ok(d.done));
                    }
                }
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
                    self.ctx.metrics.ready(&self.ctx.app, ready_ms);
                    self.set_state(State::Ready { worker }, &format!("ready after {ready_ms} ms"));
                    for w in self.start_waiters.drain(..) {
                        let _ = w.send(Ok(done.clone()));
                    }
                }
            }
            WorkerEventKind::Ready => {}
            WorkerEventKind::Exited { info, failure } => self.on_current_exit(info, failure).await,
            WorkerEventKind::WatchdogMissed => {
                let (reply, _) = oneshot::channel();
                let spec = self.spec.clone();
                match &self.state {
                    // A hung worker serving nothing still gets a replacement
                    // ready before it is stopped.
                    State::Ready { .. } if self.next.is_none() => {
                        self.replace(spec, RestartReason::Watchdog, reply).await
                    }
                    State::Starting { worker } => {
                        tracing::warn!(app = self.app(), slot = self.slot, "watchdog expired before ready: killing");
                        worker.kill();
                    }
                    _ => {}
                }
            }
        }
    }

    async fn on_next_event(&mut self, ev: WorkerEvent) {
        match ev.kind {
            WorkerEventKind::Status(_) | WorkerEventKind::WatchdogMissed => {}
            WorkerEventKind::Ready => {
                let Some(next) = self.next.take() else { return };
                let ready_ms = next.worker.started.elapsed().as_millis() as u64;
                let old = match std::mem::replace(&mut self.state, State::Stopped { reason: String::new() }) {
                    State::Starting { worker } | State::Ready { worker } | State::Stopping { worker } => Some(worker),
                    _ => None,
                };
                let done = Replaced { old_pid: old.as_ref().map(|w| w.pid), new_pid: next.worker.pid, ready_ms };
                self.spec = next.worker.spec.clone();
                self.restarts += 1;
                self.last_restart_reason = Some(next.reason);
                self.ctx.metrics.restart(&self.ctx.app, next.reason);
                self.ctx.metrics.ready(&self.ctx.app, ready_ms);
                self.status_text = None;
                self.set_state(
                    State::Ready { worker: next.worker },
                    &format!("{} ready after {ready_ms} ms", RestartReason::as_str(next.reason)),
                );
                match old {
                    Some(old) => {
                        old.stop();
                        self.drain_wait = Some(DrainWait { old_id: old.id, reply: next.reply, done });
                        self.draining.push(old);
                    }
                    None => {
                        let _ = next.reply.send(Ok(done));
                    }
                }
            }
            WorkerEventKind::Exited { info, failure } => {
                let Some(next) = self.next.take() else { return };
                let what = failure.unwrap_or_else(|| info.to_string());
                let msg = failure_message(next.worker.pid, &what, &tail_lines(&next.worker.tail));
                tracing::warn!(
                    app = self.app(),
                    slot = self.slot,
                    "replacement failed: {what}; keeping the current worker"
                );
                let _ = next.reply.send(Err(msg));
            }
        }
    }

    async fn on_current_exit(&mut self, info: ExitInfo, failure: Option<String>) {
        // STATUS= text belongs to the worker that sent it.
        self.status_text = None;
        let old = std::mem::replace(&mut self.state, State::Stopped { reason: String::new() });
        let (worker, was_stopping) = match old {
            State::Stopping { worker } => (worker, true),
            State::Starting { worker } | State::Ready { worker } => (worker, false),
            other => {
                self.state = other;
                return;
            }
        };
        if was_stopping {
            self.set_state(State::Stopped { reason: format!("stopped ({info})") }, &format!("stopped ({info})"));
            self.finish_stop();
            return;
        }
        let what = failure.clone().unwrap_or_else(|| info.to_string());
        for w in self.start_waiters.drain(..) {
            let _ = w.send(Err(failure_message(worker.pid, &what, &tail_lines(&worker.tail))));
        }
        if let Some(next) = self.next.take() {
            // The old worker died mid-rollout: the replacement takes the slot as it is.
            self.start_waiters.push(next.reply);
            self.set_state(
                State::Starting { worker: next.worker },
                &format!("current worker {what}; replacement takes over"),
            );
            return;
        }
        let uptime = worker.started.elapsed();
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
            self.set_state(state, &format!("{what}; not restarted (restart = {})", policy_word(cfg.restart)));
            return;
        }
        self.schedule_restart(&what, uptime).await;
    }

    /// Counts a crash and either restarts now, after a backoff delay, or gives up.
    async fn schedule_restart(&mut self, what: &str, uptime: Duration) {
        let cfg = &self.spec.cfg;
        let now = Instant::now();
        if uptime >= cfg.backoff.reset_after {
            self.attempt = 0;
        }
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
            self.set_state(State::Errored { reason: reason.clone() }, &reason);
            return;
        }
        let delay = cfg.backoff.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        self.restarts += 1;
        self.last_restart_reason = Some(RestartReason::Crash);
        self.ctx.metrics.restart(&self.ctx.app, RestartReason::Crash);
        self.status_text = None;
        if delay.is_zero() {
            self.spawn_current(&format!("{what}; restarting now")).await;
        } else {
            let until = tokio::time::Instant::now() + delay;
            self.set_state(
                State::Backoff { until },
                &format!("{what}; restarting in {} ms (delay_ms={})", delay.as_millis(), delay.as_millis()),
            );
        }
    }

    /// Spawns the slot's worker from the current spec.
    async fn spawn_current(&mut self, reason: &str) {
        self.status_text = None;
        self.keep_sockets = false;
        let started = match self.fds.open() {
            Ok(fds) => worker::start(&self.ctx, self.spec.clone(), self.slot, &fds, self.events_tx.clone()).await,
            Err(e) => Err(e.to_string()),
        };
        match started {
            Ok(worker) => self.set_state(State::Starting { worker }, reason),
            Err(e) => {
                let what = format!("cannot start: {e}");
                for w in self.start_waiters.drain(..) {
                    let _ = w.send(Err(what.clone()));
                }
                // A spawn failure counts as a crash: it backs off and ends in errored.
                self.state = State::Stopped { reason: String::new() };
                Box::pin(self.schedule_restart(&what, Duration::ZERO)).await;
            }
        }
    }

    /// Answers stop requests once nothing of the slot runs any more.
    fn finish_stop(&mut self) {
        let idle = self.state.worker().is_none() && self.next.is_none() && self.draining.is_empty();
        if idle {
            for w in self.stop_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }
}

fn failure_message(pid: i32, what: &str, tail: &[String]) -> String {
    let mut msg = if what.starts_with("not ready") {
        format!("worker {pid} was {what}")
    } else {
        format!("worker {pid} {what} before becoming ready")
    };
    if !tail.is_empty() {
        msg.push_str("; last output:");
        for line in tail.iter().rev().take(10).collect::<Vec<_>>().into_iter().rev() {
            msg.push_str("\n  ");
            msg.push_str(line);
        }
    }
    msg
}

fn policy_word(p: RestartPolicy) -> &'static str {
    match p {
        RestartPolicy::Always => "always",
        RestartPolicy::OnFailure => "on-failure",
        RestartPolicy::Never => "never",
    }
}
