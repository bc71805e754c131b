//! Two-phase commit, model-checked exhaustively with `stateright` (issue 5, item 1): one
//! coordinator and two or three participants over a network that loses, duplicates and reorders
//! messages, with crashes of either side (durable state survives) and a lease takeover while the
//! first coordinator is still collecting votes. The coordinator runs the real logic of
//! `concord_core::domain::tx`: it decides with [`decide`], its log is folded and appended through
//! [`TxState::apply`], and whoever drives phase 2 (the runner once it decided, a restarted node, a
//! node that took the lease over) does what [`next_step`] says.
//!
//! Safety is checked as stateright `always` properties, reachability of the interesting cases
//! (commit, rollback, the fence refusing a decision, an answer to an in-doubt participant, a
//! crashed coordinator completing) as `sometimes` properties. Liveness is checked by walking the
//! state graph ourselves (see [`check_liveness`]): stateright's `eventually` properties are
//! documented to miss counterexamples at DAG joins and cycles, and this model has both (retries).
//!
//! Each `a_coordinator_that_...` / `a_participant_that_...` test breaks one rule on purpose and
//! asserts the checker finds a counterexample, so the properties cannot pass vacuously. One of
//! them shows why the participant kit records aborts: a participant that asks for the outcome
//! only when it restarts, and forgets an abort of an xid it did not know, stays in doubt forever
//! when the prepare reaches it after the coordinator aborted (the deadline passed while it was
//! slow). Recording the abort, as `concord_sdk::tx` does, or asking again and again while in
//! doubt, are each enough; both designs are checked.
//!
//! `cargo test -p concord-core --test tx_model -- --nocapture` prints the state counts.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::time::Instant;

use chrono::{DateTime, Utc};
use concord_core::domain::tx::{
    Outcome, TxEvent, TxLogError, TxParticipant, TxState, TxStep, Vote, Xid, decide, next_step,
};
use stateright::{Checker, HasDiscoveries, Model, Property};

/// The largest transaction modelled; arrays of this size keep the state `Copy` and small.
const MAX_P: usize = 3;

/// How many faults of each kind the adversary may still inject; bounded so the state space is
/// finite. Everything else (restarts, the deadline passing, retries, deliveries) is unbounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Faults {
    coordinator_crashes: u8,
    /// The runner's lease expires while it still runs, and another node's worker takes over.
    takeovers: u8,
    /// Shared by all participants.
    participant_crashes: u8,
    losses: u8,
    duplicates: u8,
}

/// How the participant kit behaves; the coordinator is the same in every variant.
#[derive(Clone, Copy, Debug)]
struct Kit {
    /// A participant in doubt asks the coordinator again and again (a resolver loop), not only
    /// once when it restarts. The model lets it ask once the deadline passed or the decision is
    /// logged: before, the answer could only be "pending".
    asks_while_in_doubt: bool,
    /// An abort of an xid the participant has no record of leaves a durable "aborted" record,
    /// so a prepare arriving later votes abort instead of preparing.
    abort_leaves_tombstone: bool,
}

/// What `concord_sdk::tx` does: it asks when it restarts, and an abort leaves a record
/// (`concord_tx_outcome`) so a late prepare votes abort.
const KIT: Kit = Kit {
    asks_while_in_doubt: false,
    abort_leaves_tombstone: true,
};

/// One rule broken on purpose, to show the properties catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bug {
    /// The runner sends commit to everyone, then logs the decision.
    SendsCommitBeforeLogging,
    /// The driver sends each phase-2 message once and never again.
    NoRedelivery,
    /// The runner's decision is written without the expected-version fence.
    Unfenced,
    /// An undecided xid is answered "aborted" without logging the abort first.
    AnswersAbortWithoutLogging,
    /// A participant loses its prepared work when it crashes (no `PREPARE TRANSACTION`).
    ForgetsPreparedOnCrash,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Msg {
    Prepare(usize),
    /// The answer to prepare.
    Vote(usize, Vote),
    /// `POST {url}/commit` or `{url}/abort`.
    Phase2(usize, Outcome),
    /// The answer to phase 2.
    Ack(usize, Outcome),
    /// An in-doubt participant's `GET /v1/transactions/{xid}`.
    Inquire(usize),
    /// The coordinator's answer to it, from the log.
    Answer(usize, Outcome),
}

const KINDS: usize = 10;

impl Msg {
    fn bit(self) -> u32 {
        let (p, kind) = match self {
            Self::Prepare(p) => (p, 0),
            Self::Vote(p, Vote::Commit) => (p, 1),
            Self::Vote(p, Vote::Abort) => (p, 2),
            Self::Phase2(p, Outcome::Committed) => (p, 3),
            Self::Phase2(p, Outcome::Aborted) => (p, 4),
            Self::Ack(p, Outcome::Committed) => (p, 5),
            Self::Ack(p, Outcome::Aborted) => (p, 6),
            Self::Inquire(p) => (p, 7),
            Self::Answer(p, Outcome::Committed) => (p, 8),
            Self::Answer(p, Outcome::Aborted) => (p, 9),
        };
        1 << (p * KINDS + kind)
    }

    fn from_index(i: usize) -> Self {
        let p = i / KINDS;
        match i % KINDS {
            0 => Self::Prepare(p),
            1 => Self::Vote(p, Vote::Commit),
            2 => Self::Vote(p, Vote::Abort),
            3 => Self::Phase2(p, Outcome::Committed),
            4 => Self::Phase2(p, Outcome::Aborted),
            5 => Self::Ack(p, Outcome::Committed),
            6 => Self::Ack(p, Outcome::Aborted),
            7 => Self::Inquire(p),
            8 => Self::Answer(p, Outcome::Committed),
            _ => Self::Answer(p, Outcome::Aborted),
        }
    }

