//! Compact JWS with `alg: ES256` only.
//!
//! Signing is split in two so that a key which never leaves its device (a TPM) can sign: build
//! the [`signing_input`], hash it (SHA-256) and sign the digest anywhere, then [`assemble`].
//! Verification accepts only ES256 with a 64-byte r‖s signature; the high-S twin of a valid
//! signature verifies the same way (ECDSA does not distinguish them), so it cannot be used to
//! make a "different" token, and everything this crate signs is low-S.
//!
//! Signatures are checked with ring, the implementation rustls already brings: its P-256 is
//! hand-tuned and costs about a tenth of the pure-Rust `p256` crate's in the agent's size-first
//! build (`docs/performance.md`), on the hot path of every ceremony on both sides.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::{Signature, SigningKey};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Longest compact JWS accepted; documents here are a few hundred bytes.
pub const MAX_JWS_LEN: usize = 8 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwsError {
    #[error("JWS is longer than {MAX_JWS_LEN} bytes")]
    TooLong,
    #[error("JWS is not three base64url parts separated by dots")]
    Syntax,
    #[error("JWS header is invalid: {0}")]
    Header(String),
    #[error("JWS algorithm {0:?} is not accepted (only ES256)")]
    Algorithm(String),
    #[error("JWS signature is malformed")]
    SignatureEncoding,
    #[error("JWS signature does not verify")]
    BadSignature,
    #[error("signing key is not a P-256 PKCS#8 key")]
    Key,
}

/// The protected header. Unknown fields are rejected so nothing unsigned-by-intent slips in
/// (no `jku`, `x5u`, `crit`, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub alg: String,
    pub typ: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
}

/// `BASE64URL(header) || '.' || BASE64URL(payload)`; what gets hashed and signed.
pub fn signing_input(kid: Option<&str>, payload: &[u8]) -> String {
    let header = Header {
        alg: "ES256".into(),
        typ: "JWT".into(),
        kid: kid.map(str::to_string),
    };
    // Serialising a struct of strings cannot fail.
    let h = serde_json::to_vec(&header).unwrap_or_default();
    let mut s = URL_SAFE_NO_PAD.encode(h);
    s.push('.');
    s.push_str(&URL_SAFE_NO_PAD.encode(payload));
    s
}

/// SHA-256 of the signing input: the digest a hardware key signs.
pub fn digest(signing_input: &str) -> [u8; 32] {
    Sha256::digest(signing_input.as_bytes()).into()
}

/// Appends a 64-byte r‖s signature to a signing input.
pub fn assemble(signing_input: &str, signature: &[u8; 64]) -> String {
    let mut s = String::with_capacity(signing_input.len() + 87);
    s.push_str(signing_input);
    s.push('.');
    s.push_str(&URL_SAFE_NO_PAD.encode(signature));
    s
}

/// Signs with a PKCS#8 (DER) P-256 key through ring; the signature is low-S. Fails only for a
/// key that is not a P-256 PKCS#8 key.
pub fn sign_pkcs8(pkcs8: &[u8], kid: Option<&str>, payload: &[u8]) -> Result<String, JwsError> {
    let rng = ring::rand::SystemRandom::new();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        pkcs8,
        &rng,
    )
    .map_err(|_| JwsError::Key)?;
    let input = signing_input(kid, payload);
    let sig = pair
        .sign(&rng, input.as_bytes())
        .map_err(|_| JwsError::Key)?;
    let sig = Signature::from_slice(sig.as_ref()).map_err(|_| JwsError::Key)?;
    let sig = sig.normalize_s().unwrap_or(sig);
    let bytes: [u8; 64] = sig.to_bytes().into();
    Ok(assemble(&input, &bytes))
}

/// Signs with an in-memory key (CA keys, tests). The signature is low-S.
pub fn sign(key: &SigningKey, kid: Option<&str>, payload: &[u8]) -> String {
    use p256::ecdsa::signature::hazmat::PrehashSigner;
    let input = signing_input(kid, payload);
    // Signing a 32-byte prehash with a valid key does not fail.
    let sig: Signature = match key.sign_prehash(&digest(&input)) {
        Ok(s) => s,
        Err(_) => return String::new(),
    };
    let sig = sig.normalize_s().unwrap_or(sig);
    let bytes: [u8; 64] = sig.to_bytes().into();
    assemble(&input, &bytes)
}

/// A JWS whose structure and header were checked but whose signature was not yet verified.
#[derive(Debug, Clone)]
pub struct Parsed<'a> {
    pub header: Header,
    signing_input: &'a str,
    payload_b64: &'a str,
    signature: Signature,
}

/// Parses the three parts and the header (rejecting any alg but ES256).
pub fn parse(jws: &str) -> Result<Parsed<'_>, JwsError> {
    if jws.len() > MAX_JWS_LEN {
        return Err(JwsError::TooLong);
    }
    let mut parts = jws.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwsError::Syntax);
    };
    let header_bytes = URL_SAFE_NO_PAD.decode(h).map_err(|_| JwsError::Syntax)?;
    let header: Header =
        serde_json::from_slice(&header_bytes).map_err(|e| JwsError::Header(e.to_string()))?;
    if header.alg != "ES256" {
        return Err(JwsError::Algorithm(header.alg));
    }
    let sig_bytes = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| JwsError::SignatureEncoding)?;
    if sig_bytes.len() != 64 {
        return Err(JwsError::SignatureEncoding);
    }
    let signature = Signature::from_slice(&sig_bytes).map_err(|_| JwsError::SignatureEncoding)?;
    Ok(Parsed {
        header,
        signing_input: &jws[..h.len() + 1 + p.len()],
        payload_b64: p,
        signature,
    })
}

