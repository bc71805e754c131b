//! Saga definitions and sagas: define, start, watch, list, retry, signal.

use std::time::Duration;

use crate::events::IDEMPOTENCY_KEY;
use crate::transport::{append_wait, created, endpoint, json, segment};
use crate::{Client, ClientError, Created};
use concord_api::ErrorCode;
use concord_api::sagas::{
    BatchCountOut, BatchIn, BatchOut, CompletionIn, CompletionOut, DefinitionOut, OperationOut, ParticipantHostOut,
    ParticipantHostPage, ParticipantLimitsIn, SagaOut, SagaPage, SignalOut, StartSagaBody,
};
use reqwest::Method;

impl Client {
    /// `PUT /v1/saga-definitions/{name}`: `definition` is `{"steps": [...], "compensation_retry"?}`.
    /// A definition that differs from the latest version becomes the next version; an equal one
    /// answers the latest.
    ///
    /// # Errors
    ///
    /// `invalid_name`, `duplicate_step_name`, `unknown_template_variable`, `invalid_step_url`,
    /// `invalid_step_method`, `invalid_step_header`, `invalid_step_condition`, `invalid_step_kind`,
    /// `saga_limit_exceeded` and `malformed_json`
    /// (400) for a definition the server refuses; see [`ClientError`].
    pub async fn put_saga_definition(
        &self,
        name: &str,
        definition: &serde_json::Value,
    ) -> Result<DefinitionOut, ClientError> {
        Ok(self.put_saga_definition_created(name, definition).await?.value)
    }

    /// As [`Client::put_saga_definition`], telling whether the call made a new version.
    ///
    /// # Errors
    ///
    /// As [`Client::put_saga_definition`].
    pub async fn put_saga_definition_created(
        &self,
        name: &str,
        definition: &serde_json::Value,
    ) -> Result<Created<DefinitionOut>, ClientError> {
        let name = segment(name, ErrorCode::InvalidName)?;
        let url = endpoint(&self.base_url, &["v1", "saga-definitions", name])?;
        created(self.request(Method::PUT, url).json(definition)).await
    }

    /// `GET /v1/saga-definitions/{name}?version=`: one version, the latest by default.
    ///
    /// # Errors
    ///
    /// `saga_definition_not_found` (404); see [`ClientError`].
    pub async fn saga_definition(&self, name: &str, version: Option<u32>) -> Result<DefinitionOut, ClientError> {
        let name = segment(name, ErrorCode::InvalidName)?;
        let mut url = endpoint(&self.base_url, &["v1", "saga-definitions", name])?;
        if let Some(version) = version {
            url.query_pairs_mut().append_pair("version", &version.to_string());
        }
        json(self.request(Method::GET, url)).await
    }

    /// `POST /v1/sagas?wait_ms=`: starts a saga of the definition's latest version, or answers
    /// the saga that already has `body.id`. With `wait`, the answer comes once the saga finished
    /// or the wait ran out, and holds its steps; without, it is the saga as just started.
    ///
    /// # Errors
    ///
    /// `saga_definition_not_found` (404), `invalid_name` (400) for a bad id,
    /// `saga_limit_exceeded` (400) for an input too large, `invalid_parameter` (400) for a wait
    /// beyond the server's limit; see [`ClientError`].
    pub async fn start_saga(&self, body: &StartSagaBody, wait: Option<Duration>) -> Result<SagaOut, ClientError> {
        Ok(self.start_saga_created(body, wait).await?.value)
    }

    /// As [`Client::start_saga`], telling whether the call started the saga or found it.
    ///
    /// # Errors
    ///
    /// As [`Client::start_saga`].
    pub async fn start_saga_created(
        &self,
        body: &StartSagaBody,
        wait: Option<Duration>,
    ) -> Result<Created<SagaOut>, ClientError> {
        let mut url = endpoint(&self.base_url, &["v1", "sagas"])?;
        append_wait(&mut url, wait);
        created(self.request(Method::POST, url).json(body)).await
    }

    /// `GET /v1/sagas/{id}?wait_ms=`: the saga with each step and its attempts, once it finished
    /// or `wait` ran out.
    ///
    /// # Errors
    ///
    /// `saga_not_found` (404); see [`ClientError`].
    pub async fn saga(&self, id: &str, wait: Option<Duration>) -> Result<SagaOut, ClientError> {
        let id = segment(id, ErrorCode::InvalidName)?;
        let mut url = endpoint(&self.base_url, &["v1", "sagas", id])?;
        append_wait(&mut url, wait);
        json(self.request(Method::GET, url)).await
    }

