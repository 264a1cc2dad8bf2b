//! HTTP and TCP readiness probes against a worker's own port.

use std::time::Duration;

use sup_config::ReadyCheck;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Time between probe attempts.
const INTERVAL: Duration = Duration::from_millis(100);
/// Longest a single attempt may take.
const ATTEMPT: Duration = Duration::from_secs(1);

/// Probes 127.0.0.1:`port` until it answers as `check` requires; never returns otherwise.
pub async fn until_ready(check: ReadyCheck, port: u16) {
    loop {
        if tokio::time::timeout(ATTEMPT, once(&check, port)).await.unwrap_or(false) {
            return;
        }
        tokio::time::sleep(INTERVAL).await;
    }
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

    #[tokio::test]
    async fn tcp_probe_wants_a_listener() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(once(&ReadyCheck::Tcp, port).await);
        drop(l);
        assert!(!once(&ReadyCheck::Tcp, port).await);
    }
}
