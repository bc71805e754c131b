//! Saga definitions and instances.

use crate::error::ApiError;
use crate::idempotency::idempotency_key;
use crate::saga::runner::SagaView;
use crate::state::AppState;
use crate::telemetry::IncomingTrace;
use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use concord_api::ErrorCode;
use concord_api::sagas::{
    AttemptOut, DefinitionIn, DefinitionOut, OperationOut, SagaOut, SagaPage, SignalOut, StartSagaBody, StepOut,
};
use concord_core::app::auth::{Owned, check_owner, claim_owner};
use concord_core::app::saga::{SagaError, SendSignal, StartSaga};
use concord_core::domain::Principal;
use concord_core::domain::saga::DERIVED_PREFIX;
use concord_core::domain::saga::callback::Completion;
use concord_core::domain::saga::definition::check_definition_name;
use concord_core::domain::saga::machine::{ActionStatus, CompensationStatus};
use concord_core::domain::saga::{DefinitionSpec, InvalidSagaId, SagaId, SagaOperation, SagaState, SagaStatus};
use concord_core::ports::{SagaRow, StoredDefinition};
use serde::Deserialize;
use std::time::Duration;
use utoipa::IntoParams;

/// Stores a new version of a saga definition.
#[utoipa::path(put, path = "/v1/saga-definitions/{name}", tag = "sagas",
    security(("bearer" = ["sagas:write"])),
    params(DefinitionPath),
    request_body = DefinitionIn,
    responses(
        (status = 201, description = "A new version", body = DefinitionOut),
        (status = 200, description = "Unchanged: the latest version already has this spec", body = DefinitionOut),
        (status = 400, description = "invalid_name, duplicate_step_name, unknown_template_variable, invalid_step_url, outbound_call_refused, invalid_step_method, invalid_step_header, invalid_step_condition, invalid_step_kind or saga_limit_exceeded"),
        (status = 403, description = "not_owner: another API key name owns this definition"),
    ))]
pub async fn put_definition(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(DefinitionPath { name }): Path<DefinitionPath>,
    body: Result<Json<DefinitionSpec>, JsonRejection>,
) -> Result<(StatusCode, Json<DefinitionOut>), ApiError> {
    let Json(spec) = body?;
    check_definition_name(&name).map_err(SagaError::from)?;
    check_owner(state.keys.as_ref(), &principal, Owned::SagaDefinition, &name).await?;
    let (stored, created) = state.sagas.define(&name, spec).await?;
    claim_owner(state.keys.as_ref(), &principal, Owned::SagaDefinition, &name).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(definition_out(stored))))
}

/// A saga definition named in the path.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct DefinitionPath {
    /// 1–64 of `A-Z a-z 0-9 _ -`.
    #[param(pattern = r"^[A-Za-z0-9_-]+$", min_length = 1, max_length = 64)]
    pub name: String,
}

/// A saga named in the path.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct SagaPath {
    /// 1–128 of `A-Z a-z 0-9 _ - . :`.
    #[param(pattern = r"^[A-Za-z0-9_.:-]+$", min_length = 1, max_length = 128)]
    pub id: String,
}

impl SagaPath {
    /// The id, parsed where it enters. No saga has an id that does not parse: it is answered
    /// as one that is not found.
    fn id(self) -> Result<SagaId, SagaError> {
        SagaId::parse(self.id).map_err(|InvalidSagaId(id)| SagaError::NotFound(id))
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DefinitionParams {
    /// This version (default: the latest).
    #[param(minimum = 1)]
    version: Option<u32>,
}

/// Reads a saga definition: a version, or the latest.
#[utoipa::path(get, path = "/v1/saga-definitions/{name}", tag = "sagas",
    security(("bearer" = ["sagas:read"])),
    params(DefinitionPath, DefinitionParams),
    responses(
        (status = 200, description = "The version asked, or the latest", body = DefinitionOut),
        (status = 400, description = "invalid_name or invalid_parameter"),
        (status = 404, description = "saga_definition_not_found"),
    ))]
pub async fn get_definition(
    State(state): State<AppState>,
    Path(DefinitionPath { name }): Path<DefinitionPath>,
    params: Result<Query<DefinitionParams>, QueryRejection>,
) -> Result<Json<DefinitionOut>, ApiError> {
    let Query(p) = params?;
    let stored = state.sagas.definition(&name, p.version).await?;
    Ok(Json(definition_out(stored)))
}