    /// A response to the coordinator's own request: it dies with the coordinator's process.
    fn is_response_to_coordinator(self) -> bool {
        matches!(self, Self::Vote(..) | Self::Ack(..))
    }
}

/// Messages in flight, as a set: a copy of a message already in flight adds nothing (duplication
/// is modelled by delivering a message and keeping it), and any of them may be delivered next.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
struct Network(u32);

impl Network {
    fn contains(self, m: Msg) -> bool {
        self.0 & m.bit() != 0
    }

    fn insert(&mut self, m: Msg) {
        self.0 |= m.bit();
    }

    fn remove(&mut self, m: Msg) {
        self.0 &= !m.bit();
    }

    fn retain(&mut self, keep: impl Fn(Msg) -> bool) {
        for m in self.iter() {
            if !keep(m) {
                self.remove(m);
            }
        }
    }

    fn iter(self) -> impl Iterator<Item = Msg> {
        let mut bits = self.0;
        std::iter::from_fn(move || {
            (bits != 0).then(|| {
                let i = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Msg::from_index(i)
            })
        })
    }

    /// The messages to or from participant `p`, as bits `0..KINDS`.
    fn of(self, p: usize) -> u32 {
        (self.0 >> (p * KINDS)) & ((1 << KINDS) - 1)
    }
}

impl fmt::Debug for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// The coordinator's durable log `tx-{xid}`, as the fields its fold ([`TxState`]) keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct Log {
    started: bool,
    decision: Option<Outcome>,
    votes: [Option<Vote>; MAX_P],
    acked: [bool; MAX_P],
    completed: bool,
}

/// The process that started the transaction and collects its votes (volatile).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Runner {
    NotStarted,
    Collecting([Option<Vote>; MAX_P]),
    /// Only with [`Bug::SendsCommitBeforeLogging`]: commit sent, decision not yet logged.
    Unlogged(Outcome, [Option<Vote>; MAX_P]),
    /// Decided (it then drives phase 2), crashed, or never started.
    Gone,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Coordinator {
    up: bool,
    runner: Runner,
    /// Some process drives phase 2 from the log with `next_step`.
    driver: bool,
    /// Only with [`Bug::NoRedelivery`]: phase 2 already sent to this participant.
    sent: [bool; MAX_P],
}

/// A participant's durable state for this xid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Local {
    /// No record: never prepared, or voted abort and forgot.
    Idle,
    /// Prepared durably (`PREPARE TRANSACTION`), holding its locks.
    Prepared,
    Committed,
    /// Rolled back, or (with tombstones) an abort recorded for an unknown xid.
    Aborted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Participant {
    up: bool,
    local: Local,
}

/// History the properties need; no process reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct Ghost {
    decisions_logged: u8,
    first_decision: Option<Outcome>,
    /// A commit (phase 2 or an answer) was sent while the log held no commit decision.
    commit_sent_unlogged: bool,
    /// A participant was told to commit work it had not prepared, or to abort committed work.
    broken_promise: bool,
    /// The runner's decision was refused by the log's fence.
    runner_fenced: bool,
    /// A prepared participant learned the outcome from its own question.
    learned_by_asking: bool,
    rolled_back: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct State {
    coordinator: Coordinator,
    log: Log,
    participants: [Participant; MAX_P],
    net: Network,
    deadline_passed: bool,
    faults_left: Faults,
    ghost: Ghost,
}

/// Bits appended one field after another: a state packs into one `u128` with nothing lost.
struct Packer(u128, u32);

impl Packer {
    fn put(&mut self, value: impl Into<u128>, bits: u32) {
        let value = value.into();
        assert!(value < 1 << bits && self.1 + bits <= 128, "a field does not fit");
        self.0 |= value << self.1;
        self.1 += bits;
    }
}

fn vote_code(v: Option<Vote>) -> u8 {
    match v {
        None => 0,
        Some(Vote::Commit) => 1,
        Some(Vote::Abort) => 2,
    }
}

fn outcome_code(o: Option<Outcome>) -> u8 {
    match o {
        None => 0,
        Some(Outcome::Committed) => 1,
        Some(Outcome::Aborted) => 2,
    }
}

impl State {
    /// Everything about participant `p`, for ordering participants.
    fn participant_key(&self, p: usize) -> u128 {
        let mut k = Packer(0, 0);
        let (runner_vote, unlogged) = match self.coordinator.runner {
            Runner::Collecting(v) => (vote_code(v[p]), 0u8),
            Runner::Unlogged(_, v) => (vote_code(v[p]), 1),
            Runner::NotStarted | Runner::Gone => (0, 0),
        };
        k.put(self.net.of(p), 32);
        k.put(self.participants[p].up, 1);
        k.put(self.participants[p].local as u8, 2);
        k.put(runner_vote, 2);
        k.put(unlogged, 1);
        k.put(vote_code(self.log.votes[p]), 2);
        k.put(self.log.acked[p], 1);
        k.put(self.coordinator.sent[p], 1);
        k.0
    }

