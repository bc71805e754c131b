//! `/v1/participant-limits`: flow control per participant host, shared by every node.

use crate::error::ApiError;
use crate::state::AppState;
use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use concord_api::ErrorCode;
use concord_api::sagas::{ParticipantHostOut, ParticipantHostPage, ParticipantLimitsIn};
use concord_core::domain::flow::{HostLimits, HostState, parse_host};
use serde::Deserialize;
use utoipa::IntoParams;

/// A host's state as the API shows it.
#[must_use]
pub fn participant_out(host: &str, h: &HostState) -> ParticipantHostOut {
    let now = chrono::Utc::now();
    ParticipantHostOut {
        host: host.to_owned(),
        max_concurrency: h.limits.max_concurrency,
        max_per_s: h.limits.max_per_s,
        breaker: h.breaker.as_str().to_owned(),
        failures: h.failures,
        opened: h.opened,
        opened_at: h.opened_at,
        open_until: h.open_until,
        held_until: h.hold_until.filter(|t| *t > now),
        in_flight: u32::try_from(h.in_flight.iter().filter(|l| l.until > now).count()).unwrap_or(u32::MAX),
    }
}

fn gate(state: &AppState) -> Result<&concord_core::app::flow::HostGate, ApiError> {
    state
        .sagas
        .engine()
        .gate()
        .map(AsRef::as_ref)
        .ok_or_else(|| ApiError::new(ErrorCode::Internal, "this node has no participant flow control"))
}

/// A participant host named in the path.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct HostPath {
    /// As allow-lists write it: `payments` (every port of it) or `payments:8082` (that port,
    /// which then counts apart from the name's entry).
    #[param(
        pattern = r"^[A-Za-z0-9._-]{1,253}(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?$"
    )]
    pub host: String,
}

impl HostPath {
    fn host(&self) -> Result<String, ApiError> {
        parse_host(&self.host).map_err(|e| ApiError::new(ErrorCode::InvalidParticipantHost, e))
    }
}

/// Sets how many calls at once, and how many a second, every node together sends a host. Both
/// left out: no limit (its breaker and `Retry-After` hold still apply). Calls out now keep
/// their places; a lower limit applies from the next call.
#[utoipa::path(put, path = "/v1/participant-limits/{host}", tag = "sagas",
    security(("bearer" = ["admin"])),
    params(HostPath),
    request_body = ParticipantLimitsIn,
    responses(
        (status = 200, description = "The host's limits and breaker", body = ParticipantHostOut),
        (status = 400, description = "invalid_participant_host, invalid_participant_limits or malformed_json"),
    ))]
pub async fn put(
    State(state): State<AppState>,
    Path(path): Path<HostPath>,
    body: Result<Json<ParticipantLimitsIn>, JsonRejection>,
) -> Result<Json<ParticipantHostOut>, ApiError> {
    let host = path.host()?;
    let Json(body) = body?;
    let limits = HostLimits::new(body.max_concurrency, body.max_per_s)
        .map_err(|e| ApiError::new(ErrorCode::InvalidParticipantLimits, e))?;
    let h = gate(&state)?.set_limits(&host, limits).await?;
    tracing::info!(host = %host, max_concurrency = ?limits.max_concurrency, max_per_s = ?limits.max_per_s, "participant limits set");
    Ok(Json(participant_out(&host, &h)))
}

/// A host's limits and breaker (a host nothing was set or counted for shows no limit and a
/// closed breaker).
#[utoipa::path(get, path = "/v1/participant-limits/{host}", tag = "sagas",
    security(("bearer" = ["sagas:read"])),
    params(HostPath),
    responses(
        (status = 200, description = "The host's limits and breaker", body = ParticipantHostOut),
        (status = 400, description = "invalid_participant_host"),
    ))]
pub async fn get(
    State(state): State<AppState>,
    Path(path): Path<HostPath>,
) -> Result<Json<ParticipantHostOut>, ApiError> {
    let host = path.host()?;
    let h = gate(&state)?.host(&host).await?;
    Ok(Json(participant_out(&host, &h)))
}

/// Every host with limits, a hold or breaker state, by name.
#[utoipa::path(get, path = "/v1/participant-limits", tag = "sagas",
    security(("bearer" = ["sagas:read"])),
    responses(
        (status = 200, description = "Every host with a state", body = ParticipantHostPage),
    ))]
pub async fn list(State(state): State<AppState>) -> Result<Json<ParticipantHostPage>, ApiError> {
    let hosts = gate(&state)?.hosts().await?;
    Ok(Json(ParticipantHostPage {
        participants: hosts.iter().map(|(k, h)| participant_out(k, h)).collect(),
    }))
}
