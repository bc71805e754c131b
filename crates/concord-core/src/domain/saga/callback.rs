//! The capability an asynchronous participant completes its step with: a token bound to one
//! saga, one step and one attempt, valid until a time, signed by the server (HMAC-SHA256 under a
//! key derived from the vault's master key, so every node of a cluster mints and checks the same
//! tokens). It opens nothing else: the callback route reads the saga, step and attempt from the
//! token, never from the request.

use super::{CallOutcome, SagaId};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;
use subtle::ConstantTimeEq as _;
use zeroize::Zeroizing;

/// What a participant posts to complete an accepted attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case", deny_unknown_fields)]
pub enum Completion {
    /// It took effect; `output` is the step's output.
    Succeeded {
        #[serde(default)]
        output: Value,
    },
    /// It said no, and took no effect: the saga compensates the steps before.
    Refused { error: String },
    /// It failed, and whether it took effect is unknown: the step is uncertain and compensated
    /// (no retry: a participant that keeps its answers by `Idempotency-Key` would only answer
    /// the same 202 again).
    Failed { error: String },
}

impl Completion {
    /// The call outcome it stands for.
    #[must_use]
    pub fn into_outcome(self) -> CallOutcome {
        match self {
            Self::Succeeded { output } => CallOutcome::Succeeded(output),
            Self::Refused { error } => CallOutcome::Refused(error),
            Self::Failed { error } => CallOutcome::Unusable(error),
        }
    }
}

/// The header that carries the completion URL on an action call.
pub const CALLBACK_HEADER: &str = "concord-callback";

const VERSION: &str = "c1";

/// What a callback token grants: completing attempt `attempt` of step `step` of saga `saga_id`
/// until `expires`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackClaim {
    pub saga_id: SagaId,
    pub step: usize,
    pub attempt: u32,
    pub expires: DateTime<Utc>,
}

/// Why a token opens nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CallbackError {
    #[error("the callback token is not one this server issued")]
    Invalid,
    #[error("the callback token has expired")]
    Expired,
}

/// The key that signs and checks callback tokens; never printed.
#[derive(Clone)]
pub struct CallbackKey(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for CallbackKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallbackKey(..)")
    }
}

impl PartialEq for CallbackKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl CallbackKey {
    #[must_use]
    pub fn new(secret: Zeroizing<Vec<u8>>) -> Self {
        Self(secret)
    }

    fn mac(&self, payload: &[u8]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(payload);
        mac.finalize().into_bytes().into()
    }

    /// The token for `claim`: `{payload}.{signature}`, both base64url, safe in a URL path.
    #[must_use]
    pub fn mint(&self, claim: &CallbackClaim) -> String {
        let payload = format!(
            "{VERSION}\n{}\n{}\n{}\n{}",
            claim.saga_id,
            claim.step,
            claim.attempt,
            claim.expires.timestamp()
        );
        let signature = self.mac(payload.as_bytes());
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload.as_bytes()),
            URL_SAFE_NO_PAD.encode(signature)
        )
    }

    /// The claim of a token this key minted, if it has not expired at `now`.
    ///
    /// # Errors
    /// [`CallbackError::Invalid`] for anything this key did not sign (checked in constant time
    /// before anything of the payload is read), [`CallbackError::Expired`] past its time.
    pub fn verify(&self, token: &str, now: DateTime<Utc>) -> Result<CallbackClaim, CallbackError> {
        let (payload, signature) = token.split_once('.').ok_or(CallbackError::Invalid)?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| CallbackError::Invalid)?;
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| CallbackError::Invalid)?;
        if !bool::from(self.mac(&payload).ct_eq(signature.as_slice())) {
            return Err(CallbackError::Invalid);
        }
        let text = String::from_utf8(payload).map_err(|_| CallbackError::Invalid)?;
        let parts: Vec<&str> = text.split('\n').collect();
        let [VERSION, id, step, attempt, expires] = parts.as_slice() else {
            return Err(CallbackError::Invalid);
        };
        let claim = CallbackClaim {
            saga_id: SagaId::parse(*id).map_err(|_| CallbackError::Invalid)?,
            step: step.parse().map_err(|_| CallbackError::Invalid)?,
            attempt: attempt.parse().map_err(|_| CallbackError::Invalid)?,
            expires: expires
                .parse()
                .ok()
                .and_then(|s| DateTime::from_timestamp(s, 0))
                .ok_or(CallbackError::Invalid)?,
        };
        if claim.expires <= now {
            return Err(CallbackError::Expired);
        }
        Ok(claim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim() -> CallbackClaim {
        CallbackClaim {
            saga_id: SagaId::parse("order:1").unwrap(),
            step: 2,
            attempt: 1,
            expires: DateTime::from_timestamp(2_000_000_000, 0).unwrap(),
        }
    }

    fn key(b: u8) -> CallbackKey {
        CallbackKey::new(Zeroizing::new(vec![b; 32]))
    }

    #[test]
    fn a_token_opens_its_claim_only_under_its_key_and_before_it_expires() {
        let token = key(1).mint(&claim());
        let before = claim().expires - chrono::Duration::seconds(1);
        assert_eq!(key(1).verify(&token, before), Ok(claim()));
        assert_eq!(key(2).verify(&token, before), Err(CallbackError::Invalid));
        assert_eq!(key(1).verify(&token, claim().expires), Err(CallbackError::Expired));
        assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
    }

    #[test]
    fn a_changed_token_opens_nothing() {
        let token = key(1).mint(&claim());
        let (payload, sig) = token.split_once('.').unwrap();
        let mut other = claim();
        other.step = 3;
        let forged_payload = key(1).mint(&other).split_once('.').unwrap().0.to_owned();
        let now = DateTime::from_timestamp(1_000_000_000, 0).unwrap();
        for bad in [
            format!("{forged_payload}.{sig}"),
            format!("{payload}.{}", &sig[1..]),
            payload.to_owned(),
            String::new(),
            "..".into(),
        ] {
            assert_eq!(key(1).verify(&bad, now), Err(CallbackError::Invalid), "{bad}");
        }
    }
}
