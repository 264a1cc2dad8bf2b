//! An app's version history, kept in `run_dir/history/<app>.json`.
//!
//! Written whole and atomically (a temporary file renamed over the old one),
//! off the event loop, so a crash or an upgrade of supd keeps it. A damaged
//! file is reported, set aside beside the original, and history starts anew:
//! never fatal.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use sup_proto::HistoryEntry;

/// The versions of one app, oldest first, at most `limit`.
#[derive(Clone)]
pub struct History {
    inner: Arc<Mutex<Inner>>,
    writer: Arc<Mutex<()>>,
}

struct Inner {
    path: PathBuf,
    limit: usize,
    entries: Vec<HistoryEntry>,
}

impl History {
    /// Reads the app's history file (blocking; call it off the event loop or at start-up).
    pub fn load(dir: &Path, app: &str, limit: u32) -> History {
        let path = dir.join(format!("{app}.json"));
        let entries = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Vec<HistoryEntry>>(&bytes) {
                Ok(e) => e,
                Err(e) => {
                    let aside = path.with_extension(format!("json.damaged-{}", std::process::id()));
                    let moved = std::fs::rename(&path, &aside).is_ok();
                    tracing::warn!(
                        app,
                        "history file `{}` is damaged ({e}); {}; history starts anew",
                        path.display(),
                        if moved { format!("kept as `{}`", aside.display()) } else { "left in place".into() }
                    );
                    Vec::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::warn!(app, "cannot read history file `{}`: {e}; history starts anew", path.display());
                Vec::new()
            }
        };
        let mut h = Inner { path, limit: limit.max(1) as usize, entries };
        h.trim();
        History { inner: Arc::new(Mutex::new(h)), writer: Arc::default() }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entries, oldest first.
    pub fn entries(&self) -> Vec<HistoryEntry> {
        self.lock().entries.clone()
    }

    /// The highest version recorded (so a restarted supd numbers on from it).
    pub fn last_version(&self) -> u64 {
        self.lock().entries.iter().map(|e| e.version).max().unwrap_or(0)
    }

    /// Adds or replaces (same version and trigger) an entry and writes the file off the event loop.
    pub fn record(&self, entry: HistoryEntry) {
        {
            let mut h = self.lock();
            match h.entries.iter_mut().rev().find(|e| e.version == entry.version && e.trigger == entry.trigger) {
                Some(e) => *e = entry,
                None => h.entries.push(entry),
            }
            h.trim();
        }
        let (inner, writer) = (self.inner.clone(), self.writer.clone());
        tokio::task::spawn_blocking(move || {
            // Writers take turns; each writes the list as it is when its turn
            // comes, so the newest list is what ends up on disk. The entries'
            // lock is held only for the copy: the event loop never waits on a disk.
            let _turn = writer.lock().unwrap_or_else(|e| e.into_inner());
            let (path, entries) = {
                let h = inner.lock().unwrap_or_else(|e| e.into_inner());
                (h.path.clone(), h.entries.clone())
            };
            if let Err(e) = write_atomically(&path, &entries) {
                tracing::warn!("cannot write history file `{}`: {e}", path.display());
            }
        });
    }
}

impl Inner {
    fn trim(&mut self) {
        let excess = self.entries.len().saturating_sub(self.limit);
        self.entries.drain(..excess);
    }
}

fn write_atomically(path: &Path, entries: &[HistoryEntry]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(entries).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(version: u64, result: &str) -> HistoryEntry {
        HistoryEntry {
            version,
            trigger: "reload".into(),
            result: result.into(),
            release: None,
            at: "2026-12-03T16:00:00Z".into(),
            duration_ms: 5,
            uid: Some(0),
            message: String::new(),
            digest: "d".into(),
        }
    }

    #[tokio::test]
    async fn history_survives_a_restart_keeps_its_limit_and_sets_a_damaged_file_aside() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::load(dir.path(), "web", 3);
        for v in 1..=5 {
            h.record(entry(v, "ok"));
        }
        h.record(entry(5, "rolled_back"));
        // Written off the loop: wait for the file to show the last entry.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let again = History::load(dir.path(), "web", 3).entries();
            if again.last().is_some_and(|e| e.result == "rolled_back") {
                assert_eq!(again.iter().map(|e| e.version).collect::<Vec<_>>(), vec![3, 4, 5]);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "history never written");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // Another app's file, so no write of `h` still under way can mend it.
        std::fs::write(dir.path().join("api.json"), b"{ not json").unwrap();
        let fresh = History::load(dir.path(), "api", 3);
        assert!(fresh.entries().is_empty());
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("damaged"))
            .collect();
        assert_eq!(aside.len(), 1, "the damaged file is kept aside");
    }
}
