//! Prometheus metrics and the health endpoint, on an optional TCP listener.
//!
//! Counters (restarts, rollouts) and the readiness histogram are updated where
//! the events happen; per-worker gauges are filled from the status view at
//! scrape time, so a scrape never waits on a worker and never shows a worker
//! that is gone.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use sup_proto::{RestartReason, WorkerState};

use crate::spec::Recorder;
use crate::supervisor::Supervisor;

/// Labels of a worker.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Worker {
    app: String,
    slot: String,
}

/// Labels of a worker state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerStateLabels {
    app: String,
    slot: String,
    state: String,
}

/// Labels of a restart.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Restart {
    app: String,
    reason: String,
}

/// Labels of a rollout.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Rollout {
    app: String,
    kind: String,
    result: String,
}

/// Labels of an app.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct App {
    app: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Every metric supd exports.
pub struct Metrics {
    registry: Registry,
    restarts: Family<Restart, Counter>,
    rollouts: Family<Rollout, Counter>,
    ready_seconds: Family<App, Histogram, fn() -> Histogram>,
    cpu_seconds: Family<Worker, FloatGauge>,
    rss: Family<Worker, Gauge>,
    tree_rss: Family<Worker, Gauge>,
    state: Family<WorkerStateLabels, Gauge>,
    worker_restarts: Family<Worker, Gauge>,
    log_lines_lost: Family<App, Gauge>,
    own_rss: Gauge,
    rollout_seconds: Family<Rollout, Histogram, fn() -> Histogram>,
    last_rollout: Family<LastRollout, FloatGauge>,
    app_version: Family<App, Gauge>,
    app_release: Family<AppRelease, Gauge>,
}

/// Labels of the release an app runs: across a fleet, the directory names
/// agree where version numbers (counted per host) may not.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppRelease {
    app: String,
    release: String,
}

/// Labels of the time of an app's last rollout with a result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LastRollout {
    app: String,
    result: String,
}

fn rollout_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.1, 2.0, 12))
}

fn ready_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sup");
        let m = Metrics {
            restarts: Family::default(),
            rollouts: Family::default(),
            ready_seconds: Family::new_with_constructor(ready_histogram),
            cpu_seconds: Family::default(),
            rss: Family::default(),
            tree_rss: Family::default(),
            state: Family::default(),
            worker_restarts: Family::default(),
            log_lines_lost: Family::default(),
            own_rss: Gauge::default(),
            rollout_seconds: Family::new_with_constructor(rollout_histogram),
            last_rollout: Family::default(),
            app_version: Family::default(),
            app_release: Family::default(),
            registry: Registry::default(),
        };
        registry.register("restarts", "Worker restarts and replacements, by reason", m.restarts.clone());
        registry.register("rollouts", "Rollouts (reload, scale, config apply), by result", m.rollouts.clone());
        registry.register("ready_latency_seconds", "Time from spawn to ready", m.ready_seconds.clone());
        registry.register("worker_cpu_seconds", "CPU time of the worker's live process tree", m.cpu_seconds.clone());
        registry.register("worker_rss_bytes", "Resident memory of the worker's main process", m.rss.clone());
        registry.register("worker_tree_rss_bytes", "Resident memory of the worker's process tree", m.tree_rss.clone());
        registry.register("worker_state", "1 for the slot's current state", m.state.clone());
        registry.register("worker_restarts", "Restarts of the slot so far", m.worker_restarts.clone());
        registry.register("log_lines_lost", "Output lines that could not be written", m.log_lines_lost.clone());
        registry.register("supd_rss_bytes", "Resident memory of supd itself", m.own_rss.clone());
        registry.register(
            "rollout_duration_seconds",
            "Duration of rollouts, by kind (reload, apply, cron, watch, rollback, promote) and result",
            m.rollout_seconds.clone(),
        );
        registry.register(
            "last_rollout_timestamp_seconds",
            "Unix time of the app's last rollout with each result",
            m.last_rollout.clone(),
        );
        registry.register("app_version", "The version the app runs", m.app_version.clone());
        registry.register(
            "app_release",
            "1 for the release directory the app's version is pinned to",
            m.app_release.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The text exposition, with per-worker gauges taken from `sup` now.
    pub fn render(&self, sup: &Supervisor) -> String {
        self.render_now(sup)
    }
}

impl Recorder for Metrics {
    fn restart(&self, app: &str, reason: RestartReason) {
        let reason = reason.as_str().to_string();
        self.restarts.get_or_create(&Restart { app: app.to_string(), reason }).inc();
    }

