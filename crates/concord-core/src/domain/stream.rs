//! Stream names and their categories.

use super::ValidationError;
use std::fmt;

/// The longest stream name accepted, in bytes.
pub const MAX_STREAM_NAME_LEN: usize = 200;

/// A stream name: 1 to 200 characters of ASCII letters, digits and `-_.:@`, optionally after one
/// leading `$` that marks a system stream (`$vault-audit`). The category is the part before the
/// first `-` (`order-42` is in `order`), so the alphabet keeps names safe in URLs and SQL `LIKE`
/// patterns alike.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamName(String);

impl StreamName {
    /// Parses a stream name, rejecting anything outside the alphabet or length.
    ///
    /// # Errors
    /// [`ValidationError::StreamName`] with the reason.
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let body = raw.strip_prefix('$').unwrap_or(raw);
        if raw.is_empty() || body.is_empty() {
            return Err(ValidationError::StreamName("must not be empty".into()));
        }
        if raw.len() > MAX_STREAM_NAME_LEN {
            return Err(ValidationError::StreamName(format!(
                "longer than {MAX_STREAM_NAME_LEN} characters"
            )));
        }
        if let Some(bad) = body.chars().find(|c| !is_name_char(*c)) {
            return Err(ValidationError::StreamName(format!(
                "character {bad:?} is not allowed (letters, digits and -_.:@ only)"
            )));
        }
        if body.starts_with('-') {
            return Err(ValidationError::StreamName("must not start with '-'".into()));
        }
        Ok(Self(raw.to_owned()))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part of the name before the first `-`, or the whole name.
    #[must_use]
    pub fn category(&self) -> &str {
        self.0.split_once('-').map_or(&self.0, |(c, _)| c)
    }

    /// A hash of the name that is stable across processes, versions and languages (FNV-1a, 32
    /// bits), used to split streams between the members of a consumer group.
    #[must_use]
    pub fn partition_hash(&self) -> u32 {
        fnv1a32(self.0.as_bytes())
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@')
}

/// FNV-1a over bytes, 32-bit.
#[must_use]
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A category filter for reads of the global log. Same alphabet as a stream name, without `-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Category(String);

impl Category {
    /// # Errors
    /// [`ValidationError::StreamName`] when the category is not a valid name or contains `-`.
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let name = StreamName::parse(raw)?;
        if raw.contains('-') {
            return Err(ValidationError::StreamName("a category must not contain '-'".into()));
        }
        Ok(Self(name.0))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A member's share of a consumer group: streams whose hash modulo `size` equals `member`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub member: u32,
    pub size: u32,
}

impl Partition {
    /// # Errors
    /// When `size` is 0 or `member >= size`.
    pub fn new(member: u32, size: u32) -> Result<Self, ValidationError> {
        if size == 0 || member >= size {
            return Err(ValidationError::Parameter {
                name: "member",
                reason: format!("member must be below size (member {member}, size {size})"),
            });
        }
        Ok(Self { member, size })
    }

    #[must_use]
    pub fn owns(&self, stream: &StreamName) -> bool {
        stream.partition_hash() % self.size == self.member
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_names_of_the_alphabet() {
        for ok in ["order-42", "a", "$vault-audit", "user@x.y:1_2", &"x".repeat(200)] {
            assert!(StreamName::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_names_outside_the_alphabet_or_length() {
        for bad in ["", "$", "a b", "a/b", "ü", "-x", "a\n", &"x".repeat(201), "$$x", "a%2F"] {
            assert!(StreamName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn category_is_the_part_before_the_first_dash() {
        assert_eq!(StreamName::parse("order-42-x").unwrap().category(), "order");
        assert_eq!(StreamName::parse("order").unwrap().category(), "order");
        assert_eq!(StreamName::parse("$vault-audit").unwrap().category(), "$vault");
    }

    #[test]
    fn partition_hash_is_stable() {
        // FNV-1a 32 reference values: a changed hash would reshuffle every consumer group.
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn partitions_split_streams_exactly_once() {
        let parts: Vec<_> = (0..3).map(|m| Partition::new(m, 3).unwrap()).collect();
        for i in 0..100 {
            let s = StreamName::parse(&format!("s-{i}")).unwrap();
            assert_eq!(parts.iter().filter(|p| p.owns(&s)).count(), 1);
        }
        assert!(Partition::new(3, 3).is_err());
        assert!(Partition::new(0, 0).is_err());
    }
}
