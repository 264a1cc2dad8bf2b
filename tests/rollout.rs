//! End-to-end: shared listeners, rolling reload with rollback, scale and
//! config apply, under continuous load from real clients.

use std::collections::HashSet;

use sup::*;

fn demo() -> String {
    bin("sup-demo").display().to_string()
}

/// A 4-instance web app; `command` is TOML for the command key.
fn web(port: u16, command: &str, extra: &str) -> String {
    format!(
        "[apps.web]\ncommand = {command}\ninstances = 4\nready = \"notify\"\nready_timeout = \"3s\"\nstop_timeout = \"15s\"\nlisten = [\"127.0.0.1:{port}\"]\n{extra}\n"
    )
}

fn good(port: u16) -> String {
    web(port, &format!("[\"{}\"]", demo()), "")
}

/// Rewrites the config file in place: what a deploy does before `supctl reload`.
fn rewrite(d: &Daemon, apps: &str) {
    let text = std::fs::read_to_string(&d.config).expect("config");
    let head = &text[..text.find("[apps.").unwrap_or(text.len())];
    std::fs::write(&d.config, format!("{head}{apps}")).expect("write config");
}

fn pids(i: &[InstanceStatus]) -> Vec<Option<u32>> {
    i.iter().map(|i| i.pid).collect()
}

fn ok(out: &std::process::Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "supctl failed ({:?}):\n{text}", out.status.code());
    text
}

#[test]
fn reloads_and_scaling_under_load_fail_no_request() {
    let _serial = load_lock();
    let port = free_port();
    let d = Daemon::start(&good(port));
    let mut current = d.wait_ready("web", 4);
    let load = Load::start(port, &[Mode::KeepAlive, Mode::NewConnection], 2);
    load.wait_for(200);
    for round in 0..3 {
        let out = ok(&d.supctl(&["reload", "web"]));
        assert!(out.contains("rolled 4/4 instances"), "{out}");
        assert_eq!(out.matches("drained").count(), 4, "each slot reported: {out}");
        let after = d.wait_ready("web", 4);
        for (a, b) in current.iter().zip(&after) {
            assert_ne!(a.pid, b.pid, "round {round}: slot {} replaced", a.slot);
            assert_eq!(b.version, round + 2);
        }
        current = after;
        load.wait_for(100);
    }
    let out = ok(&d.supctl(&["scale", "web", "6"]));
    assert!(out.contains("scaled from 4 to 6"), "{out}");
    let six = d.wait_ready("web", 6);
    assert_eq!(pids(&six[..4]), pids(&current), "scaling up leaves running slots alone");
    load.wait_for(200);
    let out = ok(&d.supctl(&["scale", "web", "3"]));
    assert!(out.contains("scaled from 6 to 3"), "{out}");
    let three = d.wait_ready("web", 3);
    assert_eq!(pids(&three), pids(&six[..3]));
    load.wait_for(200);
    let stats = load.finish();
    assert_eq!(stats.failed, 0, "failed requests: {:?}", stats.errors);
    assert!(stats.ok > 1000, "load ran: {stats:?}");
}

#[test]
fn kill_9_under_load_fails_only_requests_in_flight_on_that_worker() {
    let _serial = load_lock();
    let port = free_port();
    let d = Daemon::start(&good(port));
    let before = d.wait_ready("web", 4);
    let clients = 4;
    let load = Load::start(port, &[Mode::NewConnection], clients);
    load.wait_for(300);
    let victim = before[2].pid.expect("pid");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    wait_until("slot 2 replaced", DEADLINE, || {
        let i = d.instances("web");
        (i[2].pid != Some(victim) && i[2].state == WorkerState::Ready).then_some(())
    });
    load.wait_for(500);
    let stats = load.finish();
    // Each client has one request in flight at a time: only those the killed
    // worker had already accepted can fail. Connections queued in the slot's
    // socket wait for the replacement instead of being reset.
    // Requests the killed worker had accepted fail (the client's one retry of
    // an unanswered fresh connection is counted here too).
    let lost = stats.failed + stats.unanswered_retried;
    assert!(lost <= clients as u64, "{lost} failures > {clients} in flight: {:?}", stats.errors);
    assert!(stats.ok > 500);
}

