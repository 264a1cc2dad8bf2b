//! supd under a real systemd, on the oldest and newest Debian we test:
//! bookworm (systemd 252, before `notify-reload` and `$FDSTORE`) and trixie
//! (systemd 257). Each is a Debian root made with debootstrap, booted with
//! `systemd-nspawn -b`, driven with `nsenter -t PID -a systemctl …`; the
//! shipped unit and, on bookworm, the Debian package (`cargo deb -p supd`).
//!
//! The Debian roots are cached in /var/cache/sup-systemd-test between runs;
//! each test boots a fresh copy. The test installs debootstrap and
//! systemd-container when they are missing, and is skipped (with the reason)
//! only where the machine cannot do that or cannot run containers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use sup::*;

const CACHE: &str = "/var/cache/sup-systemd-test";

/// One container at a time: each boots a whole OS, and the load tests inside
/// measure sup, not two containers fighting over 2 cores.
fn container_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

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
fn debian_root(suite: &str) -> Result<PathBuf, String> {
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
    let root = Path::new(CACHE).join(suite);
    if root.join("usr/lib/systemd/systemd").exists() {
        return Ok(root);
    }
    let tmp = Path::new(CACHE).join(format!("{suite}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(CACHE).map_err(|e| e.to_string())?;
    let out = run(Command::new("debootstrap")
        .args(["--variant=minbase", "--include=systemd,systemd-sysv,dbus,procps", suite])
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
        serde_json::from_str(&self.ok("/usr/bin/supctl status --json")).expect("status JSON")
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
        "[supervisor]\ncontrol_socket = \"/run/supd/control.sock\"\nrun_dir = \"/run/supd\"\nlog_dir = \"/var/log/supd\"\n\n[apps.web]\ncommand = [\"/usr/local/bin/sup-demo\", \"--start-delay\", \"500ms\"]\ninstances = 2\nlisten = [\"127.0.0.1:{port}\"]\nready = \"notify\"\nmin_healthy_time = \"500ms\"\nenv = {{ RELEASE = \"{release}\" }}\n"
    )
}

/// A release whose workers exit at once: its rollout fails and is rolled back.
fn broken_config(port: u16) -> String {
    config(port, "broken").replace("\"--start-delay\", \"500ms\"", "\"--exit-after\", \"0s\", \"--exit-code\", \"3\"")
}

/// Boots `suite`, or says why it cannot (a skip, which fails in strict mode).
fn boot(suite: &str) -> Option<Container> {
    let image = match debian_root(suite) {
        Ok(r) => r,
        Err(why) => {
            skip(&format!("{suite}: {why}"));
            return None;
        }
    };
    match Container::boot(&image) {
        Ok(c) => Some(c),
        Err(why) => {
            skip(&format!("{suite}: {why}"));
            None
        }
    }
}

fn main_pid(ct: &Container) -> String {
    ct.ok("systemctl show -p MainPID --value supd").trim().to_string()
}

fn all_ready(ct: &Container, version: Option<u64>) -> bool {
    let s = ct.status();
    !s.apps[0].instances.is_empty()
        && s.apps[0].instances.iter().all(|i| i.state == WorkerState::Ready && version.is_none_or(|v| i.version == v))
}

/// `systemctl status` lines and the unit's journal, for failure messages.
fn unit_state(ct: &Container) -> String {
    let status = ct.sh("systemctl status supd --no-pager -l");
    let journal = ct.sh("journalctl -u supd --no-pager -o cat -n 40");
    format!("{}\n--- journal:\n{}", String::from_utf8_lossy(&status.stdout), String::from_utf8_lossy(&journal.stdout))
}

/// Everything the unit promises, on whichever systemd `ct` runs: start waits
/// for ready, STATUS=, reload rolls the workers and fails visibly (invalid
/// file, failed rollout) while the workers serve, kill -9 of supd under load
/// loses no connection (fd store), restart refuses none, stop leaves nothing.
fn unit_contract(ct: &Container, port: u16) {
    // start returns only once the workers are ready (READY=1 after them).
    ct.ok("systemctl start supd");
    assert!(all_ready(ct, None), "{:?}", ct.status());
    let shown = ct.ok("systemctl status supd --no-pager || true");
    assert!(shown.contains("Status: \"1 app, 2/2 workers ready\""), "STATUS= shown: {shown}");

    // reload after a config change rolls every worker and returns when done.
    let before = ct.pids();
    std::fs::write(ct.path("etc/supd/supervisor.toml"), config(port, "2")).expect("config");
    ct.ok("systemctl reload supd");
    let after = ct.pids();
    assert_eq!(after.len(), 2);
    assert!(after.iter().all(|p| !before.contains(p)), "new pids {after:?} vs {before:?}");
    assert!(all_ready(ct, Some(2)), "{:?}", ct.status());
    for p in &before {
        assert!(!ct.sh(&format!("kill -0 {p}")).status.success(), "old worker {p} is gone");
    }

    // An invalid file: `systemctl reload` fails, says why, and changes nothing.
    let serving = ct.pids();
    let load = Load::start(port, &[Mode::NewConnection], 2);
    load.wait_for(50);
    std::fs::write(ct.path("etc/supd/supervisor.toml"), config(port, "3").replace("instances = 2", "instances = -2"))
        .expect("config");
    let reload = ct.sh("systemctl reload supd");
    assert!(!reload.status.success(), "reload of an invalid file must fail: {}", unit_state(ct));
    let state = unit_state(ct);
    assert!(state.contains("config NOT applied"), "the reason in STATUS=: {state}");
    assert!(state.contains("instances"), "the journal names the bad key: {state}");
    assert_eq!(ct.pids(), serving, "nothing was touched");
    assert_eq!(main_pid(ct), main_pid(ct));
    assert!(ct.sh("systemctl is-active supd").status.success(), "supd still runs: {state}");

    // A release that cannot start: the rollout rolls back, reload fails, the old workers serve on.
    std::fs::write(ct.path("etc/supd/supervisor.toml"), broken_config(port)).expect("config");
    let reload = ct.sh("systemctl reload supd");
    assert!(!reload.status.success(), "reload of a failing release must fail: {}", unit_state(ct));
    let state = unit_state(ct);
    assert!(state.contains("config apply failed for web"), "the reason in STATUS=: {state}");
    assert_eq!(ct.pids(), serving, "rolled back onto the serving workers");
    assert!(all_ready(ct, Some(2)), "{:?}", ct.status());
    load.wait_for(50);
    let stats = load.finish();
    eprintln!("failed reloads under load: {stats:?}");
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);

    // A good file again: reload succeeds and STATUS= forgets the failure.
    std::fs::write(ct.path("etc/supd/supervisor.toml"), config(port, "4")).expect("config");
    ct.ok("systemctl reload supd");
    wait_until("STATUS= without the old failure", Duration::from_secs(30), || {
        let shown = ct.ok("systemctl status supd --no-pager || true");
        (!shown.contains("failed") && shown.contains("2/2 workers ready")).then_some(())
    });

    // kill -9 of supd under load: systemd holds the listening sockets in its fd
    // store while it restarts supd, so connections made meanwhile queue and are
    // served by the new workers instead of being refused.
    let journal = ct.ok("journalctl -u supd --no-pager -o cat");
    assert!(journal.contains("kept in systemd's fd store"), "{journal}");
    let clients = 2;
    let load = Load::start(port, &[Mode::NewConnection], clients);
    load.wait_for(100);
    let main = main_pid(ct);
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
        let now = main_pid(ct);
        let active = ct.sh("systemctl is-active supd").status.success();
        (active && now != main && now != "0").then_some(())
    });
    wait_until("the apps ready again", Duration::from_secs(60), || {
        let out = ct.sh("/usr/bin/supctl status --json");
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
    // Only requests in flight on the killed workers may fail; none is refused.
    assert!(stats.failed <= clients as u64, "{} failures > {clients} in flight: {:?}", stats.failed, stats.errors);
    assert!(
        stats.errors.iter().all(|e| !e.contains("refused")),
        "a connection was refused while supd restarted: {:?}",
        stats.errors
    );
    let journal = ct.ok("journalctl -u supd --no-pager -o cat");
    assert!(journal.contains("adopted listening socket"), "the new supd took the sockets back: {journal}");

    // systemctl restart (an upgrade) under load: the sockets wait in the fd
    // store while supd and its apps restart, so not one request fails.
    let load = Load::start(port, &[Mode::NewConnection], clients);
    load.wait_for(100);
    let main = main_pid(ct);
    ct.ok("systemctl restart supd");
    assert_ne!(main_pid(ct), main, "a new supd");
    load.wait_for(100);
    let stats = load.finish();
    eprintln!("systemctl restart supd under load: {stats:?}");
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);

    // stop leaves no worker in the container.
    ct.ok("systemctl stop supd");
    let left = ct.sh("pgrep -a sup-demo");
    assert!(!left.status.success(), "workers left: {}", String::from_utf8_lossy(&left.stdout));
}

