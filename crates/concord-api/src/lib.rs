//! Request and response bodies of Concord's HTTP API v1 and the table of error codes, shared by
//! the server (which answers them) and the sdk (which sends and parses them).

pub mod error;
pub mod events;
pub mod keys;
pub mod sagas;
pub mod schema;
pub mod tx;
pub mod vault;

pub use error::{ErrorCode, PROBLEM_JSON, Problem};
