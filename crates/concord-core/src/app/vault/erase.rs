//! Erasure: crypto-shredding a subject by deleting its data key, and purging expired records.

use super::{Vault, VaultFailure, lock};
use crate::domain::Principal;
use crate::domain::vault::Subject;
use chrono::Utc;
use serde_json::json;

impl Vault {
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

    /// Deletes up to `limit` expired records; returns how many.
    ///
    /// # Errors
    /// [`VaultFailure::Store`].
    pub async fn purge_expired(&self, limit: usize) -> Result<u64, VaultFailure> {
        Ok(self.store.purge_expired_tokens(Utc::now(), limit).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::vault::testing::*;
    use crate::app::vault::{ItemError, Reveal, VaultConfig};
    use crate::domain::vault::TokenType;

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
}
