//! End-to-end: output capture, stamping, rotation, bounded memory, follow,
//! and a full disk.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::Duration;

use sup::*;

fn demo() -> String {
    bin("sup-demo").display().to_string()
}

fn app(args: &str, extra: &str) -> String {
    format!(
        "[apps.web]\ncommand = [\"{}\"{args}]\ninstances = 1\nlisten = [\"127.0.0.1:{}\"]\nready = \"notify\"\n{extra}\n",
        demo(),
        free_port()
    )
}

/// Every `line N pid=P` in the app's out files (rotated ones included), by pid.
fn seqs(dir: &Path) -> HashMap<u32, Vec<u64>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("log dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("web.out.log")))
        .collect();
    // Rotated files carry a sortable time suffix; the current file is newest.
    files.sort_by_key(|p| {
        let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        (n == "web.out.log", n)
    });
    let mut out: HashMap<u32, Vec<u64>> = HashMap::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for l in text.lines() {
            let Some(rest) = l.split(" line ").nth(1).or_else(|| l.split(" flood ").nth(1)) else { continue };
            let mut it = rest.split_whitespace();
            let seq: Option<u64> = it.next().and_then(|s| s.parse().ok());
            // Flood lines carry no pid: they count under 0.
            let pid: u32 = l
                .split("pid=")
                .nth(1)
                .and_then(|p| p.split_whitespace().next())
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            if let Some(s) = seq {
                out.entry(pid).or_default().push(s);
            }
        }
    }
    out
}

#[test]
fn lines_of_two_instances_are_stamped_and_in_order() {
    let d = Daemon::start(
        &app(", \"--log-rate\", \"400\", \"--log-count\", \"200\"", "").replace("instances = 1", "instances = 2"),
    );
    let pids: Vec<u32> = d.wait_ready("web", 2).iter().filter_map(|i| i.pid).collect();
    let logs = d.path("logs");
    let got = wait_until("200 lines from each instance", DEADLINE, || {
        let s = seqs(&logs);
        pids.iter().all(|p| s.get(p).is_some_and(|v| v.len() == 200)).then_some(s)
    });
    for p in &pids {
        assert_eq!(got[p], (0..200).collect::<Vec<u64>>(), "in order, none lost, for pid {p}");
    }
    let text = std::fs::read_to_string(logs.join("web.out.log")).expect("file");
    let line = text.lines().find(|l| l.contains(" line ")).expect("a line");
    let (ts, rest) = line.split_once(' ').expect("stamp");
    assert!(humantime::parse_rfc3339(ts).is_ok(), "RFC 3339 stamp: {line}");
    assert!(rest.starts_with("web#0 ") || rest.starts_with("web#1 "), "{line}");
}

#[test]
fn one_endless_line_leaves_supd_memory_bounded() {
    let d = Daemon::start(&app(", \"--endless-line\", \"10M\"", ""));
    d.wait_ready("web", 1);
    let file = d.path("logs/web.out.log");
    wait_until("10 MB written", DEADLINE, || {
        (std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) >= 10 * 1024 * 1024).then_some(())
    });
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).expect("status");
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX);
    assert!(rss_kib < 32 * 1024, "supd RSS {rss_kib} KiB after a 10 MB line");
    let text = std::fs::read_to_string(&file).expect("file");
    let pieces = text.lines().filter(|l| l.contains(" xxxx")).count();
    assert_eq!(pieces, 160, "split at max_line = 64K");
}

