//! The names a projection is known by: [`ProjectionName`], the key of its checkpoint row, and
//! [`TableName`], the name its readers query. Both are SQL identifiers spliced into statements,
//! so only a valid one can be built.

use std::fmt;

/// Longest projection name, in bytes.
pub const MAX_PROJECTION_NAME_LEN: usize = 63;
/// Longest table name, in bytes: with the rebuild suffix `__r<generation>` (at most 23 bytes)
/// every physical table name stays within PostgreSQL's 63-byte identifier limit.
pub const MAX_TABLE_NAME_LEN: usize = 40;
/// Longest physical table name: PostgreSQL's identifier limit.
const MAX_PHYSICAL_LEN: usize = 63;
/// Table name prefixes that belong to the databases or to Concord itself.
const RESERVED_PREFIXES: [&str; 3] = ["sqlite_", "pg_", "concord_"];

/// Which of the two names an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// A [`ProjectionName`].
    Projection,
    /// A [`TableName`].
    Table,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Projection => "projection name",
            Self::Table => "table name",
        })
    }
}

/// A name that breaks the identifier rules. Every variant is a mistake in the service's
/// configuration or code: fix the name; retrying cannot help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("the {kind} is empty")]
    Empty {
        /// Which name.
        kind: NameKind,
    },
    /// The name is longer than its limit ([`MAX_PROJECTION_NAME_LEN`], [`MAX_TABLE_NAME_LEN`]).
    #[error("the {kind} {name:?} is longer than {max} bytes")]
    TooLong {
        /// Which name.
        kind: NameKind,
        /// The name given.
        name: String,
        /// The limit.
        max: usize,
    },
    /// The name does not start with a lowercase ASCII letter.
    #[error("the {kind} {name:?} must start with a lowercase letter a-z")]
    InvalidStart {
        /// Which name.
        kind: NameKind,
        /// The name given.
        name: String,
    },
    /// The name holds a character other than `a-z`, `0-9` and `_`. Upper case is refused so that
    /// the quoted name the runner uses and the unquoted name a reader types are the same one
    /// (PostgreSQL folds unquoted names to lower case).
    #[error("the {kind} {name:?} holds {character:?}; only a-z, 0-9 and _ are allowed")]
    InvalidCharacter {
        /// Which name.
        kind: NameKind,
        /// The name given.
        name: String,
        /// The first character refused.
        character: char,
    },
    /// The name holds `__`, which the runner reserves for the physical tables of a read model
    /// (`<table>__r<generation>`), or ends with `_`, which could form it with that suffix.
    #[error("the {kind} {name:?} holds \"__\" or ends with \"_\"; both are reserved")]
    ReservedSeparator {
        /// Which name.
        kind: NameKind,
        /// The name given.
        name: String,
    },
    /// A table name starts with a prefix that belongs to the database (`sqlite_`, `pg_`) or to
    /// Concord (`concord_`).
    #[error("the {kind} {name:?} starts with the reserved prefix {prefix:?}")]
    ReservedPrefix {
        /// Which name.
        kind: NameKind,
        /// The name given.
        name: String,
        /// The prefix found.
        prefix: &'static str,
    },
}

