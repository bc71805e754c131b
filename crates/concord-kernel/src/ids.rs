//! The ids Concord's server and the services both name: a saga's id and a two-phase-commit
//! transaction's id. Each is parsed once, where it enters (a request, a header, a stored row),
//! and passed on as its type: only a valid one can be built, and deserializing one checks it.

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;
use uuid::Uuid;

/// What every id derived from an `Idempotency-Key` starts with; a caller may not choose one.
pub const DERIVED_PREFIX: &str = "idem-";

/// Longest saga id and xid, in characters (all ASCII).
const MAX_ID_CHARS: usize = 128;

/// 1–128 of `A-Z a-z 0-9 _ - . :`, the alphabet of saga ids and xids.
fn valid_id(id: &str) -> bool {
    (1..=MAX_ID_CHARS).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// A string that is not a saga id; it holds what was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid saga id {0:?}: expected 1-128 letters, digits and _-.:")]
pub struct InvalidSagaId(pub String);

/// A string that is not a transaction id; it holds what was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid xid {0:?}: expected 1-128 letters, digits and _.:-")]
pub struct InvalidXid(pub String);

/// A saga's id: 1–128 of `A-Z a-z 0-9 _ - . :`, chosen by the caller that starts the saga or
/// generated (a UUIDv7). It names the saga's log (`saga-{id}`) and starts the idempotency key of
/// every participant call, `{id}:{step}:{action|compensation}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SagaId(String);

/// A two-phase-commit transaction's id: 1–128 of `A-Z a-z 0-9 _ - . :`. The coordinator's are
/// UUIDv7 strings; a participant accepts any of the alphabet, and only a valid one can be built,
/// so it can be spliced into a PostgreSQL gid literal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Xid(String);

/// What both ids are made of: `parse` (the one alphabet), `generate` (a UUIDv7, so ids sort by
/// creation time), `as_str`, `Display`, `AsRef<str>`, comparison with `str`, and serde as a
/// plain string (deserializing checks it).
macro_rules! text_id {
    ($id:ident, $invalid:ident, $what:literal) => {
        impl $id {
            #[doc = concat!("Checks a ", $what, ".")]
            ///
            /// # Errors
            /// When it is empty, longer than 128 characters or holds a character outside
            /// `[A-Za-z0-9_.:-]`.
            pub fn parse(id: impl Into<String>) -> Result<Self, $invalid> {
                let id = id.into();
                if valid_id(&id) {
                    Ok(Self(id))
                } else {
                    Err($invalid(id))
                }
            }

            /// A fresh id: a UUIDv7, so ids sort by creation time.
            #[must_use]
            pub fn generate() -> Self {
                Self(Uuid::now_v7().to_string())
            }

            /// The id of what a keyed request creates: `idem-` and 32 hex digits of a SHA-256 of
            /// the caller, its `Idempotency-Key` and the request, so a retry after a crash (the
            /// effect committed, the key's record not) meets the same one instead of creating a
            /// second, and the key reused for another request once its record expired does not.
            #[must_use]
            pub fn derived(caller: &str, idempotency_key: &str, request: &[u8]) -> Self {
                use sha2::Digest as _;
                let digest = sha2::Sha256::new()
                    .chain_update((caller.len() as u64).to_be_bytes())
                    .chain_update(caller.as_bytes())
                    .chain_update((idempotency_key.len() as u64).to_be_bytes())
                    .chain_update(idempotency_key.as_bytes())
                    .chain_update(request)
                    .finalize();
                let mut id = String::from(DERIVED_PREFIX);
                for b in &digest[..16] {
                    id.push_str(&format!("{b:02x}"));
                }
                Self(id)
            }

            /// The id as text.
            #[must_use]
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $id {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $id {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $id {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $id {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl Serialize for $id {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $id {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(deserializer)?;
                Self::parse(raw).map_err(|e| {
                    de::Error::invalid_value(
                        de::Unexpected::Str(&e.0),
                        &concat!("a ", $what, ": 1-128 letters, digits and _-.:"),
                    )
                })
            }
        }
    };
}

text_id!(SagaId, InvalidSagaId, "saga id");
text_id!(Xid, InvalidXid, "transaction id");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_derived_id_is_one_per_caller_and_key() {
        let a = SagaId::derived("key-a", "order-1", b"{}");
        assert_eq!(a, SagaId::derived("key-a", "order-1", b"{}"));
        assert_ne!(
            a,
            SagaId::derived("key-b", "order-1", b"{}"),
            "another caller, another id"
        );
        assert_ne!(a, SagaId::derived("key-a", "order-2", b"{}"));
        assert_ne!(a, SagaId::derived("key-a", "order-1", b"[1]"), "another request");
        assert_ne!(
            SagaId::derived("ab", "c", b""),
            SagaId::derived("a", "bc", b""),
            "no ambiguity at the seam"
        );
        assert!(SagaId::parse(a.as_str()).is_ok() && Xid::parse(Xid::derived("k", "x", b"").as_str()).is_ok());
        assert_eq!(a.as_str().len(), 37);
    }
    use serde_json::json;

    const VALID: [&str; 5] = [
        "0190c3b2-7e1a-7c3e-9a55-3b1f0e4d2a11",
        "a",
        "A.b_c:d-9",
        "order-42:retry_1.a",
        "Z",
    ];

    fn invalid() -> Vec<String> {
        ["", "a'b", "a b", "a;b", "a%b", "a/b", "é", "tab\t", "nul\0"]
            .into_iter()
            .map(str::to_owned)
            .chain(std::iter::once("x".repeat(129)))
            .collect()
    }

    #[test]
    fn a_saga_id_is_1_to_128_of_its_alphabet() {
        for ok in VALID.into_iter().map(str::to_owned).chain(["x".repeat(128)]) {
            let id = SagaId::parse(ok.as_str()).unwrap();
            assert_eq!(id.as_str(), ok);
            assert_eq!(id.to_string(), ok);
        }
        for bad in invalid() {
            assert_eq!(SagaId::parse(bad.as_str()), Err(InvalidSagaId(bad.clone())), "{bad:?}");
        }
    }

    #[test]
    fn an_xid_is_1_to_128_of_its_alphabet() {
        for ok in VALID.into_iter().map(str::to_owned).chain(["x".repeat(128)]) {
            let xid = Xid::parse(ok.as_str()).unwrap();
            assert_eq!(xid.as_str(), ok);
            assert_eq!(xid.to_string(), ok);
            assert_eq!(xid.as_ref(), ok);
        }
        for bad in invalid() {
            assert_eq!(Xid::parse(bad.as_str()), Err(InvalidXid(bad.clone())), "{bad:?}");
        }
    }

    #[test]
    fn generated_ids_are_valid_distinct_uuid_v7s_in_creation_order() {
        let (a, b) = (SagaId::generate(), SagaId::generate());
        assert_ne!(a, b);
        assert_eq!(SagaId::parse(a.as_str()).unwrap(), a);
        assert_eq!(Uuid::parse_str(a.as_str()).unwrap().get_version_num(), 7);
        let (x, y) = (Xid::generate(), Xid::generate());
        assert_ne!(x, y);
        assert!(x < y, "UUIDv7 text sorts by time");
        assert_eq!(Xid::parse(x.as_str()).unwrap(), x);
        assert_eq!(Uuid::parse_str(x.as_str()).unwrap().get_version_num(), 7);
    }

    #[test]
    fn ids_are_plain_strings_on_the_wire_and_deserializing_checks_them() {
        let id = SagaId::parse("order:1").unwrap();
        assert_eq!(serde_json::to_value(&id).unwrap(), json!("order:1"));
        assert_eq!(serde_json::from_value::<SagaId>(json!("order:1")).unwrap(), id);
        let xid = Xid::parse("x-1").unwrap();
        assert_eq!(serde_json::to_value(&xid).unwrap(), json!("x-1"));
        assert_eq!(serde_json::from_value::<Xid>(json!("x-1")).unwrap(), xid);
        for bad in [json!(""), json!("a b"), json!("x".repeat(129)), json!(7), json!(null)] {
            assert!(serde_json::from_value::<SagaId>(bad.clone()).is_err(), "{bad}");
            assert!(serde_json::from_value::<Xid>(bad.clone()).is_err(), "{bad}");
        }
        let error = serde_json::from_value::<Xid>(json!("a b")).unwrap_err().to_string();
        assert!(error.contains("a b") && error.contains("transaction id"), "{error}");
    }

    #[test]
    fn ids_order_and_compare_as_their_text() {
        let mut ids = ["b", "a:2", "a", "A"].map(|s| SagaId::parse(s).unwrap());
        ids.sort();
        assert_eq!(ids.each_ref().map(SagaId::as_str), ["A", "a", "a:2", "b"]);
        assert!(ids[1] == "a" && ids[1] == *"a" && ids[1] != "b");
        assert_eq!(
            InvalidSagaId("a b".into()).to_string(),
            r#"invalid saga id "a b": expected 1-128 letters, digits and _-.:"#
        );
        assert_eq!(
            InvalidXid(String::new()).to_string(),
            r#"invalid xid "": expected 1-128 letters, digits and _.:-"#
        );
    }
}
