//! One worker process: spawn it, watch it, stop it.
//!
//! Each worker has a small task that `select!`s over the child's exit, its
//! notify socket, its readiness deadline and control messages, and reports to
//! its slot. The slot ([`crate::slot`]) owns the state machine; this task only
//! turns process facts into [`WorkerEvent`]s.

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use sup_config::{AppConfig, ReadyCheck};
use tokio::sync::mpsc;
use tokio::time::sleep_until;

use crate::logs::{new_tail, AppLogs, Stream, Tail};
use crate::nodeipc::{ChannelEvent, NodeChannel};
use crate::notify::{NotifyMsg, NotifySocket};
use crate::reaper::ExitInfo;
use crate::spawner::{SpawnSpec, Spawner};
use crate::spec::{AppSpec, Recorder};

/// What every worker of an app shares.
pub struct WorkerCtx {
    /// The app's name.
    pub app: Arc<str>,
    /// The forking thread.
    pub spawner: Spawner,
    /// The app's log files.
    pub logs: AppLogs,
    /// Folder of the per-worker notify sockets.
    pub notify_dir: PathBuf,
    /// supd's environment, without the variables systemd meant for supd itself.
    pub base_env: Arc<Vec<(String, String)>>,
    /// Where restarts, rollouts and readiness are counted.
    pub recorder: Arc<dyn Recorder>,
    /// Where lifecycle events go.
    pub events: crate::spec::Events,
}

/// Messages from a slot to its worker task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WorkerCtl {
    /// Stop gracefully: stop signal (or Node's disconnect), SIGKILL after `stop_timeout`.
    Stop,
    /// SIGKILL the process group now.
    Kill,
    /// Send this signal to the process group.
    Signal(i32),
    /// Keep probing it (HTTP or TCP readiness only) for this long; a failed probe is reported.
    WatchHealth(Duration),
}

/// Why supd ended a worker itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// It did not signal readiness within `ready_timeout`.
    #[error("not ready within {}", humantime::format_duration(*within))]
    NotReady {
        /// The `ready_timeout` it had.
        within: Duration,
    },
}

/// A fact about a worker, reported to its slot.
#[derive(Debug)]
pub struct WorkerEvent {
    /// Which worker.
    pub id: u64,
    /// What happened.
    pub kind: WorkerEventKind,
}

/// The kinds of [`WorkerEvent`].
#[derive(Debug)]
pub enum WorkerEventKind {
    /// It signalled readiness (or needs none).
    Ready,
    /// It sent `STATUS=`.
    Status(String),
    /// It stopped sending `WATCHDOG=1` in time (or sent `WATCHDOG=trigger`).
    WatchdogMissed,
    /// Its readiness probe failed during its health window.
    Unhealthy(String),
    /// It was reaped. `failure` says why supd killed it, if it did.
    Exited {
        /// How it ended.
        info: ExitInfo,
        /// Why supd killed it, when it did (e.g. not ready in time).
        failure: Option<Failure>,
    },
}

/// The slot's handle on a running worker.
#[derive(Debug)]
pub struct WorkerHandle {
    /// Unique among all workers of this supd.
    pub id: u64,
    /// Main pid, also the process group.
    pub pid: i32,
    /// When it was spawned.
    pub started: tokio::time::Instant,
    /// The spec it runs.
    pub spec: Arc<AppSpec>,
    /// Its last output lines.
    pub tail: Tail,
    ctl: mpsc::UnboundedSender<WorkerCtl>,
}

impl WorkerHandle {
    /// A handle on a worker whose task listens on `ctl` (the slot tests' fake launcher makes these).
    pub(crate) fn new(
        id: u64,
        pid: i32,
        spec: Arc<AppSpec>,
        tail: Tail,
        ctl: mpsc::UnboundedSender<WorkerCtl>,
    ) -> WorkerHandle {
        WorkerHandle { id, pid, started: tokio::time::Instant::now(), spec, tail, ctl }
    }

    /// Asks it to stop: stop signal to its group, SIGKILL after `stop_timeout`.
    pub fn stop(&self) {
        let _ = self.ctl.send(WorkerCtl::Stop);
    }

    /// Kills its whole process group now.
    ///
    /// Through its task, which signals only while the process is not reaped,
    /// so the signal can never reach a process that reused the pid.
    pub fn kill(&self) {
        let _ = self.ctl.send(WorkerCtl::Kill);
    }

