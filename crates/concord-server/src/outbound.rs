//! The one HTTP client for calls Concord makes for a caller (saga steps and compensations, 2PC
//! participants), guarded by an [`OutboundPolicy`]: the URL is checked before each request, and
//! every address a name resolves to is checked before it is connected to, so a name that resolves
//! to a loopback or metadata address is refused like the literal, and a second resolution (DNS
//! rebinding) cannot slip past the first. No redirect is followed and no proxy is used: either
//! would send the call somewhere the policy did not judge.

use concord_core::domain::outbound::{OutboundPolicy, Refused};
use concord_sdk::ClientTls;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use std::net::SocketAddr;
use std::sync::Arc;

/// An HTTP client that calls only where its policy allows.
pub struct Outbound {
    client: reqwest::Client,
    policy: Arc<OutboundPolicy>,
}

impl Outbound {
    /// `tls` adds certificate authorities to trust and the client certificate shown to a
    /// participant that asks for one (mutual TLS).
    ///
    /// # Errors
    /// When the HTTP client cannot be built (no TLS provider installed, a TLS file unusable).
    pub fn new(policy: OutboundPolicy, tls: &ClientTls) -> anyhow::Result<Self> {
        let policy = Arc::new(policy);
        let client = tls
            .apply(reqwest::Client::builder())?
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(GuardedResolver { policy: policy.clone() })
            .tcp_nodelay(true)
            .pool_max_idle_per_host(256)
            .build()?;
        Ok(Self { client, policy })
    }

    /// A request to `url`, when the policy allows it.
    ///
    /// # Errors
    /// Why the policy refuses it.
    pub fn request(&self, method: reqwest::Method, url: &str) -> Result<reqwest::RequestBuilder, Refused> {
        self.policy.check(url)?;
        Ok(self.client.request(method, url))
    }
}

/// The policy's refusal inside a failed request (a name resolved only to refused addresses).
#[must_use]
pub fn refusal(e: &reqwest::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(r) = err.downcast_ref::<Refused>() {
            return Some(r.0.clone());
        }
        source = err.source();
    }
    None
}

/// Resolves with the system resolver, then keeps only the addresses the policy allows.
struct GuardedResolver {
    policy: Arc<OutboundPolicy>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|a| match policy.permits_resolved(&host, a.ip()) {
                    Ok(()) => true,
                    Err(r) => {
                        refused.get_or_insert(r);
                        false
                    }
                })
                .collect();
            match (allowed.is_empty(), refused) {
                (true, Some(r)) => Err(Box::new(r) as Box<dyn std::error::Error + Send + Sync>),
                _ => Ok(Box::new(allowed.into_iter()) as Addrs),
            }
        })
    }
}
