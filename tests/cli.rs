//! End-to-end: supctl's usage text, its use of a config file with an error in it, and
//! `config check` on enumerated values (real supd, real supctl).

use std::path::Path;
use std::process::{Command, Output};

use sup::*;

fn demo() -> String {
    bin("sup-demo").display().to_string()
}

/// supctl with `SUPD_CONFIG` exported (and no socket from the environment).
fn supctl_with_config(config: &Path, args: &[&str]) -> Output {
    Command::new(bin("supctl"))
        .env("SUPD_CONFIG", config)
        .env_remove("SUPD_SOCKET")
        .args(args)
        .output()
        .expect("run supctl")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn usage_never_shows_an_exported_config_as_required() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("supervisor.toml");
    std::fs::write(&config, "[apps.web]\ncommand = \"sleep 100\"\n").expect("write");
    // Every command that can be called with a required argument missing.
    let commands: &[&[&str]] = &[
        &["logs"],
        &["describe"],
        &["signal"],
        &["flush"],
        &["start"],
        &["stop"],
        &["restart"],
        &["reload"],
        &["promote"],
        &["rollback"],
        &["history"],
        &["scale"],
        &["config"],
        &["import"],
        &["add"],
        &["add", "web"],
        &["remove"],
        &["stop", "web", "--all"],
        &["reload", "--all", "--canary", "1"],
    ];
    for args in commands {
        let out = supctl_with_config(&config, args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        let usage = err.lines().find(|l| l.starts_with("Usage:")).unwrap_or_else(|| panic!("{args:?}: {err}"));
        assert!(!usage.contains("--config"), "{args:?}: usage shows --config as required: {usage}");
        if ["start", "stop", "restart", "reload"].contains(&args[0]) {
            assert!(usage.contains("<APP|--all>"), "{args:?}: usage does not mention --all: {usage}");
        }
    }
    // --help still names the environment variables.
    let help = text(&supctl_with_config(&config, &["stop", "--help"]).stdout);
    assert!(help.contains("SUPD_CONFIG") && help.contains("SUPD_SOCKET"), "{help}");
}

#[test]
fn a_broken_config_file_does_not_lock_supctl_out() {
    let port = free_port();
    let d = Daemon::start(&format!(
        "[apps.web]\ncommand = [\"{}\", \"--port\", \"{port}\"]\nready = \"notify\"\nlisten = [\"127.0.0.1:{port}\"]\n",
        demo()
    ));
    d.wait_ready("web", 1);
    let good = std::fs::read_to_string(&d.config).expect("read config");

    // A typo far from [supervisor], then a TOML syntax error: both are mid-edit states.
    for broken in [good.replace("ready = ", "redy = "), format!("{good}\n[apps.half\ncommand = \"x\"\n")] {
        std::fs::write(&d.config, &broken).expect("write broken config");
        let check = supctl_with_config(&d.config, &["config", "check"]);
        assert_eq!(check.status.code(), Some(1), "{}", text(&check.stderr));
        let first_error = text(&check.stderr).lines().next().unwrap_or_default().to_string();

        let status = supctl_with_config(&d.config, &["status"]);
        let err = text(&status.stderr);
        assert!(status.status.success(), "status failed: {err}");
        assert!(text(&status.stdout).contains("web"), "{}", text(&status.stdout));
        assert!(err.contains("warning:") && err.contains(&first_error), "no warning with the error: {err}");

        let logs = supctl_with_config(&d.config, &["logs", "web", "-n", "5"]);
        assert!(logs.status.success(), "logs failed: {}", text(&logs.stderr));
        assert!(text(&logs.stderr).contains("warning:"), "{}", text(&logs.stderr));

        // Commands that make supd read the file fail on its error, and change nothing.
        for args in [&["config", "apply"][..], &["reload", "web"][..]] {
            let out = supctl_with_config(&d.config, args);
            // `config apply` goes to supd, which refuses the file (exit 1); reload fails in supctl (exit 2).
            assert!(matches!(out.status.code(), Some(1 | 2)), "{args:?}: {}", text(&out.stderr));
            assert!(text(&out.stderr).contains(&first_error), "{args:?}: {}", text(&out.stderr));
        }
        assert_eq!(d.instances("web")[0].state, WorkerState::Ready);
    }

    let stop = supctl_with_config(&d.config, &["stop", "web"]);
    assert!(stop.status.success(), "stop failed: {}", text(&stop.stderr));
    assert!(text(&stop.stderr).contains("warning:"), "{}", text(&stop.stderr));
    wait_until("web stopped", DEADLINE, || {
        d.instances("web").iter().all(|i| i.state == WorkerState::Stopped).then_some(())
    });

    // A valid file again: no warning.
    std::fs::write(&d.config, &good).expect("restore config");
    let status = supctl_with_config(&d.config, &["status"]);
    assert!(status.status.success() && !text(&status.stderr).contains("warning"), "{}", text(&status.stderr));
}

#[test]
fn config_check_suggests_enumerated_values_in_any_case() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: &[(&str, Option<&str>)] = &[
        ("ready = \"notfy\"", Some("(did you mean `notify`?)")),
        ("ready = \"Notify\"", None),
        ("ready = \"LISTENING\"\nnode_cluster = true\nlisten = [\"127.0.0.1:1\"]", None),
        ("restart = \"on_failur\"", Some("(did you mean `on-failure`?)")),
        ("restart = \"Never\"", None),
        ("stop_signal = \"sigtrem\"", Some("(did you mean `SIGTERM`?)")),
        ("stop_signal = \"Int\"", None),
        ("logs = \"jurnald\"", Some("(did you mean `journald`?)")),
        ("logs = \"Journald\"", None),
        ("logs = { format = \"jsno\" }", Some("(did you mean `json`?)")),
        ("logs = { format = \"JSON\", rotate_every = \"Daily\", rotate_size = \"OFF\" }", None),
        ("ready = { htp = \"/health\" }", Some("(did you mean `http`?)")),
    ];
    for (i, (line, want)) in cases.iter().enumerate() {
        let config = dir.path().join(format!("{i}.toml"));
        std::fs::write(&config, format!("[apps.web]\ncommand = \"sleep 100\"\n{line}\n")).expect("write");
        let out = Command::new(bin("supctl")).args(["config", "check"]).arg(&config).output().expect("supctl");
        match want {
            Some(w) => {
                assert_eq!(out.status.code(), Some(1), "{line}: {}", text(&out.stdout));
                let err = text(&out.stderr);
                assert!(err.contains(w) && err.contains(":3:"), "{line}: want `{w}` in {err}");
            }
            None => assert!(out.status.success(), "{line}: {}", text(&out.stderr)),
        }
    }
}
