//! `supd`: the sup daemon. Runs in the foreground, systemd style.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

mod sdnotify;

use clap::Parser;
use sup_cli::supd::Args;
use sup_core::control::{self, Access};
use sup_core::Supervisor;
use tokio::signal::unix::{signal, SignalKind};

fn main() -> ExitCode {
    // One malloc arena: supd's threads allocate little, and per-thread arenas
    // would hold on to memory that the 10 MiB budget cannot spare.
    // SAFETY: called before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    // Until `run` installs the handlers, a SIGHUP (a reload) or SIGUSR1 (a log
    // reopen) would end supd by their default action; the file supd is about
    // to read is the newest anyway, and no log is open yet, so ignore them.
    // Workers start with every disposition reset (spawner).
    // SAFETY: called before any other thread exists; SIG_IGN needs no handler.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGUSR1, libc::SIG_IGN);
    }
    let args = Args::parse();
    let config = match sup_config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("supd: {e}");
            return ExitCode::from(1);
        }
    };
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| config.supervisor.log_level.clone());
    // The default queue preallocates 128,000 slots (about 4 MiB); 4,096 lines
    // is plenty for a daemon that logs transitions, and lossy keeps a stalled
    // stderr from ever blocking the event loop.
    let sink: Box<dyn std::io::Write + Send> = match &config.supervisor.log_file {
        Some(path) => match std::fs::OpenOptions::new().create(true).append(true).open(path) {
            Ok(f) => Box::new(f),
            Err(e) => {
                eprintln!("supd: cannot open log_file `{}`: {e}", path.display());
                return ExitCode::from(1);
            }
        },
        None => Box::new(std::io::stderr()),
    };
    let (writer, _guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(4096)
        .lossy(true)
        .finish(sink);
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into()))
        .with_writer(writer)
        .with_target(false)
        .with_ansi(config.supervisor.log_file.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    for w in sup_config::warnings(&config) {
        tracing::warn!("{w}");
    }
    // Room for every worker and control connection, so a busy host meets a
    // clear ceiling (max_workers, max_control_connections) before EMFILE.
    let sc = &config.supervisor;
    let workers: u32 = config.apps.iter().map(|a| a.instances).sum();
    let needed = u64::from(workers) * u64::from(sup_config::FDS_PER_WORKER)
        + u64::from(sc.max_control_connections)
        + u64::from(sup_config::FDS_BASE);
    match sup_core::spawner::raise_nofile(u64::from(sc.max_open_files)) {
        Ok(n) if n < needed => tracing::warn!(
            "the open-files limit is {n}, below the {needed} that {workers} workers and {} control connections \
             may need: raise LimitNOFILE= (or ulimit -Hn), or new workers will fail with \"Too many open files\"",
            sc.max_control_connections
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot raise the open-files limit: {e}"),
    }
    // Sockets systemd kept for us while a previous supd was down: marked
    // close-on-exec before any worker is forked, so none inherits them by accident.
    let passed = sup_core::fdstore::init();
    if passed > 0 {
        tracing::info!("systemd passed {passed} listening socket(s) from its fd store");
    }
    if sup_core::fdstore::enabled() {
        tracing::info!("listening sockets are kept in systemd's fd store across supd restarts");
    }
    // Orphaned grandchildren come back to us, so we can reap them and none outlives supd.
    // SAFETY: prctl with these arguments has no memory-safety preconditions.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };

    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("supd: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("supd: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(config: sup_config::Config) -> Result<(), String> {
    // Every handler first: a SIGHUP that systemd (or a user) sends early must
    // never meet the default action, which would end supd.
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    let mut usr1 = signal(SignalKind::user_defined1()).map_err(|e| e.to_string())?;
    let sc = config.supervisor.clone();
    // The socket first: a second supd must fail before touching any listener.
    // The socket file's group: the acting group, else the read-only one, so
    // that with mode 0660 its members can open it.
    let file_group = sc.control_socket_group.as_ref().or(sc.control_socket_read_group.as_ref()).map(|g| g.gid);
    let listener = control::bind(&sc.control_socket, sc.control_socket_mode, file_group).map_err(|e| e.to_string())?;
    let own = OwnSocket::of(&sc.control_socket);
    // Bound before any worker starts, so a taken address fails cleanly.
    let metrics = match sc.metrics {
        Some(addr) => match sup_core::metrics::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                own.remove();
                return Err(e.to_string());
            }
        },
        None => None,
    };
    let interval = sc.monitor_interval;
    let counters = Arc::new(sup_core::metrics::Metrics::new());
    let sup = match Supervisor::start(config, counters.clone()).await {
        Ok(s) => s,
        Err(e) => {
            own.remove();
            return Err(e.to_string());
        }
    };
    // The drivers on top of the core: sampling, scheduled restarts and file watching.
    sup_core::monitor::start(Arc::downgrade(&sup), sup.samples.clone(), interval);
    sup_core::cron::start(Arc::downgrade(&sup));
    // supd's own files never make a watched app roll, even when they sit in its `cwd`.
    let own_files =
        [Some(sc.run_dir.clone()), Some(sc.log_dir.clone()), sc.log_file.clone(), Some(sc.control_socket.clone())];
    sup_core::filewatch::start(Arc::downgrade(&sup), own_files.into_iter().flatten().collect());
    sup_core::fdstore::release_leftovers();
    sup_core::fdstore::started();
    if let Some(l) = metrics {
        tracing::info!(
            "metrics on http://{}/metrics and /health",
            l.local_addr().map(|a| a.to_string()).unwrap_or_default()
        );
        tokio::spawn(sup_core::metrics::serve(l, counters, Arc::downgrade(&sup)));
    }
    let access = Access {
        owner: nix::unistd::geteuid().as_raw(),
        group: sc.control_socket_group.as_ref().map(|g| g.gid),
        read_group: sc.control_socket_read_group.as_ref().map(|g| g.gid),
    };
    let server = tokio::spawn(control::serve(sup.clone(), listener, access, sc.max_control_connections as usize));
    let notifier = Arc::new(sdnotify::Notifier::from_env());
    {
        let (sup, notifier) = (sup.clone(), notifier.clone());
        tokio::spawn(async move {
            let results = sup.started().await;
            let failed: Vec<String> = results.iter().filter(|r| !r.ok).map(|r| r.app.clone()).collect();
            let mut status = sup.summary();
            if !failed.is_empty() {
                status.push_str(&format!("; failed to start: {}", failed.join(", ")));
            }
            tracing::info!("all autostart apps started: {status}");
            notifier.send(&format!("READY=1\nSTATUS={status}"));
            // Keep STATUS= current for `systemctl status`, and say at once why
            // a config apply failed (`systemctl reload` runs one and fails with it).
            let mut failure = sup.apply_failure();
            let mut last = status;
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    changed = failure.changed() => if changed.is_err() { return },
                }
                let now = match &*failure.borrow() {
                    Some(why) => format!("{why}; {}", sup.summary()),
                    None => sup.summary(),
                };
                if now != last {
                    notifier.send(&format!("STATUS={now}"));
                    last = now;
                }
            }
        });
    }
    if let Some(period) = notifier.watchdog {
        let notifier = notifier.clone();
        // Sent from the event loop itself: if it stalls, the pings stop and systemd acts.
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                notifier.send("WATCHDOG=1");
            }
        });
    }
    tracing::info!(socket = %sc.control_socket.display(), "supd {} running {}", env!("CARGO_PKG_VERSION"), sup_proto::count(sup.apps().len(), "app"));
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping all apps"); break }
            _ = int.recv() => { tracing::info!("SIGINT: stopping all apps"); break }
            _ = usr1.recv() => {
                tracing::info!("SIGUSR1: reopening log files");
                sup.reopen_logs();
            }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: applying {}", sup.config_path().display());
                let (sup, notifier) = (sup.clone(), notifier.clone());
                tokio::spawn(async move {
                    notifier.reloading("applying the configuration");
                    apply_config(&sup).await;
                    let status = match &*sup.apply_failure().borrow() {
                        Some(why) => format!("{why}; {}", sup.summary()),
                        None => sup.summary(),
                    };
                    notifier.send(&format!("READY=1\nSTATUS={status}"));
                });
            }
        }
    }
    notifier.send("STOPPING=1\nSTATUS=stopping all apps");
    sup_core::fdstore::keep_on_exit();
    let stopping = Arc::clone(&sup);
    let graceful = tokio::spawn(async move { stopping.shutdown().await });
    tokio::pin!(graceful);
    tokio::select! {
        _ = &mut graceful => {}
        _ = async { tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} } } => {
            tracing::warn!("second signal: killing all workers");
            sup.kill_all();
            let _ = graceful.await;
        }
    }
    server.abort();
    own.remove();
    kill_leftover_children();
    tracing::info!("all workers stopped; exiting");
    Ok(())
}

