//! The saga state machine, model-checked exhaustively with `stateright` (issue 20, item 5): one
//! saga of a definition with an asynchronous action, a wait for a signal, a step with a `when`
//! condition, a durable timer and a plain action; one participant behind an idempotency barrier;
//! a signal sender; the clock; and a node that crashes (its unflushed records are lost, a call in
//! flight may or may not have taken effect, the lease runs out and a node claims the saga again).
//!
//! The driver runs the real logic of `concord_core::domain::saga`: each of its steps is one
//! [`decide`], resolved through [`on_signal`] and [`on_callback`] as the engine resolves it, every
//! record folded through [`SagaState::apply`], every call's result turned into its record by
//! [`on_outcome`]. It flushes where the engine flushes (before a call, before it parks, at the
//! end), fences a claimed saga with `SagaResumed` as the engine does, releases a parked saga and
//! looks once more for what woke it, and closes an attempt's completion stream before it records
//! another result. The signal and completion senders check what `SagaEngine::signal` and
//! `SagaEngine::complete` check, against the durable log.
//!
//! Properties (`always` unless said): the log holds at most one terminal record and nothing after
//! it; a compensated saga left no effect standing and compensated each step that took effect or
//! may have, exactly once; a completed saga's called steps all stand; no compensation starts
//! while its action's attempt is unknown (a call in flight, or a 202 not completed); a skipped
//! step is never called nor compensated; a completion Concord answered 202 is the result recorded
//! for its attempt; a state with nothing left to do is a finished saga. The interesting cases are
//! `sometimes` properties, and `a_driver_that_...` tests break one rule on purpose and assert the
//! checker finds it, so the properties cannot pass vacuously.
//!
//! A second run takes a definition with a parallel group of two branches between two steps: a
//! round's calls are answered one by one and recorded together, in the engine's order. A third
//! lets an operator cancel, pause and resume. A fourth gives the participant host a circuit
//! breaker that opens at any moment: the driver asks it before anything is recorded for a call,
//! holds the saga back (parked, due at the probe's time) while it is open, lets one call probe
//! past that time, and a success (the saga's own probe, or another saga's) closes it and wakes
//! the sagas parked on the host; `IgnoresBreaker` checks the property can fail. Parking and
//! releasing are one step here; the engine closes the gap between them by asking the host again
//! after the release (`still_down`), which the model's `Recheck` mirrors.
//!
//! Left out: two live drivers at once (a stalled node whose lease another took over; the log's
//! expected-version fence that stops it is the same one the two-phase-commit model checks, and
//! `a_node_that_lost_its_lease_records_nothing_more` tests).
//!
//! `cargo test -p concord-core --test saga_model -- --nocapture` prints the state counts.

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::time::Instant;

use chrono::{DateTime, Utc};
use concord_core::domain::saga::machine::{ActionStatus, CompensationStatus};
use concord_core::domain::saga::{
    CallOutcome, CallResult, Decision, FoundSignal, Op, SagaDefinition, SagaEvent, SagaId, SagaLimits, SagaOperation,
    SagaState, SagaStatus, decide, on_callback, on_outcome, on_signal, operation_event, round_order, signal_places,
};
use serde_json::{Value, json};
use stateright::{Checker, HasDiscoveries, Model, Property};

/// Steps of the modelled definition, by index.
const A: usize = 0; // asynchronous action (202 allowed), compensable
// 1: waits for signal "go"
const B: usize = 2; // action with `when: {{input.express}}`, compensable
// 3: durable timer
const C: usize = 4; // action, compensable
const STEPS: usize = 5;
const CALLS: [usize; 3] = [A, B, C];

fn definition() -> SagaDefinition {
    let call = |name: &str| json!({"method": "POST", "url": format!("http://p.test/{name}")});
    let once = json!({"max_attempts": 1});
    let spec = json!({"steps": [
        {"name": "a", "action": call("a"), "compensation": call("a-undo"), "callback_timeout_ms": 100,
         "retry": {"max_attempts": 2, "backoff_ms": 10, "max_backoff_ms": 10, "jitter": 0.0}},
        {"name": "w", "wait": {"signal": "go", "timeout_ms": 100}},
        {"name": "b", "when": "{{input.express}}", "action": call("b"), "compensation": call("b-undo"), "retry": once},
        {"name": "t", "sleep_ms": 50},
        {"name": "c", "action": call("c"), "compensation": call("c-undo"), "retry": once}
    ], "compensation_retry": {"max_attempts": 2, "backoff_ms": 10, "max_backoff_ms": 10, "jitter": 0.0}});
    SagaDefinition::new("m", 1, serde_json::from_value(spec).unwrap(), &SagaLimits::default()).unwrap()
}

/// The second definition: a parallel group of two compensable calls between two steps, and a
/// hold (a wait that goes on at its timeout) before the last.
fn group_definition() -> SagaDefinition {
    let call = |name: &str| json!({"method": "POST", "url": format!("http://p.test/{name}")});
    let step = |name: &str, attempts: u32| {
        json!({"name": name, "action": call(name), "compensation": call(&format!("{name}-undo")),
               "retry": {"max_attempts": attempts, "backoff_ms": 10, "max_backoff_ms": 10, "jitter": 0.0}})
    };
    let spec = json!({"steps": [
        step("a", 1),
        {"name": "g", "parallel": [step("x", 2), step("y", 2)]},
        {"name": "h", "wait": {"signal": "go", "timeout_ms": 100, "on_timeout": "continue"}},
        step("c", 1)
    ], "compensation_retry": {"max_attempts": 2, "backoff_ms": 10, "max_backoff_ms": 10, "jitter": 0.0}});
    SagaDefinition::new("m", 1, serde_json::from_value(spec).unwrap(), &SagaLimits::default()).unwrap()
}

