//! The two-phase-commit coordinator: begin (phase 1 and the durable decision), deliver phase 2
//! until every participant acknowledged, recover after a crash, answer the outcome.
//!
//! The log `tx-{xid}` is the truth and names every participant before any is asked to prepare;
//! the decision is appended with the log version it expects, so exactly one decision is ever
//! logged even when a recovering node and a slow coordinator race. No phase-2 message goes out
//! before the decision is in the log, nor under a lease that may run out before the round ends;
//! the row learns the decision with the lease renewed, or else with the round's result.

use crate::app::log::{self, AppendError, LEASE_MARGIN, chrono_dur};
use crate::domain::outbound::OutboundPolicy;
use crate::domain::tx::{
    Outcome, TxEvent, TxLimits, TxLogError, TxParticipant, TxState, TxStep, Vote, Xid, decide, next_step, validate,
};
use crate::domain::{Limits, StreamName, ValidationError};
use crate::ports::{EventStore, StoreError, TxRow, TxStore, TxUpdate};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument as _;
use uuid::Uuid;

/// A participant's answer to prepare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrepareAnswer {
    Commit,
    /// It voted abort (409, or another refusal).
    Abort(String),
    /// No answer before the deadline (timeouts, 5xx, connection errors).
    Silent(String),
}

/// Sends the protocol's messages to participants.
#[async_trait]
pub trait TxParticipants: Send + Sync + 'static {
    /// Asks to prepare, retrying transient failures until `deadline`.
    async fn prepare(&self, xid: &Xid, participant: &TxParticipant, deadline: DateTime<Utc>) -> PrepareAnswer;
    /// Sends the phase-2 message once; true when acknowledged.
    async fn finish(&self, xid: &Xid, participant: &TxParticipant, outcome: Outcome) -> bool;
}

/// What can go wrong for a caller of the coordinator.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TxFailure {
    #[error(transparent)]
    Invalid(#[from] crate::domain::tx::TxError),
    #[error(transparent)]
    Log(#[from] TxLogError),
    #[error(transparent)]
    Validation(#[from] ValidationError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<AppendError> for TxFailure {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::Invalid(v) => v.into(),
            AppendError::Store(s) => s.into(),
        }
    }
}

/// Settings of the coordinator, all configurable.
#[derive(Debug, Clone, PartialEq)]
pub struct TxConfig {
    /// How long a node holds a transaction before another may take it over.
    pub lease: Duration,
    pub limits: TxLimits,
    pub event_limits: Limits,
    /// First and longest delay between phase-2 rounds for participants that did not acknowledge.
    pub retry_backoff: Duration,
    pub max_retry_backoff: Duration,
    /// The longest a phase-2 message may take: a held transaction whose lease outlasts it (and
    /// a margin) sends a round without renewing the lease first.
    pub phase2_timeout: Duration,
    /// Where participants may be (`tx_allowed_hosts`): checked at begin, and again by the
    /// adapter at every call.
    pub outbound: OutboundPolicy,
}

/// What `begin` came to.
pub struct Begun {
    pub xid: Xid,
    /// The durable decision; none when it could not be confirmed after the transaction was
    /// logged (a store failure): the transaction then finishes through recovery, and
    /// `GET /v1/transactions/{xid}` tells the outcome.
    pub outcome: Option<Outcome>,
    /// Held for phase 2, when this node still holds it.
    pub held: Option<HeldTx>,
}

/// A transaction this node holds.
pub struct HeldTx {
    row: TxRow,
    state: Option<TxState>,
}

impl HeldTx {
    #[must_use]
    pub fn xid(&self) -> &Xid {
        &self.row.xid
    }
}

/// The coordinator over its ports.
pub struct TxCoordinator {
    events: Arc<dyn EventStore>,
    store: Arc<dyn TxStore>,
    participants: Arc<dyn TxParticipants>,
    node: Uuid,
    config: TxConfig,
}

