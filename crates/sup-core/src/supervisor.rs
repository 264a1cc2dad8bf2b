//! The supervisor: every app of a configuration, and the verbs run on them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sup_config::{AppConfig, Config};
use sup_proto::{ActionRequest, ActionResponse, AppResult, RestartReason, StatusResponse};

use crate::app::{App, Progress};
use crate::logs::AppLogs;
use crate::reaper::Reaper;
use crate::spawner::Spawner;
use crate::spec::{Recorder, Samples};
use crate::worker::WorkerCtx;

/// Why supd could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A folder could not be created.
    #[error("cannot create {what} `{path}`: {source}")]
    Dir {
        /// Which folder.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A listener could not be bound.
    #[error(transparent)]
    Listen(#[from] crate::listeners::ListenError),
    /// Internal machinery (signal handlers, threads) could not start.
    #[error("{0}")]
    Setup(String),
}

/// A request the control API cannot carry out.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The named app does not exist.
    #[error("no app named `{0}`")]
    UnknownApp(String),
    /// The request was malformed.
    #[error("{0}")]
    BadRequest(String),
    /// supd is shutting down; nothing new is started.
    #[error("supd is shutting down")]
    ShuttingDown,
    /// The configuration file on disk is invalid; nothing was changed.
    #[error("the configuration file is invalid; nothing was changed: {0}")]
    InvalidConfig(String),
    /// `add` or `remove` could not change the file; it is as it was.
    #[error("{0}; the file was not changed")]
    FileNotChanged(String),
}

/// The verbs of `POST /v1/<verb>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// Start stopped slots.
    Start,
    /// Stop every slot.
    Stop,
    /// Stop then start.
    Restart,
}

/// What creating an app needs besides its configuration.
struct Shared {
    spawner: Spawner,
    recorder: Arc<dyn Recorder>,
    events: crate::spec::Events,
    base_env: Arc<Vec<(String, String)>>,
    notify_dir: PathBuf,
    history_dir: PathBuf,
    // One history per app name for supd's whole life: an app re-created by
    // `config apply` goes on writing the same one, never a second copy.
    histories: Mutex<std::collections::HashMap<String, crate::history::History>>,
    log_dir: PathBuf,
}

/// Everything supd supervises.
pub struct Supervisor {
    apps: Mutex<Vec<Arc<App>>>,
    /// The monitor's last samples.
    pub samples: Samples,
    /// Lifecycle events of every app, for `supctl events`.
    pub events: crate::spec::Events,
    config: Mutex<Config>,
    shared: Arc<Shared>,
    // Serialises config apply with itself; per-app operations have their own lock.
    apply: tokio::sync::Mutex<()>,
    initial: Mutex<Vec<tokio::task::JoinHandle<AppResult>>>,
    // Set once shutdown begins: nothing is added, started or rolled after that.
    closing: std::sync::atomic::AtomicBool,
    // Why the last config apply failed (None after one that succeeded), for
    // systemd's STATUS= line: `systemctl status` must say why a reload failed.
    apply_failure: tokio::sync::watch::Sender<Option<String>>,
}

/// Variables meant for supd itself, never passed on to workers.
const OWN_VARS: &[&str] = &[
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "SUPD_CONFIG",
    "FDSTORE",
];