#[test]
fn rotation_under_constant_writing_loses_and_duplicates_nothing() {
    let d = Daemon::start(&app(
        ", \"--log-flood\", \"--log-count\", \"60000\"",
        "logs = { rotate_size = \"256K\", keep = 1000 }",
    ));
    d.wait_ready("web", 1);
    let pid = 0;
    let logs = d.path("logs");
    let got = wait_until("all 60000 lines on disk", DEADLINE, || {
        let s = seqs(&logs);
        (s.get(&pid).map_or(0, |v| v.len()) >= 60000).then_some(s)
    });
    assert_eq!(got[&pid], (0..60000).collect::<Vec<u64>>(), "every line once, in order across files");
    let rotated = std::fs::read_dir(&logs)
        .expect("dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("web.out.log."))
        .count();
    assert!(rotated >= 10, "rotated {rotated} times");
}

#[test]
fn keep_bounds_the_rotated_files_and_compression_applies() {
    let d = Daemon::start(&app(
        ", \"--log-flood\", \"--log-count\", \"20000\"",
        "logs = { rotate_size = \"64K\", keep = 3, compress = true }",
    ));
    d.wait_ready("web", 1);
    let logs = d.path("logs");
    let rotated = || -> Vec<String> {
        std::fs::read_dir(&logs)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("web.out.log."))
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_until("writing done and 3 compressed files left", DEADLINE, || {
        let r = rotated();
        (r.len() == 3 && r.iter().all(|n| n.ends_with(".gz"))).then_some(())
    });
}

#[test]
fn logs_follow_shows_lines_written_after_it_started() {
    let d = Daemon::start(&app(", \"--log-rate\", \"20\", \"--log-stderr\"", ""));
    d.wait_ready("web", 1);
    let file = d.path("logs/web.out.log");
    wait_until("some lines", DEADLINE, || {
        (std::fs::read_to_string(&file).unwrap_or_default().matches(" line ").count() >= 3).then_some(())
    });
    let last_before = seqs(&d.path("logs")).values().flatten().copied().max().unwrap_or(0);
    let out = d.supctl(&["logs", "web", "-n", "2", "--err"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.lines().all(|l| l.contains("web#0 err: line ")), "{text}");
    let mut child = std::process::Command::new(bin("supctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["logs", "web", "-f", "-n", "0", "--out", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("supctl logs -f");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let newer = wait_until("a line written after following began", DEADLINE, || {
        let line = rx.recv_timeout(Duration::from_millis(100)).ok()?;
        let v: serde_json::Value = serde_json::from_str(&line).ok()?;
        let seq: u64 = v["msg"].as_str()?.split_whitespace().nth(1)?.parse().ok()?;
        (seq > last_before).then_some(v)
    });
    assert_eq!(newer["stream"], "out");
    assert_eq!(newer["instance"], 0);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_full_disk_keeps_workers_serving_and_logging_resumes() {
    if nix::unistd::geteuid().as_raw() != 0 {
        skip("mounting a small tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).expect("mkdir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=512k", "tmpfs"])
        .arg(&logs)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        skip("cannot mount a tmpfs here");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(logs.clone());
    let port = free_port();
    let config = dir.path().join("supervisor.toml");
    std::fs::write(
        &config,
        format!(
            "[supervisor]\ncontrol_socket = \"run/control.sock\"\nrun_dir = \"run\"\nlog_dir = \"logs\"\n\n[apps.web]\ncommand = [\"{}\", \"--log-rate\", \"2000\"]\nport = {port}\nready = \"notify\"\nlogs = {{ rotate_size = \"off\" }}\n",
            demo()
        ),
    )
    .expect("write");
    let d = Daemon::start_with(dir, config, logs.parent().expect("parent").join("run/control.sock"));
    d.wait_ready("web", 1);
    wait_until("lines being lost", DEADLINE, || (d.status().apps[0].log_lines_lost > 0).then_some(()));
    d.wait_log("dropping output until it works again", DEADLINE);
    assert_eq!(http_get(port, "/health").expect("still serving").0, 200);
    // Free the space: logging resumes by itself.
    std::fs::File::options().write(true).open(logs.join("web.out.log")).and_then(|f| f.set_len(0)).expect("truncate");
    d.wait_log("writing", DEADLINE);
    wait_until("new lines on disk", DEADLINE, || {
        (std::fs::read_to_string(logs.join("web.out.log")).unwrap_or_default().matches(" line ").count() > 10)
            .then_some(())
    });
    let (_, lost) = (0, d.status().apps[0].log_lines_lost);
    assert!(lost > 0);
    drop(d);
}

/// An app called `name` printing `line N pid=P` 50 times a second into one combined file.
fn chatty(name: &str) -> String {
    format!(
        "[apps.\"{name}\"]\ncommand = [\"{}\", \"--log-rate\", \"50\"]\nlisten = [\"127.0.0.1:{}\"]\nready = \"notify\"\nlogs = {{ combined = true }}\n\n",
        demo(),
        free_port()
    )
}

#[test]
fn flushing_an_app_leaves_the_files_of_an_app_named_like_them_alone() {
    // `web` writes web.log; `web.log` writes web.log.log, which a prefix match took for a rotated web.log.
    let d = Daemon::start(&format!("{}{}", chatty("web"), chatty("web.log")));
    d.wait_ready("web", 1);
    d.wait_ready("web.log", 1);
    let (ours, theirs) = (d.path("logs/web.log"), d.path("logs/web.log.log"));
    // A rotated file of each, as rotation names them.
    let (our_old, their_old) =
        (d.path("logs/web.log.2026-11-23T120000.123Z"), d.path("logs/web.log.log.2026-11-23T120000.123Z.gz"));
    std::fs::write(&our_old, "old web\n").expect("write");
    std::fs::write(&their_old, "old web.log\n").expect("write");
    let first_line =
        |p: &Path| std::fs::read_to_string(p).ok()?.lines().find(|l| l.contains(" line ")).map(str::to_string);
    let (our_first, their_first) =
        wait_until("lines from both apps", DEADLINE, || Some((first_line(&ours)?, first_line(&theirs)?)));
    let out = d.supctl(&["flush", "web"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&theirs).expect("web.log's live file is still there");
    assert!(text.contains(&their_first), "web.log's lines survive a flush of web:\n{text}");
    assert_eq!(std::fs::read_to_string(&their_old).expect("web.log's rotated file is still there"), "old web.log\n");
    assert!(!our_old.exists(), "web's rotated file is removed");
    assert!(!std::fs::read_to_string(&ours).unwrap_or_default().contains(&our_first), "web's file is emptied");
    // And the other way round.
    let out = d.supctl(&["flush", "web.log"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!their_old.exists(), "web.log's rotated file is removed");
    wait_until("web to write again", DEADLINE, || first_line(&ours));
    assert!(ours.exists() && theirs.exists());
}

/// Connects to supd's control socket and asks to follow `app`; returns the
/// connection and the head of the answer (status line and headers).
fn follow_raw(d: &Daemon, app: &str) -> (std::os::unix::net::UnixStream, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).expect("connect control socket");
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    write!(s, "GET /v1/logs?app={app}&lines=0&follow=1 HTTP/1.1\r\nHost: supd\r\n\r\n").expect("send request");
    // Byte by byte up to the blank line: the body stays unread in the socket.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

/// A process's resident memory in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(u64::MAX)
}

/// Bytes `pid` has written so far, from /proc.
fn written(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("wchar:")).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

#[test]
fn a_follower_that_never_reads_leaves_supd_memory_bounded() {
    let _load = load_lock();
    let d = Daemon::start(&app(
        ", \"--log-flood\", \"--log-flood-rate\", \"20M\"",
        "logs = { rotate_size = \"16M\", keep = 1 }",
    ));
    let worker = d.wait_ready("web", 1)[0].pid.expect("worker pid");
    let (follower, head) = follow_raw(&d, "web");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The flood runs for 25 s while the follower never reads a byte of its answer.
    let (start, before) = (std::time::Instant::now(), written(worker));
    let mut peak = 0;
    while start.elapsed() < Duration::from_secs(25) {
        peak = peak.max(rss_kib(d.pid()));
        std::thread::sleep(Duration::from_millis(100));
    }
    let flooded = written(worker) - before;
    eprintln!("supd peak RSS {peak} KiB while the worker wrote {} MiB in 25 s", flooded >> 20);
    assert!(flooded > 100 << 20, "the flood ran: {flooded} bytes");
    assert!(peak < 64 * 1024, "supd RSS {peak} KiB with a follower that never reads");
    assert!(d.supctl(&["status"]).status.success(), "supd still answers");
    // The follower was lagged, not cut: reading again, it learns how many lines it missed.
    follower.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
    let mut window = Vec::new();
    wait_until("a note of skipped lines", DEADLINE, || {
        let mut buf = vec![0u8; 64 * 1024];
        match std::io::Read::read(&mut &follower, &mut buf) {
            Ok(0) => panic!("the answer ended"),
            Ok(n) => window.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        let found = String::from_utf8_lossy(&window).contains("lines skipped: this follower fell behind");
        // A note may straddle two reads: keep a little of the last one.
        let keep = window.len().saturating_sub(256);
        window.drain(..keep);
        found.then_some(())
    });
}

#[test]
fn followers_over_the_limit_are_answered_503() {
    let d = Daemon::start(&app(", \"--log-rate\", \"20\"", ""));
    d.wait_ready("web", 1);
    let mut followers: Vec<_> = (0..32)
        .map(|i| {
            let (s, head) = follow_raw(&d, "web");
            assert!(head.starts_with("HTTP/1.1 200"), "follower {i}: {head}");
            s
        })
        .collect();
    let out = raw_control(&d.socket, b"GET /v1/logs?app=web&follow=1 HTTP/1.1\r\nHost: supd\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(out.contains(r#""code":"too_many_followers""#), "{out}");
    assert!(out.contains("too many log followers (32 open)"), "{out}");
    let out = d.supctl(&["logs", "web", "-f"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("too many log followers (32 open)") && err.contains("stop one"), "{err}");
    // Followers take no place from other requests.
    let out = d.supctl(&["logs", "web", "-n", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A follower that hangs up gives its place back.
    drop(followers.pop());
    wait_until("a place for a new follower", DEADLINE, || {
        let (s, head) = follow_raw(&d, "web");
        head.starts_with("HTTP/1.1 200").then_some(s)
    });
}
