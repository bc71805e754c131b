//! Saga definitions and instances.

use crate::error::ApiError;
use crate::state::AppState;
use crate::telemetry::IncomingTrace;
use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use concord_api::ErrorCode;
use concord_api::sagas::{AttemptOut, DefinitionOut, SagaOut, SagaPage, StartSagaBody, StepOut};
use concord_core::app::saga::{SagaError, StartSaga};
use concord_core::domain::saga::machine::{ActionStatus, CompensationStatus};
use concord_core::domain::saga::{DefinitionError, DefinitionSpec, SagaState, SagaStatus};
use concord_core::ports::{SagaRow, StoredDefinition};
use serde::Deserialize;
use std::time::Duration;

pub async fn put_definition(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<DefinitionSpec>, JsonRejection>,
) -> Result<(StatusCode, Json<DefinitionOut>), ApiError> {
    let Json(spec) = body?;
    let (stored, created) = state.sagas.engine().define(&name, spec).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(definition_out(stored))))
}

#[derive(Debug, Deserialize)]
pub struct DefinitionParams {
    version: Option<u32>,
}

pub async fn get_definition(
    State(state): State<AppState>,
    Path(name): Path<String>,
    params: Result<Query<DefinitionParams>, QueryRejection>,
) -> Result<Json<DefinitionOut>, ApiError> {
    let Query(p) = params?;
    let stored = state
        .sagas
        .engine()
        .store()
        .get_definition(&name, p.version)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::SagaDefinitionNotFound, format!("no definition {name}")))?;
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

#[derive(Debug, Deserialize)]
pub struct WaitParams {
    /// Wait up to this long for the saga to finish, then answer its state.
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

pub async fn start(
    State(state): State<AppState>,
    trace: Option<Extension<IncomingTrace>>,
    params: Result<Query<WaitParams>, QueryRejection>,
    body: Result<Json<StartSagaBody>, JsonRejection>,
) -> Result<(StatusCode, Json<SagaOut>), ApiError> {
    let Query(p) = params?;
    let wait = wait_of(&p, &state)?;
    let Json(body) = body?;
    let trace = trace.map(|Extension(IncomingTrace(t))| t);
    let (row, held) = state
        .sagas
        .engine()
        .start(StartSaga {
            definition: body.definition,
            input: body.input,
            id: body.id,
            trace,
        })
        .await?;
    let created = held.is_some();
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    let Some(wait) = wait else {
        if let Some(h) = held {
            state.sagas.spawn(h);
        }
        return Ok((status, Json(summary(&row))));
    };
    let Some(h) = held else {
        state.sagas.wait_finished(&row.id, wait).await;
        return Ok((status, Json(full_view(&state, &row.id).await?)));
    };
    // Heard from the drive itself: the answer needs no read of what was just written.
    let finished = state.sagas.watch(&row.id);
    state.sagas.spawn(h);
    match state.sagas.wait(&row.id, finished, wait).await {
        Some(saga) => {
            let mut out = summary(&row);
            fill_from_log(&mut out, &saga);
            Ok((status, Json(out)))
        }
        None => Ok((status, Json(full_view(&state, &row.id).await?))),
    }
}

pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
    params: Result<Query<WaitParams>, QueryRejection>,
) -> Result<Json<SagaOut>, ApiError> {
    let Query(p) = params?;
    if let Some(w) = wait_of(&p, &state)? {
        state.sagas.wait_finished(&id, w).await;
    }
    Ok(Json(full_view(&state, &id).await?))
}

#[derive(Debug, Deserialize)]
pub struct ListParams {
    status: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
}

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
                ApiError::parameter("status", "one of running, compensating, completed, compensated, failed")
            })
        })
        .transpose()?;
    let limit = super::events::read_limit(p.limit, &state)?;
    let rows = state
        .sagas
        .engine()
        .store()
        .list_sagas(status, p.after.as_deref(), limit)
        .await?;
    let next = (rows.len() == limit)
        .then(|| rows.last().map(|r| r.id.clone()))
        .flatten();
    Ok(Json(SagaPage {
        sagas: rows.iter().map(summary).collect(),
        next,
    }))
}

pub async fn retry(
    State(state): State<AppState>,
    Path(id): Path<String>,
    params: Result<Query<WaitParams>, QueryRejection>,
) -> Result<Json<SagaOut>, ApiError> {
    let Query(p) = params?;
    let wait = wait_of(&p, &state)?;
    let held = state.sagas.engine().retry(&id).await?;
    let finished = wait.map(|_| state.sagas.watch(&id));
    state.sagas.spawn(held);
    if let (Some(w), Some(rx)) = (wait, finished) {
        state.sagas.wait(&id, rx, w).await;
    }
    Ok(Json(full_view(&state, &id).await?))
}

async fn full_view(state: &AppState, id: &str) -> Result<SagaOut, ApiError> {
    let (row, saga) = state.sagas.engine().load(id).await?;
    let mut out = summary(&row);
    if let Some(s) = saga {
        fill_from_log(&mut out, &s);
    }
    Ok(out)
}

/// The row's view: what lists show.
fn summary(row: &SagaRow) -> SagaOut {
    SagaOut {
        id: row.id.clone(),
        definition: row.definition.clone(),
        version: row.version,
        status: row.status.as_str().to_owned(),
        input: row.input.clone(),
        created_at: row.created_at,
        updated_at: row.updated_at,
        next_attempt_at: None,
        steps: Vec::new(),
    }
}

/// The log is the truth: it may be ahead of the row while a node works on the saga.
fn fill_from_log(out: &mut SagaOut, s: &SagaState) {
    out.status = s.status.as_str().to_owned();
    out.updated_at = s.updated_at;
    out.next_attempt_at = s.retry_at.filter(|_| !s.status.is_terminal());
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

impl From<SagaError> for ApiError {
    fn from(e: SagaError) -> Self {
        let detail = e.to_string();
        match e {
            SagaError::Definition(d) => Self::new(
                match d {
                    DefinitionError::Name(_) => ErrorCode::InvalidName,
                    DefinitionError::DuplicateStep(_) => ErrorCode::DuplicateStepName,
                    DefinitionError::Template { .. } => ErrorCode::UnknownTemplateVariable,
                    DefinitionError::Url { .. } => ErrorCode::InvalidStepUrl,
                    DefinitionError::Method { .. } => ErrorCode::InvalidStepMethod,
                    DefinitionError::Header { .. } => ErrorCode::InvalidStepHeader,
                    DefinitionError::Limit(_) => ErrorCode::SagaLimitExceeded,
                },
                detail,
            ),
            SagaError::DefinitionNotFound(_) => Self::new(ErrorCode::SagaDefinitionNotFound, detail),
            SagaError::NotFound(_) => Self::new(ErrorCode::SagaNotFound, detail),
            SagaError::NotFailed(..) => Self::new(ErrorCode::SagaNotFailed, detail),
            SagaError::Busy(_) => Self::new(ErrorCode::SagaBusy, detail),
            SagaError::InputTooLarge { .. } => Self::new(ErrorCode::SagaLimitExceeded, detail),
            SagaError::Log(_) => Self::new(ErrorCode::Internal, detail),
            SagaError::Validation(v) => v.into(),
            SagaError::Store(s) => s.into(),
        }
    }
}