fn definition_out(d: StoredDefinition) -> DefinitionOut {
    DefinitionOut {
        name: d.name,
        version: d.version,
        definition: d.spec,
        created_at: d.created_at,
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitParams {
    /// Wait up to this long for the saga to finish, then answer its state (0: do not wait).
    wait_ms: Option<u64>,
}

fn wait_of(p: &WaitParams, state: &AppState) -> Result<Option<Duration>, ApiError> {
    match p.wait_ms {
        None | Some(0) => Ok(None),
        Some(ms) if ms > state.settings.saga_max_wait_ms => Err(ApiError::parameter(
            "wait_ms",
            format!("must be at most {}", state.settings.saga_max_wait_ms),
        )),
        Some(ms) => Ok(Some(Duration::from_millis(ms))),
    }
}

/// Starts a saga, or returns the saga with this id.
#[utoipa::path(post, path = "/v1/sagas", tag = "sagas",
    security(("bearer" = ["sagas:write"])),
    params(WaitParams), request_body = StartSagaBody,
    responses(
        (status = 201, description = "Started", body = SagaOut),
        (status = 200, description = "A saga with this id exists: it is returned", body = SagaOut),
        (status = 400, description = "invalid_name, saga_limit_exceeded or invalid_parameter"),
        (status = 404, description = "saga_definition_not_found"),
    ))]
pub async fn start(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    trace: Option<Extension<IncomingTrace>>,
    params: Result<Query<WaitParams>, QueryRejection>,
    body: Result<Json<StartSagaBody>, JsonRejection>,
) -> Result<(StatusCode, Json<SagaOut>), ApiError> {
    let Query(p) = params?;
    let wait = wait_of(&p, &state)?;
    let Json(body) = body?;
    let trace = trace.map(|Extension(IncomingTrace(t))| t);
    // An id that does not parse is a bad name (`invalid_name`), as the engine answered it.
    let id = body.id.map(SagaId::parse).transpose().map_err(SagaError::from)?;
    if id.as_ref().is_some_and(|i| i.as_str().starts_with(DERIVED_PREFIX)) {
        return Err(ApiError::new(
            ErrorCode::InvalidName,
            format!("saga ids starting with {DERIVED_PREFIX} are derived by Concord from Idempotency-Key"),
        ));
    }
    // Without an id of its own, a keyed start gets one derived from the caller, the key and the
    // request: a retry after a crash that left the key's record behind the saga meets that saga.
    let id = id.or_else(|| {
        idempotency_key(&headers).map(|k| {
            let request = serde_json::to_vec(&(&body.definition, &body.input)).unwrap_or_default();
            SagaId::derived(&principal.key_id.to_string(), k, &request)
        })
    });
    let request = StartSaga {
        definition: body.definition,
        input: body.input,
        id,
        trace,
    };
    let (created, saga) = state.sagas.start(request, wait).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(saga_out(&saga))))
}

/// A saga with each step's attempts, output and error.
#[utoipa::path(get, path = "/v1/sagas/{id}", tag = "sagas",
    security(("bearer" = ["sagas:read"])),
    params(SagaPath, WaitParams),
    responses(
        (status = 200, description = "The saga with each step's attempts, output and error", body = SagaOut),
        (status = 400, description = "invalid_parameter"),
        (status = 404, description = "saga_not_found"),
    ))]
pub async fn get(
    State(state): State<AppState>,
    Path(path): Path<SagaPath>,
    params: Result<Query<WaitParams>, QueryRejection>,
) -> Result<Json<SagaOut>, ApiError> {
    let Query(p) = params?;
    let wait = wait_of(&p, &state)?;
    let id = path.id()?;
    let mut out = saga_out(&state.sagas.view(&id, wait).await?);
    // A saga parked on a host shows that host while its breaker is not closed.
    if let Some(gate) = state.sagas.engine().gate()
        && !concord_core::domain::saga::SagaStatus::parse(&out.status).is_some_and(|s| s.is_terminal())
        && let Some((host, h)) = gate.parked(&id).await?
        && h.breaker != concord_core::domain::flow::Breaker::Closed
    {
        out.waiting_for_host = Some(super::participants::participant_out(&host, &h));
    }
    Ok(Json(out))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only sagas in this status.
    #[param(inline, value_type = Option<SagaStatusParam>)]
    status: Option<String>,
    /// Sagas per page (default 100, at most the server's read limit).
    #[param(minimum = 1)]
    limit: Option<usize>,
    /// Only sagas whose id sorts after this one.
    after: Option<String>,
}

