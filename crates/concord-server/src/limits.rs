//! Limits a hostile or runaway client meets: requests in progress per API key, event streams
//! served at once, and the time one request may take.

use crate::error::ApiError;
use axum::response::Response;
use concord_api::ErrorCode;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use uuid::Uuid;

/// Requests in progress per API key, each at most `max`. A key's entry lives only while it has
/// a request in progress.
pub struct KeySlots {
    max: usize,
    busy: Mutex<HashMap<Uuid, usize>>,
}

/// One request's slot, given back when dropped (the request finished or was abandoned).
pub struct KeySlot {
    slots: Arc<KeySlots>,
    key: Uuid,
}

impl KeySlots {
    #[must_use]
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            busy: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `key`, or none when it has `max` requests in progress.
    #[must_use]
    pub fn try_take(self: &Arc<Self>, key: Uuid) -> Option<KeySlot> {
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        let n = busy.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(KeySlot {
            slots: self.clone(),
            key,
        })
    }

    /// Keys with a request in progress.
    #[must_use]
    pub fn keys_busy(&self) -> usize {
        self.busy.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

impl Drop for KeySlot {
    fn drop(&mut self) {
        let mut busy = self.slots.busy.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = busy.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                busy.remove(&self.key);
            }
        }
    }
}

/// A refusal of a request over a limit that frees itself: try again in a second.
#[must_use]
pub fn busy(code: ErrorCode, detail: String) -> ApiError {
    let mut e = ApiError::new(code, detail);
    e.retry_after_s = Some(1);
    e
}

/// The refusal of a request over its key's share.
#[must_use]
pub fn too_many_requests(max: usize) -> ApiError {
    busy(
        ErrorCode::TooManyConcurrentRequests,
        format!("this API key has {max} requests in progress (max_concurrent_requests_per_key)"),
    )
}

/// The response, or 503 `request_timed_out` when it takes over `limit` (dropping the handler:
/// a database transaction in it rolls back). An event stream returns its head at once, so its
/// body is not bound by this.
pub async fn within(limit: Duration, response: impl Future<Output = Response>) -> Response {
    match tokio::time::timeout(limit, response).await {
        Ok(response) => response,
        Err(_) => {
            metrics::counter!("concord_http_requests_timed_out_total").increment(1);
            axum::response::IntoResponse::into_response(busy(
                ErrorCode::RequestTimedOut,
                format!("the request took over {} ms (request_timeout_ms)", limit.as_millis()),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_its_share_and_no_entry_outlives_its_requests() {
        let slots = KeySlots::new(2);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let first = slots.try_take(a).unwrap();
        let second = slots.try_take(a).unwrap();
        assert!(slots.try_take(a).is_none(), "a third request of a is refused");
        let other = slots.try_take(b).expect("another key has its own share");
        drop(first);
        let third = slots.try_take(a).expect("a slot came back");
        drop((second, third, other));
        assert_eq!(slots.keys_busy(), 0);
    }

    #[tokio::test]
    async fn a_request_over_its_time_is_answered_503_and_dropped() {
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        struct Flag(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let flag = Flag(dropped.clone());
        let slow = async move {
            let _flag = flag;
            tokio::time::sleep(Duration::from_secs(30)).await;
            axum::response::IntoResponse::into_response("late")
        };
        let r = within(Duration::from_millis(50), slow).await;
        assert_eq!(r.status(), 503);
        assert!(
            dropped.load(std::sync::atomic::Ordering::SeqCst),
            "the handler was dropped"
        );
        let fast = async { axum::response::IntoResponse::into_response("ok") };
        assert_eq!(within(Duration::from_millis(50), fast).await.status(), 200);
    }
}
