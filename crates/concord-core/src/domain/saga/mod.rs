//! Sagas: definitions (validated, versioned, templated HTTP calls) and the pure state machine
//! that runs them.

pub mod definition;
pub mod machine;

pub use concord_kernel::{DERIVED_PREFIX, InvalidSagaId, SagaId};
pub use definition::{
    Condition, ConditionTest, DefinitionError, DefinitionSpec, HttpCall, RetryPolicy, RetrySpec, SagaDefinition,
    SagaLimits, SagaSecrets, SecretBinding, StepSpec, TemplateContext, WhenSpec, WhenTest,
};
pub use machine::{CallOutcome, CallResult, Decision, Op, SagaEvent, SagaState, SagaStatus, decide, on_outcome};

/// The event-store stream that holds a saga's log.
#[must_use]
pub fn log_stream(id: &SagaId) -> String {
    format!("saga-{id}")
}
