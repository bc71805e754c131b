//! Black-box tests of the HTTP API, each against the real router on port 0 with a fresh
//! database, on SQLite and on PostgreSQL.

mod helpers;
#[path = "../support/participant.rs"]
mod participant;
#[path = "../support/pki.rs"]
mod pki;

mod auth;
mod errors;
mod events;
mod idempotency;
mod limits;
mod outbound;
mod ownership;
mod participants;
mod saga_logs;
mod sagas;
mod subscriptions;
mod system;
mod tls;
mod tx;
mod vault;
