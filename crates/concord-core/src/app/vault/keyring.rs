//! The keyring: master key versions (and their re-wrapping when the master key itself changes),
//! the data key of each subject, and rotation to a new master key version.

use super::{CACHE_MAX, Vault, VaultFailure, lock};
use crate::domain::Principal;
use crate::domain::vault::crypto::{data_key_aad, master_key_aad};
use crate::domain::vault::{SecretKey, SubjectKeys, VaultError};
use crate::ports::{DataKeyRow, MasterKeyRow, StoreError};
use chrono::Utc;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::PoisonError;
use std::time::Instant;
use uuid::Uuid;

/// Data keys re-wrapped per page during a rotation.
const REWRAP_PAGE: usize = 500;

/// The result of a rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotated {
    pub master_key_version: u32,
    /// Data keys re-wrapped by this call.
    pub rewrapped: u64,
}

impl Vault {
    /// Re-wraps under the configured master key every keyring version that only a previous
    /// master key opens. Cost: one row per version, nothing else is touched.
    pub(super) async fn adopt_master_key(&self) -> Result<(), VaultFailure> {
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

    pub(super) async fn reload_keyring(&self) -> Result<(), VaultFailure> {
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

    pub(super) fn current_version(&self) -> Option<(u32, SecretKey)> {
        let ring = self.keyring.read().unwrap_or_else(PoisonError::into_inner);
        ring.iter().next_back().map(|(v, k)| (*v, k.clone()))
    }

    pub(super) async fn master_version(&self, version: u32) -> Result<SecretKey, VaultFailure> {
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

    pub(super) async fn add_master_version(&self, version: u32) -> Result<bool, VaultFailure> {
        let key = SecretKey::generate()?;
        let row = MasterKeyRow {
            version,
            wrapped: self.master.wrap(&key, &master_key_aad(version))?,
            created_at: Utc::now(),
        };
        Ok(self.store.insert_master_key(&row).await?)
    }

    pub(super) fn open_data_key(&self, row: &DataKeyRow, master: &SecretKey) -> Result<SubjectKeys, VaultError> {
        let dk = master.unwrap_key(&row.wrapped, &data_key_aad(row.id, &row.subject, row.master_version))?;
        Ok(SubjectKeys::derive(&dk))
    }

    /// The data key new tokens of `subject` are sealed with, created on first use.
    pub(super) async fn keys_for(&self, subject: &str) -> Result<(Uuid, SubjectKeys), VaultFailure> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::vault::testing::*;
    use crate::app::vault::{Reveal, VaultConfig};
    use crate::domain::vault::{Subject, TokenType};

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
        assert_eq!(renewed.fingerprint_secret(), g.vault.fingerprint_secret());
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
}