impl Parsed<'_> {
    /// Verifies the signature with `key` and returns the payload bytes.
    pub fn verify(&self, key: &p256::PublicKey) -> Result<Vec<u8>, JwsError> {
        let point = key.to_encoded_point(false);
        let sig: [u8; 64] = self.signature.to_bytes().into();
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            point.as_bytes(),
        )
        .verify(self.signing_input.as_bytes(), &sig)
        .map_err(|_| JwsError::BadSignature)?;
        URL_SAFE_NO_PAD
            .decode(self.payload_b64)
            .map_err(|_| JwsError::Syntax)
    }
}

/// Parses and verifies in one step.
pub fn verify(jws: &str, key: &p256::PublicKey) -> Result<(Header, Vec<u8>), JwsError> {
    let p = parse(jws)?;
    let payload = p.verify(key)?;
    Ok((p.header, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::random(&mut rand_core::OsRng)
    }

    #[test]
    fn sign_verify_round_trip() {
        let k = key();
        let pk = p256::PublicKey::from(k.verifying_key());
        let jws = sign(&k, Some("abc"), br#"{"a":1}"#);
        let (h, payload) = verify(&jws, &pk).unwrap();
        assert_eq!(h.kid.as_deref(), Some("abc"));
        assert_eq!(payload, br#"{"a":1}"#);
    }

    #[test]
    fn wrong_key_and_tampering_are_refused() {
        let k = key();
        let other = p256::PublicKey::from(key().verifying_key());
        let pk = p256::PublicKey::from(k.verifying_key());
        let jws = sign(&k, None, b"payload");
        assert_eq!(verify(&jws, &other).unwrap_err(), JwsError::BadSignature);
        let mut parts: Vec<&str> = jws.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(b"payloae");
        parts[1] = &forged;
        assert_eq!(
            verify(&parts.join("."), &pk).unwrap_err(),
            JwsError::BadSignature
        );
    }

    #[test]
    fn high_s_twin_verifies_as_the_same_signature() {
        let k = key();
        let pk = p256::PublicKey::from(k.verifying_key());
        let jws = sign(&k, None, b"x");
        let (input, sig_b64) = jws.rsplit_once('.').unwrap();
        let sig = Signature::from_slice(&URL_SAFE_NO_PAD.decode(sig_b64).unwrap()).unwrap();
        let (r, s) = sig.split_scalars();
        let neg_s: p256::Scalar = -*s.as_ref();
        let high = Signature::from_scalars(r.to_bytes(), neg_s.to_bytes()).unwrap();
        assert!(high.normalize_s().is_some(), "twin must be high-S");
        let bytes: [u8; 64] = high.to_bytes().into();
        assert!(verify(&assemble(input, &bytes), &pk).is_ok());
    }

    #[test]
    fn pkcs8_keys_sign_low_s_tokens_the_verifier_accepts() {
        use p256::pkcs8::EncodePrivateKey;
        let k = key();
        let pk = p256::PublicKey::from(k.verifying_key());
        let der = k.to_pkcs8_der().unwrap();
        for i in 0..16u8 {
            let jws = sign_pkcs8(der.as_bytes(), Some("k"), &[i]).unwrap();
            let (h, payload) = verify(&jws, &pk).unwrap();
            assert_eq!((h.kid.as_deref(), payload), (Some("k"), vec![i]));
            let sig = parse(&jws).unwrap().signature;
            assert!(sig.normalize_s().is_none(), "high-S emitted");
        }
        assert_eq!(sign_pkcs8(b"junk", None, b"x"), Err(JwsError::Key));
    }

    #[test]
    fn other_algorithms_and_garbage_are_refused() {
        let pk = p256::PublicKey::from(key().verifying_key());
        let none_hdr = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let jws = format!("{none_hdr}.{}.", URL_SAFE_NO_PAD.encode(b"x"));
        assert!(matches!(verify(&jws, &pk), Err(JwsError::Algorithm(_))));
        let hs = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256","typ":"JWT","jku":"http://x"}"#);
        let jws = format!("{hs}.e30.{}", URL_SAFE_NO_PAD.encode([0u8; 64]));
        assert!(matches!(verify(&jws, &pk), Err(JwsError::Header(_))));
        assert_eq!(verify("a.b", &pk).unwrap_err(), JwsError::Syntax);
        assert_eq!(verify("a.b.c.d", &pk).unwrap_err(), JwsError::Syntax);
        assert_eq!(
            verify(&"a".repeat(MAX_JWS_LEN + 1), &pk).unwrap_err(),
            JwsError::TooLong
        );
        let good = sign(&key(), None, b"x");
        let (input, _) = good.rsplit_once('.').unwrap();
        let short = format!("{input}.{}", URL_SAFE_NO_PAD.encode([1u8; 63]));
        assert_eq!(
            verify(&short, &pk).unwrap_err(),
            JwsError::SignatureEncoding
        );
    }
}
