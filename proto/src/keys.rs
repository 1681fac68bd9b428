//! Public-key encodings: SSH `authorized_keys` form for bound keys, PKIX DER for identity keys,
//! and the key id (`kid`) derived from PKIX DER.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use p256::pkcs8::{DecodePublicKey, EncodePublicKey};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("not an SSH public key: {0}")]
    SshSyntax(String),
    #[error("unsupported key type {0} (only ecdsa-sha2-nistp256 is accepted)")]
    UnsupportedType(String),
    #[error("invalid P-256 public key")]
    InvalidPoint,
    #[error("invalid base64 in public key")]
    Base64,
    #[error("invalid PKIX public key (expected a P-256 SubjectPublicKeyInfo)")]
    Pkix,
}

/// Key id: base64url-no-pad(SHA-256(PKIX DER of the public key)).
pub fn kid(key: &p256::PublicKey) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(pkix_der(key)))
}

/// PKIX (SubjectPublicKeyInfo) DER of a P-256 key.
pub fn pkix_der(key: &p256::PublicKey) -> Vec<u8> {
    // Encoding a valid in-memory point cannot fail; the Result exists for foreign key types.
    key.to_public_key_der()
        .map(|d| d.as_bytes().to_vec())
        .unwrap_or_default()
}

/// Standard base64 of PKIX DER: how identity public keys travel in messages.
pub fn pkix_b64(key: &p256::PublicKey) -> String {
    STANDARD.encode(pkix_der(key))
}

/// Parses standard-base64 PKIX DER of a P-256 key.
pub fn parse_pkix_b64(s: &str) -> Result<p256::PublicKey, KeyError> {
    let der = STANDARD.decode(s.trim()).map_err(|_| KeyError::Base64)?;
    p256::PublicKey::from_public_key_der(&der).map_err(|_| KeyError::Pkix)
}

/// `ecdsa-sha2-nistp256 AAAA…` (no comment), the form operators paste into `tokens add`.
pub fn ssh_public_key(key: &p256::PublicKey) -> String {
    let ecdsa = ssh_key::public::EcdsaPublicKey::from(p256::ecdsa::VerifyingKey::from(key));
    let pk = ssh_key::PublicKey::from(ssh_key::public::KeyData::Ecdsa(ecdsa));
    // OpenSSH encoding of an in-memory key only fails on allocation failure.
    pk.to_openssh().unwrap_or_default()
}

/// Parses an SSH `authorized_keys` line (an optional trailing comment is ignored); only
/// `ecdsa-sha2-nistp256` is accepted because the bound key must be a TPM-capable P-256 key.
pub fn parse_ssh_public_key(s: &str) -> Result<p256::PublicKey, KeyError> {
    let s = s.trim();
    let algo = s.split_whitespace().next().unwrap_or_default();
    if algo != "ecdsa-sha2-nistp256" {
        if algo.starts_with("ssh-") || algo.starts_with("ecdsa-") || algo.starts_with("sk-") {
            return Err(KeyError::UnsupportedType(algo.to_string()));
        }
        return Err(KeyError::SshSyntax(
            "expected \"ecdsa-sha2-nistp256 AAAA…\"".into(),
        ));
    }
    let pk = ssh_key::PublicKey::from_openssh(s).map_err(|e| KeyError::SshSyntax(e.to_string()))?;
    match pk.key_data() {
        ssh_key::public::KeyData::Ecdsa(ssh_key::public::EcdsaPublicKey::NistP256(point)) => {
            p256::PublicKey::from_sec1_bytes(point.as_bytes()).map_err(|_| KeyError::InvalidPoint)
        }
        other => Err(KeyError::UnsupportedType(other.algorithm().to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> p256::PublicKey {
        p256::SecretKey::random(&mut rand_core::OsRng).public_key()
    }

    #[test]
    fn ssh_round_trip() {
        let k = key();
        let s = ssh_public_key(&k);
        assert!(s.starts_with("ecdsa-sha2-nistp256 AAAA"), "{s}");
        assert_eq!(parse_ssh_public_key(&s).unwrap(), k);
        assert_eq!(
            parse_ssh_public_key(&format!("  {s} device-7\n")).unwrap(),
            k
        );
    }

    #[test]
    fn ssh_rejects_other_types_and_garbage() {
        let ed = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGYlbcmW0P2EVSSYQg4tI0fCRN5Wm1qZB7ma2CTbBl0k";
        assert!(matches!(
            parse_ssh_public_key(ed),
            Err(KeyError::UnsupportedType(_))
        ));
        assert!(matches!(
            parse_ssh_public_key("hello"),
            Err(KeyError::SshSyntax(_))
        ));
        assert!(parse_ssh_public_key("ecdsa-sha2-nistp256 AAAA!!").is_err());
        let p384 = "ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQ=";
        assert!(matches!(
            parse_ssh_public_key(p384),
            Err(KeyError::UnsupportedType(_))
        ));
    }

    #[test]
    fn kid_is_sha256_of_pkix() {
        let k = key();
        let id = kid(&k);
        assert_eq!(id.len(), 43);
        let expect =
            URL_SAFE_NO_PAD.encode(Sha256::digest(k.to_public_key_der().unwrap().as_bytes()));
        assert_eq!(id, expect);
        assert_ne!(id, kid(&key()));
    }

    #[test]
    fn pkix_round_trip() {
        let k = key();
        assert_eq!(parse_pkix_b64(&pkix_b64(&k)).unwrap(), k);
        assert_eq!(parse_pkix_b64("AAAA"), Err(KeyError::Pkix));
        assert_eq!(parse_pkix_b64("@@"), Err(KeyError::Base64));
    }
}
