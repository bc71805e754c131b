//! The audit trail: records of the vault's requests, written in batches to [`AUDIT_STREAM`] and
//! durable before the request answers, and the references that name a subject in it.

use super::{Vault, VaultFailure};
use crate::app::group_commit::Drain;
use crate::domain::event::UncheckedEvent;
use crate::domain::vault::Subject;
use crate::domain::{AppendRequest, ExpectedVersion, Limits, Principal, Scope, StreamName};
use crate::ports::{EventStore, StoreError};
use serde_json::{Value, json};
use std::sync::Arc;
use uuid::Uuid;

/// The stream every detokenize, erasure and rotation is recorded in. Its category (`$vault`) is
/// readable only with `vault:audit`.
pub const AUDIT_STREAM: &str = "$vault-audit";

/// Audit records (event type, data) of several requests in one append to [`AUDIT_STREAM`]; each
/// record stays its own event.
pub(super) struct AuditWrites {
    pub(super) events: Arc<dyn EventStore>,
    pub(super) limits: Limits,
}

impl AuditWrites {
    /// The append of `records`; `Err` when the log's limits refuse one of them.
    fn request(&self, records: &[AuditRecord]) -> Result<AppendRequest, String> {
        let stream = StreamName::parse(AUDIT_STREAM).map_err(|e| e.to_string())?;
        let events = records
            .iter()
            .map(|r| UncheckedEvent {
                // Chosen once per record: an append retried after an unclear failure is then
                // replayed by the store, not written twice.
                id: Some(r.id),
                event_type: r.event_type.into(),
                data: r.data.clone(),
                metadata: None,
            })
            .collect();
        AppendRequest::new(stream, ExpectedVersion::Any, events, &self.limits).map_err(|e| format!("audit record: {e}"))
    }

    async fn append(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        let request = self.request(records).map_err(StoreError::Unavailable)?;
        self.events.append(request).await.map(|_| ())
    }
}

/// One audit record, with the event id it is written under.
#[derive(Clone)]
pub(super) struct AuditRecord {
    id: Uuid,
    event_type: &'static str,
    data: Value,
}

#[async_trait::async_trait]
impl Drain for AuditWrites {
    const QUEUE: &'static str = "vault_audit";
    type Item = AuditRecord;
    type Output = Result<(), StoreError>;

    fn weight(_: &Self::Item) -> usize {
        1
    }

    async fn write(&self, batch: Vec<Self::Item>) -> Vec<Self::Output> {
        let n = batch.len();
        match self.request(&batch) {
            // A store failure fails them all alike; a retry of theirs is replayed, not doubled.
            Ok(request) => return vec![self.events.append(request).await.map(|_| ()); n],
            Err(e) if n == 1 => return vec![Err(StoreError::Unavailable(e))],
            Err(_) => {}
        }
        // A record the log's limits refuse must not fail the others: write them one by one.
        let mut out = Vec::with_capacity(n);
        for record in batch {
            out.push(self.append(std::slice::from_ref(&record)).await);
        }
        out
    }
}

impl Vault {
    /// A reference to a subject for the audit trail: HMAC-SHA256 under a vault key, hex. The
    /// vault can tell whether a given subject was erased; the trail does not name it.
    #[must_use]
    pub fn subject_ref(&self, subject: &Subject) -> String {
        use hmac::Mac as _;
        let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(self.derived().subject_ref.bytes())
            .expect("HMAC takes any key length");
        mac.update(subject.as_str().as_bytes());
        mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Records in the audit trail that a key able to reveal values was created, before it is.
    ///
    /// # Errors
    /// [`VaultFailure::Store`]: the key must then not be created.
    pub async fn record_grant(&self, principal: &Principal, name: &str, scopes: &[Scope]) -> Result<(), VaultFailure> {
        let scopes: Vec<&str> = scopes.iter().map(Scope::as_str).collect();
        self.audit(
            principal,
            "RevealGranted",
            json!({"new_key_name": name, "scopes": scopes}),
        )
        .await
    }

    /// Records an audit entry and waits until it is durable.
    pub(super) async fn audit(
        &self,
        principal: &Principal,
        event_type: &'static str,
        mut data: Value,
    ) -> Result<(), VaultFailure> {
        if let Some(o) = data.as_object_mut() {
            o.insert("key_id".into(), json!(principal.key_id));
            o.insert("key_name".into(), json!(principal.name));
        }
        let record = AuditRecord {
            id: Uuid::now_v7(),
            event_type,
            data,
        };
        self.audits.submit(record).await??;
        Ok(())
    }
}

#[async_trait::async_trait]
impl crate::app::auth::GrantAudit for Vault {
    async fn record_grant(&self, by: &Principal, name: &str, scopes: &[Scope]) -> Result<(), StoreError> {
        Vault::record_grant(self, by, name, scopes).await.map_err(|e| match e {
            VaultFailure::Store(s) => s,
            other => StoreError::Unavailable(format!("audit record: {other}")),
        })
    }
}
