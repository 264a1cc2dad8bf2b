//! App names: the `NAME` in `[apps.NAME]`.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// The longest app name; names end up in file names and metrics labels.
const MAX_LEN: usize = 64;

/// Checks `^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !(first_ok && rest_ok) {
        return Err(format!(
            "invalid app name `{name}`: use letters, digits, `_`, `.` and `-`, starting with a letter or digit"
        ));
    }
    if name.len() > MAX_LEN {
        return Err(format!("invalid app name `{name}`: at most {MAX_LEN} characters"));
    }
    Ok(())
}

/// A validated app name used as a map key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct AppName(pub String);

impl<'de> Deserialize<'de> for AppName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(NameVisitor)
    }
}

struct NameVisitor;

impl Visitor<'_> for NameVisitor {
    type Value = AppName;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an app name")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        check_name(v).map_err(E::custom)?;
        Ok(AppName(v.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::err;

    #[test]
    fn names() {
        let long = "a".repeat(65);
        let cases: Vec<(&str, bool)> = vec![
            ("web", true),
            ("api.v2", true),
            ("Worker_1-b", true),
            ("9lives", true),
            (&long[..64], true),
            (&long, false),
            ("", false),
            ("-web", false),
            (".web", false),
            ("we b", false),
            ("wéb", false),
        ];
        for (name, ok) in cases {
            assert_eq!(check_name(name).is_ok(), ok, "{name:?}");
        }
    }

    #[test]
    fn toml_values() {
        let cases: &[(&str, &str)] = &[
            (
                "[apps.\"we b\"]\ncommand = \"x\"\n",
                "/x/sup.toml:1:7: key `apps.\"we b\"`: invalid app name `we b`: use letters, digits, `_`, `.` and `-`, starting with a letter or digit",
            ),
            (
                "[apps]\n_web = { command = \"x\" }\n",
                "/x/sup.toml:2:1: key `apps._web`: invalid app name `_web`: use letters, digits, `_`, `.` and `-`, starting with a letter or digit",
            ),
        ];
        for (src, want) in cases {
            assert_eq!(err(src), *want, "{src}");
        }
    }
}
