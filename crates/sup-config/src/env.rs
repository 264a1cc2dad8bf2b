//! `env`, `env_file` and `required_env`: what a worker gets on top of supd's environment.
//!
//! Values from `env_file` are secrets: no message here ever contains one.

use std::fmt;
use std::path::Path;

use indexmap::IndexMap;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// An environment variable name from the `env` table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct EnvName(pub String);

impl<'de> Deserialize<'de> for EnvName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(EnvNameVisitor)
    }
}

struct EnvNameVisitor;

impl Visitor<'_> for EnvNameVisitor {
    type Value = EnvName;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an environment variable name")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        // The kernel cannot pass these through execve's `NAME=value` strings.
        if v.is_empty() || v.contains('=') || v.contains('\0') {
            return Err(E::custom(format!("invalid environment variable name `{v}`")));
        }
        Ok(EnvName(v.to_string()))
    }
}

/// An `env` table value; numbers and booleans are taken as their text (`PORT = 3000`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EnvValue(pub String);

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(EnvValueVisitor)
    }
}

struct EnvValueVisitor;

impl Visitor<'_> for EnvValueVisitor {
    type Value = EnvValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string, number or boolean")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        if v.contains('\0') {
            return Err(E::custom("environment values cannot contain NUL bytes"));
        }
        Ok(EnvValue(v.to_string()))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(EnvValue(v.to_string()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(EnvValue(v.to_string()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(EnvValue(v.to_string()))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(EnvValue(v.to_string()))
    }
}

/// Reads a dotenv file without touching the process environment.
pub(crate) fn read_env_file(path: &Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    let mut out = Vec::new();
    for item in dotenvy::from_read_iter(text.as_bytes()) {
        match item {
            Ok(pair) => out.push(pair),
            Err(dotenvy::Error::LineParse(line, _)) => {
                // dotenvy's own message quotes the line, value included: report only its number.
                return Err(format!("malformed line {} in `{}`", line_number(&text, &line), path.display()));
            }
            Err(e) => {
                return Err(format!("cannot read `{}`: {}", path.display(), error_kind(&e)));
            }
        }
    }
    Ok(out)
}

/// Describes a dotenvy error without any line content.
fn error_kind(e: &dotenvy::Error) -> String {
    match e {
        dotenvy::Error::Io(io) => io.to_string(),
        _ => "invalid dotenv file".to_string(),
    }
}

/// The 1-based line where the logical line `line` (as dotenvy reports it) begins.
fn line_number(text: &str, line: &str) -> usize {
    let needle = line.trim_end_matches(['\n', '\r']);
    let mut from = 0;
    // Only a match at the start of a line counts: a shorter bad line may also occur
    // inside an earlier, valid one.
    while let Some(found) = text[from..].find(needle) {
        let at = from + found;
        if at == 0 || text.as_bytes()[at - 1] == b'\n' {
            return text[..at].matches('\n').count() + 1;
        }
        from = at + 1;
        if from > text.len() {
            break;
        }
    }
    text.lines().count().max(1)
}

/// `env_file` entries first, then the `env` table; a later entry replaces an earlier value
/// but keeps its position.
pub(crate) fn merge(from_file: Vec<(String, String)>, table: IndexMap<EnvName, EnvValue>) -> Vec<(String, String)> {
    let mut merged: IndexMap<String, String> = IndexMap::new();
    for (k, v) in from_file {
        merged.insert(k, v);
    }
    for (k, v) in table {
        merged.insert(k.0, v.0);
    }
    merged.into_iter().collect()
}

/// Checks that every required name is in `env` or in supd's own environment.
pub(crate) fn check_required(required: &[String], env: &[(String, String)]) -> Result<(), String> {
    let missing: Vec<String> = required
        .iter()
        .filter(|name| !env.iter().any(|(k, _)| k == *name) && std::env::var_os(name.as_str()).is_none())
        .map(|name| format!("`{name}`"))
        .collect();
    match missing.len() {
        0 => Ok(()),
        1 => Err(format!("missing required environment variable {}", missing[0])),
        _ => Err(format!("missing required environment variables {}", missing.join(", "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{app_err, parse_app, TempDir};

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn line_numbers() {
        let cases: &[(&str, &str, usize)] = &[
            ("A=1\nB\n", "B", 2),
            ("AB=1\nB\n", "B", 2),
            ("A=1\n\n# c\nX Y\n", "X Y", 4),
            ("A='x\ny\n", "A='x\ny\n", 1),
        ];
        for (text, line, want) in cases {
            assert_eq!(line_number(text, line), *want, "{text:?}");
        }
    }

    #[test]
    fn table_and_file() {
        let app = parse_app("env = { B = \"2\", PORT = 3000, DEBUG = true, RATIO = 0.5 }");
        assert_eq!(app.env, pairs(&[("B", "2"), ("PORT", "3000"), ("DEBUG", "true"), ("RATIO", "0.5")]));

        let dir = TempDir::new("env");
        let file = dir.write(".env", "# secrets\nA=from-file\nB=file-b\nexport SUP_TEST_C=\"quoted value\"\n");
        let app = parse_app(&format!(
            "env_file = \"{}\"\nenv = {{ B = \"table-b\", D = \"d\" }}\nrequired_env = [\"A\", \"D\", \"PATH\"]",
            file.display()
        ));
        assert_eq!(app.env, pairs(&[("A", "from-file"), ("B", "table-b"), ("SUP_TEST_C", "quoted value"), ("D", "d")]));
        assert_eq!(app.env_file.as_deref(), Some(file.as_path()));
        assert_eq!(app.required_env, vec!["A", "D", "PATH"]);
        // Loading must never leak the file into supd's own environment.
        assert!(std::env::var_os("SUP_TEST_C").is_none());

        // A relative env_file resolves against the config file's folder.
        let cfg_path = dir.write("sup.toml", "[apps.web]\ncommand = \"x\"\nenv_file = \".env\"\n");
        let cfg = crate::load(&cfg_path).expect("loads");
        assert_eq!(cfg.apps[0].env_file.as_deref(), Some(file.as_path()));
    }

    #[test]
    fn errors() {
        let dir = TempDir::new("env-errors");
        let bad = dir.write("bad.env", "A=1\nB=2\nSECRET VALUE=hunter2\n");
        let unterminated = dir.write("open.env", "A=1\nB=\"hunter2\n");
        let cases: Vec<(String, String)> = vec![
            (
                "env_file = \"/nonexistent/.env\"".to_string(),
                "/x/sup.toml:3:12: key `apps.web.env_file`: cannot read `/nonexistent/.env`: No such file or directory (os error 2)".to_string(),
            ),
            (
                format!("env_file = \"{}\"", bad.display()),
                format!("/x/sup.toml:3:12: key `apps.web.env_file`: malformed line 3 in `{}`", bad.display()),
            ),
            (
                format!("env_file = \"{}\"", unterminated.display()),
                format!("/x/sup.toml:3:12: key `apps.web.env_file`: malformed line 2 in `{}`", unterminated.display()),
            ),
            (
                "required_env = [\"SUP_TEST_MISSING_A\", \"PATH\", \"SUP_TEST_MISSING_B\"]".to_string(),
                "/x/sup.toml:3:16: key `apps.web.required_env`: missing required environment variables `SUP_TEST_MISSING_A`, `SUP_TEST_MISSING_B`".to_string(),
            ),
            (
                "env = { X = \"1\" }\nrequired_env = [\"X\", \"SUP_TEST_MISSING_A\"]".to_string(),
                "/x/sup.toml:4:16: key `apps.web.required_env`: missing required environment variable `SUP_TEST_MISSING_A`".to_string(),
            ),
            (
                "env = { \"A=B\" = \"1\" }".to_string(),
                "/x/sup.toml:3:9: key `apps.web.env.\"A=B\"`: invalid environment variable name `A=B`".to_string(),
            ),
            (
                "env = { A = [1] }".to_string(),
                "/x/sup.toml:3:13: key `apps.web.env.A`: invalid type: sequence, expected a string, number or boolean".to_string(),
            ),
        ];
        for (line, want) in &cases {
            let got = app_err(line);
            assert_eq!(got, *want, "{line}");
            assert!(!got.contains("hunter2"), "secret leaked: {got}");
        }
    }

    #[test]
    fn debug_hides_values() {
        let app = parse_app("env = { TOKEN = \"hunter2\" }");
        let shown = format!("{app:?}");
        assert!(shown.contains("TOKEN"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