/// The control socket file this supd bound, removed on exit only while it is
/// still ours: another supd may have replaced it meanwhile.
struct OwnSocket {
    path: PathBuf,
    ino: Option<u64>,
}

impl OwnSocket {
    fn of(path: &std::path::Path) -> OwnSocket {
        use std::os::unix::fs::MetadataExt;
        OwnSocket { path: path.to_path_buf(), ino: std::fs::symlink_metadata(path).ok().map(|m| m.ino()) }
    }

    fn remove(&self) {
        use std::os::unix::fs::MetadataExt;
        let now = std::fs::symlink_metadata(&self.path).ok().map(|m| m.ino());
        if now.is_some() && now == self.ino {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `supctl config apply`, on SIGHUP: progress and outcome go to the log (and
/// a failure to STATUS=, through `Supervisor::apply_failure`).
async fn apply_config(sup: &Supervisor) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let log = tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            tracing::info!("config apply: {ev:?}");
        }
    });
    match sup.apply(None, tx).await {
        Ok(r) => {
            for res in r.results {
                if res.ok {
                    tracing::info!(app = %res.app, "config apply: {}", res.message);
                } else {
                    tracing::warn!(app = %res.app, "config apply failed: {}", res.message);
                }
            }
        }
        Err(e) => tracing::error!("config apply: {e}"),
    }
    let _ = log.await;
}

/// SIGKILLs any descendant that escaped its process group and was re-parented to us.
fn kill_leftover_children() {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return };
    for task in tasks.flatten() {
        let Ok(children) = std::fs::read_to_string(task.path().join("children")) else { continue };
        for pid in children.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            tracing::warn!(pid, "killing leftover descendant");
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}
