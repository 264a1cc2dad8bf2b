//! Signals that arrive while supd starts: a `systemctl reload` (SIGHUP) or a
//! logrotate (SIGUSR1) sent before supd is ready must never end it.

use std::process::{Command, Stdio};
use std::time::Instant;

use sup::*;

#[test]
fn sighup_and_sigusr1_during_start_up_never_kill_supd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = dir.path().join("supervisor.toml");
    std::fs::write(
        &config,
        format!(
            "[supervisor]\ncontrol_socket = \"run/control.sock\"\nrun_dir = \"run\"\nlog_dir = \"logs\"\n\n[apps.web]\ncommand = [\"{}\", \"--start-delay\", \"1s\"]\nlisten = [\"127.0.0.1:{port}\"]\nready = \"notify\"\n",
            bin("sup-demo").display()
        ),
    )
    .expect("config");
    let socket = dir.path().join("run/control.sock");
    let mut supd = Command::new(bin("supd"))
        .arg("--config")
        .arg(&config)
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn supd");
    let pid = supd.id() as i32;
    // No program can take a signal before its own first instructions run:
    // start once supd has set its disposition for SIGHUP (ignored, or caught
    // by its handler), then signal without a pause until its app is ready.
    let hup_bit = 1u64 << (libc::SIGHUP - 1);
    wait_until("supd to set its SIGHUP disposition", DEADLINE, || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let mask = |key: &str| {
            status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        };
        ((mask("SigIgn:")? | mask("SigCgt:")?) & hup_bit != 0).then_some(())
    });
    let started = Instant::now();
    let mut sent = 0u64;
    let ready = loop {
        for sig in [libc::SIGHUP, libc::SIGUSR1] {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, sig) };
            sent += 1;
        }
        if let Some(status) = supd.try_wait().expect("try_wait") {
            panic!("supd ended ({}) after {sent} early signals", describe(status));
        }
        let out = Command::new(bin("supctl")).arg("--socket").arg(&socket).args(["status", "--json"]).output();
        let s = out.ok().and_then(|o| serde_json::from_slice::<StatusResponse>(&o.stdout).ok());
        if s.is_some_and(|s| s.apps[0].instances.iter().all(|i| i.state == WorkerState::Ready)) {
            break true;
        }
        if started.elapsed() > DEADLINE {
            break false;
        }
    };
    assert!(ready, "web ready while being signalled");
    assert!(supd.try_wait().expect("try_wait").is_none(), "supd survived {sent} early signals");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_until("supd to stop on SIGTERM", DEADLINE, || supd.try_wait().ok().flatten());
}
