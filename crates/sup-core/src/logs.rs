//! Capture of worker stdout and stderr, files with rotation, and followers.
//!
//! Each worker stream has a reader task that splits lines (longer ones at
//! `max_line`), stamps them and formats them; each app has one writer thread
//! that owns its files, so a slow disk or a flooding app never stalls the
//! event loop or another app. The channel between them is bounded: when the
//! writer falls behind, readers stop reading and the worker blocks on its own
//! pipe, so supd's memory stays bounded.
//!
//! Rotation renames the file and opens a fresh one between two chunks, and
//! chunks hold whole lines, so nothing is lost, duplicated or split. Write
//! errors (a full disk) drop the chunk, count its lines, warn once per
//! episode, and writing resumes by itself.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use sup_config::{LogConfig, LogFormat, LogTarget};
use sup_proto::LogLine;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::{broadcast, mpsc};

/// Bytes read from a pipe at once.
const READ_CHUNK: usize = 256 * 1024;
/// Lines of each worker kept in memory for failure reports.
const TAIL_LINES: usize = 20;

/// Last lines a worker printed, newest last.
pub type Tail = Arc<Mutex<VecDeque<String>>>;

/// Which of a worker's streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// stdout.
    Out,
    /// stderr.
    Err,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Out => "out",
            Stream::Err => "err",
        }
    }
}

struct Chunk {
    stream: Stream,
    data: Vec<u8>,
    lines: u64,
}

/// The log files of one app and the thread that writes them.
#[derive(Clone)]
pub struct AppLogs {
    tx: mpsc::Sender<Chunk>,
    app: Arc<str>,
    cfg: Arc<LogConfig>,
    live: broadcast::Sender<Arc<LogLine>>,
    lost: Arc<AtomicU64>,
    reopen: Arc<AtomicU64>,
    dir: PathBuf,
}

/// The file names of an app's logs in the log folder, with the stream each holds (None: both).
pub fn file_names(app: &str, cfg: &LogConfig) -> Vec<(Option<Stream>, String)> {
    // The names come from sup-config, which refuses two apps whose names meet.
    let streams: &[Option<Stream>] = if cfg.combined { &[None] } else { &[Some(Stream::Out), Some(Stream::Err)] };
    streams.iter().copied().zip(cfg.file_names(app)).collect()
}

/// Empties the current log files of `app` and removes its rotated ones; returns how many files it touched.
///
/// Blocking file I/O: run it off the event loop.
pub fn flush(dir: &Path, app: &str, cfg: &LogConfig) -> Result<usize, String> {
    let mut n = 0;
    for (_, name) in file_names(app, cfg) {
        let path = dir.join(name);
        // The writer appends (O_APPEND), so it simply continues at the new end.
        if let Ok(f) = OpenOptions::new().write(true).open(&path) {
            f.set_len(0).map_err(|e| format!("cannot empty `{}`: {e}", path.display()))?;
            n += 1;
        }
        for old in rotated_files(&path) {
            match std::fs::remove_file(&old) {
                Ok(()) => n += 1,
                // The janitor may have compressed or pruned it meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot remove `{}`: {e}", old.display())),
            }
        }
    }
    Ok(n)
}

impl AppLogs {
    /// Opens (appending) the app's files and starts its writer thread.
    pub fn open(dir: &Path, app: &str, cfg: &LogConfig) -> std::io::Result<AppLogs> {
        // The queue holds whole reads: the configured buffer in READ_CHUNK units.
        let (tx, rx) = mpsc::channel((cfg.buffer / READ_CHUNK as u64).clamp(1, 4096) as usize);
        let lost = Arc::new(AtomicU64::new(0));
        let reopen = Arc::new(AtomicU64::new(0));
        let mut writer = Writer {
            app: app.to_string(),
            cfg: cfg.clone(),
            sinks: Vec::new(),
            lost: lost.clone(),
            reopen: reopen.clone(),
            epoch: 0,
            failing: false,
            journal: None,
        };
        if cfg.target == LogTarget::Files {
            for (_, name) in file_names(app, cfg) {
                writer.sinks.push(Sink::open(dir.join(name))?);
            }
        }
        std::thread::Builder::new().name(format!("sup-log-{app}")).spawn(move || writer.run(rx))?;
        let (live, _) = broadcast::channel(1024);
        Ok(AppLogs { tx, app: app.into(), cfg: Arc::new(cfg.clone()), live, lost, reopen, dir: dir.to_path_buf() })
    }

