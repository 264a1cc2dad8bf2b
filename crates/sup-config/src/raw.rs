//! The file as written: serde structs that only check types and per-value syntax.
//! Cross-field checks and lookups happen in `supervisor.rs` and `app.rs`, which need the
//! spans kept here.

use indexmap::IndexMap;
use serde::Deserialize;
use toml::Spanned;

use crate::backoff::RawBackoff;
use crate::command::Command;
use crate::duration::DurationValue;
use crate::env::{EnvName, EnvValue};
use crate::identity::IdOrName;
use crate::instances::Instances;
use crate::listen::{ListenAddr, TcpAddr};
use crate::mode::ModeValue;
use crate::name::AppName;
use crate::positive::AtLeastOne;
use crate::ready::ReadyCheck;
use crate::restart::RestartPolicy;
use crate::signal::SignalValue;
use crate::size::SizeValue;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub supervisor: RawSupervisor,
    /// IndexMap keeps file order, which `Config::apps` promises.
    #[serde(default)]
    pub apps: IndexMap<AppName, RawApp>,
}

/// `[supervisor]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSupervisor {
    pub control_socket: Option<String>,
    pub control_socket_mode: Option<ModeValue>,
    pub control_socket_group: Option<Spanned<IdOrName>>,
    pub control_socket_read_group: Option<Spanned<IdOrName>>,
    pub run_dir: Option<String>,
    pub log_dir: Option<String>,
    pub monitor_interval: Option<Spanned<DurationValue>>,
    pub metrics: Option<TcpAddr>,
    pub log_level: Option<Spanned<String>>,
    pub log_file: Option<String>,
    pub max_workers: Option<Spanned<AtLeastOne>>,
    pub max_control_connections: Option<AtLeastOne>,
    pub max_open_files: Option<Spanned<AtLeastOne>>,
}

/// `[apps.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawApp {
    pub command: Command,
    pub cwd: Option<String>,
    #[serde(default)]
    pub env: IndexMap<EnvName, EnvValue>,
    pub env_file: Option<Spanned<String>>,
    pub required_env: Option<Spanned<Vec<String>>>,
    pub instances: Option<Instances>,
    #[serde(default)]
    pub listen: Vec<ListenAddr>,
    pub listen_backlog: Option<u32>,
    pub port: Option<Spanned<u16>>,
    pub ready: Option<Spanned<ReadyCheck>>,
    pub ready_timeout: Option<DurationValue>,
    pub min_healthy_time: Option<DurationValue>,
    pub history_limit: Option<AtLeastOne>,
    pub stop_signal: Option<SignalValue>,
    pub stop_timeout: Option<DurationValue>,
    pub restart: Option<RestartPolicy>,
    pub backoff: Option<RawBackoff>,
    pub max_restarts: Option<u32>,
    pub restart_window: Option<DurationValue>,
    pub memory_limit: Option<Spanned<SizeValue>>,
    pub memory_limit_samples: Option<AtLeastOne>,
    pub watchdog: Option<Spanned<DurationValue>>,
    pub reload_parallelism: Option<AtLeastOne>,
    pub user: Option<Spanned<IdOrName>>,
    pub group: Option<Spanned<IdOrName>>,
    pub autostart: Option<bool>,
    #[serde(default)]
    pub stop_exit_codes: Vec<i32>,
    pub shutdown_with_message: Option<bool>,
    pub node_cluster: Option<Spanned<bool>>,
    pub cron_restart: Option<Spanned<String>>,
    pub instance_var: Option<EnvName>,
    pub logs: Option<Spanned<crate::logs::RawLogs>>,
    pub watch: Option<crate::watch::RawWatch>,
}
