//! The leaf of the core: what an app runs and what is measured of it.
//!
//! Every layer may use these types; this module uses none of the crate's.
//! Counters are reported through [`Recorder`], so the core never depends on
//! the Prometheus driver that renders them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sup_config::AppConfig;
use sup_proto::{LifecycleEvent, RestartReason};

/// A configuration as run by workers, with its version number.
#[derive(Debug)]
pub struct AppSpec {
    /// The validated app configuration.
    pub cfg: AppConfig,
    /// Increases with every reload or config change of the app.
    pub version: u64,
    /// Where the version's code is, pinned when the version was first started.
    pub release: Option<Release>,
}

/// A pinned release: the directory and program a version runs, with every
/// symlink resolved, so a crash restart never follows a moved `current` link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// `cwd`, canonical.
    pub cwd: PathBuf,
    /// The program `command[0]` named, canonical.
    pub program: PathBuf,
}

/// The last sample of one worker.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// The worker's main pid when sampled.
    pub pid: i32,
    /// CPU use of the tree over the last interval, percent of one core.
    pub cpu_percent: f64,
    /// CPU time of the tree so far (live processes), seconds.
    pub cpu_seconds: f64,
    /// Resident memory of the main process.
    pub rss_bytes: u64,
    /// Resident memory of the main process and all its descendants.
    pub tree_rss_bytes: u64,
}

/// Samples by (app, slot), written by the monitor, read by `status`.
pub type Samples = Arc<Mutex<HashMap<(String, u32), Sample>>>;

/// The lifecycle events of every app: the last few kept, and a live feed.
#[derive(Clone)]
pub struct Events {
    tx: tokio::sync::broadcast::Sender<LifecycleEvent>,
    recent: Arc<Mutex<std::collections::VecDeque<LifecycleEvent>>>,
}

/// Events kept for `supctl events` without `-f`, and the live feed's capacity per follower.
pub const EVENTS_KEPT: usize = 256;

impl Default for Events {
    fn default() -> Self {
        Events { tx: tokio::sync::broadcast::channel(EVENTS_KEPT).0, recent: Arc::default() }
    }
}

impl Events {
    /// Publishes an event (never blocks: a follower that lags loses events and is told so).
    pub fn publish(&self, app: &str, slot: Option<u32>, kind: &str, message: String) {
        let ev = LifecycleEvent {
            at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            app: app.to_string(),
            slot,
            kind: kind.to_string(),
            message,
        };
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            if recent.len() == EVENTS_KEPT {
                recent.pop_front();
            }
            recent.push_back(ev.clone());
        }
        let _ = self.tx.send(ev);
    }

    /// The last events, oldest first.
    pub fn recent(&self) -> Vec<LifecycleEvent> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    /// A live feed of the events from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<LifecycleEvent> {
        self.tx.subscribe()
    }
}

/// Where the core reports what it counts (restarts, rollouts, readiness latency).
pub trait Recorder: Send + Sync {
    /// A worker was restarted or replaced.
    fn restart(&self, app: &str, reason: RestartReason);
    /// A rollout ended; `result` is `success`, `rolled_back` or `cancelled`.
    fn rollout(&self, app: &str, kind: &str, result: &str);
    /// A worker became ready `ms` milliseconds after its spawn.
    fn ready(&self, app: &str, ms: u64);
    /// A version's rollout ended (`trigger`: reload, apply, cron, rollback, promote) after `duration`.
    fn rollout_took(&self, _app: &str, _trigger: &str, _result: &str, _duration: std::time::Duration) {}
}

/// A [`Recorder`] that keeps nothing (tests, fuzzing).
#[derive(Debug, Default)]
pub struct NoRecorder;

impl Recorder for NoRecorder {
    fn restart(&self, _: &str, _: RestartReason) {}
    fn rollout(&self, _: &str, _: &str, _: &str) {}
    fn ready(&self, _: &str, _: u64) {}
}
