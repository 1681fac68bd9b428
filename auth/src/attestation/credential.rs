//! TPM2_MakeCredential done by the auth service (TPM 2.0 Library Part 1, §24 "Credential
//! Protection", and Part 3, TPM2_ActivateCredential): seals a secret to an EK so that only the
//! TPM holding that EK, and only for a loaded object with the given name, can recover it.
//!
//! * seed: RSA EK: random, nameAlg-digest-sized, RSA-OAEP(nameAlg) encrypted with the label
//!   `"IDENTITY\0"`; ECC EK: ECDH of an ephemeral key with the EK, then
//!   KDFe(nameAlg, Z, "IDENTITY", ephemeral x, EK x), the ephemeral point is the secret sent;
//! * symmetric key = KDFa(nameAlg, seed, "STORAGE", objectName, ∅, EK symmetric key bits);
//! * encIdentity = AES-CFB(symmetric key, IV 0, TPM2B_DIGEST(credential));
//! * HMAC key = KDFa(nameAlg, seed, "INTEGRITY", ∅, ∅, nameAlg digest bits);
//! * credentialBlob = TPM2B_DIGEST(HMAC(HMAC key, encIdentity ‖ objectName)) ‖ encIdentity.

use aes::cipher::{AsyncStreamCipher, KeyIvInit};
use hmac::{Hmac, Mac};
use rand_core::{CryptoRng, RngCore};
use sha2::{Sha256, Sha384, Sha512};

use super::tpm_types::{alg, curve, tpm2b, HashAlg, Public, PublicKey, SymDef};

/// Labels of Part 1 §24, with the terminating zero the KDFs include.
const IDENTITY: &[u8] = b"IDENTITY\0";
const STORAGE: &[u8] = b"STORAGE\0";
const INTEGRITY: &[u8] = b"INTEGRITY\0";

/// Why a credential cannot be made for an EK: it is not a key MakeCredential can seal to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("the EK's symmetric algorithm is not AES-128/256-CFB")]
    Symmetric,
    #[error("the EK's curve {0:#06x} is not NIST P-256 or P-384")]
    Curve(u16),
    #[error("the EK's public key is invalid: {0}")]
    Key(String),
    #[error("RSA-OAEP encryption to the EK failed: {0}")]
    Oaep(String),
}

/// What ActivateCredential needs: the TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MadeCredential {
    pub credential_blob: Vec<u8>,
    pub encrypted_secret: Vec<u8>,
}

/// Seals `credential` to `ek` for the object named `object_name` (the AK's TPM name).
pub fn make_credential<R: RngCore + CryptoRng>(
    ek: &Public,
    object_name: &[u8],
    credential: &[u8],
    rng: &mut R,
) -> Result<MadeCredential, CredentialError> {
    let hash = ek.name_alg;
    let sym_bits = match ek.symmetric {
        SymDef::Cipher {
            alg: alg::AES,
            key_bits: bits @ (128 | 256),
            mode: alg::CFB,
        } => bits,
        _ => return Err(CredentialError::Symmetric),
    };
    let (seed, encrypted_secret) = match &ek.key {
        PublicKey::Rsa {
            exponent, modulus, ..
        } => {
            let mut seed = vec![0u8; hash.size()];
            rng.fill_bytes(&mut seed);
            let enc = rsa_oaep(hash, modulus, *exponent, &seed, rng)?;
            (seed, enc)
        }
        PublicKey::Ecc { curve: c, x, y, .. } => ecdh_seed(hash, *c, x, y, rng)?,
    };
    let sym_key = kdf_a(
        hash,
        &seed,
        STORAGE,
        object_name,
        &[],
        usize::from(sym_bits),
    );
    let mut enc_identity = tpm2b(credential);
    cfb_encrypt(&sym_key, &mut enc_identity)?;
    let hmac_key = kdf_a(hash, &seed, INTEGRITY, &[], &[], hash.size() * 8);
    let integrity = hmac(hash, &hmac_key, &[&enc_identity, object_name]);
    let mut credential_blob = tpm2b(&integrity);
    credential_blob.extend(enc_identity);
    Ok(MadeCredential {
        credential_blob,
        encrypted_secret,
    })
}

