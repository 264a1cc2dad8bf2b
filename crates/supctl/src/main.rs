//! `supctl`: the sup command line. Talks to supd over its control socket.

mod client;
mod import;
mod output;
mod summary;
mod top;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sup_proto::{exit, ActionRequest, ActionResponse, RolloutEvent, ScaleRequest, StatusResponse};

use crate::client::{Client, ClientError};
use sup_cli::supctl::{Cli, Command, ConfigCommand, Target};

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
        let path = file.clone().or(cli.config_file()).unwrap_or_else(|| PathBuf::from("supervisor.toml"));
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
        Command::Reload { target: t, canary, json } => {
            let req = ActionRequest { app: t.app.clone(), all: t.all, wait: t.wait, canary };
            if json {
                return Ok(summary::run(&client, "/v1/reload", &req, t.app.as_deref()));
            }
            rollout(&client, "/v1/reload", &req)
        }
        Command::Promote { app, wait } => {
            rollout(&client, "/v1/promote", &ActionRequest { app: Some(app), all: false, wait, canary: None })
        }
        Command::Rollback { app, to, wait, json } => {
            let req = sup_proto::RollbackRequest { app: app.clone(), to, wait };
            if json {
                return Ok(summary::run(&client, "/v1/rollback", &req, Some(&app)));
            }
            rollout(&client, "/v1/rollback", &req)
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
        Command::Add(a) => {
            // Relative to where supctl runs, as `pm2 start` is; supd resolves against its file.
            let cwd = a.cwd.clone().unwrap_or_else(|| PathBuf::from("."));
            let cwd = std::path::absolute(&cwd)
                .map_err(|e| ClientError::Config(format!("cannot resolve `{}`: {e}", cwd.display())))?;
            let req = sup_proto::AddRequest {
                name: a.name,
                command: a.command,
                instances: a.instances,
                listen: a.listen,
                port: a.port,
                ready: a.ready,
                env: a.env,
                cwd: Some(cwd.display().to_string()),
            };
            rollout(&client, "/v1/apps/add", &req)
        }
        Command::Remove { name } => rollout(&client, "/v1/apps/remove", &sup_proto::RemoveRequest { name }),
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

/// `--socket` or `SUPD_SOCKET`, else the config's, else the default.
///
/// A config file with an error still names the socket (read leniently from `[supervisor]`),
/// so `status`, `stop` and `logs` keep working while the file is being edited; only the
/// commands that make supd read the file fail on its error.
fn socket_path(cli: &Cli) -> Result<PathBuf, ClientError> {
    if let Some(s) = cli.socket_file() {
        return Ok(s);
    }
    let Some(cfg) = cli.config_file() else {
        return Ok(sup_config::default_control_socket());
    };
    let found = sup_config::control_socket(&cfg).map_err(|e| ClientError::Config(e.to_string()))?;
    if let Some(e) = found.error {
        let reads_file = matches!(
            cli.command,
            // Not `config apply`: supd reads the file itself and reports its
            // error, also to systemd (STATUS=) when `systemctl reload` runs it.
            Command::Reload { .. } | Command::Add(_) | Command::Remove { .. }
        );
        if reads_file {
            return Err(ClientError::Config(e.to_string()));
        }
        let first = e.to_string().lines().next().unwrap_or_default().to_string();
        eprintln!("supctl: warning: {} has an error (running the command anyway): {first}", cfg.display());
    }
    Ok(found.socket)
}