    /// The whole state in one number (one hash write instead of dozens).
    fn pack(&self) -> u128 {
        let mut k = Packer(0, 0);
        let c = &self.coordinator;
        let (tag, votes, outcome) = match c.runner {
            Runner::NotStarted => (0u8, [None; MAX_P], None),
            Runner::Collecting(v) => (1, v, None),
            Runner::Unlogged(o, v) => (2, v, Some(o)),
            Runner::Gone => (3, [None; MAX_P], None),
        };
        k.put(tag, 2);
        k.put(outcome_code(outcome), 2);
        k.put(c.up, 1);
        k.put(c.driver, 1);
        let log = &self.log;
        k.put(log.started, 1);
        k.put(outcome_code(log.decision), 2);
        k.put(log.completed, 1);
        for (p, vote) in votes.iter().enumerate() {
            k.put(vote_code(*vote), 2);
            k.put(c.sent[p], 1);
            k.put(vote_code(log.votes[p]), 2);
            k.put(log.acked[p], 1);
            k.put(self.participants[p].up, 1);
            k.put(self.participants[p].local as u8, 2);
        }
        k.put(self.net.0, 32);
        k.put(self.deadline_passed, 1);
        let f = &self.faults_left;
        for budget in [
            f.coordinator_crashes,
            f.takeovers,
            f.participant_crashes,
            f.losses,
            f.duplicates,
        ] {
            k.put(budget, 3);
        }
        let g = &self.ghost;
        k.put(g.decisions_logged, 3);
        k.put(outcome_code(g.first_decision), 2);
        for flag in [
            g.commit_sent_unlogged,
            g.broken_promise,
            g.runner_fenced,
            g.learned_by_asking,
            g.rolled_back,
        ] {
            k.put(flag, 1);
        }
        k.0
    }

    /// The same state with participants `0..n` reordered by what they hold: participants are
    /// interchangeable, so checking one state of each such class checks them all.
    fn representative(&self, n: usize) -> Self {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&p| self.participant_key(p));
        let mut s = self.clone();
        s.net.0 &= !((1 << (n * KINDS)) - 1);
        for (to, &from) in order.iter().enumerate() {
            s.participants[to] = self.participants[from];
            s.log.votes[to] = self.log.votes[from];
            s.log.acked[to] = self.log.acked[from];
            s.coordinator.sent[to] = self.coordinator.sent[from];
            s.net.0 |= self.net.of(from) << (to * KINDS);
            match (&mut s.coordinator.runner, self.coordinator.runner) {
                (Runner::Collecting(v), Runner::Collecting(w)) | (Runner::Unlogged(_, v), Runner::Unlogged(_, w)) => {
                    v[to] = w[from];
                }
                _ => {}
            }
        }
        s
    }
}

impl std::hash::Hash for State {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.pack().hash(state);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Action {
    /// The runner logs `TxStarted` and sends prepare to everyone.
    Start,
    /// The deadline passes; a runner still collecting decides on what it has.
    DeadlinePasses,
    /// Only with [`Bug::SendsCommitBeforeLogging`].
    LogDecision,
    /// A driver finds no decision logged: it logs an abort.
    PresumeAbort,
    /// A driver (re)sends the logged outcome to a participant that has not acknowledged.
    SendPhase2(usize),
    /// A driver logs `TxCompleted`.
    Complete,
    Deliver(Msg),
    /// Prepare delivered, and the participant refuses (votes abort).
    Refuse(usize),
    /// An inquiry about an undecided xid past its deadline: the coordinator logs an abort
    /// (fenced), then answers it.
    AbortOnInquiry(usize),
    /// A prepared participant asks for the outcome again ([`Kit::asks_while_in_doubt`]).
    Inquire(usize),
    CrashCoordinator,
    RestartCoordinator,
    Takeover,
    CrashParticipant(usize),
    RestartParticipant(usize),
    /// Deliver and keep a copy in flight.
    Duplicate(Msg),
    Lose(Msg),
}

impl Action {
    /// Faults are bounded; once the adversary stops injecting them the rest must converge.
    fn is_fault(self) -> bool {
        matches!(
            self,
            Self::CrashCoordinator | Self::Takeover | Self::CrashParticipant(_) | Self::Duplicate(_) | Self::Lose(_)
        )
    }
}

struct TwoPhaseCommit {
    n: usize,
    faults: Faults,
    kit: Kit,
    bug: Option<Bug>,
    /// The fold of a log holding only `TxStarted`.
    after_start: TxState,
}

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000, 0).unwrap()
}

impl TwoPhaseCommit {
    fn new(n: usize, faults: Faults) -> Self {
        assert!((1..=MAX_P).contains(&n));
        let participants = (0..n)
            .map(|i| TxParticipant {
                name: format!("p{i}"),
                url: format!("http://p{i}.test"),
                payload: serde_json::Value::Null,
            })
            .collect();
        Self {
            n,
            faults,
            kit: KIT,
            bug: None,
            after_start: TxState::new(&Xid::parse("x1").unwrap(), participants, 1000, t0()),
        }
    }

    fn with_kit(mut self, kit: Kit) -> Self {
        self.kit = kit;
        self
    }

    fn with_bug(mut self, bug: Bug) -> Self {
        self.bug = Some(bug);
        self
    }

    /// The key of a state's symmetry class.
    fn canonical(&self, s: &State) -> u128 {
        s.representative(self.n).pack()
    }

    fn symmetry(&self) -> fn(&State) -> State {
        match self.n {
            1 => |s| s.representative(1),
            2 => |s| s.representative(2),
            _ => |s| s.representative(3),
        }
    }

    fn has(&self, bug: Bug) -> bool {
        self.bug == Some(bug)
    }

