//! Tokens: what every system outside the vault holds instead of a value. A token is never derived
//! from the value it stands for: its random part comes from the operating system's CSPRNG, and a
//! convergent token is found through a keyed index, not computed from the value.

use super::value::{TokenType, break_luhn};
use super::{VaultError, random_bytes};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The longest token accepted as input.
pub const MAX_TOKEN_LEN: usize = 64;

/// The shape of a new token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenFormat {
    /// `tok_` and 144 random bits, base64url: 28 characters.
    #[default]
    Random,
    /// A random (version 4) UUID.
    Uuid,
    /// For cards: as many digits as the number, its last four kept, the others random and chosen
    /// so that the token fails the Luhn check and cannot pass for a real card.
    Last4,
}

impl TokenFormat {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Random => "random",
            Self::Uuid => "uuid",
            Self::Last4 => "last4",
        }
    }

    /// Whether values of `kind` can take this format.
    ///
    /// # Errors
    /// [`VaultError::FormatNotAllowed`]: `last4` is for cards only.
    pub fn check(self, kind: TokenType) -> Result<(), VaultError> {
        if self == Self::Last4 && kind != TokenType::Card {
            return Err(VaultError::FormatNotAllowed { format: self, kind });
        }
        Ok(())
    }

    /// A fresh token for `normalized` (used only for its length and last four digits by `last4`).
    ///
    /// # Errors
    /// [`VaultError::Rng`] when the operating system has no randomness to give.
    pub fn generate(self, normalized: &str) -> Result<Token, VaultError> {
        let token = match self {
            Self::Random => {
                let mut bytes = [0u8; 18];
                random_bytes(&mut bytes)?;
                format!("tok_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
            }
            Self::Uuid => {
                let mut bytes = [0u8; 16];
                random_bytes(&mut bytes)?;
                uuid::Builder::from_random_bytes(bytes).into_uuid().to_string()
            }
            Self::Last4 => {
                let n = normalized.len();
                let mut digits = normalized.as_bytes().to_vec();
                let mut random = vec![0u8; n.saturating_sub(4)];
                random_bytes(&mut random)?;
                // Rejection sampling keeps every digit equally likely.
                for (i, slot) in digits.iter_mut().take(n.saturating_sub(4)).enumerate() {
                    let mut b = random[i];
                    while b >= 250 {
                        let mut one = [0u8; 1];
                        random_bytes(&mut one)?;
                        b = one[0];
                    }
                    *slot = b'0' + b % 10;
                }
                break_luhn(&mut digits);
                String::from_utf8(digits).map_err(|_| VaultError::Rng)?
            }
        };
        Ok(Token(token))
    }
}

/// A token as a caller presents it: 1 to 64 characters of letters, digits, `-` and `_`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Token(String);

impl Token {
    /// # Errors
    /// [`VaultError::InvalidToken`] outside the alphabet or length.
    pub fn parse(raw: &str) -> Result<Self, VaultError> {
        if raw.is_empty()
            || raw.len() > MAX_TOKEN_LEN
            || !raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        {
            return Err(VaultError::InvalidToken);
        }
        if holds_card_number(raw) {
            return Err(VaultError::CardNumberAsToken);
        }
        Ok(Self(raw.to_owned()))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    #[must_use]
    pub fn into_string(self) -> String {
        self.0
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `raw` is a card number: nothing but 13 to 19 digits (with `-` allowed between them,
/// as cards are written; after `tok_` at most) that pass the Luhn check. `last4` tokens are such
/// digits that fail it, by construction; random and UUID tokens always hold letters or more
/// digits than a card.
fn holds_card_number(raw: &str) -> bool {
    let rest = raw.strip_prefix("tok_").unwrap_or(raw);
    if !rest.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        return false;
    }
    let digits: String = rest.chars().filter(char::is_ascii_digit).collect();
    (13..=19).contains(&digits.len()) && super::value::luhn_valid(&digits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::vault::value::luhn_valid;

    #[test]
    fn a_card_number_is_not_a_token() {
        for card in [
            "4111111111111111",
            "4111-1111-1111-1111",
            "tok_4111111111111111",
            "378282246310005",
        ] {
            assert_eq!(Token::parse(card), Err(VaultError::CardNumberAsToken), "{card}");
        }
        let last4 = TokenFormat::Last4.generate("4111111111111111").unwrap();
        assert!(
            Token::parse(last4.as_str()).is_ok(),
            "a last4 token fails Luhn by design"
        );
        for fine in [
            "tok_abc",
            "4111111111111112",
            "123456789012",
            "12345678901234567890123",
            // A UUID token whose digit runs happen to pass Luhn: not a card.
            "bacdb204-bd3d-4be0-8120-109830757214",
        ] {
            assert!(Token::parse(fine).is_ok(), "{fine}");
        }
    }

    #[test]
    fn every_generated_token_parses_back() {
        for _ in 0..20_000 {
            for format in [TokenFormat::Random, TokenFormat::Uuid, TokenFormat::Last4] {
                let t = format.generate("4242424242424242").unwrap();
                assert!(Token::parse(t.as_str()).is_ok(), "{t}");
            }
        }
    }

    #[test]
    fn random_and_uuid_tokens_are_distinct_and_parse_back() {
        let a = TokenFormat::Random.generate("x").unwrap();
        let b = TokenFormat::Random.generate("x").unwrap();
        assert_ne!(a, b);
        assert!(a.as_str().starts_with("tok_") && a.as_str().len() == 28, "{a}");
        let u = TokenFormat::Uuid.generate("x").unwrap();
        assert_eq!(uuid::Uuid::parse_str(u.as_str()).unwrap().get_version_num(), 4);
        for t in [a, u] {
            assert_eq!(Token::parse(t.as_str()).unwrap(), t);
        }
    }

    #[test]
    fn last4_tokens_keep_length_and_last_four_and_fail_luhn() {
        for card in [
            "4242424242424242",
            "378282246310005",
            "6011111111111117",
            "4000056655665556",
        ] {
            for _ in 0..200 {
                let t = TokenFormat::Last4.generate(card).unwrap();
                assert_eq!(t.as_str().len(), card.len());
                assert_eq!(&t.as_str()[card.len() - 4..], &card[card.len() - 4..]);
                assert!(t.as_str().bytes().all(|b| b.is_ascii_digit()));
                assert!(!luhn_valid(t.as_str()), "{t} passes Luhn");
            }
        }
        assert!(TokenFormat::Last4.check(TokenType::Email).is_err());
        assert!(TokenFormat::Last4.check(TokenType::Card).is_ok());
    }

    #[test]
    fn tokens_outside_the_alphabet_are_refused() {
        for bad in ["", "tok with space", "tok/../x", &"a".repeat(65), "tök"] {
            assert!(Token::parse(bad).is_err(), "{bad}");
        }
    }
}