    /// `GET /v1/sagas?status=&limit=&after=`: up to `limit` sagas by id after `after`, without
    /// their steps. Pass the page's `next` as `after` for the following page.
    ///
    /// # Errors
    ///
    /// `invalid_parameter` (400) for an unknown status or a limit out of range; see
    /// [`ClientError`].
    pub async fn list_sagas(
        &self,
        status: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<SagaPage, ClientError> {
        let mut url = endpoint(&self.base_url, &["v1", "sagas"])?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(status) = status {
                query.append_pair("status", status);
            }
            query.append_pair("limit", &limit.to_string());
            if let Some(after) = after {
                query.append_pair("after", after);
            }
        }
        json(self.request(Method::GET, url)).await
    }

    /// `POST /v1/sagas/{id}/retry?wait_ms=`: resumes a `failed` saga; `wait` as in
    /// [`Client::saga`].
    ///
    /// # Errors
    ///
    /// `saga_not_found` (404), `saga_not_failed` (409) for a saga in any other status,
    /// `saga_busy` (409) while another node holds it; see [`ClientError`].
    pub async fn retry_saga(&self, id: &str, wait: Option<Duration>) -> Result<SagaOut, ClientError> {
        let id = segment(id, ErrorCode::InvalidName)?;
        let mut url = endpoint(&self.base_url, &["v1", "sagas", id, "retry"])?;
        append_wait(&mut url, wait);
        json(self.request(Method::POST, url)).await
    }

    /// `POST /v1/sagas/{id}/{operation}` with `operation` one of `cancel`, `pause`, `resume`
    /// and `retry-now`: kept at once (202), recorded in the saga's log at its next look for
    /// operations. A retry with the same `idempotency_key` answers the first ask again.
    ///
    /// # Errors
    ///
    /// `saga_not_found` (404), `saga_operation_refused` (409) when it does not apply to the saga
    /// (a cancel of one that is not running, a resume of one that is not paused, anything on a
    /// finished one), `invalid_name` for another `operation`; see [`ClientError`].
    pub async fn operate_saga(
        &self,
        id: &str,
        operation: &str,
        idempotency_key: Option<&str>,
    ) -> Result<OperationOut, ClientError> {
        if !matches!(operation, "cancel" | "pause" | "resume" | "retry-now") {
            return Err(ClientError::Config(format!("no saga operation {operation:?}")));
        }
        let id = segment(id, ErrorCode::InvalidName)?;
        let url = endpoint(&self.base_url, &["v1", "sagas", id, operation])?;
        let mut request = self.request(Method::POST, url);
        if let Some(key) = idempotency_key {
            request = request.header(IDEMPOTENCY_KEY, key);
        }
        json(request).await
    }

    /// `POST /v1/saga-batches` with `dry_run`: how many sagas `body.filter` matches now.
    ///
    /// # Errors
    ///
    /// `invalid_parameter` (400) for an unknown action or status; see [`ClientError`].
    pub async fn count_saga_batch(&self, body: &BatchIn) -> Result<BatchCountOut, ClientError> {
        let mut body = body.clone();
        body.dry_run = true;
        let url = endpoint(&self.base_url, &["v1", "saga-batches"])?;
        json(self.request(Method::POST, url).json(&body)).await
    }

    /// `POST /v1/saga-batches`: starts a batch that applies `body.action` to every saga
    /// `body.filter` matches, server-side; follow it with [`Self::saga_batch`].
    ///
    /// # Errors
    ///
    /// `invalid_parameter` (400) for an unknown action or status; see [`ClientError`].
    pub async fn start_saga_batch(&self, body: &BatchIn) -> Result<BatchOut, ClientError> {
        let mut body = body.clone();
        body.dry_run = false;
        let url = endpoint(&self.base_url, &["v1", "saga-batches"])?;
        json(self.request(Method::POST, url).json(&body)).await
    }

    /// `GET /v1/saga-batches/{id}`: a batch and how far it got.
    ///
    /// # Errors
    ///
    /// `saga_batch_not_found` (404); see [`ClientError`].
    pub async fn saga_batch(&self, id: &str) -> Result<BatchOut, ClientError> {
        let id = segment(id, ErrorCode::InvalidName)?;
        let url = endpoint(&self.base_url, &["v1", "saga-batches", id])?;
        json(self.request(Method::GET, url)).await
    }