/// The third definition, for the operator: an asynchronous action then a plain one.
fn operator_definition() -> SagaDefinition {
    let call = |name: &str| json!({"method": "POST", "url": format!("http://p.test/{name}")});
    let spec = json!({"steps": [
        {"name": "a", "action": call("a"), "compensation": call("a-undo"), "callback_timeout_ms": 100,
         "retry": {"max_attempts": 2, "backoff_ms": 10, "max_backoff_ms": 10, "jitter": 0.0}},
        {"name": "c", "action": call("c"), "compensation": call("c-undo"), "retry": {"max_attempts": 1}}
    ], "compensation_retry": {"max_attempts": 2, "backoff_ms": 10, "max_backoff_ms": 10, "jitter": 0.0}});
    SagaDefinition::new("m", 1, serde_json::from_value(spec).unwrap(), &SagaLimits::default()).unwrap()
}

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000, 0).unwrap()
}

fn at(ms: u32) -> DateTime<Utc> {
    t0() + chrono::Duration::milliseconds(i64::from(ms))
}

fn ms(t: DateTime<Utc>) -> u32 {
    u32::try_from((t - t0()).num_milliseconds()).unwrap()
}

/// What a step's effects came to at the participant, behind its barrier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Effect {
    None,
    Done,
    Undone,
    /// The compensation came first: the action is refused for good.
    Blocked,
}

/// What a completion stream holds: a posted completion, or the saga's close.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Slot {
    Posted(Posted),
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Posted {
    Succeeded,
    Refused,
    Failed,
}

