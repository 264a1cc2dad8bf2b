//! Where the listening sockets come from: systemd-style socket activation, or a bind on $PORT.

use std::fmt;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage};

use crate::Fatal;

/// First fd passed by the socket-activation protocol.
const SD_LISTEN_FDS_START: RawFd = 3;

/// A listener in std form; converted to tokio once the runtime runs.
pub enum StdListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

/// A listener the server accepts on.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// Human-readable listener address for the startup line.
pub struct Addr(pub String);

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Claims the fds handed over via LISTEN_FDS/LISTEN_PID, if they are meant for us.
///
/// Must run before the runtime starts: it edits the environment, which is only
/// sound while the process is single-threaded.
pub fn take_inherited() -> Result<Vec<StdListener>, Fatal> {
    let fds = std::env::var("LISTEN_FDS").ok();
    let pid = std::env::var("LISTEN_PID").ok();
    // A grandchild must not believe these fds are meant for it.
    for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let Some(fds) = fds else {
        return Ok(Vec::new());
    };
    let for_us = pid.as_deref().and_then(|p| p.trim().parse::<u32>().ok()).is_some_and(|p| p == std::process::id());
    if !for_us {
        return Ok(Vec::new());
    }
    let n: RawFd = fds
        .trim()
        .parse()
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| Fatal::usage(format!("LISTEN_FDS={fds:?} is not a non-negative integer")))?;
    (SD_LISTEN_FDS_START..SD_LISTEN_FDS_START.saturating_add(n)).map(adopt).collect()
}

/// Takes ownership of one inherited listening socket.
fn adopt(fd: RawFd) -> Result<StdListener, Fatal> {
    let bad = |what: String| Fatal::usage(format!("LISTEN_FDS: fd {fd} {what}"));
    // SAFETY: F_GETFD only queries the descriptor table; it tells us whether fd is open
    // before we build a BorrowedFd/OwnedFd from it.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(bad(format!("is not open: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: fd is open (checked above) and nobody else in this process owns it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    // The socket-activation protocol hands fds over without CLOEXEC; a spawned
    // grandchild must not keep our listening sockets alive.
    fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|e| bad(format!("cannot set FD_CLOEXEC: {e}")))?;
    match getsockopt(&borrowed, sockopt::SockType) {
        Ok(SockType::Stream) => {}
        Ok(t) => return Err(bad(format!("is a {t:?} socket, expected a stream socket"))),
        Err(e) => return Err(bad(format!("is not a socket: {e}"))),
    }
    if !getsockopt(&borrowed, sockopt::AcceptConn).map_err(|e| bad(format!("getsockopt: {e}")))? {
        return Err(bad("is not a listening socket".to_owned()));
    }
    let family = getsockname::<SockaddrStorage>(fd).map_err(|e| bad(format!("getsockname: {e}")))?.family();
    // SAFETY: fd is an open socket that the activation protocol gave to us alone.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let listener = match family {
        Some(AddressFamily::Inet | AddressFamily::Inet6) => StdListener::Tcp(owned.into()),
        Some(AddressFamily::Unix) => StdListener::Unix(owned.into()),
        other => return Err(bad(format!("has unsupported address family {other:?}"))),
    };
    let nb = match &listener {
        StdListener::Tcp(l) => l.set_nonblocking(true),
        StdListener::Unix(l) => l.set_nonblocking(true),
    };
    nb.map_err(|e| bad(format!("cannot set O_NONBLOCK: {e}")))?;
    Ok(listener)
}

/// Resolves the fallback port: $PORT wins over --port.
pub fn fallback_port(flag: Option<u16>) -> Result<Option<u16>, Fatal> {
    match std::env::var("PORT") {
        Ok(p) => p.trim().parse().map(Some).map_err(|_| Fatal::usage(format!("PORT={p:?} is not a valid port number"))),
        Err(_) => Ok(flag),
    }
}

/// Binds 127.0.0.1:port with SO_REUSEADDR so quick restarts do not hit
/// TIME_WAIT, and SO_REUSEPORT so an old and a new worker can share the port
/// during a reload (as servers with `reuse_port` do).
pub fn bind(port: u16) -> Result<Listener, Fatal> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let fail = |e: std::io::Error| Fatal::runtime(format!("cannot listen on {addr}: {e}"));
    let sock = tokio::net::TcpSocket::new_v4().map_err(fail)?;
    sock.set_reuseaddr(true).map_err(fail)?;
    sock.set_reuseport(true).map_err(fail)?;
    sock.bind(addr).map_err(fail)?;
    sock.listen(1024).map(Listener::Tcp).map_err(fail)
}

impl StdListener {
    /// Registers the listener with the tokio reactor (needs a running runtime).
    pub fn into_tokio(self) -> Result<Listener, Fatal> {
        let fail = |e: std::io::Error| Fatal::runtime(format!("cannot register inherited listener: {e}"));
        match self {
            StdListener::Tcp(l) => tokio::net::TcpListener::from_std(l).map(Listener::Tcp).map_err(fail),
            StdListener::Unix(l) => tokio::net::UnixListener::from_std(l).map(Listener::Unix).map_err(fail),
        }
    }
}

impl Listener {
    /// Describes the local address, e.g. `127.0.0.1:8080` or `unix:/run/app.sock`.
    pub fn addr(&self) -> Addr {
        match self {
            Listener::Tcp(l) => Addr(match l.local_addr() {
                Ok(a) => a.to_string(),
                Err(e) => format!("tcp:?({e})"),
            }),
            Listener::Unix(l) => Addr(match l.local_addr() {
                Ok(a) => {
                    let a: std::os::unix::net::SocketAddr = a.into();
                    if let Some(p) = a.as_pathname() {
                        format!("unix:{}", p.display())
                    } else if let Some(name) = a.as_abstract_name() {
                        format!("unix:@{}", String::from_utf8_lossy(name))
                    } else {
                        "unix:(unnamed)".to_owned()
                    }
                }
                Err(e) => format!("unix:?({e})"),
            }),
        }
    }
}
