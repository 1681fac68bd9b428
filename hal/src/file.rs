//! File backend: P-256 keys as PKCS#8 PEM files, for development and devices without a TPM.
//!
//! Layout: key `NAME` is `DIR/NAME.pem`, an unencrypted PKCS#8 `PRIVATE KEY` PEM of a P-256
//! secret key, mode 0600, in a directory created 0700. Files are written atomically and never
//! replaced (see `fsutil`), so a key is either absent or complete. Anyone who can read the file
//! can copy the key: this backend gives no protection beyond file permissions.
//!
//! Secret material (file contents, decoded key) lives in zeroizing buffers and is dropped after
//! each operation; nothing is cached between calls.

use std::path::{Path, PathBuf};

use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::ecdsa::SigningKey;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use p256::SecretKey;

use crate::fsutil::{self, CreateError, ReadError};
use crate::{Backend, Digest, HalError, KeyName, KeyStore, PublicKeyBytes, Signature};

const EXT: &str = "pem";

/// A [`KeyStore`] keeping PKCS#8 PEM files in one directory.
#[derive(Debug)]
pub struct FileKeyStore {
    dir: PathBuf,
}

impl FileKeyStore {
    /// Opens the store in `dir`, creating it with mode 0700 if missing.
    pub fn open(dir: &Path) -> Result<Self, HalError> {
        fsutil::ensure_dir(dir)?;
        Ok(FileKeyStore {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory holding the key files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file that holds (or would hold) key `name`.
    pub fn key_path(&self, name: &KeyName) -> PathBuf {
        fsutil::key_path(&self.dir, name, EXT)
    }

    fn load(&self, name: &KeyName) -> Result<SecretKey, HalError> {
        let path = self.key_path(name);
        let corrupt = |detail: String| HalError::KeyCorrupt {
            name: name.to_string(),
            detail: format!("{}: {detail}", path.display()),
        };
        let bytes = match fsutil::read_key_file(&path) {
            Ok(Some(b)) => b,
            Ok(None) => return Err(HalError::KeyNotFound(name.to_string())),
            Err(ReadError::Io(e)) => return Err(e),
            Err(ReadError::TooLarge(n)) => {
                return Err(corrupt(format!("{n} bytes is too large for a key file")))
            }
        };
        let pem = std::str::from_utf8(&bytes)
            .map_err(|_| corrupt("not a PEM file (not UTF-8 text)".into()))?;
        SecretKey::from_pkcs8_pem(pem)
            .map_err(|e| corrupt(format!("not a PKCS#8 PEM P-256 private key ({e})")))
    }
}

impl KeyStore for FileKeyStore {
    fn backend(&self) -> Backend {
        Backend::File
    }

    fn create(&mut self, name: &KeyName) -> Result<PublicKeyBytes, HalError> {
        let path = self.key_path(name);
        // Checked first so an existing key costs no key generation; create_new re-checks
        // atomically.
        if path.exists() {
            return Err(HalError::KeyExists(name.to_string()));
        }
        let secret = SecretKey::random(&mut rand_core::OsRng);
        let pem = secret
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| HalError::KeyCorrupt {
                name: name.to_string(),
                detail: format!("PKCS#8 encoding failed: {e}"),
            })?;
        match fsutil::create_new(&self.dir, &path, pem.as_bytes()) {
            Ok(()) => Ok(PublicKeyBytes::from(&secret.public_key())),
            Err(CreateError::Exists) => Err(HalError::KeyExists(name.to_string())),
            Err(CreateError::Hal(e)) => Err(e),
        }
    }

    fn public_key(&mut self, name: &KeyName) -> Result<PublicKeyBytes, HalError> {
        Ok(PublicKeyBytes::from(&self.load(name)?.public_key()))
    }

    fn sign_digest(&mut self, name: &KeyName, digest: &Digest) -> Result<Signature, HalError> {
        let signing_key = SigningKey::from(self.load(name)?);
        // RFC 6979 deterministic nonce; p256 does not normalise S itself.
        let sig: p256::ecdsa::Signature =
            signing_key
                .sign_prehash(&digest.0)
                .map_err(|e| HalError::KeyCorrupt {
                    name: name.to_string(),
                    detail: format!("signing failed: {e}"),
                })?;
        let sig = sig.normalize_s().unwrap_or(sig);
        Ok(Signature(sig.to_bytes().into()))
    }

    fn delete(&mut self, name: &KeyName) -> Result<(), HalError> {
        fsutil::remove(&self.dir, &self.key_path(name))
    }

    fn list(&self) -> Result<Vec<KeyName>, HalError> {
        fsutil::list(&self.dir, EXT)
    }
}

#[cfg(test)]
mod tests {
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
