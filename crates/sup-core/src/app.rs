//! One app: its slots, its sockets, and the operations run on it.
//!
//! Operations that replace workers (start, stop, restart, and later reload and
//! scale) run one at a time per app: a second request while one runs is
//! answered "busy". Each operation runs in a task of its own, so a client that
//! disconnects does not cancel a rollout half-way.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sup_config::AppConfig;
use sup_proto::{AppResult, AppStatus, HistoryEntry, InstanceStatus, RestartReason, RolloutEvent, WorkerState};
use tokio::sync::mpsc;

use crate::history::History;
use crate::listeners::{AppSockets, ListenError, SlotSockets};
use crate::slot::{spawn_slot, EnvFuture, SlotEnv, SlotError, SlotHandle};
use crate::spec::{AppSpec, Release, Samples};
use crate::worker::{WorkerCtx, WorkerEvent, WorkerHandle};

/// The real [`SlotEnv`]: workers are processes on the slot's sockets.
struct WorkerEnv {
    ctx: Arc<WorkerCtx>,
    // Kept open for the slot's whole life; workers come and go.
    fds: Arc<SlotSockets>,
}

impl SlotEnv for WorkerEnv {
    fn app(&self) -> &str {
        &self.ctx.app
    }

    fn launch(
        &self,
        spec: Arc<AppSpec>,
        slot: u32,
        events: mpsc::UnboundedSender<WorkerEvent>,
    ) -> EnvFuture<'_, Result<WorkerHandle, String>> {
        Box::pin(async move {
            let fds = self.fds.open().map_err(|e| e.to_string())?;
            crate::worker::start(&self.ctx, spec, slot, &fds, events).await
        })
    }

    fn close_sockets(&self) {
        self.fds.close();
    }

    fn on_ready(&self, ms: u64) {
        self.ctx.recorder.ready(&self.ctx.app, ms);
    }

    fn on_restart(&self, reason: RestartReason) {
        self.ctx.recorder.restart(&self.ctx.app, reason);
    }

    fn on_event(&self, slot: u32, kind: &str, message: String) {
        self.ctx.events.publish(&self.ctx.app, Some(slot), kind, message);
    }
}

struct Inner {
    spec: Arc<AppSpec>,
    slots: Vec<SlotHandle>,
    sockets: AppSockets,
    // Raised by every stop; operations asked for under a lower fence are
    // cancelled by the slots. Read and raised under this lock together with
    // the list of slots, so a slot added by a scale cannot miss a stop.
    fence: u64,
    // The app was removed (or supd is shutting down): no operation runs any more.
    removed: bool,
    // The highest version number given out: a failed version keeps its number.
    last_version: u64,
    // A paused canary: some slots on a new version, waiting for promote or rollback.
    canary: Option<Canary>,
}

/// A paused canary rollout.
struct Canary {
    from: Arc<AppSpec>,
    to: Arc<AppSpec>,
    slots: Vec<u32>,
}

/// Where a rollout reports its progress.
pub type Progress = mpsc::UnboundedSender<RolloutEvent>;

/// A supervised app.
pub struct App {
    /// The app's name.
    pub name: String,
    ctx: Arc<WorkerCtx>,
    inner: Mutex<Inner>,
    op: Arc<tokio::sync::Mutex<()>>,
    op_name: Mutex<Option<&'static str>>,
    history: History,
    // The versions that ran successfully since supd started, with their pinned
    // table and release: what `rollback` can go back to.
    versions: Mutex<Vec<Arc<AppSpec>>>,
}

/// Why a version was made, for the history.
#[derive(Debug, Clone, Copy)]
pub struct Trigger {
    /// `start`, `reload`, `apply`, `cron`, `rollback`, `watch`.
    pub kind: &'static str,
    /// Who asked, from the control socket's peer credentials.
    pub uid: Option<u32>,
}

/// Steering of a rollout; dropping it gives new connections back to the kernel's hash.
struct Steering {
    groups: crate::steer::Groups,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Steering {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.groups.steer(None);
    }
}

/// How an operation over several slots ended.
enum Outcome {
    Done,
    Failed(Vec<String>),
    Cancelled,
}

impl App {
    /// Binds the app's sockets and creates its slots, all stopped.
    pub fn new(ctx: Arc<WorkerCtx>, cfg: AppConfig, history: History) -> Result<Arc<App>, ListenError> {
        let sockets = AppSockets::new(&cfg)?;
        // Numbered on from the history, so a restarted supd's versions stay unique.
        let version = history.last_version() + 1;
        let spec = Arc::new(AppSpec { cfg, version, release: None });
        let mut slots = Vec::new();
        for slot in 0..spec.cfg.instances {
            let fds = Arc::new(sockets.for_slot(&spec.cfg, slot)?);
            slots.push(spawn_slot(slot, Arc::new(WorkerEnv { ctx: ctx.clone(), fds }), spec.clone(), 0));
        }
        Ok(Arc::new(App {
            name: spec.cfg.name.clone(),
            ctx,
            inner: Mutex::new(Inner {
                spec,
                slots,
                sockets,
                fence: 0,
                removed: false,
                last_version: version,
                canary: None,
            }),
            op: Arc::default(),
            op_name: Mutex::new(None),
            history,
            versions: Mutex::new(Vec::new()),
        }))
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pins the release `cfg` names now, off the event loop.
    async fn pin(&self, cfg: &AppConfig) -> Result<Release, String> {
        let cfg = cfg.clone();
        let path = self.ctx.base_env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.clone());
        tokio::task::spawn_blocking(move || crate::spawner::pin_release(&cfg, path.as_deref()))
            .await
            .unwrap_or_else(|e| Err(format!("internal error: {e}")))
    }

