//! The ordered checks of a key attestation (`docs/protocol.md` §5.6), each failure its own
//! error and error code.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use boundkey_proto::{Attestation, ErrorCode, UnixTime};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use ring::signature;
use sha2::{Digest, Sha256};

use super::ek::{self, EkCertError};
use super::tpm_types::{
    alg, attr, curve, AttestError, CertifyInfo, Public, PublicKey, Scheme, Signature, SymDef,
    TpmParseError,
};
use crate::model::{AttestationSpec, EkIdentity};

/// Decoded size limits per field: far above what any TPM produces, far below the frame limit.
const MAX_CERT: usize = 8 * 1024;
const MAX_TPM_STRUCT: usize = 2 * 1024;

/// What a token trusts, prepared once per ceremony from its [`AttestationSpec`]. Invariant:
/// `bundle` holds parsed-once DER certificates and `allow` lowercase hex hashes.
#[derive(Debug, Clone)]
pub struct Policy {
    bundle: Vec<Vec<u8>>,
    allow: Vec<String>,
}

impl Policy {
    /// The policy of a `tpm` token. A bundle that does not parse trusts nothing (admin
    /// validation refuses such a spec; a hand-edited store must not widen trust).
    pub fn from_spec(spec: &AttestationSpec) -> Policy {
        let bundle = spec
            .ek_ca_bundle
            .as_deref()
            .and_then(|pem| ek::parse_bundle(pem).ok())
            .unwrap_or_default();
        let allow = spec
            .ek_allow
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        Policy { bundle, allow }
    }
}

/// Why an attestation was refused. Each variant is one error code on the wire and one `reason`
/// in the audit log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestationError {
    #[error("the token requires a TPM key attestation and the solution carried none")]
    Missing,
    #[error("a key attestation was sent but not asked for")]
    Unrequested,
    #[error("attestation field {field} malformed: {reason}")]
    Malformed { field: &'static str, reason: String },
    #[error("EK unusable: {0}")]
    EkUnusable(String),
    #[error(transparent)]
    EkCertificate(#[from] EkCertError),
    #[error("EK {hash} has no trusted certificate and is not on the token's allow list")]
    EkNotAllowed { hash: String },
    #[error("AK refused: {0}")]
    Ak(String),
    #[error("certification refused: {0}")]
    Certify(String),
    #[error("certification was made for another challenge (extraData is not SHA-256 of this challenge document)")]
    Replayed,
    #[error("credential activation failed: {0}")]
    Credential(String),
    #[error(
        "rotation attested by EK {presented}, but the token's key was attested by EK {recorded}"
    )]
    EkChanged { recorded: String, presented: String },
}

impl AttestationError {
    pub fn code(&self) -> ErrorCode {
        match self {
            AttestationError::Missing => ErrorCode::AttestationRequired,
            AttestationError::Unrequested | AttestationError::Malformed { .. } => {
                ErrorCode::BadRequest
            }
            AttestationError::EkUnusable(_) | AttestationError::EkCertificate(_) => {
                ErrorCode::EkUntrusted
            }
            AttestationError::EkNotAllowed { .. } => ErrorCode::EkNotAllowed,
            AttestationError::Ak(_) => ErrorCode::AkInvalid,
            AttestationError::Certify(_) => ErrorCode::CertifyInvalid,
            AttestationError::Replayed => ErrorCode::AttestationReplayed,
            AttestationError::Credential(_) => ErrorCode::CredentialFailed,
            AttestationError::EkChanged { .. } => ErrorCode::EkChanged,
        }
    }
}

/// An attestation that passed every check up to credential activation. Invariant: `ak_name` is
/// the name of an AK that certified the challenged key for this challenge, and `ek` is trusted
/// by the token; what is left to prove is that the two are in one TPM.
#[derive(Debug, Clone)]
pub struct Verified {
    pub ek: EkIdentity,
    pub ek_public: Public,
    pub ak_name: Vec<u8>,
}

fn decode(field: &'static str, b64: &str, max: usize) -> Result<Vec<u8>, AttestationError> {
    // Base64 of `max` bytes is 4/3 as long; refuse longer text before decoding it.
    if b64.len() > max.div_ceil(3) * 4 {
        return Err(AttestationError::Malformed {
            field,
            reason: format!("longer than {max} bytes"),
        });
    }
    STANDARD
        .decode(b64)
        .map_err(|e| AttestationError::Malformed {
            field,
            reason: e.to_string(),
        })
}

