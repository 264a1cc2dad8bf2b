//! `ready`: how supd learns that a worker is ready.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

/// How readiness of a worker is detected.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ReadyCheck {
    /// Ready as soon as it is spawned.
    #[default]
    None,
    /// The worker sends `READY=1` over the notify socket (sd_notify).
    Notify,
    /// The worker calls `process.send('ready')` (PM2's `wait_ready`).
    Pm2,
    /// A Node cluster worker's server is listening (PM2's cluster mode without `wait_ready`).
    Listening,
    /// A process of the worker's own tree waits for connections on every one of its slot's sockets.
    Accepting,
    /// An HTTP GET on this path answers 2xx.
    Http {
        /// Request path; starts with `/`.
        path: String,
    },
    /// A TCP connect to the listen address succeeds.
    Tcp,
}

const FORMS: &str =
    "\"none\", \"notify\", \"pm2\", \"listening\", \"accepting\", { http = \"/health\" } or { tcp = true }";
/// The table forms, named after a string that matched no kind.
const TABLES: &str = "or a table: ready = { http = \"/health\" } or ready = { tcp = true }";

impl<'de> Deserialize<'de> for ReadyCheck {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ReadyVisitor)
    }
}

struct ReadyVisitor;

/// The keys of the table forms.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Kind {
    Http,
    Tcp,
}

impl<'de> Visitor<'de> for ReadyVisitor {
    type Value = ReadyCheck;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "one of {FORMS}")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let choices = [
            ("none", ReadyCheck::None),
            ("notify", ReadyCheck::Notify),
            ("pm2", ReadyCheck::Pm2),
            ("listening", ReadyCheck::Listening),
            ("accepting", ReadyCheck::Accepting),
        ];
        crate::choice::choose(v, &choices, TABLES)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        // A field-identifier enum makes toml blame the key itself for a typo.
        let Some(kind) = map.next_key::<Kind>()? else {
            return Err(de::Error::custom(format!("expected {FORMS}, found an empty table")));
        };
        let check = match kind {
            Kind::Http => {
                let path: String = map.next_value()?;
                if !path.starts_with('/') {
                    return Err(de::Error::custom(format!("http path must start with `/`, found `{path}`")));
                }
                ReadyCheck::Http { path }
            }
            Kind::Tcp => {
                if !map.next_value::<bool>()? {
                    return Err(de::Error::custom("`tcp = false` is not a check: use ready = \"none\""));
                }
                ReadyCheck::Tcp
            }
        };
        if map.next_key::<String>()?.is_some() {
            return Err(de::Error::custom("expected exactly one of `http` or `tcp` in the table"));
        }
        Ok(check)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{app_err, parse_app};

    #[test]
    fn toml_values() {
        let ok: &[(&str, ReadyCheck)] = &[
            ("", ReadyCheck::None),
            ("ready = \"none\"", ReadyCheck::None),
            ("ready = \"notify\"", ReadyCheck::Notify),
            ("ready = \"pm2\"", ReadyCheck::Pm2),
            ("ready = \"Notify\"", ReadyCheck::Notify),
            ("ready = \"NONE\"", ReadyCheck::None),
            ("ready = \"PM2\"", ReadyCheck::Pm2),
            ("listen = [\"127.0.0.1:3000\"]\nnode_cluster = true\nready = \"listening\"", ReadyCheck::Listening),
            ("listen = [\"127.0.0.1:3000\"]\nready = \"accepting\"", ReadyCheck::Accepting),
            ("port = 80\nready = { http = \"/health\" }", ReadyCheck::Http { path: "/health".to_string() }),
            ("port = 80\nready = { tcp = true }", ReadyCheck::Tcp),
        ];
        for (line, want) in ok {
            assert_eq!(parse_app(line).ready, *want, "{line}");
        }
        let cases: &[(&str, &str)] = &[
            (
                "ready = \"http\"",
                "/x/sup.toml:3:9: key `apps.web.ready`: unknown value `http`, expected one of `none`, `notify`, `pm2`, `listening`, `accepting`; or a table: ready = { http = \"/health\" } or ready = { tcp = true }",
            ),
            (
                "ready = \"notfy\"",
                "/x/sup.toml:3:9: key `apps.web.ready`: unknown value `notfy`, expected one of `none`, `notify`, `pm2`, `listening`, `accepting`; or a table: ready = { http = \"/health\" } or ready = { tcp = true } (did you mean `notify`?)",
            ),
            (
                "ready = \"Listenin\"",
                "/x/sup.toml:3:9: key `apps.web.ready`: unknown value `Listenin`, expected one of `none`, `notify`, `pm2`, `listening`, `accepting`; or a table: ready = { http = \"/health\" } or ready = { tcp = true } (did you mean `listening`?)",
            ),
            (
                "ready = { http = \"health\" }",
                "/x/sup.toml:3:9: key `apps.web.ready`: http path must start with `/`, found `health`",
            ),
            (
                "ready = { tcp = false }",
                "/x/sup.toml:3:9: key `apps.web.ready`: `tcp = false` is not a check: use ready = \"none\"",
            ),
            (
                "ready = { htp = \"/\" }",
                "/x/sup.toml:3:11: key `apps.web.ready.htp`: unknown key (did you mean `http`?)",
            ),
            (
                "ready = { http = \"/\", tcp = true }",
                "/x/sup.toml:3:9: key `apps.web.ready`: expected exactly one of `http` or `tcp` in the table",
            ),
            (
                "ready = 1",
                "/x/sup.toml:3:9: key `apps.web.ready`: invalid type: integer `1`, expected one of \"none\", \"notify\", \"pm2\", \"listening\", \"accepting\", { http = \"/health\" } or { tcp = true }",
            ),
        ];
        for (line, want) in cases {
            assert_eq!(app_err(line), *want, "{line}");
        }
    }
}