    /// Re-checks its readiness probe for `window`, reporting a failure as [`WorkerEventKind::Unhealthy`].
    pub fn watch_health(&self, window: Duration) {
        let _ = self.ctl.send(WorkerCtl::WatchHealth(window));
    }

    /// Sends `sig` to its process group (while it is alive).
    pub fn signal(&self, sig: i32) {
        let _ = self.ctl.send(WorkerCtl::Signal(sig));
    }
}

/// A fresh worker id, unique among all workers of this supd.
pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Spawns a worker for `slot` and starts its task.
pub async fn start(
    ctx: &WorkerCtx,
    spec: Arc<AppSpec>,
    slot: u32,
    fds: &[(RawFd, String)],
    events: mpsc::UnboundedSender<WorkerEvent>,
) -> Result<WorkerHandle, String> {
    let id = next_id();
    let cfg = &spec.cfg;
    let notify_path = ctx.notify_dir.join(format!("{}-{}-{}", cfg.name, slot, id));
    if notify_path.as_os_str().len() >= 108 {
        return Err(format!(
            "notify socket path `{}` is too long for a Unix socket; choose a shorter run_dir",
            notify_path.display()
        ));
    }
    // The inodes `ready = "accepting"` looks for, taken while supd holds the sockets.
    let sockets: Arc<[u64]> = if matches!(cfg.ready, ReadyCheck::Accepting) {
        crate::accepting::inodes(&fds.iter().map(|(fd, _)| *fd).collect::<Vec<_>>())?.into()
    } else {
        Arc::new([])
    };
    let owner = cfg.user.as_ref().map(|u| (u.uid, cfg.group.as_ref().map_or(u.gid, |g| g.gid)));
    let notify = NotifySocket::bind(&notify_path, owner)
        .map_err(|e| format!("cannot create notify socket `{}`: {e}", notify_path.display()))?;

    let env = worker_env(ctx, cfg, slot, notify.path(), fds);
    // Supplementary groups are looked up by the spawner: NSS may block.
    let ids = match &cfg.user {
        Some(user) => Some(crate::spawner::Credentials {
            uid: user.uid,
            gid: cfg.group.as_ref().map_or(user.gid, |g| g.gid),
            user: Some(user.name.clone()),
        }),
        None => cfg.group.as_ref().map(|g| crate::spawner::Credentials {
            uid: nix::unistd::geteuid().as_raw(),
            gid: g.gid,
            user: None,
        }),
    };
    // PM2 apps talk to their supervisor over Node's IPC channel: a socket pair
    // whose child end Node finds through NODE_CHANNEL_FD.
    let ipc = if matches!(cfg.ready, ReadyCheck::Pm2) || cfg.shutdown_with_message || cfg.node_cluster {
        Some(std::os::unix::net::UnixStream::pair().map_err(|e| format!("cannot create the IPC channel: {e}"))?)
    } else {
        None
    };
    // A cluster worker asks for its sockets over the channel; supd answers with
    // its own copies, kept for the worker's life.
    let cluster_fds = if cfg.node_cluster { dup_all(fds)? } else { Vec::new() };
    let mut env = env;
    let mut spawn_fds: Vec<RawFd> = fds.iter().map(|(fd, _)| *fd).collect();
    if let Some((_, theirs)) = &ipc {
        use std::os::fd::AsRawFd;
        // Replaced, not appended: supd itself may run under PM2 during a migration.
        let mut set = |k: &str, v: String| match env.iter_mut().find(|(key, _)| key == k) {
            Some(entry) => entry.1 = v,
            None => env.push((k.to_string(), v)),
        };
        set("NODE_CHANNEL_FD", (3 + spawn_fds.len()).to_string());
        set("NODE_CHANNEL_SERIALIZATION_MODE", "json".into());
        if cfg.node_cluster {
            // Node starts as a cluster worker when this is set (`cluster.worker.id`).
            set("NODE_UNIQUE_ID", id.to_string());
        }
        spawn_fds.push(theirs.as_raw_fd());
    }
    let spawn = SpawnSpec {
        argv: cfg.command.clone(),
        env,
        fds: spawn_fds,
        listen_pid: !fds.is_empty(),
        // A pinned version runs its own release, wherever `current` points now.
        cwd: spec.release.as_ref().map_or_else(|| cfg.cwd.clone(), |r| r.cwd.clone()),
        program: spec.release.as_ref().map(|r| r.program.clone()),
        ids,
    };
    let spawned = ctx.spawner.spawn(spawn).await.map_err(|e| e.to_string())?;
    let ipc = match ipc {
        Some((ours, theirs)) => {
            drop(theirs);
            ours.set_nonblocking(true).ok();
            tokio::net::UnixStream::from_std(ours)
                .ok()
                .map(|s| NodeChannel::new(s, ctx.app.clone(), spawned.pid, cluster_fds, cfg.listen_backlog))
        }
        None => None,
    };
    let tail = new_tail();
    let readers: Vec<_> = [
        ctx.logs.capture(spawned.stdout, Stream::Out, slot, tail.clone()),
        ctx.logs.capture(spawned.stderr, Stream::Err, slot, tail.clone()),
    ]
    .into_iter()
    .flatten()
    .collect();

    let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
    let handle = WorkerHandle::new(id, spawned.pid, spec.clone(), tail, ctl_tx);
    let watch = Watch {
        spawner: ctx.spawner.clone(),
        id,
        pid: spawned.pid,
        ready_check: cfg.ready.clone(),
        shutdown_message: cfg.shutdown_with_message,
        node_cluster: cfg.node_cluster,
        port: cfg.port,
        sockets,
        watchdog: cfg.watchdog,
        ready_timeout: cfg.ready_timeout,
        stop_signal: cfg.stop_signal,
        stop_timeout: cfg.stop_timeout,
        events,
    };
    tokio::spawn(watch.run(spawned.exit, notify, ctl_rx, readers, ipc));
    Ok(handle)
}

