//! Endorsement keys: the EK's SubjectPublicKeyInfo and its hash (the identity an operator puts
//! on an allow list), and EK certificate verification against a token's CA bundle.
//!
//! EK certificates are not TLS certificates (TCG EK Credential Profile): the subject may be
//! empty and the identity sits in a critical subjectAltName of directoryName form, the key usage
//! is keyEncipherment (RSA) or keyAgreement (ECC), the EKU, if any, is the TCG EK OID
//! 2.23.133.8.1, and the key may be RSA. webpki refuses them, so the path is built and checked
//! here: x509-parser parses, ring verifies signatures. The rules: the path runs from the EK
//! certificate through bundle certificates to a self-signed bundle certificate; every
//! certificate is valid now; every issuer is a CA (basicConstraints cA=true, pathLen honoured,
//! keyCertSign when key usage is present) with no critical extension this code does not know;
//! the EK certificate is not a CA and may carry the TPM-specific critical extensions only.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::FromDer;
use x509_parser::time::ASN1Time;

use super::credential::sec1_point;
use super::tpm_types::{curve, Public, PublicKey};
use crate::model::EkCertificateInfo;

/// Longest issuer chain searched above the EK certificate (intermediates + root).
const MAX_PATH: usize = 6;
/// TCG EK certificate EKU (tcg-kp-EKCertificate).
const TCG_KP_EK_CERTIFICATE: &str = "2.23.133.8.1";
/// Critical extensions an EK certificate may carry: subjectAltName (TPM manufacturer, model,
/// version as a directoryName), subjectDirectoryAttributes (TPM specification), key usage,
/// basic constraints, EKU and certificate policies.
const LEAF_CRITICAL_OK: [&str; 6] = [
    "2.5.29.17",
    "2.5.29.9",
    "2.5.29.15",
    "2.5.29.19",
    "2.5.29.37",
    "2.5.29.32",
];

/// Why an EK certificate is not trusted for a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EkCertError {
    #[error("EK certificate unparseable: {0}")]
    Parse(String),
    #[error("EK certificate not valid at this time")]
    Expired,
    #[error("EK certificate is a CA certificate")]
    IsCa,
    #[error("EK certificate has an unknown critical extension {0}")]
    CriticalExtension(String),
    #[error("EK certificate's extended key usage does not allow an EK")]
    KeyPurpose,
    #[error("EK certificate's public key is not the EK in ek_public")]
    KeyMismatch,
    #[error("no path from the EK certificate (issuer {issuer}) to a certificate in the token's EK CA bundle")]
    NoPath { issuer: String },
}

/// A CA bundle that is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("EK CA bundle: not PEM certificates: {0}")]
    Pem(String),
    #[error("EK CA bundle holds no certificate")]
    Empty,
    #[error("EK CA bundle: certificate {index} unparseable: {reason}")]
    Certificate { index: usize, reason: String },
}

/// Why an EK public area cannot be turned into a SubjectPublicKeyInfo.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("EK public key unusable: {0}")]
pub struct EkKeyError(pub String);

/// The DER certificates of a PEM bundle; each must parse as an X.509 certificate.
pub fn parse_bundle(pem: &str) -> Result<Vec<Vec<u8>>, BundleError> {
    let mut out = Vec::new();
    for (index, c) in CertificateDer::pem_slice_iter(pem.as_bytes()).enumerate() {
        let der = c.map_err(|e| BundleError::Pem(e.to_string()))?;
        X509Certificate::from_der(der.as_ref()).map_err(|e| BundleError::Certificate {
            index,
            reason: e.to_string(),
        })?;
        out.push(der.as_ref().to_vec());
    }
    if out.is_empty() {
        return Err(BundleError::Empty);
    }
    Ok(out)
}

/// The subject of each certificate in a PEM bundle, for showing a token's bundle to an
/// operator (unparseable entries are skipped; a stored bundle was validated when written).
pub fn bundle_subjects(pem: &str) -> Vec<String> {
    parse_bundle(pem)
        .unwrap_or_default()
        .iter()
        .filter_map(|der| {
            X509Certificate::from_der(der)
                .ok()
                .map(|(_, c)| c.subject().to_string())
        })
        .collect()
}

/// The EK's SubjectPublicKeyInfo, DER, as `openssl pkey -pubin -outform DER` writes it.
pub fn spki_der(ek: &Public) -> Result<Vec<u8>, EkKeyError> {
    use p256::pkcs8::EncodePublicKey;
    let err = |e: &dyn std::fmt::Display| EkKeyError(e.to_string());
    let der = match &ek.key {
        PublicKey::Rsa {
            exponent, modulus, ..
        } => rsa::RsaPublicKey::new(
            rsa::BigUint::from_bytes_be(modulus),
            rsa::BigUint::from(u64::from(*exponent)),
        )
        .map_err(|e| err(&e))?
        .to_public_key_der()
        .map_err(|e| err(&e))?,
        PublicKey::Ecc {
            curve: c @ (curve::NIST_P256 | curve::NIST_P384),
            x,
            y,
            ..
        } => {
            let len = if *c == curve::NIST_P256 { 32 } else { 48 };
            let point = sec1_point(x, y, len).map_err(|e| err(&e))?;
            if *c == curve::NIST_P256 {
                p256::PublicKey::from_sec1_bytes(&point)
                    .map_err(|e| err(&e))?
                    .to_public_key_der()
            } else {
                p384::PublicKey::from_sec1_bytes(&point)
                    .map_err(|e| err(&e))?
                    .to_public_key_der()
            }
            .map_err(|e| err(&e))?
        }
        PublicKey::Ecc { curve: c, .. } => {
            return Err(EkKeyError(format!("curve {c:#06x} not supported")))
        }
    };
    Ok(der.as_bytes().to_vec())
}

