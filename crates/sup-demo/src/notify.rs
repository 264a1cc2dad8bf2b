//! The sd_notify readiness protocol: datagrams such as `READY=1` sent to $NOTIFY_SOCKET.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

/// An unbound datagram socket aimed at the supervisor's notify socket.
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    target: String,
}

impl Notifier {
    /// Builds a notifier from $NOTIFY_SOCKET; `None` when it is unset or unusable (reported on stderr).
    pub fn from_env() -> Option<Notifier> {
        let target = std::env::var("NOTIFY_SOCKET").ok().filter(|s| !s.is_empty())?;
        match Self::open(&target) {
            Ok(n) => Some(n),
            Err(e) => {
                warn!("sup-demo: NOTIFY_SOCKET={target:?} unusable: {e}");
                None
            }
        }
    }

    fn open(target: &str) -> io::Result<Notifier> {
        let addr = match target.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
            None => SocketAddr::from_pathname(target)?,
        };
        let sock = UnixDatagram::unbound()?;
        // A stuck supervisor must never stall the (single) runtime thread.
        sock.set_nonblocking(true)?;
        Ok(Notifier { sock, addr, target: target.to_owned() })
    }

    /// Sends one datagram; newline-separated assignments like `READY=1\nSTATUS=...`.
    pub fn send(&self, msg: &str) -> io::Result<()> {
        self.sock.send_to_addr(msg.as_bytes(), &self.addr).map(drop)
    }

    /// Sends and reports a failure on stderr instead of failing the caller.
    pub fn send_or_warn(&self, msg: &str) {
        if let Err(e) = self.send(msg) {
            warn!("sup-demo: notify {:?} to {:?} failed: {e}", msg.replace('\n', " "), self.target);
        }
    }
}

/// Half of $WATCHDOG_USEC, the ping period systemd recommends; `None` if no watchdog is wanted.
pub fn watchdog_period() -> Option<Duration> {
    // WATCHDOG_PID, when present, says which process the watchdog is meant for.
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// Sends `WATCHDOG=1` every `period` until `stop_at` (if any), then falls silent.
pub async fn watchdog(notifier: Arc<Notifier>, period: Duration, stop_at: Option<Instant>) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        let now = tick.tick().await;
        if stop_at.is_some_and(|s| now >= s) {
            return;
        }
        // Report only the first failure: a gone supervisor would otherwise flood stderr.
        if let Err(e) = notifier.send("WATCHDOG=1") {
            if !warned {
                warn!("sup-demo: watchdog ping to {:?} failed: {e}", notifier.target);
                warned = true;
            }
        }
    }
}
