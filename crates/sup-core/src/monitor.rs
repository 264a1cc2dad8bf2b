//! CPU and memory of every worker's process tree, sampled from /proc.
//!
//! One task samples every `monitor_interval`; `status` reads the last sample
//! and never waits for a fresh one. A worker whose tree stays over its app's
//! `memory_limit` for `memory_limit_samples` samples in a row is replaced
//! through its slot (new worker ready first, then the old one drains); the
//! slot decides, so the replacement is ordered with the app's operations.

use std::collections::HashMap;
use std::sync::Weak;
use std::time::{Duration, Instant};

use sup_proto::WorkerState;

use crate::spec::{Sample, Samples};
use crate::supervisor::Supervisor;

#[derive(Default)]
struct SlotTrack {
    pid: i32,
    // Open /proc/PID/stat files of the tree, main process first: re-reading an
    // open file costs a fraction of opening it again every second.
    tree: Vec<(i32, std::fs::File)>,
    rescan_in: u32,
    // Set when the tree's membership changed: its tick total is not comparable.
    changed: bool,
    last_cpu: f64,
    ticks: u64,
    at: Option<Instant>,
    over: u32,
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
            // The /proc reads happen off the event loop: a read can stall for
            // seconds while the kernel tears a dead process down.
            let targets: Vec<((String, u32), i32)> = sup
                .apps()
                .iter()
                .flat_map(|app| {
                    app.slots().into_iter().filter_map(|slot| {
                        let pid = slot.view.borrow().pid?;
                        Some(((app.name.clone(), slot.slot), pid))
                    })
                })
                .collect();
            let mut moved = std::mem::take(&mut tracks);
            let read = tokio::task::spawn_blocking(move || {
                let mut readings = HashMap::new();
                for (key, pid) in targets {
                    if let Some(r) = moved.entry(key.clone()).or_default().sample(pid, page) {
                        readings.insert(key, (pid, r));
                    }
                }
                (moved, readings)
            })
            .await;
            // A failed read task loses the open /proc files; they are opened again.
            let readings = match read {
                Ok((back, readings)) => {
                    tracks = back;
                    readings
                }
                Err(_) => HashMap::new(),
            };
            let mut fresh = HashMap::new();
            for app in sup.apps() {
                let spec = app.spec();
                for slot in app.slots() {
                    let view = slot.view.borrow().clone();
                    let Some(pid) = view.pid else { continue };
                    let key = (app.name.clone(), slot.slot);
                    let track = tracks.entry(key.clone()).or_default();
                    // Read for this very worker (not one replaced meanwhile).
                    let Some(&(read_pid, (ticks, rss, tree_rss))) = readings.get(&key) else { continue };
                    if read_pid != pid {
                        continue;
                    }
                    let now = Instant::now();
                    let cpu_percent = match track.at {
                        _ if track.changed => track.last_cpu,
                        Some(at) if track.pid == pid && ticks >= track.ticks => {
                            let secs = now.duration_since(at).as_secs_f64().max(1e-3);
                            (ticks - track.ticks) as f64 / clk / secs * 100.0
                        }
                        _ => 0.0,
                    };
                    track.changed = false;
                    track.last_cpu = cpu_percent;
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
                    if track.over < spec.cfg.memory_limit_samples || view.state != WorkerState::Ready {
                        continue;
                    }
                    track.over = 0;
                    tracing::warn!(
                        app = %app.name, slot = slot.slot, pid,
                        "memory {} MiB over the limit of {} MiB for {} samples",
                        tree_rss >> 20, limit >> 20, spec.cfg.memory_limit_samples
                    );
                    // The slot decides: it replaces the worker unless a
                    // replacement runs there already, backing off like crashes.
                    slot.memory_exceeded(pid);
                }
            }
            tracks.retain(|k, _| fresh.contains_key(k));
            *samples.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
        }
    });
}

/// Descendants are looked for again every this many samples.
const RESCAN_EVERY: u32 = 10;

