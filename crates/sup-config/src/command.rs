//! `command`: an array of words, or a string split like a shell would.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

/// The program and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Command(pub Vec<String>);

impl Command {
    /// Refuses an empty command or an empty program name.
    fn check<E: de::Error>(words: Vec<String>) -> Result<Command, E> {
        match words.first() {
            None => Err(E::custom("must not be empty")),
            Some(program) if program.is_empty() => Err(E::custom("the program name must not be empty")),
            Some(_) => Ok(Command(words)),
        }
    }
}

impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(CommandVisitor)
    }
}

struct CommandVisitor;

impl<'de> Visitor<'de> for CommandVisitor {
    type Value = Command;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a command string or an array of strings")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let words = shlex::split(v)
            .ok_or_else(|| E::custom(format!("cannot split `{v}` into words: check its quotes and backslashes")))?;
        Command::check(words)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut words = Vec::new();
        while let Some(word) = seq.next_element::<String>()? {
            words.push(word);
        }
        Command::check(words)
    }
}

#[cfg(test)]
mod tests {
    use crate::testutil::err;

    fn words(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn toml_values() {
        let ok: &[(&str, Vec<String>)] = &[
            ("\"node server.js\"", words(&["node", "server.js"])),
            ("\"sh -c 'echo \\\"hi there\\\"'\"", words(&["sh", "-c", "echo \"hi there\""])),
            ("[\"node\", \"a b.js\"]", words(&["node", "a b.js"])),
        ];
        for (value, want) in ok {
            let src = format!("[apps.web]\ncommand = {value}\n");
            let cfg = crate::parse(&src, std::path::Path::new("/x/sup.toml")).expect(&src);
            assert_eq!(cfg.apps[0].command, *want, "{value}");
        }
        let cases: &[(&str, &str)] = &[
            (
                "\"\"",
                "/x/sup.toml:2:11: key `apps.web.command`: must not be empty",
            ),
            (
                "\"   \"",
                "/x/sup.toml:2:11: key `apps.web.command`: must not be empty",
            ),
            ("[]", "/x/sup.toml:2:11: key `apps.web.command`: must not be empty"),
            (
                "[\"\", \"x\"]",
                "/x/sup.toml:2:11: key `apps.web.command`: the program name must not be empty",
            ),
            (
                "\"node 'unterminated\"",
                "/x/sup.toml:2:11: key `apps.web.command`: cannot split `node 'unterminated` into words: check its quotes and backslashes",
            ),
            (
                "[\"node\", 3]",
                "/x/sup.toml:2:20: key `apps.web.command[1]`: invalid type: integer `3`, expected a string",
            ),
            (
                "42",
                "/x/sup.toml:2:11: key `apps.web.command`: invalid type: integer `42`, expected a command string or an array of strings",
            ),
        ];
        for (value, want) in cases {
            let src = format!("[apps.web]\ncommand = {value}\n");
            assert_eq!(err(&src), *want, "{value}");
        }
    }
}
