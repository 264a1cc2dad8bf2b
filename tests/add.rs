//! End-to-end: `supctl add` and `supctl remove` edit the file supd runs from, keep its
//! comments, run (or stop) the app, and leave the file untouched on every error.

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Output, Stdio};

use sup::*;

fn demo() -> String {
    bin("sup-demo").display().to_string()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A file with comments everywhere: around tables, after values, and at the end.
fn commented_config(port: u16) -> String {
    format!(
        "# supervisor.toml of the add/remove test\n[supervisor]\ncontrol_socket = \"run/control.sock\"  # where supctl talks\nrun_dir = \"run\"\nlog_dir = \"logs\"\n\n# the first app, written by hand\n[apps.web]\ncommand = [\"{}\", \"--port\", \"{port}\"]   # the demo server\nready = \"notify\"\nlisten = [\"127.0.0.1:{port}\"]\n\n# end of the hand-written part\n",
        demo()
    )
}

fn start(config: &str) -> Daemon {
    let dir = tempfile::Builder::new().prefix("sup-add").tempdir().expect("temp dir");
    let path = dir.path().join("supervisor.toml");
    std::fs::write(&path, config).expect("write config");
    let socket = dir.path().join("run/control.sock");
    Daemon::start_with(dir, path, socket)
}

fn add_api(d: &Daemon, port: u16) -> Output {
    let p = port.to_string();
    let listen = format!("127.0.0.1:{port}");
    d.supctl(&[
        "add",
        "api",
        "--instances",
        "2",
        "--listen",
        &listen,
        "--ready",
        "notify",
        "--env",
        "GREETING=hello world",
        "--",
        &demo(),
        "--port",
        &p,
    ])
}

#[test]
fn added_app_runs_survives_a_restart_and_remove_restores_the_file() {
    let (web, api) = (free_port(), free_port());
    let original = commented_config(web);
    let d = start(&original);
    d.wait_ready("web", 1);

    let out = add_api(&d, api);
    assert!(out.status.success(), "add failed: {}{}", text(&out.stdout), text(&out.stderr));
    let written = std::fs::read_to_string(&d.config).expect("read config");
    assert!(written.starts_with(&original), "comments or layout changed:\n{written}");
    assert!(written.contains("[apps.api]") && written.contains("GREETING = \"hello world\""), "{written}");
    d.wait_ready("api", 2);
    let (code, body) = http_get(api, "/").expect("api answers");
    assert_eq!(code, 200, "{body}");
    assert_eq!(d.wait_ready("web", 1).len(), 1);

    // The file is the one source of truth: a restarted supd runs the added app.
    let d = d.restart();
    d.wait_ready("api", 2);
    assert_eq!(http_get(api, "/").expect("api answers after a restart").0, 200);

    let out = d.supctl(&["remove", "api"]);
    assert!(out.status.success(), "remove failed: {}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(std::fs::read_to_string(&d.config).expect("read config"), original);
    assert!(d.status().apps.iter().all(|a| a.name != "api"), "api still listed");
    d.wait_ready("web", 1);
    let d = d.restart();
    assert!(d.status().apps.iter().all(|a| a.name != "api"), "api back after a restart");
}

#[test]
fn refused_edits_leave_the_file_byte_identical() {
    let web = free_port();
    let original = commented_config(web);
    let d = start(&original);
    d.wait_ready("web", 1);
    let cases: &[(&[&str], &str)] = &[
        (&["add", "web", "--", "true"], "app `web` already exists"),
        (&["remove", "nope"], "no app named `nope`"),
        (&["add", "x", "--ready", "notfy", "--", "true"], "did you mean `notify`?"),
        (&["add", "x", "--listen", "127.0.0.1:99999", "--", "true"], "apps.x.listen"),
        (&["add", "bad name!", "--", "true"], "apps.\"bad name!\""),
    ];
    for (args, want) in cases {
        let out = d.supctl(args);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded: {}", text(&out.stdout));
        assert!(err.contains(want) && err.contains("the file was not changed"), "{args:?}: want `{want}` in {err}");
        assert_eq!(std::fs::read_to_string(&d.config).expect("read"), original, "{args:?} changed the file");
    }
    assert_eq!(d.status().apps.len(), 1);
    // A file broken by hand is not edited further.
    let broken = original.replace("ready = ", "redy = ");
    std::fs::write(&d.config, &broken).expect("write");
    let out = d.supctl(&["add", "x", "--", "true"]);
    assert!(text(&out.stderr).contains("fix it first"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(&d.config).expect("read"), broken);
}

/// supd running as `nobody` (when the test runs as root), so the file is really not writable.
struct Unprivileged(Child);

impl Drop for Unprivileged {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = wait_until("supd to exit", DEADLINE, || self.0.try_wait().ok().flatten());
    }
}

#[test]
fn a_file_supd_cannot_write_is_left_alone() {
    let web = free_port();
    let original = commented_config(web);
    let dir = tempfile::Builder::new().prefix("sup-add-ro").tempdir().expect("temp dir");
    let config = dir.path().join("supervisor.toml");
    std::fs::write(&config, &original).expect("write");
    let socket = dir.path().join("run/control.sock");
    let supctl = |args: &[&str]| Command::new(bin("supctl")).arg("--socket").arg(&socket).args(args).output();
    let _guard;
    if nix::unistd::geteuid().is_root() {
        // Root writes any file: run supd as nobody, owning its folder but not the file.
        if Command::new("setpriv").arg("--version").output().is_err() {
            return skip("setpriv is needed to run supd as another user");
        }
        nix::unistd::chown(dir.path(), Some(65534.into()), Some(65534.into())).expect("chown");
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let child = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin("supd"))
            .arg("--config")
            .arg(&config)
            .env("HOME", dir.path())
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn supd");
        _guard = Unprivileged(child);
        wait_until("supd (as nobody) to answer", DEADLINE, || {
            std::os::unix::net::UnixStream::connect(&socket).ok().map(|_| ())
        });
    } else {
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o444)).expect("chmod");
        _guard = Unprivileged(
            Command::new(bin("supd")).arg("--config").arg(&config).stderr(Stdio::null()).spawn().expect("supd"),
        );
        wait_until("supd to answer", DEADLINE, || std::os::unix::net::UnixStream::connect(&socket).ok().map(|_| ()));
    }
    wait_until("web ready", DEADLINE, || {
        let out = supctl(&["status", "--json"]).ok()?;
        text(&out.stdout).contains("\"ready\"").then_some(())
    });
    let out = supctl(&["add", "x", "--", "true"]).expect("supctl");
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(err.contains("cannot write") && err.contains("the file was not changed"), "{err}");
    let out = supctl(&["remove", "web"]).expect("supctl");
    assert!(text(&out.stderr).contains("cannot write"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(&config).expect("read"), original);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("ls")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}
