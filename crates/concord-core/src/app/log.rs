//! The logs sagas and transactions keep of themselves in the event store (`saga-{id}`,
//! `tx-{xid}`), and the lease arithmetic both workers share.

use crate::domain::event::UncheckedEvent;
use crate::domain::{AppendRequest, ExpectedVersion, Limits, RecordedEvent, StreamName, ValidationError};
use crate::ports::{EventStore, StoreError};
use serde_json::{Value, json};
use std::time::Duration;
use uuid::Uuid;

/// How much longer than a call's timeout a lease must last when the call starts.
pub(crate) const LEASE_MARGIN: Duration = Duration::from_secs(1);

pub(crate) fn chrono_dur(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// Why a log append failed.
pub(crate) enum AppendError {
    Invalid(ValidationError),
    Store(StoreError),
}

/// Appends `entries` (event type, data) after version `after` (0: the log must not exist yet),
/// so a writer that is not at the log's head records nothing. Each event names the node; the
/// first may carry the `traceparent` that started the work, for recovery.
pub(crate) async fn append(
    store: &dyn EventStore,
    stream: StreamName,
    after: u64,
    entries: Vec<(&'static str, Value)>,
    node: Uuid,
    trace: Option<&str>,
    limits: &Limits,
) -> Result<(), AppendError> {
    let mut meta = json!({"node": node.to_string()});
    if let Some(t) = trace {
        meta["traceparent"] = Value::String(t.to_owned());
    }
    let events = entries
        .into_iter()
        .map(|(event_type, data)| UncheckedEvent {
            id: None,
            event_type: event_type.to_owned(),
            data,
            metadata: Some(meta.clone()),
        })
        .collect();
    let expected = if after == 0 {
        ExpectedVersion::NoStream
    } else {
        ExpectedVersion::Exact(after)
    };
    let request = AppendRequest::new(stream, expected, events, limits).map_err(AppendError::Invalid)?;
    store.append(request).await.map_err(AppendError::Store)?;
    Ok(())
}

/// Every event of a log, in order; none when the log does not exist.
pub(crate) async fn read_all(
    store: &dyn EventStore,
    stream: &StreamName,
) -> Result<Option<Vec<RecordedEvent>>, StoreError> {
    const PAGE: usize = 1000;
    let mut events = Vec::new();
    loop {
        let from = events.last().map_or(1, |e: &RecordedEvent| e.version + 1);
        let page = match store.read_stream(stream, from, PAGE, usize::MAX).await {
            Ok(p) => p,
            Err(StoreError::StreamNotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let full = page.len() == PAGE;
        events.extend(page);
        if !full {
            return Ok(Some(events));
        }
    }
}
