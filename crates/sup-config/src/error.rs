//! Errors, and turning byte spans and serde paths into `file:line:column: key`.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read `{}`: {source}", path.display())]
    Read {
        /// The file that could not be read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The file was read but its contents are not a valid configuration.
    #[error("{0}")]
    Invalid(Box<Invalid>),
}

impl ConfigError {
    /// The details of an invalid-config error, if this is one.
    pub fn invalid(&self) -> Option<&Invalid> {
        match self {
            ConfigError::Invalid(invalid) => Some(invalid),
            ConfigError::Read { .. } => None,
        }
    }
}

/// A problem at a known place in the configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The configuration file.
    pub file: PathBuf,
    /// 1-based line of the offending key or value.
    pub line: usize,
    /// 1-based column (in characters) of the offending key or value.
    pub column: usize,
    /// Dotted key path such as `apps.web.instances`; empty when unknown.
    pub key: String,
    /// What is wrong, lowercase, one line.
    pub message: String,
    /// A close valid alternative, when there is one.
    pub suggestion: Option<String>,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        // A syntax error before any table has no key worth showing.
        if !self.key.is_empty() {
            write!(f, "key `{}`: ", self.key)?;
        }
        f.write_str(&self.message)?;
        if let Some(suggestion) = &self.suggestion {
            write!(f, " (did you mean `{suggestion}`?)")?;
        }
        Ok(())
    }
}

impl std::error::Error for Invalid {}

/// Where an error was found: the file, its text (for line/column) and the key path.
pub(crate) struct Source<'a> {
    pub file: &'a Path,
    pub text: &'a str,
}

impl Source<'_> {
    /// An invalid-config error at `span` (byte range into the text).
    pub fn error(&self, span: Range<usize>, key: String, message: String) -> ConfigError {
        self.error_with(span, key, message, None)
    }

    /// Like [`Source::error`], with a suggestion.
    pub fn error_with(
        &self,
        span: Range<usize>,
        key: String,
        message: String,
        suggestion: Option<String>,
    ) -> ConfigError {
        let (line, column) = line_column(self.text, span.start);
        ConfigError::Invalid(Box::new(Invalid {
            file: self.file.to_path_buf(),
            line,
            column,
            key,
            message,
            suggestion,
        }))
    }

    /// Converts a first-stage (TOML/serde) error.
    pub fn toml_error(&self, err: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
        let key = path_key(err.path());
        let inner = err.into_inner();
        let span = inner.span().unwrap_or(0..0);
        let raw = inner.message();
        let is_syntax = key.is_empty();
        // toml's parser messages span several lines ("invalid string\nexpected ...").
        let message = raw.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
        let key = if is_syntax { nearest_table(self.text, span.start) } else { key };
        let (message, suggestion) = explain(&message);
        self.error_with(span, key, message, suggestion)
    }
}

/// Rewrites serde's unknown field/variant messages and finds a close alternative.
fn explain(message: &str) -> (String, Option<String>) {
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let names = backticked(rest);
        let suggestion =
            names.split_first().and_then(|(given, valid)| suggest(given, valid.iter().map(String::as_str)));
        return ("unknown key".to_string(), suggestion);
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        // `choose` appends other accepted forms (tables) after "; ".
        let (rest, tail) = rest.split_once("; ").map_or((rest, ""), |(r, t)| (r, t));
        let names = backticked(rest);
        if let Some((given, valid)) = names.split_first() {
            let suggestion = suggest(given, valid.iter().map(String::as_str));
            // Long lists (e.g. all signals) drown the message; the suggestion helps more.
            let message = if valid.len() <= 5 {
                let list: Vec<String> = valid.iter().map(|v| format!("`{v}`")).collect();
                format!("unknown value `{given}`, expected one of {}", list.join(", "))
            } else {
                format!("unknown value `{given}`")
            };
            let message = if tail.is_empty() { message } else { format!("{message}; {tail}") };
            return (message, suggestion);
        }
    }
    (message.to_string(), None)
}

