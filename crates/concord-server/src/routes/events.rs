//! Appending and reading events.

use crate::error::ApiError;
use crate::idempotency::idempotency_key;
use crate::state::AppState;
use axum::Extension;
use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use concord_api::ErrorCode;
use concord_api::events::{AppendBody, AppendResponse, EventOut, EventsPage};
use concord_core::app::events::{Appender, READ_FORBIDDEN};
use concord_core::domain::event::UncheckedEvent;
use concord_core::domain::idempotency::derived_event_id;
use concord_core::domain::stream::Partition;
use concord_core::domain::{Category, ExpectedVersion, Principal, RecordedEvent, StreamName};
use concord_core::ports::LogQuery;
use serde::Deserialize;
use utoipa::IntoParams;

/// Whether `principal` may read events of `category` (the use case's read policy).
pub use concord_core::app::events::may_read as visible;

fn saga_logs_forbidden() -> ApiError {
    ApiError::new(ErrorCode::Forbidden, READ_FORBIDDEN)
}

/// Appends events atomically to a stream if it is at the expected version.
#[utoipa::path(post, path = "/v1/streams/{stream}", tag = "events",
    security(("bearer" = ["events:write"])),
    params(StreamPath), request_body = AppendBody,
    responses(
        (status = 200, description = "Appended, or the original answer of a re-sent append", body = AppendResponse),
        (status = 400, description = "invalid_stream_name, invalid_event_type, invalid_expected_version, event_too_large, batch_too_large, invalid_event_data, empty_append, duplicate_event_id or invalid_metadata: nothing written"),
        (status = 403, description = "Saga logs, transaction logs and the vault's streams are written by Concord alone; other system streams need admin"),
        (status = 409, description = "wrong_expected_version (with current_version) or event_id_conflict"),
    ))]
pub async fn append(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(StreamPath { stream }): Path<StreamPath>,
    headers: HeaderMap,
    body: Result<Json<AppendBody>, JsonRejection>,
) -> Result<Json<AppendResponse>, ApiError> {
    let stream = StreamName::parse(&stream)?;
    // Refused before the body is read, as a write it may not make.
    Appender::check_write(&principal, &stream)?;
    let Json(body) = body?;
    let expected = ExpectedVersion::from_json(body.expected_version.as_ref())?;
    // A keyed append's events without ids get ids derived from the caller and the key: a retry
    // after a crash that left the key's record behind the events is answered as a replay.
    let key = idempotency_key(&headers);
    let caller = principal.key_id.to_string();
    let events = body
        .events
        .into_iter()
        .enumerate()
        .map(|(i, e)| UncheckedEvent {
            id: e.id.or_else(|| {
                key.map(|k| {
                    let event = serde_json::to_vec(&(&e.event_type, &e.data, &e.metadata)).unwrap_or_default();
                    derived_event_id(&caller, k, i, &event)
                })
            }),
            event_type: e.event_type,
            data: e.data,
            metadata: e.metadata,
        })
        .collect();
    let outcome = state
        .appender
        .append(&principal, stream.clone(), expected, events)
        .await?;
    Ok(Json(AppendResponse {
        stream: stream.to_string(),
        first_version: outcome.first_version,
        last_version: outcome.last_version,
        position: outcome.position,
    }))
}

/// A stream named in the path.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct StreamPath {
    /// 1–200 of `A-Z a-z 0-9 - _ . : @`, optionally after one leading `$`; not starting with `-`.
    #[param(pattern = r"^\$?[A-Za-z0-9_.:@][A-Za-z0-9_.:@-]*$", min_length = 1, max_length = 200)]
    pub stream: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamParams {
    /// The first version to read (default 1).
    #[param(minimum = 1)]
    from: Option<u64>,
    /// Events per page (default 100, at most the server's read limit).
    #[param(minimum = 1)]
    limit: Option<usize>,
}

/// Reads a stream forward from a version.
#[utoipa::path(get, path = "/v1/streams/{stream}", tag = "events",
    security(("bearer" = ["events:read"])),
    params(StreamPath, StreamParams),
    responses(
        (status = 200, description = "Events in version order", body = EventsPage),
        (status = 400, description = "invalid_stream_name or invalid_parameter"),
        (status = 403, description = "Saga logs need sagas:read, transaction logs tx:read, the vault audit vault:audit"),
        (status = 404, description = "stream_not_found"),
    ))]
