//! The control API: HTTP/1.1 + JSON over a Unix socket.
//!
//! Routes (all under `/v1`): `GET /status[?app=NAME]`; `POST /start`,
//! `/stop`, `/restart` with an [`ActionRequest`] body, answered with one JSON
//! document; `POST /reload` ([`ActionRequest`]), `/scale` ([`ScaleRequest`])
//! and `/config/apply`, answered with a stream of newline-delimited
//! [`RolloutEvent`]s ending with `done`. Errors are
//! `{"error":{"code":…,"message":…}}`. Requests are bounded in size, header
//! time and number of connections, `logs` followers in number and in what
//! waits for them; peers are checked by their credentials.

use std::convert::Infallible;
use std::future::Future;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::de::DeserializeOwned;
use sup_proto::{ActionRequest, ActionResponse, ErrorBody, RolloutEvent, ScaleRequest, API_PREFIX, MAX_REQUEST_BODY};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, Semaphore};

use crate::app::Progress;
use crate::supervisor::{ApiError, Supervisor, Verb};

/// Connections of peers that may not use the socket, each answered 403; more are closed at once.
const MAX_REFUSED_CONNECTIONS: usize = 16;
/// Connections being answered 503 at once; more are closed without an answer.
const MAX_BUSY_REFUSALS: usize = 64;
/// Time a client has to send its headers, and then its body.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a connection may sit without a complete request header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// `logs -f` followers at once: each holds a connection and a bounded queue.
const MAX_FOLLOWERS: usize = 32;
/// Most supplementary groups read from a peer's credentials (the kernel's NGROUPS_MAX).
const MAX_PEER_GROUPS: usize = 65_536;
/// Longest command line of a peer written into supd's log.
const MAX_CMDLINE_LOGGED: usize = 512;
/// Time given to reading a peer's command line before an acting request is logged without it.
const CMDLINE_TIMEOUT: Duration = Duration::from_millis(500);
/// The routes a member of `control_socket_read_group` may use, all with GET: they change nothing.
const READ_ROUTES: &[&str] = &["/status", "/logs", "/describe", "/events", "/history"];

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another supd answers on the socket.
    #[error("control socket `{0}` is in use by a running supd; stop it first or choose another control_socket")]
    InUse(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("`{0}` exists and is not a socket; remove it or choose another control_socket")]
    NotASocket(PathBuf),
    /// A system call failed.
    #[error("cannot set up control socket `{path}`: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Binds the control socket with its mode and group, replacing a stale socket file but never a live one.
pub fn bind(path: &Path, mode: u32, group: Option<u32>) -> Result<UnixListener, ControlError> {
    let io = |source| ControlError::Io { path: path.to_path_buf(), source };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ControlError::NotASocket(path.to_path_buf()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse(path.to_path_buf()));
        }
        tracing::info!("removing stale control socket {}", path.display());
        std::fs::remove_file(path).map_err(io)?;
    }
    // Bind under a private name and rename into place, so the socket is never
    // reachable with the default permissions.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(io)?;
    let set_up = (|| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        if let Some(gid) = group {
            std::os::unix::fs::chown(&tmp, None, Some(gid))?;
        }
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = set_up {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(listener)
}

/// Who may talk to supd: root, supd's own user and members of
/// `control_socket_group` may do anything; members of
/// `control_socket_read_group` may only read.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    /// supd's effective uid.
    pub owner: u32,
    /// `control_socket_group`: its members may act.
    pub group: Option<u32>,
    /// `control_socket_read_group`: its members may read.
    pub read_group: Option<u32>,
}

/// What a peer may do on the control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything: root, supd's own user, members of `control_socket_group`.
    Act,
    /// Only the read routes: members of `control_socket_read_group`.
    Read,
    /// Nothing: every request is answered 403.
    Stranger,
}

impl Access {
    /// The role of a peer from its credentials as the kernel gave them at
    /// connect: uid, primary gid and exact supplementary groups.
    fn role(&self, uid: u32, gid: u32, groups: &[u32]) -> Role {
        if uid == 0 || uid == self.owner {
            return Role::Act;
        }
        let member = |g: Option<u32>| g.is_some_and(|g| gid == g || groups.contains(&g));
        if member(self.group) {
            Role::Act
        } else if member(self.read_group) {
            Role::Read
        } else {
            Role::Stranger
        }
    }
}