fn check_identifier(kind: NameKind, name: &str, max: usize) -> Result<(), NameError> {
    let Some(first) = name.chars().next() else {
        return Err(NameError::Empty { kind });
    };
    if name.len() > max {
        return Err(NameError::TooLong {
            kind,
            name: name.to_owned(),
            max,
        });
    }
    if let Some(character) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_'))
    {
        return Err(NameError::InvalidCharacter {
            kind,
            name: name.to_owned(),
            character,
        });
    }
    if !first.is_ascii_lowercase() {
        return Err(NameError::InvalidStart {
            kind,
            name: name.to_owned(),
        });
    }
    if name.contains("__") || name.ends_with('_') {
        return Err(NameError::ReservedSeparator {
            kind,
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// The name of a projection: the key of its row in `concord_projection_checkpoints`. 1–63 bytes
/// of `a-z`, `0-9` and `_`, starting with a letter, without `__` and not ending with `_`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProjectionName(String);

impl ProjectionName {
    /// Checks `name`.
    ///
    /// # Errors
    /// A [`NameError`] saying which rule the name breaks.
    pub fn parse(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        check_identifier(NameKind::Projection, &name, MAX_PROJECTION_NAME_LEN)?;
        Ok(Self(name))
    }

    /// The name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key of the checkpoint row of this projection's unfinished rebuild. A `.` never occurs
    /// in a projection name, so it cannot collide with another projection's row.
    pub(crate) fn rebuild_key(&self) -> String {
        format!("{}.rebuild", self.0)
    }
}

impl fmt::Display for ProjectionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ProjectionName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A table name, safe to splice into SQL.
///
/// A service names its read model with [`TableName::parse`]: 1–40 bytes of `a-z`, `0-9` and
/// `_`, starting with a letter, without `__`, not ending with `_` and not starting with
/// `sqlite_`, `pg_` or `concord_`. That name is the view readers query. The tables behind it,
/// which the runner hands to [`Projection`](super::Projection), are named
/// `<name>__r<generation>`; only the runner builds those.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName(String);

impl TableName {
    /// Checks `name`.
    ///
    /// # Errors
    /// A [`NameError`] saying which rule the name breaks.
    pub fn parse(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        check_identifier(NameKind::Table, &name, MAX_TABLE_NAME_LEN)?;
        if let Some(prefix) = RESERVED_PREFIXES.into_iter().find(|p| name.starts_with(p)) {
            return Err(NameError::ReservedPrefix {
                kind: NameKind::Table,
                name,
                prefix,
            });
        }
        Ok(Self(name))
    }

    /// The physical table of generation `generation` of the read model named `self`.
    pub(crate) fn generation(&self, generation: u64) -> Self {
        Self(format!("{}__r{generation}", self.0))
    }

    /// Reads back a physical table name stored in a checkpoint row: `<name>__r<digits>` where
    /// `<name>` is a valid table name. Anything else was not written by the runner.
    pub(crate) fn parse_physical(stored: &str) -> Option<Self> {
        let (name, generation) = stored.rsplit_once("__r")?;
        let valid = stored.len() <= MAX_PHYSICAL_LEN
            && !generation.is_empty()
            && generation.bytes().all(|b| b.is_ascii_digit())
            && Self::parse(name).is_ok();
        valid.then(|| Self(stored.to_owned()))
    }

    /// The bare name, for deriving the names of indexes and constraints (`{name}_by_owner`).
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name double-quoted, ready to splice into a statement: `"balances__r1"`. The
    /// identifier rules leave nothing inside that needs escaping.
    #[must_use]
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for TableName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_names_parse() {
        for name in ["balances", "a", "order_totals_2", &"x".repeat(MAX_TABLE_NAME_LEN)] {
            assert_eq!(TableName::parse(name).unwrap().as_str(), name);
            assert_eq!(ProjectionName::parse(name).unwrap().as_str(), name);
        }
        assert!(ProjectionName::parse("x".repeat(MAX_PROJECTION_NAME_LEN)).is_ok());
        assert!(ProjectionName::parse("concord_stats").is_ok());
    }

    #[test]
    fn each_rule_has_its_error() {
        let t = NameKind::Table;
        assert_eq!(TableName::parse(""), Err(NameError::Empty { kind: t }));
        assert!(matches!(
            TableName::parse("x".repeat(MAX_TABLE_NAME_LEN + 1)),
            Err(NameError::TooLong {
                max: MAX_TABLE_NAME_LEN,
                ..
            })
        ));
        assert!(matches!(
            TableName::parse("Balances"),
            Err(NameError::InvalidCharacter { character: 'B', .. })
        ));
        for bad in ["a-b", "a b", "a\"b", "a;drop", "é", "a.b"] {
            assert!(
                matches!(TableName::parse(bad), Err(NameError::InvalidCharacter { .. })),
                "{bad}"
            );
        }
        assert!(matches!(TableName::parse("1abc"), Err(NameError::InvalidStart { .. })));
        assert!(matches!(TableName::parse("_abc"), Err(NameError::InvalidStart { .. })));
        assert!(matches!(
            TableName::parse("a__b"),
            Err(NameError::ReservedSeparator { .. })
        ));
        assert!(matches!(
            TableName::parse("ab_"),
            Err(NameError::ReservedSeparator { .. })
        ));
        for (bad, prefix) in [("sqlite_x", "sqlite_"), ("pg_x", "pg_"), ("concord_x", "concord_")] {
            assert_eq!(
                TableName::parse(bad),
                Err(NameError::ReservedPrefix {
                    kind: t,
                    name: bad.into(),
                    prefix
                })
            );
        }
        assert!(matches!(
            ProjectionName::parse("x".repeat(MAX_PROJECTION_NAME_LEN + 1)),
            Err(NameError::TooLong {
                kind: NameKind::Projection,
                ..
            })
        ));
        assert!(matches!(
            ProjectionName::parse("a.rebuild"),
            Err(NameError::InvalidCharacter { character: '.', .. })
        ));
    }

    #[test]
    fn physical_names_round_trip() {
        let view = TableName::parse("x".repeat(MAX_TABLE_NAME_LEN)).unwrap();
        let physical = view.generation(u64::MAX);
        assert!(physical.as_str().len() <= MAX_PHYSICAL_LEN);
        assert_eq!(TableName::parse_physical(physical.as_str()), Some(physical));
        assert_eq!(view.generation(3).quoted(), format!("\"{}__r3\"", view));
        for bad in [
            "balances",
            "balances__r",
            "balances__rx",
            "Bal__r1",
            "a__b__r1",
            "x\"__r1",
        ] {
            assert_eq!(TableName::parse_physical(bad), None, "{bad}");
        }
    }
}