fn malformed(field: &'static str) -> impl Fn(TpmParseError) -> AttestationError {
    move |e| AttestationError::Malformed {
        field,
        reason: e.to_string(),
    }
}

/// Runs the checks in the documented order: parse every field strictly; EK trusted (certificate
/// through the token's bundle, or EK hash on the allow list); AK attributes and scheme;
/// TPMS_ATTEST is a TPM-made certification; its signature by the AK; it names the challenged
/// key, whose attributes make it non-exportable; its extraData is SHA-256 of `document`.
pub fn verify(
    policy: &Policy,
    key: &p256::PublicKey,
    document: &str,
    att: &Attestation,
    now: UnixTime,
) -> Result<Verified, AttestationError> {
    let ek_cert = att
        .ek_certificate
        .as_deref()
        .map(|c| decode("ek_certificate", c, MAX_CERT))
        .transpose()?;
    let ek_public = Public::from_tpm2b(&decode("ek_public", &att.ek_public, MAX_TPM_STRUCT)?)
        .map_err(malformed("ek_public"))?;
    let ak_public = Public::from_tpm2b(&decode("ak_public", &att.ak_public, MAX_TPM_STRUCT)?)
        .map_err(malformed("ak_public"))?;
    let key_public = Public::from_tpm2b(&decode("key_public", &att.key_public, MAX_TPM_STRUCT)?)
        .map_err(malformed("key_public"))?;
    let certify_bytes = decode("certify_info", &att.certify_info, MAX_TPM_STRUCT)?;
    let signature = Signature::parse(&decode(
        "certify_signature",
        &att.certify_signature,
        MAX_TPM_STRUCT,
    )?)
    .map_err(malformed("certify_signature"))?;

    let ek = check_ek(policy, &ek_public, ek_cert.as_deref(), now)?;
    check_ak(&ak_public)?;
    let certify = match CertifyInfo::parse(&certify_bytes) {
        Ok(c) => c,
        Err(AttestError::Parse(e)) => return Err(malformed("certify_info")(e)),
        Err(e) => return Err(AttestationError::Certify(e.to_string())),
    };
    verify_signature(&ak_public, &signature, &certify_bytes)?;
    check_certified_key(&key_public, &certify, key)?;
    let expected = Sha256::digest(document.as_bytes());
    if certify.extra_data[..] != expected[..] {
        return Err(AttestationError::Replayed);
    }
    Ok(Verified {
        ek,
        ak_name: ak_public.name(),
        ek_public,
    })
}

/// The EK must be an EK (a restricted decryption key a credential can be sealed to), and
/// trusted by the token: through its certificate, or failing that by its hash.
fn check_ek(
    policy: &Policy,
    ek_public: &Public,
    cert: Option<&[u8]>,
    now: UnixTime,
) -> Result<EkIdentity, AttestationError> {
    let storage = attr::RESTRICTED | attr::DECRYPT | attr::FIXED_TPM | attr::FIXED_PARENT;
    if !ek_public.has(storage) || ek_public.has(attr::SIGN) {
        return Err(AttestationError::EkUnusable(
            "not a restricted, fixed decryption key".into(),
        ));
    }
    if !matches!(
        ek_public.symmetric,
        SymDef::Cipher {
            alg: alg::AES,
            key_bits: 128 | 256,
            mode: alg::CFB
        }
    ) {
        return Err(AttestationError::EkUnusable(
            "symmetric algorithm is not AES-128/256-CFB".into(),
        ));
    }
    if let PublicKey::Rsa { key_bits, .. } = ek_public.key {
        if key_bits < 2048 {
            return Err(AttestationError::EkUnusable(format!(
                "RSA key of {key_bits} bits"
            )));
        }
    }
    let spki = ek::spki_der(ek_public).map_err(|e| AttestationError::EkUnusable(e.0))?;
    let hash = ek::spki_hash(&spki);
    let allowed = policy.allow.contains(&hash);
    let by_certificate = match cert {
        Some(der) if !policy.bundle.is_empty() => {
            Some(ek::verify_certificate(der, &spki, &policy.bundle, now))
        }
        _ => None,
    };
    match (by_certificate, allowed) {
        (Some(Ok(info)), _) => Ok(EkIdentity {
            ek_sha256: hash,
            certificate: Some(info),
        }),
        (_, true) => Ok(EkIdentity {
            ek_sha256: hash,
            certificate: None,
        }),
        (Some(Err(e)), false) => Err(e.into()),
        (None, false) => Err(AttestationError::EkNotAllowed { hash }),
    }
}

