//! How a call fails, and the problem built from an answer that was no problem document.

use concord_api::{ErrorCode, Problem};
use reqwest::StatusCode;

/// The longest detail kept of an answer that is not a problem document.
const MAX_DETAIL_CHARS: usize = 512;

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered non-2xx. A body that is not a problem document becomes a problem built
    /// from the status (`about:blank`, code `http_<status>` unless the status has a single
    /// generic code such as `not_found`). Arguments the client cannot even send (an empty, `.` or
    /// `..` path segment) are refused locally with a 400 problem.
    #[error("HTTP {} {}: {}", .0.status, .0.code, .0.detail)]
    Problem(Problem),
    /// The request did not complete: connection, TLS, timeout, or the body broke off.
    #[error(transparent)]
    Transport(#[from] reqwest::Error),
    /// A 2xx answer whose body is not what the route promises.
    #[error("cannot decode the server's answer: {0}")]
    Decode(String),
    /// The client cannot be used as configured: a base URL that does not parse, or no rustls
    /// crypto provider installed when [`Client::new`] builds its HTTP client.
    #[error("invalid client configuration: {0}")]
    Config(String),
}

impl ClientError {
    /// The stable error code, when the server answered one Concord knows.
    #[must_use]
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Problem(problem) => problem.error_code(),
            _ => None,
        }
    }

    /// The HTTP status, when there was an answer.
    #[must_use]
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Problem(problem) => Some(problem.status),
            Self::Transport(e) => e.status().map(|s| s.as_u16()),
            Self::Decode(_) | Self::Config(_) => None,
        }
    }
}

pub(crate) fn problem_from(status: StatusCode, is_json: bool, body: &[u8]) -> Problem {
    if is_json && let Ok(problem) = serde_json::from_slice::<Problem>(body) {
        return problem;
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let detail = match text.char_indices().nth(MAX_DETAIL_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    };
    let generic = [
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::BodyTooLarge,
        ErrorCode::UnsupportedMediaType,
    ]
    .into_iter()
    .find(|code| code.status() == status.as_u16());
    match generic {
        Some(code) => Problem::new(code, detail),
        None => Problem::custom(status.as_u16(), format!("http_{}", status.as_u16()), detail),
    }
}
