//! The Standard Webhooks signature: `webhook-signature: v1,<base64(HMAC-SHA256(key,
//! "{webhook-id}.{webhook-timestamp}.{body}"))>`, one entry per valid secret, separated by
//! spaces.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::secret::key_bytes;

type HmacSha256 = Hmac<Sha256>;

/// Why a delivery does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the secret is not a base64 key")]
    InvalidSecret,
    #[error("the timestamp is not a number of seconds")]
    InvalidTimestamp,
    #[error("the timestamp is too far from now")]
    TimestampOutOfTolerance,
    #[error("no signature matches")]
    NoMatchingSignature,
}

/// The `webhook-signature` value for `body`, signed with each of `secrets` (the current one
/// first). A secret that is not valid base64 is skipped.
pub fn sign(secrets: &[&str], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .filter_map(|secret| mac(secret, id, timestamp, body))
        .map(|mac| format!("v1,{}", STANDARD.encode(mac)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Checks a delivery as a receiver does: the timestamp within `tolerance_seconds` of `now`
/// (unix seconds) and one `v1` entry of `signature_header` equal to the HMAC of
/// `"{id}.{timestamp}.{body}"` under `secret` (compared in constant time).
pub fn verify(
    secret: &str,
    id: &str,
    timestamp_header: &str,
    signature_header: &str,
    body: &[u8],
    now: i64,
    tolerance_seconds: i64,
) -> Result<(), VerifyError> {
    let timestamp: i64 = timestamp_header
        .trim()
        .parse()
        .map_err(|_| VerifyError::InvalidTimestamp)?;
    if (now - timestamp).abs() > tolerance_seconds {
        return Err(VerifyError::TimestampOutOfTolerance);
    }
    let key = key_bytes(secret).ok_or(VerifyError::InvalidSecret)?;
    let signed = signed_content(id, timestamp, body);
    for entry in signature_header.split(' ') {
        let Some(("v1", encoded)) = entry.split_once(',') else {
            continue;
        };
        let Ok(expected) = STANDARD.decode(encoded) else {
            continue;
        };
        let mut mac = HmacSha256::new_from_slice(&key).map_err(|_| VerifyError::InvalidSecret)?;
        mac.update(&signed);
        if mac.verify_slice(&expected).is_ok() {
            return Ok(());
        }
    }
    Err(VerifyError::NoMatchingSignature)
}

fn mac(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Option<Vec<u8>> {
    let key = key_bytes(secret)?;
    let mut mac = HmacSha256::new_from_slice(&key).ok()?;
    mac.update(&signed_content(id, timestamp, body));
    Some(mac.finalize().into_bytes().to_vec())
}

fn signed_content(id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut content = format!("{id}.{timestamp}.").into_bytes();
    content.extend_from_slice(body);
    content
}

#[cfg(test)]
mod tests {
    use super::*;

    // The Standard Webhooks specification's test vector.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: i64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn signs_the_specification_vector() {
        assert_eq!(sign(&[SECRET], ID, TIMESTAMP, BODY), SIGNATURE);
    }

    #[test]
    fn verifies_the_specification_vector_and_refuses_changes() {
        let ts = TIMESTAMP.to_string();
        assert_eq!(
            verify(SECRET, ID, &ts, SIGNATURE, BODY, TIMESTAMP, 300),
            Ok(())
        );
        assert_eq!(
            verify(
                SECRET,
                ID,
                &ts,
                SIGNATURE,
                br#"{"test": 2432232315}"#,
                TIMESTAMP,
                300
            ),
            Err(VerifyError::NoMatchingSignature)
        );
        assert_eq!(
            verify(SECRET, "msg_other", &ts, SIGNATURE, BODY, TIMESTAMP, 300),
            Err(VerifyError::NoMatchingSignature)
        );
        assert_eq!(
            verify(SECRET, ID, &ts, SIGNATURE, BODY, TIMESTAMP + 301, 300),
            Err(VerifyError::TimestampOutOfTolerance)
        );
    }

    #[test]
    fn either_of_two_secrets_verifies_a_double_signature() {
        let other = crate::generate_secret();
        let header = sign(&[&other, SECRET], ID, TIMESTAMP, BODY);
        assert_eq!(header.split(' ').count(), 2);
        let ts = TIMESTAMP.to_string();
        assert_eq!(
            verify(SECRET, ID, &ts, &header, BODY, TIMESTAMP, 300),
            Ok(())
        );
        assert_eq!(
            verify(&other, ID, &ts, &header, BODY, TIMESTAMP, 300),
            Ok(())
        );
        let stranger = crate::generate_secret();
        assert_eq!(
            verify(&stranger, ID, &ts, &header, BODY, TIMESTAMP, 300),
            Err(VerifyError::NoMatchingSignature)
        );
    }
}
