//! `logs`: where an app's output goes, its format and its rotation.
//!
//! ```toml
//! logs = "journald"
//! logs = { format = "json", combined = true, rotate_size = "50M", rotate_every = "daily", keep = 14, compress = true }
//! ```

use std::fmt;
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::size::SizeValue;

/// Where lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogTarget {
    /// Files in the log folder (the default).
    #[default]
    Files,
    /// The systemd journal, one entry per line with app and instance fields.
    Journald,
}

/// How a line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// `TIME APP#SLOT message`.
    #[default]
    Text,
    /// `{"ts":…,"app":…,"instance":…,"stream":"out","msg":…}`.
    Json,
}

/// The validated `logs` settings of an app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Files or journald.
    pub target: LogTarget,
    /// Text or JSON lines.
    pub format: LogFormat,
    /// One `APP.log` instead of `APP.out.log` and `APP.err.log`.
    pub combined: bool,
    /// Rotate a file when it would grow past this size (default 50M).
    pub rotate_size: Option<u64>,
    /// Rotate a file this long after it was started (default none).
    pub rotate_every: Option<Duration>,
    /// Rotated files kept per file (default 14).
    pub keep: u32,
    /// Gzip rotated files, off the capture path (default false).
    pub compress: bool,
    /// Longer lines are split (default 64K).
    pub max_line: usize,
    /// Output held in memory per app while the disk is behind (default 4M); beyond it workers wait on their pipes.
    pub buffer: u64,
}

