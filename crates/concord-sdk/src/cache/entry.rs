//! One cache entry (a value or a tombstone, with its version), the order in which entries replace
//! each other, and the bytes an entry is stored as in Redis.
//!
//! An entry outranks another when its version is higher; at the same version a value outranks a
//! tombstone. A tombstone at `w` records "the data changed at version `w`": values older than
//! `w` are stale, while a value loaded at `w` is the changed data itself and replaces it.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// What a tier holds for a key, as returned by the inspection methods of
/// [`Cache`](super::Cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached<V> {
    /// A value and the version it was loaded or set at.
    Value {
        /// The value.
        value: V,
        /// Its version.
        version: u64,
    },
    /// The mark left by an invalidation: values older than `version` are refused until it expires.
    Tombstone {
        /// The version of the change that invalidated the key.
        version: u64,
    },
}

impl<V> Cached<V> {
    /// The entry's version.
    #[must_use]
    pub fn version(&self) -> u64 {
        match self {
            Self::Value { version, .. } | Self::Tombstone { version } => *version,
        }
    }
}

/// The order of entries: `(version, 0)` for a tombstone, `(version, 1)` for a value. A write
/// replaces what is there only when its rank is strictly higher.
pub(crate) type Rank = (u64, u8);

pub(crate) fn rank(version: u64, is_value: bool) -> Rank {
    (version, u8::from(is_value))
}

/// Redis entries are `{version:020}{T|V}{json}`. The 21-byte header sorts byte-wise exactly as
/// [`Rank`] does (versions are zero-padded, `T` < `V`), so the set script compares ranks as
/// strings: Lua numbers are doubles and would lose versions above 2^53.
pub(crate) const HEADER_LEN: usize = 21;

pub(crate) fn header(version: u64, is_value: bool) -> String {
    format!("{version:020}{}", if is_value { 'V' } else { 'T' })
}

pub(crate) fn encode<V: Serialize>(version: u64, value: Option<&V>) -> Result<Vec<u8>, serde_json::Error> {
    let mut bytes = header(version, value.is_some()).into_bytes();
    if let Some(value) = value {
        serde_json::to_writer(&mut bytes, value)?;
    }
    Ok(bytes)
}

/// Why bytes found in Redis are not an entry of this cache.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("the entry header is not a version and a kind")]
    Header,
    #[error("the value does not decode: {0}")]
    Value(#[from] serde_json::Error),
}

pub(crate) fn decode<V: DeserializeOwned>(bytes: &[u8]) -> Result<Cached<V>, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Header);
    }
    let (digits, rest) = bytes.split_at(HEADER_LEN - 1);
    if !digits.iter().all(u8::is_ascii_digit) {
        return Err(DecodeError::Header);
    }
    let version = std::str::from_utf8(digits)
        .ok()
        .and_then(|digits| digits.parse::<u64>().ok())
        .ok_or(DecodeError::Header)?;
    match rest.split_first() {
        Some((b'T', [])) => Ok(Cached::Tombstone { version }),
        Some((b'V', json)) => Ok(Cached::Value {
            value: serde_json::from_slice(json)?,
            version,
        }),
        _ => Err(DecodeError::Header),
    }
}

/// The invalidation message published on the channel: `{version}:{redis key}`.
pub(crate) fn message(version: u64, redis_key: &str) -> String {
    format!("{version}:{redis_key}")
}

pub(crate) fn parse_message(payload: &str) -> Option<(u64, &str)> {
    let (version, key) = payload.split_once(':')?;
    if version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((version.parse().ok()?, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let bytes = encode(42, Some(&"hello".to_owned())).unwrap();
        assert_eq!(&bytes[..HEADER_LEN], b"00000000000000000042V");
        assert_eq!(
            decode::<String>(&bytes).unwrap(),
            Cached::Value {
                value: "hello".into(),
                version: 42
            }
        );
        let bytes = encode::<String>(u64::MAX, None).unwrap();
        assert_eq!(
            decode::<String>(&bytes).unwrap(),
            Cached::Tombstone { version: u64::MAX }
        );
    }

    #[test]
    fn headers_sort_as_ranks() {
        let ranks = [
            (0, false),
            (0, true),
            (9, false),
            (9, true),
            (10, false),
            (u64::MAX, true),
        ];
        for a in ranks {
            for b in ranks {
                assert_eq!(
                    header(a.0, a.1).cmp(&header(b.0, b.1)),
                    rank(a.0, a.1).cmp(&rank(b.0, b.1)),
                    "{a:?} {b:?}"
                );
            }
        }
    }

    #[test]
    fn foreign_bytes_are_refused() {
        for bytes in [
            &b""[..],
            b"0000000000000000004",
            b"0000000000000000004xV1",
            b"00000000000000000042X",
            b"00000000000000000042Tjunk",
            b"99999999999999999999V1",
        ] {
            assert!(decode::<u32>(bytes).is_err(), "{bytes:?}");
        }
        assert!(matches!(
            decode::<u32>(b"00000000000000000042V\"text\""),
            Err(DecodeError::Value(_))
        ));
    }

    #[test]
    fn messages_round_trip() {
        assert_eq!(parse_message(&message(7, "p:a:b")), Some((7, "p:a:b")));
        assert_eq!(parse_message("x:key"), None);
        assert_eq!(parse_message(":key"), None);
        assert_eq!(parse_message("nokey"), None);
        assert_eq!(parse_message("+1:key"), None);
    }
}
