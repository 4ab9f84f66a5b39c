//! Durations as users write them: `"250ms"`, `"30s"`, `"1m30s"`, `"2h"`.
//!
//! One format everywhere. It is the subset of Go's duration syntax made of `ms`, `s`,
//! `m` and `h` units, so the API server's CEL `duration()` parses exactly what
//! [`Duration::parse`] parses, and range rules can be enforced server-side.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration as StdDuration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The regular expression the schema enforces; kept in sync with [`Duration::parse`].
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";

/// A non-negative duration written as a string such as `"100ms"` or `"1m30s"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(StdDuration);

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {input:?}: {reason} (write it like \"250ms\", \"30s\", \"1m30s\" or \"2h\")"
)]
pub struct DurationError {
    input: String,
    reason: &'static str,
}

impl Duration {
    /// Wraps a standard duration.
    pub const fn new(d: StdDuration) -> Self {
        Self(d)
    }

    /// A duration of `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Self(StdDuration::from_millis(ms))
    }

    /// A duration of `s` seconds.
    pub const fn from_secs(s: u64) -> Self {
        Self(StdDuration::from_secs(s))
    }

    /// The standard library duration.
    pub const fn get(self) -> StdDuration {
        self.0
    }

    /// Whole milliseconds, saturating.
    pub fn as_millis(self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }

    /// Parses a sequence of `<number><unit>` terms, units `ms`, `s`, `m`, `h`.
    pub fn parse(input: &str) -> Result<Self, DurationError> {
        let err = |reason| DurationError {
            input: input.to_owned(),
            reason,
        };
        if input.is_empty() {
            return Err(err("it is empty"));
        }
        if input.len() > 32 {
            return Err(err("it is longer than 32 characters"));
        }
        let bytes = input.as_bytes();
        let mut i = 0;
        let mut total_nanos: u128 = 0;
        while i < bytes.len() {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
                i += 1;
            }
            let number = &input[start..i];
            if number.is_empty() {
                return Err(err("a unit is not preceded by a number"));
            }
            let unit_start = i;
            while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
                i += 1;
            }
            let nanos_per_unit: u128 = match &input[unit_start..i] {
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                "" => return Err(err("a number has no unit")),
                _ => return Err(err("the unit is not one of ms, s, m, h")),
            };
            total_nanos = total_nanos.saturating_add(
                scale(number, nanos_per_unit).ok_or_else(|| err("a number is malformed"))?,
            );
        }
        let secs =
            u64::try_from(total_nanos / 1_000_000_000).map_err(|_| err("it is too large"))?;
        let nanos =
            u32::try_from(total_nanos % 1_000_000_000).map_err(|_| err("it is too large"))?;
        Ok(Self(StdDuration::new(secs, nanos)))
    }
}

/// `number * unit` in nanoseconds, where `number` is `digits[.digits]`.
fn scale(number: &str, unit: u128) -> Option<u128> {
    let (whole, frac) = match number.split_once('.') {
        Some((w, f)) if !w.is_empty() && !f.is_empty() && !f.contains('.') => (w, f),
        Some(_) => return None,
        None => (number, ""),
    };
    let whole: u128 = whole.parse().ok()?;
    let mut value = whole.checked_mul(unit)?;
    let mut place = unit;
    for digit in frac.bytes() {
        place /= 10;
        value = value.checked_add(u128::from(digit - b'0') * place)?;
    }
    Some(value)
}

impl fmt::Display for Duration {
    /// The shortest of `Nh`, `Nm`, `Ns` or `Nms` that is exact; sub-millisecond parts are dropped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, per) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
            if ms.is_multiple_of(per) {
                return write!(f, "{}{unit}", ms / per);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl std::str::FromStr for Duration {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = Cow::<'de, str>::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "maxLength": 32,
            "pattern": DURATION_PATTERN,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_compounds() {
        assert_eq!(
            Duration::parse("250ms").expect("valid"),
            Duration::from_millis(250)
        );
        assert_eq!(
            Duration::parse("30s").expect("valid"),
            Duration::from_secs(30)
        );
        assert_eq!(
            Duration::parse("1m30s").expect("valid"),
            Duration::from_secs(90)
        );
        assert_eq!(
            Duration::parse("2h").expect("valid"),
            Duration::from_secs(7200)
        );
        assert_eq!(
            Duration::parse("1.5s").expect("valid"),
            Duration::from_millis(1500)
        );
        assert_eq!(
            Duration::parse("0s").expect("valid"),
            Duration::from_secs(0)
        );
    }

    #[test]
    fn rejects_what_the_schema_pattern_rejects() {
        for bad in [
            "", "10", "s", "10sec", "1d", "-1s", "1..5s", ".5s", "5.s", "1 s", "1s ",
        ] {
            let err = Duration::parse(bad).expect_err(bad);
            assert!(err.to_string().contains("invalid duration"), "{err}");
        }
    }

    #[test]
    fn displays_the_shortest_exact_form() {
        assert_eq!(Duration::from_millis(100).to_string(), "100ms");
        assert_eq!(Duration::from_secs(90).to_string(), "90s");
        assert_eq!(Duration::from_secs(300).to_string(), "5m");
        assert_eq!(Duration::from_secs(7200).to_string(), "2h");
        assert_eq!(Duration::from_millis(0).to_string(), "0s");
    }

    #[test]
    fn round_trips_through_serde() {
        let d: Duration = serde_json::from_str("\"1m30s\"").expect("valid");
        assert_eq!(serde_json::to_string(&d).expect("serializes"), "\"90s\"");
        let err = serde_json::from_str::<Duration>("\"3 days\"").expect_err("invalid");
        assert!(err.to_string().contains("3 days"), "{err}");
    }
}
