//! supd as PID 1 of a container (a new PID namespace): orphans are reaped,
//! SIGTERM stops every app gracefully.

use std::process::{Command, Stdio};
use std::time::Duration;

use sup::*;

fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let c = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            out.extend(c.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    out
}

fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

#[test]
fn supd_as_pid_1_reaps_orphans_and_stops_on_sigterm() {
    let unshare_ok =
        Command::new("unshare").args(["--pid", "--fork", "--mount-proc", "true"]).status().is_ok_and(|s| s.success());
    if nix::unistd::geteuid().as_raw() != 0 || !unshare_ok {
        skip("needs root and unshare(1) to make a PID namespace");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = dir.path().join("supervisor.toml");
    // The worker leaves a daemonised grandchild behind that exits later: an
    // orphan only PID 1 (or a subreaper) can reap.
    std::fs::write(
        &config,
        format!(
            "[supervisor]\ncontrol_socket = \"run/control.sock\"\nrun_dir = \"run\"\nlog_dir = \"logs\"\n\n[apps.web]\ncommand = [\"sh\", \"-c\", \"(setsid sh -c 'sleep 0.5; echo orphan done' &); exec {} --port {port}\"]\nready = \"notify\"\n",
            bin("sup-demo").display()
        ),
    )
    .expect("write");
    let mut unshare = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(bin("supd"))
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare");
    let supd = wait_until("supd inside the namespace", DEADLINE, || children(unshare.id()).first().copied());
    let ns_pid = std::fs::read_to_string(format!("/proc/{supd}/status")).ok().and_then(|s| {
        s.lines().find_map(|l| l.strip_prefix("NSpid:")).map(|v| v.split_whitespace().last().unwrap_or("").to_string())
    });
    assert_eq!(ns_pid.as_deref(), Some("1"), "supd is PID 1 in its namespace");
    let socket = dir.path().join("run/control.sock");
    let status = || {
        Command::new(bin("supctl")).arg("--socket").arg(&socket).args(["status", "--json"]).output().ok().and_then(
            |o| {
                let s: StatusResponse = serde_json::from_slice(&o.stdout).ok()?;
                Some(s)
            },
        )
    };
    wait_until("web ready", DEADLINE, || {
        status().filter(|s| s.apps[0].instances[0].state == WorkerState::Ready).map(|_| ())
    });
    let log = dir.path().join("logs/web.out.log");
    wait_until("the orphan to finish", DEADLINE, || {
        std::fs::read_to_string(&log).ok().filter(|t| t.contains("orphan done")).map(|_| ())
    });
    // Reaped: no zombie among supd's children, given a moment for SIGCHLD.
    wait_until("no zombie under supd", Duration::from_secs(10), || {
        children(supd).iter().all(|c| state(*c) != Some('Z')).then_some(())
    });
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(supd as i32, libc::SIGTERM) };
    let st = wait_until("supd to exit", DEADLINE, || unshare.try_wait().ok().flatten());
    assert!(st.success(), "{}", describe(st));
}
