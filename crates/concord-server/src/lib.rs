//! The Concord server: HTTP API, background work, configuration, telemetry and CLI.
//! `main.rs` only parses the command line; [`startup`] builds a running application.

pub mod auth;
pub mod cli;
pub mod config;
pub mod error;
pub mod idempotency;
pub mod limits;
pub mod openapi;
pub mod outbound;
pub mod relay;
pub mod routes;
pub mod saga;
pub mod scopes;
pub mod startup;
pub mod state;
pub mod telemetry;
pub mod tx;
pub mod vault;
pub mod worker;