    /// The log as the coordinator reads it: every event folded through the real `apply`.
    fn fold(&self, log: &Log) -> TxState {
        let mut s = self.after_start.clone();
        let mut events = Vec::with_capacity(3);
        if let Some(outcome) = log.decision {
            events.push(TxEvent::TxDecided {
                outcome,
                votes: log.votes[..self.n].to_vec(),
                reason: String::new(),
                at: t0(),
            });
        }
        let acked: Vec<usize> = (0..self.n).filter(|&p| log.acked[p]).collect();
        if !acked.is_empty() {
            events.push(TxEvent::TxAcknowledged {
                participants: acked,
                at: t0(),
            });
        }
        if log.completed {
            events.push(TxEvent::TxCompleted { at: t0() });
        }
        for e in &events {
            s.apply(e).expect("the model's log always folds");
        }
        s
    }

    /// Appends one event, through the real `apply`; with `expected_version`, only if the log is
    /// still at that version (the event store's optimistic fence).
    fn append(&self, log: &Log, expected_version: Option<u64>, event: &TxEvent) -> Result<Log, TxLogError> {
        let mut s = self.fold(log);
        if expected_version.is_some_and(|v| v != s.log_version) {
            return Err(TxLogError(format!(
                "expected version {expected_version:?}, at {}",
                s.log_version
            )));
        }
        s.apply(event)?;
        let mut out = Log {
            started: true,
            decision: s.decision,
            completed: s.completed_at.is_some(),
            ..Log::default()
        };
        for p in 0..self.n {
            out.votes[p] = s.votes[p];
            out.acked[p] = s.acked[p].is_some();
        }
        Ok(out)
    }

    fn decided(&self, outcome: Outcome, votes: &[Option<Vote>; MAX_P]) -> TxEvent {
        TxEvent::TxDecided {
            outcome,
            votes: votes[..self.n].to_vec(),
            reason: String::new(),
            at: t0(),
        }
    }

    /// Logs a decision at `expected_version`; the loser of a race adopts the logged one.
    fn log_decision(&self, s: &mut State, expected_version: u64, outcome: Outcome, votes: &[Option<Vote>; MAX_P]) {
        match self.append(&s.log, Some(expected_version), &self.decided(outcome, votes)) {
            Ok(log) => {
                s.log = log;
                s.ghost.decisions_logged += 1;
                s.ghost.first_decision.get_or_insert(outcome);
            }
            Err(_) if self.has(Bug::Unfenced) => {
                s.log.decision = Some(outcome);
                s.log.votes = *votes;
                s.ghost.decisions_logged += 1;
            }
            Err(_) => s.ghost.runner_fenced = true,
        }
    }

    fn send(s: &mut State, m: Msg) {
        if let Msg::Phase2(_, Outcome::Committed) | Msg::Answer(_, Outcome::Committed) = m
            && s.log.decision != Some(Outcome::Committed)
        {
            s.ghost.commit_sent_unlogged = true;
        }
        s.net.insert(m);
    }

    fn prepare_is_fresh(&self, local: Local) -> bool {
        local == Local::Idle || (local == Local::Aborted && !self.kit.abort_leaves_tombstone)
    }

    /// A participant applies an outcome; commit and abort are idempotent, and an abort of an
    /// xid it has no record of succeeds.
    fn learn(&self, s: &mut State, p: usize, outcome: Outcome) {
        let local = &mut s.participants[p].local;
        match (*local, outcome) {
            (Local::Prepared | Local::Committed, Outcome::Committed) => *local = Local::Committed,
            (Local::Prepared, Outcome::Aborted) => {
                *local = Local::Aborted;
                s.ghost.rolled_back = true;
            }
            (Local::Aborted, Outcome::Aborted) => {}
            (Local::Idle, Outcome::Aborted) => {
                if self.kit.abort_leaves_tombstone {
                    *local = Local::Aborted;
                }
            }
            (Local::Committed, Outcome::Aborted) | (Local::Idle | Local::Aborted, Outcome::Committed) => {
                s.ghost.broken_promise = true;
            }
        }
    }

    fn handle(&self, s: &mut State, m: Msg, refuse: bool) {
        match m {
            Msg::Prepare(p) | Msg::Phase2(p, _) | Msg::Answer(p, _) if !s.participants[p].up => {}
            Msg::Vote(..) | Msg::Ack(..) | Msg::Inquire(_) if !s.coordinator.up => {}
            Msg::Prepare(p) => {
                let local = s.participants[p].local;
                let vote = if self.prepare_is_fresh(local) {
                    if refuse {
                        Vote::Abort
                    } else {
                        s.participants[p].local = Local::Prepared;
                        Vote::Commit
                    }
                } else if local == Local::Aborted {
                    Vote::Abort
                } else {
                    Vote::Commit
                };
                Self::send(s, Msg::Vote(p, vote));
            }
            Msg::Vote(p, v) => {
                if let Runner::Collecting(votes) = &mut s.coordinator.runner {
                    votes[p].get_or_insert(v);
                    self.runner_decides(s);
                }
            }
            Msg::Phase2(p, outcome) => {
                self.learn(s, p, outcome);
                Self::send(s, Msg::Ack(p, outcome));
            }
            Msg::Answer(p, outcome) => {
                if s.participants[p].local == Local::Prepared {
                    s.ghost.learned_by_asking = true;
                }
                self.learn(s, p, outcome);
            }
            Msg::Ack(p, outcome) => {
                let st = self.fold(&s.log);
                if st.decision == Some(outcome) && st.acked[p].is_none() {
                    let ack = TxEvent::TxAcknowledged {
                        participants: vec![p],
                        at: t0(),
                    };
                    s.log = self
                        .append(&s.log, None, &ack)
                        .expect("an acknowledgement of the logged outcome");
                }
            }
            Msg::Inquire(p) => match self.fold(&s.log).decision {
                Some(outcome) => Self::send(s, Msg::Answer(p, outcome)),
                None if self.has(Bug::AnswersAbortWithoutLogging) => Self::send(s, Msg::Answer(p, Outcome::Aborted)),
                // Pending: no answer; the participant stays prepared and asks again later.
                None => {}
            },
        }
    }

