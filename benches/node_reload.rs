//! Read errors that keep-alive clients see while an unmodified Node app is
//! reloaded: sup beside PM2's cluster mode, in one run.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench --bench node_reload`
//! (`-- --quick` for one run of each). The app is `benches/app/server.js`, whose
//! SIGTERM/SIGINT handler is the common `server.close()`: idle keep-alive
//! connections are closed at once, with no drain. wrk (Debian's `wrk`) keeps
//! 32 keep-alive connections busy while the app, 4 workers, is reloaded
//! twice (each reload waited for, with 4 s of load before, between and
//! after); wrk's socket read errors are what a client sees. Runs alternate
//! the supervisors so drift hits all alike.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use sup::*;

const INSTANCES: usize = 4;
const CONNECTIONS: usize = 32;
const RELOADS: usize = 2;
/// Load before the first reload, between the reloads and after the last.
const SETTLE: Duration = Duration::from_secs(4);

fn app_js() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/app/server.js").display().to_string()
}

/// How sup runs the app.
#[derive(Clone, Copy, Debug)]
enum SupMode {
    /// As the other benchmarks: the slot's socket as fd 3 (`LISTEN_FDS`), `ready = "notify"`.
    Fd,
    /// Unmodified: `server.listen(PORT)` through `node_cluster`, `process.send('ready')`.
    Cluster,
}

enum Running<'a> {
    Supd(Daemon),
    Pm2(&'a Pm2),
}

fn start_supd(port: u16, mode: SupMode) -> Daemon {
    let how = match mode {
        SupMode::Fd => "ready = \"notify\"\n",
        SupMode::Cluster => "ready = \"pm2\"\nnode_cluster = true\n",
    };
    let d = Daemon::start(&format!(
        "[apps.app]\ncommand = [\"node\", \"{}\"]\ninstances = {INSTANCES}\n{how}ready_timeout = \"60s\"\nstop_timeout = \"5s\"\nlisten = [\"127.0.0.1:{port}\"]\n",
        app_js()
    ));
    wait_until("supd workers ready", Duration::from_secs(120), || {
        let i = d.instances("app");
        (i.len() == INSTANCES && i.iter().all(|i| i.state == WorkerState::Ready)).then_some(())
    });
    d
}

fn start_pm2(pm2: &Pm2, dir: &Path, port: u16) {
    let eco = dir.join("ecosystem.config.js");
    std::fs::write(
        &eco,
        format!(
            "module.exports = {{ apps: [{{ name: 'app', script: '{}', instances: {INSTANCES}, exec_mode: 'cluster', wait_ready: true, listen_timeout: 60000, kill_timeout: 5000, env: {{ PORT: '{port}' }} }}] }};\n",
            app_js()
        ),
    )
    .expect("write ecosystem file");
    let out = pm2.cmd(&["start", &eco.display().to_string()]);
    assert!(out.status.success(), "pm2 start: {}", String::from_utf8_lossy(&out.stderr));
    wait_until("PM2 workers online", Duration::from_secs(120), || (pm2.online() == INSTANCES).then_some(()));
    wait_until("PM2 app answering", DEADLINE, || http_get(port, "/").ok().filter(|r| r.0 == 200).map(|_| ()));
}

/// What wrk counted in one run.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    requests: u64,
    read_errors: u64,
    other_errors: u64,
}

fn parse_wrk(text: &str) -> Counts {
    let mut c = Counts::default();
    for line in text.lines().map(str::trim) {
        if let Some(n) = line.split(" requests in ").next().filter(|_| line.contains(" requests in ")) {
            c.requests = n.trim().parse().unwrap_or(0);
        }
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            for part in rest.split(',') {
                let mut w = part.split_whitespace();
                let (kind, n) = (w.next().unwrap_or(""), w.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0));
                if kind == "read" {
                    c.read_errors += n;
                } else {
                    c.other_errors += n;
                }
            }
        }
        if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            c.other_errors += n.trim().parse::<u64>().unwrap_or(0);
        }
    }
    c
}

/// One run: load, a reload after [`SETTLE`], another [`SETTLE`] after the
/// first has finished, and load for [`SETTLE`] more; then wrk is stopped
/// (SIGINT makes it print its counts). Waiting for each reload to finish
/// matters: a PM2 reload takes seconds, and an old worker stopped after the
/// load ended would count no error.
fn run(sup: &Running, port: u16) -> Counts {
    let wrk = Command::new("wrk")
        .args(["-t2", &format!("-c{CONNECTIONS}"), "-d600s"])
        .arg(format!("http://127.0.0.1:{port}/"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run wrk");
    for _ in 0..RELOADS {
        // A benchmark's schedule, not a synchronisation.
        std::thread::sleep(SETTLE);
        let out = match sup {
            Running::Supd(d) => d.supctl(&["reload", "app"]),
            Running::Pm2(p) => p.cmd(&["reload", "app"]),
        };
        assert!(out.status.success(), "reload failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    std::thread::sleep(SETTLE);
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(wrk.id() as i32, libc::SIGINT) };
    let out = wrk.wait_with_output().expect("wrk output");
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

fn main() {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    if Command::new("node").arg("--version").output().is_err() {
        println!("skipped: node is not installed");
        return;
    }
    if Command::new("wrk").arg("--version").output().is_err() {
        println!("skipped: wrk is not installed (apt-get install -y wrk)");
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let only_sup = std::env::args().any(|a| a == "--sup-only");
    let runs = if quick { 1 } else { 3 };
    let dir = tempfile::tempdir().expect("tempdir");
    // npm may need NODE_EXTRA_CA_CERTS to reach the registry: install first.
    let pm2 = (!only_sup).then(|| Pm2::install(dir.path()));
    // It adds ~50 ms to every Node start: unset for every supervisor alike.
    // SAFETY: no other thread runs yet.
    unsafe { std::env::remove_var("NODE_EXTRA_CA_CERTS") };

    let labels = ["sup, fd 3 + notify", "sup, node_cluster + ready = \"pm2\"", "PM2 7, cluster mode"];
    let mut totals = [Counts::default(); 3];
    for r in 0..runs {
        for (i, label) in labels.iter().enumerate() {
            let port = free_port();
            let c = match i {
                0 | 1 => {
                    let d = start_supd(port, if i == 0 { SupMode::Fd } else { SupMode::Cluster });
                    run(&Running::Supd(d), port)
                }
                _ => {
                    let Some(p) = pm2.as_ref() else { continue };
                    start_pm2(p, dir.path(), port);
                    let c = run(&Running::Pm2(p), port);
                    let _ = p.cmd(&["delete", "all"]);
                    c
                }
            };
            println!(
                "run {}: {label}: {} read errors, {} other errors in {} requests",
                r + 1,
                c.read_errors,
                c.other_errors,
                c.requests
            );
            totals[i].requests += c.requests;
            totals[i].read_errors += c.read_errors;
            totals[i].other_errors += c.other_errors;
        }
    }
    if let Some(p) = pm2.as_ref() {
        let _ = p.cmd(&["kill"]);
    }
    println!();
    println!("| {runs} runs, {CONNECTIONS} keep-alive connections, {RELOADS} reloads each | read errors | other errors | requests |");
    println!("|---|---|---|---|");
    for (label, t) in labels.iter().zip(totals) {
        if t.requests == 0 {
            continue;
        }
        println!("| {label} | {} | {} | {:.2} M |", t.read_errors, t.other_errors, t.requests as f64 / 1e6);
    }
}