/// The supplementary groups of the peer of `fd` as they were at connect
/// (`SO_PEERGROUPS`): exact, and unlike the peer's /proc status neither
/// blocking nor racing with the peer's exit. Empty if the kernel cannot tell.
fn peer_groups(fd: RawFd) -> Vec<u32> {
    let mut groups = vec![0u32; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<u32>()) as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `groups`, which holds that many.
        let r = unsafe {
            libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERGROUPS, groups.as_mut_ptr().cast(), &mut len)
        };
        let n = len as usize / std::mem::size_of::<u32>();
        if r == 0 {
            groups.truncate(n);
            return groups;
        }
        // ERANGE: `len` now says how much room the list needs.
        if nix::errno::Errno::last() == nix::errno::Errno::ERANGE && n > groups.len() && n <= MAX_PEER_GROUPS {
            groups.resize(n, 0);
            continue;
        }
        return Vec::new();
    }
}

/// The command line of process `pid`, for the log (blocking: reads /proc).
fn cmdline(pid: i32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let text: String =
        String::from_utf8_lossy(&raw).split('\0').filter(|a| !a.is_empty()).collect::<Vec<_>>().join(" ");
    let mut text: String = text.chars().filter(|c| !c.is_control()).collect();
    if text.chars().count() > MAX_CMDLINE_LOGGED {
        text = text.chars().take(MAX_CMDLINE_LOGGED).collect::<String>() + "…";
    }
    Some(text)
}

/// The places connections take: allowed peers, strangers, and busy refusals.
#[derive(Clone)]
struct Pools {
    limit: Arc<Semaphore>,
    strangers: Arc<Semaphore>,
    refusals: Arc<Semaphore>,
    max_connections: usize,
    followers: Followers,
}

impl Pools {
    /// Serves `stream` in a task of its own if its pool has room; never waits.
    fn admit(
        &self,
        sup: Arc<Supervisor>,
        stream: tokio::net::UnixStream,
        role: Role,
        uid: Option<u32>,
        pid: Option<i32>,
    ) {
        let allowed = role != Role::Stranger;
        let pool = if allowed { &self.limit } else { &self.strangers };
        let Ok(permit) = pool.clone().try_acquire_owned() else {
            // Each refusal holds its connection for a moment; beyond a few, close at once.
            if let (true, Ok(refusing)) = (allowed, self.refusals.clone().try_acquire_owned()) {
                let max = self.max_connections;
                tokio::spawn(async move {
                    refuse_busy(stream, max).await;
                    drop(refusing);
                });
            }
            return;
        };
        let peer = Peer { role, uid, pid, fd: Some(stream.as_raw_fd()) };
        let followers = self.followers.clone();
        tokio::spawn(async move {
            serve_connection(sup, stream, peer, followers).await;
            drop(permit);
        });
    }
}

/// Serves the control API until the listener fails; at most `max_connections` at once.
///
/// The accept loop never waits: a connection over the limit gets a 503 at
/// once, and peers that may not use the socket share a small pool of their
/// own, so neither can keep an allowed `supctl` waiting. Nor does it read
/// /proc: a peer's role comes from the credentials the kernel recorded at
/// connect (`SO_PEERCRED`, `SO_PEERGROUPS`).
pub async fn serve(sup: Arc<Supervisor>, listener: UnixListener, access: Access, max_connections: usize) {
    let pools = Pools {
        limit: Arc::new(Semaphore::new(max_connections.max(1))),
        strangers: Arc::new(Semaphore::new(MAX_REFUSED_CONNECTIONS)),
        refusals: Arc::new(Semaphore::new(MAX_BUSY_REFUSALS)),
        max_connections,
        followers: Followers::new(MAX_FOLLOWERS),
    };
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("control socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let peer = stream.peer_cred().ok();
        let role = match peer {
            // The groups only matter to a peer that is neither root nor supd's user.
            Some(c) if c.uid() == 0 || c.uid() == access.owner => Role::Act,
            Some(c) => access.role(c.uid(), c.gid(), &peer_groups(stream.as_raw_fd())),
            None => Role::Stranger,
        };
        pools.admit(sup.clone(), stream, role, peer.map(|c| c.uid()), peer.and_then(|c| c.pid()));
    }
}

