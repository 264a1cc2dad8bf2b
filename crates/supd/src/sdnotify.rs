//! supd's side of the sd_notify protocol, talking to systemd.
//!
//! `Type=notify` (systemd 247 and newer): READY=1 once every autostart app has
//! started (or definitively failed), STOPPING=1 on shutdown, a STATUS= summary
//! that names a failed config apply, and WATCHDOG=1 from a timer on the event
//! loop, so a stuck loop stops the pings. `systemctl reload` runs `supctl
//! config apply` (ExecReload=), which can fail; a bare SIGHUP is bracketed by
//! RELOADING=1 (with the MONOTONIC_USEC that `notify-reload` units want) and
//! READY=1.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A connection to systemd's notify socket, if supd runs under one.
pub struct Notifier {
    sock: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    /// Half of WATCHDOG_USEC, when systemd wants pings from us.
    pub watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads NOTIFY_SOCKET and WATCHDOG_USEC/WATCHDOG_PID from supd's environment.
    pub fn from_env() -> Notifier {
        let sock = std::env::var("NOTIFY_SOCKET").ok().and_then(|path| {
            use std::os::linux::net::SocketAddrExt;
            let addr = match path.strip_prefix('@') {
                Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok()?,
                None => std::os::unix::net::SocketAddr::from_pathname(&path).ok()?,
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        let for_us = std::env::var("WATCHDOG_PID").map_or(true, |p| p.trim() == std::process::id().to_string());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|u| *u > 0 && for_us)
            .map(|u| Duration::from_micros(u / 2));
        Notifier { sock, watchdog }
    }

    /// Sends one message; a missing socket is not an error (supd runs in the foreground).
    pub fn send(&self, msg: &str) {
        if let Some((sock, addr)) = &self.sock {
            if let Err(e) = sock.send_to_addr(msg.as_bytes(), addr) {
                tracing::warn!("sd_notify failed: {e}");
            }
        }
    }

    /// RELOADING=1 with the monotonic timestamp systemd requires for notify-reload.
    pub fn reloading(&self, status: &str) {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes into the timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000;
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS={status}"));
    }
}