    /// The runner collects votes until [`decide`] gives an outcome (every vote in, an abort, or
    /// the deadline passed), then logs it fenced on the version it started at, and drives phase
    /// 2. Deciding in the same step as the last vote loses no interleaving: a crash in between
    /// is the same as a crash before the vote arrived, since the vote dies with the process.
    fn runner_decides(&self, s: &mut State) {
        let Runner::Collecting(votes) = s.coordinator.runner else {
            return;
        };
        let Some(outcome) = decide(&votes[..self.n], s.deadline_passed) else {
            return;
        };
        if self.has(Bug::SendsCommitBeforeLogging) && outcome == Outcome::Committed {
            for p in 0..self.n {
                Self::send(s, Msg::Phase2(p, outcome));
            }
            s.coordinator.runner = Runner::Unlogged(outcome, votes);
        } else {
            self.log_decision(s, 1, outcome, &votes);
            s.coordinator.runner = Runner::Gone;
            s.coordinator.driver = true;
        }
    }

    /// Drops messages whose delivery could change nothing, so states differing only by them are
    /// one: votes once the runner stopped collecting, acknowledgements already logged.
    fn collect_garbage(s: &mut State) {
        let collecting = matches!(s.coordinator.runner, Runner::Collecting(_));
        let log = s.log;
        s.net.retain(|m| match m {
            Msg::Vote(..) => collecting,
            Msg::Ack(p, _) => !log.acked[p],
            _ => true,
        });
    }

    /// What a driver does now, from the real `next_step` over the log.
    fn step(&self, s: &State) -> Option<TxStep> {
        let c = &s.coordinator;
        (c.up && c.driver && s.log.started).then(|| next_step(&self.fold(&s.log)))
    }

    fn resolved(&self, s: &State) -> bool {
        s.coordinator.runner != Runner::NotStarted
            && (!s.log.started || s.log.completed)
            && (0..self.n).all(|p| s.participants[p].local != Local::Prepared && !s.net.contains(Msg::Prepare(p)))
    }

    fn quiescent(&self, s: &State) -> bool {
        let mut actions = Vec::new();
        self.actions(s, &mut actions);
        actions.iter().all(|a| a.is_fault())
    }

    fn locals<'a>(&'a self, s: &'a State) -> impl Iterator<Item = Local> + 'a {
        s.participants[..self.n].iter().map(|q| q.local)
    }
}