impl Supervisor {
    /// Creates folders, binds every listener and starts the autostart apps
    /// (without waiting for them). Counters go to `recorder`. The drivers
    /// (monitor, cron, metrics, control) are started by the caller on top.
    pub async fn start(config: Config, recorder: Arc<dyn Recorder>) -> Result<Arc<Supervisor>, StartError> {
        let sc = &config.supervisor;
        let notify_dir = sc.run_dir.join("notify");
        for (what, path) in [("run_dir", &sc.run_dir), ("notify folder", &notify_dir), ("log_dir", &sc.log_dir)] {
            std::fs::create_dir_all(path).map_err(|source| StartError::Dir { what, path: path.clone(), source })?;
        }
        let reaper = Reaper::start().map_err(|e| StartError::Setup(format!("cannot watch SIGCHLD: {e}")))?;
        let spawner = Spawner::start(reaper).map_err(|e| StartError::Setup(format!("cannot start spawner: {e}")))?;
        let base_env: Arc<Vec<(String, String)>> =
            Arc::new(std::env::vars().filter(|(k, _)| !OWN_VARS.contains(&k.as_str())).collect());
        let history_dir = sc.run_dir.join("history");
        let events = crate::spec::Events::default();
        let shared = Shared {
            spawner,
            recorder,
            events: events.clone(),
            base_env,
            notify_dir,
            history_dir,
            histories: Mutex::default(),
            log_dir: sc.log_dir.clone(),
        };
        let mut apps = Vec::new();
        for cfg in &config.apps {
            apps.push(shared.new_app(cfg.clone())?);
        }
        let sup = Arc::new(Supervisor {
            apps: Mutex::new(apps),
            samples: Arc::default(),
            events: events.clone(),
            config: Mutex::new(config),
            shared: Arc::new(shared),
            apply: tokio::sync::Mutex::new(()),
            initial: Mutex::new(Vec::new()),
            closing: std::sync::atomic::AtomicBool::new(false),
            apply_failure: tokio::sync::watch::Sender::new(None),
        });
        let mut starts = Vec::new();
        for app in sup.apps() {
            if app.spec().cfg.autostart {
                starts.push(spawn_start(app));
            }
        }
        *sup.initial.lock().unwrap_or_else(|e| e.into_inner()) = starts;
        Ok(sup)
    }

    /// Waits until every autostart app's first start has finished (ready or failed).
    pub async fn started(&self) -> Vec<AppResult> {
        let starts = std::mem::take(&mut *self.initial.lock().unwrap_or_else(|e| e.into_inner()));
        join(starts).await
    }

    /// One line for systemd's STATUS=: apps, workers ready, and what is wrong.
    pub fn summary(&self) -> String {
        let apps = self.apps();
        let (mut ready, mut total, mut errored) = (0, 0, Vec::new());
        for app in &apps {
            for slot in app.slots() {
                total += 1;
                match slot.view.borrow().state {
                    sup_proto::WorkerState::Ready => ready += 1,
                    sup_proto::WorkerState::Errored => errored.push(format!("{}#{}", app.name, slot.slot)),
                    _ => {}
                }
            }
        }
        let workers = if total == 1 { "worker" } else { "workers" };
        let mut s = format!("{}, {ready}/{total} {workers} ready", sup_proto::count(apps.len(), "app"));
        if !errored.is_empty() {
            s.push_str(&format!("; errored: {}", errored.join(", ")));
        }
        s
    }

