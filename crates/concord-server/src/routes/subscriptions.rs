//! Live subscriptions (SSE) and consumer groups with server-side checkpoints.

use crate::error::ApiError;
use crate::limits::busy;
use crate::routes::events::{log_query, page_after, to_api, visible};
use crate::state::AppState;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::{Extension, Json};
use concord_api::ErrorCode;
use concord_api::events::{CheckpointBody, EventOut, EventsPage};
use concord_core::app::auth::{Owned, check_owner, claim_owner};
use concord_core::app::subscribe::LogFollower;
use concord_core::domain::stream::Partition;
use concord_core::domain::{Principal, StreamName};
use futures::{Stream, StreamExt, future, stream};
use serde::Deserialize;
use std::convert::Infallible;
use std::time::Duration;
use utoipa::IntoParams;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SubscribeParams {
    /// Only events after this position (default 0: from the start).
    after: Option<u64>,
    /// Only this category: a stream name without `-`.
    #[param(pattern = r"^\$?[A-Za-z0-9_.:@]+$", min_length = 1, max_length = 200)]
    category: Option<String>,
}

/// A consumer group named in the path: a name of the stream-name alphabet.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct GroupPath {
    /// 1–200 of `A-Z a-z 0-9 - _ . : @`, optionally after one leading `$`; not starting with `-`.
    #[param(pattern = r"^\$?[A-Za-z0-9_.:@][A-Za-z0-9_.:@-]*$", min_length = 1, max_length = 200)]
    pub group: String,
}

/// How long one wait for new events lasts before the loop checks for shutdown again.
const WAIT_SLICE: Duration = Duration::from_secs(5);

/// Server-Sent Events: every event after `after` (or `Last-Event-ID`), then live ones. Each SSE
/// `id` is the event's position, so a client that reconnects resumes exactly where it stopped.
/// Events the principal may not read are left out; resuming after a visible one reads the hidden
/// ones again and leaves them out again.
#[utoipa::path(get, path = "/v1/events/subscribe", tag = "events",
    security(("bearer" = ["events:read"])),
    params(SubscribeParams,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this position")),
    responses(
        (status = 200, description = "Each event's `id` is its position, its data an EventOut", content_type = "text/event-stream", body = EventOut),
        (status = 400, description = "invalid_parameter"),
        (status = 403, description = "A category of logs this key may not read"),
        (status = 429, description = "too_many_concurrent_requests: this key holds max_subscribers_per_key streams; see Retry-After"),
        (status = 503, description = "too_many_subscribers: the server serves max_subscribers streams; see Retry-After"),
    ))]
