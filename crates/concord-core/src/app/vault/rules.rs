//! Tokenized event fields: the rules that name them per category, cached for a while, and their
//! replacement by convergent tokens in the events of an append.

use super::tokenize::{IndexContext, TokenizeItem};
use super::{CACHE_MAX, Vault, VaultFailure, lock};
use crate::domain::event::UncheckedEvent;
use crate::domain::vault::{FieldRules, Subject, VaultError};
use crate::domain::{Principal, StreamName};
use chrono::Utc;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Instant;
use zeroize::Zeroizing;

/// A category's rules (none: the category has none) and when they were looked up.
pub(super) type CachedRules = (Option<Arc<FieldRules>>, Instant);

impl Vault {
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
        // One append tokenizes no more values than one tokenize request may.
        if items.len() > self.config.max_batch {
            return Err(VaultError::BatchSize {
                count: items.len(),
                limit: self.config.max_batch,
            }
            .into());
        }
        let tokens = self.tokenize_unbounded(items, IndexContext::EventFields).await?;
        for ((e, rule), token) in places.iter().zip(&tokens) {
            rules.replace(&mut events[*e].data, *rule, token.as_str());
        }
        Ok(tokens.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::vault::testing::*;
    use crate::app::vault::{ItemError, Reveal, VaultConfig};
    use crate::domain::vault::{Token, TokenType};

    #[tokio::test]
    async fn an_append_tokenizes_no_more_fields_than_a_batch() {
        let g = given(VaultConfig {
            max_batch: 5,
            ..VaultConfig::default()
        })
        .await;
        let fields = json!({"/email": "email", "/phone": "generic"});
        g.vault
            .put_rules(&caller(&["vault:admin"]), "customer", fields.as_object().unwrap())
            .await
            .unwrap();
        let stream = StreamName::parse("customer-8").unwrap();
        let event = |n: usize| UncheckedEvent {
            id: None,
            event_type: "Registered".into(),
            data: json!({"email": format!("u{n}@example.com"), "phone": format!("555-{n}")}),
            metadata: None,
        };
        let mut fits: Vec<UncheckedEvent> = (0..2).map(event).collect();
        assert_eq!(g.vault.tokenize_events(&stream, &mut fits).await.unwrap(), 4);
        let mut over: Vec<UncheckedEvent> = (0..3).map(event).collect();
        let err = g.vault.tokenize_events(&stream, &mut over).await.unwrap_err();
        assert!(
            matches!(err, VaultFailure::Invalid(VaultError::BatchSize { count: 6, limit: 5 })),
            "{err}"
        );
        assert_eq!(over[0].data["email"], "u0@example.com", "nothing replaced");
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
