//! Encryption of credentials at rest: AES-256-GCM with a random 96-bit nonce,
//! the trigger id as associated data (a ciphertext cannot be moved to another
//! trigger), and a key id stored beside each ciphertext so keys can rotate.

use std::collections::HashMap;

use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{AeadCore, Aes256Gcm, Key, Nonce};
use base64::Engine as _;
use sha2::{Digest, Sha256};

const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("encryption key is not valid base64")]
    KeyNotBase64,
    #[error("encryption key must decode to 32 bytes, got {0}")]
    KeyLength(usize),
    #[error("no encryption key configured: set KT_ENCRYPTION_KEY (base64 of 32 random bytes, e.g. `openssl rand -base64 32`) to store credentials")]
    NoKey,
    #[error("ciphertext was written with key id {0}, which is not configured")]
    UnknownKey(String),
    #[error("encryption failed")]
    Encrypt,
    /// Carries the key id so an operator knows which key to check.
    #[error("ciphertext under key id {0} failed authentication (tampered data, or not the key that wrote it)")]
    Decrypt(String),
}

/// The configured keys: one primary that encrypts, any number of older ones
/// that still decrypt.
#[derive(Clone, Default)]
pub struct Keyring {
    primary: Option<String>,
    keys: HashMap<String, Key<Aes256Gcm>>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("primary", &self.primary)
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Keyring {
    /// A keyring from base64 keys; the first encrypts. Empty strings are
    /// ignored, so an unset variable gives an empty keyring.
    pub fn from_base64<'a>(keys: impl IntoIterator<Item = &'a str>) -> Result<Self, CryptoError> {
        let mut ring = Keyring::default();
        for encoded in keys.into_iter().map(str::trim).filter(|k| !k.is_empty()) {
            let raw =
                base64::engine::general_purpose::STANDARD.decode(encoded).map_err(|_| CryptoError::KeyNotBase64)?;
            if raw.len() != 32 {
                return Err(CryptoError::KeyLength(raw.len()));
            }
            let id = key_id(&raw);
            ring.primary.get_or_insert_with(|| id.clone());
            ring.keys.insert(id, *Key::<Aes256Gcm>::from_slice(&raw));
        }
        Ok(ring)
    }

    pub fn has_key(&self) -> bool {
        self.primary.is_some()
    }

    /// The id of the key that encrypts (stored beside each ciphertext).
    pub fn primary_id(&self) -> Option<&str> {
        self.primary.as_deref()
    }

    /// Encrypts `plaintext` bound to `context`; returns (key id, nonce || ciphertext).
    pub fn encrypt(&self, context: &[u8], plaintext: &[u8]) -> Result<(String, Vec<u8>), CryptoError> {
        let id = self.primary.as_ref().ok_or(CryptoError::NoKey)?;
        let cipher = Aes256Gcm::new(&self.keys[id]);
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let sealed =
            cipher.encrypt(&nonce, Payload { msg: plaintext, aad: context }).map_err(|_| CryptoError::Encrypt)?;
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok((id.clone(), out))
    }

    pub fn decrypt(&self, key_id: &str, context: &[u8], data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let key = self.keys.get(key_id).ok_or_else(|| CryptoError::UnknownKey(key_id.to_owned()))?;
        if data.len() < NONCE_LEN {
            return Err(CryptoError::Decrypt(key_id.to_owned()));
        }
        let (nonce, sealed) = data.split_at(NONCE_LEN);
        Aes256Gcm::new(key)
            .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad: context })
            .map_err(|_| CryptoError::Decrypt(key_id.to_owned()))
    }
}

/// First 8 bytes of the key's SHA-256, hex: identifies a key without revealing it.
fn key_id(raw: &[u8]) -> String {
    Sha256::digest(raw)[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    const K2: &str = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";

    #[test]
    fn test_round_trip_and_ciphertext_hides_plaintext() {
        let ring = Keyring::from_base64([K1]).unwrap();
        let (id, sealed) = ring.encrypt(b"trigger-1", b"s3cret-password").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"s3cret"));
        assert_eq!(ring.decrypt(&id, b"trigger-1", &sealed).unwrap(), b"s3cret-password");
    }

    #[test]
    fn test_ciphertext_is_bound_to_its_context() {
        let ring = Keyring::from_base64([K1]).unwrap();
        let (id, sealed) = ring.encrypt(b"trigger-1", b"x").unwrap();
        assert!(matches!(ring.decrypt(&id, b"trigger-2", &sealed), Err(CryptoError::Decrypt(i)) if i == id));
    }

    #[test]
    fn test_rotation_old_key_still_decrypts() {
        let old = Keyring::from_base64([K1]).unwrap();
        let (id, sealed) = old.encrypt(b"t", b"value").unwrap();
        let rotated = Keyring::from_base64([K2, K1]).unwrap();
        assert_eq!(rotated.decrypt(&id, b"t", &sealed).unwrap(), b"value");
        let (new_id, _) = rotated.encrypt(b"t", b"value").unwrap();
        assert_ne!(new_id, id);
        let only_new = Keyring::from_base64([K2]).unwrap();
        assert!(matches!(only_new.decrypt(&id, b"t", &sealed), Err(CryptoError::UnknownKey(_))));
    }

    #[test]
    fn test_bad_keys_are_rejected_clearly() {
        assert!(matches!(Keyring::from_base64(["%%%"]), Err(CryptoError::KeyNotBase64)));
        assert!(matches!(Keyring::from_base64(["c2hvcnQ="]), Err(CryptoError::KeyLength(5))));
        let empty = Keyring::from_base64([""]).unwrap();
        assert!(!empty.has_key());
        assert!(matches!(empty.encrypt(b"t", b"v"), Err(CryptoError::NoKey)));
        assert!(!format!("{:?}", Keyring::from_base64([K1]).unwrap()).contains(K1));
    }
}
