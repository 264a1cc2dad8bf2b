//! End-to-end: CPU and memory sampling, memory limits, watchdog, status, top,
//! Prometheus metrics and health.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use sup::*;

fn demo() -> String {
    bin("sup-demo").display().to_string()
}

fn metrics_port_config(metrics: u16) -> String {
    format!("[supervisor]\ncontrol_socket = \"run/control.sock\"\nrun_dir = \"run\"\nlog_dir = \"logs\"\nmonitor_interval = \"200ms\"\nmetrics = \"127.0.0.1:{metrics}\"\n\n")
}

fn start_with_supervisor(head: &str, apps: &str) -> Daemon {
    let dir = tempfile::Builder::new().prefix("sup").tempdir().expect("tempdir");
    let config = dir.path().join("supervisor.toml");
    std::fs::write(&config, format!("{head}{apps}")).expect("write");
    let socket = dir.path().join("run/control.sock");
    Daemon::start_with(dir, config, socket)
}

fn get(port: u16, path: &str) -> (u16, String) {
    http_get(port, path).expect("metrics listener answers")
}

#[test]
fn status_reports_cpu_and_memory_of_the_whole_tree() {
    let port = free_port();
    let d = Daemon::start(&format!(
        "[apps.web]\ncommand = [\"{}\", \"--spawn-grandchild\"]\ninstances = 1\nready = \"notify\"\nlisten = [\"127.0.0.1:{port}\"]\n",
        demo()
    ));
    d.wait_ready("web", 1);
    // Samples taken in the first milliseconds see a process still starting.
    let i = wait_until("a sample with the grandchild in the tree", DEADLINE, || {
        let i = d.instances("web").remove(0);
        let (rss, tree) = (i.rss_bytes.unwrap_or(0), i.tree_rss_bytes.unwrap_or(0));
        (rss > 1 << 20 && tree > rss).then_some(i)
    });
    assert!(i.cpu_percent.is_some());
    let table = String::from_utf8_lossy(&d.supctl(&["status"]).stdout).to_string();
    assert!(table.contains("CPU%") && table.contains("TREE"), "{table}");
}

#[test]
fn a_worker_over_its_memory_limit_is_replaced_without_failing_requests() {
    let _serial = load_lock();
    let (port, mport) = (free_port(), free_port());
    let d = start_with_supervisor(
        &metrics_port_config(mport),
        &format!(
            "[apps.web]\ncommand = [\"{}\", \"--grow-memory\", \"40M\"]\ninstances = 2\nready = \"notify\"\nlisten = [\"127.0.0.1:{port}\"]\nmemory_limit = \"60M\"\nmemory_limit_samples = 2\n",
            demo()
        ),
    );
    let before = d.wait_ready("web", 2);
    let load = Load::start(port, &[Mode::KeepAlive, Mode::NewConnection], 2);
    let t0 = Instant::now();
    let replaced = wait_until("a memory replacement", DEADLINE, || {
        let i = d.instances("web");
        i.iter().find(|i| i.pid != before[i.slot as usize].pid && i.state == WorkerState::Ready).cloned()
    });
    // Over 60M after ~1.5 s of growth, then 2 samples of 200 ms, then ready time.
    assert!(t0.elapsed() < Duration::from_secs(10), "replaced after {:?}", t0.elapsed());
    assert_eq!(replaced.last_restart_reason, Some(sup_proto::RestartReason::Memory), "{replaced:?}");
    load.wait_for(200);
    let stats = load.finish();
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    d.wait_log("over the limit of 60 MiB", DEADLINE);
    let (_, metrics) = get(mport, "/metrics");
    assert!(metrics.contains("sup_restarts_total{app=\"web\",reason=\"memory\"}"), "{metrics}");
}

#[test]
fn a_worker_that_stops_its_watchdog_pings_is_replaced() {
    let port = free_port();
    let d = Daemon::start(&format!(
        "[apps.web]\ncommand = [\"{}\", \"--stop-watchdog-after\", \"1s\"]\ninstances = 1\nready = \"notify\"\nlisten = [\"127.0.0.1:{port}\"]\nwatchdog = \"500ms\"\n",
        demo()
    ));
    let first = d.wait_ready("web", 1)[0].pid;
    let replaced = wait_until("a watchdog replacement", DEADLINE, || {
        let i = d.instances("web").remove(0);
        (i.pid != first && i.state == WorkerState::Ready).then_some(i)
    });
    assert_eq!(replaced.last_restart_reason, Some(sup_proto::RestartReason::Watchdog), "{replaced:?}");
    d.wait_log("no WATCHDOG=1 within 500ms", DEADLINE);
}

