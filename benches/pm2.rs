//! sup beside PM2 on the same Node app (`benches/app/server.js`), in one run.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench --bench pm2`
//! (`-- --quick` for one round, `-- --memory` for the daemon memory rows only).
//! Daemon memory is compared settled: every daemon is sampled until its RSS moves
//! less than 1% over 5 s (capped), since a Node daemon's RSS right after start is a
//! transient; peaks (`VmHWM`) are reported in rows of their own. PM2 is installed with npm into a temporary
//! prefix with its own PM2_HOME; a global install is never touched. Runs
//! alternate supd and PM2 (A/B) so drift hits both alike.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sup::*;

const INSTANCES: usize = 4;
const RELOADS: usize = 3;

enum Sup<'a> {
    Supd(Daemon),
    Pm2(&'a Pm2),
}

fn app_js() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/app/server.js").display().to_string()
}

fn start_supd(port: u16) -> Daemon {
    start_supd_n(port, INSTANCES)
}

fn start_supd_n(port: u16, n: usize) -> Daemon {
    let d = Daemon::start(&format!(
        "[apps.app]\ncommand = [\"node\", \"{}\"]\ninstances = {n}\nready = \"notify\"\nready_timeout = \"120s\"\nstop_timeout = \"5s\"\nlisten = [\"127.0.0.1:{port}\"]\n",
        app_js()
    ));
    wait_until_long(&format!("{n} supd workers ready"), || {
        let i = d.instances("app");
        (i.len() == n && i.iter().all(|i| i.state == WorkerState::Ready)).then_some(())
    });
    d
}

fn wait_until_long<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    wait_until(what, Duration::from_secs(600), f)
}

fn start_pm2(pm2: &Pm2, dir: &Path, port: u16) {
    start_pm2_n(pm2, dir, port, INSTANCES);
}

fn start_pm2_n(pm2: &Pm2, dir: &Path, port: u16, n: usize) {
    let eco = dir.join("ecosystem.config.js");
    std::fs::write(
        &eco,
        format!(
            "module.exports = {{ apps: [{{ name: 'app', script: '{}', instances: {n}, exec_mode: 'cluster', wait_ready: true, listen_timeout: 60000, kill_timeout: 5000, env: {{ PORT: '{port}' }} }}] }};\n",
            app_js()
        ),
    )
    .expect("write ecosystem file");
    let out = pm2.cmd(&["start", &eco.display().to_string()]);
    assert!(out.status.success(), "pm2 start: {}", String::from_utf8_lossy(&out.stderr));
    wait_until_long("PM2 workers online", || (pm2.online() == n).then_some(()));
    wait_until("PM2 app answering", DEADLINE, || http_get(port, "/").ok().filter(|r| r.0 == 200).map(|_| ()));
}

fn reload(sup: &Sup) -> Duration {
    let t0 = Instant::now();
    let out = match sup {
        Sup::Supd(d) => d.supctl(&["reload", "app"]),
        Sup::Pm2(p) => p.cmd(&["reload", "app"]),
    };
    let took = t0.elapsed();
    assert!(out.status.success(), "reload failed: {}", String::from_utf8_lossy(&out.stdout));
    took
}

/// One round: start, load, 3 reloads, stop. Returns (failed requests, ok requests, reload times).
fn round(pm2: Option<&Pm2>, dir: &Path, mode: Mode) -> (u64, u64, Vec<Duration>) {
    let port = free_port();
    let sup = match pm2 {
        None => Sup::Supd(start_supd(port)),
        Some(p) => {
            start_pm2(p, dir, port);
            Sup::Pm2(p)
        }
    };
    let load = Load::start(port, &[mode], 4);
    load.wait_for(500);
    let mut times = Vec::new();
    for _ in 0..RELOADS {
        times.push(reload(&sup));
        load.wait_for(300);
    }
    let stats = load.finish();
    if let Sup::Pm2(p) = sup {
        let _ = p.cmd(&["delete", "all"]);
    }
    // The load client retries a fresh connection that got no answer at all;
    // for the comparison every such request counts as failed.
    (stats.failed + stats.unanswered_retried, stats.ok, times)
}

/// CPU seconds (schedstat) and peak RSS (VmHWM, bytes) of `pid`.
fn cost(pid: u32) -> (f64, u64) {
    let mut ns = 0u64;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            ns += s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    (ns as f64 / 1e9, hwm * 1024)
}

