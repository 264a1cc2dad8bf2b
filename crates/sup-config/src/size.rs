//! Sizes such as `"512M"`, `"1.5G"`, `"64KiB"`; units are 1024-based like PM2's.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Parses a size: a number with an optional K/M/G/T unit (1024-based, case-insensitive,
/// optional `B`/`iB` suffix); a bare number is bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let trimmed = s.trim();
    let split = trimmed.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "invalid size `{s}`: expected a number with an optional unit K, M, G or T, such as \"512M\""
            ))
        }
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits_ok =
        !whole.is_empty() && whole.chars().all(|c| c.is_ascii_digit()) && fraction.chars().all(|c| c.is_ascii_digit());
    if !digits_ok {
        return Err(format!(
            "invalid size `{s}`: expected a number with an optional unit K, M, G or T, such as \"512M\""
        ));
    }
    let too_large = || format!("size `{s}` is too large");
    let whole: u128 = whole.parse().map_err(|_| too_large())?;
    let mut bytes = whole << shift;
    if !fraction.is_empty() {
        // Exact decimal arithmetic: "1.5G" must be exactly 1.5 * 2^30 bytes.
        let fraction = &fraction[..fraction.len().min(18)];
        let numerator: u128 = fraction.parse().map_err(|_| too_large())?;
        let denominator = 10u128.pow(fraction.len() as u32);
        let part = (numerator << shift) / denominator;
        if shift == 0 && numerator != 0 {
            return Err(format!("invalid size `{s}`: bytes must be a whole number"));
        }
        bytes += part;
    }
    u64::try_from(bytes).map_err(|_| too_large())
}

/// A size in a TOML value: a string with a unit, or an integer number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SizeValue(pub u64);

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SizeVisitor)
    }
}

struct SizeVisitor;

impl Visitor<'_> for SizeVisitor {
    type Value = SizeValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size such as \"512M\" or a number of bytes")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        parse_size(v).map(SizeValue).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(SizeValue(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        u64::try_from(v).map(SizeValue).map_err(|_| E::custom(format!("expected a size such as \"512M\", found `{v}`")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{app_err, parse_app};

    const M: u64 = 1 << 20;

    #[test]
    fn parses() {
        let bad = |s: &str| {
            Err(format!("invalid size `{s}`: expected a number with an optional unit K, M, G or T, such as \"512M\""))
        };
        let cases: Vec<(&str, Result<u64, String>)> = vec![
            ("100", Ok(100)),
            ("100b", Ok(100)),
            ("64K", Ok(64 << 10)),
            ("512M", Ok(512 * M)),
            ("512m", Ok(512 * M)),
            ("512MB", Ok(512 * M)),
            ("512MiB", Ok(512 * M)),
            ("512 mib", Ok(512 * M)),
            ("1G", Ok(1 << 30)),
            ("1.5G", Ok(3 << 29)),
            ("2T", Ok(2 << 40)),
            ("0", Ok(0)),
            ("", bad("")),
            ("M", bad("M")),
            ("12X", bad("12X")),
            ("-1M", bad("-1M")),
            ("1.2.3M", bad("1.2.3M")),
            ("1.5", Err("invalid size `1.5`: bytes must be a whole number".to_string())),
            ("99999999999T", Err("size `99999999999T` is too large".to_string())),
        ];
        for (input, want) in cases {
            assert_eq!(parse_size(input), want, "{input:?}");
        }
    }

    #[test]
    fn toml_values() {
        assert_eq!(parse_app("memory_limit = \"512M\"").memory_limit, Some(512 * M));
        assert_eq!(parse_app("memory_limit = 4096").memory_limit, Some(4096));
        let cases: &[(&str, &str)] = &[
            (
                "memory_limit = \"lots\"",
                "/x/sup.toml:3:16: key `apps.web.memory_limit`: invalid size `lots`: expected a number with an optional unit K, M, G or T, such as \"512M\"",
            ),
            (
                "memory_limit = -5",
                "/x/sup.toml:3:16: key `apps.web.memory_limit`: expected a size such as \"512M\", found `-5`",
            ),
            (
                "memory_limit = 0",
                "/x/sup.toml:3:16: key `apps.web.memory_limit`: must be greater than zero",
            ),
        ];
        for (line, want) in cases {
            assert_eq!(app_err(line), *want, "{line}");
        }
    }
}