/// An AK is a restricted signing key that cannot leave its TPM: only such a key's signature on
/// a TPMS_ATTEST shows the TPM made it (a restricted key never signs a digest that starts with
/// TPM_GENERATED_VALUE unless the TPM produced the structure).
fn check_ak(ak: &Public) -> Result<(), AttestationError> {
    let required = attr::RESTRICTED | attr::SIGN | attr::FIXED_TPM | attr::FIXED_PARENT;
    if !ak.has(required) || ak.has(attr::DECRYPT) {
        return Err(AttestationError::Ak(format!(
            "attributes {:#010x} are not restricted|sign|fixedTPM|fixedParent without decrypt",
            ak.attributes
        )));
    }
    let ok = match &ak.key {
        PublicKey::Ecc {
            scheme, curve: c, ..
        } => {
            *c == curve::NIST_P256
                && *scheme
                    == (Scheme::Hashed {
                        alg: alg::ECDSA,
                        hash: alg::SHA256,
                    })
        }
        PublicKey::Rsa {
            scheme, key_bits, ..
        } => {
            *key_bits >= 2048
                && *scheme
                    == (Scheme::Hashed {
                        alg: alg::RSASSA,
                        hash: alg::SHA256,
                    })
        }
    };
    if !ok {
        return Err(AttestationError::Ak(
            "scheme is not ECDSA P-256/SHA-256 or RSASSA-PKCS1-v1_5/SHA-256 (RSA >= 2048)".into(),
        ));
    }
    Ok(())
}

fn verify_signature(ak: &Public, sig: &Signature, message: &[u8]) -> Result<(), AttestationError> {
    let bad = |why: &str| AttestationError::Certify(format!("signature: {why}"));
    match (&ak.key, sig) {
        (
            PublicKey::Ecc { x, y, .. },
            Signature::Ecdsa {
                hash: alg::SHA256,
                r,
                s,
            },
        ) => {
            let point = super::credential::sec1_point(x, y, 32).map_err(|e| bad(&e.to_string()))?;
            let mut rs = [0u8; 64];
            if r.len() > 32 || s.len() > 32 {
                return Err(bad("r or s longer than 32 bytes"));
            }
            rs[32 - r.len()..32].copy_from_slice(r);
            rs[64 - s.len()..].copy_from_slice(s);
            signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(message, &rs)
                .map_err(|_| bad("does not verify with the AK"))
        }
        (
            PublicKey::Rsa {
                modulus, exponent, ..
            },
            Signature::Rsa {
                alg: alg::RSASSA,
                hash: alg::SHA256,
                sig,
            },
        ) => {
            let e = exponent.to_be_bytes();
            let key = signature::RsaPublicKeyComponents {
                n: modulus.as_slice(),
                e: &e[e.iter().take_while(|b| **b == 0).count()..],
            };
            key.verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, sig)
                .map_err(|_| bad("does not verify with the AK"))
        }
        _ => Err(bad("scheme differs from the AK's")),
    }
}

/// The certification must name the challenged key, through a public area the client sent,
/// whose attributes make the key unexportable and a plain signing key.
fn check_certified_key(
    key_public: &Public,
    certify: &CertifyInfo,
    challenged: &p256::PublicKey,
) -> Result<(), AttestationError> {
    if certify.name != key_public.name() {
        return Err(AttestationError::Certify(
            "the certified object is not key_public".into(),
        ));
    }
    let PublicKey::Ecc {
        curve: curve::NIST_P256,
        x,
        y,
        ..
    } = &key_public.key
    else {
        return Err(AttestationError::Certify(
            "key_public is not a P-256 key".into(),
        ));
    };
    let point = super::credential::sec1_point(x, y, 32)
        .map_err(|e| AttestationError::Certify(e.to_string()))?;
    let challenged_point = challenged.to_encoded_point(false);
    if point.as_slice() != challenged_point.as_bytes() {
        return Err(AttestationError::Certify(
            "key_public is not the challenged key".into(),
        ));
    }
    let required = attr::FIXED_TPM | attr::FIXED_PARENT | attr::SENSITIVE_DATA_ORIGIN | attr::SIGN;
    if !key_public.has(required) || key_public.has(attr::DECRYPT) {
        return Err(AttestationError::Certify(format!(
            "key attributes {:#010x} are not fixedTPM|fixedParent|sensitiveDataOrigin|sign without decrypt",
            key_public.attributes
        )));
    }
    Ok(())
}
