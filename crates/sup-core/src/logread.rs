//! Reading an app's logs back for `supctl logs`: the last lines from the
//! files (rotated ones included), merged across instances in time order, then
//! live lines as they are captured.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sup_proto::LogLine;

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

/// Live lines of `logs` that pass `filter`, as NDJSON, until the receiver is dropped.
pub async fn follow(
    mut rx: tokio::sync::broadcast::Receiver<Arc<LogLine>>,
    filter: Filter,
    app: String,
    out: tokio::sync::mpsc::UnboundedSender<bytes::Bytes>,
) {
    loop {
        let line = match rx.recv().await {
            Ok(l) => l,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => Arc::new(LogLine {
                ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                app: app.clone(),
                instance: 0,
                stream: "supd".into(),
                msg: format!("{n} lines skipped: this follower fell behind"),
            }),
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        if line.stream != "supd" && !filter.keeps(&line) {
            continue;
        }
        let mut bytes = serde_json::to_vec(&*line).unwrap_or_default();
        bytes.push(b'\n');
        if out.send(bytes::Bytes::from(bytes)).is_err() {
            return;
        }
    }
}
