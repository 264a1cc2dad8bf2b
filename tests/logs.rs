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
        eprintln!("skipped: mounting a small tmpfs needs root");
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
        eprintln!("skipped: cannot mount a tmpfs here");
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
