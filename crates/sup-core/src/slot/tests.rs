//! The slot's state machine against a fake launcher, under tokio's paused clock.
//!
//! Every worker the slot starts is a [`FakeWorker`]: the test sees each control
//! message the slot sends it and decides when it becomes ready or exits.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sup_proto::{RestartReason, WorkerState};
use tokio::sync::mpsc;

use super::*;
use crate::logs::new_tail;
use crate::reaper::ExitInfo;
use crate::spec::AppSpec;
use crate::worker::{next_id, WorkerCtl, WorkerEvent, WorkerEventKind, WorkerHandle};

const WAIT: Duration = Duration::from_secs(3600);

struct Fake {
    launches: mpsc::UnboundedSender<FakeWorker>,
    next_pid: AtomicI32,
    fail_launch: AtomicBool,
    closed: AtomicUsize,
}

struct FakeWorker {
    id: u64,
    pid: i32,
    version: u64,
    events: mpsc::UnboundedSender<WorkerEvent>,
    ctl: mpsc::UnboundedReceiver<WorkerCtl>,
}

impl SlotEnv for Fake {
    fn app(&self) -> &str {
        "web"
    }

    fn launch(
        &self,
        spec: Arc<AppSpec>,
        _slot: u32,
        events: mpsc::UnboundedSender<WorkerEvent>,
    ) -> EnvFuture<'_, Result<WorkerHandle, String>> {
        Box::pin(async move {
            if self.fail_launch.load(Ordering::SeqCst) {
                return Err("no such program".into());
            }
            let (tx, ctl) = mpsc::unbounded_channel();
            let id = next_id();
            let pid = self.next_pid.fetch_add(1, Ordering::SeqCst);
            let version = spec.version;
            let _ = self.launches.send(FakeWorker { id, pid, version, events, ctl });
            Ok(WorkerHandle::new(id, pid, spec, new_tail(), tx))
        })
    }

    fn close_sockets(&self) {
        self.closed.fetch_add(1, Ordering::SeqCst);
    }

    fn on_ready(&self, _ms: u64) {}

    fn on_restart(&self, _reason: RestartReason) {}
}

impl FakeWorker {
    fn send(&self, kind: WorkerEventKind) {
        self.events.send(WorkerEvent { id: self.id, kind }).unwrap();
    }

    fn ready(&self) {
        self.send(WorkerEventKind::Ready);
    }

    fn exit(&self, info: ExitInfo) {
        self.send(WorkerEventKind::Exited { info, failure: None });
    }

    async fn expect(&mut self, want: WorkerCtl) {
        let got = tokio::time::timeout(WAIT, self.ctl.recv()).await.expect("no control message").expect("closed");
        assert_eq!(got, want, "worker {}", self.pid);
    }
}

struct Rig {
    extra: String,
    slot: SlotHandle,
    env: Arc<Fake>,
    launches: mpsc::UnboundedReceiver<FakeWorker>,
}

fn spec(version: u64, extra: &str) -> Arc<AppSpec> {
    let src = format!("[apps.web]\ncommand = \"x\"\n{extra}\n");
    let cfg = sup_config::parse(&src, std::path::Path::new("/x/sup.toml")).unwrap().apps.remove(0);
    Arc::new(AppSpec { cfg, version, release: None })
}

fn rig(extra: &str) -> Rig {
    let (launches_tx, launches) = mpsc::unbounded_channel();
    let env = Arc::new(Fake {
        launches: launches_tx,
        next_pid: AtomicI32::new(100),
        fail_launch: AtomicBool::new(false),
        closed: AtomicUsize::new(0),
    });
    let slot = spawn_slot(0, env.clone(), spec(1, extra), 0);
    Rig { extra: extra.to_string(), slot, env, launches }
}

impl Rig {
    async fn launched(&mut self) -> FakeWorker {
        tokio::time::timeout(WAIT, self.launches.recv()).await.expect("nothing launched").expect("closed")
    }

    /// Lets the slot task run everything it can, then checks nothing was launched.
    async fn no_launch(&mut self) {
        settle().await;
        assert!(self.launches.try_recv().is_err(), "a worker was launched");
    }

    async fn state(&mut self, want: WorkerState) {
        let mut view = self.slot.view.clone();
        tokio::time::timeout(WAIT, view.wait_for(|v| v.state == want))
            .await
            .unwrap_or_else(|_| panic!("never {want:?}; is {:?}", self.slot.view.borrow().state))
            .unwrap();
    }

