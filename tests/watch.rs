//! End-to-end: `watch` rolls an app when its files change, through the
//! zero-downtime reload engine, once per burst, never for ignored files.

use sup::*;

const STARTED: &str = "watch: watching for changes";
const RELOADING: &str = "watch: reloading after a change";
const DONE: &str = "watch: reload done";

/// supd with app `web` (2 sup-demo workers) whose `cwd` is supd's folder
/// (config, run and log folders included), which holds `src/a.js`,
/// `node_modules/pkg/index.js` and `.git/HEAD`; `watch` is TOML.
fn start(port: u16, watch: &str) -> Daemon {
    start_args(port, watch, "")
}

/// [`start`] with more arguments for sup-demo (TOML strings, each with a leading comma).
fn start_args(port: u16, watch: &str, args: &str) -> Daemon {
    let dir = tempfile::Builder::new().prefix("sup").tempdir().expect("temp dir");
    let app = dir.path();
    for (rel, body) in [("src/a.js", "a"), ("node_modules/pkg/index.js", "x"), (".git/HEAD", "ref")] {
        let p = app.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, body).expect("write");
    }
    let config = dir.path().join("supervisor.toml");
    std::fs::write(
        &config,
        format!(
            "[supervisor]\ncontrol_socket = \"run/control.sock\"\nrun_dir = \"run\"\nlog_dir = \"logs\"\n\n\
             [apps.web]\ncommand = [\"{}\"{args}]\ninstances = 2\nready = \"notify\"\nready_timeout = \"10s\"\n\
             stop_timeout = \"15s\"\nlisten = [\"127.0.0.1:{port}\"]\nwatch = {watch}\n",
            bin("sup-demo").display()
        ),
    )
    .expect("write config");
    let socket = dir.path().join("run/control.sock");
    let d = Daemon::start_with(dir, config, socket);
    d.wait_ready("web", 2);
    if watch != "false" {
        d.wait_log(STARTED, DEADLINE);
    }
    d
}

/// Writes `rel` under the app's folder, creating its folders.
fn edit(d: &Daemon, rel: &str, body: &str) {
    let p = d.path(rel);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(&p, body).expect("write");
}

/// supd's log lines containing `needle`.
fn lines(d: &Daemon, needle: &str) -> Vec<String> {
    d.log().lines().filter(|l| l.contains(needle)).map(str::to_string).collect()
}

/// Waits until `n` watch-triggered reloads have finished; all must have succeeded.
fn wait_done(d: &Daemon, n: usize) {
    wait_until(&format!("{n} watch reload(s) done"), DEADLINE, || {
        assert!(lines(d, "watch: reload failed").is_empty(), "a watch reload failed:\n{}", d.log());
        (lines(d, DONE).len() >= n).then_some(())
    });
}

