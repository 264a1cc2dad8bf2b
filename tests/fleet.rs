//! End-to-end: the fleet side of sup. `deploy/ansible/rolling-deploy.yml` run
//! by a real `ansible-playbook` (ansible-core from PyPI, in a virtualenv under
//! `target/`) against three hosts simulated here: three supd instances, each
//! with its own folder, control socket, port and release link, reached with
//! `ansible_connection=local`. And the monitoring files of `deploy/`: the
//! alert rules and scrape config checked by promtool, the Grafana dashboard's
//! queries checked against the metrics a real supd exports.

use std::collections::BTreeSet;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::SystemTime;

use sup::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `ansible-playbook` from a virtualenv under target/, made on first use.
fn ansible() -> Option<PathBuf> {
    let venv = bin_dir().parent().map(|t| t.join("ansible-venv")).unwrap_or_else(|| repo().join("target/ansible-venv"));
    let playbook = venv.join("bin/ansible-playbook");
    if playbook.exists() {
        return Some(playbook);
    }
    let _guard = load_lock();
    if playbook.exists() {
        return Some(playbook);
    }
    let run = |c: &mut Command| c.stdin(Stdio::null()).stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    if !run(Command::new("python3").args(["-m", "venv"]).arg(&venv)) {
        skip("python3 -m venv failed: no python3 with venv to install ansible-core into");
        return None;
    }
    if !run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "ansible-core"])) {
        skip("pip install ansible-core failed");
        return None;
    }
    Some(playbook)
}

/// `releases/<name>/server` under `root`, a script that runs `body`.
fn release(root: &Path, name: &str, body: &str) -> PathBuf {
    let dir = root.join("releases").join(name);
    std::fs::create_dir_all(&dir).expect("release dir");
    let script = dir.join("server");
    std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).expect("write server");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir.canonicalize().expect("canonical release")
}

fn good(name: &str) -> String {
    format!("exec {} --start-delay 200ms \"$@\" # {name}", bin("sup-demo").display())
}

const BROKEN: &str = "echo 'this release cannot start: no database' >&2; exit 1";

/// One simulated host: a supd with an app `web` running `releases/v1` through `current`.
struct Host {
    name: String,
    d: Daemon,
    port: u16,
    root: PathBuf,
    v1: PathBuf,
    v2: PathBuf,
}

impl Host {
    fn start(name: &str, v2_body: &str) -> Host {
        let port = free_port();
        let dir = tempfile::Builder::new().prefix("sup-fleet").tempdir().expect("temp dir");
        let root = dir.path().canonicalize().expect("canonical dir");
        let v1 = release(&root, "v1", &good("v1"));
        let v2 = release(&root, "v2", v2_body);
        symlink(&v1, root.join("current")).expect("current link");
        let config = root.join("supervisor.toml");
        std::fs::write(
            &config,
            format!(
                "[supervisor]\ncontrol_socket = \"run/control.sock\"\nrun_dir = \"run\"\nlog_dir = \"logs\"\n\n\
                 [apps.web]\ncommand = [\"./server\"]\ncwd = \"{}\"\ninstances = 2\nready = \"notify\"\n\
                 ready_timeout = \"10s\"\nmin_healthy_time = \"1s\"\nlisten = [\"127.0.0.1:{port}\"]\n",
                root.join("current").display()
            ),
        )
        .expect("config");
        let socket = root.join("run/control.sock");
        let d = Daemon::start_with(dir, config, socket);
        d.wait_ready("web", 2);
        Host { name: name.to_string(), d, port, root, v1, v2 }
    }

    fn link(&self) -> PathBuf {
        std::fs::read_link(self.root.join("current")).expect("current link")
    }

