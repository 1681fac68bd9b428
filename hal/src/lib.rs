//! Hardware abstraction for the bound key.
//!
//! A [`KeyStore`] holds named P-256 signing keys. Keys are referenced by name and never exported:
//! the only operations are create, read the public key, sign a SHA-256 digest, delete and list.
//! Backends: [`file`](mod@file) (PKCS#8 PEM, for development and devices without a TPM) and `tpm`
//! (tss-esapi; keys live in the TPM, only wrapped blobs are stored).
//!
//! The signing path uses fixed-size types ([`Digest`], [`Signature`], [`PublicKeyBytes`],
//! [`KeyName`]) so it does not allocate.

// A fully static musl binary has no dynamic loader: libtss2's TCTI loader (dlopen) cannot work.
#[cfg(all(feature = "tpm", target_env = "musl", target_feature = "crt-static"))]
compile_error!("the TPM backend needs a dynamically linked build (libtss2 loads its TCTI with dlopen, which a static musl binary cannot do): build a gnu target, or drop the `tpm` feature for musl");

mod attestation;
mod backend;
mod config;
pub mod error;
pub mod file;
mod key_dir;
mod secret;
#[cfg(feature = "tpm")]
pub mod tpm;
mod types;

use std::path::Path;

pub use attestation::KeyAttestation;
pub use backend::{default_backend, tpm_present, tpm_supported};
pub use config::{Parent, TpmConfig, DEFAULT_TCTI};
pub use error::{Absence, AuthTarget, ConfigError, HalError, KeyFault, TpmFault, TpmResponse};
pub use file::FileKeyStore;
pub use secret::read_secret;
#[cfg(feature = "tpm")]
pub use tpm::TpmKeyStore;
pub use types::{Backend, Digest, KeyName, PublicKeyBytes, Signature};

/// Opens the key store for `backend` in `dir`.
///
/// `tpm` configures the TPM backend (`None` means [`TpmConfig::default`]) and is ignored for the
/// file backend. Without the `tpm` feature, asking for the TPM backend fails with
/// [`HalError::TpmUnsupported`].
pub fn open_store(
    backend: Backend,
    dir: &Path,
    tpm: Option<TpmConfig>,
) -> Result<Box<dyn KeyStore>, HalError> {
    match backend {
        Backend::File => Ok(Box::new(FileKeyStore::open(dir)?)),
        #[cfg(feature = "tpm")]
        Backend::Tpm => Ok(Box::new(TpmKeyStore::open(dir, tpm.unwrap_or_default())?)),
        #[cfg(not(feature = "tpm"))]
        Backend::Tpm => {
            let _ = tpm;
            Err(HalError::TpmUnsupported)
        }
    }
}

/// A store of named, non-exportable P-256 signing keys.
///
/// Invariant kept by every implementation: a key name maps to at most one key, a key once created
/// is never replaced unless it was deleted first, and signatures are ECDSA-P256 over the given
/// digest in JWS form (r‖s, 32 bytes each, low-S).
pub trait KeyStore: Send {
    /// Which backend this is (shown by `boundkeyd status`).
    fn backend(&self) -> Backend;
    /// Creates a new key under `name`. Fails with [`HalError::KeyExists`] if one exists.
    fn create(&mut self, name: &KeyName) -> Result<PublicKeyBytes, HalError>;
    /// The public key of an existing key.
    fn public_key(&mut self, name: &KeyName) -> Result<PublicKeyBytes, HalError>;
    /// Signs a SHA-256 digest computed by the caller.
    fn sign_digest(&mut self, name: &KeyName, digest: &Digest) -> Result<Signature, HalError>;
    /// Deletes a key (and any device state for it). Deleting a missing key is not an error.
    fn delete(&mut self, name: &KeyName) -> Result<(), HalError>;
    /// Names of all keys in the store, sorted.
    fn list(&self) -> Result<Vec<KeyName>, HalError>;
    /// Gets ready for the operations of one ceremony: from now until [`KeyStore::release`] the
    /// store may keep objects it loads (the parent, `key` loaded now if given) so that they are
    /// not made again for each operation. Only an optimisation: a failure here is worth
    /// reporting, but the operations themselves load what they need.
    fn prepare(&mut self, key: Option<&KeyName>) -> Result<(), HalError> {
        let _ = key;
        Ok(())
    }
    /// Ends what [`KeyStore::prepare`] began: nothing stays loaded.
    fn release(&mut self) {}
    /// Proves that key `name` lives in this store's TPM, for one challenge: a TPM2_Certify of it
    /// by a fresh attestation key under the endorsement key, with `qualifying` (the challenge's
    /// hash) as its extraData. The store keeps that attestation key for
    /// [`KeyStore::activate_credential`]. A store without a TPM cannot.
    fn attest(
        &mut self,
        name: &KeyName,
        qualifying: &[u8; 32],
    ) -> Result<KeyAttestation, HalError> {
        let _ = (name, qualifying);
        Err(HalError::CannotAttest(self.backend()))
    }
    /// The secret an auth service sealed (TPM2_MakeCredential) to this TPM's endorsement key for
    /// the attestation key of the last [`KeyStore::attest`] (TPM2_ActivateCredential).
    fn activate_credential(
        &mut self,
        credential_blob: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, HalError> {
        let _ = (credential_blob, encrypted_secret);
        Err(HalError::CannotAttest(self.backend()))
    }
}
