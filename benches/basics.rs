//! supd's own costs: resident memory with 16 idle workers, and the time from a
//! worker's `kill -9` to its replacement's exec.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench --bench basics`

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sup::*;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU time of every thread of `pid` in seconds, from schedstat (nanosecond resolution).
fn cpu_seconds(pid: u32) -> f64 {
    let mut ns = 0u64;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            ns += s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    ns as f64 / 1e9
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let demo = bin("sup-demo").display().to_string();

    // 1. RSS with 16 idle workers.
    let port = free_port();
    let d = Daemon::start(&format!(
        "[apps.web]\ncommand = [\"{demo}\"]\ninstances = 16\nready = \"notify\"\nlisten = [\"127.0.0.1:{port}\"]\n"
    ));
    d.wait_ready("web", 16);
    // Let allocations settle after start-up, then take the median of a few readings.
    let mut rss: Vec<f64> = (0..5)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(200));
            rss_kib(d.pid()) as f64
        })
        .collect();
    let rss16 = median(&mut rss) / 1024.0;
    drop(d);

    // 2. CPU of supd over an idle window with 64 workers (sampled every second).
    let window = if std::env::args().any(|a| a == "--quick") { 10 } else { 30 };
    let port = free_port();
    let d = Daemon::start(&format!(
        "[apps.web]\ncommand = [\"{demo}\"]\ninstances = 64\nready = \"notify\"\nlisten = [\"127.0.0.1:{port}\"]\n"
    ));
    d.wait_ready("web", 64);
    std::thread::sleep(Duration::from_secs(2));
    let c0 = cpu_seconds(d.pid());
    std::thread::sleep(Duration::from_secs(window));
    let idle_cpu = (cpu_seconds(d.pid()) - c0) / window as f64 * 100.0;
    let rss64 = rss_kib(d.pid()) as f64 / 1024.0;
    drop(d);

    // 3. kill -9 to the replacement's exec.
    let port = free_port();
    let d = Daemon::start(&format!(
        "[apps.web]\ncommand = [\"{demo}\", \"--stamp-file\", \"stamps\"]\ninstances = 1\nmax_restarts = 1000\nbackoff = {{ reset_after = \"1ms\" }}\nready = \"notify\"\nlisten = [\"127.0.0.1:{port}\"]\n"
    ));
    let stamps = d.path("stamps");
    let runs = 25;
    let mut deltas = Vec::new();
    for _ in 0..runs {
        let victim = d.wait_ready("web", 1)[0].pid.expect("pid");
        let before = std::fs::read_to_string(&stamps).unwrap_or_default().lines().count();
        let t0 = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_nanos() as i128;
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(victim as i32, libc::SIGKILL) };
        let exec_ns: i128 = wait_until("replacement's stamp", DEADLINE, || {
            let text = std::fs::read_to_string(&stamps).ok()?;
            let line = text.lines().nth(before)?;
            line.split_whitespace().nth(1)?.parse().ok()
        });
        deltas.push((exec_ns - t0) as f64 / 1e6);
        // Past the restart window, so backoff never applies.
        wait_until("new worker ready", DEADLINE, || {
            let i = d.instances("web");
            (i[0].pid != Some(victim) && i[0].state == WorkerState::Ready).then_some(())
        });
    }
    let (min, max) = deltas.iter().fold((f64::MAX, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    let med = median(&mut deltas);
    drop(d);

    println!("| figure | value | target |");
    println!("|---|---|---|");
    println!("| supd RSS, 16 idle workers (median of 5 readings) | {rss16:.1} MiB | < 10 MiB |");
    println!("| supd CPU, 64 idle workers, over {window} s (1 s sampling) | {idle_cpu:.3} % of a core | < 0.1 % |");
    println!("| supd RSS, 64 idle workers | {rss64:.1} MiB | |");
    println!("| kill -9 → replacement exec, median of {runs} (min–max) | {med:.2} ms ({min:.2}–{max:.2}) | < 5 ms |");
}
