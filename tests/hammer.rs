//! Race hammer (issue #13): a live supd driven by seeded random *interleavings*
//! of every operation: reload, scale, stop, start, restart, config apply
//! (adding, removing, changing an app, re-creating its `listen`), `kill -9`,
//! SIGSTOP, and memory replacements running in the background. Each step runs
//! one to three actions at once; after every step:
//! - each command returned within its bound,
//! - `status` lists exactly the file's apps,
//! - every child process of supd appears in `status`,
//! - no socket stays bound for a removed app or an old `listen`,
//! - and, at the end, no request to the loaded app failed outside the kills.
//!
//! The short run is part of `cargo test --workspace` (`SUP_HAMMER_SECS`,
//! default 40 s). The long run, after `cargo build --release --workspace --bins`:
//!
//! ```sh
//! SUP_HAMMER_SECS=1800 cargo test --release --test hammer -- --nocapture
//! ```
//!
//! `SUP_HAMMER_SEED=N` replays the same choices (not the same timings).

use std::collections::BTreeMap;
use std::process::Output;
use std::time::{Duration, Instant};

use sup::*;

/// stop_timeout + 5 s: every stop returns within it.
const STOP_BOUND: Duration = Duration::from_secs(3 + 5);
/// Any other command: a rollout of a few slots, each ready in under a second.
const OP_BOUND: Duration = Duration::from_secs(60);
/// How long an old worker may drain (a memory replacement) before it counts as a ghost.
const LINGER: Duration = Duration::from_secs(15);
const CLIENTS_PER_MODE: usize = 2;

/// What the file says.
#[derive(Clone, Debug)]
struct Desired {
    web_gen: u64,
    api_instances: u32,
    api_gen: u64,
    extra: Option<(u16, u64)>,
}

#[derive(Clone, Debug)]
enum Action {
    /// A `supctl` command.
    Ctl(Vec<String>),
    /// `kill -9` of one worker of `web`.
    KillWeb,
    /// `kill -9` of one worker of `api`.
    KillApi,
    /// SIGSTOP one worker of `web` for a moment, then SIGCONT.
    PauseWeb,
}

