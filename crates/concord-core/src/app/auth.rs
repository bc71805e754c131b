//! Authenticating requests and managing API keys.

use crate::domain::auth::generate_key;
use crate::domain::{ApiKeyRecord, KeyHash, Principal, Scope, ValidationError};
use crate::ports::{KeyStore, StoreError};
use chrono::Utc;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Why a key was not created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The principal whose key has this hash (see [`KeyHash::of`]), or `None` for an unknown or
/// revoked key. The caller hashes once and may use the hash as a cache key too.
///
/// # Errors
/// When the key store fails.
#[tracing::instrument(skip_all)]
pub async fn authenticate(keys: &dyn KeyStore, hash: &KeyHash) -> Result<Option<Principal>, StoreError> {
    Ok(keys
        .find_key(hash)
        .await?
        .filter(|k| k.hash.matches(hash))
        .map(Principal::from))
}

/// [`authenticate`] through `cache`: a key verified within the cache's time is not looked up
/// again.
///
/// # Errors
/// When the key store fails.
pub async fn authenticate_cached(
    keys: &dyn KeyStore,
    cache: &KeyCache,
    hash: &KeyHash,
) -> Result<Option<Principal>, StoreError> {
    if let Some(principal) = cache.get(hash) {
        return Ok(Some(principal));
    }
    let found = authenticate(keys, hash).await?;
    if let Some(principal) = &found {
        cache.put(hash, principal);
    }
    Ok(found)
}

/// Recently verified keys, so a busy client does not cost a database query per request. An entry
/// lives `ttl`: a key revoked on another node keeps working here for at most that long; one
/// revoked on this node is forgotten at once. A `ttl` of zero turns the cache off.
pub struct KeyCache {
    ttl: Duration,
    entries: Mutex<HashMap<[u8; 32], (Principal, Instant)>>,
}

/// Entries kept at most; past it the cache starts over rather than grow without bound.
const KEY_CACHE_MAX: usize = 10_000;

impl KeyCache {
    #[must_use]
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    #[must_use]
    pub fn get(&self, hash: &KeyHash) -> Option<Principal> {
        let entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        entries
            .get(&hash.0)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(p, _)| p.clone())
    }

    pub fn put(&self, hash: &KeyHash, principal: &Principal) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if entries.len() >= KEY_CACHE_MAX {
            entries.clear();
        }
        entries.insert(hash.0, (principal.clone(), Instant::now()));
    }

    /// Drops a revoked key.
    pub fn forget(&self, key_id: uuid::Uuid) {
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.retain(|_, (p, _)| p.key_id != key_id);
    }
}

/// Where the making of a key that can reveal vault values is recorded (the vault's audit trail):
/// `admin` cannot reveal values itself, but it can make a key that can, so that grant is on the
/// record before the key exists.
#[async_trait::async_trait]
pub trait GrantAudit: Send + Sync {
    /// Records that `by` makes the key `name` with the reveal `scopes`; durable when it returns.
    ///
    /// # Errors
    /// When the record cannot be written: the key must then not be made.
    async fn record_grant(&self, by: &Principal, name: &str, scopes: &[Scope]) -> Result<(), StoreError>;
}

/// Creates a key with a name and scopes for `by`; answers the record and the key, which is shown
/// only here. The request is checked first; a key that can reveal vault values is recorded in
/// `grants` before it is stored.
///
/// # Errors
/// A bad name or scope, or a failure of the store or of the grant's record.
pub async fn create_key(
    keys: &dyn KeyStore,
    grants: &dyn GrantAudit,
    by: &Principal,
    name: &str,
    scopes: &[String],
) -> Result<(ApiKeyRecord, String), KeyError> {
    if name.trim().is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(ValidationError::Parameter {
            name: "name",
            reason: "must be 1 to 100 characters, not only spaces, without control characters".into(),
        }
        .into());
    }
    if scopes.is_empty() {
        return Err(ValidationError::Parameter {
            name: "scopes",
            reason: "a key needs at least one scope".into(),
        }
        .into());
    }
    let mut parsed = scopes.iter().map(|s| Scope::parse(s)).collect::<Result<Vec<_>, _>>()?;
    parsed.sort();
    parsed.dedup();
    let reveals: Vec<Scope> = parsed.iter().copied().filter(|s| s.reveals_vault_values()).collect();
    if !reveals.is_empty() {
        grants.record_grant(by, name, &reveals).await?;
    }
    let key = generate_key();
    let record = ApiKeyRecord {
        id: Uuid::now_v7(),
        name: name.to_owned(),
        scopes: parsed,
        hash: KeyHash::of(&key),
        created_at: Utc::now(),
    };
    keys.insert_key(&record).await?;
    Ok((record, key))
}

