//! `ready = "accepting"`: the new worker's own process tree waits for
//! connections on its slot's sockets.
//!
//! A probe through the port proves nothing about the new worker: any slot, or
//! the old worker of this slot, may answer it. And holding fd 3 proves nothing
//! either: the worker inherited it. What does prove it is the kernel's own
//! record that a process of the worker's tree waits on the socket, read from
//! /proc (see docs/configuration.md for what each form proves):
//!
//! - the socket is in one of its epoll sets for reading (`/proc/PID/fdinfo/N`
//!   of an epoll fd lists `tfd: … events: … ino:HEX`); event loops register
//!   the listener when they start serving (asyncio, libuv, Go's netpoller);
//! - a thread is blocked in `accept`/`accept4` on it (`/proc/PID/task/TID/syscall`);
//! - a thread is blocked in `poll`/`ppoll`/`select`/`pselect6` with the socket
//!   in its read set (the arrays are read from `/proc/PID/mem`).
//!
//! Blocked system calls are seen only while the thread sleeps in them, so the
//! check is repeated with a backoff until `ready_timeout`. Reading another
//! process's syscall and memory needs ptrace rights over it, which supd has over
//! its own descendants (or as root).

use std::collections::{HashMap, HashSet};
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

/// Time before the second attempt; it grows by half after each miss.
const FIRST_INTERVAL: Duration = Duration::from_millis(50);
/// Longest time between attempts, so hundreds of starting workers stay cheap.
const MAX_INTERVAL: Duration = Duration::from_millis(500);
/// The most `pollfd`s or select bits read from one call: bounds the read from another process.
const MAX_FDS: u64 = 65_536;
/// EPOLLIN and POLLIN: waiting to read, which on a listening socket means waiting for a connection.
const IN: u64 = 0x1;

/// How a process of the tree was seen waiting on a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// The socket is in an epoll set of `pid`, for reading.
    Epoll {
        /// The process holding the epoll fd.
        pid: i32,
    },
    /// Thread `tid` of `pid` is blocked in a system call on the socket (accept, poll or select).
    Blocked {
        /// The process.
        pid: i32,
        /// Its thread.
        tid: i32,
        /// The system call's name.
        call: &'static str,
    },
}

impl std::fmt::Display for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Waiting::Epoll { pid } => write!(f, "in an epoll set of pid {pid}"),
            Waiting::Blocked { pid, tid, call } => write!(f, "thread {tid} of pid {pid} blocked in {call}"),
        }
    }
}

/// The inodes of `fds`, the sockets a worker is given.
pub fn inodes(fds: &[RawFd]) -> Result<Vec<u64>, String> {
    fds.iter()
        .map(|fd| {
            // SAFETY: the slot's sockets stay open while its workers start; the
            // borrow ends before this returns.
            let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
            let stat = nix::sys::stat::fstat(borrowed).map_err(|e| format!("cannot stat a listening socket: {e}"))?;
            Ok(stat.st_ino)
        })
        .collect()
}

/// Checks until a process of `pid`'s tree waits on every socket of `inodes`; logs how.
pub async fn until_accepting(pid: i32, inodes: Arc<[u64]>) {
    let mut interval = FIRST_INTERVAL;
    loop {
        let want = inodes.clone();
        // /proc reads block (and are slow while the kernel is busy): never on the event loop.
        let seen = tokio::task::spawn_blocking(move || waiting_on_all(pid, &want)).await.ok().flatten();
        if let Some(how) = seen {
            tracing::info!(pid, "waits for connections on its sockets: {}", how.join(", "));
            return;
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 3 / 2).min(MAX_INTERVAL);
    }
}

/// How `pid`'s tree waits on each socket of `inodes`, if it waits on all of them.
///
/// Blocking: reads /proc.
pub fn waiting_on_all(pid: i32, inodes: &[u64]) -> Option<Vec<String>> {
    let found = waiting(pid, inodes);
    inodes
        .iter()
        .map(|ino| found.get(ino).map(|how| format!("socket {ino} {how}")))
        .collect::<Option<Vec<_>>>()
        .filter(|v| !v.is_empty())
}

/// For each socket of `inodes` that a process of `pid`'s tree waits on, how.
///
/// Blocking: reads /proc.
pub fn waiting(pid: i32, inodes: &[u64]) -> HashMap<u64, Waiting> {
    let want: HashSet<u64> = inodes.iter().copied().collect();
    let mut found = HashMap::new();
    for p in tree(pid) {
        let (sockets, epolls) = scan_fds(p, &want);
        for (ino, how) in epoll_waits(p, &epolls, &want).into_iter().chain(blocked_waits(p, &sockets)) {
            found.entry(ino).or_insert(how);
        }
        if found.len() == want.len() {
            break;
        }
    }
    found
}

/// `pid` and its descendants, parents first (at most 4096).
fn tree(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut seen = HashSet::from([pid]);
    let mut i = 0;
    while i < out.len() && out.len() < 4096 {
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", out[i])) {
            for t in tasks.flatten() {
                if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                    out.extend(c.split_whitespace().filter_map(|c| c.parse::<i32>().ok()).filter(|c| seen.insert(*c)));
                }
            }
        }
        i += 1;
    }
    out
}