    /// `PUT /v1/participant-limits/{host}`: how many calls at once and a second every node
    /// together sends a host (`payments` or `payments:8082`); both none: no limit.
    ///
    /// # Errors
    ///
    /// `invalid_participant_host` or `invalid_participant_limits` (400), `forbidden` (403)
    /// without `admin`; see [`ClientError`].
    pub async fn set_participant_limits(
        &self,
        host: &str,
        limits: &ParticipantLimitsIn,
    ) -> Result<ParticipantHostOut, ClientError> {
        let host = segment(host, ErrorCode::InvalidParticipantHost)?;
        let url = endpoint(&self.base_url, &["v1", "participant-limits", host])?;
        json(self.request(Method::PUT, url).json(limits)).await
    }

    /// `GET /v1/participant-limits/{host}`: a host's limits, hold and breaker.
    ///
    /// # Errors
    ///
    /// `invalid_participant_host` (400); see [`ClientError`].
    pub async fn participant(&self, host: &str) -> Result<ParticipantHostOut, ClientError> {
        let host = segment(host, ErrorCode::InvalidParticipantHost)?;
        let url = endpoint(&self.base_url, &["v1", "participant-limits", host])?;
        json(self.request(Method::GET, url)).await
    }

    /// `GET /v1/participant-limits`: every host with limits, a hold or breaker state.
    ///
    /// # Errors
    ///
    /// See [`ClientError`].
    pub async fn participants(&self) -> Result<ParticipantHostPage, ClientError> {
        let url = endpoint(&self.base_url, &["v1", "participant-limits"])?;
        json(self.request(Method::GET, url)).await
    }

    /// `POST /v1/sagas/{id}/signals/{signal}`: sends a signal; its body becomes the output of
    /// the wait step that takes it. A retry with the same `idempotency_key` answers the first
    /// send again instead of sending a second signal.
    ///
    /// # Errors
    ///
    /// `saga_not_found` (404), `signal_not_expected` (409) when no step of the saga waits for
    /// it (any more), `signal_already_sent` (409) when its wait steps have theirs,
    /// `saga_limit_exceeded` (400) for a body over the server's `saga_max_output_bytes`; see
    /// [`ClientError`].
    pub async fn signal_saga(
        &self,
        id: &str,
        signal: &str,
        body: &serde_json::Value,
        idempotency_key: Option<&str>,
    ) -> Result<SignalOut, ClientError> {
        let id = segment(id, ErrorCode::InvalidName)?;
        let signal = segment(signal, ErrorCode::InvalidName)?;
        let url = endpoint(&self.base_url, &["v1", "sagas", id, "signals", signal])?;
        let mut request = self.request(Method::POST, url).json(body);
        if let Some(key) = idempotency_key {
            request = request.header(IDEMPOTENCY_KEY, key);
        }
        json(request).await
    }
}

/// The header the calls of an asynchronous saga action carry (a step with `callback_timeout_ms`):
/// the URL where the participant that answers 202 posts the result later.
pub const CALLBACK_HEADER: &str = "concord-callback";

/// `POST {callback_url}`: completes an asynchronous action that this participant answered with
/// 202. The URL (from [`CALLBACK_HEADER`]) is the capability: no API key is sent, so a
/// participant needs no key of its own for this. Posting the same completion again is answered
/// as the first time.
///
/// # Errors
///
/// `callback_invalid` (401) for a URL this cluster did not issue or one past its time,
/// `callback_not_expected` (409) when the attempt is over (timed out, or answered otherwise),
/// `callback_already_used` (409) when another result was posted first; see [`ClientError`].
pub async fn complete_action(
    http: &reqwest::Client,
    callback_url: &str,
    completion: &CompletionIn,
) -> Result<CompletionOut, ClientError> {
    let url = reqwest::Url::parse(callback_url).map_err(|e| ClientError::Config(format!("the completion URL: {e}")))?;
    let request = http.request(Method::POST, url).json(completion);
    #[cfg(feature = "otel")]
    let request = match crate::trace::traceparent() {
        Some(traceparent) => request.header(crate::trace::TRACEPARENT, traceparent),
        None => request,
    };
    json(request).await
}