    /// The current spec, its release pinned first if it has none yet (the
    /// app's first start): every later start of this version runs that release.
    async fn pinned_spec(&self) -> Result<Arc<AppSpec>, String> {
        let spec = self.spec();
        if spec.release.is_some() {
            return Ok(spec);
        }
        let release = self.pin(&spec.cfg).await?;
        let mut inner = self.inner();
        if inner.spec.version == spec.version && inner.spec.release.is_none() {
            let cfg = inner.spec.cfg.clone();
            inner.spec = Arc::new(AppSpec { cfg, version: spec.version, release: Some(release) });
        }
        Ok(inner.spec.clone())
    }

    /// Handles of the current slots.
    pub fn slots(&self) -> Vec<SlotHandle> {
        self.inner().slots.clone()
    }

    /// The spec new workers run.
    pub fn spec(&self) -> Arc<AppSpec> {
        self.inner().spec.clone()
    }

    /// The app's status, from the slots' last published views.
    pub fn status(&self, samples: &Samples) -> AppStatus {
        // Looked up under the lock, not copied: status is answered often.
        let samples = samples.lock().unwrap_or_else(|e| e.into_inner());
        let instances = self
            .slots()
            .iter()
            .map(|s| {
                let v = s.view.borrow();
                // The slot hears of an exit a moment after the kernel does:
                // never show a process that has exited as running.
                let exited = v.pid.filter(|p| self.ctx.spawner.has_exited(*p));
                let sample = samples.get(&(self.name.clone(), s.slot)).filter(|x| Some(x.pid) == v.pid).copied();
                let sample = sample.filter(|_| exited.is_none());
                InstanceStatus {
                    slot: v.slot,
                    pid: v.pid.map(|p| p as u32),
                    state: if exited.is_some() { WorkerState::Exited } else { v.state },
                    restarts: v.restarts,
                    uptime_ms: v.since.filter(|_| exited.is_none()).map(|t| t.elapsed().as_millis() as u64),
                    cpu_percent: sample.map(|x| (x.cpu_percent * 10.0).round() / 10.0),
                    rss_bytes: sample.map(|x| x.rss_bytes),
                    tree_rss_bytes: sample.map(|x| x.tree_rss_bytes),
                    cpu_seconds: sample.map(|x| x.cpu_seconds),
                    reason: match exited {
                        Some(p) => format!("pid {p} has exited; supd is restarting it or deciding what next"),
                        None => v.reason.clone(),
                    },
                    status_text: v.status_text.clone().filter(|_| exited.is_none()),
                    last_restart_reason: v.last_restart_reason,
                    version: v.version,
                    release: v.release.as_ref().map(|r| r.display().to_string()),
                }
            })
            .collect();
        let rollout = self.op_name.lock().unwrap_or_else(|e| e.into_inner()).map(str::to_string);
        // Read apart from the lock: `slots()` takes it too.
        let versions = self.inner().canary.as_ref().map(|c| (c.to.version, c.from.version));
        let canary = versions.map(|(to, from)| {
            let slots = self.slots();
            let on = slots.iter().filter(|s| s.view.borrow().version == to).count();
            format!("{on} of {} on version {to} (from {from})", slots.len())
        });
        AppStatus { name: self.name.clone(), log_lines_lost: self.ctx.logs.lost(), instances, rollout, canary }
    }

    /// `cron_restart`: a rolling restart onto the app's current configuration,
    /// read once the app is free; skipped while another operation runs or when
    /// no worker runs (an operator stopped the app).
    pub async fn cron_restart(self: &Arc<Self>) -> AppResult {
        self.run_op("cron restart", false, |app, fence| async move {
            if !app.is_running() {
                return app.result_ok("skipped: no worker runs");
            }
            let spec = app.spec();
            let (tx, _rx) = mpsc::unbounded_channel();
            // The code it already runs: a scheduled restart deploys nothing.
            let trigger = Trigger { kind: "cron", uid: None };
            app.roll(spec.cfg.clone(), spec.release.clone(), RestartReason::Cron, trigger, fence, &tx).await
        })
        .await
    }

    /// `watch`: a rolling reload onto the app's current table, its release
    /// pinned anew as `supctl reload` does. The table is read once the app is
    /// free, so waiting behind an operator's reload never undoes it; skipped
    /// when no worker runs (an operator stopped the app).
    pub async fn watch_reload(self: &Arc<Self>) -> AppResult {
        self.run_op("watch reload", true, |app, fence| async move {
            if !app.is_running() {
                return app.result_ok("skipped: no worker runs");
            }
            let cfg = app.spec().cfg.clone();
            let (tx, _rx) = mpsc::unbounded_channel();
            let trigger = Trigger { kind: "watch", uid: None };
            app.roll(cfg, None, RestartReason::Watch, trigger, fence, &tx).await
        })
        .await
    }

    /// Whether any slot has a worker process.
    pub fn is_running(&self) -> bool {
        self.slots().iter().any(|s| s.view.borrow().pid.is_some())
    }

    /// Starts every slot that is not running; waits until all are ready or failed.
    pub async fn start(self: &Arc<Self>, wait: bool) -> AppResult {
        self.run_op("start", wait, |app, fence| async move {
            let t0 = (chrono::Utc::now(), Instant::now());
            let spec = match app.pinned_spec().await {
                Ok(s) => s,
                Err(e) => return app.fail(format!("start of `{}` failed: {e}", app.name)),
            };
            let slots = app.slots();
            let pending: Vec<_> = slots.iter().map(|s| (s.slot, s.start(spec.clone(), fence))).collect();
            let outcome = collect(pending).await;
            let r = app.result("start", slots.len(), "started", outcome);
            if !app.is_remembered(spec.version) {
                // The version's first successful run (or a failed try) enters the history.
                let result = if r.ok { "ok" } else { "failed" };
                app.record(&spec, Trigger { kind: "start", uid: None }, result, t0, &r.message);
                if r.ok {
                    app.remember(&spec);
                }
            }
            r
        })
        .await
    }