/// The shipped unit and binaries, installed by hand as scripts/install.sh does.
fn shipped_unit_on(suite: &str) {
    let _one = container_lock();
    let Some(ct) = boot(suite) else { return };
    for (b, dir) in [("supd", "usr/bin"), ("supctl", "usr/bin"), ("sup-demo", "usr/local/bin")] {
        std::fs::copy(bin(b), ct.path(&format!("{dir}/{b}"))).expect("copy binary");
    }
    std::fs::create_dir_all(ct.path("etc/supd")).expect("mkdir");
    let port = free_port();
    std::fs::write(ct.path("etc/supd/supervisor.toml"), config(port, "1")).expect("config");
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/supd.service");
    std::fs::copy(unit, ct.path("etc/systemd/system/supd.service")).expect("unit");
    ct.ok("systemctl daemon-reload");
    // The unit must parse cleanly on this systemd: no key ignored, no fallback type.
    let verify = ct.sh("systemd-analyze verify /etc/systemd/system/supd.service 2>&1");
    let said = String::from_utf8_lossy(&verify.stdout).to_string();
    assert!(
        !said.contains("Unknown key") && !said.contains("Failed to parse"),
        "the unit is not understood by {suite}'s systemd: {said}"
    );
    unit_contract(&ct, port);
}