impl SlotTrack {
    /// CPU ticks of the tree, RSS of `pid`, RSS of the tree.
    fn sample(&mut self, pid: i32, page: u64) -> Option<(u64, u64, u64)> {
        if self.pid != pid || self.rescan_in == 0 || self.tree.is_empty() {
            let before: Vec<i32> = self.tree.iter().map(|(p, _)| *p).collect();
            self.tree = tree_pids(pid).into_iter().filter_map(|p| open_stat(p).map(|f| (p, f))).collect();
            self.changed = before != self.tree.iter().map(|(p, _)| *p).collect::<Vec<_>>();
            self.rescan_in = RESCAN_EVERY;
        }
        let members = self.tree.len();
        self.rescan_in -= 1;
        let mut buf = [0u8; 1024];
        let mut main = None;
        let (mut ticks, mut tree_rss) = (0, 0);
        self.tree.retain(|(p, f)| {
            use std::os::unix::fs::FileExt;
            let Ok(n) = f.read_at(&mut buf, 0) else { return false };
            let Some((t, r, _)) = parse_stat(&buf[..n], page) else { return false };
            ticks += t;
            tree_rss += r;
            if *p == pid {
                main = Some(r);
            }
            true
        });
        if self.tree.len() != members {
            self.changed = true;
        }
        main.map(|rss| (ticks, rss, tree_rss))
    }
}

fn open_stat(pid: i32) -> Option<std::fs::File> {
    std::fs::File::open(format!("/proc/{pid}/stat")).ok()
}

/// `pid` and its descendants.
fn tree_pids(pid: i32) -> Vec<i32> {
    let mut all = vec![pid];
    let mut stack = children(pid);
    while let Some(child) = stack.pop() {
        if all.len() > 10_000 {
            break;
        }
        all.push(child);
        stack.extend(children(child));
    }
    all
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

fn read_one(pid: i32, page: u64) -> Option<(u64, u64)> {
    read_stat(pid, page).map(|(t, r, _)| (t, r))
}

/// CPU ticks, RSS bytes and thread count from /proc/PID/stat.
fn read_stat(pid: i32, page: u64) -> Option<(u64, u64, u64)> {
    parse_stat(&std::fs::read(format!("/proc/{pid}/stat")).ok()?, page)
}

fn parse_stat(stat: &[u8], page: u64) -> Option<(u64, u64, u64)> {
    let stat = std::str::from_utf8(stat).ok()?;
    // Fields after the command name, which may itself hold spaces and parentheses.
    let rest = stat.rsplit_once(')')?.1;
    // Fields counted from the state (0): utime 11, stime 12, threads 17, rss 21.
    let mut f = rest.split_ascii_whitespace();
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    let threads: u64 = f.nth(4)?.parse().ok()?;
    let rss_pages: u64 = f.nth(3)?.parse().ok()?;
    Some((utime + stime, rss_pages * page, threads))
}

fn children(pid: i32) -> Vec<i32> {
    children_of(pid, read_stat(pid, 4096).map_or(2, |s| s.2))
}

/// Children of every thread of `pid`; single-threaded processes (the common
/// idle worker) cost one read instead of a directory scan.
fn children_of(pid: i32, threads: u64) -> Vec<i32> {
    let mut out = Vec::new();
    if threads <= 1 {
        if let Ok(c) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
            out.extend(c.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
        return out;
    }
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
        let mut child = std::process::Command::new("sleep").arg("5").spawn().expect("sleep");
        assert!(children(me).contains(&(child.id() as i32)));
        let mut track = SlotTrack::default();
        // The child may still be between fork and exec, with nothing resident yet.
        let (rss, tree) = (0..200)
            .map(|_| {
                track.rescan_in = 0;
                let (_, rss, tree) = track.sample(me, page_size()).expect("own stat");
                std::thread::sleep(std::time::Duration::from_millis(10));
                (rss, tree)
            })
            .find(|(rss, tree)| tree > rss)
            .unwrap_or((0, 0));
        assert!(rss > 1 << 20, "rss {rss}");
        assert!(tree > rss, "the child counts");
        // The second sample re-reads the open files.
        assert!(track.sample(me, page_size()).is_some());
        let _ = child.kill();
        let _ = child.wait();
    }
}
