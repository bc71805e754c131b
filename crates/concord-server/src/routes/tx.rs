//! Two-phase-commit transactions.

use crate::error::ApiError;
use crate::idempotency::idempotency_key;
use crate::state::AppState;
use crate::telemetry::IncomingTrace;
use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use concord_api::tx::{BeginTxBody, ParticipantOut, TxDecision, TxOut, TxPage};
use concord_core::domain::Principal;
use concord_core::domain::tx::{Outcome, TxParticipant, TxState, Vote, Xid};
use concord_core::ports::TxRow;
use serde::Deserialize;
use utoipa::IntoParams;

/// Runs a two-phase commit over the participants.
#[utoipa::path(post, path = "/v1/transactions", tag = "transactions",
    security(("bearer" = ["tx:write"])),
    request_body = BeginTxBody,
    responses(
        (status = 200, description = "Decided; the decision is durable, phase 2 runs on", body = TxDecision),
        (status = 202, description = "Logged, but the decision could not be confirmed (outcome `pending`): recovery finishes it; ask GET", body = TxDecision),
        (status = 400, description = "invalid_participant or transaction_limit_exceeded"),
    ))]
pub async fn begin(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    trace: Option<Extension<IncomingTrace>>,
    body: Result<Json<BeginTxBody>, JsonRejection>,
) -> Result<(StatusCode, Json<TxDecision>), ApiError> {
    let Json(body) = body?;
    let trace = trace.map(|Extension(IncomingTrace(t))| t);
    let participants = body
        .participants
        .into_iter()
        .map(|p| TxParticipant {
            name: p.name,
            url: p.url,
            payload: p.payload,
        })
        .collect();
    // A keyed begin gets an xid derived from the caller and the key: a retry after a crash that
    // left the key's record behind the transaction meets that transaction.
    let xid = idempotency_key(&headers).map(|k| {
        let request = serde_json::to_vec(&(&participants, body.timeout_ms)).unwrap_or_default();
        Xid::derived(&principal.key_id.to_string(), k, &request)
    });
    let (xid, outcome) = state
        .transactions
        .begin(participants, body.timeout_ms, trace, xid)
        .await?;
    Ok(match outcome {
        Some(o) => (
            StatusCode::OK,
            Json(TxDecision {
                xid: xid.to_string(),
                outcome: o.as_str().to_owned(),
            }),
        ),
        // Logged, but the decision could not be confirmed: recovery finishes it; ask GET.
        None => (
            StatusCode::ACCEPTED,
            Json(TxDecision {
                xid: xid.to_string(),
                outcome: "pending".to_owned(),
            }),
        ),
    })
}

/// A transaction's outcome, votes and acknowledgements.
#[utoipa::path(get, path = "/v1/transactions/{xid}", tag = "transactions",
    security(("bearer" = ["tx:read"])),
    params(("xid" = String, Path, description = "The transaction id")),
    responses(
        (status = 200, description = "Outcome, votes and acknowledgements; an unknown xid is presumed aborted", body = TxOut),
    ))]
pub async fn get(State(state): State<AppState>, Path(raw): Path<String>) -> Result<Json<TxOut>, ApiError> {
    // An xid that does not parse is one the coordinator never made: it has no record of it.
    let (row, log) = match Xid::parse(raw.as_str()) {
        Ok(xid) => state.transactions.view(&xid).await?,
        Err(_) => (None, None),
    };
    Ok(Json(match (row, log) {
        (Some(row), Some(log)) => full(&row, &log),
        (Some(row), None) => summary(&row),
        // Retention removed the row of a decided transaction with nothing left to do: its log
        // still tells the outcome, which must never read as a presumed abort.
        (None, Some(log)) if log.decision.is_some() => {
            let done = log.completed_at.or(log.decided_at).unwrap_or(log.started_at);
            let row = TxRow {
                xid: log.xid.clone(),
                outcome: log.decision,
                pending: false,
                next_run_at: None,
                lease_owner: None,
                lease_until: None,
                log_version: log.log_version,
                created_at: log.started_at,
                updated_at: done,
            };
            full(&row, &log)
        }
        // Presumed abort: the coordinator has no record, so it never decided to commit.
        (None, _) => TxOut {
            xid: raw,
            outcome: Some(Outcome::Aborted.as_str().to_owned()),
            presumed: true,
            pending: false,
            reason: Some("unknown transaction: presumed abort".into()),
            participants: Vec::new(),
            created_at: None,
            decided_at: None,
            completed_at: None,
        },
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only transactions with this outcome.
    #[param(inline, value_type = Option<OutcomeParam>)]
    outcome: Option<String>,
    /// Only transactions whose phase 2 is not finished (`true`) or is (`false`).
    pending: Option<bool>,
    /// Only transactions whose xid sorts after this one.
    after: Option<String>,
    /// Transactions per page (default 100, at most the server's read limit).
    #[param(minimum = 1)]
    limit: Option<usize>,
}

/// The outcomes a transaction list can be filtered by.
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
enum OutcomeParam {
    Committed,
    Aborted,
    Undecided,
}

/// Transactions in xid order.
#[utoipa::path(get, path = "/v1/transactions", tag = "transactions",
    security(("bearer" = ["tx:read"])),
    params(ListParams),
    responses(
        (status = 200, description = "Transactions in xid order", body = TxPage),
        (status = 400, description = "invalid_parameter"),
    ))]
pub async fn list(
    State(state): State<AppState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<TxPage>, ApiError> {
    let Query(p) = params?;
    let outcome = match p.outcome.as_deref() {
        None => None,
        Some("undecided") => Some(None),
        Some(o) => Some(Some(Outcome::parse(o).ok_or_else(|| {
            ApiError::parameter("outcome", "one of committed, aborted, undecided")
        })?)),
    };
    let limit = super::events::read_limit(p.limit, &state)?;
    let rows = state
        .transactions
        .list(outcome, p.pending, p.after.as_deref(), limit)
        .await?;
    let next = (rows.len() == limit)
        .then(|| rows.last().map(|r| r.xid.to_string()))
        .flatten();
    Ok(Json(TxPage {
        transactions: rows.iter().map(summary).collect(),
        next,
    }))
}

fn summary(row: &TxRow) -> TxOut {
    TxOut {
        xid: row.xid.to_string(),
        outcome: row.outcome.map(|o| o.as_str().to_owned()),
        presumed: false,
        pending: row.pending,
        reason: None,
        participants: Vec::new(),
        created_at: Some(row.created_at),
        decided_at: None,
        completed_at: None,
    }
}

/// The log is the truth: it may be ahead of the row while a node works on the transaction.
fn full(row: &TxRow, s: &TxState) -> TxOut {
    TxOut {
        xid: s.xid.to_string(),
        outcome: s.decision.map(|o| o.as_str().to_owned()),
        presumed: false,
        pending: row.pending && s.completed_at.is_none(),
        reason: s.reason.clone(),
        participants: s
            .participants
            .iter()
            .enumerate()
            .map(|(i, p)| ParticipantOut {
                name: p.name.clone(),
                url: p.url.clone(),
                vote: s.votes[i].map(|v| match v {
                    Vote::Commit => "commit".to_owned(),
                    Vote::Abort => "abort".to_owned(),
                }),
                // A finished row means every participant acknowledged (the last round is
                // recorded in the row only).
                acknowledged_at: s.acked[i].or((!row.pending).then_some(row.updated_at)),
            })
            .collect(),
        created_at: Some(row.created_at),
        decided_at: s.decided_at,
        completed_at: s.completed_at.or((!row.pending).then_some(row.updated_at)),
    }
}
