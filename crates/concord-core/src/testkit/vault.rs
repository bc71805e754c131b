//! The vault store's in-memory fake and conformance suite.

use crate::domain::vault::{Sealed, TokenType};
use crate::ports::{DataKeyRow, FoundToken, MasterKeyRow, StoreError, TokenInsert, TokenRecord, VaultStore};
use async_trait::async_trait;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use uuid::Uuid;

#[derive(Default)]
struct VaultState {
    master: BTreeMap<u32, MasterKeyRow>,
    keys: BTreeMap<Uuid, DataKeyRow>,
    tokens: BTreeMap<String, TokenRecord>,
    rules: BTreeMap<String, serde_json::Value>,
}

/// The vault store in memory, for use-case tests. Not durable.
#[derive(Default)]
pub struct MemoryVaultStore {
    state: Mutex<VaultState>,
}

impl MemoryVaultStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, VaultState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Flips a bit of a stored ciphertext, as an attacker with the database could.
    pub fn tamper(&self, token: &str) {
        if let Some(r) = self.lock().tokens.get_mut(token) {
            r.sealed.ciphertext[0] ^= 1;
        }
    }
}

#[async_trait]
impl VaultStore for MemoryVaultStore {
    async fn master_keys(&self) -> Result<Vec<MasterKeyRow>, StoreError> {
        Ok(self.lock().master.values().cloned().collect())
    }

    async fn insert_master_key(&self, row: &MasterKeyRow) -> Result<bool, StoreError> {
        let mut st = self.lock();
        if st.master.contains_key(&row.version) {
            return Ok(false);
        }
        st.master.insert(row.version, row.clone());
        Ok(true)
    }

    async fn rewrap_master_key(&self, row: &MasterKeyRow) -> Result<(), StoreError> {
        if let Some(r) = self.lock().master.get_mut(&row.version) {
            r.wrapped = row.wrapped.clone();
        }
        Ok(())
    }

    async fn data_key(&self, subject: &str) -> Result<Option<DataKeyRow>, StoreError> {
        Ok(self.lock().keys.values().find(|k| k.subject == subject).cloned())
    }

    async fn insert_data_key(&self, row: &DataKeyRow) -> Result<DataKeyRow, StoreError> {
        let mut st = self.lock();
        if let Some(k) = st.keys.values().find(|k| k.subject == row.subject) {
            return Ok(k.clone());
        }
        st.keys.insert(row.id, row.clone());
        Ok(row.clone())
    }

    async fn delete_data_key(&self, subject: &str) -> Result<bool, StoreError> {
        let mut st = self.lock();
        let before = st.keys.len();
        st.keys.retain(|_, k| k.subject != subject);
        Ok(st.keys.len() < before)
    }

