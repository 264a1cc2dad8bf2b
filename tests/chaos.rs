//! Chaos soak (issue #9): a real supd with two apps under continuous load,
//! driven by a seeded random schedule of `kill -9`, SIGSTOP/SIGCONT, reloads,
//! scaling, valid and invalid config applies and log floods, while its workers
//! also outgrow their memory limit and get replaced in the background.
//!
//! The short run is part of `cargo test --workspace` (`SUP_CHAOS_SECS`,
//! default 45 s). The 30-minute soak, after
//! `cargo build --release --workspace --bins`:
//!
//! ```sh
//! SUP_CHAOS_SECS=1800 cargo test --release --test chaos -- --nocapture
//! ```
//!
//! The seed is printed at the start and in every failure; `SUP_CHAOS_SEED=N`
//! replays the same schedule (the same choices, not the same timings).
//! `SUP_CHAOS_VERBOSE=1` prints each action as it starts, and
//! `SUP_TEST_VERBOSE=1` supd's log as it comes.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::process::Output;
use std::time::{Duration, Instant};

use sup::*;

/// How long a process in supd's tree may belong to no current slot (an old
/// worker draining, a replacement starting) before it counts as an orphan:
/// `stop_timeout` plus the longest pause plus slack for a loaded machine.
const LINGER: Duration = Duration::from_secs(20);
/// How long a zombie child of supd may wait to be reaped.
const REAP: Duration = Duration::from_secs(10);
const WEB_MIN: u32 = 2;
const WEB_MAX: u32 = 6;
const WEB_START: u32 = 4;
const LOGGER_KEEP: u32 = 3;
const CLIENTS_PER_MODE: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    Kill,
    Pause,
    Reload,
    Scale,
    Apply,
    BadApply,
    Flood,
}

impl Action {
    const WEIGHTS: [(Action, u64); 7] = [
        (Action::Kill, 3),
        (Action::Pause, 3),
        (Action::Reload, 2),
        (Action::Scale, 2),
        (Action::Apply, 1),
        (Action::BadApply, 1),
        (Action::Flood, 1),
    ];

    fn pick(rng: &mut Rng) -> Action {
        let total: u64 = Action::WEIGHTS.iter().map(|(_, w)| w).sum();
        let mut r = rng.below(total);
        for (a, w) in Action::WEIGHTS {
            if r < w {
                return a;
            }
            r -= w;
        }
        Action::Kill
    }
}

/// One line of `/proc/PID/stat`, the fields we need.
#[derive(Debug, Clone, Copy)]
struct Proc {
    ppid: u32,
    state: char,
    /// Start time in clock ticks since boot: with pid reuse (pid_max may be
    /// 32768), a pid alone does not name a process for 30 minutes.
    start: u64,
}

fn proc_info(pid: u32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(Proc {
        state: rest.first()?.chars().next()?,
        ppid: rest.get(1)?.parse().ok()?,
        start: rest.get(19)?.parse().ok()?,
    })
}

fn procs() -> HashMap<u32, Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return HashMap::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, proc_info(pid)?)))
        .collect()
}

/// Still the same process, and not a zombie.
fn running(pid: u32, start: u64) -> bool {
    proc_info(pid).is_some_and(|p| p.start == start && p.state != 'Z' && p.state != 'X')
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " ").trim().to_string())
        .unwrap_or_default()
}

/// Every process below `root`, found by walking parent links.
fn descendants(root: u32, table: &HashMap<u32, Proc>) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (pid, p) in table {
        children.entry(p.ppid).or_default().push(*pid);
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for c in children.get(&p).into_iter().flatten() {
            out.push(*c);
            todo.push(*c);
        }
    }
    out
}

/// Where each of `pid`'s file descriptors points (`socket:[…]`, `pipe:[…]`, a path).
fn fd_targets(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    let mut v: Vec<String> = dir
        .filter_map(|e| {
            let e = e.ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some(format!("{} -> {}", e.file_name().to_string_lossy(), target.display()))
        })
        .collect();
    v.sort();
    v
}

