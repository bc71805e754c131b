//! Planning a group of appends against the current state of their streams.
//!
//! Both database adapters run the same steps inside one transaction that holds the log's write
//! lock: read the heads of the batch's streams and any already-stored event ids, call
//! [`plan_batch`], write what it says. Keeping the decisions here means the rules (expected
//! version, idempotent re-append, conflicts) are the same on every database.

use crate::domain::{AppendOutcome, AppendRequest, StreamName};
use crate::ports::StoreError;
use std::collections::HashMap;
use uuid::Uuid;

/// Where an already-stored event sits, and what it holds (a re-sent append replays only when its
/// events are the same).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredId {
    pub stream: StreamName,
    pub version: u64,
    pub position: u64,
    pub event_type: String,
    pub data: serde_json::Value,
    pub metadata: serde_json::Value,
}

/// What to do with one request of the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Write the request's events with versions `first_version..` and positions `first_position..`.
    Write { first_version: u64, first_position: u64 },
    /// The same events are already stored: answer the original outcome, write nothing.
    Replay(AppendOutcome),
    /// Refuse the request, write nothing.
    Reject(StoreError),
}

impl Plan {
    /// The outcome the caller gets once the batch commits.
    ///
    /// # Errors
    /// The rejection, for a rejected request.
    pub fn outcome(&self, request: &AppendRequest) -> Result<AppendOutcome, StoreError> {
        match self {
            Self::Write {
                first_version,
                first_position,
            } => {
                let n = request.events.len() as u64;
                Ok(AppendOutcome {
                    first_version: *first_version,
                    last_version: first_version + n - 1,
                    position: first_position + n - 1,
                })
            }
            Self::Replay(o) => Ok(*o),
            Self::Reject(e) => Err(e.clone()),
        }
    }
}

/// Decides every request of a batch, in order, as if they ran one after another.
///
/// `heads` holds the current version of each stream of the batch (absent: 0), `stored` the
/// location of each event id of the batch that is already in the store, and `last_position` the
/// log's last position. Later requests see the effects of earlier ones in the same batch.
#[must_use]
pub fn plan_batch(
    requests: &[AppendRequest],
    heads: &HashMap<StreamName, u64>,
    stored: &HashMap<Uuid, StoredId>,
    last_position: u64,
) -> Vec<Plan> {
    let mut heads = heads.clone();
    let mut stored = stored.clone();
    let mut next_position = last_position + 1;
    let mut plans = Vec::with_capacity(requests.len());
    for req in requests {
        let plan = plan_one(req, &heads, &stored, next_position);
        if let Plan::Write {
            first_version,
            first_position,
        } = plan
        {
            for (i, e) in req.events.iter().enumerate() {
                stored.insert(
                    e.id,
                    StoredId {
                        stream: req.stream.clone(),
                        version: first_version + i as u64,
                        position: first_position + i as u64,
                        event_type: e.event_type.as_str().to_owned(),
                        data: e.data.clone(),
                        metadata: e.metadata.clone(),
                    },
                );
            }
            let n = req.events.len() as u64;
            heads.insert(req.stream.clone(), first_version + n - 1);
            next_position += n;
        }
        plans.push(plan);
    }
    plans
}

fn plan_one(
    req: &AppendRequest,
    heads: &HashMap<StreamName, u64>,
    stored: &HashMap<Uuid, StoredId>,
    next_position: u64,
) -> Plan {
    if let Some(plan) = replay_or_conflict(req, stored) {
        return plan;
    }
    let current = heads.get(&req.stream).copied().unwrap_or(0);
    if !req.expected.admits(current) {
        return Plan::Reject(StoreError::WrongExpectedVersion {
            stream: req.stream.to_string(),
            expected: req.expected,
            current,
        });
    }
    Plan::Write {
        first_version: current + 1,
        first_position: next_position,
    }
}

