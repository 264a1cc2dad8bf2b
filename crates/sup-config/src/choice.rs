//! Enumerated string values (`ready`, `restart`, `logs`, ...): matched in any case, and a
//! miss is reported as serde's "unknown variant" so the error layer adds "did you mean".

use serde::de;

/// The value in `choices` whose name is `given` in any case; else an unknown-variant error
/// listing the names, with `also` (other forms, such as tables) after a `; `.
pub(crate) fn choose<T: Clone, E: de::Error>(given: &str, choices: &[(&'static str, T)], also: &str) -> Result<T, E> {
    let wanted = given.trim();
    if let Some((_, value)) = choices.iter().find(|(name, _)| name.eq_ignore_ascii_case(wanted)) {
        return Ok(value.clone());
    }
    let names: Vec<String> = choices.iter().map(|(n, _)| format!("`{n}`")).collect();
    let tail = if also.is_empty() { String::new() } else { format!("; {also}") };
    Err(E::custom(format!("unknown variant `{given}`, expected one of {}{tail}", names.join(", "))))
}

/// Deserializes a unit-only enum from its names with [`choose`].
macro_rules! string_enum {
    ($ty:ty, $expecting:expr, [$(($name:expr, $value:expr)),+ $(,)?]) => {
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$ty, E> {
                        $crate::choice::choose(v, &[$(($name, $value)),+], "")
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}
pub(crate) use string_enum;
