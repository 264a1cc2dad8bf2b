//! A small blocking-looking client for the control API (hyper over a Unix socket).

use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sup_proto::{exit, ErrorBody};
use tokio::net::UnixStream;

/// Why a request failed.
#[derive(Debug)]
pub enum ClientError {
    /// supd is not there.
    Unreachable(PathBuf, std::io::Error),
    /// The connection broke or the answer was not understood.
    Protocol(String),
    /// supd answered with an error.
    Api { code: String, message: String },
    /// The configuration named by --config is invalid.
    Config(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Unreachable(p, e) => write!(f, "cannot reach supd at `{}`: {e}", p.display()),
            ClientError::Protocol(m) => write!(f, "{m}"),
            ClientError::Api { message, .. } => write!(f, "{message}"),
            ClientError::Config(m) => write!(f, "{m}"),
        }
    }
}

impl ClientError {
    /// The exit status this error maps to.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Unreachable(..) => exit::UNREACHABLE,
            ClientError::Api { code, .. } if code == "not_found" => exit::USAGE,
            ClientError::Config(_) => exit::USAGE,
            _ => exit::FAILED,
        }
    }

    /// What the user might do about it.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            ClientError::Unreachable(_, e) if e.kind() == std::io::ErrorKind::PermissionDenied => Some(
                "this user may not open the control socket: run as root, as supd's user, or as a member of control_socket_group",
            ),
            ClientError::Api { code, .. } if code == "busy" => {
                Some("supd is serving max_control_connections connections; retry shortly")
            }
            ClientError::Api { code, .. } if code == "too_many_followers" => {
                Some("every `supctl logs -f` holds a place until it ends: stop one, or leave out -f")
            }
            ClientError::Unreachable(..) => {
                Some("is supd running? pass --socket PATH or --config FILE if it uses another socket (exit 3)")
            }
            ClientError::Api { code, .. } if code == "forbidden" => Some(
                "run as root, as supd's user, or as a member of control_socket_group (or control_socket_read_group, to read)",
            ),
            ClientError::Api { code, .. } if code == "read_only" => {
                Some("acting needs root, supd's user, or a member of control_socket_group")
            }
            ClientError::Api { code, .. } if code == "not_found" => Some("`supctl status` lists the apps"),
            _ => None,
        }
    }
}

/// A client bound to one control socket.
pub struct Client {
    socket: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Client {
    /// Prepares a client; does not connect yet.
    pub fn new(socket: PathBuf) -> Result<Client, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Protocol(format!("cannot start runtime: {e}")))?;
        Ok(Client { socket, rt })
    }

    /// `GET path`, decoded as JSON.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, Bytes::new())
    }

    /// `POST path` with a JSON body, decoded as JSON.
    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.call(Method::POST, path, Bytes::from(body))
    }

    /// `POST path` answered by newline-delimited JSON; `on_line` sees each value as it arrives.
    pub fn stream<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        on_line: impl FnMut(T),
    ) -> Result<(), ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.stream_with(Method::POST, path, Bytes::from(body), on_line)
    }

    /// `GET path` answered by newline-delimited JSON, as it arrives.
    pub fn stream_get<T: DeserializeOwned>(&self, path: &str, on_line: impl FnMut(T)) -> Result<(), ClientError> {
        self.stream_with(Method::GET, path, Bytes::new(), on_line)
    }

    fn stream_with<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        mut on_line: impl FnMut(T),
    ) -> Result<(), ClientError> {
        self.rt.block_on(async {
            let resp = self.send(method, path, body).await?;
            let broken = |e: hyper::Error| ClientError::Protocol(format!("control connection failed: {e}"));
            let mut body = resp.into_body();
            let mut pending: Vec<u8> = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(broken)?;
                let Some(data) = frame.data_ref() else { continue };
                pending.extend_from_slice(data);
                while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=pos).collect();
                    let value = serde_json::from_slice(&line)
                        .map_err(|e| ClientError::Protocol(format!("cannot decode supd's progress: {e}")))?;
                    on_line(value);
                }
            }
            Ok(())
        })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let stream =
            UnixStream::connect(&self.socket).await.map_err(|e| ClientError::Unreachable(self.socket.clone(), e))?;
        let broken = |e: hyper::Error| ClientError::Protocol(format!("control connection failed: {e}"));
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(broken)?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "supd")
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(broken)?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(broken)?.to_bytes();
        Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(e) => ClientError::Api { code: e.error.code, message: e.error.message },
            Err(_) => ClientError::Protocol(format!("supd answered {status}")),
        })
    }

    fn call<T: DeserializeOwned>(&self, method: Method, path: &str, body: Bytes) -> Result<T, ClientError> {
        self.rt.block_on(async {
            let resp = self.send(method, path, body).await?;
            let broken = |e: hyper::Error| ClientError::Protocol(format!("control connection failed: {e}"));
            let bytes = resp.into_body().collect().await.map_err(broken)?.to_bytes();
            serde_json::from_slice(&bytes)
                .map_err(|e| ClientError::Protocol(format!("cannot decode supd's answer: {e}")))
        })
    }
}
