//! The card provider's API as payments calls it.

use std::time::Duration;

use serde_json::{Value, json};

pub struct ProviderClient {
    http: reqwest::Client,
    base: String,
    key: String,
}

/// What the provider answered.
#[derive(Debug)]
pub enum Charged {
    Captured {
        charge_id: String,
    },
    Declined,
    /// The order was refunded before this charge reached the provider.
    Voided,
    /// An asynchronous charge: the result comes to the webhook.
    Pending,
}

#[derive(Debug, thiserror::Error)]
#[error("the card provider failed: {0}")]
pub struct ProviderError(String);

impl ProviderClient {
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(base: &str, key: &str) -> anyhow::Result<Self> {
        Ok(Self {
            http: crate::common::http_client(Duration::from_secs(5), &concord_sdk::ClientTls::from_env())?,
            base: base.trim_end_matches('/').to_owned(),
            key: key.to_owned(),
        })
    }

    async fn post(&self, path: &str, idempotency_key: &str, body: Value) -> Result<(u16, Value), ProviderError> {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .header("idempotency-key", idempotency_key)
            .json(&body);
        if let Some(tp) = concord_sdk::trace::traceparent() {
            request = request.header("traceparent", tp);
        }
        let response = request
            .send()
            .await
            .map_err(|e| ProviderError(e.without_url().to_string()))?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// Charges the card behind `card_token`; the same `idempotency_key` charges once. With a
    /// `webhook_url` the provider may answer [`Charged::Pending`] and post the result there.
    ///
    /// # Errors
    /// The provider unreachable or failing.
    pub async fn charge(
        &self,
        idempotency_key: &str,
        order_id: &str,
        amount: i64,
        card_token: &str,
        webhook_url: Option<&str>,
    ) -> Result<Charged, ProviderError> {
        let mut body = json!({ "order_id": order_id, "amount": amount, "card_token": card_token });
        if let Some(url) = webhook_url {
            body["webhook_url"] = json!(url);
        }
        match self.post("/v1/charges", idempotency_key, body).await? {
            (202, _) => Ok(Charged::Pending),
            (200, b) => Ok(Charged::Captured {
                charge_id: b["charge_id"].as_str().unwrap_or_default().to_owned(),
            }),
            (402, _) => Ok(Charged::Declined),
            (409, _) => Ok(Charged::Voided),
            (status, b) => Err(ProviderError(format!("{status}: {}", b["code"]))),
        }
    }

    /// Refunds what the order still has captured; answers the amount refunded now.
    ///
    /// # Errors
    /// The provider unreachable or failing.
    pub async fn refund(&self, idempotency_key: &str, order_id: &str) -> Result<i64, ProviderError> {
        match self
            .post("/v1/refunds", idempotency_key, json!({ "order_id": order_id }))
            .await?
        {
            (200, b) => Ok(b["refunded"].as_i64().unwrap_or(0)),
            (status, b) => Err(ProviderError(format!("{status}: {}", b["code"]))),
        }
    }
}