    /// Starts the reader task of one worker stream; it ends at EOF.
    pub fn capture(&self, fd: OwnedFd, stream: Stream, slot: u32, tail: Tail) -> Option<tokio::task::JoinHandle<()>> {
        let rx = match pipe::Receiver::from_owned_fd(fd) {
            Ok(rx) => rx,
            Err(e) => {
                tracing::error!(app = %self.app, slot, "cannot read worker output: {e}");
                return None;
            }
        };
        let reader = Reader { logs: self.clone(), stream, slot, tail };
        Some(tokio::spawn(reader.run(rx)))
    }

    /// Lines that could not be written so far.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Closes and reopens the files (after an external logrotate moved them).
    pub fn reopen(&self) {
        self.reopen.fetch_add(1, Ordering::SeqCst);
    }

    /// Live lines from now on.
    pub fn follow(&self) -> broadcast::Receiver<Arc<LogLine>> {
        self.live.subscribe()
    }

    /// The settings and folder, for reading the files back.
    pub fn files(&self) -> (PathBuf, Arc<LogConfig>) {
        (self.dir.clone(), self.cfg.clone())
    }
}

struct Reader {
    logs: AppLogs,
    stream: Stream,
    slot: u32,
    tail: Tail,
}

impl Reader {
    async fn run(self, mut rx: pipe::Receiver) {
        // Capacity, not length: pages are touched only when output arrives, so
        // thousands of quiet workers cost almost nothing.
        let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
        let mut partial: Vec<u8> = Vec::new();
        let max_line = self.logs.cfg.max_line;
        // The part between the time stamp and the message, built once.
        let mut prefix = format!(" {}#{} ", self.logs.app, self.slot);
        if self.logs.cfg.combined {
            prefix.push_str(self.stream.name());
            prefix.push(' ');
        }
        loop {
            buf.clear();
            match rx.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let stamp = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
            let mut out = Vec::with_capacity(buf.len() + buf.len() / 2 + 64);
            let mut lines = 0;
            // Where the chunk's last lines are in `buf`: only they can end up in the tail.
            let mut last: std::collections::VecDeque<std::ops::Range<usize>> = std::collections::VecDeque::new();
            split_lines(&mut partial, &buf, max_line, |line, at| {
                self.emit(&mut out, &stamp, &prefix, line);
                lines += 1;
                match at {
                    Some(start) => {
                        if last.len() == TAIL_LINES {
                            last.pop_front();
                        }
                        last.push_back(start..start + line.len());
                    }
                    // Begun in an earlier read: remembered now, before the later ones.
                    None => self.remember(&[line]),
                }
            });
            let last: Vec<&[u8]> = last.into_iter().map(|r| &buf[r]).collect();
            self.remember(&last);
            if !out.is_empty() && self.logs.tx.send(Chunk { stream: self.stream, data: out, lines }).await.is_err() {
                return;
            }
        }
        if !partial.is_empty() {
            let stamp = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
            let mut out = Vec::new();
            self.emit(&mut out, &stamp, &prefix, &partial);
            self.remember(&[&partial]);
            let _ = self.logs.tx.send(Chunk { stream: self.stream, data: out, lines: 1 }).await;
        }
    }

    /// Appends one formatted line to `out` (the hot path: no allocation for valid UTF-8 text).
    fn emit(&self, out: &mut Vec<u8>, stamp: &str, prefix: &str, line: &[u8]) {
        let cfg = &self.logs.cfg;
        let msg = match std::str::from_utf8(line) {
            Ok(s) => std::borrow::Cow::Borrowed(s),
            Err(_) => String::from_utf8_lossy(line),
        };
        match (cfg.target, cfg.format) {
            (LogTarget::Journald, _) => {
                out.extend_from_slice(self.slot.to_string().as_bytes());
                out.push(b'\t');
                out.extend_from_slice(msg.as_bytes());
                out.push(b'\n');
            }
            (LogTarget::Files, LogFormat::Json) => {
                let v = serde_json::json!({
                    "ts": stamp, "app": &*self.logs.app, "instance": self.slot, "stream": self.stream.name(), "msg": msg,
                });
                out.extend_from_slice(v.to_string().as_bytes());
                out.push(b'\n');
            }
            (LogTarget::Files, LogFormat::Text) => {
                out.extend_from_slice(stamp.as_bytes());
                out.extend_from_slice(prefix.as_bytes());
                out.extend_from_slice(msg.as_bytes());
                out.push(b'\n');
            }
        }
        if self.logs.live.receiver_count() > 0 {
            let _ = self.logs.live.send(Arc::new(LogLine {
                ts: stamp.to_string(),
                app: self.logs.app.to_string(),
                instance: self.slot,
                stream: self.stream.name().to_string(),
                msg: msg.into_owned(),
            }));
        }
    }

