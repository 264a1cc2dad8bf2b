//! Node's IPC channel, as the parent of a PM2 app.
//!
//! Node opens the socket named by `NODE_CHANNEL_FD` and exchanges JSON values,
//! one per line. supd reads three kinds of message from it:
//! - `"ready"` (`process.send('ready')`, PM2's `wait_ready`);
//! - Node's cluster protocol (`{"cmd":"NODE_CLUSTER",…}`) when the worker was
//!   started as a cluster worker (`NODE_UNIQUE_ID`): its `server.listen()`
//!   asks for a server handle (`queryServer`) and supd answers with the slot's
//!   own socket, the way Node's primary does in its shared-handle mode, so an
//!   unmodified app listens on the socket supd keeps across restarts;
//! - handle acknowledgements (`NODE_HANDLE_ACK`), which gate the next handle.
//!
//! Everything else is ignored. A line longer than [`MAX_LINE`] is dropped
//! whole, and the queue of answers is bounded, so a worker that floods or
//! writes garbage costs supd a bounded amount of memory and nothing else.
//!
//! The protocol is Node's internal one (lib/internal/cluster/child.js and
//! lib/internal/child_process.js); it is tested with Node 20 and has not
//! changed shape since Node 12. A request supd does not understand that waits
//! for an answer gets an error answer, so a worker never hangs on supd.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde_json::{json, Value};
use tokio::io::Interest;
use tokio::net::UnixStream;

/// Longest message line kept; Node's cluster messages are a few hundred bytes.
pub const MAX_LINE: usize = 64 * 1024;
/// Answers waiting to be written before new ones are dropped.
const MAX_OUTBOX: usize = 64;
/// libuv's UV_EADDRNOTAVAIL: the worker's `listen` fails with this code.
const UV_EADDRNOTAVAIL: i64 = -(libc::EADDRNOTAVAIL as i64);
/// libuv's UV_ENOTSUP, for requests supd does not implement.
const UV_ENOTSUP: i64 = -(libc::ENOTSUP as i64);

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes.
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
    // Inside a line that grew too long: skip to its end.
    discarding: bool,
}

impl LineSplitter {
    /// Adds `bytes` and returns the lines they complete, without their newline.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        while let Some(pos) = bytes.iter().position(|&b| b == b'\n') {
            if !self.discarding && self.buf.len() + pos <= MAX_LINE {
                self.buf.extend_from_slice(&bytes[..pos]);
                lines.push(std::mem::take(&mut self.buf));
            }
            self.buf.clear();
            self.discarding = false;
            bytes = &bytes[pos + 1..];
        }
        if !self.discarding {
            if self.buf.len() + bytes.len() > MAX_LINE {
                self.buf = Vec::new();
                self.discarding = true;
            } else {
                self.buf.extend_from_slice(bytes);
            }
        }
        lines
    }
}

/// A message from the worker, as far as supd cares.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// `process.send('ready')`.
    Ready,
    /// A cluster worker's request for a listening socket.
    QueryServer(ServerQuery),
    /// A cluster message supd only acknowledges (`exitedAfterDisconnect`, unknown acts).
    ClusterAck {
        /// The `act` field.
        act: String,
        /// The sequence number to acknowledge.
        seq: u64,
    },
    /// `NODE_HANDLE_ACK`: the last handle arrived.
    HandleAck,
    /// `NODE_HANDLE_NACK`: the last handle did not arrive (the worker ran out of fds, say).
    HandleNack,
    /// A cluster worker's server is listening on the socket it was given.
    Listening,
    /// The worker sent a handle; supd closes it and must acknowledge.
    HandleFromWorker,
    /// Anything else: cluster notices (`online`, `close`), app messages, garbage.
    Other,
}

/// What `server.listen()` asked for in a cluster worker.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerQuery {
    /// Sequence number the answer acknowledges.
    pub seq: u64,
    /// TCP port; negative or absent for a path or an fd.
    pub port: Option<i64>,
    /// Host or Unix socket path, if given.
    pub address: Option<String>,
    /// 4 or 6 for TCP (Node's `addressType`), -1 for a path.
    pub family: Option<i64>,
    /// `listen({fd})`.
    pub fd: Option<i64>,
    /// Opaque server data (TLS ticket keys), echoed back as Node's primary does.
    pub data: Value,
}