    /// The apps, in configuration order.
    pub fn apps(&self) -> Vec<Arc<App>> {
        self.apps.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The configuration file supd runs from.
    pub fn config_path(&self) -> PathBuf {
        self.config.lock().unwrap_or_else(|e| e.into_inner()).path.clone()
    }

    fn find(&self, name: &str) -> Result<Arc<App>, ApiError> {
        self.apps().into_iter().find(|a| a.name == name).ok_or_else(|| ApiError::UnknownApp(name.to_string()))
    }

    fn targets(&self, app: &Option<String>, all: bool) -> Result<Vec<Arc<App>>, ApiError> {
        match (app, all) {
            (Some(_), true) => Err(ApiError::BadRequest("give either `app` or `all`, not both".into())),
            (None, false) => Err(ApiError::BadRequest("give `app` or `all: true`".into())),
            (Some(name), false) => Ok(vec![self.find(name)?]),
            (None, true) => Ok(self.apps()),
        }
    }

    /// The status of one app or all; never waits on a worker or a sample.
    pub fn status(&self, app: Option<&str>) -> Result<StatusResponse, ApiError> {
        let apps = match app {
            Some(name) => vec![self.find(name)?.status(&self.samples)],
            None => self.apps().iter().map(|a| a.status(&self.samples)).collect(),
        };
        Ok(StatusResponse { apps })
    }

    fn refuse_if_closing(&self) -> Result<(), ApiError> {
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ApiError::ShuttingDown);
        }
        Ok(())
    }

    /// Runs a verb on one app or all of them, the apps in parallel.
    pub async fn action(&self, verb: Verb, req: &ActionRequest) -> Result<ActionResponse, ApiError> {
        if verb != Verb::Stop {
            self.refuse_if_closing()?;
        }
        let wait = req.wait;
        let tasks: Vec<_> = self
            .targets(&req.app, req.all)?
            .into_iter()
            .map(|app| {
                tokio::spawn(async move {
                    match verb {
                        Verb::Start => app.start(wait).await,
                        Verb::Stop => app.stop().await,
                        Verb::Restart => app.restart(wait).await,
                    }
                })
            })
            .collect();
        Ok(ActionResponse { results: join(tasks).await })
    }

    /// Re-reads the configuration file and rolls the named apps onto it (validation happens before anything changes).
    pub async fn reload(
        &self,
        req: &ActionRequest,
        uid: Option<u32>,
        progress: Progress,
    ) -> Result<ActionResponse, ApiError> {
        self.refuse_if_closing()?;
        if req.canary.is_some() && req.all {
            return Err(ApiError::BadRequest("`canary` works on one app, not `all`".into()));
        }
        if req.canary == Some(0) {
            return Err(ApiError::BadRequest("`canary` must be at least 1".into()));
        }
        let targets = self.targets(&req.app, req.all)?;
        let config = self.read_config().await?;
        let mut tasks = Vec::new();
        let mut results = Vec::new();
        for app in targets {
            let Some(cfg) = config.apps.iter().find(|a| a.name == app.name).cloned() else {
                results.push(AppResult {
                    app: app.name.clone(),
                    ok: false,
                    message: format!(
                        "`{}` is no longer in {}; `supctl config apply` removes it",
                        app.name,
                        config.path.display()
                    ),
                });
                continue;
            };
            let (wait, canary, progress) = (req.wait, req.canary, progress.clone());
            tasks.push(tokio::spawn(async move {
                app.reload(cfg, RestartReason::Reload, uid, canary, wait, progress).await
            }));
        }
        results.extend(join(tasks).await);
        Ok(ActionResponse { results })
    }

    /// Rolls an app back onto an earlier version.
    pub async fn rollback(
        &self,
        app: &str,
        to: Option<u64>,
        uid: Option<u32>,
        wait: bool,
        progress: Progress,
    ) -> Result<ActionResponse, ApiError> {
        self.refuse_if_closing()?;
        let app = self.find(app)?;
        Ok(ActionResponse { results: vec![app.rollback(to, uid, wait, progress).await] })
    }

    /// Rolls the rest of an app's paused canary.
    pub async fn promote(
        &self,
        app: &str,
        uid: Option<u32>,
        wait: bool,
        progress: Progress,
    ) -> Result<ActionResponse, ApiError> {
        self.refuse_if_closing()?;
        let app = self.find(app)?;
        Ok(ActionResponse { results: vec![app.promote(uid, wait, progress).await] })
    }

    /// An app's version history.
    pub fn history(&self, app: &str) -> Result<sup_proto::HistoryResponse, ApiError> {
        let app = self.find(app)?;
        Ok(sup_proto::HistoryResponse { app: app.name.clone(), history: app.history() })
    }

    /// Changes an app's number of instances.
    pub async fn scale(&self, app: &str, n: u32, wait: bool, progress: Progress) -> Result<ActionResponse, ApiError> {
        self.refuse_if_closing()?;
        let app = self.find(app)?;
        let max = self.config.lock().unwrap_or_else(|e| e.into_inner()).supervisor.max_workers;
        let others: u64 = self.apps().iter().filter(|a| a.name != app.name).map(|a| a.slots().len() as u64).sum();
        if others + u64::from(n) > u64::from(max) {
            return Err(ApiError::BadRequest(format!(
                "scaling `{}` to {n} would run {} workers in all, more than max_workers = {max}",
                app.name,
                others + u64::from(n)
            )));
        }
        let result = app.scale(n, wait, progress).await;
        Ok(ActionResponse { results: vec![result] })
    }

    /// Re-reads the whole file and applies the difference: new apps start,
    /// removed ones stop, changed ones roll. An invalid file changes nothing.
    pub async fn apply(&self, uid: Option<u32>, progress: Progress) -> Result<ActionResponse, ApiError> {
        let outcome = self.apply_file(uid, progress).await;
        // Shutting down: the file was never looked at.
        if !matches!(outcome, Err(ApiError::ShuttingDown)) {
            self.record_apply(&outcome);
        }
        outcome
    }

    /// Remembers how an apply of the file ended, for systemd's STATUS=.
    fn record_apply(&self, outcome: &Result<ActionResponse, ApiError>) {
        let failure = match outcome {
            Ok(r) => {
                let failed: Vec<&str> = r.results.iter().filter(|r| !r.ok).map(|r| r.app.as_str()).collect();
                (!failed.is_empty()).then(|| format!("config apply failed for {}", failed.join(", ")))
            }
            Err(e) => {
                let first: String = e.to_string().lines().next().unwrap_or("").chars().take(200).collect();
                Some(format!("config NOT applied: {first}"))
            }
        };
        self.apply_failure.send_replace(failure);
    }

    /// Why the last config apply failed, or None if it succeeded; changes as applies end.
    pub fn apply_failure(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.apply_failure.subscribe()
    }

    async fn apply_file(&self, uid: Option<u32>, progress: Progress) -> Result<ActionResponse, ApiError> {
        self.refuse_if_closing()?;
        let _serial = self.apply.lock().await;
        self.refuse_if_closing()?;
        let new = self.read_config().await?;
        self.apply_config(new, uid, progress).await
    }

    /// `supctl add`: writes the app's table into the file supd runs from, then applies the
    /// file as `config apply` does. Serialised with `apply`, so the file has one writer.
    pub async fn add_app(
        &self,
        req: sup_proto::AddRequest,
        uid: Option<u32>,
        progress: Progress,
    ) -> Result<ActionResponse, ApiError> {
        let app = sup_config::NewApp {
            name: req.name,
            command: req.command,
            instances: req.instances,
            listen: req.listen,
            port: req.port,
            ready: req.ready,
            env: req.env,
            cwd: req.cwd,
        };
        self.edit_file(uid, progress, move |path| sup_config::add_app(path, &app)).await
    }

    /// `supctl remove`: removes the app's table from the file, then applies the file (which
    /// stops the app).
    pub async fn remove_app(
        &self,
        name: String,
        uid: Option<u32>,
        progress: Progress,
    ) -> Result<ActionResponse, ApiError> {
        self.edit_file(uid, progress, move |path| sup_config::remove_app(path, &name)).await
    }

    /// Runs `edit` on the file off the event loop (it reads, validates, writes and renames),
    /// then applies the configuration it wrote.
    async fn edit_file<F>(&self, uid: Option<u32>, progress: Progress, edit: F) -> Result<ActionResponse, ApiError>
    where
        F: FnOnce(&std::path::Path) -> Result<Config, sup_config::EditError> + Send + 'static,
    {
        self.refuse_if_closing()?;
        let _serial = self.apply.lock().await;
        self.refuse_if_closing()?;
        let path = self.config_path();
        let new = tokio::task::spawn_blocking(move || edit(&path))
            .await
            .map_err(|e| ApiError::FileNotChanged(format!("internal error while editing the file: {e}")))?
            .map_err(|e| ApiError::FileNotChanged(e.to_string()))?;
        // The file changed and is applied: its outcome is the file's, as for `config apply`.
        let outcome = self.apply_config(new, uid, progress).await;
        self.record_apply(&outcome);
        outcome
    }

    /// Makes the running apps match `new`; the caller holds the `apply` lock.
    async fn apply_config(
        &self,
        new: Config,
        uid: Option<u32>,
        progress: Progress,
    ) -> Result<ActionResponse, ApiError> {
        let old = self.config.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut results = Vec::new();
        if new.supervisor != old.supervisor {
            results.push(AppResult {
                app: "[supervisor]".into(),
                ok: true,
                message: "changed settings of [supervisor] take effect when supd restarts".into(),
            });
        }
        let mut tasks = Vec::new();
        for app in self.apps() {
            if !new.apps.iter().any(|a| a.name == app.name) {
                tasks.push(tokio::spawn(async move {
                    app.shutdown().await;
                    AppResult { app: app.name.clone(), ok: true, message: "removed: stopped".into() }
                }));
            }
        }
        for cfg in &new.apps {
            let existing = self.apps().into_iter().find(|a| a.name == cfg.name);
            let cfg = cfg.clone();
            let progress = progress.clone();
            match existing {
                None => match self.new_app_off_loop(cfg).await {
                    Ok(app) => {
                        {
                            // Checked under the lock shutdown takes its list under: an app
                            // is either in that list or never added.
                            let mut apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
                            if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
                                results.push(app.fail_closing());
                                continue;
                            }
                            apps.push(app.clone());
                        }
                        tasks.push(tokio::spawn(async move {
                            let r =
                                if app.spec().cfg.autostart { app.start(true).await } else { app.result_ok("added") };
                            AppResult { message: format!("added: {}", r.message), ..r }
                        }));
                    }
                    Err(e) => results.push(AppResult { app: e.app.clone(), ok: false, message: e.to_string() }),
                },
                Some(app) => {
                    let current = app.spec().cfg.clone();
                    if current == cfg {
                        continue;
                    }
                    if current.listen != cfg.listen || current.listen_backlog != cfg.listen_backlog {
                        // New sockets: the app is re-created (this one change is not zero-downtime).
                        match self.replace_app(&app, cfg).await {
                            Ok(fresh) => tasks.push(tokio::spawn(async move {
                                app.shutdown().await;
                                let r = fresh.start(true).await;
                                AppResult { message: format!("listeners changed; re-created: {}", r.message), ..r }
                            })),
                            Err(e) => {
                                results.push(AppResult { app: app.name.clone(), ok: false, message: e.to_string() })
                            }
                        }
                        continue;
                    }
                    tasks.push(tokio::spawn(apply_change(app, current, cfg, uid, progress)));
                }
            }
        }
        results.extend(join(tasks).await);
        let names: Vec<String> = new.apps.iter().map(|a| a.name.clone()).collect();
        self.apps.lock().unwrap_or_else(|e| e.into_inner()).retain(|a| names.contains(&a.name));
        // Keep configuration order.
        self.apps.lock().unwrap_or_else(|e| e.into_inner()).sort_by_key(|a| names.iter().position(|n| *n == a.name));
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = new;
        Ok(ActionResponse { results })
    }

    /// Creates an app off the event loop: it opens log files and reads its history.
    async fn new_app_off_loop(&self, cfg: AppConfig) -> Result<Arc<App>, crate::listeners::ListenError> {
        let shared = self.shared.clone();
        let name = cfg.name.clone();
        tokio::task::spawn_blocking(move || shared.new_app(cfg)).await.unwrap_or_else(|e| {
            Err(crate::listeners::ListenError {
                app: name,
                addr: String::new(),
                reason: format!("internal error while creating the app: {e}"),
            })
        })
    }

    async fn replace_app(&self, old: &Arc<App>, cfg: AppConfig) -> Result<Arc<App>, crate::listeners::ListenError> {
        let fresh = self.new_app_off_loop(cfg).await?;
        let mut apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            // Shutting down: the old app is being stopped; the fresh one never runs.
            return Ok(old.clone());
        }
        if let Some(slot) = apps.iter_mut().find(|a| Arc::ptr_eq(a, old)) {
            *slot = fresh.clone();
        }
        Ok(fresh)
    }

    /// Reads and validates the file off the event loop (it may sit on a slow
    /// disk, and validation looks users and groups up through NSS).
    async fn read_config(&self) -> Result<Config, ApiError> {
        let path = self.config_path();
        tokio::task::spawn_blocking(move || sup_config::load(&path))
            .await
            .map_err(|e| ApiError::InvalidConfig(format!("internal error while reading the file: {e}")))?
            .map_err(|e| ApiError::InvalidConfig(e.to_string()))
    }

    /// The app named `name`.
    pub fn app(&self, name: &str) -> Result<Arc<App>, ApiError> {
        self.find(name)
    }

    /// Reopens every app's log files (after an external logrotate).
    pub fn reopen_logs(&self) {
        for app in self.apps() {
            app.logs().reopen();
        }
    }

    /// Stops every app gracefully, in parallel; returns when every worker has
    /// exited. Operations in progress are cancelled and no new one starts.
    pub async fn shutdown(&self) {
        self.closing.store(true, std::sync::atomic::Ordering::SeqCst);
        let tasks: Vec<_> =
            self.apps().into_iter().map(|app| tokio::spawn(async move { app.shutdown().await })).collect();
        for t in tasks {
            let _ = t.await;
        }
    }

    /// SIGKILLs every worker now.
    pub fn kill_all(&self) {
        for app in self.apps() {
            app.kill();
        }
    }
}

