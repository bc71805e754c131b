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
        // Recorded before the key goes: an erasure the trail does not hold never happens (one
        // whose delete then fails is recorded, and a retry records it again).
        let had_key = self.store.data_key(subject.as_str()).await?.is_some();
        self.audit(
            principal,
            "SubjectErased",
            json!({"subject_ref": self.subject_ref(subject), "had_key": had_key}),
        )
        .await?;
        let erased = self.store.delete_data_key(subject.as_str()).await?;
        lock(&self.data_keys).remove(subject.as_str());
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

    /// An event store whose appends fail: the audit trail is down.
    struct NoTrail(std::sync::Arc<crate::testkit::MemoryStore>);

    #[async_trait::async_trait]
    impl crate::ports::EventStore for NoTrail {
        async fn append(
            &self,
            _: crate::domain::AppendRequest,
        ) -> Result<crate::domain::AppendOutcome, crate::ports::StoreError> {
            Err(crate::ports::StoreError::Unavailable("the trail is down".into()))
        }
        async fn read_stream(
            &self,
            stream: &crate::domain::StreamName,
            from: u64,
            limit: usize,
            max_bytes: usize,
        ) -> Result<Vec<crate::domain::RecordedEvent>, crate::ports::StoreError> {
            self.0.read_stream(stream, from, limit, max_bytes).await
        }
        async fn read_log(
            &self,
            q: &crate::ports::LogQuery,
        ) -> Result<Vec<crate::domain::RecordedEvent>, crate::ports::StoreError> {
            self.0.read_log(q).await
        }
        async fn head_position(&self) -> Result<u64, crate::ports::StoreError> {
            self.0.head_position().await
        }
        fn watch_head(&self) -> tokio::sync::watch::Receiver<u64> {
            self.0.watch_head()
        }
    }

    #[tokio::test]
    async fn an_erasure_the_trail_cannot_record_does_not_happen() {
        let g = given(VaultConfig::default()).await;
        let t = g
            .vault
            .tokenize(vec![with_subject(
                item(TokenType::Email, "ada@example.com"),
                "customer-9",
            )])
            .await
            .unwrap();
        // The same vault store, opened with an audit trail that cannot be written.
        let blind = Vault::open(
            g.store.clone(),
            std::sync::Arc::new(NoTrail(g.events.clone())),
            g.master.clone(),
            VaultConfig::default(),
        )
        .await
        .unwrap();
        let admin = caller(&["vault:admin"]);
        assert!(
            blind
                .erase_subject(&admin, &Subject::parse("customer-9").unwrap())
                .await
                .is_err()
        );
        let who = caller(&["vault:detokenize:email"]);
        let got = reveal(&g, &who, &t, Reveal::Plain).await.unwrap();
        assert_eq!(
            values(&got),
            vec![Some("ada@example.com".into())],
            "the key is still there"
        );
    }
}
