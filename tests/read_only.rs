//! End-to-end: `control_socket_read_group`, a read-only role on the control
//! socket, with real users and groups created for the test (root only):
//! members read, never act; strangers are refused; every act is logged with
//! who asked.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sup::*;

/// Users and groups made for one test run, removed again when dropped.
struct Accounts {
    users: Vec<String>,
    groups: Vec<String>,
}

impl Accounts {
    fn group(&mut self, name: &str) -> Option<u32> {
        let ok = Command::new("groupadd").arg(name).status().ok()?.success();
        if !ok {
            return None;
        }
        self.groups.push(name.to_string());
        id_of("getent", &["group", name], 2)
    }

    /// A user with a primary group of its own and the supplementary `groups`; returns (uid, gid).
    fn user(&mut self, name: &str, groups: &[&str]) -> Option<(u32, u32)> {
        let mut cmd = Command::new("useradd");
        cmd.args(["--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin"]);
        if !groups.is_empty() {
            cmd.arg("--groups").arg(groups.join(","));
        }
        if !cmd.arg(name).status().ok()?.success() {
            return None;
        }
        self.users.push(name.to_string());
        self.groups.push(name.to_string());
        Some((id_of("id", &["-u", name], 0)?, id_of("id", &["-g", name], 0)?))
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for u in &self.users {
            let _ = Command::new("userdel").arg(u).stderr(Stdio::null()).status();
        }
        for g in &self.groups {
            let _ = Command::new("groupdel").arg(g).stderr(Stdio::null()).status();
        }
    }
}

/// A number from a command's output: field `field` of `:`-separated output, or the whole of it.
fn id_of(program: &str, args: &[&str], field: usize) -> Option<u32> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    text.split(':').nth(field).unwrap_or(&text).trim().parse().ok()
}

