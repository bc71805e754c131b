//! Envelope encryption: AES-256-GCM with a fresh random nonce per message and associated data
//! that binds each ciphertext to where it belongs, so a ciphertext copied to another record,
//! subject or key fails to open instead of revealing anything.
//!
//! The hierarchy: the configured master key wraps the keyring's master key versions; a master
//! key version wraps the data keys; a data key (one per subject, one default) seals the values.
//! From each data key two keys are derived, one that encrypts and one for the blind index of
//! convergent tokens, so erasing the data key also erases the index.

use super::{VaultError, random_bytes};
use aes_gcm::aead::{Aead as _, KeyInit as _, Payload};
use aes_gcm::{Aes256Gcm, Key};
use base64::Engine as _;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use uuid::Uuid;
use zeroize::Zeroizing;

/// The size of every key, bytes.
pub const KEY_LEN: usize = 32;
/// The size of a nonce, bytes (96 bits, as GCM wants).
pub const NONCE_LEN: usize = 12;

/// A 256-bit secret key, wiped from memory when dropped; never printed.
#[derive(Clone)]
pub struct SecretKey(Zeroizing<[u8; KEY_LEN]>);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// A new key from the operating system's CSPRNG.
    ///
    /// # Errors
    /// [`VaultError::Rng`].
    pub fn generate() -> Result<Self, VaultError> {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        random_bytes(k.as_mut())?;
        Ok(Self(k))
    }

    /// # Errors
    /// [`VaultError::MasterKey`] unless exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, VaultError> {
        let arr: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|_| VaultError::MasterKey(format!("a key is {KEY_LEN} bytes, this one {}", bytes.len())))?;
        Ok(Self(Zeroizing::new(arr)))
    }

    /// A key written as standard base64 (surrounding whitespace ignored), as in
    /// `CONCORD_VAULT_MASTER_KEY` or a key file.
    ///
    /// # Errors
    /// [`VaultError::MasterKey`] when not base64 of 32 bytes.
    pub fn from_base64(text: &str) -> Result<Self, VaultError> {
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|_| VaultError::MasterKey("the master key is not valid base64".into()))?,
        );
        Self::from_slice(&bytes)
    }

    /// The key as standard base64, for writing a generated key file.
    #[must_use]
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.0.as_ref()))
    }

    /// The key's bytes, for a MAC keyed with it.
    #[must_use]
    pub fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&Key::<Aes256Gcm>::from(*self.0))
    }

    /// A subkey for one purpose (HKDF-Expand with one block: HMAC(key, info || 0x01)).
    #[must_use]
    pub fn derive(&self, info: &[u8]) -> Self {
        let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(self.bytes()).expect("HMAC takes any key length");
        mac.update(info);
        mac.update(&[1]);
        let out = mac.finalize().into_bytes();
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        k.copy_from_slice(&out);
        Self(k)
    }

    /// Seals `plaintext` under this key with a fresh random nonce, bound to `aad`.
    ///
    /// # Errors
    /// [`VaultError::Rng`], or [`VaultError::Crypto`] for a message too long for GCM.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Sealed, VaultError> {
        let mut nonce = [0u8; NONCE_LEN];
        random_bytes(&mut nonce)?;
        let ciphertext = self
            .cipher()
            .encrypt(&nonce.into(), Payload { msg: plaintext, aad })
            .map_err(|_| VaultError::Crypto)?;
        Ok(Sealed { nonce, ciphertext })
    }

    /// Opens what [`SecretKey::seal`] sealed with the same key and `aad`.
    ///
    /// # Errors
    /// [`VaultError::Crypto`] when the key, the associated data or a byte of the ciphertext
    /// differs: tampering or the wrong key, never garbage.
    pub fn open(&self, sealed: &Sealed, aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        self.cipher()
            .decrypt(
                &sealed.nonce.into(),
                Payload {
                    msg: &sealed.ciphertext,
                    aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| VaultError::Crypto)
    }

    /// Seals another key under this one.
    ///
    /// # Errors
    /// As [`SecretKey::seal`].
    pub fn wrap(&self, key: &SecretKey, aad: &[u8]) -> Result<Sealed, VaultError> {
        self.seal(key.bytes(), aad)
    }

    /// Opens a wrapped key.
    ///
    /// # Errors
    /// As [`SecretKey::open`].
    pub fn unwrap_key(&self, sealed: &Sealed, aad: &[u8]) -> Result<SecretKey, VaultError> {
        let bytes = self.open(sealed, aad)?;
        SecretKey::from_slice(&bytes).map_err(|_| VaultError::Crypto)
    }
}

/// A nonce and the ciphertext with its 16-byte tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub nonce: [u8; NONCE_LEN],
    pub ciphertext: Vec<u8>,
}

impl Sealed {
    /// # Errors
    /// [`VaultError::Crypto`] for a stored nonce that is not 12 bytes.
    pub fn from_parts(nonce: &[u8], ciphertext: Vec<u8>) -> Result<Self, VaultError> {
        Ok(Self {
            nonce: nonce.try_into().map_err(|_| VaultError::Crypto)?,
            ciphertext,
        })
    }
}