#[test]
fn metrics_parse_as_prometheus_text_and_move_with_restarts() {
    let (port, mport) = (free_port(), free_port());
    let d = start_with_supervisor(
        &metrics_port_config(mport),
        &format!(
            "[apps.web]\ncommand = [\"{}\"]\ninstances = 2\nready = \"notify\"\nlisten = [\"127.0.0.1:{port}\"]\n",
            demo()
        ),
    );
    let before = d.wait_ready("web", 2);
    let scrape = || {
        let (code, body) = get(mport, "/metrics");
        assert_eq!(code, 200);
        let lines = body.lines().map(|l| Ok(l.to_string()));
        prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text")
    };
    let crashes = |s: &prometheus_parse::Scrape| {
        s.samples
            .iter()
            .filter(|x| x.metric == "sup_restarts_total" && x.labels.get("reason") == Some("crash"))
            .map(|x| match x.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum::<f64>()
    };
    let s = wait_until("per-worker memory in the metrics", DEADLINE, || {
        let s = scrape();
        s.samples.iter().any(|x| x.metric == "sup_worker_rss_bytes").then_some(s)
    });
    assert!(s.samples.iter().any(|x| x.metric == "sup_supd_rss_bytes"), "supd's own memory");
    assert_eq!(crashes(&s), 0.0);
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(before[0].pid.expect("pid") as i32, libc::SIGKILL) };
    wait_until("the crash counted", DEADLINE, || (crashes(&scrape()) == 1.0).then_some(()));
    d.wait_ready("web", 2);
    let s = scrape();
    assert!(s.samples.iter().any(|x| x.metric.starts_with("sup_ready_latency_seconds")), "readiness histogram");
}

#[test]
fn health_is_503_while_an_app_is_errored() {
    let (port, mport) = (free_port(), free_port());
    let d = start_with_supervisor(
        &metrics_port_config(mport),
        &format!(
            "[apps.web]\ncommand = [\"{demo}\"]\nready = \"notify\"\nlisten = [\"127.0.0.1:{port}\"]\n\n[apps.broken]\ncommand = [\"{demo}\", \"--exit-after\", \"0s\"]\nmax_restarts = 1\n",
            demo = demo()
        ),
    );
    d.wait_ready("web", 1);
    wait_until("broken errored", DEADLINE, || (d.instances("broken")[0].state == WorkerState::Errored).then_some(()));
    let (code, body) = get(mport, "/health");
    assert_eq!(code, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(v["not_ready"][0]["app"], "broken", "{body}");
    assert_eq!(v["not_ready"][0]["instances"][0]["state"], "errored");
    d.supctl(&["stop", "broken"]);
    // A stopped app that was not meant to run now is still not healthy: it is autostart.
    assert_eq!(get(mport, "/health").0, 503);
}

#[test]
fn top_runs_under_a_terminal_shows_every_worker_and_quits_on_q() {
    let port = free_port();
    let d = Daemon::start(&format!(
        "[apps.web]\ncommand = [\"{demo}\"]\ninstances = 2\nready = \"notify\"\nlisten = [\"127.0.0.1:{port}\"]\n\n[apps.side]\ncommand = [\"{demo}\"]\nport = {}\nready = \"notify\"\n",
        free_port(),
        demo = demo()
    ));
    let pids: Vec<u32> = d.wait_ready("web", 2).iter().chain(&d.wait_ready("side", 1)).filter_map(|i| i.pid).collect();
    let pty = nix::pty::openpty(Some(&nix::pty::Winsize { ws_row: 40, ws_col: 140, ws_xpixel: 0, ws_ypixel: 0 }), None)
        .expect("openpty");
    let slave = std::fs::File::from(pty.slave);
    let mut child = std::process::Command::new(bin("supctl"))
        .arg("--socket")
        .arg(&d.socket)
        .arg("top")
        .stdin(slave.try_clone().expect("dup"))
        .stdout(slave.try_clone().expect("dup"))
        .stderr(slave)
        .spawn()
        .expect("supctl top");
    let mut master = std::fs::File::from(pty.master);
    // Non-blocking reads so the deadline loop never hangs on the terminal.
    nix::fcntl::fcntl(&master, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK)).expect("nonblock");
    let mut screen = String::new();
    wait_until("every worker on screen", DEADLINE, || {
        let mut buf = [0u8; 8192];
        if let Ok(n) = master.read(&mut buf) {
            screen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        pids.iter().all(|p| screen.contains(&p.to_string())).then_some(())
    });
    assert!(screen.contains("\x1b[?1049h"), "alternate screen entered");
    master.write_all(b"q").expect("press q");
    let status = wait_until("top to quit", DEADLINE, || child.try_wait().ok().flatten());
    assert!(status.success(), "{}", describe(status));
    let mut rest = [0u8; 8192];
    let n = master.read(&mut rest).unwrap_or(0);
    let tail = String::from_utf8_lossy(&rest[..n]);
    assert!(tail.contains("\x1b[?1049l") || screen.contains("\x1b[?1049l"), "terminal restored: {tail:?}");
    let once = d.supctl(&["top", "--once", "--sort", "mem"]);
    let text = String::from_utf8_lossy(&once.stdout);
    assert!(pids.iter().all(|p| text.contains(&p.to_string())), "{text}");
}
