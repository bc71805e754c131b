//! JSON numbers as JSON sees them: `5` and `5.0` are the same number, and JSON Schema calls both
//! an integer. serde's integer fields take only the first; these `deserialize_with` helpers take
//! both, so a client whose encoder writes whole numbers with a fraction is not refused.

use serde::de::{self, Deserialize, Deserializer};
use serde_json::Number;

/// The whole number `n` is, when it is one (`5`, `5.0`, `5e2`) and fits `T`.
fn whole<T: TryFrom<u64>>(n: &Number) -> Option<T> {
    let v = match n.as_u64() {
        Some(v) => v,
        None => {
            let f = n.as_f64()?;
            // 2^53: beyond it an f64 no longer holds every whole number exactly.
            if f.fract() != 0.0 || !(0.0..=9_007_199_254_740_992.0).contains(&f) {
                return None;
            }
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let v = f as u64;
            v
        }
    };
    T::try_from(v).ok()
}

/// A non-negative whole number, written with or without a fraction of zero.
///
/// # Errors
/// Anything else, or a number too large for `T`.
pub fn uint<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    let n = Number::deserialize(deserializer)?;
    whole(&n)
        .ok_or_else(|| de::Error::invalid_value(de::Unexpected::Other(&n.to_string()), &"a non-negative whole number"))
}

/// [`uint`] for an optional field (absent or `null`: `None`).
///
/// # Errors
/// As [`uint`].
pub fn opt_uint<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    match Option::<Number>::deserialize(deserializer)? {
        None => Ok(None),
        Some(n) => whole(&n).map(Some).ok_or_else(|| {
            de::Error::invalid_value(de::Unexpected::Other(&n.to_string()), &"a non-negative whole number")
        }),
    }
}

/// The whole number a JSON number is, for code that reads a `serde_json::Value`.
#[must_use]
pub fn as_uint(n: &Number) -> Option<u64> {
    whole(n)
}

/// For `Option<serde_json::Value>` fields with `#[serde(default)]`: a member that is there holds
/// a value, `null` included (`Option<Value>` alone reads `null` as absent).
///
/// # Errors
/// The deserializer's.
pub fn present_value<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(deserializer).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Body {
        #[serde(deserialize_with = "uint")]
        n: u32,
        #[serde(default, deserialize_with = "opt_uint")]
        m: Option<u64>,
    }

    fn parse(json: &str) -> Result<Body, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn whole_numbers_are_taken_with_or_without_a_fraction() {
        assert_eq!(parse(r#"{"n": 5}"#).unwrap(), Body { n: 5, m: None });
        assert_eq!(parse(r#"{"n": 5.0, "m": 7e2}"#).unwrap(), Body { n: 5, m: Some(700) });
        assert_eq!(parse(r#"{"n": 0, "m": null}"#).unwrap(), Body { n: 0, m: None });
        for bad in [
            r#"{"n": 5.5}"#,
            r#"{"n": -1}"#,
            r#"{"n": -1.0}"#,
            r#"{"n": 4294967296}"#,
            r#"{"n": "5"}"#,
            r#"{"n": 1e300}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
