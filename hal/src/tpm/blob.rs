//! The `.tpmkey` file format: what a TPM key is on disk. Pure: encoding, decoding and the checks
//! a key must pass; nothing here talks to a TPM.
//!
//! ```text
//! offset  size  field
//! 0       7     magic "BKTPM1\n" (format version 1)
//! 7       1     parent kind: 0 = Parent::Template, 1 = Parent::Persistent
//! 8       4     persistent parent handle, big-endian (0 for Template)
//! 12      2+n   TPM2B_PUBLIC  (u16 BE size, TPMT_PUBLIC)        = `tpm2_create -u` output
//! 14+n    2+m   TPM2B_PRIVATE (u16 BE size, wrapped sensitive) = `tpm2_create -r` output
//!               end of file: trailing bytes make the file corrupt
//! ```
//!
//! The version is in the magic: a future format gets a new magic, and a file with any other
//! magic is refused rather than guessed at. A file is at most `key_dir::MAX_KEY_FILE` bytes;
//! each area is bounded by its u16 size.

use std::path::Path;

use tss_esapi::handles::PersistentTpmHandle;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::structures::{EccScheme, HashScheme, Private, Public, PublicBuffer};
use tss_esapi::traits::{Marshall, UnMarshall};

use crate::key_dir::read_key_file;
use crate::{HalError, KeyFault, Parent, PublicKeyBytes};

const MAGIC: &[u8; 7] = b"BKTPM1\n";
const PARENT_TEMPLATE: u8 = 0;
const PARENT_PERSISTENT: u8 = 1;

/// Why bytes are not a usable `.tpmkey` file, or a key cannot be written as one.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("not a boundkey TPM key file (bad magic)")]
    BadMagic,
    #[error("truncated header")]
    TruncatedHeader,
    #[error("bad parent field ({kind}, {handle:#010x})")]
    BadParent { kind: u8, handle: u32 },
    #[error("truncated public area")]
    TruncatedPublic,
    #[error("truncated private area")]
    TruncatedPrivate,
    #[error("{0} unexpected trailing bytes")]
    TrailingBytes(usize),
    #[error("public area does not parse ({0})")]
    PublicParse(tss_esapi::Error),
    #[error("private area does not parse ({0})")]
    PrivateParse(tss_esapi::Error),
    #[error("public area does not marshal ({0})")]
    PublicMarshal(tss_esapi::Error),
    #[error("private area too large")]
    PrivateTooLarge,
    #[error("empty private area")]
    EmptyPrivate,
    /// The public area parses but describes a key this store must not use.
    #[error("{0}")]
    Refused(KeyRefusal),
}

/// Why a public area is not a non-exportable ECDSA-SHA256 P-256 signing key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyRefusal {
    #[error("not an ECC key")]
    NotEcc,
    #[error("not a P-256 key")]
    NotP256,
    #[error("not an ECDSA-SHA256 key")]
    NotEcdsaSha256,
    #[error("not an unrestricted signing key")]
    NotUnrestrictedSigning,
    #[error("key is exportable (fixedTPM/fixedParent/sensitiveDataOrigin not all set)")]
    Exportable,
    #[error("bad public point")]
    BadPoint,
    #[error("public point is not on P-256")]
    NotOnCurve,
}

impl From<KeyRefusal> for BlobError {
    fn from(r: KeyRefusal) -> Self {
        BlobError::Refused(r)
    }
}

/// A parsed `.tpmkey` file: the parent it was created under and the TPM's public and wrapped
/// private areas.
///
/// Invariant: the public area describes a non-exportable ECDSA-SHA256 P-256 signing key whose
/// point is `public_key`, and the private area is not empty.
#[derive(Debug)]
pub struct KeyBlob {
    parent: Parent,
    public: Public,
    private: Private,
    public_key: PublicKeyBytes,
}

impl KeyBlob {
    pub(super) fn new(parent: Parent, public: Public, private: Private) -> Result<Self, BlobError> {
        if private.value().is_empty() {
            return Err(BlobError::EmptyPrivate);
        }
        let public_key = check_public(&public)?;
        Ok(KeyBlob {
            parent,
            public,
            private,
            public_key,
        })
    }

    /// Reads and validates a key file.
    pub fn read(path: &Path) -> Result<Self, HalError> {
        let name = path.display().to_string();
        let bytes =
            read_key_file(path, &name)?.ok_or_else(|| HalError::KeyNotFound(name.clone()))?;
        KeyBlob::parse(&bytes).map_err(|e| HalError::KeyCorrupt {
            name,
            path: path.to_path_buf(),
            fault: KeyFault::Blob(e),
        })
    }

