//! `[supervisor]`: settings of supd itself.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::duration::show;
use crate::error::{ConfigError, Source};
use crate::identity::{lookup_group, Group};
use crate::paths::{default_log_dir, default_run_dir, resolve};
use crate::raw::RawSupervisor;

/// The shortest `monitor_interval`: sampling /proc faster costs more than it tells.
const MIN_MONITOR_INTERVAL: Duration = Duration::from_millis(100);

/// Settings of supd itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorConfig {
    /// Path of the control socket supctl talks to.
    pub control_socket: PathBuf,
    /// Permission bits of the control socket.
    pub control_socket_mode: u32,
    /// Group owning the control socket; its members may act.
    pub control_socket_group: Option<Group>,
    /// Group whose members may only read (status, logs, ...), never act.
    pub control_socket_read_group: Option<Group>,
    /// Directory for runtime files.
    pub run_dir: PathBuf,
    /// Directory for app logs.
    pub log_dir: PathBuf,
    /// How often CPU and memory are sampled.
    pub monitor_interval: Duration,
    /// Address of the Prometheus metrics endpoint.
    pub metrics: Option<SocketAddr>,
    /// `RUST_LOG`-style filter for supd's own log.
    pub log_level: String,
    /// supd's own log file; stderr when unset.
    pub log_file: Option<PathBuf>,
    /// Most worker processes of all apps together.
    pub max_workers: u32,
    /// Most control connections served at once; more are refused with 503.
    pub max_control_connections: u32,
    /// supd raises its open-files limit to this (capped by the hard limit).
    pub max_open_files: u32,
}

/// Files supd holds open per worker: notify socket, two pipes, IPC channel, pidfd, listening sockets and slack.
pub const FDS_PER_WORKER: u32 = 8;
/// Files supd holds open besides workers and control connections.
pub const FDS_BASE: u32 = 64;