#[test]
fn a_release_that_never_becomes_ready_is_rolled_back() {
    let _serial = load_lock();
    let port = free_port();
    let d = Daemon::start(&good(port));
    let before = d.wait_ready("web", 4);
    let load = Load::start(port, &[Mode::KeepAlive, Mode::NewConnection], 2);
    load.wait_for(200);
    rewrite(&d, &web(port, &format!("[\"{}\", \"--never-ready\"]", demo()), ""));
    let out = d.supctl(&["reload", "web"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("not ready within 3s"), "{text}");
    let after = d.wait_ready("web", 4);
    assert_eq!(pids(&after), pids(&before), "every slot keeps its old worker");
    assert!(after.iter().all(|i| i.version == 1));
    load.wait_for(200);
    let stats = load.finish();
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
}

#[test]
fn a_release_failing_on_slot_2_rolls_slots_0_and_1_back() {
    let _serial = load_lock();
    let port = free_port();
    let d = Daemon::start(&good(port));
    let before = d.wait_ready("web", 4);
    let load = Load::start(port, &[Mode::KeepAlive, Mode::NewConnection], 2);
    load.wait_for(200);
    let script = format!(
        "if [ \\\"$SUP_INSTANCE\\\" -ge 2 ]; then echo 'boom: DATABASE_URL is not set' >&2; exit 3; fi; exec {}",
        demo()
    );
    rewrite(&d, &web(port, &format!("[\"sh\", \"-c\", \"{script}\"]"), ""));
    let out = d.supctl(&["reload", "web"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("exited with code 3 before becoming ready"), "{text}");
    assert!(text.contains("boom: DATABASE_URL is not set"), "the failed worker's last lines: {text}");
    assert!(text.contains("rolled back 2 slot(s) to version 1"), "{text}");
    let after = d.wait_ready("web", 4);
    assert!(after.iter().all(|i| i.version == 1), "{after:?}");
    assert_ne!(after[0].pid, before[0].pid);
    assert_ne!(after[1].pid, before[1].pid);
    assert_eq!(pids(&after[2..]), pids(&before[2..]), "slots 2 and 3 untouched");
    load.wait_for(200);
    let stats = load.finish();
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
}

#[test]
fn load_spreads_evenly_across_slots() {
    let _serial = load_lock();
    let port = free_port();
    let d = Daemon::start(&good(port));
    let workers: HashSet<u32> = d.wait_ready("web", 4).iter().filter_map(|i| i.pid).collect();
    let load = Load::start(port, &[Mode::NewConnection], 4);
    wait_until("10,000 requests", std::time::Duration::from_secs(120), || (load.count() >= 10_000).then_some(()));
    let stats = load.finish();
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    let total: u64 = stats.by_pid.values().sum();
    let fair = total as f64 / 4.0;
    assert_eq!(stats.by_pid.keys().copied().collect::<HashSet<_>>(), workers);
    for (pid, n) in &stats.by_pid {
        assert!((*n as f64) <= 1.5 * fair, "pid {pid} served {n} of {total} (fair share {fair:.0})");
    }
}

#[test]
fn a_second_rollout_is_busy_unless_it_waits() {
    let port = free_port();
    let d = Daemon::start(&good(port));
    d.wait_ready("web", 4);
    rewrite(&d, &web(port, &format!("[\"{}\", \"--start-delay\", \"1s\"]", demo()), ""));
    let socket = d.socket.clone();
    let first = std::thread::spawn(move || {
        std::process::Command::new(bin("supctl")).arg("--socket").arg(socket).args(["reload", "web"]).output()
    });
    wait_until("the reload to start", DEADLINE, || d.status().apps[0].rollout.clone());
    let out = d.supctl(&["reload", "web"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("busy: a reload of `web` is in progress"));
    let waited = ok(&d.supctl(&["reload", "web", "--wait"]));
    assert!(waited.contains("rolled 4/4"), "{waited}");
    ok(&first.join().expect("thread").expect("supctl"));
}

#[test]
fn config_apply_adds_removes_and_rolls_and_refuses_invalid_files() {
    let _serial = load_lock();
    let port = free_port();
    let d = Daemon::start(&good(port));
    let before = d.wait_ready("web", 4);
    let load = Load::start(port, &[Mode::NewConnection], 2);
    load.wait_for(100);
    // Invalid: nothing changes.
    rewrite(&d, &format!("{}instancs = 3\n", good(port)));
    let out = d.supctl(&["config", "apply"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing was changed") && err.contains("instancs"), "{err}");
    assert_eq!(pids(&d.wait_ready("web", 4)), pids(&before));
    // A new app, a changed env for web (rolled), and scale to 2.
    let other = free_port();
    let apps = format!(
        "{}[apps.side]\ncommand = [\"{}\"]\nport = {other}\nready = \"notify\"\n",
        web(port, &format!("[\"{}\"]", demo()), "env = { DEPLOY = \"2\" }").replace("instances = 4", "instances = 2"),
        demo()
    );
    rewrite(&d, &apps);
    let out = ok(&d.supctl(&["config", "apply"]));
    assert!(out.contains("side: ok: added"), "{out}");
    let after = d.wait_ready("web", 2);
    assert!(after.iter().all(|i| i.version == 2), "{after:?}");
    assert_ne!(pids(&after), pids(&before[..2]));
    d.wait_ready("side", 1);
    assert_eq!(http_get(other, "/health").expect("side answers").0, 200);
    // Removing it stops it.
    rewrite(
        &d,
        &web(port, &format!("[\"{}\"]", demo()), "env = { DEPLOY = \"2\" }").replace("instances = 4", "instances = 2"),
    );
    let out = ok(&d.supctl(&["config", "apply"]));
    assert!(out.contains("side: ok: removed"), "{out}");
    assert!(d.status().apps.iter().all(|a| a.name != "side"));
    let stats = load.finish();
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
}

#[test]
fn an_address_taken_by_another_program_is_a_clear_startup_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("supervisor.toml");
    std::fs::write(&config, format!("[supervisor]\nrun_dir = \"run\"\nlog_dir = \"logs\"\n\n{}", good(port)))
        .expect("write");
    let out = std::process::Command::new(bin("supd")).arg("--config").arg(&config).output().expect("supd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "cannot listen on `127.0.0.1:{port}` for app `web`: the address is already in use by another program"
        )),
        "{err}"
    );
    assert!(!dir.path().join("run/control.sock").exists(), "no control socket left behind");
}

#[test]
fn a_stopped_app_refuses_connections_and_serves_again_after_start() {
    let _serial = load_lock();
    let port = free_port();
    let d = Daemon::start(&good(port));
    d.wait_ready("web", 4);
    ok(&d.supctl(&["stop", "web"]));
    let err = std::net::TcpStream::connect(("127.0.0.1", port)).expect_err("nothing listens once stopped");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    ok(&d.supctl(&["start", "web"]));
    d.wait_ready("web", 4);
    assert_eq!(http_get(port, "/").expect("serves again").0, 200);
    // restart keeps the sockets: requests made meanwhile wait instead of failing.
    let load = Load::start(port, &[Mode::NewConnection], 2);
    load.wait_for(100);
    ok(&d.supctl(&["restart", "web"]));
    load.wait_for(100);
    let stats = load.finish();
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
}
