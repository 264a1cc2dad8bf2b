//! systemd's file descriptor store: listening sockets that survive a supd crash.
//!
//! Under a unit with `FileDescriptorStoreMax=` (see `wanted` for how supd
//! tells, on systemd 247 and newer), supd hands each listening socket to systemd (`FDSTORE=1`) when it binds it
//! and takes it back out (`FDSTOREREMOVE=1`) when it closes it. If supd dies,
//! systemd keeps the sockets open, so clients queue in their backlog instead of
//! being refused, and passes them to the restarted supd in `LISTEN_FDS`, under
//! the names they were stored with. supd then adopts them instead of binding
//! again, and the queued connections are served by the new workers.
//!
//! Sockets are adopted by the address they are bound to, not by name, so a
//! renamed app or a reordered `listen` still gets its sockets back.
//!
//! On a graceful shutdown the sockets are left in the store: on `systemctl
//! restart` (an upgrade) systemd hands them to the next supd, so clients wait
//! through the restart instead of being refused; on `systemctl stop` systemd
//! empties the store itself.
//!
//! Names are `BASE#PID.N`: BASE says which socket it is (`app/slot/index`, for
//! people reading systemd's state), the suffix keeps every stored socket's name
//! unique, because systemd removes by name only.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use nix::sys::socket::{sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr};

struct Store {
    // systemd's notify socket, when it keeps an fd store for us.
    notify: Option<(OwnedFd, UnixAddr)>,
    inherited: Mutex<Vec<(OwnedFd, String)>>,
    seq: AtomicU64,
}

static STORE: OnceLock<Store> = OnceLock::new();

/// Whether closing a socket takes it out of the store. Off until supd has
/// started (a failed start leaves the sockets to the next try) and again once
/// it shuts down: then systemd decides (a restart hands them to the next
/// supd; a stop empties the store).
static REMOVE_ON_CLOSE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// supd has started: from now on a socket supd closes leaves the store too.
pub fn started() {
    REMOVE_ON_CLOSE.store(true, Ordering::SeqCst);
}

/// Keeps every stored socket in systemd's store from now on, as supd shuts down.
pub fn keep_on_exit() {
    REMOVE_ON_CLOSE.store(false, Ordering::SeqCst);
}

/// Reads `LISTEN_FDS`, `LISTEN_FDNAMES`, `FDSTORE`, `INVOCATION_ID` and `NOTIFY_SOCKET`; call once, early in supd's `main`.
pub fn init() -> usize {
    store().inherited.lock().map(|v| v.len()).unwrap_or(0)
}

fn store() -> &'static Store {
    STORE.get_or_init(|| Store { notify: notify_target(), inherited: Mutex::new(inherited()), seq: AtomicU64::new(0) })
}

fn notify_target() -> Option<(OwnedFd, UnixAddr)> {
    if !wanted(std::env::var("FDSTORE").ok().as_deref(), std::env::var_os("INVOCATION_ID").is_some()) {
        return None;
    }
    let path = std::env::var("NOTIFY_SOCKET").ok()?;
    let addr = match path.strip_prefix('@') {
        Some(name) => UnixAddr::new_abstract(name.as_bytes()).ok()?,
        None => UnixAddr::new(path.as_str()).ok()?,
    };
    let sock = socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).ok()?;
    Some((sock, addr))
}

/// Whether to store sockets: systemd 254 and newer say so with `$FDSTORE`
/// (the unit's `FileDescriptorStoreMax=`, absent when 0). Older systemd keeps
/// an fd store just as well but never says so; there supd stores whenever it
/// runs as a systemd service (`$INVOCATION_ID`, set since systemd 232), and a
/// unit without `FileDescriptorStoreMax=` only logs that it drops them.
fn wanted(fdstore: Option<&str>, under_systemd: bool) -> bool {
    match fdstore {
        Some(max) => max.trim().parse::<u64>().is_ok_and(|m| m > 0),
        None => under_systemd,
    }
}

