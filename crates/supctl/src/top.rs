//! `supctl top`: a live, refreshing view of every worker.

use std::io::Write;
use std::time::Duration;

use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyModifiers};
use crossterm::{cursor, execute, terminal};
use sup_proto::StatusResponse;

use crate::client::{Client, ClientError};
use crate::output::{bytes, uptime};

pub use sup_cli::supctl::SortBy;

/// Renders one frame of the view as text lines.
pub fn frame(s: &StatusResponse, sort: SortBy, width: usize) -> Vec<String> {
    let mut rows = Vec::new();
    let (mut workers, mut ready, mut cpu, mut mem) = (0, 0, 0.0, 0u64);
    for app in &s.apps {
        for i in &app.instances {
            workers += 1;
            ready += usize::from(i.state == sup_proto::WorkerState::Ready);
            cpu += i.cpu_percent.unwrap_or(0.0);
            mem += i.tree_rss_bytes.unwrap_or(0);
            rows.push((app.name.clone(), i.clone()));
        }
    }
    match sort {
        SortBy::Cpu => rows.sort_by(|a, b| b.1.cpu_percent.unwrap_or(0.0).total_cmp(&a.1.cpu_percent.unwrap_or(0.0))),
        SortBy::Mem => rows.sort_by_key(|r| std::cmp::Reverse(r.1.tree_rss_bytes.unwrap_or(0))),
        SortBy::Name => rows.sort_by(|a, b| (&a.0, a.1.slot).cmp(&(&b.0, b.1.slot))),
    }
    let mut out = vec![
        format!(
            "supctl top: {}, {ready}/{workers} {} ready, CPU {cpu:.1}%, memory {}   sorted by {}   (c cpu, m mem, n name, q quit)",
            sup_proto::count(s.apps.len(), "app"),
            if workers == 1 { "worker" } else { "workers" },
            bytes(mem),
            match sort {
                SortBy::Cpu => "cpu",
                SortBy::Mem => "mem",
                SortBy::Name => "name",
            }
        ),
        String::new(),
        format!(
            "{:<16} {:>4} {:>8} {:<9} {:>6} {:>9} {:>9} {:>8} {:>8}",
            "APP", "SLOT", "PID", "STATE", "CPU%", "MEM", "TREE", "RESTARTS", "UPTIME"
        ),
    ];
    for app in &s.apps {
        let cpu: f64 = app.instances.iter().filter_map(|i| i.cpu_percent).sum();
        let mem: u64 = app.instances.iter().filter_map(|i| i.tree_rss_bytes).sum();
        let restarts: u32 = app.instances.iter().map(|i| i.restarts).sum();
        out.push(format!(
            "{:<16} {:>4} {:>8} {:<9} {:>6.1} {:>9} {:>9} {:>8} {:>8}",
            truncate(&app.name, 16),
            "all",
            "",
            format!("{}x", app.instances.len()),
            cpu,
            "",
            bytes(mem),
            restarts,
            ""
        ));
    }
    out.push(String::new());
    for (name, i) in rows {
        out.push(format!(
            "{:<16} {:>4} {:>8} {:<9} {:>6} {:>9} {:>9} {:>8} {:>8}",
            truncate(&name, 16),
            i.slot,
            i.pid.map_or("-".into(), |p| p.to_string()),
            i.state.as_str(),
            i.cpu_percent.map_or("-".into(), |c| format!("{c:.1}")),
            i.rss_bytes.map_or("-".into(), bytes),
            i.tree_rss_bytes.map_or("-".into(), bytes),
            i.restarts,
            i.uptime_ms.map_or("-".into(), uptime),
        ));
    }
    out.into_iter().map(|l| truncate(&l, width)).collect()
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// Puts the terminal back however `top` ends (return, error or panic).
struct Screen;

impl Screen {
    fn enter() -> std::io::Result<Screen> {
        terminal::enable_raw_mode()?;
        let guard = Screen;
        execute!(std::io::stdout(), terminal::EnterAlternateScreen, cursor::Hide)?;
        Ok(guard)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(std::io::stdout(), cursor::Show, terminal::LeaveAlternateScreen);
        let _ = terminal::disable_raw_mode();
    }
}

/// Runs the live view until `q` or Ctrl-C; with `once`, prints one frame.
pub fn run(client: &Client, mut sort: SortBy, once: bool, interval: Duration) -> Result<(), ClientError> {
    if once {
        let s: StatusResponse = client.get("/v1/status")?;
        let mut out = std::io::stdout().lock();
        for line in frame(&s, sort, usize::MAX) {
            if writeln!(out, "{line}").is_err() {
                break;
            }
        }
        return Ok(());
    }
    let io = |e: std::io::Error| ClientError::Protocol(format!("terminal: {e}"));
    let _screen = Screen::enter().map_err(io)?;
    loop {
        let s: StatusResponse = client.get("/v1/status")?;
        let (w, h) = terminal::size().unwrap_or((120, 40));
        let mut out = std::io::stdout().lock();
        execute!(out, cursor::MoveTo(0, 0), terminal::Clear(terminal::ClearType::All)).map_err(io)?;
        for (n, line) in frame(&s, sort, w as usize).into_iter().take(h as usize).enumerate() {
            execute!(out, cursor::MoveTo(0, n as u16)).map_err(io)?;
            write!(out, "{line}").map_err(io)?;
        }
        out.flush().map_err(io)?;
        drop(out);
        let deadline = std::time::Instant::now() + interval;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            if !event::poll(left).map_err(io)? {
                break;
            }
            if let Event::Key(KeyEvent { code, modifiers, .. }) = event::read().map_err(io)? {
                match code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('c') if modifiers.contains(KeyModifiers::CONTROL) => return Ok(()),
                    KeyCode::Char('c') => sort = SortBy::Cpu,
                    KeyCode::Char('m') => sort = SortBy::Mem,
                    KeyCode::Char('n') => sort = SortBy::Name,
                    _ => continue,
                }
                break;
            }
        }
    }
}
