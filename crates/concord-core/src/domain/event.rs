//! Events: what a writer sends, what the store records, and the append's expected version.

use super::{Limits, StreamName, ValidationError};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::HashSet;
use uuid::Uuid;

/// The longest event type accepted, in bytes.
pub const MAX_EVENT_TYPE_LEN: usize = 200;

/// An event type: 1 to 200 ASCII letters, digits and `-_.:/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventType(String);

impl EventType {
    /// # Errors
    /// [`ValidationError::EventType`] when empty, too long or outside the alphabet.
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        if raw.is_empty() || raw.len() > MAX_EVENT_TYPE_LEN {
            return Err(ValidationError::EventType(format!(
                "must be 1 to {MAX_EVENT_TYPE_LEN} characters"
            )));
        }
        if let Some(bad) = raw
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/')))
        {
            return Err(ValidationError::EventType(format!(
                "character {bad:?} is not allowed (letters, digits and -_.:/ only)"
            )));
        }
        Ok(Self(raw.to_owned()))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

pub use concord_kernel::{ExpectedVersion, InvalidExpectedVersion};

impl From<InvalidExpectedVersion> for ValidationError {
    fn from(e: InvalidExpectedVersion) -> Self {
        Self::ExpectedVersion(e.0)
    }
}

/// An event to append; its size has been checked against the limits.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub id: Uuid,
    pub event_type: EventType,
    pub data: Value,
    /// Always a JSON object; keeps `correlation_id` and `causation_id` among others.
    pub metadata: Value,
}

/// A validated append: non-empty, within the limits, event ids unique within it.
#[derive(Debug, Clone, PartialEq)]
pub struct AppendRequest {
    pub stream: StreamName,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
}

/// An event as the caller sends it, before validation.
#[derive(Debug, Clone)]
pub struct UncheckedEvent {
    pub id: Option<Uuid>,
    pub event_type: String,
    pub data: Value,
    pub metadata: Option<Value>,
}

impl AppendRequest {
    /// Validates an append against the limits; ids default to fresh UUIDv7s.
    ///
    /// # Errors
    /// The first rule the request breaks.
    pub fn new(
        stream: StreamName,
        expected: ExpectedVersion,
        events: Vec<UncheckedEvent>,
        limits: &Limits,
    ) -> Result<Self, ValidationError> {
        if events.is_empty() {
            return Err(ValidationError::EmptyAppend);
        }
        if events.len() > limits.max_events_per_append {
            return Err(ValidationError::BatchTooLarge {
                count: events.len(),
                limit: limits.max_events_per_append,
            });
        }
        let mut seen = HashSet::with_capacity(events.len());
        let mut checked = Vec::with_capacity(events.len());
        for (index, e) in events.into_iter().enumerate() {
            let event_type = EventType::parse(&e.event_type)?;
            let metadata = match e.metadata {
                None | Some(Value::Null) => Value::Object(serde_json::Map::new()),
                Some(m @ Value::Object(_)) => m,
                Some(_) => return Err(ValidationError::Metadata(index)),
            };
            let (data_json, meta_json) = (json_text(&e.data), json_text(&metadata));
            // PostgreSQL's jsonb cannot hold U+0000; refusing it here keeps the two stores alike
            // and keeps one caller's value from failing a whole group commit.
            if data_json.contains("\\u0000") || meta_json.contains("\\u0000") {
                return Err(ValidationError::NulCharacter(index));
            }
            let size = data_json.len() + meta_json.len();
            if size > limits.max_event_bytes {
                return Err(ValidationError::EventTooLarge {
                    index,
                    size,
                    limit: limits.max_event_bytes,
                });
            }
            let id = e.id.unwrap_or_else(Uuid::now_v7);
            if !seen.insert(id) {
                return Err(ValidationError::DuplicateEventId(id));
            }
            checked.push(NewEvent {
                id,
                event_type,
                data: e.data,
                metadata,
            });
        }
        Ok(Self {
            stream,
            expected,
            events: checked,
        })
    }
}

