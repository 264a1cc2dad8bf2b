//! `control_socket_mode`: a string of octal digits such as `"0660"`.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A permission mode in a TOML value; integers are refused because `660` reads as decimal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ModeValue(pub u32);

/// Parses `"0660"` or `"660"` into a mode of at most `0o777`.
pub(crate) fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.trim();
    if digits.is_empty() || digits.len() > 4 || !digits.chars().all(|c| ('0'..='7').contains(&c)) {
        return Err(format!("expected octal digits such as \"0660\", found `{s}`"));
    }
    let mode = u32::from_str_radix(digits, 8).map_err(|e| format!("invalid mode `{s}`: {e}"))?;
    if mode > 0o777 {
        return Err(format!("must be at most \"0777\", found `{s}`"));
    }
    Ok(mode)
}

impl<'de> Deserialize<'de> for ModeValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ModeVisitor)
    }
}

struct ModeVisitor;

impl Visitor<'_> for ModeVisitor {
    type Value = ModeValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string of octal digits such as \"0660\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        parse_mode(v).map(ModeValue).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Err(E::custom(format!("expected a string of octal digits, found number `{v}`: use a string such as \"0660\"")))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Err(E::custom(format!("expected a string of octal digits, found number `{v}`: use a string such as \"0660\"")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{err, parse_ok};

    #[test]
    fn parses() {
        let cases: &[(&str, Result<u32, &str>)] = &[
            ("0660", Ok(0o660)),
            ("660", Ok(0o660)),
            ("0600", Ok(0o600)),
            ("777", Ok(0o777)),
            ("0", Ok(0)),
            ("1777", Err("must be at most \"0777\", found `1777`")),
            ("0668", Err("expected octal digits such as \"0660\", found `0668`")),
            ("rw-rw----", Err("expected octal digits such as \"0660\", found `rw-rw----`")),
            ("", Err("expected octal digits such as \"0660\", found ``")),
            ("00660", Err("expected octal digits such as \"0660\", found `00660`")),
        ];
        for (input, want) in cases {
            assert_eq!(parse_mode(input), want.map_err(str::to_string), "{input:?}");
        }
    }

    #[test]
    fn toml_values() {
        let cfg = parse_ok("[supervisor]\ncontrol_socket_mode = \"600\"\n");
        assert_eq!(cfg.supervisor.control_socket_mode, 0o600);
        assert_eq!(parse_ok("").supervisor.control_socket_mode, 0o660);
        let cases: &[(&str, &str)] = &[
            (
                "[supervisor]\ncontrol_socket_mode = 660\n",
                "/x/sup.toml:2:23: key `supervisor.control_socket_mode`: expected a string of octal digits, found number `660`: use a string such as \"0660\"",
            ),
            (
                "[supervisor]\ncontrol_socket_mode = \"1777\"\n",
                "/x/sup.toml:2:23: key `supervisor.control_socket_mode`: must be at most \"0777\", found `1777`",
            ),
        ];
        for (src, want) in cases {
            assert_eq!(err(src), *want, "{src}");
        }
    }
}
