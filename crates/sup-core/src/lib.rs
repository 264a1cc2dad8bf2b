//! The sup supervisor core.
//!
//! # Theory of operation
//!
//! supd runs one tokio runtime on one thread plus two kinds of helper threads:
//! the *spawner* (all forks happen there, so `PR_SET_PDEATHSIG` ties workers
//! to supd's life) and one *log writer* per app (file I/O never blocks the
//! event loop).
//!
//! - [`reaper`] owns `waitpid`: exits are noticed on SIGCHLD, at once.
//! - [`spawner`] forks and execs with the socket-activation protocol.
//! - [`worker`] watches one process: exit, notify socket, readiness deadline, stop.
//! - [`slot`] is the state machine of one instance slot; it is the only place
//!   where a slot's state changes, and every change is logged with a reason.
//! - [`app`] runs operations (start, stop, restart) over an app's slots, one at a time.
//! - [`listeners`] binds the sockets that outlive workers.
//! - [`supervisor`] holds the apps; [`control`] serves the HTTP/JSON API over a Unix socket.
//!
//! Status is read from `watch` channels each slot publishes on every
//! transition, so answering `status` never waits on a busy task.

pub mod app;
pub mod control;
pub mod cron;
pub mod fdstore;
pub mod listeners;
pub mod logread;
pub mod logs;
pub mod metrics;
pub mod monitor;
pub mod nodeipc;
pub mod notify;
pub mod probe;
pub mod reaper;
pub mod slot;
pub mod spawner;
pub mod spec;
pub mod supervisor;
pub mod worker;

pub use supervisor::{Supervisor, Verb};