/// supd's own copies of the slot's sockets.
fn dup_all(fds: &[(RawFd, String)]) -> Result<Vec<std::os::fd::OwnedFd>, String> {
    fds.iter()
        .map(|(fd, _)| {
            // SAFETY: the slot's sockets stay open while its workers start.
            let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
            borrowed.try_clone_to_owned().map_err(|e| format!("cannot duplicate a listening socket: {e}"))
        })
        .collect()
}

/// supd's environment, then the app's, then the variables of the protocol.
fn worker_env(
    ctx: &WorkerCtx,
    cfg: &AppConfig,
    slot: u32,
    notify: &std::path::Path,
    fds: &[(RawFd, String)],
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = ctx.base_env.as_ref().clone();
    let mut set = |k: &str, v: String| match env.iter_mut().find(|(key, _)| key == k) {
        Some(entry) => entry.1 = v,
        None => env.push((k.to_string(), v)),
    };
    for (k, v) in &cfg.env {
        set(k, v.clone());
    }
    if let Some(user) = &cfg.user {
        set("HOME", user.home.display().to_string());
        set("USER", user.name.clone());
        set("LOGNAME", user.name.clone());
    }
    set("SUP_APP", cfg.name.clone());
    set("SUP_INSTANCE", slot.to_string());
    set("NODE_APP_INSTANCE", slot.to_string());
    if let Some(var) = &cfg.instance_var {
        set(var, slot.to_string());
    }
    set("NOTIFY_SOCKET", notify.display().to_string());
    let port = cfg.port.or_else(|| {
        cfg.listen.iter().find_map(|l| match l {
            sup_config::ListenAddr::Tcp(a) => Some(a.port()),
            sup_config::ListenAddr::Unix(_) => None,
        })
    });
    if let Some(port) = port {
        set("PORT", port.to_string());
    }
    if let Some(w) = cfg.watchdog {
        set("WATCHDOG_USEC", w.as_micros().to_string());
    }
    if !fds.is_empty() {
        set("LISTEN_FDS", fds.len().to_string());
        set("LISTEN_FDNAMES", fds.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>().join(":"));
    }
    env
}

/// The state of a worker's watching task.
struct Watch {
    spawner: Spawner,
    id: u64,
    pid: i32,
    ready_check: ReadyCheck,
    shutdown_message: bool,
    node_cluster: bool,
    port: Option<u16>,
    /// The slot's sockets, by inode, for `ready = "accepting"`.
    sockets: Arc<[u64]>,
    watchdog: Option<Duration>,
    ready_timeout: Duration,
    stop_signal: Signal,
    stop_timeout: Duration,
    events: mpsc::UnboundedSender<WorkerEvent>,
}

impl Watch {
    /// Signals the worker's group, only while the worker is not reaped: the
    /// number can then never belong to another process.
    fn signal(&self, sig: i32) {
        self.spawner.signal_group(self.pid, sig);
    }

    fn send(&self, kind: WorkerEventKind) {
        let _ = self.events.send(WorkerEvent { id: self.id, kind });
    }