    /// Parses the file format; the error says what is wrong with it.
    pub fn parse(bytes: &[u8]) -> Result<Self, BlobError> {
        let rest = bytes.strip_prefix(&MAGIC[..]).ok_or(BlobError::BadMagic)?;
        let (&kind, rest) = rest.split_first().ok_or(BlobError::TruncatedHeader)?;
        if rest.len() < 4 {
            return Err(BlobError::TruncatedHeader);
        }
        let (handle, rest) = rest.split_at(4);
        let handle = u32::from_be_bytes([handle[0], handle[1], handle[2], handle[3]]);
        let parent = match kind {
            PARENT_TEMPLATE if handle == 0 => Parent::Template,
            PARENT_PERSISTENT if PersistentTpmHandle::new(handle).is_ok() => {
                Parent::Persistent(handle)
            }
            _ => return Err(BlobError::BadParent { kind, handle }),
        };
        let (public, rest) = split_tpm2b(rest).ok_or(BlobError::TruncatedPublic)?;
        let (private, rest) = split_tpm2b(rest).ok_or(BlobError::TruncatedPrivate)?;
        if !rest.is_empty() {
            return Err(BlobError::TrailingBytes(rest.len()));
        }
        let public = PublicBuffer::unmarshall(public)
            .and_then(Public::try_from)
            .map_err(BlobError::PublicParse)?;
        let private = Private::try_from(&private[2..]).map_err(BlobError::PrivateParse)?;
        KeyBlob::new(parent, public, private)
    }

    /// Encodes the file format.
    pub fn to_bytes(&self) -> Result<Vec<u8>, BlobError> {
        let public = PublicBuffer::try_from(self.public.clone())
            .and_then(|b| b.marshall())
            .map_err(BlobError::PublicMarshal)?;
        let private = self.private.value();
        let private_len = u16::try_from(private.len()).map_err(|_| BlobError::PrivateTooLarge)?;
        let (kind, handle) = match self.parent {
            Parent::Template => (PARENT_TEMPLATE, 0),
            Parent::Persistent(h) => (PARENT_PERSISTENT, h),
        };
        let mut out = Vec::with_capacity(MAGIC.len() + 5 + public.len() + 2 + private.len());
        out.extend_from_slice(MAGIC);
        out.push(kind);
        out.extend_from_slice(&handle.to_be_bytes());
        out.extend_from_slice(&public);
        out.extend_from_slice(&private_len.to_be_bytes());
        out.extend_from_slice(private);
        Ok(out)
    }

    /// The parent the key was created under (and is loaded under).
    pub fn parent(&self) -> Parent {
        self.parent
    }

    /// The key's public area as stored.
    pub fn public(&self) -> &Public {
        &self.public
    }

    /// The key's wrapped private area, which only its TPM under its parent can load.
    pub(super) fn private(&self) -> &Private {
        &self.private
    }

    /// The P-256 public key.
    pub fn public_key(&self) -> PublicKeyBytes {
        self.public_key
    }
}

/// Splits a TPM2B (u16 BE size + bytes) off the front; returns it with its size prefix.
fn split_tpm2b(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let size = u16::from_be_bytes([*b.first()?, *b.get(1)?]);
    let end = 2 + usize::from(size);
    (b.len() >= end).then(|| b.split_at(end))
}

/// Refuses anything but a non-exportable ECDSA-SHA256 P-256 signing key; returns its point.
fn check_public(public: &Public) -> Result<PublicKeyBytes, KeyRefusal> {
    let Public::Ecc {
        object_attributes: a,
        parameters,
        unique,
        ..
    } = public
    else {
        return Err(KeyRefusal::NotEcc);
    };
    if parameters.ecc_curve() != EccCurve::NistP256 {
        return Err(KeyRefusal::NotP256);
    }
    if parameters.ecc_scheme() != EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)) {
        return Err(KeyRefusal::NotEcdsaSha256);
    }
    if !(a.sign_encrypt() && !a.decrypt() && !a.restricted()) {
        return Err(KeyRefusal::NotUnrestrictedSigning);
    }
    if !(a.fixed_tpm() && a.fixed_parent() && a.sensitive_data_origin()) {
        return Err(KeyRefusal::Exportable);
    }
    let x = left_pad(unique.x().value()).ok_or(KeyRefusal::BadPoint)?;
    let y = left_pad(unique.y().value()).ok_or(KeyRefusal::BadPoint)?;
    PublicKeyBytes::from_xy(&x, &y).map_err(|_| KeyRefusal::NotOnCurve)
}