fn config_text(ports: (u16, u16), d: &Desired) -> String {
    let demo = bin("sup-demo").display().to_string();
    let mut s = format!(
        r#"[supervisor]
control_socket = "run/control.sock"
run_dir = "run"
log_dir = "logs"
log_level = "info"
monitor_interval = "500ms"

[apps.web]
command = ["{demo}", "--start-delay", "300ms", "--grow-memory", "6M", "--spawn-grandchild"]
instances = 2
listen = ["127.0.0.1:{web}"]
ready = "notify"
ready_timeout = "20s"
stop_timeout = "3s"
memory_limit = "24M"
memory_limit_samples = 2
max_restarts = 1000
env = {{ GEN = "{web_gen}" }}

[apps.api]
command = ["{demo}", "--start-delay", "500ms"]
instances = {api_n}
listen = ["127.0.0.1:{api}"]
ready = "notify"
ready_timeout = "20s"
stop_timeout = "3s"
max_restarts = 1000
env = {{ GEN = "{api_gen}" }}
"#,
        web = ports.0,
        api = ports.1,
        web_gen = d.web_gen,
        api_n = d.api_instances,
        api_gen = d.api_gen,
    );
    if let Some((port, gen)) = d.extra {
        s.push_str(&format!(
            r#"
[apps.extra]
command = ["{demo}", "--start-delay", "200ms"]
listen = ["127.0.0.1:{port}"]
ready = "notify"
stop_timeout = "3s"
env = {{ GEN = "{gen}" }}
"#
        ));
    }
    s
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn pick_pid(d: &Daemon, app: &str, rng: &mut Rng) -> Option<u32> {
    let pids: Vec<u32> = d.instances(app).iter().filter_map(|i| i.pid).collect();
    (!pids.is_empty()).then(|| pids[rng.below(pids.len() as u64) as usize])
}

/// Runs one action; returns what it did and how long it took, or panics past its bound.
fn run_action(d: &Daemon, action: &Action, seed: u64) -> String {
    let mut rng = Rng::new(seed);
    match action {
        Action::Ctl(args) => {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let bound = if args[0] == "stop" { STOP_BOUND } else { OP_BOUND };
            let t0 = Instant::now();
            let out = d.supctl(&args);
            let took = t0.elapsed();
            let code = out.status.code();
            assert!(took < bound, "`supctl {}` took {took:?}, over {bound:?}:\n{}", args.join(" "), text(&out));
            // 0, or 1 for an operation that failed or was cancelled or busy; never a usage error or no answer.
            assert!(matches!(code, Some(0 | 1)), "`supctl {}` exited {code:?}:\n{}", args.join(" "), text(&out));
            format!("supctl {} -> {code:?} in {took:.1?}", args.join(" "))
        }
        Action::KillWeb | Action::KillApi => {
            let app = if matches!(action, Action::KillWeb) { "web" } else { "api" };
            match pick_pid(d, app, &mut rng) {
                Some(pid) => {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    format!("kill -9 {app} pid {pid}")
                }
                None => format!("kill {app}: nothing runs"),
            }
        }
        Action::PauseWeb => match pick_pid(d, "web", &mut rng) {
            Some(pid) => {
                // SAFETY: as above.
                unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
                std::thread::sleep(Duration::from_millis(200 + rng.below(800)));
                // SAFETY: as above.
                unsafe { libc::kill(pid as i32, libc::SIGCONT) };
                format!("pause web pid {pid}")
            }
            None => "pause web: nothing runs".into(),
        },
    }
}

struct Hammer {
    rng: Rng,
    d: Daemon,
    ports: (u16, u16),
    want: Desired,
    /// Ports an app listened on and must no longer accept on.
    closed_ports: Vec<u16>,
    counts: BTreeMap<String, u64>,
    web_kills: u64,
    history: Vec<String>,
}

impl Hammer {
    fn write(&self) {
        std::fs::write(&self.d.config, config_text(self.ports, &self.want)).expect("write config");
    }

    fn pick(&mut self) -> (Action, &'static str) {
        let ctl = |v: &[&str]| Action::Ctl(v.iter().map(|s| s.to_string()).collect());
        match self.rng.below(16) {
            0 => (ctl(&["reload", "web"]), "reload web"),
            1 => (ctl(&["reload", "api"]), "reload api"),
            2 => (ctl(&["scale", "web", &(2 + self.rng.below(3)).to_string()]), "scale web"),
            3 => (ctl(&["scale", "api", &(1 + self.rng.below(3)).to_string()]), "scale api"),
            4 | 5 => (ctl(&["stop", "api"]), "stop api"),
            6 => (ctl(&["start", "api"]), "start api"),
            7 => (ctl(&["restart", "api"]), "restart api"),
            8 => (Action::KillWeb, "kill web"),
            9 => (Action::KillApi, "kill api"),
            10 => (Action::PauseWeb, "pause web"),
            11 => (ctl(&["start", "--all"]), "start all"),
            _ => {
                // A config change: add, remove, change or re-create `extra`, change web or api.
                match self.rng.below(6) {
                    0 => {
                        if let Some((port, _)) = self.want.extra.take() {
                            self.closed_ports.push(port);
                        } else {
                            self.want.extra = Some((free_port(), 0));
                        }
                    }
                    1 => {
                        // New sockets: the app is re-created.
                        if let Some((port, gen)) = self.want.extra {
                            self.closed_ports.push(port);
                            self.want.extra = Some((free_port(), gen));
                        } else {
                            self.want.extra = Some((free_port(), 0));
                        }
                    }
                    2 => {
                        if let Some((_, gen)) = self.want.extra.as_mut() {
                            *gen += 1;
                        }
                    }
                    3 => self.want.web_gen += 1,
                    4 => self.want.api_gen += 1,
                    _ => self.want.api_instances = 1 + self.rng.below(3) as u32,
                }
                self.closed_ports.retain(|p| self.want.extra.map(|(e, _)| e) != Some(*p));
                (ctl(&["config", "apply"]), "config apply")
            }
        }
    }

    fn step(&mut self, n: u64) {
        let k = 1 + self.rng.below(3);
        let mut actions = Vec::new();
        for _ in 0..k {
            let (a, name) = self.pick();
            *self.counts.entry(name.into()).or_default() += 1;
            if matches!(a, Action::KillWeb | Action::PauseWeb) {
                self.web_kills += 1;
            }
            actions.push(a);
        }
        // The file changes before the step's commands run: one writer.
        self.write();
        let seeds: Vec<u64> = actions.iter().map(|_| self.rng.next_u64()).collect();
        let done: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = actions
                .iter()
                .zip(&seeds)
                .map(|(a, seed)| {
                    let d = &self.d;
                    s.spawn(move || run_action(d, a, *seed))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
        });
        self.history.push(format!("#{n}: {}", done.join(" | ")));
        if std::env::var_os("SUP_HAMMER_VERBOSE").is_some() {
            eprintln!("hammer: {}", self.history.last().map_or("", String::as_str));
        }
        self.check();
    }

    /// A config apply may be refused as busy: the file's apps then show up at
    /// the next apply. Settle it now so the listing can be compared.
    fn settle_apply(&self) {
        wait_until("a config apply that is not busy", OP_BOUND, || {
            let out = self.d.supctl(&["config", "apply"]);
            (!text(&out).contains("busy")).then_some(())
        });
    }

    fn check(&mut self) {
        self.settle_apply();
        let mut want: Vec<&str> = vec!["web", "api"];
        if self.want.extra.is_some() {
            want.push("extra");
        }
        let listed: Vec<String> = self.d.status().apps.into_iter().map(|a| a.name).collect();
        assert_eq!(listed, want, "status lists exactly the file's apps");
        wait_until("every child of supd listed in status", LINGER, || {
            let status = self.d.status();
            let pids: Vec<u32> = status.apps.iter().flat_map(|a| a.instances.iter().filter_map(|i| i.pid)).collect();
            let ghosts: Vec<u32> = children(self.d.pid()).into_iter().filter(|p| !pids.contains(p)).collect();
            ghosts.is_empty().then_some(())
        });
        for port in &self.closed_ports {
            assert!(
                std::net::TcpStream::connect(("127.0.0.1", *port)).is_err(),
                "port {port} of a removed app or an old listen still accepts"
            );
        }
    }
}

fn env_u64(name: &str, default: impl FnOnce() -> u64) -> u64 {
    match std::env::var(name) {
        Ok(s) => s.trim().parse().unwrap_or_else(|_| panic!("{name} must be an integer, found `{s}`")),
        Err(_) => default(),
    }
}

#[test]
fn race_hammer_finds_no_hang_no_ghost_and_no_failed_request() {
    let _serial = load_lock();
    let seed = env_u64("SUP_HAMMER_SEED", || {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        now.as_nanos() as u64 ^ u64::from(std::process::id())
    });
    let secs = env_u64("SUP_HAMMER_SECS", || 40);
    eprintln!("hammer: seed={seed} duration={secs}s (replay with SUP_HAMMER_SEED={seed})");
    let ports = (free_port(), free_port());
    let want = Desired { web_gen: 0, api_instances: 2, api_gen: 0, extra: None };
    let dir = tempfile::Builder::new().prefix("sup-hammer").tempdir().expect("temp dir");
    let config = dir.path().join("supervisor.toml");
    std::fs::write(&config, config_text(ports, &want)).expect("write config");
    let socket = dir.path().join("run/control.sock");
    let d = Daemon::start_with(dir, config, socket);
    d.wait_ready("web", 2);
    d.wait_ready("api", 2);
    let mut h = Hammer {
        rng: Rng::new(seed),
        d,
        ports,
        want,
        closed_ports: Vec::new(),
        counts: BTreeMap::new(),
        web_kills: 0,
        history: Vec::new(),
    };
    let load = Load::start(ports.0, &[Mode::KeepAlive, Mode::NewConnection], CLIENTS_PER_MODE);
    load.wait_for(100);
    let t0 = Instant::now();
    let mut n = 0;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        while t0.elapsed() < Duration::from_secs(secs) {
            n += 1;
            h.step(n);
        }
    }));
    let stats = load.finish();
    let tail = h.history.iter().rev().take(12).rev().cloned().collect::<Vec<_>>().join("\n");
    if let Err(e) = result {
        let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
        panic!(
            "hammer seed={seed} (replay with SUP_HAMMER_SEED={seed}) failed at step {n}: {}\nlast steps:\n{tail}\nsupd log tail:\n{}",
            msg.unwrap_or_default(),
            h.d.log().lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let memory = h.d.log().matches("replacement started (memory)").count();
    eprintln!(
        "hammer: seed={seed} steps={n} actions={:?} memory_replacements={memory} requests ok={} failed={} unanswered_retried={} web kills+pauses={}",
        h.counts, stats.ok, stats.failed, stats.unanswered_retried, h.web_kills
    );
    assert!(
        stats.failed <= h.web_kills * (2 * CLIENTS_PER_MODE as u64),
        "{} requests failed with {} kills/pauses of web: {:?}",
        stats.failed,
        h.web_kills,
        stats.errors
    );
    assert!(!h.d.log().contains("panicked"), "supd panicked:\n{}", h.d.log());
}
