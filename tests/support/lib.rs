//! Helpers for the end-to-end tests and benchmarks: boot a real `supd` on a
//! temporary folder, drive it with the real `supctl`, and wait on conditions
//! with deadlines (never on bare sleeps).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use sup_proto::{InstanceStatus, StatusResponse, WorkerState};

/// Generous default deadline: a loaded 2-core machine must not flake.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Folder of the workspace's built binaries (`target/debug` or `target/release`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let mut dir = exe.parent().expect("deps folder").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of one of the workspace's binaries; panics with a hint when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} is missing: run `cargo build --workspace --bins` first", p.display());
    p
}

/// A free TCP port on 127.0.0.1, never handed out twice in one test process.
///
/// Not an ephemeral port from `bind(0)`: a port a test releases (by stopping
/// an app) could come back from `bind(0)` for another test running in
/// parallel, and two supds of one user binding it with SO_REUSEPORT would
/// share it. Ports come from below the ephemeral range instead.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ =
        NEXT.compare_exchange(0, 20_000 + (std::process::id() % 500) as u16 * 20, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(port < 32_000, "ran out of test ports");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Polls `f` every 20 ms until it returns `Some`, or panics naming `what` after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().and_then(|r| r.split_whitespace().next());
            state != Some("Z") && state != Some("X")
        }
        Err(_) => false,
    }
}

/// A running supd on a temporary folder.
pub struct Daemon {
    child: Option<Child>,
    /// The temporary folder holding the config, run and log folders.
    pub dir: tempfile::TempDir,
    /// The control socket.
    pub socket: PathBuf,
    /// The configuration file.
    pub config: PathBuf,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    /// Writes `apps` (TOML for `[apps.*]` tables) under a `[supervisor]` table of temp folders and starts supd.
    pub fn start(apps: &str) -> Daemon {
        Daemon::start_with_files(apps, &[])
    }

    /// Like [`Daemon::start`], writing `files` (relative path, contents) into the folder first.
    pub fn start_with_files(apps: &str, files: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::Builder::new().prefix("sup").tempdir().expect("temp dir");
        for (rel, body) in files {
            std::fs::write(dir.path().join(rel), body).expect("write file");
        }
        let config = dir.path().join("supervisor.toml");
        let body = format!(
            "[supervisor]\ncontrol_socket = \"run/control.sock\"\nrun_dir = \"run\"\nlog_dir = \"logs\"\nlog_level = \"info\"\n\n{apps}"
        );
        std::fs::write(&config, body).expect("write config");
        let socket = dir.path().join("run/control.sock");
        Daemon::start_with(dir, config, socket)
    }

    /// Starts supd on an existing config file inside `dir`.
    pub fn start_with(dir: tempfile::TempDir, config: PathBuf, socket: PathBuf) -> Daemon {
        Daemon::start_env(dir, config, socket, &[])
    }

    /// Like [`Daemon::start_with`], with extra environment variables for supd.
    pub fn start_env(dir: tempfile::TempDir, config: PathBuf, socket: PathBuf, env: &[(&str, String)]) -> Daemon {
        let mut child = Command::new(bin("supd"))
            .arg("--config")
            .arg(&config)
            .env_remove("NOTIFY_SOCKET")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn supd");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("supd stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("SUP_TEST_VERBOSE").is_some() {
                    eprintln!("supd: {line}");
                }
                let mut l = sink.lock().unwrap_or_else(|e| e.into_inner());
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut d = Daemon { child: Some(child), dir, socket, config, log };
        wait_until("supd's control socket to answer", DEADLINE, || {
            // A supd that exited will never answer: say why at once.
            if let Some(Ok(Some(status))) = d.child.as_mut().map(|c| c.try_wait()) {
                std::thread::sleep(Duration::from_millis(100));
                panic!("supd exited ({}) before answering:\n{}", describe(status), d.log());
            }
            std::os::unix::net::UnixStream::connect(&d.socket).ok().map(|_| ())
        });
        d
    }