impl Model for TwoPhaseCommit {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            coordinator: Coordinator {
                up: true,
                runner: Runner::NotStarted,
                driver: false,
                sent: [false; MAX_P],
            },
            log: Log::default(),
            participants: [Participant {
                up: true,
                local: Local::Idle,
            }; MAX_P],
            net: Network::default(),
            deadline_passed: false,
            faults_left: self.faults,
            ghost: Ghost::default(),
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        let c = &s.coordinator;
        let f = &s.faults_left;
        if c.up {
            match c.runner {
                Runner::NotStarted => actions.push(Action::Start),
                Runner::Unlogged(..) => actions.push(Action::LogDecision),
                Runner::Collecting(_) | Runner::Gone => {}
            }
            if matches!(c.runner, Runner::Collecting(_) | Runner::Unlogged(..)) && !c.driver && f.takeovers > 0 {
                actions.push(Action::Takeover);
            }
            match self.step(s) {
                Some(TxStep::PresumeAbort) => actions.push(Action::PresumeAbort),
                Some(TxStep::Deliver(outcome, owed)) => {
                    for p in owed {
                        // A retry while the request or its answer is on the way changes nothing
                        // but the messages in flight; a late copy is what duplication models.
                        let in_flight = s.net.contains(Msg::Phase2(p, outcome)) || s.net.contains(Msg::Ack(p, outcome));
                        let given_up = self.has(Bug::NoRedelivery) && c.sent[p];
                        if !in_flight && !given_up {
                            actions.push(Action::SendPhase2(p));
                        }
                    }
                }
                Some(TxStep::Complete) => actions.push(Action::Complete),
                Some(TxStep::Done) | None => {}
            }
            if f.coordinator_crashes > 0 {
                actions.push(Action::CrashCoordinator);
            }
        } else {
            actions.push(Action::RestartCoordinator);
        }
        // Past the decision, the deadline changes nothing.
        if s.log.started && s.log.decision.is_none() && !s.deadline_passed {
            actions.push(Action::DeadlinePasses);
        }
        for p in 0..self.n {
            let q = s.participants[p];
            if q.up {
                // Asking before the deadline with nothing logged could only be answered "pending".
                let worth_asking = s.deadline_passed || s.log.decision.is_some();
                let asked = s.net.contains(Msg::Inquire(p))
                    || s.net.contains(Msg::Answer(p, Outcome::Committed))
                    || s.net.contains(Msg::Answer(p, Outcome::Aborted));
                if self.kit.asks_while_in_doubt && q.local == Local::Prepared && worth_asking && !asked {
                    actions.push(Action::Inquire(p));
                }
                if f.participant_crashes > 0 {
                    actions.push(Action::CrashParticipant(p));
                }
            } else {
                actions.push(Action::RestartParticipant(p));
            }
        }
        for m in s.net.iter() {
            actions.push(Action::Deliver(m));
            match m {
                Msg::Prepare(p) if s.participants[p].up && self.prepare_is_fresh(s.participants[p].local) => {
                    actions.push(Action::Refuse(p));
                }
                Msg::Inquire(p) if c.up && s.log.decision.is_none() && s.deadline_passed => {
                    actions.push(Action::AbortOnInquiry(p));
                }
                _ => {}
            }
            // A second copy of a vote or an acknowledgement is ignored by construction.
            if f.duplicates > 0 && !m.is_response_to_coordinator() {
                actions.push(Action::Duplicate(m));
            }
            if f.losses > 0 {
                actions.push(Action::Lose(m));
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        match action {
            Action::Start => {
                s.log.started = true;
                s.coordinator.runner = Runner::Collecting([None; MAX_P]);
                for p in 0..self.n {
                    Self::send(&mut s, Msg::Prepare(p));
                }
            }
            Action::DeadlinePasses => {
                s.deadline_passed = true;
                if s.coordinator.up {
                    self.runner_decides(&mut s);
                }
            }
            Action::LogDecision => {
                let Runner::Unlogged(outcome, votes) = s.coordinator.runner else {
                    unreachable!()
                };
                self.log_decision(&mut s, 1, outcome, &votes);
                s.coordinator.runner = Runner::Gone;
                s.coordinator.driver = true;
            }
            Action::PresumeAbort => {
                let version = self.fold(&s.log).log_version;
                self.log_decision(&mut s, version, Outcome::Aborted, &[None; MAX_P]);
            }
            Action::SendPhase2(p) => {
                let Some(TxStep::Deliver(outcome, owed)) = self.step(&s) else {
                    unreachable!("enabled only when next_step says deliver")
                };
                assert!(owed.contains(&p));
                Self::send(&mut s, Msg::Phase2(p, outcome));
                if self.has(Bug::NoRedelivery) {
                    s.coordinator.sent[p] = true;
                }
            }
            Action::Complete => {
                s.log = self
                    .append(&s.log, None, &TxEvent::TxCompleted { at: t0() })
                    .expect("completion after every acknowledgement");
            }
            Action::Deliver(m) => {
                s.net.remove(m);
                self.handle(&mut s, m, false);
            }
            Action::Refuse(p) => {
                s.net.remove(Msg::Prepare(p));
                self.handle(&mut s, Msg::Prepare(p), true);
            }
            Action::AbortOnInquiry(p) => {
                s.net.remove(Msg::Inquire(p));
                let version = self.fold(&s.log).log_version;
                self.log_decision(&mut s, version, Outcome::Aborted, &[None; MAX_P]);
                Self::send(&mut s, Msg::Answer(p, Outcome::Aborted));
            }
            Action::Inquire(p) => Self::send(&mut s, Msg::Inquire(p)),
            Action::CrashCoordinator => {
                s.faults_left.coordinator_crashes -= 1;
                s.coordinator = Coordinator {
                    up: false,
                    runner: Runner::Gone,
                    driver: false,
                    sent: [false; MAX_P],
                };
                s.net.retain(|m| !m.is_response_to_coordinator());
            }
            Action::RestartCoordinator => {
                s.coordinator.up = true;
                // The transaction's row is in the work queue: a worker picks it up.
                s.coordinator.driver = s.log.started;
            }
            Action::Takeover => {
                s.faults_left.takeovers -= 1;
                s.coordinator.driver = true;
            }
            Action::CrashParticipant(p) => {
                s.faults_left.participant_crashes -= 1;
                s.participants[p].up = false;
                if self.has(Bug::ForgetsPreparedOnCrash) && s.participants[p].local == Local::Prepared {
                    s.participants[p].local = Local::Idle;
                }
                s.net.retain(|m| !matches!(m, Msg::Answer(q, _) if q == p));
            }
            Action::RestartParticipant(p) => {
                s.participants[p].up = true;
                if s.participants[p].local == Local::Prepared {
                    Self::send(&mut s, Msg::Inquire(p));
                }
            }
            Action::Duplicate(m) => {
                s.faults_left.duplicates -= 1;
                self.handle(&mut s, m, false);
            }
            Action::Lose(m) => {
                s.faults_left.losses -= 1;
                s.net.remove(m);
            }
        }
        Self::collect_garbage(&mut s);
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(
                "atomicity: never one participant committed and another aborted",
                |m: &Self, s: &State| {
                    let committed = m.locals(s).any(|l| l == Local::Committed);
                    let aborted = m.locals(s).any(|l| l == Local::Aborted);
                    // Once one committed, every other has prepared, so can still commit.
                    let others_can_commit = m.locals(s).all(|l| matches!(l, Local::Prepared | Local::Committed));
                    let split = committed && (aborted || !others_can_commit);
                    !s.ghost.broken_promise && !split
                },
            ),
            Property::always(
                "a participant commits only if every participant voted commit",
                |m: &Self, s: &State| {
                    !m.locals(s).any(|l| l == Local::Committed)
                        || (s.log.decision == Some(Outcome::Committed)
                            && s.log.votes[..m.n].iter().all(|v| *v == Some(Vote::Commit)))
                },
            ),
            Property::always("participants end as the log decided", |m: &Self, s: &State| {
                m.locals(s).all(|l| match l {
                    Local::Committed => s.log.decision == Some(Outcome::Committed),
                    Local::Aborted => s.log.decision == Some(Outcome::Aborted),
                    Local::Idle | Local::Prepared => true,
                })
            }),
            Property::always("the decision is logged once and never changes", |_, s: &State| {
                s.ghost.decisions_logged <= 1 && s.log.decision == s.ghost.first_decision
            }),
            Property::always("no commit is sent before the decision is logged", |_, s: &State| {
                !s.ghost.commit_sent_unlogged
            }),
            Property::always(
                "a quiescent system has resolved every participant",
                |m: &Self, s: &State| !m.quiescent(s) || m.resolved(s),
            ),
            Property::sometimes("every participant commits", |m: &Self, s: &State| {
                m.locals(s).all(|l| l == Local::Committed)
            }),
            Property::sometimes("a prepared participant rolls back", |_, s: &State| s.ghost.rolled_back),
            Property::sometimes("the fence refuses the runner's decision", |_, s: &State| {
                s.ghost.runner_fenced
            }),
            Property::sometimes(
                "an in-doubt participant learns the outcome by asking",
                |_, s: &State| s.ghost.learned_by_asking,
            ),
            Property::sometimes("the coordinator crashes and still completes", |m: &Self, s: &State| {
                s.faults_left.coordinator_crashes < m.faults.coordinator_crashes && s.log.completed
            }),
        ]
    }
}

