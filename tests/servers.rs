//! End-to-end: the recipes of docs/servers.md against the real servers.
//!
//! Each recipe is a file under tests/fixtures/servers/ that the doc shows as it
//! is; the test only swaps port 8000 for a free one. The servers come from their
//! registries (pip into target/servers-venv, Debian's packages), installed here
//! and cached; where one cannot be had the test is skipped with the reason
//! (a failure under SUP_TEST_STRICT=1).
//!
//! For each server: two instances on sup's listener become ready as the recipe
//! says; a reload to a new release under new-connection load fails no request;
//! a broken release is rolled back with the old workers serving.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use sup::*;

/// The recipes and the apps they run.
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/servers")
}

/// The workspace's `target` folder, where installed servers are cached.
fn target_dir() -> PathBuf {
    bin_dir().parent().map(Path::to_path_buf).unwrap_or_else(bin_dir)
}

/// Runs `cmd`, returning its output or why it failed.
fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let tail = |b: &[u8]| {
        let s = String::from_utf8_lossy(b);
        s.lines().rev().take(8).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    };
    Err(format!("{cmd:?} failed ({}):\n{}\n{}", describe(out.status), tail(&out.stdout), tail(&out.stderr)))
}

/// Installs Debian packages unless they are installed already (apt is serialised here).
fn apt(pkgs: &[&str]) -> Result<(), String> {
    static APT: Mutex<()> = Mutex::new(());
    let _one = APT.lock().unwrap_or_else(|e| e.into_inner());
    let installed = |p: &str| {
        Command::new("dpkg-query")
            .args(["-W", "-f", "${Status}", p])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
    };
    if pkgs.iter().all(|p| installed(p)) {
        return Ok(());
    }
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(pkgs)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The virtualenv with gunicorn, Flask and uvicorn, made once and cached under target/.
fn venv() -> Result<PathBuf, String> {
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    VENV.get_or_init(|| {
        let dir = target_dir().join("servers-venv");
        let ready = ["gunicorn", "uvicorn", "flask"].iter().all(|b| dir.join("bin").join(b).exists());
        if !ready {
            run(Command::new("python3").args(["-m", "venv"]).arg(&dir))
                .map_err(|e| format!("cannot make a virtualenv: {e}"))?;
            // The versions docs/servers.md names.
            run(Command::new(dir.join("bin/pip")).args([
                "install",
                "-q",
                "gunicorn==27.0.1",
                "flask==3.1.3",
                "uvicorn==0.55.0",
            ]))
            .map_err(|e| format!("cannot install gunicorn, flask and uvicorn from PyPI: {e}"))?;
        }
        Ok(dir)
    })
    .clone()
}

/// Puma and the sd_notify gem its systemd plugin needs, from Debian.
fn puma() -> Result<(), String> {
    static PUMA: OnceLock<Result<(), String>> = OnceLock::new();
    PUMA.get_or_init(|| apt(&["puma", "ruby-sd-notify"]).map_err(|e| format!("cannot install Puma from Debian: {e}")))
        .clone()
}

/// The Go server, built with Debian's Go and the standard library only.
fn go_server() -> Result<PathBuf, String> {
    static GO: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    GO.get_or_init(|| {
        apt(&["golang-go"]).map_err(|e| format!("cannot install Go from Debian: {e}"))?;
        let out = target_dir().join("servers-go/server");
        let cache = target_dir().join("servers-go/cache");
        run(Command::new("go")
            .args(["build", "-o"])
            .arg(&out)
            .arg(fixtures().join("server.go"))
            // Nothing beyond the standard library, and no module download.
            .env("GO111MODULE", "off")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .env("GOCACHE", &cache))
        .map_err(|e| format!("cannot build the Go server: {e}"))?;
        Ok(out)
    })
    .clone()
}

/// A server recipe: its TOML under tests/fixtures/servers/ and what a release holds.
struct Recipe {
    /// The recipe's file.
    toml: &'static str,
    /// App files copied into each release.
    files: &'static [&'static str],
    /// The virtualenv, linked as `venv` in each release.
    venv: Option<PathBuf>,
    /// A program copied into each release as `server`.
    program: Option<PathBuf>,
}