/// Answers 503 once the request head is in (a client sees an answer only to a
/// request it sent), then drains briefly so the answer is not lost to a reset.
async fn refuse_busy(mut stream: tokio::net::UnixStream, max: usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = format!(
        "{{\"error\":{{\"code\":\"busy\",\"message\":\"too many control connections ({max} open, \
         max_control_connections); try again\"}}}}"
    );
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while head.len() < 16 * 1024 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await? {
                0 => break,
                n => head.extend_from_slice(&buf[..n]),
            }
        }
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut total = 0;
        while total < 64 * 1024 {
            match stream.read(&mut buf).await? {
                0 => break,
                n => total += n,
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// The places for `logs -f` followers, shared by every connection of one control server.
#[derive(Clone)]
pub struct Followers(Arc<Semaphore>);

impl Followers {
    /// Room for `max` followers at once.
    pub fn new(max: usize) -> Followers {
        Followers(Arc::new(Semaphore::new(max)))
    }
}

/// The client at the other end of a control connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// What it may do; a stranger's every request is answered 403.
    pub role: Role,
    /// Its uid, for the 403 message and the log of acting requests.
    pub uid: Option<u32>,
    /// Its pid at connect, for the log of acting requests.
    pub pid: Option<i32>,
    /// The connection's socket, if it is one: a follower watches it to notice its client hanging up.
    pub fd: Option<RawFd>,
}

/// Serves one control connection: HTTP/1.1 requests until the peer closes it or a limit ends it.
///
/// `peer.fd`, if given, must be `io`'s own descriptor: it is duplicated while a request is served.
pub async fn serve_connection<IO>(sup: Arc<Supervisor>, io: IO, peer: Peer, followers: Followers)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let (sup, followers) = (sup.clone(), followers.clone());
        async move { Ok::<_, Infallible>(route(sup, peer, &followers, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        // A client that shuts down its sending side still gets its answer.
        .half_close(true)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(io), service);
    if let Err(e) = conn.await {
        tracing::debug!("control connection ended: {e}");
    }
}

type Resp = Response<BoxBody<Bytes, Infallible>>;

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Resp {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(bytes)).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Resp {
    json(status, &ErrorBody::new(code, message))
}

fn api_error(e: ApiError) -> Resp {
    match e {
        ApiError::UnknownApp(_) => error(StatusCode::NOT_FOUND, "not_found", e.to_string()),
        ApiError::BadRequest(_) => error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
        ApiError::InvalidConfig(_) => error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_config", e.to_string()),
        ApiError::FileNotChanged(_) => error(StatusCode::CONFLICT, "file_not_changed", e.to_string()),
        ApiError::ShuttingDown => error(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", e.to_string()),
    }
}

async fn route(sup: Arc<Supervisor>, peer: Peer, followers: &Followers, req: Request<Incoming>) -> Resp {
    let who = peer.uid.map_or("an unknown peer".to_string(), |u| format!("uid {u}"));
    if peer.role == Role::Stranger {
        return error(StatusCode::FORBIDDEN, "forbidden", format!("{who} may not use this control socket"));
    }
    let path = req.uri().path().to_string();
    let reads = req.method() == Method::GET && path.strip_prefix(API_PREFIX).is_some_and(|r| READ_ROUTES.contains(&r));
    if !reads {
        let what = format!("{} {}", req.method(), req.uri());
        let cmd = match peer.pid {
            Some(pid) => {
                let read = tokio::task::spawn_blocking(move || cmdline(pid));
                tokio::time::timeout(CMDLINE_TIMEOUT, read).await.ok().and_then(Result::ok).flatten()
            }
            None => None,
        };
        let cmd = cmd.unwrap_or_else(|| "?".into());
        if peer.role == Role::Read {
            tracing::warn!(uid = peer.uid, pid = peer.pid, cmdline = ?cmd, "control: refused {what} from a read-only peer");
            return error(
                StatusCode::FORBIDDEN,
                "read_only",
                format!(
                    "{who} may only read (status, top, logs, describe, history, events): it is a member of \
                     control_socket_read_group, and `{what}` acts"
                ),
            );
        }
        tracing::info!(uid = peer.uid, pid = peer.pid, cmdline = ?cmd, "control: {what}");
    }
    let Some(rest) = path.strip_prefix(API_PREFIX) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route `{path}`; routes start with `{API_PREFIX}/`"),
        );
    };
    let rest = rest.to_string();
    if rest == "/status" {
        if req.method() != Method::GET {
            return error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use GET for /v1/status");
        }
        let app = req.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("app=")));
        return match sup.status(app) {
            Ok(s) => json(StatusCode::OK, &s),
            Err(e) => api_error(e),
        };
    }
    if rest == "/logs" {
        if req.method() != Method::GET {
            return error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use GET for /v1/logs");
        }
        return logs(&sup, peer, followers, req.uri().query().unwrap_or("")).await;
    }
    if rest == "/signal" {
        if req.method() != Method::POST {
            return error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use POST for /v1/signal");
        }
        let q = req.uri().query().unwrap_or("").to_string();
        let get = |k: &str| q.split('&').find_map(|kv| kv.strip_prefix(k)).map(str::to_string);
        let (Some(app), Some(sig)) = (get("app="), get("signal=")) else {
            return error(StatusCode::BAD_REQUEST, "bad_request", "give `app` and `signal`");
        };
        let sig = match sup_config::parse_signal(&sig) {
            Ok(s) => s as i32,
            Err(m) => return error(StatusCode::BAD_REQUEST, "bad_request", m),
        };
        return match sup.app(&app) {
            Ok(a) => json(StatusCode::OK, &ActionResponse { results: vec![a.signal(sig).await] }),
            Err(e) => api_error(e),
        };
    }
    if rest == "/describe" {
        if req.method() != Method::GET {
            return error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use GET for /v1/describe");
        }
        let app = req.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("app=")));
        return match app.map(|a| sup.app(a)) {
            None => error(StatusCode::BAD_REQUEST, "bad_request", "give `app`"),
            Some(Err(e)) => api_error(e),
            Some(Ok(app)) => json(StatusCode::OK, &app.describe(&sup.samples)),
        };
    }
    if rest == "/logs/flush" {
        if req.method() != Method::POST {
            return error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use POST for /v1/logs/flush");
        }
        let app = req.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("app=")));
        return match app.map(|a| sup.app(a)) {
            None => error(StatusCode::BAD_REQUEST, "bad_request", "give `app`"),
            Some(Err(e)) => api_error(e),
            Some(Ok(app)) => match app.flush_logs().await {
                Ok(n) => json(
                    StatusCode::OK,
                    &ActionResponse { results: vec![app.result_ok(&format!("flushed {n} log file(s)"))] },
                ),
                Err(m) => error(StatusCode::INTERNAL_SERVER_ERROR, "io", m),
            },
        };
    }
    if rest == "/logs/reopen" {
        if req.method() != Method::POST {
            return error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use POST for /v1/logs/reopen");
        }
        sup.reopen_logs();
        return json(StatusCode::OK, &ActionResponse::default());
    }
    if rest == "/events" {
        if req.method() != Method::GET {
            return error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use GET for /v1/events");
        }
        let follow = req.uri().query().unwrap_or("").split('&').any(|kv| kv == "follow=1" || kv == "follow=true");
        return events(&sup, follow, followers);
    }
    if rest == "/history" {
        if req.method() != Method::GET {
            return error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use GET for /v1/history");
        }
        let app = req.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("app=")));
        return match app.map(|a| sup.history(a)) {
            None => error(StatusCode::BAD_REQUEST, "bad_request", "give `app`"),
            Some(Err(e)) => api_error(e),
            Some(Ok(h)) => json(StatusCode::OK, &h),
        };
    }
    if ![
        "/start",
        "/stop",
        "/restart",
        "/reload",
        "/rollback",
        "/promote",
        "/scale",
        "/config/apply",
        "/apps/add",
        "/apps/remove",
    ]
    .contains(&rest.as_str())
    {
        return error(StatusCode::NOT_FOUND, "not_found", format!("no route `{path}`"));
    }
    if req.method() != Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", format!("use POST for {path}"));
    }
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match rest.as_str() {
        "/start" | "/stop" | "/restart" => {
            let verb = match rest.as_str() {
                "/start" => Verb::Start,
                "/stop" => Verb::Stop,
                _ => Verb::Restart,
            };
            let action: ActionRequest = match parse(&body) {
                Ok(a) => a,
                Err(m) => return error(StatusCode::BAD_REQUEST, "bad_request", m),
            };
            match sup.action(verb, &action).await {
                Ok(r) => json(StatusCode::OK, &r),
                Err(e) => api_error(e),
            }
        }
        "/reload" => {
            let action: ActionRequest = match parse(&body) {
                Ok(a) => a,
                Err(m) => return error(StatusCode::BAD_REQUEST, "bad_request", m),
            };
            stream(move |p| async move { sup.reload(&action, peer.uid, p).await }).await
        }
        "/promote" => {
            let action: ActionRequest = match parse(&body) {
                Ok(a) => a,
                Err(m) => return error(StatusCode::BAD_REQUEST, "bad_request", m),
            };
            let Some(app) = action.app.clone() else {
                return error(StatusCode::BAD_REQUEST, "bad_request", "give `app`");
            };
            stream(move |p| async move { sup.promote(&app, peer.uid, action.wait, p).await }).await
        }
        "/rollback" => {
            let rb: sup_proto::RollbackRequest = match parse(&body) {
                Ok(a) => a,
                Err(m) => return error(StatusCode::BAD_REQUEST, "bad_request", m),
            };
            stream(move |p| async move { sup.rollback(&rb.app, rb.to, peer.uid, rb.wait, p).await }).await
        }
        "/scale" => {
            let scale: ScaleRequest = match parse(&body) {
                Ok(a) => a,
                Err(m) => return error(StatusCode::BAD_REQUEST, "bad_request", m),
            };
            stream(move |p| async move { sup.scale(&scale.app, scale.instances, scale.wait, p).await }).await
        }
        "/apps/add" => {
            let add: sup_proto::AddRequest = match parse(&body) {
                Ok(a) => a,
                Err(m) => return error(StatusCode::BAD_REQUEST, "bad_request", m),
            };
            stream(move |p| async move { sup.add_app(add, peer.uid, p).await }).await
        }
        "/apps/remove" => {
            let rm: sup_proto::RemoveRequest = match parse(&body) {
                Ok(a) => a,
                Err(m) => return error(StatusCode::BAD_REQUEST, "bad_request", m),
            };
            stream(move |p| async move { sup.remove_app(rm.name, peer.uid, p).await }).await
        }
        _ => {
            if !body.iter().all(u8::is_ascii_whitespace) && body.as_ref() != b"{}" {
                return error(StatusCode::BAD_REQUEST, "bad_request", "config apply takes no body (or `{}`)");
            }
            stream(move |p| async move { sup.apply(peer.uid, p).await }).await
        }
    }
}