    /// Everything supd has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until supd's log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        wait_until(&format!("`{needle}` in supd's log"), timeout, || self.log().contains(needle).then_some(()));
    }

    /// supd's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Runs supctl against this daemon.
    pub fn supctl(&self, args: &[&str]) -> Output {
        Command::new(bin("supctl")).arg("--socket").arg(&self.socket).args(args).output().expect("run supctl")
    }

    /// `supctl status --json`, parsed.
    pub fn status(&self) -> StatusResponse {
        let out = self.supctl(&["status", "--json"]);
        assert!(out.status.success(), "supctl status failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// The instances of `app`.
    pub fn instances(&self, app: &str) -> Vec<InstanceStatus> {
        self.status().apps.into_iter().find(|a| a.name == app).map(|a| a.instances).unwrap_or_default()
    }

    /// Waits until every instance of `app` is ready; returns them.
    pub fn wait_ready(&self, app: &str, n: usize) -> Vec<InstanceStatus> {
        wait_until(&format!("{n} ready instances of `{app}`"), DEADLINE, || {
            let i = self.instances(app);
            (i.len() == n && i.iter().all(|i| i.state == WorkerState::Ready)).then_some(i)
        })
    }

    /// Sends `sig` to supd.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// Sends SIGTERM and waits for supd to exit.
    pub fn stop(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().expect("child");
        wait_until("supd to exit", DEADLINE, || child.try_wait().ok().flatten())
    }

    /// Sends SIGTERM and waits for supd to exit; the second value reads
    /// supd's log, still filling from its last buffered lines.
    pub fn stop_with_log(self) -> (ExitStatus, impl Fn() -> String) {
        let log = self.log.clone();
        let status = self.stop();
        (status, move || log.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Waits for supd to exit by itself.
    pub fn wait_exit(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("child");
        wait_until("supd to exit", DEADLINE, || child.try_wait().ok().flatten())
    }

    /// A file under the daemon's folder.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Graceful first so workers do not outlive a failed test.
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(15) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One HTTP/1.1 GET on a new connection; returns status code and body.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let code = buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

/// Sends raw bytes on the control socket and returns the raw answer.
pub fn raw_control(socket: &Path, bytes: &[u8]) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect control socket");
    s.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Says that a test, or a part of it, is skipped because `why`; with
/// `SUP_TEST_STRICT=1` (as in CI) a skip fails instead, with the same reason,
/// so a missing prerequisite cannot pass for a green run.
pub fn skip(why: &str) {
    if std::env::var_os("SUP_TEST_STRICT").is_some_and(|v| v == "1") {
        panic!("SKIPPED: {why} (SUP_TEST_STRICT=1 makes a skip a failure)");
    }
    eprintln!("SKIPPED: {why}");
}

/// Describes an exit status for assertions.
pub fn describe(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("code {c}"),
        (_, Some(sig)) => format!("signal {sig}"),
        _ => "unknown".into(),
    }
}

/// Serialises the tests that generate load: on a 2-core machine, several
/// load tests at once starve each other's clients and workers for seconds,
/// which measures the machine, not sup.
pub fn load_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts of a load run.
#[derive(Debug, Default, Clone)]
pub struct LoadStats {
    /// Requests answered 200.
    pub ok: u64,
    /// Requests that failed: connection errors, resets, non-200 answers.
    pub failed: u64,
    /// The first few failures, described.
    pub errors: Vec<String>,
    /// Answers per worker pid (from sup-demo's body).
    pub by_pid: std::collections::HashMap<u32, u64>,
    /// Fresh connections closed or reset before any byte of an answer, then
    /// retried once (as nginx's `proxy_next_upstream error` does for a GET).
    /// Rare, and only under heavy parallel load here: an open problem, counted
    /// and printed rather than hidden.
    pub unanswered_retried: u64,
}

impl LoadStats {
    fn merge(&mut self, o: LoadStats) {
        self.ok += o.ok;
        self.failed += o.failed;
        self.unanswered_retried += o.unanswered_retried;
        self.errors.extend(o.errors);
        self.errors.truncate(20);
        for (k, v) in o.by_pid {
            *self.by_pid.entry(k).or_default() += v;
        }
    }
}

/// A running load generator: client threads on loopback until [`Load::finish`].
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    done: Arc<std::sync::atomic::AtomicU64>,
    threads: Vec<std::thread::JoinHandle<LoadStats>>,
}

/// How a load client uses connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One persistent connection per client, as a browser or a proxy keeps.
    KeepAlive,
    /// A new connection for every request.
    NewConnection,
}

impl Load {
    /// Starts `clients` threads of each mode in `modes` against 127.0.0.1:`port`.
    pub fn start(port: u16, modes: &[Mode], clients: usize) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut threads = Vec::new();
        for &mode in modes {
            for _ in 0..clients {
                let (stop, done) = (stop.clone(), done.clone());
                threads.push(std::thread::spawn(move || client(port, mode, &stop, &done)));
            }
        }
        Load { stop, done, threads }
    }

    /// Requests completed so far (answered or failed).
    pub fn count(&self) -> u64 {
        self.done.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `n` more requests have completed: proof that load is flowing.
    pub fn wait_for(&self, n: u64) {
        let target = self.count() + n;
        wait_until(&format!("{n} more requests"), DEADLINE, || (self.count() >= target).then_some(()));
    }

    /// Stops the clients and adds up their counts.
    pub fn finish(self) -> LoadStats {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = LoadStats::default();
        for t in self.threads {
            if let Ok(s) = t.join() {
                total.merge(s);
            }
        }
        total
    }
}

enum Attempt {
    Answered(u16, String, bool),
    /// Nothing at all came back on a connection that had served before: the
    /// server closed an idle keep-alive connection as our request crossed it.
    /// Every HTTP client retries this case for idempotent requests.
    StaleConnection,
    /// A fresh connection closed or reset before any byte of an answer.
    Unanswered(String),
    Failed(String),
}

fn client(
    port: u16,
    mode: Mode,
    stop: &std::sync::atomic::AtomicBool,
    done: &std::sync::atomic::AtomicU64,
) -> LoadStats {
    let mut stats = LoadStats::default();
    let mut conn: Option<BufReader<TcpStream>> = None;
    let fail = |stats: &mut LoadStats, e: String| {
        stats.failed += 1;
        if stats.errors.len() < 20 {
            stats.errors.push(e);
        }
    };
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let mut attempt = request(port, mode, &mut conn);
        if matches!(attempt, Attempt::StaleConnection) {
            attempt = request(port, mode, &mut conn);
        }
        if let Attempt::Unanswered(why) = &attempt {
            stats.unanswered_retried += 1;
            eprintln!("load: fresh connection unanswered ({why}); retrying once");
            attempt = request(port, mode, &mut conn);
        }
        match attempt {
            Attempt::Answered(200, body, _) => {
                stats.ok += 1;
                if let Some(pid) =
                    body.split("pid=").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|p| p.parse().ok())
                {
                    *stats.by_pid.entry(pid).or_default() += 1;
                }
            }
            Attempt::Answered(code, body, _) => fail(&mut stats, format!("HTTP {code}: {body}")),
            Attempt::StaleConnection => fail(&mut stats, "stale connection twice".into()),
            Attempt::Unanswered(e) => fail(&mut stats, format!("unanswered twice: {e}")),
            Attempt::Failed(e) => fail(&mut stats, e),
        }
        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    stats
}