impl Recipe {
    /// The recipe, or None (after a skip) when its server cannot be installed.
    fn get(name: &str) -> Option<Recipe> {
        let r = match name {
            "gunicorn" | "gunicorn-lazy" | "uvicorn" => venv().map(|v| Recipe {
                toml: if name == "uvicorn" {
                    "uvicorn.toml"
                } else if name == "gunicorn" {
                    "gunicorn.toml"
                } else {
                    "gunicorn-lazy.toml"
                },
                files: if name == "uvicorn" { &["asgi.py"] } else { &["app.py"] },
                venv: Some(v),
                program: None,
            }),
            "puma" => puma().map(|()| Recipe { toml: "puma.toml", files: &["config.ru"], venv: None, program: None }),
            "go" => go_server().map(|p| Recipe { toml: "go.toml", files: &[], venv: None, program: Some(p) }),
            _ => Err(format!("no recipe `{name}`")),
        };
        match r {
            Ok(r) => Some(r),
            Err(why) => {
                skip(&format!("{name}: {why}"));
                None
            }
        }
    }

    /// The recipe's `[apps.web]` table on `port`.
    fn apps(&self, port: u16) -> String {
        let text = std::fs::read_to_string(fixtures().join(self.toml)).expect("recipe");
        text.replace("8000", &port.to_string())
    }

    /// `releases/NAME` holding the app with `version` in its VERSION file.
    fn release(&self, root: &Path, name: &str, version: &str) -> PathBuf {
        let dir = root.join("releases").join(name);
        std::fs::create_dir_all(&dir).expect("release dir");
        for f in self.files {
            std::fs::copy(fixtures().join(f), dir.join(f)).expect("copy app");
        }
        std::fs::write(dir.join("VERSION"), format!("{version}\n")).expect("VERSION");
        if let Some(v) = &self.venv {
            symlink(v, dir.join("venv")).expect("venv link");
        }
        if let Some(p) = &self.program {
            std::fs::copy(p, dir.join("server")).expect("copy server");
        }
        dir.canonicalize().expect("canonical release")
    }
}

/// Points `current` at `target`, atomically, as deploy scripts do.
fn switch(root: &Path, target: &Path) {
    let tmp = root.join("current.tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(target, &tmp).expect("symlink");
    std::fs::rename(&tmp, root.join("current")).expect("rename symlink");
}

/// supd on a folder with release v1 current, running `recipe` on a free port.
fn boot(recipe: &Recipe) -> (Daemon, u16, PathBuf) {
    boot_edited(recipe, |apps| apps)
}

/// Like [`boot`], with the recipe's `[apps.web]` table changed by `edit`.
fn boot_edited(recipe: &Recipe, edit: impl Fn(String) -> String) -> (Daemon, u16, PathBuf) {
    let port = free_port();
    let dir = tempfile::Builder::new().prefix("sup").tempdir().expect("temp dir");
    let root = dir.path().to_path_buf();
    let v1 = recipe.release(&root, "v1", "v1");
    switch(&root, &v1);
    let config = root.join("supervisor.toml");
    let body = format!(
        "[supervisor]\ncontrol_socket = \"run/control.sock\"\nrun_dir = \"run\"\nlog_dir = \"logs\"\nlog_level = \"info\"\n\n{}",
        edit(recipe.apps(port))
    );
    std::fs::write(&config, body).expect("write config");
    let d = Daemon::start_with(dir, config, root.join("run/control.sock"));
    (d, port, root)
}

/// The version the port answers with.
fn version_on(port: u16) -> String {
    let (code, body) = http_get(port, "/").expect("answered");
    assert_eq!(code, 200, "{body}");
    body.split("version=").nth(1).unwrap_or("").trim().to_string()
}

/// Every instance is ready and runs `release`.
fn wait_release(d: &Daemon, release: &Path) -> Vec<InstanceStatus> {
    let want = release.to_str().expect("utf-8").to_string();
    wait_until(&format!("both instances ready on {}", release.display()), DEADLINE * 2, || {
        let i = d.instances("web");
        let done = i.len() == 2
            && i.iter().all(|i| i.state == WorkerState::Ready && i.release.as_deref() == Some(want.as_str()));
        done.then_some(i)
    })
}

/// supctl's output, for assertions.
fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// How a broken release shows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Broken {
    /// It exits before it is ready: the old workers never stop.
    BeforeReady,
    /// It says ready, then exits within `min_healthy_time`: its slot's old
    /// worker had drained, so the slot gets a fresh worker of the old release.
    InHealthWindow,
}

