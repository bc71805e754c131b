//! Appending events for a caller, and who may read what: the write policy of Concord's own
//! streams, the vault's tokenized fields, validation, the store (whose group commit shares one
//! transaction among concurrent appends), and the append metrics. A route parses the request,
//! calls [`Appender::append`], and maps the error.

use crate::app::vault::{Vault, VaultFailure};
use crate::domain::event::UncheckedEvent;
use crate::domain::{
    AppendOutcome, AppendRequest, ExpectedVersion, Limits, Principal, Scope, StreamName, ValidationError,
};
use crate::ports::{EventStore, StoreError};
use std::sync::Arc;

/// Saga logs (`saga-{id}`) hold saga inputs and participant outputs, which may be sensitive;
/// read with `sagas:read`.
const SAGA_CATEGORY: &str = "saga";
/// Transaction logs (`tx-{xid}`): a forged decision would break a transaction's atomicity; read
/// with `tx:read`.
const TX_CATEGORY: &str = "tx";
/// The vault's audit trail (`$vault-audit`): who revealed what. Read with `vault:audit`, written
/// only by the vault itself, so not even an admin key can forge or bury an entry.
const VAULT_CATEGORY: &str = "$vault";

/// What a reader who may not read a category is told.
pub const READ_FORBIDDEN: &str = "saga logs (saga-...) need the sagas:read scope, transaction logs (tx-...) tx:read, the vault audit ($vault-...) vault:audit";

/// Whether `principal` may read events of `category`: saga logs need `sagas:read` besides
/// `events:read`, and so on. Every read of events (one stream, the log, SSE, consumer groups)
/// goes through it.
#[must_use]
pub fn may_read(principal: &Principal, category: &str) -> bool {
    match category {
        SAGA_CATEGORY => principal.allows(Scope::SagasRead),
        TX_CATEGORY => principal.allows(Scope::TxRead),
        VAULT_CATEGORY => principal.allows(Scope::VaultAudit),
        _ => true,
    }
}

/// Why an append was refused. Each variant's doc says what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The key may not write this stream; use one that may (or another stream).
    #[error("{0}")]
    Forbidden(&'static str),
    /// The append breaks a rule (names, sizes, event ids); fix it.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The vault could not tokenize the category's fields; retry later when it is the store.
    #[error(transparent)]
    Vault(#[from] VaultFailure),
    /// The stream is not at the expected version, an id clashes, or the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The append use case of a node.
pub struct Appender {
    store: Arc<dyn EventStore>,
    vault: Arc<Vault>,
    limits: Limits,
}

impl Appender {
    #[must_use]
    pub fn new(store: Arc<dyn EventStore>, vault: Arc<Vault>, limits: Limits) -> Self {
        Self { store, vault, limits }
    }

    /// Whether `by` may write `stream` at all, before anything of the request is read: the
    /// vault's streams are the vault's alone, and so are saga and transaction logs Concord's
    /// (a forged event would steer a saga or decide a transaction: not even `admin` appends to
    /// them); other system streams (`$...`: audit trails) need `admin`.
    ///
    /// # Errors
    /// [`AppendError::Forbidden`].
    pub fn check_write(by: &Principal, stream: &StreamName) -> Result<(), AppendError> {
        if stream.category() == VAULT_CATEGORY {
            return Err(AppendError::Forbidden(
                "the vault's streams ($vault-...) are written by the vault alone",
            ));
        }
        if matches!(stream.category(), SAGA_CATEGORY | TX_CATEGORY) {
            return Err(AppendError::Forbidden(
                "saga logs (saga-...) and transaction logs (tx-...) are written by Concord alone",
            ));
        }
        if stream.as_str().starts_with('$') && !by.allows(Scope::Admin) {
            return Err(AppendError::Forbidden("system streams ($...) need the admin scope"));
        }
        Ok(())
    }

    /// Appends `events` to `stream` for `by`, atomically, if the stream is at `expected`.
    ///
    /// # Errors
    /// See [`AppendError`]; nothing is written on any of them.
    #[tracing::instrument(skip_all, fields(stream = %stream, events = events.len()))]
    pub async fn append(
        &self,
        by: &Principal,
        stream: StreamName,
        expected: ExpectedVersion,
        mut events: Vec<UncheckedEvent>,
    ) -> Result<AppendOutcome, AppendError> {
        Self::check_write(by, &stream)?;
        // Fields the vault's rules name for this category are stored as tokens, never in plain.
        self.vault.tokenize_events(&stream, &mut events).await?;
        let request = AppendRequest::new(stream, expected, events, &self.limits)?;
        let count = request.events.len();
        let outcome = self.store.append(request).await;
        metrics::counter!("concord_appends_total", "outcome" => if outcome.is_ok() { "ok" } else { "error" })
            .increment(1);
        let outcome = outcome?;
        metrics::counter!("concord_events_appended_total").increment(count as u64);
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(scopes: &[&str]) -> Principal {
        Principal::with_scopes(scopes)
    }

    #[test]
    fn concords_own_logs_need_their_own_read_scopes() {
        let reader = principal(&["events:read"]);
        assert!(may_read(&reader, "order"));
        for category in ["saga", "tx", "$vault"] {
            assert!(!may_read(&reader, category), "{category}");
        }
        assert!(may_read(&principal(&["events:read", "sagas:read"]), "saga"));
        assert!(may_read(&principal(&["events:read", "tx:read"]), "tx"));
        assert!(may_read(&principal(&["events:read", "vault:audit"]), "$vault"));
    }
}
