//! The sd_notify protocol on each worker's own datagram socket.
//!
//! One socket per worker (not per slot): during a reload the old and the new
//! worker of a slot run side by side, and a `READY=1` must be attributed to
//! the right one even when a helper process sends it.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use tokio::io::Interest;
use tokio::net::UnixDatagram;

/// Largest datagram read; longer ones are truncated (systemd uses the same bound).
const MAX_DATAGRAM: usize = 4096;

/// One field of a notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyMsg {
    /// `READY=1`.
    Ready,
    /// `RELOADING=1`.
    Reloading,
    /// `STOPPING=1`.
    Stopping,
    /// `STATUS=…`.
    Status(String),
    /// `WATCHDOG=1`.
    Watchdog,
    /// `WATCHDOG=trigger`.
    WatchdogTrigger,
    /// `EXTEND_TIMEOUT_USEC=…`.
    ExtendTimeout(Duration),
    /// `BARRIER=1`; the fd that came with it is already closed.
    Barrier,
}

/// Parses one datagram into the fields supd acts on; unknown fields are ignored.
pub fn parse(datagram: &[u8]) -> Vec<NotifyMsg> {
    let text = String::from_utf8_lossy(datagram);
    let mut out = Vec::new();
    for line in text.split('\n') {
        let Some((key, value)) = line.split_once('=') else { continue };
        let msg = match (key, value) {
            ("READY", "1") => NotifyMsg::Ready,
            ("RELOADING", "1") => NotifyMsg::Reloading,
            ("STOPPING", "1") => NotifyMsg::Stopping,
            ("STATUS", s) => NotifyMsg::Status(s.chars().take(512).collect()),
            ("WATCHDOG", "1") => NotifyMsg::Watchdog,
            ("WATCHDOG", "trigger") => NotifyMsg::WatchdogTrigger,
            ("EXTEND_TIMEOUT_USEC", v) => match v.parse::<u64>() {
                Ok(us) => NotifyMsg::ExtendTimeout(Duration::from_micros(us)),
                Err(_) => continue,
            },
            ("BARRIER", "1") => NotifyMsg::Barrier,
            _ => continue,
        };
        out.push(msg);
    }
    out
}

/// A worker's notify socket; the file is removed on drop.
#[derive(Debug)]
pub struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    /// Binds a fresh socket at `path`, replacing a stale file; `owner` lets a worker running as another user send to it.
    pub fn bind(path: &Path, owner: Option<(u32, u32)>) -> std::io::Result<NotifySocket> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let sock = UnixDatagram::bind(path)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
        }
        Ok(NotifySocket { sock, path: path.to_path_buf() })
    }

    /// The socket's path, for `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next datagram; closes any fds passed with it (which releases a `BARRIER=1` waiter).
    pub async fn recv(&self) -> std::io::Result<Vec<NotifyMsg>> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let fd = self.sock.as_raw_fd();
        let (len, fds) = self.sock.async_io(Interest::READABLE, || recv_with_fds(fd, &mut buf)).await?;
        // Dropping closes them: never leak a descriptor a worker sends us.
        drop(fds);
        Ok(parse(&buf[..len]))
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    let mut cmsg = nix::cmsg_space!([RawFd; 16]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT)
        .map_err(std::io::Error::from)?;
    let mut fds = Vec::new();
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: SCM_RIGHTS hands us fresh descriptors nobody else owns.
                fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
    }
    Ok((msg.bytes, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_parse() {
        let cases: &[(&[u8], Vec<NotifyMsg>)] = &[
            (b"READY=1", vec![NotifyMsg::Ready]),
            (b"READY=1\nSTATUS=serving 4", vec![NotifyMsg::Ready, NotifyMsg::Status("serving 4".into())]),
            (b"EXTEND_TIMEOUT_USEC=2500000", vec![NotifyMsg::ExtendTimeout(Duration::from_millis(2500))]),
            (b"EXTEND_TIMEOUT_USEC=abc\nWATCHDOG=1", vec![NotifyMsg::Watchdog]),
            (b"READY=0\nFOO=bar\ngarbage\n\xff\xfe", vec![]),
            (b"BARRIER=1\nSTOPPING=1", vec![NotifyMsg::Barrier, NotifyMsg::Stopping]),
        ];
        for (input, want) in cases {
            assert_eq!(&parse(input), want, "{}", String::from_utf8_lossy(input));
        }
    }
}
