//! supctl's command line, as clap defines it: parsed by supctl, and turned
//! into its man page and shell completions at build time.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Drives supd, the sup process supervisor.
#[derive(Debug, Parser)]
#[command(name = "supctl", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// Control socket of supd [env: SUPD_SOCKET] (default: from --config, else /run/supd/control.sock as root, else $XDG_RUNTIME_DIR/supd/control.sock).
    // The environment is read by `socket_file`, not by clap: clap renders an env-set
    // argument in every usage line as if it had to be typed.
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// supervisor.toml to take the control socket path from [env: SUPD_CONFIG].
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// `--config`, else a non-empty `SUPD_CONFIG`.
    pub fn config_file(&self) -> Option<PathBuf> {
        self.config.clone().or_else(|| env_path("SUPD_CONFIG"))
    }

    /// `--socket`, else a non-empty `SUPD_SOCKET`.
    pub fn socket_file(&self) -> Option<PathBuf> {
        self.socket.clone().or_else(|| env_path("SUPD_SOCKET"))
    }
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from)
}

pub const EXIT_CODES: &str = "Exit status: 0 success, 1 the operation failed, 2 usage error, 3 supd cannot be reached.";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show apps and their instances.
    #[command(visible_aliases = ["ls", "list"])]
    Status {
        /// Only this app.
        app: Option<String>,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Show an app's output: the last lines, then (-f) new ones as they come. `supctl logs reopen` reopens every log file (for an external logrotate).
    Logs {
        /// The app, or `reopen`.
        app: String,
        /// Lines to show from the files.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        /// Keep following new lines (Ctrl-C stops).
        #[arg(short, long)]
        follow: bool,
        /// Only stderr.
        #[arg(long, conflicts_with = "out")]
        err: bool,
        /// Only stdout.
        #[arg(long)]
        out: bool,
        /// Only this slot.
        #[arg(long)]
        instance: Option<u32>,
        /// Only lines newer than this, e.g. 10m.
        #[arg(long, value_parser = sup_config::parse_duration)]
        since: Option<std::time::Duration>,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Everything about one app: effective configuration (environment keys, never values), slots, restarts with reasons, log files.
    Describe {
        /// The app.
        app: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send a signal (e.g. USR2, HUP) to every worker of an app, to its whole process group.
    Signal {
        /// The app.
        app: String,
        /// The signal: `SIGUSR2`, `USR2` or `usr2`.
        signal: String,
    },
    /// Empty an app's log files and remove its rotated ones (PM2's `flush`).
    Flush {
        /// The app.
        app: String,
    },
    /// A live, refreshing view of every worker's CPU and memory (q or Ctrl-C quits).
    #[command(visible_alias = "monit")]
    Top {
        /// Sort by.
        #[arg(long, value_enum, default_value = "cpu")]
        sort: SortBy,
        /// Print one frame and exit (for scripts).
        #[arg(long)]
        once: bool,
        /// Refresh interval.
        #[arg(long, default_value = "1s", value_parser = sup_config::parse_duration)]
        interval: std::time::Duration,
    },
    /// Start an app's stopped or errored instances and wait until they are ready.
    #[command(group(clap::ArgGroup::new("which").args(["app", "all"]).required(true)))]
    Start(Target),
    /// Stop an app gracefully (stop signal, then SIGKILL after stop_timeout).
    #[command(group(clap::ArgGroup::new("which").args(["app", "all"]).required(true)))]
    Stop(Target),
    /// Stop then start an app (use reload for zero downtime).
    #[command(group(clap::ArgGroup::new("which").args(["app", "all"]).required(true)))]
    Restart(Target),
    /// Zero-downtime rolling reload: re-read the app's configuration, start a new worker per slot, wait until it is ready, then drain the old one. Rolls back and exits 1 if a new worker fails.
    #[command(group(clap::ArgGroup::new("which").args(["app", "all"]).required(true)))]
    Reload {
        #[command(flatten)]
        target: Target,
        /// Replace only the first N slots (each through its health window), then pause as a canary: `promote` rolls the rest, `rollback` puts them back.
        #[arg(long, value_name = "N", conflicts_with = "all", value_parser = clap::value_parser!(u32).range(1..))]
        canary: Option<u32>,
        /// Print only one JSON object at the end (app, result, versions before and after, the failed slot and why), for scripts and Ansible.
        #[arg(long)]
        json: bool,
    },
    /// Roll the rest of an app's paused canary onto its version.
    Promote {
        /// The app.
        app: String,
        /// Wait for an operation in progress instead of failing with "busy".
        #[arg(long)]
        wait: bool,
    },
    /// Roll an app back, with zero downtime, onto an earlier version's pinned table and release (default: the last successful version before the current). Exits 1 if it fails.
    Rollback {
        /// The app.
        app: String,
        /// The version to go back to (see `supctl history`).
        #[arg(long, value_name = "VERSION")]
        to: Option<u64>,
        /// Wait for an operation in progress instead of failing with "busy".
        #[arg(long)]
        wait: bool,
        /// Print only one JSON object at the end, as `reload --json` does.
        #[arg(long)]
        json: bool,
    },
    /// Lifecycle events of every app (crashes, memory and watchdog replacements, rollouts, canaries): the last ones, and with -f new ones as they come.
    Events {
        /// Keep printing new events until interrupted.
        #[arg(short, long)]
        follow: bool,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// An app's last versions: when, why, by whom, which release, and how each rollout ended.
    History {
        /// The app.
        app: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change the number of instances of an app, without dropping requests.
    Scale {
        /// The app.
        app: String,
        /// The new number of instances.
        instances: u32,
        /// Wait for an operation in progress instead of failing with "busy".
        #[arg(long)]
        wait: bool,
    },
    /// Add an app without editing TOML by hand (PM2's `start CMD --name NAME`): supd writes an [apps.NAME] table into the file it runs from (keeping its comments), checks the result, and applies the file. The file stays the one source of truth: the app is still there after supd restarts.
    #[command(override_usage = "supctl add [OPTIONS] <NAME> -- <COMMAND> [ARGS]...")]
    Add(AddArgs),
    /// Stop an app and remove its [apps.NAME] table from supd's file (PM2's `delete`).
    Remove {
        /// The app.
        name: String,
    },
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Convert a PM2 ecosystem file (.js, .cjs, .mjs, .json, .yaml, .yml) to a commented supervisor.toml.
    Import(ImportArgs),
}

#[derive(Debug, Args)]
pub struct Target {
    /// The app.
    pub app: Option<String>,
    /// Every app (instead of APP).
    #[arg(long)]
    pub all: bool,
    /// Wait for an operation in progress instead of failing with "busy".
    #[arg(long)]
    pub wait: bool,
}

/// Arguments of `supctl add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// The app's name.
    pub name: String,
    /// Number of workers (default 1; "max" is one per CPU only in the file).
    #[arg(short, long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub instances: Option<u32>,
    /// A socket supd binds and passes to every worker (LISTEN_FDS), e.g. 127.0.0.1:3000; repeat for more.
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<String>,
    /// The port the app binds itself (what `--ready tcp` and `--ready /health` probe).
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// How supd learns a worker is ready: none, notify, pm2, listening, tcp, or an HTTP path such as /health.
    #[arg(long, value_name = "KIND")]
    pub ready: Option<String>,
    /// An environment variable for the app, K=V; repeat for more.
    #[arg(short, long, value_name = "K=V", value_parser = parse_env_pair)]
    pub env: Vec<(String, String)>,
    /// Working directory (default: the current directory).
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<PathBuf>,
    /// The program and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `K=V`, with a non-empty name.
fn parse_env_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected K=V, found `{s}`")),
    }
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file without a running supd (exit 0 valid, 1 invalid).
    Check {
        /// The file (default: --config, SUPD_CONFIG, else ./supervisor.toml).
        file: Option<PathBuf>,
    },
    /// Make supd re-read its configuration file and apply the difference: new apps start, removed apps stop, changed apps roll. An invalid file changes nothing (exit 1).
    Apply,
}

/// What the rows are sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortBy {
    /// CPU, highest first.
    Cpu,
    /// Memory of the process tree, highest first.
    Mem,
    /// App and slot.
    Name,
}

/// Arguments of `supctl import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The PM2 ecosystem file: ecosystem.config.js, .cjs, .mjs or .json.
    pub file: PathBuf,
    /// Write the configuration to this file instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Merge each app's env_NAME over its env, as `pm2 start --env NAME` does.
    #[arg(long, value_name = "NAME")]
    pub env: Option<String>,
    /// Overwrite the --output file if it exists.
    #[arg(long, requires = "output")]
    pub force: bool,
}
