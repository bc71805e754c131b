//! The tokenization vault's use cases: tokenize, detokenize under per-caller policy with an audit
//! trail, master key rotation, crypto-shredding of a subject, and tokenized event fields.

use crate::app::group_commit::{Batcher, Drain};
use crate::domain::event::UncheckedEvent;
use crate::domain::vault::crypto::{data_key_aad, master_key_aad, value_aad};
use crate::domain::vault::{FieldRules, SecretKey, Subject, SubjectKeys, Token, TokenFormat, TokenType, VaultError};
use crate::domain::{AppendRequest, ExpectedVersion, Limits, Principal, StreamName};
use crate::ports::{DataKeyRow, EventStore, MasterKeyRow, StoreError, TokenInsert, TokenRecord, VaultStore};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};
use uuid::Uuid;
use zeroize::Zeroizing;

/// The stream every detokenize, erasure and rotation is recorded in. Its category (`$vault`) is
/// readable only with `vault:audit`.
pub const AUDIT_STREAM: &str = "$vault-audit";

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

/// One value to tokenize.
pub struct TokenizeItem {
    pub kind: TokenType,
    pub value: Zeroizing<String>,
    pub format: TokenFormat,
    /// The same type, format, subject and value give the same token.
    pub convergent: bool,
    pub subject: Option<Subject>,
    pub ttl_s: Option<u64>,
    pub metadata: Option<Value>,
}

/// How detokenized values are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reveal {
    Plain,
    Masked,
}

impl Reveal {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::Masked => "masked",
        }
    }
}

/// Why one token revealed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemError {
    NotFound,
    Expired,
    /// Its subject was erased: the data key is gone, and the value with it.
    Erased,
    /// Its ciphertext failed authentication (tampering, or a vault key that does not match).
    Corrupted,
    /// The caller lacks the scope for its type.
    Denied,
}

impl ItemError {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::Expired => "expired",
            Self::Erased => "erased",
            Self::Corrupted => "corrupted",
            Self::Denied => "denied",
        }
    }
}

/// One detokenized item, in request order.
#[derive(Debug, Clone)]
pub struct Revealed {
    pub token: String,
    pub kind: Option<TokenType>,
    pub value: Option<Zeroizing<String>>,
    pub metadata: Option<Value>,
    pub error: Option<ItemError>,
}

/// The result of a rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotated {
    pub master_key_version: u32,
    /// Data keys re-wrapped by this call.
    pub rewrapped: u64,
}

/// A category's rules (none: the category has none) and when they were looked up.
type CachedRules = (Option<Arc<FieldRules>>, Instant);

/// Keys for purposes other than sealing values (see `Vault::derived`).
struct DerivedKeys {
    fingerprint: SecretKey,
    subject_ref: SecretKey,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Entries a node's caches hold at most; past it a cache starts over rather than grow.
const CACHE_MAX: usize = 10_000;
/// New tokens tried for one item before giving up (a collision is rare but possible).
const MAX_TOKEN_TRIES: usize = 8;
/// Items listed in the audit record of a refused detokenize.
const MAX_REFUSED_LISTED: usize = 16;
/// Data keys re-wrapped per page during a rotation.
const REWRAP_PAGE: usize = 500;

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
    /// New token records of concurrent requests, written in one statement.
    token_writes: Batcher<TokenWrites>,
    /// Audit records of concurrent requests, written in one append.
    audits: Batcher<AuditWrites>,
    config: VaultConfig,
}

/// Token records of several requests in one `insert_tokens`.
struct TokenWrites(Arc<dyn VaultStore>);

#[async_trait::async_trait]
impl Drain for TokenWrites {
    const QUEUE: &'static str = "vault_tokens";
    type Item = Vec<TokenRecord>;
    type Output = Result<Vec<TokenInsert>, StoreError>;

    fn weight(item: &Self::Item) -> usize {
        item.len()
    }

    async fn write(&self, batch: Vec<Self::Item>) -> Vec<Self::Output> {
        let lens: Vec<usize> = batch.iter().map(Vec::len).collect();
        let all: Vec<TokenRecord> = batch.into_iter().flatten().collect();
        match self.0.insert_tokens(&all).await {
            Ok(outcomes) => {
                let mut outcomes = outcomes.into_iter();
                lens.iter().map(|n| Ok(outcomes.by_ref().take(*n).collect())).collect()
            }
            Err(e) if lens.len() == 1 => vec![Err(e)],
            // One request the database refuses must not fail the others: write them one by one.
            Err(_) => {
                let mut all = all.into_iter();
                let mut out = Vec::with_capacity(lens.len());
                for n in lens {
                    let own: Vec<TokenRecord> = all.by_ref().take(n).collect();
                    out.push(self.0.insert_tokens(&own).await);
                }
                out
            }
        }
    }
}

/// Audit records (event type, data) of several requests in one append to [`AUDIT_STREAM`]; each
/// record stays its own event.
struct AuditWrites {
    events: Arc<dyn EventStore>,
    limits: Limits,
}

impl AuditWrites {
    /// The append of `records`; `Err` when the log's limits refuse one of them.
    fn request(&self, records: &[AuditRecord]) -> Result<AppendRequest, String> {
        let stream = StreamName::parse(AUDIT_STREAM).map_err(|e| e.to_string())?;
        let events = records
            .iter()
            .map(|r| UncheckedEvent {
                // Chosen once per record: an append retried after an unclear failure is then
                // replayed by the store, not written twice.
                id: Some(r.id),
                event_type: r.event_type.into(),
                data: r.data.clone(),
                metadata: None,
            })
            .collect();
        AppendRequest::new(stream, ExpectedVersion::Any, events, &self.limits).map_err(|e| format!("audit record: {e}"))
    }

    async fn append(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        let request = self.request(records).map_err(StoreError::Unavailable)?;
        self.events.append(request).await.map(|_| ())
    }
}

/// One audit record, with the event id it is written under.
#[derive(Clone)]
struct AuditRecord {
    id: Uuid,
    event_type: &'static str,
    data: Value,
}

#[async_trait::async_trait]
impl Drain for AuditWrites {
    const QUEUE: &'static str = "vault_audit";
    type Item = AuditRecord;
    type Output = Result<(), StoreError>;

    fn weight(_: &Self::Item) -> usize {
        1
    }