impl Shared {
    fn new_app(&self, cfg: AppConfig) -> Result<Arc<App>, crate::listeners::ListenError> {
        let logs = AppLogs::open(&self.log_dir, &cfg.name, &cfg.logs).map_err(|e| crate::listeners::ListenError {
            app: cfg.name.clone(),
            addr: self.log_dir.display().to_string(),
            reason: format!("cannot open log files: {e}"),
        })?;
        let ctx = Arc::new(WorkerCtx {
            app: cfg.name.as_str().into(),
            spawner: self.spawner.clone(),
            logs,
            notify_dir: self.notify_dir.clone(),
            base_env: self.base_env.clone(),
            recorder: self.recorder.clone(),
            events: self.events.clone(),
        });
        let history = self
            .histories
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(cfg.name.clone())
            .or_insert_with(|| crate::history::History::load(&self.history_dir, &cfg.name, cfg.history_limit))
            .clone();
        App::new(ctx, cfg, history)
    }
}

/// Scales and/or rolls an existing app onto its changed configuration.
async fn apply_change(
    app: Arc<App>,
    current: AppConfig,
    cfg: AppConfig,
    uid: Option<u32>,
    progress: Progress,
) -> AppResult {
    let mut messages = Vec::new();
    if current.instances != cfg.instances {
        let r = app.scale(cfg.instances, true, progress.clone()).await;
        if !r.ok {
            return r;
        }
        messages.push(r.message);
    }
    let mut rest = current.clone();
    rest.instances = cfg.instances;
    if rest != cfg {
        let r = app.reload(cfg, RestartReason::Config, uid, None, true, progress).await;
        if !r.ok {
            return r;
        }
        messages.push(r.message);
    }
    AppResult { app: app.name.clone(), ok: true, message: messages.join("; ") }
}

fn spawn_start(app: Arc<App>) -> tokio::task::JoinHandle<AppResult> {
    tokio::spawn(async move {
        let r = app.start(true).await;
        if !r.ok {
            tracing::warn!(app = %r.app, "start failed: {}", r.message);
        }
        r
    })
}

async fn join(tasks: Vec<tokio::task::JoinHandle<AppResult>>) -> Vec<AppResult> {
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap_or_else(|e| AppResult {
            app: String::new(),
            ok: false,
            message: format!("internal error: {e}"),
        }));
    }
    results
}
