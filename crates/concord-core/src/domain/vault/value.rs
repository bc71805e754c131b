//! The kinds of sensitive value the vault keeps, how each is validated and normalized, and how
//! each is masked. Error messages never contain the value: they end up in responses and logs.

use super::VaultError;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// The type of a sensitive value. Detokenize scopes are granted per type
/// (`vault:detokenize:card`, `vault:detokenize-masked:card`, ...: `Scope::VaultDetokenize` and
/// `Scope::VaultDetokenizeMasked` in `domain::auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenType {
    /// A payment card number (PAN): 12–19 digits passing the Luhn check.
    Card,
    /// A US social security number: `AAA-GG-SSSS` or nine digits, with the ranges never issued refused.
    Ssn,
    /// An email address.
    Email,
    /// A phone number: 7–15 digits, optionally with `+`, spaces, dashes, dots and parentheses.
    Phone,
    /// Any other text, up to the configured size.
    Generic,
}

impl TokenType {
    pub const ALL: [TokenType; 5] = [Self::Card, Self::Ssn, Self::Email, Self::Phone, Self::Generic];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Card => "card",
            Self::Ssn => "ssn",
            Self::Email => "email",
            Self::Phone => "phone",
            Self::Generic => "generic",
        }
    }

    /// # Errors
    /// [`VaultError::UnknownType`] for a name that is not a type.
    pub fn parse(raw: &str) -> Result<Self, VaultError> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == raw)
            .ok_or_else(|| VaultError::UnknownType(raw.chars().take(32).collect()))
    }

    /// Checks a value of this type and returns its normalized form (what is encrypted, and what
    /// a convergent token is derived from): card and SSN digits only, phone digits with a
    /// leading `+` when given, email with the domain lowercased.
    ///
    /// # Errors
    /// [`VaultError::InvalidValue`] (saying why, never what) or [`VaultError::ValueTooLarge`].
    pub fn normalize(self, raw: &str, max_bytes: usize) -> Result<Zeroizing<String>, VaultError> {
        if raw.len() > max_bytes {
            return Err(VaultError::ValueTooLarge {
                size: raw.len(),
                limit: max_bytes,
            });
        }
        let invalid = |reason: &'static str| VaultError::InvalidValue { kind: self, reason };
        match self {
            Self::Card => {
                let digits = digits_only(raw, &[' ', '-']).ok_or_else(|| invalid("only digits, spaces and dashes"))?;
                if !(12..=19).contains(&digits.len()) {
                    return Err(invalid("a card number has 12 to 19 digits"));
                }
                if !luhn_valid(&digits) {
                    return Err(invalid("the Luhn check fails"));
                }
                Ok(digits)
            }
            Self::Ssn => {
                let formatted = raw.len() == 11 && raw.as_bytes()[3] == b'-' && raw.as_bytes()[6] == b'-';
                let digits = if formatted {
                    digits_only(raw, &['-'])
                } else {
                    digits_only(raw, &[])
                }
                .filter(|d| d.len() == 9)
                .ok_or_else(|| invalid("an SSN is AAA-GG-SSSS or nine digits"))?;
                let (area, group, serial) = (&digits[..3], &digits[3..5], &digits[5..]);
                if area == "000" || area == "666" || area.starts_with('9') || group == "00" || serial == "0000" {
                    return Err(invalid("this SSN range is never issued"));
                }
                Ok(digits)
            }
            Self::Email => {
                let (local, domain) = raw.rsplit_once('@').ok_or_else(|| invalid("an email has an @"))?;
                let local_ok = !local.is_empty()
                    && local.len() <= 64
                    && local
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && !matches!(b, b'@' | b'"' | b'\\'));
                let domain_ok = domain.len() <= 253
                    && domain.contains('.')
                    && domain.split('.').all(|label| {
                        !label.is_empty()
                            && label.len() <= 63
                            && !label.starts_with('-')
                            && !label.ends_with('-')
                            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    });
                if raw.len() > 254 || !local_ok || !domain_ok {
                    return Err(invalid("not an address of the form local@domain.tld"));
                }
                Ok(Zeroizing::new(format!("{local}@{}", domain.to_ascii_lowercase())))
            }
            Self::Phone => {
                let (plus, rest) = raw.strip_prefix('+').map_or((false, raw), |r| (true, r));
                let digits = digits_only(rest, &[' ', '-', '.', '(', ')']).ok_or_else(|| {
                    invalid("only digits, an optional leading +, spaces, dashes, dots and parentheses")
                })?;
                if !(7..=15).contains(&digits.len()) {
                    return Err(invalid("a phone number has 7 to 15 digits"));
                }
                Ok(if plus {
                    Zeroizing::new(format!("+{}", digits.as_str()))
                } else {
                    digits
                })
            }
            Self::Generic => {
                if raw.is_empty() {
                    return Err(invalid("must not be empty"));
                }
                if raw.contains('\0') {
                    return Err(invalid("must not contain U+0000"));
                }
                Ok(Zeroizing::new(raw.to_owned()))
            }
        }
    }

    /// The masked form of a normalized value: what a caller with only the masked scope sees.
    /// Cards, phones and SSNs keep their last four digits; an email keeps its first character and
    /// its domain; generic text keeps its last four characters when it has at least twelve.
    #[must_use]
    pub fn mask(self, value: &str) -> String {
        let chars: Vec<char> = value.chars().collect();
        let keep_last = |n: usize| -> String {
            let cut = chars.len().saturating_sub(n);
            chars
                .iter()
                .enumerate()
                .map(|(i, c)| if i < cut && c.is_ascii_alphanumeric() { '*' } else { *c })
                .collect()
        };
        match self {
            Self::Card | Self::Phone => keep_last(4),
            Self::Ssn => format!(
                "***-**-{}",
                chars[chars.len().saturating_sub(4)..].iter().collect::<String>()
            ),
            Self::Email => match value.rsplit_once('@') {
                Some((local, domain)) => {
                    let first = local.chars().next().unwrap_or('*');
                    format!("{first}***@{domain}")
                }
                None => "***".into(),
            },
            Self::Generic if chars.len() >= 12 => {
                let tail: String = chars[chars.len() - 4..].iter().collect();
                format!("********{tail}")
            }
            Self::Generic => "********".into(),
        }
    }
}