/// `GET /v1/logs?app=A&lines=N&follow=1&stream=out|err&instance=K&since=SECONDS`.
async fn logs(sup: &Supervisor, peer: Peer, followers: &Followers, query: &str) -> Resp {
    let mut app = None;
    let (mut lines, mut follow, mut stream, mut instance, mut since) = (20usize, false, None, None, None);
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let bad = |what: &str| error(StatusCode::BAD_REQUEST, "bad_request", format!("invalid `{k}`: {what}"));
        match k {
            "app" => app = Some(v.to_string()),
            "lines" => match v.parse() {
                Ok(n) if n <= 100_000 => lines = n,
                _ => return bad("expected a number up to 100000"),
            },
            "follow" => follow = v == "1" || v == "true",
            "stream" if v == "out" || v == "err" => stream = Some(v.to_string()),
            "stream" => return bad("expected `out` or `err`"),
            "instance" => match v.parse() {
                Ok(n) => instance = Some(n),
                Err(_) => return bad("expected a slot number"),
            },
            "since" => match v.parse::<u64>() {
                Ok(s) => since = Some(Duration::from_secs(s)),
                Err(_) => return bad("expected seconds"),
            },
            _ => return error(StatusCode::BAD_REQUEST, "bad_request", format!("unknown parameter `{k}`")),
        }
    }
    let Some(name) = app else { return error(StatusCode::BAD_REQUEST, "bad_request", "give `app`") };
    let app = match sup.app(&name) {
        Ok(a) => a,
        Err(e) => return api_error(e),
    };
    let filter = crate::logread::Filter::new(stream, instance, since);
    // Taken before the files are read, and held by the follower task until its client is gone.
    let place = match follow.then(|| followers.0.clone().try_acquire_owned()) {
        None => None,
        Some(Ok(place)) => Some(place),
        Some(Err(_)) => {
            let message = format!("too many log followers ({MAX_FOLLOWERS} open); stop one or try again later");
            return error(StatusCode::SERVICE_UNAVAILABLE, "too_many_followers", message);
        }
    };
    // Subscribed before reading the files, so no line falls between the two.
    let live = follow.then(|| app.logs().follow());
    // Reading the files may take megabytes of I/O: off the event loop.
    let (logs, n, f) = (app.logs().clone(), name.clone(), filter.clone());
    let history =
        tokio::task::spawn_blocking(move || crate::logread::history(&logs, &n, &f, lines)).await.unwrap_or_default();
    let mut body = Vec::new();
    for l in history {
        body.extend_from_slice(&serde_json::to_vec(&l).unwrap_or_default());
        body.push(b'\n');
    }
    let (Some(rx), Some(place)) = (live, place) else {
        return ndjson_response(Full::new(Bytes::from(body)).boxed());
    };
    let (tx, body_rx) = crate::logread::follow_queue();
    tx.send_first(Bytes::from(body));
    // SAFETY: `peer.fd` belongs to the connection serving this request, which is open while it runs.
    let socket = peer.fd.and_then(|fd| unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned().ok());
    tokio::spawn(async move {
        crate::logread::follow(rx, filter, name, tx, socket).await;
        drop(place);
    });
    ndjson_response(BoxBody::new(FollowBody(body_rx)))
}

