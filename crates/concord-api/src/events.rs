//! Bodies of the event-store routes.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

/// `POST /v1/streams/{stream}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AppendBody {
    /// `"any"` (default), `"no_stream"`, `"exists"` or the stream's current version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<crate::schema::ExpectedVersionSchema>)]
    pub expected_version: Option<Value>,
    /// At least one; at most the server's `max_events_per_append`.
    #[schema(min_items = 1)]
    pub events: Vec<EventInput>,
}

/// One event to append.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventInput {
    /// Makes a re-sent append idempotent; a UUIDv7 is assigned when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    /// 1–200 of `A-Z a-z 0-9 - _ . : /`.
    #[serde(rename = "type")]
    #[schema(pattern = r"^[A-Za-z0-9_.:/-]+$", min_length = 1, max_length = 200)]
    pub event_type: String,
    /// Any JSON value; with the metadata at most the server's `max_event_bytes`.
    #[schema(value_type = crate::schema::StorableJson)]
    pub data: Value,
    /// A JSON object; `correlation_id` and `causation_id` are kept like any other field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<crate::schema::StorableObject>)]
    pub metadata: Option<Value>,
}

/// Answer of an append, with the stream name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AppendResponse {
    pub stream: String,
    pub first_version: u64,
    pub last_version: u64,
    pub position: u64,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventOut {
    pub id: Uuid,
    pub stream: String,
    pub version: u64,
    pub position: u64,
    #[serde(rename = "type")]
    pub event_type: String,
    #[schema(value_type = crate::schema::StorableJson)]
    pub data: Value,
    #[schema(value_type = Object)]
    pub metadata: Value,
    pub recorded_at: DateTime<Utc>,
}

/// A page of events. For a stream, `next` is the `from` of the next page, present whenever the
/// page holds events (a page may stop before `limit` at the byte budget, so only an empty page
/// marks the end); for the log and consumer groups it is the `after` to continue from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventsPage {
    pub events: Vec<EventOut>,
    pub next: Option<u64>,
}

/// `PUT /v1/subscriptions/{group}/checkpoint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointBody {
    /// The member index within the group (default 0).
    #[serde(default, deserialize_with = "concord_kernel::json::uint")]
    pub member: u32,
    /// The position of the last event the member has processed.
    #[serde(deserialize_with = "concord_kernel::json::uint")]
    pub position: u64,
}

/// A consumer group member's checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CheckpointResponse {
    pub member: u32,
    pub position: u64,
}