    /// (version, trigger, result, start, end) of every history entry.
    fn history(&self) -> Vec<(u64, String, String, SystemTime, SystemTime)> {
        let out = self.d.supctl(&["history", "web", "--json"]);
        let h: serde_json::Value = serde_json::from_slice(&out.stdout).expect("history JSON");
        h["history"]
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| {
                let at = humantime::parse_rfc3339(e["at"].as_str().unwrap_or("")).expect("RFC 3339 time");
                let end = at + std::time::Duration::from_millis(e["duration_ms"].as_u64().unwrap_or(0));
                let s = |k: &str| e[k].as_str().unwrap_or("").to_string();
                (e["version"].as_u64().unwrap_or(0), s("trigger"), s("result"), at, end)
            })
            .collect()
    }

    /// Every slot ready on `release`, and the port answering from that release's code.
    fn serves(&self, release: &Path) {
        let ready = wait_until(&format!("{}: every slot ready on {}", self.name, release.display()), DEADLINE, || {
            let i = self.d.instances("web");
            (i.len() == 2
                && i.iter().all(|i| i.state == WorkerState::Ready && i.release.as_deref() == release.to_str()))
            .then_some(i)
        });
        for i in &ready {
            let cwd = std::fs::read_link(format!("/proc/{}/cwd", i.pid.expect("pid"))).expect("worker cwd");
            assert_eq!(cwd, release, "{}: slot {} runs from another directory", self.name, i.slot);
        }
        let (code, _) = http_get(self.port, "/").expect("answered");
        assert_eq!(code, 200, "{}", self.name);
    }
}