/// A follower's answer: its queue, one NDJSON line per message.
/// `GET /v1/events[?follow=1]`: the last events, then (following) new ones as they come.
fn events(sup: &Supervisor, follow: bool, followers: &Followers) -> Resp {
    let line = |e: &sup_proto::LifecycleEvent| {
        let mut b = serde_json::to_vec(e).unwrap_or_default();
        b.push(b'\n');
        b
    };
    // Subscribed before the past is read, so no event falls between the two.
    let live = follow.then(|| sup.events.subscribe());
    let past: Vec<u8> = sup.events.recent().iter().flat_map(line).collect();
    let Some(mut rx) = live else { return ndjson_response(Full::new(Bytes::from(past)).boxed()) };
    // Event followers share the log followers' places.
    let Ok(place) = followers.0.clone().try_acquire_owned() else {
        let message = format!("too many followers ({MAX_FOLLOWERS} open); stop one or try again later");
        return error(StatusCode::SERVICE_UNAVAILABLE, "too_many_followers", message);
    };
    let (tx, body) = mpsc::channel::<Bytes>(crate::spec::EVENTS_KEPT);
    let _ = tx.try_send(Bytes::from(past));
    tokio::spawn(async move {
        let mut skipped = 0u64;
        loop {
            let next = tokio::select! {
                ev = rx.recv() => ev,
                () = tx.closed() => break,
            };
            let bytes = match next {
                Ok(e) if skipped == 0 => line(&e),
                Ok(e) => {
                    let note = sup_proto::LifecycleEvent {
                        at: e.at.clone(),
                        app: String::new(),
                        slot: None,
                        kind: "lagged".into(),
                        message: format!("{skipped} events skipped: this follower fell behind"),
                    };
                    let mut b = line(&note);
                    b.extend(line(&e));
                    b
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    skipped += n;
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            };
            match tx.try_send(Bytes::from(bytes)) {
                Ok(()) => skipped = 0,
                // Never buffered without bound: a follower that does not read loses events.
                Err(mpsc::error::TrySendError::Full(_)) => skipped += 1,
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
        drop(place);
    });
    ndjson_response(BoxBody::new(EventsBody(body)))
}

/// A response body fed from a bounded channel.
struct EventsBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for EventsBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

struct FollowBody(crate::logread::FollowReceiver);

impl hyper::body::Body for FollowBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))
}

