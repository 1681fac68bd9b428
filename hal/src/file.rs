//! File backend: P-256 keys as PKCS#8 PEM files, for development and devices without a TPM.
//!
//! Layout: key `NAME` is `DIR/NAME.pem`, an unencrypted PKCS#8 `PRIVATE KEY` PEM of a P-256
//! secret key, mode 0600, in a directory created 0700. Files are written atomically and never
//! replaced (see `key_dir`), so a key is either absent or complete. Anyone who can read the file
//! can copy the key: this backend gives no protection beyond file permissions.
//!
//! Secret material (file contents, decoded key) lives in zeroizing buffers and is dropped after
//! each operation; nothing is cached between calls.

use std::path::{Path, PathBuf};

use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::ecdsa::SigningKey;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use p256::SecretKey;

use crate::key_dir::KeyDir;
use crate::{Backend, Digest, HalError, KeyFault, KeyName, KeyStore, PublicKeyBytes, Signature};

const EXT: &str = "pem";

/// A [`KeyStore`] keeping PKCS#8 PEM files in one directory.
#[derive(Debug)]
pub struct FileKeyStore {
    keys: KeyDir,
}

impl FileKeyStore {
    /// Opens the store in `dir`, creating it with mode 0700 if missing.
    pub fn open(dir: &Path) -> Result<Self, HalError> {
        Ok(FileKeyStore {
            keys: KeyDir::open(dir, EXT)?,
        })
    }

    /// The directory holding the key files.
    pub fn dir(&self) -> &Path {
        self.keys.dir()
    }

    /// The file that holds (or would hold) key `name`.
    pub fn key_path(&self, name: &KeyName) -> PathBuf {
        self.keys.path(name)
    }

    fn corrupt(&self, name: &KeyName, fault: KeyFault) -> HalError {
        HalError::KeyCorrupt {
            name: name.to_string(),
            path: self.key_path(name),
            fault,
        }
    }

    fn load(&self, name: &KeyName) -> Result<SecretKey, HalError> {
        let bytes = self.keys.read(name)?;
        let pem = std::str::from_utf8(&bytes).map_err(|_| self.corrupt(name, KeyFault::NotText))?;
        SecretKey::from_pkcs8_pem(pem).map_err(|e| self.corrupt(name, KeyFault::NotPkcs8(e)))
    }
}

impl KeyStore for FileKeyStore {
    fn backend(&self) -> Backend {
        Backend::File
    }

    fn create(&mut self, name: &KeyName) -> Result<PublicKeyBytes, HalError> {
        // Checked first so an existing key costs no key generation; the create re-checks
        // atomically.
        if self.key_path(name).exists() {
            return Err(HalError::KeyExists(name.to_string()));
        }
        let secret = SecretKey::random(&mut rand_core::OsRng);
        let pem = secret
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| self.corrupt(name, KeyFault::Pkcs8Encode(e)))?;
        self.keys.create(name, pem.as_bytes())?;
        Ok(PublicKeyBytes::from(&secret.public_key()))
    }

    fn public_key(&mut self, name: &KeyName) -> Result<PublicKeyBytes, HalError> {
        Ok(PublicKeyBytes::from(&self.load(name)?.public_key()))
    }

    fn sign_digest(&mut self, name: &KeyName, digest: &Digest) -> Result<Signature, HalError> {
        let signing_key = SigningKey::from(self.load(name)?);
        // RFC 6979 deterministic nonce; p256 does not normalise S itself.
        let sig: p256::ecdsa::Signature = signing_key
            .sign_prehash(&digest.0)
            .map_err(|e| self.corrupt(name, KeyFault::Sign(e)))?;
        let sig = sig.normalize_s().unwrap_or(sig);
        Ok(Signature(sig.to_bytes().into()))
    }

    fn delete(&mut self, name: &KeyName) -> Result<(), HalError> {
        self.keys.remove(name)
    }

    fn list(&self) -> Result<Vec<KeyName>, HalError> {
        self.keys.list()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use p256::ecdsa::signature::hazmat::PrehashVerifier;

    #[test]
    fn signatures_are_low_s_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileKeyStore::open(dir.path()).unwrap();
        let name = KeyName::new("k").unwrap();
        let pk = store.create(&name).unwrap();
        let vk = p256::ecdsa::VerifyingKey::from(&pk.to_p256());
        // About half of raw ECDSA signatures are high-S; 64 digests make missing
        // normalisation show up with overwhelming probability.
        for i in 0..64u32 {
            let d = Digest::of(&i.to_be_bytes());
            let sig = store.sign_digest(&name, &d).unwrap();
            let parsed = p256::ecdsa::Signature::from_slice(&sig.0).unwrap();
            assert!(parsed.normalize_s().is_none(), "high-S signature emitted");
            vk.verify_prehash(&d.0, &parsed).unwrap();
        }
    }
}
