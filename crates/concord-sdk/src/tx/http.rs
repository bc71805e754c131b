//! The participant's HTTP face: `/prepare`, `/commit` and `/abort` as the coordinator calls them.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use concord_api::tx::{PhaseTwoMessage, PrepareMessage};
use concord_api::{ErrorCode, Problem};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Participant, ParticipantError, Vote, Xid};

type Shared = Arc<dyn Participant>;

/// The routes the coordinator calls, relative to the participant's URL: nest them where that URL
/// points (`Router::new().nest("/2pc", router(p))` for a participant registered as
/// `https://wallet/2pc`).
///
/// - `POST /prepare {"xid", "payload"}`: 200 `{"xid", "vote": "commit"}` or
///   409 `{"xid", "vote": "abort", "reason"}`.
/// - `POST /commit {"xid"}`: 200 `{"xid", "outcome": "committed"}`.
/// - `POST /abort {"xid"}`: 200 `{"xid", "outcome": "aborted"}`, for an unknown xid too.
///
/// Errors are `application/problem+json`: 400 (`malformed_json`, `invalid_parameter` for an
/// xid outside `[A-Za-z0-9_.:-]`), 413 (`body_too_large`), 500 or 503 (retried by the
/// coordinator; see [`ParticipantError::http_status`]). The body is read as JSON whatever its
/// content type. Each call runs to its end in a task of its own, even when the coordinator hangs
/// up (its timeout), so a prepare is never cut off between the work and `PREPARE TRANSACTION`.
///
/// `auth` says who may call: [`CoordinatorAuth::Token`] answers 401 `unauthorized` to any call
/// without `Authorization: Bearer <token>` (the coordinator's `tx_participant_token`), so nobody
/// else can commit or abort the participant's work; [`CoordinatorAuth::Open`] is for networks
/// where only the coordinator can reach the participant.
pub fn router(participant: Arc<dyn Participant>, auth: CoordinatorAuth) -> Router {
    let routes = Router::new()
        .route("/prepare", post(prepare))
        .route("/commit", post(commit))
        .route("/abort", post(abort))
        .with_state(participant);
    match auth {
        CoordinatorAuth::Open => routes,
        CoordinatorAuth::Token(token) => {
            routes.layer(axum::middleware::from_fn_with_state(Arc::new(token), require_token))
        }
    }
}

/// Who may call a participant's routes.
#[derive(Clone)]
pub enum CoordinatorAuth {
    /// Only calls carrying `Authorization: Bearer <token>`.
    Token(String),
    /// Anyone who can reach it.
    Open,
}

impl std::fmt::Debug for CoordinatorAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.write_str(match self {
            Self::Token(_) => "CoordinatorAuth::Token(..)",
            Self::Open => "CoordinatorAuth::Open",
        })
    }
}

async fn require_token(
    State(token): State<Arc<String>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(subtle::ConstantTimeEq::ct_eq(presented.as_bytes(), token.as_bytes())) {
        next.run(request).await
    } else {
        Failure {
            code: ErrorCode::Unauthorized,
            detail: "the coordinator's token is missing or wrong".into(),
        }
        .into_response()
    }
}

#[derive(Serialize)]
struct VoteBody<'a> {
    xid: &'a str,
    vote: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

#[derive(Serialize)]
struct AckBody<'a> {
    xid: &'a str,
    outcome: &'static str,
}

/// A call that ends in a problem answer.
#[derive(Debug)]
struct Failure {
    code: ErrorCode,
    detail: String,
}

impl From<ParticipantError> for Failure {
    fn from(error: ParticipantError) -> Self {
        Self {
            code: error.code(),
            detail: error.to_string(),
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        Problem::new(self.code, self.detail).into_response()
    }
}

async fn prepare(State(participant): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let vote = async {
        let message: PrepareMessage = parse(body)?;
        let xid = Xid::parse(message.xid).map_err(ParticipantError::from)?;
        let payload = message.payload;
        let vote = run_detached({
            let xid = xid.clone();
            async move { participant.prepare(&xid, &payload).await }
        })
        .await?;
        Ok::<_, Failure>((xid, vote))
    };
    match vote.await {
        Ok((xid, Vote::Commit)) => json(
            StatusCode::OK,
            &VoteBody {
                xid: xid.as_str(),
                vote: "commit",
                reason: None,
            },
        ),
        Ok((xid, Vote::Abort { reason })) => json(
            StatusCode::CONFLICT,
            &VoteBody {
                xid: xid.as_str(),
                vote: "abort",
                reason: Some(&reason),
            },
        ),
        Err(failure) => failure.into_response(),
    }
}

/// Which phase-2 message a route handles.
#[derive(Debug, Clone, Copy)]
enum Decision {
    Commit,
    Abort,
}

async fn commit(State(participant): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    phase_two(participant, body, Decision::Commit).await
}

async fn abort(State(participant): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    phase_two(participant, body, Decision::Abort).await
}

async fn phase_two(participant: Shared, body: Result<Bytes, BytesRejection>, decision: Decision) -> Response {
    let done = async {
        let message: PhaseTwoMessage = parse(body)?;
        let xid = Xid::parse(message.xid).map_err(ParticipantError::from)?;
        run_detached({
            let xid = xid.clone();
            async move {
                match decision {
                    Decision::Commit => participant.commit(&xid).await,
                    Decision::Abort => participant.abort(&xid).await,
                }
            }
        })
        .await?;
        Ok::<_, Failure>(xid)
    };
    let outcome = match decision {
        Decision::Commit => "committed",
        Decision::Abort => "aborted",
    };
    match done.await {
        Ok(xid) => json(
            StatusCode::OK,
            &AckBody {
                xid: xid.as_str(),
                outcome,
            },
        ),
        Err(failure) => failure.into_response(),
    }
}

/// Runs `call` in its own task: hyper drops a handler's future when the client disconnects,
/// and a participant call is better finished than cut off at an arbitrary await.
async fn run_detached<T: Send + 'static>(
    call: impl Future<Output = Result<T, ParticipantError>> + Send + 'static,
) -> Result<T, Failure> {
    match tokio::spawn(call).await {
        Ok(done) => Ok(done?),
        Err(e) => Err(Failure {
            code: ErrorCode::Internal,
            detail: format!("the participant call failed: {e}"),
        }),
    }
}

fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, Failure> {
    let body = body.map_err(|rejection| Failure {
        code: if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ErrorCode::BodyTooLarge
        } else {
            ErrorCode::MalformedJson
        },
        detail: rejection.body_text(),
    })?;
    serde_json::from_slice(&body).map_err(|e| Failure {
        code: ErrorCode::MalformedJson,
        detail: e.to_string(),
    })
}

fn json(status: StatusCode, body: &impl Serialize) -> Response {
    (status, axum::Json(body)).into_response()
}
