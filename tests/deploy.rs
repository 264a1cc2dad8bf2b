//! End-to-end: deploys behind a `current` symlink. A version is pinned to the
//! release it was started from, so a crash restart never runs code that was
//! not deployed.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sup::*;

/// `releases/<name>/server`, a script that runs `body`.
fn release(root: &Path, name: &str, body: &str) -> PathBuf {
    let dir = root.join("releases").join(name);
    std::fs::create_dir_all(&dir).expect("release dir");
    let script = dir.join("server");
    std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).expect("write server");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir.canonicalize().expect("canonical release")
}

/// Points `current` at `target`, atomically (as deploy scripts do: a new link renamed over the old).
fn switch(root: &Path, target: &Path) {
    let tmp = root.join("current.tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(target, &tmp).expect("symlink");
    std::fs::rename(&tmp, root.join("current")).expect("rename symlink");
}

fn good(name: &str) -> String {
    format!("exec {} --start-delay 200ms \"$@\" # {name}", bin("sup-demo").display())
}

fn cwd_of(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/cwd")).expect("worker cwd")
}

#[test]
fn a_crash_after_a_failed_deploy_restarts_the_pinned_release_not_current() {
    let port = free_port();
    let d = Daemon::start(&format!(
        "[apps.web]\ncommand = [\"./server\"]\ncwd = \"current\"\ninstances = 3\nready = \"notify\"\nready_timeout = \"5s\"\nlisten = [\"127.0.0.1:{port}\"]\nmax_restarts = 3\n"
    ));
    // supd started before the release existed: the first start pins it.
    let root = d.dir.path().to_path_buf();
    let v1 = release(&root, "v1", &good("v1"));
    let v2 = release(&root, "v2", "echo 'v2 cannot start: no database' >&2; exit 1");
    switch(&root, &v1);
    let out = d.supctl(&["start", "web", "--wait"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let before = d.wait_ready("web", 3);
    for i in &before {
        assert_eq!(i.release.as_deref(), Some(v1.to_str().expect("utf-8")), "{i:?}");
        assert_eq!(cwd_of(i.pid.expect("pid")), v1);
    }
    // The deploy: `current` to v2, then reload; v2 fails and the reload rolls back.
    switch(&root, &v2);
    let out = d.supctl(&["reload", "web"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("v2 cannot start"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let after = d.wait_ready("web", 3);
    // A later crash of any v1 worker: the slot restarts v1, pinned, though `current` is v2.
    for victim in after.iter().map(|i| (i.slot, i.pid.expect("pid"), i.restarts)) {
        let (slot, pid, restarts) = victim;
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let new = wait_until("the crashed slot to be ready again", DEADLINE, || {
            let i = d.instances("web").into_iter().find(|i| i.slot == slot)?;
            (i.state == WorkerState::Ready && i.pid != Some(pid)).then_some(i)
        });
        assert_eq!(new.restarts, restarts + 1);
        assert_eq!(new.release.as_deref(), Some(v1.to_str().expect("utf-8")), "{new:?}");
        assert_eq!(cwd_of(new.pid.expect("pid")), v1, "the replacement runs v1's code");
    }
    let (code, _) = http_get(port, "/").expect("answered");
    assert_eq!(code, 200);
    // And stays so: no crash loop (every slot ready, one restart each, for a while).
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let i = d.instances("web");
        assert!(i.iter().all(|i| i.state == WorkerState::Ready && i.restarts == 1), "{i:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let json = String::from_utf8_lossy(&d.supctl(&["status", "web", "--json"]).stdout).into_owned();
    assert!(json.contains(&format!("\"release\": \"{}\"", v1.display())), "{json}");
}

fn demo() -> String {
    bin("sup-demo").display().to_string()
}

/// Rewrites the `[apps.*]` part of the file.
fn rewrite(d: &Daemon, apps: &str) {
    let text = std::fs::read_to_string(&d.config).expect("config");
    let head = &text[..text.find("[apps.").unwrap_or(text.len())];
    std::fs::write(&d.config, format!("{head}{apps}")).expect("write config");
}

fn listen_app(port: u16, args: &str) -> String {
    format!(
        "[apps.web]\ncommand = [\"{}\", \"--start-delay\", \"200ms\"{args}]\ninstances = 3\nready = \"notify\"\nready_timeout = \"10s\"\nmin_healthy_time = \"3s\"\nlisten = [\"127.0.0.1:{port}\"]\n",
        demo()
    )
}

#[test]
fn a_release_that_crashes_after_ready_fails_the_reload_within_its_health_window() {
    let _serial = load_lock();
    let port = free_port();
    let d = Daemon::start(&listen_app(port, ""));
    d.wait_ready("web", 3);
    let load = Load::start(port, &[Mode::KeepAlive, Mode::NewConnection], 2);
    load.wait_for(200);
    // Ready after 200 ms, dead 1 s later: a server that notifies before loading its app.
    rewrite(&d, &listen_app(port, ", \"--exit-after\", \"1200ms\""));
    let t0 = Instant::now();
    let out = d.supctl(&["reload", "web"]);
    let took = t0.elapsed();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("within min_healthy_time"), "{text}");
    let after = d.wait_ready("web", 3);
    assert!(after.iter().all(|i| i.version == 1), "every slot back on version 1: {after:?}");
    load.wait_for(200);
    let stats = load.finish();
    eprintln!("reload of a release crashing after ready: failed after {took:?}; load {stats:?}");
    // Only what the crashing worker itself had accepted: at most one request per client.
    assert!(stats.failed <= 4, "{stats:?}");
}

#[test]
fn a_release_whose_health_turns_bad_after_ready_fails_the_reload() {
    let _serial = load_lock();
    let port = free_port();
    // No `listen`: each worker binds the port itself (SO_REUSEPORT), and the
    // HTTP probe checks it, during the window too.
    let app = |args: &str| {
        format!(
            "[apps.web]\ncommand = [\"{}\", \"--start-delay\", \"200ms\"{args}]\ninstances = 2\nport = {port}\nready = {{ http = \"/health\" }}\nready_timeout = \"10s\"\nmin_healthy_time = \"3s\"\n",
            demo()
        )
    };
    let d = Daemon::start(&app(""));
    d.wait_ready("web", 2);
    let load = Load::start(port, &[Mode::NewConnection], 2);
    load.wait_for(100);
    rewrite(&d, &app(", \"--unhealthy-after\", \"700ms\""));
    let out = d.supctl(&["reload", "web"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("health probe") && text.contains("min_healthy_time"), "{text}");
    let after = d.wait_ready("web", 2);
    assert!(after.iter().all(|i| i.version == 1), "every slot back on version 1: {after:?}");
    let (code, _) = http_get(port, "/health").expect("answered");
    assert_eq!(code, 200, "the old version serves");
    let stats = load.finish();
    eprintln!("reload of a release turning unhealthy: load {stats:?}");
    assert!(stats.failed <= 2, "{stats:?}");
}
