//! `supctl`: the sup command line. Talks to supd over its control socket.

mod client;
mod import;
mod output;
mod top;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use sup_proto::{exit, ActionRequest, ActionResponse, RolloutEvent, ScaleRequest, StatusResponse};

use crate::client::{Client, ClientError};

/// Drives supd, the sup process supervisor.
#[derive(Debug, Parser)]
#[command(name = "supctl", version, about, after_help = EXIT_CODES)]
struct Cli {
    /// Control socket of supd (default: from --config, else /run/supd/control.sock as root, else $XDG_RUNTIME_DIR/supd/control.sock).
    #[arg(long, global = true, env = "SUPD_SOCKET")]
    socket: Option<PathBuf>,
    /// supervisor.toml to take the control socket path from.
    #[arg(long, global = true, env = "SUPD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

const EXIT_CODES: &str = "Exit status: 0 success, 1 the operation failed, 2 usage error, 3 supd cannot be reached.";

#[derive(Debug, Subcommand)]
enum Command {
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
        sort: top::SortBy,
        /// Print one frame and exit (for scripts).
        #[arg(long)]
        once: bool,
        /// Refresh interval.
        #[arg(long, default_value = "1s", value_parser = sup_config::parse_duration)]
        interval: std::time::Duration,
    },
    /// Start an app's stopped or errored instances and wait until they are ready.
    Start(Target),
    /// Stop an app gracefully (stop signal, then SIGKILL after stop_timeout).
    Stop(Target),
    /// Stop then start an app (use reload for zero downtime).
    Restart(Target),
    /// Zero-downtime rolling reload: re-read the app's configuration, start a new worker per slot, wait until it is ready, then drain the old one. Rolls back and exits 1 if a new worker fails.
    Reload {
        #[command(flatten)]
        target: Target,
        /// Replace only the first N slots (each through its health window), then pause as a canary: `promote` rolls the rest, `rollback` puts them back.
        #[arg(long, value_name = "N", conflicts_with = "all", value_parser = clap::value_parser!(u32).range(1..))]
        canary: Option<u32>,
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
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Convert a PM2 ecosystem file (.js, .cjs, .mjs, .json, .yaml, .yml) to a commented supervisor.toml.
    Import(import::ImportArgs),
}

#[derive(Debug, Args)]
struct Target {
    /// The app.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    app: Option<String>,
    /// Every app.
    #[arg(long)]
    all: bool,
    /// Wait for an operation in progress instead of failing with "busy".
    #[arg(long)]
    wait: bool,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file without a running supd (exit 0 valid, 1 invalid).
    Check {
        /// The file (default: --config, SUPD_CONFIG, else ./supervisor.toml).
        file: Option<PathBuf>,
    },
    /// Make supd re-read its configuration file and apply the difference: new apps start, removed apps stop, changed apps roll. An invalid file changes nothing (exit 1).
    Apply,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("supctl: {e}");
            if let Some(hint) = e.hint() {
                eprintln!("hint: {hint}");
            }
            e.exit_code()
        }
    };
    ExitCode::from(code as u8)
}

