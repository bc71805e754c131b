//! The tokenization vault's use cases: tokenize, detokenize under per-caller policy with an audit
//! trail, master key rotation, crypto-shredding of a subject, and tokenized event fields.
//!
//! This file holds the [`Vault`] itself: its configuration, its construction, and what the
//! concerns share. Each concern adds its methods to `Vault` in its own file: `keyring` (master
//! key versions, data keys, rotation), `tokenize`, `detokenize`, `rate` (the detokenize rate
//! of each key), `audit` (the audit trail), `rules` (tokenized event fields) and `erase`
//! (erasure of subjects and of expired records).

use crate::app::group_commit::Batcher;
use crate::domain::Limits;
use crate::domain::vault::{SecretKey, SubjectKeys, VaultError};
use crate::ports::{EventStore, StoreError, VaultStore};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};
use uuid::Uuid;

mod audit;
mod detokenize;
mod erase;
mod keyring;
mod rate;
mod rules;
mod tokenize;

pub use audit::AUDIT_STREAM;
pub use detokenize::{ItemError, Reveal, Revealed};
pub use keyring::Rotated;
pub use tokenize::TokenizeItem;

use audit::AuditWrites;
use rate::Bucket;
use rules::CachedRules;
use tokenize::TokenWrites;

/// Limits and tunables of the vault, all configurable.
#[derive(Debug, Clone)]
pub struct VaultConfig {
    /// Most items in one tokenize or detokenize request.
    pub max_batch: usize,
    /// Largest value, bytes.
    pub max_value_bytes: usize,
    /// Largest metadata of one item, bytes of JSON.
    pub max_metadata_bytes: usize,
    /// Longest `ttl_s`.
    pub max_ttl_s: u64,
    /// Most fields in one category's rules.
    pub max_rule_fields: usize,
    /// How long this node uses a subject's data key for new tokens without looking it up again.
    /// Reads always look the key up, so an erasure stops reveals on every node at once.
    pub key_cache_ttl: Duration,
    /// How long this node trusts the rules it looked up for a category.
    pub rules_cache_ttl: Duration,
    /// Tokens each API key may detokenize per second, on this node (0: no limit).
    pub detokenize_per_s: f64,
    /// How many tokens above the rate a key may detokenize in a burst.
    pub detokenize_burst: f64,
    /// Audit records of refused detokenize calls (denied, rate-limited) one key leaves per
    /// minute on this node (0: every one); past it they are counted into its next record.
    pub refused_audit_per_min: f64,
    /// Most token records written in one statement: concurrent tokenizations share it.
    pub write_batch: usize,
    /// Limits of the event store, for the audit records.
    pub event_limits: Limits,
    /// Master keys this vault used before the configured one: keyring versions wrapped by one of
    /// them are re-wrapped under the configured key when the vault opens (rotation of the master
    /// key itself). Once every node runs with the new key they can be dropped.
    pub previous_master_keys: Vec<SecretKey>,
}

impl Default for VaultConfig {
    fn default() -> Self {
        Self {
            max_batch: 1000,
            max_value_bytes: 4096,
            max_metadata_bytes: 4096,
            max_ttl_s: 10 * 365 * 24 * 3600,
            max_rule_fields: 64,
            key_cache_ttl: Duration::from_secs(1),
            rules_cache_ttl: Duration::from_secs(1),
            detokenize_per_s: 1000.0,
            refused_audit_per_min: 60.0,
            detokenize_burst: 2000.0,
            write_batch: 1000,
            event_limits: Limits::default(),
            previous_master_keys: Vec::new(),
        }
    }
}

/// Why a vault request failed. Each variant's doc says what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum VaultFailure {
    /// Bad input, or a cryptographic failure of the vault itself (see [`VaultError`]).
    #[error(transparent)]
    Invalid(#[from] VaultError),
    /// A database failed; nothing was revealed. Retry later.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The caller may not reveal some of the tokens; nothing was revealed.
    #[error("{0}")]
    Forbidden(String),
    /// The caller detokenized more than its rate allows; retry after the given time.
    #[error("over the detokenize rate of this API key; retry in {retry_after_ms} ms")]
    RateLimited { retry_after_ms: u64 },
}