impl LogConfig {
    /// The names of `app`'s current files in the log folder: `APP.log`, or `APP.out.log` and `APP.err.log`.
    pub fn file_names(&self, app: &str) -> Vec<String> {
        if self.combined {
            vec![format!("{app}.log")]
        } else {
            vec![format!("{app}.out.log"), format!("{app}.err.log")]
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            target: LogTarget::Files,
            format: LogFormat::Text,
            combined: false,
            rotate_size: Some(50 * 1024 * 1024),
            rotate_every: None,
            keep: 14,
            compress: false,
            max_line: 64 * 1024,
            buffer: 4 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogTable {
    target: Option<TargetValue>,
    format: Option<LogFormat>,
    combined: Option<bool>,
    rotate_size: Option<SizeOrOff>,
    rotate_every: Option<Every>,
    keep: Option<u32>,
    compress: Option<bool>,
    max_line: Option<SizeValue>,
    buffer: Option<SizeValue>,
}

crate::choice::string_enum!(LogFormat, "\"text\" or \"json\"", [("text", LogFormat::Text), ("json", LogFormat::Json)]);

/// A target name, in a string (`logs = "journald"`) or in the table's `target`.
#[derive(Debug, Clone, Copy)]
struct TargetValue(LogTarget);

const TARGETS: [(&str, LogTarget); 2] = [("files", LogTarget::Files), ("journald", LogTarget::Journald)];

crate::choice::string_enum!(
    TargetValue,
    "\"files\" or \"journald\"",
    [("files", TargetValue(LogTarget::Files)), ("journald", TargetValue(LogTarget::Journald))]
);

/// A size, or `"off"`.
#[derive(Debug)]
struct SizeOrOff(Option<u64>);

impl<'de> Deserialize<'de> for SizeOrOff {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SizeOrOff;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"50M\", or \"off\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SizeOrOff, E> {
                if v.trim().eq_ignore_ascii_case("off") {
                    return Ok(SizeOrOff(None));
                }
                match crate::size::parse_size(v) {
                    Ok(0) => Err(E::custom("must be greater than zero, or \"off\"")),
                    Ok(n) => Ok(SizeOrOff(Some(n))),
                    Err(m) => Err(E::custom(m)),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SizeOrOff, E> {
                u64::try_from(v)
                    .ok()
                    .filter(|n| *n > 0)
                    .map(|n| SizeOrOff(Some(n)))
                    .ok_or_else(|| E::custom("must be greater than zero"))
            }
        }
        d.deserialize_any(V)
    }
}

/// `"hourly"`, `"daily"`, `"weekly"`, or a duration.
#[derive(Debug)]
struct Every(Duration);

impl<'de> Deserialize<'de> for Every {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let dur = match s.trim().to_ascii_lowercase().as_str() {
            "hourly" => Duration::from_secs(3600),
            "daily" => Duration::from_secs(86_400),
            "weekly" => Duration::from_secs(7 * 86_400),
            _ => crate::duration::parse_duration(&s)
                .map_err(|m| de::Error::custom(format!("{m}; or use \"hourly\", \"daily\", \"weekly\"")))?,
        };
        if dur < Duration::from_secs(1) {
            return Err(de::Error::custom("must be at least 1s"));
        }
        Ok(Every(dur))
    }
}

/// The raw `logs` value: a target name or a table.
#[derive(Debug)]
pub(crate) struct RawLogs(LogConfig);

impl RawLogs {
    /// The validated settings.
    pub(crate) fn into_config(self) -> LogConfig {
        self.0
    }
}

impl<'de> Deserialize<'de> for RawLogs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawLogs;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"files\", \"journald\", or a table such as { rotate_size = \"50M\", keep = 14 }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawLogs, E> {
                let target =
                    crate::choice::choose(v, &TARGETS, "or a table such as { rotate_size = \"50M\", keep = 14 }")?;
                Ok(RawLogs(LogConfig { target, ..LogConfig::default() }))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawLogs, A::Error> {
                let t = RawLogTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                let d = LogConfig::default();
                let max_line = match t.max_line {
                    Some(SizeValue(n)) if n < 256 => {
                        return Err(de::Error::custom("max_line must be at least 256 bytes"))
                    }
                    Some(SizeValue(n)) => usize::try_from(n).unwrap_or(usize::MAX),
                    None => d.max_line,
                };
                let buffer = match t.buffer {
                    Some(SizeValue(n)) if !(256 * 1024..=1024 * 1024 * 1024).contains(&n) => {
                        return Err(de::Error::custom("buffer must be between 256K and 1G"))
                    }
                    Some(SizeValue(n)) => n,
                    None => d.buffer,
                };
                Ok(RawLogs(LogConfig {
                    target: t.target.map_or(LogTarget::Files, |t| t.0),
                    format: t.format.unwrap_or_default(),
                    combined: t.combined.unwrap_or(false),
                    rotate_size: t.rotate_size.map_or(d.rotate_size, |s| s.0),
                    rotate_every: t.rotate_every.map(|e| e.0),
                    keep: t.keep.unwrap_or(d.keep),
                    compress: t.compress.unwrap_or(false),
                    max_line,
                    buffer,
                }))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{app_err, parse_app};

    #[test]
    fn values() {
        assert_eq!(parse_app("").logs, LogConfig::default());
        assert_eq!(parse_app("logs = \"journald\"").logs.target, LogTarget::Journald);
        let l = parse_app(
            "logs = { format = \"json\", combined = true, rotate_size = \"1M\", rotate_every = \"daily\", keep = 3, compress = true, max_line = \"1K\", buffer = \"1M\" }",
        )
        .logs;
        assert_eq!(
            l,
            LogConfig {
                target: LogTarget::Files,
                format: LogFormat::Json,
                combined: true,
                rotate_size: Some(1 << 20),
                rotate_every: Some(Duration::from_secs(86_400)),
                keep: 3,
                compress: true,
                max_line: 1024,
                buffer: 1 << 20,
            }
        );
        assert_eq!(parse_app("logs = { rotate_size = \"off\", rotate_every = \"90m\" }").logs.rotate_size, None);
        // Enumerated values match in any case, like every other one in the file.
        assert_eq!(parse_app("logs = \"Journald\"").logs.target, LogTarget::Journald);
        let l = parse_app(
            "logs = { target = \"JOURNALD\", format = \"JSON\", rotate_size = \"Off\", rotate_every = \"Daily\" }",
        )
        .logs;
        assert_eq!(
            (l.target, l.format, l.rotate_size, l.rotate_every),
            (LogTarget::Journald, LogFormat::Json, None, Some(Duration::from_secs(86_400)))
        );
    }

    #[test]
    fn errors() {
        let cases: &[(&str, &str)] = &[
            (
                "logs = \"syslog\"",
                "unknown value `syslog`, expected one of `files`, `journald`; or a table such as { rotate_size = \"50M\", keep = 14 }",
            ),
            ("logs = \"jornald\"", "(did you mean `journald`?)"),
            ("logs = { format = \"jsn\" }", "unknown value `jsn`, expected one of `text`, `json` (did you mean `json`?)"),
            ("logs = { target = \"Jurnald\" }", "(did you mean `journald`?)"),
            ("logs = { keeep = 3 }", "unknown"),
            ("logs = { rotate_every = \"soon\" }", "or use \"hourly\", \"daily\", \"weekly\""),
            ("logs = { max_line = \"10\" }", "max_line must be at least 256 bytes"),
            ("logs = { buffer = \"4K\" }", "buffer must be between 256K and 1G"),
        ];
        for (line, want) in cases {
            let err = app_err(line);
            assert!(err.contains("key `apps.web.logs"), "{line}: {err}");
            assert!(err.contains(want), "{line}: want `{want}` in {err}");
        }
    }
}
