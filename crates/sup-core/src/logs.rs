//! Capture of worker stdout and stderr.
//!
//! Each worker stream has a reader task that splits lines and stamps them;
//! each app has one writer thread that owns its files, so a slow disk or a
//! flooding app never stalls the event loop or another app. The channel
//! between them is bounded: when the writer falls behind, the reader stops
//! reading and the worker blocks on its own pipe, so supd's memory stays bounded.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

/// Longest line kept whole; longer ones are split (never buffered without bound).
pub const MAX_LINE: usize = 64 * 1024;
/// Bytes read from a pipe at once.
const READ_CHUNK: usize = 64 * 1024;
/// Lines of each worker kept in memory for failure reports.
const TAIL_LINES: usize = 20;
/// Chunks queued per app before readers wait for the writer.
const QUEUE: usize = 64;

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

struct Chunk {
    stream: Stream,
    data: Vec<u8>,
}

/// The log files of one app and the thread that writes them.
#[derive(Clone)]
pub struct AppLogs {
    tx: mpsc::Sender<Chunk>,
    app: Arc<str>,
}

impl AppLogs {
    /// Opens (appending) `<dir>/<app>.out.log` and `<app>.err.log` and starts the writer.
    pub fn open(dir: &Path, app: &str) -> std::io::Result<AppLogs> {
        let out_path = dir.join(format!("{app}.out.log"));
        let err_path = dir.join(format!("{app}.err.log"));
        let out = open_append(&out_path)?;
        let err = open_append(&err_path)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let name = app.to_string();
        std::thread::Builder::new()
            .name(format!("sup-log-{app}"))
            .spawn(move || write_loop(rx, &name, [(out, out_path), (err, err_path)]))?;
        Ok(AppLogs { tx, app: app.into() })
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
        let tx = self.tx.clone();
        let prefix = format!(" {}#{} ", self.app, slot);
        Some(tokio::spawn(read_loop(rx, tx, stream, prefix, tail)))
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

async fn read_loop(mut rx: pipe::Receiver, tx: mpsc::Sender<Chunk>, stream: Stream, prefix: String, tail: Tail) {
    // Capacity, not length: pages are touched only when output arrives, so
    // thousands of quiet workers cost almost nothing.
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut partial: Vec<u8> = Vec::new();
    loop {
        buf.clear();
        let n = match rx.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let stamp = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let mut out = Vec::with_capacity(n + 64);
        let mut rest = &buf[..n];
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            let (line, after) = rest.split_at(pos);
            if partial.is_empty() {
                emit(&mut out, &stamp, &prefix, line, &tail);
            } else {
                partial.extend_from_slice(line);
                emit(&mut out, &stamp, &prefix, &partial, &tail);
                partial.clear();
            }
            rest = &after[1..];
        }
        partial.extend_from_slice(rest);
        while partial.len() >= MAX_LINE {
            let line: Vec<u8> = partial.drain(..MAX_LINE).collect();
            emit(&mut out, &stamp, &prefix, &line, &tail);
        }
        if !out.is_empty() && tx.send(Chunk { stream, data: out }).await.is_err() {
            return;
        }
    }
    if !partial.is_empty() {
        let stamp = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let mut out = Vec::new();
        emit(&mut out, &stamp, &prefix, &partial, &tail);
        let _ = tx.send(Chunk { stream, data: out }).await;
    }
}

fn emit(out: &mut Vec<u8>, stamp: &str, prefix: &str, line: &[u8], tail: &Tail) {
    out.extend_from_slice(stamp.as_bytes());
    out.extend_from_slice(prefix.as_bytes());
    out.extend_from_slice(line);
    out.push(b'\n');
    let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
    if t.len() == TAIL_LINES {
        t.pop_front();
    }
    t.push_back(String::from_utf8_lossy(&line[..line.len().min(512)]).into_owned());
}

fn write_loop(mut rx: mpsc::Receiver<Chunk>, app: &str, mut files: [(File, PathBuf); 2]) {
    let mut failing = false;
    let mut lost: u64 = 0;
    while let Some(chunk) = rx.blocking_recv() {
        let (file, path) = &mut files[match chunk.stream {
            Stream::Out => 0,
            Stream::Err => 1,
        }];
        match file.write_all(&chunk.data) {
            Ok(()) if failing => {
                failing = false;
                tracing::warn!(app, "writing {} again; {lost} bytes of output were lost", path.display());
            }
            Ok(()) => {}
            Err(e) => {
                lost += chunk.data.len() as u64;
                if !failing {
                    failing = true;
                    tracing::warn!(app, "cannot write {}: {e}; dropping output until it works again", path.display());
                }
            }
        }
    }
}

/// A fresh, empty tail.
pub fn new_tail() -> Tail {
    Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)))
}

/// The tail's lines, oldest first.
pub fn tail_lines(tail: &Tail) -> Vec<String> {
    tail.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
}
