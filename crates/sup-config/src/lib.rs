//! Parsing and validation of `supervisor.toml` for supd and supctl.
//!
//! Two stages: `raw` deserializes the file with serde (types and per-value syntax, errors
//! located by toml's spans and serde_path_to_error's key paths), then `supervisor` and `app`
//! apply defaults, resolve paths and run the checks that need several values or the system.

mod app;
mod backoff;
mod choice;
mod command;
mod cron;
mod duration;
mod edit;
mod env;
mod error;
mod identity;
mod instances;
mod listen;
mod logs;
mod mode;
mod name;
mod paths;
mod positive;
mod raw;
mod ready;
mod restart;
mod signal;
mod size;
mod socket;
mod supervisor;
mod watch;

use std::path::{Path, PathBuf};

pub use app::AppConfig;
pub use backoff::Backoff;
pub use cron::CronSchedule;
pub use duration::{parse_duration, MAX_DURATION};
pub use edit::{add_app, remove_app, EditError, NewApp};
pub use error::{ConfigError, Invalid};
pub use identity::{Group, User};
pub use instances::available_cpus;
pub use listen::ListenAddr;
pub use logs::{LogConfig, LogFormat, LogTarget};
pub use paths::default_control_socket;
pub use ready::ReadyCheck;
pub use restart::RestartPolicy;
pub use signal::parse_signal;
pub use size::parse_size;
pub use socket::{control_socket, SocketLookup};
pub use supervisor::{SupervisorConfig, FDS_BASE, FDS_PER_WORKER};
pub use watch::{Ignore, WatchConfig, DEFAULT_IGNORE};

use error::Source;
use raw::RawConfig;

/// A loaded and validated `supervisor.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Absolute path of the file.
    pub path: PathBuf,
    /// The `[supervisor]` table.
    pub supervisor: SupervisorConfig,
    /// The `[apps.NAME]` tables, in file order.
    pub apps: Vec<AppConfig>,
}

impl Config {
    /// The app called `name`.
    pub fn app(&self, name: &str) -> Option<&AppConfig> {
        self.apps.iter().find(|a| a.name == name)
    }
}

/// Makes `path` absolute against the current directory (without resolving symlinks).
fn absolute(path: &Path) -> Result<PathBuf, ConfigError> {
    std::path::absolute(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })
}

/// Reads and validates the file at `path`; relative paths inside resolve against its folder.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let path = absolute(path)?;
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
    parse(&text, &path)
}

/// Validates `source` as if read from `path` (used for messages and relative paths).
pub fn parse(source: &str, path: &Path) -> Result<Config, ConfigError> {
    let path = absolute(path)?;
    let base = path.parent().map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
    let src = Source { file: &path, text: source };
    let deserializer = toml::Deserializer::new(source);
    let raw: RawConfig = serde_path_to_error::deserialize(deserializer).map_err(|e| src.toml_error(e))?;

    let max_workers_span = raw.supervisor.max_workers.as_ref().map_or(0..0, |m| m.span());
    let log_spans: Vec<_> = raw.apps.values().map(|a| a.logs.as_ref().map(|l| l.span())).collect();
    let supervisor = raw.supervisor.build(&src, &base)?;
    let apps = raw.apps.into_iter().map(|(name, app)| app.build(name.0, &src, &base)).collect::<Result<Vec<_>, _>>()?;
    check_log_files(&apps, &log_spans, &src)?;
    let total: u64 = apps.iter().map(|a| u64::from(a.instances)).sum();
    if total > u64::from(supervisor.max_workers) {
        let each: Vec<String> = apps.iter().map(|a| format!("{}: {}", a.name, a.instances)).collect();
        return Err(src.error(
            max_workers_span,
            "supervisor.max_workers".to_string(),
            format!(
                "the apps ask for {total} workers in all ({}), more than max_workers = {}",
                each.join(", "),
                supervisor.max_workers
            ),
        ));
    }
    Ok(Config { path, supervisor, apps })
}

/// Refuses two apps whose log files would have the same name, such as `web`'s
/// `web.out.log` and the combined `web.out.log` of an app `web.out`: each would
/// rotate, flush and prune the other's file. `spans` are the apps' `logs` values.
fn check_log_files(
    apps: &[AppConfig],
    spans: &[Option<std::ops::Range<usize>>],
    src: &Source<'_>,
) -> Result<(), ConfigError> {
    let mut owners: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (i, app) in apps.iter().enumerate() {
        for file in app.logs.file_names(&app.name) {
            let Some(first) = owners.insert(file.clone(), i) else { continue };
            // Names meet only through `combined = true`: blame the app that wrote a `logs` value.
            let span_of = |j: usize| spans.get(j).cloned().flatten();
            let (blamed, span) = match (span_of(i), span_of(first)) {
                (Some(s), _) => (i, s),
                (None, Some(s)) => (first, s),
                (None, None) => (i, 0..0),
            };
            let message = format!(
                "log file `{file}` would be written by both `{}` and `{}`: rename one of the apps, or set `combined` the same for both",
                apps[first].name, app.name
            );
            return Err(src.error(span, error::key_path(&["apps", &apps[blamed].name, "logs"]), message));
        }
    }
    Ok(())
}

