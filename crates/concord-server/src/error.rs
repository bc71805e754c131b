//! The API's error type: a code from the one table in `concord-api`, answered as problem+json.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use concord_api::{ErrorCode, Problem};
use concord_core::domain::ValidationError;
use concord_core::ports::StoreError;

/// An error answered to a client.
#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub detail: String,
    pub current_version: Option<u64>,
    /// Sent as `Retry-After` (seconds).
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
            current_version: None,
            retry_after_s: None,
        }
    }

    pub fn parameter(name: &'static str, reason: impl Into<String>) -> Self {
        ValidationError::Parameter {
            name,
            reason: reason.into(),
        }
        .into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.code.status() >= 500 {
            tracing::error!(code = self.code.code(), detail = %self.detail, "request failed");
        }
        let mut problem = Problem::new(self.code, self.detail);
        problem.current_version = self.current_version;
        let mut resp = problem.into_response();
        if let Some(s) = self.retry_after_s {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        let code = match &e {
            ValidationError::StreamName(_) => ErrorCode::InvalidStreamName,
            ValidationError::EventType(_) => ErrorCode::InvalidEventType,
            ValidationError::ExpectedVersion(_) => ErrorCode::InvalidExpectedVersion,
            ValidationError::EventTooLarge { .. } => ErrorCode::EventTooLarge,
            ValidationError::BatchTooLarge { .. } => ErrorCode::BatchTooLarge,
            ValidationError::EmptyAppend => ErrorCode::EmptyAppend,
            ValidationError::DuplicateEventId(_) => ErrorCode::DuplicateEventId,
            ValidationError::Metadata(_) => ErrorCode::InvalidMetadata,
            ValidationError::NulCharacter(_) => ErrorCode::InvalidEventData,
            ValidationError::Scope(_) => ErrorCode::InvalidScope,
            ValidationError::IdempotencyKey(_) => ErrorCode::InvalidIdempotencyKey,
            ValidationError::Parameter { .. } => ErrorCode::InvalidParameter,
        };
        Self::new(code, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::WrongExpectedVersion { current, .. } => Self {
                current_version: Some(current),
                ..Self::new(ErrorCode::WrongExpectedVersion, e.to_string())
            },
            StoreError::EventIdConflict(_) => Self::new(ErrorCode::EventIdConflict, e.to_string()),
            StoreError::StreamNotFound(_) => Self::new(ErrorCode::StreamNotFound, e.to_string()),
            StoreError::Unavailable(_) => Self::new(ErrorCode::StoreUnavailable, e.to_string()),
        }
    }
}

impl From<concord_core::app::auth::KeyError> for ApiError {
    fn from(e: concord_core::app::auth::KeyError) -> Self {
        use concord_core::app::auth::KeyError as K;
        match e {
            K::Invalid(v) => v.into(),
            K::Store(s) => s.into(),
        }
    }
}

impl From<concord_core::app::vault::VaultFailure> for ApiError {
    fn from(e: concord_core::app::vault::VaultFailure) -> Self {
        use concord_core::app::vault::VaultFailure as F;
        match e {
            F::Invalid(v) => v.into(),
            F::Store(s) => s.into(),
            F::Forbidden(m) => Self::new(ErrorCode::Forbidden, m),
            F::RateLimited { retry_after_ms } => Self {
                retry_after_s: Some(retry_after_ms.div_ceil(1000).max(1)),
                ..Self::new(
                    ErrorCode::RateLimited,
                    format!("over this key's detokenize rate; retry in {retry_after_ms} ms"),
                )
            },
        }
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(r: axum::extract::rejection::JsonRejection) -> Self {
        use axum::extract::rejection::JsonRejection as J;
        let code = match &r {
            J::MissingJsonContentType(_) => ErrorCode::UnsupportedMediaType,
            J::BytesRejection(_) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::BodyTooLarge,
            _ => ErrorCode::MalformedJson,
        };
        Self::new(code, r.body_text())
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(r: axum::extract::rejection::QueryRejection) -> Self {
        Self::new(ErrorCode::InvalidParameter, r.body_text())
    }
}

/// The answer for a route that does not exist.
pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

/// The answer for a route that exists with other methods.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed, "the route does not take this method")
}