fn dir_bytes(dir: &Path, prefix: &str) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// One worker flooding its stdout for `secs`: MB/s and lines/s on disk, daemon CPU% and peak RSS.
fn log_round(pm2: Option<&Pm2>, dir: &Path, secs: u64, node: bool) -> (f64, f64, f64, u64) {
    let flood = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/app/flood.js").display().to_string();
    let line_bytes = 100.0;
    match pm2 {
        None => {
            let cmd = if node {
                format!("[\"node\", \"{flood}\"]")
            } else {
                format!("[\"{}\", \"--log-flood\", \"--port\", \"{}\"]", bin("sup-demo").display(), free_port())
            };
            let d = Daemon::start(&format!(
                "[apps.flood]\ncommand = {cmd}\nenv = {{ FLOOD_SECONDS = \"{secs}\" }}\nlogs = {{ rotate_size = \"off\" }}\n"
            ));
            let logs = d.path("logs");
            let (c0, _) = cost(d.pid());
            let b0 = dir_bytes(&logs, "flood.out");
            std::thread::sleep(Duration::from_secs(secs));
            let (c1, hwm) = cost(d.pid());
            let bytes = dir_bytes(&logs, "flood.out") - b0;
            let r = (
                bytes as f64 / secs as f64 / 1e6,
                bytes as f64 / line_bytes / secs as f64,
                (c1 - c0) / secs as f64 * 100.0,
                hwm,
            );
            drop(d);
            r
        }
        Some(p) => {
            let eco = dir.join("flood.config.js");
            std::fs::write(
                &eco,
                format!("module.exports = {{ apps: [{{ name: 'flood', script: '{flood}', instances: 1, exec_mode: 'fork', env: {{ FLOOD_SECONDS: '{secs}' }} }}] }};\n"),
            )
            .expect("ecosystem");
            let out = p.cmd(&["start", &eco.display().to_string()]);
            assert!(out.status.success(), "pm2 start flood");
            let god: u32 =
                std::fs::read_to_string(p.home.join("pm2.pid")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
            let logs = p.home.join("logs");
            let (c0, _) = cost(god);
            let b0 = dir_bytes(&logs, "flood-out");
            std::thread::sleep(Duration::from_secs(secs));
            let (c1, hwm) = cost(god);
            let bytes = dir_bytes(&logs, "flood-out") - b0;
            let _ = p.cmd(&["delete", "all"]);
            (
                bytes as f64 / secs as f64 / 1e6,
                bytes as f64 / line_bytes / secs as f64,
                (c1 - c0) / secs as f64 * 100.0,
                hwm,
            )
        }
    }
}

fn pss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn god(p: &Pm2) -> u32 {
    std::fs::read_to_string(p.home.join("pm2.pid")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

fn pm2_pids(p: &Pm2) -> Vec<u32> {
    let out = p.cmd(&["jlist"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array().map_or(Vec::new(), |a| a.iter().filter_map(|x| x["pid"].as_u64()).map(|p| p as u32).collect())
}

/// Median wall time of `f` over `n` calls, ms.
fn time_ms(n: usize, mut f: impl FnMut()) -> f64 {
    median(
        (0..n)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect(),
    )
}

/// RSS samples this far apart must differ by less than [`SETTLED`] for a daemon to count as settled.
const SETTLE_WINDOW: Duration = Duration::from_secs(5);
/// Relative RSS change over [`SETTLE_WINDOW`] below which a daemon is settled.
const SETTLED: f64 = 0.01;
/// The longest a daemon is given to settle; its RSS then is taken as it is.
const SETTLE_CAP: Duration = Duration::from_secs(120);

/// Memory of a daemon once settled.
#[derive(Debug, Clone, Copy)]
struct Memory {
    /// Settled RSS, MiB.
    rss: f64,
    /// Settled PSS, MiB.
    pss: f64,
    /// Peak RSS since the daemon started (VmHWM), MiB.
    peak: f64,
    /// RSS 2 s after all workers were up (the old figure, a transient), MiB.
    early: f64,
    /// Seconds it took to settle.
    secs: f64,
}

/// Samples `pid` every [`SETTLE_WINDOW`] until its RSS moves by less than [`SETTLED`] (at
/// most [`SETTLE_CAP`]); the same rule for every daemon.
fn settled(pid: u32) -> Memory {
    std::thread::sleep(Duration::from_secs(2));
    let early = rss_kib(pid) as f64 / 1024.0;
    let t0 = Instant::now();
    let mut prev = rss_kib(pid);
    loop {
        std::thread::sleep(SETTLE_WINDOW);
        let now = rss_kib(pid);
        let change = (now as f64 - prev as f64).abs() / prev.max(1) as f64;
        if change < SETTLED || t0.elapsed() >= SETTLE_CAP {
            let (_, peak) = cost(pid);
            return Memory {
                rss: now as f64 / 1024.0,
                pss: pss_kib(pid) as f64 / 1024.0,
                peak: peak as f64 / 1048576.0,
                early,
                secs: t0.elapsed().as_secs_f64(),
            };
        }
        prev = now;
    }
}

/// Per supervisor, per worker count: (settled memory, idle CPU %, CLI ms).
fn costs(pm2: Option<&Pm2>, dir: &Path, n: usize, idle_secs: u64) -> (Memory, f64, f64) {
    let port = free_port();
    let (pid, daemon) = match pm2 {
        None => {
            let d = start_supd_n(port, n);
            (d.pid(), Some(d))
        }
        Some(p) => {
            // A fresh God daemon, as supd is fresh: one that already carried a log flood or
            // reloads keeps that memory (the old 162.6 MiB figure was such a daemon).
            let _ = p.cmd(&["kill"]);
            start_pm2_n(p, dir, port, n);
            (god(p), None)
        }
    };
    let mem = settled(pid);
    let (c0, _) = cost(pid);
    std::thread::sleep(Duration::from_secs(idle_secs));
    let (c1, _) = cost(pid);
    let cpu = (c1 - c0) / idle_secs as f64 * 100.0;
    let cli = match (&daemon, pm2) {
        (Some(d), _) => time_ms(9, || {
            let _ = d.supctl(&["status", "--json"]);
        }),
        (None, Some(p)) => time_ms(9, || {
            let _ = p.cmd(&["jlist"]);
        }),
        _ => f64::NAN,
    };
    if let Some(p) = pm2 {
        let _ = p.cmd(&["delete", "all"]);
    }
    drop(daemon);
    (mem, cpu, cli)
}

/// kill -9 of one of 4 workers until a new pid answers on the port, ms (median of `runs`).
fn crash(pm2: Option<&Pm2>, dir: &Path, runs: usize) -> f64 {
    let port = free_port();
    let daemon = match pm2 {
        None => Some(start_supd(port)),
        Some(p) => {
            start_pm2(p, dir, port);
            None
        }
    };
    let pids = || match (&daemon, pm2) {
        (Some(d), _) => d.instances("app").iter().filter_map(|i| i.pid).collect::<Vec<u32>>(),
        (None, Some(p)) => pm2_pids(p),
        _ => Vec::new(),
    };
    let mut times = Vec::new();
    for run in 0..runs {
        let before = wait_until_long("4 workers", || Some(pids()).filter(|p| p.len() == INSTANCES));
        let t0 = Instant::now();
        // A different worker each time: the first crash of a slot is restarted
        // at once; repeated crashes of one slot back off by design (PM2's
        // default restarts at once every time).
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(before[run % before.len()] as i32, libc::SIGKILL) };
        wait_until_long("a new pid answering", || {
            let (_, body) = http_get(port, "/").ok()?;
            let pid: u32 = body.split("pid=").nth(1)?.split_whitespace().next()?.parse().ok()?;
            (!before.contains(&pid)).then_some(())
        });
        times.push(t0.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(300));
    }
    if let Some(p) = pm2 {
        let _ = p.cmd(&["delete", "all"]);
    }
    drop(daemon);
    median(times)
}

/// wrk on loopback: (requests/s, p99 ms).
fn wrk(port: u16, secs: u64) -> (f64, f64) {
    let out = Command::new("wrk")
        .args(["-t2", "-c64", &format!("-d{secs}s"), "--latency"])
        .arg(format!("http://127.0.0.1:{port}/"))
        .stdin(Stdio::null())
        .output();
    let Ok(out) = out else { return (f64::NAN, f64::NAN) };
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN);
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| v.trim().to_string())
        .map(|v| {
            let num: f64 = v.trim_end_matches(|c: char| c.is_alphabetic()).parse().unwrap_or(f64::NAN);
            if v.ends_with("us") {
                num / 1000.0
            } else if v.ends_with("ms") {
                num
            } else if v.ends_with('s') {
                num * 1000.0
            } else {
                num
            }
        })
        .unwrap_or(f64::NAN);
    (rps, p99)
}

/// The same 4 Node processes on one shared socket, with no supervisor.
fn reference(port: u16, secs: u64) -> (f64, f64) {
    let script = format!(
        "import os,socket,time\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1',{port})); s.listen(1024)\nkids=[]\nfor i in range({INSTANCES}):\n    pid=os.fork()\n    if pid==0:\n        os.dup2(s.fileno(),3); os.set_inheritable(3,True)\n        env=dict(os.environ, LISTEN_FDS='1', LISTEN_PID=str(os.getpid()), SUP_INSTANCE=str(i))\n        os.execvpe('node',['node','{}'],env)\n    kids.append(pid)\ntime.sleep({})\nfor k in kids: os.kill(k,9)\n",
        app_js(),
        secs + 4
    );
    let mut launcher = Command::new("python3").args(["-c", &script]).stdin(Stdio::null()).spawn().expect("python3");
    wait_until_long("the reference cluster", || http_get(port, "/").ok().filter(|r| r.0 == 200).map(|_| ()));
    let r = wrk(port, secs);
    let _ = launcher.wait();
    r
}

fn throughput(pm2: Option<&Pm2>, dir: &Path, secs: u64) -> (f64, f64) {
    let port = free_port();
    let daemon = match pm2 {
        None => Some(start_supd(port)),
        Some(p) => {
            start_pm2(p, dir, port);
            None
        }
    };
    let r = wrk(port, secs);
    if let Some(p) = pm2 {
        let _ = p.cmd(&["delete", "all"]);
    }
    drop(daemon);
    r
}

/// `n` trivial workers (`sleep`): seconds until all are up, and the daemon's memory once settled.
fn many(pm2: Option<&Pm2>, dir: &Path, n: usize) -> (f64, Memory) {
    // A fresh God daemon, as supd is fresh; its start counts, as supd's does.
    if let Some(p) = pm2 {
        let _ = p.cmd(&["kill"]);
    }
    let t0 = Instant::now();
    match pm2 {
        None => {
            let d = Daemon::start(&format!("[apps.many]\ncommand = [\"sleep\", \"100000\"]\ninstances = {n}\n"));
            wait_until_long("all trivial workers up", || {
                let i = d.instances("many");
                (i.len() == n && i.iter().all(|i| i.state == WorkerState::Ready)).then_some(())
            });
            let took = t0.elapsed().as_secs_f64();
            (took, settled(d.pid()))
        }
        Some(p) => {
            let eco = dir.join("many.config.js");
            std::fs::write(&eco, format!("module.exports = {{ apps: [{{ name: 'many', script: 'sleep', args: '100000', interpreter: 'none', instances: {n}, exec_mode: 'fork' }}] }};\n")).expect("eco");
            let _ = p.cmd(&["start", &eco.display().to_string()]);
            wait_until_long("all PM2 trivial workers online", || (p.online() == n).then_some(()));
            let took = t0.elapsed().as_secs_f64();
            let mem = settled(god(p));
            let _ = p.cmd(&["delete", "all"]);
            (took, mem)
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn spread(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::MAX, f64::min);
    let hi = v.iter().copied().fold(f64::MIN, f64::max);
    format!("{lo:.0}–{hi:.0}")
}

fn main() {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    if Command::new("node").arg("--version").output().is_err() {
        println!("skipped: node is not installed");
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let memory_only = std::env::args().any(|a| a == "--memory");
    let rounds = if quick { 1 } else { 3 };
    let dir = tempfile::tempdir().expect("tempdir");
    // npm may need NODE_EXTRA_CA_CERTS to reach the registry: install first.
    let pm2 = Pm2::install(dir.path());
    // It adds ~50 ms to every Node start: unset it for every supervisor alike.
    // SAFETY: no other thread runs yet.
    unsafe { std::env::remove_var("NODE_EXTRA_CA_CERTS") };

    let mut rows = Vec::new();
    if memory_only {
        memory_rows(&pm2, dir.path(), &mut rows);
        let _ = pm2.cmd(&["kill"]);
        print_rows(rows);
        return;
    }
    for (mode, label) in [(Mode::KeepAlive, "keep-alive"), (Mode::NewConnection, "new connection per request")] {
        let (mut fs, mut fp, mut ts, mut tp) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut oks, mut okp) = (0, 0);
        for _ in 0..rounds {
            let (f, ok, t) = round(None, dir.path(), mode);
            fs.push(f as f64);
            oks += ok;
            ts.extend(t.iter().map(|d| d.as_secs_f64() * 1000.0));
            let (f, ok, t) = round(Some(&pm2), dir.path(), mode);
            fp.push(f as f64);
            okp += ok;
            tp.extend(t.iter().map(|d| d.as_secs_f64() * 1000.0));
        }
        rows.push(format!(
            "| failed requests during {RELOADS} reloads, {label} (median of {rounds} rounds; range) | {} ({}) of {oks} | {} ({}) of {okp} | {} |",
            median(fs.clone()),
            spread(&fs),
            median(fp.clone()),
            spread(&fp),
            if median(fs.clone()) == 0.0 { "sup: none failed".to_string() } else { format!("{:.2}", median(fp.clone()) / median(fs.clone())) }
        ));
        rows.push(format!(
            "| reload wall time, {INSTANCES} workers, {label} load (median ms; range) | {:.0} ({}) | {:.0} ({}) | PM2/sup = {:.1}× |",
            median(ts.clone()),
            spread(&ts),
            median(tp.clone()),
            spread(&tp),
            median(tp.clone()) / median(ts.clone())
        ));
    }
    let secs = if quick { 3 } else { 10 };
    let (mut sup_node, mut pm2_node, mut sup_rust) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        sup_node.push(log_round(None, dir.path(), secs, true));
        pm2_node.push(log_round(Some(&pm2), dir.path(), secs, true));
        sup_rust.push(log_round(None, dir.path(), secs, false));
    }
    let med = |v: &[(f64, f64, f64, u64)], f: fn(&(f64, f64, f64, u64)) -> f64| median(v.iter().map(f).collect());
    let (sm, pm) = (med(&sup_node, |r| r.0), med(&pm2_node, |r| r.0));
    rows.push(format!(
        "| log bytes to disk, one Node worker flooding stdout (MB/s) | {sm:.0} | {pm:.0} | sup/PM2 = {:.1}× |",
        sm / pm.max(0.001)
    ));
    rows.push(format!(
        "| log lines to disk, same (lines/s) | {:.0} | {:.0} | |",
        med(&sup_node, |r| r.1),
        med(&pm2_node, |r| r.1)
    ));
    let (sc, pc) = (med(&sup_node, |r| r.2), med(&pm2_node, |r| r.2));
    rows.push(format!(
        "| daemon CPU while logging (% of a core) | {sc:.0} | {pc:.0} | PM2/sup = {:.1}× |",
        pc / sc.max(0.001)
    ));
    let (sr, pr) = (med(&sup_node, |r| r.3 as f64) / 1048576.0, med(&pm2_node, |r| r.3 as f64) / 1048576.0);
    rows.push(format!(
        "| daemon peak RSS while logging (MiB) | {sr:.1} | {pr:.1} | PM2/sup = {:.1}× |",
        pr / sr.max(0.001)
    ));
    rows.push(format!(
        "| log bytes to disk, sup-demo --log-flood (Rust writer; supd's ceiling) (MB/s) | {:.0} (supd CPU {:.0} %, peak RSS {:.1} MiB) | – | |",
        med(&sup_rust, |r| r.0),
        med(&sup_rust, |r| r.2),
        med(&sup_rust, |r| r.3 as f64) / 1048576.0
    ));
    let idle = if quick { 3 } else { 30 };
    for n in [2usize, 16] {
        // Quick mode takes every per-size figure from this one pass.
        let secs = if quick { idle } else { 1 };
        let (sm, sc, sl) = costs(None, dir.path(), n, secs);
        let (pm, pc, pl) = costs(Some(&pm2), dir.path(), n, secs);
        memory_row(&mut rows, &format!("{n} Node workers"), sm, pm);
        if quick {
            rows.push(format!(
                "| daemon CPU over {idle} s idle, {n} Node workers (% of a core) | {sc:.3} | {pc:.3} | {} |",
                ratio(sc, pc)
            ));
            rows.push(format!(
                "| `supctl status --json` vs `pm2 jlist`, {n} workers (median ms) | {sl:.1} | {pl:.1} | {} |",
                ratio(sl, pl)
            ));
        }
    }
    for n in if quick { vec![] } else { vec![16usize, 64] } {
        let (_, sc, _) = costs(None, dir.path(), n, idle);
        let (_, pc, _) = costs(Some(&pm2), dir.path(), n, idle);
        rows.push(format!(
            "| daemon CPU over {idle} s idle, {n} Node workers (% of a core) | {sc:.3} | {pc:.3} | {} |",
            ratio(sc, pc)
        ));
    }
    for n in if quick { vec![] } else { vec![2usize, 100] } {
        let (_, _, sl) = costs(None, dir.path(), n, 1);
        let (_, _, pl) = costs(Some(&pm2), dir.path(), n, 1);
        rows.push(format!(
            "| `supctl status --json` vs `pm2 jlist`, {n} workers (median ms) | {sl:.1} | {pl:.1} | {} |",
            ratio(sl, pl)
        ));
    }
    let runs = if quick { 2 } else { INSTANCES };
    let (sk, pk) = (crash(None, dir.path(), runs), crash(Some(&pm2), dir.path(), runs));
    rows.push(format!(
        "| kill -9 → a new pid answers on the port (median of {runs}, ms) | {sk:.0} | {pk:.0} | {} |",
        ratio(sk, pk)
    ));
    let secs = if quick { 3 } else { 10 };
    let (sr, s99) = throughput(None, dir.path(), secs);
    let (pr, p99) = throughput(Some(&pm2), dir.path(), secs);
    let (rr, r99) = reference(free_port(), secs);
    rows.push(format!(
        "| throughput, 4 workers, wrk -c64 (req/s) | {sr:.0} | {pr:.0} | sup/PM2 = {:.2}×; no-supervisor reference {rr:.0} |",
        sr / pr
    ));
    rows.push(format!("| p99 latency, same (ms) | {s99:.2} | {p99:.2} | reference {r99:.2} |"));
    let n = if quick { 100 } else { 1000 };
    let (st, sm) = many(None, dir.path(), n);
    let (pt, pm) = many(Some(&pm2), dir.path(), n);
    rows.push(format!("| start-up of {n} trivial workers until all up (s) | {st:.2} | {pt:.2} | {} |", ratio(st, pt)));
    memory_row(&mut rows, &format!("{n} trivial workers"), sm, pm);
    let _ = pm2.cmd(&["kill"]);
    print_rows(rows);
}

fn ratio(s: f64, p: f64) -> String {
    if s > 0.0 {
        format!("PM2/sup = {:.1}×", p / s)
    } else {
        "–".into()
    }
}

/// Settled RSS and PSS, the peak in its own row, and the old 2 s reading for reference.
fn memory_row(rows: &mut Vec<String>, what: &str, s: Memory, p: Memory) {
    rows.push(format!(
        "| daemon RSS settled, {what} (MiB; settled after s) | {:.1} ({:.0} s) | {:.1} ({:.0} s) | {} |",
        s.rss,
        s.secs,
        p.rss,
        p.secs,
        ratio(s.rss, p.rss)
    ));
    rows.push(format!("| daemon PSS settled, {what} (MiB) | {:.1} | {:.1} | {} |", s.pss, p.pss, ratio(s.pss, p.pss)));
    rows.push(format!(
        "| daemon peak RSS (VmHWM) since start, {what} (MiB) | {:.1} | {:.1} | {} |",
        s.peak,
        p.peak,
        ratio(s.peak, p.peak)
    ));
    rows.push(format!(
        "| daemon RSS 2 s after all up (transient), {what} (MiB) | {:.1} | {:.1} | {} |",
        s.early,
        p.early,
        ratio(s.early, p.early)
    ));
}

/// Only the memory rows (`--memory`), A/B per size.
fn memory_rows(pm2: &Pm2, dir: &Path, rows: &mut Vec<String>) {
    for n in [2usize, 16] {
        let (sm, _, _) = costs(None, dir, n, 1);
        let (pm, _, _) = costs(Some(pm2), dir, n, 1);
        memory_row(rows, &format!("{n} Node workers"), sm, pm);
    }
    let n = 1000;
    let (_, sm) = many(None, dir, n);
    let (_, pm) = many(Some(pm2), dir, n);
    memory_row(rows, &format!("{n} trivial workers"), sm, pm);
}

fn print_rows(rows: Vec<String>) {
    println!("| figure | supd | PM2 | ratio |");
    println!("|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
}