/// Writes an inventory of `hosts` (each with its own socket, link and new release) and runs the playbook.
fn deploy(playbook: &Path, hosts: &[&Host], dir: &Path, extra: &[&str]) -> Output {
    let python = playbook.with_file_name("python");
    let mut inv = String::from("[fleet]\n");
    for h in hosts {
        inv.push_str(&format!(
            "{} ansible_connection=local sup_socket={} sup_current_link={} sup_release_dir={}\n",
            h.name,
            h.d.socket.display(),
            h.root.join("current").display(),
            h.v2.display()
        ));
    }
    inv.push_str(&format!(
        "\n[fleet:vars]\nansible_python_interpreter={}\nsup_app=web\nsup_supctl={}\n",
        python.display(),
        bin("supctl").display()
    ));
    let inventory = dir.join("hosts.ini");
    std::fs::write(&inventory, inv).expect("inventory");
    let out = Command::new(playbook)
        .arg("-i")
        .arg(&inventory)
        .arg(repo().join("deploy/ansible/rolling-deploy.yml"))
        .args(extra)
        .env("ANSIBLE_HOME", dir.join("ansible-home"))
        .env("ANSIBLE_LOCAL_TEMP", dir.join("ansible-tmp"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
        .env("ANSIBLE_STDOUT_CALLBACK", "default")
        .stdin(Stdio::null())
        .output()
        .expect("run ansible-playbook");
    eprintln!("ansible-playbook: {}\n{}", describe(out.status), String::from_utf8_lossy(&out.stdout));
    out
}

fn syntax_check(playbook: &Path, file: &str, dir: &Path) {
    let out = Command::new(playbook)
        .args(["--syntax-check", "-i", "localhost,"])
        .arg(repo().join("deploy/ansible").join(file))
        .env("ANSIBLE_HOME", dir.join("ansible-home"))
        .env("ANSIBLE_LOCAL_TEMP", dir.join("ansible-tmp"))
        .stdin(Stdio::null())
        .output()
        .expect("run ansible-playbook --syntax-check");
    assert!(
        out.status.success(),
        "{file}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_good_release_reaches_every_host_one_at_a_time_without_a_failed_request() {
    let Some(playbook) = ansible() else { return };
    let _serial = load_lock();
    let work = tempfile::Builder::new().prefix("sup-ansible").tempdir().expect("temp dir");
    syntax_check(&playbook, "rolling-deploy.yml", work.path());
    syntax_check(&playbook, "install.yml", work.path());
    let hosts: Vec<Host> = ["h1", "h2", "h3"].iter().map(|n| Host::start(n, &good("v2"))).collect();
    let loads: Vec<Load> = hosts.iter().map(|h| Load::start(h.port, &[Mode::NewConnection], 1)).collect();
    for l in &loads {
        l.wait_for(50);
    }
    let out = deploy(&playbook, &hosts.iter().collect::<Vec<_>>(), work.path(), &[]);
    assert!(out.status.success(), "the playbook failed: {}", String::from_utf8_lossy(&out.stdout));
    for l in &loads {
        l.wait_for(50);
    }
    for (h, l) in hosts.iter().zip(loads) {
        let stats = l.finish();
        eprintln!("{}: load during the deploy {stats:?}", h.name);
        assert!(stats.ok > 0, "{}: {stats:?}", h.name);
        assert_eq!(stats.failed, 0, "{}: {stats:?}", h.name);
    }
    let mut spans = Vec::new();
    for h in &hosts {
        h.serves(&h.v2);
        assert_eq!(h.link(), h.v2, "{}", h.name);
        let history = h.history();
        let v2 = history.iter().find(|e| e.0 == 2).unwrap_or_else(|| panic!("{}: no version 2: {history:?}", h.name));
        assert_eq!((v2.1.as_str(), v2.2.as_str()), ("reload", "ok"), "{}", h.name);
        spans.push((v2.3, v2.4));
    }
    // One host at a time: each host's rollout began after the previous one's ended.
    for w in spans.windows(2) {
        assert!(w[1].0 >= w[0].1, "rollouts overlapped: {spans:?}");
    }
}

#[test]
fn the_role_writes_a_supervisor_toml_that_supctl_accepts() {
    let Some(playbook) = ansible() else { return };
    let work = tempfile::Builder::new().prefix("sup-ansible").tempdir().expect("temp dir");
    let vars = work.path().join("vars.json");
    let out_file = work.path().join("supervisor.toml");
    std::fs::write(
        &vars,
        serde_json::json!({
            "sup_supervisor": { "control_socket": work.path().join("control.sock"), "log_dir": work.path().join("logs") },
            "sup_metrics": "127.0.0.1:9105",
            "sup_apps": { "web": {
                "command": ["node", "server.js"], "cwd": "/srv/web/current", "instances": "max",
                "listen": ["127.0.0.1:3000"], "ready": "notify", "min_healthy_time": "5s",
                "env": { "NODE_ENV": "production", "GREETING": "say \"hi\"" }, "autostart": true,
            } },
        })
        .to_string(),
    )
    .expect("vars");
    // The role's template, rendered by ansible's own template module.
    let out = Command::new(playbook.with_file_name("ansible"))
        .args(["localhost", "-c", "local", "-m", "ansible.builtin.template", "-a"])
        .arg(format!(
            "src={} dest={}",
            repo().join("deploy/ansible/roles/sup/templates/supervisor.toml.j2").display(),
            out_file.display()
        ))
        .arg("-e")
        .arg(format!("@{}", vars.display()))
        .arg("-e")
        .arg(format!("ansible_python_interpreter={}", playbook.with_file_name("python").display()))
        .env("ANSIBLE_HOME", work.path().join("ansible-home"))
        .env("ANSIBLE_LOCAL_TEMP", work.path().join("ansible-tmp"))
        .stdin(Stdio::null())
        .output()
        .expect("run ansible");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&out_file).expect("rendered file");
    let check = Command::new(bin("supctl")).args(["config", "check"]).arg(&out_file).output().expect("supctl");
    assert!(check.status.success(), "{text}\n{}", String::from_utf8_lossy(&check.stderr));
    assert!(text.contains("\"GREETING\" = \"say \\\"hi\\\"\""), "an inline table, quotes escaped: {text}");
    assert!(text.contains("instances = \"max\"") && text.contains("autostart = true"), "{text}");
    assert!(text.contains("metrics = \"127.0.0.1:9105\""), "{text}");
}

#[test]
fn a_release_failing_on_the_second_host_stops_the_play_and_rolls_the_first_back() {
    let Some(playbook) = ansible() else { return };
    let _serial = load_lock();
    let work = tempfile::Builder::new().prefix("sup-ansible").tempdir().expect("temp dir");
    let h1 = Host::start("h1", &good("v2"));
    let h2 = Host::start("h2", BROKEN);
    let h3 = Host::start("h3", &good("v2"));
    let h3_pids: Vec<_> = h3.d.instances("web").iter().map(|i| i.pid).collect();
    let out = deploy(&playbook, &[&h1, &h2, &h3], work.path(), &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "the play must fail: {text}");
    assert!(text.contains("cannot start: no database"), "the failure names the reason: {text}");
    assert!(text.contains("rolled back: ['h1']; rollbacks that failed: []"), "{text}");
    assert!(!text.contains("[h3]"), "no task ran on h3: {text}");
    // The first host took the release, then was rolled back by `supctl rollback`.
    let versions = |h: &Host| h.history().into_iter().map(|e| (e.0, e.1, e.2)).collect::<Vec<_>>();
    let s = |a: &str| a.to_string();
    assert_eq!(
        versions(&h1),
        vec![(1, s("start"), s("ok")), (2, s("reload"), s("ok")), (3, s("rollback"), s("ok"))],
        "h1"
    );
    // The second host rolled back by itself.
    assert_eq!(versions(&h2), vec![(1, s("start"), s("ok")), (2, s("reload"), s("rolled_back"))], "h2");
    // The third host was never touched.
    assert_eq!(versions(&h3), vec![(1, s("start"), s("ok"))], "h3");
    assert_eq!(h3.d.instances("web").iter().map(|i| i.pid).collect::<Vec<_>>(), h3_pids, "h3's workers");
    // All three serve the old release, and their links say so.
    for h in [&h1, &h2, &h3] {
        h.serves(&h.v1);
        assert_eq!(h.link(), h.v1, "{}: the link names what runs", h.name);
    }
}

#[test]
fn reload_and_rollback_json_print_one_object() {
    let h = Host::start("h", BROKEN);
    let run = |args: &[&str]| {
        let out = h.d.supctl(args);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("supctl {args:?}: not one JSON object ({e}): {:?}", out));
        (out.status.code(), v)
    };
    let (code, v) = run(&["reload", "web", "--json"]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["app"], "web");
    assert_eq!(v["result"], "ok", "{v}");
    assert_eq!((v["version_before"].as_u64(), v["version_after"].as_u64()), (Some(1), Some(2)), "{v}");
    assert_eq!(v["release_after"], h.v1.to_str().expect("utf-8"), "{v}");
    assert!(v["failed_slot"].is_null(), "{v}");
    // `current` to the broken release: the reload fails at slot 0 and rolls back.
    let tmp = h.root.join("current.tmp");
    symlink(&h.v2, &tmp).expect("symlink");
    std::fs::rename(&tmp, h.root.join("current")).expect("switch");
    let (code, v) = run(&["reload", "web", "--json"]);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["result"], "rolled_back", "{v}");
    assert_eq!(v["failed_slot"], 0, "{v}");
    assert!(v["reason"].as_str().unwrap_or("").contains("no database"), "{v}");
    assert_eq!((v["version_before"].as_u64(), v["version_after"].as_u64()), (Some(2), Some(2)), "{v}");
    assert_eq!(v["version_attempted"], 3, "{v}");
    let (code, v) = run(&["rollback", "web", "--json"]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["result"], "ok", "{v}");
    assert_eq!((v["version_before"].as_u64(), v["version_after"].as_u64()), (Some(2), Some(4)), "{v}");
    // Refused before any slot moved: still one object, exit 1.
    let (code, v) = run(&["rollback", "web", "--to", "3", "--json"]);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["result"], "error", "{v}");
    assert_eq!(v["version_after"], 4, "{v}");
    let (code, v) = run(&["reload", "nope", "--json"]);
    assert_eq!(code, Some(2), "{v}");
    assert_eq!(v["result"], "error", "{v}");
}

