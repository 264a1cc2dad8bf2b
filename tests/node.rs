//! End-to-end with the machine's `node`: unmodified PM2 apps under supd,
//! Node's cluster protocol, and a worker that abuses its IPC channel.

use std::path::PathBuf;
use sup::*;

/// The node binary, or None (the test then says it is skipped).
fn node() -> Option<&'static str> {
    match std::process::Command::new("node").arg("--version").output() {
        Ok(o) if o.status.success() => Some("node"),
        _ => {
            skip("`node` is not installed on this machine");
            None
        }
    }
}

fn fixture(name: &str) -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn ok(out: &std::process::Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "supctl failed ({:?}):\n{text}", out.status.code());
    text
}

/// Peak resident memory of a process, from /proc.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn an_unmodified_pm2_cluster_app_reloads_under_load_without_a_failed_request() {
    let Some(node) = node() else { return };
    let _serial = load_lock();
    let port = free_port();
    let d = Daemon::start(&format!(
        "[apps.web]\ncommand = [\"{node}\", \"{}\"]\ninstances = 2\nlisten = [\"127.0.0.1:{port}\"]\n\
         node_cluster = true\nready = \"pm2\"\nready_timeout = \"20s\"\nstop_timeout = \"20s\"\n",
        fixture("pm2-cluster-app.js").display()
    ));
    let before = d.wait_ready("web", 2);

    // Both instances got their slot's socket through server.listen(PORT), as cluster workers.
    let (code, body) = http_get(port, "/").expect("the app answers");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("worker=") && !body.contains("worker=none"), "a Node cluster worker: {body}");

    // nginx's default upstream: a new connection per request.
    let load = Load::start(port, &[Mode::NewConnection], 4);
    load.wait_for(200);
    for round in 0..2 {
        let out = ok(&d.supctl(&["reload", "web"]));
        assert!(out.contains("rolled 2/2 instances"), "round {round}: {out}");
        load.wait_for(200);
    }
    let after = d.wait_ready("web", 2);
    let stats = load.finish();
    assert_eq!(stats.failed, 0, "failed requests: {:?}", stats.errors);
    assert!(stats.ok > 400, "load ran: {stats:?}");
    for (a, b) in before.iter().zip(&after) {
        assert_ne!(a.pid, b.pid, "slot {} replaced", a.slot);
    }
    // The new workers served: both instances took part after the reloads.
    for i in &after {
        let pid = i.pid.expect("pid");
        assert!(stats.by_pid.get(&pid).copied().unwrap_or(0) > 0, "pid {pid} served: {:?}", stats.by_pid);
    }
    // The old workers closed their servers and exited without being killed mid-request.
    assert!(!d.log().contains("did not stop within"), "{}", d.log());
}

#[test]
fn a_cluster_worker_asking_for_a_port_supd_does_not_hold_fails_with_a_clear_error() {
    let Some(node) = node() else { return };
    let port = free_port();
    let other = free_port();
    let d = Daemon::start_with_files(
        &format!(
            "[apps.web]\ncommand = [\"{node}\", \"app.js\"]\nlisten = [\"127.0.0.1:{port}\"]\nnode_cluster = true\n\
             ready = \"pm2\"\nready_timeout = \"20s\"\nmax_restarts = 1\n"
        ),
        &[("app.js", &format!("require('http').createServer().listen({other});\n"))],
    );
    // Never a hang: the worker's listen fails at once, it exits, and supd says why.
    d.wait_log(&format!("asked for port {other}, but the app's `listen` has port {port}"), DEADLINE);
    wait_until("the worker to exit with the listen error", DEADLINE, || {
        let log = std::fs::read_to_string(d.path("logs/web.err.log")).unwrap_or_default();
        log.contains("EADDRNOTAVAIL").then_some(())
    });
    assert!(d.status().apps.iter().any(|a| a.name == "web"), "supd still answers");
}

