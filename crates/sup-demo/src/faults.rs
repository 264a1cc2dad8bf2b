//! Misbehaviour on demand: memory growth, log spam, huge lines, stray grandchildren.
//!
//! Writers run on their own small threads so a full stdout pipe never stalls the HTTP server.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::process::Child;
use std::time::{Duration, Instant};

use crate::Fatal;

const WORKER_STACK: usize = 128 * 1024;
const CHUNK: usize = 64 * 1024;
const FLOOD_LINE: usize = 100;

/// Runs `f` on a named thread with a small stack; a failure to spawn is reported, not fatal.
fn worker(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name(name.to_owned()).stack_size(WORKER_STACK).spawn(f) {
        warn!("sup-demo: cannot start {name} thread: {e}");
    }
}

/// A private handle on fd 1, so bulk writers never hold (or wait for) std's stdout lock.
fn raw_stdout() -> io::Result<File> {
    Ok(File::from(io::stdout().as_fd().try_clone_to_owned()?))
}

fn report_stdout_error(what: &str, e: &io::Error) {
    warn!("sup-demo: {what}: stdout write failed, giving up: {e}");
}

/// Allocates and touches `rate` bytes per second, in 100 ms steps, and never frees them.
pub fn grow_memory(rate: u64) {
    if rate == 0 {
        return;
    }
    worker("grow-memory", move || {
        // SAFETY: sysconf has no preconditions.
        let page =
            usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok().filter(|p| *p > 0).unwrap_or(4096);
        let start = Instant::now();
        let mut kept: Vec<Vec<u8>> = Vec::new();
        for step in 1u64.. {
            sleep_until(start + Duration::from_millis(100 * step));
            // Spread the remainder so each second totals exactly `rate`.
            let want = rate.saturating_mul(step) / 10 - rate.saturating_mul(step - 1) / 10;
            let Ok(want) = usize::try_from(want) else {
                continue;
            };
            // Zeroed allocations are lazily mapped; writing each page makes it resident.
            let mut block = vec![0u8; want];
            for b in block.iter_mut().step_by(page) {
                *b = 1;
            }
            kept.push(std::hint::black_box(block));
        }
    });
}

/// Prints `line <seq> pid=<pid>` `rate` times per second (optionally also to stderr).
pub fn log_rate(rate: u64, count: Option<u64>, also_stderr: bool) {
    if rate == 0 {
        return;
    }
    worker("log-rate", move || {
        let pid = std::process::id();
        let start = Instant::now();
        let mut line = String::with_capacity(64);
        let mut seq: u64 = 0;
        while seq < count.unwrap_or(u64::MAX) {
            // Pace against the start time so sleep overshoot does not lower the rate.
            let due = u64::try_from(u128::from(seq) * 1_000_000_000 / u128::from(rate)).unwrap_or(u64::MAX);
            sleep_until(start + Duration::from_nanos(due));
            line.clear();
            use std::fmt::Write as _;
            let _ = writeln!(line, "line {seq} pid={pid}");
            let mut out = io::stdout().lock();
            if let Err(e) = out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
                report_stdout_error("--log-rate", &e);
                return;
            }
            drop(out);
            if also_stderr {
                let _ = io::stderr().write_all(line.as_bytes());
            }
            seq += 1;
        }
    });
}

/// Writes ~100-byte `flood <seq> xxx…` lines to stdout as fast as the pipe
/// takes them, or at `rate` bytes per second.
pub fn log_flood(count: Option<u64>, rate: Option<u64>) {
    worker("log-flood", move || {
        let mut out = match raw_stdout() {
            Ok(f) => f,
            Err(e) => return report_stdout_error("--log-flood", &e),
        };
        let pad = [b'x'; FLOOD_LINE];
        let mut buf = Vec::with_capacity(CHUNK + FLOOD_LINE);
        let limit = count.unwrap_or(u64::MAX);
        let mut seq: u64 = 0;
        let start = Instant::now();
        let mut written: u64 = 0;
        loop {
            if let Some(rate) = rate.filter(|r| *r > 0) {
                // Pace against the start time so sleep overshoot does not lower the rate.
                let due = u64::try_from(u128::from(written) * 1_000_000_000 / u128::from(rate)).unwrap_or(u64::MAX);
                sleep_until(start + Duration::from_nanos(due));
            }
            buf.clear();
            while buf.len() < CHUNK && seq < limit {
                let before = buf.len();
                let _ = write!(buf, "flood {seq} ");
                let fill = (FLOOD_LINE - 1).saturating_sub(buf.len() - before).max(1);
                buf.extend_from_slice(&pad[..fill]);
                buf.push(b'\n');
                seq += 1;
            }
            if buf.is_empty() {
                return;
            }
            if let Err(e) = out.write_all(&buf) {
                return report_stdout_error("--log-flood", &e);
            }
            written += buf.len() as u64;
        }
    });
}

/// Writes `bytes` of 'x' to stdout with no newline at all.
pub fn endless_line(bytes: u64) {
    worker("endless-line", move || {
        let mut out = match raw_stdout() {
            Ok(f) => f,
            Err(e) => return report_stdout_error("--endless-line", &e),
        };
        let chunk = vec![b'x'; CHUNK];
        let mut left = bytes;
        while left > 0 {
            let n = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
            if let Err(e) = out.write_all(&chunk[..n]) {
                return report_stdout_error("--endless-line", &e);
            }
            left -= n as u64;
        }
    });
}

/// Starts `sleep 100000` in our process group; it must outlive nothing but its group.
pub fn spawn_grandchild() -> Result<Child, Fatal> {
    std::process::Command::new("sleep")
        .arg("100000")
        .spawn()
        .map_err(|e| Fatal::runtime(format!("cannot spawn grandchild `sleep 100000`: {e}")))
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}