/// The statuses a saga list can be filtered by.
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
enum SagaStatusParam {
    Running,
    Compensating,
    Completed,
    Compensated,
    Failed,
    Cancelled,
}

/// Sagas in id order.
#[utoipa::path(get, path = "/v1/sagas", tag = "sagas",
    security(("bearer" = ["sagas:read"])),
    params(ListParams),
    responses(
        (status = 200, description = "Sagas in id order", body = SagaPage),
        (status = 400, description = "invalid_parameter"),
    ))]
pub async fn list(
    State(state): State<AppState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<SagaPage>, ApiError> {
    let Query(p) = params?;
    let status = p
        .status
        .as_deref()
        .map(|s| {
            SagaStatus::parse(s).ok_or_else(|| {
                ApiError::parameter(
                    "status",
                    "one of running, compensating, completed, compensated, failed, cancelled",
                )
            })
        })
        .transpose()?;
    let limit = super::events::read_limit(p.limit, &state)?;
    let rows = state.sagas.list(status, p.after.as_deref(), limit).await?;
    let next = (rows.len() == limit)
        .then(|| rows.last().map(|r| r.id.to_string()))
        .flatten();
    Ok(Json(SagaPage {
        sagas: rows.iter().map(summary).collect(),
        next,
    }))
}

/// Gives a failed saga's compensations a fresh budget.
#[utoipa::path(post, path = "/v1/sagas/{id}/retry", tag = "sagas",
    security(("bearer" = ["sagas:write"])),
    params(SagaPath, WaitParams),
    responses(
        (status = 200, description = "Resumed: its compensations run again", body = SagaOut),
        (status = 400, description = "invalid_parameter"),
        (status = 404, description = "saga_not_found"),
        (status = 409, description = "saga_not_failed"),
        (status = 503, description = "saga_busy: another node is working on it; retry shortly"),
    ))]
pub async fn retry(
    State(state): State<AppState>,
    Path(path): Path<SagaPath>,
    params: Result<Query<WaitParams>, QueryRejection>,
) -> Result<Json<SagaOut>, ApiError> {
    let Query(p) = params?;
    let wait = wait_of(&p, &state)?;
    let id = path.id()?;
    Ok(Json(saga_out(&state.sagas.retry(&id, wait).await?)))
}

/// Asks `op` of the saga: kept at once, recorded in its log at its next look for operations.
async fn operate(
    state: &AppState,
    principal: &Principal,
    headers: &HeaderMap,
    path: SagaPath,
    op: SagaOperation,
) -> Result<(StatusCode, Json<OperationOut>), ApiError> {
    let id = path.id()?;
    let by = principal.key_id.to_string();
    let sequence = state
        .sagas
        .operate(&id, op, Some(&by), idempotency_key(headers))
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(OperationOut {
            saga_id: id.to_string(),
            operation: op.as_str().to_owned(),
            sequence,
        }),
    ))
}

/// Cancels a running saga: at its next look for operations (a call running now finishes) it stops,
/// compensates what ran (a step whose outcome is unknown counts as uncertain) and ends
/// `cancelled`.
#[utoipa::path(post, path = "/v1/sagas/{id}/cancel", tag = "sagas",
    security(("bearer" = ["sagas:write"])),
    params(SagaPath),
    responses(
        (status = 202, description = "Kept: the saga records it at its next look", body = OperationOut),
        (status = 404, description = "saga_not_found"),
        (status = 409, description = "saga_operation_refused: it is not running (or will not be)"),
        (status = 503, description = "saga_busy: other operations kept coming in at once; retry"),
    ))]
pub async fn cancel(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    Path(path): Path<SagaPath>,
) -> Result<(StatusCode, Json<OperationOut>), ApiError> {
    operate(&state, &principal, &headers, path, SagaOperation::Cancel).await
}

/// Pauses a saga that is running or compensating: no attempt starts (one running now finishes)
/// until it is resumed; its waits and timers are looked at again then.
#[utoipa::path(post, path = "/v1/sagas/{id}/pause", tag = "sagas",
    security(("bearer" = ["sagas:write"])),
    params(SagaPath),
    responses(
        (status = 202, description = "Kept: the saga records it at its next look", body = OperationOut),
        (status = 404, description = "saga_not_found"),
        (status = 409, description = "saga_operation_refused: finished, or paused already"),
        (status = 503, description = "saga_busy: other operations kept coming in at once; retry"),
    ))]