fn json_text(v: &Value) -> String {
    // Serializing a Value cannot fail; this text is what the store will hold.
    v.to_string()
}

/// What an append did: the versions its events took and the global position of the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    pub first_version: u64,
    pub last_version: u64,
    pub position: u64,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    pub id: Uuid,
    pub stream: StreamName,
    pub version: u64,
    pub position: u64,
    pub event_type: String,
    pub data: Value,
    pub metadata: Value,
    pub recorded_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(data: Value) -> UncheckedEvent {
        UncheckedEvent {
            id: None,
            event_type: "Happened".into(),
            data,
            metadata: None,
        }
    }

    fn stream() -> StreamName {
        StreamName::parse("s-1").unwrap()
    }

    #[test]
    fn expected_version_parses_every_contract_form() {
        assert_eq!(ExpectedVersion::from_json(None), Ok(ExpectedVersion::Any));
        assert_eq!(
            ExpectedVersion::from_json(Some(&json!("any"))),
            Ok(ExpectedVersion::Any)
        );
        assert_eq!(
            ExpectedVersion::from_json(Some(&json!("no_stream"))),
            Ok(ExpectedVersion::NoStream)
        );
        assert_eq!(
            ExpectedVersion::from_json(Some(&json!("exists"))),
            Ok(ExpectedVersion::Exists)
        );
        assert_eq!(
            ExpectedVersion::from_json(Some(&json!(7))),
            Ok(ExpectedVersion::Exact(7))
        );
        for bad in [
            json!(-1),
            json!(1.5),
            json!("latest"),
            json!([1]),
            json!(true),
            json!("7x"),
        ] {
            assert!(ExpectedVersion::from_json(Some(&bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn expected_version_admits_only_matching_streams() {
        assert!(ExpectedVersion::NoStream.admits(0));
        assert!(!ExpectedVersion::NoStream.admits(1));
        assert!(ExpectedVersion::Exists.admits(3));
        assert!(!ExpectedVersion::Exists.admits(0));
        assert!(ExpectedVersion::Exact(3).admits(3));
        assert!(!ExpectedVersion::Exact(3).admits(2));
        assert!(ExpectedVersion::Any.admits(0));
    }

    #[test]
    fn append_rejects_what_breaks_a_limit() {
        let limits = Limits {
            max_event_bytes: 20,
            max_events_per_append: 2,
            max_read_limit: 10,
        };
        let any = ExpectedVersion::Any;
        assert_eq!(
            AppendRequest::new(stream(), any, vec![], &limits),
            Err(ValidationError::EmptyAppend)
        );
        assert!(matches!(
            AppendRequest::new(stream(), any, vec![ev(json!(1)); 3], &limits),
            Err(ValidationError::BatchTooLarge { count: 3, limit: 2 })
        ));
        assert!(matches!(
            AppendRequest::new(stream(), any, vec![ev(json!("x".repeat(30)))], &limits),
            Err(ValidationError::EventTooLarge { index: 0, .. })
        ));
        let mut bad_meta = ev(json!(1));
        bad_meta.metadata = Some(json!([1]));
        assert_eq!(
            AppendRequest::new(stream(), any, vec![bad_meta], &limits),
            Err(ValidationError::Metadata(0))
        );
        let id = Uuid::now_v7();
        let mut a = ev(json!(1));
        a.id = Some(id);
        let b = a.clone();
        assert_eq!(
            AppendRequest::new(stream(), any, vec![a, b], &limits),
            Err(ValidationError::DuplicateEventId(id))
        );
        assert_eq!(
            AppendRequest::new(stream(), any, vec![ev(json!({"x": "a\u{0}b"}))], &limits),
            Err(ValidationError::NulCharacter(0))
        );
        let mut bad_type = ev(json!(1));
        bad_type.event_type = "has space".into();
        assert!(matches!(
            AppendRequest::new(stream(), any, vec![bad_type], &limits),
            Err(ValidationError::EventType(_))
        ));
        assert!(AppendRequest::new(stream(), any, vec![ev(json!(1)), ev(json!(2))], &limits).is_ok());
    }
}