fn rsa_oaep<R: RngCore + CryptoRng>(
    hash: HashAlg,
    modulus: &[u8],
    exponent: u32,
    seed: &[u8],
    rng: &mut R,
) -> Result<Vec<u8>, CredentialError> {
    use rsa::{BigUint, Oaep, RsaPublicKey};
    let key = RsaPublicKey::new(
        BigUint::from_bytes_be(modulus),
        BigUint::from(u64::from(exponent)),
    )
    .map_err(|e| CredentialError::Key(e.to_string()))?;
    // The label is "IDENTITY" with its terminating zero, as Part 1 §24.4 passes it to OAEP.
    let label = String::from_utf8_lossy(IDENTITY).into_owned();
    let padding = match hash {
        HashAlg::Sha256 => Oaep::new_with_label::<Sha256, _>(label),
        HashAlg::Sha384 => Oaep::new_with_label::<Sha384, _>(label),
        HashAlg::Sha512 => Oaep::new_with_label::<Sha512, _>(label),
    };
    key.encrypt(rng, padding, seed)
        .map_err(|e| CredentialError::Oaep(e.to_string()))
}

/// ECC secret sharing (Part 1, Annex C.6.1): an ephemeral key agrees Z with the EK; the seed
/// is KDFe over Z; the ephemeral public point (TPMS_ECC_POINT) is what the TPM gets.
fn ecdh_seed<R: RngCore + CryptoRng>(
    hash: HashAlg,
    ek_curve: u16,
    x: &[u8],
    y: &[u8],
    rng: &mut R,
) -> Result<(Vec<u8>, Vec<u8>), CredentialError> {
    macro_rules! agree {
        ($c:ident, $len:expr) => {{
            use $c::elliptic_curve::sec1::ToEncodedPoint;
            let point = sec1_point(x, y, $len)?;
            let ek = $c::PublicKey::from_sec1_bytes(&point)
                .map_err(|e| CredentialError::Key(e.to_string()))?;
            let d = $c::NonZeroScalar::random(rng);
            let eph = $c::PublicKey::from_secret_scalar(&d).to_encoded_point(false);
            // Z: the x-coordinate of d·Q_EK. A valid EK on a prime-order curve times a non-zero
            // scalar is never the point at infinity.
            let shared = (ek.to_projective() * *d)
                .to_affine()
                .to_encoded_point(false);
            let (Some(ex), Some(ey), Some(z)) = (eph.x(), eph.y(), shared.x()) else {
                return Err(CredentialError::Key("point at infinity".into()));
            };
            let seed = kdf_e(
                hash,
                &z[..],
                IDENTITY,
                &ex[..],
                &point[1..1 + $len],
                hash.size() * 8,
            );
            let mut secret = tpm2b(&ex[..]);
            secret.extend(tpm2b(&ey[..]));
            (seed, secret)
        }};
    }
    Ok(match ek_curve {
        curve::NIST_P256 => agree!(p256, 32),
        curve::NIST_P384 => agree!(p384, 48),
        other => return Err(CredentialError::Curve(other)),
    })
}

/// `04 ‖ x ‖ y` with each coordinate left-padded to the field size (a TPM may drop leading
/// zeros).
pub(crate) fn sec1_point(x: &[u8], y: &[u8], len: usize) -> Result<Vec<u8>, CredentialError> {
    if x.len() > len || y.len() > len {
        return Err(CredentialError::Key(
            "coordinate longer than the field".into(),
        ));
    }
    let mut p = vec![0u8; 1 + 2 * len];
    p[0] = 4;
    p[1 + len - x.len()..1 + len].copy_from_slice(x);
    p[1 + 2 * len - y.len()..].copy_from_slice(y);
    Ok(p)
}