/// A response body fed from a channel, one NDJSON line per message.
struct ChannelBody(mpsc::UnboundedReceiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

fn ndjson(ev: &RolloutEvent) -> Bytes {
    let mut line = serde_json::to_vec(ev).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// Runs a rollout in a task of its own (a client hanging up does not cancel
/// it) and streams its events. Errors found before the first event (unknown
/// app, invalid config) are answered with a plain 4xx instead.
async fn stream<F, Fut>(f: F) -> Resp
where
    F: FnOnce(Progress) -> Fut,
    Fut: Future<Output = Result<ActionResponse, ApiError>> + Send + 'static,
{
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let mut op = tokio::spawn(f(ev_tx));
    let first = tokio::select! {
        ev = ev_rx.recv() => ev,
        res = &mut op => return finished(res, &mut ev_rx),
    };
    // The channel closes when the operation ends: it may have ended with no event.
    let Some(first) = first else { return finished((&mut op).await, &mut ev_rx) };
    let first = Some(first);
    let (body_tx, body_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut next = first;
        while let Some(ev) = next {
            let _ = body_tx.send(ndjson(&ev));
            next = ev_rx.recv().await;
        }
        let done = match op.await {
            Ok(Ok(r)) => RolloutEvent::Done { results: r.results },
            Ok(Err(e)) => RolloutEvent::Done {
                results: vec![sup_proto::AppResult { app: String::new(), ok: false, message: e.to_string() }],
            },
            Err(e) => RolloutEvent::Done {
                results: vec![sup_proto::AppResult {
                    app: String::new(),
                    ok: false,
                    message: format!("internal: {e}"),
                }],
            },
        };
        let _ = body_tx.send(ndjson(&done));
    });
    ndjson_response(BoxBody::new(ChannelBody(body_rx)))
}

/// The answer for an operation that ended before streaming began.
fn finished(
    res: Result<Result<ActionResponse, ApiError>, tokio::task::JoinError>,
    events: &mut mpsc::UnboundedReceiver<RolloutEvent>,
) -> Resp {
    match res {
        Ok(Err(e)) => api_error(e),
        Ok(Ok(r)) => {
            let mut lines = Vec::new();
            while let Ok(ev) = events.try_recv() {
                lines.extend_from_slice(&ndjson(&ev));
            }
            lines.extend_from_slice(&ndjson(&RolloutEvent::Done { results: r.results }));
            ndjson_response(Full::new(Bytes::from(lines)).boxed())
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("rollout task failed: {e}")),
    }
}

fn ndjson_response(body: BoxBody<Bytes, Infallible>) -> Resp {
    let mut r = Response::new(body);
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/x-ndjson"));
    r
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Resp> {
    let too_large = || {
        error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", format!("request body over {MAX_REQUEST_BODY} bytes"))
    };
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_REQUEST_BODY as u64) {
        return Err(too_large());
    }
    let limited = Limited::new(req.into_body(), MAX_REQUEST_BODY);
    match tokio::time::timeout(REQUEST_TIMEOUT, limited.collect()).await {
        Err(_) => Err(error(StatusCode::REQUEST_TIMEOUT, "timeout", "request body not received in time")),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(error(StatusCode::BAD_REQUEST, "bad_request", format!("cannot read request body: {e}"))),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_come_from_uid_and_exact_groups() {
        let open = Access { owner: 1000, group: None, read_group: None };
        let both = Access { owner: 1000, group: Some(50), read_group: Some(60) };
        // (access, (uid, gid, supplementary groups), role)
        type Case = (Access, (u32, u32, &'static [u32]), Role);
        let cases: &[Case] = &[
            (open, (0, 0, &[]), Role::Act),
            (open, (1000, 1000, &[]), Role::Act),
            (open, (1001, 50, &[50, 60]), Role::Stranger),
            (both, (1001, 50, &[]), Role::Act),
            (both, (1001, 1001, &[60, 50]), Role::Act),
            (both, (1001, 60, &[]), Role::Read),
            (both, (1001, 1001, &[7, 60]), Role::Read),
            (both, (1001, 1001, &[7, 61]), Role::Stranger),
        ];
        for (access, (uid, gid, groups), want) in cases {
            assert_eq!(access.role(*uid, *gid, groups), *want, "{access:?} uid {uid} gid {gid} groups {groups:?}");
        }
    }

    #[test]
    fn peer_groups_are_the_connecting_process_groups() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let mut want: Vec<u32> = nix::unistd::getgroups().expect("groups").iter().map(|g| g.as_raw()).collect();
        let mut got = peer_groups(a.as_raw_fd());
        want.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, want);
        assert!(peer_groups(-1).is_empty());
    }

    #[test]
    fn a_command_line_is_read_for_the_log() {
        let own = cmdline(std::process::id() as i32).expect("own cmdline");
        assert!(own.contains("sup_core"), "{own}");
        assert_eq!(cmdline(-1), None);
    }

    #[test]
    fn only_gets_of_the_read_routes_read() {
        assert!(READ_ROUTES.iter().all(|r| !r.is_empty() && r.starts_with('/')));
        assert!(!READ_ROUTES.contains(&"/logs/flush") && !READ_ROUTES.contains(&"/signal"));
    }
}