/// A TPM may drop leading zero bytes of a 32-byte big-endian integer.
pub(super) fn left_pad(v: &[u8]) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    let start = 32usize.checked_sub(v.len())?;
    out[start..].copy_from_slice(v);
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use tss_esapi::attributes::ObjectAttributesBuilder;
    use tss_esapi::interface_types::algorithm::PublicAlgorithm;
    use tss_esapi::structures::{
        EccParameter, EccPoint, KeyDerivationFunctionScheme, PublicBuilder,
        PublicEccParametersBuilder,
    };

    use super::*;

    /// A public area as `tpm2_create` would return it for `secret`'s ECDSA signing key.
    fn public_area(secret: &p256::SecretKey, restricted: bool, fixed: bool) -> Public {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        let point = secret.public_key().to_encoded_point(false);
        let attributes = ObjectAttributesBuilder::new()
            .with_fixed_tpm(fixed)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_sign_encrypt(true)
            .with_restricted(restricted)
            .build()
            .unwrap();
        PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attributes)
            .with_ecc_parameters(
                PublicEccParametersBuilder::new()
                    .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
                    .with_curve(EccCurve::NistP256)
                    .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                    .with_is_signing_key(true)
                    .with_restricted(restricted)
                    .build()
                    .unwrap(),
            )
            .with_ecc_unique_identifier(EccPoint::new(
                EccParameter::try_from(point.x().unwrap().to_vec()).unwrap(),
                EccParameter::try_from(point.y().unwrap().to_vec()).unwrap(),
            ))
            .build()
            .unwrap()
    }

    fn secret() -> p256::SecretKey {
        p256::SecretKey::from_slice(&[7u8; 32]).unwrap()
    }

    fn blob(parent: Parent) -> KeyBlob {
        let private = Private::try_from(vec![0xa5u8; 120]).unwrap();
        KeyBlob::new(parent, public_area(&secret(), false, true), private).unwrap()
    }

    #[test]
    fn encoding_round_trips_for_both_parent_kinds() {
        for parent in [Parent::Template, Parent::Persistent(0x8100_0001)] {
            let b = blob(parent);
            let bytes = b.to_bytes().unwrap();
            assert!(bytes.starts_with(MAGIC));
            let back = KeyBlob::parse(&bytes).unwrap();
            assert_eq!(back.parent(), parent);
            assert_eq!(back.public_key(), b.public_key());
            assert_eq!(back.public_key().to_p256(), secret().public_key());
            assert_eq!(back.private().value(), b.private().value());
            assert_eq!(back.to_bytes().unwrap(), bytes);
        }
    }

    #[test]
    fn file_format_rejects_damage() {
        assert!(KeyBlob::parse(b"").is_err());
        assert!(KeyBlob::parse(b"BKTPM1\n").is_err());
        assert!(KeyBlob::parse(b"BKTPM2\n\0\0\0\0\0\0\0\0\0\0").is_err());
        let e = KeyBlob::parse(b"BKTPM1\n\0\0\0\0\0\0\x10abc").unwrap_err();
        assert!(e.to_string().contains("truncated public"), "{e}");
        assert!(matches!(e, BlobError::TruncatedPublic), "{e:?}");
    }

    #[test]
    fn each_kind_of_damage_is_named() {
        let good = blob(Parent::Template).to_bytes().unwrap();
        let parse = |b: &[u8]| KeyBlob::parse(b).unwrap_err();
        assert!(matches!(parse(b"BKTPM2\n"), BlobError::BadMagic));
        assert!(matches!(parse(&good[..10]), BlobError::TruncatedHeader));
        let mut bad_parent = good.clone();
        bad_parent[7] = PARENT_PERSISTENT; // with handle 0, which is not persistent
        assert!(matches!(
            parse(&bad_parent),
            BlobError::BadParent { kind: 1, handle: 0 }
        ));
        assert!(matches!(
            parse(&good[..good.len() - 1]),
            BlobError::TruncatedPrivate
        ));
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"xy");
        assert!(matches!(parse(&trailing), BlobError::TrailingBytes(2)));
    }

    #[test]
    fn keys_that_could_leave_the_tpm_or_do_not_sign_are_refused() {
        let private = || Private::try_from(vec![1u8; 16]).unwrap();
        let exportable = KeyBlob::new(
            Parent::Template,
            public_area(&secret(), false, false),
            private(),
        );
        assert!(matches!(
            exportable,
            Err(BlobError::Refused(KeyRefusal::Exportable))
        ));
        let restricted = KeyBlob::new(
            Parent::Template,
            public_area(&secret(), true, true),
            private(),
        );
        assert!(matches!(
            restricted,
            Err(BlobError::Refused(KeyRefusal::NotUnrestrictedSigning))
        ));
        let empty = KeyBlob::new(
            Parent::Template,
            public_area(&secret(), false, true),
            Private::default(),
        );
        assert!(matches!(empty, Err(BlobError::EmptyPrivate)));
    }

    #[test]
    fn short_integers_are_left_padded() {
        let mut expected = [0u8; 32];
        expected[31] = 9;
        assert_eq!(left_pad(&[9]), Some(expected));
        assert_eq!(left_pad(&[1u8; 32]), Some([1u8; 32]));
        assert_eq!(left_pad(&[1u8; 33]), None);
    }
}