    /// Starts the slot and makes its first worker ready.
    async fn running(&mut self) -> FakeWorker {
        let fut = self.slot.start(spec(1, &self.extra), 0);
        let w = self.launched().await;
        w.ready();
        fut.await.unwrap();
        w
    }
}

async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn starts_and_becomes_ready() {
    let mut r = rig("");
    let w = r.running().await;
    let v = r.slot.view.borrow().clone();
    assert_eq!((v.state, v.pid, v.version), (WorkerState::Ready, Some(w.pid), 1));
}

#[tokio::test(start_paused = true)]
async fn a_crash_restarts_and_a_crash_loop_ends_errored() {
    let mut r = rig("max_restarts = 2\nbackoff = { initial = \"1s\" }");
    let w = r.running().await;
    // The first crash restarts at once, the next ones back off.
    w.exit(ExitInfo::Signal(9));
    let w2 = r.launched().await;
    assert_eq!(r.slot.view.borrow().restarts, 1);
    w2.exit(ExitInfo::Code(1));
    r.state(WorkerState::Backoff).await;
    // The paused clock jumps over the delay.
    let w3 = r.launched().await;
    w3.exit(ExitInfo::Code(1));
    r.state(WorkerState::Errored).await;
    r.no_launch().await;
    assert!(r.slot.view.borrow().reason.contains("crashed 3 times"), "{}", r.slot.view.borrow().reason);
}

#[tokio::test(start_paused = true)]
async fn stop_while_starting_cancels_the_start() {
    let mut r = rig("");
    let start = r.slot.start(spec(1, ""), 0);
    let mut w = r.launched().await;
    let stop = r.slot.stop(1, false);
    assert_eq!(start.await.unwrap_err(), SlotError::Cancelled);
    w.expect(WorkerCtl::Stop).await;
    // A READY after the stop leaves the stopping worker in place.
    w.ready();
    r.state(WorkerState::Stopping).await;
    w.exit(ExitInfo::Code(0));
    stop.await;
    r.state(WorkerState::Stopped).await;
    r.no_launch().await;
}

