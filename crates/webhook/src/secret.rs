//! Signing secrets: generated here, shown to their owner once, stored outside the event store.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// The prefix the Standard Webhooks specification gives secrets.
pub const PREFIX: &str = "whsec_";

/// Random bytes in a secret (the specification asks for 24 to 64).
const SECRET_BYTES: usize = 32;

/// A fresh secret: `whsec_` and the base64 of 32 random bytes.
pub fn generate_secret() -> String {
    let mut bytes = [0u8; SECRET_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    format!("{PREFIX}{}", STANDARD.encode(bytes))
}

/// The key bytes of a secret: the base64-decoded part after `whsec_` (a secret without the
/// prefix is decoded whole).
pub fn key_bytes(secret: &str) -> Option<Vec<u8>> {
    let encoded = secret.strip_prefix(PREFIX).unwrap_or(secret);
    STANDARD.decode(encoded).ok().filter(|key| !key.is_empty())
}

/// The first 16 hex digits of the secret's SHA-256: tells secrets apart without revealing them.
pub fn fingerprint(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    hex::encode(&digest[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_decode_to_32_bytes_and_differ() {
        let a = generate_secret();
        let b = generate_secret();
        assert!(a.starts_with(PREFIX));
        assert_eq!(key_bytes(&a).map(|k| k.len()), Some(32));
        assert_ne!(a, b);
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a).len(), 16);
    }
}
