//! supd under a real systemd: a Debian root made with debootstrap, booted with
//! `systemd-nspawn -b`, driven with `nsenter -t PID -a systemctl …`.
//!
//! The Debian root is cached in /var/cache/sup-systemd-test between runs;
//! each run boots a fresh copy. The test installs debootstrap and
//! systemd-container when they are missing, and is skipped (with the reason)
//! only where the machine cannot do that or cannot run containers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use sup::*;

const CACHE: &str = "/var/cache/sup-systemd-test";
const SUITE: &str = "trixie";

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Returns the cached Debian root, building it on first use; None (with a reason) when impossible.
fn debian_root() -> Result<PathBuf, String> {
    if nix::unistd::geteuid().as_raw() != 0 {
        return Err("needs root".into());
    }
    if !have("debootstrap") || !have("systemd-nspawn") {
        let ok = run(Command::new("sh")
            .args(["-c", "apt-get update -qq && apt-get install -y -qq debootstrap systemd-container"]))
        .status
        .success();
        if !ok || !have("debootstrap") || !have("systemd-nspawn") {
            return Err("cannot install debootstrap and systemd-container".into());
        }
    }
    let root = Path::new(CACHE).join(SUITE);
    if root.join("usr/lib/systemd/systemd").exists() {
        return Ok(root);
    }
    let tmp = Path::new(CACHE).join(format!("{SUITE}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(CACHE).map_err(|e| e.to_string())?;
    let out = run(Command::new("debootstrap")
        .args(["--variant=minbase", "--include=systemd,systemd-sysv,dbus,procps", SUITE])
        .arg(&tmp)
        .arg("http://deb.debian.org/debian"));
    if !out.status.success() {
        return Err(format!("debootstrap failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    std::fs::rename(&tmp, &root).map_err(|e| e.to_string())?;
    Ok(root)
}

fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let c = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                for k in c.split_whitespace().filter_map(|x| x.parse::<u32>().ok()) {
                    out.push(k);
                    stack.push(k);
                }
            }
        }
    }
    out
}

/// A booted container; powered off and removed on drop.
struct Container {
    nspawn: Child,
    pid1: u32,
    root: tempfile::TempDir,
}

impl Container {
    fn boot(image: &Path) -> Result<Container, String> {
        let root = tempfile::Builder::new().prefix("sup-ct").tempdir_in("/var/tmp").map_err(|e| e.to_string())?;
        let copy = run(Command::new("cp").arg("-a").arg(format!("{}/.", image.display())).arg(root.path()));
        if !copy.status.success() {
            return Err(format!("cannot copy the Debian root: {}", String::from_utf8_lossy(&copy.stderr)));
        }
        let machine = format!("sup{}", std::process::id());
        let nspawn = Command::new("systemd-nspawn")
            .arg("-D")
            .arg(root.path())
            .args(["-b", "-q", "--register=no", "--keep-unit", "--machine", &machine])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut c = Container { nspawn, pid1: 0, root };
        let pid = c.nspawn.id();
        // The container's PID 1 is the descendant of nspawn that runs systemd.
        let found = (0..300).find_map(|_| {
            let init = descendants(pid)
                .into_iter()
                .find(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "systemd"));
            if init.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            init
        });
        c.pid1 = found.ok_or("systemd-nspawn started no container (can this machine run containers?)")?;
        // Until D-Bus is up, systemctl fails at once instead of waiting.
        let mut up = c.sh("timeout 60 systemctl is-system-running --wait");
        for _ in 0..120 {
            let state = String::from_utf8_lossy(&up.stdout).trim().to_string();
            if state == "running" || state == "degraded" {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
            up = c.sh("timeout 60 systemctl is-system-running --wait");
        }
        let state = String::from_utf8_lossy(&up.stdout).trim().to_string();
        if state != "running" && state != "degraded" {
            return Err(format!(
                "the container's systemd did not come up: `{state}` {}",
                String::from_utf8_lossy(&up.stderr)
            ));
        }
        Ok(c)
    }

    /// Runs a shell command inside the container.
    fn sh(&self, script: &str) -> Output {
        run(Command::new("nsenter").args(["-t", &self.pid1.to_string(), "-a", "sh", "-c", script]))
    }

    fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "`{script}` failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    fn status(&self) -> StatusResponse {
        serde_json::from_str(&self.ok("/usr/local/bin/supctl status --json")).expect("status JSON")
    }

    fn pids(&self) -> Vec<u32> {
        self.status().apps.iter().flat_map(|a| a.instances.iter().filter_map(|i| i.pid)).collect()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGTERM asks nspawn to power the container off cleanly.
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.nspawn.id() as i32, libc::SIGTERM) };
        for _ in 0..100 {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

fn config(port: u16, release: &str) -> String {
    format!(
        "[supervisor]\ncontrol_socket = \"/run/supd/control.sock\"\nrun_dir = \"/run/supd\"\nlog_dir = \"/var/log/supd\"\n\n[apps.web]\ncommand = [\"/usr/local/bin/sup-demo\", \"--start-delay\", \"500ms\"]\ninstances = 2\nlisten = [\"127.0.0.1:{port}\"]\nready = \"notify\"\nenv = {{ RELEASE = \"{release}\" }}\n"
    )
}

#[test]
fn supd_is_a_native_notify_reload_service_under_real_systemd() {
    let image = match debian_root() {
        Ok(r) => r,
        Err(why) => {
            skip(&why);
            return;
        }
    };
    let ct = match Container::boot(&image) {
        Ok(c) => c,
        Err(why) => {
            skip(&why);
            return;
        }
    };
    for b in ["supd", "supctl", "sup-demo"] {
        std::fs::copy(bin(b), ct.path(&format!("usr/local/bin/{b}"))).expect("copy binary");
    }
    std::fs::create_dir_all(ct.path("etc/supd")).expect("mkdir");
    let port = free_port();
    std::fs::write(ct.path("etc/supd/supervisor.toml"), config(port, "1")).expect("config");
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/supd.service");
    std::fs::copy(unit, ct.path("etc/systemd/system/supd.service")).expect("unit");
    ct.ok("systemctl daemon-reload");

    // start returns only once the workers are ready (READY=1 after them).
    ct.ok("systemctl start supd");
    let s = ct.status();
    assert!(s.apps[0].instances.iter().all(|i| i.state == WorkerState::Ready), "{s:?}");
    let shown = ct.ok("systemctl status supd --no-pager || true");
    assert!(shown.contains("Status: \"1 app, 2/2 workers ready\""), "{shown}");

    // reload after a config change rolls every worker and returns when done.
    let before = ct.pids();
    std::fs::write(ct.path("etc/supd/supervisor.toml"), config(port, "2")).expect("config");
    ct.ok("systemctl reload supd");
    let after = ct.pids();
    assert_eq!(after.len(), 2);
    assert!(after.iter().all(|p| !before.contains(p)), "new pids {after:?} vs {before:?}");
    assert!(ct.status().apps[0].instances.iter().all(|i| i.state == WorkerState::Ready && i.version == 2));
    for p in &before {
        let gone = ct.sh(&format!("kill -0 {p}"));
        assert!(!gone.status.success(), "old worker {p} is gone");
    }

    // kill -9 of supd under load: systemd holds the listening sockets in its fd
    // store while it restarts supd, so connections made meanwhile queue and are
    // served by the new workers instead of being refused.
    let journal = ct.ok("journalctl -u supd --no-pager -o cat");
    assert!(journal.contains("kept in systemd's fd store"), "{journal}");
    let clients = 2;
    let load = Load::start(port, &[Mode::NewConnection], clients);
    load.wait_for(100);
    let main = ct.ok("systemctl show -p MainPID --value supd").trim().to_string();
    let old_workers = ct.pids();
    ct.ok(&format!("kill -9 {main}"));
    wait_until("the old supd and its workers to be gone", Duration::from_secs(30), || {
        let gone = |p: &str| !ct.sh(&format!("kill -0 {p} 2>/dev/null")).status.success();
        (gone(&main) && old_workers.iter().all(|w| gone(&w.to_string()))).then_some(())
    });
    // Nobody serves the port now; the connection must still be accepted and answered.
    let during = std::thread::spawn(move || -> std::io::Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(90)))?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer)
    });
    wait_until("systemd to restart supd", Duration::from_secs(60), || {
        let now = ct.ok("systemctl show -p MainPID --value supd").trim().to_string();
        let active = ct.sh("systemctl is-active supd").status.success();
        (active && now != main && now != "0").then_some(())
    });
    wait_until("the apps ready again", Duration::from_secs(60), || {
        let out = ct.sh("/usr/local/bin/supctl status --json");
        let s: StatusResponse = serde_json::from_slice(&out.stdout).ok()?;
        s.apps[0].instances.iter().all(|i| i.state == WorkerState::Ready).then_some(())
    });
    let answered = during.join().expect("probe thread");
    assert!(
        answered.as_ref().is_ok_and(|a| a.starts_with("HTTP/1.1 200")),
        "a connection made while supd was down: {answered:?}"
    );
    load.wait_for(100);
    let stats = load.finish();
    eprintln!("supd SIGKILLed under load: {stats:?}");
    // Only requests in flight on the killed workers may fail.
    assert!(stats.failed <= clients as u64, "{} failures > {clients} in flight: {:?}", stats.failed, stats.errors);
    let journal = ct.ok("journalctl -u supd --no-pager -o cat");
    assert!(journal.contains("adopted listening socket"), "the new supd took the sockets back: {journal}");

    // systemctl restart (an upgrade) under load: the sockets wait in the fd
    // store while supd and its apps restart, so not one request fails.
    let load = Load::start(port, &[Mode::NewConnection], clients);
    load.wait_for(100);
    let main = ct.ok("systemctl show -p MainPID --value supd").trim().to_string();
    ct.ok("systemctl restart supd");
    assert_ne!(ct.ok("systemctl show -p MainPID --value supd").trim(), main, "a new supd");
    load.wait_for(100);
    let stats = load.finish();
    eprintln!("systemctl restart supd under load: {stats:?}");
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);

    // stop leaves no worker in the container.
    ct.ok("systemctl stop supd");
    let left = ct.sh("pgrep -a sup-demo");
    assert!(!left.status.success(), "workers left: {}", String::from_utf8_lossy(&left.stdout));
}
