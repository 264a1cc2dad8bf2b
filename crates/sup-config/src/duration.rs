//! Durations: humantime strings such as `"5s"`, `"100ms"`, `"1m 30s"`.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// The longest duration accepted anywhere: 365 days.
///
/// Far beyond any sane timeout or interval, and small enough that adding it to
/// any `Instant` or `SystemTime` cannot overflow (which would panic in supd).
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// Parses a humantime duration such as `"5s"`, `"100ms"` or `"1m 30s"`, of at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let trimmed = s.trim();
    if trimmed.is_empty() {
        return Err("expected a duration such as \"5s\", found an empty string".to_string());
    }
    let d = humantime::parse_duration(trimmed).map_err(|e| format!("invalid duration `{s}`: {e}"))?;
    if d > MAX_DURATION {
        return Err(format!("duration `{trimmed}` is too long: at most 365d"));
    }
    Ok(d)
}

/// Renders a duration the way a user would write it (`"1m 30s"`).
pub(crate) fn show(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A duration in a TOML value; bare integers are refused because their unit is ambiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DurationValue(pub Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DurationVisitor)
    }
}

struct DurationVisitor;

/// Why a number is refused: seconds or milliseconds? Make the user say.
fn number_hint<E: de::Error>(found: impl fmt::Display) -> E {
    E::custom(format!("expected a duration string, found number `{found}`: use a string such as \"5s\""))
}

impl Visitor<'_> for DurationVisitor {
    type Value = DurationValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration string such as \"5s\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        parse_duration(v).map(DurationValue).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Err(number_hint(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Err(number_hint(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Err(number_hint(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{app_err, err, parse_app};

    #[test]
    fn parses() {
        let cases: &[(&str, Result<Duration, &str>)] = &[
            ("5s", Ok(Duration::from_secs(5))),
            ("100ms", Ok(Duration::from_millis(100))),
            ("1m 30s", Ok(Duration::from_secs(90))),
            ("1h", Ok(Duration::from_secs(3600))),
            (" 2s ", Ok(Duration::from_secs(2))),
            (
                "",
                Err("expected a duration such as \"5s\", found an empty string"),
            ),
            (
                "5",
                Err("invalid duration `5`: time unit needed, for example 5sec or 5ms"),
            ),
            ("365d", Ok(MAX_DURATION)),
            ("52w 1d", Ok(MAX_DURATION)),
            ("365d 1ns", Err("duration `365d 1ns` is too long: at most 365d")),
            ("1y", Err("duration `1y` is too long: at most 365d")),
            (" 100000000h ", Err("duration `100000000h` is too long: at most 365d")),
            ("5 parsecs", Err("invalid duration `5 parsecs`: unknown time unit \"parsecs\", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations)")),
        ];
        for (input, want) in cases {
            assert_eq!(parse_duration(input), want.map_err(str::to_string), "{input:?}");
        }
    }

    #[test]
    fn toml_values() {
        assert_eq!(parse_app("stop_timeout = \"3s\"").stop_timeout, Duration::from_secs(3));
        assert_eq!(parse_app("stop_timeout = \"365d\"").stop_timeout, MAX_DURATION);
        assert_eq!(
            err("[supervisor]\nmonitor_interval = \"366d\"\n"),
            "/x/sup.toml:2:20: key `supervisor.monitor_interval`: duration `366d` is too long: at most 365d"
        );
        let cases: &[(&str, &str)] = &[
            (
                "stop_timeout = 5",
                "/x/sup.toml:3:16: key `apps.web.stop_timeout`: expected a duration string, found number `5`: use a string such as \"5s\"",
            ),
            (
                "ready_timeout = 1.5",
                "/x/sup.toml:3:17: key `apps.web.ready_timeout`: expected a duration string, found number `1.5`: use a string such as \"5s\"",
            ),
            (
                "restart_window = true",
                "/x/sup.toml:3:18: key `apps.web.restart_window`: invalid type: boolean `true`, expected a duration string such as \"5s\"",
            ),
            (
                "stop_timeout = \"400d\"",
                "/x/sup.toml:3:16: key `apps.web.stop_timeout`: duration `400d` is too long: at most 365d",
            ),
            (
                "ready_timeout = \"18446744073709551615s\"",
                "/x/sup.toml:3:17: key `apps.web.ready_timeout`: duration `18446744073709551615s` is too long: at most 365d",
            ),
            (
                "restart_window = \"2y\"",
                "/x/sup.toml:3:18: key `apps.web.restart_window`: duration `2y` is too long: at most 365d",
            ),
            (
                "watchdog = \"9999w\"",
                "/x/sup.toml:3:12: key `apps.web.watchdog`: duration `9999w` is too long: at most 365d",
            ),
            (
                "backoff = { max = \"1000d\" }",
                "/x/sup.toml:3:19: key `apps.web.backoff.max`: duration `1000d` is too long: at most 365d",
            ),
            (
                "backoff = { reset_after = \"1000d\" }",
                "/x/sup.toml:3:27: key `apps.web.backoff.reset_after`: duration `1000d` is too long: at most 365d",
            ),
            (
                "logs = { rotate_every = \"1000d\" }",
                "/x/sup.toml:3:25: key `apps.web.logs.rotate_every`: duration `1000d` is too long: at most 365d; or use \"hourly\", \"daily\", \"weekly\"",
            ),
            (
                "watchdog = \"soon\"",
                "/x/sup.toml:3:12: key `apps.web.watchdog`: invalid duration `soon`: expected number at 0",
            ),
        ];
        for (line, want) in cases {
            assert_eq!(app_err(line), *want, "{line}");
        }
    }
}