impl Posted {
    fn outcome(self) -> CallOutcome {
        match self {
            Self::Succeeded => CallOutcome::Succeeded(json!({})),
            Self::Refused => CallOutcome::Refused("no".into()),
            Self::Failed => CallOutcome::Unusable("failed".into()),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Phase {
    Deciding,
    /// A participant call in flight; `url`: it carried a completion URL.
    Calling {
        step: usize,
        op: Op,
        attempt: u32,
        started: u32,
        url: bool,
    },
    /// Parked: released, about to look once more for a signal or completion that came.
    Released,
    /// A parallel group's round: every call in flight at once; the participant answers them in
    /// order (the results are recorded together, so the order of answers changes nothing).
    Round {
        calls: Vec<(usize, Op, u32)>,
        done: Vec<SagaEvent>,
        started: u32,
    },
}

impl Phase {
    /// The call the participant answers next: (step, op, attempt, started, carries a URL).
    fn current(&self, def: &SagaDefinition) -> Option<(usize, Op, u32, u32, bool)> {
        match self {
            Self::Calling {
                step,
                op,
                attempt,
                started,
                url,
            } => Some((*step, *op, *attempt, *started, *url)),
            Self::Round { calls, done, started } => {
                let (step, op, attempt) = *calls.get(done.len())?;
                let url = op == Op::Action && def.steps[step].callback_timeout.is_some();
                Some((step, op, attempt, *started, url))
            }
            Self::Deciding | Self::Released => None,
        }
    }
}

/// A node's drive of the saga (volatile: a crash loses it and its unflushed records).
#[derive(Clone, Debug, PartialEq)]
struct Driver {
    pending: Vec<SagaEvent>,
    fence: bool,
    phase: Phase,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct Ghost {
    compensated_unknown: bool,
    /// An attempt started while the saga, as its driver saw it, was paused.
    started_while_paused: bool,
    /// An action attempt started after the saga recorded its cancel.
    acted_after_cancel: bool,
    /// A call started with an operation asked and not yet recorded.
    blind_call: bool,
    skipped_touched: bool,
    late_completion_refused: bool,
    crashed: bool,
    /// A call started while its host's breaker was open, before the probe's time.
    called_while_open: bool,
    /// The breaker held a call of the saga back.
    held_back: bool,
    /// The host came back while the saga waited for it, which woke it before its probe time.
    woken_by_recovery: bool,
    /// A failed probe opened the breaker again.
    reopened: bool,
}

#[derive(Clone, Debug, PartialEq)]
struct State {
    /// The durable saga log.
    log: Vec<SagaEvent>,
    /// The saga row: when it is due, and whether a node holds it.
    next_run: Option<u32>,
    held: bool,
    driver: Option<Driver>,
    now: u32,
    effects: [Effect; STEPS],
    /// The participant refused the step's action: it keeps that answer for its Idempotency-Key.
    refused: [bool; STEPS],
    /// Signal "go" kept.
    signal: bool,
    /// Completion streams by (step, attempt).
    slots: Vec<((usize, u32), Slot)>,
    /// The participant owes a completion for this attempt (it accepted, or may yet).
    owed: Option<(usize, u32)>,
    /// The saga's operations stream: what the operator asked, in order.
    ops: Vec<SagaOperation>,
    /// The participant host's breaker: open until then (the probe's time).
    open_until: Option<u32>,
    /// This saga's call is the half-open probe.
    probe: bool,
    /// The saga is noted as waiting for its host (woken when the host comes back).
    parked: bool,
    trips_left: u8,
    crashes_left: u8,
    transients_left: u8,
    ghost: Ghost,
}

impl Hash for State {
    fn hash<H: Hasher>(&self, h: &mut H) {
        format!("{self:?}").hash(h);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Answer {
    Ok,
    Refuse,
    /// 5xx or a timeout; `effect`: it took effect anyway.
    Transient {
        effect: bool,
    },
    /// 202 (asynchronous steps only).
    Accept,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Action {
    Claim,
    Decide,
    /// Decides without looking for operations first: the engine looks at most every
    /// `operations_poll` between calls, so a call may start with an operation waiting.
    DecideBlind,
    /// The operator asks this of the saga.
    Ask(SagaOperation),
    Recheck,
    Answer(Answer),
    PostCompletion(Posted),
    SendSignal,
    Crash {
        effect: bool,
    },
    Tick,
    /// Calls of other sagas failed: the host's breaker opens.
    Trip,
    /// Another saga's probe succeeded: the breaker closes and wakes the sagas parked on it.
    Recover,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bug {
    /// A completion that never came refuses the step instead of making it uncertain.
    RefusesOnCallbackTimeout,
    /// A synchronous answer to a call that carried a completion URL is recorded without closing
    /// the attempt's completion stream.
    NoCloseBeforeSyncResult,
    /// The driver calls without asking the host's breaker.
    IgnoresBreaker,
}

struct SagaModel {
    def: SagaDefinition,
    /// The steps that are calls, for the properties.
    calls: Vec<usize>,
    /// The definition with a parallel group instead of the asynchronous action, wait and timer.
    group: bool,
    id: SagaId,
    crashes: u8,
    transients: u8,
    bug: Option<Bug>,
    /// An operator may cancel, pause and resume the saga (each once).
    operator: bool,
    /// The participant host has a circuit breaker that may open (once).
    breaker: bool,
}

impl SagaModel {
    fn new(crashes: u8, transients: u8) -> Self {
        Self {
            def: definition(),
            calls: CALLS.to_vec(),
            group: false,
            id: SagaId::parse("s").unwrap(),
            crashes,
            transients,
            bug: None,
            operator: false,
            breaker: false,
        }
    }

    /// The model with the participant host's circuit breaker, over the third definition: it
    /// opens at any moment (other sagas' calls failed), holds this saga's calls back until its
    /// probe time, lets one call probe, and closes on the probe's success (this saga's or
    /// another's, which wakes the sagas parked on the host).
    fn with_breaker(mut self) -> Self {
        self.def = operator_definition();
        self.calls = vec![0, 1];
        self.breaker = true;
        self
    }

    /// Wakes the saga if it is parked on the host: `wake_parked` makes a row due now unless it
    /// is held or due already, and forgets the parking either way.
    fn wake_parked(s: &mut State) -> bool {
        if !std::mem::take(&mut s.parked) {
            return false;
        }
        if !s.held
            && let Some(t) = s.next_run
            && t > s.now
        {
            s.next_run = Some(s.now);
            return true;
        }
        false
    }

    /// The model with an operator who may cancel, pause and resume the saga, over the third
    /// definition.
    fn with_operator(mut self) -> Self {
        self.def = operator_definition();
        self.calls = vec![0, 1];
        self.operator = true;
        self
    }

    /// Operations asked that the log has not come to.
    fn ops_waiting(s: &State, st: &SagaState) -> bool {
        s.ops.len() as u64 > st.operations
    }

    /// The saga as it will be once its log comes to every operation asked (what `operate`
    /// checks a new one against).
    fn after_ops(&self, s: &State) -> SagaState {
        let mut st = self.fold(&s.log);
        for (i, op) in s.ops.iter().enumerate().skip(st.operations as usize) {
            let e = operation_event(*op, i as u64 + 1, None, &st, at(s.now));
            st.apply(&self.def, &e).expect("an operation event always folds");
        }
        st
    }

    /// What `take_operations` does: each operation asked and not yet recorded, in order (a
    /// cancel first settles a 202 that waits for its completion, closing its stream).
    fn take_ops(&self, s: &mut State, st: &mut SagaState) -> Option<Vec<SagaEvent>> {
        let mut events = Vec::new();
        let asked: Vec<SagaOperation> = s.ops.iter().skip(st.operations as usize).copied().collect();
        for op in asked {
            let sequence = st.operations + 1;
            if op == SagaOperation::Cancel && op.refusal(st).is_none() {
                let waiting = st
                    .steps
                    .iter()
                    .enumerate()
                    .find_map(|(i, x)| x.callback.map(|c| (i, c.attempt)));
                if let Some((step, attempt)) = waiting
                    && let Some(found) = self.close(s, (step, attempt))
                    && let Decision::Record(e) = on_callback(&self.def, st, step, Some(found), at(s.now), 0.5)
                {
                    st.apply(&self.def, &e).ok()?;
                    events.push(e);
                }
            }
            let e = operation_event(op, sequence, None, st, at(s.now));
            st.apply(&self.def, &e).ok()?;
            events.push(e);
        }
        Some(events)
    }

    /// The model over the definition with a parallel group.
    fn with_group(mut self) -> Self {
        self.def = group_definition();
        self.calls = vec![0, 1, 2, 4];
        self.group = true;
        self
    }

    fn with_bug(mut self, bug: Bug) -> Self {
        self.bug = Some(bug);
        self
    }

    fn fold(&self, events: &[SagaEvent]) -> SagaState {
        SagaState::from_log(&self.id, &self.def, events).expect("the model's log always folds")
    }

    /// What the driver sees: the durable log and its own unflushed records.
    fn seen(&self, s: &State) -> SagaState {
        let mut events = s.log.clone();
        if let Some(d) = &s.driver {
            events.extend(d.pending.iter().cloned());
        }
        self.fold(&events)
    }

    fn slot(s: &State, key: (usize, u32)) -> Option<Slot> {
        s.slots.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    fn posted(s: &State, key: (usize, u32)) -> Option<CallOutcome> {
        match Self::slot(s, key) {
            Some(Slot::Posted(p)) => Some(p.outcome()),
            _ => None,
        }
    }

    /// Closes an attempt's completion stream unless a completion got there first, which then
    /// stands (what `close_completion` does).
    fn close(&self, s: &mut State, key: (usize, u32)) -> Option<CallOutcome> {
        match Self::slot(s, key) {
            None => {
                s.slots.push((key, Slot::Closed));
                None
            }
            Some(_) => Self::posted(s, key),
        }
    }

    /// The engine's decision, resolved as `drive_inner` resolves it.
    fn resolve(&self, s: &mut State, st: &SagaState) -> Decision {
        let now = at(s.now);
        match decide(&self.def, st, now) {
            Decision::Await { step, sequence, .. } => {
                let found = (s.signal && sequence == 1).then(|| FoundSignal {
                    payload: json!({"ok": true}),
                    by: None,
                });
                on_signal(&self.def, st, step, found, now)
            }
            Decision::AwaitCallback { step, attempt } => {
                let found = Self::posted(s, (step, attempt));
                match on_callback(&self.def, st, step, found, now, 0.5) {
                    Decision::Record(SagaEvent::ActionFailed { .. }) => {
                        let late = self.close(s, (step, attempt));
                        match on_callback(&self.def, st, step, late, now, 0.5) {
                            Decision::Record(SagaEvent::ActionFailed {
                                step,
                                attempt,
                                started_at,
                                error,
                                at,
                                ..
                            }) if self.bug == Some(Bug::RefusesOnCallbackTimeout) => {
                                Decision::Record(SagaEvent::ActionRefused {
                                    step,
                                    attempt,
                                    started_at,
                                    error,
                                    at,
                                })
                            }
                            d => d,
                        }
                    }
                    d => d,
                }
            }
            d => d,
        }
    }

    fn flush(s: &mut State) {
        if let Some(d) = &mut s.driver {
            s.log.append(&mut d.pending);
        }
    }

    fn apply_action(s: &mut State, step: usize) -> bool {
        match s.effects[step] {
            Effect::None | Effect::Done => {
                s.effects[step] = Effect::Done;
                true
            }
            Effect::Undone | Effect::Blocked => false,
        }
    }

    fn terminal(&self, s: &State) -> bool {
        s.driver.is_none() && self.fold(&s.log).status.is_terminal()
    }
}

impl Model for SagaModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        [true, false]
            .into_iter()
            .map(|express| State {
                log: vec![SagaEvent::SagaStarted {
                    definition: "m".into(),
                    version: 1,
                    input: json!({"express": express}),
                    at: t0(),
                }],
                next_run: Some(0),
                held: false,
                driver: None,
                now: 0,
                effects: [Effect::None; STEPS],
                refused: [false; STEPS],
                signal: false,
                slots: Vec::new(),
                owed: None,
                ops: Vec::new(),
                open_until: None,
                probe: false,
                parked: false,
                trips_left: u8::from(self.breaker),
                crashes_left: self.crashes,
                transients_left: self.transients,
                ghost: Ghost::default(),
            })
            .collect()
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        match &s.driver {
            None => {
                if !s.held && s.next_run.is_some_and(|t| t <= s.now) {
                    actions.push(Action::Claim);
                }
                if let Some(t) = s.next_run
                    && t > s.now
                {
                    actions.push(Action::Tick);
                }
            }
            Some(d) => {
                match d.phase.current(&self.def) {
                    None if d.phase == Phase::Deciding => {
                        actions.push(Action::Decide);
                        if self.operator && Self::ops_waiting(s, &self.seen(s)) {
                            actions.push(Action::DecideBlind);
                        }
                    }
                    None => actions.push(Action::Recheck),
                    Some((ref step, ref op, ..)) => {
                        // A participant keeps its first verdict per Idempotency-Key: once the
                        // action took effect a repeat is that success, once it refused a refusal.
                        let (done, refused) = (s.effects[*step] == Effect::Done, s.refused[*step]);
                        if *op == Op::Compensation || !refused {
                            actions.push(Action::Answer(Answer::Ok));
                        }
                        if *op == Op::Action {
                            if !done {
                                actions.push(Action::Answer(Answer::Refuse));
                            }
                            if self.def.steps[*step].callback_timeout.is_some() && !refused {
                                actions.push(Action::Answer(Answer::Accept));
                            }
                        }
                        if s.transients_left > 0 {
                            actions.push(Action::Answer(Answer::Transient { effect: false }));
                            if *op == Op::Action && !refused {
                                actions.push(Action::Answer(Answer::Transient { effect: true }));
                            }
                        }
                    }
                }
                if s.crashes_left > 0 {
                    actions.push(Action::Crash { effect: false });
                    if matches!(d.phase.current(&self.def), Some((_, Op::Action, ..))) {
                        actions.push(Action::Crash { effect: true });
                    }
                }
            }
        }
        if let Some((step, _)) = s.owed {
            if !s.refused[step] {
                actions.push(Action::PostCompletion(Posted::Succeeded));
            }
            // Only work that took no effect is refused.
            if s.effects[step] == Effect::None {
                actions.push(Action::PostCompletion(Posted::Refused));
            }
            actions.push(Action::PostCompletion(Posted::Failed));
        }
        if !s.signal {
            actions.push(Action::SendSignal);
        }
        if s.trips_left > 0 && s.open_until.is_none() {
            actions.push(Action::Trip);
        }
        if s.open_until.is_some() && !s.probe {
            actions.push(Action::Recover);
        }
        if self.operator {
            let st = self.after_ops(s);
            for op in [SagaOperation::Cancel, SagaOperation::Pause, SagaOperation::Resume] {
                if !s.ops.contains(&op) && op.refusal(&st).is_none() {
                    actions.push(Action::Ask(op));
                }
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        match action {
            Action::Claim => {
                s.held = true;
                s.driver = Some(Driver {
                    pending: Vec::new(),
                    fence: !self.fold(&s.log).status.is_terminal(),
                    phase: Phase::Deciding,
                });
            }
            Action::Tick => s.now = s.next_run?,
            Action::Ask(op) => {
                s.ops.push(op);
                // `wake_saga`: an unfinished saga is due now (a node holding it looks again
                // after it lets it go).
                if !self.fold(&s.log).status.is_terminal() {
                    s.next_run = Some(s.now);
                }
            }
            Action::Decide | Action::DecideBlind => {
                let st = self.seen(&s);
                let decision = self.resolve(&mut s, &st);
                let due = match decision {
                    Decision::Wait(_) | Decision::Park => true,
                    Decision::Call { .. } | Decision::CallAll(_) => action == Action::Decide,
                    _ => false,
                };
                if action == Action::DecideBlind && !matches!(decision, Decision::Call { .. } | Decision::CallAll(_)) {
                    return None;
                }
                if due && Self::ops_waiting(&s, &st) {
                    let mut st = st;
                    let d = s.driver.as_mut()?;
                    if d.fence {
                        let e = SagaEvent::SagaResumed { at: at(s.now) };
                        st.apply(&self.def, &e).ok()?;
                        d.pending.push(e);
                        d.fence = false;
                    }
                    let events = self.take_ops(&mut s, &mut st)?;
                    s.driver.as_mut()?.pending.extend(events);
                    return Some(s);
                }
                // The host's breaker, asked before anything is recorded for the call: open, it
                // holds the saga back (what was pending is flushed, nothing more); past its probe
                // time, this call is the probe.
                if self.breaker
                    && self.bug != Some(Bug::IgnoresBreaker)
                    && matches!(decision, Decision::Call { .. } | Decision::CallAll(_))
                    && let Some(until) = s.open_until
                {
                    if s.now < until {
                        Self::flush(&mut s);
                        s.next_run = Some(until);
                        s.held = false;
                        s.parked = true;
                        s.ghost.held_back = true;
                        s.driver.as_mut()?.phase = Phase::Released;
                        return Some(s);
                    }
                    if s.probe {
                        return None;
                    }
                    s.probe = true;
                }
                if matches!(decision, Decision::Call { .. } | Decision::CallAll(_))
                    && s.open_until.is_some_and(|until| s.now < until)
                {
                    s.ghost.called_while_open = true;
                }
                let d = s.driver.as_mut()?;
                let mut st = st;
                if d.fence
                    && matches!(
                        decision,
                        Decision::Record(_) | Decision::Call { .. } | Decision::CallAll(_)
                    )
                {
                    let e = SagaEvent::SagaResumed { at: at(s.now) };
                    st.apply(&self.def, &e).ok()?;
                    d.pending.push(e);
                    d.fence = false;
                }
                if let Decision::Call { .. } | Decision::CallAll(_) = decision
                    && st.paused
                {
                    s.ghost.started_while_paused = true;
                }
                let acts = match &decision {
                    Decision::Call { op, .. } => *op == Op::Action,
                    Decision::CallAll(calls) => calls.iter().any(|c| c.1 == Op::Action),
                    _ => false,
                };
                if acts && st.cancelled {
                    s.ghost.acted_after_cancel = true;
                }
                if action == Action::DecideBlind {
                    s.ghost.blind_call = true;
                }
                match decision {
                    Decision::Park => {
                        Self::flush(&mut s);
                        s.next_run = None;
                        s.held = false;
                        s.driver.as_mut()?.phase = Phase::Released;
                    }
                    Decision::Record(e) => {
                        if let SagaEvent::StepSkipped { step, .. } = &e
                            && st.steps[*step].action != ActionStatus::Pending
                        {
                            s.ghost.skipped_touched = true;
                        }
                        d.pending.push(e);
                    }
                    Decision::Call { step, op, attempt } => {
                        let this = &st.steps[step];
                        if this.action == ActionStatus::Skipped {
                            s.ghost.skipped_touched = true;
                        }
                        if op == Op::Compensation && (this.action == ActionStatus::Pending || this.callback.is_some()) {
                            s.ghost.compensated_unknown = true;
                        }
                        let url = op == Op::Action && self.def.steps[step].callback_timeout.is_some();
                        d.phase = Phase::Calling {
                            step,
                            op,
                            attempt,
                            started: s.now,
                            url,
                        };
                        Self::flush(&mut s);
                        // The participant may post a completion from the moment it has the URL.
                        if url {
                            s.owed = Some((step, attempt));
                        }
                    }
                    Decision::Wait(until) => {
                        Self::flush(&mut s);
                        s.next_run = Some(ms(until));
                        s.held = false;
                        s.driver.as_mut()?.phase = Phase::Released;
                    }
                    Decision::Done => {
                        Self::flush(&mut s);
                        s.next_run = None;
                        s.held = false;
                        s.driver = None;
                    }
                    Decision::Await { .. } | Decision::AwaitCallback { .. } => unreachable!("resolved"),
                    Decision::CallAll(calls) => {
                        for &(step, op, _) in &calls {
                            let this = &st.steps[step];
                            if this.action == ActionStatus::Skipped {
                                s.ghost.skipped_touched = true;
                            }
                            if op == Op::Compensation
                                && (this.action == ActionStatus::Pending || this.callback.is_some())
                            {
                                s.ghost.compensated_unknown = true;
                            }
                        }
                        d.phase = Phase::Round {
                            calls,
                            done: Vec::new(),
                            started: s.now,
                        };
                        Self::flush(&mut s);
                    }
                }
            }
            Action::Recheck => {
                let st = self.fold(&s.log);
                let arrived = match decide(&self.def, &st, at(s.now)) {
                    Decision::Await { sequence, .. } => s.signal && sequence == 1,
                    Decision::AwaitCallback { step, attempt } => Self::slot(&s, (step, attempt)).is_some(),
                    _ => false,
                } || Self::ops_waiting(&s, &st)
                    // Parked as the host came back: `still_down` says so, and it wakes itself.
                    || (s.parked && s.open_until.is_none());
                if arrived {
                    s.next_run = Some(s.now);
                }
                s.driver = None;
            }
            Action::Answer(answer) => {
                let (step, op, attempt, started, url) = s.driver.as_ref()?.phase.current(&self.def)?;
                let mut outcome = match (op, answer) {
                    (Op::Action, Answer::Ok) => {
                        if Self::apply_action(&mut s, step) {
                            CallOutcome::Succeeded(json!({}))
                        } else {
                            CallOutcome::Refused("compensated already".into())
                        }
                    }
                    (Op::Action, Answer::Refuse) => {
                        s.refused[step] = true;
                        CallOutcome::Refused("no".into())
                    }
                    (Op::Action, Answer::Accept) => CallOutcome::Accepted,
                    (_, Answer::Transient { effect }) => {
                        s.transients_left -= 1;
                        if effect {
                            Self::apply_action(&mut s, step);
                        }
                        CallOutcome::Transient("503".into())
                    }
                    (Op::Compensation, _) => {
                        s.effects[step] = match s.effects[step] {
                            Effect::Done | Effect::Undone => Effect::Undone,
                            Effect::None | Effect::Blocked => Effect::Blocked,
                        };
                        CallOutcome::Succeeded(Value::Null)
                    }
                };
                if outcome != CallOutcome::Accepted {
                    if s.owed == Some((step, attempt)) {
                        s.owed = None;
                    }
                    if url
                        && self.bug != Some(Bug::NoCloseBeforeSyncResult)
                        && let Some(posted) = self.close(&mut s, (step, attempt))
                    {
                        outcome = posted;
                    }
                }
                if std::mem::take(&mut s.probe) {
                    if matches!(outcome, CallOutcome::Transient(_)) {
                        s.open_until = Some(s.now + 20);
                        s.ghost.reopened = true;
                    } else {
                        s.open_until = None;
                        Self::wake_parked(&mut s);
                    }
                }
                let st = self.seen(&s);
                let call = CallResult {
                    step,
                    op,
                    attempt,
                    started_at: at(started),
                    outcome,
                };
                let e = on_outcome(&self.def, &st, call, at(s.now), 0.5);
                let d = s.driver.as_mut()?;
                match &mut d.phase {
                    // A round's results go in together, in the engine's order, once all are back.
                    Phase::Round { calls, done, .. } => {
                        done.push(e);
                        if done.len() == calls.len() {
                            let mut round = std::mem::take(done);
                            round.sort_by_key(round_order);
                            d.pending.extend(round);
                            d.phase = Phase::Deciding;
                        }
                    }
                    _ => {
                        d.pending.push(e);
                        d.phase = Phase::Deciding;
                    }
                }
            }
            Action::PostCompletion(kind) => {
                let (step, attempt) = s.owed?;
                s.owed = None;
                // The participant finished: a success took effect behind its barrier (or, when
                // the compensation came first, could not, and it says so).
                let kind = match kind {
                    Posted::Succeeded if !Self::apply_action(&mut s, step) => Posted::Refused,
                    k => k,
                };
                if kind == Posted::Refused {
                    s.refused[step] = true;
                }
                // What `complete` checks, against the durable log.
                match Self::slot(&s, (step, attempt)) {
                    Some(Slot::Closed) => s.ghost.late_completion_refused = true,
                    Some(Slot::Posted(_)) => {}
                    None => {
                        let st = self.fold(&s.log);
                        let this = &st.steps[step];
                        let started = this.attempts.iter().filter(|a| a.op == Op::Action).count() as u32;
                        let open = st.status == SagaStatus::Running
                            && this.action == ActionStatus::Pending
                            && match this.callback {
                                Some(cb) => cb.attempt == attempt,
                                None => started < attempt,
                            };
                        if open {
                            s.slots.push(((step, attempt), Slot::Posted(kind)));
                            s.next_run = Some(s.now);
                        } else {
                            s.ghost.late_completion_refused = true;
                        }
                    }
                }
            }
            Action::SendSignal => {
                let st = self.fold(&s.log);
                let (_, open) = signal_places(&self.def, &st, "go");
                if open == 0 {
                    return None;
                }
                s.signal = true;
                s.next_run = Some(s.now);
            }
            Action::Trip => {
                s.trips_left -= 1;
                s.open_until = Some(s.now + 20);
            }
            Action::Recover => {
                s.open_until = None;
                if Self::wake_parked(&mut s) {
                    s.ghost.woken_by_recovery = true;
                }
            }
            Action::Crash { effect } => {
                let d = s.driver.take()?;
                if effect && let Some((step, ..)) = d.phase.current(&self.def) {
                    // A participant that refused the key keeps refusing it.
                    if s.refused[step] {
                        return None;
                    }
                    Self::apply_action(&mut s, step);
                }
                s.crashes_left -= 1;
                s.ghost.crashed = true;
                // A probe whose node died: its place runs out and another call probes.
                s.probe = false;
                // The lease runs out; the row is due again.
                s.held = false;
                s.next_run = Some(s.next_run.map_or(s.now, |t| t.min(s.now)));
                if self.fold(&s.log).status.is_terminal() {
                    s.next_run = None;
                }
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let always = vec![
            Property::always("one terminal record, and nothing after it", |_, s: &State| {
                let end = s
                    .log
                    .iter()
                    .position(|e| matches!(e, SagaEvent::SagaCompleted { .. } | SagaEvent::SagaCompensated { .. }));
                end.is_none_or(|i| i == s.log.len() - 1)
            }),
            Property::always(
                "a compensated saga undid each step that took effect or may have, once",
                |m: &Self, s: &State| {
                    let st = m.fold(&s.log);
                    if !matches!(st.status, SagaStatus::Compensated | SagaStatus::Cancelled) {
                        return true;
                    }
                    m.calls.iter().all(|&i| {
                        let owed = matches!(st.steps[i].action, ActionStatus::Succeeded | ActionStatus::Uncertain);
                        let undone = s
                            .log
                            .iter()
                            .filter(|e| matches!(e, SagaEvent::CompensationSucceeded { step, .. } if *step == i))
                            .count();
                        s.effects[i] != Effect::Done
                            && (undone == usize::from(owed))
                            && (!owed || st.steps[i].compensation == CompensationStatus::Succeeded)
                    })
                },
            ),
            Property::always("a completed saga's called steps all stand", |m: &Self, s: &State| {
                let st = m.fold(&s.log);
                st.status != SagaStatus::Completed
                    || m.calls
                        .iter()
                        .all(|&i| st.steps[i].action == ActionStatus::Skipped || s.effects[i] == Effect::Done)
            }),
            Property::always("a paused saga starts no attempt", |_, s: &State| {
                !s.ghost.started_while_paused
            }),
            Property::always(
                "no action starts once a cancel is recorded, and a cancelled saga never completes",
                |m: &Self, s: &State| {
                    let cancelled = s.log.iter().any(|e| matches!(e, SagaEvent::SagaCancelled { .. }));
                    let completed = m.fold(&s.log).status == SagaStatus::Completed;
                    !s.ghost.acted_after_cancel && (!cancelled || !completed)
                },
            ),
            Property::always(
                "no attempt starts while its host's breaker is open, before the probe's time",
                |_, s: &State| !s.ghost.called_while_open,
            ),
            Property::always(
                "no compensation starts while its action's outcome is unknown",
                |_, s: &State| !s.ghost.compensated_unknown,
            ),
            Property::always(
                "a skipped step is never called nor compensated",
                |m: &Self, s: &State| {
                    let st = m.seen(s);
                    !s.ghost.skipped_touched
                        && st.steps.iter().enumerate().all(|(i, step)| {
                            step.action != ActionStatus::Skipped
                                || (step.attempts.is_empty() && s.effects[i] == Effect::None)
                        })
                },
            ),
            Property::always(
                "a completion answered 202 is the result recorded for its attempt",
                |_, s: &State| {
                    s.slots.iter().all(|((step, attempt), slot)| {
                        let Slot::Posted(p) = slot else { return true };
                        s.log.iter().all(|e| match e {
                            SagaEvent::ActionSucceeded {
                                step: i, attempt: n, ..
                            } if (i, n) == (step, attempt) => *p == Posted::Succeeded,
                            SagaEvent::ActionRefused {
                                step: i, attempt: n, ..
                            } if (i, n) == (step, attempt) => *p == Posted::Refused,
                            SagaEvent::ActionFailed {
                                step: i, attempt: n, ..
                            } if (i, n) == (step, attempt) => *p == Posted::Failed,
                            _ => true,
                        })
                    })
                },
            ),
            Property::always(
                "a state with nothing left to do is a finished saga",
                |m: &Self, s: &State| {
                    let mut next = Vec::new();
                    m.actions(s, &mut next);
                    // The senders may still knock, and the operator may cancel or pause; a paused
                    // saga waits for its resume, which counts.
                    next.retain(|a| {
                        !matches!(
                            a,
                            Action::SendSignal
                                | Action::PostCompletion(_)
                                | Action::Ask(SagaOperation::Cancel | SagaOperation::Pause)
                                | Action::Trip
                                | Action::Recover
                        )
                    });
                    !next.is_empty() || m.terminal(s)
                },
            ),
        ];
        if self.group {
            return always
                .into_iter()
                .chain([
                    Property::sometimes("a group completes after a crash mid-round", |m: &Self, s: &State| {
                        s.ghost.crashed && m.fold(&s.log).status == SagaStatus::Completed
                    }),
                    Property::sometimes(
                        "a refused branch's sibling is compensated in the same round as the other",
                        |m: &Self, s: &State| {
                            let st = m.fold(&s.log);
                            st.status == SagaStatus::Compensated
                                && st.steps[1].compensation == CompensationStatus::Succeeded
                                && st.steps[2].action == ActionStatus::Refused
                        },
                    ),
                    Property::sometimes("both branches are compensated", |m: &Self, s: &State| {
                        let st = m.fold(&s.log);
                        st.status == SagaStatus::Compensated
                            && st.steps[1].compensation == CompensationStatus::Succeeded
                            && st.steps[2].compensation == CompensationStatus::Succeeded
                    }),
                    Property::sometimes(
                        "a hold ends at its timeout and the saga completes",
                        |m: &Self, s: &State| {
                            s.log.iter().any(|e| matches!(e, SagaEvent::WaitTimedOut { .. }))
                                && m.fold(&s.log).status == SagaStatus::Completed
                        },
                    ),
                    Property::sometimes(
                        "a signal ends a hold early and the saga completes",
                        |m: &Self, s: &State| {
                            s.log.iter().any(|e| matches!(e, SagaEvent::SignalReceived { .. }))
                                && m.fold(&s.log).status == SagaStatus::Completed
                        },
                    ),
                    Property::always("a hold's timeout never turns the saga back", |m: &Self, s: &State| {
                        let timed_out = s.log.iter().position(|e| matches!(e, SagaEvent::WaitTimedOut { .. }));
                        timed_out.is_none_or(|i| {
                            let st = m.fold(&s.log[..=i]);
                            st.status == SagaStatus::Running && st.steps[3].action == ActionStatus::Succeeded
                        })
                    }),
                ])
                .collect();
        }
        let operator = if self.operator {
            vec![
                Property::sometimes(
                    "a cancel ends the saga cancelled after compensating a step",
                    |m: &Self, s: &State| {
                        m.fold(&s.log).status == SagaStatus::Cancelled
                            && s.log
                                .iter()
                                .any(|e| matches!(e, SagaEvent::CompensationSucceeded { .. }))
                    },
                ),
                Property::sometimes(
                    "a cancel while a 202 waits for its completion compensates it as uncertain",
                    |m: &Self, s: &State| {
                        let st = m.fold(&s.log);
                        st.status == SagaStatus::Cancelled
                            && st.steps[A].action == ActionStatus::Uncertain
                            && st.steps[A].compensation == CompensationStatus::Succeeded
                    },
                ),
                Property::sometimes("a paused saga is resumed and completes", |m: &Self, s: &State| {
                    s.log.iter().any(|e| matches!(e, SagaEvent::SagaUnpaused { .. }))
                        && m.fold(&s.log).status == SagaStatus::Completed
                }),
                Property::sometimes(
                    "an operation that came too late is refused in the log",
                    |_, s: &State| s.log.iter().any(|e| matches!(e, SagaEvent::OperationRefused { .. })),
                ),
                Property::sometimes("a call starts with an operation waiting", |_, s: &State| {
                    s.ghost.blind_call
                }),
                Property::sometimes("a cancelled saga survives a crash", |m: &Self, s: &State| {
                    s.ghost.crashed && m.fold(&s.log).status == SagaStatus::Cancelled
                }),
            ]
        } else {
            Vec::new()
        };
        if self.operator {
            return always.into_iter().chain(operator).collect();
        }
        if self.breaker {
            return always
                .into_iter()
                .chain([
                    Property::sometimes(
                        "a saga held back by an open breaker completes",
                        |m: &Self, s: &State| s.ghost.held_back && m.fold(&s.log).status == SagaStatus::Completed,
                    ),
                    Property::sometimes(
                        "a parked saga is woken when its host comes back, before its probe time",
                        |_, s: &State| s.ghost.woken_by_recovery,
                    ),
                    Property::sometimes(
                        "a failed probe opens the breaker again and the saga still completes",
                        |m: &Self, s: &State| s.ghost.reopened && m.fold(&s.log).status == SagaStatus::Completed,
                    ),
                    Property::sometimes("a saga held back compensates after a refusal", |m: &Self, s: &State| {
                        s.ghost.held_back && m.fold(&s.log).status == SagaStatus::Compensated
                    }),
                ])
                .collect();
        }
        always
            .into_iter()
            .chain([
                Property::sometimes("the saga completes after a crash", |m: &Self, s: &State| {
                    s.ghost.crashed && m.fold(&s.log).status == SagaStatus::Completed
                }),
                Property::sometimes(
                    "a 202 is completed through its URL and the saga completes",
                    |m: &Self, s: &State| {
                        s.log.iter().any(|e| matches!(e, SagaEvent::ActionAccepted { .. }))
                            && m.fold(&s.log).status == SagaStatus::Completed
                    },
                ),
                Property::sometimes("a wait times out and the saga compensates", |m: &Self, s: &State| {
                    s.log.iter().any(|e| matches!(e, SagaEvent::WaitTimedOut { .. }))
                        && m.fold(&s.log).status == SagaStatus::Compensated
                }),
                Property::sometimes(
                    "a skipped step, a signal and a timer in one completed saga",
                    |m: &Self, s: &State| {
                        let has = |f: fn(&SagaEvent) -> bool| s.log.iter().any(f);
                        has(|e| matches!(e, SagaEvent::StepSkipped { .. }))
                            && has(|e| matches!(e, SagaEvent::SignalReceived { .. }))
                            && has(|e| matches!(e, SagaEvent::TimerFired { .. }))
                            && m.fold(&s.log).status == SagaStatus::Completed
                    },
                ),
                Property::sometimes(
                    "an uncertain asynchronous step is compensated",
                    |m: &Self, s: &State| {
                        let st = m.fold(&s.log);
                        st.status == SagaStatus::Compensated && st.steps[A].action == ActionStatus::Uncertain
                    },
                ),
                Property::sometimes("a completion after the close is refused", |_, s: &State| {
                    s.ghost.late_completion_refused
                }),
            ])
            .collect()
    }
}

fn check(model: SagaModel) -> usize {
    let started = Instant::now();
    let checker = model.checker().spawn_bfs().join();
    checker.assert_properties();
    let unique = checker.unique_state_count();
    println!(
        "stateright: {unique} unique states ({} generated, depth {}) in {:.1?}",
        checker.state_count(),
        checker.max_depth(),
        started.elapsed()
    );
    unique
}

fn counterexample(model: SagaModel, expected: &'static str) -> Vec<Action> {
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
fn every_saga_ends_once_and_compensates_what_may_have_taken_effect_under_crashes_and_faults() {
    let states = check(SagaModel::new(2, 1));
    assert!(
        states > 100_000,
        "only {states} states: the model does not explore what it claims"
    );
}

#[test]
fn a_parallel_group_compensates_its_branches_together_under_crashes_and_faults() {
    let states = check(SagaModel::new(2, 1).with_group());
    assert!(
        states > 10_000,
        "only {states} states: the model does not explore what it claims"
    );
}

#[test]
fn an_operator_cancels_pauses_and_resumes_under_crashes_and_faults() {
    let states = check(SagaModel::new(1, 0).with_operator());
    assert!(
        states > 100_000,
        "only {states} states: the model does not explore what it claims"
    );
}

#[test]
fn an_open_breaker_holds_calls_back_without_spending_attempts_under_crashes_and_faults() {
    let states = check(SagaModel::new(1, 1).with_breaker());
    assert!(
        states > 10_000,
        "only {states} states: the model does not explore what it claims"
    );
}

#[test]
fn a_driver_that_calls_past_an_open_breaker_is_caught() {
    let path = counterexample(
        SagaModel::new(0, 0).with_breaker().with_bug(Bug::IgnoresBreaker),
        "no attempt starts while its host's breaker is open, before the probe's time",
    );
    assert!(path.contains(&Action::Trip), "{path:?}");
}

#[test]
fn a_driver_that_refuses_a_step_whose_completion_never_came_is_caught() {
    let path = counterexample(
        SagaModel::new(0, 0).with_bug(Bug::RefusesOnCallbackTimeout),
        "a compensated saga undid each step that took effect or may have, once",
    );
    assert!(path.contains(&Action::Answer(Answer::Accept)), "{path:?}");
}

#[test]
fn a_driver_that_records_a_synchronous_answer_without_closing_the_completion_url_is_caught() {
    let path = counterexample(
        SagaModel::new(0, 1).with_bug(Bug::NoCloseBeforeSyncResult),
        "a completion answered 202 is the result recorded for its attempt",
    );
    assert!(path.iter().any(|a| matches!(a, Action::PostCompletion(_))), "{path:?}");
}