/// A state from which no fault-free run resolves the transaction, and how it was reached.
struct Stuck {
    path: Vec<Action>,
    state: State,
}

struct Liveness {
    states: usize,
    stuck_states: usize,
    first_stuck: Option<Stuck>,
}

/// Liveness once faults stop: from every reachable state, a run without faults reaches a resolved
/// state (every participant that prepared has committed or aborted, no prepare left in flight,
/// the log completed). Resolved states only lead to resolved states, so in this finite graph,
/// under fairness (an action enabled again and again is eventually taken), every run whose
/// faults stop ends resolved. Walks the whole graph, then back from the resolved states along
/// fault-free edges; a state not reached back is a counterexample.
fn check_liveness(model: &TwoPhaseCommit) -> Liveness {
    let init = model.init_states().remove(0);
    let mut ids: HashMap<u128, u32> = HashMap::new();
    let mut parent: Vec<Option<(u32, Action)>> = vec![None];
    let mut resolved = vec![model.resolved(&init)];
    let mut edges: Vec<(u32, u32)> = Vec::new();
    let mut queue = VecDeque::from([(init.clone(), 0u32)]);
    ids.insert(model.canonical(&init), 0);
    let mut actions = Vec::new();
    while let Some((s, id)) = queue.pop_front() {
        model.actions(&s, &mut actions);
        for action in actions.drain(..) {
            let Some(next) = model.next_state(&s, action) else {
                continue;
            };
            let key = model.canonical(&next);
            let next_id = match ids.get(&key) {
                Some(&i) => i,
                None => {
                    let i = u32::try_from(parent.len()).unwrap();
                    parent.push(Some((id, action)));
                    resolved.push(model.resolved(&next));
                    ids.insert(key, i);
                    queue.push_back((next, i));
                    i
                }
            };
            if !action.is_fault() {
                assert!(
                    !resolved[id as usize] || resolved[next_id as usize],
                    "{action:?} undoes the resolution of {s:?}"
                );
                edges.push((next_id, id));
            }
        }
    }
    drop(ids);
    // Predecessors grouped by state (a counting sort of the edges by their target).
    let n = parent.len();
    let mut start = vec![0usize; n + 1];
    for &(to, _) in &edges {
        start[to as usize + 1] += 1;
    }
    for i in 0..n {
        start[i + 1] += start[i];
    }
    let mut fill = start.clone();
    let mut preds = vec![0u32; edges.len()];
    for &(to, from) in &edges {
        preds[fill[to as usize]] = from;
        fill[to as usize] += 1;
    }
    drop(edges);
    let mut live = resolved.clone();
    let mut back: VecDeque<usize> = (0..n).filter(|&i| live[i]).collect();
    while let Some(to) = back.pop_front() {
        for &from in &preds[start[to]..start[to + 1]] {
            if !live[from as usize] {
                live[from as usize] = true;
                back.push_back(from as usize);
            }
        }
    }
    let stuck_states = live.iter().filter(|l| !**l).count();
    let first_stuck = live.iter().position(|l| !*l).map(|mut i| {
        let mut path = Vec::new();
        while let Some((p, a)) = parent[i] {
            path.push(a);
            i = p as usize;
        }
        path.reverse();
        let mut state = model.init_states().remove(0);
        for a in &path {
            state = model.next_state(&state, *a).unwrap();
        }
        Stuck { path, state }
    });
    Liveness {
        states: n,
        stuck_states,
        first_stuck,
    }
}

/// Up to eight faults in one run.
const FAULTS: Faults = Faults {
    coordinator_crashes: 2,
    takeovers: 1,
    participant_crashes: 1,
    losses: 2,
    duplicates: 2,
};

/// One fault of each kind: enough for every broken variant to show.
const ONE_EACH: Faults = Faults {
    coordinator_crashes: 1,
    takeovers: 1,
    participant_crashes: 1,
    losses: 1,
    duplicates: 1,
};

/// Runs the checker over every property and the liveness walk, asserts both, and returns the
/// number of unique states.
fn check_everything(model: TwoPhaseCommit) -> usize {
    let started = Instant::now();
    let live = check_liveness(&model);
    let liveness_time = started.elapsed();
    if let Some(stuck) = &live.first_stuck {
        panic!(
            "{} states cannot resolve once faults stop; the first after {:?}: {:#?}",
            live.stuck_states, stuck.path, stuck.state
        );
    }
    let started = Instant::now();
    let symmetry = model.symmetry();
    let checker = model.checker().symmetry_fn(symmetry).spawn_dfs().join();
    checker.assert_properties();
    let unique = checker.unique_state_count();
    println!(
        "stateright: {unique} unique states ({} generated, depth {}) in {:.1?}; liveness walk: {} states in {:.1?}",
        checker.state_count(),
        checker.max_depth(),
        started.elapsed(),
        live.states,
        liveness_time,
    );
    assert_eq!(unique, live.states, "both walks see the same graph");
    unique
}

