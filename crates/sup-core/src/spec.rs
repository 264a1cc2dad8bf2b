//! The leaf of the core: what an app runs and what is measured of it.
//!
//! Every layer may use these types; this module uses none of the crate's.
//! Counters are reported through [`Recorder`], so the core never depends on
//! the Prometheus driver that renders them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sup_config::AppConfig;
use sup_proto::RestartReason;

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

/// Where the core reports what it counts (restarts, rollouts, readiness latency).
pub trait Recorder: Send + Sync {
    /// A worker was restarted or replaced.
    fn restart(&self, app: &str, reason: RestartReason);
    /// A rollout ended; `result` is `success`, `rolled_back` or `cancelled`.
    fn rollout(&self, app: &str, kind: &str, result: &str);
    /// A worker became ready `ms` milliseconds after its spawn.
    fn ready(&self, app: &str, ms: u64);
}

/// A [`Recorder`] that keeps nothing (tests, fuzzing).
#[derive(Debug, Default)]
pub struct NoRecorder;

impl Recorder for NoRecorder {
    fn restart(&self, _: &str, _: RestartReason) {}
    fn rollout(&self, _: &str, _: &str, _: &str) {}
    fn ready(&self, _: &str, _: u64) {}
}
