//! Finding the control socket in a file that may not be valid as a whole, so supctl can
//! still reach supd while someone is halfway through editing its configuration.

use std::path::{Path, PathBuf};

use crate::error::ConfigError;
use crate::paths::{default_run_dir, resolve};

/// The control socket named by a configuration file, and the file's error if it has one.
#[derive(Debug)]
pub struct SocketLookup {
    /// Where supd listens according to the file (or the default when the file cannot say).
    pub socket: PathBuf,
    /// Why the file as a whole is invalid; `socket` was then read leniently.
    pub error: Option<ConfigError>,
}

/// Reads `path` for its control socket: from the validated file when it is valid, else
/// from `control_socket` and `run_dir` in `[supervisor]` alone. Fails only when the file
/// cannot be read.
pub fn control_socket(path: &Path) -> Result<SocketLookup, ConfigError> {
    let path = std::path::absolute(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
    match crate::parse(&text, &path) {
        Ok(cfg) => Ok(SocketLookup { socket: cfg.supervisor.control_socket, error: None }),
        Err(e) => {
            let base = path.parent().map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
            Ok(SocketLookup { socket: lenient(&text, &base), error: Some(e) })
        }
    }
}

/// The socket from `[supervisor]` only, tolerating errors anywhere else, even TOML syntax.
fn lenient(text: &str, base: &Path) -> PathBuf {
    let table = supervisor_table(text);
    let string = |key: &str| table.get(key).and_then(toml::Value::as_str).map(str::to_string);
    match (string("control_socket"), string("run_dir")) {
        (Some(s), _) => resolve(base, &s),
        (None, Some(d)) => resolve(base, &d).join("control.sock"),
        (None, None) => default_run_dir().join("control.sock"),
    }
}

/// The `[supervisor]` table: from the whole document if it parses, else from the lines
/// between its header and the next one, else from those of its lines that parse alone.
fn supervisor_table(text: &str) -> toml::Table {
    if let Ok(mut doc) = text.parse::<toml::Table>() {
        return match doc.remove("supervisor") {
            Some(toml::Value::Table(t)) => t,
            _ => toml::Table::new(),
        };
    }
    let section: Vec<&str> = text
        .lines()
        .skip_while(|l| l.trim() != "[supervisor]")
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with('['))
        .collect();
    if let Ok(t) = section.join("\n").parse::<toml::Table>() {
        return t;
    }
    let mut table = toml::Table::new();
    for line in section {
        if let Ok(t) = line.parse::<toml::Table>() {
            table.extend(t);
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    #[test]
    fn broken_files_still_name_their_socket() {
        let dir = TempDir::new("socket");
        let cases: &[(&str, Option<&str>, bool)] = &[
            ("[supervisor]\ncontrol_socket = \"s.sock\"\n[apps.web]\ncommand = \"x\"\n", Some("s.sock"), false),
            (
                "[supervisor]\ncontrol_socket = \"s.sock\"\n[apps.web]\ncommand = \"x\"\ninstancs = 2\n",
                Some("s.sock"),
                true,
            ),
            ("[supervisor]\ncontrol_socket = \"s.sock\"\n[apps.web\ncommand = \"x\"\n", Some("s.sock"), true),
            ("[supervisor]\nrun_dir = \"run\"\nmax_workers = =\n[apps.web]\n", Some("run/control.sock"), true),
            ("[supervisor]\nmetrics = \"nope\"\ncontrol_socket = \"/abs.sock\"\n", Some("/abs.sock"), true),
            ("[apps.web]\ncommand = \"x\"\nready = \"notfy\"\n", None, true),
        ];
        for (i, (text, want, broken)) in cases.iter().enumerate() {
            let path = dir.write(&format!("{i}.toml"), text);
            let got = control_socket(&path).expect("readable");
            let want = want.map_or_else(|| default_run_dir().join("control.sock"), |w| dir.0.join(w));
            assert_eq!(got.socket, want, "{text}");
            assert_eq!(got.error.is_some(), *broken, "{text}");
        }
        assert!(control_socket(&dir.0.join("missing.toml")).is_err());
    }
}