/// Parses one line of the channel.
pub fn parse(line: &[u8]) -> Incoming {
    let Ok(v) = serde_json::from_slice::<Value>(line) else { return Incoming::Other };
    if v.as_str() == Some("ready") {
        return Incoming::Ready;
    }
    let Some(cmd) = v.get("cmd").and_then(Value::as_str) else { return Incoming::Other };
    match cmd {
        "NODE_HANDLE_ACK" => Incoming::HandleAck,
        "NODE_HANDLE_NACK" => Incoming::HandleNack,
        "NODE_HANDLE" => Incoming::HandleFromWorker,
        "NODE_CLUSTER" => {
            let act = v.get("act").and_then(Value::as_str).unwrap_or_default();
            let Some(seq) = v.get("seq").and_then(Value::as_u64) else { return Incoming::Other };
            match act {
                "queryServer" => Incoming::QueryServer(ServerQuery {
                    seq,
                    port: v.get("port").and_then(Value::as_i64),
                    address: v.get("address").and_then(Value::as_str).map(str::to_string),
                    family: v.get("addressType").and_then(Value::as_i64),
                    fd: v.get("fd").and_then(Value::as_i64),
                    data: v.get("data").cloned().unwrap_or(Value::Null),
                }),
                "listening" => Incoming::Listening,
                // Notices that expect no answer.
                "online" | "close" => Incoming::Other,
                _ => Incoming::ClusterAck { act: act.to_string(), seq },
            }
        }
        _ => Incoming::Other,
    }
}

/// Where a listening socket is bound, for matching a [`ServerQuery`].
#[derive(Debug, Clone, PartialEq)]
pub enum Bound {
    /// A TCP socket: its address.
    Tcp(std::net::SocketAddr),
    /// A Unix socket path.
    Path(String),
    /// Neither (unknown family).
    Other,
}

/// Finds the socket a query asks for: `listen({fd: 3+i})` is the i-th socket of
/// `LISTEN_FDS`; otherwise the port must match (or the path), and among
/// sockets on that port the one of the asked address, then family, is preferred.
pub fn choose(query: &ServerQuery, sockets: &[Bound]) -> Option<usize> {
    if let Some(fd) = query.fd.filter(|fd| *fd >= 0) {
        let i = usize::try_from(fd - 3).ok()?;
        return (i < sockets.len()).then_some(i);
    }
    match query.port {
        Some(p) if p > 0 => {
            let on_port = |i: &usize| matches!(&sockets[*i], Bound::Tcp(a) if i64::from(a.port()) == p);
            let candidates: Vec<usize> = (0..sockets.len()).filter(on_port).collect();
            let ip = query.address.as_deref().and_then(|a| a.parse::<std::net::IpAddr>().ok());
            let by_ip =
                candidates.iter().copied().find(|i| matches!(&sockets[*i], Bound::Tcp(a) if Some(a.ip()) == ip));
            let v6 = query.family == Some(6) || ip.is_some_and(|ip| ip.is_ipv6());
            let by_family =
                candidates.iter().copied().find(|i| matches!(&sockets[*i], Bound::Tcp(a) if a.is_ipv6() == v6));
            by_ip.or(by_family).or(candidates.first().copied())
        }
        _ => {
            let path = query.address.as_deref()?;
            sockets.iter().position(|b| matches!(b, Bound::Path(s) if s == path))
        }
    }
}

fn bound(fd: &OwnedFd) -> Bound {
    match socket2::SockRef::from(fd).local_addr() {
        Ok(a) => match (a.as_socket(), a.as_pathname()) {
            (Some(s), _) => Bound::Tcp(s),
            (None, Some(p)) => Bound::Path(p.display().to_string()),
            (None, None) => Bound::Other,
        },
        Err(_) => Bound::Other,
    }
}

/// What the channel tells the worker's task.
#[derive(Debug, PartialEq, Eq)]
pub enum ChannelEvent {
    /// The worker said `ready`.
    Ready,
    /// A cluster worker's server listens on the socket supd gave it.
    Listening,
    /// The worker closed its end: it exited or called `process.disconnect()`.
    Closed,
}

struct Outgoing {
    bytes: Vec<u8>,
    written: usize,
    handle: Option<RawFd>,
}

/// A handle sent and not yet acknowledged: what is needed to send it again.
struct InFlight {
    bytes: Vec<u8>,
    handle: RawFd,
    attempts: u32,
    // The queryServer it answers, for an error answer if it never arrives.
    query_seq: u64,
    data: Value,
}

/// Node's own sender gives up on a handle after this many NACKs.
const MAX_HANDLE_ATTEMPTS: u32 = 3;

