//! supd's sd_notify conversation with its service manager, checked against a
//! notify socket the test owns (the real-systemd test is in `systemd.rs`).

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use sup::*;

struct Manager {
    sock: UnixDatagram,
    seen: Vec<String>,
}

impl Manager {
    /// Waits for a datagram containing `needle`; returns it.
    fn expect(&mut self, needle: &str) -> String {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(m) = self.seen.iter().position(|m| m.contains(needle)) {
                return self.seen.remove(m);
            }
            assert!(start.elapsed() < DEADLINE, "no `{needle}` from supd; got {:?}", self.seen);
            if let Ok(n) = self.sock.recv(&mut buf) {
                self.seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }
}

#[test]
fn supd_tells_its_manager_ready_reloading_stopping_and_pings_the_watchdog() {
    let dir = tempfile::Builder::new().prefix("sup").tempdir().expect("tempdir");
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let mut mgr = Manager { sock, seen: Vec::new() };
    let port = free_port();
    let config = dir.path().join("supervisor.toml");
    let apps = |extra: &str| {
        format!(
            "[supervisor]\ncontrol_socket = \"run/control.sock\"\nrun_dir = \"run\"\nlog_dir = \"logs\"\n\n[apps.web]\ncommand = [\"{}\", \"--start-delay\", \"300ms\"]\ninstances = 2\nready = \"notify\"\nlisten = [\"127.0.0.1:{port}\"]\n{extra}",
            bin("sup-demo").display()
        )
    };
    std::fs::write(&config, apps("")).expect("write");
    let socket = dir.path().join("run/control.sock");
    let d = Daemon::start_env(
        dir,
        config.clone(),
        socket,
        &[("NOTIFY_SOCKET", notify.display().to_string()), ("WATCHDOG_USEC", "400000".into())],
    );
    let ready = mgr.expect("READY=1");
    // READY=1 comes only once the workers are ready.
    assert!(d.instances("web").iter().all(|i| i.state == WorkerState::Ready));
    assert!(ready.contains("STATUS=1 app, 2/2 workers ready"), "{ready}");
    mgr.expect("WATCHDOG=1");
    mgr.expect("WATCHDOG=1");
    let before: Vec<_> = d.instances("web").iter().map(|i| i.pid).collect();
    std::fs::write(&config, apps("env = { RELEASE = \"2\" }\n")).expect("rewrite");
    d.signal(libc::SIGHUP);
    let reloading = mgr.expect("RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let done = mgr.expect("READY=1");
    assert!(done.contains("2/2 workers ready"), "{done}");
    let after: Vec<_> = d.instances("web").iter().map(|i| i.pid).collect();
    assert!(before.iter().zip(&after).all(|(a, b)| a != b), "the reload rolled every worker before READY=1");
    // An invalid file keeps everything running and says so.
    std::fs::write(&config, format!("{}bogus = 1\n", apps(""))).expect("rewrite");
    d.signal(libc::SIGHUP);
    mgr.expect("RELOADING=1");
    let refused = mgr.expect("READY=1");
    assert!(refused.contains("config NOT applied"), "{refused}");
    assert_eq!(d.instances("web").iter().map(|i| i.pid).collect::<Vec<_>>(), after);
    d.signal(libc::SIGTERM);
    mgr.expect("STOPPING=1");
    let status = d.wait_exit();
    assert_eq!(status.code(), Some(0));
}

/// Nothing blocks the event loop: with 500 workers starting at once, each
/// probed for readiness, supd's own WATCHDOG=1 keeps its period.
#[test]
fn the_watchdog_keeps_its_period_while_500_workers_start() {
    let _serial = load_lock();
    let dir = tempfile::Builder::new().prefix("sup").tempdir().expect("tempdir");
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    let config = dir.path().join("supervisor.toml");
    // Never ready: every worker stays `starting`, probed, for the whole test.
    std::fs::write(
        &config,
        format!(
            "[supervisor]\ncontrol_socket = \"run/control.sock\"\nrun_dir = \"run\"\nlog_dir = \"logs\"\nmax_workers = 600\n\n\
             [apps.many]\ncommand = [\"sleep\", \"1000\"]\ninstances = 500\nready = {{ tcp = true }}\nport = {}\nready_timeout = \"60s\"\nstop_timeout = \"2s\"\n",
            free_port()
        ),
    )
    .expect("write");
    let socket = dir.path().join("run/control.sock");
    let period = Duration::from_millis(500);
    let d = Daemon::start_env(
        dir,
        config,
        socket,
        &[("NOTIFY_SOCKET", notify.display().to_string()), ("WATCHDOG_USEC", (2 * period.as_micros()).to_string())],
    );
    let mut buf = [0u8; 4096];
    let mut last: Option<Instant> = None;
    let mut gaps = Vec::new();
    let t0 = Instant::now();
    let mut started = 0;
    while t0.elapsed() < Duration::from_secs(15) {
        if let Ok(n) = sock.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
                let now = Instant::now();
                if let Some(l) = last {
                    gaps.push(now - l);
                }
                last = Some(now);
            }
        }
        if started < 500 && gaps.len() % 4 == 0 {
            started = d.instances("many").iter().filter(|i| i.pid.is_some()).count();
        }
    }
    let worst = gaps.iter().max().copied().unwrap_or(Duration::MAX);
    eprintln!("WATCHDOG=1 pings: {}, worst gap {worst:?} (period {period:?}); workers spawned: {started}", gaps.len());
    assert_eq!(started, 500, "every worker was spawned during the test");
    assert!(gaps.len() >= 20, "too few pings: {gaps:?}");
    // systemd kills supd after 2 periods without a ping.
    assert!(worst < 2 * period, "a {worst:?} gap between pings: the event loop stalled");
}