/// promtool from Debian's `prometheus` package, installed when missing and possible.
fn promtool() -> Option<PathBuf> {
    let found = || ["/usr/bin/promtool", "/usr/local/bin/promtool"].iter().map(PathBuf::from).find(|p| p.exists());
    if let Some(p) = found() {
        return Some(p);
    }
    let _guard = load_lock();
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && apt(&["update", "-qq"]) {
        apt(&["install", "-y", "-q", "--no-install-recommends", "prometheus"]);
    }
    let p = found();
    if p.is_none() {
        skip("promtool is missing and Debian's `prometheus` package could not be installed");
    }
    p
}

/// Every `sup_*` name in a PromQL expression.
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    let mut rest = expr;
    while let Some(i) = rest.find("sup_") {
        let before = rest[..i].chars().last();
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '"' || c == '$') {
            into.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
}

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| exprs(x, out)),
        _ => {}
    }
}

#[test]
fn the_alert_rules_pass_promtool_and_the_dashboard_names_metrics_supd_exports() {
    // What a real supd exports after a start, a reload, a crash and a sample.
    let (port, mport) = (free_port(), free_port());
    let dir = tempfile::Builder::new().prefix("sup").tempdir().expect("temp dir");
    let config = dir.path().join("supervisor.toml");
    std::fs::write(
        &config,
        format!(
            "[supervisor]\ncontrol_socket = \"run/control.sock\"\nrun_dir = \"run\"\nlog_dir = \"logs\"\nmetrics = \"127.0.0.1:{mport}\"\nmonitor_interval = \"100ms\"\n\n\
             [apps.web]\ncommand = [\"{}\"]\ninstances = 2\nready = \"notify\"\nlisten = [\"127.0.0.1:{port}\"]\nmin_healthy_time = \"100ms\"\n",
            bin("sup-demo").display()
        ),
    )
    .expect("config");
    let socket = dir.path().join("run/control.sock");
    let d = Daemon::start_with(dir, config, socket);
    let ready = d.wait_ready("web", 2);
    assert!(d.supctl(&["reload", "web"]).status.success());
    let victim = d.wait_ready("web", 2)[0].pid.expect("pid");
    assert_ne!(Some(victim), ready[0].pid);
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let scrape = wait_until("a scrape with samples of every kind", DEADLINE, || {
        let (_, body) = http_get(mport, "/metrics").ok()?;
        (body.contains("reason=\"crash\"") && body.contains("sup_worker_cpu_seconds{")).then_some(body)
    });
    let exported: BTreeSet<String> = scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();

    let mut used = BTreeSet::new();
    // The dashboard: valid JSON, with panels whose queries name exported metrics.
    let text = std::fs::read_to_string(repo().join("deploy/grafana/sup-fleet.json")).expect("dashboard");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    exprs(&dash["panels"], &mut queries);
    exprs(&dash["templating"], &mut queries);
    assert!(queries.len() >= 6, "{queries:?}");
    for q in &queries {
        metric_names(q, &mut used);
    }
    for want in [
        "sup_app_version",
        "sup_app_release",
        "sup_rollouts_total",
        "sup_restarts_total",
        "sup_worker_tree_rss_bytes",
        "sup_worker_cpu_seconds",
    ] {
        assert!(used.contains(want), "the dashboard shows no {want}: {used:?}");
    }
    // The alert rules: promtool's check, and the same names.
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/sup-alerts.yml")).expect("rules");
    for line in rules.lines().filter(|l| !l.trim_start().starts_with('#')) {
        metric_names(line, &mut used);
    }
    let missing: Vec<_> = used.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(missing.is_empty(), "queries name metrics supd does not export: {missing:?}\n{scrape}");

    let Some(promtool) = promtool() else { return };
    let check = |args: &[&str], file: PathBuf| {
        let out = Command::new(&promtool).args(args).arg(&file).output().expect("run promtool");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "promtool {args:?} {}: {text}", file.display());
        text
    };
    let text = check(&["check", "rules"], repo().join("deploy/prometheus/sup-alerts.yml"));
    assert!(text.contains("SUCCESS: 4 rules found"), "{text}");
    // The scrape config is a whole prometheus.yml: promtool checks it and the rule file it loads.
    let text = check(&["check", "config"], repo().join("deploy/prometheus/scrape.yml"));
    assert!(text.contains("sup-alerts.yml"), "the config loads the alert rules: {text}");
}