    /// Keeps the newest lines for failure reports.
    fn remember(&self, lines: &[&[u8]]) {
        if lines.is_empty() {
            return;
        }
        let mut t = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        for line in lines {
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(String::from_utf8_lossy(&line[..line.len().min(512)]).into_owned());
        }
    }
}

/// Splits `buf`, read after the unfinished line `partial`, into lines of at
/// most `max_line` bytes without their newline, and gives each to `line` with
/// its offset in `buf` (None when it began in an earlier read or was cut at
/// `max_line`). What is left unfinished stays in `partial`.
pub fn split_lines(partial: &mut Vec<u8>, buf: &[u8], max_line: usize, mut line: impl FnMut(&[u8], Option<usize>)) {
    let max_line = max_line.max(1);
    let mut at = 0;
    while let Some(pos) = memchr(b'\n', &buf[at..]) {
        let l = &buf[at..at + pos];
        if partial.is_empty() && l.len() <= max_line {
            line(l, Some(at));
        } else {
            partial.extend_from_slice(l);
            let whole = std::mem::take(partial);
            for piece in whole.chunks(max_line) {
                line(piece, None);
            }
        }
        at += pos + 1;
    }
    partial.extend_from_slice(&buf[at..]);
    // Cut as soon as a piece is full, so an endless line reaches the file without waiting for more.
    while partial.len() >= max_line {
        let l: Vec<u8> = partial.drain(..max_line).collect();
        line(&l, None);
    }
}

/// Position of the first `b` in `s`.
fn memchr(b: u8, s: &[u8]) -> Option<usize> {
    s.iter().position(|&c| c == b)
}

/// One file being written.
struct Sink {
    path: PathBuf,
    file: File,
    size: u64,
    started: SystemTime,
}

impl Sink {
    fn open(path: PathBuf) -> std::io::Result<Sink> {
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let meta = file.metadata()?;
        let started = meta.created().or_else(|_| meta.modified()).unwrap_or_else(|_| SystemTime::now());
        let started = if meta.len() == 0 { SystemTime::now() } else { started };
        Ok(Sink { path, file, size: meta.len(), started })
    }
}

