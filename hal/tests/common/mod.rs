//! Helpers shared by the integration tests.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]
#![allow(dead_code)]

use boundkey_hal::{Digest, PublicKeyBytes, Signature};
use p256::ecdsa::signature::hazmat::PrehashVerifier;

/// Verifies `sig` over `digest` with `pk` exactly as a JWS ES256 verifier would, and checks the
/// low-S form the KeyStore contract promises.
pub fn assert_verifies(pk: &PublicKeyBytes, digest: &Digest, sig: &Signature) {
    let vk = p256::ecdsa::VerifyingKey::from(&pk.to_p256());
    let parsed = p256::ecdsa::Signature::from_slice(&sig.0).expect("64-byte r||s");
    assert!(parsed.normalize_s().is_none(), "signature is not low-S");
    vk.verify_prehash(&digest.0, &parsed)
        .expect("signature verifies with the key's public key");
}

pub fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}
