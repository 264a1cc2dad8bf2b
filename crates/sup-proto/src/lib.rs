//! Wire types shared by `supd` and `supctl`.
//!
//! This crate depends on serde only, so that scripts, tests and both binaries
//! agree on one definition of every request, response, event, state and exit
//! code. The control API is HTTP/1.1 + JSON over a Unix socket; every route
//! lives under [`API_PREFIX`].

use serde::{Deserialize, Serialize};

/// Prefix of every control API route.
pub const API_PREFIX: &str = "/v1";

/// Largest request body the control API accepts, in bytes.
pub const MAX_REQUEST_BODY: usize = 64 * 1024;

/// `n` and `noun`, the noun in the plural unless `n` is 1 (`1 app`, `2 apps`), for the summary lines of supd and supctl.
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Process exit codes of `supctl`, documented in the CLI reference.
pub mod exit {
    /// The operation succeeded.
    pub const OK: i32 = 0;
    /// The operation was carried out and failed (for example a rolled-back reload).
    pub const FAILED: i32 = 1;
    /// The command line was wrong.
    pub const USAGE: i32 = 2;
    /// `supd` could not be reached on its control socket.
    pub const UNREACHABLE: i32 = 3;
}

/// The state of one instance slot, as shown by `supctl status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// Spawned, not yet ready.
    Starting,
    /// Signalled readiness (or needs none) and serves.
    Ready,
    /// Asked to stop; draining until its stop timeout.
    Stopping,
    /// Exited; waiting for the backoff delay before the next start.
    Backoff,
    /// Its worker has exited and supd is deciding what next (restart, backoff
    /// or errored): shown for the moment between the exit and that decision.
    Exited,
    /// Gave up: crash loop, spawn failure or a failed exit with `restart = "never"`.
    Errored,
    /// Not running, by request or after a clean exit.
    Stopped,
}

impl WorkerState {
    /// The lowercase name used in JSON and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Stopping => "stopping",
            WorkerState::Backoff => "backoff",
            WorkerState::Exited => "exited",
            WorkerState::Errored => "errored",
            WorkerState::Stopped => "stopped",
        }
    }
}

/// Why a worker was (re)started or replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestartReason {
    /// The worker exited or was killed without being asked to.
    Crash,
    /// An operator asked for `restart`.
    Restart,
    /// A rolling reload replaced it.
    Reload,
    /// It stayed over its memory limit.
    Memory,
    /// It stopped sending watchdog pings.
    Watchdog,
    /// A configuration change replaced it.
    Config,
    /// Its `cron_restart` schedule came due.
    Cron,
    /// A file it `watch`es changed.
    Watch,
}

impl RestartReason {
    /// The lowercase name used in JSON, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartReason::Crash => "crash",
            RestartReason::Restart => "restart",
            RestartReason::Reload => "reload",
            RestartReason::Memory => "memory",
            RestartReason::Watchdog => "watchdog",
            RestartReason::Config => "config",
            RestartReason::Cron => "cron",
            RestartReason::Watch => "watch",
        }
    }
}

/// Answer to `GET /v1/status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusResponse {
    /// Every app supd knows, in configuration order.
    pub apps: Vec<AppStatus>,
}

/// Status of one app.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppStatus {
    /// The app's name (`[apps.NAME]`).
    pub name: String,
    /// Output lines that could not be written (disk full, I/O errors) since supd started.
    #[serde(default)]
    pub log_lines_lost: u64,
    /// One entry per instance slot.
    pub instances: Vec<InstanceStatus>,
    /// A rollout in progress, if any (e.g. "reload").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    /// A paused canary, e.g. "1 of 4 on version 5 (from 4)".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<String>,
}

/// Status of one instance slot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// Slot number, from 0.
    pub slot: u32,
    /// Main pid of the slot's current worker, if one runs.
    pub pid: Option<u32>,
    /// Slot state.
    pub state: WorkerState,
    /// Restarts and replacements of this slot since supd started (crash, reload, restart, memory, watchdog).
    pub restarts: u32,
    /// Milliseconds since the current worker was spawned.
    pub uptime_ms: Option<u64>,
    /// CPU use of the worker's process tree over the last sample, percent of one core.
    pub cpu_percent: Option<f64>,
    /// Resident memory of the worker's main process, bytes.
    pub rss_bytes: Option<u64>,
    /// Resident memory of the worker's whole process tree, bytes.
    #[serde(default)]
    pub tree_rss_bytes: Option<u64>,
    /// CPU time used by the worker's live process tree, seconds.
    #[serde(default)]
    pub cpu_seconds: Option<f64>,
    /// Why the slot is in its state, in plain words.
    #[serde(default)]
    pub reason: String,
    /// The worker's last `STATUS=` text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_text: Option<String>,
    /// Why the slot was last restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart_reason: Option<RestartReason>,
    /// Configuration version the worker runs.
    #[serde(default)]
    pub version: u64,
    /// The release the worker runs: its working directory with every symlink resolved when its version was pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
}