/// The descriptors of `after` that were not in `before`, by kind of target.
fn fd_diff(before: &[String], after: &[String]) -> String {
    let kind = |s: &String| {
        let t = s.split(" -> ").nth(1).unwrap_or("");
        t.split(':').next().unwrap_or(t).to_string()
    };
    let mut count: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for f in before {
        count.entry(kind(f)).or_default().0 += 1;
    }
    for f in after {
        count.entry(kind(f)).or_default().1 += 1;
    }
    let new: Vec<&String> = after.iter().filter(|f| !before.contains(f)).collect();
    format!("by kind (before, after): {count:?}\nnew descriptors: {new:?}")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

/// The desired state the config file describes.
struct Desired {
    web_instances: u32,
    web_gen: u64,
    logger_gen: u64,
    /// Off for the final quiet phase, so no replacement runs while fds are counted.
    grow: bool,
}

/// A [`Load`] that stops its clients even when the test panics.
struct LoadGuard(Option<Load>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        if let Some(l) = self.0.take() {
            l.finish();
        }
    }
}

struct Chaos {
    seed: u64,
    rng: Rng,
    d: Option<Daemon>,
    supd: u32,
    load: LoadGuard,
    web_port: u16,
    logger_port: u16,
    desired: Desired,
    web_version: u64,
    logger_version: u64,
    /// Every process that ever ran in supd's tree, as (pid, start time).
    seen: HashSet<(u32, u64)>,
    /// Processes of supd's tree that belong to no current slot, since when.
    unowned: HashMap<(u32, u64), Instant>,
    counts: BTreeMap<String, u64>,
    web_kills: u64,
    history: VecDeque<String>,
    step: u64,
    /// The longest action with its checks: a stall shows here first.
    slowest: (Duration, String),
    /// The slowest `supctl status`, and how many took over a second.
    status_max: std::cell::Cell<Duration>,
    slow_status: std::cell::Cell<u64>,
    /// When supd's log was last searched for a panic.
    log_checked: Instant,
}

impl Chaos {
    fn start(seed: u64) -> Chaos {
        let (web_port, logger_port) = (free_port(), free_port());
        let desired = Desired { web_instances: WEB_START, web_gen: 0, logger_gen: 0, grow: true };
        let dir = tempfile::Builder::new().prefix("sup-chaos").tempdir().expect("temp dir");
        let config = dir.path().join("supervisor.toml");
        std::fs::write(&config, config_text(web_port, logger_port, &desired, None)).expect("write config");
        let socket = dir.path().join("run/control.sock");
        let d = Daemon::start_with(dir, config, socket);
        let supd = d.pid();
        Chaos {
            seed,
            rng: Rng::new(seed),
            d: Some(d),
            supd,
            load: LoadGuard(None),
            web_port,
            logger_port,
            desired,
            web_version: 1,
            logger_version: 1,
            seen: HashSet::new(),
            unowned: HashMap::new(),
            counts: BTreeMap::new(),
            web_kills: 0,
            history: VecDeque::new(),
            step: 0,
            slowest: (Duration::ZERO, String::new()),
            status_max: std::cell::Cell::new(Duration::ZERO),
            slow_status: std::cell::Cell::new(0),
            log_checked: Instant::now(),
        }
    }

    /// `supctl status --json` for one app, timed: a slow answer is a stalled supd.
    fn instances(&self, app: &str) -> Vec<InstanceStatus> {
        let t = Instant::now();
        let i = self.d().instances(app);
        let took = t.elapsed();
        if took > Duration::from_secs(1) {
            let at = humantime::format_rfc3339_millis(std::time::SystemTime::now() - took);
            eprintln!("chaos: supctl status took {took:.1?} (asked at {at})");
            self.slow_status.set(self.slow_status.get() + 1);
        }
        if took > self.status_max.get() {
            self.status_max.set(took);
        }
        i
    }

