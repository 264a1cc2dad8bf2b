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
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::listen::Listener;

/// State shared by every connection.
pub struct Shared {
    /// Body of `GET /`, fixed for the life of the process.
    root: Bytes,
    /// Set once graceful shutdown began: every later response says `Connection: close`.
    closing: AtomicBool,
}

impl Shared {
    /// Builds the shared state for this process.
    pub fn new(pid: u32, instance: &str) -> Arc<Shared> {
        Arc::new(Shared {
            root: Bytes::from(format!("pid={pid} instance={instance}\n")),
            closing: AtomicBool::new(false),
        })
    }
}

/// Serves on all listeners until `stop` resolves, then drains in-flight requests and returns.
pub async fn run(listeners: Vec<Listener>, shared: Arc<Shared>, stop: impl Future<Output = ()>) {
    let graceful = Arc::new(GracefulShutdown::new());
    let accepts: Vec<_> =
        listeners.into_iter().map(|l| tokio::spawn(accept_loop(l, shared.clone(), graceful.clone()))).collect();

    stop.await;

    shared.closing.store(true, Ordering::SeqCst);
    // Aborting and awaiting the accept tasks drops (closes) the listeners before we
    // start waiting, so new connections are refused rather than queued.
    for task in &accepts {
        task.abort();
    }
    for task in accepts {
        let _ = task.await;
    }
    match Arc::try_unwrap(graceful) {
        Ok(graceful) => graceful.shutdown().await,
        // Unreachable: the accept tasks held the only other references and are gone.
        Err(_) => warn!("sup-demo: graceful shutdown unavailable, exiting without draining"),
    }
}

async fn accept_loop(listener: Listener, shared: Arc<Shared>, graceful: Arc<GracefulShutdown>) {
    loop {
        let accepted = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, _)| {
                // Small keep-alive request/response pairs: do not wait on Nagle.
                let _ = s.set_nodelay(true);
                serve_conn(s, &shared, &graceful);
            }),
            Listener::Unix(l) => l.accept().await.map(|(s, _)| serve_conn(s, &shared, &graceful)),
        };
        if let Err(e) = accepted {
            // Typically EMFILE/ENFILE: back off instead of spinning on the error.
            warn!("sup-demo: accept on {} failed: {e}", listener.addr());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn serve_conn<S>(stream: S, shared: &Arc<Shared>, graceful: &GracefulShutdown)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = shared.clone();
    let svc = service_fn(move |req| handle(req, shared.clone()));
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
    let conn = graceful.watch(conn);
    tokio::spawn(async move {
        // Errors here are clients hanging up mid-request; nothing to report.
        let _ = conn.await;
    });
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Result<Response<Full<Bytes>>, Infallible> {
    let readable = matches!(*req.method(), Method::GET | Method::HEAD);
    let mut resp = match (readable, req.uri().path()) {
        (true, "/") => text(StatusCode::OK, shared.root.clone()),
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