/// The digits of `raw` with the `allowed` separators removed; none when anything else appears.
fn digits_only(raw: &str, allowed: &[char]) -> Option<Zeroizing<String>> {
    let mut out = Zeroizing::new(String::with_capacity(raw.len()));
    for c in raw.chars() {
        if c.is_ascii_digit() {
            out.push(c);
        } else if !allowed.contains(&c) {
            return None;
        }
    }
    Some(out)
}

/// The Luhn (mod 10) check of a string of ASCII digits.
#[must_use]
pub fn luhn_valid(digits: &str) -> bool {
    luhn_sum(digits).is_multiple_of(10)
}

fn luhn_sum(digits: &str) -> u32 {
    digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 1 {
                let d2 = d * 2;
                if d2 > 9 { d2 - 9 } else { d2 }
            } else {
                d
            }
        })
        .sum()
}

/// Makes a digit string fail the Luhn check by changing its first digit when it passes.
/// Changing one digit always changes the Luhn sum modulo 10, since doubling-and-folding permutes
/// the digits 0–9.
pub(super) fn break_luhn(digits: &mut [u8]) {
    if luhn_valid(std::str::from_utf8(digits).unwrap_or("")) {
        digits[0] = b'0' + (digits[0] - b'0' + 1) % 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(t: TokenType, v: &str) -> Result<String, VaultError> {
        t.normalize(v, 4096).map(|z| z.as_str().to_owned())
    }

    #[test]
    fn cards_must_pass_luhn_and_lose_their_separators() {
        assert_eq!(
            norm(TokenType::Card, "4242 4242 4242 4242").unwrap(),
            "4242424242424242"
        );
        assert_eq!(
            norm(TokenType::Card, "4111-1111-1111-1111").unwrap(),
            "4111111111111111"
        );
        for bad in [
            "4242424242424241",
            "4242",
            "42424242424242424242",
            "4242x4242x4242x4242",
            "",
        ] {
            assert!(norm(TokenType::Card, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_never_repeat_the_value() {
        let e = norm(TokenType::Card, "4242424242424241").unwrap_err().to_string();
        assert!(!e.contains("4242"), "{e}");
        let e = norm(TokenType::Email, "not-an-email").unwrap_err().to_string();
        assert!(!e.contains("not-an-email"), "{e}");
    }

    #[test]
    fn ssns_refuse_ranges_never_issued() {
        assert_eq!(norm(TokenType::Ssn, "123-45-6789").unwrap(), "123456789");
        assert_eq!(norm(TokenType::Ssn, "123456789").unwrap(), "123456789");
        for bad in [
            "000-12-3456",
            "666-12-3456",
            "900-12-3456",
            "123-00-4567",
            "123-45-0000",
            "123-456-789",
            "12345678",
        ] {
            assert!(norm(TokenType::Ssn, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn emails_phones_and_generic_values() {
        assert_eq!(
            norm(TokenType::Email, "Ada.L@Example.COM").unwrap(),
            "Ada.L@example.com"
        );
        for bad in [
            "ada",
            "@example.com",
            "ada@",
            "ada@localhost",
            "a da@example.com",
            "ada@-x.com",
        ] {
            assert!(norm(TokenType::Email, bad).is_err(), "{bad}");
        }
        assert_eq!(norm(TokenType::Phone, "+1 (555) 010-9999").unwrap(), "+15550109999");
        assert!(norm(TokenType::Phone, "12345").is_err());
        assert!(norm(TokenType::Phone, "555-CALL-NOW").is_err());
        assert!(norm(TokenType::Generic, "").is_err());
        assert!(norm(TokenType::Generic, "a\0b").is_err());
        assert!(matches!(
            TokenType::Generic.normalize("abcdef", 5),
            Err(VaultError::ValueTooLarge { size: 6, limit: 5 })
        ));
    }

    #[test]
    fn masks_keep_only_what_identifies_nothing() {
        assert_eq!(TokenType::Card.mask("4242424242424242"), "************4242");
        assert_eq!(TokenType::Ssn.mask("123456789"), "***-**-6789");
        assert_eq!(TokenType::Email.mask("ada@example.com"), "a***@example.com");
        assert_eq!(TokenType::Phone.mask("+15550109999"), "+*******9999");
        assert_eq!(TokenType::Generic.mask("short"), "********");
        assert_eq!(TokenType::Generic.mask("a long secret value"), "********alue");
    }

    #[test]
    fn luhn_matches_known_numbers() {
        assert!(luhn_valid("79927398713"));
        assert!(!luhn_valid("79927398710"));
    }
}