/// One pass over `pid`'s fds: its sockets of `want` (fd → inode), and its epoll fds.
fn scan_fds(pid: i32, want: &HashSet<u64>) -> (HashMap<i64, u64>, Vec<i64>) {
    let (mut sockets, mut epolls) = (HashMap::new(), Vec::new());
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return (sockets, epolls) };
    for fd in fds.flatten() {
        let Some(n) = fd.file_name().to_str().and_then(|n| n.parse::<i64>().ok()) else { continue };
        let Ok(target) = std::fs::read_link(fd.path()) else { continue };
        let target = target.to_string_lossy();
        if target == "anon_inode:[eventpoll]" {
            epolls.push(n);
        } else if let Some(ino) = target.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
            if let Some(ino) = ino.parse::<u64>().ok().filter(|i| want.contains(i)) {
                sockets.insert(n, ino);
            }
        }
    }
    (sockets, epolls)
}

/// The sockets of `want` registered for reading in one of `pid`'s epoll fds.
fn epoll_waits(pid: i32, epolls: &[i64], want: &HashSet<u64>) -> Vec<(u64, Waiting)> {
    let mut out = Vec::new();
    for fd in epolls {
        let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else { continue };
        out.extend(
            epoll_targets(&info)
                .filter(|(ino, events)| want.contains(ino) && events & IN != 0)
                .map(|(ino, _)| (ino, Waiting::Epoll { pid })),
        );
    }
    out
}

/// The (inode, events) of each `tfd:` line of an epoll fd's fdinfo.
fn epoll_targets(info: &str) -> impl Iterator<Item = (u64, u64)> + '_ {
    info.lines().filter(|l| l.starts_with("tfd:")).filter_map(|line| {
        // "tfd: 7 events: 19 data: 7  pos:0 ino:2a1b sdev:8": hex values, some glued to their key.
        let mut fields = line.split_whitespace();
        let events = fields.by_ref().skip_while(|f| *f != "events:").nth(1)?;
        let ino = fields.find_map(|f| f.strip_prefix("ino:"))?;
        Some((u64::from_str_radix(ino, 16).ok()?, u64::from_str_radix(events, 16).ok()?))
    })
}

/// The sockets of `fds` that a thread of `pid` is blocked on, in accept, poll or select.
fn blocked_waits(pid: i32, fds: &HashMap<i64, u64>) -> Vec<(u64, Waiting)> {
    let mut out = Vec::new();
    if fds.is_empty() {
        return out;
    }
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    let mut mem: Option<std::fs::File> = None;
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse::<i32>().ok()) else { continue };
        let Ok(line) = std::fs::read_to_string(task.path().join("syscall")) else { continue };
        let Some((nr, args)) = parse_syscall(&line) else { continue };
        let Some(call) = Call::of(nr) else { continue };
        let waited: Vec<i64> = match call {
            Call::Accept(_) => vec![args[0] as i64],
            Call::Poll(_) | Call::Select(_) => {
                if mem.is_none() {
                    mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok();
                }
                let Some(m) = mem.as_ref() else { continue };
                call.read_set(m, &args)
            }
        };
        for fd in waited {
            if let Some(ino) = fds.get(&fd) {
                out.push((*ino, Waiting::Blocked { pid, tid, call: call.name() }));
            }
        }
    }
    out
}