/// Runs supctl as `uid` with primary group `gid` and exactly the supplementary `groups`.
fn supctl_as(supctl: &Path, socket: &Path, (uid, gid): (u32, u32), groups: &[u32], args: &[&str]) -> Output {
    let groups = groups.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}")).arg(format!("--regid={gid}"));
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        cmd.arg(format!("--groups={groups}"));
    }
    cmd.arg(supctl).arg("--socket").arg(socket).args(args).stdin(Stdio::null()).output().expect("run setpriv")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn readers_read_actors_act_strangers_are_refused_and_acts_are_logged() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("needs root to create users and groups");
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        return skip("setpriv (util-linux) is not installed");
    }
    // Names unique to this run, short enough for useradd (at most 32 characters).
    let tag = format!("{}", std::process::id() % 100_000);
    let mut acc = Accounts { users: Vec::new(), groups: Vec::new() };
    let (Some(read_gid), Some(act_gid)) = (acc.group(&format!("supr{tag}")), acc.group(&format!("supw{tag}"))) else {
        return skip("groupadd failed: cannot create test groups");
    };
    let reader = acc.user(&format!("supreader{tag}"), &[&format!("supr{tag}")]);
    let actor = acc.user(&format!("supactor{tag}"), &[&format!("supw{tag}")]);
    let stranger = acc.user(&format!("supstranger{tag}"), &[]);
    let (Some(reader), Some(actor), Some(stranger)) = (reader, actor, stranger) else {
        return skip("useradd failed: cannot create test users");
    };

    let port = free_port();
    let dir = tempfile::Builder::new().prefix("sup").tempdir().expect("temp dir");
    let config = dir.path().join("supervisor.toml");
    std::fs::write(
        &config,
        format!(
            "[supervisor]\ncontrol_socket = \"run/control.sock\"\nrun_dir = \"run\"\nlog_dir = \"logs\"\n\
             control_socket_group = \"supw{tag}\"\ncontrol_socket_read_group = \"supr{tag}\"\ncontrol_socket_mode = \"0666\"\n\n\
             [apps.web]\ncommand = [\"{}\", \"--port\", \"{port}\"]\nready = \"notify\"\nlisten = [\"127.0.0.1:{port}\"]\n",
            bin("sup-demo").display()
        ),
    )
    .expect("write config");
    let socket = dir.path().join("run/control.sock");
    let d = Daemon::start_with(dir, config, socket.clone());
    let pid = d.wait_ready("web", 1)[0].pid.expect("pid");
    // The test users must reach the socket and a supctl they may run.
    for p in [d.dir.path(), &d.dir.path().join("run")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let supctl: PathBuf = d.dir.path().join("supctl");
    std::fs::copy(bin("supctl"), &supctl).expect("copy supctl");
    std::fs::set_permissions(&supctl, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    // A reader, a member only through a supplementary group: every read works.
    for args in [
        &["status"][..],
        &["status", "web", "--json"],
        &["logs", "web", "--lines", "5"],
        &["describe", "web"],
        &["history", "web"],
        &["events"],
        &["top", "--once"],
    ] {
        let out = supctl_as(&supctl, &socket, reader, &[read_gid], args);
        assert!(out.status.success(), "reader: supctl {args:?}: {}", text(&out));
    }
    // ... and no act.
    for args in [
        &["stop", "web"][..],
        &["start", "web"],
        &["restart", "web"],
        &["reload", "web"],
        &["scale", "web", "2"],
        &["signal", "web", "HUP"],
        &["flush", "web"],
        &["logs", "reopen"],
        &["config", "apply"],
        &["rollback", "web"],
        &["promote", "web"],
    ] {
        let out = supctl_as(&supctl, &socket, reader, &[read_gid], args);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "reader: supctl {args:?} must be refused: {t}");
        assert!(t.contains(&format!("uid {} may only read", reader.0)), "supctl {args:?}: {t}");
        assert!(t.contains("control_socket_group"), "the hint says who may act: {t}");
    }
    let refused = d.log().lines().filter(|l| l.contains("refused") && l.contains(&format!("uid={}", reader.0))).count();
    assert!(refused >= 10, "refused acts are logged with the reader's uid:\n{}", d.log());
    // Nothing was touched.
    let i = d.instances("web");
    assert_eq!((i.len(), i[0].pid, i[0].state, i[0].restarts), (1, Some(pid), WorkerState::Ready, 0), "{i:?}");

    // A stranger gets a clear 403, for reads too.
    for args in [&["status"][..], &["stop", "web"]] {
        let out = supctl_as(&supctl, &socket, stranger, &[], args);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "stranger: supctl {args:?}: {t}");
        assert!(t.contains(&format!("uid {} may not use this control socket", stranger.0)), "{t}");
    }
    // Membership through the primary group counts too: still only reads.
    let out = supctl_as(&supctl, &socket, (stranger.0, read_gid), &[], &["stop", "web"]);
    assert!(text(&out).contains("may only read"), "{}", text(&out));

    // An actor acts, and the act is logged with its uid, pid and command line.
    let out = supctl_as(&supctl, &socket, actor, &[act_gid], &["flush", "web"]);
    assert!(out.status.success(), "actor: {}", text(&out));
    let out = supctl_as(&supctl, &socket, actor, &[act_gid], &["restart", "web"]);
    assert!(out.status.success(), "actor: {}", text(&out));
    let i = d.wait_ready("web", 1);
    assert_ne!(i[0].pid, Some(pid), "the actor's restart ran");
    let acts: Vec<String> = d
        .log()
        .lines()
        .filter(|l| l.contains("control: POST") && l.contains(&format!("uid={}", actor.0)))
        .map(str::to_string)
        .collect();
    assert_eq!(acts.len(), 2, "{acts:#?}\n{}", d.log());
    assert!(acts[0].contains("/v1/logs/flush") && acts[1].contains("/v1/restart"), "{acts:#?}");
    for a in &acts {
        assert!(a.contains(" pid="), "{a}");
        assert!(a.contains(&format!("{} --socket", supctl.display())), "the command line: {a}");
    }
    assert!(acts[0].contains("flush web") && acts[1].contains("restart web"), "{acts:#?}");
    // Reads are not logged as acts.
    assert!(!d.log().contains("GET /v1/status"), "{}", d.log());
}
