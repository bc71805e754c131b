//! The vault store port: the keyring, subjects' data keys, token records and field rules.

use crate::domain::vault::{Sealed, TokenType};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use concord_kernel::StoreError;
use uuid::Uuid;

/// One version of the vault's keyring: a master key version, wrapped by the configured master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterKeyRow {
    pub version: u32,
    pub wrapped: Sealed,
    pub created_at: DateTime<Utc>,
}

/// A subject's data key, wrapped by a master key version. The default data key has the subject
/// [`crate::domain::vault::Subject::DEFAULT`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataKeyRow {
    /// A fresh id for every data key, so a subject erased and tokenized again gets a new key
    /// and its old values stay erased.
    pub id: Uuid,
    pub subject: String,
    pub master_version: u32,
    pub wrapped: Sealed,
    pub created_at: DateTime<Utc>,
}

/// One tokenized value: only its ciphertext, never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub token: String,
    pub kind: TokenType,
    pub data_key_id: Uuid,
    pub sealed: Sealed,
    /// For convergent tokens: the keyed index of (type, format, value); unique per data key.
    pub blind_index: Option<[u8; 32]>,
    pub metadata: Option<serde_json::Value>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// What became of one record of [`VaultStore::insert_tokens`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenInsert {
    Inserted,
    /// A convergent record with the same blind index under the same data key exists: its token
    /// and expiry.
    Existing {
        token: String,
        expires_at: Option<DateTime<Utc>>,
    },
    /// The token is already taken by another record: generate another. (The same record sent
    /// again, same token and nonce, is `Inserted`: a retry after an unclear failure stores it once.)
    TokenTaken,
    /// The record's data key is gone (its subject was erased meanwhile): nothing was written;
    /// seal the value under the subject's new key.
    KeyErased,
}

/// A stored record and the data key it needs (none once the subject is erased).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundToken {
    pub record: TokenRecord,
    pub key: Option<DataKeyRow>,
}

/// The vault's own database: keyring, data keys, token records and field rules. It is separate
/// from the event store's, so the card-data environment can be segmented from everything else.
#[async_trait]
pub trait VaultStore: Send + Sync + 'static {
    /// Every master key version, in version order.
    async fn master_keys(&self) -> Result<Vec<MasterKeyRow>, StoreError>;
    /// Adds a master key version; false when that version exists (another node rotated first).
    async fn insert_master_key(&self, row: &MasterKeyRow) -> Result<bool, StoreError>;
    /// Replaces the wrapping of an existing master key version (a new configured master key).
    async fn rewrap_master_key(&self, row: &MasterKeyRow) -> Result<(), StoreError>;
    /// The live data key of a subject.
    async fn data_key(&self, subject: &str) -> Result<Option<DataKeyRow>, StoreError>;
    /// Stores a subject's data key unless it has one; returns the one stored (the first wins,
    /// so concurrent first tokenizations of a subject agree on one key).
    async fn insert_data_key(&self, row: &DataKeyRow) -> Result<DataKeyRow, StoreError>;
    /// Deletes a subject's data key (crypto-shredding): one row, whatever the number of tokens.
    /// False when the subject had none.
    async fn delete_data_key(&self, subject: &str) -> Result<bool, StoreError>;
    /// Up to `limit` data keys wrapped by a version older than `version`, in id order after
    /// `after`.
    async fn data_keys_below(
        &self,
        version: u32,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<DataKeyRow>, StoreError>;
    /// Replaces a data key's wrapping if it is still wrapped by `from_version`; false otherwise.
    async fn rewrap_data_key(&self, row: &DataKeyRow, from_version: u32) -> Result<bool, StoreError>;
    /// Inserts records, each on its own terms (see [`TokenInsert`]), in one transaction. A record
    /// is written only while its data key exists, and the key cannot be deleted until the
    /// insert commits.
    async fn insert_tokens(&self, records: &[TokenRecord]) -> Result<Vec<TokenInsert>, StoreError>;
    /// The records of these tokens that exist, with their data keys, in any order.
    async fn find_tokens(&self, tokens: &[String]) -> Result<Vec<FoundToken>, StoreError>;
    /// Deletes one record if it expired before `now` (to make room for a fresh convergent token).
    async fn delete_expired_token(&self, token: &str, now: DateTime<Utc>) -> Result<bool, StoreError>;
    /// Deletes up to `limit` records expired before `now`; returns how many.
    async fn purge_expired_tokens(&self, now: DateTime<Utc>, limit: usize) -> Result<u64, StoreError>;
    /// Stores (replaces) the tokenized-field rules of a category.
    async fn put_rules(&self, category: &str, fields: &serde_json::Value, now: DateTime<Utc>)
    -> Result<(), StoreError>;
    /// The rules of a category, as stored.
    async fn get_rules(&self, category: &str) -> Result<Option<serde_json::Value>, StoreError>;
}
