//! Two-phase commit, the coordinator's side: pure. The state is a fold of the transaction's log
//! (`tx-{xid}`); [`next_step`] says what the coordinator does next. The decision is an event of
//! the log, so it is durable before any phase-2 message is sent, and once logged it never changes.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use concord_kernel::{InvalidXid, Xid};

/// A request rejected at the edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    #[error("invalid participant name: {0}")]
    Name(String),
    #[error("participant name {0} appears twice")]
    DuplicateName(String),
    #[error("participant {name}: invalid url {url}: must be http:// or https:// with a host")]
    Url { name: String, url: String },
    /// The URL is well formed but the outbound policy does not allow it.
    #[error("participant {name}: {url} may not be called: {reason}")]
    Refused { name: String, url: String, reason: String },
    #[error("{0}")]
    Limit(String),
}

/// Limits of a transaction request, all configurable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxLimits {
    pub max_participants: usize,
    pub max_payload_bytes: usize,
    pub max_timeout_ms: u64,
}

impl Default for TxLimits {
    fn default() -> Self {
        Self {
            max_participants: 16,
            max_payload_bytes: 64 * 1024,
            max_timeout_ms: 60_000,
        }
    }
}

/// One participant of a transaction: where it listens and what it is asked to prepare.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TxParticipant {
    pub name: String,
    /// Base URL; phase 1 posts to `{url}/prepare`, phase 2 to `{url}/commit` or `{url}/abort`.
    pub url: String,
    #[serde(default)]
    pub payload: Value,
}

/// Checks a request: 1 to `max_participants` participants with unique names (1–64 of
/// `[A-Za-z0-9_.-]`), `http(s)` URLs, payloads and timeout within limits.
///
/// # Errors
/// The first problem found.
pub fn validate(participants: &[TxParticipant], timeout_ms: u64, limits: &TxLimits) -> Result<(), TxError> {
    if participants.is_empty() || participants.len() > limits.max_participants {
        return Err(TxError::Limit(format!(
            "a transaction has 1 to {} participants",
            limits.max_participants
        )));
    }
    if timeout_ms == 0 || timeout_ms > limits.max_timeout_ms {
        return Err(TxError::Limit(format!(
            "timeout_ms must be 1 to {}",
            limits.max_timeout_ms
        )));
    }
    for (i, p) in participants.iter().enumerate() {
        let ok_name = !p.name.is_empty()
            && p.name.len() <= 64
            && p.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !ok_name {
            return Err(TxError::Name(p.name.clone()));
        }
        if participants[..i].iter().any(|q| q.name == p.name) {
            return Err(TxError::DuplicateName(p.name.clone()));
        }
        let rest = p.url.strip_prefix("http://").or_else(|| p.url.strip_prefix("https://"));
        let host_ok = rest.is_some_and(|r| !r.split(['/', '?', '#']).next().unwrap_or("").is_empty());
        if !host_ok || p.url.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
            return Err(TxError::Url {
                name: p.name.clone(),
                url: p.url.clone(),
            });
        }
        let size = serde_json::to_vec(&p.payload).map_or(usize::MAX, |v| v.len());
        if size > limits.max_payload_bytes {
            return Err(TxError::Limit(format!(
                "participant {}: payload is {size} bytes, over the limit of {}",
                p.name, limits.max_payload_bytes
            )));
        }
    }
    Ok(())
}

/// A participant's answer to prepare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Vote {
    Commit,
    Abort,
}

/// The decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Committed,
    Aborted,
}

impl Outcome {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Committed => "committed",
            Self::Aborted => "aborted",
        }
    }

    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "committed" => Some(Self::Committed),
            "aborted" => Some(Self::Aborted),
            _ => None,
        }
    }

    /// The phase-2 path: `commit` or `abort`.
    #[must_use]
    pub fn phase2_path(self) -> &'static str {
        match self {
            Self::Committed => "commit",
            Self::Aborted => "abort",
        }
    }
}