/// A request whose ids are all stored, as this same append (same stream, consecutive versions in
/// the same order, the same type, data and metadata), is a retry: replay it. Any other overlap
/// with stored ids is a conflict: an id names one event, and another event under it is refused.
fn replay_or_conflict(req: &AppendRequest, stored: &HashMap<Uuid, StoredId>) -> Option<Plan> {
    let found: Vec<Option<&StoredId>> = req.events.iter().map(|e| stored.get(&e.id)).collect();
    if found.iter().all(Option::is_none) {
        return None;
    }
    let conflict = |i: usize| Plan::Reject(StoreError::EventIdConflict(req.events[i].id));
    let Some(first) = found[0] else {
        return Some(conflict(found.iter().position(Option::is_some).unwrap_or(0)));
    };
    for (i, f) in found.iter().enumerate() {
        match f {
            Some(s)
                if s.stream == req.stream
                    && s.version == first.version + i as u64
                    && s.event_type == req.events[i].event_type.as_str()
                    && s.data == req.events[i].data
                    && s.metadata == req.events[i].metadata => {}
            _ => return Some(conflict(i)),
        }
    }
    let last = found[found.len() - 1].unwrap_or(first);
    Some(Plan::Replay(AppendOutcome {
        first_version: first.version,
        last_version: last.version,
        position: last.position,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::UncheckedEvent;
    use crate::domain::{ExpectedVersion, Limits};
    use serde_json::json;

    fn req(stream: &str, expected: ExpectedVersion, ids: &[u128]) -> AppendRequest {
        let events = ids
            .iter()
            .map(|id| UncheckedEvent {
                id: Some(Uuid::from_u128(*id)),
                event_type: "E".into(),
                data: json!({}),
                metadata: None,
            })
            .collect();
        AppendRequest::new(StreamName::parse(stream).unwrap(), expected, events, &Limits::default()).unwrap()
    }

    fn outcomes(reqs: &[AppendRequest], plans: &[Plan]) -> Vec<Result<AppendOutcome, StoreError>> {
        reqs.iter().zip(plans).map(|(r, p)| p.outcome(r)).collect()
    }

    #[test]
    fn given_an_empty_log_when_two_streams_append_then_positions_are_consecutive() {
        let reqs = [
            req("a-1", ExpectedVersion::NoStream, &[1, 2]),
            req("b-1", ExpectedVersion::Any, &[3]),
            req("a-1", ExpectedVersion::Exact(2), &[4]),
        ];
        let plans = plan_batch(&reqs, &HashMap::new(), &HashMap::new(), 10);
        let o = outcomes(&reqs, &plans);
        assert_eq!(
            o,
            vec![
                Ok(AppendOutcome {
                    first_version: 1,
                    last_version: 2,
                    position: 12
                }),
                Ok(AppendOutcome {
                    first_version: 1,
                    last_version: 1,
                    position: 13
                }),
                Ok(AppendOutcome {
                    first_version: 3,
                    last_version: 3,
                    position: 14
                }),
            ]
        );
    }

    #[test]
    fn given_a_stream_at_3_when_expecting_2_then_only_that_request_is_rejected() {
        let heads = HashMap::from([(StreamName::parse("a-1").unwrap(), 3)]);
        let reqs = [
            req("a-1", ExpectedVersion::Exact(2), &[1]),
            req("a-1", ExpectedVersion::Exact(3), &[2]),
            req("a-1", ExpectedVersion::NoStream, &[3]),
        ];
        let plans = plan_batch(&reqs, &heads, &HashMap::new(), 5);
        assert!(matches!(
            &plans[0],
            Plan::Reject(StoreError::WrongExpectedVersion { current: 3, .. })
        ));
        assert_eq!(
            plans[1],
            Plan::Write {
                first_version: 4,
                first_position: 6
            }
        );
        assert!(matches!(
            &plans[2],
            Plan::Reject(StoreError::WrongExpectedVersion { current: 4, .. })
        ));
    }

    #[test]
    fn given_stored_events_when_the_same_append_is_resent_then_it_replays() {
        let first = req("a-1", ExpectedVersion::NoStream, &[1, 2]);
        let retry = req("a-1", ExpectedVersion::NoStream, &[1, 2]);
        let plans = plan_batch(&[first.clone(), retry.clone()], &HashMap::new(), &HashMap::new(), 0);
        assert_eq!(
            plans[1],
            Plan::Replay(AppendOutcome {
                first_version: 1,
                last_version: 2,
                position: 2
            })
        );
    }

    #[test]
    fn given_stored_ids_when_they_are_reused_differently_then_it_conflicts() {
        let stored = HashMap::from([(
            Uuid::from_u128(1),
            StoredId {
                stream: StreamName::parse("a-1").unwrap(),
                version: 1,
                position: 1,
                event_type: "E".into(),
                data: json!({}),
                metadata: json!({}),
            },
        )]);
        let heads = HashMap::from([(StreamName::parse("a-1").unwrap(), 1)]);
        let same = req("a-1", ExpectedVersion::Any, &[1]);
        assert!(matches!(
            plan_batch(std::slice::from_ref(&same), &heads, &stored, 1)[0],
            Plan::Replay(_)
        ));
        let mut other_data = same.clone();
        other_data.events[0].data = json!({"amount": 100});
        let mut other_type = same.clone();
        other_type.events[0].event_type = crate::domain::EventType::parse("F").unwrap();
        let mut other_meta = same.clone();
        other_meta.events[0].metadata = json!({"correlation_id": "c-2"});
        for r in [
            req("b-1", ExpectedVersion::Any, &[1]),    // other stream
            req("a-1", ExpectedVersion::Any, &[1, 9]), // partly new
            req("a-1", ExpectedVersion::Any, &[9, 1]), // new id first
            other_data,                                // the same id, another event
            other_type,
            other_meta,
        ] {
            let plans = plan_batch(std::slice::from_ref(&r), &heads, &stored, 1);
            assert!(
                matches!(plans[0], Plan::Reject(StoreError::EventIdConflict(_))),
                "{r:?}"
            );
        }
    }
}
