//! One app: its slots, its sockets, and the operations run on it.
//!
//! Operations that replace workers (start, stop, restart, and later reload and
//! scale) run one at a time per app: a second request while one runs is
//! answered "busy". Each operation runs in a task of its own, so a client that
//! disconnects does not cancel a rollout half-way.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use sup_config::AppConfig;
use sup_proto::{AppResult, AppStatus, InstanceStatus};

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
    _sockets: AppSockets,
}

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
            let sock = Arc::new(sockets.for_slot(&spec.cfg)?);
            let handle = spawn_slot(slot, ctx.clone(), spec.clone(), sock.clone());
            slots.push(Slot { handle, _sockets: sock });
        }
        Ok(Arc::new(App {
            name: spec.cfg.name.clone(),
            ctx,
            inner: Mutex::new(Inner { spec, slots, _sockets: sockets }),
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
    pub fn status(&self) -> AppStatus {
        let instances = self
            .slots()
            .iter()
            .map(|s| {
                let v = s.view.borrow();
                InstanceStatus {
                    slot: v.slot,
                    pid: v.pid.map(|p| p as u32),
                    state: v.state,
                    restarts: v.restarts,
                    uptime_ms: v.since.map(|t| t.elapsed().as_millis() as u64),
                    cpu_percent: None,
                    rss_bytes: None,
                    reason: v.reason.clone(),
                    status_text: v.status_text.clone(),
                    last_restart_reason: v.last_restart_reason,
                    version: v.version,
                }
            })
            .collect();
        let rollout = self.op_name.lock().unwrap_or_else(|e| e.into_inner()).map(str::to_string);
        AppStatus { name: self.name.clone(), instances, rollout }
    }

    /// Starts every slot that is not running; waits until all are ready or failed.
    pub async fn start(self: &Arc<Self>) -> AppResult {
        self.run_op("start", |app| async move {
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
    pub async fn stop(self: &Arc<Self>) -> AppResult {
        self.run_op("stop", |app| async move {
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
    pub async fn restart(self: &Arc<Self>) -> AppResult {
        self.run_op("restart", |app| async move {
            let slots = app.slots();
            let stops: Vec<_> = slots.iter().map(|s| s.stop()).collect();
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
    async fn run_op<F, Fut>(self: &Arc<Self>, name: &'static str, f: F) -> AppResult
    where
        F: FnOnce(Arc<App>) -> Fut + Send + 'static,
        Fut: Future<Output = AppResult> + Send + 'static,
    {
        let guard = match self.op.clone().try_lock_owned() {
            Ok(g) => g,
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

    /// The shared worker context of this app.
    pub fn ctx(&self) -> &Arc<WorkerCtx> {
        &self.ctx
    }
}
