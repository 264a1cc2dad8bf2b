//! Tables and JSON for humans and scripts.

use std::io::Write;

use sup_proto::{RolloutEvent, StatusResponse};

/// Prints JSON; a closed pipe (`| head`) is not an error.
pub fn print_json<T: serde::Serialize>(v: &T) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer_pretty(&mut out, v);
    let _ = writeln!(out);
}

/// Prints the status table.
pub fn print_status(s: &StatusResponse) {
    let mut rows = vec![["APP", "SLOT", "PID", "STATE", "VER", "UPTIME", "RESTARTS", "CPU%", "MEM", "TREE", "REASON"]
        .map(String::from)
        .to_vec()];
    for app in &s.apps {
        for i in &app.instances {
            rows.push(vec![
                app.name.clone(),
                i.slot.to_string(),
                i.pid.map_or("-".into(), |p| p.to_string()),
                i.state.as_str().to_string(),
                i.version.to_string(),
                i.uptime_ms.map_or("-".into(), uptime),
                match i.last_restart_reason {
                    Some(r) if i.restarts > 0 => format!(
                        "{} ({})",
                        i.restarts,
                        serde_json::to_value(r).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
                    ),
                    _ => i.restarts.to_string(),
                },
                i.cpu_percent.map_or("-".into(), |c| format!("{c:.1}")),
                i.rss_bytes.map_or("-".into(), bytes),
                i.tree_rss_bytes.map_or("-".into(), bytes),
                i.status_text.clone().unwrap_or_else(|| i.reason.clone()),
            ]);
        }
        if app.instances.is_empty() {
            rows.push(vec![app.name.clone(), "-".into(), "-".into(), "no instances".into()]);
        }
    }
    // Where each version's code is: the release it was pinned to.
    let mut releases = Vec::new();
    for app in &s.apps {
        for i in &app.instances {
            if let Some(r) = &i.release {
                let line = format!("{} v{}: {r}", app.name, i.version);
                if !releases.contains(&line) {
                    releases.push(line);
                }
            }
        }
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r.get(c).map_or(0, |s| s.chars().count())).max().unwrap_or(0))
        .collect();
    let mut out = std::io::stdout().lock();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| if c + 1 == row.len() { cell.clone() } else { format!("{cell:<w$}", w = widths[c]) })
            .collect();
        if writeln!(out, "{}", line.join("  ").trim_end()).is_err() {
            return;
        }
    }
    if !releases.is_empty() {
        let _ = writeln!(out, "\nreleases:");
        for r in releases {
            let _ = writeln!(out, "  {r}");
        }
    }
}

/// Prints one lifecycle event: `AT APP[SLOT] KIND: message`, or its JSON.
pub fn print_event_line(e: &sup_proto::LifecycleEvent, json: bool) {
    let mut out = std::io::stdout().lock();
    let _ = if json {
        writeln!(out, "{}", serde_json::to_string(e).unwrap_or_default())
    } else {
        let who = match e.slot {
            Some(s) => format!("{}[{s}]", e.app),
            None => e.app.clone(),
        };
        writeln!(out, "{} {who} {}: {}", e.at, e.kind, e.message)
    };
    let _ = out.flush();
}

/// Prints an app's version history, oldest first.
pub fn print_history(h: &sup_proto::HistoryResponse) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:<8} {:<24} {:<9} {:<12} {:>9} {:<6} RELEASE",
        "VERSION", "AT", "TRIGGER", "RESULT", "TOOK", "UID"
    );
    for e in &h.history {
        let took = uptime(e.duration_ms).to_string();
        let uid = e.uid.map_or("-".into(), |u| u.to_string());
        let release = e.release.as_deref().unwrap_or("-");
        if writeln!(
            out,
            "{:<8} {:<24} {:<9} {:<12} {:>9} {:<6} {release}",
            e.version, e.at, e.trigger, e.result, took, uid
        )
        .is_err()
        {
            return;
        }
        if e.result != "ok" && !e.message.is_empty() {
            let first = e.message.lines().next().unwrap_or("");
            let _ = writeln!(out, "         {first}");
        }
    }
    if h.history.is_empty() {
        let _ = writeln!(out, "no versions recorded for `{}` yet", h.app);
    }
}