pub async fn subscribe(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    params: Result<Query<SubscribeParams>, QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Query(p) = params?;
    let Some(key_stream) = state.key_streams.try_take(principal.key_id) else {
        return Err(busy(
            ErrorCode::TooManyConcurrentRequests,
            format!(
                "this API key holds {} event streams open already (max_subscribers_per_key)",
                state.settings.max_subscribers_per_key
            ),
        ));
    };
    let Ok(permit) = state.subscribers.clone().try_acquire_owned() else {
        return Err(busy(
            ErrorCode::TooManySubscribers,
            format!(
                "this server serves {} event streams already (max_subscribers)",
                state.settings.max_subscribers
            ),
        ));
    };
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let after = p.after.max(resume);
    let mut query = log_query(&principal, after, None, p.category.as_deref(), None, &state)?;
    query.limit = state.limits.max_read_limit;
    let follower = LogFollower::new(state.events.clone(), query);
    let mut shutdown = state.shutdown.clone();
    let gauge = metrics::gauge!("concord_subscribers", "kind" => "sse");
    gauge.increment(1.0);
    let guard = SubscriberGuard(gauge, permit, key_stream);
    let events = stream::unfold((follower, guard), |(mut follower, guard)| async move {
        let batch = follower.next_batch(WAIT_SLICE).await;
        match batch {
            Ok(batch) => {
                if let Some(last) = batch.last() {
                    let head = follower.known_head();
                    metrics::histogram!("concord_subscriber_lag_events", "kind" => "sse")
                        .record(head.saturating_sub(last.position) as f64);
                }
                Some((stream::iter(batch), (follower, guard)))
            }
            Err(e) => {
                tracing::warn!(error = %e, "subscription ended by a store error");
                None
            }
        }
    })
    .flatten()
    .filter(move |e| future::ready(visible(&principal, e.stream.category())))
    .map(|e| Ok(sse_event(e)))
    .take_until(async move {
        let _ = shutdown.wait_for(|s| *s).await;
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

fn sse_event(e: concord_core::domain::RecordedEvent) -> Event {
    let position = e.position;
    let body = serde_json::to_string(&to_api(e)).unwrap_or_default();
    Event::default().id(position.to_string()).event("event").data(body)
}

/// Keeps the subscriber gauge right however the stream ends.
/// Counts a live stream and holds its place among `max_subscribers` until it ends.
struct SubscriberGuard(
    metrics::Gauge,
    #[allow(dead_code)] tokio::sync::OwnedSemaphorePermit,
    #[allow(dead_code)] crate::limits::KeySlot,
);

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GroupParams {
    /// Only this category: a stream name without `-`.
    #[param(pattern = r"^\$?[A-Za-z0-9_.:@]+$", min_length = 1, max_length = 200)]
    category: Option<String>,
    /// This member's index, below `size` (default 0).
    member: Option<u32>,
    /// How many members share the group (default 1).
    #[param(minimum = 1)]
    size: Option<u32>,
    /// Wait up to this long for events when there are none (default 0).
    wait_ms: Option<u64>,
    /// Events per page (default 100, at most the server's read limit).
    #[param(minimum = 1)]
    limit: Option<usize>,
}

fn group_name(raw: &str) -> Result<StreamName, ApiError> {
    StreamName::parse(raw).map_err(|e| ApiError::parameter("group", e.to_string()))
}

/// The next events of a group member's share after its checkpoint, waiting up to `wait_ms` for
/// some. Reading does not move the checkpoint: a member saves it once it has processed the page.
#[utoipa::path(get, path = "/v1/subscriptions/{group}/events", tag = "events",
    security(("bearer" = ["events:read"])),
    params(GroupPath, GroupParams),
    responses(
        (status = 200, description = "The member's next events after its checkpoint", body = EventsPage),
        (status = 400, description = "invalid_parameter"),
        (status = 403, description = "A category of logs this key may not read"),
    ))]
pub async fn group_events(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(GroupPath { group }): Path<GroupPath>,
    params: Result<Query<GroupParams>, QueryRejection>,
) -> Result<Json<EventsPage>, ApiError> {
    let group = group_name(&group)?;
    let Query(p) = params?;
    let partition = Partition::new(p.member.unwrap_or(0), p.size.unwrap_or(1))?;
    let wait = p.wait_ms.unwrap_or(0);
    if wait > state.settings.max_wait_ms {
        return Err(ApiError::parameter(
            "wait_ms",
            format!("must be at most {}", state.settings.max_wait_ms),
        ));
    }
    let after = state
        .checkpoints
        .load_checkpoint(group.as_str(), partition.member)
        .await?;
    let query = log_query(
        &principal,
        Some(after.unwrap_or(0)),
        p.limit,
        p.category.as_deref(),
        Some(partition),
        &state,
    )?;
    let start = query.after;
    let mut follower = LogFollower::new(state.events.clone(), query);
    let events = follower.next_batch(Duration::from_millis(wait)).await?;
    Ok(Json(page_after(&principal, events, start)))
}

/// Saves a group member's checkpoint.
#[utoipa::path(put, path = "/v1/subscriptions/{group}/checkpoint", tag = "events",
    security(("bearer" = ["events:read"])),
    params(GroupPath), request_body = CheckpointBody,
    responses(
        (status = 204, description = "Saved"),
        (status = 400, description = "invalid_parameter"),
        (status = 403, description = "not_owner: another API key name owns this consumer group"),
    ))]
pub async fn save_checkpoint(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(GroupPath { group }): Path<GroupPath>,
    body: Result<Json<CheckpointBody>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let group = group_name(&group)?;
    let Json(body) = body?;
    check_owner(state.keys.as_ref(), &principal, Owned::ConsumerGroup, group.as_str()).await?;
    state
        .checkpoints
        .save_checkpoint(group.as_str(), body.member, body.position)
        .await?;
    claim_owner(state.keys.as_ref(), &principal, Owned::ConsumerGroup, group.as_str()).await?;
    Ok(StatusCode::NO_CONTENT)
}