/// The strings between backticks, in order.
fn backticked(s: &str) -> Vec<String> {
    s.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

/// The closest candidate to `given`, when it is close enough to be a likely typo.
pub(crate) fn suggest<'a>(given: &str, candidates: impl Iterator<Item = &'a str>) -> Option<String> {
    let given_lower = given.to_ascii_lowercase();
    candidates
        .filter_map(|c| {
            let lower = c.to_ascii_lowercase();
            let jw = strsim::jaro_winkler(&given_lower, &lower);
            let lev = strsim::levenshtein(&given_lower, &lower);
            (jw > 0.8 || lev <= 2).then_some((jw, c))
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.to_string())
}

/// 1-based line and character column of a byte offset.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    // A span may start inside a multi-byte character only if toml misreports; stay safe.
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// The header of the last table opened before `offset`, for syntax errors.
fn nearest_table(text: &str, offset: usize) -> String {
    let (line, _) = line_column(text, offset);
    text.lines()
        .take(line.saturating_sub(1))
        .filter_map(|l| {
            let l = l.trim();
            let inner = l.strip_prefix('[')?;
            let inner = inner.strip_prefix('[').unwrap_or(inner);
            let end = inner.find(']')?;
            Some(inner[..end].trim().to_string())
        })
        .last()
        .unwrap_or_default()
}

/// Renders a serde path as a dotted TOML key, dropping serde_spanned's internal segment.
fn path_key(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Map { key } if key.starts_with("$__serde_spanned") => {}
            Segment::Map { key } | Segment::Enum { variant: key } => push_key(&mut out, key),
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Unknown => push_key(&mut out, "?"),
        }
    }
    out
}

/// Appends one key segment, quoting it when it is not a bare TOML key.
pub(crate) fn push_key(out: &mut String, key: &str) {
    if !out.is_empty() {
        out.push('.');
    }
    let bare = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        out.push_str(key);
    } else {
        out.push('"');
        out.push_str(&key.replace('\\', "\\\\").replace('"', "\\\""));
        out.push('"');
    }
}

/// Joins key segments into a dotted path.
pub(crate) fn key_path(parts: &[&str]) -> String {
    let mut out = String::new();
    for part in parts {
        push_key(&mut out, part);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::err;

    #[test]
    fn line_columns() {
        let cases: &[(&str, usize, (usize, usize))] = &[
            ("abc", 0, (1, 1)),
            ("abc", 2, (1, 3)),
            ("a\nbc", 2, (2, 1)),
            ("a\nbc", 3, (2, 2)),
            ("é\nxé=", 6, (2, 3)),
            ("ab", 99, (1, 3)),
        ];
        for (text, offset, want) in cases {
            assert_eq!(line_column(text, *offset), *want, "{text:?} @ {offset}");
        }
    }

    #[test]
    fn key_paths() {
        let cases: &[(&[&str], &str)] = &[
            (&["apps", "web", "port"], "apps.web.port"),
            (&["apps", "api.v2", "port"], "apps.\"api.v2\".port"),
            (&["supervisor"], "supervisor"),
        ];
        for (parts, want) in cases {
            assert_eq!(key_path(parts), *want);
        }
    }

    #[test]
    fn syntax_and_structure_errors() {
        let cases: &[(&str, &str)] = &[
            ("[apps.web]\ncommand = = \"x\"\n", "/x/sup.toml:2:11: key `apps.web`: invalid string; expected `\"`, `'`"),
            ("command = = \"x\"\n", "/x/sup.toml:1:11: invalid string; expected `\"`, `'`"),
            (
                "[apps.web]\ncommand = \"x\"\ncommand = \"y\"\n",
                "/x/sup.toml:3:1: key `apps.web`: duplicate key `command` in table `apps.web`",
            ),
            ("[foo]\n", "/x/sup.toml:1:2: key `foo`: unknown key"),
            ("[supervisr]\n", "/x/sup.toml:1:2: key `supervisr`: unknown key (did you mean `supervisor`?)"),
            ("apps = 3\n", "/x/sup.toml:1:8: key `apps`: invalid type: integer `3`, expected a map"),
            ("[apps.web]\ninstances = 3\n", "/x/sup.toml:1:1: key `apps.web`: missing field `command`"),
        ];
        for (src, want) in cases {
            assert_eq!(err(src), *want, "{src}");
        }
    }

    #[test]
    fn suggestions() {
        let valid = ["instances", "listen", "stop_signal", "stop_timeout"];
        let cases: &[(&str, Option<&str>)] = &[
            ("instancs", Some("instances")),
            ("INSTANCES", Some("instances")),
            ("stop_timout", Some("stop_timeout")),
            ("lisen", Some("listen")),
            ("zzz", None),
        ];
        for (given, want) in cases {
            assert_eq!(suggest(given, valid.iter().copied()).as_deref(), *want, "{given}");
        }
    }
}
