//! Reading an app's logs back for `supctl logs`: the last lines from the
//! files (rotated ones included), merged across instances in time order, then
//! live lines as they are captured.

use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use sup_proto::LogLine;
use tokio::sync::broadcast;

use crate::logs::{file_names, parse_line, rotated_files, AppLogs, Stream};

/// Bytes read from the end of each file when looking for the last lines.
const WINDOW: u64 = 4 * 1024 * 1024;

/// Which lines a reader wants.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only `out` or `err`.
    pub stream: Option<String>,
    /// Only this slot.
    pub instance: Option<u32>,
    /// Only lines at or after this RFC 3339 time.
    pub since: Option<String>,
}

impl Filter {
    /// Builds a filter from query parameters; `since` is a duration back from now.
    pub fn new(stream: Option<String>, instance: Option<u32>, since: Option<Duration>) -> Filter {
        let since = since
            .and_then(|d| SystemTime::now().checked_sub(d))
            // Before 1970 cannot be formatted; nothing is older anyway.
            .map(|t| t.max(SystemTime::UNIX_EPOCH))
            .map(|t| humantime::format_rfc3339_millis(t).to_string());
        Filter { stream, instance, since }
    }

    /// Whether `l` passes.
    pub fn keeps(&self, l: &LogLine) -> bool {
        self.stream.as_ref().is_none_or(|s| *s == l.stream)
            && self.instance.is_none_or(|i| i == l.instance)
            && self.since.as_ref().is_none_or(|s| l.ts.as_str() >= s.as_str())
    }
}

/// The last `n` lines passing `filter`, oldest first.
pub fn history(logs: &AppLogs, app: &str, filter: &Filter, n: usize) -> Vec<LogLine> {
    let (dir, cfg) = logs.files();
    let mut all = Vec::new();
    for (stream, name) in file_names(app, &cfg) {
        if let (Some(want), Some(s)) = (&filter.stream, stream) {
            if want != if s == Stream::Out { "out" } else { "err" } {
                continue;
            }
        }
        let current = dir.join(&name);
        // Newest first: the current file, then rotated ones (compressed ones are skipped).
        let mut files = vec![current.clone()];
        files.extend(rotated_files(&current).into_iter().rev().filter(|p| p.extension().is_none_or(|e| e != "gz")));
        let mut found: Vec<LogLine> = Vec::new();
        for f in files {
            let mut lines: Vec<LogLine> = read_tail(&f)
                .lines()
                .filter_map(|l| parse_line(l, app, stream, &cfg))
                .filter(|l| filter.keeps(l))
                .collect();
            let older_than_since = filter.since.as_ref().is_some_and(|s| lines.first().is_some_and(|l| l.ts < *s));
            lines.append(&mut found);
            found = lines;
            if found.len() >= n || older_than_since {
                break;
            }
        }
        all.append(&mut found);
    }
    // Stable: lines of one stream keep their file order within a millisecond.
    all.sort_by(|a, b| a.ts.cmp(&b.ts));
    let skip = all.len().saturating_sub(n);
    all.split_off(skip)
}

fn read_tail(path: &Path) -> String {
    let Ok(mut f) = std::fs::File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(WINDOW);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(WINDOW).read_to_end(&mut buf);
    let mut text = String::from_utf8_lossy(&buf).into_owned();
    if start > 0 {
        // Drop the first, probably partial, line.
        text = text.split_once('\n').map(|(_, r)| r.to_string()).unwrap_or_default();
    }
    text
}

/// Lines a follower may have queued for its client; beyond it new lines are skipped.
const FOLLOW_QUEUE_LINES: usize = 1024;
/// Bytes a follower may have queued for its client (the past lines aside).
const FOLLOW_QUEUE_BYTES: usize = 1024 * 1024;
/// How often a follower that skipped lines retries telling its client, when no new line comes.
const SKIPPED_RETRY: Duration = Duration::from_millis(250);
/// How often a follower looks whether its client hung up, which nothing else
/// tells while the app is quiet (the connection allows half-closing).
const HANGUP_CHECK: Duration = Duration::from_secs(1);

