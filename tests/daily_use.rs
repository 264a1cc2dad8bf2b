//! End-to-end: what a new user trips on in daily use (issue 16): log lines
//! that name the right pids, `status` right after a `kill -9`, a worker that
//! served being replaced at once, and the smaller texts.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::Duration;

use sup::*;

fn demo() -> String {
    bin("sup-demo").display().to_string()
}

fn app(name: &str, instances: u32, port: u16, extra: &str) -> String {
    format!(
        "[apps.{name}]\ncommand = [\"{}\", \"--port\", \"{port}\"]\ninstances = {instances}\nready = \"notify\"\nlisten = [\"127.0.0.1:{port}\"]\n{extra}\n",
        demo()
    )
}

fn kill9(pid: u32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// Waits until slot `slot` of `app` is ready with a worker other than `old`; returns its pid.
fn replaced(d: &Daemon, app: &str, slot: usize, old: u32) -> u32 {
    wait_until(&format!("slot {slot} of `{app}` to have a new ready worker"), DEADLINE, || {
        let i = d.instances(app);
        let s = i.get(slot)?;
        (s.state == WorkerState::Ready && s.pid.is_some_and(|p| p != old)).then_some(s.pid?)
    })
}

/// supd's log lines that contain every one of `needles`.
fn lines_with(d: &Daemon, needles: &[&str]) -> Vec<String> {
    d.log().lines().filter(|l| needles.iter().all(|n| l.contains(n))).map(str::to_string).collect()
}

/// The value of field `name` (`name=VALUE`) of a supd log line.
fn field(line: &str, name: &str) -> Option<u32> {
    let key = format!("{name}=");
    line.split_whitespace().find_map(|w| w.strip_prefix(key.as_str())).and_then(|v| v.parse().ok())
}

/// Waits for a log line containing every one of `needles`; returns it.
fn wait_line(d: &Daemon, needles: &[&str]) -> String {
    wait_until(&format!("a supd log line with {needles:?}"), DEADLINE, || lines_with(d, needles).pop())
}

#[test]
fn lifecycle_lines_name_the_pid_they_are_about() {
    let port = free_port();
    let d = Daemon::start(&app("web", 1, port, ""));
    let dead = d.wait_ready("web", 1)[0].pid.expect("pid");
    kill9(dead);
    let new = replaced(&d, "web", 0, dead);
    // The crash line names the pid that died as `pid` and `old_pid`, and its replacement as `new_pid`.
    let crash = wait_line(&d, &["killed by SIGKILL", "restarting now"]);
    assert_eq!(field(&crash, "pid"), Some(dead), "the dead pid is the line's subject: {crash}");
    assert_eq!(field(&crash, "old_pid"), Some(dead), "{crash}");
    assert_eq!(field(&crash, "new_pid"), Some(new), "{crash}");
    assert!(crash.contains(&format!("pid {dead} killed by SIGKILL")), "{crash}");
    // A reload names the replacement and the worker it drains.
    let out = d.supctl(&["reload", "web"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let newer = replaced(&d, "web", 0, new);
    let ready = wait_line(&d, &["replacement pid", "drains"]);
    assert_eq!((field(&ready, "old_pid"), field(&ready, "new_pid")), (Some(new), Some(newer)), "{ready}");
    assert_eq!(field(&ready, "pid"), Some(newer), "{ready}");
    let drained = wait_line(&d, &["old worker"]);
    assert_eq!(field(&drained, "pid"), Some(new), "{drained}");
    // A stop names the worker it stops, and the one that stopped.
    let out = d.supctl(&["stop", "web"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stopped = wait_line(&d, &["stopping -> stopped"]);
    assert_eq!(field(&stopped, "pid"), Some(newer), "{stopped}");
    // Every transition line names a pid.
    for l in d.log().lines().filter(|l| l.contains(" -> ")) {
        assert!(field(l, "pid").is_some(), "a lifecycle line without a pid: {l}");
    }
}

/// Opens a pidfd for `pid`: readable once the process has exited.
fn pidfd(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a non-negative return is a fresh descriptor nobody else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Blocks until the kernel reports the process behind `fd` as exited.
fn wait_exited(fd: &OwnedFd) {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd we own.
    let n = unsafe { libc::poll(&mut p, 1, DEADLINE.as_millis() as i32) };
    assert_eq!(n, 1, "the killed process did not exit within {DEADLINE:?}");
}

/// `GET /v1/status` straight on the socket: faster than a supctl process.
fn raw_status(d: &Daemon) -> StatusResponse {
    let answer = raw_control(&d.socket, b"GET /v1/status HTTP/1.1\r\nHost: sup\r\nConnection: close\r\n\r\n");
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("status JSON: {e}: {answer}"))
}

#[test]
fn status_never_shows_a_killed_worker_as_running() {
    let port = free_port();
    // Quick deaths on purpose: no backoff to wait for and no crash-loop end.
    let extra = "max_restarts = 1000\nbackoff = { initial = \"10ms\", max = \"20ms\" }";
    let d = Daemon::start(&app("web", 2, port, extra));
    d.wait_ready("web", 2);
    let (mut polls, mut exited_seen) = (0, 0);
    for round in 0..12 {
        let slot = round % 2;
        let dead = d.instances("web")[slot].pid.expect("pid");
        let Some(fd) = pidfd(dead) else {
            skip("pidfd_open is not available (Linux 5.3 or later)");
            return;
        };
        kill9(dead);
        wait_exited(&fd);
        // From here on the kernel knows it exited: no answer may show it running.
        for _ in 0..25 {
            let s = raw_status(&d);
            polls += 1;
            let inst = &s.apps[0].instances[slot];
            if inst.pid == Some(dead) {
                assert!(
                    !matches!(inst.state, WorkerState::Ready | WorkerState::Starting | WorkerState::Stopping),
                    "round {round}: dead pid {dead} shown as {:?}: {inst:?}",
                    inst.state
                );
                assert_eq!(inst.state, WorkerState::Exited, "{inst:?}");
                assert_eq!(inst.uptime_ms, None, "{inst:?}");
                exited_seen += 1;
            }
        }
        // And supctl's table says so too.
        let table = String::from_utf8_lossy(&d.supctl(&["status", "web"]).stdout).to_string();
        for line in table.lines() {
            // APP SLOT PID STATE ...
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.get(2) == Some(&dead.to_string().as_str()) {
                assert_eq!(cols.get(3), Some(&"exited"), "dead pid {dead} in the table: {line}");
            }
        }
        replaced(&d, "web", slot, dead);
    }
    eprintln!("{polls} status answers after 12 kills; {exited_seen} showed the dead pid as exited");
}

#[test]
fn a_worker_that_served_is_replaced_at_once_every_time() {
    let port = free_port();
    // The default backoff: a worker that was ready at least backoff.reset_after (1s) served.
    let d = Daemon::start(&app("web", 1, port, ""));
    let mut pid = d.wait_ready("web", 1)[0].pid.expect("pid");
    for n in 1..=3 {
        // Let it serve 10 s: polled on its uptime as status reports it.
        wait_until("the worker to have served 10 s", Duration::from_secs(60), || {
            let i = d.instances("web");
            (i[0].pid == Some(pid) && i[0].uptime_ms.is_some_and(|u| u >= 10_000)).then_some(())
        });
        kill9(pid);
        let new = replaced(&d, "web", 0, pid);
        let line = wait_line(&d, &[&format!("pid {pid} killed by SIGKILL")]);
        assert!(line.contains("restarting now"), "kill {n}: replaced at once, no backoff: {line}");
        assert!(line.contains("s ready; restarting now"), "kill {n}: says how long it served: {line}");
        assert!(!line.contains("restarting in"), "{line}");
        let i = d.instances("web");
        assert_eq!((i[0].restarts, i[0].pid), (n, Some(new)));
        pid = new;
    }
    assert!(!d.log().contains("-> backoff"), "no backoff at all:\n{}", d.log());
}

#[test]
fn quick_deaths_back_off_and_say_the_delay_once() {
    let port = free_port();
    let extra = "max_restarts = 2\nbackoff = { initial = \"50ms\" }";
    let args = ", \"--exit-after\", \"0s\", \"--exit-code\", \"3\"";
    let d = Daemon::start(&format!(
        "[apps.crashy]\ncommand = [\"{}\", \"--port\", \"{port}\"{args}]\nready = \"notify\"\nlisten = [\"127.0.0.1:{port}\"]\n{extra}\n",
        demo()
    ));
    let line = wait_line(&d, &["restarting in 50ms"]);
    assert_eq!(line.matches("50ms").count(), 1, "the delay is said once: {line}");
    assert!(!line.contains("delay_ms"), "{line}");
    wait_until("crashy to be errored", DEADLINE, || {
        (d.instances("crashy")[0].state == WorkerState::Errored).then_some(())
    });
}

#[test]
fn counts_and_summaries_read_right() {
    let port = free_port();
    let d = Daemon::start(&format!("{}{}", app("web", 2, port, ""), app("idle", 1, free_port(), "autostart = false")));
    let before = d.wait_ready("web", 2);
    d.wait_log("running 2 apps", DEADLINE);

    // One app: singular, in supd's log and supctl top's summary line.
    let one = Daemon::start(&app("solo", 1, free_port(), ""));
    one.wait_ready("solo", 1);
    one.wait_log("running 1 app", DEADLINE);
    assert!(!one.log().contains("1 apps"), "{}", one.log());
    let top = String::from_utf8_lossy(&one.supctl(&["top", "--once"]).stdout).to_string();
    assert!(top.contains("supctl top: 1 app, 1/1 worker ready"), "{top}");
    drop(one);

    // A scale-up is logged with what it started.
    let out = d.supctl(&["scale", "web", "3"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let added = d.wait_ready("web", 3)[2].pid.expect("pid");
    let log = wait_line(&d, &["scaled from 2 to 3 instances"]);
    assert!(log.contains(&format!("started slot 2 pid {added}")), "{log}");
    assert!(text.contains(&format!("started slot 2 pid {added}")), "{text}");
    let start = wait_line(&d, &["stopped -> starting: scale-up from 2 to 3 instances"]);
    assert_eq!(field(&start, "pid"), Some(added), "{start}");

    // `supctl restart` counts in RESTARTS, as a reload does, with its reason.
    let out = d.supctl(&["restart", "web"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after = d.wait_ready("web", 3);
    for i in &after {
        assert_eq!((i.restarts, i.last_restart_reason), (1, Some(sup_proto::RestartReason::Restart)), "{i:?}");
    }
    assert_ne!(after[0].pid, before[0].pid);
    let table = String::from_utf8_lossy(&d.supctl(&["status", "web"]).stdout).to_string();
    assert!(table.contains("1 (restart)"), "{table}");
    // A stopped app that is restarted just starts: nothing ran to be restarted.
    let out = d.supctl(&["restart", "idle"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(d.wait_ready("idle", 1)[0].restarts, 0);
}

#[test]
fn shutdown_does_not_log_stopped_to_stopped() {
    let port = free_port();
    let d = Daemon::start(&format!("{}{}", app("web", 1, port, ""), app("idle", 2, free_port(), "autostart = false")));
    d.wait_ready("web", 1);
    // One stopped by request, one that never started: neither is a transition at shutdown.
    let out = d.supctl(&["stop", "web"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (status, log) = d.stop_with_log();
    assert!(status.success(), "{}", describe(status));
    let text = wait_until("supd's last line", DEADLINE, || {
        let text = log();
        text.contains("all workers stopped; exiting").then_some(text)
    });
    assert!(!text.contains("stopped -> stopped"), "{text}");
}

#[test]
fn the_readme_tour_config_path_survives_a_cd() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
    let line = readme.lines().find(|l| l.starts_with("export SUPD_CONFIG=")).expect("the tour exports SUPD_CONFIG");
    // Without its comment, which would swallow the rest of the script.
    let export = line.split(" #").next().unwrap_or(line).trim();
    // Run the line as a reader would, in the clone, then change directory.
    let script =
        format!("cd '{}' && {export} && cd / && exec '{}' config check", root.display(), bin("supctl").display());
    let out = Command::new("sh").arg("-c").arg(&script).output().expect("sh");
    assert!(
        out.status.success(),
        "{export}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok: 2 apps"), "{}", String::from_utf8_lossy(&out.stdout));
}
