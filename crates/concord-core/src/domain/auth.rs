//! API keys, their scopes and the principal a request acts as.

use super::ValidationError;
use super::vault::TokenType;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use rand::Rng as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

/// A permission a key carries. Deny by default: a route names the scope it needs, and a key
/// without it (or without `admin`) is refused. Written as today's strings (`events:read`,
/// `vault:detokenize:card`, ...) wherever it leaves the server: stores, answers, the OpenAPI
/// document; ordered by that text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// `admin`: every scope but revealing vault values.
    Admin,
    /// `events:read`
    EventsRead,
    /// `events:write`
    EventsWrite,
    /// `sagas:read`
    SagasRead,
    /// `sagas:write`
    SagasWrite,
    /// `sagas:signal`: sends signals to waiting sagas, nothing else.
    SagasSignal,
    /// `tx:read`
    TxRead,
    /// `tx:write`
    TxWrite,
    /// `vault:tokenize`
    VaultTokenize,
    /// `vault:admin`
    VaultAdmin,
    /// `vault:audit`
    VaultAudit,
    /// `vault:detokenize:<type>`: reveals values of the type in plain (and masked).
    VaultDetokenize(TokenType),
    /// `vault:detokenize-masked:<type>`: reveals only the masked form of values of the type.
    VaultDetokenizeMasked(TokenType),
}

/// The scopes that are not per vault type, in the order [`Scope::all`] lists them.
const FIXED_SCOPES: [Scope; 11] = [
    Scope::Admin,
    Scope::EventsRead,
    Scope::EventsWrite,
    Scope::SagasRead,
    Scope::SagasWrite,
    Scope::SagasSignal,
    Scope::TxRead,
    Scope::TxWrite,
    Scope::VaultTokenize,
    Scope::VaultAdmin,
    Scope::VaultAudit,
];

const DETOKENIZE: &str = "vault:detokenize:";
const DETOKENIZE_MASKED: &str = "vault:detokenize-masked:";

impl Scope {
    /// # Errors
    /// [`ValidationError::Scope`] for a scope Concord does not know.
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let per_type = |prefix: &str| raw.strip_prefix(prefix).and_then(|t| TokenType::parse(t).ok());
        FIXED_SCOPES
            .into_iter()
            .find(|s| s.as_str() == raw)
            .or_else(|| per_type(DETOKENIZE).map(Self::VaultDetokenize))
            .or_else(|| per_type(DETOKENIZE_MASKED).map(Self::VaultDetokenizeMasked))
            .ok_or_else(|| ValidationError::Scope(raw.to_owned()))
    }

    /// The scope's name, as keys are granted it and stores keep it.
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::EventsRead => "events:read",
            Self::EventsWrite => "events:write",
            Self::SagasRead => "sagas:read",
            Self::SagasWrite => "sagas:write",
            Self::SagasSignal => "sagas:signal",
            Self::TxRead => "tx:read",
            Self::TxWrite => "tx:write",
            Self::VaultTokenize => "vault:tokenize",
            Self::VaultAdmin => "vault:admin",
            Self::VaultAudit => "vault:audit",
            Self::VaultDetokenize(t) => match t {
                TokenType::Card => "vault:detokenize:card",
                TokenType::Ssn => "vault:detokenize:ssn",
                TokenType::Email => "vault:detokenize:email",
                TokenType::Phone => "vault:detokenize:phone",
                TokenType::Generic => "vault:detokenize:generic",
            },
            Self::VaultDetokenizeMasked(t) => match t {
                TokenType::Card => "vault:detokenize-masked:card",
                TokenType::Ssn => "vault:detokenize-masked:ssn",
                TokenType::Email => "vault:detokenize-masked:email",
                TokenType::Phone => "vault:detokenize-masked:phone",
                TokenType::Generic => "vault:detokenize-masked:generic",
            },
        }
    }

    /// Every scope Concord knows: the fixed ones, then plain and masked reveal per vault type.
    #[must_use]
    pub fn all() -> Vec<Scope> {
        let reveal = TokenType::ALL.into_iter().map(Self::VaultDetokenize);
        let masked = TokenType::ALL.into_iter().map(Self::VaultDetokenizeMasked);
        FIXED_SCOPES.into_iter().chain(reveal).chain(masked).collect()
    }

    /// Whether the scope reveals vault values (plain or masked), which a grant records in the
    /// vault's audit trail.
    #[must_use]
    pub fn reveals_vault_values(self) -> bool {
        matches!(self, Self::VaultDetokenize(_) | Self::VaultDetokenizeMasked(_))
    }

    /// Revealing vault values is never implied by `admin` (separation of duties).
    fn implied_by_admin(self) -> bool {
        !self.reveals_vault_values()
    }
}