/// Creates a follower's queue, bounded in lines and bytes, so a client that
/// stops reading costs supd at most a megabyte or so.
pub fn follow_queue() -> (FollowSender, FollowReceiver) {
    let (tx, rx) = tokio::sync::mpsc::channel(FOLLOW_QUEUE_LINES);
    let queued = Arc::new(AtomicUsize::new(0));
    (FollowSender { tx, queued: queued.clone() }, FollowReceiver { rx, queued })
}

/// The follower's end of its queue.
pub struct FollowSender {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    queued: Arc<AtomicUsize>,
}

/// Why a line was not queued.
enum Refused {
    /// The client is behind: the queue is full.
    Full,
    /// The client is gone.
    Closed,
}

impl FollowSender {
    /// Queues the past lines, whatever their size: they are read once, before any live line.
    pub fn send_first(&self, b: Bytes) {
        self.queued.fetch_add(b.len(), Ordering::Relaxed);
        if self.tx.try_send(b).is_err() {
            // Not queued after all; the body never sees it.
            self.queued.store(0, Ordering::Relaxed);
        }
    }

    /// Whether another line fits (it may overrun the byte bound by that one line).
    fn has_room(&self) -> bool {
        self.tx.capacity() > 0 && self.queued.load(Ordering::Relaxed) < FOLLOW_QUEUE_BYTES
    }

    fn try_send(&self, line: &LogLine) -> Result<(), Refused> {
        if self.tx.is_closed() {
            return Err(Refused::Closed);
        }
        // Checked before encoding: a flooding app must not cost a lagging follower a JSON encoding per line.
        if !self.has_room() {
            return Err(Refused::Full);
        }
        let mut bytes = serde_json::to_vec(line).unwrap_or_default();
        bytes.push(b'\n');
        let len = bytes.len();
        self.queued.fetch_add(len, Ordering::Relaxed);
        self.tx.try_send(Bytes::from(bytes)).map_err(|e| {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            match e {
                tokio::sync::mpsc::error::TrySendError::Full(_) => Refused::Full,
                tokio::sync::mpsc::error::TrySendError::Closed(_) => Refused::Closed,
            }
        })
    }
}

/// The client's end of a follower's queue.
pub struct FollowReceiver {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    queued: Arc<AtomicUsize>,
}

impl FollowReceiver {
    /// The next queued NDJSON bytes; None once the follower has ended.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let next = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(b)) = &next {
            self.queued.fetch_sub(b.len(), Ordering::Relaxed);
        }
        next
    }
}

