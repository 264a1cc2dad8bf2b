//! `backoff`: the growing delay between restarts.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::duration::{show, DurationValue};
use crate::error::{key_path, ConfigError, Source};

/// Exponential delay between restarts of a crashing worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    /// Delay before the second restart.
    pub initial: Duration,
    /// Growth factor per restart; finite and at least 1.0.
    pub multiplier: f64,
    /// Largest delay; at least `initial`.
    pub max: Duration,
    /// A worker that stayed ready at least this long served: its death is
    /// restarted at once and starts the count over (PM2's `min_uptime`).
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            multiplier: 1.5,
            max: Duration::from_secs(15),
            reset_after: Duration::from_secs(1),
        }
    }
}

impl Backoff {
    /// Delay before restart number `attempt`: 0 is immediate, 1 is `initial`, then it grows
    /// by `multiplier` up to `max`.
    pub fn delay(&self, attempt: u32) -> Duration {
        if attempt == 0 {
            return Duration::ZERO;
        }
        let exponent = i32::try_from(attempt - 1).unwrap_or(i32::MAX);
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        // Float math may overflow to infinity (or NaN with odd input): cap instead of panicking.
        match Duration::try_from_secs_f64(secs) {
            Ok(delay) => delay.min(self.max),
            Err(_) => self.max,
        }
    }
}

/// The `backoff` table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBackoff {
    initial: Option<Spanned<DurationValue>>,
    multiplier: Option<Spanned<f64>>,
    max: Option<Spanned<DurationValue>>,
    reset_after: Option<DurationValue>,
}

impl RawBackoff {
    /// Applies defaults and checks multiplier and `max >= initial`; `app` names the app for keys.
    pub fn build(self, src: &Source<'_>, app: &str) -> Result<Backoff, ConfigError> {
        let defaults = Backoff::default();
        let key = |k: &str| key_path(&["apps", app, "backoff", k]);
        let initial = self.initial.as_ref().map_or(defaults.initial, |v| v.get_ref().0);
        let max = self.max.as_ref().map_or(defaults.max, |v| v.get_ref().0);
        let multiplier = match &self.multiplier {
            None => defaults.multiplier,
            Some(m) => {
                let value = *m.get_ref();
                if !(value.is_finite() && value >= 1.0) {
                    return Err(src.error(
                        m.span(),
                        key("multiplier"),
                        format!("must be a finite number of at least 1.0, found `{value}`"),
                    ));
                }
                value
            }
        };
        if max < initial {
            // Blame whichever side the user wrote; `max` when both are explicit.
            let (span, name, message) = match (&self.max, &self.initial) {
                (Some(m), _) => {
                    (m.span(), "max", format!("must be at least `initial` ({}), found `{}`", show(initial), show(max)))
                }
                (None, Some(i)) => (
                    i.span(),
                    "initial",
                    format!("must be at most `max` ({}, the default), found `{}`", show(max), show(initial)),
                ),
                // Both defaults: 100ms <= 15s, so this arm only keeps the match total.
                (None, None) => (0..0, "max", "must be at least `initial`".to_string()),
            };
            return Err(src.error(span, key(name), message));
        }
        Ok(Backoff { initial, multiplier, max, reset_after: self.reset_after.map_or(defaults.reset_after, |v| v.0) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{app_err, parse_app};

    #[test]
    fn delays() {
        let b = Backoff::default();
        let cases: &[(u32, Duration)] = &[
            (0, Duration::ZERO),
            (1, Duration::from_millis(100)),
            (2, Duration::from_millis(150)),
            (3, Duration::from_millis(225)),
            (100, Duration::from_secs(15)),
            (u32::MAX, Duration::from_secs(15)),
        ];
        for (attempt, want) in cases {
            assert_eq!(b.delay(*attempt), *want, "attempt {attempt}");
        }
        let flat = Backoff { multiplier: 1.0, ..Backoff::default() };
        assert_eq!(flat.delay(u32::MAX), Duration::from_millis(100));
    }

    #[test]
    fn toml_values() {
        assert_eq!(parse_app("").backoff, Backoff::default());
        assert_eq!(
            parse_app("backoff = { initial = \"1s\", multiplier = 2, max = \"1m\", reset_after = \"5m\" }").backoff,
            Backoff {
                initial: Duration::from_secs(1),
                multiplier: 2.0,
                max: Duration::from_secs(60),
                reset_after: Duration::from_secs(300),
            }
        );
        let cases: &[(&str, &str)] = &[
            (
                "backoff = { multiplier = 0.5 }",
                "/x/sup.toml:3:26: key `apps.web.backoff.multiplier`: must be a finite number of at least 1.0, found `0.5`",
            ),
            (
                "backoff = { multiplier = nan }",
                "/x/sup.toml:3:26: key `apps.web.backoff.multiplier`: must be a finite number of at least 1.0, found `NaN`",
            ),
            (
                "backoff = { initial = \"2s\", max = \"1s\" }",
                "/x/sup.toml:3:35: key `apps.web.backoff.max`: must be at least `initial` (2s), found `1s`",
            ),
            (
                "backoff = { initial = \"20s\" }",
                "/x/sup.toml:3:23: key `apps.web.backoff.initial`: must be at most `max` (15s, the default), found `20s`",
            ),
            (
                "backoff = { max = 15 }",
                "/x/sup.toml:3:19: key `apps.web.backoff.max`: expected a duration string, found number `15`: use a string such as \"5s\"",
            ),
            (
                "backoff = { maximum = \"1s\" }",
                "/x/sup.toml:3:13: key `apps.web.backoff.maximum`: unknown key (did you mean `max`?)",
            ),
        ];
        for (line, want) in cases {
            assert_eq!(app_err(line), *want, "{line}");
        }
    }
}