/// supd's end of one worker's Node IPC channel.
pub struct NodeChannel {
    stream: UnixStream,
    app: std::sync::Arc<str>,
    pid: i32,
    // The slot's sockets when the worker is a cluster worker, with their addresses.
    sockets: Vec<(OwnedFd, Bound)>,
    lines: LineSplitter,
    outbox: VecDeque<Outgoing>,
    // A handle was sent and Node has not acknowledged it: the next one waits, as Node's own sender does.
    awaiting_ack: bool,
    inflight: Option<InFlight>,
    // The next handle queued answers this query (seq, data), kept for a resend.
    pending_query: VecDeque<(u64, Value)>,
    backlog: i32,
    seq: u64,
    warned_full: bool,
    warned_query: bool,
    warned_act: bool,
}

impl NodeChannel {
    /// Wraps supd's end; `sockets` are the slot's sockets, answered to `queryServer` (empty: not a cluster worker).
    pub fn new(
        stream: UnixStream,
        app: std::sync::Arc<str>,
        pid: i32,
        sockets: Vec<OwnedFd>,
        backlog: u32,
    ) -> NodeChannel {
        let backlog = backlog.min(i32::MAX as u32) as i32;
        let sockets = sockets
            .into_iter()
            .map(|fd| {
                let b = bound(&fd);
                (fd, b)
            })
            .collect();
        NodeChannel {
            stream,
            app,
            pid,
            sockets,
            lines: LineSplitter::default(),
            outbox: VecDeque::new(),
            awaiting_ack: false,
            inflight: None,
            pending_query: VecDeque::new(),
            backlog,
            seq: 0,
            warned_full: false,
            warned_query: false,
            warned_act: false,
        }
    }

    /// Queues PM2's `'shutdown'` message (`process.on('message')` gets the string).
    pub fn send_shutdown(&mut self) -> bool {
        self.queue(b"\"shutdown\"\n".to_vec(), None)
    }

    /// Queues Node's `disconnect` for a cluster worker: it closes its servers,
    /// lets their connections finish, then closes the channel.
    pub fn send_disconnect(&mut self) -> bool {
        let msg = self.cluster(json!({ "act": "disconnect" }));
        self.queue(msg, None)
    }

    fn cluster(&mut self, body: Value) -> Vec<u8> {
        line(&self.cluster_value(body))
    }

    // Node's primary numbers its messages too; the worker only reads `ack`.
    fn cluster_value(&mut self, mut body: Value) -> Value {
        body["cmd"] = json!("NODE_CLUSTER");
        body["seq"] = json!(self.seq);
        self.seq += 1;
        body
    }

    fn queue(&mut self, bytes: Vec<u8>, handle: Option<RawFd>) -> bool {
        if self.outbox.len() >= MAX_OUTBOX {
            if !self.warned_full {
                self.warned_full = true;
                tracing::warn!(app = %self.app, pid = self.pid, "the worker does not read its IPC channel; dropping messages to it");
            }
            return false;
        }
        self.outbox.push_back(Outgoing { bytes, written: 0, handle });
        true
    }

    fn can_write(&self) -> bool {
        match self.outbox.front() {
            Some(o) => o.handle.is_none() || o.written > 0 || !self.awaiting_ack,
            None => false,
        }
    }

