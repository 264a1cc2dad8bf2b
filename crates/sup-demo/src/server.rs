//! The HTTP/1.1 service, the accept loops and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::listen::Listener;

/// State shared by every connection.
pub struct Shared {
    /// Body of `GET /`, fixed for the life of the process.
    root: Bytes,
    /// Set once graceful shutdown began: every later response says `Connection: close`.
    closing: AtomicBool,
    /// From then on `/health` answers 500.
    unhealthy_at: Option<std::time::Instant>,
}

impl Shared {
    /// Builds the shared state for this process.
    pub fn new(pid: u32, instance: &str, unhealthy_at: Option<std::time::Instant>) -> Arc<Shared> {
        Arc::new(Shared {
            root: Bytes::from(format!("pid={pid} instance={instance}\n")),
            closing: AtomicBool::new(false),
            unhealthy_at,
        })
    }
}

/// Per-connection view of the shutdown: a flag and a drain counter.
#[derive(Clone)]
struct Drain {
    stop: tokio::sync::watch::Receiver<bool>,
    // Dropped when the connection ends; `run` waits until every clone is gone.
    _alive: tokio::sync::mpsc::Sender<()>,
}

/// Serves on all listeners until `stop` resolves, then drains in-flight requests and returns.
pub async fn run(listeners: Vec<Listener>, shared: Arc<Shared>, stop: impl Future<Output = ()>) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (alive_tx, mut alive_rx) = tokio::sync::mpsc::channel::<()>(1);
    let drain = Drain { stop: stop_rx, _alive: alive_tx };
    let accepts: Vec<_> =
        listeners.into_iter().map(|l| tokio::spawn(accept_loop(l, shared.clone(), drain.clone()))).collect();
    drop(drain);

    stop.await;

    shared.closing.store(true, Ordering::SeqCst);
    // Aborting and awaiting the accept tasks drops (closes) our copies of the
    // listeners; under a supervisor that holds the sockets, connections still
    // queued wait for the next worker.
    for task in &accepts {
        task.abort();
    }
    for task in accepts {
        let _ = task.await;
    }
    let _ = stop_tx.send(true);
    // Returns None once every connection task has ended.
    let _ = alive_rx.recv().await;
}

async fn accept_loop(listener: Listener, shared: Arc<Shared>, drain: Drain) {
    loop {
        let accepted = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, _)| {
                // Small keep-alive request/response pairs: do not wait on Nagle.
                let _ = s.set_nodelay(true);
                serve_conn(s, &shared, &drain);
            }),
            Listener::Unix(l) => l.accept().await.map(|(s, _)| serve_conn(s, &shared, &drain)),
        };
        if let Err(e) = accepted {
            // Typically EMFILE/ENFILE: back off instead of spinning on the error.
            warn!("sup-demo: accept on {} failed: {e}", listener.addr());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// How long a connection accepted just before shutdown has to send its first request.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(10);

fn serve_conn<S>(stream: S, shared: &Arc<Shared>, drain: &Drain)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = shared.clone();
    let served = Arc::new(AtomicBool::new(false));
    let seen = served.clone();
    let svc = service_fn(move |req| {
        seen.store(true, Ordering::SeqCst);
        handle(req, shared.clone())
    });
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
    let mut drain = drain.clone();
    tokio::spawn(async move {
        let mut conn = std::pin::pin!(conn);
        // Errors are clients hanging up mid-request; nothing to report.
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = drain.stop.wait_for(|s| *s) => {}
        }
        if served.load(Ordering::SeqCst) {
            // Idle keep-alive connections close now; a request in flight finishes
            // and its response says `Connection: close`.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        } else {
            // Accepted but no request read yet: the client is about to send one
            // and expects an answer, which will say `Connection: close`.
            let _ = tokio::time::timeout(FIRST_REQUEST_GRACE, conn.as_mut()).await;
        }
    });
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Result<Response<Full<Bytes>>, Infallible> {
    let readable = matches!(*req.method(), Method::GET | Method::HEAD);
    let mut resp = match (readable, req.uri().path()) {
        (true, "/") => text(StatusCode::OK, shared.root.clone()),
        (true, "/health") if shared.unhealthy_at.is_some_and(|t| std::time::Instant::now() >= t) => {
            text(StatusCode::INTERNAL_SERVER_ERROR, Bytes::from_static(b"unhealthy\n"))
        }
        (true, "/health") => text(StatusCode::OK, Bytes::from_static(b"ok\n")),
        (true, "/slow") => match slow_ms(req.uri().query()) {
            Some(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                text(StatusCode::OK, Bytes::from(format!("slept {ms}ms\n")))
            }
            None => text(StatusCode::BAD_REQUEST, Bytes::from_static(b"expected /slow?ms=N\n")),
        },
        (false, "/" | "/health" | "/slow") => {
            text(StatusCode::METHOD_NOT_ALLOWED, Bytes::from_static(b"method not allowed\n"))
        }
        _ => text(StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
    };
    // hyper adds this too for connections it was told to wind down; being explicit
    // also covers responses that race with the start of the shutdown.
    if shared.closing.load(Ordering::SeqCst) {
        resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

fn text(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

/// Extracts `ms=N` from a query string.
fn slow_ms(query: Option<&str>) -> Option<u64> {
    query?.split('&').find_map(|kv| kv.strip_prefix("ms=")).and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::slow_ms;

    #[test]
    fn slow_query() {
        assert_eq!(slow_ms(Some("ms=250")), Some(250));
        assert_eq!(slow_ms(Some("a=1&ms=7")), Some(7));
        assert_eq!(slow_ms(Some("ms=x")), None);
        assert_eq!(slow_ms(None), None);
    }
}
