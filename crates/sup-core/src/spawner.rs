//! fork/exec of workers.
//!
//! Every allocation happens before `fork`: the child runs only
//! async-signal-safe calls, because supd is multi-threaded and another thread
//! may hold the allocator's lock at the moment of the fork. Forks happen on one
//! dedicated, never-exiting thread, so `PR_SET_PDEATHSIG` (which fires when the
//! *forking thread* exits) only fires when supd itself dies. That thread also
//! looks up supplementary groups, which goes through NSS and may block.
//!
//! All signals stay blocked on that thread across `fork`, and the child resets
//! every disposition before it unblocks them: until then it still has supd's
//! handlers, which would report a signal meant for the worker to supd itself.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use nix::fcntl::OFlag;
use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
use tokio::sync::oneshot;

use crate::reaper::{ExitInfo, Reaper};
use crate::spec::Release;

/// Everything needed to start one worker process.
#[derive(Debug)]
pub struct SpawnSpec {
    /// `argv`, `argv[0]` being the command as configured.
    pub argv: Vec<String>,
    /// The complete environment, without `LISTEN_PID` (added by the child itself).
    pub env: Vec<(String, String)>,
    /// Descriptors installed as fd 3, 4, … in the child, in order.
    pub fds: Vec<RawFd>,
    /// Whether to set `LISTEN_PID` to the child's own pid.
    pub listen_pid: bool,
    /// Working directory.
    pub cwd: PathBuf,
    /// The program to exec, already resolved (a pinned release); `None` resolves `argv[0]` now.
    pub program: Option<PathBuf>,
    /// Credentials to switch to.
    pub ids: Option<Credentials>,
}

/// Who a worker runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// The user whose supplementary groups the worker gets, looked up on the
    /// spawner thread; `None` gives it `gid` alone.
    pub user: Option<String>,
}

/// A started child: its pid, the future of its exit and its output pipes.
#[derive(Debug)]
pub struct Spawned {
    /// Process id, also its process group id.
    pub pid: i32,
    /// Resolves when the reaper collects the child.
    pub exit: oneshot::Receiver<ExitInfo>,
    /// Read end of the child's stdout.
    pub stdout: OwnedFd,
    /// Read end of the child's stderr.
    pub stderr: OwnedFd,
}

/// Why a spawn failed.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The program was not found on `PATH`.
    #[error("command `{0}` not found in PATH")]
    NotFound(String),
    /// A string held a NUL byte.
    #[error("argument or environment value contains a NUL byte")]
    Nul,
    /// A system call in supd failed before the fork.
    #[error("{what}: {source}")]
    Os { what: &'static str, source: std::io::Error },
    /// A step in the child failed before `exec` succeeded.
    #[error("{step} failed in the child: {source}")]
    Child { step: &'static str, source: std::io::Error },
    /// The spawner thread is gone (supd is shutting down).
    #[error("supd is shutting down")]
    Closed,
}

struct Job {
    spec: SpawnSpec,
    reply: oneshot::Sender<Result<Spawned, SpawnError>>,
}

/// Handle to the spawner thread.
#[derive(Clone)]
pub struct Spawner {
    tx: mpsc::Sender<Job>,
    reaper: Reaper,
}

impl Spawner {
    /// Starts the dedicated forking thread.
    pub fn start(reaper: Reaper) -> std::io::Result<Spawner> {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread_reaper = reaper.clone();
        std::thread::Builder::new().name("sup-spawner".into()).spawn(move || {
            for job in rx {
                let result = spawn_now(&thread_reaper, job.spec);
                if let Err(Ok(spawned)) = job.reply.send(result) {
                    // Nobody waits for it any more: do not leave it unsupervised.
                    thread_reaper.signal_group(spawned.pid, libc::SIGKILL);
                }
            }
        })?;
        Ok(Spawner { tx, reaper })
    }

    /// Forks and execs a worker; resolves once `exec` has succeeded or failed.
    pub async fn spawn(&self, spec: SpawnSpec) -> Result<Spawned, SpawnError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Job { spec, reply }).map_err(|_| SpawnError::Closed)?;
        rx.await.map_err(|_| SpawnError::Closed)?
    }

    /// Whether worker `pid` has exited, though its slot may not know yet; never blocks.
    pub fn has_exited(&self, pid: i32) -> bool {
        self.reaper.has_exited(pid)
    }

    /// Sends `sig` to the process group of worker `pgid` unless it has been
    /// reaped (its number may be reused then); returns whether it was sent.
    pub fn signal_group(&self, pgid: i32, sig: i32) -> bool {
        self.reaper.signal_group(pgid, sig)
    }
}