/// A system call that waits for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Accept(&'static str),
    Poll(&'static str),
    Select(&'static str),
}

impl Call {
    fn of(nr: i64) -> Option<Call> {
        Some(match nr {
            libc::SYS_accept4 => Call::Accept("accept4"),
            libc::SYS_ppoll => Call::Poll("ppoll"),
            libc::SYS_pselect6 => Call::Select("pselect6"),
            #[cfg(target_arch = "x86_64")]
            libc::SYS_accept => Call::Accept("accept"),
            #[cfg(target_arch = "x86_64")]
            libc::SYS_poll => Call::Poll("poll"),
            #[cfg(target_arch = "x86_64")]
            libc::SYS_select => Call::Select("select"),
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Call::Accept(n) | Call::Poll(n) | Call::Select(n) => n,
        }
    }

    /// The fds a blocked poll or select waits to read, from the caller's memory.
    fn read_set(self, mem: &std::fs::File, args: &[u64; 6]) -> Vec<i64> {
        match self {
            Call::Accept(_) => Vec::new(),
            Call::Poll(_) => {
                // struct pollfd { int fd; short events; short revents; }
                let (ptr, n) = (args[0], args[1].min(MAX_FDS));
                let mut buf = vec![0u8; n as usize * 8];
                if mem.read_exact_at(&mut buf, ptr).is_err() {
                    return Vec::new();
                }
                buf.chunks_exact(8)
                    .filter(|p| u64::from(u16::from_ne_bytes([p[4], p[5]])) & IN != 0)
                    .map(|p| i64::from(i32::from_ne_bytes([p[0], p[1], p[2], p[3]])))
                    .collect()
            }
            Call::Select(_) => {
                // The read set is a bitmap of `nfds` bits in longs.
                let (n, ptr) = (args[0].min(MAX_FDS), args[1]);
                if ptr == 0 {
                    return Vec::new();
                }
                let mut buf = vec![0u8; n.div_ceil(64) as usize * 8];
                if mem.read_exact_at(&mut buf, ptr).is_err() {
                    return Vec::new();
                }
                (0..n as usize).filter(|&fd| buf[fd / 8] & (1 << (fd % 8)) != 0).map(|fd| fd as i64).collect()
            }
        }
    }
}

/// A `/proc/PID/task/TID/syscall` line: number and six arguments, while blocked in a call.
fn parse_syscall(line: &str) -> Option<(i64, [u64; 6])> {
    let mut f = line.split_whitespace();
    // "running", or "-1 SP PC" when not in a system call.
    let nr: i64 = f.next()?.parse().ok()?;
    if nr < 0 {
        return None;
    }
    let mut args = [0u64; 6];
    for a in &mut args {
        *a = u64::from_str_radix(f.next()?.trim_start_matches("0x"), 16).ok()?;
    }
    Some((nr, args))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn listener() -> (std::net::TcpListener, u64) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ino = inodes(&[l.as_raw_fd()]).unwrap()[0];
        (l, ino)
    }

    #[test]
    fn fdinfo_and_syscall_lines_parse() {
        let info = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n\
                    tfd:        7 events:       19 data:                7  pos:0 ino:2a1b sdev:8\n\
                    tfd:        9 events:        4 data:                9  pos:0 ino:ff sdev:8\n";
        assert_eq!(epoll_targets(info).collect::<Vec<_>>(), vec![(0x2a1b, 0x19), (0xff, 0x4)]);
        let blocked = "288 0x3 0x7ffd1 0x7ffd2 0x80800 0x0 0x0 0x7ffd0 0x7f12";
        assert_eq!(parse_syscall(blocked), Some((288, [3, 0x7ffd1, 0x7ffd2, 0x80800, 0, 0])));
        assert_eq!(parse_syscall("running"), None);
        assert_eq!(parse_syscall("-1 0x7ffd0 0x7f12"), None);
    }

    /// A process holding the socket but not waiting on it does not count.
    #[test]
    fn holding_a_socket_is_not_waiting_on_it() {
        let (_l, ino) = listener();
        let me = std::process::id() as i32;
        assert!(waiting_on_all(me, &[ino]).is_none());
    }

    #[test]
    fn an_epoll_registration_for_reading_counts() {
        let (l, ino) = listener();
        let me = std::process::id() as i32;
        // SAFETY: plain syscalls on fds this test owns; the epoll fd is closed at the end.
        unsafe {
            let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
            assert!(ep >= 0);
            let mut ev = libc::epoll_event { events: libc::EPOLLOUT as u32, u64: 1 };
            assert_eq!(libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, l.as_raw_fd(), &mut ev), 0);
            assert!(waiting_on_all(me, &[ino]).is_none(), "registered for writing only");
            ev.events = libc::EPOLLIN as u32;
            assert_eq!(libc::epoll_ctl(ep, libc::EPOLL_CTL_MOD, l.as_raw_fd(), &mut ev), 0);
            assert_eq!(waiting(me, &[ino]).get(&ino), Some(&Waiting::Epoll { pid: me }));
            libc::close(ep);
        }
    }

    /// Each blocking form, seen while a thread of this process sleeps in it.
    #[test]
    fn a_thread_blocked_in_accept_poll_or_select_counts() {
        let me = std::process::id() as i32;
        for call in ["accept4", "poll", "select"] {
            let (l, ino) = listener();
            let (fd, port) = (l.as_raw_fd(), l.local_addr().unwrap().port());
            let t = std::thread::spawn(move || match call {
                "accept4" => drop(l.accept()),
                "poll" => {
                    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut p, 1, 20_000) };
                }
                _ => {
                    // SAFETY: an fd_set on the stack, fd below FD_SETSIZE.
                    unsafe {
                        let mut set: libc::fd_set = std::mem::zeroed();
                        libc::FD_SET(fd, &mut set);
                        let mut tv = libc::timeval { tv_sec: 20, tv_usec: 0 };
                        libc::select(fd + 1, &mut set, std::ptr::null_mut(), std::ptr::null_mut(), &mut tv);
                    }
                }
            });
            let start = std::time::Instant::now();
            let how = loop {
                if let Some(how) = waiting(me, &[ino]).get(&ino).copied() {
                    break how;
                }
                assert!(start.elapsed() < Duration::from_secs(10), "{call}: not seen waiting");
                std::thread::sleep(Duration::from_millis(10));
            };
            assert!(matches!(how, Waiting::Blocked { pid, .. } if pid == me), "{call}: {how}");
            // Wake the thread up: a connection ends accept, poll and select alike.
            drop(std::net::TcpStream::connect(("127.0.0.1", port)));
            t.join().unwrap();
        }
    }
}