/// One entry of a transaction's log, stored as an event of the stream `tx-{xid}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "PascalCase")]
pub enum TxEvent {
    TxStarted {
        participants: Vec<TxParticipant>,
        timeout_ms: u64,
        at: DateTime<Utc>,
    },
    /// The decision, with the votes it was made from (none: no answer in time).
    TxDecided {
        outcome: Outcome,
        votes: Vec<Option<Vote>>,
        reason: String,
        at: DateTime<Utc>,
    },
    /// These participants (indexes) acknowledged phase 2.
    TxAcknowledged {
        participants: Vec<usize>,
        at: DateTime<Utc>,
    },
    /// Every participant acknowledged.
    TxCompleted { at: DateTime<Utc> },
}

impl TxEvent {
    #[must_use]
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::TxStarted { .. } => "TxStarted",
            Self::TxDecided { .. } => "TxDecided",
            Self::TxAcknowledged { .. } => "TxAcknowledged",
            Self::TxCompleted { .. } => "TxCompleted",
        }
    }
}

/// A log that cannot be: the transaction stops for an operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("transaction log inconsistent: {0}")]
pub struct TxLogError(pub String);

/// A transaction as its log tells it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TxState {
    pub xid: Xid,
    pub participants: Vec<TxParticipant>,
    pub timeout_ms: u64,
    pub started_at: DateTime<Utc>,
    pub votes: Vec<Option<Vote>>,
    pub decision: Option<Outcome>,
    pub reason: Option<String>,
    pub decided_at: Option<DateTime<Utc>>,
    pub acked: Vec<Option<DateTime<Utc>>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub log_version: u64,
}

impl TxState {
    /// Folds a whole log.
    ///
    /// # Errors
    /// A log that does not start with `TxStarted` or breaks the protocol.
    pub fn from_log(xid: &Xid, events: &[TxEvent]) -> Result<Self, TxLogError> {
        let Some(TxEvent::TxStarted {
            participants,
            timeout_ms,
            at,
        }) = events.first()
        else {
            return Err(TxLogError("the log does not start with TxStarted".into()));
        };
        let mut s = Self::new(xid, participants.clone(), *timeout_ms, *at);
        for e in &events[1..] {
            s.apply(e)?;
        }
        Ok(s)
    }

    /// The state right after `TxStarted`.
    #[must_use]
    pub fn new(xid: &Xid, participants: Vec<TxParticipant>, timeout_ms: u64, at: DateTime<Utc>) -> Self {
        let n = participants.len();
        Self {
            xid: xid.clone(),
            participants,
            timeout_ms,
            started_at: at,
            votes: vec![None; n],
            decision: None,
            reason: None,
            decided_at: None,
            acked: vec![None; n],
            completed_at: None,
            log_version: 1,
        }
    }

    /// When prepare answers stop counting.
    #[must_use]
    pub fn deadline(&self) -> DateTime<Utc> {
        self.started_at + chrono::Duration::milliseconds(i64::try_from(self.timeout_ms).unwrap_or(i64::MAX))
    }

    /// Folds one event in.
    ///
    /// # Errors
    /// An event that cannot happen now; above all a second, different decision.
    pub fn apply(&mut self, e: &TxEvent) -> Result<(), TxLogError> {
        match e {
            TxEvent::TxStarted { .. } => return Err(TxLogError("TxStarted twice".into())),
            TxEvent::TxDecided {
                outcome,
                votes,
                reason,
                at,
            } => {
                if self.decision.is_some() {
                    return Err(TxLogError("a second decision".into()));
                }
                if votes.len() != self.participants.len() {
                    return Err(TxLogError("votes do not match the participants".into()));
                }
                if *outcome == Outcome::Committed && votes.iter().any(|v| *v != Some(Vote::Commit)) {
                    return Err(TxLogError("commit without every vote".into()));
                }
                self.decision = Some(*outcome);
                self.votes.clone_from(votes);
                self.reason = Some(reason.clone());
                self.decided_at = Some(*at);
            }
            TxEvent::TxAcknowledged { participants, at } => {
                if self.decision.is_none() {
                    return Err(TxLogError("an acknowledgement before the decision".into()));
                }
                for &i in participants {
                    let slot = self
                        .acked
                        .get_mut(i)
                        .ok_or_else(|| TxLogError(format!("participant {i} is not in the transaction")))?;
                    slot.get_or_insert(*at);
                }
            }
            TxEvent::TxCompleted { at } => {
                if self.decision.is_none() || self.acked.iter().any(Option::is_none) {
                    return Err(TxLogError("completed before every acknowledgement".into()));
                }
                self.completed_at = Some(*at);
            }
        }
        self.log_version += 1;
        Ok(())
    }

