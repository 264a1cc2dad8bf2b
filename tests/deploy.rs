//! End-to-end: deploys behind a `current` symlink. A version is pinned to the
//! release it was started from, so a crash restart never runs code that was
//! not deployed.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sup::*;

/// `releases/<name>/server`, a script that runs `body`.
fn release(root: &Path, name: &str, body: &str) -> PathBuf {
    let dir = root.join("releases").join(name);
    std::fs::create_dir_all(&dir).expect("release dir");
    let script = dir.join("server");
    std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).expect("write server");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir.canonicalize().expect("canonical release")
}

/// Points `current` at `target`, atomically (as deploy scripts do: a new link renamed over the old).
fn switch(root: &Path, target: &Path) {
    let tmp = root.join("current.tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(target, &tmp).expect("symlink");
    std::fs::rename(&tmp, root.join("current")).expect("rename symlink");
}

fn good(name: &str) -> String {
    format!("exec {} --start-delay 200ms \"$@\" # {name}", bin("sup-demo").display())
}

fn cwd_of(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/cwd")).expect("worker cwd")
}

#[test]
fn a_crash_after_a_failed_deploy_restarts_the_pinned_release_not_current() {
    let port = free_port();
    let d = Daemon::start(&format!(
        "[apps.web]\ncommand = [\"./server\"]\ncwd = \"current\"\ninstances = 3\nready = \"notify\"\nready_timeout = \"5s\"\nlisten = [\"127.0.0.1:{port}\"]\nmax_restarts = 3\n"
    ));
    // supd started before the release existed: the first start pins it.
    let root = d.dir.path().to_path_buf();
    let v1 = release(&root, "v1", &good("v1"));
    let v2 = release(&root, "v2", "echo 'v2 cannot start: no database' >&2; exit 1");
    switch(&root, &v1);
    let out = d.supctl(&["start", "web", "--wait"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let before = d.wait_ready("web", 3);
    for i in &before {
        assert_eq!(i.release.as_deref(), Some(v1.to_str().expect("utf-8")), "{i:?}");
        assert_eq!(cwd_of(i.pid.expect("pid")), v1);
    }
    // The deploy: `current` to v2, then reload; v2 fails and the reload rolls back.
    switch(&root, &v2);
    let out = d.supctl(&["reload", "web"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("v2 cannot start"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let after = d.wait_ready("web", 3);
    // A later crash of any v1 worker: the slot restarts v1, pinned, though `current` is v2.
    for victim in after.iter().map(|i| (i.slot, i.pid.expect("pid"), i.restarts)) {
        let (slot, pid, restarts) = victim;
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let new = wait_until("the crashed slot to be ready again", DEADLINE, || {
            let i = d.instances("web").into_iter().find(|i| i.slot == slot)?;
            (i.state == WorkerState::Ready && i.pid != Some(pid)).then_some(i)
        });
        assert_eq!(new.restarts, restarts + 1);
        assert_eq!(new.release.as_deref(), Some(v1.to_str().expect("utf-8")), "{new:?}");
        assert_eq!(cwd_of(new.pid.expect("pid")), v1, "the replacement runs v1's code");
    }
    let (code, _) = http_get(port, "/").expect("answered");
    assert_eq!(code, 200);
    // And stays so: no crash loop (every slot ready, one restart each, for a while).
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let i = d.instances("web");
        assert!(i.iter().all(|i| i.state == WorkerState::Ready && i.restarts == 1), "{i:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let json = String::from_utf8_lossy(&d.supctl(&["status", "web", "--json"]).stdout).into_owned();
    assert!(json.contains(&format!("\"release\": \"{}\"", v1.display())), "{json}");
}

fn demo() -> String {
    bin("sup-demo").display().to_string()
}

/// Rewrites the `[apps.*]` part of the file.
fn rewrite(d: &Daemon, apps: &str) {
    let text = std::fs::read_to_string(&d.config).expect("config");
    let head = &text[..text.find("[apps.").unwrap_or(text.len())];
    std::fs::write(&d.config, format!("{head}{apps}")).expect("write config");
}

fn listen_app(port: u16, args: &str) -> String {
    format!(
        "[apps.web]\ncommand = [\"{}\", \"--start-delay\", \"200ms\"{args}]\ninstances = 3\nready = \"notify\"\nready_timeout = \"10s\"\nmin_healthy_time = \"3s\"\nlisten = [\"127.0.0.1:{port}\"]\n",
        demo()
    )
}

#[test]
fn a_release_that_crashes_after_ready_fails_the_reload_within_its_health_window() {
    let _serial = load_lock();
    let port = free_port();
    let d = Daemon::start(&listen_app(port, ""));
    d.wait_ready("web", 3);
    let load = Load::start(port, &[Mode::KeepAlive, Mode::NewConnection], 2);
    load.wait_for(200);
    // Ready after 200 ms, dead 1 s later: a server that notifies before loading its app.
    rewrite(&d, &listen_app(port, ", \"--exit-after\", \"1200ms\""));
    let t0 = Instant::now();
    let out = d.supctl(&["reload", "web"]);
    let took = t0.elapsed();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("within min_healthy_time"), "{text}");
    let after = d.wait_ready("web", 3);
    assert!(after.iter().all(|i| i.version == 1), "every slot back on version 1: {after:?}");
    load.wait_for(200);
    let stats = load.finish();
    eprintln!("reload of a release crashing after ready: failed after {took:?}; load {stats:?}");
    // Only what the crashing worker itself had accepted: at most one request per client.
    assert!(stats.failed <= 4, "{stats:?}");
}

#[test]
fn a_release_whose_health_turns_bad_after_ready_fails_the_reload() {
    let _serial = load_lock();
    let port = free_port();
    // No `listen`: each worker binds the port itself (SO_REUSEPORT), and the
    // HTTP probe checks it, during the window too.
    let app = |args: &str| {
        format!(
            "[apps.web]\ncommand = [\"{}\", \"--start-delay\", \"200ms\"{args}]\ninstances = 2\nport = {port}\nready = {{ http = \"/health\" }}\nready_timeout = \"10s\"\nmin_healthy_time = \"3s\"\n",
            demo()
        )
    };
    let d = Daemon::start(&app(""));
    d.wait_ready("web", 2);
    let load = Load::start(port, &[Mode::KeepAlive, Mode::NewConnection], 2);
    load.wait_for(100);
    rewrite(&d, &app(", \"--unhealthy-after\", \"700ms\""));
    let out = d.supctl(&["reload", "web"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("health probe") && text.contains("min_healthy_time"), "{text}");
    let after = d.wait_ready("web", 2);
    assert!(after.iter().all(|i| i.version == 1), "every slot back on version 1: {after:?}");
    let (code, _) = http_get(port, "/health").expect("answered");
    assert_eq!(code, 200, "the old version serves");
    let stats = load.finish();
    eprintln!("reload of a release turning unhealthy: load {stats:?}");
    assert!(stats.failed <= 2, "{stats:?}");
}

#[test]
fn rollback_goes_to_the_pinned_release_under_load_and_history_survives_a_restart() {
    let _serial = load_lock();
    let port = free_port();
    let dir = tempfile::Builder::new().prefix("sup").tempdir().expect("temp dir");
    let root = dir.path().to_path_buf();
    let v1 = release(&root, "v1", &good("v1"));
    let v2 = release(&root, "v2", &good("v2"));
    let v3 = release(&root, "v3", "echo 'v3 is broken' >&2; exit 1");
    let v4 = release(&root, "v4", &good("v4"));
    switch(&root, &v1);
    let app = |gen: u32| {
        format!(
            "[supervisor]\ncontrol_socket = \"run/control.sock\"\nrun_dir = \"run\"\nlog_dir = \"logs\"\n\n\
             [apps.web]\ncommand = [\"./server\"]\ncwd = \"current\"\ninstances = 2\nready = \"notify\"\nready_timeout = \"5s\"\n\
             min_healthy_time = \"500ms\"\nlisten = [\"127.0.0.1:{port}\"]\nenv = {{ GEN = \"{gen}\" }}\n"
        )
    };
    let config = root.join("supervisor.toml");
    std::fs::write(&config, app(1)).expect("config");
    let d = Daemon::start_with(dir, config.clone(), root.join("run/control.sock"));
    d.wait_ready("web", 2);
    let run = |args: &[&str], want: i32| {
        let out = d.supctl(args);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(want), "supctl {}: {text}", args.join(" "));
        text
    };
    switch(&root, &v2);
    run(&["reload", "web"], 0);
    switch(&root, &v3);
    run(&["reload", "web"], 1);
    // The file and the link move on; nobody reloads.
    switch(&root, &v4);
    std::fs::write(&config, app(4)).expect("config");
    let load = Load::start(port, &[Mode::NewConnection], 2);
    load.wait_for(100);
    let text = run(&["rollback", "web", "--to", "1"], 0);
    assert!(text.contains("rollback to version 1"), "{text}");
    let stats = load.finish();
    assert_eq!(stats.failed, 0, "{stats:?}");
    let after = d.wait_ready("web", 2);
    for i in &after {
        assert_eq!(i.release.as_deref(), Some(v1.to_str().expect("utf-8")), "{i:?}");
    }
    // Every answer now comes from v1's code.
    let load = Load::start(port, &[Mode::NewConnection], 2);
    load.wait_for(200);
    let stats = load.finish();
    assert_eq!(stats.failed, 0, "{stats:?}");
    for pid in stats.by_pid.keys() {
        assert_eq!(cwd_of(*pid), v1, "pid {pid} answered from another release");
    }
    let history = |d: &Daemon| {
        let out = d.supctl(&["history", "web", "--json"]);
        let h: serde_json::Value = serde_json::from_slice(&out.stdout).expect("history JSON");
        h["history"]
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| {
                (
                    e["version"].as_u64().unwrap_or(0),
                    e["trigger"].as_str().unwrap_or("").to_string(),
                    e["result"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect::<Vec<_>>()
    };
    let want = vec![
        (1, "start".to_string(), "ok".to_string()),
        (2, "reload".into(), "ok".into()),
        (3, "reload".into(), "rolled_back".into()),
        (4, "rollback".into(), "ok".into()),
    ];
    let got = wait_until("the history", DEADLINE, || {
        let h = history(&d);
        (h == want).then_some(h)
    });
    assert_eq!(got, want);
    let text = run(&["history", "web"], 0);
    assert!(text.contains("v3 is broken") || text.contains("rolled_back"), "{text}");
    // A restart (an upgrade of supd) keeps the history; versions number on from it.
    let d = d.restart();
    d.wait_ready("web", 2);
    assert_eq!(history(&d)[..4], want[..]);
    assert!(d.instances("web").iter().all(|i| i.version == 5), "{:?}", d.instances("web"));
}

fn canary_app(port: u16, gen: u32) -> String {
    format!(
        "[apps.web]\ncommand = [\"{}\", \"--start-delay\", \"200ms\"]\ninstances = 4\nready = \"notify\"\nmin_healthy_time = \"300ms\"\nlisten = [\"127.0.0.1:{port}\"]\nenv = {{ GEN = \"{gen}\" }}\n",
        demo()
    )
}

fn on_version(d: &Daemon, v: u64) -> usize {
    d.instances("web").iter().filter(|i| i.version == v && i.state == WorkerState::Ready).count()
}

fn canary_text(d: &Daemon) -> Option<String> {
    d.status().apps.into_iter().find(|a| a.name == "web").and_then(|a| a.canary)
}

#[test]
fn a_canary_pauses_on_one_slot_and_promote_rolls_the_rest() {
    let port = free_port();
    let d = Daemon::start(&canary_app(port, 1));
    d.wait_ready("web", 4);
    rewrite(&d, &canary_app(port, 2));
    let out = d.supctl(&["reload", "web", "--canary", "1"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("canary: 1 of 4"), "{text}");
    assert_eq!(on_version(&d, 2), 1);
    assert_eq!(on_version(&d, 1), 3);
    assert!(canary_text(&d).is_some_and(|c| c.starts_with("1 of 4 on version 2")), "{:?}", canary_text(&d));
    // Another reload waits for the canary to be decided.
    let out = d.supctl(&["reload", "web"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("promote"));
    let out = d.supctl(&["promote", "web"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(on_version(&d, 2), 4);
    assert_eq!(canary_text(&d), None);
}

#[test]
fn a_canary_that_crashes_while_paused_is_put_back_and_the_canary_fails() {
    let port = free_port();
    let d = Daemon::start(&canary_app(port, 1));
    d.wait_ready("web", 4);
    rewrite(&d, &canary_app(port, 2));
    let out = d.supctl(&["reload", "web", "--canary", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let canary = d.instances("web").into_iter().find(|i| i.version == 2).expect("a canary");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(canary.pid.expect("pid") as i32, libc::SIGKILL) };
    wait_until("every slot back on version 1, the canary ended", DEADLINE, || {
        (on_version(&d, 1) == 4 && canary_text(&d).is_none()).then_some(())
    });
    let out = d.supctl(&["history", "web", "--json"]);
    let h: serde_json::Value = serde_json::from_slice(&out.stdout).expect("history");
    let v2 = h["history"].as_array().expect("entries").iter().find(|e| e["version"] == 2).cloned().expect("v2");
    assert_eq!(v2["result"], "failed", "{v2}");
    let out = d.supctl(&["promote", "web"]);
    assert_eq!(out.status.code(), Some(1), "nothing to promote");
}

#[test]
fn a_failed_deploy_shows_in_the_metrics_and_in_the_event_stream() {
    let (port, mport) = (free_port(), free_port());
    let dir = tempfile::Builder::new().prefix("sup").tempdir().expect("temp dir");
    let head = format!(
        "[supervisor]\ncontrol_socket = \"run/control.sock\"\nrun_dir = \"run\"\nlog_dir = \"logs\"\nmetrics = \"127.0.0.1:{mport}\"\n\n"
    );
    let config = dir.path().join("supervisor.toml");
    std::fs::write(&config, format!("{head}{}", canary_app(port, 1))).expect("config");
    let socket = dir.path().join("run/control.sock");
    let d = Daemon::start_with(dir, config.clone(), socket);
    d.wait_ready("web", 4);
    let mut events = d.supctl_bg(&["events", "-f", "--json"]);
    let mut stdout = std::io::BufReader::new(events.stdout.take().expect("stdout"));
    // A release that dies right after it is ready.
    std::fs::write(
        &config,
        format!(
            "{head}[apps.web]\ncommand = [\"{}\", \"--start-delay\", \"200ms\", \"--exit-after\", \"500ms\"]\ninstances = 4\nready = \"notify\"\nmin_healthy_time = \"2s\"\nlisten = [\"127.0.0.1:{port}\"]\n",
            demo()
        ),
    )
    .expect("config");
    let out = d.supctl(&["reload", "web"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    let mut kinds = Vec::new();
    let t0 = Instant::now();
    while !kinds.iter().any(|k| k == "rollout_failed") {
        assert!(t0.elapsed() < DEADLINE, "no rollout_failed event; saw {kinds:?}");
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut stdout, &mut line).unwrap_or(0) == 0 {
            panic!("the event stream ended; saw {kinds:?}");
        }
        let ev: serde_json::Value = serde_json::from_str(&line).expect("event JSON");
        kinds.push(ev["kind"].as_str().unwrap_or("").to_string());
    }
    let _ = events.kill();
    let _ = events.wait();
    for k in ["rollout_started", "slot_failed", "crash", "rollout_failed"] {
        assert!(kinds.iter().any(|x| x == k), "no `{k}` event in {kinds:?}");
    }
    let (code, body) = http_get(mport, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("valid exposition");
    let value = |metric: &str, label: (&str, &str)| {
        scrape
            .samples
            .iter()
            .filter(|x| x.metric == metric && x.labels.get(label.0) == Some(label.1))
            .map(|x| match x.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum::<f64>()
    };
    assert_eq!(value("sup_rollouts_total", ("result", "rolled_back")), 1.0, "{body}");
    assert_eq!(value("sup_rollout_duration_seconds_count", ("result", "rolled_back")), 1.0, "{body}");
    assert!(value("sup_last_rollout_timestamp_seconds", ("result", "rolled_back")) > 1.7e9, "{body}");
    assert_eq!(value("sup_app_version", ("app", "web")), 1.0, "the app still runs version 1: {body}");
}

#[test]
fn a_stop_ends_a_paused_canary_and_the_next_start_runs_the_old_version() {
    let port = free_port();
    let d = Daemon::start(&canary_app(port, 1));
    d.wait_ready("web", 4);
    rewrite(&d, &canary_app(port, 2));
    let out = d.supctl(&["reload", "web", "--canary", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let out = d.supctl(&["stop", "web"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(canary_text(&d), None, "the stop ended the canary");
    let out = d.supctl(&["start", "web"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(on_version(&d, 1), 4, "{:?}", d.instances("web"));
    let out = d.supctl(&["history", "web", "--json"]);
    let h: serde_json::Value = serde_json::from_slice(&out.stdout).expect("history");
    let v2 = h["history"].as_array().expect("entries").iter().find(|e| e["version"] == 2).cloned().expect("v2");
    assert_eq!(v2["result"], "cancelled", "{v2}");
}
