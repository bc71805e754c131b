//! The version an append expects its stream to be at.

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use std::fmt;

/// The version a writer expects the stream to be at. On the wire: `"any"`, `"no_stream"`,
/// `"exists"` or a non-negative integer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ExpectedVersion {
    /// No check.
    #[default]
    Any,
    /// The stream must have no events.
    NoStream,
    /// The stream must have at least one event.
    Exists,
    /// The stream's last event must have exactly this version (0: empty).
    Exact(u64),
}

/// An `expected_version` of none of the four forms; the text says what was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid expected_version: {0}")]
pub struct InvalidExpectedVersion(pub String);

impl ExpectedVersion {
    /// Parses the JSON form: `"any"`, `"no_stream"`, `"exists"` or a non-negative integer.
    /// Absent means `any`.
    ///
    /// # Errors
    /// [`InvalidExpectedVersion`] for any other form.
    pub fn from_json(value: Option<&Value>) -> Result<Self, InvalidExpectedVersion> {
        match value {
            None | Some(Value::Null) => Ok(Self::Any),
            Some(Value::String(s)) => Self::parse(s),
            Some(Value::Number(n)) => crate::json::as_uint(n)
                .map(Self::Exact)
                .ok_or_else(|| InvalidExpectedVersion(n.to_string())),
            Some(other) => Err(InvalidExpectedVersion(other.to_string())),
        }
    }

    /// Parses the text form used on the command line: the JSON strings or a number.
    ///
    /// # Errors
    /// [`InvalidExpectedVersion`] for any other form.
    pub fn parse(s: &str) -> Result<Self, InvalidExpectedVersion> {
        match s {
            "any" => Ok(Self::Any),
            "no_stream" => Ok(Self::NoStream),
            "exists" => Ok(Self::Exists),
            n => n
                .parse::<u64>()
                .map(Self::Exact)
                .map_err(|_| InvalidExpectedVersion(format!("{s:?}"))),
        }
    }

    /// Whether a stream whose version is `current` (0: no events) satisfies this expectation.
    #[must_use]
    pub fn admits(self, current: u64) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => current == 0,
            Self::Exists => current > 0,
            Self::Exact(v) => current == v,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::NoStream => f.write_str("no_stream"),
            Self::Exists => f.write_str("exists"),
            Self::Exact(v) => write!(f, "{v}"),
        }
    }
}

impl From<ExpectedVersion> for Value {
    fn from(expected: ExpectedVersion) -> Self {
        match expected {
            ExpectedVersion::Exact(version) => version.into(),
            other => other.to_string().into(),
        }
    }
}

impl Serialize for ExpectedVersion {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Exact(version) => serializer.serialize_u64(*version),
            other => serializer.collect_str(other),
        }
    }
}

impl<'de> Deserialize<'de> for ExpectedVersion {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Expected;
        impl Visitor<'_> for Expected {
            type Value = ExpectedVersion;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""any", "no_stream", "exists" or a non-negative integer"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ExpectedVersion, E> {
                match v {
                    "any" => Ok(ExpectedVersion::Any),
                    "no_stream" => Ok(ExpectedVersion::NoStream),
                    "exists" => Ok(ExpectedVersion::Exists),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ExpectedVersion, E> {
                Ok(ExpectedVersion::Exact(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ExpectedVersion, E> {
                serde_json::Number::from_f64(v)
                    .and_then(|n| crate::json::as_uint(&n))
                    .map(ExpectedVersion::Exact)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Float(v), &self))
            }
        }
        deserializer.deserialize_any(Expected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_wire_form_round_trips() {
        for (v, wire) in [
            (ExpectedVersion::Any, json!("any")),
            (ExpectedVersion::NoStream, json!("no_stream")),
            (ExpectedVersion::Exists, json!("exists")),
            (ExpectedVersion::Exact(7), json!(7)),
        ] {
            assert_eq!(serde_json::to_value(v).unwrap(), wire);
            assert_eq!(Value::from(v), wire);
            assert_eq!(serde_json::from_value::<ExpectedVersion>(wire.clone()).unwrap(), v);
            assert_eq!(ExpectedVersion::from_json(Some(&wire)).unwrap(), v);
        }
        assert_eq!(
            ExpectedVersion::from_json(Some(&json!(7.0))).unwrap(),
            ExpectedVersion::Exact(7)
        );
        assert_eq!(
            serde_json::from_value::<ExpectedVersion>(json!(7.0)).unwrap(),
            ExpectedVersion::Exact(7)
        );
        for bad in [json!(-1), json!(1.5), json!("latest"), json!([1]), json!(true)] {
            assert!(ExpectedVersion::from_json(Some(&bad)).is_err(), "{bad}");
            assert!(serde_json::from_value::<ExpectedVersion>(bad.clone()).is_err(), "{bad}");
        }
        assert_eq!(ExpectedVersion::from_json(None).unwrap(), ExpectedVersion::Any);
    }

    #[test]
    fn admits_checks_the_current_version() {
        assert!(ExpectedVersion::Any.admits(3));
        assert!(ExpectedVersion::NoStream.admits(0) && !ExpectedVersion::NoStream.admits(1));
        assert!(ExpectedVersion::Exists.admits(1) && !ExpectedVersion::Exists.admits(0));
        assert!(ExpectedVersion::Exact(2).admits(2) && !ExpectedVersion::Exact(2).admits(3));
    }
}
