//! The problems the idempotency layer answers itself: codes from the one table,
//! [`ErrorCode`] in concord-api, as `application/problem+json` responses.

use axum::body::Body;
use axum::http::{HeaderValue, Response, StatusCode, header};
use concord_api::{ErrorCode, Problem};

/// The media type of every answer the layer makes itself.
pub(super) const PROBLEM_JSON: &str = "application/problem+json";

/// The HTTP status of `code`.
pub(super) fn status(code: ErrorCode) -> StatusCode {
    // Every status in the table is a valid one (400–599).
    StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// The problem of `code` with a detail, serialized, as stored or sent.
pub(super) fn body(code: ErrorCode, detail: impl Into<String>) -> Vec<u8> {
    // A struct of strings and integers always serializes.
    serde_json::to_vec(&Problem::new(code, detail)).unwrap_or_default()
}

/// The whole `application/problem+json` response of `code` with a detail.
pub(super) fn response(code: ErrorCode, detail: impl Into<String>) -> Response<Body> {
    let mut response = Response::new(Body::from(body(code, detail)));
    *response.status_mut() = status(code);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_body_has_the_five_members() {
        let body: serde_json::Value =
            serde_json::from_slice(&body(ErrorCode::PayloadTooLarge, "over 10 bytes")).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "type": "urn:concord:error:payload_too_large",
                "title": "Payload too large",
                "status": 413,
                "detail": "over 10 bytes",
                "code": "payload_too_large",
            })
        );
    }
}