/// Lowercase hex SHA-256 of an EK's SubjectPublicKeyInfo DER: the EK hash of allow lists.
pub fn spki_hash(spki: &[u8]) -> String {
    hex(&Sha256::digest(spki))
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Verifies `cert_der` as the certificate of the EK whose SPKI is `ek_spki`, issued through
/// `bundle` (DER certificates). Returns what identifies the certificate.
pub fn verify_certificate(
    cert_der: &[u8],
    ek_spki: &[u8],
    bundle: &[Vec<u8>],
    now: i64,
) -> Result<EkCertificateInfo, EkCertError> {
    let at = ASN1Time::from_timestamp(now).map_err(|e| EkCertError::Parse(e.to_string()))?;
    let leaf = parse_certificate(cert_der)?;
    if !leaf.validity().is_valid_at(at) {
        return Err(EkCertError::Expired);
    }
    if leaf.public_key().raw != ek_spki {
        return Err(EkCertError::KeyMismatch);
    }
    if leaf
        .basic_constraints()
        .map_err(|e| EkCertError::Parse(e.to_string()))?
        .is_some_and(|bc| bc.value.ca)
    {
        return Err(EkCertError::IsCa);
    }
    for ext in leaf.extensions() {
        let oid = ext.oid.to_id_string();
        if ext.critical && !LEAF_CRITICAL_OK.contains(&oid.as_str()) {
            return Err(EkCertError::CriticalExtension(oid));
        }
    }
    if let Some(eku) = leaf
        .extended_key_usage()
        .map_err(|e| EkCertError::Parse(e.to_string()))?
    {
        let allowed = eku.value.any
            || eku
                .value
                .other
                .iter()
                .any(|o| o.to_id_string() == TCG_KP_EK_CERTIFICATE);
        if !allowed {
            return Err(EkCertError::KeyPurpose);
        }
    }
    let issuers: Vec<X509Certificate<'_>> = bundle
        .iter()
        .filter_map(|der| parse_certificate(der).ok())
        .collect();
    let mut used = vec![false; issuers.len()];
    if !path_to_root(&leaf, &issuers, &mut used, 0, at) {
        return Err(EkCertError::NoPath {
            issuer: leaf.issuer().to_string(),
        });
    }
    Ok(EkCertificateInfo {
        subject: leaf.subject().to_string(),
        issuer: leaf.issuer().to_string(),
        serial: hex(leaf.raw_serial()),
    })
}

fn parse_certificate(der: &[u8]) -> Result<X509Certificate<'_>, EkCertError> {
    match X509Certificate::from_der(der) {
        Ok(([], c)) => Ok(c),
        Ok(_) => Err(EkCertError::Parse("trailing bytes".into())),
        Err(e) => Err(EkCertError::Parse(e.to_string())),
    }
}

/// Depth-first search for an issuer of `cert` among `issuers` that leads to a self-signed one.
/// `below` counts the CA certificates already on the path under the candidate (for pathLen).
fn path_to_root(
    cert: &X509Certificate<'_>,
    issuers: &[X509Certificate<'_>],
    used: &mut [bool],
    below: usize,
    at: ASN1Time,
) -> bool {
    if below >= MAX_PATH {
        return false;
    }
    for (i, ca) in issuers.iter().enumerate() {
        if used[i]
            || ca.subject().as_raw() != cert.issuer().as_raw()
            || !is_usable_ca(ca, below, at)
            || cert.verify_signature(Some(ca.public_key())).is_err()
        {
            continue;
        }
        let self_signed =
            ca.subject().as_raw() == ca.issuer().as_raw() && ca.verify_signature(None).is_ok();
        if self_signed {
            return true;
        }
        used[i] = true;
        if path_to_root(ca, issuers, used, below + 1, at) {
            return true;
        }
        used[i] = false;
    }
    false
}

/// Whether `ca` may issue at this place in a path with `below` CA certificates under it.
fn is_usable_ca(ca: &X509Certificate<'_>, below: usize, at: ASN1Time) -> bool {
    if !ca.validity().is_valid_at(at) {
        return false;
    }
    let Ok(Some(bc)) = ca.basic_constraints() else {
        return false;
    };
    if !bc.value.ca
        || bc
            .value
            .path_len_constraint
            .is_some_and(|n| usize::try_from(n).is_ok_and(|n| below > n))
    {
        return false;
    }
    match ca.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => return false,
        Err(_) => return false,
        _ => {}
    }
    // An issuer's critical extension this code cannot read might restrict it in a way that is
    // not being enforced: refuse rather than ignore it.
    !ca.extensions().iter().any(|e| {
        e.critical
            && matches!(
                e.parsed_extension(),
                ParsedExtension::UnsupportedExtension { .. } | ParsedExtension::ParseError { .. }
            )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_must_hold_certificates() {
        assert_eq!(parse_bundle(""), Err(BundleError::Empty));
        assert!(
            parse_bundle("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").is_err()
        );
    }
}
