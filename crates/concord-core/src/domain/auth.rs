//! API keys, their scopes and the principal a request acts as.

use super::ValidationError;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use rand::Rng as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

/// The vault's value types; detokenize scopes are granted per type.
pub const VAULT_TYPES: [&str; 5] = ["card", "ssn", "email", "phone", "generic"];

const FIXED_SCOPES: [&str; 10] = [
    "admin",
    "events:read",
    "events:write",
    "sagas:read",
    "sagas:write",
    "tx:read",
    "tx:write",
    "vault:tokenize",
    "vault:admin",
    "vault:audit",
];

/// A permission a key carries. Deny by default: a route names the scope it needs, and a key
/// without it (or without `admin`) is refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope(String);

impl Scope {
    pub const ADMIN: &'static str = "admin";
    pub const EVENTS_READ: &'static str = "events:read";
    pub const EVENTS_WRITE: &'static str = "events:write";

    /// # Errors
    /// [`ValidationError::Scope`] for a scope Concord does not know.
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let known = FIXED_SCOPES.contains(&raw)
            || ["vault:detokenize:", "vault:detokenize-masked:"]
                .iter()
                .any(|p| raw.strip_prefix(p).is_some_and(|t| VAULT_TYPES.contains(&t)));
        if known {
            Ok(Self(raw.to_owned()))
        } else {
            Err(ValidationError::Scope(raw.to_owned()))
        }
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Every scope Concord knows.
    #[must_use]
    pub fn all() -> Vec<Scope> {
        let reveal = ["vault:detokenize:", "vault:detokenize-masked:"]
            .into_iter()
            .flat_map(|prefix| VAULT_TYPES.iter().map(move |t| format!("{prefix}{t}")));
        FIXED_SCOPES
            .iter()
            .map(|s| (*s).to_owned())
            .chain(reveal)
            .map(Self)
            .collect()
    }

    /// Revealing vault values is never implied by `admin` (separation of duties).
    fn implied_by_admin(name: &str) -> bool {
        !name.starts_with("vault:detokenize")
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// SHA-256 of a presented key. API keys are 256-bit random strings, so a fast hash is enough to
/// make a leaked table useless; a slow password hash would only cost every request.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    #[must_use]
    pub fn of(presented: &str) -> Self {
        Self(Sha256::digest(presented.as_bytes()).into())
    }

    /// Compares in constant time, so response timing says nothing about how much of a key matched.
    #[must_use]
    pub fn matches(&self, other: &KeyHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHash(..)")
    }
}

/// Generates a new key: `ck_` and 32 bytes from a CSPRNG, base64url.
#[must_use]
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("ck_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// A stored key: never the key itself, only its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: Uuid,
    pub name: String,
    pub scopes: Vec<Scope>,
    pub hash: KeyHash,
    pub created_at: DateTime<Utc>,
}

/// Who a request acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub key_id: Uuid,
    pub name: String,
    pub scopes: Vec<Scope>,
}

impl Principal {
    /// Whether this principal may use a route that needs `needed`.
    #[must_use]
    pub fn allows(&self, needed: &str) -> bool {
        self.scopes
            .iter()
            .any(|s| s.as_str() == needed || (s.as_str() == Scope::ADMIN && Scope::implied_by_admin(needed)))
    }
}

#[cfg(any(test, feature = "testkit"))]
impl Principal {
    /// A principal with these scopes (each one Concord knows), for tests of what it may do.
    #[must_use]
    pub fn with_scopes(scopes: &[&str]) -> Self {
        Self {
            key_id: Uuid::nil(),
            name: "t".into(),
            scopes: scopes.iter().map(|s| Scope::parse(s).expect("a known scope")).collect(),
        }
    }
}

impl From<ApiKeyRecord> for Principal {
    fn from(r: ApiKeyRecord) -> Self {
        Self {
            key_id: r.id,
            name: r.name,
            scopes: r.scopes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(scopes: &[&str]) -> Principal {
        Principal::with_scopes(scopes)
    }

    #[test]
    fn scopes_outside_the_list_are_rejected() {
        assert!(Scope::parse("events:read").is_ok());
        assert!(Scope::parse("vault:detokenize:card").is_ok());
        assert!(Scope::parse("vault:detokenize-masked:email").is_ok());
        for bad in ["", "root", "events:*", "vault:detokenize:passport", "Admin"] {
            assert!(Scope::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_listed_scope_parses() {
        let all = Scope::all();
        assert_eq!(all.len(), 10 + 2 * VAULT_TYPES.len());
        for scope in all {
            assert_eq!(Scope::parse(scope.as_str()).unwrap(), scope);
        }
    }

    #[test]
    fn admin_grants_everything_but_revealing_vault_values() {
        let admin = principal(&["admin"]);
        assert!(admin.allows("events:write"));
        assert!(admin.allows("vault:tokenize"));
        assert!(!admin.allows("vault:detokenize:card"));
        assert!(!admin.allows("vault:detokenize-masked:card"));
    }

    #[test]
    fn a_key_is_denied_what_it_was_not_given() {
        let reader = principal(&["events:read"]);
        assert!(reader.allows("events:read"));
        assert!(!reader.allows("events:write"));
        assert!(!reader.allows("admin"));
    }

    #[test]
    fn generated_keys_are_distinct_and_hash_stably() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        assert!(a.starts_with("ck_") && a.len() == 46);
        assert!(KeyHash::of(&a).matches(&KeyHash::of(&a)));
        assert!(!KeyHash::of(&a).matches(&KeyHash::of(&b)));
    }
}
