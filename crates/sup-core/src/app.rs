//! One app: its slots, its sockets, and the operations run on it.
//!
//! Operations that replace workers (start, stop, restart, and later reload and
//! scale) run one at a time per app: a second request while one runs is
//! answered "busy". Each operation runs in a task of its own, so a client that
//! disconnects does not cancel a rollout half-way.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use sup_config::AppConfig;
use sup_proto::{AppResult, AppStatus, InstanceStatus, RestartReason, RolloutEvent};
use tokio::sync::mpsc;

use crate::listeners::{AppSockets, ListenError, SlotSockets};
use crate::slot::{spawn_slot, SlotHandle};
use crate::worker::{AppSpec, WorkerCtx};

struct Slot {
    handle: SlotHandle,
    // Kept open for the slot's whole life; workers come and go.
    _sockets: Arc<SlotSockets>,
}

struct Inner {
    spec: Arc<AppSpec>,
    slots: Vec<Slot>,
    sockets: AppSockets,
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
}

impl App {
    /// Binds the app's sockets and creates its slots, all stopped.
    pub fn new(ctx: Arc<WorkerCtx>, cfg: AppConfig) -> Result<Arc<App>, ListenError> {
        let sockets = AppSockets::new(&cfg)?;
        let spec = Arc::new(AppSpec { cfg, version: 1 });
        let mut slots = Vec::new();
        for slot in 0..spec.cfg.instances {
            let sock = Arc::new(sockets.for_slot(&spec.cfg, slot)?);
            let handle = spawn_slot(slot, ctx.clone(), spec.clone(), sock.clone());
            slots.push(Slot { handle, _sockets: sock });
        }
        Ok(Arc::new(App {
            name: spec.cfg.name.clone(),
            ctx,
            inner: Mutex::new(Inner { spec, slots, sockets }),
            op: Arc::default(),
            op_name: Mutex::new(None),
        }))
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Handles of the current slots.
    pub fn slots(&self) -> Vec<SlotHandle> {
        self.inner().slots.iter().map(|s| s.handle.clone()).collect()
    }

    /// The spec new workers run.
    pub fn spec(&self) -> Arc<AppSpec> {
        self.inner().spec.clone()
    }

    /// The app's status, from the slots' last published views.
    pub fn status(&self, samples: &crate::monitor::Samples) -> AppStatus {
        // Looked up under the lock, not copied: status is answered often.
        let samples = samples.lock().unwrap_or_else(|e| e.into_inner());
        let instances = self
            .slots()
            .iter()
            .map(|s| {
                let v = s.view.borrow();
                let sample = samples.get(&(self.name.clone(), s.slot)).filter(|x| Some(x.pid) == v.pid).copied();
                InstanceStatus {
                    slot: v.slot,
                    pid: v.pid.map(|p| p as u32),
                    state: v.state,
                    restarts: v.restarts,
                    uptime_ms: v.since.map(|t| t.elapsed().as_millis() as u64),
                    cpu_percent: sample.map(|x| (x.cpu_percent * 10.0).round() / 10.0),
                    rss_bytes: sample.map(|x| x.rss_bytes),
                    tree_rss_bytes: sample.map(|x| x.tree_rss_bytes),
                    cpu_seconds: sample.map(|x| x.cpu_seconds),
                    reason: v.reason.clone(),
                    status_text: v.status_text.clone(),
                    last_restart_reason: v.last_restart_reason,
                    version: v.version,
                }
            })
            .collect();
        let rollout = self.op_name.lock().unwrap_or_else(|e| e.into_inner()).map(str::to_string);
        AppStatus { name: self.name.clone(), log_lines_lost: self.ctx.logs.lost(), instances, rollout }
    }

    /// `cron_restart`: a rolling restart onto the app's current configuration,
    /// read once the app is free; skipped while another operation runs or when
    /// no worker runs (an operator stopped the app).
    pub async fn cron_restart(self: &Arc<Self>) -> AppResult {
        self.run_op("cron restart", false, |app| async move {
            if !app.is_running() {
                return app.result_ok("skipped: no worker runs");
            }
            let cfg = app.spec().cfg.clone();
            let (tx, _rx) = mpsc::unbounded_channel();
            app.roll(cfg, RestartReason::Cron, &tx).await
        })
        .await
    }

    /// Whether any slot has a worker process.
    pub fn is_running(&self) -> bool {
        self.slots().iter().any(|s| s.view.borrow().pid.is_some())
    }

    /// Starts every slot that is not running; waits until all are ready or failed.
    pub async fn start(self: &Arc<Self>, wait: bool) -> AppResult {
        self.run_op("start", wait, |app| async move {
            let spec = app.spec();
            let pending: Vec<_> = app.slots().iter().map(|s| (s.slot, s.start(spec.clone()))).collect();
            let mut failures = Vec::new();
            let total = pending.len();
            for (slot, fut) in pending {
                if let Err(e) = fut.await {
                    failures.push(format!("slot {slot}: {e}"));
                }
            }
            app.result(total, "started", failures)
        })
        .await
    }

    /// Stops every slot gracefully; waits until all workers have exited.
    pub async fn stop(self: &Arc<Self>, wait: bool) -> AppResult {
        self.run_op("stop", wait, |app| async move {
            let slots = app.slots();
            let pending: Vec<_> = slots.iter().map(|s| s.stop()).collect();
            for fut in pending {
                fut.await;
            }
            app.result(slots.len(), "stopped", Vec::new())
        })
        .await
    }

    /// Stops then starts every slot (PM2's `restart`; `reload` is the zero-downtime one).
    pub async fn restart(self: &Arc<Self>, wait: bool) -> AppResult {
        self.run_op("restart", wait, |app| async move {
            let slots = app.slots();
            // Sockets stay open: clients wait for the new workers instead of being refused.
            let stops: Vec<_> = slots.iter().map(|s| s.stop_with(true)).collect();
            for fut in stops {
                fut.await;
            }
            let spec = app.spec();
            let starts: Vec<_> = slots.iter().map(|s| (s.slot, s.start(spec.clone()))).collect();
            let mut failures = Vec::new();
            for (slot, fut) in starts {
                if let Err(e) = fut.await {
                    failures.push(format!("slot {slot}: {e}"));
                }
            }
            app.result(slots.len(), "restarted", failures)
        })
        .await
    }

    /// Rolls every slot onto `cfg`, `reload_parallelism` at a time: each new
    /// worker must be ready before its old one drains. On the first failure the
    /// rollout stops and the slots already replaced go back to the previous version.
    pub async fn reload(
        self: &Arc<Self>,
        cfg: AppConfig,
        reason: RestartReason,
        wait: bool,
        progress: Progress,
    ) -> AppResult {
        self.run_op("reload", wait, move |app| async move { app.roll(cfg, reason, &progress).await }).await
    }

    async fn roll(self: &Arc<Self>, cfg: AppConfig, reason: RestartReason, progress: &Progress) -> AppResult {
        let old = self.spec();
        if cfg.listen != old.cfg.listen || cfg.listen_backlog != old.cfg.listen_backlog {
            return self.fail("listen addresses changed: `supctl config apply` re-creates the app's sockets".into());
        }
        let new = Arc::new(AppSpec { cfg, version: old.version + 1 });
        let slots = self.slots();
        let _ = progress.send(RolloutEvent::Started {
            app: self.name.clone(),
            kind: reason_kind(reason).into(),
            slots: slots.iter().map(|s| s.slot).collect(),
            from_version: old.version,
            to_version: new.version,
        });
        let parallel = new.cfg.reload_parallelism.max(1) as usize;
        let mut failure = None;
        for chunk in slots.chunks(parallel) {
            let t0 = Instant::now();
            let pending: Vec<_> = chunk.iter().map(|s| (s.slot, s.replace(new.clone(), reason))).collect();
            for (slot, fut) in pending {
                match fut.await {
                    Ok(r) => {
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
                        let _ = progress.send(RolloutEvent::SlotFailed {
                            app: self.name.clone(),
                            slot,
                            message: e.clone(),
                        });
                        failure.get_or_insert((slot, e));
                    }
                }
            }
            if failure.is_some() {
                break;
            }
        }
        let Some((slot, why)) = failure else {
            let mut inner = self.inner();
            let mut spec = AppSpec { cfg: new.cfg.clone(), version: new.version };
            spec.cfg.instances = inner.slots.len() as u32;
            inner.spec = Arc::new(spec);
            drop(inner);
            let n = slots.len();
            self.ctx.metrics.rollout(&self.name, reason_kind(reason), true);
            let message = format!("rolled {n}/{n} instances to version {}", new.version);
            return AppResult { app: self.name.clone(), ok: true, message };
        };
        self.ctx.metrics.rollout(&self.name, reason_kind(reason), false);
        // Every slot that now runs (or tries to run) the new version goes back.
        let touched: Vec<_> = slots.iter().filter(|s| s.view.borrow().version == new.version).cloned().collect();
        let ids: Vec<u32> = touched.iter().map(|s| s.slot).collect();
        if !ids.is_empty() {
            let _ = progress.send(RolloutEvent::RollingBack { app: self.name.clone(), slots: ids.clone() });
        }
        let pending: Vec<_> = touched.iter().map(|s| (s.slot, s.replace(old.clone(), reason))).collect();
        let mut back_failures = Vec::new();
        for (s, fut) in pending {
            let (ok, message) = match fut.await {
                Ok(r) => (true, format!("back on version {} (pid {})", old.version, r.new_pid)),
                Err(e) => {
                    back_failures.push(s);
                    (false, e)
                }
            };
            let _ = progress.send(RolloutEvent::SlotRolledBack { app: self.name.clone(), slot: s, ok, message });
        }
        let mut message = format!(
            "{} of `{}` failed at slot {slot}: {why}\nrolled back {} slot(s) to version {}; the others were not touched",
            reason_kind(reason),
            self.name,
            ids.len(),
            old.version
        );
        if !back_failures.is_empty() {
            message.push_str(&format!("\nslots {back_failures:?} could not be put back; see `supctl status`"));
        }
        AppResult { app: self.name.clone(), ok: false, message }
    }

    /// Changes the number of instances: new slots start (and must become ready)
    /// on fresh sockets; removed slots drain, then their sockets close.
    pub async fn scale(self: &Arc<Self>, n: u32, wait: bool, progress: Progress) -> AppResult {
        if n == 0 {
            return self.fail("instances must be at least 1; use `supctl stop` to stop an app".into());
        }
        self.run_op("scale", wait, move |app| async move { app.scale_now(n, &progress).await }).await
    }

    async fn scale_now(self: &Arc<Self>, n: u32, progress: &Progress) -> AppResult {
        let spec = self.spec();
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
                let sockets = {
                    let inner = self.inner();
                    inner.sockets.for_slot(&spec.cfg, slot)
                };
                let sockets = match sockets {
                    Ok(s) => Arc::new(s),
                    Err(e) => return self.fail(e.to_string()),
                };
                let handle = spawn_slot(slot, self.ctx.clone(), spec.clone(), sockets.clone());
                self.inner().slots.push(Slot { handle: handle.clone(), _sockets: sockets });
                added.push(handle);
            }
            let pending: Vec<_> = added.iter().map(|h| (h.slot, h.start(spec.clone()))).collect();
            let mut failures = Vec::new();
            for (slot, fut) in pending {
                match fut.await {
                    Ok(r) => {
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
                            message: e.clone(),
                        });
                        failures.push(format!("slot {slot}: {e}"));
                    }
                }
            }
            if !failures.is_empty() {
                // Back to the old size: the new slots never served.
                self.remove_slots(current, progress).await;
                return AppResult {
                    app: self.name.clone(),
                    ok: false,
                    message: format!(
                        "scale of `{}` to {n} failed; back at {current}:\n{}",
                        self.name,
                        failures.join("\n")
                    ),
                };
            }
        } else if n < current {
            self.remove_slots(n, progress).await;
        }
        self.ctx.metrics.rollout(&self.name, "scale", true);
        let mut cfg = spec.cfg.clone();
        cfg.instances = n;
        self.inner().spec = Arc::new(AppSpec { cfg, version: spec.version });
        AppResult { app: self.name.clone(), ok: true, message: format!("scaled from {current} to {n} instances") }
    }

    /// Stops slots `keep..` and closes their sockets once their workers are gone.
    async fn remove_slots(&self, keep: u32, progress: &Progress) {
        let doomed: Vec<SlotHandle> = self.slots().into_iter().filter(|s| s.slot >= keep).rev().collect();
        // One at a time: connections migrating out of a closing socket must
        // not land in another socket that is closing at the same instant.
        for s in doomed {
            s.stop().await;
            let _ = progress.send(RolloutEvent::SlotRemoved { app: self.name.clone(), slot: s.slot });
        }
        // Dropping the last handle ends the slot task; dropping the sockets closes
        // them, and with net.ipv4.tcp_migrate_req the kernel moves connections
        // still queued in them to the remaining slots.
        self.inner().slots.retain(|s| s.handle.slot < keep);
    }

    /// Replaces one slot's worker (memory limit) unless another operation runs on the app;
    /// returns false when it is busy, so the caller tries again at its next sample.
    pub fn try_replace_slot(self: &Arc<Self>, slot: u32, reason: RestartReason) -> Option<tokio::task::JoinHandle<()>> {
        let guard = self.op.clone().try_lock_owned().ok()?;
        let handle = self.slots().into_iter().find(|s| s.slot == slot)?;
        let spec = self.spec();
        let name = self.name.clone();
        Some(tokio::spawn(async move {
            if let Err(e) = handle.replace(spec, reason).await {
                tracing::warn!(app = %name, slot, "replacement failed: {e}");
            }
            drop(guard);
        }))
    }

    /// A successful result with `message`.
    pub fn result_ok(&self, message: &str) -> AppResult {
        AppResult { app: self.name.clone(), ok: true, message: message.to_string() }
    }

    fn fail(&self, message: String) -> AppResult {
        AppResult { app: self.name.clone(), ok: false, message }
    }

    /// Stops every slot, ignoring any operation in progress (supd is shutting down).
    pub async fn shutdown(&self) {
        let slots = self.slots();
        let pending: Vec<_> = slots.iter().map(|s| s.stop()).collect();
        for fut in pending {
            fut.await;
        }
    }

    /// SIGKILLs every worker of the app.
    pub fn kill(&self) {
        for s in self.slots() {
            s.kill();
        }
    }

    fn result(&self, total: usize, verb: &str, failures: Vec<String>) -> AppResult {
        let ok = failures.is_empty();
        let message = if ok {
            format!("{verb} {total}/{total} instances")
        } else {
            format!("{} of {total} instances failed:\n{}", failures.len(), failures.join("\n"))
        };
        AppResult { app: self.name.clone(), ok, message }
    }

    /// Runs one operation at a time per app, in its own task.
    async fn run_op<F, Fut>(self: &Arc<Self>, name: &'static str, wait: bool, f: F) -> AppResult
    where
        F: FnOnce(Arc<App>) -> Fut + Send + 'static,
        Fut: Future<Output = AppResult> + Send + 'static,
    {
        let guard = match self.op.clone().try_lock_owned() {
            Ok(g) => g,
            Err(_) if wait => self.op.clone().lock_owned().await,
            Err(_) => {
                let running = self.op_name.lock().unwrap_or_else(|e| e.into_inner()).unwrap_or("operation");
                return AppResult {
                    app: self.name.clone(),
                    ok: false,
                    message: format!("busy: a {running} of `{}` is in progress", self.name),
                };
            }
        };
        *self.op_name.lock().unwrap_or_else(|e| e.into_inner()) = Some(name);
        let app = self.clone();
        let task = tokio::spawn(async move {
            let result = f(app.clone()).await;
            *app.op_name.lock().unwrap_or_else(|e| e.into_inner()) = None;
            drop(guard);
            result
        });
        task.await.unwrap_or_else(|e| AppResult {
            app: self.name.clone(),
            ok: false,
            message: format!("internal error during {name}: {e}"),
        })
    }

    /// Everything about the app for `supctl describe`: effective configuration
    /// (environment keys only, never values), slots and log files.
    pub fn describe(&self, samples: &crate::monitor::Samples) -> serde_json::Value {
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
            "env_keys": c.env.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
            "env_file": c.env_file,
            "log_files": files,
            "status": self.status(samples),
        })
    }

    /// Sends `sig` to the process group of every running worker of the app.
    pub fn signal(&self, sig: i32) -> AppResult {
        let pids: Vec<i32> = self.slots().iter().filter_map(|s| s.view.borrow().pid).collect();
        for pid in &pids {
            crate::spawner::kill_group(*pid, sig);
        }
        self.result_ok(&format!("sent to {} worker(s)", pids.len()))
    }

    /// Empties the app's current log files and removes the rotated ones.
    pub fn flush_logs(&self) -> Result<usize, String> {
        let (dir, logs) = self.ctx.logs.files();
        let mut n = 0;
        for (_, name) in crate::logs::file_names(&self.name, &logs) {
            let path = dir.join(name);
            // The writer appends (O_APPEND), so it simply continues at the new end.
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path) {
                f.set_len(0).map_err(|e| format!("cannot empty {}: {e}", path.display()))?;
                n += 1;
            }
            for old in crate::logs::rotated_files(&path) {
                std::fs::remove_file(&old).map_err(|e| format!("cannot remove {}: {e}", old.display()))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// The app's log files and live lines.
    pub fn logs(&self) -> &crate::logs::AppLogs {
        &self.ctx.logs
    }
}

fn reason_kind(r: RestartReason) -> &'static str {
    match r {
        RestartReason::Config => "config",
        RestartReason::Cron => "cron",
        _ => "reload",
    }
}