impl RawSupervisor {
    /// Applies defaults, resolves paths against `base` and checks values.
    pub(crate) fn build(self, src: &Source<'_>, base: &Path) -> Result<SupervisorConfig, ConfigError> {
        let key = |k: &str| format!("supervisor.{k}");
        let run_dir = self.run_dir.map_or_else(default_run_dir, |d| resolve(base, &d));
        let control_socket = self.control_socket.map_or_else(|| run_dir.join("control.sock"), |s| resolve(base, &s));
        let control_socket_group = match self.control_socket_group {
            None => None,
            Some(g) => {
                Some(lookup_group(g.get_ref()).map_err(|m| src.error(g.span(), key("control_socket_group"), m))?)
            }
        };
        let control_socket_read_group = match self.control_socket_read_group {
            None => None,
            Some(g) => {
                let group =
                    lookup_group(g.get_ref()).map_err(|m| src.error(g.span(), key("control_socket_read_group"), m))?;
                if control_socket_group.as_ref().is_some_and(|w| w.gid == group.gid) {
                    return Err(src.error(
                        g.span(),
                        key("control_socket_read_group"),
                        format!(
                            "group `{}` is also control_socket_group, whose members may act: \
                             give the read-only role a group of its own",
                            group.name
                        ),
                    ));
                }
                Some(group)
            }
        };
        let monitor_interval = match self.monitor_interval {
            None => Duration::from_secs(1),
            Some(v) if v.get_ref().0 < MIN_MONITOR_INTERVAL => {
                return Err(src.error(
                    v.span(),
                    key("monitor_interval"),
                    format!("must be at least {}, found `{}`", show(MIN_MONITOR_INTERVAL), show(v.get_ref().0)),
                ))
            }
            Some(v) => v.into_inner().0,
        };
        let log_level = match self.log_level {
            None => "info".to_string(),
            Some(l) if l.get_ref().trim().is_empty() => {
                return Err(src.error(
                    l.span(),
                    key("log_level"),
                    "must not be empty; use a filter such as \"info\"".to_string(),
                ))
            }
            Some(l) => l.into_inner(),
        };
        let max_workers = self.max_workers.as_ref().map_or(4096, |m| m.get_ref().0);
        let max_control_connections = self.max_control_connections.map_or(256, |m| m.0);
        let max_open_files = self.max_open_files.as_ref().map_or(65_536, |m| m.get_ref().0);
        let needed =
            max_workers.saturating_mul(FDS_PER_WORKER).saturating_add(max_control_connections).saturating_add(FDS_BASE);
        if max_open_files < needed {
            let span = self.max_open_files.as_ref().map(|m| m.span()).or(self.max_workers.as_ref().map(|m| m.span()));
            let msg = format!(
                "max_open_files = {max_open_files} is too low for max_workers = {max_workers} and \
                 max_control_connections = {max_control_connections}: supd needs up to {needed} \
                 ({FDS_PER_WORKER} per worker, 1 per control connection, {FDS_BASE} of its own)"
            );
            return Err(match span {
                Some(span) => src.error(span, key("max_open_files"), msg),
                None => src.error(0..0, key("max_open_files"), msg),
            });
        }
        Ok(SupervisorConfig {
            control_socket,
            control_socket_mode: self.control_socket_mode.map_or(0o660, |m| m.0),
            control_socket_group,
            control_socket_read_group,
            run_dir,
            log_dir: self.log_dir.map_or_else(default_log_dir, |d| resolve(base, &d)),
            monitor_interval,
            metrics: self.metrics.map(|m| m.0),
            log_level,
            log_file: self.log_file.map(|f| resolve(base, &f)),
            max_workers,
            max_control_connections,
            max_open_files,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::default_control_socket;
    use crate::testutil::{err, parse_ok};

    #[test]
    fn defaults() {
        let s = parse_ok("").supervisor;
        assert_eq!(s.control_socket, default_control_socket());
        assert_eq!(s.control_socket_mode, 0o660);
        assert_eq!(s.control_socket_group, None);
        assert_eq!(s.run_dir, default_run_dir());
        assert_eq!(s.log_dir, default_log_dir());
        assert_eq!(s.monitor_interval, Duration::from_secs(1));
        assert_eq!(s.metrics, None);
        assert_eq!(s.log_level, "info");
        assert_eq!((s.max_workers, s.max_control_connections, s.max_open_files), (4096, 256, 65_536));
    }

    #[test]
    fn values() {
        let s = parse_ok(
            "[supervisor]\nrun_dir = \"run\"\nlog_dir = \"/var/log/x\"\nmonitor_interval = \"250ms\"\nlog_level = \"supd=debug\"\n",
        )
        .supervisor;
        assert_eq!(s.run_dir, PathBuf::from("/x/run"));
        assert_eq!(s.control_socket, PathBuf::from("/x/run/control.sock"));
        assert_eq!(s.log_dir, PathBuf::from("/var/log/x"));
        assert_eq!(s.monitor_interval, Duration::from_millis(250));
        assert_eq!(s.log_level, "supd=debug");
        let s = parse_ok("[supervisor]\ncontrol_socket = \"sup.sock\"\n").supervisor;
        assert_eq!(s.control_socket, PathBuf::from("/x/sup.sock"));
    }

    #[test]
    fn errors() {
        let cases: &[(&str, &str)] = &[
            (
                "[supervisor]\nmonitor_interval = \"10ms\"\n",
                "/x/sup.toml:2:20: key `supervisor.monitor_interval`: must be at least 100ms, found `10ms`",
            ),
            (
                "[supervisor]\nlog_level = \"\"\n",
                "/x/sup.toml:2:13: key `supervisor.log_level`: must not be empty; use a filter such as \"info\"",
            ),
            (
                "[supervisor]\ncontrol_sockt = \"a\"\n",
                "/x/sup.toml:2:1: key `supervisor.control_sockt`: unknown key (did you mean `control_socket`?)",
            ),
            (
                "[supervisor]\nmax_open_files = 1000\nmax_workers = 200\n",
                "/x/sup.toml:2:18: key `supervisor.max_open_files`: max_open_files = 1000 is too low for max_workers = 200 and max_control_connections = 256: supd needs up to 1920 (8 per worker, 1 per control connection, 64 of its own)",
            ),
            (
                "[supervisor]\nmax_workers = 2\n[apps.web]\ncommand = \"x\"\ninstances = 2\n[apps.q]\ncommand = \"y\"\n",
                "/x/sup.toml:2:15: key `supervisor.max_workers`: the apps ask for 3 workers in all (web: 2, q: 1), more than max_workers = 2",
            ),
            (
                "[supervisor]\nmax_control_connections = 0\n",
                "/x/sup.toml:2:27: key `supervisor.max_control_connections`: must be at least 1, found `0`",
            ),
            (
                "[supervisor]\nmonitor_interval = 1\n",
                "/x/sup.toml:2:20: key `supervisor.monitor_interval`: expected a duration string, found number `1`: use a string such as \"5s\"",
            ),
        ];
        for (src, want) in cases {
            assert_eq!(err(src), *want, "{src}");
        }
    }

    #[test]
    fn a_read_group_of_its_own() {
        let s = parse_ok("[supervisor]\ncontrol_socket_group = \"root\"\ncontrol_socket_read_group = \"daemon\"\n")
            .supervisor;
        assert_eq!(s.control_socket_read_group.map(|g| (g.name, g.gid)), Some(("daemon".to_string(), 1)));
        assert_eq!(parse_ok("").supervisor.control_socket_read_group, None);
        let cases = [
            (
                "[supervisor]\ncontrol_socket_read_group = \"nogroup-xyz\"\n",
                "/x/sup.toml:2:29: key `supervisor.control_socket_read_group`: unknown group `nogroup-xyz`",
            ),
            (
                "[supervisor]\ncontrol_socket_group = \"root\"\ncontrol_socket_read_group = 0\n",
                "/x/sup.toml:3:29: key `supervisor.control_socket_read_group`: group `root` is also control_socket_group, whose members may act: give the read-only role a group of its own",
            ),
        ];
        for (src, want) in cases {
            assert_eq!(err(src), want, "{src}");
        }
    }

    #[test]
    fn a_read_group_that_cannot_connect_is_warned_about() {
        let warn = |extra: &str| {
            crate::warnings(&parse_ok(&format!("[supervisor]\ncontrol_socket_read_group = \"daemon\"\n{extra}")))
                .into_iter()
                .filter(|w| w.contains("control_socket_read_group"))
                .collect::<Vec<_>>()
        };
        // The socket belongs to the read group with 0660, or anyone may connect: fine.
        assert!(warn("").is_empty());
        assert!(warn("control_socket_group = \"root\"\ncontrol_socket_mode = \"0666\"\n").is_empty());
        // The socket belongs to the acting group, and others may not connect.
        assert_eq!(
            warn("control_socket_group = \"root\"\n"),
            ["members of control_socket_read_group `daemon` cannot open the control socket (group `root`, mode 0660): \
              set control_socket_mode = \"0666\"; that is safe, supd decides from each peer's credentials"]
        );
    }
}