/// By name, as the scopes were ordered when they were strings (a key's list is kept sorted).
impl Ord for Scope {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl PartialOrd for Scope {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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
    /// Whether this principal may do what needs `needed`: it holds that scope, or `admin` when
    /// `admin` implies it.
    #[must_use]
    pub fn allows(&self, needed: Scope) -> bool {
        self.scopes
            .iter()
            .any(|&s| s == needed || (s == Scope::Admin && needed.implied_by_admin()))
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

    fn scope(name: &str) -> Scope {
        Scope::parse(name).unwrap()
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
        assert_eq!(all.len(), 11 + 2 * TokenType::ALL.len());
        for scope in all {
            assert_eq!(Scope::parse(scope.as_str()).unwrap(), scope);
        }
    }

    #[test]
    fn scopes_read_and_write_todays_names_in_todays_order() {
        let names = [
            "admin",
            "events:read",
            "events:write",
            "sagas:read",
            "sagas:write",
            "sagas:signal",
            "tx:read",
            "tx:write",
            "vault:tokenize",
            "vault:admin",
            "vault:audit",
            "vault:detokenize:card",
            "vault:detokenize:ssn",
            "vault:detokenize:email",
            "vault:detokenize:phone",
            "vault:detokenize:generic",
            "vault:detokenize-masked:card",
            "vault:detokenize-masked:ssn",
            "vault:detokenize-masked:email",
            "vault:detokenize-masked:phone",
            "vault:detokenize-masked:generic",
        ];
        let all = Scope::all();
        assert_eq!(all.iter().map(Scope::as_str).collect::<Vec<_>>(), names);
        assert_eq!(all.iter().map(Scope::to_string).collect::<Vec<_>>(), names);
        assert_eq!(scope("tx:read"), Scope::TxRead);
        assert_eq!(scope("vault:detokenize:ssn"), Scope::VaultDetokenize(TokenType::Ssn));
        assert_eq!(
            scope("vault:detokenize-masked:phone"),
            Scope::VaultDetokenizeMasked(TokenType::Phone)
        );
        for bad in [
            "vault:detokenize:",
            "vault:detokenize",
            "vault:detokenize-masked:CARD",
            " admin",
            "tx:read ",
        ] {
            assert_eq!(Scope::parse(bad), Err(ValidationError::Scope(bad.to_owned())));
        }
    }

    #[test]
    fn scopes_sort_by_name_as_keys_list_them() {
        let mut scopes = [
            Scope::VaultAudit,
            Scope::VaultDetokenizeMasked(TokenType::Card),
            Scope::Admin,
            Scope::VaultDetokenize(TokenType::Generic),
            Scope::VaultDetokenize(TokenType::Card),
            Scope::EventsWrite,
        ];
        scopes.sort();
        assert_eq!(
            scopes.iter().map(Scope::as_str).collect::<Vec<_>>(),
            [
                "admin",
                "events:write",
                "vault:audit",
                "vault:detokenize-masked:card",
                "vault:detokenize:card",
                "vault:detokenize:generic"
            ]
        );
    }

    #[test]
    fn admin_implies_exactly_the_scopes_that_reveal_no_vault_value() {
        let admin = principal(&["admin"]);
        for needed in Scope::all() {
            let reveals = needed.as_str().starts_with("vault:detokenize");
            assert_eq!(needed.reveals_vault_values(), reveals, "{needed}");
            assert_eq!(admin.allows(needed), !reveals, "{needed}");
            assert!(Principal::with_scopes(&[needed.as_str()]).allows(needed), "{needed}");
        }
    }

    #[test]
    fn admin_grants_everything_but_revealing_vault_values() {
        let admin = principal(&["admin"]);
        assert!(admin.allows(scope("events:write")));
        assert!(admin.allows(scope("vault:tokenize")));
        assert!(!admin.allows(scope("vault:detokenize:card")));
        assert!(!admin.allows(scope("vault:detokenize-masked:card")));
    }

    #[test]
    fn a_key_is_denied_what_it_was_not_given() {
        let reader = principal(&["events:read"]);
        assert!(reader.allows(scope("events:read")));
        assert!(!reader.allows(scope("events:write")));
        assert!(!reader.allows(scope("admin")));
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