#[test]
fn two_participants_stay_atomic_and_resolve_under_every_interleaving_of_faults() {
    let states = check_everything(TwoPhaseCommit::new(2, FAULTS));
    assert!(
        states > 500_000,
        "only {states} states: the model does not explore what it claims"
    );
}

#[test]
fn three_participants_stay_atomic_and_resolve_under_every_interleaving_of_faults() {
    // Fewer faults than with two participants, to stay well within a minute in a debug build.
    let faults = Faults {
        duplicates: 0,
        ..ONE_EACH
    };
    let states = check_everything(TwoPhaseCommit::new(3, faults));
    assert!(
        states > 200_000,
        "only {states} states: the model does not explore what it claims"
    );
}

/// The other way to leave no late prepare in doubt: no tombstones, but a resolver loop.
#[test]
fn a_participant_that_keeps_asking_while_in_doubt_needs_no_tombstones() {
    let kit = Kit {
        asks_while_in_doubt: true,
        abort_leaves_tombstone: false,
    };
    let faults = Faults {
        duplicates: 0,
        ..ONE_EACH
    };
    let states = check_everything(TwoPhaseCommit::new(2, faults).with_kit(kit));
    assert!(
        states > 100_000,
        "only {states} states: the model does not explore what it claims"
    );
}

/// Checks a broken model until one of `expected` is found, and returns the counterexample.
fn counterexample(model: TwoPhaseCommit, expected: &'static str) -> Vec<Action> {
    let checker = model
        .checker()
        .finish_when(HasDiscoveries::AnyOf(BTreeSet::from([expected])))
        .spawn_bfs()
        .join();
    let path = checker
        .discovery(expected)
        .unwrap_or_else(|| panic!("the checker missed the bug: no counterexample to {expected:?}"));
    let actions = path.into_actions();
    println!("{expected}: {actions:?}");
    actions
}

#[test]
fn a_coordinator_that_sends_commit_before_logging_is_caught() {
    let model = || TwoPhaseCommit::new(2, ONE_EACH).with_bug(Bug::SendsCommitBeforeLogging);
    counterexample(model(), "no commit is sent before the decision is logged");
    let path = counterexample(
        model(),
        "atomicity: never one participant committed and another aborted",
    );
    // The early commit races a presumed abort: the runner crashed, or another node took over.
    assert!(
        path.iter()
            .any(|a| matches!(a, Action::CrashCoordinator | Action::Takeover)),
        "{path:?}"
    );
}

#[test]
fn a_coordinator_whose_decision_is_not_fenced_is_caught() {
    let model = || TwoPhaseCommit::new(2, ONE_EACH).with_bug(Bug::Unfenced);
    let path = counterexample(model(), "the decision is logged once and never changes");
    assert!(path.contains(&Action::Takeover), "{path:?}");
    counterexample(
        model(),
        "atomicity: never one participant committed and another aborted",
    );
}

#[test]
fn a_coordinator_that_answers_aborted_without_logging_it_is_caught() {
    let model = TwoPhaseCommit::new(2, ONE_EACH).with_bug(Bug::AnswersAbortWithoutLogging);
    counterexample(model, "atomicity: never one participant committed and another aborted");
}

#[test]
fn a_participant_that_forgets_its_prepared_work_on_a_crash_is_caught() {
    let model = TwoPhaseCommit::new(2, ONE_EACH).with_bug(Bug::ForgetsPreparedOnCrash);
    counterexample(model, "atomicity: never one participant committed and another aborted");
}

#[test]
fn a_coordinator_that_does_not_redeliver_phase_two_is_caught() {
    let faults = Faults {
        coordinator_crashes: 0,
        takeovers: 0,
        participant_crashes: 0,
        losses: 1,
        duplicates: 0,
    };
    let model = || TwoPhaseCommit::new(2, faults).with_bug(Bug::NoRedelivery);
    counterexample(model(), "a quiescent system has resolved every participant");
    let live = check_liveness(&model());
    let stuck = live
        .first_stuck
        .expect("a lost phase-2 message leaves a participant in doubt");
    println!("no redelivery, stuck after {:?}: {:?}", stuck.path, stuck.state);
    assert!(
        stuck.path.iter().any(|a| matches!(a, Action::Lose(Msg::Phase2(..)))),
        "{:?}",
        stuck.path
    );
}

/// Why the kit remembers aborts: a prepare that arrives after the abort (the coordinator's deadline
/// passed while the participant was slow) prepares work nobody will ever resolve, unless the
/// participant remembers the abort or keeps asking while in doubt.
#[test]
fn a_participant_that_forgets_aborts_and_asks_only_when_it_restarts_can_stay_in_doubt_forever() {
    let faults = Faults {
        coordinator_crashes: 0,
        takeovers: 0,
        participant_crashes: 0,
        losses: 0,
        duplicates: 0,
    };
    let kit = Kit {
        asks_while_in_doubt: false,
        abort_leaves_tombstone: false,
    };
    let live = check_liveness(&TwoPhaseCommit::new(2, faults).with_kit(kit));
    let stuck = live.first_stuck.expect("a late prepare stays in doubt");
    println!("asks only on restart, stuck after {:?}: {:?}", stuck.path, stuck.state);
    assert!(stuck.state.participants.iter().any(|q| q.local == Local::Prepared));
    assert_eq!(stuck.state.log.decision, Some(Outcome::Aborted));
}