    /// Starts a graceful stop; returns when the stop signal is still to be sent.
    fn ask_to_stop(&self, ipc: Option<&mut NodeChannel>) -> Option<tokio::time::Instant> {
        let mut asked = false;
        let mut signal_at = None;
        if let Some(ch) = ipc {
            // PM2's shutdown_with_message: process.on('message') gets 'shutdown'.
            if self.shutdown_message {
                asked = ch.send_shutdown();
            }
            // Node's cluster worker.disconnect(): its servers close and drain first;
            // the signal follows once the channel closes, at the latest halfway to SIGKILL.
            if self.node_cluster && ch.send_disconnect() && !asked {
                asked = true;
                signal_at = Some(tokio::time::Instant::now() + self.stop_timeout / 2);
            }
        }
        if !asked {
            self.signal(self.stop_signal as i32);
        }
        signal_at
    }

    async fn run(
        self,
        mut exit: tokio::sync::oneshot::Receiver<ExitInfo>,
        notify: NotifySocket,
        mut ctl: mpsc::UnboundedReceiver<WorkerCtl>,
        readers: Vec<tokio::task::JoinHandle<()>>,
        mut ipc: Option<NodeChannel>,
    ) {
        let far = || tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
        let mut ready = false;
        let mut ready_deadline = None;
        match self.ready_check {
            ReadyCheck::None => {
                ready = true;
                self.send(WorkerEventKind::Ready);
            }
            _ => ready_deadline = Some(tokio::time::Instant::now() + self.ready_timeout),
        }
        // Probes run in a task of their own so a slow attempt never holds up this loop.
        let mut probe = match (&self.ready_check, self.port) {
            (ReadyCheck::Http { .. } | ReadyCheck::Tcp, Some(port)) => {
                Some(tokio::spawn(crate::probe::until_ready(self.ready_check.clone(), port, self.pid)))
            }
            (ReadyCheck::Accepting, _) => {
                Some(tokio::spawn(crate::accepting::until_accepting(self.pid, self.sockets.clone())))
            }
            _ => None,
        };
        let mut kill_deadline: Option<tokio::time::Instant> = None;
        // Re-probing during a rollout's health window.
        let mut health: Option<tokio::task::JoinHandle<()>> = None;
        // A cluster worker asked to disconnect gets the stop signal at this time.
        let mut signal_deadline: Option<tokio::time::Instant> = None;
        // Counted from the start, like systemd; every WATCHDOG=1 pushes it out.
        let mut watchdog_deadline = self.watchdog.map(|w| tokio::time::Instant::now() + w);
        let mut failure: Option<Failure> = None;
        let mut notify_ok = true;
        let mut ctl_open = true;
        let info = loop {
            tokio::select! {
                r = &mut exit => break r.unwrap_or(ExitInfo::Signal(libc::SIGKILL)),
                _ = async { if let Some(p) = probe.as_mut() { let _ = p.await; } }, if probe.is_some() && !ready => {
                    probe = None;
                    ready = true;
                    ready_deadline = None;
                    self.send(WorkerEventKind::Ready);
                }
                msgs = notify.recv(), if notify_ok => match msgs {
                    Ok(msgs) => for m in msgs {
                        match m {
                            NotifyMsg::Ready if !ready && matches!(self.ready_check, ReadyCheck::Notify) => {
                                ready = true;
                                ready_deadline = None;
                                self.send(WorkerEventKind::Ready);
                            }
                            NotifyMsg::Status(s) => self.send(WorkerEventKind::Status(s)),
                            NotifyMsg::Watchdog => if let (Some(w), Some(dl)) = (self.watchdog, watchdog_deadline.as_mut()) {
                                *dl = tokio::time::Instant::now() + w;
                            },
                            NotifyMsg::WatchdogTrigger if watchdog_deadline.is_some() => {
                                self.send(WorkerEventKind::WatchdogMissed);
                            }
                            NotifyMsg::ExtendTimeout(d) => if let Some(dl) = ready_deadline.as_mut() {
                                *dl = (*dl).max(tokio::time::Instant::now() + d);
                            },
                            _ => {}
                        }
                    },
                    Err(e) => {
                        tracing::warn!(pid = self.pid, "notify socket failed: {e}");
                        notify_ok = false;
                    }
                },
                evs = async { match ipc.as_mut() { Some(c) => c.step().await, None => Vec::new() } }, if ipc.is_some() => {
                    for ev in evs {
                        match ev {
                            ChannelEvent::Ready if !ready && matches!(self.ready_check, ReadyCheck::Pm2) => {
                                ready = true;
                                ready_deadline = None;
                                self.send(WorkerEventKind::Ready);
                            }
                            ChannelEvent::Listening if !ready && matches!(self.ready_check, ReadyCheck::Listening) => {
                                ready = true;
                                ready_deadline = None;
                                self.send(WorkerEventKind::Ready);
                            }
                            ChannelEvent::Ready | ChannelEvent::Listening => {}
                            ChannelEvent::Closed => {
                                ipc = None;
                                // A cluster worker told to disconnect closes the channel once
                                // its servers have no connection left: the signal is safe now,
                                // after a moment to exit by itself, as Node's workers usually do.
                                if let Some(at) = signal_deadline.as_mut() {
                                    *at = (*at).min(tokio::time::Instant::now() + Duration::from_millis(250));
                                }
                            }
                        }
                    }
                }
                _ = sleep_until(ready_deadline.unwrap_or_else(far)), if ready_deadline.is_some() => {
                    ready_deadline = None;
                    failure = Some(Failure::NotReady { within: self.ready_timeout });
                    // It may be serving already (on the slot's socket, beside the
                    // old worker): stop it gracefully so no request it took fails.
                    if kill_deadline.is_none() {
                        signal_deadline = self.ask_to_stop(ipc.as_mut());
                        self.signal(libc::SIGCONT);
                        kill_deadline = Some(tokio::time::Instant::now() + self.stop_timeout);
                    }
                }
                _ = sleep_until(watchdog_deadline.unwrap_or_else(far)), if watchdog_deadline.is_some() && kill_deadline.is_none() => {
                    // Re-armed: if the replacement cannot happen now, it is asked for again.
                    watchdog_deadline = self.watchdog.map(|w| tokio::time::Instant::now() + w);
                    tracing::warn!(pid = self.pid, "no WATCHDOG=1 within {}", humantime::format_duration(self.watchdog.unwrap_or_default()));
                    self.send(WorkerEventKind::WatchdogMissed);
                }
                c = ctl.recv(), if ctl_open => match c {
                    Some(WorkerCtl::Stop) => {
                        if kill_deadline.is_none() {
                            signal_deadline = self.ask_to_stop(ipc.as_mut());
                            // SIGCONT so a stopped (SIGSTOP) worker can act on the signal.
                            self.signal(libc::SIGCONT);
                            kill_deadline = Some(tokio::time::Instant::now() + self.stop_timeout);
                        }
                    }
                    Some(WorkerCtl::Signal(sig)) => self.signal(sig),
                    Some(WorkerCtl::WatchHealth(window)) => {
                        if let (ReadyCheck::Http { .. } | ReadyCheck::Tcp, Some(port)) = (&self.ready_check, self.port) {
                            let events = self.events.clone();
                            let (id, check) = (self.id, self.ready_check.clone());
                            health = Some(tokio::spawn(async move {
                                if let Some(why) = crate::probe::fails_within(&check, port, window).await {
                                    let _ = events.send(WorkerEvent { id, kind: WorkerEventKind::Unhealthy(why) });
                                }
                            }));
                        }
                    }
                    Some(WorkerCtl::Kill) => self.signal(libc::SIGKILL),
                    // The slot dropped its handle without a stop: nothing may outlive it.
                    None => {
                        ctl_open = false;
                        self.signal(libc::SIGKILL);
                    }
                },
                _ = sleep_until(signal_deadline.unwrap_or_else(far)), if signal_deadline.is_some() => {
                    signal_deadline = None;
                    self.signal(self.stop_signal as i32);
                }
                _ = sleep_until(kill_deadline.unwrap_or_else(far)), if kill_deadline.is_some() => {
                    kill_deadline = None;
                    tracing::warn!(pid = self.pid, "did not stop within {}; sending SIGKILL to its process group",
                        humantime::format_duration(self.stop_timeout));
                    self.signal(libc::SIGKILL);
                }
            }
        };
        if let Some(p) = probe {
            p.abort();
        }
        if let Some(h) = health {
            h.abort();
        }
        // Whatever the main process left in its group was killed by the
        // reaper while the zombie still held the group's number.
        if !ready {
            // A failed start is reported with its last output lines: let the
            // readers reach EOF first (bounded, in case an escaped descendant
            // still holds the pipes).
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                for r in readers {
                    let _ = r.await;
                }
            })
            .await;
        }
        self.send(WorkerEventKind::Exited { info, failure });
    }
}
