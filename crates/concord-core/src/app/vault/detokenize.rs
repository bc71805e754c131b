//! Detokenize: what a caller may reveal, plain or masked, per item; opening the records; and the
//! audit record every call leaves before any value is returned.

use super::{Vault, VaultFailure};
use crate::domain::vault::crypto::value_aad;
use crate::domain::vault::{Token, TokenType, VaultError};
use crate::domain::{Principal, Scope};
use chrono::Utc;
use serde_json::{Value, json};
use std::collections::HashMap;
use zeroize::Zeroizing;

/// Items listed in the audit record of a refused detokenize.
const MAX_REFUSED_LISTED: usize = 16;

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

impl Vault {
    /// Detokenizes `tokens` for `principal`, in order. Each type needs
    /// `vault:detokenize:{type}` (plain) or, for `masked`, either that or
    /// `vault:detokenize-masked:{type}`. When any item is denied nothing is revealed. Every call
    /// is recorded in [`AUDIT_STREAM`](super::AUDIT_STREAM) before any value is returned; if it
    /// cannot be recorded, nothing is revealed.
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
        // A key that may reveal nothing at all is refused before anything is recorded: it could
        // otherwise fill the audit trail with records of calls that never had a chance.
        let holds_any = TokenType::ALL.iter().any(|t| allowed(principal, *t, Reveal::Masked));
        if !holds_any {
            metrics::counter!("concord_vault_detokenize_total", "outcome" => "no_scope").increment(1);
            return Err(VaultFailure::Forbidden(format!(
                "this key has no vault:detokenize{} scope",
                if reveal == Reveal::Masked {
                    " or vault:detokenize-masked"
                } else {
                    ""
                }
            )));
        }
        if let Err(retry_after_ms) = self.take_rate(principal.key_id, items.len()) {
            self.audit_detokenize(principal, reveal, "rate_limited", &items).await?;
            return Err(VaultFailure::RateLimited { retry_after_ms });
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

    async fn audit_detokenize(
        &self,
        principal: &Principal,
        reveal: Reveal,
        outcome: &str,
        items: &[Revealed],
    ) -> Result<(), VaultFailure> {
        // A refused call reveals nothing, so its record lists only the first tokens, and a key's
        // refused calls are recorded at most `refused_audit_per_min` a minute: past that they are
        // counted, and the count goes into the key's next record.
        let mut suppressed = 0;
        if outcome != "allowed" {
            match self.take_refused_audit(principal.key_id) {
                Ok(earlier) => suppressed = earlier,
                Err(()) => {
                    metrics::counter!("concord_vault_refusals_unaudited_total").increment(1);
                    return Ok(());
                }
            }
        }
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
            json!({"reveal": reveal.as_str(), "outcome": outcome, "items_total": total, "items": items,
                   "refusals_not_recorded_before": suppressed}),
        )
        .await
    }
}

/// Whether `principal` may see values of `kind` as `reveal` asks: the plain scope shows both
/// forms, the masked one only the masked form. `admin` implies neither.
fn allowed(principal: &Principal, kind: TokenType, reveal: Reveal) -> bool {
    let plain = principal.allows(Scope::VaultDetokenize(kind));
    match reveal {
        Reveal::Plain => plain,
        Reveal::Masked => plain || principal.allows(Scope::VaultDetokenizeMasked(kind)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::vault::VaultConfig;
    use crate::app::vault::testing::*;
    use std::time::Duration;

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
        assert_eq!(audit.len(), 1, "a key with no detokenize scope at all leaves no record");
        assert_eq!(audit[0]["outcome"], "denied");
        assert_eq!(audit[0]["items"][1]["result"], "denied");
        assert_eq!(audit[0]["items"][0]["result"], "withheld");
        assert_eq!(audit[0]["key_id"], json!(who.key_id));
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
    async fn a_refused_detokenize_lists_only_the_first_tokens() {
        let g = given(VaultConfig::default()).await;
        let card = g
            .vault
            .tokenize(vec![item(TokenType::Card, "4242424242424242")])
            .await
            .unwrap();
        let tokens: Vec<Token> = (0..40).map(|_| card[0].clone()).collect();
        let ssn_only = caller(&["vault:detokenize:ssn"]);
        assert!(reveal(&g, &ssn_only, &tokens, Reveal::Plain).await.is_err());
        let audit = audit_log(&g).await;
        assert_eq!(audit[0]["items_total"], 40);
        assert_eq!(audit[0]["items"].as_array().unwrap().len(), MAX_REFUSED_LISTED);
    }

    #[tokio::test]
    async fn a_keys_refused_calls_leave_a_bounded_number_of_records_and_a_count() {
        let g = given(VaultConfig {
            refused_audit_per_min: 60.0,
            ..VaultConfig::default()
        })
        .await;
        let card = g
            .vault
            .tokenize(vec![item(TokenType::Card, "4242424242424242")])
            .await
            .unwrap();
        let ssn_only = caller(&["vault:detokenize:ssn"]);
        for _ in 0..500 {
            assert!(reveal(&g, &ssn_only, &card, Reveal::Plain).await.is_err());
        }
        let audit = audit_log(&g).await;
        assert!((60..=61).contains(&audit.len()), "{} records", audit.len());
        // A second's refill: the next record counts what went unrecorded.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(reveal(&g, &ssn_only, &card, Reveal::Plain).await.is_err());
        let audit = audit_log(&g).await;
        let unrecorded = audit.last().unwrap()["refusals_not_recorded_before"].as_u64().unwrap();
        assert_eq!(
            unrecorded as usize + audit.len() - 1,
            500,
            "every refusal is recorded or counted"
        );
        // Another key has its own budget.
        let other = caller(&["vault:detokenize:ssn"]);
        assert!(reveal(&g, &other, &card, Reveal::Plain).await.is_err());
        assert_eq!(audit_log(&g).await.len(), audit.len() + 1);
    }
}