    fn rollout(&self, app: &str, kind: &str, result: &str) {
        let result = result.to_string();
        self.rollouts.get_or_create(&Rollout { app: app.to_string(), kind: kind.to_string(), result }).inc();
    }

    fn rollout_took(&self, app: &str, trigger: &str, result: &str, duration: std::time::Duration) {
        let labels = Rollout { app: app.to_string(), kind: trigger.to_string(), result: result.to_string() };
        self.rollout_seconds.get_or_create(&labels).observe(duration.as_secs_f64());
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.last_rollout
            .get_or_create(&LastRollout { app: app.to_string(), result: result.to_string() })
            .set(now.as_secs_f64());
    }

    fn ready(&self, app: &str, ms: u64) {
        self.ready_seconds.get_or_create(&App { app: app.to_string() }).observe(ms as f64 / 1000.0);
    }
}

impl Metrics {
    fn render_now(&self, sup: &Supervisor) -> String {
        for f in [&self.rss, &self.tree_rss, &self.worker_restarts] {
            f.clear();
        }
        self.cpu_seconds.clear();
        self.state.clear();
        self.app_version.clear();
        self.app_release.clear();
        for app in sup.apps() {
            let spec = app.spec();
            self.app_version.get_or_create(&App { app: app.name.clone() }).set(spec.version as i64);
            if let Some(r) = &spec.release {
                let labels = AppRelease { app: app.name.clone(), release: r.cwd.display().to_string() };
                self.app_release.get_or_create(&labels).set(1);
            }
        }
        if let Ok(status) = sup.status(None) {
            for app in status.apps {
                self.log_lines_lost.get_or_create(&App { app: app.name.clone() }).set(app.log_lines_lost as i64);
                for i in app.instances {
                    let w = Worker { app: app.name.clone(), slot: i.slot.to_string() };
                    if let Some(c) = i.cpu_seconds {
                        self.cpu_seconds.get_or_create(&w).set(c);
                    }
                    if let Some(r) = i.rss_bytes {
                        self.rss.get_or_create(&w).set(r as i64);
                    }
                    if let Some(r) = i.tree_rss_bytes {
                        self.tree_rss.get_or_create(&w).set(r as i64);
                    }
                    self.worker_restarts.get_or_create(&w).set(i64::from(i.restarts));
                    self.state
                        .get_or_create(&WorkerStateLabels {
                            app: w.app.clone(),
                            slot: w.slot.clone(),
                            state: i.state.as_str().to_string(),
                        })
                        .set(1);
                }
            }
        }
        self.own_rss.set(crate::monitor::own_rss() as i64);
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Why the metrics listener could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on `{addr}`: {source}")]
pub struct MetricsError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds the metrics listener; call [`serve`] with it.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, MetricsError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|source| MetricsError { addr, source })
}

/// Serves `/metrics` and `/health` until supd stops.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, sup: Weak<Supervisor>) {
    let limit = Arc::new(tokio::sync::Semaphore::new(64));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else { return };
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let (sup, metrics) = (sup.clone(), metrics.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (sup, metrics) = (sup.clone(), metrics.clone());
                async move { Ok::<_, Infallible>(route(&metrics, sup, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

fn text(status: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(ctype));
    r
}

fn route(metrics: &Metrics, sup: Weak<Supervisor>, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let Some(sup) = sup.upgrade() else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "supd is stopping\n".into());
    };
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            text(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.render(&sup))
        }
        "/health" => {
            let (ok, body) = health(&sup);
            let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            text(status, "application/json", body)
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "routes: /metrics, /health\n".into()),
    }
}

/// Healthy when every autostart app has all its instances ready.
pub fn health(sup: &Supervisor) -> (bool, String) {
    let mut not_ready = Vec::new();
    for app in sup.apps() {
        if !app.spec().cfg.autostart {
            continue;
        }
        let status = app.status(&sup.samples);
        let bad: Vec<_> = status
            .instances
            .iter()
            .filter(|i| i.state != WorkerState::Ready)
            .map(|i| serde_json::json!({"slot": i.slot, "state": i.state, "reason": i.reason}))
            .collect();
        if !bad.is_empty() {
            not_ready.push(serde_json::json!({"app": status.name, "instances": bad}));
        }
    }
    let ok = not_ready.is_empty();
    let body = serde_json::json!({"healthy": ok, "not_ready": not_ready}).to_string();
    (ok, body)
}
