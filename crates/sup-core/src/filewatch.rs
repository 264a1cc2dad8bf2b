//! `watch`: rolls an app when its files change (for development).
//!
//! One driver task keeps a watcher per app whose configuration has `watch`,
//! and follows config apply: apps added, removed, re-created or with changed
//! settings get a new watcher within [`RECONCILE`].
//!
//! Each watcher is two halves. A thread owns the `notify` watcher (inotify):
//! it adds a watch per folder, walking the tree itself so that ignored
//! folders (`node_modules`, `.git`) cost no inotify watch, adds folders
//! created later, drops ignored paths and hands the rest to the event loop
//! through a channel, never blocking it. A task on the event loop debounces:
//! once changes pause for `debounce`, it rolls the app through the same
//! engine as `supctl reload` (new worker ready before the old one drains),
//! onto the app's current table, with its release pinned anew as a reload
//! does. Changes during that rollout make at most one follow-up rollout; a
//! rollout that must wait for another operation waits for its end.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use sup_config::{Ignore, WatchConfig};
use tokio::sync::mpsc;

use crate::app::App;
use crate::supervisor::Supervisor;

/// How often the driver compares the apps' `watch` settings with its watchers.
pub const RECONCILE: Duration = Duration::from_secs(1);
/// Folders watched per app at most: each costs an inotify watch (a kernel-wide budget).
const MAX_FOLDERS: usize = 20_000;
/// Changes keep coming for this many debounce periods: roll anyway.
const MAX_WAIT_PERIODS: u32 = 10;

/// What a watcher was started for; a difference starts a new one.
#[derive(Debug, Clone, PartialEq)]
struct Key {
    app: usize,
    cwd: PathBuf,
    watch: WatchConfig,
}

/// A running watcher; dropping it stops both halves.
struct Watched {
    key: Key,
    task: tokio::task::AbortHandle,
}

impl Drop for Watched {
    fn drop(&mut self) {
        // The task owns the receiver: the thread sees it closed and ends.
        self.task.abort();
    }
}

/// Starts the driver; it ends with the supervisor. Paths under `skip` (supd's
/// run and log folders, its config file) are never reasons to roll an app.
pub fn start(sup: Weak<Supervisor>, skip: Vec<PathBuf>) {
    tokio::spawn(async move {
        let mut watched: HashMap<String, Watched> = HashMap::new();
        let mut tick = tokio::time::interval(RECONCILE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(s) = sup.upgrade() else { return };
            let mut skip = skip.clone();
            skip.push(s.config_path());
            let apps = s.apps();
            drop(s);
            watched.retain(|name, _| apps.iter().any(|a| &a.name == name));
            for app in apps {
                let spec = app.spec();
                let want = spec.cfg.watch.clone().map(|watch| Key {
                    app: Arc::as_ptr(&app) as usize,
                    cwd: spec.cfg.cwd.clone(),
                    watch,
                });
                let have = watched.get(&app.name).map(|w| &w.key);
                if have == want.as_ref() {
                    continue;
                }
                if watched.remove(&app.name).is_some() && want.is_none() {
                    tracing::info!(app = %app.name, "watch: off");
                }
                if let Some(key) = want {
                    let task = spawn_watcher(&app, &key, skip.clone());
                    watched.insert(app.name.clone(), Watched { key, task });
                }
            }
        }
    });
}

/// Starts the thread and the debouncing task of one app.
fn spawn_watcher(app: &Arc<App>, key: &Key, skip: Vec<PathBuf>) -> tokio::task::AbortHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let filter = Filter { cwd: key.cwd.clone(), ignore: key.watch.matcher(), skip };
    let (name, paths) = (app.name.clone(), key.watch.paths.clone());
    let spawned = std::thread::Builder::new()
        .name(format!("watch-{}", app.name))
        .spawn(move || watch_files(&name, &paths, &filter, &tx));
    if let Err(e) = spawned {
        tracing::warn!(app = %app.name, "watch: cannot start a thread: {e}");
    }
    let task = tokio::spawn(debounce(Arc::downgrade(app), key.cwd.clone(), key.watch.debounce, rx));
    task.abort_handle()
}

/// Which changed paths count.
struct Filter {
    cwd: PathBuf,
    ignore: Ignore,
    skip: Vec<PathBuf>,
}

impl Filter {
    fn ignored(&self, path: &Path) -> bool {
        if self.skip.iter().any(|s| path.starts_with(s)) {
            return true;
        }
        self.ignore.is_ignored(path.strip_prefix(&self.cwd).unwrap_or(path))
    }
}