fn request(port: u16, mode: Mode, conn: &mut Option<BufReader<TcpStream>>) -> Attempt {
    let reused = conn.is_some();
    if conn.is_none() {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => {
                let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
                let _ = s.set_nodelay(true);
                *conn = Some(BufReader::new(s));
            }
            Err(e) => return Attempt::Failed(format!("connect: {e}")),
        }
    }
    let Some(reader) = conn.as_mut() else { return Attempt::Failed("no connection".into()) };
    let close = if mode == Mode::NewConnection { "close" } else { "keep-alive" };
    // One write, as real clients do.
    let req = format!("GET / HTTP/1.1\r\nHost: t\r\nConnection: {close}\r\n\r\n");
    let sent = reader.get_mut().write_all(req.as_bytes());
    let result = read_response(reader);
    let answer = match (sent, result) {
        (Ok(()), Ok(a)) => Attempt::Answered(a.0, a.1, a.2),
        (_, Err((0, _))) if reused => Attempt::StaleConnection,
        (Ok(()), Err((0, e))) => Attempt::Unanswered(e),
        (Err(e), _) => Attempt::Failed(format!("write: {e}")),
        (_, Err((n, e))) => Attempt::Failed(format!("read after {n} bytes (reused: {reused}): {e}")),
    };
    let keep = matches!(answer, Attempt::Answered(_, _, true)) && mode == Mode::KeepAlive;
    if !keep {
        *conn = None;
    }
    answer
}