pub async fn pause(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    Path(path): Path<SagaPath>,
) -> Result<(StatusCode, Json<OperationOut>), ApiError> {
    operate(&state, &principal, &headers, path, SagaOperation::Pause).await
}

/// Resumes a paused saga.
#[utoipa::path(post, path = "/v1/sagas/{id}/resume", tag = "sagas",
    security(("bearer" = ["sagas:write"])),
    params(SagaPath),
    responses(
        (status = 202, description = "Kept: the saga goes on once it records it", body = OperationOut),
        (status = 404, description = "saga_not_found"),
        (status = 409, description = "saga_operation_refused: not paused"),
        (status = 503, description = "saga_busy: other operations kept coming in at once; retry"),
    ))]
pub async fn resume(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    Path(path): Path<SagaPath>,
) -> Result<(StatusCode, Json<OperationOut>), ApiError> {
    operate(&state, &principal, &headers, path, SagaOperation::Resume).await
}

/// Skips the backoff a saga waits out: its next attempt starts now.
#[utoipa::path(post, path = "/v1/sagas/{id}/retry-now", tag = "sagas",
    security(("bearer" = ["sagas:write"])),
    params(SagaPath),
    responses(
        (status = 202, description = "Kept: the next attempt starts once the saga records it", body = OperationOut),
        (status = 404, description = "saga_not_found"),
        (status = 409, description = "saga_operation_refused: finished, or paused"),
        (status = 503, description = "saga_busy: other operations kept coming in at once; retry"),
    ))]
pub async fn retry_now(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    Path(path): Path<SagaPath>,
) -> Result<(StatusCode, Json<OperationOut>), ApiError> {
    operate(&state, &principal, &headers, path, SagaOperation::RetryNow).await
}

/// A saga and a signal named in the path.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct SignalPath {
    /// 1–128 of `A-Z a-z 0-9 _ - . :`.
    #[param(pattern = r"^[A-Za-z0-9_.:-]+$", min_length = 1, max_length = 128)]
    pub id: String,
    /// 1–64 of `A-Z a-z 0-9 _ -`.
    #[param(pattern = r"^[A-Za-z0-9_-]+$", min_length = 1, max_length = 64)]
    pub signal: String,
}

/// Sends a signal to a saga: its JSON body becomes the output of the wait step that takes it.
/// A signal sent before the saga reaches that step is kept for it.
#[utoipa::path(post, path = "/v1/sagas/{id}/signals/{signal}", tag = "sagas",
    security(("bearer" = ["sagas:signal"])),
    params(SignalPath),
    request_body(content = concord_api::schema::StorableJson, description = "Any JSON value: the wait step's output"),
    responses(
        (status = 202, description = "Kept for the saga, which is woken if it waits", body = SignalOut),
        (status = 400, description = "invalid_name, saga_limit_exceeded (over saga_max_output_bytes) or malformed_json"),
        (status = 404, description = "saga_not_found"),
        (status = 409, description = "signal_not_expected or signal_already_sent"),
        (status = 503, description = "saga_busy: other signals of this name kept coming in at once; retry"),
    ))]
pub async fn signal(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    Path(path): Path<SignalPath>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<(StatusCode, Json<SignalOut>), ApiError> {
    let Json(payload) = body?;
    let id = SagaId::parse(path.id).map_err(|InvalidSagaId(id)| SagaError::NotFound(id))?;
    let by = principal.key_id.to_string();
    let sequence = state
        .sagas
        .signal(SendSignal {
            id: &id,
            name: &path.signal,
            payload,
            by: Some(&by),
            request_key: idempotency_key(&headers),
        })
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(SignalOut {
            saga_id: id.to_string(),
            signal: path.signal,
            sequence,
        }),
    ))
}

/// The completion URL of an accepted action, named in the path.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct CallbackPath {
    /// The token of the `Concord-Callback` URL the action call carried.
    #[param(pattern = r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$", max_length = 1024)]
    pub token: String,
}