pub async fn read_stream(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(StreamPath { stream }): Path<StreamPath>,
    params: Result<Query<StreamParams>, QueryRejection>,
) -> Result<Json<EventsPage>, ApiError> {
    let stream = StreamName::parse(&stream)?;
    if !visible(&principal, stream.category()) {
        return Err(saga_logs_forbidden());
    }
    let Query(p) = params?;
    let from = p.from.unwrap_or(1);
    if from == 0 {
        return Err(ApiError::parameter("from", "versions start at 1"));
    }
    let limit = read_limit(p.limit, &state)?;
    let events = state
        .events
        .read_stream(&stream, from, limit, state.settings.max_read_bytes)
        .await?;
    // A page may stop short of `limit` at the byte budget: only an empty page is the end.
    let next = events.last().map(|e| e.version + 1);
    Ok(Json(EventsPage {
        events: events.into_iter().map(to_api).collect(),
        next,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogParams {
    /// Only events after this position (default 0: from the start).
    after: Option<u64>,
    /// Events per page (default 100, at most the server's read limit).
    #[param(minimum = 1)]
    limit: Option<usize>,
    /// Only this category: a stream name without `-`.
    #[param(pattern = r"^\$?[A-Za-z0-9_.:@]+$", min_length = 1, max_length = 200)]
    category: Option<String>,
}

/// Reads the global log in position order.
#[utoipa::path(get, path = "/v1/events", tag = "events",
    security(("bearer" = ["events:read"])),
    params(LogParams),
    responses(
        (status = 200, description = "The global log in position order; events the key may not read are left out", body = EventsPage),
        (status = 400, description = "invalid_parameter"),
        (status = 403, description = "A category of logs this key may not read"),
    ))]
pub async fn read_log(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    params: Result<Query<LogParams>, QueryRejection>,
) -> Result<Json<EventsPage>, ApiError> {
    let Query(p) = params?;
    let query = log_query(&principal, p.after, p.limit, p.category.as_deref(), None, &state)?;
    let events = state.events.read_log(&query).await?;
    Ok(Json(page_after(&principal, events, query.after)))
}

/// Builds a validated log query from request parameters; asking for a category the principal
/// may not read is refused (403) rather than answered with pages that are always empty.
pub fn log_query(
    principal: &Principal,
    after: Option<u64>,
    limit: Option<usize>,
    category: Option<&str>,
    partition: Option<Partition>,
    state: &AppState,
) -> Result<LogQuery, ApiError> {
    let category = category.map(Category::parse).transpose()?;
    if category.as_ref().is_some_and(|c| !visible(principal, c.as_str())) {
        return Err(saga_logs_forbidden());
    }
    Ok(LogQuery {
        after: after.unwrap_or(0),
        limit: read_limit(limit, state)?,
        max_bytes: state.settings.max_read_bytes,
        category,
        partition,
    })
}

/// A page size: 100 by default, 1 to `max_read_limit`.
pub fn read_limit(limit: Option<usize>, state: &AppState) -> Result<usize, ApiError> {
    let max = state.limits.max_read_limit;
    match limit.unwrap_or(100.min(max)) {
        0 => Err(ApiError::parameter("limit", "must be at least 1")),
        n if n > max => Err(ApiError::parameter("limit", format!("must be at most {max}"))),
        n => Ok(n),
    }
}

/// A page of the log with the events `principal` may not read left out; `next` is the `after` to
/// continue from. It comes from the unfiltered page, so a reader moves past events it cannot see
/// instead of reading them again.
pub fn page_after(principal: &Principal, events: Vec<RecordedEvent>, after: u64) -> EventsPage {
    let next = Some(events.last().map_or(after, |e| e.position));
    EventsPage {
        events: events
            .into_iter()
            .filter(|e| visible(principal, e.stream.category()))
            .map(to_api)
            .collect(),
        next,
    }
}

pub fn to_api(e: RecordedEvent) -> EventOut {
    EventOut {
        id: e.id,
        stream: e.stream.to_string(),
        version: e.version,
        position: e.position,
        event_type: e.event_type,
        data: e.data,
        metadata: e.metadata,
        recorded_at: e.recorded_at,
    }
}