#[tokio::test(start_paused = true)]
async fn stop_during_a_replacement_cancels_it_and_its_rollback() {
    let mut r = rig("");
    let mut old = r.running().await;
    let replace = r.slot.replace(spec(2, ""), RestartReason::Reload, 0, Duration::ZERO);
    let mut new = r.launched().await;
    let stop = r.slot.stop(1, false);
    assert_eq!(replace.await.unwrap_err(), SlotError::Cancelled);
    new.expect(WorkerCtl::Kill).await;
    old.expect(WorkerCtl::Stop).await;
    // The interrupted reload's rollback carries the old fence: refused, nothing starts.
    assert_eq!(
        r.slot.replace(spec(1, ""), RestartReason::Reload, 0, Duration::ZERO).await.unwrap_err(),
        SlotError::Cancelled
    );
    assert_eq!(r.slot.start(spec(1, ""), 0).await.unwrap_err(), SlotError::Cancelled);
    new.exit(ExitInfo::Signal(9));
    old.exit(ExitInfo::Code(0));
    stop.await;
    r.state(WorkerState::Stopped).await;
    r.no_launch().await;
    // A start asked for after the stop runs.
    let start = r.slot.start(spec(1, ""), 1);
    let w = r.launched().await;
    w.ready();
    start.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn stop_during_backoff_never_restarts() {
    let mut r = rig("backoff = { initial = \"10s\" }");
    let w = r.running().await;
    w.exit(ExitInfo::Signal(9));
    r.launched().await.exit(ExitInfo::Signal(9));
    r.state(WorkerState::Backoff).await;
    r.slot.stop(1, false).await;
    r.state(WorkerState::Stopped).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    r.no_launch().await;
}

#[tokio::test(start_paused = true)]
async fn a_dropped_slot_stops_its_worker_and_never_restarts_it() {
    let mut r = rig("restart = \"always\"");
    let mut w = r.running().await;
    let view = r.slot.view.clone();
    drop(r.slot);
    w.expect(WorkerCtl::Stop).await;
    w.exit(ExitInfo::Signal(15));
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(r.launches.try_recv().is_err(), "a dropped slot restarted its worker");
    assert_eq!(view.borrow().state, WorkerState::Stopped);
    // The task ended: the launcher (held only by it) is gone.
    settle().await;
    assert_eq!(Arc::strong_count(&r.env), 1);
}

#[tokio::test(start_paused = true)]
async fn a_replacement_that_exits_fails_and_keeps_the_current_worker() {
    let mut r = rig("");
    let old = r.running().await;
    let replace = r.slot.replace(spec(2, ""), RestartReason::Reload, 0, Duration::ZERO);
    let new = r.launched().await;
    new.exit(ExitInfo::Code(3));
    match replace.await {
        Err(SlotError::Failed(m)) => assert!(m.contains("exited with code 3"), "{m}"),
        other => panic!("{other:?}"),
    }
    let v = r.slot.view.borrow().clone();
    assert_eq!((v.state, v.pid, v.version), (WorkerState::Ready, Some(old.pid), 1));
}

#[tokio::test(start_paused = true)]
async fn replies_wait_for_their_own_old_worker() {
    // A watchdog replacement that ends while a reload's old worker drains must
    // not answer (or drop) the reload's reply.
    let mut r = rig("");
    let mut v1 = r.running().await;
    let reload = r.slot.replace(spec(2, ""), RestartReason::Reload, 0, Duration::ZERO);
    let mut v2 = r.launched().await;
    v2.ready();
    v1.expect(WorkerCtl::Stop).await;
    // v1 drains; the new worker misses its watchdog and is replaced too.
    v2.send(WorkerEventKind::WatchdogMissed);
    let v3 = r.launched().await;
    assert_eq!(v3.version, 2);
    v3.ready();
    v2.expect(WorkerCtl::Stop).await;
    v2.exit(ExitInfo::Code(0));
    settle().await;
    v1.exit(ExitInfo::Code(0));
    let done = tokio::time::timeout(WAIT, reload).await.unwrap().unwrap();
    assert_eq!(done.old_pid, Some(v1.pid));
    assert_eq!(r.slot.view.borrow().pid, Some(v3.pid));
}

#[tokio::test(start_paused = true)]
async fn memory_replacement_is_decided_by_the_slot_and_ordered_with_a_reload() {
    let mut r = rig("backoff = { initial = \"1s\" }");
    let mut v1 = r.running().await;
    // A sample about another pid is ignored.
    r.slot.memory_exceeded(v1.pid + 1000);
    r.no_launch().await;
    r.slot.memory_exceeded(v1.pid);
    let mut m = r.launched().await;
    assert_eq!(m.version, 1);
    // A reload reaching the slot meanwhile waits for the memory replacement.
    let reload = r.slot.replace(spec(2, ""), RestartReason::Reload, 0, Duration::ZERO);
    r.no_launch().await;
    m.ready();
    v1.expect(WorkerCtl::Stop).await;
    let v2 = r.launched().await;
    assert_eq!(v2.version, 2);
    assert_eq!(r.slot.view.borrow().last_restart_reason, Some(RestartReason::Memory));
    v2.ready();
    m.expect(WorkerCtl::Stop).await;
    v1.exit(ExitInfo::Code(0));
    m.exit(ExitInfo::Code(0));
    reload.await.unwrap();
    // Right after, a new memory report backs off instead of replacing again.
    r.slot.memory_exceeded(v2.pid);
    r.no_launch().await;
}

#[tokio::test(start_paused = true)]
async fn a_stop_cancels_a_deferred_reload() {
    let mut r = rig("");
    let v1 = r.running().await;
    r.slot.memory_exceeded(v1.pid);
    let _m = r.launched().await;
    let reload = r.slot.replace(spec(2, ""), RestartReason::Reload, 0, Duration::ZERO);
    let _stop = r.slot.stop(1, false);
    assert_eq!(reload.await.unwrap_err(), SlotError::Cancelled);
    r.no_launch().await;
}

#[tokio::test(start_paused = true)]
async fn the_current_worker_dying_mid_rollout_hands_over_to_the_replacement() {
    let mut r = rig("");
    let old = r.running().await;
    let replace = r.slot.replace(spec(2, ""), RestartReason::Reload, 0, Duration::ZERO);
    let new = r.launched().await;
    old.exit(ExitInfo::Signal(9));
    r.state(WorkerState::Starting).await;
    new.ready();
    replace.await.unwrap();
    let v = r.slot.view.borrow().clone();
    assert_eq!((v.state, v.pid, v.version), (WorkerState::Ready, Some(new.pid), 2));
}

#[tokio::test(start_paused = true)]
async fn a_spawn_failure_backs_off_like_a_crash() {
    let mut r = rig("max_restarts = 1\nbackoff = { initial = \"1s\" }");
    r.env.fail_launch.store(true, Ordering::SeqCst);
    match r.slot.start(spec(1, &r.extra), 0).await {
        Err(SlotError::Spawn(m)) => assert!(m.contains("no such program")),
        other => panic!("{other:?}"),
    }
    r.state(WorkerState::Errored).await;
}

#[tokio::test(start_paused = true)]
async fn signals_go_to_the_current_worker_only() {
    let mut r = rig("");
    assert!(!r.slot.signal(libc::SIGHUP).await);
    let mut w = r.running().await;
    assert!(r.slot.signal(libc::SIGHUP).await);
    w.expect(WorkerCtl::Signal(libc::SIGHUP)).await;
}

#[tokio::test(start_paused = true)]
async fn stop_closes_the_sockets_and_restart_keeps_them() {
    let mut r = rig("");
    let mut w = r.running().await;
    let before = r.env.closed.load(Ordering::SeqCst);
    let stop = r.slot.stop(0, true);
    // Exiting before the stop reached the slot would be a crash, restarted.
    w.expect(WorkerCtl::Stop).await;
    w.exit(ExitInfo::Code(0));
    stop.await;
    assert_eq!(r.env.closed.load(Ordering::SeqCst), before, "restart's stop closed the sockets");
    r.slot.stop(1, false).await;
    assert!(r.env.closed.load(Ordering::SeqCst) > before, "a stop of a stopped slot left its sockets open");
}

#[tokio::test(start_paused = true)]
async fn a_replacement_counts_only_after_its_health_window() {
    let mut r = rig("");
    let mut v1 = r.running().await;
    let t0 = tokio::time::Instant::now();
    let reload = r.slot.replace(spec(2, ""), RestartReason::Reload, 0, Duration::from_secs(5));
    let mut v2 = r.launched().await;
    v2.ready();
    // The old worker drains at once; the new one is re-probed through its window.
    v1.expect(WorkerCtl::Stop).await;
    v2.expect(WorkerCtl::WatchHealth(Duration::from_secs(5))).await;
    v1.exit(ExitInfo::Code(0));
    reload.await.unwrap();
    assert!(t0.elapsed() >= Duration::from_secs(5), "answered before the window passed");
}

#[tokio::test(start_paused = true)]
async fn a_crash_inside_the_window_fails_and_the_slot_goes_back() {
    let mut r = rig("");
    let mut v1 = r.running().await;
    let reload = r.slot.replace(spec(2, ""), RestartReason::Reload, 0, Duration::from_secs(5));
    let v2 = r.launched().await;
    v2.ready();
    v1.expect(WorkerCtl::Stop).await;
    v1.exit(ExitInfo::Code(0));
    tokio::time::sleep(Duration::from_secs(1)).await;
    v2.exit(ExitInfo::Signal(11));
    match reload.await {
        Err(SlotError::Failed(m)) => assert!(m.contains("within min_healthy_time"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Restarted at once, on the version it replaced, not the failed one.
    let back = r.launched().await;
    assert_eq!(back.version, 1);
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_inside_the_window_fails_the_replacement() {
    let mut r = rig("");
    let v1 = r.running().await;
    let reload = r.slot.replace(spec(2, ""), RestartReason::Reload, 0, Duration::from_secs(5));
    let v2 = r.launched().await;
    v2.ready();
    v1.exit(ExitInfo::Code(0));
    v2.send(WorkerEventKind::Unhealthy("GET /health answered 500".into()));
    match reload.await {
        Err(SlotError::Failed(m)) => assert!(m.contains("health probe") && m.contains("500"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_stop_inside_the_window_cancels_the_replacement() {
    let mut r = rig("");
    let v1 = r.running().await;
    let reload = r.slot.replace(spec(2, ""), RestartReason::Reload, 0, Duration::from_secs(5));
    let v2 = r.launched().await;
    v2.ready();
    v1.exit(ExitInfo::Code(0));
    let _stop = r.slot.stop(1, false);
    assert_eq!(reload.await.unwrap_err(), SlotError::Cancelled);
}

#[tokio::test(start_paused = true)]
async fn a_failed_window_goes_back_whatever_the_restart_policy() {
    let mut r = rig("restart = \"never\"");
    let v1 = r.running().await;
    let never = spec(2, "restart = \"never\"");
    let reload = r.slot.replace(never, RestartReason::Reload, 0, Duration::from_secs(5));
    let v2 = r.launched().await;
    v2.ready();
    v1.exit(ExitInfo::Code(0));
    v2.exit(ExitInfo::Code(0));
    assert!(matches!(reload.await, Err(SlotError::Failed(_))));
    // The version that served comes back, though `restart = "never"`.
    let back = r.launched().await;
    assert_eq!(back.version, 1);
}

/// The reason the slot published with its last transition.
fn reason(r: &Rig) -> String {
    r.slot.view.borrow().reason.clone()
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_served_is_restarted_at_once_every_time() {
    // Defaults: backoff.reset_after is 1s; a second quick death would wait 100ms.
    let mut r = rig("");
    let mut w = r.running().await;
    for n in 1..=3u32 {
        // It serves for 10s, then is killed: replaced at once, no backoff, however often.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let t0 = Instant::now();
        w.exit(ExitInfo::Signal(9));
        let next = r.launched().await;
        settle().await;
        assert_eq!(Instant::now(), t0, "served worker {n} was replaced at once");
        assert!(reason(&r).contains("after 10.0s ready; restarting now"), "{}", reason(&r));
        next.ready();
        r.state(WorkerState::Ready).await;
        assert_eq!(r.slot.view.borrow().restarts, n);
        w = next;
    }
}

#[tokio::test(start_paused = true)]
async fn only_quick_deaths_grow_the_delay_and_serving_resets_it() {
    let mut r = rig("backoff = { initial = \"1s\", multiplier = 2, max = \"3s\", reset_after = \"5s\" }");
    let w = r.running().await;
    // Ready for less than reset_after: a quick death. The first restart is at once, then 1s, 2s, 3s (the cap).
    w.exit(ExitInfo::Code(1));
    let mut w = r.launched().await;
    for want in [1, 2, 3, 3] {
        w.ready();
        r.state(WorkerState::Ready).await;
        tokio::time::sleep(Duration::from_secs(4)).await;
        w.exit(ExitInfo::Code(1));
        r.state(WorkerState::Backoff).await;
        assert!(reason(&r).contains(&format!("restarting in {want}s")), "{}", reason(&r));
        assert!(reason(&r).contains("4.0s after ready, under backoff.reset_after (5.0s)"), "{}", reason(&r));
        let t0 = Instant::now();
        w = r.launched().await;
        assert_eq!(Instant::now() - t0, Duration::from_secs(want));
    }
    // One that serves reset_after is restarted at once, and the count starts over.
    w.ready();
    r.state(WorkerState::Ready).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    w.exit(ExitInfo::Code(1));
    let w = r.launched().await;
    assert!(reason(&r).contains("restarting now"), "{}", reason(&r));
    // The next quick death (never ready) starts the count over: 1s again.
    w.exit(ExitInfo::Code(1));
    r.state(WorkerState::Backoff).await;
    assert!(reason(&r).contains("restarting in 1s"), "{}", reason(&r));
}

#[tokio::test(start_paused = true)]
async fn max_restarts_still_ends_a_loop_of_quick_deaths_after_a_served_one() {
    let mut r = rig("max_restarts = 2\nbackoff = { initial = \"1s\" }");
    let w = r.running().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    // Served: no crash loop, does not count for max_restarts.
    w.exit(ExitInfo::Signal(9));
    let mut w = r.launched().await;
    // Never ready: three quick deaths in a row are more than max_restarts = 2.
    for _ in 0..2 {
        w.exit(ExitInfo::Code(1));
        w = r.launched().await;
    }
    w.exit(ExitInfo::Code(1));
    r.state(WorkerState::Errored).await;
    r.no_launch().await;
    assert!(reason(&r).contains("crashed 3 times"), "{}", reason(&r));
}

#[tokio::test(start_paused = true)]
async fn an_operators_restart_counts_as_a_restart() {
    let mut r = rig("");
    let mut w = r.running().await;
    let stop = r.slot.stop(1, true);
    w.expect(WorkerCtl::Stop).await;
    w.exit(ExitInfo::Signal(15));
    stop.await;
    let start = r.slot.start_for(spec(1, ""), 1, "restart requested".into(), Some(RestartReason::Restart));
    let w2 = r.launched().await;
    w2.ready();
    start.await.unwrap();
    let v = r.slot.view.borrow().clone();
    assert_eq!((v.restarts, v.last_restart_reason), (1, Some(RestartReason::Restart)));
    // A plain start of a stopped slot is no restart.
    let stop = r.slot.stop(2, false);
    let mut w2 = w2;
    w2.expect(WorkerCtl::Stop).await;
    w2.exit(ExitInfo::Signal(15));
    stop.await;
    let start = r.slot.start(spec(1, ""), 2);
    r.launched().await.ready();
    start.await.unwrap();
    assert_eq!(r.slot.view.borrow().restarts, 1);
}