    async fn data_keys_below(
        &self,
        version: u32,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<DataKeyRow>, StoreError> {
        Ok(self
            .lock()
            .keys
            .values()
            .filter(|k| k.master_version < version && after.is_none_or(|a| k.id > a))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn rewrap_data_key(&self, row: &DataKeyRow, from_version: u32) -> Result<bool, StoreError> {
        let mut st = self.lock();
        match st.keys.get_mut(&row.id) {
            Some(k) if k.master_version == from_version => {
                k.master_version = row.master_version;
                k.wrapped = row.wrapped.clone();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn insert_tokens(&self, records: &[TokenRecord]) -> Result<Vec<TokenInsert>, StoreError> {
        let mut st = self.lock();
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            if !st.keys.contains_key(&r.data_key_id) {
                out.push(TokenInsert::KeyErased);
                continue;
            }
            if let Some(stored) = st.tokens.get(&r.token) {
                out.push(if stored.sealed.nonce == r.sealed.nonce {
                    TokenInsert::Inserted
                } else {
                    TokenInsert::TokenTaken
                });
                continue;
            }
            let existing = r.blind_index.and_then(|bi| {
                st.tokens
                    .values()
                    .find(|t| t.data_key_id == r.data_key_id && t.blind_index == Some(bi))
            });
            if let Some(e) = existing {
                out.push(TokenInsert::Existing {
                    token: e.token.clone(),
                    expires_at: e.expires_at,
                });
                continue;
            }
            st.tokens.insert(r.token.clone(), r.clone());
            out.push(TokenInsert::Inserted);
        }
        Ok(out)
    }

    async fn find_tokens(&self, tokens: &[String]) -> Result<Vec<FoundToken>, StoreError> {
        let st = self.lock();
        Ok(tokens
            .iter()
            .filter_map(|t| st.tokens.get(t))
            .map(|r| FoundToken {
                record: r.clone(),
                key: st.keys.get(&r.data_key_id).cloned(),
            })
            .collect())
    }

    async fn delete_expired_token(&self, token: &str, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let mut st = self.lock();
        let expired = st
            .tokens
            .get(token)
            .is_some_and(|r| r.expires_at.is_some_and(|e| e <= now));
        if expired {
            st.tokens.remove(token);
        }
        Ok(expired)
    }

    async fn purge_expired_tokens(&self, now: DateTime<Utc>, limit: usize) -> Result<u64, StoreError> {
        let mut st = self.lock();
        let doomed: Vec<String> = st
            .tokens
            .values()
            .filter(|r| r.expires_at.is_some_and(|e| e <= now))
            .take(limit)
            .map(|r| r.token.clone())
            .collect();
        for t in &doomed {
            st.tokens.remove(t);
        }
        Ok(doomed.len() as u64)
    }

    async fn put_rules(
        &self,
        category: &str,
        fields: &serde_json::Value,
        _now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.lock().rules.insert(category.to_owned(), fields.clone());
        Ok(())
    }

    async fn get_rules(&self, category: &str) -> Result<Option<serde_json::Value>, StoreError> {
        Ok(self.lock().rules.get(category).cloned())
    }
}

/// Now, to the microsecond that every store keeps.
fn now_us() -> DateTime<Utc> {
    DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).expect("now is in range")
}

fn sealed(tag: u8) -> Sealed {
    Sealed {
        nonce: [tag; 12],
        ciphertext: vec![tag; 24],
    }
}

fn data_key(subject: &str, version: u32) -> DataKeyRow {
    DataKeyRow {
        id: Uuid::new_v4(),
        subject: subject.to_owned(),
        master_version: version,
        wrapped: sealed(7),
        created_at: now_us(),
    }
}

fn record(token: &str, key: Uuid, index: Option<u8>) -> TokenRecord {
    // A nonce of its own, as every sealed record has.
    let mut nonce = [0u8; 12];
    crate::domain::vault::random_bytes(&mut nonce).expect("randomness");
    TokenRecord {
        token: token.to_owned(),
        kind: TokenType::Card,
        data_key_id: key,
        sealed: Sealed {
            nonce,
            ciphertext: vec![3; 24],
        },
        blind_index: index.map(|i| [i; 32]),
        metadata: Some(json!({"order": 42})),
        expires_at: None,
        created_at: now_us(),
    }
}

/// Runs every vault-store check on a fresh store.
pub async fn vault_store_suite<S: VaultStore>(s: S) {
    let s = Arc::new(s);
    // The keyring: versions are unique, listed in order.
    assert!(s.master_keys().await.unwrap().is_empty());
    for v in [2, 1] {
        let row = MasterKeyRow {
            version: v,
            wrapped: sealed(u8::try_from(v).unwrap()),
            created_at: now_us(),
        };
        assert!(s.insert_master_key(&row).await.unwrap());
        assert!(!s.insert_master_key(&row).await.unwrap(), "a version is added once");
    }
    let ring = s.master_keys().await.unwrap();
    assert_eq!(ring.iter().map(|r| r.version).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(ring[1].wrapped, sealed(2), "wrapped keys round-trip");
    s.rewrap_master_key(&MasterKeyRow {
        wrapped: sealed(20),
        ..ring[1].clone()
    })
    .await
    .unwrap();
    assert_eq!(s.master_keys().await.unwrap()[1].wrapped, sealed(20));
    assert_eq!(
        s.master_keys().await.unwrap()[0].wrapped,
        sealed(1),
        "only that version"
    );

    // Data keys: the first for a subject wins.
    assert!(s.data_key("customer-1").await.unwrap().is_none());
    let first = data_key("customer-1", 1);
    assert_eq!(s.insert_data_key(&first).await.unwrap(), first);
    let second = data_key("customer-1", 1);
    assert_eq!(s.insert_data_key(&second).await.unwrap(), first, "the first key stays");
    assert_eq!(s.data_key("customer-1").await.unwrap().unwrap(), first);
    let other = s.insert_data_key(&data_key("customer-2", 2)).await.unwrap();

    // Tokens: a taken token, a convergent duplicate, in one batch and across batches.
    let tok_a = record("tok_a", first.id, None);
    let out = s
        .insert_tokens(&[
            tok_a.clone(),
            record("tok_b", first.id, Some(9)),
            record("tok_c", first.id, Some(9)),
            record("tok_a", first.id, None),
            record("tok_d", other.id, Some(9)),
        ])
        .await
        .unwrap();
    assert_eq!(out[0], TokenInsert::Inserted);
    assert_eq!(out[1], TokenInsert::Inserted);
    assert_eq!(
        out[2],
        TokenInsert::Existing {
            token: "tok_b".into(),
            expires_at: None
        }
    );
    assert_eq!(out[3], TokenInsert::TokenTaken);
    assert_eq!(out[4], TokenInsert::Inserted, "the index is unique per data key only");
    assert_eq!(
        s.insert_tokens(std::slice::from_ref(&tok_a)).await.unwrap(),
        vec![TokenInsert::Inserted],
        "the same record again is stored once"
    );
    let again = s.insert_tokens(&[record("tok_e", first.id, Some(9))]).await.unwrap();
    assert!(matches!(&again[0], TokenInsert::Existing { token, .. } if token == "tok_b"));

    let mut found = s
        .find_tokens(&["tok_a".into(), "tok_b".into(), "tok_missing".into(), "tok_d".into()])
        .await
        .unwrap();
    found.sort_by(|a, b| a.record.token.cmp(&b.record.token));
    assert_eq!(found.len(), 3);
    assert_eq!(found[0].record, tok_a.clone().with_time(found[0].record.created_at));
    assert_eq!(found[0].key.as_ref().unwrap(), &first);
    assert_eq!(found[2].key.as_ref().unwrap().subject, "customer-2");

    // Erasure: one row; the records stay and lose their key.
    assert!(s.delete_data_key("customer-1").await.unwrap());
    assert!(!s.delete_data_key("customer-1").await.unwrap());
    let found = s.find_tokens(&["tok_a".into(), "tok_d".into()]).await.unwrap();
    assert_eq!(found.len(), 2);
    for f in &found {
        assert_eq!(f.key.is_none(), f.record.token == "tok_a", "{}", f.record.token);
    }
    let late = s.insert_tokens(&[record("tok_late", first.id, Some(4))]).await.unwrap();
    assert_eq!(
        late,
        vec![TokenInsert::KeyErased],
        "nothing is sealed under an erased key"
    );
    assert!(s.find_tokens(&["tok_late".into()]).await.unwrap().is_empty());
    let renewed = s.insert_data_key(&data_key("customer-1", 2)).await.unwrap();
    assert_ne!(renewed.id, first.id, "an erased subject gets a new key");
    let f = s.find_tokens(&["tok_a".into()]).await.unwrap();
    assert!(f[0].key.is_none(), "old records stay erased");

    // Rotation: keys below a version, re-wrapped only from the version they had.
    let below = s.data_keys_below(2, None, 10).await.unwrap();
    assert!(below.is_empty(), "{below:?}");
    let old = s.insert_data_key(&data_key("customer-3", 1)).await.unwrap();
    let below = s.data_keys_below(3, None, 10).await.unwrap();
    assert_eq!(below.len(), 3);
    assert!(below.windows(2).all(|w| w[0].id < w[1].id), "in id order");
    let paged = s.data_keys_below(3, Some(below[0].id), 10).await.unwrap();
    assert_eq!(paged.len(), 2);
    let moved = DataKeyRow {
        master_version: 3,
        wrapped: sealed(30),
        ..old.clone()
    };
    assert!(
        !s.rewrap_data_key(&moved, 2).await.unwrap(),
        "it was not under version 2"
    );
    assert!(s.rewrap_data_key(&moved, 1).await.unwrap());
    assert_eq!(s.data_key("customer-3").await.unwrap().unwrap(), moved);
    assert_eq!(s.data_keys_below(3, None, 10).await.unwrap().len(), 2);

    // Expiry.
    let now = now_us();
    let mut expired = record("tok_old", other.id, Some(1));
    expired.expires_at = Some(now - ChronoDuration::seconds(1));
    let mut live = record("tok_live", other.id, None);
    live.expires_at = Some(now + ChronoDuration::hours(1));
    s.insert_tokens(&[expired, live]).await.unwrap();
    assert!(!s.delete_expired_token("tok_live", now).await.unwrap());
    assert!(s.delete_expired_token("tok_old", now).await.unwrap());
    let mut expired = record("tok_old2", other.id, None);
    expired.expires_at = Some(now - ChronoDuration::seconds(1));
    s.insert_tokens(&[expired]).await.unwrap();
    assert_eq!(s.purge_expired_tokens(now, 100).await.unwrap(), 1);
    assert_eq!(
        s.find_tokens(&["tok_old2".into(), "tok_live".into()])
            .await
            .unwrap()
            .len(),
        1
    );

    // Rules: put replaces.
    assert!(s.get_rules("customer").await.unwrap().is_none());
    s.put_rules("customer", &json!({"/email": {"type": "email"}}), now)
        .await
        .unwrap();
    s.put_rules("customer", &json!({"/phone": {"type": "phone"}}), now)
        .await
        .unwrap();
    assert_eq!(
        s.get_rules("customer").await.unwrap().unwrap(),
        json!({"/phone": {"type": "phone"}})
    );

    // Concurrent convergent inserts agree on one token.
    let key = s.insert_data_key(&data_key("customer-9", 1)).await.unwrap();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.insert_tokens(&[record(&format!("tok_c{i}"), key.id, Some(5))])
                    .await
                    .unwrap()
                    .remove(0)
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut tokens = std::collections::HashSet::new();
    for t in tasks {
        match t.await.unwrap() {
            TokenInsert::Inserted => winners.push(()),
            TokenInsert::Existing { token, .. } => {
                tokens.insert(token);
            }
            other => panic!("distinct tokens with a live key: {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one insert wins");
    assert_eq!(tokens.len(), 1, "every loser sees the winner: {tokens:?}");
}

impl TokenRecord {
    fn with_time(mut self, at: DateTime<Utc>) -> Self {
        self.created_at = at;
        self
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn the_memory_store_passes_the_vault_store_suite() {
        super::vault_store_suite(super::MemoryVaultStore::default()).await;
    }
}
