//! `sup-demo`: a small HTTP/1.1 worker for sup's example config, tests and benchmarks.

/// Like `eprintln!`, but a closed or broken stderr is ignored instead of panicking.
macro_rules! warn {
    ($($arg:tt)*) => {
        $crate::write_stderr(format_args!($($arg)*))
    };
}

mod cli;
mod faults;
mod listen;
mod notify;
mod server;

use std::fmt::Display;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use nix::sys::signal::{signal, SigHandler, Signal};
use tokio::signal::unix::{signal as tokio_signal, SignalKind};
use tokio::time::Instant;

use crate::cli::Args;
use crate::listen::StdListener;
use crate::notify::Notifier;

/// A reason to exit early: printed once on stderr, then the process exits with `code`.
pub struct Fatal {
    code: u8,
    msg: String,
}

impl Fatal {
    /// Bad configuration or environment (exit 2).
    pub fn usage(msg: impl Into<String>) -> Fatal {
        Fatal { code: 2, msg: msg.into() }
    }

    /// Failure while starting or running (exit 1).
    pub fn runtime(msg: impl Into<String>) -> Fatal {
        Fatal { code: 1, msg: msg.into() }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            warn!("sup-demo: {}", f.msg);
            ExitCode::from(f.code)
        }
    }
}

fn run(args: Args) -> Result<(), Fatal> {
    let start = std::time::Instant::now();
    // Benchmarks time the gap between a replacement's spawn and its exec, so this comes first.
    if let Some(path) = &args.stamp_file {
        stamp(path)?;
    }
    if args.exit_after == Some(Duration::ZERO) {
        std::process::exit(args.exit_code);
    }
    if args.ignore_sigterm {
        for sig in [Signal::SIGTERM, Signal::SIGINT] {
            // SAFETY: SIG_IGN installs no handler code; nothing else has touched these signals yet.
            unsafe { signal(sig, SigHandler::SigIgn) }
                .map_err(|e| Fatal::runtime(format!("cannot ignore {sig}: {e}")))?;
        }
    }
    // Still single-threaded here, which makes editing the environment sound.
    let inherited = listen::take_inherited()?;
    let port = listen::fallback_port(args.port)?;
    if inherited.is_empty() && port.is_none() {
        return Err(Fatal::usage(
            "nothing to listen on: pass sockets via LISTEN_FDS/LISTEN_PID, or set PORT, or use --port",
        ));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Fatal::runtime(format!("cannot start the tokio runtime: {e}")))?;
    rt.block_on(serve(args, Instant::from_std(start), inherited, port))
}

async fn serve(args: Args, start: Instant, inherited: Vec<StdListener>, port: Option<u16>) -> Result<(), Fatal> {
    let pid = std::process::id();
    let instance = std::env::var("SUP_INSTANCE")
        .or_else(|_| std::env::var("NODE_APP_INSTANCE"))
        .unwrap_or_else(|_| "-".to_owned());

    if let Some(after) = args.exit_after {
        let code = args.exit_code;
        tokio::spawn(async move {
            tokio::time::sleep_until(start + after).await;
            std::process::exit(code);
        });
    }

    let notifier = Notifier::from_env().map(Arc::new);
    if let (Some(n), Some(period)) = (&notifier, notify::watchdog_period()) {
        let stop_at = args.stop_watchdog_after.map(|d| start + d);
        tokio::spawn(notify::watchdog(n.clone(), period, stop_at));
    }

    // Registered before the start delay so an early SIGTERM ends us cleanly.
    let mut signals = if args.ignore_sigterm { None } else { Some(Signals::new()?) };

    if let Some(delay) = args.start_delay {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = recv(&mut signals) => return Ok(()),
        }
    }

    let listeners = if inherited.is_empty() {
        // Checked by the caller: without inherited sockets there is a port.
        let port = port.ok_or_else(|| Fatal::usage("no port to listen on"))?;
        vec![listen::bind(port)?]
    } else {
        inherited.into_iter().map(StdListener::into_tokio).collect::<Result<Vec<_>, _>>()?
    };
    let addrs: Vec<String> = listeners.iter().map(|l| l.addr().to_string()).collect();
    say(format_args!("sup-demo pid={pid} instance={instance} listening on {}", addrs.join(" ")));

    if let (Some(n), false) = (&notifier, args.never_ready) {
        n.send_or_warn(&format!("READY=1\nSTATUS=serving on {} listener(s)", listeners.len()));
    }

    // Kept alive so the handle (and its pid) stays ours; it is never waited for.
    let _grandchild = if args.spawn_grandchild {
        let child = faults::spawn_grandchild()?;
        say(format_args!("grandchild pid={}", child.id()));
        Some(child)
    } else {
        None
    };
    start_faults(&args);

    let shared = server::Shared::new(pid, &instance, args.unhealthy_after.map(|d| start.into_std() + d));
    let drain_delay = args.drain_delay;
    let stop = async {
        recv(&mut signals).await;
        if let Some(n) = &notifier {
            n.send_or_warn("STOPPING=1");
        }
        // On stderr: a --log-flood or --endless-line writer may own stdout mid-line.
        if let Some(delay) = drain_delay {
            let delay_text = humantime::format_duration(delay);
            warn!("sup-demo pid={pid} draining for {delay_text}");
            tokio::time::sleep(delay).await;
        }
        warn!("sup-demo pid={pid} shutting down");
    };
    server::run(listeners, shared, stop).await;
    Ok(())
}

fn start_faults(args: &Args) {
    if let Some(rate) = args.grow_memory {
        faults::grow_memory(rate);
    }
    if let Some(rate) = args.log_rate {
        faults::log_rate(rate, args.log_count, args.log_stderr);
    }
    if args.log_flood {
        faults::log_flood(args.log_count, args.log_flood_rate);
    }
    if let Some(bytes) = args.endless_line {
        faults::endless_line(bytes);
    }
}

/// SIGTERM and SIGINT, either of which starts the graceful stop.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals, Fatal> {
        let fail = |e: std::io::Error| Fatal::runtime(format!("cannot install signal handlers: {e}"));
        Ok(Signals {
            term: tokio_signal(SignalKind::terminate()).map_err(fail)?,
            int: tokio_signal(SignalKind::interrupt()).map_err(fail)?,
        })
    }
}

/// Waits for SIGTERM/SIGINT; forever when they are ignored.
async fn recv(signals: &mut Option<Signals>) {
    match signals {
        Some(s) => {
            tokio::select! {
                _ = s.term.recv() => {}
                _ = s.int.recv() => {}
            }
        }
        None => std::future::pending().await,
    }
}

/// Backs `warn!`: one line to stderr, errors ignored (there is nowhere left to report them).
pub fn write_stderr(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Prints one line to stdout; a closed or broken stdout must not kill the server.
fn say(line: impl Display) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// Appends `<pid> <unix_time_ns>` to `path` in a single write.
fn stamp(path: &std::path::Path) -> Result<(), Fatal> {
    let now =
        SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| Fatal::runtime(format!("clock before 1970: {e}")))?;
    let line = format!("{} {}\n", std::process::id(), now.as_nanos());
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .map_err(|e| Fatal::runtime(format!("cannot append to stamp file {}: {e}", path.display())))
}
