//! The token vault: tokenize, detokenize, rules, erasure, key rotation.

use crate::transport::{endpoint, json, segment};
use crate::{Client, ClientError};
use concord_api::ErrorCode;
use reqwest::Method;

impl Client {
    /// `POST /v1/transactions`: runs a two-phase commit across the participants and answers once
    /// the decision is durable (phase 2 goes on in the background).
    ///
    /// # Errors
    ///
    /// `invalid_participant` or `transaction_limit_exceeded` (400); see [`ClientError`].
    /// `POST /v1/vault/tokenize`: one token per item, in order.
    ///
    /// # Errors
    /// As every call; a refused item refuses the whole request.
    pub async fn tokenize(&self, items: &[concord_api::vault::TokenizeItemIn]) -> Result<Vec<String>, ClientError> {
        let url = endpoint(&self.base_url, &["v1", "vault", "tokenize"])?;
        let body = concord_api::vault::TokenizeBody { items: items.to_vec() };
        let out: concord_api::vault::Tokenized = json(self.request(Method::POST, url).json(&body)).await?;
        Ok(out.tokens)
    }

    /// `POST /v1/vault/detokenize`: each token's value (masked when `masked`) or error.
    ///
    /// # Errors
    /// As every call; 403 when this key may not reveal some item's type.
    pub async fn detokenize(
        &self,
        tokens: &[String],
        masked: bool,
    ) -> Result<Vec<concord_api::vault::DetokenizedItem>, ClientError> {
        let url = endpoint(&self.base_url, &["v1", "vault", "detokenize"])?;
        let body = concord_api::vault::DetokenizeBody {
            tokens: tokens.to_vec(),
            reveal: Some(if masked { "masked" } else { "plain" }.to_owned()),
        };
        let out: concord_api::vault::Detokenized = json(self.request(Method::POST, url).json(&body)).await?;
        Ok(out.items)
    }

    /// `POST /v1/vault/keys/rotate`.
    ///
    /// # Errors
    /// As every call.
    pub async fn rotate_vault_key(&self) -> Result<concord_api::vault::RotatedOut, ClientError> {
        let url = endpoint(&self.base_url, &["v1", "vault", "keys", "rotate"])?;
        json(self.request(Method::POST, url)).await
    }

    /// `DELETE /v1/vault/subjects/{subject}`: crypto-shredding of the subject's tokens.
    ///
    /// # Errors
    /// As every call.
    pub async fn erase_subject(&self, subject: &str) -> Result<concord_api::vault::ErasedOut, ClientError> {
        let url = endpoint(
            &self.base_url,
            &["v1", "vault", "subjects", segment(subject, ErrorCode::InvalidSubject)?],
        )?;
        json(self.request(Method::DELETE, url)).await
    }

    /// `PUT /v1/vault/rules/{category}`: the event fields of the category that are stored as tokens.
    ///
    /// # Errors
    /// As every call.
    pub async fn put_vault_rules(
        &self,
        category: &str,
        fields: serde_json::Map<String, serde_json::Value>,
    ) -> Result<concord_api::vault::RulesOut, ClientError> {
        let url = endpoint(
            &self.base_url,
            &["v1", "vault", "rules", segment(category, ErrorCode::InvalidStreamName)?],
        )?;
        json(
            self.request(Method::PUT, url)
                .json(&concord_api::vault::RulesBody { fields }),
        )
        .await
    }
}