#[test]
fn the_shipped_unit_works_on_bookworm_systemd_252() {
    shipped_unit_on("bookworm");
}

#[test]
fn the_shipped_unit_works_on_trixie_systemd_257() {
    shipped_unit_on("trixie");
}

/// The workspace's target folder, where `cargo deb` puts its packages.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// Builds the Debian package with `cargo deb -p supd` at Debian revision
/// `revision` (two revisions make an upgrade); None (with a reason) without cargo-deb.
fn build_deb(revision: &str, build: bool) -> Result<PathBuf, String> {
    let probe = Command::new("cargo").args(["deb", "--version"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    if !probe.is_ok_and(|s| s.success()) {
        return Err("needs cargo-deb (`cargo install cargo-deb --locked`; .ci/run installs it)".into());
    }
    let out = target_dir().join("sup-deb-test").join(format!("supd-{revision}.deb"));
    let mut cmd = Command::new("cargo");
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["deb", "-p", "supd", "--locked", "--deb-revision", revision, "--output"])
        .arg(&out);
    if !build {
        cmd.arg("--no-build");
    }
    let built = run(&mut cmd);
    if !built.status.success() {
        panic!(
            "cargo deb failed: {}{}",
            String::from_utf8_lossy(&built.stdout),
            String::from_utf8_lossy(&built.stderr)
        );
    }
    Ok(out)
}

#[test]
fn the_debian_package_installs_reloads_upgrades_and_purges_on_bookworm() {
    let _one = container_lock();
    let (first, second) = match build_deb("1", true).and_then(|a| Ok((a, build_deb("2", false)?))) {
        Ok(debs) => debs,
        Err(why) => {
            skip(&why);
            return;
        }
    };
    let Some(ct) = boot("bookworm") else { return };
    std::fs::copy(&first, ct.path("var/tmp/supd-1.deb")).expect("copy deb");
    std::fs::copy(&second, ct.path("var/tmp/supd-2.deb")).expect("copy deb");
    std::fs::copy(bin("sup-demo"), ct.path("usr/local/bin/sup-demo")).expect("copy sup-demo");

    // Install: the unit is enabled and started with the shipped (empty) configuration.
    ct.ok("dpkg -i /var/tmp/supd-1.deb");
    ct.ok("systemctl enable --now supd");
    assert!(ct.sh("systemctl is-enabled supd").status.success(), "{}", unit_state(&ct));
    let s = ct.status();
    assert!(s.apps.is_empty(), "the shipped configuration runs no app: {s:?}");
    ct.ok("supctl config check /etc/supd/supervisor.toml");
    let conffiles = ct.ok("cat /var/lib/dpkg/info/supd.conffiles");
    assert!(conffiles.contains("/etc/supd/supervisor.toml"), "a conffile: {conffiles}");
    // Man pages and completions, generated from the CLI that --help shows.
    for f in [
        "/usr/share/man/man1/supd.1.gz",
        "/usr/share/man/man1/supctl.1.gz",
        "/usr/share/man/man1/supctl-reload.1.gz",
        "/usr/share/bash-completion/completions/supctl",
        "/usr/share/zsh/vendor-completions/_supctl",
        "/usr/share/fish/vendor_completions.d/supctl.fish",
        "/usr/share/doc/supd/operations.md",
    ] {
        ct.ok(&format!("test -s {f}"));
    }
    let man = ct.ok("zcat /usr/share/man/man1/supctl-reload.1.gz");
    assert!(man.contains("canary"), "supctl-reload(1) documents --canary: {man}");
    let completion = ct.ok("cat /usr/share/bash-completion/completions/supctl");
    assert!(completion.contains("rollback") && completion.contains("--canary"), "bash completion knows the commands");

    // An app added to the conffile starts on `systemctl reload`; an invalid file fails it.
    let port = free_port();
    std::fs::write(ct.path("etc/supd/supervisor.toml"), config(port, "1")).expect("config");
    ct.ok("systemctl reload supd");
    assert!(all_ready(&ct, None), "{:?}", ct.status());
    std::fs::write(ct.path("etc/supd/supervisor.toml"), config(port, "1").replace("ready = ", "ready = = "))
        .expect("config");
    let reload = ct.sh("systemctl reload supd");
    assert!(!reload.status.success(), "reload of an invalid file must fail: {}", unit_state(&ct));
    assert!(all_ready(&ct, None), "still serving: {:?}", ct.status());
    std::fs::write(ct.path("etc/supd/supervisor.toml"), config(port, "1")).expect("config");

    // Upgrade under load: postinst restarts supd; the fd store keeps the sockets, nothing is refused.
    let load = Load::start(port, &[Mode::NewConnection], 2);
    load.wait_for(100);
    let main = main_pid(&ct);
    ct.ok("dpkg -i /var/tmp/supd-2.deb");
    assert_ne!(main_pid(&ct), main, "the upgrade restarted supd: {}", unit_state(&ct));
    wait_until("the apps ready after the upgrade", DEADLINE, || all_ready(&ct, None).then_some(()));
    load.wait_for(100);
    let stats = load.finish();
    eprintln!("package upgrade under load: {stats:?}");
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    let version = ct.ok("dpkg-query -W -f '${Version}' supd");
    assert!(version.ends_with("-2"), "upgraded to revision 2: {version}");

    // Purge: stopped, disabled, every file gone, no process left.
    ct.ok("dpkg --purge supd");
    for gone in ["/usr/bin/supd", "/usr/bin/supctl", "/etc/supd", "/var/log/supd", "/usr/share/man/man1/supctl.1.gz"] {
        assert!(!ct.sh(&format!("test -e {gone}")).status.success(), "{gone} is left after purge");
    }
    let unit = ct.sh("systemctl cat supd");
    assert!(!unit.status.success(), "the unit is gone: {}", String::from_utf8_lossy(&unit.stdout));
    let left = ct.sh("pgrep -a 'supd|sup-demo'");
    assert!(!left.status.success(), "processes left: {}", String::from_utf8_lossy(&left.stdout));
}
