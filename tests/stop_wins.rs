//! End-to-end: stop always wins. A stop (or the app's removal) during any
//! operation returns within `stop_timeout` + 5 s, cancels that operation, and
//! nothing restarts afterwards; no worker runs outside `supctl status`.

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::time::{Duration, Instant};

use sup::*;

/// stop_timeout + 5 s, the bound every stop must meet.
const BOUND: Duration = Duration::from_secs(3 + 5);

fn demo() -> String {
    bin("sup-demo").display().to_string()
}

/// Two workers that take 2 s to become ready, so an operation is easy to catch half-way.
fn slow_web(port: u16, extra: &str) -> String {
    format!(
        "[apps.web]\ncommand = [\"{}\", \"--start-delay\", \"2s\"]\ninstances = 2\nready = \"notify\"\nready_timeout = \"20s\"\nstop_timeout = \"3s\"\nlisten = [\"127.0.0.1:{port}\"]\n{extra}\n",
        demo()
    )
}

fn rewrite(d: &Daemon, apps: &str) {
    let text = std::fs::read_to_string(&d.config).expect("config");
    let head = &text[..text.find("[apps.").unwrap_or(text.len())];
    std::fs::write(&d.config, format!("{head}{apps}")).expect("write config");
}

/// Runs supctl and checks it returned within `bound`.
fn timed(d: &Daemon, args: &[&str], bound: Duration) -> std::process::Output {
    let t0 = Instant::now();
    let out = d.supctl(args);
    let took = t0.elapsed();
    assert!(
        took < bound,
        "`supctl {}` took {took:?} (bound {bound:?}):\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Waits for a background supctl; returns its exit code and output.
fn finish(mut child: Child, bound: Duration) -> (Option<i32>, String) {
    let status = wait_until("the interrupted operation's supctl to return", bound, || child.try_wait().ok().flatten());
    let mut text = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut o, &mut text);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut text);
    }
    (status.code(), text)
}

fn all_stopped(d: &Daemon) -> bool {
    let i = d.instances("web");
    !i.is_empty() && i.iter().all(|i| i.state == WorkerState::Stopped && i.pid.is_none())
}

/// Checks for a while that nothing of `web` starts again and supd has no child.
fn stays_stopped(d: &Daemon, port: u16) {
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert!(all_stopped(d), "web started again after the stop: {:?}", d.instances("web"));
        assert!(children(d.pid()).is_empty(), "supd still has children {:?}", children(d.pid()));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "the port of a stopped app still accepts");
}

#[test]
fn removing_an_app_during_its_reload_returns_and_leaves_nothing_behind() {
    let port = free_port();
    let d = Daemon::start(&slow_web(port, ""));
    let before = d.wait_ready("web", 2);
    let reload = d.supctl_bg(&["reload", "web"]);
    // Once slot 0 runs the new version, the reload is replacing slot 1.
    wait_until("slot 0 on version 2", DEADLINE, || {
        let i = d.instances("web");
        (i.len() == 2 && i[0].version == 2 && i[0].state == WorkerState::Ready).then_some(())
    });
    rewrite(&d, "");
    let out = timed(&d, &["config", "apply"], BOUND);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (code, text) = finish(reload, BOUND);
    assert_eq!(code, Some(1), "the interrupted reload fails: {text}");
    assert!(text.contains("cancelled by stop"), "{text}");
    assert!(d.status().apps.iter().all(|a| a.name != "web"), "web is still listed");
    wait_until("supd to have no child", DEADLINE, || children(d.pid()).is_empty().then_some(()));
    for i in before {
        assert!(!alive(i.pid.unwrap_or(0)), "old worker {:?} still runs", i.pid);
    }
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "the removed app's port still accepts");
}