/// Completes an action its participant answered with 202. No API key: the token in the URL is
/// the capability, bound to one attempt of one step of one saga, good once (the same completion
/// posted again answers the same), and nothing else.
#[utoipa::path(post, path = "/callbacks/{token}", tag = "sagas",
    security(()),
    params(CallbackPath),
    request_body = concord_api::sagas::CompletionIn,
    responses(
        (status = 202, description = "Recorded: the saga goes on", body = concord_api::sagas::CompletionOut),
        (status = 400, description = "malformed_json or saga_limit_exceeded (over saga_max_output_bytes)"),
        (status = 401, description = "callback_invalid: not a URL this server issued, or past its time"),
        (status = 409, description = "callback_not_expected (the attempt is over) or callback_already_used (completed with another result)"),
    ))]
pub async fn complete(
    State(state): State<AppState>,
    Path(path): Path<CallbackPath>,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<concord_api::sagas::CompletionOut>), ApiError> {
    // No key guards this route: the token is checked before the body is read, and the body is
    // read only up to what a completion may hold.
    let claim = state.sagas.verify_callback(&path.token)?;
    let limit = state.settings.saga_max_output_bytes + COMPLETION_ENVELOPE_BYTES;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            ErrorCode::SagaLimitExceeded,
            format!("a completion is at most {limit} bytes (saga_max_output_bytes and its envelope)"),
        )
    })?;
    let completion: Completion = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            ErrorCode::MalformedJson,
            format!("a completion is {{\"outcome\": \"succeeded\", \"output\"?}}, {{\"outcome\": \"refused\"|\"failed\", \"error\"}}: {e}"),
        )
    })?;
    let (claim, step) = state.sagas.complete(claim, completion).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(concord_api::sagas::CompletionOut {
            saga_id: claim.saga_id.to_string(),
            step,
            attempt: claim.attempt,
        }),
    ))
}

/// What a completion body holds beside the output: the outcome, an error text.
const COMPLETION_ENVELOPE_BYTES: usize = 4096;

/// The answer of a saga: its row, then what its log says when it was read.
fn saga_out(saga: &SagaView) -> SagaOut {
    let mut out = summary(&saga.row);
    if let Some(s) = &saga.state {
        fill_from_log(&mut out, s);
    }
    out
}

/// The row's view: what lists show.
fn summary(row: &SagaRow) -> SagaOut {
    SagaOut {
        id: row.id.to_string(),
        definition: row.definition.clone(),
        version: row.version,
        status: row.status.as_str().to_owned(),
        input: row.input.clone(),
        created_at: row.created_at,
        updated_at: row.updated_at,
        next_attempt_at: None,
        paused: false,
        steps: Vec::new(),
        waiting_for_host: None,
    }
}

/// The log is the truth: it may be ahead of the row while a node works on the saga.
fn fill_from_log(out: &mut SagaOut, s: &SagaState) {
    out.status = s.status.as_str().to_owned();
    out.updated_at = s.updated_at;
    out.paused = s.paused;
    // A waiting step's end is when the saga runs next unless a signal comes first.
    let waiting = s
        .steps
        .iter()
        .find_map(|st| st.wait_until.or(st.callback.map(|c| c.until)));
    out.next_attempt_at = s.retry_at.or(waiting).filter(|_| !s.status.is_terminal());
    out.steps = s
        .steps
        .iter()
        .map(|st| StepOut {
            name: st.name.clone(),
            action: match st.action {
                ActionStatus::Pending => "pending",
                ActionStatus::Succeeded => "succeeded",
                ActionStatus::Refused => "refused",
                ActionStatus::Uncertain => "uncertain",
                ActionStatus::Skipped => "skipped",
            }
            .to_owned(),
            compensation: match st.compensation {
                // An undo is owed only if the saga compensates; a completed saga owes none.
                CompensationStatus::Pending if s.status == SagaStatus::Completed => "not_needed",
                CompensationStatus::NotNeeded => "not_needed",
                CompensationStatus::Pending => "pending",
                CompensationStatus::Succeeded => "succeeded",
                CompensationStatus::GaveUp => "gave_up",
            }
            .to_owned(),
            output: st.output.clone(),
            error: st.error.clone(),
            waiting_for: st.waiting_for.clone(),
            until: st
                .timer
                .filter(|_| st.action == ActionStatus::Pending)
                .or(st.wait_until)
                .or(st.callback.map(|c| c.until)),
            attempts: st
                .attempts
                .iter()
                .map(|a| AttemptOut {
                    op: a.op.as_str().to_owned(),
                    attempt: a.attempt,
                    started_at: a.started_at,
                    finished_at: a.finished_at,
                    outcome: a.outcome.clone(),
                    error: a.error.clone(),
                })
                .collect(),
        })
        .collect();
}
