//! The event store's routes: append, read a stream or the log, subscribe, consumer groups.

use concord_api::ErrorCode;
use concord_api::events::{AppendBody, AppendResponse, CheckpointBody, EventInput, EventsPage};
use concord_kernel::ExpectedVersion;
use reqwest::header::ACCEPT;

use crate::Subscription;

/// The header that makes an append idempotent.
pub(crate) const IDEMPOTENCY_KEY: &str = "idempotency-key";

use crate::transport::{check, empty, endpoint, json, media_type, segment};
use crate::{Client, ClientError};
use reqwest::Method;

impl Client {
    /// Appends `events` atomically to `stream` if it is at `expected_version`.
    ///
    /// # Errors
    ///
    /// `wrong_expected_version` (409, with `current_version` in the problem) on a version
    /// mismatch; see [`ClientError`] for the rest.
    pub async fn append(
        &self,
        stream: &str,
        expected_version: ExpectedVersion,
        events: Vec<EventInput>,
    ) -> Result<AppendResponse, ClientError> {
        let body = AppendBody {
            expected_version: Some(expected_version.into()),
            events,
        };
        self.append_with(stream, &body, None).await
    }

    /// `POST /v1/streams/{stream}` with a prepared body and an optional `Idempotency-Key`.
    ///
    /// # Errors
    ///
    /// As [`Client::append`], plus `idempotency_key_reused` (422) and
    /// `idempotency_key_in_flight` (409).
    pub async fn append_with(
        &self,
        stream: &str,
        body: &AppendBody,
        idempotency_key: Option<&str>,
    ) -> Result<AppendResponse, ClientError> {
        let stream = segment(stream, ErrorCode::InvalidStreamName)?;
        let url = endpoint(&self.base_url, &["v1", "streams", stream])?;
        let mut request = self.request(Method::POST, url).json(body);
        if let Some(key) = idempotency_key {
            request = request.header(IDEMPOTENCY_KEY, key);
        }
        json(request).await
    }

    /// `GET /v1/streams/{stream}?from=&limit=`: up to `limit` events of `stream` from version
    /// `from` on.
    ///
    /// # Errors
    ///
    /// `stream_not_found` (404) for a stream without events; see [`ClientError`].
    pub async fn read_stream(&self, stream: &str, from: u64, limit: u32) -> Result<EventsPage, ClientError> {
        let stream = segment(stream, ErrorCode::InvalidStreamName)?;
        let mut url = endpoint(&self.base_url, &["v1", "streams", stream])?;
        url.query_pairs_mut()
            .append_pair("from", &from.to_string())
            .append_pair("limit", &limit.to_string());
        json(self.request(Method::GET, url)).await
    }

    /// `GET /v1/events?after=&limit=&category=`: the global log after position `after`.
    ///
    /// # Errors
    ///
    /// See [`ClientError`].
    pub async fn read_log(&self, after: u64, limit: u32, category: Option<&str>) -> Result<EventsPage, ClientError> {
        let mut url = endpoint(&self.base_url, &["v1", "events"])?;
        {
            let mut query = url.query_pairs_mut();
            query
                .append_pair("after", &after.to_string())
                .append_pair("limit", &limit.to_string());
            if let Some(category) = category {
                query.append_pair("category", category);
            }
        }
        json(self.request(Method::GET, url)).await
    }

    /// `GET /v1/events/subscribe?after=&category=`: the log after `after` as Server-Sent Events,
    /// catch-up then live. The subscription does not reconnect; resume from
    /// [`Subscription::last_position`].
    ///
    /// # Errors
    ///
    /// A non-2xx answer, or a 2xx that is not `text/event-stream` ([`ClientError::Decode`]).
    pub async fn subscribe(&self, after: u64, category: Option<&str>) -> Result<Subscription, ClientError> {
        let mut url = endpoint(&self.base_url, &["v1", "events", "subscribe"])?;
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("after", &after.to_string());
            if let Some(category) = category {
                query.append_pair("category", category);
            }
        }
        let request = self.request(Method::GET, url).header(ACCEPT, "text/event-stream");
        let response = check(request.send().await?).await?;
        if let Some(content_type) = media_type(response.headers())
            && content_type != "text/event-stream"
        {
            return Err(ClientError::Decode(format!(
                "expected text/event-stream, got {content_type}"
            )));
        }
        Ok(Subscription::new(response, after))
    }

    /// `GET /v1/subscriptions/{group}/events`: the next events for member `member` of a group of
    /// `size`, waiting up to `wait_ms` for some to arrive.
    ///
    /// # Errors
    ///
    /// See [`ClientError`].
    pub async fn group_events(
        &self,
        group: &str,
        member: u32,
        size: u32,
        category: Option<&str>,
        wait_ms: u64,
        limit: u32,
    ) -> Result<EventsPage, ClientError> {
        let group = segment(group, ErrorCode::InvalidParameter)?;
        let mut url = endpoint(&self.base_url, &["v1", "subscriptions", group, "events"])?;
        {
            let mut query = url.query_pairs_mut();
            query
                .append_pair("member", &member.to_string())
                .append_pair("size", &size.to_string());
            if let Some(category) = category {
                query.append_pair("category", category);
            }
            query
                .append_pair("wait_ms", &wait_ms.to_string())
                .append_pair("limit", &limit.to_string());
        }
        json(self.request(Method::GET, url)).await
    }

    /// `PUT /v1/subscriptions/{group}/checkpoint`: member `member` has processed everything up to
    /// `position`.
    ///
    /// # Errors
    ///
    /// See [`ClientError`].
    pub async fn save_checkpoint(&self, group: &str, member: u32, position: u64) -> Result<(), ClientError> {
        let group = segment(group, ErrorCode::InvalidParameter)?;
        let url = endpoint(&self.base_url, &["v1", "subscriptions", group, "checkpoint"])?;
        let body = CheckpointBody { member, position };
        empty(self.request(Method::PUT, url).json(&body)).await
    }
}