/// The watcher thread: watches `paths`, sends every change that counts to
/// `out`, and ends when `out` is closed.
fn watch_files(app: &str, paths: &[PathBuf], filter: &Filter, out: &mpsc::UnboundedSender<PathBuf>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut watcher = match notify::recommended_watcher(tx) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(app, "watch: cannot watch files: {e}");
            return;
        }
    };
    let mut folders = 0;
    for p in paths {
        if !p.exists() {
            tracing::warn!(app, path = %p.display(), "watch: path does not exist; not watched");
            continue;
        }
        folders += add_tree(app, &mut watcher, p, filter, folders).0;
    }
    let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    tracing::info!(app, folders, paths = %shown.join(", "), "watch: watching for changes");
    loop {
        let event = match rx.recv_timeout(RECONCILE) {
            Ok(Ok(event)) => event,
            Ok(Err(e)) => {
                tracing::warn!(app, "watch: {e}");
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if out.is_closed() => return,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        };
        // Reads (a worker loading its code) and bookkeeping events change nothing.
        if matches!(event.kind, EventKind::Access(_) | EventKind::Other) {
            continue;
        }
        for path in event.paths {
            if filter.ignored(&path) {
                continue;
            }
            let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
            let change = if matches!(event.kind, EventKind::Create(_)) && is_dir {
                // An empty new folder changes nothing; files written into it
                // before its watch was added are found by the walk.
                let (n, file) = add_tree(app, &mut watcher, &path, filter, folders);
                folders += n;
                file
            } else {
                Some(path)
            };
            if change.is_some_and(|p| out.send(p).is_err()) {
                return;
            }
        }
    }
}

/// Watches `root` and every folder under it that is not ignored; returns how
/// many, and one file found in them that is not ignored.
fn add_tree(
    app: &str,
    watcher: &mut impl Watcher,
    root: &Path,
    filter: &Filter,
    already: usize,
) -> (usize, Option<PathBuf>) {
    let mut added = 0;
    let mut file = None;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if already + added >= MAX_FOLDERS {
            tracing::warn!(
                app,
                "watch: more than {MAX_FOLDERS} folders; the rest are not watched (narrow `paths` or add `ignore`)"
            );
            break;
        }
        if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
            tracing::warn!(app, path = %dir.display(), "watch: cannot watch: {e} (see fs.inotify.max_user_watches)");
            break;
        }
        added += 1;
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let path = e.path();
            if filter.ignored(&path) {
                continue;
            }
            // Symbolic links are not followed: a link to `/` must not watch the disk.
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            } else if file.is_none() {
                file = Some(path);
            }
        }
    }
    (added, file)
}

/// Changed paths gathered for one rollout.
struct Batch {
    first: PathBuf,
    latest: PathBuf,
    count: usize,
}

impl Batch {
    fn new(p: PathBuf) -> Batch {
        Batch { first: p.clone(), latest: p, count: 1 }
    }

    fn add(&mut self, p: PathBuf) {
        self.latest = p;
        self.count += 1;
    }
}

/// The event-loop half: rolls the app once changes pause, one rollout at a time.
async fn debounce(app: Weak<App>, cwd: PathBuf, period: Duration, mut rx: mpsc::UnboundedReceiver<PathBuf>) {
    // Changes that came during the last rollout: the reason for one more.
    let mut carried: Option<Batch> = None;
    loop {
        let mut batch = match carried.take() {
            Some(b) => b,
            None => match rx.recv().await {
                Some(p) => Batch::new(p),
                None => return,
            },
        };
        // A save of many files or a `git checkout` is one burst: roll once.
        let cap = tokio::time::Instant::now() + period * MAX_WAIT_PERIODS;
        loop {
            tokio::select! {
                p = rx.recv() => match p {
                    Some(p) => batch.add(p),
                    None => return,
                },
                _ = tokio::time::sleep(period) => break,
            }
            if tokio::time::Instant::now() >= cap {
                break;
            }
        }
        let Some(app) = app.upgrade() else { return };
        let shown = |p: &Path| p.strip_prefix(&cwd).unwrap_or(p).display().to_string();
        let file = shown(&batch.first);
        if !app.is_running() {
            tracing::info!(app = %app.name, file, "watch: a file changed, but no worker runs: nothing to reload");
            continue;
        }
        if batch.count == 1 {
            tracing::info!(app = %app.name, file, "watch: reloading after a change");
        } else {
            let (changes, latest) = (batch.count, shown(&batch.latest));
            tracing::info!(app = %app.name, file, changes, latest, "watch: reloading after a change");
        }
        // Another operation in progress (an operator's reload) runs first, then this one.
        let reload = app.watch_reload();
        tokio::pin!(reload);
        let result = loop {
            tokio::select! {
                r = &mut reload => break r,
                p = rx.recv() => match (p, &mut carried) {
                    (Some(p), Some(b)) => b.add(p),
                    (Some(p), None) => carried = Some(Batch::new(p)),
                    // The watcher was replaced; the rollout goes on in its own task.
                    (None, _) => return,
                },
            }
        };
        if result.ok {
            tracing::info!(app = %app.name, file, "watch: reload done: {}", result.message);
        } else {
            tracing::warn!(app = %app.name, file, "watch: reload failed: {}", result.message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_skips_supd_folders_and_ignored_names() {
        let watch = WatchConfig { paths: vec![], ignore: vec!["tmp".into()], debounce: Duration::from_millis(10) };
        let f = Filter {
            cwd: PathBuf::from("/srv/app"),
            ignore: watch.matcher(),
            skip: vec![PathBuf::from("/srv/app/run"), PathBuf::from("/srv/app/supervisor.toml")],
        };
        for p in ["/srv/app/run/history/web.jsonl", "/srv/app/supervisor.toml", "/srv/app/tmp/x", "/srv/app/.git/HEAD"]
        {
            assert!(f.ignored(Path::new(p)), "{p}");
        }
        for p in ["/srv/app/server.js", "/srv/app/runner.js", "/srv/app/src/run/x.js"] {
            assert!(!f.ignored(Path::new(p)), "{p}");
        }
    }
}