/// Whether the other end of the connection `socket` has closed it for good:
/// POLLHUP, which a Unix socket shows only when both directions are shut, so
/// a client that merely shut down its sending side still gets its lines.
fn hung_up(socket: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd { fd: socket.as_raw_fd(), events: 0, revents: 0 };
    // SAFETY: one valid pollfd, a zero timeout; the descriptor is borrowed for the call.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// The note a follower gets in place of `n` lines it missed.
fn skipped_note(app: &str, n: u64) -> LogLine {
    LogLine {
        ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        app: app.to_string(),
        instance: 0,
        stream: "supd".into(),
        msg: format!("{n} lines skipped: this follower fell behind"),
    }
}

/// Live lines of `logs` that pass `filter`, as NDJSON, until the client is
/// gone or the app's output ends. `socket`, the client's connection, tells
/// when it hangs up.
///
/// Never waits for the client: a line that finds the queue full is counted
/// and dropped, and the count reaches the client as one note once there is
/// room again.
pub async fn follow(
    mut rx: broadcast::Receiver<Arc<LogLine>>,
    filter: Filter,
    app: String,
    out: FollowSender,
    socket: Option<OwnedFd>,
) {
    let mut skipped: u64 = 0;
    let mut retry = tokio::time::interval(SKIPPED_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check = tokio::time::interval(HANGUP_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let line = tokio::select! {
            line = rx.recv() => match line {
                Ok(l) => Some(l),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    skipped += n;
                    None
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            () = out.tx.closed() => return,
            _ = retry.tick(), if skipped > 0 => None,
            _ = check.tick(), if socket.is_some() => {
                if socket.as_ref().is_some_and(|s| hung_up(s.as_fd())) {
                    return;
                }
                continue;
            }
        };
        if line.as_ref().is_some_and(|l| !filter.keeps(l)) {
            continue;
        }
        if skipped > 0 {
            match out.try_send(&skipped_note(&app, skipped)) {
                Ok(()) => skipped = 0,
                Err(Refused::Closed) => return,
                Err(Refused::Full) => {}
            }
        }
        let Some(line) = line else { continue };
        match out.try_send(&line) {
            Ok(()) => {}
            Err(Refused::Full) => skipped += 1,
            Err(Refused::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(i: u64) -> Arc<LogLine> {
        Arc::new(LogLine {
            ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            app: "web".into(),
            instance: 0,
            stream: "out".into(),
            msg: format!("line {i} {}", "x".repeat(200)),
        })
    }

    /// Reads what the client has been sent so far.
    async fn drain(rx: &mut FollowReceiver) -> Vec<LogLine> {
        let mut out = Vec::new();
        while !rx.rx.is_empty() {
            let next = std::future::poll_fn(|cx| Poll::Ready(rx.poll_recv(cx))).await;
            // Tokio's cooperative budget runs out now and then: give it back.
            let Poll::Ready(Some(b)) = next else {
                tokio::task::yield_now().await;
                continue;
            };
            for l in b.split(|c| *c == b'\n').filter(|l| !l.is_empty()) {
                out.push(serde_json::from_slice(l).expect("an NDJSON line"));
            }
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_that_is_not_read_stays_bounded_and_is_told_what_it_missed() {
        let (live, rx) = broadcast::channel(64);
        let (tx, mut body) = follow_queue();
        let task = tokio::spawn(follow(rx, Filter::default(), "web".into(), tx, None));
        // Far more than the queue holds, in bursts the broadcast channel keeps up with.
        let total = 20_000u64;
        for i in 0..total {
            live.send(line(i)).expect("a follower listens");
            if i % 32 == 31 {
                tokio::task::yield_now().await;
            }
        }
        tokio::task::yield_now().await;
        let queued = body.queued.load(Ordering::Relaxed);
        assert!(queued <= FOLLOW_QUEUE_BYTES + 1024, "{queued} bytes queued");
        let first = drain(&mut body).await;
        assert!(!first.is_empty() && first.len() <= FOLLOW_QUEUE_LINES, "{} lines queued", first.len());
        assert_eq!(body.queued.load(Ordering::Relaxed), 0, "the count follows the queue");
        // Once the client reads again it learns how many lines it missed, even with no new line.
        tokio::time::sleep(SKIPPED_RETRY * 2).await;
        let note = drain(&mut body).await;
        assert_eq!(note.len(), 1, "{note:?}");
        assert_eq!(note[0].stream, "supd");
        let missed: u64 = note[0].msg.split_whitespace().next().and_then(|n| n.parse().ok()).expect("a count");
        assert_eq!(first.len() as u64 + missed, total, "every line sent or counted: {}", note[0].msg);
        // A client that hangs up ends the follower at once.
        drop(body);
        tokio::time::timeout(Duration::from_secs(1), task).await.expect("follower ended").expect("no panic");
    }

    #[test]
    fn only_a_closed_connection_is_hung_up() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        assert!(!hung_up(ours.as_fd()));
        theirs.shutdown(std::net::Shutdown::Write).expect("shutdown");
        assert!(!hung_up(ours.as_fd()), "half-closed: the client still reads");
        drop(theirs);
        assert!(hung_up(ours.as_fd()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_of_a_quiet_app_ends_when_its_client_hangs_up() {
        let (live, rx) = broadcast::channel(64);
        let (tx, body) = follow_queue();
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        let task = tokio::spawn(follow(rx, Filter::default(), "web".into(), tx, Some(OwnedFd::from(ours))));
        tokio::time::sleep(HANGUP_CHECK * 3).await;
        assert!(!task.is_finished(), "a connected client keeps its follower");
        drop(theirs);
        tokio::time::timeout(HANGUP_CHECK * 3, task).await.expect("follower ended").expect("no panic");
        // The body (kept by hyper until it notices) is not what ended it, nor a line.
        drop((body, live));
    }
}
