//! The supervisor: every app of a configuration, and the verbs run on them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sup_config::Config;
use sup_proto::{ActionRequest, ActionResponse, AppResult, StatusResponse};

use crate::app::App;
use crate::logs::AppLogs;
use crate::reaper::Reaper;
use crate::spawner::Spawner;
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

/// Everything supd supervises.
pub struct Supervisor {
    apps: Mutex<Vec<Arc<App>>>,
    /// The configuration supd started with.
    pub config: Config,
}

/// Variables meant for supd itself, never passed on to workers.
const OWN_VARS: &[&str] =
    &["NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID", "SUPD_CONFIG"];

impl Supervisor {
    /// Creates folders, binds every listener and starts the autostart apps (without waiting for them).
    pub async fn start(config: Config) -> Result<Arc<Supervisor>, StartError> {
        let sc = &config.supervisor;
        let notify_dir = sc.run_dir.join("notify");
        for (what, path) in [("run_dir", &sc.run_dir), ("notify folder", &notify_dir), ("log_dir", &sc.log_dir)] {
            std::fs::create_dir_all(path).map_err(|source| StartError::Dir { what, path: path.clone(), source })?;
        }
        let reaper = Reaper::start().map_err(|e| StartError::Setup(format!("cannot watch SIGCHLD: {e}")))?;
        let spawner = Spawner::start(reaper).map_err(|e| StartError::Setup(format!("cannot start spawner: {e}")))?;
        let base_env: Arc<Vec<(String, String)>> =
            Arc::new(std::env::vars().filter(|(k, _)| !OWN_VARS.contains(&k.as_str())).collect());
        let mut apps = Vec::new();
        for cfg in &config.apps {
            let logs = AppLogs::open(&sc.log_dir, &cfg.name).map_err(|source| StartError::Dir {
                what: "log file in",
                path: sc.log_dir.clone(),
                source,
            })?;
            let ctx = Arc::new(WorkerCtx {
                app: cfg.name.as_str().into(),
                spawner: spawner.clone(),
                logs,
                notify_dir: notify_dir.clone(),
                base_env: base_env.clone(),
            });
            apps.push(App::new(ctx, cfg.clone())?);
        }
        let sup = Arc::new(Supervisor { apps: Mutex::new(apps), config });
        for app in sup.apps() {
            if app.spec().cfg.autostart {
                tokio::spawn(async move {
                    let r = app.start().await;
                    if !r.ok {
                        tracing::warn!(app = %r.app, "start failed: {}", r.message);
                    }
                });
            }
        }
        Ok(sup)
    }

    /// The apps, in configuration order.
    pub fn apps(&self) -> Vec<Arc<App>> {
        self.apps.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn find(&self, name: &str) -> Result<Arc<App>, ApiError> {
        self.apps().into_iter().find(|a| a.name == name).ok_or_else(|| ApiError::UnknownApp(name.to_string()))
    }

    /// The status of one app or all; never waits on a worker or a sample.
    pub fn status(&self, app: Option<&str>) -> Result<StatusResponse, ApiError> {
        let apps = match app {
            Some(name) => vec![self.find(name)?.status()],
            None => self.apps().iter().map(|a| a.status()).collect(),
        };
        Ok(StatusResponse { apps })
    }

    /// Runs a verb on one app or all of them, the apps in parallel.
    pub async fn action(&self, verb: Verb, req: &ActionRequest) -> Result<ActionResponse, ApiError> {
        let targets = match (&req.app, req.all) {
            (Some(_), true) => return Err(ApiError::BadRequest("give either `app` or `all`, not both".into())),
            (None, false) => return Err(ApiError::BadRequest("give `app` or `all: true`".into())),
            (Some(name), false) => vec![self.find(name)?],
            (None, true) => self.apps(),
        };
        let mut tasks = Vec::new();
        for app in targets {
            tasks.push(tokio::spawn(async move {
                match verb {
                    Verb::Start => app.start().await,
                    Verb::Stop => app.stop().await,
                    Verb::Restart => app.restart().await,
                }
            }));
        }
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap_or_else(|e| AppResult {
                app: String::new(),
                ok: false,
                message: format!("internal error: {e}"),
            }));
        }
        Ok(ActionResponse { results })
    }

    /// Stops every app gracefully, in parallel; returns when every worker has exited.
    pub async fn shutdown(&self) {
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