    /// Waits for the channel and handles what it can; cancel-safe.
    pub async fn step(&mut self) -> Vec<ChannelEvent> {
        let interest = if self.can_write() { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
        let ready = match self.stream.ready(interest).await {
            Ok(r) => r,
            Err(_) => return vec![ChannelEvent::Closed],
        };
        let mut events = Vec::new();
        if ready.is_readable() {
            let mut chunk = [0u8; 8192];
            match self.stream.try_read(&mut chunk) {
                Ok(0) => return vec![ChannelEvent::Closed],
                Ok(n) => {
                    for l in self.lines.push(&chunk[..n]) {
                        if let Some(e) = self.handle(parse(&l)) {
                            events.push(e);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return vec![ChannelEvent::Closed],
            }
        }
        if ready.is_writable() && self.flush().is_err() {
            events.push(ChannelEvent::Closed);
        }
        events
    }

    fn handle(&mut self, msg: Incoming) -> Option<ChannelEvent> {
        match msg {
            Incoming::Ready => return Some(ChannelEvent::Ready),
            Incoming::HandleAck => {
                self.awaiting_ack = false;
                self.inflight = None;
            }
            Incoming::HandleNack => self.resend_or_give_up(),
            Incoming::Listening => {
                // Node's listen() on the handle reset its backlog to 511: give the configured one back.
                for (fd, _) in &self.sockets {
                    let _ = socket2::SockRef::from(fd).listen(self.backlog);
                }
                return Some(ChannelEvent::Listening);
            }
            Incoming::HandleFromWorker => {
                self.queue(line(&json!({ "cmd": "NODE_HANDLE_ACK" })), None);
            }
            Incoming::QueryServer(q) if !self.sockets.is_empty() => self.answer_query(q),
            Incoming::QueryServer(_) => {}
            Incoming::ClusterAck { act, seq } => {
                let answer = if act == "exitedAfterDisconnect" {
                    json!({ "ack": seq })
                } else {
                    if !self.warned_act {
                        self.warned_act = true;
                        tracing::warn!(app = %self.app, pid = self.pid,
                            "Node cluster message `{act}` is not supported (sup follows Node 20's protocol); answered with ENOTSUP");
                    }
                    json!({ "ack": seq, "errno": UV_ENOTSUP })
                };
                let msg = self.cluster(answer);
                self.queue(msg, None);
            }
            Incoming::Other => {}
        }
        None
    }

    fn answer_query(&mut self, q: ServerQuery) {
        let bounds: Vec<Bound> = self.sockets.iter().map(|(_, b)| b.clone()).collect();
        match choose(&q, &bounds) {
            Some(i) => {
                let key = format!("sup:{}:{}", i, self.seq);
                let inner = self.cluster_value(json!({ "ack": q.seq, "key": key, "errno": 0, "data": q.data }));
                let msg = line(&json!({ "cmd": "NODE_HANDLE", "type": "net.Native", "msg": inner }));
                let fd = self.sockets[i].0.as_raw_fd();
                if self.queue(msg, Some(fd)) {
                    self.pending_query.push_back((q.seq, q.data));
                }
            }
            None => {
                let asked = match (&q.fd, q.port, &q.address) {
                    (Some(fd), _, _) => format!("fd {fd}"),
                    (None, Some(p), _) if p > 0 => format!("port {p}"),
                    (_, _, Some(a)) => format!("`{a}`"),
                    _ => "an ephemeral port".to_string(),
                };
                let have: Vec<String> = bounds
                    .iter()
                    .map(|b| match b {
                        Bound::Tcp(a) => format!("port {} ({a})", a.port()),
                        Bound::Path(p) => format!("`{p}`"),
                        Bound::Other => "?".to_string(),
                    })
                    .collect();
                if !self.warned_query {
                    self.warned_query = true;
                    tracing::error!(app = %self.app, pid = self.pid,
                        "the worker's server.listen() asked for {asked}, but the app's `listen` has {}; its listen fails with EADDRNOTAVAIL",
                        have.join(", "));
                }
                let msg = self.cluster(json!({ "ack": q.seq, "errno": UV_EADDRNOTAVAIL, "data": q.data }));
                self.queue(msg, None);
            }
        }
    }

    /// Sends the unacknowledged handle again, as Node's sender does, or answers its query with an error.
    fn resend_or_give_up(&mut self) {
        self.awaiting_ack = false;
        let Some(f) = self.inflight.take() else { return };
        if f.attempts < MAX_HANDLE_ATTEMPTS {
            self.pending_query.push_front((f.query_seq, f.data.clone()));
            self.outbox.push_front(Outgoing { bytes: f.bytes.clone(), written: 0, handle: Some(f.handle) });
            // Keep the count: the resend adds one.
            self.inflight = Some(InFlight { attempts: f.attempts, ..f });
            self.awaiting_ack = false;
            return;
        }
        tracing::warn!(app = %self.app, pid = self.pid,
            "the worker could not receive its listening socket {MAX_HANDLE_ATTEMPTS} times (out of file descriptors?); its listen fails");
        let msg = self.cluster(json!({ "ack": f.query_seq, "errno": UV_EADDRNOTAVAIL, "data": f.data }));
        self.queue(msg, None);
    }

    fn flush(&mut self) -> std::io::Result<()> {
        while self.can_write() {
            let Some(out) = self.outbox.front_mut() else { break };
            let fd = self.stream.as_raw_fd();
            let handle = if out.written == 0 { out.handle } else { None };
            let res = self.stream.try_io(Interest::WRITABLE, || {
                let iov = [IoSlice::new(&out.bytes[out.written..])];
                let fds = handle.map(|h| [h]);
                let cmsgs: Vec<ControlMessage> =
                    fds.as_ref().map(|f| ControlMessage::ScmRights(f)).into_iter().collect();
                sendmsg::<()>(fd, &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None).map_err(std::io::Error::from)
            });
            match res {
                Ok(n) => {
                    if let Some(h) = handle {
                        self.awaiting_ack = true;
                        let (query_seq, data) = self.pending_query.pop_front().unwrap_or((0, Value::Null));
                        let attempts = self.inflight.take().map_or(0, |f| f.attempts) + 1;
                        self.inflight =
                            Some(InFlight { bytes: out.bytes.clone(), handle: h, attempts, query_seq, data });
                    }
                    out.written += n;
                    if out.written >= out.bytes.len() {
                        self.outbox.pop_front();
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn line(v: &Value) -> Vec<u8> {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_and_drops_overlong_ones() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"\"rea"), Vec::<Vec<u8>>::new());
        assert_eq!(s.push(b"dy\"\n{}\nx"), vec![b"\"ready\"".to_vec(), b"{}".to_vec()]);
        let long = vec![b'a'; MAX_LINE + 1];
        assert!(s.push(&long).is_empty());
        assert!(s.push(b"aaa").is_empty());
        assert_eq!(s.push(b"aa\n\"ok\"\n"), vec![b"\"ok\"".to_vec()]);
        // Exactly MAX_LINE is kept.
        let mut max = vec![b'b'; MAX_LINE];
        max.push(b'\n');
        assert_eq!(s.push(&max).len(), 1);
    }

    #[test]
    fn parses_what_node_sends() {
        assert_eq!(parse(b"\"ready\""), Incoming::Ready);
        assert_eq!(parse(b"{\"cmd\":\"NODE_HANDLE_ACK\"}"), Incoming::HandleAck);
        assert_eq!(parse(b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"online\",\"seq\":0}"), Incoming::Other);
        assert_eq!(
            parse(b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"listening\",\"port\":3000,\"seq\":3}"),
            Incoming::Listening
        );
        assert_eq!(parse(b"{\"cmd\":\"NODE_HANDLE_NACK\"}"), Incoming::HandleNack);
        let q = br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":null,"port":3000,"addressType":4,"flags":0,"backlog":511,"seq":1}"#;
        assert_eq!(
            parse(q),
            Incoming::QueryServer(ServerQuery {
                seq: 1,
                port: Some(3000),
                address: None,
                family: Some(4),
                fd: None,
                data: Value::Null
            })
        );
        assert_eq!(
            parse(br#"{"cmd":"NODE_CLUSTER","act":"exitedAfterDisconnect","seq":4}"#),
            Incoming::ClusterAck { act: "exitedAfterDisconnect".into(), seq: 4 }
        );
        for junk in
            [&b"ready"[..], b"", b"{", b"[1,2]", b"{\"cmd\":7}", b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"queryServer\"}"]
        {
            assert_eq!(parse(junk), Incoming::Other, "{:?}", String::from_utf8_lossy(junk));
        }
    }

    #[test]
    fn chooses_the_socket_asked_for() {
        let tcp = |s: &str| Bound::Tcp(s.parse().unwrap());
        let socks = [tcp("0.0.0.0:3000"), tcp("[::]:3000"), tcp("127.0.0.1:3001"), Bound::Path("/run/a.sock".into())];
        let q = |port: Option<i64>, address: Option<&str>, family: Option<i64>, fd: Option<i64>| ServerQuery {
            seq: 0,
            port,
            address: address.map(str::to_string),
            family,
            fd,
            data: Value::Null,
        };
        assert_eq!(choose(&q(Some(3001), Some("0.0.0.0"), Some(4), None), &socks), Some(2));
        assert_eq!(choose(&q(Some(3000), None, Some(4), None), &socks), Some(0));
        assert_eq!(choose(&q(Some(3000), None, Some(6), None), &socks), Some(1));
        assert_eq!(choose(&q(Some(3000), Some("::"), None, None), &socks), Some(1));
        assert_eq!(choose(&q(Some(3000), Some("0.0.0.0"), Some(4), None), &socks), Some(0));
        assert_eq!(choose(&q(Some(-1), Some("/run/a.sock"), Some(-1), None), &socks), Some(3));
        assert_eq!(choose(&q(None, None, None, Some(4)), &socks), Some(1));
        assert_eq!(choose(&q(None, None, None, Some(9)), &socks), None);
        assert_eq!(choose(&q(Some(4000), None, Some(4), None), &socks), None);
        assert_eq!(choose(&q(Some(0), None, Some(4), None), &socks), None);
    }
}