/// Body of `POST /v1/start|stop|restart`: one app or all of them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    /// The app to act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// Act on every app.
    #[serde(default)]
    pub all: bool,
    /// When another operation runs on the app, wait for it instead of answering "busy".
    #[serde(default)]
    pub wait: bool,
    /// `reload` only: replace this many slots, then pause as a canary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<u32>,
}

/// Body of `POST /v1/rollback`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The app.
    pub app: String,
    /// The version to go back to; default: the last successful one before the current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u64>,
    /// Wait for a running operation instead of answering "busy".
    #[serde(default)]
    pub wait: bool,
}

/// One version of an app, as `supctl history` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The version number.
    pub version: u64,
    /// What made it: `start`, `reload`, `apply`, `cron`, `rollback`.
    pub trigger: String,
    /// `ok`, `rolled_back` (a new worker failed; the slots went back), `failed`, or `cancelled` (by a stop).
    pub result: String,
    /// The pinned release directory.
    #[serde(default)]
    pub release: Option<String>,
    /// When the rollout started, RFC 3339.
    pub at: String,
    /// How long it took.
    pub duration_ms: u64,
    /// Who asked, from the control socket's peer credentials (none for supd's own triggers).
    #[serde(default)]
    pub uid: Option<u32>,
    /// What happened, in words (the failed slot and its reason).
    pub message: String,
    /// A digest of the app's table (environment values included), to tell versions apart.
    #[serde(default)]
    pub digest: String,
}

/// A lifecycle event, as `supctl events` shows it (one NDJSON line each).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LifecycleEvent {
    /// When, RFC 3339.
    pub at: String,
    /// The app.
    pub app: String,
    /// The slot, for events of one slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
    /// `crash`, `memory`, `watchdog`, `rollout_started`, `slot_done`, `slot_failed`, `rolled_back`,
    /// `rollout_done`, `rollout_failed`, `canary_paused`, `canary_crashed`, `canary_ended`, `promoted`, `lagged`.
    pub kind: String,
    /// What happened, in words.
    pub message: String,
}

/// Answer to `GET /v1/history?app=APP`, newest last.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HistoryResponse {
    /// The app.
    pub app: String,
    /// Its last `history_limit` versions, oldest first.
    pub history: Vec<HistoryEntry>,
}

/// Body of `POST /v1/scale`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    /// The app.
    pub app: String,
    /// The new number of instances (at least 1).
    pub instances: u32,
    /// Wait for a running operation instead of answering "busy".
    #[serde(default)]
    pub wait: bool,
}

/// Body of `POST /v1/apps/add`: a new `[apps.NAME]` table for supd to write into its file and start.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddRequest {
    /// The app's name.
    pub name: String,
    /// The program and its arguments.
    pub command: Vec<String>,
    /// `instances`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<u32>,
    /// `listen` addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listen: Vec<String>,
    /// `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `ready`: `none`, `notify`, `pm2`, `listening`, `tcp` or an HTTP path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// `env`, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
    /// `cwd` (absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

/// Body of `POST /v1/apps/remove`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveRequest {
    /// The app to stop and remove from the file.
    pub name: String,
}

