//! `reload --json` and `rollback --json`: one JSON object at the end instead of
//! one line per event, so that scripts (the Ansible playbook in
//! `deploy/ansible/`) read the outcome without parsing prose. It is built
//! from the rollout's own event stream, and its `result` from the history
//! entry the rollout wrote, the same word `supctl history` shows.

use serde::Serialize;
use sup_proto::{exit, HistoryResponse, RolloutEvent};

use crate::client::Client;

/// The outcome of a reload or rollback of one app.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Outcome {
    /// The app.
    pub app: String,
    /// `ok`, `rolled_back`, `failed`, `cancelled`, `canary` (paused), or `error` (refused before any slot was touched).
    pub result: String,
    /// Whether supctl exits 0 for it.
    pub ok: bool,
    /// The version that ran before.
    pub version_before: Option<u64>,
    /// The version every slot runs now; null when slots run different versions (a canary, a failed rollback).
    pub version_after: Option<u64>,
    /// The version this rollout made, whatever became of it.
    pub version_attempted: Option<u64>,
    /// The release `version_after` is pinned to.
    pub release_after: Option<String>,
    /// The slot whose new worker failed.
    pub failed_slot: Option<u32>,
    /// Why it failed: the slot's message with the worker's last output, or supd's answer.
    pub reason: Option<String>,
    /// supd's one-line summary.
    pub message: String,
}

/// Runs the rollout at `path`, prints one JSON object (or `{"results": [...]}`
/// for `--all`), and returns the exit status `supctl reload` would have.
pub fn run<B: Serialize>(client: &Client, path: &str, body: &B, app: Option<&str>) -> i32 {
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut done = false;
    let streamed = client.stream(path, body, |ev: RolloutEvent| {
        observe(&mut outcomes, app, &ev);
        done |= matches!(ev, RolloutEvent::Done { .. });
    });
    let code = match streamed {
        Err(e) => {
            eprintln!("supctl: {e}");
            let out = entry(&mut outcomes, app.unwrap_or(""));
            out.result = "error".into();
            out.ok = false;
            out.reason = Some(e.to_string());
            out.message = e.to_string();
            e.exit_code()
        }
        Ok(()) if !done => {
            let out = entry(&mut outcomes, app.unwrap_or(""));
            out.result = "error".into();
            out.reason = Some("supd closed the stream before the rollout ended".into());
            exit::FAILED
        }
        Ok(()) => {
            for out in &mut outcomes {
                settle(client, out);
            }
            if outcomes.iter().all(|o| o.ok) {
                exit::OK
            } else {
                exit::FAILED
            }
        }
    };
    let text = match (app, outcomes.as_slice()) {
        (Some(_), [one]) => serde_json::to_string(one),
        _ => serde_json::to_string(&serde_json::json!({ "results": outcomes })),
    };
    println!("{}", text.unwrap_or_default());
    code
}

/// The outcome of `app`, created on first sight.
fn entry<'a>(outcomes: &'a mut Vec<Outcome>, app: &str) -> &'a mut Outcome {
    let i = match outcomes.iter().position(|o| o.app == app) {
        Some(i) => i,
        None => {
            outcomes.push(Outcome { app: app.to_string(), ..Outcome::default() });
            outcomes.len() - 1
        }
    };
    &mut outcomes[i]
}

/// Folds one event into the outcomes. A `Done` result without an app (an
/// error of the whole operation) belongs to the app asked for.
fn observe(outcomes: &mut Vec<Outcome>, asked: Option<&str>, ev: &RolloutEvent) {
    match ev {
        RolloutEvent::Started { app, from_version, to_version, .. } => {
            let o = entry(outcomes, app);
            o.version_before = Some(*from_version);
            o.version_attempted = Some(*to_version);
        }
        RolloutEvent::SlotFailed { app, slot, message } => {
            let o = entry(outcomes, app);
            if o.failed_slot.is_none() {
                o.failed_slot = Some(*slot);
                o.reason = Some(message.clone());
            }
        }
        RolloutEvent::Done { results } => {
            for r in results {
                let name = if r.app.is_empty() { asked.unwrap_or("") } else { &r.app };
                let o = entry(outcomes, name);
                o.ok = r.ok;
                o.message = r.message.clone();
                if !r.ok && o.reason.is_none() {
                    o.reason = Some(r.message.clone());
                }
            }
        }
        _ => {}
    }
}

/// Fills `result`, `version_after` and `release_after` from the history
/// entry of the version the rollout made.
fn settle(client: &Client, o: &mut Outcome) {
    let history = client.get::<HistoryResponse>(&format!("/v1/history?app={}", o.app)).ok();
    let entry_of = |v: Option<u64>| {
        let h = history.as_ref()?;
        h.history.iter().find(|e| Some(e.version) == v).cloned()
    };
    let attempted = entry_of(o.version_attempted.filter(|v| Some(*v) != o.version_before));
    o.result = match (&attempted, o.ok, o.version_attempted) {
        (Some(e), _, _) => e.result.clone(),
        (None, true, _) => "ok".into(),
        // Refused before a slot was touched (busy, nothing to roll back to, a paused canary).
        (None, false, None) => "error".into(),
        (None, false, Some(_)) => "failed".into(),
    };
    o.version_after = match o.result.as_str() {
        "ok" => o.version_attempted.or(o.version_before),
        "rolled_back" | "error" => o.version_before,
        _ => None,
    };
    if o.version_after.is_none() && o.result == "error" {
        // Nothing moved: what runs is what the status says.
        o.version_after = current_version(client, &o.app);
        o.version_before = o.version_before.or(o.version_after);
    }
    o.release_after = entry_of(o.version_after).and_then(|e| e.release);
}

/// The version every slot of `app` runs, when they agree.
fn current_version(client: &Client, app: &str) -> Option<u64> {
    let s: sup_proto::StatusResponse = client.get(&format!("/v1/status?app={app}")).ok()?;
    let a = s.apps.into_iter().find(|a| a.name == app)?;
    let first = a.instances.first()?.version;
    a.instances.iter().all(|i| i.version == first).then_some(first)
}
