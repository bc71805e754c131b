//! The two-phase-commit coordinator of a node: protocol messages over HTTP, and the worker that
//! delivers phase 2 until every participant acknowledged and recovers transactions whose
//! coordinator died.

pub mod participants;
pub mod runner;

pub use participants::HttpTxParticipants;
pub use runner::TxRunner;
