//! `cron_restart`: scheduled rolling restarts, PM2's habit without its downtime.
//!
//! One task for all apps. It wakes at the earliest due time (or every minute,
//! to pick up config changes and wall-clock jumps) and rolls each due app onto
//! its current configuration, new worker ready before the old one drains. An
//! app with no running worker (stopped by an operator), or with another
//! operation in progress, is left alone until the next time.

use std::collections::HashMap;
use std::sync::Weak;
use std::time::Duration;

use chrono::{DateTime, Local};

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
                        let app = app.clone();
                        let pattern = cron.pattern().to_string();
                        tokio::spawn(async move {
                            let r = app.cron_restart().await;
                            if r.ok {
                                tracing::info!(app = %r.app, pattern, "cron_restart: {}", r.message);
                            } else {
                                tracing::warn!(app = %r.app, pattern, "cron_restart not done: {}", r.message);
                            }
                        });
                        cron.next_after(&now)
                    }
                    // A clock stepped back must not push the next run far away.
                    Some(t) => cron.next_after(&now).map_or(Some(t), |n| Some(n.min(t))),
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