fn run(cli: Cli) -> Result<i32, ClientError> {
    if let Command::Import(args) = &cli.command {
        return Ok(import::run(args));
    }
    if let Command::Config(ConfigCommand::Check { file }) = &cli.command {
        let path = file.clone().or(cli.config.clone()).unwrap_or_else(|| PathBuf::from("supervisor.toml"));
        return Ok(match sup_config::load(&path) {
            Ok(cfg) => {
                for w in sup_config::warnings(&cfg) {
                    eprintln!("warning: {w}");
                }
                println!("{}: {}", path.display(), sup_config::check_message(&cfg));
                exit::OK
            }
            Err(e) => {
                eprintln!("{e}");
                exit::FAILED
            }
        });
    }
    let client = Client::new(socket_path(&cli)?)?;
    match cli.command {
        Command::Status { app, json } => {
            let path = match &app {
                Some(a) => format!("/v1/status?app={a}"),
                None => "/v1/status".to_string(),
            };
            let status: StatusResponse = client.get(&path)?;
            if json {
                output::print_json(&status);
            } else {
                output::print_status(&status);
            }
            Ok(exit::OK)
        }
        Command::Logs { app, lines, follow, err, out, instance, since, json } => {
            if app == "reopen" {
                let _: ActionResponse = client.post("/v1/logs/reopen", &serde_json::json!({}))?;
                println!("log files reopened");
                return Ok(exit::OK);
            }
            let mut q = format!("/v1/logs?app={app}&lines={lines}&follow={}", u8::from(follow));
            if err {
                q.push_str("&stream=err");
            }
            if out {
                q.push_str("&stream=out");
            }
            if let Some(i) = instance {
                q.push_str(&format!("&instance={i}"));
            }
            if let Some(s) = since {
                q.push_str(&format!("&since={}", s.as_secs().max(1)));
            }
            client.stream_get(&q, |l: sup_proto::LogLine| output::print_log_line(&l, json))?;
            Ok(exit::OK)
        }
        Command::Describe { app, json } => {
            let v: serde_json::Value = client.get(&format!("/v1/describe?app={app}"))?;
            if json {
                output::print_json(&v);
            } else {
                output::print_describe(&v);
            }
            Ok(exit::OK)
        }
        Command::Signal { app, signal } => {
            if let Err(m) = sup_config::parse_signal(&signal) {
                eprintln!("supctl: {m}");
                return Ok(exit::USAGE);
            }
            let r: ActionResponse =
                client.post(&format!("/v1/signal?app={app}&signal={signal}"), &serde_json::json!({}))?;
            for res in r.results {
                println!("{}: {}", res.app, res.message);
            }
            Ok(exit::OK)
        }
        Command::Flush { app } => {
            let r: ActionResponse = client.post(&format!("/v1/logs/flush?app={app}"), &serde_json::json!({}))?;
            for res in r.results {
                println!("{}: {}", res.app, res.message);
            }
            Ok(exit::OK)
        }
        Command::Top { sort, once, interval } => top::run(&client, sort, once, interval).map(|()| exit::OK),
        Command::Start(t) => action(&client, "start", t),
        Command::Stop(t) => action(&client, "stop", t),
        Command::Restart(t) => action(&client, "restart", t),
        Command::Reload { target: t, canary } => {
            rollout(&client, "/v1/reload", &ActionRequest { app: t.app, all: t.all, wait: t.wait, canary })
        }
        Command::Promote { app, wait } => {
            rollout(&client, "/v1/promote", &ActionRequest { app: Some(app), all: false, wait, canary: None })
        }
        Command::Rollback { app, to, wait } => {
            rollout(&client, "/v1/rollback", &sup_proto::RollbackRequest { app, to, wait })
        }
        Command::Events { follow, json } => {
            let q = format!("/v1/events?follow={}", u8::from(follow));
            client.stream_get(&q, |e: sup_proto::LifecycleEvent| output::print_event_line(&e, json))?;
            Ok(exit::OK)
        }
        Command::History { app, json } => {
            let h: sup_proto::HistoryResponse = client.get(&format!("/v1/history?app={app}"))?;
            if json {
                output::print_json(&h);
            } else {
                output::print_history(&h);
            }
            Ok(exit::OK)
        }
        Command::Scale { app, instances, wait } => {
            rollout(&client, "/v1/scale", &ScaleRequest { app, instances, wait })
        }
        Command::Config(ConfigCommand::Apply) => rollout(&client, "/v1/config/apply", &serde_json::json!({})),
        Command::Config(ConfigCommand::Check { .. }) => Ok(exit::USAGE),
        Command::Import(_) => Ok(exit::USAGE),
    }
}

fn action(client: &Client, verb: &str, t: Target) -> Result<i32, ClientError> {
    let req = ActionRequest { app: t.app, all: t.all, wait: t.wait, canary: None };
    let resp: ActionResponse = client.post(&format!("/v1/{verb}"), &req)?;
    for r in &resp.results {
        let mark = if r.ok { "ok" } else { "FAILED" };
        println!("{}: {mark}: {}", r.app, r.message);
    }
    Ok(if resp.all_ok() { exit::OK } else { exit::FAILED })
}

/// Streams a rollout's progress, one line per event, and ends with a summary.
fn rollout<B: serde::Serialize>(client: &Client, path: &str, body: &B) -> Result<i32, ClientError> {
    let mut code = exit::FAILED;
    client.stream(path, body, |ev: RolloutEvent| {
        if let RolloutEvent::Done { results } = &ev {
            code = if results.iter().all(|r| r.ok) { exit::OK } else { exit::FAILED };
        }
        output::print_event(&ev);
    })?;
    Ok(code)
}

/// `--socket`, else `SUPD_SOCKET` (both via clap), else the config's, else the default.
fn socket_path(cli: &Cli) -> Result<PathBuf, ClientError> {
    if let Some(s) = &cli.socket {
        return Ok(s.clone());
    }
    if let Some(cfg) = &cli.config {
        return sup_config::load(cfg)
            .map(|c| c.supervisor.control_socket)
            .map_err(|e| ClientError::Config(e.to_string()));
    }
    Ok(sup_config::default_control_socket())
}