/// `812K`, `41.2M`, `1.5G`.
pub fn bytes(b: u64) -> String {
    let b = b as f64;
    if b < 1024.0 * 1024.0 {
        format!("{:.0}K", b / 1024.0)
    } else if b < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1}M", b / 1024.0 / 1024.0)
    } else {
        format!("{:.2}G", b / 1024.0 / 1024.0 / 1024.0)
    }
}

/// `3d4h`, `2h5m`, `4m12s`, `12s`.
pub fn uptime(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m, sec) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{sec}s")
    } else {
        format!("{sec}s")
    }
}

/// Prints one captured line; a closed pipe (`| head`) ends the program quietly.
pub fn print_log_line(l: &sup_proto::LogLine, json: bool) {
    let mut out = std::io::stdout().lock();
    let ok = if json {
        serde_json::to_writer(&mut out, l).is_ok() && writeln!(out).is_ok()
    } else {
        writeln!(out, "{} {}#{} {}: {}", l.ts, l.app, l.instance, l.stream, l.msg).is_ok()
    };
    if !ok || out.flush().is_err() {
        std::process::exit(0);
    }
}

/// Prints `describe` as aligned `key: value` lines, then the slots.
pub fn print_describe(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    if let Some(map) = v.as_object() {
        for (k, val) in map {
            if k == "status" {
                continue;
            }
            let shown = match val {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => "-".into(),
                other => other.to_string(),
            };
            let _ = writeln!(out, "{k:<22} {shown}");
        }
    }
    drop(out);
    if let Ok(app) = serde_json::from_value::<sup_proto::AppStatus>(v["status"].clone()) {
        println!();
        print_status(&StatusResponse { apps: vec![app] });
    }
}

/// Prints one rollout event as a line for humans.
pub fn print_event(ev: &RolloutEvent) {
    let line = match ev {
        RolloutEvent::Started { app, kind, slots, from_version, to_version } => {
            if from_version == to_version {
                format!("{app}: {kind} of slots {slots:?}")
            } else {
                format!("{app}: {kind} of {} slot(s), version {from_version} -> {to_version}", slots.len())
            }
        }
        RolloutEvent::SlotReplaced { app, slot, old_pid, new_pid, ready_ms, total_ms } => {
            let old = old_pid.map_or("-".to_string(), |p| p.to_string());
            format!("{app}[{slot}]: started pid {new_pid}, ready after {ready_ms} ms, old pid {old} drained ({total_ms} ms)")
        }
        RolloutEvent::SlotAdded { app, slot, pid, ready_ms } => {
            format!("{app}[{slot}]: added, pid {pid} ready after {ready_ms} ms")
        }
        RolloutEvent::SlotRemoved { app, slot } => format!("{app}[{slot}]: drained and removed"),
        RolloutEvent::SlotFailed { app, slot, message } => format!("{app}[{slot}]: FAILED: {message}"),
        RolloutEvent::RollingBack { app, slots } => format!("{app}: rolling back slots {slots:?}"),
        RolloutEvent::SlotRolledBack { app, slot, ok, message } => {
            format!("{app}[{slot}]: {}{message}", if *ok { "" } else { "rollback FAILED: " })
        }
        RolloutEvent::Done { results } => results
            .iter()
            .map(|r| format!("{}: {}: {}", r.app, if r.ok { "ok" } else { "FAILED" }, r.message))
            .collect::<Vec<_>>()
            .join("\n"),
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    #[test]
    fn uptimes_read_well() {
        for (ms, want) in [(0, "0s"), (12_500, "12s"), (252_000, "4m12s"), (7_500_000, "2h5m"), (273_600_000, "3d4h")] {
            assert_eq!(super::uptime(ms), want);
        }
    }
}
