//! `[apps.NAME]`: one supervised program.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::backoff::Backoff;
use crate::env::{check_required, merge, read_env_file};
use crate::error::{key_path, ConfigError, Source};
use crate::identity::{lookup_group, lookup_user, primary_group, Group, User};
use crate::instances::Instances;
use crate::listen::ListenAddr;
use crate::paths::resolve;
use crate::raw::RawApp;
use crate::ready::ReadyCheck;
use crate::restart::RestartPolicy;

/// Default `min_healthy_time`: long enough to catch a server that notifies
/// before it has loaded the app and then dies (gunicorn without `--preload`),
/// short enough not to slow a rolling reload much.
pub const DEFAULT_MIN_HEALTHY_TIME: Duration = Duration::from_secs(1);

/// One supervised program and how to run it.
#[derive(Clone, PartialEq)]
pub struct AppConfig {
    /// The `NAME` of `[apps.NAME]`.
    pub name: String,
    /// Program and arguments; never empty.
    pub command: Vec<String>,
    /// Absolute working directory.
    pub cwd: PathBuf,
    /// Variables added to supd's environment: `env_file` first, then the `env` table.
    pub env: Vec<(String, String)>,
    /// The dotenv file the secrets came from (absolute).
    pub env_file: Option<PathBuf>,
    /// Names that must be set in `env` or in supd's environment.
    pub required_env: Vec<String>,
    /// Number of worker processes.
    pub instances: u32,
    /// Sockets supd binds and hands to the workers.
    pub listen: Vec<ListenAddr>,
    /// Backlog of those sockets.
    pub listen_backlog: u32,
    /// Port passed to the workers (PM2's `PORT` habit).
    pub port: Option<u16>,
    /// How readiness is detected.
    pub ready: ReadyCheck,
    /// How long a worker may take to become ready.
    pub ready_timeout: Duration,
    /// How long a new worker of a rollout must stay up (and pass its probe) after ready before its slot counts as done.
    pub min_healthy_time: Duration,
    /// How many versions `supctl history` keeps (and `rollback` can go back to).
    pub history_limit: u32,
    /// Signal asking a worker to stop.
    pub stop_signal: Signal,
    /// How long a worker may take to stop before SIGKILL.
    pub stop_timeout: Duration,
    /// When an exited worker is restarted.
    pub restart: RestartPolicy,
    /// Delay between restarts.
    pub backoff: Backoff,
    /// More restarts than this within `restart_window` mark the slot errored.
    pub max_restarts: u32,
    /// Window for `max_restarts`.
    pub restart_window: Duration,
    /// Memory (RSS, bytes) above which a worker is restarted.
    pub memory_limit: Option<u64>,
    /// Consecutive samples over the limit before acting.
    pub memory_limit_samples: u32,
    /// A worker silent (no watchdog ping) this long is restarted.
    pub watchdog: Option<Duration>,
    /// Workers replaced at once during a reload.
    pub reload_parallelism: u32,
    /// User the workers run as.
    pub user: Option<User>,
    /// Group the workers run as.
    pub group: Option<Group>,
    /// Started when supd starts.
    pub autostart: bool,
    /// Exit codes that count as a clean stop.
    pub stop_exit_codes: Vec<i32>,
    /// Ask workers to stop with a `shutdown` message before the signal.
    pub shutdown_with_message: bool,
    /// Start workers as Node cluster workers whose `server.listen()` gets the slot's socket.
    pub node_cluster: bool,
    /// Rolling restart on this schedule (PM2's `cron_restart`).
    pub cron_restart: Option<crate::cron::CronSchedule>,
    /// One more variable set to the slot number, besides SUP_INSTANCE and NODE_APP_INSTANCE (PM2's `instance_var`).
    pub instance_var: Option<String>,
    /// Where output goes, its format and rotation.
    pub logs: crate::logs::LogConfig,
    /// Roll the app when its files change (development).
    pub watch: Option<crate::watch::WatchConfig>,
}

/// Shows env keys only: values may be secrets from `env_file`.
struct EnvKeys<'a>(&'a [(String, String)]);

impl fmt::Debug for EnvKeys<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter().map(|(k, _)| k)).finish()
    }
}