/// One line of the newline-delimited JSON stream of a rollout (`reload`, `scale`, `config apply`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RolloutEvent {
    /// A rollout of an app begins.
    Started {
        /// The app.
        app: String,
        /// What kind of rollout ("reload", "scale", "config").
        kind: String,
        /// Slots it will touch.
        slots: Vec<u32>,
        /// Configuration version before.
        from_version: u64,
        /// Configuration version after.
        to_version: u64,
    },
    /// A slot's new worker is ready and its old one has drained.
    SlotReplaced {
        /// The app.
        app: String,
        /// The slot.
        slot: u32,
        /// The replaced worker, if one ran.
        old_pid: Option<u32>,
        /// The new worker.
        new_pid: u32,
        /// Milliseconds from spawn to ready.
        ready_ms: u64,
        /// Milliseconds from the new worker's spawn until the old one had exited.
        total_ms: u64,
    },
    /// A slot was added (scale up) and its worker is ready.
    SlotAdded {
        /// The app.
        app: String,
        /// The slot.
        slot: u32,
        /// Its worker.
        pid: u32,
        /// Milliseconds from spawn to ready.
        ready_ms: u64,
    },
    /// A slot was removed (scale down) after its worker drained.
    SlotRemoved {
        /// The app.
        app: String,
        /// The slot.
        slot: u32,
    },
    /// A slot's new worker failed; the rollout stops.
    SlotFailed {
        /// The app.
        app: String,
        /// The slot.
        slot: u32,
        /// Why, with the failed worker's last output lines.
        message: String,
    },
    /// Slots already replaced go back to the previous version.
    RollingBack {
        /// The app.
        app: String,
        /// The slots being put back.
        slots: Vec<u32>,
    },
    /// A slot is back on the previous version (or could not be put back).
    SlotRolledBack {
        /// The app.
        app: String,
        /// The slot.
        slot: u32,
        /// Whether it worked.
        ok: bool,
        /// Its worker after the rollback, or what went wrong.
        message: String,
    },
    /// The last line: one result per app.
    Done {
        /// Per-app results.
        results: Vec<AppResult>,
    },
}

/// Answer to an action: one result per app touched.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ActionResponse {
    /// Per-app results.
    pub results: Vec<AppResult>,
}

/// Result of an action on one app.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppResult {
    /// The app.
    pub app: String,
    /// Whether the action succeeded.
    pub ok: bool,
    /// What happened, in plain words.
    pub message: String,
}

impl ActionResponse {
    /// True when every app's action succeeded.
    pub fn all_ok(&self) -> bool {
        self.results.iter().all(|r| r.ok)
    }
}

/// One captured output line, as `GET /v1/logs` streams it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    /// RFC 3339 time the line was read.
    pub ts: String,
    /// The app.
    pub app: String,
    /// The slot of the worker that wrote it.
    pub instance: u32,
    /// `out` or `err`.
    pub stream: String,
    /// The line, without its newline.
    pub msg: String,
}

/// JSON body of every error answer: `{"error":{"code":…,"message":…}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Machine-readable code and human message of an error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable code, e.g. `not_found`, `bad_request`, `busy`.
    pub code: String,
    /// Plain-words message.
    pub message: String,
}

impl ErrorBody {
    /// Builds an error body.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        ErrorBody { error: ErrorDetail { code: code.to_string(), message: message.into() } }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_json_has_the_documented_shape() {
        let s = StatusResponse {
            apps: vec![AppStatus {
                name: "web".into(),
                log_lines_lost: 0,
                rollout: None,
                canary: None,
                instances: vec![InstanceStatus {
                    slot: 0,
                    pid: Some(42),
                    state: WorkerState::Ready,
                    restarts: 1,
                    uptime_ms: Some(5),
                    cpu_percent: Some(0.5),
                    rss_bytes: Some(1024),
                    tree_rss_bytes: Some(2048),
                    cpu_seconds: Some(0.25),
                    reason: "ready".into(),
                    status_text: None,
                    last_restart_reason: Some(RestartReason::Crash),
                    version: 1,
                    release: Some("/srv/app/releases/v1".into()),
                }],
            }],
        };
        let v: serde_json::Value = serde_json::to_value(&s).expect("serialises");
        let i = &v["apps"][0]["instances"][0];
        assert_eq!(v["apps"][0]["name"], "web");
        assert_eq!(i["slot"], 0);
        assert_eq!(i["pid"], 42);
        assert_eq!(i["state"], "ready");
        assert_eq!(i["restarts"], 1);
        assert_eq!(i["uptime_ms"], 5);
        assert_eq!(i["cpu_percent"], 0.5);
        assert_eq!(i["rss_bytes"], 1024);
        assert_eq!(i["last_restart_reason"], "crash");
        assert_eq!(i["version"], 1);
        assert_eq!(i["release"], "/srv/app/releases/v1");
    }

    #[test]
    fn action_request_refuses_unknown_fields() {
        let err = serde_json::from_str::<ActionRequest>(r#"{"ap":"web"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `ap`"), "{err}");
        let line = serde_json::to_string(&RolloutEvent::SlotRemoved { app: "web".into(), slot: 3 }).unwrap();
        assert_eq!(line, r#"{"event":"slot_removed","app":"web","slot":3}"#);
        assert!(err.to_string().contains("unknown field `ap`"), "{err}");
    }
}