    async fn write(&self, batch: Vec<Self::Item>) -> Vec<Self::Output> {
        let n = batch.len();
        match self.request(&batch) {
            // A store failure fails them all alike; a retry of theirs is replayed, not doubled.
            Ok(request) => return vec![self.events.append(request).await.map(|_| ()); n],
            Err(e) if n == 1 => return vec![Err(StoreError::Unavailable(e))],
            Err(_) => {}
        }
        // A record the log's limits refuse must not fail the others: write them one by one.
        let mut out = Vec::with_capacity(n);
        for record in batch {
            out.push(self.append(std::slice::from_ref(&record)).await);
        }
        out
    }
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
        });
        Ok(vault)
    }

    fn derived(&self) -> &DerivedKeys {
        // Set in `open` before the vault is handed out.
        self.derived.get_or_init(|| DerivedKeys {
            fingerprint: self.master.derive(b"concord/idempotency/fingerprint"),
            subject_ref: self.master.derive(b"concord/vault/audit-subject"),
        })
    }

    #[must_use]
    pub fn config(&self) -> &VaultConfig {
        &self.config
    }

    /// The fingerprint of a request for `Idempotency-Key`, keyed with a secret derived from the
    /// master key (the same on every node), so a stored fingerprint of a body holding a card
    /// number cannot be matched against guesses.
    #[must_use]
    pub fn fingerprint(&self, method: &str, target: &str, body: &[u8]) -> crate::domain::Fingerprint {
        crate::domain::Fingerprint::keyed(self.derived().fingerprint.bytes(), method, target, body)
    }

    /// A reference to a subject for the audit trail: HMAC-SHA256 under a vault key, hex. The
    /// vault can tell whether a given subject was erased; the trail does not name it.
    #[must_use]
    pub fn subject_ref(&self, subject: &Subject) -> String {
        use hmac::Mac as _;
        let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(self.derived().subject_ref.bytes())
            .expect("HMAC takes any key length");
        mac.update(subject.as_str().as_bytes());
        mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Records in the audit trail that a key able to reveal values was created, before it is.
    ///
    /// # Errors
    /// [`VaultFailure::Store`]: the key must then not be created.
    pub async fn record_grant(&self, principal: &Principal, name: &str, scopes: &[&str]) -> Result<(), VaultFailure> {
        self.audit(
            principal,
            "RevealGranted",
            json!({"new_key_name": name, "scopes": scopes}),
        )
        .await
    }

    /// Re-wraps under the configured master key every keyring version that only a previous
    /// master key opens. Cost: one row per version, nothing else is touched.
    async fn adopt_master_key(&self) -> Result<(), VaultFailure> {
        if self.config.previous_master_keys.is_empty() {
            return Ok(());
        }
        for row in self.store.master_keys().await? {
            let aad = master_key_aad(row.version);
            if self.master.unwrap_key(&row.wrapped, &aad).is_ok() {
                continue;
            }
            let Some(key) = self
                .config
                .previous_master_keys
                .iter()
                .find_map(|old| old.unwrap_key(&row.wrapped, &aad).ok())
            else {
                continue; // reload_keyring names the version no key opens
            };
            let rewrapped = MasterKeyRow {
                wrapped: self.master.wrap(&key, &aad)?,
                ..row
            };
            self.store.rewrap_master_key(&rewrapped).await?;
            tracing::info!(
                version = rewrapped.version,
                "master key version re-wrapped under the new master key"
            );
        }
        Ok(())
    }

    async fn reload_keyring(&self) -> Result<(), VaultFailure> {
        let rows = self.store.master_keys().await?;
        let mut ring = BTreeMap::new();
        for row in rows {
            let aad = master_key_aad(row.version);
            // During a master key change, nodes not restarted yet may still add versions under
            // the old key: any configured key opens a version.
            let key = std::iter::once(&self.master)
                .chain(&self.config.previous_master_keys)
                .find_map(|k| k.unwrap_key(&row.wrapped, &aad).ok())
                .ok_or_else(|| {
                    VaultError::MasterKey(format!(
                        "it does not open master key version {} of this vault: it is not the key the vault was created with",
                        row.version
                    ))
                })?;
            ring.insert(row.version, key);
        }
        *self.keyring.write().unwrap_or_else(PoisonError::into_inner) = ring;
        Ok(())
    }

    fn current_version(&self) -> Option<(u32, SecretKey)> {
        let ring = self.keyring.read().unwrap_or_else(PoisonError::into_inner);
        ring.iter().next_back().map(|(v, k)| (*v, k.clone()))
    }

    async fn master_version(&self, version: u32) -> Result<SecretKey, VaultFailure> {
        let found = self
            .keyring
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&version)
            .cloned();
        if let Some(k) = found {
            return Ok(k);
        }
        // Another node may have rotated since this one loaded the keyring.
        self.reload_keyring().await?;
        self.keyring
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&version)
            .cloned()
            .ok_or(VaultFailure::Invalid(VaultError::Crypto))
    }

    async fn add_master_version(&self, version: u32) -> Result<bool, VaultFailure> {
        let key = SecretKey::generate()?;
        let row = MasterKeyRow {
            version,
            wrapped: self.master.wrap(&key, &master_key_aad(version))?,
            created_at: Utc::now(),
        };
        Ok(self.store.insert_master_key(&row).await?)
    }

    fn open_data_key(&self, row: &DataKeyRow, master: &SecretKey) -> Result<SubjectKeys, VaultError> {
        let dk = master.unwrap_key(&row.wrapped, &data_key_aad(row.id, &row.subject, row.master_version))?;
        Ok(SubjectKeys::derive(&dk))
    }

    /// The data key new tokens of `subject` are sealed with, created on first use.
    async fn keys_for(&self, subject: &str) -> Result<(Uuid, SubjectKeys), VaultFailure> {
        if let Some((id, keys, at)) = lock(&self.data_keys).get(subject)
            && at.elapsed() < self.config.key_cache_ttl
        {
            return Ok((*id, keys.clone()));
        }
        let row = match self.store.data_key(subject).await? {
            Some(row) => row,
            None => {
                // A new key goes under the newest version, even if another node rotated lately.
                self.reload_keyring().await?;
                let (version, master) = self
                    .current_version()
                    .ok_or(VaultFailure::Invalid(VaultError::Crypto))?;
                let id = Uuid::new_v4();
                let dk = SecretKey::generate()?;
                let row = DataKeyRow {
                    id,
                    subject: subject.to_owned(),
                    master_version: version,
                    wrapped: master.wrap(&dk, &data_key_aad(id, subject, version))?,
                    created_at: Utc::now(),
                };
                self.store.insert_data_key(&row).await?
            }
        };
        let master = self.master_version(row.master_version).await?;
        let keys = self.open_data_key(&row, &master)?;
        if !self.config.key_cache_ttl.is_zero() {
            let mut cache = lock(&self.data_keys);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
            cache.insert(subject.to_owned(), (row.id, keys.clone(), Instant::now()));
        }
        Ok((row.id, keys))
    }

    /// Tokenizes every item, in order, or none (a bad item fails the whole request before
    /// anything is written).
    ///
    /// # Errors
    /// [`VaultFailure::Invalid`] for a bad item or batch size; [`VaultFailure::Store`].
    #[tracing::instrument(skip_all, fields(items = items.len()))]
    pub async fn tokenize(&self, items: Vec<TokenizeItem>) -> Result<Vec<Token>, VaultFailure> {
        if items.is_empty() || items.len() > self.config.max_batch {
            return Err(VaultError::BatchSize {
                count: items.len(),
                limit: self.config.max_batch,
            }
            .into());
        }
        self.tokenize_unbounded(items, IndexContext::Api).await
    }

    async fn tokenize_unbounded(
        &self,
        items: Vec<TokenizeItem>,
        context: IndexContext,
    ) -> Result<Vec<Token>, VaultFailure> {
        // Stored times keep microseconds, and the expiry is bound into the ciphertext.
        let now = DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap_or_else(Utc::now);
        let mut prepared = Vec::with_capacity(items.len());
        for item in items {
            prepared.push(self.prepare(item, now, context)?);
        }
        let mut keys: HashMap<String, (Uuid, SubjectKeys)> = HashMap::new();
        for p in &prepared {
            if !keys.contains_key(&p.subject) {
                let k = self.keys_for(&p.subject).await?;
                keys.insert(p.subject.clone(), k);
            }
        }
        let mut tokens: Vec<Option<Token>> = vec![None; prepared.len()];
        for _ in 0..MAX_TOKEN_TRIES {
            let pending: Vec<usize> = (0..prepared.len()).filter(|i| tokens[*i].is_none()).collect();
            if pending.is_empty() {
                break;
            }
            let mut records = Vec::with_capacity(pending.len());
            for &i in &pending {
                let p = &prepared[i];
                let (key_id, k) = &keys[&p.subject];
                records.push(p.record(*key_id, k, now)?);
            }
            let outcomes = self.token_writes.submit(records.clone()).await??;
            let mut refreshed = std::collections::HashSet::new();
            for ((&i, record), outcome) in pending.iter().zip(&records).zip(outcomes) {
                match outcome {
                    TokenInsert::Inserted => tokens[i] = Some(Token::parse(&record.token)?),
                    TokenInsert::Existing { token, expires_at } => {
                        if expires_at.is_some_and(|e| e <= now) {
                            // An expired convergent token makes way for a fresh one.
                            self.store.delete_expired_token(&token, now).await?;
                        } else {
                            tokens[i] = Some(Token::parse(&token)?);
                        }
                    }
                    TokenInsert::TokenTaken => {}
                    TokenInsert::KeyErased => {
                        // The subject was erased since its key was looked up: new values get a
                        // new key rather than one that is already gone.
                        let subject = &prepared[i].subject;
                        if refreshed.insert(subject.clone()) {
                            lock(&self.data_keys).remove(subject);
                            let k = self.keys_for(subject).await?;
                            keys.insert(subject.clone(), k);
                        }
                    }
                }
            }
        }
        let tokens: Option<Vec<Token>> = tokens.into_iter().collect();
        let tokens = tokens.ok_or_else(|| StoreError::Unavailable("no free token found; try again".into()))?;
        metrics::counter!("concord_vault_tokenized_total").increment(tokens.len() as u64);
        Ok(tokens)
    }

    fn prepare(&self, item: TokenizeItem, now: DateTime<Utc>, context: IndexContext) -> Result<Prepared, VaultError> {
        item.format.check(item.kind)?;
        let normalized = item.kind.normalize(&item.value, self.config.max_value_bytes)?;
        if let Some(m) = &item.metadata {
            if !m.is_object() {
                return Err(VaultError::InvalidItem("metadata must be a JSON object".into()));
            }
            let size = serde_json::to_vec(m).map_or(usize::MAX, |v| v.len());
            if size > self.config.max_metadata_bytes || holds_nul(m) {
                return Err(VaultError::InvalidItem(format!(
                    "metadata must be at most {} bytes without U+0000",
                    self.config.max_metadata_bytes
                )));
            }
        }
        let expires_at = match item.ttl_s {
            None => None,
            Some(0) => return Err(VaultError::InvalidItem("ttl_s must be at least 1".into())),
            Some(s) if s > self.config.max_ttl_s => {
                return Err(VaultError::InvalidItem(format!(
                    "ttl_s must be at most {}",
                    self.config.max_ttl_s
                )));
            }
            Some(s) => Some(
                i64::try_from(s)
                    .ok()
                    .and_then(chrono::Duration::try_seconds)
                    .and_then(|d| now.checked_add_signed(d))
                    .ok_or_else(|| VaultError::InvalidItem("ttl_s is out of range".into()))?,
            ),
        };
        Ok(Prepared {
            context,
            kind: item.kind,
            format: item.format,
            convergent: item.convergent,
            subject: item
                .subject
                .map_or_else(|| Subject::DEFAULT.to_owned(), |s| s.as_str().to_owned()),
            normalized,
            metadata: item.metadata,
            expires_at,
        })
    }

    /// Detokenizes `tokens` for `principal`, in order. Each type needs
    /// `vault:detokenize:{type}` (plain) or, for `masked`, either that or
    /// `vault:detokenize-masked:{type}`. When any item is denied nothing is revealed. Every call
    /// is recorded in [`AUDIT_STREAM`] before any value is returned; if it cannot be recorded,
    /// nothing is revealed.
    ///
    /// # Errors
    /// [`VaultFailure::Forbidden`], [`VaultFailure::RateLimited`], [`VaultFailure::Invalid`] for
    /// a bad batch size, [`VaultFailure::Store`].
    #[tracing::instrument(skip_all, fields(items = tokens.len(), reveal = reveal.as_str()))]
    pub async fn detokenize(
        &self,
        principal: &Principal,
        tokens: Vec<Token>,
        reveal: Reveal,
    ) -> Result<Vec<Revealed>, VaultFailure> {
        if tokens.is_empty() || tokens.len() > self.config.max_batch {
            return Err(VaultError::BatchSize {
                count: tokens.len(),
                limit: self.config.max_batch,
            }
            .into());
        }
        let mut items: Vec<Revealed> = tokens
            .into_iter()
            .map(|t| Revealed {
                token: t.into_string(),
                kind: None,
                value: None,
                metadata: None,
                error: None,
            })
            .collect();
        if let Err(retry_after_ms) = self.take_rate(principal.key_id, items.len()) {
            self.audit_detokenize(principal, reveal, "rate_limited", &items).await?;
            return Err(VaultFailure::RateLimited { retry_after_ms });
        }
        let may_reveal_any = TokenType::ALL.iter().any(|t| allowed(principal, *t, reveal));
        if !may_reveal_any {
            for i in &mut items {
                i.error = Some(ItemError::Denied);
            }
            self.audit_detokenize(principal, reveal, "denied", &items).await?;
            metrics::counter!("concord_vault_detokenize_total", "outcome" => "denied").increment(1);
            return Err(VaultFailure::Forbidden(format!(
                "this key has no vault:detokenize{} scope",
                if reveal == Reveal::Masked {
                    " or vault:detokenize-masked"
                } else {
                    ""
                }
            )));
        }
        let wanted: Vec<String> = items.iter().map(|i| i.token.clone()).collect();
        let found: HashMap<String, crate::ports::FoundToken> = self
            .store
            .find_tokens(&wanted)
            .await?
            .into_iter()
            .map(|f| (f.record.token.clone(), f))
            .collect();
        let now = Utc::now();
        let mut denied = Vec::new();
        for (n, item) in items.iter_mut().enumerate() {
            match found.get(&item.token) {
                None => item.error = Some(ItemError::NotFound),
                Some(f) => {
                    item.kind = Some(f.record.kind);
                    if !allowed(principal, f.record.kind, reveal) {
                        item.error = Some(ItemError::Denied);
                        denied.push(format!("item {n} ({})", f.record.kind.as_str()));
                    } else if f.record.expires_at.is_some_and(|e| e <= now) {
                        item.error = Some(ItemError::Expired);
                    } else if f.key.is_none() {
                        item.error = Some(ItemError::Erased);
                    }
                }
            }
        }
        if !denied.is_empty() {
            self.audit_detokenize(principal, reveal, "denied", &items).await?;
            metrics::counter!("concord_vault_detokenize_total", "outcome" => "denied").increment(1);
            return Err(VaultFailure::Forbidden(format!(
                "nothing revealed: this key may not reveal {} {}",
                denied.join(", "),
                if reveal == Reveal::Masked {
                    "even masked"
                } else {
                    "in plain"
                }
            )));
        }
        for item in &mut items {
            if item.error.is_some() {
                continue;
            }
            // Not removed: the same token may be asked twice in one request.
            let Some(f) = found.get(&item.token) else { continue };
            match self.open_record(f).await {
                Ok(value) => {
                    item.value = Some(match reveal {
                        Reveal::Plain => value,
                        Reveal::Masked => Zeroizing::new(f.record.kind.mask(&value)),
                    });
                    item.metadata.clone_from(&f.record.metadata);
                }
                Err(VaultFailure::Invalid(VaultError::Crypto)) => {
                    tracing::error!(
                        token_type = f.record.kind.as_str(),
                        "a vault record failed authentication"
                    );
                    metrics::counter!("concord_vault_corrupted_total").increment(1);
                    item.error = Some(ItemError::Corrupted);
                }
                Err(e) => return Err(e),
            }
        }
        // The audit record is durable before any value leaves: no reveal goes unrecorded.
        self.audit_detokenize(principal, reveal, "allowed", &items).await?;
        metrics::counter!("concord_vault_detokenize_total", "outcome" => "allowed").increment(1);
        Ok(items)
    }

    async fn open_record(&self, f: &crate::ports::FoundToken) -> Result<Zeroizing<String>, VaultFailure> {
        let key = f.key.as_ref().ok_or(VaultError::Crypto)?;
        let master = self.master_version(key.master_version).await?;
        let keys = self.open_data_key(key, &master)?;
        let r = &f.record;
        let plain = keys.encrypt.open(
            &r.sealed,
            &value_aad(&r.token, r.kind.as_str(), &key.subject, r.data_key_id, r.expires_at),
        )?;
        let text = std::str::from_utf8(&plain).map_err(|_| VaultError::Crypto)?;
        Ok(Zeroizing::new(text.to_owned()))
    }

    /// Takes `n` tokens from the key's bucket; the time to wait when it has too few.
    fn take_rate(&self, key: Uuid, n: usize) -> Result<(), u64> {
        let rate = self.config.detokenize_per_s;
        if rate <= 0.0 {
            return Ok(());
        }
        let burst = self.config.detokenize_burst.max(rate);
        let need = n as f64;
        let mut buckets = lock(&self.buckets);
        if buckets.len() >= CACHE_MAX && !buckets.contains_key(&key) {
            buckets.retain(|_, b| b.at.elapsed().as_secs_f64() * rate < burst);
        }
        let b = buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            at: Instant::now(),
        });
        b.tokens = (b.tokens + b.at.elapsed().as_secs_f64() * rate).min(burst);
        b.at = Instant::now();
        if b.tokens >= need {
            b.tokens -= need;
            Ok(())
        } else {
            let wait = ((need.min(burst) - b.tokens) / rate * 1000.0).ceil();
            Err(if wait.is_finite() { wait as u64 } else { 1000 })
        }
    }

    async fn audit_detokenize(
        &self,
        principal: &Principal,
        reveal: Reveal,
        outcome: &str,
        items: &[Revealed],
    ) -> Result<(), VaultFailure> {
        // A refused call reveals nothing, so its record lists only the first tokens: a key
        // without any scope cannot fill the trail with large records.
        let total = items.len();
        let listed = if outcome == "allowed" {
            total
        } else {
            total.min(MAX_REFUSED_LISTED)
        };
        let items: Vec<Value> = items[..listed]
            .iter()
            .map(|i| {
                json!({
                    "token": i.token,
                    "type": i.kind.map(TokenType::as_str),
                    "result": match (i.error, &i.value) {
                        (Some(e), _) => e.as_str(),
                        (None, Some(_)) => "revealed",
                        (None, None) => "withheld",
                    },
                })
            })
            .collect();
        self.audit(
            principal,
            "Detokenized",
            json!({"reveal": reveal.as_str(), "outcome": outcome, "items_total": total, "items": items}),
        )
        .await
    }

    /// Records an audit entry and waits until it is durable.
    async fn audit(
        &self,
        principal: &Principal,
        event_type: &'static str,
        mut data: Value,
    ) -> Result<(), VaultFailure> {
        if let Some(o) = data.as_object_mut() {
            o.insert("key_id".into(), json!(principal.key_id));
            o.insert("key_name".into(), json!(principal.name));
        }
        let record = AuditRecord {
            id: Uuid::now_v7(),
            event_type,
            data,
        };
        self.audits.submit(record).await??;
        Ok(())
    }

    /// Erases a subject by deleting its data key: its tokens answer `erased` from then on, and
    /// its values (in the vault and in tokenized event fields) are unrecoverable. Constant
    /// time: one row, whatever the number of tokens. False when the subject had no key.
    ///
    /// # Errors
    /// [`VaultFailure::Store`].
    #[tracing::instrument(skip_all)]
    pub async fn erase_subject(&self, principal: &Principal, subject: &Subject) -> Result<bool, VaultFailure> {
        let erased = self.store.delete_data_key(subject.as_str()).await?;
        lock(&self.data_keys).remove(subject.as_str());
        self.audit(
            principal,
            "SubjectErased",
            json!({"subject_ref": self.subject_ref(subject), "had_key": erased}),
        )
        .await?;
        metrics::counter!("concord_vault_subjects_erased_total").increment(u64::from(erased));
        Ok(erased)
    }

    /// Adds a master key version and re-wraps every data key under it. Records are not touched:
    /// the cost grows with the number of subjects, not of tokens. Old versions stay in the
    /// keyring, so nothing wrapped by them becomes unreadable.
    ///
    /// # Errors
    /// [`VaultFailure::Store`], or [`VaultFailure::Invalid`] when a data key fails to open.
    #[tracing::instrument(skip_all)]
    pub async fn rotate(&self, principal: &Principal) -> Result<Rotated, VaultFailure> {
        // This node's keyring may be older than the vault's: start from the newest version, and
        // if another node takes the next number first, try the one after.
        let mut added = false;
        for _ in 0..8 {
            self.reload_keyring().await?;
            let next = self.current_version().map_or(1, |(v, _)| v + 1);
            if self.add_master_version(next).await? {
                added = true;
                break;
            }
        }
        if !added {
            return Err(StoreError::Unavailable("other nodes kept rotating; try again".into()).into());
        }
        self.reload_keyring().await?;
        let (version, newest) = self
            .current_version()
            .ok_or(VaultFailure::Invalid(VaultError::Crypto))?;
        let mut rewrapped = 0u64;
        let mut after = None;
        loop {
            let page = self.store.data_keys_below(version, after, REWRAP_PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            for row in &page {
                let old = self.master_version(row.master_version).await?;
                let dk = old.unwrap_key(&row.wrapped, &data_key_aad(row.id, &row.subject, row.master_version))?;
                let new_row = DataKeyRow {
                    master_version: version,
                    wrapped: newest.wrap(&dk, &data_key_aad(row.id, &row.subject, version))?,
                    ..row.clone()
                };
                if self.store.rewrap_data_key(&new_row, row.master_version).await? {
                    rewrapped += 1;
                }
            }
        }
        self.audit(
            principal,
            "MasterKeyRotated",
            json!({"master_key_version": version, "rewrapped": rewrapped}),
        )
        .await?;
        Ok(Rotated {
            master_key_version: version,
            rewrapped,
        })
    }

    /// Stores the tokenized-field rules of a category; they apply to appends from now on (on
    /// other nodes within the rules cache time).
    ///
    /// # Errors
    /// [`VaultFailure::Invalid`] for bad rules, [`VaultFailure::Store`].
    pub async fn put_rules(
        &self,
        principal: &Principal,
        category: &str,
        fields: &serde_json::Map<String, Value>,
    ) -> Result<FieldRules, VaultFailure> {
        let rules = FieldRules::parse(fields, self.config.max_rule_fields)?;
        // Rules decide what is stored in plain: a change is on the record before it applies.
        self.audit(
            principal,
            "RulesChanged",
            json!({"category": category, "fields": rules.to_json()}),
        )
        .await?;
        self.store.put_rules(category, &rules.to_json(), Utc::now()).await?;
        lock(&self.rules).insert(category.to_owned(), (Some(Arc::new(rules.clone())), Instant::now()));
        Ok(rules)
    }

    /// The rules of a category, if any.
    ///
    /// # Errors
    /// [`VaultFailure::Store`], or [`VaultFailure::Invalid`] for stored rules that no longer parse.
    pub async fn rules(&self, category: &str) -> Result<Option<Arc<FieldRules>>, VaultFailure> {
        if let Some((rules, at)) = lock(&self.rules).get(category)
            && at.elapsed() < self.config.rules_cache_ttl
        {
            return Ok(rules.clone());
        }
        let rules = match self.store.get_rules(category).await? {
            Some(Value::Object(fields)) => Some(Arc::new(FieldRules::parse(&fields, usize::MAX)?)),
            _ => None,
        };
        let mut cache = lock(&self.rules);
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(category.to_owned(), (rules.clone(), Instant::now()));
        Ok(rules)
    }

    /// Replaces the fields the category's rules name, in every event of an append to `stream`,
    /// by convergent tokens whose subject is the stream name, so the stored events hold no
    /// personal data and a re-sent append stores the same tokens. Events of a category without
    /// rules are left as they are.
    ///
    /// # Errors
    /// [`VaultFailure::Invalid`] for a value its type refuses (nothing is appended),
    /// [`VaultFailure::Store`].
    pub async fn tokenize_events(
        &self,
        stream: &StreamName,
        events: &mut [UncheckedEvent],
    ) -> Result<usize, VaultFailure> {
        let Some(rules) = self.rules(stream.category()).await? else {
            return Ok(0);
        };
        let subject = Subject::parse(stream.as_str())?;
        let mut places = Vec::new();
        let mut items = Vec::new();
        for (e, event) in events.iter().enumerate() {
            for (rule, value) in rules.values_in(&event.data)? {
                let r = &rules.fields[rule];
                items.push(TokenizeItem {
                    kind: r.kind,
                    value: Zeroizing::new(value),
                    format: r.format,
                    convergent: true,
                    subject: Some(subject.clone()),
                    ttl_s: None,
                    metadata: None,
                });
                places.push((e, rule));
            }
        }
        if items.is_empty() {
            return Ok(0);
        }
        let tokens = self.tokenize_unbounded(items, IndexContext::EventFields).await?;
        for ((e, rule), token) in places.iter().zip(&tokens) {
            rules.replace(&mut events[*e].data, *rule, token.as_str());
        }
        Ok(tokens.len())
    }

    /// Deletes up to `limit` expired records; returns how many.
    ///
    /// # Errors
    /// [`VaultFailure::Store`].
    pub async fn purge_expired(&self, limit: usize) -> Result<u64, VaultFailure> {
        Ok(self.store.purge_expired_tokens(Utc::now(), limit).await?)
    }
}