impl fmt::Debug for AppConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppConfig")
            .field("name", &self.name)
            .field("command", &self.command)
            .field("cwd", &self.cwd)
            .field("env_keys", &EnvKeys(&self.env))
            .field("env_file", &self.env_file)
            .field("required_env", &self.required_env)
            .field("instances", &self.instances)
            .field("listen", &self.listen)
            .field("listen_backlog", &self.listen_backlog)
            .field("port", &self.port)
            .field("ready", &self.ready)
            .field("ready_timeout", &self.ready_timeout)
            .field("min_healthy_time", &self.min_healthy_time)
            .field("history_limit", &self.history_limit)
            .field("stop_signal", &self.stop_signal)
            .field("stop_timeout", &self.stop_timeout)
            .field("restart", &self.restart)
            .field("backoff", &self.backoff)
            .field("max_restarts", &self.max_restarts)
            .field("restart_window", &self.restart_window)
            .field("memory_limit", &self.memory_limit)
            .field("memory_limit_samples", &self.memory_limit_samples)
            .field("watchdog", &self.watchdog)
            .field("reload_parallelism", &self.reload_parallelism)
            .field("user", &self.user)
            .field("group", &self.group)
            .field("autostart", &self.autostart)
            .field("stop_exit_codes", &self.stop_exit_codes)
            .field("shutdown_with_message", &self.shutdown_with_message)
            .field("node_cluster", &self.node_cluster)
            .field("cron_restart", &self.cron_restart)
            .field("instance_var", &self.instance_var)
            .field("watch", &self.watch)
            .finish()
    }
}