    /// Like [`Daemon::wait_ready`], through the timed [`Chaos::instances`].
    fn wait_ready(&self, app: &str, n: usize) -> Vec<InstanceStatus> {
        wait_until(&format!("{n} ready instances of `{app}`"), DEADLINE, || {
            let i = self.instances(app);
            (i.len() == n && i.iter().all(|i| i.state == WorkerState::Ready)).then_some(i)
        })
    }

    fn d(&self) -> &Daemon {
        self.d.as_ref().expect("supd runs")
    }

    fn load(&self) -> &Load {
        self.load.0.as_ref().expect("load runs")
    }

    fn count(&mut self, what: &str) {
        *self.counts.entry(what.to_string()).or_default() += 1;
    }

    fn note(&mut self, what: String) {
        if std::env::var_os("SUP_CHAOS_VERBOSE").is_some() {
            let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
            eprintln!("chaos: {now} #{} {what}", self.step);
        }
        self.history.push_back(format!("#{} {what}", self.step));
        if self.history.len() > 15 {
            self.history.pop_front();
        }
    }

    fn write_config(&self, broken: Option<&str>) {
        let body = config_text(self.web_port, self.logger_port, &self.desired, broken);
        std::fs::write(&self.d().config, body).expect("write config");
    }

    /// The whole soak: warm up, the schedule, the quiet end, the checks.
    fn run(&mut self, duration: Duration) {
        self.wait_settled();
        self.wait_sampled();
        let (fds0, rss0) = (self.supd_fds(), self.supd_rss());
        let fd_list0 = fd_targets(self.supd);
        self.load.0 = Some(Load::start(self.web_port, &[Mode::KeepAlive, Mode::NewConnection], CLIENTS_PER_MODE));
        self.load().wait_for(100);
        let t0 = Instant::now();
        while t0.elapsed() < duration {
            self.step += 1;
            let action = Action::pick(&mut self.rng);
            let began = Instant::now();
            match action {
                Action::Kill => self.kill(),
                Action::Pause => self.pause(),
                Action::Reload => self.reload(),
                Action::Scale => self.scale(),
                Action::Apply => self.apply(),
                Action::BadApply => self.bad_apply(),
                Action::Flood => self.flood(),
            }
            self.check();
            self.load().wait_for(5);
            let took = began.elapsed();
            if took > self.slowest.0 {
                self.slowest = (took, self.history.back().cloned().unwrap_or_default());
            }
            let pace = self.rng.range(50, 400);
            std::thread::sleep(Duration::from_millis(pace));
        }
        let chaos_time = t0.elapsed();

        // Quiet end: back to the first size, no memory growth, then nothing may be left over.
        self.desired.grow = false;
        self.desired.web_instances = WEB_START;
        self.step += 1;
        self.write_config(None);
        let out = self.d().supctl(&["config", "apply"]);
        assert!(out.status.success(), "final config apply failed: {}", text(&out));
        self.web_version += 1;
        self.note("final apply: 4 instances, no growth".into());
        self.check();
        self.wait_settled();
        self.wait_sampled();
        let start = Instant::now();
        let fds1 = loop {
            let n = self.supd_fds();
            if n <= fds0 + 2 {
                break n;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "supd holds {n} open files, {fds0} at the start of the same apps and sizes:\n{}",
                fd_diff(&fd_list0, &fd_targets(self.supd))
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let rss1 = self.supd_rss();
        self.load().wait_for(100);
        let stats = self.load.0.take().expect("load").finish();
        let status = self.d().status();
        for app in &status.apps {
            assert_eq!(app.log_lines_lost, 0, "`{}` lost log lines", app.name);
        }
        let logs = self.d().path("logs");
        let files = wait_until("logger's rotated files within `keep`", DEADLINE, || {
            let n = std::fs::read_dir(&logs)
                .map(|r| {
                    r.filter_map(|e| e.ok())
                        .filter(|e| e.file_name().to_string_lossy().starts_with("logger.out.log"))
                        .count()
                })
                .unwrap_or(0);
            (n as u32 <= LOGGER_KEEP + 1).then_some(n)
        });
        let log = self.d().log();
        let memory = log.matches("replacement started (memory)").count();
        let watchdog = log.matches("no WATCHDOG=1 within").count();
        assert!(!log.contains("panicked"), "supd panicked");

        // Graceful stop: nothing that ever ran under supd may survive it.
        let d = self.d.take().expect("supd");
        let st = d.stop();
        assert!(st.success(), "supd exited with {}", describe(st));
        let survivors = wait_until("every worker gone after supd's exit", DEADLINE, || {
            let s: Vec<String> = self
                .seen
                .iter()
                .filter(|(pid, start)| running(*pid, *start))
                .map(|(pid, _)| format!("{pid} ({})", cmdline(*pid)))
                .collect();
            s.is_empty().then_some(s)
        });
        assert!(survivors.is_empty());

        let kills = self.counts.get("kill").copied().unwrap_or(0);
        let clients_total = (2 * CLIENTS_PER_MODE) as u64;
        eprintln!(
            "chaos: seed={} ran {:.0?} of chaos, {} actions: {:?}",
            self.seed,
            chaos_time,
            self.step - 1,
            self.counts
        );
        eprintln!(
            "chaos: requests ok={} failed={} unanswered_retried={} kills={} (web {}); memory replacements={memory} watchdog={watchdog}; workers seen={} answering pids={}",
            stats.ok,
            stats.failed,
            stats.unanswered_retried,
            kills,
            self.web_kills,
            self.seen.len(),
            stats.by_pid.len()
        );
        eprintln!(
            "chaos: supd fds {fds0} -> {fds1}, rss {} KiB -> {} KiB; logger files {files}",
            rss0 / 1024,
            rss1 / 1024
        );
        eprintln!(
            "chaos: slowest action {:.1?}: {}; slowest status {:.1?}, {} over 1s",
            self.slowest.0,
            self.slowest.1,
            self.status_max.get(),
            self.slow_status.get()
        );
        if !stats.errors.is_empty() {
            eprintln!("chaos: first failures: {:?}", stats.errors);
        }
        // A killed worker fails at most the requests its clients had in
        // flight, and every client has one at a time.
        let lost = stats.failed + stats.unanswered_retried;
        assert!(
            lost <= self.web_kills * clients_total,
            "{lost} failed or retried requests > {} web kills x {clients_total} clients: {:?}",
            self.web_kills,
            stats.errors
        );
        if self.web_kills == 0 {
            assert_eq!(stats.failed, 0, "no worker was killed, yet requests failed: {:?}", stats.errors);
        }
        assert!(stats.ok > 100, "the load ran: {stats:?}");
        assert!(rss1 < 128 << 20, "supd's memory grew to {} KiB", rss1 / 1024);
    }

    /// A ready worker of a random app and slot, still supd's child: (app, slot, pid, start).
    fn pick_worker(&mut self) -> Option<(&'static str, u32, u32, u64)> {
        let app = if self.rng.below(5) == 0 { "logger" } else { "web" };
        let instances = self.instances(app);
        let i = instances.get(self.rng.below(instances.len() as u64) as usize)?;
        let pid = i.pid?;
        let p = proc_info(pid)?;
        (i.state == WorkerState::Ready && p.ppid == self.supd && p.state != 'Z').then_some((app, i.slot, pid, p.start))
    }

    fn kill(&mut self) {
        let Some((app, slot, pid, start)) = self.pick_worker() else {
            self.count("kill skipped");
            return;
        };
        self.note(format!("kill -9 {app}#{slot} pid {pid}"));
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        self.count("kill");
        if app == "web" {
            self.web_kills += 1;
        }
        wait_until(&format!("{app}#{slot} replaced after kill -9 of {pid}"), DEADLINE, || {
            let i = self.instances(app);
            let s = i.iter().find(|i| i.slot == slot)?;
            (s.pid != Some(pid) && s.state == WorkerState::Ready && !running(pid, start)).then_some(())
        });
    }

    fn pause(&mut self) {
        let Some((app, slot, pid, start)) = self.pick_worker() else {
            self.count("pause skipped");
            return;
        };
        let ms = self.rng.range(200, 1500);
        self.note(format!("SIGSTOP {app}#{slot} pid {pid} for {ms} ms"));
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        self.count("pause");
        // supd may stop (and so SIGCONT) it meanwhile: only wait while it is ours.
        wait_until(&format!("{pid} stopped"), DEADLINE, || {
            proc_info(pid).filter(|p| p.start == start && p.state != 'T' && p.state != 'Z').map_or(Some(()), |_| None)
        });
        // The pause itself is the fault: a deliberate sleep.
        std::thread::sleep(Duration::from_millis(ms));
        if running(pid, start) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        }
        wait_until(&format!("{pid} running again"), DEADLINE, || {
            proc_info(pid).filter(|p| p.start == start && p.state == 'T').map_or(Some(()), |_| None)
        });
    }

    fn reload(&mut self) {
        let n = self.desired.web_instances;
        self.note(format!("reload web ({n} slots)"));
        let out = self.d().supctl(&["reload", "web", "--wait"]);
        let t = text(&out);
        assert!(out.status.success(), "reload failed: {t}");
        self.web_version += 1;
        assert!(t.contains(&format!("rolled {n}/{n} instances to version {}", self.web_version)), "{t}");
        self.count("reload");
    }

    fn scale(&mut self) {
        let from = self.desired.web_instances;
        let mut to = self.rng.range(u64::from(WEB_MIN), u64::from(WEB_MAX) - 1) as u32;
        if to >= from {
            to += 1;
        }
        self.note(format!("scale web {from} -> {to}"));
        let out = self.d().supctl(&["scale", "web", &to.to_string(), "--wait"]);
        let t = text(&out);
        assert!(out.status.success(), "scale failed: {t}");
        assert!(t.contains(&format!("scaled from {from} to {to}")), "{t}");
        self.desired.web_instances = to;
        // As a deploy would, so a later `config apply` keeps this size.
        self.write_config(None);
        self.count("scale");
    }

    fn apply(&mut self) {
        let variant = self.rng.below(4);
        let mut what = Vec::new();
        if variant == 0 || variant == 2 || variant == 3 {
            self.desired.web_gen += 1;
            self.web_version += 1;
            what.push("web env");
        }
        if variant == 1 || variant == 2 {
            self.desired.logger_gen += 1;
            self.logger_version += 1;
            what.push("logger env");
        }
        if variant == 3 {
            let n = self.desired.web_instances;
            self.desired.web_instances = if n == WEB_MAX { n - 1 } else { n + 1 };
            what.push("web instances");
        }
        self.note(format!("config apply: {}", what.join(" + ")));
        self.write_config(None);
        let out = self.d().supctl(&["config", "apply"]);
        assert!(out.status.success(), "config apply failed: {}", text(&out));
        self.count("apply");
    }

    fn bad_apply(&mut self) {
        const BROKEN: [(&str, &str); 4] = [
            ("unknown key", "instancs = 3\n"),
            ("syntax error", "stop_timeout = \"5s\n"),
            ("bare duration", "ready_timeout = 5\n"),
            ("unknown table", "[appz.web]\ncommand = \"true\"\n"),
        ];
        let (kind, body) = BROKEN[self.rng.below(BROKEN.len() as u64) as usize];
        let verb: &[&str] = if self.rng.below(3) == 0 { &["reload", "web", "--wait"] } else { &["config", "apply"] };
        self.note(format!("{} with a config file with {kind}", verb.join(" ")));
        self.write_config(Some(body));
        let out = self.d().supctl(verb);
        self.write_config(None);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "an invalid file ({kind}) must be refused: {t}");
        assert!(t.contains("nothing was changed"), "{t}");
        // Nothing changed: check() compares sizes and versions with the old ones.
        self.count("bad apply");
    }