struct Writer {
    app: String,
    cfg: LogConfig,
    sinks: Vec<Sink>,
    lost: Arc<AtomicU64>,
    reopen: Arc<AtomicU64>,
    epoch: u64,
    failing: bool,
    journal: Option<std::os::unix::net::UnixDatagram>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Chunk>) {
        while let Some(chunk) = rx.blocking_recv() {
            if self.cfg.target == LogTarget::Journald {
                self.journal(&chunk);
                continue;
            }
            let epoch = self.reopen.load(Ordering::SeqCst);
            if epoch != self.epoch {
                self.epoch = epoch;
                self.reopen_all();
            }
            let i = if self.cfg.combined || chunk.stream == Stream::Out { 0 } else { 1 };
            let Some(sink) = self.sinks.get_mut(i) else { continue };
            let len = chunk.data.len() as u64;
            let too_big = self.cfg.rotate_size.is_some_and(|max| sink.size > 0 && sink.size + len > max);
            let too_old = self
                .cfg
                .rotate_every
                .is_some_and(|every| sink.size > 0 && sink.started.elapsed().is_ok_and(|age| age >= every));
            if too_big || too_old {
                if let Err(e) = rotate(sink, &self.cfg) {
                    tracing::warn!(app = %self.app, "cannot rotate {}: {e}", sink.path.display());
                }
            }
            let Some(sink) = self.sinks.get_mut(i) else { continue };
            match sink.file.write_all(&chunk.data) {
                Ok(()) => {
                    sink.size += len;
                    if self.failing {
                        self.failing = false;
                        tracing::warn!(
                            app = %self.app,
                            "writing {} again; {} lines lost so far",
                            sink.path.display(),
                            self.lost.load(Ordering::Relaxed)
                        );
                    }
                }
                Err(e) => {
                    // Cut any partial write so the file keeps whole lines.
                    let _ = sink.file.set_len(sink.size);
                    self.lost.fetch_add(chunk.lines, Ordering::Relaxed);
                    if !self.failing {
                        self.failing = true;
                        tracing::warn!(app = %self.app, "cannot write {}: {e}; dropping output until it works again", sink.path.display());
                    }
                }
            }
        }
    }

    fn reopen_all(&mut self) {
        for sink in &mut self.sinks {
            match Sink::open(sink.path.clone()) {
                Ok(fresh) => *sink = fresh,
                Err(e) => tracing::warn!(app = %self.app, "cannot reopen {}: {e}", sink.path.display()),
            }
        }
    }

    /// Native journal protocol: one datagram per line with app and instance fields.
    fn journal(&mut self, chunk: &Chunk) {
        if self.journal.is_none() {
            self.journal = std::os::unix::net::UnixDatagram::unbound().ok();
        }
        let Some(sock) = &self.journal else { return };
        let priority = if chunk.stream == Stream::Err { 3 } else { 6 };
        for line in chunk.data.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let text = String::from_utf8_lossy(line);
            let (slot, msg) = text.split_once('\t').unwrap_or(("0", &text));
            let entry = format!(
                "MESSAGE={}\nPRIORITY={priority}\nSYSLOG_IDENTIFIER={app}\nSUP_APP={app}\nSUP_INSTANCE={slot}\nSUP_STREAM={}\n",
                msg.replace('\n', " "),
                if priority == 3 { "err" } else { "out" },
                app = self.app
            );
            if sock.send_to(entry.as_bytes(), "/run/systemd/journal/socket").is_err() {
                self.lost.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The suffix of a file rotated at `t`: `2026-11-23T120000.123Z` (RFC 3339 without colons).
///
/// [`rotation_key`] parses exactly this shape back; change both together.
fn rotation_stamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string().replace(':', "")
}

/// Renames the file with a sortable time suffix, opens a fresh one, prunes and compresses.
fn rotate(sink: &mut Sink, cfg: &LogConfig) -> std::io::Result<()> {
    let stamp = rotation_stamp(SystemTime::now());
    let mut rotated = sink.path.with_file_name(format!("{}.{stamp}", file_name(&sink.path)));
    let mut n = 1;
    while rotated.exists() {
        rotated = sink.path.with_file_name(format!("{}.{stamp}-{n}", file_name(&sink.path)));
        n += 1;
    }
    sink.file.flush()?;
    std::fs::rename(&sink.path, &rotated)?;
    *sink = Sink::open(sink.path.clone())?;
    janitor().send((rotated, sink.path.clone(), cfg.keep as usize, cfg.compress)).ok();
    Ok(())
}

type Job = (PathBuf, PathBuf, usize, bool);

/// Compression and pruning, off the capture path and one job at a time, so
/// that pruning never races a compression in progress.
fn janitor() -> &'static std::sync::mpsc::Sender<Job> {
    static TX: std::sync::OnceLock<std::sync::mpsc::Sender<Job>> = std::sync::OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new().name("sup-log-janitor".into()).spawn(move || {
            for (rotated, base, keep, compress) in rx {
                if compress {
                    if let Err(e) = gzip(&rotated) {
                        tracing::warn!("cannot compress {}: {e}", rotated.display());
                    }
                }
                prune(&base, keep);
            }
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start the log janitor: {e}; rotated logs are neither compressed nor pruned");
        }
        tx
    })
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn gzip(path: &Path) -> std::io::Result<()> {
    let gz = path.with_file_name(format!("{}.gz", file_name(path)));
    let mut input = File::open(path)?;
    let mut enc = flate2::write::GzEncoder::new(File::create(&gz)?, flate2::Compression::default());
    std::io::copy(&mut input, &mut enc)?;
    enc.finish()?.sync_all()?;
    std::fs::remove_file(path)
}

