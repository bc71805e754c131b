//! The protocol's messages over HTTP: `POST {url}/prepare` (200 votes commit, 409 or another 4xx
//! votes abort; 5xx, timeouts and connection errors are retried until the deadline), then
//! `POST {url}/commit` or `{url}/abort` (2xx acknowledges).

use crate::outbound::{Outbound, refusal};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use concord_api::tx::{PhaseTwoMessage, PrepareMessage};
use concord_core::app::tx::{PrepareAnswer, TxParticipants};
use concord_core::domain::outbound::OutboundPolicy;
use concord_core::domain::tx::{Outcome, TxParticipant, Xid};
use concord_sdk::trace;
use std::time::Duration;

/// Sends prepare, commit and abort with `traceparent`.
pub struct HttpTxParticipants {
    client: Outbound,
    /// Longest wait for one phase-2 answer.
    phase2_timeout: Duration,
    /// Shown as `Authorization: Bearer` to the participants it is bound to, and to no other.
    token: Option<BoundToken>,
}

/// The coordinator's token and the participants it may be sent to.
pub struct BoundToken {
    pub token: zeroize::Zeroizing<String>,
    pub hosts: OutboundPolicy,
}

impl HttpTxParticipants {
    /// # Errors
    /// When the HTTP client cannot be built (no TLS provider installed).
    pub fn new(
        phase2_timeout: Duration,
        token: Option<BoundToken>,
        policy: OutboundPolicy,
        tls: &concord_sdk::ClientTls,
    ) -> anyhow::Result<Self> {
        let client = Outbound::new(policy, tls)?;
        Ok(Self {
            client,
            phase2_timeout,
            token,
        })
    }
}

impl HttpTxParticipants {
    /// The token goes only to a participant it is bound to.
    fn authorized(&self, request: reqwest::RequestBuilder, url: &str) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) if t.hosts.binds(url) => request.bearer_auth(t.token.as_str()),
            _ => request,
        }
    }
}

/// Pause between prepare attempts that failed transiently.
const PREPARE_RETRY: Duration = Duration::from_millis(50);

/// How much of a refusal's body is kept as the reason.
const SNIPPET_BYTES: usize = 300;

/// The start of an answer's body, read no further than needed.
async fn snippet(mut r: reqwest::Response) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < SNIPPET_BYTES {
        match r.chunk().await {
            Ok(Some(c)) => bytes.extend_from_slice(&c),
            _ => break,
        }
    }
    bytes.truncate(SNIPPET_BYTES);
    String::from_utf8_lossy(&bytes).replace('\0', "\u{FFFD}")
}

fn url(base: &str, path: &str) -> String {
    format!("{}/{path}", base.trim_end_matches('/'))
}

#[async_trait]
impl TxParticipants for HttpTxParticipants {
    async fn prepare(&self, xid: &Xid, p: &TxParticipant, deadline: DateTime<Utc>) -> PrepareAnswer {
        let body = PrepareMessage {
            xid: xid.to_string(),
            payload: p.payload.clone(),
        };
        let mut last = String::from("no attempt before the deadline");
        loop {
            let Ok(left) = (deadline - Utc::now()).to_std() else {
                return PrepareAnswer::Silent(last);
            };
            if left.is_zero() {
                return PrepareAnswer::Silent(last);
            }
            let to = url(&p.url, "prepare");
            let request = match self.client.request(reqwest::Method::POST, &to) {
                Ok(r) => r,
                Err(refused) => return PrepareAnswer::Abort(format!("the call is not allowed: {refused}")),
            };
            let sent = self
                .authorized(request, &to)
                .timeout(left)
                .header(trace::TRACEPARENT, trace::outgoing(None))
                .json(&body)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => return PrepareAnswer::Commit,
                Ok(r) if r.status().is_client_error() && !matches!(r.status().as_u16(), 408 | 425 | 429) => {
                    let status = r.status().as_u16();
                    let text = snippet(r).await;
                    return PrepareAnswer::Abort(format!("HTTP {status}: {text}"));
                }
                Ok(r) => last = format!("HTTP {}", r.status().as_u16()),
                Err(e) if e.is_timeout() => return PrepareAnswer::Silent("timed out".into()),
                Err(e) if e.is_builder() => return PrepareAnswer::Abort(format!("the call cannot be made: {e}")),
                Err(e) if let Some(refused) = refusal(&e) => {
                    return PrepareAnswer::Abort(format!("the call is not allowed: {refused}"));
                }
                Err(e) => last = format!("connection error: {e}"),
            }
            tokio::time::sleep(PREPARE_RETRY).await;
        }
    }

    async fn finish(&self, xid: &Xid, p: &TxParticipant, outcome: Outcome) -> bool {
        let body = PhaseTwoMessage { xid: xid.to_string() };
        let to = url(&p.url, outcome.phase2_path());
        let request = match self.client.request(reqwest::Method::POST, &to) {
            Ok(r) => r,
            Err(refused) => {
                tracing::warn!(tx.xid = %xid, participant = %p.name, reason = %refused, "phase 2 not allowed");
                return false;
            }
        };
        let sent = self
            .authorized(request, &to)
            .timeout(self.phase2_timeout)
            .header(trace::TRACEPARENT, trace::outgoing(None))
            .json(&body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => true,
            Ok(r) => {
                tracing::warn!(tx.xid = %xid, participant = %p.name, status = r.status().as_u16(), "phase 2 not acknowledged");
                false
            }
            Err(e) => {
                tracing::warn!(tx.xid = %xid, participant = %p.name, error = %e, "phase 2 not delivered");
                false
            }
        }
    }
}
