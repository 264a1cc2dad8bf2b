//! The sockets supd binds for an app and hands to its workers.
//!
//! Every TCP address gets one SO_REUSEPORT socket per instance slot, bound and
//! listening for supd's whole life. The kernel spreads new connections across
//! the slots' sockets; a slot's socket outlives its workers, so a crash, a
//! memory restart or a reload never resets a connection queued in it. Unix
//! sockets cannot be spread by the kernel, so one socket serves every slot.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::fdstore::{adopt_or_bind, StoredFd};
use crate::steer::Groups;
use sup_config::{AppConfig, ListenAddr};

/// A socket and its `LISTEN_FDNAMES` name.
type Named = (Arc<StoredFd>, String);

/// The listening sockets of one slot, in `listen` order.
///
/// Open while the slot has (or is about to have) a worker; closed when the
/// slot is stopped or errored, so clients are refused (or, with
/// `tcp_migrate_req`, moved to other slots) instead of waiting on a socket
/// nobody will ever accept from.
#[derive(Debug)]
pub struct SlotSockets {
    app: String,
    slot: u32,
    backlog: u32,
    // Per address: the shared Unix socket, or None for a per-slot TCP one.
    addrs: Vec<(ListenAddr, Option<Arc<StoredFd>>)>,
    open: Mutex<Option<Vec<Named>>>,
    groups: Groups,
}

impl SlotSockets {
    /// The slot's sockets as raw fds with their `LISTEN_FDNAMES` names, binding them again if they were closed.
    pub fn open(&self) -> Result<Vec<(RawFd, String)>, ListenError> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.is_none() {
            let mut socks = Vec::new();
            for (i, (addr, shared)) in self.addrs.iter().enumerate() {
                let fd = match (addr, shared) {
                    (_, Some(fd)) => fd.clone(),
                    (ListenAddr::Tcp(a), None) => {
                        let base = format!("{}/{}/{i}", self.app, self.slot);
                        let backlog = self.backlog;
                        let stored = adopt_or_bind(&base, |fd| bound_to(fd, addr), || bind_tcp(*a, backlog));
                        let stored = stored.map_err(|e| err(&self.app, addr, e))?;
                        // An adopted socket keeps the backlog it was made with; apply today's.
                        let _ = socket2::SockRef::from(stored.fd()).listen(backlog.min(i32::MAX as u32) as i32);
                        let stored = Arc::new(stored);
                        self.groups.joined(i, self.slot, &stored);
                        stored
                    }
                    (ListenAddr::Unix(_), None) => continue,
                };
                socks.push((fd, self.app.clone()));
            }
            *open = Some(socks);
        }
        Ok(open.iter().flatten().map(|(fd, n)| (fd.as_raw_fd(), n.clone())).collect())
    }

    /// Closes the slot's own sockets (shared Unix sockets stay with the app).
    pub fn close(&self) {
        if self.open.lock().unwrap_or_else(|e| e.into_inner()).take().is_some() {
            self.groups.left(self.slot);
            tracing::debug!(app = %self.app, "closed a slot's listening sockets");
        }
    }
}

/// Why a listener could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on `{addr}` for app `{app}`: {reason}")]
pub struct ListenError {
    /// The app.
    pub app: String,
    /// The address, as configured.
    pub addr: String,
    /// What went wrong.
    pub reason: String,
}

/// The sockets of an app: shared Unix sockets plus per-slot TCP sockets.
#[derive(Debug, Default)]
pub struct AppSockets {
    unix: Vec<Option<Arc<StoredFd>>>,
    /// The SO_REUSEPORT groups of the TCP addresses, for steering during a rollout.
    pub groups: Groups,
}

impl AppSockets {
    /// Binds the Unix sockets of `cfg`, shared by all of its slots.
    pub fn new(cfg: &AppConfig) -> Result<AppSockets, ListenError> {
        if cfg.listen.iter().any(|l| matches!(l, ListenAddr::Tcp(_))) {
            ensure_migrate_req();
        }
        let mut unix = Vec::new();
        for (i, addr) in cfg.listen.iter().enumerate() {
            unix.push(match addr {
                ListenAddr::Unix(path) => {
                    let base = format!("{}/unix/{i}", cfg.name);
                    let stored = adopt_or_bind(&base, |fd| bound_to(fd, addr), || bind_unix(path, cfg.listen_backlog));
                    Some(Arc::new(stored.map_err(|e| err(&cfg.name, addr, e))?))
                }
                ListenAddr::Tcp(_) => None,
            });
        }
        // Sockets passed by systemd joined their groups in an order supd does not know.
        let groups = Groups::new(cfg.listen.len(), crate::fdstore::init() == 0);
        Ok(AppSockets { unix, groups })
    }

    /// Binds a slot's own TCP sockets now (so start-up fails early) and pairs them with the shared ones.
    pub fn for_slot(&self, cfg: &AppConfig, slot: u32) -> Result<SlotSockets, ListenError> {
        let sockets = SlotSockets {
            app: cfg.name.clone(),
            slot,
            backlog: cfg.listen_backlog,
            addrs: cfg.listen.iter().cloned().zip(self.unix.iter().cloned()).collect(),
            open: Mutex::new(None),
            groups: self.groups.clone(),
        };
        sockets.open()?;
        Ok(sockets)
    }
}

fn err(app: &str, addr: &ListenAddr, e: std::io::Error) -> ListenError {
    let reason = if e.kind() == std::io::ErrorKind::AddrInUse {
        "the address is already in use by another program".to_string()
    } else {
        e.to_string()
    };
    ListenError { app: app.to_string(), addr: addr.to_string(), reason }
}

/// Whether a socket passed by systemd is bound where `addr` says (the config may have changed meanwhile).
fn bound_to(fd: &OwnedFd, addr: &ListenAddr) -> bool {
    let Ok(local) = socket2::SockRef::from(fd).local_addr() else { return false };
    match addr {
        ListenAddr::Tcp(a) => local.as_socket() == Some(*a),
        // Only while its file is still there: clients find a Unix socket by path.
        ListenAddr::Unix(p) => {
            use std::os::unix::fs::FileTypeExt;
            local.as_pathname() == Some(p.as_path())
                && std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
        }
    }
}

fn bind_tcp(addr: SocketAddr, backlog: u32) -> std::io::Result<OwnedFd> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.bind(&addr.into())?;
    sock.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(sock.into())
}

fn bind_unix(path: &Path, backlog: u32) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::from(std::io::ErrorKind::AddrInUse));
        }
        std::fs::remove_file(path)?;
    }
    let sock = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    sock.bind(&SockAddr::unix(path)?)?;
    sock.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(sock.into())
}

const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Makes sure (once per supd) `net.ipv4.tcp_migrate_req` is on, so that closing a slot's socket
/// (scale-down) moves the connections queued in it to the remaining slots
/// instead of resetting them. Kernels before 5.14 lack it; there, such
/// connections are reset, as documented.
pub fn ensure_migrate_req() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(set_migrate_req);
}

fn set_migrate_req() {
    match std::fs::read_to_string(MIGRATE_REQ) {
        Err(_) => tracing::warn!(
            "this kernel has no net.ipv4.tcp_migrate_req: scaling down may reset connections queued in removed slots"
        ),
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => match std::fs::write(MIGRATE_REQ, "1") {
            Ok(()) => tracing::info!("set net.ipv4.tcp_migrate_req = 1 so that scale-down never resets queued connections"),
            Err(e) => tracing::warn!(
                "cannot set net.ipv4.tcp_migrate_req = 1 ({e}): scaling down may reset connections queued in removed slots; set it with sysctl"
            ),
        },
    }
}
