//! Hostile control clients: random bytes, oversized requests, slow clients,
//! more connections than allowed, and users who may not use the socket. Each
//! gets a bounded, clear refusal while an allowed `supctl status` keeps
//! answering.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sup::*;

/// Starts supd with extra `[supervisor]` keys and one demo app.
fn daemon(supervisor: &str) -> Daemon {
    let dir = tempfile::Builder::new().prefix("sup").tempdir().expect("temp dir");
    let config = dir.path().join("supervisor.toml");
    let body = format!(
        "[supervisor]\ncontrol_socket = \"run/control.sock\"\nrun_dir = \"run\"\nlog_dir = \"logs\"\n{supervisor}\n\n\
         [apps.web]\ncommand = [\"{}\"]\nready = \"notify\"\nlisten = [\"127.0.0.1:{}\"]\n",
        bin("sup-demo").display(),
        free_port()
    );
    std::fs::write(&config, body).expect("write config");
    let socket = dir.path().join("run/control.sock");
    let d = Daemon::start_with(dir, config, socket);
    d.wait_ready("web", 1);
    d
}

/// A small deterministic generator: the same garbage every run.
fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Sends `bytes` (without closing the sending side) and reads until supd closes; returns the answer and how long it took.
fn exchange(socket: &Path, bytes: &[u8]) -> (String, Duration) {
    let t0 = Instant::now();
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    (String::from_utf8_lossy(&out).into_owned(), t0.elapsed())
}

fn status_line(answer: &str) -> &str {
    answer.lines().next().unwrap_or("")
}

/// Runs `supctl status` and returns its output and how long it took.
fn timed_status(d: &Daemon) -> (Output, Duration) {
    let t0 = Instant::now();
    let out = d.supctl(&["status", "--json"]);
    (out, t0.elapsed())
}

#[test]
fn garbage_oversized_and_slow_clients_get_bounded_refusals_while_status_answers() {
    let d = daemon("max_control_connections = 96");
    let socket = d.socket.clone();
    let mut clients = Vec::new();

    // Slow clients: 30 that never send a byte, 20 that trickle a header forever.
    for i in 0..50 {
        let socket = socket.clone();
        clients.push(std::thread::spawn(move || -> (String, String, Duration) {
            let t0 = Instant::now();
            let mut s = UnixStream::connect(&socket).expect("connect");
            s.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
            let mut out = Vec::new();
            let trickle = i % 5 < 2;
            if trickle {
                let _ = s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Slow: ");
            }
            let mut buf = [0u8; 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                        if trickle && s.write_all(b"a").is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
                assert!(t0.elapsed() < Duration::from_secs(60), "a slow client was never cut off");
            }
            let kind = if trickle { "trickling" } else { "silent" };
            (kind.to_string(), String::from_utf8_lossy(&out).into_owned(), t0.elapsed())
        }));
    }
    // Random bytes, oversized headers and bodies, each on its own connection.
    let mut requests: Vec<(&str, Vec<u8>)> = (0..20).map(|i| ("garbage", garbage(i + 1, 4096))).collect();
    let mut huge_header = b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    huge_header.extend(std::iter::repeat_n(b'a', 256 * 1024));
    huge_header.extend_from_slice(b"\r\n\r\n");
    requests.push(("huge header", huge_header));
    requests.push((
        "declared huge body",
        b"POST /v1/stop HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n\r\n{\"app\":".to_vec(),
    ));
    let mut chunked = b"POST /v1/stop HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..64 {
        chunked.extend_from_slice(b"8000\r\n");
        chunked.extend(std::iter::repeat_n(b' ', 0x8000));
        chunked.extend_from_slice(b"\r\n");
    }
    requests.push(("chunked huge body", chunked));
    let floods: Vec<_> = requests
        .into_iter()
        .map(|(what, bytes)| {
            let socket = socket.clone();
            std::thread::spawn(move || (what, exchange(&socket, &bytes)))
        })
        .collect();

    // Throughout, an allowed supctl answers promptly.
    let mut slowest = Duration::ZERO;
    for _ in 0..15 {
        let (out, took) = timed_status(&d);
        assert!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
        slowest = slowest.max(took);
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("slowest supctl status among 50 slow clients and 23 hostile requests: {slowest:?}");
    assert!(slowest < Duration::from_secs(4), "status waited {slowest:?}: slow clients held it up");

    for f in floods {
        let (what, (answer, took)) = f.join().expect("flood thread");
        let line = status_line(&answer);
        let refused = match what {
            "garbage" => line.is_empty() || line.starts_with("HTTP/1.1 400") || line.starts_with("HTTP/1.1 50"),
            "huge header" => line.is_empty() || line.starts_with("HTTP/1.1 431") || line.starts_with("HTTP/1.1 400"),
            _ => line.starts_with("HTTP/1.1 413"),
        };
        assert!(refused, "{what}: unexpected answer `{line}`");
        assert!(took < Duration::from_secs(30), "{what}: took {took:?}");
    }
    for c in clients {
        let (kind, answer, took) = c.join().expect("slow client thread");
        // Cut off at the header deadline: an answer 408 or a plain close.
        assert!(
            answer.is_empty() || status_line(&answer).starts_with("HTTP/1.1 408"),
            "{kind}: unexpected `{}`",
            status_line(&answer)
        );
        assert!(took < Duration::from_secs(30), "{kind} client held its connection {took:?}");
    }
    let (out, _) = timed_status(&d);
    assert!(out.status.success());
    assert!(!d.log().contains("panicked"), "{}", d.log());
}

