//! `cron_restart`: when an app gets a scheduled rolling restart.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, TimeZone};
use croner::Cron;

/// A parsed cron pattern, in the host's local time like PM2's.
#[derive(Clone)]
pub struct CronSchedule {
    pattern: String,
    cron: Cron,
}

impl CronSchedule {
    /// Parses 5 fields (minute hour day month weekday) or 6 (seconds first), as PM2 accepts.
    pub fn parse(pattern: &str) -> Result<CronSchedule, String> {
        let fields = pattern.split_whitespace().count();
        let macro_form = pattern.trim_start().starts_with('@');
        if !macro_form && !(5..=6).contains(&fields) {
            return Err(format!(
                "invalid cron pattern `{pattern}`: expected 5 fields (minute hour day month weekday) or 6 (with seconds first)"
            ));
        }
        let cron = Cron::from_str(pattern).map_err(|e| match bad_field(pattern) {
            Some((name, value)) => {
                format!("invalid cron pattern `{pattern}`: the {name} field `{value}` is out of range or malformed")
            }
            None => format!("invalid cron pattern `{pattern}`: {e}"),
        })?;
        Ok(CronSchedule { pattern: pattern.to_string(), cron })
    }

    /// The pattern as written.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The first time strictly after `after` that matches, if any.
    pub fn next_after<Tz: TimeZone>(&self, after: &DateTime<Tz>) -> Option<DateTime<Tz>> {
        self.cron.find_next_occurrence(after, false).ok()
    }
}

/// Finds the first field croner rejects on its own, with every other field `*`.
fn bad_field(pattern: &str) -> Option<(&'static str, String)> {
    let fields: Vec<&str> = pattern.split_whitespace().collect();
    let names: &[&str] = if fields.len() == 6 {
        &["seconds", "minute", "hour", "day-of-month", "month", "weekday"]
    } else {
        &["minute", "hour", "day-of-month", "month", "weekday"]
    };
    (0..fields.len().min(names.len())).find_map(|i| {
        let probe: Vec<&str> = (0..fields.len()).map(|j| if i == j { fields[i] } else { "*" }).collect();
        Cron::from_str(&probe.join(" ")).is_err().then(|| (names[i], fields[i].to_string()))
    })
}

impl PartialEq for CronSchedule {
    fn eq(&self, other: &Self) -> bool {
        self.pattern == other.pattern
    }
}

impl fmt::Debug for CronSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.pattern)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    #[test]
    fn next_occurrences() {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).map(|d| d.with_timezone(&Utc)).ok();
        let now = at("2026-12-02T10:15:30Z").unwrap();
        let c = CronSchedule::parse("0 3 * * *").unwrap();
        assert_eq!(c.next_after(&now), at("2026-12-03T03:00:00Z"));
        let c = CronSchedule::parse("*/20 * * * * *").unwrap();
        assert_eq!(c.next_after(&now), at("2026-12-02T10:15:40Z"));
        let c = CronSchedule::parse("0 0 * * MON").unwrap();
        assert_eq!(c.next_after(&now), at("2026-12-07T00:00:00Z"));
    }

    #[test]
    fn rejects_bad_patterns() {
        for p in ["", "* * *", "0 3 * *", "0 25 * * *", "61 * * * *", "0 0 * * FOO", "1 2 3 4 5 6 7"] {
            let e = CronSchedule::parse(p).err();
            assert!(e.as_deref().is_some_and(|e| e.starts_with(&format!("invalid cron pattern `{p}`"))), "{p}: {e:?}");
        }
    }
}