impl RawApp {
    /// Applies defaults, resolves paths against `base`, reads `env_file` and looks up ids.
    pub(crate) fn build(self, name: String, src: &Source<'_>, base: &Path) -> Result<AppConfig, ConfigError> {
        let key = |k: &str| key_path(&["apps", &name, k]);

        let (env_file, from_file) = match &self.env_file {
            None => (None, Vec::new()),
            Some(f) => {
                let path = resolve(base, f.get_ref());
                let entries = read_env_file(&path).map_err(|m| src.error(f.span(), key("env_file"), m))?;
                (Some(path), entries)
            }
        };
        let env = merge(from_file, self.env);
        let required_env = match self.required_env {
            None => Vec::new(),
            Some(r) => {
                check_required(r.get_ref(), &env).map_err(|m| src.error(r.span(), key("required_env"), m))?;
                r.into_inner()
            }
        };
        let memory_limit = match self.memory_limit {
            None => None,
            Some(m) if m.get_ref().0 == 0 => {
                return Err(src.error(m.span(), key("memory_limit"), "must be greater than zero".to_string()))
            }
            Some(m) => Some(m.into_inner().0),
        };

        let user = match &self.user {
            None => None,
            Some(u) => Some(lookup_user(u.get_ref()).map_err(|m| src.error(u.span(), key("user"), m))?),
        };
        let group = match (&self.group, &user) {
            (Some(g), _) => Some(lookup_group(g.get_ref()).map_err(|m| src.error(g.span(), key("group"), m))?),
            (None, Some(user)) => Some(primary_group(user)),
            (None, None) => None,
        };

        let backoff = self.backoff.unwrap_or_default().build(src, &name)?;

        let watchdog = match self.watchdog {
            Some(w) if w.get_ref().0 < Duration::from_millis(100) => {
                return Err(src.error(w.span(), key("watchdog"), "must be at least 100ms".to_string()))
            }
            w => w.map(|w| w.into_inner().0),
        };

        let ready_span = self.ready.as_ref().map(|r| r.span());
        let ready = match self.ready {
            None => ReadyCheck::default(),
            Some(r) => {
                let probe = matches!(r.get_ref(), ReadyCheck::Http { .. } | ReadyCheck::Tcp);
                if probe && self.port.is_none() {
                    // Through shared `listen` sockets a probe would reach any worker, not the new one.
                    let msg = "a readiness probe connects to 127.0.0.1:`port`, the worker's own port: set `port`, or use ready = \"notify\" with `listen`";
                    return Err(src.error(r.span(), key("ready"), msg.to_string()));
                }
                r.into_inner()
            }
        };
        if let (true, Some(port)) = (matches!(ready, ReadyCheck::Http { .. } | ReadyCheck::Tcp), &self.port) {
            let shared = self.listen.iter().any(|l| matches!(l, ListenAddr::Tcp(a) if a.port() == *port.get_ref()));
            if shared {
                // supd's own socket accepts the probe, and any slot's worker (or the old one) may answer it.
                let msg = format!(
                    "port `{}` is also a `listen` port, so any worker could answer the readiness probe: use ready = \"notify\", or set `port` to a separate health port",
                    port.get_ref()
                );
                return Err(src.error(port.span(), key("port"), msg));
            }
        }

        if matches!(ready, ReadyCheck::Accepting) && self.listen.is_empty() {
            // Without supd's sockets there is nothing whose waiting could be seen.
            let span = ready_span.clone().unwrap_or(0..0);
            let msg = "ready = \"accepting\" watches the worker wait on the sockets supd passes it: set `listen`, or use another check";
            return Err(src.error(span, key("ready"), msg.to_string()));
        }
        if matches!(ready, ReadyCheck::Listening) && !self.node_cluster.as_ref().is_some_and(|n| *n.get_ref()) {
            let span = ready_span.clone().unwrap_or(0..0);
            let msg =
                "ready = \"listening\" is the Node cluster worker's listen(): set node_cluster = true and `listen`";
            return Err(src.error(span, key("ready"), msg.to_string()));
        }
        let node_cluster = match self.node_cluster {
            Some(n) if *n.get_ref() && self.listen.is_empty() => {
                let msg = "a Node cluster worker's server.listen() gets one of supd's sockets: set `listen` too";
                return Err(src.error(n.span(), key("node_cluster"), msg.to_string()));
            }
            n => n.is_some_and(|n| n.into_inner()),
        };
        let cron_restart = match self.cron_restart {
            None => None,
            Some(c) => Some(
                crate::cron::CronSchedule::parse(c.get_ref())
                    .map_err(|m| src.error(c.span(), key("cron_restart"), m))?,
            ),
        };

        let cwd = self.cwd.map_or_else(|| base.to_path_buf(), |c| resolve(base, &c));
        let watch = self.watch.and_then(|w| w.into_config(&cwd));

        Ok(AppConfig {
            command: self.command.0,
            cwd,
            env,
            env_file,
            required_env,
            instances: self.instances.unwrap_or(Instances::Count(1)).resolve(),
            listen: self.listen.into_iter().map(|l| l.resolve(base)).collect(),
            listen_backlog: self.listen_backlog.unwrap_or(1024),
            port: self.port.map(|p| p.into_inner()),
            ready,
            ready_timeout: self.ready_timeout.map_or(Duration::from_secs(30), |d| d.0),
            min_healthy_time: self.min_healthy_time.map_or(DEFAULT_MIN_HEALTHY_TIME, |d| d.0),
            history_limit: self.history_limit.map_or(10, |n| n.0),
            stop_signal: self.stop_signal.map_or(Signal::SIGTERM, |s| s.0),
            stop_timeout: self.stop_timeout.map_or(Duration::from_secs(10), |d| d.0),
            restart: self.restart.unwrap_or_default(),
            backoff,
            max_restarts: self.max_restarts.unwrap_or(10),
            restart_window: self.restart_window.map_or(Duration::from_secs(60), |d| d.0),
            memory_limit,
            memory_limit_samples: self.memory_limit_samples.map_or(3, |n| n.0),
            watchdog,
            reload_parallelism: self.reload_parallelism.map_or(1, |n| n.0),
            user,
            group,
            autostart: self.autostart.unwrap_or(true),
            stop_exit_codes: self.stop_exit_codes,
            shutdown_with_message: self.shutdown_with_message.unwrap_or(false),
            node_cluster,
            cron_restart,
            instance_var: self.instance_var.map(|v| v.0),
            logs: self.logs.map(|l| l.into_inner().into_config()).unwrap_or_default(),
            watch,
            name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{app_err, parse_app};

    #[test]
    fn defaults() {
        let app = parse_app("");
        let want = AppConfig {
            name: "web".to_string(),
            command: vec!["run".to_string()],
            cwd: PathBuf::from("/x"),
            env: Vec::new(),
            env_file: None,
            required_env: Vec::new(),
            instances: 1,
            listen: Vec::new(),
            listen_backlog: 1024,
            port: None,
            ready: ReadyCheck::None,
            ready_timeout: Duration::from_secs(30),
            min_healthy_time: DEFAULT_MIN_HEALTHY_TIME,
            history_limit: 10,
            stop_signal: Signal::SIGTERM,
            stop_timeout: Duration::from_secs(10),
            restart: RestartPolicy::Always,
            backoff: Backoff::default(),
            max_restarts: 10,
            restart_window: Duration::from_secs(60),
            memory_limit: None,
            memory_limit_samples: 3,
            watchdog: None,
            reload_parallelism: 1,
            user: None,
            group: None,
            autostart: true,
            stop_exit_codes: Vec::new(),
            shutdown_with_message: false,
            node_cluster: false,
            cron_restart: None,
            instance_var: None,
            logs: crate::logs::LogConfig::default(),
            watch: None,
        };
        assert_eq!(app, want);
    }

    #[test]
    fn values() {
        let app = parse_app(
            "cwd = \"srv\"\nport = 3000\nmax_restarts = 3\nautostart = false\nstop_exit_codes = [0, 143]\nshutdown_with_message = true\nwatchdog = \"20s\"\nlisten_backlog = 64",
        );
        assert_eq!(app.cwd, PathBuf::from("/x/srv"));
        assert_eq!(app.port, Some(3000));
        assert_eq!(app.max_restarts, 3);
        assert!(!app.autostart);
        assert_eq!(app.stop_exit_codes, vec![0, 143]);
        assert!(app.shutdown_with_message);
        assert_eq!(app.watchdog, Some(Duration::from_secs(20)));
        assert_eq!(app.listen_backlog, 64);
        assert_eq!(parse_app("cwd = \"/srv\"").cwd, PathBuf::from("/srv"));
        // A probe on a port of its own, or `port` shared with `listen` without a probe, is fine.
        let app = parse_app("listen = [\"127.0.0.1:3000\"]\nport = 3001\nready = { http = \"/health\" }");
        assert_eq!((app.port, app.ready), (Some(3001), ReadyCheck::Http { path: "/health".to_string() }));
        assert_eq!(parse_app("listen = [\"127.0.0.1:3000\"]\nport = 3000\nready = \"notify\"").port, Some(3000));
        let app = parse_app("listen = [\"127.0.0.1:3000\"]\nnode_cluster = true\ncron_restart = \"30 4 * * 1-5\"");
        assert!(app.node_cluster);
        assert_eq!(app.cron_restart.map(|c| c.pattern().to_string()), Some("30 4 * * 1-5".to_string()));
        assert_eq!(parse_app("instance_var = \"INSTANCE_ID\"").instance_var.as_deref(), Some("INSTANCE_ID"));
        assert!(app_err("instance_var = \"A=B\"").contains("invalid environment variable name `A=B`"));
    }

    #[test]
    fn errors() {
        let cases: &[(&str, &str)] = &[
            ("instancs = 2", "/x/sup.toml:3:1: key `apps.web.instancs`: unknown key (did you mean `instances`?)"),
            ("port = 70000", "/x/sup.toml:3:8: key `apps.web.port`: invalid value: integer `70000`, expected u16"),
            (
                "autostart = \"yes\"",
                "/x/sup.toml:3:13: key `apps.web.autostart`: invalid type: string \"yes\", expected a boolean",
            ),
            (
                "stop_exit_codes = [0, \"1\"]",
                "/x/sup.toml:3:23: key `apps.web.stop_exit_codes[1]`: invalid type: string \"1\", expected i32",
            ),
            ("frobnicate = 1", "/x/sup.toml:3:1: key `apps.web.frobnicate`: unknown key"),
            (
                "ready = \"listening\"",
                "/x/sup.toml:3:9: key `apps.web.ready`: ready = \"listening\" is the Node cluster worker's listen(): set node_cluster = true and `listen`",
            ),
            (
                "node_cluster = true",
                "/x/sup.toml:3:16: key `apps.web.node_cluster`: a Node cluster worker's server.listen() gets one of supd's sockets: set `listen` too",
            ),
            (
                "cron_restart = \"0 3 * *\"",
                "/x/sup.toml:3:16: key `apps.web.cron_restart`: invalid cron pattern `0 3 * *`: expected 5 fields (minute hour day month weekday) or 6 (with seconds first)",
            ),
            (
                "cron_restart = \"0 25 * * *\"",
                "/x/sup.toml:3:16: key `apps.web.cron_restart`: invalid cron pattern `0 25 * * *`: the hour field `25` is out of range or malformed",
            ),
            (
                "ready = \"accepting\"",
                "/x/sup.toml:3:9: key `apps.web.ready`: ready = \"accepting\" watches the worker wait on the sockets supd passes it: set `listen`, or use another check",
            ),
            (
                "ready = { tcp = true }",
                "/x/sup.toml:3:9: key `apps.web.ready`: a readiness probe connects to 127.0.0.1:`port`, the worker's own port: set `port`, or use ready = \"notify\" with `listen`",
            ),
            (
                "listen = [\"0.0.0.0:3000\"]\nport = 3000\nready = { tcp = true }",
                "/x/sup.toml:4:8: key `apps.web.port`: port `3000` is also a `listen` port, so any worker could answer the readiness probe: use ready = \"notify\", or set `port` to a separate health port",
            ),
            (
                "listen = [\"unix:web.sock\", \"[::]:8080\"]\nport = 8080\nready = { http = \"/health\" }",
                "/x/sup.toml:4:8: key `apps.web.port`: port `8080` is also a `listen` port, so any worker could answer the readiness probe: use ready = \"notify\", or set `port` to a separate health port",
            ),
        ];
        for (line, want) in cases {
            assert_eq!(app_err(line), *want, "{line}");
        }
    }
}