#[test]
fn connections_over_the_limit_are_refused_at_once_with_a_clear_error() {
    let d = daemon("max_control_connections = 8");
    // Eight idle connections take every place.
    let idle: Vec<UnixStream> = (0..8).map(|_| UnixStream::connect(&d.socket).expect("connect")).collect();
    let (out, took) = wait_until("the places to be taken", DEADLINE, || {
        let (out, took) = timed_status(&d);
        (!out.status.success()).then_some((out, took))
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("too many control connections (8 open, max_control_connections)"), "{err}");
    assert!(err.contains("retry shortly"), "{err}");
    assert!(took < Duration::from_secs(5), "refused at once, not after {took:?}");
    // The idle connections are cut at the header deadline, and supctl works again.
    wait_until("status to answer again", DEADLINE, || timed_status(&d).0.status.success().then_some(()));
    drop(idle);
}

/// Copies supctl where an unprivileged user can run it.
fn supctl_for_others(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("supctl");
    std::fs::copy(bin("supctl"), &path).expect("copy supctl");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn as_nobody(supctl: &Path, socket: &Path, args: &[&str]) -> Output {
    Command::new(supctl)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .output()
        .expect("run supctl as nobody")
}

#[test]
fn users_who_may_not_use_the_socket_are_refused_clearly() {
    // The default mode (0660): the kernel refuses the connection.
    let d = daemon("");
    for p in [d.dir.path(), &d.dir.path().join("run")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let supctl = supctl_for_others(d.dir.path());
    let out = as_nobody(&supctl, &d.socket, &["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(err.contains("this user may not open the control socket"), "{err}");

    // A world-writable socket: supd itself refuses by the peer's credentials.
    let d = daemon("control_socket_mode = \"0666\"");
    for p in [d.dir.path(), &d.dir.path().join("run")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let supctl = supctl_for_others(d.dir.path());
    let out = as_nobody(&supctl, &d.socket, &["stop", "web"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("uid 65534 may not use this control socket"), "{err}");
    assert!(err.contains("control_socket_group"), "the hint says how to get access: {err}");
    // Many strangers at once: each is answered 403 or closed, root is still served, nothing stopped.
    let strangers: Vec<_> = (0..40)
        .map(|_| {
            let (supctl, socket) = (supctl.clone(), d.socket.clone());
            std::thread::spawn(move || as_nobody(&supctl, &socket, &["status"]))
        })
        .collect();
    let (out, _) = timed_status(&d);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for s in strangers {
        let out = s.join().expect("stranger");
        assert_ne!(out.status.code(), Some(0), "a stranger got an answer");
    }
    let ready = d.instances("web");
    assert!(ready.iter().all(|i| i.state == WorkerState::Ready), "{ready:?}");
}

#[test]
fn members_of_the_socket_group_through_a_supplementary_group_are_served() {
    // `staff` (gid 50) owns the socket; nobody's own group is nogroup, so only
    // its supplementary groups, as the kernel recorded them at connect (SO_PEERGROUPS), let it in.
    let d = daemon("control_socket_group = \"staff\"\ncontrol_socket_mode = \"0666\"");
    for p in [d.dir.path(), &d.dir.path().join("run")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let supctl = supctl_for_others(d.dir.path());
    let as_nobody_in = |groups: &'static [libc::gid_t]| {
        let mut cmd = Command::new(&supctl);
        cmd.arg("--socket").arg(&d.socket).arg("status").stdin(Stdio::null());
        // Here, not with Command::uid: std drops the supplementary groups when it switches users.
        // SAFETY: setgroups, setgid and setuid are async-signal-safe, and `groups` outlives the call.
        unsafe {
            cmd.pre_exec(move || {
                let ok = libc::setgroups(groups.len(), groups.as_ptr()) == 0
                    && libc::setgid(65534) == 0
                    && libc::setuid(65534) == 0;
                if ok {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            })
        };
        cmd.output().expect("run supctl as nobody")
    };
    let out = as_nobody_in(&[50]);
    assert!(out.status.success(), "a member is served: {}", String::from_utf8_lossy(&out.stderr));
    let out = as_nobody_in(&[100]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("uid 65534 may not use this control socket"), "{err}");
}

#[test]
fn scaling_past_max_workers_is_a_clear_error_that_changes_nothing() {
    let d = daemon("max_workers = 3");
    let before = d.instances("web");
    let out = d.supctl(&["scale", "web", "5"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("scaling `web` to 5 would run 5 workers in all, more than max_workers = 3"), "{err}");
    assert_eq!(
        d.instances("web").iter().map(|i| i.pid).collect::<Vec<_>>(),
        before.iter().map(|i| i.pid).collect::<Vec<_>>()
    );
    let out = d.supctl(&["scale", "web", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    d.wait_ready("web", 3);
}
