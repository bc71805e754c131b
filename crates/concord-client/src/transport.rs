//! Building request URLs and reading answers: every route's call goes through here.

use std::time::Duration;

use concord_api::{ErrorCode, Problem};
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap};
use reqwest::{RequestBuilder, Response, StatusCode, Url};
use serde::de::DeserializeOwned;

use crate::error::problem_from;
use crate::{ClientError, Created};

pub(crate) fn endpoint(base_url: &str, segments: &[&str]) -> Result<Url, ClientError> {
    let mut url = Url::parse(base_url).map_err(|e| ClientError::Config(format!("base URL {base_url:?}: {e}")))?;
    url.set_query(None);
    url.set_fragment(None);
    url.path_segments_mut()
        .map_err(|()| ClientError::Config(format!("base URL {base_url:?} cannot be a base")))?
        .pop_if_empty()
        .extend(segments);
    Ok(url)
}

/// `Url::path_segments_mut` percent-encodes a segment but drops `.` and `..`, and an empty one
/// would address another route: refuse those before sending anything.
pub(crate) fn segment(value: &str, code: ErrorCode) -> Result<&str, ClientError> {
    if matches!(value, "" | "." | "..") {
        return Err(ClientError::Problem(Problem::new(
            code,
            format!("{value:?} cannot be a path segment"),
        )));
    }
    Ok(value)
}

/// `wait_ms` of the saga routes that can hold their answer until the saga finishes.
pub(crate) fn append_wait(url: &mut Url, wait: Option<Duration>) {
    if let Some(wait) = wait {
        let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        url.query_pairs_mut().append_pair("wait_ms", &ms.to_string());
    }
}

pub(crate) async fn json<T: DeserializeOwned>(request: RequestBuilder) -> Result<T, ClientError> {
    Ok(json_with_status(request).await?.1)
}

pub(crate) async fn created<T: DeserializeOwned>(request: RequestBuilder) -> Result<Created<T>, ClientError> {
    let (status, value) = json_with_status(request).await?;
    Ok(Created {
        value,
        created: status == StatusCode::CREATED,
    })
}

pub(crate) async fn json_with_status<T: DeserializeOwned>(
    request: RequestBuilder,
) -> Result<(StatusCode, T), ClientError> {
    let response = check(request.header(ACCEPT, "application/json").send().await?).await?;
    let status = response.status();
    let body = response.bytes().await?;
    let value = serde_json::from_slice(&body).map_err(|e| ClientError::Decode(e.to_string()))?;
    Ok((status, value))
}

pub(crate) async fn empty(request: RequestBuilder) -> Result<(), ClientError> {
    check(request.send().await?).await?.bytes().await?;
    Ok(())
}

pub(crate) async fn check(response: Response) -> Result<Response, ClientError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let is_json = media_type(response.headers()).is_some_and(|t| t == "application/json" || t.ends_with("+json"));
    let body = response.bytes().await.unwrap_or_default();
    Err(ClientError::Problem(problem_from(status, is_json, &body)))
}

pub(crate) fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    let essence = value.split(';').next().unwrap_or_default();
    Some(essence.trim().to_ascii_lowercase())
}