/// One-line summary for `supctl check`: `ok: 2 apps (web: 4 instances, worker: 1 instance)`.
pub fn check_message(cfg: &Config) -> String {
    let plural = |n: usize, word: &str| {
        if n == 1 {
            format!("{n} {word}")
        } else {
            format!("{n} {word}s")
        }
    };
    let mut out = format!("ok: {}", plural(cfg.apps.len(), "app"));
    if !cfg.apps.is_empty() {
        let parts: Vec<String> =
            cfg.apps.iter().map(|a| format!("{}: {}", a.name, plural(a.instances as usize, "instance"))).collect();
        out.push_str(&format!(" ({})", parts.join(", ")));
    }
    out
}

#[cfg(test)]
mod testutil {
    //! Helpers shared by the table tests.

    use std::path::{Path, PathBuf};

    use crate::{AppConfig, Config};

    /// The file name every test pretends to parse.
    pub const FILE: &str = "/x/sup.toml";

    /// Parses `src`, panicking with the error when it is invalid.
    pub fn parse_ok(src: &str) -> Config {
        match crate::parse(src, Path::new(FILE)) {
            Ok(cfg) => cfg,
            Err(e) => panic!("unexpected error: {e}\n{src}"),
        }
    }

    /// Parses `src`, which must be invalid, and returns the error's display.
    pub fn err(src: &str) -> String {
        match crate::parse(src, Path::new(FILE)) {
            Ok(cfg) => panic!("unexpectedly valid: {cfg:?}\n{src}"),
            Err(e) => e.to_string(),
        }
    }

    /// An app `web` with `lines` after its command (so they start on line 3).
    fn app_source(lines: &str) -> String {
        format!("[apps.web]\ncommand = \"run\"\n{lines}\n")
    }

    /// The app `web` with `lines` added.
    pub fn parse_app(lines: &str) -> AppConfig {
        let mut cfg = parse_ok(&app_source(lines));
        cfg.apps.remove(0)
    }

    /// The error for app `web` with `lines` added.
    pub fn app_err(lines: &str) -> String {
        err(&app_source(lines))
    }

    /// A scratch directory removed on drop.
    pub struct TempDir(pub PathBuf);

    impl TempDir {
        /// A fresh directory named after `tag`, the process and a counter.
        pub fn new(tag: &str) -> TempDir {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("sup-config-test-{tag}-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("create temp dir");
            TempDir(dir)
        }

        /// Writes `name` with `contents` and returns its path.
        pub fn write(&self, name: &str, contents: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, contents).expect("write temp file");
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{err, parse_ok, TempDir};
    use super::*;

    const EXAMPLE: &str = r#"# supervisor.toml
[supervisor]
metrics = "127.0.0.1:9105"

[apps.web]
command = "node server.js"
instancs = 4
"#;

    #[test]
    fn brief_examples() {
        let cases: &[(&str, &str)] = &[
            (
                EXAMPLE,
                "/x/sup.toml:7:1: key `apps.web.instancs`: unknown key (did you mean `instances`?)",
            ),
            (
                "[apps.web]\ncommand = \"x\"\ninstances = \"lots\"\n",
                "/x/sup.toml:3:13: key `apps.web.instances`: expected a positive integer or \"max\", found `lots`",
            ),
            (
                "[apps.web]\ncommand = \"x\"\nstop_timeout = 5\n",
                "/x/sup.toml:3:16: key `apps.web.stop_timeout`: expected a duration string, found number `5`: use a string such as \"5s\"",
            ),
            (
                "[apps.web]\ncommand = \"x\"\nrequired_env = [\"SUP_TEST_NOPE_1\", \"SUP_TEST_NOPE_2\"]\n",
                "/x/sup.toml:3:16: key `apps.web.required_env`: missing required environment variables `SUP_TEST_NOPE_1`, `SUP_TEST_NOPE_2`",
            ),
            (
                "[apps.web]\ncommand = \"x\"\nuser = \"bob-sup-test\"\n",
                "/x/sup.toml:3:8: key `apps.web.user`: unknown user `bob-sup-test`",
            ),
            (
                "[apps.web]\ncommand = \"x\"\n[apps.web\n",
                "/x/sup.toml:3:10: key `apps.web`: invalid table header; expected `.`, `]`",
            ),
        ];
        for (src, want) in cases {
            assert_eq!(err(src), *want, "{src}");
        }
    }

    #[test]
    fn log_files_of_two_apps_never_meet() {
        let cases: &[(&str, &str)] = &[
            (
                "[apps.web]\ncommand = \"x\"\n[apps.\"web.out\"]\ncommand = \"y\"\nlogs = { combined = true }\n",
                "/x/sup.toml:5:8: key `apps.\"web.out\".logs`: log file `web.out.log` would be written by both `web` and `web.out`: rename one of the apps, or set `combined` the same for both",
            ),
            (
                "[apps.\"web.err\"]\ncommand = \"y\"\nlogs = { combined = true }\n[apps.web]\ncommand = \"x\"\n",
                "/x/sup.toml:3:8: key `apps.\"web.err\".logs`: log file `web.err.log` would be written by both `web.err` and `web`: rename one of the apps, or set `combined` the same for both",
            ),
        ];
        for (src, want) in cases {
            assert_eq!(err(src), *want, "{src}");
        }
        // Dots alone do not make names meet.
        let ok = "[apps.web]\ncommand = \"x\"\nlogs = { combined = true }\n[apps.\"web.log\"]\ncommand = \"y\"\nlogs = { combined = true }\n[apps.\"web.out\"]\ncommand = \"z\"\nlogs = { combined = true }\n";
        assert_eq!(parse_ok(ok).apps.len(), 3);
    }

    #[test]
    fn invalid_fields() {
        let e = crate::parse(EXAMPLE, Path::new("/x/sup.toml")).expect_err("invalid");
        let invalid = e.invalid().expect("an invalid-config error");
        assert_eq!(
            *invalid,
            Invalid {
                file: PathBuf::from("/x/sup.toml"),
                line: 7,
                column: 1,
                key: "apps.web.instancs".to_string(),
                message: "unknown key".to_string(),
                suggestion: Some("instances".to_string()),
            }
        );
    }

    #[test]
    fn empty_and_order() {
        assert!(parse_ok("").apps.is_empty());
        let cfg =
            parse_ok("[apps.zeta]\ncommand = \"z\"\n[apps.alpha]\ncommand = \"a\"\n[apps.mid]\ncommand = \"m\"\n");
        let names: Vec<&str> = cfg.apps.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["zeta", "alpha", "mid"]);
        assert_eq!(cfg.app("alpha").map(|a| a.command.clone()), Some(vec!["a".to_string()]));
        assert_eq!(cfg.path, PathBuf::from("/x/sup.toml"));
    }

