//! Sagas: definitions (validated, versioned, templated HTTP calls) and the pure state machine
//! that runs them.

pub mod callback;
pub mod definition;
pub mod machine;

pub use concord_kernel::{DERIVED_PREFIX, InvalidSagaId, SagaId};
pub use definition::{
    Condition, ConditionTest, DefinitionError, DefinitionSpec, HttpCall, OnTimeout, RetryPolicy, RetrySpec,
    SagaDefinition, SagaLimits, SagaSecrets, SecretBinding, StepSpec, TemplateContext, Wait, WaitSpec, WhenSpec,
    WhenTest,
};
pub use machine::{
    ActionStatus, CallOutcome, CallResult, Decision, FoundSignal, Op, SagaEvent, SagaOperation, SagaState, SagaStatus,
    decide, on_callback, on_outcome, on_signal, operation_event, round_order, signal_places, signal_sequence,
};

/// The stream that keeps the operations operators asked of a saga, in order (its versions); the
/// saga records each in its log when it comes to it. No signal name has a `.` and no completion
/// stream starts with one, so it is neither.
#[must_use]
pub fn operations_stream(id: &SagaId) -> String {
    format!("saga-{id}@.operations")
}

/// The event-store stream that holds a saga's log.
#[must_use]
pub fn log_stream(id: &SagaId) -> String {
    format!("saga-{id}")
}

/// The stream that keeps the one completion of an asynchronous action's attempt (step index
/// and attempt: no signal name has a `.`, so it is no signal's stream).
#[must_use]
pub fn callback_stream(id: &SagaId, step: usize, attempt: u32) -> String {
    format!("saga-{id}@{step}.{attempt}")
}

/// The stream that keeps the signals of one name sent to a saga, in the order they came (its
/// versions). `@` is in no saga id and no signal name, so no saga's log has this name; it is in
/// the `saga` category, which only Concord writes.
#[must_use]
pub fn signal_stream(id: &SagaId, signal: &str) -> String {
    format!("saga-{id}@{signal}")
}
