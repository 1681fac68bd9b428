//! A ceremony's identity key: the software P-256 key the issued certificate certifies (the
//! bound key, which controls renewal, is the key store's).
//!
//! Made and used with ring, which rustls already brings: generating the key and signing the
//! identity proof cost microseconds there, against the better part of a millisecond each with the
//! pure-Rust `p256` crate in the agent's size-first build, and both are on every ceremony's path.

use p256::pkcs8::der::pem::LineEnding;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use zeroize::Zeroizing;

use crate::error::AgentError;

/// Invariant: `pkcs8` is a P-256 PKCS#8 private key document and `public` is its public key.
#[derive(Clone)]
pub(crate) struct IdentityKey {
    pkcs8: Zeroizing<Vec<u8>>,
    public: p256::PublicKey,
    /// Tests that replay a seeded transcript sign with RFC 6979 (deterministic) nonces instead
    /// of ring's random ones.
    #[cfg(test)]
    deterministic: Option<p256::SecretKey>,
}

impl std::fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityKey")
            .field("public", &boundkey_proto::keys::kid(&self.public))
            .finish_non_exhaustive()
    }
}

impl IdentityKey {
    /// A fresh key from the operating system's generator.
    pub(crate) fn generate() -> Result<IdentityKey, AgentError> {
        let rng = ring::rand::SystemRandom::new();
        let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let doc = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng)
            .map_err(|_| internal("cannot generate the identity key"))?;
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, doc.as_ref(), &rng)
            .map_err(|_| internal("cannot read back the identity key"))?;
        use ring::signature::KeyPair;
        let public = p256::PublicKey::from_sec1_bytes(pair.public_key().as_ref())
            .map_err(|_| internal("the identity key's public key is not a P-256 point"))?;
        Ok(IdentityKey {
            pkcs8: Zeroizing::new(doc.as_ref().to_vec()),
            public,
            #[cfg(test)]
            deterministic: None,
        })
    }

    /// The key recorded (as PKCS#8 PEM) by a ceremony whose result may have been lost.
    pub(crate) fn from_pkcs8_pem(pem: &str) -> Result<IdentityKey, AgentError> {
        let secret = p256::SecretKey::from_pkcs8_pem(pem)
            .map_err(|e| internal(&format!("the recorded identity key is unreadable: {e}")))?;
        IdentityKey::from_secret(&secret)
    }

    /// Wraps an existing secret key (the recorded one, or a seeded one in tests).
    pub(crate) fn from_secret(secret: &p256::SecretKey) -> Result<IdentityKey, AgentError> {
        let der = secret
            .to_pkcs8_der()
            .map_err(|e| internal(&format!("cannot encode the identity key: {e}")))?;
        Ok(IdentityKey {
            pkcs8: Zeroizing::new(der.as_bytes().to_vec()),
            public: secret.public_key(),
            #[cfg(test)]
            deterministic: None,
        })
    }

    /// A key whose signatures depend only on the key and the message (the seeded pair test).
    #[cfg(all(test, feature = "pair-test"))]
    #[allow(clippy::expect_used)]
    pub(crate) fn deterministic(secret: &p256::SecretKey) -> IdentityKey {
        let mut k = IdentityKey::from_secret(secret).expect("a valid key encodes");
        k.deterministic = Some(secret.clone());
        k
    }

    pub(crate) fn public_key(&self) -> &p256::PublicKey {
        &self.public
    }

    /// PKCS#8 PEM, as written to `state.json` and the identity outputs.
    pub(crate) fn to_pkcs8_pem(&self) -> Result<String, AgentError> {
        p256::pkcs8::der::pem::encode_string("PRIVATE KEY", LineEnding::LF, &self.pkcs8)
            .map_err(|e| internal(&format!("cannot encode the identity key: {e}")))
    }

    /// A compact JWS over `payload` by this key (the identity proof).
    pub(crate) fn sign_jws(&self, payload: &[u8]) -> Result<String, AgentError> {
        #[cfg(test)]
        if let Some(k) = &self.deterministic {
            return Ok(boundkey_proto::jws::sign(&k.into(), None, payload));
        }
        boundkey_proto::jws::sign_pkcs8(&self.pkcs8, None, payload)
            .map_err(|e| internal(&format!("cannot sign with the identity key: {e}")))
    }
}

fn internal(what: &str) -> AgentError {
    AgentError::Internal(what.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_sign_verifiable_proofs_and_survive_pem() {
        let k = IdentityKey::generate().unwrap();
        let jws = k.sign_jws(b"doc").unwrap();
        let (_, payload) = boundkey_proto::jws::verify(&jws, k.public_key()).unwrap();
        assert_eq!(payload, b"doc");
        let pem = k.to_pkcs8_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
        let back = IdentityKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(back.public_key(), k.public_key());
        boundkey_proto::jws::verify(&back.sign_jws(b"x").unwrap(), k.public_key()).unwrap();
        // rustls, which presents the key in mTLS, reads the PEM too.
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes());
        assert!(der.is_ok());
        assert!(!format!("{k:?}").contains(&pem[30..60]));
    }
}