/// Associated data of a master key version in the keyring.
#[must_use]
pub fn master_key_aad(version: u32) -> Vec<u8> {
    format!("concord/vault/master-key\0{version}").into_bytes()
}

/// Associated data of a data key: its id, its subject and the master key version wrapping it.
#[must_use]
pub fn data_key_aad(id: Uuid, subject: &str, master_version: u32) -> Vec<u8> {
    format!("concord/vault/data-key\0{id}\0{subject}\0{master_version}").into_bytes()
}

/// Associated data of a value: its token, type, subject, data key (the key version) and expiry,
/// so that none can be changed in the database without the value failing to open.
#[must_use]
pub fn value_aad(
    token: &str,
    kind: &str,
    subject: &str,
    data_key: Uuid,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
) -> Vec<u8> {
    let expiry = expires_at.map_or(-1, |e| e.timestamp_micros());
    format!("concord/vault/value\0{token}\0{kind}\0{subject}\0{data_key}\0{expiry}").into_bytes()
}

/// The two keys derived from a subject's data key.
#[derive(Clone, Debug)]
pub struct SubjectKeys {
    pub encrypt: SecretKey,
    pub index: SecretKey,
}

impl SubjectKeys {
    #[must_use]
    pub fn derive(data_key: &SecretKey) -> Self {
        Self {
            encrypt: data_key.derive(b"concord/vault/encrypt"),
            index: data_key.derive(b"concord/vault/blind-index"),
        }
    }

    /// The blind index of a convergent token: HMAC-SHA256 under the subject's index key over the
    /// context (who may ask for it), the type, the format and the normalized value. Without the
    /// key it says nothing of the value.
    #[must_use]
    pub fn blind_index(&self, context: &str, kind: &str, format: &str, normalized: &str) -> [u8; 32] {
        let mut mac =
            <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(self.index.bytes()).expect("HMAC takes any key length");
        mac.update(context.as_bytes());
        mac.update(&[0]);
        mac.update(kind.as_bytes());
        mac.update(&[0]);
        mac.update(format.as_bytes());
        mac.update(&[0]);
        mac.update(normalized.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_same_key_and_associated_data() {
        let k = SecretKey::generate().unwrap();
        let s = k.seal(b"4242424242424242", b"aad").unwrap();
        assert_eq!(k.open(&s, b"aad").unwrap().as_slice(), b"4242424242424242");
        assert!(!s.ciphertext.windows(4).any(|w| w == b"4242"));
        assert!(matches!(k.open(&s, b"other"), Err(VaultError::Crypto)));
        let other = SecretKey::generate().unwrap();
        assert!(matches!(other.open(&s, b"aad"), Err(VaultError::Crypto)));
        let mut tampered = s.clone();
        tampered.ciphertext[0] ^= 1;
        assert!(matches!(k.open(&tampered, b"aad"), Err(VaultError::Crypto)));
        let again = k.seal(b"4242424242424242", b"aad").unwrap();
        assert_ne!(again.nonce, s.nonce, "a fresh nonce every time");
    }

    #[test]
    fn wrapped_keys_round_trip_and_derived_keys_differ() {
        let master = SecretKey::generate().unwrap();
        let dk = SecretKey::generate().unwrap();
        let aad = data_key_aad(Uuid::nil(), "customer-1", 1);
        let w = master.wrap(&dk, &aad).unwrap();
        let back = master.unwrap_key(&w, &aad).unwrap();
        assert_eq!(back.bytes(), dk.bytes());
        assert!(
            master
                .unwrap_key(&w, &data_key_aad(Uuid::nil(), "customer-2", 1))
                .is_err()
        );
        let keys = SubjectKeys::derive(&dk);
        assert_ne!(keys.encrypt.bytes(), keys.index.bytes());
        assert_ne!(keys.encrypt.bytes(), dk.bytes());
        let a = keys.blind_index("api", "card", "random", "4242424242424242");
        assert_eq!(a, keys.blind_index("api", "card", "random", "4242424242424242"));
        assert_ne!(a, keys.blind_index("api", "card", "last4", "4242424242424242"));
        assert_ne!(
            a,
            keys.blind_index("event-fields", "card", "random", "4242424242424242")
        );
        let other = SubjectKeys::derive(&SecretKey::generate().unwrap());
        assert_ne!(a, other.blind_index("api", "card", "random", "4242424242424242"));
    }

    #[test]
    fn master_keys_parse_from_base64_of_32_bytes_only() {
        let k = SecretKey::generate().unwrap();
        let text = k.to_base64();
        assert_eq!(
            SecretKey::from_base64(&format!(" {}\n", text.as_str()))
                .unwrap()
                .bytes(),
            k.bytes()
        );
        assert!(SecretKey::from_base64("not base64!").is_err());
        assert!(SecretKey::from_base64("AAAA").is_err());
        assert_eq!(format!("{k:?}"), "SecretKey(..)");
    }
}
