//! CPU and memory of every worker's process tree, sampled from /proc.
//!
//! One task samples every `monitor_interval`; `status` reads the last sample
//! and never waits for a fresh one. A worker whose tree stays over its app's
//! `memory_limit` for `memory_limit_samples` samples in a row is replaced
//! through its slot (new worker ready first, then the old one drains), with
//! backoff between repeated memory replacements of a slot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sup_proto::{RestartReason, WorkerState};

use crate::supervisor::Supervisor;

/// The last sample of one worker.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// The worker's main pid when sampled.
    pub pid: i32,
    /// CPU use of the tree over the last interval, percent of one core.
    pub cpu_percent: f64,
    /// CPU time of the tree so far (live processes), seconds.
    pub cpu_seconds: f64,
    /// Resident memory of the main process.
    pub rss_bytes: u64,
    /// Resident memory of the main process and all its descendants.
    pub tree_rss_bytes: u64,
}

/// Samples by (app, slot).
pub type Samples = Arc<Mutex<HashMap<(String, u32), Sample>>>;

#[derive(Default)]
struct SlotTrack {
    pid: i32,
    ticks: u64,
    at: Option<Instant>,
    over: u32,
    mem_attempt: u32,
    next_allowed: Option<Instant>,
    replacing: Arc<std::sync::atomic::AtomicBool>,
}

/// Starts the sampling task; it ends when the supervisor is dropped.
pub fn start(sup: Weak<Supervisor>, samples: Samples, interval: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tracks: HashMap<(String, u32), SlotTrack> = HashMap::new();
        let clk = clock_ticks();
        let page = page_size();
        loop {
            tick.tick().await;
            let Some(sup) = sup.upgrade() else { return };
            let mut fresh = HashMap::new();
            for app in sup.apps() {
                let spec = app.spec();
                for slot in app.slots() {
                    let view = slot.view.borrow().clone();
                    let Some(pid) = view.pid else { continue };
                    let key = (app.name.clone(), slot.slot);
                    let Some((ticks, rss, tree_rss)) = read_tree(pid, page) else { continue };
                    let now = Instant::now();
                    let track = tracks.entry(key.clone()).or_default();
                    let cpu_percent = match track.at {
                        Some(at) if track.pid == pid && ticks >= track.ticks => {
                            let secs = now.duration_since(at).as_secs_f64().max(1e-3);
                            (ticks - track.ticks) as f64 / clk / secs * 100.0
                        }
                        _ => 0.0,
                    };
                    if track.pid != pid {
                        track.over = 0;
                    }
                    track.pid = pid;
                    track.ticks = ticks;
                    track.at = Some(now);
                    fresh.insert(
                        key.clone(),
                        Sample {
                            pid,
                            cpu_percent,
                            cpu_seconds: ticks as f64 / clk,
                            rss_bytes: rss,
                            tree_rss_bytes: tree_rss,
                        },
                    );
                    let Some(limit) = spec.cfg.memory_limit else { continue };
                    if tree_rss <= limit {
                        track.over = 0;
                        continue;
                    }
                    track.over += 1;
                    let busy = track.replacing.load(std::sync::atomic::Ordering::SeqCst);
                    let allowed = track.next_allowed.is_none_or(|t| now >= t);
                    if track.over < spec.cfg.memory_limit_samples
                        || view.state != WorkerState::Ready
                        || busy
                        || !allowed
                    {
                        continue;
                    }
                    // Memory restarts back off like crashes; a long healthy run resets it.
                    let uptime = view.since.map_or(Duration::ZERO, |s| s.elapsed());
                    if uptime >= spec.cfg.backoff.reset_after {
                        track.mem_attempt = 0;
                    }
                    track.next_allowed = Some(now + spec.cfg.backoff.delay(track.mem_attempt + 1));
                    track.mem_attempt += 1;
                    track.over = 0;
                    tracing::warn!(
                        app = %app.name, slot = slot.slot, pid,
                        "memory {} MiB over the limit of {} MiB for {} samples: replacing the worker",
                        tree_rss >> 20, limit >> 20, spec.cfg.memory_limit_samples
                    );
                    let flag = track.replacing.clone();
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                    let done = slot.replace(app.spec(), RestartReason::Memory);
                    let name = app.name.clone();
                    tokio::spawn(async move {
                        if let Err(e) = done.await {
                            tracing::warn!(app = %name, "memory replacement failed: {e}");
                        }
                        flag.store(false, std::sync::atomic::Ordering::SeqCst);
                    });
                }
            }
            tracks.retain(|k, _| fresh.contains_key(k));
            *samples.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
        }
    });
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// CPU ticks of the tree, RSS of `pid`, RSS of the tree.
fn read_tree(pid: i32, page: u64) -> Option<(u64, u64, u64)> {
    let (ticks, rss) = read_one(pid, page)?;
    let (mut total_ticks, mut total_rss) = (ticks, rss);
    let mut stack = children(pid);
    let mut seen = 0;
    while let Some(child) = stack.pop() {
        seen += 1;
        if seen > 10_000 {
            break;
        }
        if let Some((t, r)) = read_one(child, page) {
            total_ticks += t;
            total_rss += r;
        }
        stack.extend(children(child));
    }
    Some((total_ticks, rss, total_rss))
}

fn read_one(pid: i32, page: u64) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may itself hold spaces and parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let rss_pages: u64 = f.get(21)?.parse().ok()?;
    Some((utime + stime, rss_pages * page))
}

fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(c.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
    }
    out
}

/// Resident memory of supd itself, bytes.
pub fn own_rss() -> u64 {
    read_one(std::process::id() as i32, page_size()).map_or(0, |(_, r)| r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_tree() {
        let me = std::process::id() as i32;
        let (ticks, rss, tree) = read_tree(me, page_size()).expect("own stat");
        assert!(rss > 1 << 20, "rss {rss}");
        assert!(tree >= rss);
        let _ = ticks;
        let mut child = std::process::Command::new("sleep").arg("5").spawn().expect("sleep");
        assert!(children(me).contains(&(child.id() as i32)));
        let _ = child.kill();
        let _ = child.wait();
    }
}
