//! End-to-end: supd supervising real sup-demo workers, driven by real supctl.

use std::time::{Duration, Instant};

use sup::*;

fn demo() -> String {
    bin("sup-demo").display().to_string()
}

fn app(name: &str, instances: u32, port: u16, extra_args: &str, extra: &str) -> String {
    format!(
        "[apps.{name}]\ncommand = [\"{}\", \"--port\", \"{port}\"{extra_args}]\ninstances = {instances}\nready = \"notify\"\nlisten = [\"127.0.0.1:{port}\"]\n{extra}\n",
        demo()
    )
}

#[test]
fn example_config_runs_as_is() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("supervisor.toml.example")).expect("example config");
    let (web, internal) = (free_port(), free_port());
    let text = text
        .replace("./target/debug/sup-demo", &demo())
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{web}"))
        .replace("port = 8090", &format!("port = {internal}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("supervisor.toml");
    std::fs::write(&config, text).expect("write");
    let out =
        std::process::Command::new(bin("supctl")).args(["config", "check"]).arg(&config).output().expect("supctl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let socket = dir.path().join("demo/run/control.sock");
    let d = Daemon::start_with(dir, config, socket);
    d.wait_ready("web", 2);
    d.wait_ready("internal", 1);
    let (code, body) = http_get(web, "/").expect("web answers");
    assert_eq!(code, 200);
    assert!(body.contains("instance="), "{body}");
    assert_eq!(http_get(internal, "/health").expect("internal answers").0, 200);
    let out = d.supctl(&["status"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("web") && table.contains("internal") && table.contains("ready"), "{table}");
}

#[test]
fn killed_worker_is_replaced_in_its_slot() {
    let port = free_port();
    let d = Daemon::start(&app("web", 2, port, "", ""));
    let before = d.wait_ready("web", 2);
    let victim = before[1].pid.expect("pid");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let after = wait_until("slot 1 to get a new ready worker", DEADLINE, || {
        let i = d.instances("web");
        let s1 = &i[1];
        (s1.pid.is_some() && s1.pid != Some(victim) && s1.state == WorkerState::Ready).then_some(i)
    });
    assert_eq!(after[1].restarts, 1, "{:?}", after[1]);
    assert_eq!(after[0].pid, before[0].pid, "slot 0 untouched");
    assert_eq!(after[0].restarts, 0);
    assert!(!alive(victim));
    let (code, body) = http_get(port, "/").expect("request after the crash");
    assert_eq!(code, 200, "{body}");
}

#[test]
fn crash_loop_backs_off_and_ends_errored() {
    let port = free_port();
    let extra =
        "max_restarts = 4\nrestart_window = \"60s\"\nbackoff = { initial = \"50ms\", multiplier = 2.0, max = \"5s\" }";
    let d = Daemon::start(&app("crashy", 1, port, ", \"--exit-after\", \"0s\", \"--exit-code\", \"3\"", extra));
    let errored = wait_until("crashy to be errored", DEADLINE, || {
        let i = d.instances("crashy");
        (i[0].state == WorkerState::Errored).then(|| i[0].clone())
    });
    assert!(errored.reason.contains("crashed 5 times"), "{}", errored.reason);
    assert!(errored.reason.contains("exited with code 3"), "{}", errored.reason);
    let delays: Vec<u64> = d
        .log()
        .lines()
        .filter_map(|l| l.split("restarting in ").nth(1))
        .filter_map(|r| r.split_whitespace().next().and_then(|d| humantime::parse_duration(d).ok()))
        .map(|d| d.as_millis() as u64)
        .collect();
    assert!(d.log().contains("restarting now"), "first restart is immediate:\n{}", d.log());
    assert_eq!(delays, vec![50, 100, 200], "growing backoff delays:\n{}", d.log());
    // An operator's start gives it a fresh chance.
    let out = d.supctl(&["start", "crashy"]);
    assert_eq!(out.status.code(), Some(1), "start of a crashing app fails: {}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("exited with code 3"));
}

#[test]
fn worker_ignoring_sigterm_is_killed_after_stop_timeout() {
    let port = free_port();
    let d = Daemon::start(&app("stubborn", 1, port, ", \"--ignore-sigterm\"", "stop_timeout = \"1s\""));
    let pid = d.wait_ready("stubborn", 1)[0].pid.expect("pid");
    let t0 = Instant::now();
    let out = d.supctl(&["stop", "stubborn"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(t0.elapsed() >= Duration::from_millis(900), "stop waited for the stop timeout");
    assert!(!alive(pid));
    d.wait_log("did not stop within 1s; sending SIGKILL", DEADLINE);
    let i = d.instances("stubborn");
    assert_eq!(i[0].state, WorkerState::Stopped);
    assert_eq!(i[0].pid, None);
}

#[test]
fn sigterm_to_supd_leaves_no_worker_or_grandchild() {
    let port = free_port();
    let d = Daemon::start(&app("tree", 2, port, ", \"--spawn-grandchild\"", ""));
    let pids: Vec<u32> = d.wait_ready("tree", 2).iter().filter_map(|i| i.pid).collect();
    let log = d.path("logs/tree.out.log");
    let grandchildren: Vec<u32> = wait_until("both grandchild pids in the log", DEADLINE, || {
        let text = std::fs::read_to_string(&log).ok()?;
        let g: Vec<u32> = text
            .lines()
            .filter_map(|l| l.split("grandchild pid=").nth(1))
            .filter_map(|p| p.trim().parse().ok())
            .collect();
        (g.len() == 2).then_some(g)
    });
    assert!(grandchildren.iter().all(|&p| alive(p)));
    let status = d.stop();
    assert_eq!(status.code(), Some(0), "supd exits 0 on SIGTERM: {}", describe(status));
    for pid in pids.iter().chain(&grandchildren) {
        wait_until(&format!("process {pid} to be gone"), DEADLINE, || (!alive(*pid)).then_some(()));
    }
}

#[test]
fn config_errors_name_file_line_column_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("[apps.web]\ncommand = \"true\"\ninstances = \"lots\"\n", ":3:13: key `apps.web.instances`"),
        (
            "[apps.web]\ncommand = \"true\"\ninstancs = 2\n",
            ":3:1: key `apps.web.instancs`: unknown key (did you mean `instances`?)",
        ),
        (
            "[apps.web]\ncommand = \"true\"\nrequired_env = [\"SUP_TEST_SURELY_MISSING\"]\n",
            ":3:16: key `apps.web.required_env`: missing required environment variable `SUP_TEST_SURELY_MISSING`",
        ),
    ];
    for (i, (body, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, body).expect("write");
        let out =
            std::process::Command::new(bin("supctl")).args(["config", "check"]).arg(&path).output().expect("supctl");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(&format!("{}{want}", path.display())), "case {i}: want `{want}` in:\n{err}");
        let out = std::process::Command::new(bin("supd")).arg("--config").arg(&path).output().expect("supd");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(want), "supd refuses too: {err}");
    }
}

#[test]
fn malformed_control_requests_get_4xx_and_change_nothing() {
    let port = free_port();
    let d = Daemon::start(&app("web", 2, port, "", ""));
    let before = d.wait_ready("web", 2);
    let big = format!("POST /v1/stop HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n{}", "x".repeat(70_000));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"\x00\x01garbage\r\n\r\n".to_vec(), "400"),
        (b"GET /v1/nope HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), "404"),
        (b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), "404"),
        (b"GET /v1/stop HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), "405"),
        (b"POST /v1/stop HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n{not json".to_vec(), "400"),
        (b"POST /v1/stop HTTP/1.1\r\nHost: x\r\nContent-Length: 14\r\n\r\n{\"app\":\"nope\"}".to_vec(), "404"),
        (
            b"POST /v1/stop HTTP/1.1\r\nHost: x\r\nContent-Length: 25\r\n\r\n{\"app\":\"web\",\"all\":true}".to_vec(),
            "400",
        ),
        (b"POST /v1/stop HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n\r\n{\"ap\":\"web\"}".to_vec(), "400"),
        (big.into_bytes(), "413"),
        (format!("GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "y".repeat(40_000)).into_bytes(), "431"),
    ];
    for (req, code) in cases {
        let answer = raw_control(&d.socket, &req);
        let first = answer.lines().next().unwrap_or("");
        assert!(
            first.contains(code),
            "want {code} for {:?}, got {first:?}",
            String::from_utf8_lossy(&req[..req.len().min(60)])
        );
        if code != "400" || answer.contains("{") {
            assert!(answer.contains("\"error\"") || code == "431" || code == "400", "JSON error body: {answer}");
        }
    }
    let after = d.wait_ready("web", 2);
    assert_eq!(before.iter().map(|i| i.pid).collect::<Vec<_>>(), after.iter().map(|i| i.pid).collect::<Vec<_>>());
    let out = d.supctl(&["stop", "nope"]);
    assert_eq!(out.status.code(), Some(2), "unknown app is a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no app named `nope`"));
}

#[test]
fn supctl_reports_an_unreachable_supd_with_exit_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(bin("supctl"))
        .arg("--socket")
        .arg(dir.path().join("none.sock"))
        .arg("status")
        .output()
        .expect("supctl");
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach supd at"), "{err}");
}

#[test]
fn a_live_control_socket_is_not_stolen_and_a_stale_one_is_replaced() {
    let port = free_port();
    let d = Daemon::start(&app("web", 1, port, "", ""));
    d.wait_ready("web", 1);
    let out = std::process::Command::new(bin("supd")).arg("--config").arg(&d.config).output().expect("second supd");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is in use by a running supd"));
    let worker = d.wait_ready("web", 1)[0].pid.expect("pid");
    // A SIGKILLed supd leaves its socket file behind; the next one takes over.
    let config = d.config.clone();
    d.signal(libc::SIGKILL);
    // Its worker does not linger as an orphan (PR_SET_PDEATHSIG).
    wait_until("the orphaned worker to die", DEADLINE, || (!alive(worker)).then_some(()));
    let dir = {
        let mut d = d;
        wait_until("supd killed", DEADLINE, || {
            let out =
                std::process::Command::new(bin("supctl")).arg("--socket").arg(&d.socket).arg("status").output().ok()?;
            (out.status.code() == Some(3)).then_some(())
        });
        std::mem::replace(&mut d.dir, tempfile::tempdir().expect("tempdir"))
    };
    assert!(dir.path().join("run/control.sock").exists(), "stale socket left behind");
    let socket = dir.path().join("run/control.sock");
    let d2 = Daemon::start_with(dir, config, socket);
    d2.wait_ready("web", 1);
}

#[test]
fn second_signal_escalates_to_sigkill() {
    let port = free_port();
    let d = Daemon::start(&app("stubborn", 1, port, ", \"--ignore-sigterm\"", "stop_timeout = \"60s\""));
    let pid = d.wait_ready("stubborn", 1)[0].pid.expect("pid");
    d.signal(libc::SIGTERM);
    d.wait_log("SIGTERM: stopping all apps", DEADLINE);
    d.wait_log("stop requested", DEADLINE);
    assert!(alive(pid), "the worker ignores SIGTERM and has 60s to stop");
    d.signal(libc::SIGTERM);
    let t0 = std::time::Instant::now();
    let status = d.wait_exit();
    assert!(t0.elapsed() < Duration::from_secs(20), "did not wait for the 60s stop timeout");
    assert_eq!(status.code(), Some(0), "{}", describe(status));
    wait_until("the worker to be gone", DEADLINE, || (!alive(pid)).then_some(()));
}

#[test]
fn workers_get_the_environment_of_the_protocol_and_the_config() {
    let script = "echo vars: $SUP_APP $SUP_INSTANCE $NODE_APP_INSTANCE $GREETING $FROM_FILE $PORT ${NOTIFY_SOCKET:+notify} ${LISTEN_FDS:-nofds}; exec sleep 1000";
    let d = Daemon::start_with_files(
        &format!("[apps.env]\ncommand = [\"sh\", \"-c\", \"{script}\"]\ninstances = 2\nport = 4321\nenv = {{ GREETING = \"hi\" }}\nenv_file = \"app.env\"\n"),
        &[("app.env", "FROM_FILE=s3cret\nGREETING=overridden-by-table\n")],
    );
    d.wait_ready("env", 2);
    let log = d.path("logs/env.out.log");
    let text = wait_until("both instances' lines", DEADLINE, || {
        let t = std::fs::read_to_string(&log).ok()?;
        (t.matches("vars:").count() == 2).then_some(t)
    });
    assert!(text.contains(" env#0 vars: env 0 0 hi s3cret 4321 notify nofds"), "{text}");
    assert!(text.contains(" env#1 vars: env 1 1 hi s3cret 4321 notify nofds"), "{text}");
    // Output lines are stamped with an RFC 3339 time.
    let first = text.lines().next().unwrap_or("");
    assert!(first.len() > 24 && first.as_bytes()[4] == b'-' && first.contains('T'), "{first}");
    assert!(!d.log().contains("s3cret"), "secrets from env files never reach supd's log");
    // The env file was written with the default umask (world-readable).
    d.wait_log("is readable by every user", DEADLINE);
    let out =
        std::process::Command::new(bin("supctl")).args(["config", "check"]).arg(&d.config).output().expect("supctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("warning: app `env`: env_file") && !err.contains("s3cret"), "{err}");
}

#[test]
fn peers_without_permission_get_403() {
    if nix::unistd::geteuid().as_raw() != 0 {
        skip("needs root to run supctl as another user");
        return;
    }
    let port = free_port();
    let apps = app("web", 1, port, "", "");
    // A world-writable socket, so the peer-credential check is what refuses.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let config = dir.path().join("supervisor.toml");
    std::fs::write(
        &config,
        format!("[supervisor]\ncontrol_socket = \"run/control.sock\"\ncontrol_socket_mode = \"0666\"\nrun_dir = \"run\"\nlog_dir = \"logs\"\n\n{apps}"),
    )
    .expect("write");
    let socket = dir.path().join("run/control.sock");
    let d = Daemon::start_with(dir, config, socket.clone());
    d.wait_ready("web", 1);
    let mode = std::fs::metadata(&socket).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
    assert_eq!(mode.ok(), Some(0o666));
    let out = std::os::unix::process::CommandExt::uid(
        std::process::Command::new(bin("supctl")).arg("--socket").arg(&socket),
        65534,
    )
    .args(["stop", "web"])
    .output()
    .expect("supctl as nobody");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("uid 65534 may not use this control socket"), "{err}");
    d.wait_ready("web", 1);
}

#[test]
fn workers_run_as_the_configured_user() {
    if nix::unistd::geteuid().as_raw() != 0 {
        skip("needs root to switch users");
        return;
    }
    let port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let config = dir.path().join("supervisor.toml");
    std::fs::write(
        &config,
        format!(
            "[supervisor]\ncontrol_socket = \"run/control.sock\"\nrun_dir = \"run\"\nlog_dir = \"logs\"\n\n{}",
            app("web", 1, port, "", "user = \"nobody\"")
        ),
    )
    .expect("write");
    let socket = dir.path().join("run/control.sock");
    let d = Daemon::start_with(dir, config, socket);
    let pid = d.wait_ready("web", 1)[0].pid.expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or("");
    assert!(uid_line.split_whitespace().skip(1).all(|u| u == "65534"), "{uid_line}");
    assert_eq!(http_get(port, "/health").expect("answers").0, 200);
}

#[test]
fn http_and_tcp_probes_gate_readiness() {
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let d = Daemon::start(&format!(
        "[apps.http]\ncommand = [\"{demo}\", \"--never-ready\", \"--start-delay\", \"300ms\"]\nport = {p1}\nready = {{ http = \"/health\" }}\n\n\
         [apps.tcp]\ncommand = [\"{demo}\", \"--never-ready\"]\nport = {p2}\nready = {{ tcp = true }}\n\n\
         [apps.silent]\ncommand = [\"sleep\", \"1000\"]\nport = {p3}\nready = {{ tcp = true }}\nready_timeout = \"1s\"\nrestart = \"never\"\n",
        demo = demo()
    ));
    // sup-demo's --never-ready only withholds READY=1: the probes see it serve.
    d.wait_ready("http", 1);
    d.wait_ready("tcp", 1);
    let silent = wait_until("the silent worker to fail its probe", DEADLINE, || {
        let i = d.instances("silent");
        (i[0].state == WorkerState::Errored).then(|| i[0].clone())
    });
    assert!(silent.reason.contains("not ready within 1s"), "{}", silent.reason);
}

#[test]
fn barrier_fds_sent_on_the_notify_socket_are_closed_at_once() {
    // What `systemd-notify --ready` does from a shell wrapper on newer systemd:
    // send BARRIER=1 with one end of a pipe and wait until the receiver closes it.
    let script = "import array, os, socket, time\n\
ns = os.environ['NOTIFY_SOCKET']\n\
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
r, w = os.pipe()\n\
s.sendmsg([b'BARRIER=1'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', [w]))], 0, ns)\n\
os.close(w)\n\
os.read(r, 1)\n\
print('barrier passed', flush=True)\n\
s.sendto(b'READY=1', ns)\n\
time.sleep(1000)\n";
    let dir = tempfile::tempdir().expect("tempdir");
    let worker = dir.path().join("barrier.py");
    std::fs::write(&worker, script).expect("write script");
    let d = Daemon::start(&format!(
        "[apps.wrapper]\ncommand = [\"python3\", \"{}\"]\nready = \"notify\"\nready_timeout = \"20s\"\n",
        worker.display()
    ));
    d.wait_ready("wrapper", 1);
    let log = d.path("logs/wrapper.out.log");
    assert!(std::fs::read_to_string(log).unwrap_or_default().contains("barrier passed"));
}

#[test]
fn pm2_apps_say_ready_and_stop_over_the_node_ipc_channel() {
    if std::process::Command::new("node").arg("--version").output().is_err() {
        skip("node is not installed");
        return;
    }
    let app = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pm2-app.js");
    let port = free_port();
    let d = Daemon::start(&format!(
        "[apps.pm2]\ncommand = [\"node\", \"{}\"]\nport = {port}\nready = \"pm2\"\nshutdown_with_message = true\nstop_timeout = \"20s\"\n",
        app.display()
    ));
    d.wait_ready("pm2", 1);
    let (code, body) = http_get(port, "/").expect("the app answers");
    assert_eq!(code, 200);
    assert!(body.contains("instance=0"), "NODE_APP_INSTANCE: {body}");
    let t0 = std::time::Instant::now();
    let out = d.supctl(&["stop", "pm2"]);
    assert!(out.status.success());
    assert!(t0.elapsed() < Duration::from_secs(10), "stopped by the message, not by the 20 s timeout");
    // A signal would have killed it; the message made it exit by itself.
    d.wait_log("stopped (exited with code 0)", DEADLINE);
}

#[test]
fn describe_shows_one_app_without_secrets_and_flush_empties_its_logs() {
    let port = free_port();
    let d = Daemon::start_with_files(
        &format!(
            "[apps.web]\ncommand = [\"{}\", \"--log-rate\", \"50\"]\nlisten = [\"127.0.0.1:{port}\"]\nready = \"notify\"\nenv_file = \"app.env\"\n",
            demo()
        ),
        &[("app.env", "API_TOKEN=t0ps3cret\n")],
    );
    let pid = d.wait_ready("web", 1)[0].pid.expect("pid");
    let out = d.supctl(&["describe", "web", "--json"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!text.contains("t0ps3cret"), "no env values: {text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(v["env_keys"][0], "API_TOKEN");
    assert_eq!(v["status"]["instances"][0]["pid"], pid);
    assert!(v["log_files"][0].as_str().is_some_and(|f| f.ends_with("web.out.log")));
    let human = String::from_utf8_lossy(&d.supctl(&["describe", "web"]).stdout).to_string();
    assert!(human.contains("stop_timeout") && human.contains(&pid.to_string()), "{human}");
    let log = d.path("logs/web.out.log");
    wait_until("some output", DEADLINE, || (std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) > 200).then_some(()));
    let out = d.supctl(&["flush", "web"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(u64::MAX);
    assert!(after < 200, "emptied ({after} bytes right after the flush)");
    // Writing continues in the same file.
    wait_until("new lines after the flush", DEADLINE, || {
        std::fs::read_to_string(&log).ok().filter(|t| t.contains(" line ")).map(|_| ())
    });
}

#[test]
fn signal_reaches_every_worker_of_an_app() {
    let d = Daemon::start(
        "[apps.trap]\ncommand = [\"sh\", \"-c\", \"trap 'echo got usr1 from $SUP_INSTANCE' USR1; while :; do sleep 0.1; done\"]\ninstances = 2\n",
    );
    d.wait_ready("trap", 2);
    let log = d.path("logs/trap.out.log");
    // The shells may still be setting their trap: send until both report.
    wait_until("both workers to report the signal", DEADLINE, || {
        let out = d.supctl(&["signal", "trap", "USR1"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.contains("got usr1 from 0") && text.contains("got usr1 from 1")).then_some(())
    });
    let bad = d.supctl(&["signal", "trap", "SIGNOPE"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn cron_restart_rolls_the_app_on_schedule() {
    let port = free_port();
    let d = Daemon::start(&format!(
        "[apps.web]\ncommand = [\"{}\"]\ninstances = 2\nlisten = [\"127.0.0.1:{port}\"]\nready = \"notify\"\n\
         cron_restart = \"*/2 * * * * *\"\n",
        demo()
    ));
    let first = d.wait_ready("web", 2);
    // Every slot is replaced by a rolling restart, recorded as such.
    let replaced = wait_until("both slots restarted by cron", DEADLINE, || {
        let now = d.instances("web");
        let done = now.iter().zip(&first).all(|(n, f)| {
            n.pid.is_some() && n.pid != f.pid && n.last_restart_reason == Some(sup_proto::RestartReason::Cron)
        });
        done.then_some(now)
    });
    assert!(replaced.iter().all(|i| i.version > first[0].version), "{replaced:?}");
    d.wait_log("cron_restart: rolled 2/2 instances", DEADLINE);
}

#[test]
fn a_stopping_supd_leaves_a_newer_supds_control_socket_alone() {
    let port = free_port();
    let first = Daemon::start(&app("web", 1, port, "", ""));
    first.wait_ready("web", 1);
    // Someone cleans the run folder and starts another supd on the same socket path.
    std::fs::remove_file(&first.socket).expect("remove the socket file");
    let second = Daemon::start_with(tempfile::tempdir().expect("tempdir"), first.config.clone(), first.socket.clone());
    second.wait_ready("web", 1);
    let socket = first.socket.clone();
    // The folder holds the second supd's socket too: keep it when the first Daemon goes.
    let mut first = first;
    let _dir = std::mem::replace(&mut first.dir, tempfile::tempdir().expect("tempdir"));
    let status = first.stop();
    assert_eq!(status.code(), Some(0), "{}", describe(status));
    assert!(socket.exists(), "the first supd removed the second one's socket on exit");
    second.wait_ready("web", 1);
}

/// POSTs a JSON body on the control socket; returns the answer and how long it took.
fn post(socket: &std::path::Path, path: &str, body: &str) -> (String, Duration) {
    let t0 = std::time::Instant::now();
    let req = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    (raw_control(socket, req.as_bytes()), t0.elapsed())
}

#[test]
fn a_stop_racing_a_restarted_workers_ready_still_finishes() {
    // A worker that crashes is restarted at once; a stop that reaches the slot
    // before the new worker's READY once left the slot stopping forever.
    let d = Daemon::start("[apps.idle]\ncommand = [\"sleep\", \"1000\"]\ninstances = 2\nstop_timeout = \"1s\"\n");
    d.wait_ready("idle", 2);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut rounds = 0;
    while std::time::Instant::now() < deadline && rounds < 400 {
        rounds += 1;
        post(&d.socket, "/v1/signal?app=idle&signal=INT", "");
        let (answer, took) = post(&d.socket, "/v1/stop", r#"{"app":"idle","wait":true}"#);
        assert!(answer.starts_with("HTTP/1.1 200"), "round {rounds}: {answer}");
        assert!(took < Duration::from_secs(10), "round {rounds}: the stop took {took:?}");
        let (answer, _) = post(&d.socket, "/v1/start", r#"{"app":"idle","wait":true}"#);
        assert!(answer.starts_with("HTTP/1.1 200"), "round {rounds}: {answer}");
    }
    eprintln!("{rounds} rounds of crash, stop, start");
}