#[test]
fn with_two_hosts_per_batch_the_batch_mate_that_took_the_release_is_rolled_back() {
    let Some(playbook) = ansible() else { return };
    let _serial = load_lock();
    let work = tempfile::Builder::new().prefix("sup-ansible").tempdir().expect("temp dir");
    let h1 = Host::start("h1", &good("v2"));
    let h2 = Host::start("h2", BROKEN);
    let h3 = Host::start("h3", &good("v2"));
    let out = deploy(&playbook, &[&h1, &h2, &h3], work.path(), &["-e", "sup_serial=2"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "the play must fail: {text}");
    let results = |h: &Host| h.history().into_iter().map(|e| (e.1, e.2)).collect::<Vec<_>>();
    let s = |a: &str, b: &str| (a.to_string(), b.to_string());
    // h1 and h2 rolled together: h1 took the release, h2 failed, h1 was rolled back.
    assert_eq!(results(&h1), vec![s("start", "ok"), s("reload", "ok"), s("rollback", "ok")], "h1: {text}");
    assert_eq!(results(&h2), vec![s("start", "ok"), s("reload", "rolled_back")], "h2");
    assert_eq!(results(&h3), vec![s("start", "ok")], "h3, in the next batch, was never touched");
    for h in [&h1, &h2, &h3] {
        h.serves(&h.v1);
        assert_eq!(h.link(), h.v1, "{}", h.name);
    }
}