#[test]
fn garbage_and_floods_on_the_ipc_channel_cost_supd_nothing() {
    // A worker that writes 16 MiB without a newline, then junk lines, then
    // thousands of cluster requests it never reads the answers to, then "ready".
    let script = r#"
import json, os, sys, time
f = os.fdopen(int(os.environ["NODE_CHANNEL_FD"]), "wb", buffering=0)
for _ in range(16):
    f.write(b"x" * (1 << 20))
f.write(b"\n" + b"{not json}\n[1,2]\n\"shutdown\"\n{\"cmd\":7}\n" * 2000)
q = {"cmd": "NODE_CLUSTER", "act": "queryServer", "seq": 1, "port": 1, "address": None, "data": None}
f.write((json.dumps(q) + "\n").encode() * 5000)
f.write(b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"mystery\",\"seq\":9}\n" * 5000)
f.write(b"\"ready\"\n")
print("flooded", flush=True)
time.sleep(3600)
"#;
    let port = free_port();
    let d = Daemon::start_with_files(
        &format!(
            "[apps.flood]\ncommand = [\"python3\", \"flood.py\"]\nlisten = [\"127.0.0.1:{port}\"]\n\
             node_cluster = true\nready = \"pm2\"\nready_timeout = \"60s\"\nstop_timeout = \"2s\"\n"
        ),
        &[("flood.py", script)],
    );
    d.wait_ready("flood", 1);
    d.wait_log("does not read its IPC channel; dropping messages", DEADLINE);
    d.wait_log("Node cluster message `mystery` is not supported", DEADLINE);
    let peak = peak_rss_kib(d.pid());
    assert!(peak < 48 * 1024, "supd's peak RSS stayed small: {peak} KiB");
    // Only the first mismatch is logged, not 5000.
    assert_eq!(d.log().matches("asked for port 1,").count(), 1, "{}", d.log());
    let out = ok(&d.supctl(&["stop", "flood"]));
    assert!(out.contains("flood"), "{out}");
    assert!(d.status().apps[0].instances.iter().all(|i| i.pid.is_none()));
}

#[test]
fn ready_listening_waits_for_the_cluster_workers_listen_and_keeps_the_configured_backlog() {
    let Some(node) = node() else { return };
    let port = free_port();
    // The app listens only after a moment, as one that loads its code first.
    let d = Daemon::start_with_files(
        &format!(
            "[apps.web]\ncommand = [\"{node}\", \"app.js\"]\ninstances = 2\nlisten = [\"127.0.0.1:{port}\"]\n\
             listen_backlog = 77\nnode_cluster = true\nready = \"listening\"\nready_timeout = \"20s\"\n"
        ),
        &[(
            "app.js",
            "const s = require('http').createServer((q, r) => r.end(`pid=${process.pid}\\n`));\n\
             setTimeout(() => s.listen(Number(process.env.PORT)), 300);\n",
        )],
    );
    let ready = d.wait_ready("web", 2);
    // Ready when the server listened, not when the process started.
    let waits: Vec<u64> = d
        .log()
        .lines()
        .filter(|l| l.contains("starting -> ready"))
        .filter_map(|l| l.split("ready after ").nth(1)?.split(" ms").next()?.parse().ok())
        .collect();
    assert!(waits.len() == 2 && waits.iter().all(|ms| *ms >= 300), "ready after {waits:?} ms:\n{}", d.log());
    let (code, body) = http_get(port, "/").expect("a worker that is ready serves");
    assert_eq!(code, 200, "{body}");
    let pid: u32 = body.trim().trim_start_matches("pid=").parse().expect("pid");
    assert!(ready.iter().any(|i| i.pid == Some(pid)), "{body} from {ready:?}");
    // Node's listen() set the backlog to 511; supd put the configured one back on every slot socket.
    let out = std::process::Command::new("ss").args(["-Hltn", &format!("sport = :{port}")]).output();
    let Ok(out) = out else {
        skip("the backlog check: `ss` is not installed");
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let backlogs: Vec<&str> = text.lines().filter_map(|l| l.split_whitespace().nth(2)).collect();
    assert_eq!(backlogs, ["77", "77"], "{text}");
}