/// The `file="..."` field of a reload line.
fn file_of(line: &str) -> &str {
    line.split("file=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("")
}

#[test]
fn an_edit_rolls_the_app_once_without_failing_a_request() {
    let _serial = load_lock();
    let port = free_port();
    let d = start(port, "{ debounce = \"300ms\" }");
    let before = d.wait_ready("web", 2);
    let load = Load::start(port, &[Mode::KeepAlive, Mode::NewConnection], 2);
    load.wait_for(200);

    edit(&d, "src/a.js", "a2");
    wait_done(&d, 1);
    let after = d.wait_ready("web", 2);
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(b.pid, a.pid, "slot {} was replaced", b.slot);
        assert_eq!(a.version, b.version + 1, "one new version: {after:?}");
        assert_eq!(a.last_restart_reason, Some(sup_proto::RestartReason::Watch));
    }
    load.wait_for(200);

    // A second edit is the event that proves nothing else was queued after the first.
    edit(&d, "src/b.js", "b");
    wait_done(&d, 2);
    let stats = load.finish();
    assert_eq!(stats.failed, 0, "no request failed during the watch reloads: {:?}", stats.errors);
    assert!(stats.ok > 400, "load flowed: {stats:?}");
    let reloads = lines(&d, RELOADING);
    assert_eq!(reloads.len(), 2, "one reload per edit:\n{}", reloads.join("\n"));
    assert_eq!(file_of(&reloads[0]), "src/a.js", "{}", reloads[0]);
    assert_eq!(file_of(&reloads[1]), "src/b.js", "{}", reloads[1]);
    let third = d.wait_ready("web", 2);
    assert!(third.iter().zip(&after).all(|(t, a)| t.pid != a.pid && t.version == a.version + 1), "{third:?}");

    // The history says who rolled it.
    let out = d.supctl(&["history", "web", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("\"watch\"").count(), 2, "{text}");
}

#[test]
fn a_burst_of_fifty_edits_rolls_once_or_twice() {
    let port = free_port();
    let d = start(port, "{ paths = [\"src\"], debounce = \"500ms\" }");
    for i in 0..50 {
        edit(&d, &format!("src/f{i}.js"), &format!("{i}"));
    }
    wait_done(&d, 1);
    // The sentinel's reload is the event after which the burst's reloads are all logged.
    edit(&d, "src/sentinel.js", "s");
    let reloads = wait_until("the sentinel's reload to finish", DEADLINE, || {
        let reloads = lines(&d, RELOADING);
        let seen = reloads.iter().any(|r| r.contains("sentinel.js"));
        (seen && lines(&d, DONE).len() == reloads.len()).then_some(reloads)
    });
    let n = reloads.len();
    let at = reloads.iter().position(|r| r.contains("sentinel.js")).expect("sentinel reload");
    // The sentinel may have joined the burst's follow-up reload: then that one counts for the burst.
    let burst = at + usize::from(file_of(&reloads[at]) != "src/sentinel.js");
    assert!((1..=2).contains(&burst), "50 edits made {burst} reloads:\n{}", reloads.join("\n"));
    assert!(reloads[0].contains("changes="), "the first reload gathered several changes: {}", reloads[0]);
    assert_eq!(n, at + 1, "nothing after the sentinel:\n{}", reloads.join("\n"));
}

#[test]
fn ignored_files_roll_nothing() {
    let port = free_port();
    let d = start(port, "{ ignore = [\"*.tmp\", \"public/uploads\"], debounce = \"200ms\" }");
    let before = d.wait_ready("web", 2);
    // Default ignores and the user's patterns; the workers write supd's log folder all along.
    for rel in [
        "node_modules/pkg/index.js",
        "node_modules/new/deep/x.js",
        ".git/HEAD",
        ".git/objects/ab/cd",
        "server.log",
        "src/.a.js.swp",
        "src/a.js~",
        "src/__pycache__/m.pyc",
        "x.tmp",
        "public/uploads/cat.png",
    ] {
        edit(&d, rel, "ignored");
    }
    // supd's own config file, in the app's folder here.
    std::fs::write(&d.config, std::fs::read(&d.config).expect("config")).expect("rewrite config");
    // Then one watched file: the event to wait for.
    edit(&d, "src/a.js", "watched");
    wait_done(&d, 1);
    let reloads = lines(&d, RELOADING);
    assert_eq!(reloads.len(), 1, "{}", reloads.join("\n"));
    assert_eq!(file_of(&reloads[0]), "src/a.js", "{}", reloads[0]);
    assert!(!reloads[0].contains("changes="), "no ignored file counted: {}", reloads[0]);
    let after = d.wait_ready("web", 2);
    assert!(before.iter().zip(&after).all(|(b, a)| b.pid != a.pid));
}

#[test]
fn config_apply_turns_watching_on_and_off() {
    let port = free_port();
    let d = start(port, "false");
    assert_eq!(lines(&d, STARTED).len(), 0, "nothing watched with watch = false");
    let text = std::fs::read_to_string(&d.config).expect("config");
    std::fs::write(&d.config, text.replace("watch = false", "watch = { debounce = \"200ms\" }")).expect("write");
    let out = d.supctl(&["config", "apply"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    d.wait_log(STARTED, DEADLINE);
    edit(&d, "src/a.js", "on");
    wait_done(&d, 1);
    assert_eq!(file_of(&lines(&d, RELOADING)[0]), "src/a.js");
    std::fs::write(&d.config, text).expect("write");
    let out = d.supctl(&["config", "apply"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    d.wait_log("watch: off", DEADLINE);
}

#[test]
fn an_edit_during_an_operators_reload_rolls_once_after_it() {
    let port = free_port();
    // Each new worker takes a second to be ready: the operator's reload lasts a few.
    let d = start_args(port, "{ debounce = \"100ms\" }", ", \"--start-delay\", \"1s\"");
    let before = d.wait_ready("web", 2);
    let socket = d.socket.clone();
    let operator = std::thread::spawn(move || {
        std::process::Command::new(bin("supctl")).arg("--socket").arg(socket).args(["reload", "web"]).output()
    });
    wait_until("the operator's reload to start", DEADLINE, || d.status().apps[0].rollout.clone());
    edit(&d, "src/a.js", "during");
    let out = operator.join().expect("thread").expect("supctl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    // Not refused as busy: it waited for the operator's reload, then rolled onto its version.
    wait_done(&d, 1);
    let after = d.wait_ready("web", 2);
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(a.version, b.version + 2, "the operator's version, then the watch's: {after:?}");
        assert_eq!(a.last_restart_reason, Some(sup_proto::RestartReason::Watch));
    }
    let reloads = lines(&d, RELOADING);
    assert_eq!(reloads.len(), 1, "{}", reloads.join("\n"));
    assert_eq!(file_of(&reloads[0]), "src/a.js");
    assert!(lines(&d, DONE)[0].contains("rolled 2/2"), "{}", d.log());
}
