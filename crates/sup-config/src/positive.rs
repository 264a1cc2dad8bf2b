//! Counts that must be at least 1 (`memory_limit_samples`, `reload_parallelism`).

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A `u32` of at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AtLeastOne(pub u32);

impl<'de> Deserialize<'de> for AtLeastOne {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_u32(AtLeastOneVisitor)
    }
}

struct AtLeastOneVisitor;

impl Visitor<'_> for AtLeastOneVisitor {
    type Value = AtLeastOne;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a positive integer")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        if v < 1 {
            return Err(E::custom(format!("must be at least 1, found `{v}`")));
        }
        u32::try_from(v).map(AtLeastOne).map_err(|_| E::custom(format!("must be at most {}, found `{v}`", u32::MAX)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        match i64::try_from(v) {
            Ok(v) => self.visit_i64(v),
            Err(_) => Err(E::custom(format!("must be at most {}, found `{v}`", u32::MAX))),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::testutil::{app_err, parse_app};

    #[test]
    fn toml_values() {
        assert_eq!(parse_app("").memory_limit_samples, 3);
        assert_eq!(parse_app("").reload_parallelism, 1);
        assert_eq!(parse_app("reload_parallelism = 2").reload_parallelism, 2);
        let cases: &[(&str, &str)] = &[
            (
                "reload_parallelism = 0",
                "/x/sup.toml:3:22: key `apps.web.reload_parallelism`: must be at least 1, found `0`",
            ),
            (
                "memory_limit_samples = -2",
                "/x/sup.toml:3:24: key `apps.web.memory_limit_samples`: must be at least 1, found `-2`",
            ),
            (
                "memory_limit_samples = 5000000000",
                "/x/sup.toml:3:24: key `apps.web.memory_limit_samples`: must be at most 4294967295, found `5000000000`",
            ),
            (
                "memory_limit_samples = \"3\"",
                "/x/sup.toml:3:24: key `apps.web.memory_limit_samples`: invalid type: string \"3\", expected a positive integer",
            ),
        ];
        for (line, want) in cases {
            assert_eq!(app_err(line), *want, "{line}");
        }
    }
}
