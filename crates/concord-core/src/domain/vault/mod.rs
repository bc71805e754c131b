//! The tokenization vault's entities: value types and their validation, tokens, envelope
//! encryption, tokenized event fields, data subjects.

pub mod crypto;
pub mod rules;
pub mod token;
pub mod value;

pub use crypto::{Sealed, SecretKey, SubjectKeys};
pub use rules::{FieldRule, FieldRules};
pub use token::{Token, TokenFormat};
pub use value::TokenType;

/// A bad vault request or a failure of the vault's cryptography. Each variant maps to one stable
/// error code; none carries a sensitive value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    /// A type that is not card, ssn, email, phone or generic.
    #[error("unknown value type {0:?}")]
    UnknownType(String),
    /// A value that is not valid for its type; fix the value.
    #[error("invalid {} value: {reason}", kind.as_str())]
    InvalidValue { kind: TokenType, reason: &'static str },
    /// A value over the configured size.
    #[error("a value of {size} bytes is over the limit of {limit}")]
    ValueTooLarge { size: usize, limit: usize },
    /// A token format the type cannot take.
    #[error("the {} format is not available for {} values", format.as_str(), kind.as_str())]
    FormatNotAllowed { format: TokenFormat, kind: TokenType },
    /// A token outside the token alphabet or length.
    #[error("a token is 1 to 64 characters of letters, digits, - and _")]
    InvalidToken,
    /// A "token" that is a card number (a Luhn-valid run of 13 to 19 digits, `-` allowed
    /// between them): refused without being echoed or recorded anywhere.
    #[error("that is a card number, not a token: send its token (nothing was recorded)")]
    CardNumberAsToken,
    /// More items in one request than the configured limit, or none.
    #[error("{count} items in one request; between 1 and {limit} are allowed")]
    BatchSize { count: usize, limit: usize },
    /// A subject outside its alphabet or length.
    #[error("invalid subject: {0}")]
    InvalidSubject(String),
    /// A tokenized-field rule that cannot be applied.
    #[error("invalid rule: {0}")]
    InvalidRule(String),
    /// Metadata that is not a JSON object or is over its size limit, or a TTL out of range.
    #[error("invalid item: {0}")]
    InvalidItem(String),
    /// The master key is missing, malformed, or not the one this vault was created with.
    #[error("vault master key: {0}")]
    MasterKey(String),
    /// A ciphertext failed authentication: tampering, or a key other than the one that sealed it.
    #[error("a ciphertext failed authentication")]
    Crypto,
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed")]
    Rng,
}

/// Fills `buf` from the operating system's CSPRNG.
///
/// # Errors
/// [`VaultError::Rng`] when it fails.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), VaultError> {
    getrandom::fill(buf).map_err(|_| VaultError::Rng)
}

/// The longest subject, bytes (a stream name fits).
pub const MAX_SUBJECT_LEN: usize = 200;

/// A data subject: whose personal data a token holds (a customer id, or the stream name for
/// tokenized event fields). Each subject has its own data key, so erasing it is one deletion.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subject(String);

impl Subject {
    /// The subject of values tokenized without one: they share the default data key, which is
    /// never erased.
    pub const DEFAULT: &'static str = "";

    /// # Errors
    /// [`VaultError::InvalidSubject`] when empty, over 200 bytes, or holding control characters
    /// or `/`.
    pub fn parse(raw: &str) -> Result<Self, VaultError> {
        if raw.is_empty() || raw.len() > MAX_SUBJECT_LEN {
            return Err(VaultError::InvalidSubject(format!("1 to {MAX_SUBJECT_LEN} bytes")));
        }
        if raw.chars().any(|c| c.is_control() || c == '/') {
            return Err(VaultError::InvalidSubject("no control characters or /".into()));
        }
        Ok(Self(raw.to_owned()))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_short_printable_text() {
        assert!(Subject::parse("customer-42").is_ok());
        assert!(Subject::parse("ada@example.com").is_ok());
        for bad in ["", "a/b", "tab\there", &"x".repeat(201)] {
            assert!(Subject::parse(bad).is_err(), "{bad:?}");
        }
    }
}