fn allowed(principal: &Principal, kind: TokenType, reveal: Reveal) -> bool {
    let plain = principal.scopes.iter().any(|s| s.as_str() == kind.plain_scope());
    match reveal {
        Reveal::Plain => plain,
        Reveal::Masked => plain || principal.scopes.iter().any(|s| s.as_str() == kind.masked_scope()),
    }
}

/// Where a convergent token was asked for. Each has its own blind index, so a caller of the API
/// can never find the token of an event field by guessing its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IndexContext {
    Api,
    EventFields,
}

impl IndexContext {
    fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::EventFields => "event-fields",
        }
    }
}

/// Whether any string in `v` (keys included) holds U+0000, which no JSON column can store.
fn holds_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(holds_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

/// An item checked and normalized, ready to be sealed under a token.
struct Prepared {
    context: IndexContext,
    kind: TokenType,
    format: TokenFormat,
    convergent: bool,
    subject: String,
    normalized: Zeroizing<String>,
    metadata: Option<Value>,
    expires_at: Option<DateTime<Utc>>,
}

impl Prepared {
    /// A record under a fresh token (the token is part of the associated data, so each try
    /// seals again).
    fn record(&self, data_key_id: Uuid, keys: &SubjectKeys, now: DateTime<Utc>) -> Result<TokenRecord, VaultError> {
        let token = self.format.generate(&self.normalized)?;
        let sealed = keys.encrypt.seal(
            self.normalized.as_bytes(),
            &value_aad(
                token.as_str(),
                self.kind.as_str(),
                &self.subject,
                data_key_id,
                self.expires_at,
            ),
        )?;
        Ok(TokenRecord {
            token: token.into_string(),
            kind: self.kind,
            data_key_id,
            sealed,
            blind_index: self.convergent.then(|| {
                keys.blind_index(
                    self.context.as_str(),
                    self.kind.as_str(),
                    self.format.as_str(),
                    &self.normalized,
                )
            }),
            metadata: self.metadata.clone(),
            expires_at: self.expires_at,
            created_at: now,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Scope;
    use crate::ports::LogQuery;
    use crate::testkit::{MemoryStore, MemoryVaultStore};

    struct Given {
        vault: Arc<Vault>,
        store: Arc<MemoryVaultStore>,
        events: Arc<MemoryStore>,
        master: SecretKey,
    }

    async fn given(config: VaultConfig) -> Given {
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

    fn caller(scopes: &[&str]) -> Principal {
        Principal {
            key_id: Uuid::new_v4(),
            name: "caller".into(),
            scopes: scopes.iter().map(|s| Scope::parse(s).unwrap()).collect(),
        }
    }

    fn item(kind: TokenType, value: &str) -> TokenizeItem {
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

    fn with_subject(mut i: TokenizeItem, subject: &str) -> TokenizeItem {
        i.subject = Some(Subject::parse(subject).unwrap());
        i
    }

    fn convergent(mut i: TokenizeItem) -> TokenizeItem {
        i.convergent = true;
        i
    }

    async fn reveal(g: &Given, who: &Principal, tokens: &[Token], how: Reveal) -> Result<Vec<Revealed>, VaultFailure> {
        g.vault.detokenize(who, tokens.to_vec(), how).await
    }

    fn values(items: &[Revealed]) -> Vec<Option<String>> {
        items
            .iter()
            .map(|i| i.value.as_ref().map(|v| v.as_str().to_owned()))
            .collect()
    }

    async fn audit_log(g: &Given) -> Vec<Value> {
        let events = g
            .events
            .read_log(&LogQuery {
                after: 0,
                limit: 1000,
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

    #[tokio::test]
    async fn a_tokenized_value_is_revealed_plain_or_masked_by_scope() {
        let g = given(VaultConfig::default()).await;
        let tokens = g
            .vault
            .tokenize(vec![
                item(TokenType::Card, "4242 4242 4242 4242"),
                item(TokenType::Email, "ada@example.com"),
            ])
            .await
            .unwrap();
        let plain = caller(&["vault:detokenize:card", "vault:detokenize:email"]);
        let got = reveal(&g, &plain, &tokens, Reveal::Plain).await.unwrap();
        assert_eq!(
            values(&got),
            vec![Some("4242424242424242".into()), Some("ada@example.com".into())]
        );
        let masked = caller(&["vault:detokenize-masked:card"]);
        let got = reveal(&g, &masked, &tokens[..1], Reveal::Masked).await.unwrap();
        assert_eq!(values(&got), vec![Some("************4242".into())]);
        assert!(matches!(
            reveal(&g, &masked, &tokens[..1], Reveal::Plain).await,
            Err(VaultFailure::Forbidden(_))
        ));
    }

    #[tokio::test]
    async fn one_denied_item_reveals_nothing_and_is_audited() {
        let g = given(VaultConfig::default()).await;
        let tokens = g
            .vault
            .tokenize(vec![
                item(TokenType::Card, "4242424242424242"),
                item(TokenType::Ssn, "123-45-6789"),
            ])
            .await
            .unwrap();
        let who = caller(&["vault:detokenize:card"]);
        let err = reveal(&g, &who, &tokens, Reveal::Plain).await.unwrap_err();
        assert!(
            matches!(&err, VaultFailure::Forbidden(m) if m.contains("item 1 (ssn)")),
            "{err}"
        );
        let nobody = caller(&["admin"]);
        assert!(matches!(
            reveal(&g, &nobody, &tokens, Reveal::Masked).await,
            Err(VaultFailure::Forbidden(_))
        ));
        let audit = audit_log(&g).await;
        assert_eq!(audit.len(), 2);
        assert_eq!(audit[0]["outcome"], "denied");
        assert_eq!(audit[0]["items"][1]["result"], "denied");
        assert_eq!(audit[0]["items"][0]["result"], "withheld");
        assert_eq!(audit[0]["key_id"], json!(who.key_id));
        assert_eq!(audit[1]["items"][0]["result"], "denied");
        let text = serde_json::to_string(&audit).unwrap();
        assert!(!text.contains("4242424242424242") && !text.contains("6789"), "{text}");
    }

    #[tokio::test]
    async fn unknown_expired_and_tampered_tokens_answer_per_item() {
        let g = given(VaultConfig::default()).await;
        let mut short = item(TokenType::Generic, "short-lived");
        short.ttl_s = Some(1);
        let tokens = g
            .vault
            .tokenize(vec![short, item(TokenType::Generic, "tampered")])
            .await
            .unwrap();
        g.store.tamper(tokens[1].as_str());
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let who = caller(&["vault:detokenize:generic"]);
        let mut asked = tokens.clone();
        asked.push(Token::parse("tok_unknown").unwrap());
        let got = reveal(&g, &who, &asked, Reveal::Plain).await.unwrap();
        let errors: Vec<_> = got.iter().map(|i| i.error).collect();
        assert_eq!(
            errors,
            vec![
                Some(ItemError::Expired),
                Some(ItemError::Corrupted),
                Some(ItemError::NotFound)
            ]
        );
        assert!(got.iter().all(|i| i.value.is_none()));
        assert_eq!(g.vault.purge_expired(100).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn convergent_tokens_repeat_per_type_and_subject_even_when_raced() {
        let g = given(VaultConfig::default()).await;
        let card = "4242424242424242";
        let a = g
            .vault
            .tokenize(vec![convergent(item(TokenType::Card, card))])
            .await
            .unwrap();
        let b = g
            .vault
            .tokenize(vec![convergent(item(TokenType::Card, "4242-4242-4242-4242"))])
            .await
            .unwrap();
        assert_eq!(a, b, "the normalized value decides");
        let c = g
            .vault
            .tokenize(vec![convergent(with_subject(
                item(TokenType::Card, card),
                "customer-1",
            ))])
            .await
            .unwrap();
        assert_ne!(a, c, "another subject, another token");
        let plain = g.vault.tokenize(vec![item(TokenType::Card, card)]).await.unwrap();
        assert_ne!(a, plain, "non-convergent tokens are always fresh");
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let v = g.vault.clone();
                tokio::spawn(async move {
                    v.tokenize(vec![convergent(with_subject(
                        item(TokenType::Email, "ada@example.com"),
                        "s-9",
                    ))])
                    .await
                    .unwrap()
                })
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        for t in tasks {
            seen.insert(t.await.unwrap().remove(0));
        }
        assert_eq!(seen.len(), 1);
    }

    #[tokio::test]
    async fn erasing_a_subject_erases_only_its_tokens() {
        let g = given(VaultConfig::default()).await;
        let gone = g
            .vault
            .tokenize(vec![with_subject(
                item(TokenType::Email, "ada@example.com"),
                "customer-1",
            )])
            .await
            .unwrap();
        let kept = g
            .vault
            .tokenize(vec![
                with_subject(item(TokenType::Email, "bob@example.com"), "customer-2"),
                item(TokenType::Email, "carol@example.com"),
            ])
            .await
            .unwrap();
        let admin = caller(&["vault:admin"]);
        assert!(
            g.vault
                .erase_subject(&admin, &Subject::parse("customer-1").unwrap())
                .await
                .unwrap()
        );
        assert!(
            !g.vault
                .erase_subject(&admin, &Subject::parse("customer-1").unwrap())
                .await
                .unwrap()
        );
        let who = caller(&["vault:detokenize:email"]);
        let got = reveal(&g, &who, &gone, Reveal::Plain).await.unwrap();
        assert_eq!(got[0].error, Some(ItemError::Erased));
        let got = reveal(&g, &who, &kept, Reveal::Plain).await.unwrap();
        assert_eq!(
            values(&got),
            vec![Some("bob@example.com".into()), Some("carol@example.com".into())]
        );
        // New data for the subject gets a new key; the old stays erased.
        let fresh = g
            .vault
            .tokenize(vec![with_subject(
                item(TokenType::Email, "ada@example.com"),
                "customer-1",
            )])
            .await
            .unwrap();
        let got = reveal(&g, &who, &[gone[0].clone(), fresh[0].clone()], Reveal::Plain)
            .await
            .unwrap();
        assert_eq!(got[0].error, Some(ItemError::Erased));
        assert_eq!(values(&got)[1].as_deref(), Some("ada@example.com"));
    }

    #[tokio::test]
    async fn rotation_rewraps_each_data_key_and_keeps_every_token_readable() {
        let g = given(VaultConfig::default()).await;
        let mut tokens = Vec::new();
        for s in ["a", "b", "c"] {
            tokens.extend(
                g.vault
                    .tokenize(vec![with_subject(item(TokenType::Phone, "+15550109999"), s)])
                    .await
                    .unwrap(),
            );
        }
        tokens.extend(
            g.vault
                .tokenize(vec![item(TokenType::Phone, "5550109999")])
                .await
                .unwrap(),
        );
        let admin = caller(&["admin"]);
        let r = g.vault.rotate(&admin).await.unwrap();
        assert_eq!(
            r,
            Rotated {
                master_key_version: 2,
                rewrapped: 4
            }
        );
        let r = g.vault.rotate(&admin).await.unwrap();
        assert_eq!(r.master_key_version, 3);
        let who = caller(&["vault:detokenize:phone"]);
        let got = reveal(&g, &who, &tokens, Reveal::Plain).await.unwrap();
        assert!(got.iter().all(|i| i.value.is_some()), "{got:?}");
        // A second node opened on the same store with the same master key reads them too.
        let other = Vault::open(
            g.store.clone(),
            g.events.clone(),
            g.master.clone(),
            VaultConfig::default(),
        )
        .await
        .unwrap();
        let got = other.detokenize(&who, tokens.clone(), Reveal::Plain).await.unwrap();
        assert!(got.iter().all(|i| i.value.is_some()));
    }

    #[tokio::test]
    async fn an_api_caller_cannot_find_an_event_fields_token_by_guessing_its_value() {
        let g = given(VaultConfig::default()).await;
        let fields = json!({"/email": "email"});
        g.vault
            .put_rules(&caller(&["vault:admin"]), "customer", fields.as_object().unwrap())
            .await
            .unwrap();
        let stream = StreamName::parse("customer-7").unwrap();
        let mut events = vec![UncheckedEvent {
            id: None,
            event_type: "Registered".into(),
            data: json!({"email": "ada@example.com"}),
            metadata: None,
        }];
        g.vault.tokenize_events(&stream, &mut events).await.unwrap();
        let guess = g
            .vault
            .tokenize(vec![convergent(with_subject(
                item(TokenType::Email, "ada@example.com"),
                "customer-7",
            ))])
            .await
            .unwrap();
        assert_ne!(
            events[0].data["email"],
            json!(guess[0].as_str()),
            "the guess does not match"
        );
    }

    #[tokio::test]
    async fn a_subject_erased_on_another_node_gets_a_new_key_for_new_values() {
        let g = given(VaultConfig::default()).await;
        let other = Vault::open(
            g.store.clone(),
            g.events.clone(),
            g.master.clone(),
            VaultConfig::default(),
        )
        .await
        .unwrap();
        let first = g
            .vault
            .tokenize(vec![with_subject(item(TokenType::Generic, "before"), "s-1")])
            .await
            .unwrap();
        other
            .erase_subject(&caller(&["admin"]), &Subject::parse("s-1").unwrap())
            .await
            .unwrap();
        // This node still has the erased key cached; the store refuses it and a new key is made.
        let after = g
            .vault
            .tokenize(vec![with_subject(item(TokenType::Generic, "after"), "s-1")])
            .await
            .unwrap();
        let who = caller(&["vault:detokenize:generic"]);
        let got = reveal(
            &g,
            &who,
            &[first[0].clone(), after[0].clone(), after[0].clone()],
            Reveal::Plain,
        )
        .await
        .unwrap();
        assert_eq!(got[0].error, Some(ItemError::Erased));
        assert_eq!(
            values(&got)[1..],
            [Some("after".to_owned()), Some("after".to_owned())],
            "a token asked twice is revealed twice"
        );
    }

    #[tokio::test]
    async fn a_refused_detokenize_lists_only_the_first_tokens() {
        let g = given(VaultConfig::default()).await;
        let tokens: Vec<Token> = (0..40).map(|i| Token::parse(&format!("tok_{i}")).unwrap()).collect();
        assert!(reveal(&g, &caller(&[]), &tokens, Reveal::Plain).await.is_err());
        let audit = audit_log(&g).await;
        assert_eq!(audit[0]["items_total"], 40);
        assert_eq!(audit[0]["items"].as_array().unwrap().len(), MAX_REFUSED_LISTED);
    }

    #[tokio::test]
    async fn the_master_key_itself_rotates_by_opening_with_the_old_one_as_previous() {
        let g = given(VaultConfig::default()).await;
        let tokens = g.vault.tokenize(vec![item(TokenType::Generic, "kept")]).await.unwrap();
        g.vault.rotate(&caller(&["admin"])).await.unwrap();
        let new_master = SecretKey::generate().unwrap();
        let with_old = VaultConfig {
            previous_master_keys: vec![g.master.clone()],
            ..VaultConfig::default()
        };
        Vault::open(g.store.clone(), g.events.clone(), new_master.clone(), with_old)
            .await
            .unwrap();
        // The new key alone opens the vault now, and the old one no longer does.
        let renewed = Vault::open(g.store.clone(), g.events.clone(), new_master, VaultConfig::default())
            .await
            .unwrap();
        let who = caller(&["vault:detokenize:generic"]);
        let got = renewed.detokenize(&who, tokens, Reveal::Plain).await.unwrap();
        assert_eq!(got[0].value.as_deref().map(String::as_str), Some("kept"));
        let old = Vault::open(
            g.store.clone(),
            g.events.clone(),
            g.master.clone(),
            VaultConfig::default(),
        )
        .await;
        assert!(matches!(old, Err(VaultFailure::Invalid(VaultError::MasterKey(_)))));
        // What is keyed by the vault, not the master key, stays the same across the change.
        assert_eq!(
            renewed.fingerprint("POST", "/v1/x", b"{}"),
            g.vault.fingerprint("POST", "/v1/x", b"{}")
        );
        let s = Subject::parse("customer-1").unwrap();
        assert_eq!(renewed.subject_ref(&s), g.vault.subject_ref(&s));
    }

    #[tokio::test]
    async fn a_wrong_master_key_is_refused_when_the_vault_opens() {
        let g = given(VaultConfig::default()).await;
        let wrong = Vault::open(
            g.store.clone(),
            g.events.clone(),
            SecretKey::generate().unwrap(),
            VaultConfig::default(),
        )
        .await;
        assert!(matches!(wrong, Err(VaultFailure::Invalid(VaultError::MasterKey(_)))));
    }

    #[tokio::test]
    async fn bad_items_write_nothing() {
        let g = given(VaultConfig {
            max_batch: 2,
            ..VaultConfig::default()
        })
        .await;
        let bad = g
            .vault
            .tokenize(vec![
                item(TokenType::Card, "4242424242424242"),
                item(TokenType::Card, "4242424242424241"),
            ])
            .await;
        assert!(matches!(
            bad,
            Err(VaultFailure::Invalid(VaultError::InvalidValue { .. }))
        ));
        let mut last4_email = item(TokenType::Email, "ada@example.com");
        last4_email.format = TokenFormat::Last4;
        assert!(g.vault.tokenize(vec![last4_email]).await.is_err());
        let too_many = vec![
            item(TokenType::Generic, "a"),
            item(TokenType::Generic, "b"),
            item(TokenType::Generic, "c"),
        ];
        assert!(matches!(
            g.vault.tokenize(too_many).await,
            Err(VaultFailure::Invalid(VaultError::BatchSize { count: 3, limit: 2 }))
        ));
        assert!(g.store.find_tokens(&[]).await.unwrap().is_empty());
        assert!(g.vault.data_keys.lock().unwrap().is_empty(), "no key was even created");
    }

    #[tokio::test]
    async fn detokenizing_past_the_rate_is_refused_and_audited() {
        let g = given(VaultConfig {
            detokenize_per_s: 2.0,
            detokenize_burst: 3.0,
            ..VaultConfig::default()
        })
        .await;
        let tokens = g.vault.tokenize(vec![item(TokenType::Generic, "x")]).await.unwrap();
        let who = caller(&["vault:detokenize:generic"]);
        let three = vec![tokens[0].clone(), tokens[0].clone(), tokens[0].clone()];
        reveal(&g, &who, &three, Reveal::Plain).await.unwrap();
        let err = reveal(&g, &who, &tokens, Reveal::Plain).await.unwrap_err();
        assert!(
            matches!(err, VaultFailure::RateLimited { retry_after_ms } if retry_after_ms > 0 && retry_after_ms <= 500)
        );
        let other = caller(&["vault:detokenize:generic"]);
        assert!(
            reveal(&g, &other, &tokens, Reveal::Plain).await.is_ok(),
            "the rate is per key"
        );
        assert_eq!(audit_log(&g).await.last().unwrap()["outcome"], "allowed");
        assert_eq!(audit_log(&g).await[1]["outcome"], "rate_limited");
    }

    #[tokio::test]
    async fn event_fields_named_by_rules_become_convergent_tokens_of_the_stream() {
        let g = given(VaultConfig::default()).await;
        let fields = json!({"/email": "email", "/card/number": {"type": "card", "format": "last4"}});
        g.vault
            .put_rules(&caller(&["vault:admin"]), "customer", fields.as_object().unwrap())
            .await
            .unwrap();
        let stream = StreamName::parse("customer-42").unwrap();
        let event = |email: &str| UncheckedEvent {
            id: None,
            event_type: "Registered".into(),
            data: json!({"email": email, "card": {"number": "4242424242424242"}, "plan": "pro"}),
            metadata: None,
        };
        let mut events = vec![event("ada@example.com"), event("ada@example.com")];
        assert_eq!(g.vault.tokenize_events(&stream, &mut events).await.unwrap(), 4);
        assert_eq!(events[0].data, events[1].data, "same stream, same values, same tokens");
        let email = events[0].data["email"].as_str().unwrap().to_owned();
        let card = events[0].data["card"]["number"].as_str().unwrap().to_owned();
        assert!(email.starts_with("tok_"));
        assert!(card.ends_with("4242") && card != "4242424242424242" && card.len() == 16);
        assert_eq!(events[0].data["plan"], "pro");
        let mut untouched = vec![event("ada@example.com")];
        let other = StreamName::parse("order-1").unwrap();
        assert_eq!(g.vault.tokenize_events(&other, &mut untouched).await.unwrap(), 0);
        let mut bad = vec![event("not an email")];
        assert!(g.vault.tokenize_events(&stream, &mut bad).await.is_err());

        let who = caller(&["vault:detokenize:email"]);
        let t = vec![Token::parse(&email).unwrap()];
        assert_eq!(
            values(&reveal(&g, &who, &t, Reveal::Plain).await.unwrap())[0].as_deref(),
            Some("ada@example.com")
        );
        let admin = caller(&["admin"]);
        g.vault
            .erase_subject(&admin, &Subject::parse("customer-42").unwrap())
            .await
            .unwrap();
        assert_eq!(
            reveal(&g, &who, &t, Reveal::Plain).await.unwrap()[0].error,
            Some(ItemError::Erased)
        );
    }
}