/// How far a drive got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxDriveEnd {
    /// Every participant acknowledged.
    Completed(Outcome),
    /// Some did not; another round is due later.
    Waiting(Outcome),
    /// Another node moved the transaction on.
    Lost,
}

impl TxCoordinator {
    #[must_use]
    pub fn new(
        events: Arc<dyn EventStore>,
        store: Arc<dyn TxStore>,
        participants: Arc<dyn TxParticipants>,
        node: Uuid,
        config: TxConfig,
    ) -> Self {
        Self {
            events,
            store,
            participants,
            node,
            config,
        }
    }

    #[must_use]
    pub fn store(&self) -> &Arc<dyn TxStore> {
        &self.store
    }

    /// Runs phase 1 and logs the decision. Returns the xid, the durable outcome and the held
    /// transaction, ready for [`Self::deliver`] (phase 2).
    ///
    /// # Errors
    /// An invalid request, or the store (nothing was asked of any participant then, unless the
    /// failure came after the start was logged: recovery then aborts it).
    ///
    /// With `xid` (one derived from the caller's `Idempotency-Key`), a transaction already logged
    /// under it is answered as it stands instead of being begun again: a retry after a crash
    /// meets the transaction the first attempt began.
    pub async fn begin(
        &self,
        participants: Vec<TxParticipant>,
        timeout_ms: u64,
        trace: Option<&str>,
        xid: Option<Xid>,
    ) -> Result<Begun, TxFailure> {
        validate(&participants, timeout_ms, &self.config.limits)?;
        self.check_hosts(&participants)?;
        if let Some(xid) = &xid
            && let Some(existing) = self.existing(xid).await?
        {
            return Ok(existing);
        }
        let xid = xid.unwrap_or_else(Xid::generate);
        let now = Utc::now();
        let started = TxEvent::TxStarted {
            participants: participants.clone(),
            timeout_ms,
            at: now,
        };
        // The whole first event must fit in one event before anything is written.
        let size = serde_json::to_vec(&started).map_or(usize::MAX, |v| v.len());
        if size > self.config.event_limits.max_event_bytes {
            return Err(crate::domain::tx::TxError::Limit(format!(
                "the transaction's participants and payloads take {size} bytes, over the limit of {}",
                self.config.event_limits.max_event_bytes
            ))
            .into());
        }
        // Every participant is named durably before any is asked to prepare, so recovery knows
        // whom to tell; the row (the work queue) comes after, so a row always has its log. A log
        // without a row (a crash in between) asked nobody anything.
        if let Err(e) = self.append(&xid, 0, std::slice::from_ref(&started), trace).await {
            // Another attempt with the same derived xid logged it first.
            if let Some(existing) = self.existing(&xid).await? {
                return Ok(existing);
            }
            return Err(e);
        }
        let timeout = Duration::from_millis(timeout_ms);
        let row = TxRow {
            xid: xid.clone(),
            outcome: None,
            pending: true,
            next_run_at: Some(now),
            lease_owner: Some(Uuid::now_v7()),
            // Long enough for phase 1: nobody presumes an abort while it may still be running.
            lease_until: Some(now + chrono_dur(self.config.lease.max(timeout + LEASE_MARGIN))),
            log_version: 1,
            created_at: now,
            updated_at: now,
        };
        self.store.create_tx(&row).await?;
        let state = TxState::new(&xid, participants, timeout_ms, now);
        // From here the transaction exists: a failure no longer fails the request (a retry would
        // start a second transaction); it leaves the outcome to recovery.
        match self.decide_and_record(row, state).await {
            Ok((outcome, held)) => Ok(Begun {
                xid,
                outcome: Some(outcome),
                held,
            }),
            Err(e) => {
                tracing::warn!(tx.xid = %xid, error = %e, "decision not confirmed; recovery finishes the transaction");
                let outcome = self.read_log(&xid).await.ok().flatten().and_then(|s| s.decision);
                Ok(Begun {
                    xid,
                    outcome,
                    held: None,
                })
            }
        }
    }