/// Starts `op` on a ready slow app, waits until `in_progress`, stops the app, and checks stop won.
fn stop_during(extra: &str, op: &[&str], in_progress: impl Fn(&Daemon) -> bool, what: &str) {
    let port = free_port();
    let d = Daemon::start(&slow_web(port, extra));
    d.wait_ready("web", 2);
    let bg = (!op.is_empty()).then(|| d.supctl_bg(op));
    wait_until(what, DEADLINE, || in_progress(&d).then_some(()));
    let out = timed(&d, &["stop", "web"], BOUND);
    assert!(out.status.success(), "stop failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(all_stopped(&d), "{:?}", d.instances("web"));
    if let Some(child) = bg {
        let (code, text) = finish(child, BOUND);
        assert_eq!(code, Some(1), "`supctl {}` after a stop: {text}", op.join(" "));
        assert!(text.contains("cancelled by stop"), "{text}");
    }
    stays_stopped(&d, port);
}

fn rollout_running(d: &Daemon) -> bool {
    d.status().apps.iter().any(|a| a.name == "web" && a.rollout.is_some())
}

#[test]
fn stop_wins_over_a_reload() {
    stop_during("", &["reload", "web"], rollout_running, "a reload in progress");
}

#[test]
fn stop_wins_over_a_scale() {
    stop_during("", &["scale", "web", "4"], |d| d.instances("web").len() == 4, "a scale in progress");
}

#[test]
fn stop_wins_over_a_restart() {
    stop_during(
        "",
        &["restart", "web"],
        |d| d.instances("web").iter().any(|i| i.state == WorkerState::Starting),
        "a restart in progress",
    );
}

#[test]
fn stop_wins_over_a_cron_restart() {
    stop_during("cron_restart = \"*/3 * * * * *\"", &[], rollout_running, "a cron restart in progress");
}

/// A worker replaced by the slot itself (memory, watchdog): stop during the replacement.
fn stop_during_replacement(args: &str, extra: &str, needle: &str) {
    let port = free_port();
    let d = Daemon::start(&format!(
        "[apps.web]\ncommand = [\"{}\", \"--start-delay\", \"2s\", {args}]\ninstances = 2\nready = \"notify\"\nready_timeout = \"20s\"\nstop_timeout = \"3s\"\nlisten = [\"127.0.0.1:{port}\"]\n{extra}\n",
        demo()
    ));
    d.wait_ready("web", 2);
    d.wait_log(needle, DEADLINE);
    let out = timed(&d, &["stop", "web"], BOUND);
    assert!(out.status.success(), "stop failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(all_stopped(&d), "{:?}", d.instances("web"));
    stays_stopped(&d, port);
}

#[test]
fn stop_wins_over_a_memory_replacement() {
    stop_during_replacement(
        "\"--grow-memory\", \"40M\"",
        "memory_limit = \"60M\"\nmemory_limit_samples = 2",
        "replacement started (memory)",
    );
}

#[test]
fn stop_wins_over_a_watchdog_replacement() {
    stop_during_replacement("\"--stop-watchdog-after\", \"4s\"", "watchdog = \"3s\"", "replacement started (watchdog)");
}

#[test]
fn stop_wins_over_a_rollback() {
    let port = free_port();
    let d = Daemon::start(&slow_web(port, ""));
    d.wait_ready("web", 2);
    // Version 2 becomes ready in slot 0 and then fails slot 1 (it exits after
    // 2.5 s, before its 3 s start): the reload rolls slot 0 back, slowly.
    let stamp = d.path("starts");
    rewrite(
        &d,
        &format!(
            "[apps.web]\ncommand = [\"sh\", \"-c\", \"if [ -e {s} ]; then exec {demo} --start-delay 3s --exit-after 2500ms; else touch {s}; exec {demo} --start-delay 2s; fi\"]\ninstances = 2\nready = \"notify\"\nready_timeout = \"20s\"\nstop_timeout = \"3s\"\nlisten = [\"127.0.0.1:{port}\"]\n",
            s = stamp.display(),
            demo = demo()
        ),
    );
    let mut reload = d.supctl_bg(&["reload", "web"]);
    // Read progress until the rollback begins.
    let mut out = BufReader::new(reload.stdout.take().expect("stdout"));
    let mut seen = String::new();
    let t0 = Instant::now();
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap_or(0) == 0 {
            panic!("reload ended before rolling back: {seen}");
        }
        seen.push_str(&line);
        if line.to_lowercase().contains("rolling back") {
            break;
        }
        assert!(t0.elapsed() < DEADLINE, "no rollback: {seen}");
    }
    let stop = timed(&d, &["stop", "web"], BOUND);
    assert!(stop.status.success(), "stop failed: {}", String::from_utf8_lossy(&stop.stderr));
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut out, &mut rest);
    let status = wait_until("the reload to return", BOUND, || reload.try_wait().ok().flatten());
    assert_eq!(status.code(), Some(1), "{seen}{rest}");
    assert!(rest.contains("cancelled by stop"), "{seen}{rest}");
    stays_stopped(&d, port);
}
