//! Signal names: `"SIGTERM"`, `"TERM"`, `"sigterm"`.

use std::fmt;
use std::str::FromStr;

use nix::sys::signal::Signal;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Parses a signal name, with or without the `SIG` prefix, in any case.
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    let upper = s.trim().to_ascii_uppercase();
    let name = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    Signal::from_str(&name).map_err(|_| format!("unknown signal `{s}`"))
}

/// A signal in a TOML value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SignalValue(pub Signal);

impl<'de> Deserialize<'de> for SignalValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(SignalVisitor)
    }
}

struct SignalVisitor;

/// Signal names offered as suggestions for typos.
const NAMES: &[&str] = &[
    "SIGHUP",
    "SIGINT",
    "SIGQUIT",
    "SIGILL",
    "SIGTRAP",
    "SIGABRT",
    "SIGBUS",
    "SIGFPE",
    "SIGKILL",
    "SIGUSR1",
    "SIGSEGV",
    "SIGUSR2",
    "SIGPIPE",
    "SIGALRM",
    "SIGTERM",
    "SIGCHLD",
    "SIGCONT",
    "SIGSTOP",
    "SIGTSTP",
    "SIGTTIN",
    "SIGTTOU",
    "SIGURG",
    "SIGXCPU",
    "SIGXFSZ",
    "SIGVTALRM",
    "SIGPROF",
    "SIGWINCH",
    "SIGIO",
    "SIGSYS",
];

impl Visitor<'_> for SignalVisitor {
    type Value = SignalValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a signal name such as \"SIGTERM\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        parse_signal(v).map(SignalValue).map_err(|_| {
            // Reported as an unknown variant so the error layer suggests a close name.
            let upper = v.trim().to_ascii_uppercase();
            let shown = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
            E::unknown_variant(&shown, NAMES)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{app_err, parse_app};

    #[test]
    fn parses() {
        let cases: &[(&str, Result<Signal, &str>)] = &[
            ("SIGTERM", Ok(Signal::SIGTERM)),
            ("TERM", Ok(Signal::SIGTERM)),
            ("sigterm", Ok(Signal::SIGTERM)),
            ("SIGINT", Ok(Signal::SIGINT)),
            ("quit", Ok(Signal::SIGQUIT)),
            ("HUP", Ok(Signal::SIGHUP)),
            ("SIGUSR1", Ok(Signal::SIGUSR1)),
            ("usr2", Ok(Signal::SIGUSR2)),
            ("KILL", Ok(Signal::SIGKILL)),
            ("FOO", Err("unknown signal `FOO`")),
            ("", Err("unknown signal ``")),
        ];
        for (input, want) in cases {
            assert_eq!(parse_signal(input), want.map_err(str::to_string), "{input:?}");
        }
    }

    #[test]
    fn toml_values() {
        assert_eq!(parse_app("").stop_signal, Signal::SIGTERM);
        assert_eq!(parse_app("stop_signal = \"int\"").stop_signal, Signal::SIGINT);
        let cases: &[(&str, &str)] = &[
            (
                "stop_signal = \"TREM\"",
                "/x/sup.toml:3:15: key `apps.web.stop_signal`: unknown value `SIGTREM` (did you mean `SIGTERM`?)",
            ),
            (
                "stop_signal = 15",
                "/x/sup.toml:3:15: key `apps.web.stop_signal`: invalid type: integer `15`, expected a signal name such as \"SIGTERM\"",
            ),
        ];
        for (line, want) in cases {
            assert_eq!(app_err(line), *want, "{line}");
        }
    }
}