/// The whole life of a recipe: ready, a reload under load, a broken release
/// (`why` in supctl's answer) rolled back.
fn deploys(name: &str, broken: Broken, why: &str) {
    let Some(recipe) = Recipe::get(name) else { return };
    let _serial = load_lock();
    let (d, port, root) = boot(&recipe);
    let v1 = root.join("releases/v1").canonicalize().expect("v1");
    let first = wait_release(&d, &v1);
    assert_eq!(version_on(port), "v1");

    let load = Load::start(port, &[Mode::NewConnection], 4);
    load.wait_for(50);
    let v2 = recipe.release(&root, "v2", "v2");
    switch(&root, &v2);
    let out = d.supctl(&["reload", "web"]);
    assert!(out.status.success(), "{name}: reload to v2 failed:\n{}\n{}", text(&out), d.log());
    let second = wait_release(&d, &v2);
    for (a, b) in first.iter().zip(&second) {
        assert_ne!(a.pid, b.pid, "{name}: slot {} was not replaced", a.slot);
    }
    load.wait_for(50);
    assert_eq!(version_on(port), "v2");

    let v3 = recipe.release(&root, "v3", "broken-v3");
    switch(&root, &v3);
    let out = d.supctl(&["reload", "web"]);
    assert_eq!(out.status.code(), Some(1), "{name}: the broken release was not rolled back:\n{}", text(&out));
    assert!(text(&out).contains(why), "{name}: the failure does not say `{why}`:\n{}", text(&out));
    let after = wait_release(&d, &v2);
    // A rollout stops at its first failed slot: slot 1 is never touched.
    let untouched = if broken == Broken::BeforeReady { 0 } else { 1 };
    assert_eq!(
        after.iter().skip(untouched).map(|i| i.pid).collect::<Vec<_>>(),
        second.iter().skip(untouched).map(|i| i.pid).collect::<Vec<_>>(),
        "{name}: the old workers did not keep serving"
    );
    load.wait_for(50);
    assert_eq!(version_on(port), "v2");
    let stats = load.finish();
    eprintln!(
        "{name}: {} requests answered, {} failed, {} unanswered and retried",
        stats.ok, stats.failed, stats.unanswered_retried
    );
    assert_eq!(stats.failed, 0, "{name}: failed requests: {:?}", stats.errors);
}

#[test]
fn gunicorn_with_preload_reloads_under_load_and_a_release_that_cannot_import_its_app_never_gets_ready() {
    deploys("gunicorn", Broken::BeforeReady, "cannot import its app");
}

#[test]
fn gunicorn_without_preload_is_caught_by_the_health_window_when_its_workers_cannot_boot() {
    // Its READY=1 comes before the app import; the workers' boot failure ends the master.
    deploys("gunicorn-lazy", Broken::InHealthWindow, "Worker failed to boot");
}

#[test]
fn uvicorn_is_ready_when_its_event_loop_waits_on_the_socket_and_a_broken_release_is_rolled_back() {
    deploys("uvicorn", Broken::BeforeReady, "cannot import its app");
}

#[test]
fn puma_cluster_takes_the_socket_matching_its_bind_and_notifies_through_its_systemd_plugin() {
    // With --preload the master loads the app and exits on its error (the backtrace is the tail).
    deploys("puma", Broken::BeforeReady, "load_rackup");
}

#[test]
fn a_go_server_on_fd_3_that_notifies_itself_reloads_and_rolls_back() {
    deploys("go", Broken::BeforeReady, "cannot start");
}

