//! The saga runner of a node: participant calls over HTTP, and the worker that claims due sagas
//! and drives them.

pub mod batch;
pub mod participants;
pub mod runner;

pub use participants::HttpParticipants;
pub use runner::SagaRunner;