/// Pins the release `cfg` names now: `cwd` and the program with every symlink
/// resolved. Blocking (file system look-ups): call it off the event loop.
pub fn pin_release(cfg: &sup_config::AppConfig, base_path: Option<&str>) -> Result<Release, String> {
    let cwd =
        std::fs::canonicalize(&cfg.cwd).map_err(|e| format!("cannot resolve `cwd` `{}`: {e}", cfg.cwd.display()))?;
    let first = cfg.command.first().ok_or_else(|| "the command is empty".to_string())?;
    let path_var = cfg.env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str()).or(base_path);
    let program = resolve_program(first, path_var, &cwd).map_err(|e| e.to_string())?;
    let program = std::fs::canonicalize(&program)
        .map_err(|e| format!("cannot resolve the program `{}`: {e}", program.display()))?;
    Ok(Release { cwd, program })
}

/// Resolves a program name against `PATH` the way `execvp` would.
pub fn resolve_program(name: &str, path_var: Option<&str>, cwd: &Path) -> Result<PathBuf, SpawnError> {
    if name.contains('/') {
        let p = Path::new(name);
        return Ok(if p.is_absolute() { p.to_path_buf() } else { cwd.join(p) });
    }
    let path_var = path_var.unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for dir in path_var.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(name);
        let candidate = if candidate.is_absolute() { candidate } else { cwd.join(candidate) };
        if candidate.is_file() && nix::unistd::access(&candidate, nix::unistd::AccessFlags::X_OK).is_ok() {
            return Ok(candidate);
        }
    }
    Err(SpawnError::NotFound(name.to_string()))
}

fn cstr(s: impl AsRef<OsStr>) -> Result<CString, SpawnError> {
    CString::new(s.as_ref().as_bytes()).map_err(|_| SpawnError::Nul)
}

fn os(what: &'static str) -> impl FnOnce(nix::Error) -> SpawnError {
    move |e| SpawnError::Os { what, source: std::io::Error::from(e) }
}

/// Steps the child may fail at, reported through the status pipe.
const STEPS: [&str; 8] = ["setpgid", "dup2", "chdir", "setgroups", "setgid", "setuid", "prctl", "exec"];

/// Memory the child touches; built in full before the fork.
struct Prepared {
    program: CString,
    argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _env: Vec<CString>,
    envp: Vec<*const libc::c_char>,
    listen_pid: Option<Vec<u8>>,
    cwd: CString,
    fds: Vec<RawFd>,
    ids: Option<(u32, u32, Vec<libc::gid_t>)>,
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    status_pipe: RawFd,
    parent: libc::pid_t,
}

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";

fn spawn_now(reaper: &Reaper, spec: SpawnSpec) -> Result<Spawned, SpawnError> {
    let first = spec.argv.first().ok_or(SpawnError::NotFound(String::new()))?;
    let path_var = spec.env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str());
    let program = match &spec.program {
        Some(p) => p.clone(),
        None => resolve_program(first, path_var, &spec.cwd)?,
    };

    let stdin = nix::fcntl::open("/dev/null", OFlag::O_RDONLY | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty())
        .map_err(os("open /dev/null"))?;
    let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(os("pipe"))?;
    let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(os("pipe"))?;
    let (status_r, status_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(os("pipe"))?;

    let argv = spec.argv.iter().map(cstr).collect::<Result<Vec<_>, _>>()?;
    let env = spec.env.iter().map(|(k, v)| cstr(format!("{k}={v}"))).collect::<Result<Vec<_>, _>>()?;
    let mut argv_ptrs: Vec<_> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp: Vec<_> = env.iter().map(|e| e.as_ptr()).collect();
    // Room for the prefix, 20 digits and the NUL; the child fills in its own pid.
    let mut listen_pid = spec.listen_pid.then(|| {
        let mut buf = LISTEN_PID_PREFIX.to_vec();
        buf.resize(LISTEN_PID_PREFIX.len() + 21, 0);
        buf
    });
    if let Some(buf) = listen_pid.as_mut() {
        envp.push(buf.as_ptr().cast());
    }
    envp.push(std::ptr::null());
    let ids = spec.ids.map(|c| {
        let groups = match &c.user {
            Some(user) => supplementary_groups(user, c.gid),
            None => vec![c.gid],
        };
        (c.uid, c.gid, groups)
    });
    let mut prepared = Prepared {
        program: cstr(program.as_os_str())?,
        argv,
        argv_ptrs,
        _env: env,
        envp,
        listen_pid,
        cwd: cstr(spec.cwd.as_os_str())?,
        fds: spec.fds,
        ids,
        stdin: stdin.as_raw_fd(),
        stdout: out_w.as_raw_fd(),
        stderr: err_w.as_raw_fd(),
        status_pipe: status_w.as_raw_fd(),
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
    };
    let _ = &prepared.argv;

    let (exit_tx, exit_rx) = oneshot::channel();
    let pid = {
        let _blocked = BlockedSignals::all().map_err(os("pthread_sigmask"))?;
        // Held across fork so the reaper cannot look the child up before it is registered.
        let mut waiters = reaper.lock();
        // SAFETY: the child only runs `child_exec`, which makes async-signal-safe calls.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: we are the child; `prepared` is our private copy.
            unsafe { child_exec(&mut prepared) }
        }
        if pid < 0 {
            return Err(SpawnError::Os { what: "fork", source: std::io::Error::last_os_error() });
        }
        waiters.insert(pid, exit_tx);
        pid
    };
    drop((out_w, err_w, status_w, stdin));

    // EOF means exec succeeded (the pipe is close-on-exec); 5 bytes mean a step failed.
    let mut buf = [0u8; 5];
    let mut got = 0;
    let mut file = std::fs::File::from(status_r);
    loop {
        use std::io::Read;
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                if got == buf.len() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(SpawnError::Os { what: "read exec status", source: e }),
        }
    }
    if got == buf.len() {
        let step = STEPS.get(buf[0] as usize).copied().unwrap_or("exec");
        let errno = i32::from_ne_bytes([buf[1], buf[2], buf[3], buf[4]]);
        return Err(SpawnError::Child { step, source: std::io::Error::from_raw_os_error(errno) });
    }
    Ok(Spawned { pid, exit: exit_rx, stdout: out_r, stderr: err_r })
}