/// Revokes a key: it stops at once on this node (its cache entry goes), on the others within
/// their cache time. `false` when there is no live key with this id.
///
/// # Errors
/// When the key store fails.
pub async fn revoke_key(keys: &dyn KeyStore, cache: &KeyCache, id: Uuid) -> Result<bool, StoreError> {
    let revoked = keys.revoke_key(id).await?;
    if revoked {
        cache.forget(id);
        tracing::info!(key_id = %id, "api key revoked");
    }
    Ok(revoked)
}

/// Makes sure an admin key exists. A configured key is stored (once) and nothing is returned; with
/// none configured and no admin key stored, a new key is generated and returned to be printed once.
///
/// # Errors
/// When the key store fails.
pub async fn bootstrap_admin(keys: &dyn KeyStore, configured: Option<&str>) -> Result<Option<String>, StoreError> {
    let admin = vec![Scope::Admin];
    if let Some(key) = configured {
        let hash = KeyHash::of(key);
        if keys.find_key(&hash).await?.is_none() {
            keys.insert_key(&ApiKeyRecord {
                id: Uuid::now_v7(),
                name: "bootstrap-admin".into(),
                scopes: admin,
                hash,
                created_at: Utc::now(),
            })
            .await?;
        }
        return Ok(None);
    }
    if keys.count_admin_keys().await? > 0 {
        return Ok(None);
    }
    let key = generate_key();
    keys.insert_key(&ApiKeyRecord {
        id: Uuid::now_v7(),
        name: "bootstrap-admin".into(),
        scopes: admin,
        hash: KeyHash::of(&key),
        created_at: Utc::now(),
    })
    .await?;
    Ok(Some(key))
}

/// What a key name may own: a consumer group (its checkpoints) or a saga definition (its
/// versions). The first key name to change one owns it; only keys of that name, or an admin key,
/// change it after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owned {
    ConsumerGroup,
    SagaDefinition,
}

impl Owned {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConsumerGroup => "consumer group",
            Self::SagaDefinition => "saga definition",
        }
    }
}

/// Why a change to something owned is refused.
#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    #[error("{} {name} belongs to the API key name {owner:?}: only its keys or an admin key may change it", .kind.as_str())]
    NotOwner { kind: Owned, name: String, owner: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks that the principal may change `name`: nobody owns it, its key name does, or it is an
/// admin key. Call [`claim_owner`] once the change succeeded.
///
/// # Errors
/// [`OwnershipError::NotOwner`] when another key name owns it, or the store.
pub async fn check_owner(
    keys: &dyn KeyStore,
    principal: &Principal,
    kind: Owned,
    name: &str,
) -> Result<(), OwnershipError> {
    match keys.owner(kind.as_str(), name).await? {
        Some(owner) if owner != principal.name && !principal.allows(Scope::Admin) => Err(OwnershipError::NotOwner {
            kind,
            name: name.to_owned(),
            owner,
        }),
        _ => Ok(()),
    }
}

/// After a successful change: the principal's key name owns `name` unless someone does. An
/// admin key claims nothing, so what an admin sets up is claimed by the service key that first
/// changes it. Two first changes at once: the first claim wins, the other change stands.
///
/// # Errors
/// The store.
pub async fn claim_owner(
    keys: &dyn KeyStore,
    principal: &Principal,
    kind: Owned,
    name: &str,
) -> Result<(), OwnershipError> {
    if !principal.allows(Scope::Admin) {
        keys.claim_owner(kind.as_str(), name, &principal.name).await?;
    }
    Ok(())
}
