//! The detokenize rate of each API key on this node: one token bucket per key.

use super::{CACHE_MAX, Vault, lock};
use std::time::Instant;
use uuid::Uuid;

pub(super) struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A key's budget of audit records for refused calls, and the refusals it left unrecorded.
pub(super) struct RefusedAudit {
    bucket: Bucket,
    unrecorded: u64,
}

impl Vault {
    /// Takes one audit record of a refused call from the key's budget: the refusals left
    /// unrecorded since its last record, or `Err` when the budget is spent (this one is counted).
    pub(super) fn take_refused_audit(&self, key: Uuid) -> Result<u64, ()> {
        let per_s = self.config.refused_audit_per_min / 60.0;
        if per_s <= 0.0 {
            return Ok(0);
        }
        let burst = self.config.refused_audit_per_min.max(1.0);
        let mut budgets = lock(&self.refused_audits);
        if budgets.len() >= CACHE_MAX && !budgets.contains_key(&key) {
            budgets.retain(|_, b| b.unrecorded > 0 || b.bucket.at.elapsed().as_secs_f64() * per_s < burst);
        }
        let b = budgets.entry(key).or_insert(RefusedAudit {
            bucket: Bucket {
                tokens: burst,
                at: Instant::now(),
            },
            unrecorded: 0,
        });
        b.bucket.tokens = (b.bucket.tokens + b.bucket.at.elapsed().as_secs_f64() * per_s).min(burst);
        b.bucket.at = Instant::now();
        if b.bucket.tokens >= 1.0 {
            b.bucket.tokens -= 1.0;
            Ok(std::mem::take(&mut b.unrecorded))
        } else {
            b.unrecorded += 1;
            Err(())
        }
    }

    /// Takes `n` tokens from the key's bucket; the time to wait when it has too few.
    pub(super) fn take_rate(&self, key: Uuid, n: usize) -> Result<(), u64> {
        let rate = self.config.detokenize_per_s;
        if rate <= 0.0 {
            return Ok(());
        }
        let burst = self.config.detokenize_burst.max(rate);
        let need = n as f64;
        let mut buckets = lock(&self.buckets);
        if buckets.len() >= CACHE_MAX && !buckets.contains_key(&key) {
            buckets.retain(|_, b| b.at.elapsed().as_secs_f64() * rate < burst);
        }
        let b = buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            at: Instant::now(),
        });
        b.tokens = (b.tokens + b.at.elapsed().as_secs_f64() * rate).min(burst);
        b.at = Instant::now();
        if b.tokens >= need {
            b.tokens -= need;
            Ok(())
        } else {
            let wait = ((need.min(burst) - b.tokens) / rate * 1000.0).ceil();
            Err(if wait.is_finite() { wait as u64 } else { 1000 })
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::app::vault::testing::*;
    use crate::app::vault::{Reveal, VaultConfig, VaultFailure};
    use crate::domain::vault::TokenType;

    #[tokio::test]
    async fn detokenizing_past_the_rate_is_refused_and_audited() {
        let g = given(VaultConfig {
            detokenize_per_s: 2.0,
            detokenize_burst: 3.0,
            ..VaultConfig::default()
        })
        .await;
        let tokens = g.vault.tokenize(vec![item(TokenType::Generic, "x")]).await.unwrap();
        let who = caller(&["vault:detokenize:generic"]);
        let three = vec![tokens[0].clone(), tokens[0].clone(), tokens[0].clone()];
        reveal(&g, &who, &three, Reveal::Plain).await.unwrap();
        let err = reveal(&g, &who, &tokens, Reveal::Plain).await.unwrap_err();
        assert!(
            matches!(err, VaultFailure::RateLimited { retry_after_ms } if retry_after_ms > 0 && retry_after_ms <= 500)
        );
        let other = caller(&["vault:detokenize:generic"]);
        assert!(
            reveal(&g, &other, &tokens, Reveal::Plain).await.is_ok(),
            "the rate is per key"
        );
        assert_eq!(audit_log(&g).await.last().unwrap()["outcome"], "allowed");
        assert_eq!(audit_log(&g).await[1]["outcome"], "rate_limited");
    }
}