/// `gid` and the groups `user` belongs to; may block on NSS (LDAP, sssd).
fn supplementary_groups(user: &str, gid: u32) -> Vec<libc::gid_t> {
    let Ok(name) = CString::new(user) else { return vec![gid] };
    match nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid)) {
        Ok(groups) => groups.into_iter().map(|g| g.as_raw()).collect(),
        Err(e) => {
            tracing::warn!("cannot look up the groups of user `{user}`, starting with group {gid} only: {e}");
            vec![gid]
        }
    }
}

/// Blocks every signal on this thread until dropped; the child never drops it.
struct BlockedSignals(SigSet);

impl BlockedSignals {
    fn all() -> nix::Result<BlockedSignals> {
        let mut old = SigSet::empty();
        pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::all()), Some(&mut old))?;
        Ok(BlockedSignals(old))
    }
}

impl Drop for BlockedSignals {
    fn drop(&mut self) {
        // Restoring a mask we read ourselves cannot fail.
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&self.0), None);
    }
}

/// Runs in the forked child. Only async-signal-safe calls; never returns.
unsafe fn child_exec(p: &mut Prepared) -> ! {
    unsafe fn fail(status_pipe: RawFd, step: usize) -> ! {
        let errno = unsafe { *libc::__errno_location() }.to_ne_bytes();
        let msg = [step as u8, errno[0], errno[1], errno[2], errno[3]];
        unsafe {
            libc::write(status_pipe, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        }
    }
    unsafe {
        // Signal mask and ignored signals survive exec; workers must start clean
        // (Rust ignores SIGPIPE, which would otherwise leak into every worker).
        // Dispositions first: all signals are blocked until then, and one let
        // through earlier would run a handler of supd's in this child.
        for sig in 1..=libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                // Fails harmlessly for the few signals libc reserves.
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        if libc::setpgid(0, 0) != 0 {
            fail(p.status_pipe, 0);
        }
        // Any descriptor we still need may sit on a target (0..3+n), the status
        // pipe included, where a dup2 would replace it and an exec failure
        // would be written into a socket. So every one is first copied to
        // 3+n or above: F_DUPFD takes only free numbers and none of those is
        // a target. The copies are close-on-exec; dup2 onto a target clears it.
        let floor = 3 + p.fds.len() as RawFd;
        let status = libc::fcntl(p.status_pipe, libc::F_DUPFD_CLOEXEC, floor);
        if status < 0 {
            fail(p.status_pipe, 1);
        }
        p.status_pipe = status;
        for fd in [&mut p.stdin, &mut p.stdout, &mut p.stderr].into_iter().chain(p.fds.iter_mut()) {
            let high = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, floor);
            if high < 0 {
                fail(status, 1);
            }
            *fd = high;
        }
        if libc::dup2(p.stdin, 0) < 0 || libc::dup2(p.stdout, 1) < 0 || libc::dup2(p.stderr, 2) < 0 {
            fail(p.status_pipe, 1);
        }
        for (i, &fd) in p.fds.iter().enumerate() {
            if libc::dup2(fd, 3 + i as RawFd) < 0 {
                fail(p.status_pipe, 1);
            }
        }
        if let Some(buf) = p.listen_pid.as_mut() {
            write_decimal(&mut buf[LISTEN_PID_PREFIX.len()..], libc::getpid() as u64);
        }
        if libc::chdir(p.cwd.as_ptr()) != 0 {
            fail(p.status_pipe, 2);
        }
        if let Some((uid, gid, groups)) = &p.ids {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
                fail(p.status_pipe, 3);
            }
            if libc::setgid(*gid) != 0 {
                fail(p.status_pipe, 4);
            }
            if libc::setuid(*uid) != 0 {
                fail(p.status_pipe, 5);
            }
        }
        // supd raised its own open-files limit; workers start with the one supd was given.
        let nofile = WORKER_NOFILE.load(std::sync::atomic::Ordering::Relaxed);
        if nofile != 0 {
            let mut lim: libc::rlimit = std::mem::zeroed();
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur = nofile.min(lim.rlim_max);
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
        // After the credential change, which clears it.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
            fail(p.status_pipe, 6);
        }
        if libc::getppid() != p.parent {
            // supd died between fork and prctl.
            libc::_exit(1);
        }
        libc::execve(p.program.as_ptr(), p.argv_ptrs.as_ptr(), p.envp.as_ptr());
        fail(p.status_pipe, 7)
    }
}