/// Keys for purposes other than sealing values (see `Vault::derived`).
struct DerivedKeys {
    fingerprint: SecretKey,
    subject_ref: SecretKey,
    callback: SecretKey,
}

/// Entries a node's caches hold at most; past it a cache starts over rather than grow.
const CACHE_MAX: usize = 10_000;

/// The vault.
pub struct Vault {
    store: Arc<dyn VaultStore>,
    master: SecretKey,
    /// Keys derived from the keyring's first version, which keep their value when the master
    /// key changes: they key `Idempotency-Key` fingerprints and the audit trail's subject
    /// references. Set when the vault opens.
    derived: std::sync::OnceLock<DerivedKeys>,
    keyring: RwLock<BTreeMap<u32, SecretKey>>,
    /// Subject -> (data key id, derived keys, fetched at); only for writing new tokens.
    data_keys: Mutex<HashMap<String, (Uuid, SubjectKeys, Instant)>>,
    rules: Mutex<HashMap<String, CachedRules>>,
    buckets: Mutex<HashMap<Uuid, Bucket>>,
    /// Per key: audit records of refused detokenize calls left this minute.
    refused_audits: Mutex<HashMap<Uuid, rate::RefusedAudit>>,
    /// New token records of concurrent requests, written in one statement.
    token_writes: Batcher<TokenWrites>,
    /// Audit records of concurrent requests, written in one append.
    audits: Batcher<AuditWrites>,
    config: VaultConfig,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Vault {
    /// Opens the vault: loads the keyring (creating its first version in a new vault) and
    /// checks that `master` opens every version.
    ///
    /// # Errors
    /// [`VaultError::MasterKey`] when `master` is not the key this vault was created with.
    pub async fn open(
        store: Arc<dyn VaultStore>,
        events: Arc<dyn EventStore>,
        master: SecretKey,
        config: VaultConfig,
    ) -> Result<Self, VaultFailure> {
        let token_writes = Batcher::spawn(Arc::new(TokenWrites(store.clone())), config.write_batch, 4096);
        let audits = Batcher::spawn(
            Arc::new(AuditWrites {
                events: events.clone(),
                limits: config.event_limits,
            }),
            config.event_limits.max_events_per_append.min(500),
            4096,
        );
        let vault = Self {
            derived: std::sync::OnceLock::new(),
            store,
            token_writes,
            audits,
            master,
            keyring: RwLock::new(BTreeMap::new()),
            data_keys: Mutex::new(HashMap::new()),
            rules: Mutex::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
            refused_audits: Mutex::new(HashMap::new()),
            config,
        };
        vault.adopt_master_key().await?;
        vault.reload_keyring().await?;
        if vault.current_version().is_none() {
            vault.add_master_version(1).await?;
            vault.reload_keyring().await?;
        }
        let first = {
            let ring = vault.keyring.read().unwrap_or_else(PoisonError::into_inner);
            ring.values()
                .next()
                .cloned()
                .ok_or(VaultFailure::Invalid(VaultError::Crypto))?
        };
        let _ = vault.derived.set(DerivedKeys {
            fingerprint: first.derive(b"concord/idempotency/fingerprint"),
            subject_ref: first.derive(b"concord/vault/audit-subject"),
            callback: first.derive(b"concord/saga/callback"),
        });
        Ok(vault)
    }

    fn derived(&self) -> &DerivedKeys {
        // Set in `open` before the vault is handed out.
        self.derived.get_or_init(|| DerivedKeys {
            fingerprint: self.master.derive(b"concord/idempotency/fingerprint"),
            subject_ref: self.master.derive(b"concord/vault/audit-subject"),
            callback: self.master.derive(b"concord/saga/callback"),
        })
    }

    #[must_use]
    pub fn config(&self) -> &VaultConfig {
        &self.config
    }

    /// A secret for keying `Idempotency-Key` fingerprints, derived from the keyring's first
    /// version under its own label: the same on every node and across master-key changes, and
    /// unknown to anyone holding only the databases.
    #[must_use]
    pub fn fingerprint_secret(&self) -> zeroize::Zeroizing<Vec<u8>> {
        zeroize::Zeroizing::new(self.derived().fingerprint.bytes().to_vec())
    }

    /// The key of saga completion tokens, derived from the master key like the fingerprint's,
    /// so every node of a cluster checks the tokens any of them issued.
    #[must_use]
    pub fn callback_secret(&self) -> zeroize::Zeroizing<Vec<u8>> {
        zeroize::Zeroizing::new(self.derived().callback.bytes().to_vec())
    }
}

/// What the tests of each concern share: a vault on in-memory stores, callers, items.
#[cfg(test)]
mod testing {
    use super::*;
    use crate::domain::vault::{Subject, Token, TokenFormat, TokenType};
    use crate::domain::{Principal, Scope};
    use crate::ports::LogQuery;
    use crate::testkit::{MemoryStore, MemoryVaultStore};
    use serde_json::Value;
    use zeroize::Zeroizing;