    fn flood(&mut self) {
        self.note("reload logger (a fresh worker floods 2 MB of log)".into());
        let out = self.d().supctl(&["reload", "logger", "--wait"]);
        assert!(out.status.success(), "reload of logger failed: {}", text(&out));
        self.logger_version += 1;
        self.count("flood");
    }

    /// After every action: supd alive, every slot ready on the expected
    /// version, no zombie left unreaped, no orphan lingering.
    fn check(&mut self) {
        assert!(alive(self.supd), "supd exited");
        // Copying a long soak's whole log after every action would cost more than the action.
        if self.log_checked.elapsed() > Duration::from_secs(5) {
            assert!(!self.d().log().contains("panicked"), "supd panicked");
            self.log_checked = Instant::now();
        }
        let web = self.wait_ready("web", self.desired.web_instances as usize);
        let logger = self.wait_ready("logger", 1);
        for (name, insts, v) in [("web", &web, self.web_version), ("logger", &logger, self.logger_version)] {
            let versions: Vec<u64> = insts.iter().map(|i| i.version).collect();
            assert!(versions.iter().all(|x| *x == v), "{name} slots on versions {versions:?}, expected all on {v}");
        }
        let current: HashSet<u32> = web.iter().chain(&logger).filter_map(|i| i.pid).collect();
        let table = procs();
        for pid in &current {
            if let Some(p) = table.get(pid) {
                self.seen.insert((*pid, p.start));
            }
        }
        let below = descendants(self.supd, &table);
        let now = Instant::now();
        let mut still_unowned = HashMap::new();
        for pid in &below {
            let p = table[pid];
            self.seen.insert((*pid, p.start));
            // Owned: a current slot's worker or something below one.
            let mut up = *pid;
            let owned = loop {
                if current.contains(&up) {
                    break true;
                }
                match table.get(&up) {
                    Some(q) if q.ppid != self.supd => up = q.ppid,
                    _ => break false,
                }
            };
            if !owned && p.state != 'Z' {
                let since = self.unowned.get(&(*pid, p.start)).copied().unwrap_or(now);
                assert!(
                    now - since < LINGER,
                    "process {pid} ({}) under supd belongs to no slot for {:?}",
                    cmdline(*pid),
                    now - since
                );
                still_unowned.insert((*pid, p.start), since);
            }
        }
        self.unowned = still_unowned;
        let zombies: Vec<(u32, u64)> = table
            .iter()
            .filter(|(_, p)| p.ppid == self.supd && p.state == 'Z')
            .map(|(pid, p)| (*pid, p.start))
            .collect();
        if !zombies.is_empty() {
            wait_until(&format!("supd to reap its zombie children {zombies:?}"), REAP, || {
                zombies
                    .iter()
                    .all(|(pid, start)| {
                        proc_info(*pid).is_none_or(|p| p.start != *start || p.ppid != self.supd || p.state != 'Z')
                    })
                    .then_some(())
            });
        }
        assert!(alive(self.supd), "supd exited");
    }