    /// Stops every slot gracefully; waits until all workers have exited.
    ///
    /// Never busy: a stop preempts whatever operation runs on the app. That
    /// operation ends as "cancelled by stop", and nothing it asked for starts
    /// after this call was made.
    pub async fn stop(self: &Arc<Self>) -> AppResult {
        let app = self.clone();
        let task = tokio::spawn(async move {
            let n = app.stop_all(false).await;
            app.result_ok(&format!("stopped {n}/{n} instances"))
        });
        task.await.unwrap_or_else(|e| self.fail(format!("internal error during stop: {e}")))
    }

    /// Stops every slot like [`App::stop`] and refuses every later operation:
    /// the app is being removed, re-created or supd is shutting down.
    pub async fn shutdown(self: &Arc<Self>) {
        let app = self.clone();
        let _ = tokio::spawn(async move { app.stop_all(true).await }).await;
    }

    /// Raises the fence, stops every slot, then waits for the interrupted
    /// operation to end (promptly: its slots answer "cancelled") so a `start`
    /// right after is not refused as busy. Returns the number of slots.
    async fn stop_all(self: &Arc<Self>, remove: bool) -> usize {
        let (fence, slots, canary) = {
            let mut inner = self.inner();
            inner.fence += 1;
            inner.removed |= remove;
            // A stop ends a paused canary too, under the same lock: nothing puts it back after the stop.
            (inner.fence, inner.slots.clone(), inner.canary.take())
        };
        let pending: Vec<_> = slots.iter().map(|s| s.stop(fence, false)).collect();
        if let Some(c) = canary {
            for s in &slots {
                s.hold(None);
            }
            let t0 = (chrono::Utc::now(), Instant::now());
            self.record(&c.to, Trigger { kind: "reload", uid: None }, "cancelled", t0, "stopped while paused");
        }
        let guard = self.op.clone().lock_owned().await;
        self.set_op(Some("stop"));
        for fut in pending {
            fut.await;
        }
        self.set_op(None);
        drop(guard);
        slots.len()
    }

    /// Stops then starts every slot (PM2's `restart`; `reload` is the zero-downtime one).
    pub async fn restart(self: &Arc<Self>, wait: bool) -> AppResult {
        self.run_op("restart", wait, |app, fence| async move {
            let slots = app.slots();
            // A slot that had a worker counts the restart (as a reload does); one that was stopped just starts.
            let ran: Vec<bool> = slots.iter().map(|s| s.view.borrow().pid.is_some()).collect();
            // Sockets stay open: clients wait for the new workers instead of being refused.
            let stops: Vec<_> = slots.iter().map(|s| s.stop(fence, true)).collect();
            for fut in stops {
                fut.await;
            }
            let spec = match app.pinned_spec().await {
                Ok(s) => s,
                Err(e) => return app.fail(format!("restart of `{}` failed: {e}", app.name)),
            };
            let starts: Vec<_> = slots
                .iter()
                .zip(ran)
                .map(|(s, ran)| {
                    let counts = ran.then_some(RestartReason::Restart);
                    (s.slot, s.start_for(spec.clone(), fence, "restart requested".into(), counts))
                })
                .collect();
            let outcome = collect(starts).await;
            app.result("restart", slots.len(), "restarted", outcome)
        })
        .await
    }

    /// Rolls every slot onto `cfg`, `reload_parallelism` at a time: each new
    /// worker must be ready before its old one drains. On the first failure the
    /// rollout stops and the slots already replaced go back to the previous version.
    #[allow(clippy::too_many_arguments)]
    pub async fn reload(
        self: &Arc<Self>,
        cfg: AppConfig,
        reason: RestartReason,
        uid: Option<u32>,
        canary: Option<u32>,
        wait: bool,
        progress: Progress,
    ) -> AppResult {
        let trigger = Trigger { kind: if reason == RestartReason::Config { "apply" } else { "reload" }, uid };
        self.run_op("reload", wait, move |app, fence| async move {
            app.roll_canary(cfg, None, reason, trigger, canary, fence, &progress).await
        })
        .await
    }

    /// Rolls the slots a paused canary has not reached onto its version.
    pub async fn promote(self: &Arc<Self>, uid: Option<u32>, wait: bool, progress: Progress) -> AppResult {
        self.run_op("promote", wait, move |app, fence| async move {
            let t0 = (chrono::Utc::now(), Instant::now());
            let Some(c) = app.inner().canary.take() else {
                return app.fail(format!("no canary is paused on `{}`", app.name));
            };
            let all = app.slots();
            // From now on a crash of a canary is a crash like any other: the version is being promoted.
            for s in &all {
                s.hold(None);
            }
            let rest: Vec<SlotHandle> =
                all.iter().filter(|s| s.view.borrow().version != c.to.version).cloned().collect();
            let trigger = Trigger { kind: "promote", uid };
            match app.roll_spec(&c.to, &c.from, &rest, RestartReason::Reload, fence, &progress).await {
                Ok(()) => {
                    app.adopt(&c.to);
                    app.ctx.recorder.rollout(&app.name, "reload", "success");
                    app.record(&c.to, trigger, "ok", t0, "promoted");
                    let n = all.len();
                    app.result_ok(&format!("promoted: {n}/{n} instances on version {}", c.to.version))
                }
                Err((r, result)) => {
                    // The canaries go back too: the version failed.
                    let canaries: Vec<SlotHandle> = all
                        .iter()
                        .filter(|s| c.slots.contains(&s.slot) && s.view.borrow().version == c.to.version)
                        .cloned()
                        .collect();
                    let _ = app.roll_spec(&c.from, &c.to, &canaries, RestartReason::Reload, fence, &progress).await;
                    app.record(&c.to, trigger, result, t0, &r.message);
                    r
                }
            }
        })
        .await
    }

