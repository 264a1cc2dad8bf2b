//! HTTP and TCP readiness probes against a worker's own port.
//!
//! During a reload the old worker may still answer on the same port, so a
//! probe first checks that the *new* worker (or one of its children) holds a
//! listening socket on the port, read from /proc; only then is the port
//! connected to. The HTTP answer itself may come from either worker.

use std::io::BufRead;
use std::time::Duration;

use sup_config::ReadyCheck;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Time before the second attempt; it grows by half after each miss.
const FIRST_INTERVAL: Duration = Duration::from_millis(100);
/// Longest time between attempts, so hundreds of starting workers stay cheap.
const MAX_INTERVAL: Duration = Duration::from_millis(500);
/// Longest a single attempt may take.
const ATTEMPT: Duration = Duration::from_secs(1);

/// Probes until worker `pid` listens on `port` and the port answers as `check` requires.
pub async fn until_ready(check: ReadyCheck, port: u16, pid: i32) {
    let mut interval = FIRST_INTERVAL;
    loop {
        // /proc reads block (and are slow while the kernel is busy): never on the event loop.
        let listening = tokio::task::spawn_blocking(move || listens_on(pid, port)).await.unwrap_or(false);
        if listening && tokio::time::timeout(ATTEMPT, once(&check, port)).await.unwrap_or(false) {
            return;
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 3 / 2).min(MAX_INTERVAL);
    }
}

/// True when `pid` or one of its children holds a TCP socket listening on `port`.
///
/// Blocking: reads /proc.
pub fn listens_on(pid: i32, port: u16) -> bool {
    let mut pids = vec![pid];
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                pids.extend(c.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
    }
    let mut inodes = std::collections::HashSet::new();
    for p in &pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{p}/fd")) else { continue };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    // The tables list every socket of the namespace; skip them when there is
    // nothing to look for, and stop at the first match (tcp6 only if needed).
    !inodes.is_empty() && ["tcp", "tcp6"].iter().any(|table| table_has_listener(pid, table, port, &inodes))
}

/// True when /proc/PID/net/TABLE lists a socket of `inodes` listening on `port`.
fn table_has_listener(pid: i32, table: &str, port: u16, inodes: &std::collections::HashSet<String>) -> bool {
    let Ok(file) = std::fs::File::open(format!("/proc/{pid}/net/{table}")) else { return false };
    std::io::BufReader::new(file).lines().skip(1).map_while(Result::ok).any(|line| {
        let mut cols = line.split_whitespace();
        // local_address is ADDR:PORT in hex; state 0A is LISTEN; column 9 is the inode.
        let local = cols.nth(1);
        let state = cols.nth(1);
        let inode = cols.nth(5);
        state == Some("0A")
            && local.and_then(|a| a.rsplit(':').next()).and_then(|h| u16::from_str_radix(h, 16).ok()) == Some(port)
            && inode.is_some_and(|i| inodes.contains(i))
    })
}

/// Probes the port every 100 ms for `window`; returns why, at the first failure.
///
/// The port is shared by every slot of the app, so a probe may be answered by
/// any of them: this proves the app's port stays healthy while the new worker
/// is in its window (its old worker has drained by then), not the new worker
/// alone.
pub async fn fails_within(check: &ReadyCheck, port: u16, window: Duration) -> Option<String> {
    let end = tokio::time::Instant::now() + window;
    while tokio::time::Instant::now() < end {
        if !tokio::time::timeout(ATTEMPT, once(check, port)).await.unwrap_or(false) {
            return Some(match check {
                ReadyCheck::Http { path } => format!("GET {path} on port {port} was not answered 2xx"),
                _ => format!("port {port} refused a connection"),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// One attempt: a TCP connect, or `GET path` answered 2xx.
pub async fn once(check: &ReadyCheck, port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else { return false };
    let path = match check {
        ReadyCheck::Http { path } => path,
        _ => return true,
    };
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: supd-probe\r\nConnection: close\r\n\r\n");
    if stream.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    // "HTTP/1.1 200" is all we need.
    let mut head = [0u8; 12];
    let mut got = 0;
    while got < head.len() {
        match stream.read(&mut head[got..]).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => got += n,
        }
    }
    head.starts_with(b"HTTP/1.") && head[8] == b' ' && head[9] == b'2'
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn serve_once(listener: TcpListener, answer: &'static [u8]) {
        if let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(answer).await;
        }
    }

    #[tokio::test]
    async fn http_probe_wants_2xx() {
        for (answer, want) in [(&b"HTTP/1.1 204 No Content\r\n\r\n"[..], true), (b"HTTP/1.1 503 Busy\r\n\r\n", false)] {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = l.local_addr().unwrap().port();
            let server = tokio::spawn(serve_once(l, answer));
            assert_eq!(once(&ReadyCheck::Http { path: "/health".into() }, port).await, want);
            server.await.unwrap();
        }
    }

    #[test]
    fn ownership_of_a_listener_is_found_in_proc() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let me = std::process::id() as i32;
        assert!(listens_on(me, port));
        drop(l);
        assert!(!listens_on(me, port));
    }

    #[tokio::test]
    async fn tcp_probe_wants_a_listener() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(once(&ReadyCheck::Tcp, port).await);
        drop(l);
        assert!(!once(&ReadyCheck::Tcp, port).await);
    }
}