/// Reads one response; on error, how many bytes had arrived.
fn read_response(r: &mut BufReader<TcpStream>) -> Result<(u16, String, bool), (usize, String)> {
    let mut got = 0;
    let mut line = String::new();
    let mut status = 0;
    let mut length = 0usize;
    let mut keep = true;
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return Err((got, "connection closed".into())),
            Ok(n) => got += n,
            Err(e) => return Err((got, e.to_string())),
        }
        let l = line.trim_end();
        if status == 0 {
            status = l.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            continue;
        }
        if l.is_empty() {
            break;
        }
        let lower = l.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("connection:") && lower.contains("close") {
            keep = false;
        }
    }
    let mut body = vec![0u8; length];
    r.read_exact(&mut body).map_err(|e| (got, e.to_string()))?;
    Ok((status, String::from_utf8_lossy(&body).into_owned(), keep))
}

/// The live (not zombie) child processes of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for t in tasks.flatten() {
        if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(c.split_whitespace().filter_map(|p| p.parse::<u32>().ok()).filter(|p| alive(*p)));
        }
    }
    out
}

impl Daemon {
    /// Starts supctl against this daemon in the background, its output piped.
    pub fn supctl_bg(&self, args: &[&str]) -> Child {
        Command::new(bin("supctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run supctl")
    }
}

impl Daemon {
    /// Stops supd (SIGTERM) and starts it again on the same folder and file.
    pub fn restart(mut self) -> Daemon {
        let mut child = self.child.take().expect("child");
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        wait_until("supd to exit", DEADLINE, || child.try_wait().ok().flatten());
        let spare = tempfile::Builder::new().prefix("sup-spare").tempdir().expect("temp dir");
        let dir = std::mem::replace(&mut self.dir, spare);
        Daemon::start_with(dir, self.config.clone(), self.socket.clone())
    }
}

/// A seeded random number generator for test schedules (xorshift64*,
/// seeded through splitmix64): enough randomness, and no dependency.
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`; similar seeds give unrelated sequences.
    pub fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)).max(1))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

/// PM2, installed with npm into a temporary prefix, with its own PM2_HOME (benchmarks).
pub struct Pm2 {
    /// The `pm2` executable.
    pub bin: PathBuf,
    /// Its PM2_HOME.
    pub home: PathBuf,
}

impl Pm2 {
    /// Installs PM2 7 under `dir`; a global install is never touched.
    pub fn install(dir: &Path) -> Pm2 {
        let prefix = dir.join("pm2");
        let status = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix"])
            .arg(&prefix)
            .arg("pm2@7")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .expect("run npm");
        assert!(status.success(), "npm install pm2 failed");
        Pm2 { bin: prefix.join("node_modules/.bin/pm2"), home: dir.join("pm2-home") }
    }

    /// A `pm2 ARGS` command, output discarded.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args).env("PM2_HOME", &self.home).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        c
    }

    /// Runs `pm2 ARGS` and returns its output.
    pub fn cmd(&self, args: &[&str]) -> Output {
        Command::new(&self.bin).args(args).env("PM2_HOME", &self.home).stdin(Stdio::null()).output().expect("run pm2")
    }

    /// How many of its processes are `online`.
    pub fn online(&self) -> usize {
        let out = self.cmd(&["jlist"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v.as_array().map_or(0, |a| a.iter().filter(|p| p["pm2_env"]["status"] == "online").count())
    }
}
