//! `supctl import`: PM2 ecosystem files converted to supervisor.toml, driving
//! the real `supctl` binary on the fixtures in `tests/fixtures/import/`.
//! Every generated file must pass `supctl config check`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sup::bin;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/import").join(name)
}

fn supctl(args: &[&str]) -> Output {
    Command::new(bin("supctl"))
        .args(args)
        .env_remove("SUPD_CONFIG")
        .env_remove("SUPD_SOCKET")
        .output()
        .expect("run supctl")
}

fn node_available() -> bool {
    let found = Command::new("node").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    if !found {
        sup::skip("`node` is not installed, and JavaScript ecosystem files need it");
    }
    found
}

/// Result of one `supctl import` run that wrote `-o FILE`.
struct Imported {
    _dir: tempfile::TempDir,
    file: PathBuf,
    toml: String,
    stderr: String,
}

/// Imports `fixture` with `extra` arguments into a temporary supervisor.toml; asserts exit 0.
fn import(name: &str, extra: &[&str]) -> Imported {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("supervisor.toml");
    let src = fixture(name);
    let mut args = vec!["import", src.to_str().expect("utf-8 path"), "-o", file.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    let out = supctl(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "supctl import {name} failed: {stderr}");
    let toml = std::fs::read_to_string(&file).expect("read the written file");
    Imported { _dir: dir, file, toml, stderr }
}

/// `supctl config check FILE` must accept the file.
fn assert_checks(file: &Path) {
    let out = supctl(&["config", "check", file.to_str().expect("utf-8 path")]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "config check of {} failed: {}\n{}",
        file.display(),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(file).unwrap_or_default()
    );
}

/// The lines of one table, `header` (`[apps.api]`) up to the next table.
fn table<'a>(toml: &'a str, header: &str) -> Vec<&'a str> {
    let mut lines = toml.lines().skip_while(|l| l.trim() != header);
    assert!(lines.next().is_some(), "no table {header} in:\n{toml}");
    lines.take_while(|l| !l.starts_with('[')).collect()
}

/// Asserts that `table` has each of `expected` as a whole line.
fn assert_lines(toml: &str, header: &str, expected: &[&str]) {
    let t = table(toml, header);
    for line in expected {
        assert!(t.contains(line), "{header} lacks the line `{line}`; it has:\n{}", t.join("\n"));
    }
}

fn assert_warns(stderr: &str, app: &str, options: &[&str]) {
    for o in options {
        let w = format!("app `{app}`: option `{o}` is not supported by sup and was not carried over");
        assert!(stderr.contains(&w), "stderr lacks `{w}`:\n{stderr}");
    }
}

/// `table` sets `watch` to `line`'s value, as a key or (until sup has `watch`) as a comment.
fn assert_watch(toml: &str, header: &str, line: &str) {
    let t = table(toml, header);
    let found = t.contains(&line);
    assert!(found, "{header} lacks `{line}`; it has:\n{}", t.join("\n"));
}