/// Where a rotated file of `base` sorts: its stamp, its counter (0 for none)
/// and whether it is compressed. None when `name` is not exactly
/// `BASE.STAMP`, `BASE.STAMP-N`, or either with `.gz`, as [`rotate`] and the
/// janitor write them.
///
/// Exact, not a prefix: app names may contain dots, so `web.log.…` may be
/// another app's file (the app `web.log`'s `web.log.log`).
fn rotation_key<'a>(base: &str, name: &'a str) -> Option<(&'a str, u32, bool)> {
    let rest = name.strip_prefix(base)?.strip_prefix('.')?;
    let (rest, gz) = match rest.strip_suffix(".gz") {
        Some(r) => (r, true),
        None => (rest, false),
    };
    // A stamp has a fixed length and ends with `Z`, so a counter is never mistaken for part of it.
    let (stamp, n) = match rest.split_at_checked(STAMP_LEN)? {
        (stamp, "") => (stamp, 0),
        (stamp, counter) => (stamp, rotation_counter(counter)?),
    };
    is_stamp(stamp).then_some((stamp, n, gz))
}

/// The `N` of a `-N` suffix as [`rotate`] writes it: 1 or more, no leading zero.
fn rotation_counter(s: &str) -> Option<u32> {
    let digits = s.strip_prefix('-')?;
    let canonical = digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0');
    digits.parse().ok().filter(|_| canonical)
}

/// Length of a [`rotation_stamp`]: `YYYY-MM-DDTHHMMSS.mmmZ`.
const STAMP_LEN: usize = 22;

/// Whether `s` is a [`rotation_stamp`] of a real instant.
fn is_stamp(s: &str) -> bool {
    const SHAPE: &[u8; STAMP_LEN] = b"dddd-dd-ddTdddddd.dddZ";
    let b = s.as_bytes();
    let shaped = b.len() == STAMP_LEN
        && SHAPE.iter().zip(b).all(|(want, got)| if *want == b'd' { got.is_ascii_digit() } else { want == got });
    // The shape allows month 13 or 25 o'clock; the RFC 3339 parser does not.
    shaped && humantime::parse_rfc3339(&format!("{}:{}:{}", &s[..13], &s[13..15], &s[15..])).is_ok()
}

/// Rotated files of `base`, oldest first (a compressed file right after its plain original).
pub fn rotated_files(base: &Path) -> Vec<PathBuf> {
    let name = file_name(base);
    let Some(dir) = base.parent() else { return Vec::new() };
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<((String, u32, bool), PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().into_string().ok()?;
            let (stamp, n, gz) = rotation_key(&name, &file)?;
            let key = (stamp.to_string(), n, gz);
            Some((key, e.path()))
        })
        .collect();
    // By stamp then counter: `X.T-10` is newer than `X.T-9`, and `X.T.gz` older than `X.T-1`.
    files.sort();
    files.into_iter().map(|(_, p)| p).collect()
}