fn cfb_encrypt(key: &[u8], buf: &mut [u8]) -> Result<(), CredentialError> {
    let iv = [0u8; 16];
    match key.len() {
        16 => cfb_mode::Encryptor::<aes::Aes128>::new_from_slices(key, &iv)
            .map_err(|_| CredentialError::Symmetric)?
            .encrypt(buf),
        32 => cfb_mode::Encryptor::<aes::Aes256>::new_from_slices(key, &iv)
            .map_err(|_| CredentialError::Symmetric)?
            .encrypt(buf),
        _ => return Err(CredentialError::Symmetric),
    }
    Ok(())
}

fn hmac(hash: HashAlg, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    fn run<M: Mac + hmac::digest::KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        // HMAC takes keys of any length, so this never fails.
        let Ok(mut m) = <M as hmac::digest::KeyInit>::new_from_slice(key) else {
            return Vec::new();
        };
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().to_vec()
    }
    match hash {
        HashAlg::Sha256 => run::<Hmac<Sha256>>(key, parts),
        HashAlg::Sha384 => run::<Hmac<Sha384>>(key, parts),
        HashAlg::Sha512 => run::<Hmac<Sha512>>(key, parts),
    }
}

/// KDFa (Part 1 §11.4.10.2, SP800-108 counter mode with HMAC): `bits` bits of
/// HMAC(key, i ‖ label ‖ contextU ‖ contextV ‖ bits) for i = 1, 2, … (`label` carries its
/// terminating zero).
pub(crate) fn kdf_a(
    hash: HashAlg,
    key: &[u8],
    label: &[u8],
    context_u: &[u8],
    context_v: &[u8],
    bits: usize,
) -> Vec<u8> {
    let bytes = bits.div_ceil(8);
    let bits32 = u32::try_from(bits).unwrap_or(u32::MAX).to_be_bytes();
    let mut out = Vec::with_capacity(bytes + hash.size());
    let mut counter: u32 = 1;
    while out.len() < bytes {
        out.extend(hmac(
            hash,
            key,
            &[&counter.to_be_bytes(), label, context_u, context_v, &bits32],
        ));
        counter += 1;
    }
    out.truncate(bytes);
    out
}

/// KDFe (Part 1 §11.4.10.3, SP800-56A concatenation): H(i ‖ Z ‖ use ‖ partyU ‖ partyV) for
/// i = 1, 2, … (`label` carries its terminating zero).
pub(crate) fn kdf_e(
    hash: HashAlg,
    z: &[u8],
    label: &[u8],
    party_u: &[u8],
    party_v: &[u8],
    bits: usize,
) -> Vec<u8> {
    let bytes = bits.div_ceil(8);
    let mut out = Vec::with_capacity(bytes + hash.size());
    let mut counter: u32 = 1;
    while out.len() < bytes {
        out.extend(hash.digest(&[&counter.to_be_bytes(), z, label, party_u, party_v]));
        counter += 1;
    }
    out.truncate(bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdfa_matches_the_reference_construction() {
        // One block: HMAC-SHA256(key, 00000001 ‖ "STORAGE\0" ‖ u ‖ v ‖ 00000080), truncated.
        let k = kdf_a(HashAlg::Sha256, b"seed", STORAGE, b"name", b"", 128);
        let full = hmac(
            HashAlg::Sha256,
            b"seed",
            &[&[0, 0, 0, 1], STORAGE, b"name", &[0, 0, 0, 0x80]],
        );
        assert_eq!(k, full[..16]);
        // Two blocks, and the bit count is part of every block.
        let long = kdf_a(HashAlg::Sha256, b"seed", INTEGRITY, b"", b"", 384);
        assert_eq!(long.len(), 48);
        let second = hmac(
            HashAlg::Sha256,
            b"seed",
            &[&[0, 0, 0, 2], INTEGRITY, &[0, 0, 1, 0x80]],
        );
        assert_eq!(long[32..], second[..16]);
    }

    #[test]
    fn short_coordinates_are_left_padded() {
        let p = sec1_point(&[1, 2], &[3], 4).unwrap();
        assert_eq!(p, vec![4, 0, 0, 1, 2, 0, 0, 0, 3]);
        assert!(sec1_point(&[0; 5], &[0], 4).is_err());
    }
}