    /// Participants still owed the phase-2 message.
    #[must_use]
    pub fn unacknowledged(&self) -> Vec<usize> {
        (0..self.participants.len())
            .filter(|&i| self.acked[i].is_none())
            .collect()
    }
}

/// The decision the votes make: any abort (or a deadline passed with answers missing) aborts,
/// only every participant's commit commits, otherwise none yet.
#[must_use]
pub fn decide(votes: &[Option<Vote>], deadline_passed: bool) -> Option<Outcome> {
    if votes.contains(&Some(Vote::Abort)) {
        Some(Outcome::Aborted)
    } else if votes.iter().all(|v| *v == Some(Vote::Commit)) {
        Some(Outcome::Committed)
    } else if deadline_passed {
        Some(Outcome::Aborted)
    } else {
        None
    }
}

/// What the coordinator does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxStep {
    /// No decision and the coordinator that ran phase 1 is gone (or its deadline passed):
    /// abort is the only safe decision, since no participant can have been told to commit.
    PresumeAbort,
    /// Send the phase-2 message for `outcome` to these participants.
    Deliver(Outcome, Vec<usize>),
    /// Every participant acknowledged: record completion.
    Complete,
    /// Nothing more.
    Done,
}

/// The next step for a transaction found in the work queue (by a restarted or another node).
#[must_use]
pub fn next_step(state: &TxState) -> TxStep {
    match state.decision {
        None => TxStep::PresumeAbort,
        Some(_) if state.completed_at.is_some() => TxStep::Done,
        Some(outcome) => {
            let owed = state.unacknowledged();
            if owed.is_empty() {
                TxStep::Complete
            } else {
                TxStep::Deliver(outcome, owed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn xid(x: &str) -> Xid {
        Xid::parse(x).unwrap()
    }

    fn parts(n: usize) -> Vec<TxParticipant> {
        (0..n)
            .map(|i| TxParticipant {
                name: format!("p{i}"),
                url: format!("http://svc{i}:8080"),
                payload: json!({"amount": 10}),
            })
            .collect()
    }

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    #[test]
    fn requests_are_validated() {
        let l = TxLimits::default();
        assert!(validate(&parts(2), 1000, &l).is_ok());
        assert!(matches!(validate(&[], 1000, &l), Err(TxError::Limit(_))));
        assert!(matches!(validate(&parts(17), 1000, &l), Err(TxError::Limit(_))));
        assert!(matches!(validate(&parts(2), 0, &l), Err(TxError::Limit(_))));
        let mut dup = parts(2);
        dup[1].name = "p0".into();
        assert!(matches!(validate(&dup, 1000, &l), Err(TxError::DuplicateName(_))));
        let mut bad = parts(1);
        bad[0].url = "ftp://x".into();
        assert!(matches!(validate(&bad, 1000, &l), Err(TxError::Url { .. })));
        bad[0].url = "http://".into();
        assert!(matches!(validate(&bad, 1000, &l), Err(TxError::Url { .. })));
        let mut big = parts(1);
        big[0].payload = json!("x".repeat(70_000));
        assert!(matches!(validate(&big, 1000, &l), Err(TxError::Limit(_))));
        let mut name = parts(1);
        name[0].name = "a b".into();
        assert!(matches!(validate(&name, 1000, &l), Err(TxError::Name(_))));
    }

    #[test]
    fn given_votes_then_the_decision_is_unanimous_commit_or_abort() {
        use Vote::{Abort, Commit};
        assert_eq!(decide(&[Some(Commit), Some(Commit)], false), Some(Outcome::Committed));
        assert_eq!(decide(&[Some(Commit), Some(Abort)], false), Some(Outcome::Aborted));
        assert_eq!(decide(&[Some(Abort), None], false), Some(Outcome::Aborted));
        assert_eq!(decide(&[Some(Commit), None], false), None);
        assert_eq!(decide(&[Some(Commit), None], true), Some(Outcome::Aborted));
        // A late full set of commits after the deadline still commits: nobody was told otherwise.
        assert_eq!(decide(&[Some(Commit), Some(Commit)], true), Some(Outcome::Committed));
    }

    #[test]
    fn given_a_logged_decision_when_recovering_then_phase_two_goes_to_those_not_acknowledged() {
        let started = TxEvent::TxStarted {
            participants: parts(3),
            timeout_ms: 1000,
            at: t0(),
        };
        let mut s = TxState::from_log(&xid("x1"), std::slice::from_ref(&started)).unwrap();
        assert_eq!(next_step(&s), TxStep::PresumeAbort, "no decision: presumed abort");
        let decided = TxEvent::TxDecided {
            outcome: Outcome::Committed,
            votes: vec![Some(Vote::Commit); 3],
            reason: "all voted commit".into(),
            at: t0(),
        };
        s.apply(&decided).unwrap();
        s.apply(&TxEvent::TxAcknowledged {
            participants: vec![1],
            at: t0(),
        })
        .unwrap();
        assert_eq!(next_step(&s), TxStep::Deliver(Outcome::Committed, vec![0, 2]));
        s.apply(&TxEvent::TxAcknowledged {
            participants: vec![0, 2, 1],
            at: t0(),
        })
        .unwrap();
        assert_eq!(next_step(&s), TxStep::Complete);
        s.apply(&TxEvent::TxCompleted { at: t0() }).unwrap();
        assert_eq!(next_step(&s), TxStep::Done);
        assert_eq!(s.log_version, 5);
    }

    #[test]
    fn a_decision_never_changes_once_logged() {
        let started = TxEvent::TxStarted {
            participants: parts(2),
            timeout_ms: 1000,
            at: t0(),
        };
        let abort = TxEvent::TxDecided {
            outcome: Outcome::Aborted,
            votes: vec![None, None],
            reason: "timeout".into(),
            at: t0(),
        };
        let commit = TxEvent::TxDecided {
            outcome: Outcome::Committed,
            votes: vec![Some(Vote::Commit); 2],
            reason: "all voted commit".into(),
            at: t0(),
        };
        assert!(TxState::from_log(&xid("x"), &[started.clone(), abort, commit.clone()]).is_err());
        let half = TxEvent::TxDecided {
            outcome: Outcome::Committed,
            votes: vec![Some(Vote::Commit), None],
            reason: "bug".into(),
            at: t0(),
        };
        assert!(
            TxState::from_log(&xid("x"), &[started.clone(), half]).is_err(),
            "commit needs every vote"
        );
        let early = TxEvent::TxCompleted { at: t0() };
        assert!(TxState::from_log(&xid("x"), &[started.clone(), commit, early]).is_err());
        assert!(TxState::from_log(&xid("x"), &[]).is_err());
    }

    #[test]
    fn events_round_trip_through_json() {
        let e = TxEvent::TxDecided {
            outcome: Outcome::Aborted,
            votes: vec![Some(Vote::Commit), Some(Vote::Abort), None],
            reason: "p1 voted abort".into(),
            at: t0(),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "TxDecided");
        assert_eq!(v["outcome"], "aborted");
        assert_eq!(serde_json::from_value::<TxEvent>(v).unwrap(), e);
    }
}