    /// Until every process under supd belongs to a current slot: no rollout
    /// or replacement half-way.
    fn wait_settled(&self) {
        wait_until("no replacement in progress", DEADLINE, || {
            let web = self.wait_ready("web", self.desired.web_instances as usize);
            let logger = self.wait_ready("logger", 1);
            let current: HashSet<u32> = web.iter().chain(&logger).filter_map(|i| i.pid).collect();
            let table = procs();
            descendants(self.supd, &table)
                .iter()
                .all(|pid| current.contains(pid) || table.get(pid).is_some_and(|p| current.contains(&p.ppid)))
                .then_some(())
        });
    }

    /// Until the monitor has sampled every worker's whole tree: it keeps a
    /// `/proc/PID/stat` open per process, which counts in supd's open files.
    fn wait_sampled(&self) {
        wait_until("a sample of every worker and its grandchild", DEADLINE, || {
            let web = self.instances("web");
            let logger = self.instances("logger");
            let trees = web.iter().all(|i| i.tree_rss_bytes.unwrap_or(0) > i.rss_bytes.unwrap_or(u64::MAX));
            (trees && logger.iter().all(|i| i.rss_bytes.is_some())).then_some(())
        });
    }

    fn supd_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.supd)).map(|r| r.count()).unwrap_or(0)
    }

    fn supd_rss(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.supd))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .map_or(0, |kib: u64| kib * 1024)
    }

    /// What a failure message needs beyond the assertion: the last actions and supd's last words.
    fn context(&self) -> String {
        let log = self.d.as_ref().map(|d| d.log()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
        let history: Vec<&str> = self.history.iter().map(String::as_str).collect();
        format!(
            "last actions:\n  {}\ncounts: {:?}\nsupd's last log lines:\n  {}",
            history.join("\n  "),
            self.counts,
            tail.join("\n  ")
        )
    }
}

