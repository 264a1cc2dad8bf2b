//! A broken deploy, sup beside PM2, in one run: both run the same Node app
//! from a `current` symlink under new-connection load; `current` is switched to
//! a broken release and each is told to reload. Measured: the time until the
//! reload command returns, its exit status, requests failed from the reload
//! until 5 s after it returned, and whether the old version then serves.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench --bench broken`.
//! PM2 is installed with npm into a temporary prefix with its own PM2_HOME.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sup::*;

const INSTANCES: usize = 4;
/// A reload that has not returned after this is stopped and reported as such.
const CAP: Duration = Duration::from_secs(90);

#[derive(Clone, Copy)]
enum Broken {
    /// Exits before it listens.
    AtStart,
    /// Says it is ready, then crashes half a second after it started.
    AfterReady,
}

/// `root/releases/NAME/server.js`: the benchmark app, maybe broken.
fn release(root: &Path, name: &str, broken: Option<Broken>) -> PathBuf {
    let dir = root.join("releases").join(name);
    std::fs::create_dir_all(&dir).expect("release dir");
    let app = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/app/server.js"))
        .expect("benches/app/server.js");
    let body = match broken {
        None => app,
        Some(Broken::AtStart) => "console.error('cannot connect to the database'); process.exit(1);\n".into(),
        Some(Broken::AfterReady) => format!("{app}\nsetTimeout(() => process.exit(1), 500);\n"),
    };
    std::fs::write(dir.join("server.js"), body).expect("server.js");
    dir
}

fn switch(root: &Path, to: &Path) {
    let tmp = root.join("current.tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(to, &tmp).expect("symlink");
    std::fs::rename(&tmp, root.join("current")).expect("switch");
}

struct Outcome {
    took: Duration,
    code: Option<i32>,
    failed: u64,
    ok: u64,
    /// For supd: every slot ready on version 1. For PM2 (no versions): the app answers.
    serving_old: bool,
    is_sup: bool,
}

fn run(pm2: Option<&Pm2>, kind: Broken) -> Outcome {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let v1 = release(&root, "v1", None);
    let v2 = release(&root, "v2", Some(kind));
    switch(&root, &v1);
    let port = free_port();
    let current = root.join("current");
    let daemon = match pm2 {
        None => {
            let cfg = format!(
                "[supervisor]\ncontrol_socket = \"run/control.sock\"\nrun_dir = \"run\"\nlog_dir = \"logs\"\n\n\
                 [apps.app]\ncommand = [\"node\", \"server.js\"]\ncwd = \"{}\"\ninstances = {INSTANCES}\nready = \"notify\"\n\
                 ready_timeout = \"10s\"\nstop_timeout = \"5s\"\nlisten = [\"127.0.0.1:{port}\"]\n",
                current.display()
            );
            let config = root.join("supervisor.toml");
            std::fs::write(&config, cfg).expect("config");
            let socket = root.join("run/control.sock");
            let d = Daemon::start_with(tempfile::tempdir().expect("tempdir"), config, socket);
            Some(d)
        }
        Some(p) => {
            let eco = root.join("ecosystem.config.js");
            std::fs::write(
                &eco,
                format!(
                    "module.exports = {{ apps: [{{ name: 'app', script: '{c}/server.js', cwd: '{c}', instances: {INSTANCES}, exec_mode: 'cluster', wait_ready: true, listen_timeout: 10000, kill_timeout: 5000, env: {{ PORT: '{port}' }} }}] }};\n",
                    c = current.display()
                ),
            )
            .expect("ecosystem");
            let ok = p.command(&["start", &eco.display().to_string()]).status().is_ok_and(|s| s.success());
            assert!(ok, "pm2 start failed");
            None
        }
    };
    wait_until("the app answering", Duration::from_secs(120), || {
        http_get(port, "/").ok().filter(|r| r.0 == 200).map(|_| ())
    });
    let v1_pids: Vec<u32> = match &daemon {
        Some(d) => wait_until("4 workers", DEADLINE, || {
            let i = d.instances("app");
            (i.len() == INSTANCES && i.iter().all(|i| i.state == WorkerState::Ready))
                .then(|| i.iter().filter_map(|i| i.pid).collect())
        }),
        None => Vec::new(),
    };
    let _ = v1_pids;
    let load = Load::start(port, &[Mode::NewConnection], 2);
    load.wait_for(300);
    switch(&root, &v2);
    let t0 = Instant::now();
    let mut child = match (&daemon, pm2) {
        (Some(d), _) => Command::new(bin("supctl"))
            .arg("--socket")
            .arg(&d.socket)
            .args(["reload", "app"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("supctl"),
        (None, Some(p)) => p.command(&["reload", "app"]).spawn().expect("pm2 reload"),
        _ => unreachable!("one of the two runs"),
    };
    let code = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s.code();
        }
        if t0.elapsed() > CAP {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = t0.elapsed();
    // Five more seconds of load: what a user sees right after the deploy "finished".
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    let stats = load.finish();
    // Serving the old version: the app answers, and (for sup) every slot is on version 1.
    let answers = http_get(port, "/").ok().is_some_and(|r| r.0 == 200);
    let serving_old = answers
        && match &daemon {
            Some(d) => d.instances("app").iter().all(|i| i.version == 1 && i.state == WorkerState::Ready),
            None => true,
        };
    if let Some(p) = pm2 {
        let _ = p.command(&["delete", "all"]).status();
    }
    drop(daemon);
    Outcome {
        took,
        code,
        failed: stats.failed + stats.unanswered_retried,
        ok: stats.ok,
        serving_old,
        is_sup: pm2.is_none(),
    }
}

fn main() {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    if Command::new("node").arg("--version").output().is_err() {
        println!("skipped: node is not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pm2 = Pm2::install(dir.path());
    // It adds ~50 ms to every Node start: unset it for every supervisor alike.
    // SAFETY: no other thread runs yet.
    unsafe { std::env::remove_var("NODE_EXTRA_CA_CERTS") };
    println!("| broken release | supd | PM2 |");
    println!("|---|---|---|");
    for (kind, label) in
        [(Broken::AtStart, "exits at start"), (Broken::AfterReady, "crashes 0.5 s after start (after ready)")]
    {
        let s = run(None, kind);
        let p = run(Some(&pm2), kind);
        let show = |o: &Outcome| {
            format!(
                "{:.1} s, exit {}, {} failed of {} requests, {}",
                o.took.as_secs_f64(),
                o.code.map_or("none (stopped after 90 s)".into(), |c| c.to_string()),
                o.failed,
                o.failed + o.ok,
                match (o.is_sup, o.serving_old) {
                    (true, true) => "every slot back on the old version",
                    (true, false) => "NOT every slot on the old version",
                    (false, true) => "the app answers afterwards",
                    (false, false) => "the app does NOT answer afterwards",
                }
            )
        };
        println!("| {label} | {} | {} |", show(&s), show(&p));
    }
    let _ = pm2.command(&["kill"]).status();
}