    /// A transaction already logged under `xid`, as begin answers it.
    async fn existing(&self, xid: &Xid) -> Result<Option<Begun>, TxFailure> {
        Ok(self.read_log(xid).await?.map(|state| Begun {
            xid: xid.clone(),
            outcome: state.decision,
            held: None,
        }))
    }

    fn check_hosts(&self, participants: &[TxParticipant]) -> Result<(), TxFailure> {
        for p in participants {
            if let Err(refused) = self.config.outbound.check(&p.url) {
                return Err(crate::domain::tx::TxError::Refused {
                    name: p.name.clone(),
                    url: p.url.clone(),
                    reason: refused.0,
                }
                .into());
            }
        }
        Ok(())
    }

    /// Phase 1 and the durable decision, in the log and then the row.
    async fn decide_and_record(&self, row: TxRow, mut state: TxState) -> Result<(Outcome, Option<HeldTx>), TxFailure> {
        let xid = row.xid.clone();
        let span = tracing::info_span!("tx.prepare", tx.xid = %xid);
        let deadline = state.deadline();
        let started = Utc::now();
        let answers = futures::future::join_all(
            state
                .participants
                .iter()
                .map(|p| self.participants.prepare(&xid, p, deadline)),
        )
        .instrument(span)
        .await;
        metrics::histogram!("concord_tx_phase_duration_seconds", "phase" => "prepare")
            .record((Utc::now() - started).to_std().unwrap_or_default().as_secs_f64());
        let votes: Vec<Option<Vote>> = answers
            .iter()
            .map(|a| match a {
                PrepareAnswer::Commit => Some(Vote::Commit),
                PrepareAnswer::Abort(_) => Some(Vote::Abort),
                PrepareAnswer::Silent(_) => None,
            })
            .collect();
        let outcome = decide(&votes, true).unwrap_or(Outcome::Aborted);
        let reason = reason_of(&state.participants, &answers, outcome);
        let decided = TxEvent::TxDecided {
            outcome,
            votes,
            reason,
            at: Utc::now(),
        };
        if !self.record(&xid, &mut state, decided).await? {
            // A recovering node decided first (this node was too slow): its decision stands,
            // and that node delivers it.
            let logged = self
                .read_log(&xid)
                .await?
                .ok_or_else(|| TxLogError("log vanished".into()))?;
            let outcome = logged
                .decision
                .ok_or_else(|| TxLogError("log moved on without a decision".into()))?;
            return Ok((outcome, None));
        }
        metrics::counter!("concord_tx_decided_total", "outcome" => outcome.as_str()).increment(1);
        // The decision is durable in the log, which is what recovery and every reader of the
        // outcome go by: the answer need not wait for the row (phase 2 records it there).
        Ok((
            outcome,
            Some(HeldTx {
                row,
                state: Some(state),
            }),
        ))
    }

    /// Takes up to `limit` due transactions: phase-2 rounds that are due, and transactions whose
    /// coordinator died.
    ///
    /// # Errors
    /// The store.
    pub async fn claim(&self, limit: usize) -> Result<Vec<HeldTx>, TxFailure> {
        let now = Utc::now();
        let rows = self
            .store
            .claim_txs(Uuid::now_v7(), now, now + chrono_dur(self.config.lease), limit)
            .await?;
        Ok(rows.into_iter().map(|row| HeldTx { row, state: None }).collect())
    }

