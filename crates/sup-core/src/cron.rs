//! `cron_restart`: scheduled rolling restarts, PM2's habit without its downtime.
//!
//! One task for all apps. It wakes at the earliest due time (or every minute,
//! to pick up config changes and wall-clock jumps) and rolls each due app onto
//! its current configuration, new worker ready before the old one drains. An
//! app with no running worker (stopped by an operator) is left alone.

use std::collections::HashMap;
use std::sync::Weak;
use std::time::Duration;

use chrono::{DateTime, Local};
use sup_proto::RestartReason;

use crate::supervisor::Supervisor;

/// Longest sleep between looks at the schedule.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Starts the scheduler; it ends with the supervisor.
pub fn start(sup: Weak<Supervisor>) {
    tokio::spawn(async move {
        // Per app: the pattern it was computed for and the next due time.
        let mut due: HashMap<String, (String, DateTime<Local>)> = HashMap::new();
        loop {
            let Some(s) = sup.upgrade() else { return };
            let now = Local::now();
            let mut wake = MAX_SLEEP;
            let apps = s.apps();
            due.retain(|name, _| apps.iter().any(|a| &a.name == name));
            for app in apps {
                let spec = app.spec();
                let Some(cron) = spec.cfg.cron_restart.as_ref() else {
                    due.remove(&app.name);
                    continue;
                };
                let entry = due.get(&app.name).filter(|(p, _)| p == cron.pattern()).map(|(_, t)| *t);
                let next = match entry {
                    Some(t) if t <= now => {
                        if app.is_running() {
                            tracing::info!(app = %app.name, pattern = cron.pattern(), "cron_restart: rolling restart");
                            let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
                            let app = app.clone();
                            let cfg = spec.cfg.clone();
                            tokio::spawn(async move {
                                let r = app.reload(cfg, RestartReason::Cron, true, tx).await;
                                if !r.ok {
                                    tracing::warn!(app = %r.app, "cron_restart failed: {}", r.message);
                                }
                            });
                        }
                        cron.next_after(&now)
                    }
                    Some(t) => Some(t),
                    None => cron.next_after(&now),
                };
                match next {
                    Some(t) => {
                        due.insert(app.name.clone(), (cron.pattern().to_string(), t));
                        let left = (t - now).to_std().unwrap_or_default();
                        wake = wake.min(left);
                    }
                    None => {
                        due.remove(&app.name);
                    }
                }
            }
            drop(s);
            // Wake just after the due time: chrono compares with sub-second precision.
            tokio::time::sleep(wake + Duration::from_millis(5)).await;
        }
    });
}
