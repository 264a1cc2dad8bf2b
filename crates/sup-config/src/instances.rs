//! `instances`: a count from 1 to 4096, or `"max"` for one per available CPU.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// The most instances one app may ask for; more is almost certainly a typo.
pub(crate) const MAX_INSTANCES: u32 = 4096;

/// CPUs this process may use (affinity and cgroup quota included), at least 1.
pub fn available_cpus() -> u32 {
    std::thread::available_parallelism().map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX)).unwrap_or(1).max(1)
}

/// The `instances` value before `"max"` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Instances {
    /// An explicit count.
    Count(u32),
    /// One per available CPU.
    Max,
}

impl Instances {
    /// The number of instances to run.
    pub fn resolve(self) -> u32 {
        match self {
            Instances::Count(n) => n,
            Instances::Max => available_cpus(),
        }
    }
}

impl<'de> Deserialize<'de> for Instances {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(InstancesVisitor)
    }
}

struct InstancesVisitor;

impl Visitor<'_> for InstancesVisitor {
    type Value = Instances;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a positive integer or \"max\"")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        if v < 1 {
            return Err(E::custom(format!("must be at least 1, found `{v}`")));
        }
        match u32::try_from(v) {
            Ok(n) if n <= MAX_INSTANCES => Ok(Instances::Count(n)),
            _ => Err(E::custom(format!("must be at most {MAX_INSTANCES}, found `{v}`"))),
        }
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        if v.trim().eq_ignore_ascii_case("max") {
            Ok(Instances::Max)
        } else {
            Err(E::custom(format!("expected a positive integer or \"max\", found `{v}`")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{app_err, parse_app};

    #[test]
    fn cpus() {
        assert!(available_cpus() >= 1);
    }

    #[test]
    fn toml_values() {
        let ok: &[(&str, u32)] = &[
            ("", 1),
            ("instances = 4", 4),
            ("instances = 4096", 4096),
            ("instances = \"max\"", available_cpus()),
            ("instances = \"MAX\"", available_cpus()),
        ];
        for (line, want) in ok {
            assert_eq!(parse_app(line).instances, *want, "{line}");
        }
        let cases: &[(&str, &str)] = &[
            (
                "instances = \"lots\"",
                "/x/sup.toml:3:13: key `apps.web.instances`: expected a positive integer or \"max\", found `lots`",
            ),
            (
                "instances = 0",
                "/x/sup.toml:3:13: key `apps.web.instances`: must be at least 1, found `0`",
            ),
            (
                "instances = -3",
                "/x/sup.toml:3:13: key `apps.web.instances`: must be at least 1, found `-3`",
            ),
            (
                "instances = 5000",
                "/x/sup.toml:3:13: key `apps.web.instances`: must be at most 4096, found `5000`",
            ),
            (
                "instances = 2.5",
                "/x/sup.toml:3:13: key `apps.web.instances`: invalid type: floating point `2.5`, expected a positive integer or \"max\"",
            ),
        ];
        for (line, want) in cases {
            assert_eq!(app_err(line), *want, "{line}");
        }
    }
}
