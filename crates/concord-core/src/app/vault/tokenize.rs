//! Tokenize: checking and normalizing items, sealing them under fresh tokens, and writing the
//! token records of concurrent requests in one statement.

use super::{Vault, VaultFailure, lock};
use crate::app::group_commit::Drain;
use crate::domain::vault::crypto::value_aad;
use crate::domain::vault::{Subject, SubjectKeys, Token, TokenFormat, TokenType, VaultError};
use crate::ports::{StoreError, TokenInsert, TokenRecord, VaultStore};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use uuid::Uuid;
use zeroize::Zeroizing;

/// New tokens tried for one item before giving up (a collision is rare but possible).
const MAX_TOKEN_TRIES: usize = 8;

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

/// Token records of several requests in one `insert_tokens`.
pub(super) struct TokenWrites(pub(super) Arc<dyn VaultStore>);

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

impl Vault {
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

    pub(super) async fn tokenize_unbounded(
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
}

/// Where a convergent token was asked for. Each has its own blind index, so a caller of the API
/// can never find the token of an event field by guessing its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IndexContext {
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
    use crate::app::vault::testing::*;
    use crate::app::vault::{ItemError, Reveal, VaultConfig};

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
}
