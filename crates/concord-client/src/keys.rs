//! API keys: create and revoke (an admin key's routes).

use crate::transport::{empty, endpoint, json};
use crate::{Client, ClientError};
use concord_api::keys::{CreateKeyBody, CreatedKey};
use reqwest::Method;
use uuid::Uuid;

impl Client {
    /// `POST /v1/keys`. The answer holds the only copy of the new key.
    ///
    /// # Errors
    ///
    /// `invalid_scope` (400) for a scope the server does not know; see [`ClientError`].
    pub async fn create_key(&self, name: &str, scopes: &[&str]) -> Result<CreatedKey, ClientError> {
        let url = endpoint(&self.base_url, &["v1", "keys"])?;
        let body = CreateKeyBody {
            name: name.to_owned(),
            scopes: scopes.iter().map(|&s| s.to_owned()).collect(),
        };
        json(self.request(Method::POST, url).json(&body)).await
    }

    /// `DELETE /v1/keys/{id}`.
    ///
    /// # Errors
    ///
    /// `key_not_found` (404); see [`ClientError`].
    pub async fn revoke_key(&self, id: Uuid) -> Result<(), ClientError> {
        let url = endpoint(&self.base_url, &["v1", "keys", &id.to_string()])?;
        empty(self.request(Method::DELETE, url)).await
    }
}