    #[test]
    fn check_messages() {
        let cases: &[(&str, &str)] = &[
            ("", "ok: 0 apps"),
            ("[apps.web]\ncommand = \"x\"\n", "ok: 1 app (web: 1 instance)"),
            (
                "[apps.web]\ncommand = \"x\"\ninstances = 4\n[apps.worker]\ncommand = \"y\"\n",
                "ok: 2 apps (web: 4 instances, worker: 1 instance)",
            ),
        ];
        for (src, want) in cases {
            assert_eq!(check_message(&parse_ok(src)), *want, "{src}");
        }
    }

    #[test]
    fn load_from_disk() {
        let dir = TempDir::new("load");
        let path = dir.write("supervisor.toml", "[apps.web]\ncommand = \"x\"\ncwd = \"app\"\n");
        let cfg = load(&path).expect("loads");
        assert_eq!(cfg.path, path);
        assert_eq!(cfg.apps[0].cwd, path.with_file_name("app"));

        let missing = dir.0.join("nope.toml");
        let e = load(&missing).expect_err("missing file");
        assert_eq!(
            e.to_string(),
            format!("cannot read `{}`: No such file or directory (os error 2)", missing.display())
        );
    }

    #[test]
    fn relative_path_made_absolute() {
        let cfg = crate::parse("", Path::new("sup.toml")).expect("valid");
        assert!(cfg.path.is_absolute());
        assert!(cfg.path.ends_with("sup.toml"));
    }
}

/// Things that are allowed but probably unwanted, for `config check` and supd's log.
pub fn warnings(cfg: &Config) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    for app in &cfg.apps {
        if let Some(f) = &app.env_file {
            if let Ok(meta) = std::fs::metadata(f) {
                if meta.permissions().mode() & 0o004 != 0 {
                    out.push(format!(
                        "app `{}`: env_file `{}` is readable by every user; it may hold secrets: chmod o-r it",
                        app.name,
                        f.display()
                    ));
                }
            }
        }
    }
    let s = &cfg.supervisor;
    if let Some(read) = &s.control_socket_read_group {
        // Connecting to a Unix socket needs write permission on its file.
        let file_group = s.control_socket_group.as_ref().unwrap_or(read);
        let reachable =
            s.control_socket_mode & 0o002 != 0 || (file_group.gid == read.gid && s.control_socket_mode & 0o020 != 0);
        if !reachable {
            out.push(format!(
                "members of control_socket_read_group `{}` cannot open the control socket (group `{}`, mode {:04o}): \
                 set control_socket_mode = \"0666\"; that is safe, supd decides from each peer's credentials",
                read.name, file_group.name, s.control_socket_mode
            ));
        }
    }
    out
}
