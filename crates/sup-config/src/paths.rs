//! Default directories and relative-path resolution.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use nix::unistd::{geteuid, Uid};

/// A variable that names an absolute directory; XDG says relative values must be ignored.
fn abs_var(value: Option<OsString>) -> Option<PathBuf> {
    value.map(PathBuf::from).filter(|p| p.is_absolute())
}

/// The run directory for this effective user and environment.
fn run_dir_for(root: bool, runtime_dir: Option<OsString>, uid: u32) -> PathBuf {
    if root {
        return PathBuf::from("/run/supd");
    }
    match abs_var(runtime_dir) {
        Some(dir) => dir.join("supd"),
        None => PathBuf::from(format!("/tmp/supd-{uid}")),
    }
}

/// The log directory for this effective user and environment.
fn log_dir_for(root: bool, state_home: Option<OsString>, home: Option<PathBuf>, uid: u32) -> PathBuf {
    if root {
        return PathBuf::from("/var/log/supd");
    }
    if let Some(state) = abs_var(state_home) {
        return state.join("supd/logs");
    }
    match home.filter(|h| h.is_absolute()) {
        Some(home) => home.join(".local/state/supd/logs"),
        None => PathBuf::from(format!("/tmp/supd-{uid}/logs")),
    }
}

/// The home directory: `$HOME`, else the user database's entry.
fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| nix::unistd::User::from_uid(Uid::current()).ok().flatten().map(|u| u.dir))
}

/// Default `run_dir`: `/run/supd` for root, else `$XDG_RUNTIME_DIR/supd`, else `/tmp/supd-<uid>`.
pub(crate) fn default_run_dir() -> PathBuf {
    let euid = geteuid();
    run_dir_for(euid.is_root(), std::env::var_os("XDG_RUNTIME_DIR"), euid.as_raw())
}

/// Default `log_dir`: `/var/log/supd` for root, else `$XDG_STATE_HOME/supd/logs` or
/// `~/.local/state/supd/logs`.
pub(crate) fn default_log_dir() -> PathBuf {
    let euid = geteuid();
    log_dir_for(euid.is_root(), std::env::var_os("XDG_STATE_HOME"), home_dir(), euid.as_raw())
}

/// The control socket supd uses when the config does not say: `<default run_dir>/control.sock`.
pub fn default_control_socket() -> PathBuf {
    default_run_dir().join("control.sock")
}

/// Resolves `path` against `base` unless it is already absolute.
pub(crate) fn resolve(base: &Path, path: &str) -> PathBuf {
    base.join(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dirs() {
        let cases: &[(bool, Option<&str>, &str)] = &[
            (true, Some("/run/user/1000"), "/run/supd"),
            (false, Some("/run/user/1000"), "/run/user/1000/supd"),
            (false, None, "/tmp/supd-1000"),
            (false, Some(""), "/tmp/supd-1000"),
            (false, Some("relative"), "/tmp/supd-1000"),
        ];
        for (root, var, want) in cases {
            let got = run_dir_for(*root, var.map(OsString::from), 1000);
            assert_eq!(got, PathBuf::from(want), "{root} {var:?}");
        }
    }

    #[test]
    fn log_dirs() {
        let cases: &[(bool, Option<&str>, Option<&str>, &str)] = &[
            (true, Some("/s"), Some("/home/a"), "/var/log/supd"),
            (false, Some("/s"), Some("/home/a"), "/s/supd/logs"),
            (false, None, Some("/home/a"), "/home/a/.local/state/supd/logs"),
            (false, Some("rel"), Some("/home/a"), "/home/a/.local/state/supd/logs"),
            (false, None, None, "/tmp/supd-7/logs"),
        ];
        for (root, state, home, want) in cases {
            let got = log_dir_for(*root, state.map(OsString::from), home.map(PathBuf::from), 7);
            assert_eq!(got, PathBuf::from(want), "{root} {state:?} {home:?}");
        }
    }

    #[test]
    fn control_socket_default() {
        let sock = default_control_socket();
        assert!(sock.is_absolute());
        assert!(sock.ends_with("control.sock"));
        assert_eq!(sock, default_run_dir().join("control.sock"));
    }

    #[test]
    fn resolves() {
        let base = Path::new("/etc/sup");
        assert_eq!(resolve(base, "app"), PathBuf::from("/etc/sup/app"));
        assert_eq!(resolve(base, "/srv/app"), PathBuf::from("/srv/app"));
    }
}