#[test]
fn js_file_with_two_apps_and_env_production() {
    if !node_available() {
        return;
    }
    let r = import("ecosystem.config.js", &["--env", "production"]);
    let dir = fixture("");
    let cwd = format!("cwd = \"{}\"", dir.to_str().expect("utf-8").trim_end_matches('/'));
    assert!(r.toml.starts_with("# supervisor.toml converted from the PM2 ecosystem file"), "{}", r.toml);
    assert!(r.toml.contains("ecosystem.config.js"), "the header names the source file");
    assert!(r.toml.contains("\n[supervisor]\n"), "{}", r.toml);

    assert_lines(
        &r.toml,
        "[apps.api]",
        &[
            r#"command = ["node", "--max-old-space-size=256", "server.js", "--trust-proxy"]"#,
            &cwd,
            "instances = 4",
            r#"listen = ["0.0.0.0:3000"]"#,
            "node_cluster = true",
            r#"cron_restart = "0 3 * * *""#,
            r#"ready = "pm2""#,
            r#"ready_timeout = "8000ms""#,
            r#"stop_timeout = "5000ms""#,
            r#"restart = "on-failure""#,
            "stop_exit_codes = [0]",
            r#"backoff = { initial = "100ms", reset_after = "10000ms" }"#,
            "max_restarts = 5",
            r#"memory_limit = "300M""#,
            "logs = { combined = true }",
        ],
    );
    // watch + ignore_watch carry over to `watch` (a comment until this sup has the key).
    assert_watch(&r.toml, "[apps.api]", r#"watch = { ignore = ["node_modules"] }"#);
    // env_production merged over env; PORT became `listen`.
    let env = table(&r.toml, "[apps.api.env]");
    for line in [r#"NODE_ENV = "production""#, r#"LOG_LEVEL = "info""#, r#"DATABASE_POOL = "20""#] {
        assert!(env.contains(&line), "env lacks `{line}`: {env:?}");
    }
    assert!(!env.iter().any(|l| l.starts_with("PORT")), "PORT is set from `listen`: {env:?}");

    assert_lines(
        &r.toml,
        "[apps.internal-worker]",
        &[
            r#"command = ["python3", "-u", "worker.py", "--queue", "jobs", "--concurrency", "2"]"#,
            &cwd,
            "instances = 1",
            r#"ready = "none""#,
            r#"stop_timeout = "30000ms""#,
            r#"instance_var = "WORKER_ID""#,
        ],
    );
    assert_lines(&r.toml, "[apps.internal-worker.env]", &[r#"QUEUE_URL = "redis://127.0.0.1:6379/0""#]);

    assert_warns(&r.stderr, "internal-worker", &["namespace", "source_map_support"]);
    for o in ["watch", "ignore_watch", "instance_var"] {
        assert!(
            !r.stderr.contains(&format!("option `{o}` is not supported")),
            "{o} reported as unsupported: {}",
            r.stderr
        );
    }
    for w in [
        "app `api`: option `out_file`",
        "app `api`: option `error_file`",
        "app `api`: option `log_date_format`",
        "app `internal-worker`: renamed from PM2 name `internal worker`",
        "top-level option `deploy` is not supported by sup and was not carried over",
    ] {
        assert!(r.stderr.contains(w), "stderr lacks `{w}`:\n{}", r.stderr);
    }
    assert!(r.stderr.contains("not carried over: sup keeps the app's log files in log_dir"), "{}", r.stderr);
    assert_checks(&r.file);
}

#[test]
fn js_file_without_env_uses_env_only_and_prints_to_stdout() {
    if !node_available() {
        return;
    }
    let src = fixture("ecosystem.config.js");
    let out = supctl(&["import", src.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let toml = String::from_utf8(out.stdout).expect("utf-8");
    let env = table(&toml, "[apps.api.env]");
    assert!(env.contains(&r#"NODE_ENV = "development""#), "{env:?}");
    assert!(env.contains(&r#"LOG_LEVEL = "debug""#), "{env:?}");
    assert!(!env.iter().any(|l| l.starts_with("DATABASE_POOL")), "{env:?}");
    assert!(toml.contains("# `env_production` was not used (select it with `supctl import --env production`)"));
    let err = String::from_utf8_lossy(&out.stderr);
    for w in [
        "app `api`: has `env_production`, which was not merged: add `--env production` to merge it over `env`",
        "app `api`: has `env_staging`, which was not merged: add `--env staging`",
    ] {
        assert!(err.contains(w), "stderr lacks `{w}`:\n{err}");
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("supervisor.toml");
    std::fs::write(&file, &toml).expect("write");
    assert_checks(&file);
}

#[test]
fn json_file_with_fixed_delay_no_autorestart_and_no_interpreter() {
    let r = import("ecosystem.json", &[]);
    assert_lines(
        &r.toml,
        "[apps.legacy-web]",
        &[
            r#"command = ["node", "app.js"]"#,
            r#"instances = "max""#,
            r#"listen = ["0.0.0.0:8080"]"#,
            "node_cluster = true",
            r#"ready = "listening""#,
            r#"stop_timeout = "3000ms""#,
            "shutdown_with_message = true",
            r#"backoff = { initial = "2000ms", multiplier = 1.0, max = "2000ms" }"#,
            "memory_limit = 1073741824",
        ],
    );
    assert!(r.toml.contains("# PM2 restart_delay = 2000: a fixed delay, approximated with multiplier = 1.0"));
    assert_lines(&r.toml, "[apps.legacy-web.env]", &[r#"NODE_ENV = "production""#]);
    assert_lines(
        &r.toml,
        "[apps.nightly-report]",
        &[
            r#"command = ["./bin/report.sh", "--since", "yesterday"]"#,
            "instances = 1",
            r#"restart = "never""#,
            "stop_exit_codes = [3]",
            r#"memory_limit = "1G""#,
            r#"logs = { combined = true, format = "json" }"#,
        ],
    );
    assert_warns(&r.stderr, "nightly-report", &["vizion"]);
    // sup always stamps lines: `time: true` is said in the output, not reported as missing.
    assert!(!r.stderr.contains("option `time`"), "{}", r.stderr);
    assert!(
        table(&r.toml, "[apps.nightly-report]")
            .contains(&"# PM2 time = true: sup always stamps every line with the time; nothing to set"),
        "{}",
        r.toml
    );
    assert!(r.stderr.contains("app `nightly-report`: option `log_file`"), "{}", r.stderr);
    assert_checks(&r.file);
}

#[test]
fn json_array_root_with_renames_and_inferred_interpreter() {
    let r = import("apps-array.json", &[]);
    assert_lines(
        &r.toml,
        "[apps.queue]",
        &[r#"command = ["node", "queue.js"]"#, r#"instances = "max""#, r#"backoff = { reset_after = "5s" }"#],
    );
    assert!(r.toml.contains("# PM2 instances = -1 means all CPUs but 1"), "{}", r.toml);
    assert_lines(&r.toml, "[apps.queue-2]", &[r#"command = ["node", "queue-b.js"]"#, "instances = 2"]);
    assert_lines(&r.toml, "[apps.queue-2.env]", &[r#"PORT = "4000""#]);
    assert_lines(
        &r.toml,
        "[apps.cleanup]",
        &[r#"command = ["bash", "tools/cleanup.sh"]"#, r#"backoff = { initial = "20000ms", max = "20000ms" }"#],
    );
    assert_warns(&r.stderr, "queue", &["increment_var", "post_update"]);
    assert!(table(&r.toml, "[apps.queue-2]").contains(&"# PM2 watch_delay: no effect without watch"), "{}", r.toml);
    assert!(r.stderr.contains("app `queue`: instances = -1 (all CPUs but 1) became \"max\""), "{}", r.stderr);
    assert!(r.stderr.contains("app `queue-2`: renamed from PM2 name `queue`"), "{}", r.stderr);
    assert_checks(&r.file);
}

#[test]
fn esm_file() {
    if !node_available() {
        return;
    }
    let r = import("ecosystem.config.mjs", &[]);
    assert_lines(&r.toml, "[apps.esm-app]", &[r#"command = ["node", "index.mjs"]"#]);
    assert_checks(&r.file);
}

#[test]
fn esm_shapes_import() {
    if !node_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let app = |n: &str| format!("{{ name: '{n}', script: '{n}.js', instances: 2, env: {{ PORT: '3000' }} }}");
    let cases = [
        ("named.mjs", format!("export const apps = [{}];\n", app("named-mjs"))),
        ("named.config.js", format!("export const apps = [{}];\n", app("named-js"))),
        ("default.config.js", format!("export default {{ apps: [{}] }};\n", app("default-js"))),
        ("default.mjs", format!("const apps = [{}];\nexport default {{ apps }};\n", app("default-mjs"))),
        ("both.mjs", format!("export const apps = [];\nexport default {{ apps: [{}] }};\n", app("both"))),
        ("common.cjs", format!("module.exports = {{ apps: [{}] }};\n", app("common"))),
    ];
    for (file, body) in &cases {
        let src = dir.path().join(file);
        std::fs::write(&src, body).expect("write");
        let out_file = dir.path().join(format!("{file}.toml"));
        let out = supctl(&["import", src.to_str().expect("utf-8"), "-o", out_file.to_str().expect("utf-8")]);
        assert_eq!(out.status.code(), Some(0), "{file}: {}", String::from_utf8_lossy(&out.stderr));
        let toml = std::fs::read_to_string(&out_file).expect("read");
        let name = body.split("name: '").nth(1).and_then(|r| r.split('\'').next()).expect("name");
        assert_lines(
            &toml,
            &format!("[apps.{name}]"),
            &[&format!(r#"command = ["node", "{name}.js"]"#), "instances = 2"],
        );
        assert_checks(&out_file);
    }
    // An ES module that exports no apps says what it found.
    let src = dir.path().join("none.mjs");
    std::fs::write(&src, "export const servers = [];\n").expect("write");
    let out = supctl(&["import", src.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no `apps` array in the exported object"), "{err}");
}

#[test]
fn instance_var_reaches_the_workers_and_watch_carries_over() {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = dir.path().join("ecosystem.json");
    std::fs::write(
        &src,
        r#"{ "apps": [{ "name": "slots", "script": "sh", "interpreter": "none",
             "args": ["-c", "echo slot=$WORKER_ID; exec sleep 1000"], "instances": 2, "exec_mode": "fork",
             "instance_var": "WORKER_ID", "time": true,
             "watch": ["src", "lib"], "ignore_watch": ["node_modules", "*.log"], "watch_delay": 500 }] }"#,
    )
    .expect("write");
    let config = dir.path().join("supervisor.toml");
    let out = supctl(&["import", src.to_str().expect("utf-8"), "-o", config.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("option `time`") && !err.contains("option `instance_var`"), "{err}");
    let toml = std::fs::read_to_string(&config).expect("read");
    assert_lines(&toml, "[apps.slots]", &[r#"instance_var = "WORKER_ID""#]);
    assert_watch(
        &toml,
        "[apps.slots]",
        r#"watch = { paths = ["src", "lib"], ignore = ["node_modules", "*.log"], debounce = "500ms" }"#,
    );
    assert_checks(&config);

    // Run it: each worker sees its slot number in WORKER_ID.
    let toml = toml.replacen(
        "\n[supervisor]\n",
        "\n[supervisor]\ncontrol_socket = \"run/control.sock\"\nrun_dir = \"run\"\nlog_dir = \"logs\"\n",
        1,
    );
    std::fs::write(&config, toml).expect("write");
    let socket = dir.path().join("run/control.sock");
    let d = sup::Daemon::start_with(dir, config, socket);
    d.wait_ready("slots", 2);
    sup::wait_until("both slots to print their WORKER_ID", sup::DEADLINE, || {
        let out = d.supctl(&["logs", "slots", "-n", "10"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (text.contains("slots#0") && text.contains("slot=0") && text.contains("slots#1") && text.contains("slot=1"))
            .then_some(())
    });
}

#[test]
fn yaml_file_with_cron_restart_and_an_invalid_pattern() {
    let r = import("ecosystem.config.yaml", &["--env", "production"]);
    assert_lines(
        &r.toml,
        "[apps.shop]",
        &[
            r#"command = ["node", "./dist/server.js"]"#,
            "instances = 2",
            r#"listen = ["0.0.0.0:8081"]"#,
            "node_cluster = true",
            r#"ready = "pm2""#,
            r#"ready_timeout = "5000ms""#,
            r#"stop_timeout = "4000ms""#,
            r#"stop_signal = "SIGINT""#,
            r#"cron_restart = "30 4 * * 1-5""#,
            r#"memory_limit = "512M""#,
        ],
    );
    assert_lines(&r.toml, "[apps.shop.env]", &[r#"NODE_ENV = "production""#]);
    // A YAML merge key (`<<: *shared_env`) is applied.
    assert_lines(&r.toml, "[apps.mailer.env]", &[r#"NODE_ENV = "development""#, r#"MAILER_QUEUE = "outbound""#]);
    assert_lines(&r.toml, "[apps.mailer]", &[r#"command = ["python3", "mailer.py"]"#, r#"stop_signal = "SIGTERM""#]);
    assert!(
        r.stderr.contains("app `mailer`: option `cron_restart` was not carried over: expected a valid pattern"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("the hour field `99` is out of range or malformed"), "{}", r.stderr);
    assert_watch(&r.toml, "[apps.mailer]", r#"watch = { paths = ["templates"] }"#);
    assert_checks(&r.file);
}

#[test]
fn refuses_invalid_files_and_overwrites() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cases: &[(&str, &str, &str)] = &[
        ("bad.json", "{ \"apps\": [", "is not valid JSON"),
        ("bad.yaml", "apps:\n  - name: [x\n", "is not valid YAML"),
        ("scalar.yml", "42\n", "expected `{ apps: [...] }` or an array of apps"),
        ("scalar.json", "42", "expected `{ apps: [...] }` or an array of apps"),
        ("noscript.json", r#"{"apps":[{"name":"x"}]}"#, "app `x` has no `script`"),
        ("ecosystem.toml", "", "unknown kind of ecosystem file"),
    ];
    for (name, body, msg) in cases {
        let f = dir.path().join(name);
        std::fs::write(&f, body).expect("write");
        let out = supctl(&["import", f.to_str().expect("utf-8")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(msg), "{name}: stderr lacks `{msg}`: {err}");
        assert!(out.stdout.is_empty(), "{name}: nothing is printed on failure");
    }
    let missing = dir.path().join("missing.json");
    let out = supctl(&["import", missing.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));

    // Usage errors are clap's: exit 2.
    assert_eq!(supctl(&["import"]).status.code(), Some(2));
    assert_eq!(supctl(&["import", "x.json", "--bogus"]).status.code(), Some(2));

    // -o does not overwrite without --force.
    let src = fixture("ecosystem.json");
    let target = dir.path().join("supervisor.toml");
    std::fs::write(&target, "# mine\n").expect("write");
    let args = ["import", src.to_str().expect("utf-8"), "-o", target.to_str().expect("utf-8")];
    let out = supctl(&args);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists; use --force"));
    assert_eq!(std::fs::read_to_string(&target).expect("read"), "# mine\n");
    let out = supctl(&[&args[..], &["--force"][..]].concat());
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read_to_string(&target).expect("read").contains("[apps.legacy-web]"));
    assert_checks(&target);
}

#[test]
fn js_file_that_throws_is_reported() {
    if !node_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let f = dir.path().join("ecosystem.config.js");
    std::fs::write(&f, "console.log('noise');\nthrow new Error('no config for you');\n").expect("write");
    let out = supctl(&["import", f.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("could not evaluate") && err.contains("no config for you"), "{err}");

    // Output printed while the file is evaluated does not corrupt the result.
    std::fs::write(&f, "console.log('noise');\nmodule.exports = { apps: [{ name: 'n', script: 'n.js' }] };\n")
        .expect("write");
    let out = supctl(&["import", f.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("[apps.n]"));
}