fn config_text(web_port: u16, logger_port: u16, want: &Desired, broken: Option<&str>) -> String {
    let demo = bin("sup-demo").display().to_string();
    let grow = if want.grow { ", \"--grow-memory\", \"4M\"" } else { "" };
    // Each sup-demo also forks a `sleep` grandchild: it must die with its worker.
    format!(
        r#"[supervisor]
control_socket = "run/control.sock"
run_dir = "run"
log_dir = "logs"
log_level = "info"
monitor_interval = "500ms"

[apps.web]
command = ["{demo}", "--spawn-grandchild"{grow}]
instances = {web_instances}
listen = ["127.0.0.1:{web_port}"]
ready = "notify"
ready_timeout = "20s"
stop_timeout = "5s"
watchdog = "10s"
memory_limit = "24M"
memory_limit_samples = 2
max_restarts = 1000
backoff = {{ initial = "100ms", max = "1s" }}
env = {{ CHAOS_GEN = "{web_gen}" }}
{broken}
[apps.logger]
command = ["{demo}", "--log-flood", "--log-count", "20000"]
listen = ["127.0.0.1:{logger_port}"]
ready = "notify"
ready_timeout = "20s"
stop_timeout = "5s"
env = {{ CHAOS_GEN = "{logger_gen}" }}
logs = {{ rotate_size = "1M", keep = {LOGGER_KEEP}, compress = true }}
"#,
        web_instances = want.web_instances,
        web_gen = want.web_gen,
        logger_gen = want.logger_gen,
        broken = broken.unwrap_or(""),
    )
}

fn seed() -> u64 {
    match std::env::var("SUP_CHAOS_SEED") {
        Ok(s) => s.trim().parse().unwrap_or_else(|_| panic!("SUP_CHAOS_SEED must be an integer, found `{s}`")),
        Err(_) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            (now.as_nanos() as u64) ^ u64::from(std::process::id()) << 32
        }
    }
}

fn secs() -> u64 {
    match std::env::var("SUP_CHAOS_SECS") {
        Ok(s) => s.trim().parse().unwrap_or_else(|_| panic!("SUP_CHAOS_SECS must be a number of seconds, found `{s}`")),
        Err(_) => 45,
    }
}

#[test]
fn chaos_soak_keeps_every_slot_serving() {
    let _serial = load_lock();
    let (seed, secs) = (seed(), secs());
    eprintln!("chaos: seed={seed} duration={secs}s (replay with SUP_CHAOS_SEED={seed})");
    let mut chaos = Chaos::start(seed);
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| chaos.run(Duration::from_secs(secs))));
    if let Err(e) = result {
        let context = chaos.context();
        drop(chaos);
        panic!("chaos seed={seed} (replay with SUP_CHAOS_SEED={seed}): {}\n{context}", panic_text(&*e));
    }
}