/// Soft open-files limit given to workers (0: leave supd's).
static WORKER_NOFILE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Raises supd's soft open-files limit to `want` (capped by the hard limit) and
/// keeps the old soft limit for the workers; returns the new limit.
pub fn raise_nofile(want: u64) -> std::io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit write to and read from the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let old = lim.rlim_cur;
    let new = want.min(lim.rlim_max).max(old);
    if new != old {
        lim.rlim_cur = new;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        WORKER_NOFILE.store(old, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(new)
}

/// Writes `n` in decimal followed by NUL; no allocation.
fn write_decimal(out: &mut [u8], mut n: u64) {
    let mut digits = [0u8; 20];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len.min(out.len().saturating_sub(1)) {
        out[i] = digits[len - 1 - i];
    }
    out[len.min(out.len().saturating_sub(1))] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_is_written_with_a_nul() {
        let mut buf = [0xffu8; 21];
        write_decimal(&mut buf, 40213);
        assert_eq!(&buf[..6], b"40213\0");
        write_decimal(&mut buf, 0);
        assert_eq!(&buf[..2], b"0\0");
    }

    #[tokio::test]
    async fn child_failures_are_reported_when_pipes_sit_among_the_listen_fds() {
        use std::fs::File;
        let spawner = Spawner::start(crate::reaper::tests::test_reaper()).unwrap();
        let dev_null = || File::open("/dev/null").unwrap();
        // Low numbers taken now and freed before the spawn, so the spawner's
        // pipes land inside 3..3+n, where the child installs the listen fds.
        let low: Vec<File> = (0..50).map(|_| dev_null()).collect();
        let listen: Vec<File> = (0..300).map(|_| dev_null()).collect();
        let top = 3 + listen.len() as RawFd;
        drop(low);
        assert!(dev_null().as_raw_fd() < top, "new descriptors should be numbered low");
        for (program, cwd, want) in [("/bin/true", "/nonexistent/sup-test", "chdir"), ("/dev/null", "/", "exec")] {
            let spec = SpawnSpec {
                argv: vec![program.into()],
                env: Vec::new(),
                fds: listen.iter().map(|f| f.as_raw_fd()).collect(),
                listen_pid: true,
                cwd: cwd.into(),
                program: None,
                ids: None,
            };
            match spawner.spawn(spec).await {
                Err(SpawnError::Child { step, .. }) => assert_eq!(step, want, "{program} in {cwd}"),
                other => panic!("{program} in {cwd}: want a failed {want}, got {other:?}"),
            }
        }
    }

    #[test]
    fn programs_resolve_on_path() {
        let cwd = Path::new("/");
        assert_eq!(resolve_program("sh", Some("/nonexistent:/bin"), cwd).ok(), Some(PathBuf::from("/bin/sh")));
        assert!(matches!(resolve_program("no-such-prog-xyz", Some("/bin"), cwd), Err(SpawnError::NotFound(_))));
        assert_eq!(resolve_program("./x", None, Path::new("/a")).ok(), Some(PathBuf::from("/a/./x")));
    }
}