/// The sockets systemd passed to this process, with their names.
fn inherited() -> Vec<(OwnedFd, String)> {
    let ours = std::env::var("LISTEN_PID").ok().and_then(|p| p.trim().parse::<u32>().ok()) == Some(std::process::id());
    let n: i32 = std::env::var("LISTEN_FDS").ok().and_then(|n| n.trim().parse().ok()).unwrap_or(0);
    if !ours || n <= 0 {
        return Vec::new();
    }
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names.split(':');
    (0..n)
        .map(|i| {
            let fd: RawFd = 3 + i;
            // Not for the workers: they get their own copies explicitly.
            // SAFETY: fcntl on an fd number has no memory-safety preconditions.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            // SAFETY: systemd passed fds 3..3+LISTEN_FDS to this process; nothing else owns them.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            (owned, names.next().unwrap_or("").to_string())
        })
        .collect()
}

/// A listening socket, registered in systemd's store while it lives.
#[derive(Debug)]
pub struct StoredFd {
    fd: OwnedFd,
    name: Option<String>,
}

impl StoredFd {
    /// The socket.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }
}

impl AsRawFd for StoredFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for StoredFd {
    fn drop(&mut self) {
        // A panic unwinding through supd is a crash: exactly when the store must keep the sockets.
        if !REMOVE_ON_CLOSE.load(Ordering::SeqCst) || std::thread::panicking() {
            return;
        }
        if let Some(name) = &self.name {
            send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), None);
        }
    }
}

/// Adopts a socket systemd passed that `fits` (is bound where the config says,
/// whatever its name: the app may have been renamed or its `listen` reordered),
/// else calls `bind` and stores the new socket under a name made from `base`.
pub fn adopt_or_bind(
    base: &str,
    fits: impl Fn(&OwnedFd) -> bool,
    bind: impl FnOnce() -> std::io::Result<OwnedFd>,
) -> std::io::Result<StoredFd> {
    let s = store();
    {
        let mut inherited = s.inherited.lock().unwrap_or_else(|e| e.into_inner());
        let found = inherited.iter().position(|(fd, _)| fits(fd));
        if let Some(i) = found {
            let (fd, name) = inherited.swap_remove(i);
            tracing::info!("adopted listening socket `{name}` from systemd's fd store");
            return Ok(StoredFd { fd, name: (!name.is_empty()).then_some(name) });
        }
    }
    let fd = bind()?;
    if s.notify.is_none() {
        return Ok(StoredFd { fd, name: None });
    }
    let name = format!("{base}#{}.{}", std::process::id(), s.seq.fetch_add(1, Ordering::Relaxed));
    let stored = send(&format!("FDSTORE=1\nFDNAME={name}"), Some(fd.as_raw_fd()));
    Ok(StoredFd { fd, name: stored.then_some(name) })
}

/// Closes the passed sockets no app claimed (its config changed while supd was down) and drops them from the store.
pub fn release_leftovers() -> usize {
    let left = std::mem::take(&mut *store().inherited.lock().unwrap_or_else(|e| e.into_inner()));
    for (_, name) in &left {
        tracing::info!("closing listening socket `{name}` from systemd's fd store: no app uses it now");
        if !name.is_empty() {
            send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), None);
        }
    }
    left.len()
}

/// Whether sockets are being stored (supd runs under a unit with an fd store).
pub fn enabled() -> bool {
    store().notify.is_some()
}

fn send(msg: &str, fd: Option<RawFd>) -> bool {
    let Some((sock, addr)) = &store().notify else { return false };
    let iov = [IoSlice::new(msg.as_bytes())];
    let fds = fd.map(|f| [f]);
    let cmsgs: Vec<ControlMessage> = fds.as_ref().map(|f| ControlMessage::ScmRights(f)).into_iter().collect();
    // Never block the event loop on a full notify queue.
    match sendmsg(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT, Some(addr)) {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!("cannot update systemd's fd store ({}): {e}", msg.lines().next().unwrap_or(""));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::wanted;

    #[test]
    fn stores_on_every_systemd_with_a_store_and_nowhere_else() {
        // systemd 254+: FDSTORE says how many, and is absent when there is no store.
        assert!(wanted(Some("4096"), true));
        assert!(!wanted(Some("0"), true));
        assert!(!wanted(Some("junk"), true));
        // systemd 247..253 never sets FDSTORE: a service there still stores.
        assert!(wanted(None, true));
        // Not a systemd service (a terminal, a container's PID 1, another supervisor).
        assert!(!wanted(None, false));
    }
}