fn prune(base: &Path, keep: usize) {
    let name = file_name(base);
    let files = rotated_files(base);
    // A file being compressed shows up twice (plain and .gz); count rotations once.
    let rotation = |p: &Path| rotation_key(&name, &file_name(p)).map(|(stamp, n, _)| (stamp.to_string(), n));
    let mut rotations: Vec<(String, u32)> = files.iter().filter_map(|p| rotation(p)).collect();
    rotations.dedup();
    if rotations.len() <= keep {
        return;
    }
    let doomed = &rotations[..rotations.len() - keep];
    for p in files {
        if rotation(&p).is_some_and(|r| doomed.contains(&r)) {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Parses a line of a log file back into its parts.
pub fn parse_line(line: &str, app: &str, stream: Option<Stream>, cfg: &LogConfig) -> Option<LogLine> {
    if cfg.format == LogFormat::Json {
        return serde_json::from_str(line).ok();
    }
    let (ts, rest) = line.split_once(' ')?;
    let (who, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    let instance = who.rsplit_once('#')?.1.parse().ok()?;
    let (stream, msg) = match stream {
        Some(s) => (s.name().to_string(), rest.to_string()),
        None => {
            let (s, m) = rest.split_once(' ').unwrap_or((rest, ""));
            (s.to_string(), m.to_string())
        }
    };
    Some(LogLine { ts: ts.to_string(), app: app.to_string(), instance, stream, msg })
}

/// A fresh, empty tail.
pub fn new_tail() -> Tail {
    Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)))
}

/// The tail's lines, oldest first.
pub fn tail_lines(tail: &Tail) -> Vec<String> {
    tail.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn split_all(reads: &[&[u8]], max: usize) -> (Vec<(String, bool)>, Vec<u8>) {
        let mut partial = Vec::new();
        let mut out = Vec::new();
        for r in reads {
            split_lines(&mut partial, r, max, |l, at| {
                if let Some(at) = at {
                    assert_eq!(&r[at..at + l.len()], l, "the offset points at the line");
                }
                out.push((String::from_utf8_lossy(l).into_owned(), at.is_some()));
            });
        }
        (out, partial)
    }

    #[test]
    fn splits_lines_across_reads_and_cuts_long_ones() {
        let (lines, rest) = split_all(&[b"a\nbb", b"b\n\nccc"], 8);
        let want = [("a", true), ("bbb", false), ("", true)].map(|(l, b)| (l.to_string(), b));
        assert_eq!((lines, rest), (want.to_vec(), b"ccc".to_vec()));
        // Long lines are cut at max_line, whether they arrive in one read or several.
        let (lines, rest) = split_all(&[b"abcdefg\n", b"abc", b"defg", b"\n"], 3);
        let texts: Vec<_> = lines.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(texts, ["abc", "def", "g", "abc", "def", "g"]);
        assert!(rest.is_empty());
        // A full piece goes out at once, without waiting for the rest of its line.
        let (lines, rest) = split_all(&[b"abcd"], 3);
        assert_eq!((lines, rest), (vec![("abc".to_string(), false)], b"d".to_vec()));
    }

    #[test]
    fn text_lines_parse_back() {
        let cfg = LogConfig::default();
        let l = parse_line("2026-11-23T12:00:00.123Z web#3 hello world", "web", Some(Stream::Err), &cfg).unwrap();
        assert_eq!((l.instance, l.stream.as_str(), l.msg.as_str()), (3, "err", "hello world"));
        let combined = LogConfig { combined: true, ..LogConfig::default() };
        let l = parse_line("2026-11-23T12:00:00.123Z web#0 out x y", "web", None, &combined).unwrap();
        assert_eq!((l.stream.as_str(), l.msg.as_str()), ("out", "x y"));
    }

    /// A stamp as `rotate` writes it, `i` milliseconds into a fixed second.
    fn stamp(i: u64) -> String {
        rotation_stamp(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_790_000_000_000 + i))
    }

    /// A fresh folder under the system's temp folder, removed by the caller.
    fn temp_dir(what: &str) -> PathBuf {
        use std::sync::atomic::AtomicUsize;
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sup-{what}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn names(files: &[PathBuf]) -> Vec<String> {
        files.iter().map(|p| file_name(p)).collect()
    }

    #[test]
    fn rotated_names_are_parsed_exactly() {
        let t = stamp(123);
        assert_eq!(t, "2026-09-21T141320.123Z", "the shape rotate writes");
        let yes: &[(String, (u32, bool))] = &[
            (format!("web.log.{t}"), (0, false)),
            (format!("web.log.{t}.gz"), (0, true)),
            (format!("web.log.{t}-1"), (1, false)),
            (format!("web.log.{t}-12.gz"), (12, true)),
        ];
        for (name, (n, gz)) in yes {
            assert_eq!(rotation_key("web.log", name), Some((t.as_str(), *n, *gz)), "{name}");
        }
        let no = [
            // The live and rotated files of the app `web.log`, not of `web`.
            "web.log.log".to_string(),
            format!("web.log.log.{t}"),
            format!("web.log.out.log.{t}.gz"),
            "web.log".to_string(),
            "web.log.".to_string(),
            format!("web.log{t}"),
            format!("web.log.{t}.gz.gz"),
            format!("web.log.{t}-0"),
            format!("web.log.{t}-01"),
            format!("web.log.{t}-"),
            format!("web.log.{t}-+1"),
            format!("web.log.{t}x"),
            format!("web.log.{t}.tmp"),
            "web.log.2026-09-21T141320.123".to_string(),
            "web.log.2026-09-21T14:13:20.123Z".to_string(),
            "web.log.2026-13-21T141320.123Z".to_string(),
            "web.log.2026-09-21T251320.123Z".to_string(),
            "web.log.2026-0a-21T141320.123Z".to_string(),
            "web.log.2026-01".to_string(),
        ];
        for name in &no {
            assert_eq!(rotation_key("web.log", name), None, "{name}");
        }
    }

    #[test]
    fn rotated_files_sort_by_stamp_then_counter() {
        let dir = temp_dir("rotated-order");
        let (a, b) = (stamp(1), stamp(2));
        for n in [
            format!("x.log.{b}"),
            format!("x.log.{a}-10"),
            format!("x.log.{a}.gz"),
            format!("x.log.{a}-9"),
            format!("x.log.{a}-1.gz"),
            format!("x.log.{a}"),
        ] {
            std::fs::write(dir.join(n), "").expect("write");
        }
        let got = names(&rotated_files(&dir.join("x.log")));
        let want = [
            format!("x.log.{a}"),
            format!("x.log.{a}.gz"),
            format!("x.log.{a}-1.gz"),
            format!("x.log.{a}-9"),
            format!("x.log.{a}-10"),
            format!("x.log.{b}"),
        ];
        assert_eq!(got, want);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pruning_keeps_the_newest() {
        let dir = temp_dir("prune");
        let base = dir.join("a.out.log");
        for i in 1..=4 {
            std::fs::write(dir.join(format!("a.out.log.{}", stamp(i))), "x").expect("write");
        }
        // Being compressed: the plain file and its .gz count as one rotation.
        std::fs::write(dir.join(format!("a.out.log.{}", stamp(5))), "x").expect("write");
        std::fs::write(dir.join(format!("a.out.log.{}.gz", stamp(5))), "x").expect("write");
        // Another app's files, which look alike to a prefix match.
        let other = ["a.out.log.log".to_string(), format!("a.out.log.log.{}", stamp(0))];
        for n in &other {
            std::fs::write(dir.join(n), "other").expect("write");
        }
        prune(&base, 2);
        let want = [
            format!("a.out.log.{}", stamp(4)),
            format!("a.out.log.{}", stamp(5)),
            format!("a.out.log.{}.gz", stamp(5)),
        ];
        assert_eq!(names(&rotated_files(&base)), want);
        for n in &other {
            assert_eq!(std::fs::read_to_string(dir.join(n)).expect("left alone"), "other", "{n}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn flushing_an_app_leaves_an_app_named_like_its_files_alone() {
        let t = stamp(7);
        for combined in [true, false] {
            let cfg = LogConfig { combined, ..LogConfig::default() };
            let dir = temp_dir("flush");
            // Both apps' current files, each rotated twice, once compressed.
            let mut files: HashMap<&str, Vec<String>> = HashMap::new();
            for app in ["web", "web.log"] {
                for (_, live) in file_names(app, &cfg) {
                    files.entry(app).or_default().extend([
                        live.clone(),
                        format!("{live}.{t}"),
                        format!("{live}.{t}-1.gz"),
                    ]);
                }
            }
            for (app, names) in &files {
                for n in names {
                    std::fs::write(dir.join(n), format!("{app}\n")).expect("write");
                }
            }
            let flushed = flush(&dir, "web", &cfg).expect("flush");
            let live = file_names("web", &cfg).len();
            assert_eq!(flushed, live * 3, "combined = {combined}");
            for (_, name) in file_names("web", &cfg) {
                assert_eq!(std::fs::read_to_string(dir.join(&name)).expect("kept, emptied"), "", "{name}");
            }
            for n in &files["web.log"] {
                let text = std::fs::read_to_string(dir.join(n)).unwrap_or_default();
                assert_eq!(text, "web.log\n", "`{n}` of `web.log` survives a flush of `web` (combined = {combined})");
            }
            let mut left: Vec<String> = std::fs::read_dir(&dir)
                .expect("dir")
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            left.sort();
            let mut want: Vec<String> = files["web.log"].clone();
            want.extend(file_names("web", &cfg).into_iter().map(|(_, n)| n));
            want.sort();
            assert_eq!(left, want, "combined = {combined}");
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