/// A slow startup is not counted ready before it serves, and a startup that
/// never ends is rolled back at `ready_timeout`; no request fails.
#[test]
fn uvicorn_is_not_ready_before_its_startup_ends_and_a_hung_startup_is_rolled_back() {
    let Some(recipe) = Recipe::get("uvicorn") else { return };
    let _serial = load_lock();
    let (d, port, root) = boot(&recipe);
    let v1 = root.join("releases/v1").canonicalize().expect("v1");
    wait_release(&d, &v1);
    let load = Load::start(port, &[Mode::NewConnection], 4);
    load.wait_for(50);

    // v2 takes 3 s to start and writes started-PID as its startup ends.
    let v2 = recipe.release(&root, "v2", "slow-v2");
    switch(&root, &v2);
    let mut reload = d.supctl_bg(&["reload", "web"]);
    let want = v2.to_str().expect("utf-8").to_string();
    let mut checked = Vec::new();
    wait_until("the reload to v2 to end", DEADLINE * 2, || {
        for i in d.instances("web").into_iter().filter(|i| i.release.as_deref() == Some(want.as_str())) {
            let Some(pid) = i.pid else { continue };
            let started = v2.join(format!("started-{pid}")).exists();
            if i.state == WorkerState::Ready {
                // Looked for after the state was read: it was there when supd said ready.
                assert!(started, "worker {pid} was counted ready before its startup ended");
                if !checked.contains(&pid) {
                    checked.push(pid);
                }
            }
        }
        (checked.len() == 2 || reload.try_wait().ok().flatten().is_some()).then_some(())
    });
    let out = reload.wait_with_output().expect("supctl reload");
    assert!(out.status.success(), "reload to v2 failed:\n{}\n{}", text(&out), d.log());
    wait_release(&d, &v2);
    assert_eq!(version_on(port), "slow-v2");
    assert!(d.log().contains("in an epoll set of pid"), "supd did not log how it saw uvicorn wait:\n{}", d.log());

    // v3's startup never ends: rolled back at ready_timeout (15 s in the recipe).
    let before = d.instances("web");
    let v3 = recipe.release(&root, "v3", "hang-v3");
    switch(&root, &v3);
    let out = d.supctl(&["reload", "web"]);
    assert_eq!(out.status.code(), Some(1), "the hung release was not rolled back:\n{}", text(&out));
    assert!(text(&out).contains("not ready within 15s"), "{}", text(&out));
    let after = wait_release(&d, &v2);
    assert_eq!(after.iter().map(|i| i.pid).collect::<Vec<_>>(), before.iter().map(|i| i.pid).collect::<Vec<_>>());
    assert!(!v3.read_dir().expect("v3").flatten().any(|e| e.file_name().to_string_lossy().starts_with("started-")));
    load.wait_for(50);
    let stats = load.finish();
    eprintln!(
        "uvicorn slow/hung startup: {} requests answered, {} failed, {} unanswered and retried",
        stats.ok, stats.failed, stats.unanswered_retried
    );
    assert_eq!(stats.failed, 0, "failed requests: {:?}", stats.errors);
}

/// gunicorn's sync workers and Puma's workers wait in select(2), not in an
/// epoll set: `accepting` sees a thread blocked in it with the socket in its
/// read set, in a worker process, never in the master, which holds the
/// socket without waiting on it.
#[test]
fn accepting_sees_gunicorn_and_puma_workers_blocked_in_select_not_their_master() {
    let _serial = load_lock();
    for name in ["gunicorn-lazy", "puma"] {
        let Some(recipe) = Recipe::get(name) else { continue };
        let (d, _port, root) = boot_edited(&recipe, |apps| apps.replace("ready = \"notify\"", "ready = \"accepting\""));
        let v1 = root.join("releases/v1").canonicalize().expect("v1");
        let masters: Vec<u32> = wait_release(&d, &v1).iter().filter_map(|i| i.pid).collect();
        let log = d.log();
        let seen: Vec<&str> = log.lines().filter(|l| l.contains("waits for connections on its sockets")).collect();
        assert_eq!(seen.len(), 2, "{name}:\n{log}");
        for line in seen {
            // "socket N thread T of pid P blocked in CALL pid=MASTER"
            let waiter: u32 = line
                .split(" of pid ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            let call = line.split(" blocked in ").nth(1).and_then(|r| r.split(' ').next()).unwrap_or("");
            assert!(["select", "pselect6", "poll", "ppoll"].contains(&call), "{name}: {line}");
            assert!(
                waiter != 0 && !masters.contains(&waiter),
                "{name}: the waiter is not a worker of the master: {line}"
            );
        }
    }
}

/// A process that holds its socket but never waits on it is not ready, and is
/// ended at `ready_timeout`.
#[test]
fn a_worker_that_only_holds_its_socket_is_not_accepting() {
    let port = free_port();
    let d = Daemon::start(&format!(
        "[apps.idle]\ncommand = [\"sleep\", \"1000\"]\nlisten = [\"127.0.0.1:{port}\"]\nready = \"accepting\"\nready_timeout = \"2s\"\n"
    ));
    d.wait_log("not ready within 2s", DEADLINE);
    assert!(d.instances("idle").iter().all(|i| i.state != WorkerState::Ready));
    assert!(!d.log().contains("waits for connections"), "{}", d.log());
}

/// docs/servers.md shows every recipe exactly as these tests run it.
#[test]
fn the_doc_shows_every_recipe_as_the_tests_run_it() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/servers.md")).expect("doc");
    let mut recipes = 0;
    for entry in std::fs::read_dir(fixtures()).expect("fixtures").flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "toml") {
            let recipe = std::fs::read_to_string(&path).expect("recipe");
            assert!(
                doc.contains(&format!("```toml\n{recipe}```")),
                "docs/servers.md does not show {} as it is",
                path.display()
            );
            recipes += 1;
        }
    }
    assert_eq!(recipes, 5);
}
