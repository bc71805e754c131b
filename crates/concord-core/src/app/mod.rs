//! Use cases: the decisions, with the ports they need passed in.

pub mod append;
pub mod auth;
pub mod events;
pub mod flow;
pub mod group_commit;
mod log;
pub mod saga;
pub mod subscribe;
pub mod tx;
pub mod vault;