    /// The transaction as its log tells it; none when unknown.
    ///
    /// # Errors
    /// The store, or a log that cannot be.
    pub async fn read_log(&self, xid: &Xid) -> Result<Option<TxState>, TxFailure> {
        let Ok(stream) = StreamName::parse(&format!("tx-{xid}")) else {
            return Ok(None);
        };
        let Some(recorded) = log::read_all(self.events.as_ref(), &stream).await? else {
            return Ok(None);
        };
        let events = recorded
            .into_iter()
            .map(|e| {
                serde_json::from_value::<TxEvent>(e.data)
                    .map_err(|err| TxLogError(format!("event {} of {xid}: {err}", e.version)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(TxState::from_log(xid, &events)?))
    }

    /// Phase 2 (and recovery): until every participant acknowledged, or a round left some that
    /// did not (then another round is due later, in the row).
    ///
    /// # Errors
    /// The store, or a log that cannot be.
    pub async fn deliver(&self, held: HeldTx) -> Result<TxDriveEnd, TxFailure> {
        let span = tracing::info_span!("tx.deliver", tx.xid = %held.row.xid);
        self.deliver_inner(held).instrument(span).await
    }

    async fn deliver_inner(&self, held: HeldTx) -> Result<TxDriveEnd, TxFailure> {
        let HeldTx { mut row, state } = held;
        if row.lease_owner.is_none() {
            return Ok(TxDriveEnd::Lost);
        }
        let mut state = match state {
            Some(s) => s,
            None => match self.read_log(&row.xid).await? {
                Some(s) => s,
                // The coordinator died between the row and the log's first event: no participant
                // was asked anything, so the transaction is simply aborted.
                None => {
                    let ok = self
                        .update(&row, Some(Outcome::Aborted), false, None, row.log_version)
                        .await?;
                    return Ok(if ok {
                        TxDriveEnd::Completed(Outcome::Aborted)
                    } else {
                        TxDriveEnd::Lost
                    });
                }
            },
        };
        loop {
            match next_step(&state) {
                TxStep::PresumeAbort => {
                    let e = TxEvent::TxDecided {
                        outcome: Outcome::Aborted,
                        votes: state.votes.clone(),
                        reason: "the coordinator stopped before deciding: presumed abort".into(),
                        at: Utc::now(),
                    };
                    if self.record(&row.xid, &mut state, e).await? {
                        metrics::counter!("concord_tx_decided_total", "outcome" => "aborted").increment(1);
                    } else {
                        // The coordinator that ran phase 1 decided meanwhile: deliver its decision.
                        state = self
                            .read_log(&row.xid)
                            .await?
                            .ok_or_else(|| TxLogError("log vanished".into()))?;
                    }
                }
                TxStep::Deliver(outcome, owed) => {
                    // The lease must outlast the round. The row learns the decision with the
                    // lease renewed, or else with the round's result (one write, not two, when a
                    // fresh transaction's lease still covers phase 2).
                    if row.outcome != Some(outcome) && !self.lease_covers_a_round(&row) {
                        if !self.keep(&row, Some(outcome), state.log_version).await? {
                            return Ok(TxDriveEnd::Lost);
                        }
                        row.outcome = Some(outcome);
                        row.log_version = state.log_version;
                    }
                    let started = Utc::now();
                    let acks = futures::future::join_all(
                        owed.iter()
                            .map(|&i| self.participants.finish(&row.xid, &state.participants[i], outcome)),
                    )
                    .await;
                    metrics::histogram!("concord_tx_phase_duration_seconds", "phase" => outcome.phase2_path())
                        .record((Utc::now() - started).to_std().unwrap_or_default().as_secs_f64());
                    let acked: Vec<usize> = owed.iter().zip(&acks).filter(|(_, a)| **a).map(|(i, _)| *i).collect();
                    if acked.len() == owed.len() {
                        // Everyone acknowledged: the row records it (`pending` turns false), which
                        // ends the work; the log keeps the decision and any earlier partial
                        // rounds. One write instead of two on the common path.
                        if !self.update(&row, Some(outcome), false, None, state.log_version).await? {
                            return Ok(TxDriveEnd::Lost);
                        }
                        metrics::counter!("concord_tx_completed_total", "outcome" => outcome.as_str()).increment(1);
                        return Ok(TxDriveEnd::Completed(outcome));
                    }
                    if !acked.is_empty() {
                        let e = TxEvent::TxAcknowledged {
                            participants: acked,
                            at: Utc::now(),
                        };
                        if !self.record(&row.xid, &mut state, e).await? {
                            return Ok(TxDriveEnd::Lost);
                        }
                    }
                    if !state.unacknowledged().is_empty() {
                        let next = Utc::now() + chrono_dur(self.backoff(&state));
                        if !self
                            .update(&row, Some(outcome), true, Some(next), state.log_version)
                            .await?
                        {
                            return Ok(TxDriveEnd::Lost);
                        }
                        return Ok(TxDriveEnd::Waiting(outcome));
                    }
                }
                TxStep::Complete => {
                    if !self
                        .record(&row.xid, &mut state, TxEvent::TxCompleted { at: Utc::now() })
                        .await?
                    {
                        return Ok(TxDriveEnd::Lost);
                    }
                }
                TxStep::Done => {
                    let outcome = state.decision.unwrap_or(Outcome::Aborted);
                    if !self.update(&row, Some(outcome), false, None, state.log_version).await? {
                        return Ok(TxDriveEnd::Lost);
                    }
                    metrics::counter!("concord_tx_completed_total", "outcome" => outcome.as_str()).increment(1);
                    return Ok(TxDriveEnd::Completed(outcome));
                }
            }
        }
    }

    /// Gives a held transaction back to the queue, due now (no slot to deliver it here).
    ///
    /// # Errors
    /// The store.
    pub async fn release(&self, held: HeldTx) -> Result<(), TxFailure> {
        // A fresh transaction's row may not hold its logged decision yet.
        let outcome = held.state.as_ref().and_then(|s| s.decision).or(held.row.outcome);
        let log_version = held.state.as_ref().map_or(held.row.log_version, |s| s.log_version);
        let next = Some(Utc::now());
        self.update(&held.row, outcome, true, next, log_version).await?;
        Ok(())
    }

    /// Whether the held lease outlasts one phase-2 round (its messages' timeout and a margin).
    fn lease_covers_a_round(&self, row: &TxRow) -> bool {
        let needed = Utc::now() + chrono_dur(self.config.phase2_timeout + LEASE_MARGIN);
        row.lease_until.is_some_and(|until| until > needed)
    }

    /// Grows with the time since the decision: rounds close together at first, then sparse.
    fn backoff(&self, state: &TxState) -> Duration {
        let since = state
            .decided_at
            .map_or(Duration::ZERO, |d| (Utc::now() - d).to_std().unwrap_or_default());
        (since / 2).clamp(self.config.retry_backoff, self.config.max_retry_backoff)
    }

    async fn record(&self, xid: &Xid, state: &mut TxState, e: TxEvent) -> Result<bool, TxFailure> {
        match self
            .append(xid, state.log_version, std::slice::from_ref(&e), None)
            .await
        {
            Ok(()) => {
                state.apply(&e)?;
                Ok(true)
            }
            Err(TxFailure::Store(StoreError::WrongExpectedVersion { .. })) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Records the decision in the row while keeping the lease (phase 2 follows at once).
    async fn keep(&self, row: &TxRow, outcome: Option<Outcome>, log_version: u64) -> Result<bool, TxFailure> {
        let now = Utc::now();
        Ok(self
            .store
            .update_tx(&TxUpdate {
                xid: &row.xid,
                holder: row.lease_owner,
                outcome,
                pending: true,
                next_run_at: Some(now),
                lease: row.lease_owner.map(|t| (t, now + chrono_dur(self.config.lease))),
                log_version,
                now,
            })
            .await?)
    }

    /// Updates the row and releases the lease.
    async fn update(
        &self,
        row: &TxRow,
        outcome: Option<Outcome>,
        pending: bool,
        next: Option<DateTime<Utc>>,
        log_version: u64,
    ) -> Result<bool, TxFailure> {
        Ok(self
            .store
            .update_tx(&TxUpdate {
                xid: &row.xid,
                holder: row.lease_owner,
                outcome,
                pending,
                next_run_at: next,
                lease: None,
                log_version,
                now: Utc::now(),
            })
            .await?)
    }

    async fn append(&self, xid: &Xid, after: u64, events: &[TxEvent], trace: Option<&str>) -> Result<(), TxFailure> {
        let entries = events
            .iter()
            .map(|e| (e.type_name(), serde_json::to_value(e).unwrap_or(Value::Null)))
            .collect();
        let stream = StreamName::parse(&format!("tx-{xid}"))?;
        let limits = &self.config.event_limits;
        log::append(self.events.as_ref(), stream, after, entries, self.node, trace, limits).await?;
        Ok(())
    }
}

fn reason_of(participants: &[TxParticipant], answers: &[PrepareAnswer], outcome: Outcome) -> String {
    if outcome == Outcome::Committed {
        return "every participant voted commit".into();
    }
    let why: Vec<String> = participants
        .iter()
        .zip(answers)
        .filter_map(|(p, a)| match a {
            PrepareAnswer::Commit => None,
            PrepareAnswer::Abort(e) => Some(format!("{} voted abort: {e}", p.name)),
            PrepareAnswer::Silent(e) => Some(format!("{} did not answer: {e}", p.name)),
        })
        .collect();
    why.join("; ").chars().take(1000).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::MemoryStore;
    use serde_json::json;
    use std::sync::Mutex;

    /// Votes from a script; records every phase-2 message; acknowledges unless told not to.
    struct Script {
        votes: Vec<PrepareAnswer>,
        ack: Mutex<bool>,
        finished: Mutex<Vec<(String, Outcome)>>,
        /// The store, to note the outcome the row holds as each phase-2 message goes out.
        store: Arc<MemoryStore>,
        row_outcomes: Mutex<Vec<Option<Outcome>>>,
    }

    #[async_trait]
    impl TxParticipants for Script {
        async fn prepare(&self, _xid: &Xid, p: &TxParticipant, _deadline: DateTime<Utc>) -> PrepareAnswer {
            let i: usize = p.name[1..].parse().unwrap();
            self.votes[i].clone()
        }
        async fn finish(&self, xid: &Xid, p: &TxParticipant, outcome: Outcome) -> bool {
            let row = self.store.get_tx(xid).await.unwrap().unwrap();
            self.row_outcomes.lock().unwrap().push(row.outcome);
            self.finished.lock().unwrap().push((p.name.clone(), outcome));
            *self.ack.lock().unwrap()
        }
    }

    fn coordinator(store: &Arc<MemoryStore>, votes: Vec<PrepareAnswer>, ack: bool) -> (TxCoordinator, Arc<Script>) {
        coordinator_with(store, votes, ack, Duration::from_secs(1))
    }

    fn coordinator_with(
        store: &Arc<MemoryStore>,
        votes: Vec<PrepareAnswer>,
        ack: bool,
        phase2_timeout: Duration,
    ) -> (TxCoordinator, Arc<Script>) {
        let script = Arc::new(Script {
            votes,
            ack: Mutex::new(ack),
            finished: Mutex::new(Vec::new()),
            store: store.clone(),
            row_outcomes: Mutex::new(Vec::new()),
        });
        let config = TxConfig {
            lease: Duration::from_secs(10),
            limits: TxLimits::default(),
            event_limits: Limits::default(),
            retry_backoff: Duration::from_millis(1),
            max_retry_backoff: Duration::from_millis(5),
            phase2_timeout,
            outbound: OutboundPolicy::public_only("tx_allowed_hosts"),
        };
        let c = TxCoordinator::new(store.clone(), store.clone(), script.clone(), Uuid::now_v7(), config);
        (c, script)
    }

    fn parts(n: usize) -> Vec<TxParticipant> {
        (0..n)
            .map(|i| TxParticipant {
                name: format!("p{i}"),
                url: format!("http://p{i}"),
                payload: json!({"n": i}),
            })
            .collect()
    }

    #[tokio::test]
    async fn all_votes_commit_then_phase_two_commits_everyone() {
        let store = Arc::new(MemoryStore::default());
        let (c, script) = coordinator(&store, vec![PrepareAnswer::Commit, PrepareAnswer::Commit], true);
        let Begun { xid, outcome, held } = c.begin(parts(2), 1000, None, None).await.unwrap();
        assert_eq!(outcome, Some(Outcome::Committed));
        let held = held.unwrap();
        // Decided in the log; the row learns it with phase 2's result (the lease covers a round).
        assert_eq!(
            c.read_log(&xid).await.unwrap().unwrap().decision,
            Some(Outcome::Committed),
            "decided before phase 2"
        );
        let row = store.get_tx(&xid).await.unwrap().unwrap();
        assert_eq!((row.outcome, row.pending), (None, true));
        assert!(
            script.finished.lock().unwrap().is_empty(),
            "no phase-2 message before deliver"
        );
        assert_eq!(
            c.deliver(held).await.unwrap(),
            TxDriveEnd::Completed(Outcome::Committed)
        );
        let row = store.get_tx(&xid).await.unwrap().unwrap();
        assert_eq!((row.outcome, row.pending), (Some(Outcome::Committed), false));
        assert_eq!(
            *script.finished.lock().unwrap(),
            [
                ("p0".to_owned(), Outcome::Committed),
                ("p1".to_owned(), Outcome::Committed)
            ]
        );
        let state = c.read_log(&xid).await.unwrap().unwrap();
        assert_eq!(state.decision, Some(Outcome::Committed));
        let row = store.get_tx(&xid).await.unwrap().unwrap();
        assert_eq!((row.pending, row.next_run_at, row.lease_owner), (false, None, None));
    }

    #[tokio::test]
    async fn a_decided_transaction_given_back_unsent_keeps_its_decision_in_the_row() {
        let store = Arc::new(MemoryStore::default());
        let (c, script) = coordinator(&store, vec![PrepareAnswer::Commit, PrepareAnswer::Commit], true);
        let Begun { xid, held, .. } = c.begin(parts(2), 1000, None, None).await.unwrap();
        c.release(held.unwrap()).await.unwrap();
        let row = store.get_tx(&xid).await.unwrap().unwrap();
        assert_eq!(
            (row.outcome, row.pending, row.lease_owner),
            (Some(Outcome::Committed), true, None)
        );
        assert!(script.finished.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_lease_shorter_than_a_round_is_renewed_with_the_decision_before_phase_two() {
        let store = Arc::new(MemoryStore::default());
        // Phase-2 messages may take a minute; the lease is 10 s.
        let (c, script) = coordinator_with(
            &store,
            vec![PrepareAnswer::Commit, PrepareAnswer::Commit],
            true,
            Duration::from_secs(60),
        );
        let Begun { held, .. } = c.begin(parts(2), 1000, None, None).await.unwrap();
        assert_eq!(
            c.deliver(held.unwrap()).await.unwrap(),
            TxDriveEnd::Completed(Outcome::Committed)
        );
        assert_eq!(
            *script.row_outcomes.lock().unwrap(),
            [Some(Outcome::Committed), Some(Outcome::Committed)],
            "the row held the decision, with a renewed lease, before any phase-2 message"
        );
        let (c2, script2) = coordinator(&store, vec![PrepareAnswer::Commit, PrepareAnswer::Commit], true);
        let Begun { held, .. } = c2.begin(parts(2), 1000, None, None).await.unwrap();
        c2.deliver(held.unwrap()).await.unwrap();
        assert_eq!(
            *script2.row_outcomes.lock().unwrap(),
            [None, None],
            "a lease that covers the round is not renewed: the row learns the outcome with the result"
        );
    }

    #[tokio::test]
    async fn a_begin_under_an_xid_already_logged_meets_that_transaction() {
        let store = Arc::new(MemoryStore::default());
        let (c, _) = coordinator(&store, vec![PrepareAnswer::Commit, PrepareAnswer::Commit], true);
        let xid = Xid::derived("caller", "key-1", b"{}");
        let first = c.begin(parts(2), 1000, None, Some(xid.clone())).await.unwrap();
        assert_eq!((&first.xid, first.outcome), (&xid, Some(Outcome::Committed)));
        // The retry is told to abort: it must not run a second phase 1.
        let (retry, script) = coordinator(&store, vec![PrepareAnswer::Abort("no".into()); 2], true);
        let again = retry.begin(parts(2), 1000, None, Some(xid.clone())).await.unwrap();
        assert_eq!((&again.xid, again.outcome), (&xid, Some(Outcome::Committed)));
        assert!(again.held.is_none() && script.finished.lock().unwrap().is_empty());
        assert_eq!(store.list_txs(None, None, None, 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn one_abort_or_silence_aborts_and_unacknowledged_participants_are_retried() {
        let store = Arc::new(MemoryStore::default());
        let (c, script) = coordinator(
            &store,
            vec![PrepareAnswer::Commit, PrepareAnswer::Silent("timeout".into())],
            false,
        );
        let Begun { xid, outcome, held } = c.begin(parts(2), 1000, None, None).await.unwrap();
        assert_eq!(outcome, Some(Outcome::Aborted));
        let held = held.unwrap();
        assert_eq!(c.deliver(held).await.unwrap(), TxDriveEnd::Waiting(Outcome::Aborted));
        let row = store.get_tx(&xid).await.unwrap().unwrap();
        assert!(row.pending && row.next_run_at.is_some() && row.lease_owner.is_none());
        *script.ack.lock().unwrap() = true;
        tokio::time::sleep(Duration::from_millis(10)).await;
        let mut claimed = c.claim(10).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(
            c.deliver(claimed.pop().unwrap()).await.unwrap(),
            TxDriveEnd::Completed(Outcome::Aborted)
        );
        let state = c.read_log(&xid).await.unwrap().unwrap();
        assert_eq!(state.votes, vec![Some(Vote::Commit), None]);
        assert!(state.reason.unwrap().contains("p1 did not answer"));
    }

    #[tokio::test]
    async fn a_transaction_whose_coordinator_died_before_deciding_is_presumed_aborted() {
        let store = Arc::new(MemoryStore::default());
        let (c, script) = coordinator(&store, vec![PrepareAnswer::Commit], true);
        // The coordinator logged the start, then died: write exactly that, with an expired lease.
        let now = Utc::now();
        let mut row = crate::testkit::tx_row("dead-1", now);
        row.lease_owner = Some(Uuid::now_v7());
        row.lease_until = Some(now - chrono::Duration::seconds(1));
        store.create_tx(&row).await.unwrap();
        let dead = crate::testkit::tx_id("dead-1");
        c.append(
            &dead,
            0,
            &[TxEvent::TxStarted {
                participants: parts(1),
                timeout_ms: 100,
                at: now,
            }],
            None,
        )
        .await
        .unwrap();
        let mut claimed = c.claim(10).await.unwrap();
        assert_eq!(
            c.deliver(claimed.pop().unwrap()).await.unwrap(),
            TxDriveEnd::Completed(Outcome::Aborted)
        );
        assert_eq!(*script.finished.lock().unwrap(), [("p0".to_owned(), Outcome::Aborted)]);
        // A second, late decision cannot be logged.
        let late = TxEvent::TxDecided {
            outcome: Outcome::Committed,
            votes: vec![Some(Vote::Commit)],
            reason: "late".into(),
            at: now,
        };
        assert!(c.append(&dead, 1, &[late], None).await.is_err());
        assert_eq!(
            c.read_log(&dead).await.unwrap().unwrap().decision,
            Some(Outcome::Aborted)
        );
    }

    #[tokio::test]
    async fn invalid_requests_write_nothing() {
        let store = Arc::new(MemoryStore::default());
        let (c, _) = coordinator(&store, vec![], true);
        assert!(matches!(
            c.begin(vec![], 1000, None, None).await,
            Err(TxFailure::Invalid(_))
        ));
        assert!(store.list_txs(None, None, None, 10).await.unwrap().is_empty());
    }
}