    pub(super) struct Given {
        pub(super) vault: Arc<Vault>,
        pub(super) store: Arc<MemoryVaultStore>,
        pub(super) events: Arc<MemoryStore>,
        pub(super) master: SecretKey,
    }

    pub(super) async fn given(config: VaultConfig) -> Given {
        let store = Arc::new(MemoryVaultStore::default());
        let events = Arc::new(MemoryStore::default());
        let master = SecretKey::generate().unwrap();
        let vault = Vault::open(store.clone(), events.clone(), master.clone(), config)
            .await
            .unwrap();
        Given {
            vault: Arc::new(vault),
            store,
            events,
            master,
        }
    }

    pub(super) fn caller(scopes: &[&str]) -> Principal {
        Principal {
            key_id: Uuid::new_v4(),
            name: "caller".into(),
            scopes: scopes.iter().map(|s| Scope::parse(s).unwrap()).collect(),
        }
    }

    pub(super) fn item(kind: TokenType, value: &str) -> TokenizeItem {
        TokenizeItem {
            kind,
            value: Zeroizing::new(value.into()),
            format: TokenFormat::Random,
            convergent: false,
            subject: None,
            ttl_s: None,
            metadata: None,
        }
    }

    pub(super) fn with_subject(mut i: TokenizeItem, subject: &str) -> TokenizeItem {
        i.subject = Some(Subject::parse(subject).unwrap());
        i
    }

    pub(super) fn convergent(mut i: TokenizeItem) -> TokenizeItem {
        i.convergent = true;
        i
    }

    pub(super) async fn reveal(
        g: &Given,
        who: &Principal,
        tokens: &[Token],
        how: Reveal,
    ) -> Result<Vec<Revealed>, VaultFailure> {
        g.vault.detokenize(who, tokens.to_vec(), how).await
    }

    pub(super) fn values(items: &[Revealed]) -> Vec<Option<String>> {
        items
            .iter()
            .map(|i| i.value.as_ref().map(|v| v.as_str().to_owned()))
            .collect()
    }

    pub(super) async fn audit_log(g: &Given) -> Vec<Value> {
        let events = g
            .events
            .read_log(&LogQuery {
                after: 0,
                limit: 1000,
                max_bytes: usize::MAX,
                category: None,
                partition: None,
            })
            .await
            .unwrap();
        events
            .into_iter()
            .filter(|e| e.stream.as_str() == AUDIT_STREAM)
            .map(|e| e.data)
            .collect()
    }
}