    /// Watches a paused canary: when one of its slots leaves the canary
    /// version (its worker crashed and the slot went back), the canary ends
    /// failed and the other canaries go back too.
    fn watch_canary(self: &Arc<Self>, version: u64, slots: Vec<SlotHandle>) {
        let app = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut set = tokio::task::JoinSet::new();
            for s in slots {
                let mut view = s.view.clone();
                set.spawn(async move { view.wait_for(|x| x.version != version).await.is_ok() });
            }
            let mut left = false;
            while let Some(r) = set.join_next().await {
                if r.unwrap_or(false) {
                    left = true;
                    break;
                }
            }
            let Some(app) = app.upgrade() else { return };
            let still = app.inner().canary.as_ref().is_some_and(|c| c.to.version == version);
            if left && still {
                tracing::warn!(app = %app.name, version, "a canary crashed and went back; the canary failed");
                let (tx, _rx) = mpsc::unbounded_channel();
                let r = app.rollback_canary(None, true, tx, "failed", Some(version)).await;
                tracing::warn!(app = %app.name, "canary of version {version} put back: {}", r.message);
            }
        });
    }

    /// Rolls back onto version `to`, or the last successful one before the
    /// current: its pinned table and release, through the same engine, even if
    /// the file and the `current` link have moved on since.
    pub async fn rollback(
        self: &Arc<Self>,
        to: Option<u64>,
        uid: Option<u32>,
        wait: bool,
        progress: Progress,
    ) -> AppResult {
        if to.is_none() && self.inner().canary.is_some() {
            return self.rollback_canary(uid, wait, progress, "rolled_back", None).await;
        }
        self.run_op("rollback", wait, move |app, fence| async move {
            let current = app.spec().version;
            let target = {
                let versions = app.versions.lock().unwrap_or_else(|e| e.into_inner());
                match to {
                    Some(n) if n == current => None,
                    Some(n) => versions.iter().find(|s| s.version == n).cloned(),
                    None => versions.iter().rev().find(|s| s.version < current).cloned(),
                }
            };
            let Some(target) = target else {
                return app.fail(match to {
                    Some(n) if n == current => format!("`{}` already runs version {n}", app.name),
                    Some(n) => format!(
                        "version {n} of `{}` cannot be rolled back to: only versions that ran successfully \
                         since supd started are kept; see `supctl history {}`",
                        app.name, app.name
                    ),
                    None => format!("`{}` has no earlier successful version to roll back to", app.name),
                });
            };
            let trigger = Trigger { kind: "rollback", uid };
            let mut r = app
                .roll(target.cfg.clone(), target.release.clone(), RestartReason::Reload, trigger, fence, &progress)
                .await;
            if r.ok {
                r.message = format!("{} (rollback to version {})", r.message, target.version);
            }
            r
        })
        .await
    }

    /// Puts a paused canary's slots back on the version they replaced.
    /// `expect`: for the automatic put-back, the canary's version; a canary
    /// decided since (promoted, rolled back, ended by a stop) is left alone.
    /// A stop after this was asked cancels it like any operation.
    async fn rollback_canary(
        self: &Arc<Self>,
        uid: Option<u32>,
        wait: bool,
        progress: Progress,
        result: &'static str,
        expect: Option<u64>,
    ) -> AppResult {
        self.run_op("rollback", wait, move |app, fence| async move {
            let t0 = (chrono::Utc::now(), Instant::now());
            let paused = app.inner().canary.as_ref().map(|c| c.to.version);
            if expect.is_some() && paused != expect {
                return app.result_ok("the canary was decided meanwhile");
            }
            let Some(c) = app.inner().canary.take() else {
                return app.fail(format!("no canary is paused on `{}`", app.name));
            };
            let all = app.slots();
            let canaries: Vec<SlotHandle> =
                all.iter().filter(|s| s.view.borrow().version == c.to.version).cloned().collect();
            let back = app.roll_spec(&c.from, &c.to, &canaries, RestartReason::Reload, fence, &progress).await;
            for s in &all {
                s.hold(None);
            }
            let (r, result) = match back {
                Ok(()) => (
                    app.result_ok(&format!(
                        "canary of version {} ended: {} slot(s) put back on version {}",
                        c.to.version,
                        c.slots.len(),
                        c.from.version
                    )),
                    result,
                ),
                Err(failed) => failed,
            };
            app.ctx.recorder.rollout(&app.name, "reload", result);
            app.record(&c.to, Trigger { kind: "reload", uid }, result, t0, &r.message);
            r
        })
        .await
    }

    fn is_remembered(&self, version: u64) -> bool {
        self.versions.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|s| s.version == version)
    }

    /// Keeps a version that ran successfully, for `rollback`.
    fn remember(&self, spec: &Arc<AppSpec>) {
        let mut versions = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        versions.retain(|s| s.version != spec.version);
        versions.push(spec.clone());
        let excess = versions.len().saturating_sub(spec.cfg.history_limit as usize);
        versions.drain(..excess);
    }

    /// Writes a version's outcome into the history.
    fn record(
        &self,
        spec: &AppSpec,
        trigger: Trigger,
        result: &str,
        t0: (chrono::DateTime<chrono::Utc>, Instant),
        message: &str,
    ) {
        let took = t0.1.elapsed();
        let first = message.lines().next().unwrap_or("");
        let kind = match (trigger.kind, result) {
            ("start", _) => None,
            (_, "canary") => Some("canary_paused"),
            ("promote", "ok") => Some("promoted"),
            (_, "ok") => Some("rollout_done"),
            _ => Some("rollout_failed"),
        };
        if let Some(kind) = kind {
            let what = format!("version {} ({}, {result}): {first}", spec.version, trigger.kind);
            self.ctx.events.publish(&self.name, None, kind, what);
            if result != "canary" {
                self.ctx.recorder.rollout_took(&self.name, trigger.kind, result, took);
            }
        }
        self.history.record(HistoryEntry {
            version: spec.version,
            trigger: trigger.kind.into(),
            result: result.into(),
            release: spec.release.as_ref().map(|r| r.cwd.display().to_string()),
            at: t0.0.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            duration_ms: took.as_millis() as u64,
            uid: trigger.uid,
            message: message.into(),
            digest: digest(&spec.cfg),
        });
    }

    /// The app's version history, oldest first.
    pub fn history(&self) -> Vec<HistoryEntry> {
        self.history.entries()
    }

    /// Rolls onto `cfg` as a new version; `release` keeps a pinned one (cron
    /// restart, rollback), `None` pins whatever `cfg` names now.
    #[allow(clippy::too_many_arguments)]
    async fn roll(
        self: &Arc<Self>,
        cfg: AppConfig,
        release: Option<Release>,
        reason: RestartReason,
        trigger: Trigger,
        fence: u64,
        progress: &Progress,
    ) -> AppResult {
        self.roll_canary(cfg, release, reason, trigger, None, fence, progress).await
    }

    /// [`App::roll`], stopping after `canary` slots when given.
    #[allow(clippy::too_many_arguments)]
    async fn roll_canary(
        self: &Arc<Self>,
        cfg: AppConfig,
        release: Option<Release>,
        reason: RestartReason,
        trigger: Trigger,
        canary: Option<u32>,
        fence: u64,
        progress: &Progress,
    ) -> AppResult {
        let t0 = (chrono::Utc::now(), Instant::now());
        let (r, tried) = self.roll_version(cfg, release, reason, canary, fence, progress).await;
        if let Some((spec, result)) = tried {
            self.record(&spec, trigger, result, t0, &r.message);
        }
        r
    }

    /// One rollout; returns its answer and the version it tried with how that ended.
    #[allow(clippy::too_many_arguments)]
    async fn roll_version(
        self: &Arc<Self>,
        cfg: AppConfig,
        release: Option<Release>,
        reason: RestartReason,
        canary: Option<u32>,
        fence: u64,
        progress: &Progress,
    ) -> (AppResult, Option<(Arc<AppSpec>, &'static str)>) {
        let old = self.spec();
        let kind = reason_kind(reason);
        let paused = self.inner().canary.as_ref().map(|c| c.to.version);
        if let Some(version) = paused {
            return (
                self.fail(format!(
                    "a canary of version {version} is paused on `{app}`: `supctl promote {app}` or `supctl rollback {app}` first",
                    app = self.name
                )),
                None,
            );
        }
        if cfg.listen != old.cfg.listen || cfg.listen_backlog != old.cfg.listen_backlog {
            return (
                self.fail("listen addresses changed: `supctl config apply` re-creates the app's sockets".into()),
                None,
            );
        }
        let release = match release {
            Some(r) => r,
            None => match self.pin(&cfg).await {
                Ok(r) => r,
                Err(e) => return (self.fail(format!("{kind} of `{}` not started: {e}", self.name)), None),
            },
        };
        let version = {
            let mut inner = self.inner();
            inner.last_version += 1;
            inner.last_version
        };
        let new = Arc::new(AppSpec { cfg, version, release: Some(release) });
        let all = self.slots();
        let targets: Vec<SlotHandle> = match canary {
            Some(n) => all.iter().take(n as usize).cloned().collect(),
            None => all.clone(),
        };
        if let Err((r, result)) = self.roll_spec(&new, &old, &targets, reason, fence, progress).await {
            return (r, Some((new, result)));
        }
        let n = targets.len();
        if canary.is_some() && n < all.len() {
            // Paused: the canaries run the new version, the rest the old one.
            // A canary that crashes now goes back to the old version by itself.
            for s in &targets {
                s.hold(Some(old.clone()));
            }
            self.inner().canary =
                Some(Canary { from: old.clone(), to: new.clone(), slots: targets.iter().map(|s| s.slot).collect() });
            self.watch_canary(new.version, targets);
            let m = all.len();
            return (
                self.result_ok(&format!(
                    "canary: {n} of {m} instances on version {}; `supctl promote {app}` rolls the rest, `supctl rollback {app}` puts them back",
                    new.version,
                    app = self.name
                )),
                Some((new, "canary")),
            );
        }
        self.adopt(&new);
        self.ctx.recorder.rollout(&self.name, kind, "success");
        (self.result_ok(&format!("rolled {n}/{n} instances to version {}", new.version)), Some((new, "ok")))
    }

    /// The app's version is now `new`: later starts, scales and restarts run it.
    fn adopt(&self, new: &Arc<AppSpec>) {
        let mut inner = self.inner();
        let mut spec = AppSpec { cfg: new.cfg.clone(), version: new.version, release: new.release.clone() };
        spec.cfg.instances = inner.slots.len() as u32;
        inner.spec = Arc::new(spec);
        drop(inner);
        self.remember(&self.spec());
    }

    /// Replaces `targets` with `new`, `reload_parallelism` at a time; on the
    /// first failure puts every slot already on `new` back on `old`. The error
    /// carries the answer and the history result.
    async fn roll_spec(
        self: &Arc<Self>,
        new: &Arc<AppSpec>,
        old: &Arc<AppSpec>,
        targets: &[SlotHandle],
        reason: RestartReason,
        fence: u64,
        progress: &Progress,
    ) -> Result<(), (AppResult, &'static str)> {
        let kind = reason_kind(reason);
        let slots = targets;
        let msg = format!("{kind} of {} slot(s), version {} -> {}", slots.len(), old.version, new.version);
        self.ctx.events.publish(&self.name, None, "rollout_started", msg);
        let _ = progress.send(RolloutEvent::Started {
            app: self.name.clone(),
            kind: kind.into(),
            slots: slots.iter().map(|s| s.slot).collect(),
            from_version: old.version,
            to_version: new.version,
        });
        let parallel = new.cfg.reload_parallelism.max(1) as usize;
        let mut failure: Option<(u32, SlotError)> = None;
        let steering = self.steer_to_new(new.version, slots);
        for chunk in slots.chunks(parallel) {
            let t0 = Instant::now();
            let pending: Vec<_> = chunk
                .iter()
                .map(|s| (s.slot, s.replace(new.clone(), reason, fence, new.cfg.min_healthy_time)))
                .collect();
            for (slot, fut) in pending {
                match fut.await {
                    Ok(r) => {
                        let msg = format!("pid {} on version {} (old pid {:?})", r.new_pid, new.version, r.old_pid);
                        self.ctx.events.publish(&self.name, Some(slot), "slot_done", msg);
                        let _ = progress.send(RolloutEvent::SlotReplaced {
                            app: self.name.clone(),
                            slot,
                            old_pid: r.old_pid.map(|p| p as u32),
                            new_pid: r.new_pid as u32,
                            ready_ms: r.ready_ms,
                            total_ms: t0.elapsed().as_millis() as u64,
                        });
                    }
                    Err(e) => {
                        self.ctx.events.publish(&self.name, Some(slot), "slot_failed", e.to_string());
                        let _ = progress.send(RolloutEvent::SlotFailed {
                            app: self.name.clone(),
                            slot,
                            message: e.to_string(),
                        });
                        // A stop outranks a failure: nothing is rolled back then.
                        if e == SlotError::Cancelled || failure.is_none() {
                            failure = Some((slot, e));
                        }
                    }
                }
            }
            if failure.is_some() {
                break;
            }
        }
        drop(steering);
        let (slot, why) = match failure {
            None => return Ok(()),
            Some((_, SlotError::Cancelled)) => return Err((self.cancelled(kind), "cancelled")),
            Some(f) => f,
        };
        // Every slot that now runs (or tries to run) the new version goes back.
        let touched: Vec<_> = slots.iter().filter(|s| s.view.borrow().version == new.version).cloned().collect();
        let ids: Vec<u32> = touched.iter().map(|s| s.slot).collect();
        if !ids.is_empty() {
            let _ = progress.send(RolloutEvent::RollingBack { app: self.name.clone(), slots: ids.clone() });
            let msg = format!("slots {ids:?} back to version {}", old.version);
            self.ctx.events.publish(&self.name, None, "rolled_back", msg);
        }
        let pending: Vec<_> =
            touched.iter().map(|s| (s.slot, s.replace((*old).clone(), reason, fence, Duration::ZERO))).collect();
        let mut back_failures = Vec::new();
        let mut cancelled = false;
        for (s, fut) in pending {
            let (ok, message) = match fut.await {
                Ok(r) => (true, format!("back on version {} (pid {})", old.version, r.new_pid)),
                Err(e) => {
                    cancelled |= e == SlotError::Cancelled;
                    back_failures.push(s);
                    (false, e.to_string())
                }
            };
            let _ = progress.send(RolloutEvent::SlotRolledBack { app: self.name.clone(), slot: s, ok, message });
        }
        if cancelled {
            return Err((self.cancelled(kind), "cancelled"));
        }
        self.ctx.recorder.rollout(&self.name, kind, "rolled_back");
        let mut message = format!(
            "{kind} of `{}` failed at slot {slot}: {why}\nrolled back {} slot(s) to version {}; the others were not touched",
            self.name,
            ids.len(),
            old.version
        );
        if !back_failures.is_empty() {
            message.push_str(&format!("\nslots {back_failures:?} could not be put back; see `supctl status`"));
        }
        let result = if back_failures.is_empty() { "rolled_back" } else { "failed" };
        Err((self.fail(message), result))
    }

    /// Until the returned guard drops, new connections go only to the slots
    /// of `targets` whose worker of `version` is ready (see [`crate::steer`]):
    /// clients that an old worker disconnects reconnect to a new one, not to
    /// an old worker that will disconnect them again.
    fn steer_to_new(self: &Arc<Self>, version: u64, targets: &[SlotHandle]) -> Steering {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut tasks: Vec<tokio::task::AbortHandle> = targets
            .iter()
            .map(|s| {
                let (mut view, tx) = (s.view.clone(), tx.clone());
                tokio::spawn(async move { while view.changed().await.is_ok() && tx.send(()).is_ok() {} }).abort_handle()
            })
            .collect();
        let (app, targets) = (self.clone(), targets.to_vec());
        tasks.push(
            tokio::spawn(async move {
                let mut current = Vec::new();
                while rx.recv().await.is_some() {
                    let ready: Vec<u32> = targets
                        .iter()
                        .filter(|s| {
                            let v = s.view.borrow();
                            v.version == version && v.state == sup_proto::WorkerState::Ready
                        })
                        .map(|s| s.slot)
                        .collect();
                    if !ready.is_empty() && ready != current {
                        app.inner().sockets.groups.steer(Some(&ready));
                        current = ready;
                    }
                }
            })
            .abort_handle(),
        );
        Steering { groups: self.inner().sockets.groups.clone(), tasks }
    }

    fn cancelled(&self, kind: &str) -> AppResult {
        self.ctx.recorder.rollout(&self.name, kind, "cancelled");
        self.fail(format!("{kind} of `{}` cancelled by stop", self.name))
    }

    /// Changes the number of instances: new slots start (and must become ready)
    /// on fresh sockets; removed slots drain, then their sockets close.
    pub async fn scale(self: &Arc<Self>, n: u32, wait: bool, progress: Progress) -> AppResult {
        if n == 0 {
            return self.fail("instances must be at least 1; use `supctl stop` to stop an app".into());
        }
        self.run_op("scale", wait, move |app, fence| async move { app.scale_now(n, fence, &progress).await }).await
    }

    async fn scale_now(self: &Arc<Self>, n: u32, fence: u64, progress: &Progress) -> AppResult {
        let spec = match self.pinned_spec().await {
            Ok(s) => s,
            Err(e) => return self.fail(format!("scale of `{}` failed: {e}", self.name)),
        };
        let current = self.inner().slots.len() as u32;
        let _ = progress.send(RolloutEvent::Started {
            app: self.name.clone(),
            kind: "scale".into(),
            slots: (n.min(current)..n.max(current)).collect(),
            from_version: spec.version,
            to_version: spec.version,
        });
        if n > current {
            let mut added = Vec::new();
            for slot in current..n {
                // Created under the same lock a stop raises the fence under.
                let created = {
                    let mut inner = self.inner();
                    inner.sockets.for_slot(&spec.cfg, slot).map(|fds| {
                        let env = Arc::new(WorkerEnv { ctx: self.ctx.clone(), fds: Arc::new(fds) });
                        let handle = spawn_slot(slot, env, spec.clone(), inner.fence);
                        inner.slots.push(handle.clone());
                        handle
                    })
                };
                match created {
                    Ok(handle) => added.push(handle),
                    Err(e) => {
                        self.remove_slots(current, fence, progress).await;
                        return self.fail(e.to_string());
                    }
                }
            }
            let why = format!("scale-up from {current} to {n} instances");
            let slots: Vec<String> = (current..n).map(|s| s.to_string()).collect();
            tracing::info!(app = %self.name, from = current, to = n, "{why}: starting slot(s) {}", slots.join(", "));
            let pending: Vec<_> =
                added.iter().map(|h| (h.slot, h.start_for(spec.clone(), fence, why.clone(), None))).collect();
            let mut failures = Vec::new();
            let mut cancelled = false;
            let mut started = Vec::new();
            for (slot, fut) in pending {
                match fut.await {
                    Ok(r) => {
                        started.push(format!("slot {slot} pid {}", r.new_pid));
                        let _ = progress.send(RolloutEvent::SlotAdded {
                            app: self.name.clone(),
                            slot,
                            pid: r.new_pid as u32,
                            ready_ms: r.ready_ms,
                        });
                    }
                    Err(e) => {
                        let _ = progress.send(RolloutEvent::SlotFailed {
                            app: self.name.clone(),
                            slot,
                            message: e.to_string(),
                        });
                        cancelled |= e == SlotError::Cancelled;
                        failures.push(format!("slot {slot}: {e}"));
                    }
                }
            }
            if !failures.is_empty() {
                // Back to the old size: the new slots never served.
                self.remove_slots(current, fence, progress).await;
                if cancelled {
                    return self.cancelled("scale");
                }
                self.ctx.recorder.rollout(&self.name, "scale", "rolled_back");
                return self.fail(format!(
                    "scale of `{}` to {n} failed; back at {current}:\n{}",
                    self.name,
                    failures.join("\n")
                ));
            }
            let what = format!("scaled from {current} to {n} instances: started {}", started.join(", "));
            tracing::info!(app = %self.name, from = current, to = n, "{what}");
            return self.scaled(&spec, n, &what);
        } else if n < current {
            self.remove_slots(n, fence, progress).await;
        }
        let what = format!("scaled from {current} to {n} instances");
        tracing::info!(app = %self.name, from = current, to = n, "{what}");
        self.scaled(&spec, n, &what)
    }

    /// A scale succeeded: the app's spec has `n` instances from now on.
    fn scaled(&self, spec: &AppSpec, n: u32, what: &str) -> AppResult {
        self.ctx.recorder.rollout(&self.name, "scale", "success");
        let mut cfg = spec.cfg.clone();
        cfg.instances = n;
        self.inner().spec = Arc::new(AppSpec { cfg, version: spec.version, release: spec.release.clone() });
        self.result_ok(what)
    }

    /// Stops slots `keep..` and closes their sockets once their workers are gone.
    async fn remove_slots(&self, keep: u32, fence: u64, progress: &Progress) {
        let doomed: Vec<SlotHandle> = self.slots().into_iter().filter(|s| s.slot >= keep).rev().collect();
        // One at a time: connections migrating out of a closing socket must
        // not land in another socket that is closing at the same instant.
        for s in doomed {
            s.stop(fence, false).await;
            let _ = progress.send(RolloutEvent::SlotRemoved { app: self.name.clone(), slot: s.slot });
        }
        // Dropping the last handle ends the slot task; dropping the sockets closes
        // them, and with net.ipv4.tcp_migrate_req the kernel moves connections
        // still queued in them to the remaining slots.
        self.inner().slots.retain(|s| s.slot < keep);
    }

    /// A successful result with `message`.
    pub fn result_ok(&self, message: &str) -> AppResult {
        AppResult { app: self.name.clone(), ok: true, message: message.to_string() }
    }

    /// The answer for an app that supd will not start because it is shutting down.
    pub fn fail_closing(&self) -> AppResult {
        self.fail("not added: supd is shutting down".into())
    }

    fn fail(&self, message: String) -> AppResult {
        AppResult { app: self.name.clone(), ok: false, message }
    }

    /// SIGKILLs every worker of the app.
    pub fn kill(&self) {
        for s in self.slots() {
            s.kill();
        }
    }

    fn result(&self, op: &str, total: usize, verb: &str, outcome: Outcome) -> AppResult {
        match outcome {
            Outcome::Done => self.result_ok(&format!("{verb} {total}/{total} instances")),
            Outcome::Cancelled => self.fail(format!("{op} of `{}` cancelled by stop", self.name)),
            Outcome::Failed(failures) => {
                self.fail(format!("{} of {total} instances failed:\n{}", failures.len(), failures.join("\n")))
            }
        }
    }

    fn set_op(&self, name: Option<&'static str>) {
        *self.op_name.lock().unwrap_or_else(|e| e.into_inner()) = name;
    }

    /// Runs one operation at a time per app, in its own task (a client that
    /// hangs up does not cancel it). The operation gets the fence of the
    /// moment it was asked for: a stop after that cancels it, even while it
    /// still waits for its turn.
    async fn run_op<F, Fut>(self: &Arc<Self>, name: &'static str, wait: bool, f: F) -> AppResult
    where
        F: FnOnce(Arc<App>, u64) -> Fut + Send + 'static,
        Fut: Future<Output = AppResult> + Send + 'static,
    {
        let fence = {
            let inner = self.inner();
            if inner.removed {
                return self.fail(format!("`{}` was removed", self.name));
            }
            inner.fence
        };
        let guard = match self.op.clone().try_lock_owned() {
            Ok(g) => g,
            Err(_) if wait => self.op.clone().lock_owned().await,
            Err(_) => {
                let running = self.op_name.lock().unwrap_or_else(|e| e.into_inner()).unwrap_or("operation");
                return self.fail(format!("busy: {} {running} of `{}` is in progress", article(running), self.name));
            }
        };
        if self.inner().fence != fence {
            return self.fail(format!("{name} of `{}` cancelled by stop", self.name));
        }
        self.set_op(Some(name));
        let app = self.clone();
        let task = tokio::spawn(async move {
            let result = f(app.clone(), fence).await;
            app.set_op(None);
            drop(guard);
            result
        });
        task.await.unwrap_or_else(|e| self.fail(format!("internal error during {name}: {e}")))
    }

    /// Everything about the app for `supctl describe`: effective configuration
    /// (environment keys only, never values), slots and log files.
    pub fn describe(&self, samples: &Samples) -> serde_json::Value {
        let spec = self.spec();
        let c = &spec.cfg;
        let (dir, logs) = self.ctx.logs.files();
        let files: Vec<String> =
            crate::logs::file_names(&self.name, &logs).iter().map(|(_, n)| dir.join(n).display().to_string()).collect();
        let d = |d: std::time::Duration| humantime::format_duration(d).to_string();
        serde_json::json!({
            "name": self.name,
            "version": spec.version,
            "command": c.command,
            "cwd": c.cwd,
            "instances": self.slots().len(),
            "listen": c.listen.iter().map(|l| l.to_string()).collect::<Vec<_>>(),
            "port": c.port,
            "ready": format!("{:?}", c.ready).to_lowercase(),
            "ready_timeout": d(c.ready_timeout),
            "stop_signal": c.stop_signal.as_str(),
            "stop_timeout": d(c.stop_timeout),
            "restart": format!("{:?}", c.restart).to_lowercase(),
            "backoff": {"initial": d(c.backoff.initial), "multiplier": c.backoff.multiplier, "max": d(c.backoff.max), "reset_after": d(c.backoff.reset_after)},
            "max_restarts": c.max_restarts,
            "restart_window": d(c.restart_window),
            "memory_limit": c.memory_limit,
            "memory_limit_samples": c.memory_limit_samples,
            "watchdog": c.watchdog.map(d),
            "user": c.user.as_ref().map(|u| u.name.clone()),
            "group": c.group.as_ref().map(|g| g.name.clone()),
            "autostart": c.autostart,
            "stop_exit_codes": c.stop_exit_codes,
            "shutdown_with_message": c.shutdown_with_message,
            "node_cluster": c.node_cluster,
            "cron_restart": c.cron_restart.as_ref().map(|c| c.pattern().to_string()),
            "watch": c.watch.as_ref().map(|w| serde_json::json!({
                "paths": w.paths,
                "ignore": w.ignore,
                "debounce_ms": w.debounce.as_millis() as u64,
            })),
            "env_keys": c.env.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
            "env_file": c.env_file,
            "log_files": files,
            "status": self.status(samples),
        })
    }

    /// Sends `sig` to the process group of every running worker of the app.
    pub async fn signal(&self, sig: i32) -> AppResult {
        let pending: Vec<_> = self.slots().iter().map(|s| s.signal(sig)).collect();
        let mut n = 0;
        for fut in pending {
            n += usize::from(fut.await);
        }
        self.result_ok(&format!("sent to {n} worker(s)"))
    }

    /// Empties the app's current log files and removes the rotated ones, off the event loop.
    pub async fn flush_logs(&self) -> Result<usize, String> {
        let (dir, logs) = self.ctx.logs.files();
        let name = self.name.clone();
        tokio::task::spawn_blocking(move || crate::logs::flush(&dir, &name, &logs))
            .await
            .unwrap_or_else(|e| Err(format!("internal error while flushing: {e}")))
    }

    /// The app's log files and live lines.
    pub fn logs(&self) -> &crate::logs::AppLogs {
        &self.ctx.logs
    }
}

/// Waits for every slot's answer.
async fn collect(pending: Vec<(u32, impl Future<Output = crate::slot::ReplaceResult>)>) -> Outcome {
    let mut failures = Vec::new();
    let mut cancelled = false;
    for (slot, fut) in pending {
        if let Err(e) = fut.await {
            cancelled |= e == SlotError::Cancelled;
            failures.push(format!("slot {slot}: {e}"));
        }
    }
    match (cancelled, failures.is_empty()) {
        (true, _) => Outcome::Cancelled,
        (false, true) => Outcome::Done,
        (false, false) => Outcome::Failed(failures),
    }
}

/// A digest of the app's table, environment values included (never shown).
fn digest(cfg: &AppConfig) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    format!("{cfg:?}").hash(&mut h);
    for (k, v) in &cfg.env {
        (k, v).hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn reason_kind(r: RestartReason) -> &'static str {
    match r {
        RestartReason::Config => "config",
        RestartReason::Cron => "cron",
        _ => "reload",
    }
}
