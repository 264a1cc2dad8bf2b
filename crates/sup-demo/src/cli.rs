//! Command-line flags, most of which inject faults for tests and benchmarks.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Flags of the `sup-demo` worker.
#[derive(Debug, Parser)]
#[command(name = "sup-demo", version, about = "Small HTTP/1.1 worker for sup's examples, tests and benchmarks")]
pub struct Args {
    /// Port to bind on 127.0.0.1 when neither LISTEN_FDS nor PORT is set.
    #[arg(long)]
    pub port: Option<u16>,

    /// Exit (without graceful shutdown) this long after start; `0s` exits before listening.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub exit_after: Option<Duration>,

    /// Exit code used by --exit-after.
    #[arg(long, value_name = "N", default_value_t = 1, allow_negative_numbers = true)]
    pub exit_code: i32,

    /// Listen and serve, but never send READY=1.
    #[arg(long)]
    pub never_ready: bool,

    /// Ignore SIGTERM and SIGINT entirely.
    #[arg(long)]
    pub ignore_sigterm: bool,

    /// Sleep this long before listening and sending READY=1.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub start_delay: Option<Duration>,

    /// After SIGTERM keep serving this long before closing the listeners.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub drain_delay: Option<Duration>,

    /// Answer `GET /health` with 500 from this long after start on (keep serving `/`).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub unhealthy_after: Option<Duration>,

    /// Stop sending WATCHDOG=1 this long after start (keep serving).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub stop_watchdog_after: Option<Duration>,

    /// Allocate, touch and keep this many bytes per second (suffix K or M for KiB/MiB).
    #[arg(long, value_name = "BYTES_PER_SEC", value_parser = parse_size)]
    pub grow_memory: Option<u64>,

    /// Print N lines per second to stdout.
    #[arg(long, value_name = "N")]
    pub log_rate: Option<u64>,

    /// Also print every --log-rate line to stderr.
    #[arg(long)]
    pub log_stderr: bool,

    /// Write lines to stdout as fast as possible.
    #[arg(long, conflicts_with = "log_rate")]
    pub log_flood: bool,

    /// Pace --log-flood at this many bytes per second (suffix K or M) instead of as fast as possible.
    #[arg(long, value_name = "BYTES_PER_SEC", value_parser = parse_size, requires = "log_flood")]
    pub log_flood_rate: Option<u64>,

    /// Stop --log-rate / --log-flood after N lines.
    #[arg(long, value_name = "N")]
    pub log_count: Option<u64>,

    /// Write this many bytes of 'x' to stdout without a newline (suffix K or M allowed).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub endless_line: Option<u64>,

    /// Spawn `sleep 100000` as a child in our process group.
    #[arg(long)]
    pub spawn_grandchild: bool,

    /// Append `<pid> <unix_time_ns>` to this file before anything else.
    #[arg(long, value_name = "PATH")]
    pub stamp_file: Option<PathBuf>,
}

/// Parses a humantime duration such as `500ms` or `2s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Parses a byte count: a plain integer, or one suffixed with K (KiB) or M (MiB).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1024),
        Some((i, 'm' | 'M')) => (&t[..i], 1024 * 1024),
        _ => (t, 1),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected an integer, optionally suffixed with K or M"))?;
    n.checked_mul(mult).ok_or_else(|| format!("invalid size {s:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_plain() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 12 "), Ok(12));
    }

    #[test]
    fn size_suffixes() {
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("3k"), Ok(3 * 1024));
        assert_eq!(parse_size("2M"), Ok(2 * 1024 * 1024));
        assert_eq!(parse_size("5m"), Ok(5 * 1024 * 1024));
    }

    #[test]
    fn size_rejects_garbage() {
        assert!(parse_size("").is_err());
        assert!(parse_size("K").is_err());
        assert!(parse_size("1G").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1.5M").is_err());
        assert!(parse_size("99999999999999999999M").is_err());
        assert!(parse_size("18014398509481984M").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn flags_parse() {
        let a = Args::try_parse_from([
            "sup-demo",
            "--grow-memory",
            "4M",
            "--exit-after",
            "1s",
            "--exit-code",
            "3",
            "--log-rate",
            "10",
            "--log-count",
            "5",
        ])
        .expect("valid flags");
        assert_eq!(a.grow_memory, Some(4 * 1024 * 1024));
        assert_eq!(a.exit_after, Some(Duration::from_secs(1)));
        assert_eq!(a.exit_code, 3);
        assert_eq!(a.log_rate, Some(10));
        assert_eq!(a.log_count, Some(5));
        assert!(Args::try_parse_from(["sup-demo", "--grow-memory", "lots"]).is_err());
        let a = Args::try_parse_from(["sup-demo", "--log-flood", "--log-flood-rate", "20M"]).expect("valid flags");
        assert_eq!(a.log_flood_rate, Some(20 * 1024 * 1024));
        assert!(Args::try_parse_from(["sup-demo", "--log-flood-rate", "20M"]).is_err(), "needs --log-flood");
    }
}
