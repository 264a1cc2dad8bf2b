//! supd's command line.

use std::path::PathBuf;

use clap::Parser;

/// Runs and supervises the apps of a supervisor.toml, in the foreground.
#[derive(Debug, Parser)]
#[command(
    name = "supd",
    version,
    after_help = "Signals: SIGTERM or SIGINT stop every app gracefully (a second one kills them), SIGHUP applies the \
                  configuration file again, SIGUSR1 reopens the log files."
)]
pub struct Args {
    /// The configuration file.
    #[arg(long, short, env = "SUPD_CONFIG", default_value = "/etc/supd/supervisor.toml")]
    pub config: PathBuf,
}
