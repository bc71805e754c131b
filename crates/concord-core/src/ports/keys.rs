//! The key store port: API keys, stored by hash.

use crate::domain::{ApiKeyRecord, KeyHash};
use async_trait::async_trait;
use concord_kernel::StoreError;
use uuid::Uuid;

/// API keys, stored by hash.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Stores a key; a key with the same hash is left as it is (bootstrap is idempotent).
    async fn insert_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError>;
    /// The live (not revoked) key with this hash.
    async fn find_key(&self, hash: &KeyHash) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// Revokes a key; false when no live key had this id.
    async fn revoke_key(&self, id: Uuid) -> Result<bool, StoreError>;
    /// Number of live keys carrying `admin`.
    async fn count_admin_keys(&self) -> Result<u64, StoreError>;
    /// Claims the thing `name` of `kind` (a consumer group, a saga definition) for the key name
    /// `owner` unless it has an owner; returns its owner now. Concurrent claims agree.
    async fn claim_owner(&self, kind: &str, name: &str, owner: &str) -> Result<String, StoreError>;
    /// The owner of `name` of `kind`, if it has one.
    async fn owner(&self, kind: &str, name: &str) -> Result<Option<String>, StoreError>;
}
