//! Conformance of the issued certificates, checked by implementations other than ours:
//! the `spiffe` crate's X509-SVID parser (leaf and CA constraints, SPIFFE ID syntax),
//! `openssl verify -x509_strict` (RFC 5280 path validation with the strict extension checks) and,
//! where Python's `cryptography` is installed, its RFC 5280 verifier.
//!
//! Each positive check is paired with a certificate that breaks one rule (no AKI, no
//! basicConstraints, an upper-case trust domain, a dot segment) to show the checker refuses it,
//! so a regression in our profile cannot pass unnoticed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use boundkey_auth::authority::{Authority, AuthorityState, IdentityClaims};
use boundkey_proto::{JoinMethod, UnixTime};
use p256::pkcs8::EncodePrivateKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

fn now() -> UnixTime {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as UnixTime
}

fn claims(cluster: &str, bot: &str) -> IdentityClaims {
    IdentityClaims {
        cluster: cluster.into(),
        bot_name: bot.into(),
        instance_id: "i-1".into(),
        generation: 1,
        join_method: JoinMethod::BoundKeypair,
        join_token: "tok".into(),
    }
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// An identity issued by a fresh authority of `cluster`: (authority state, leaf PEM, the
/// identity key as PKCS#8 DER).
fn issue(cluster: &str, bot: &str) -> (AuthorityState, String, Vec<u8>) {
    let st = AuthorityState::generate(cluster, now()).unwrap();
    let a = Authority::load(&st).unwrap();
    let key = p256::SecretKey::random(&mut rand_core::OsRng);
    let issued = a
        .issue_identity(&claims(cluster, bot), &key.public_key(), 3600, now())
        .unwrap();
    let key_der = key.to_pkcs8_der().unwrap().as_bytes().to_vec();
    (st, issued.certificate_pem, key_der)
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

/// `openssl verify -x509_strict` of `leaf` against `bundle` for `purpose`; Ok or openssl's output.
fn openssl_strict(bundle: &str, leaf: &str, purpose: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let ca = write(dir.path(), "bundle.pem", bundle);
    let cert = write(dir.path(), "leaf.pem", leaf);
    let out = Command::new("openssl")
        .args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
        .arg(&ca)
        .arg(&cert)
        .output()
        .expect("openssl is installed (scripts/deps.sh)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && text.contains(": OK") {
        Ok(())
    } else {
        Err(text)
    }
}

const PY_VERIFY: &str = r#"
import sys
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, DNSName
roots = x509.load_pem_x509_certificates(open(sys.argv[1], "rb").read())
leaf = x509.load_pem_x509_certificate(open(sys.argv[2], "rb").read())
builder = PolicyBuilder().store(Store(roots))
if sys.argv[3] == "client":
    builder.build_client_verifier().verify(leaf, [])
else:
    builder.build_server_verifier(DNSName(sys.argv[3])).verify(leaf, [])
print("OK")
"#;

/// Python `cryptography`'s RFC 5280 verifier (`scripts/deps.sh` installs it). Required: a
/// missing verifier fails the test instead of silently checking less.
fn python_strict(bundle: &str, leaf: &str, kind: &str) -> Option<Result<(), String>> {
    let probe = Command::new("python3")
        .args(["-c", "import cryptography.x509.verification"])
        .output();
    assert!(
        probe.is_ok_and(|o| o.status.success()),
        "python3 with cryptography >= 42 is required (pip install 'cryptography>=42', or run scripts/deps.sh)"
    );
    let dir = tempfile::tempdir().unwrap();
    let ca = write(dir.path(), "bundle.pem", bundle);
    let cert = write(dir.path(), "leaf.pem", leaf);
    let out = Command::new("python3")
        .args(["-c", PY_VERIFY])
        .arg(&ca)
        .arg(&cert)
        .arg(kind)
        .output()
        .unwrap();
    Some(if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    })
}

/// The `spiffe` crate's X509-SVID parse, plus one rule it is lenient about: it accepts an
/// upper-case trust domain and lowers it, while the specification says a trust domain *is*
/// lower case, so the URI in the certificate must already be the canonical form it returns.
fn spiffe_parse(leaf_pem: &str, key_der: &[u8]) -> Result<spiffe::X509Svid, String> {
    let svid =
        spiffe::X509Svid::parse_from_der(&der(leaf_pem), key_der).map_err(|e| e.to_string())?;
    let raw = uri_sans(leaf_pem);
    if raw != [svid.spiffe_id().to_string()] {
        return Err(format!(
            "URI SAN {raw:?} is not the canonical SPIFFE ID {}",
            svid.spiffe_id()
        ));
    }
    Ok(svid)
}

fn uri_sans(pem: &str) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::*;
    let der = der(pem);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let Some(san) = cert.subject_alternative_name().unwrap() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn identity_is_an_x509_svid_for_the_spiffe_crate() {
    let (st, leaf, key) = issue("test-cluster", "robot");
    let svid = spiffe_parse(&leaf, &key).unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://test-cluster/bot/robot"
    );
    // The identity CA is a valid signing certificate and names the trust domain.
    let td = spiffe::TrustDomain::new("test-cluster").unwrap();
    let bundle = spiffe::X509Bundle::parse_from_der(td, &der(&st.identity[0].cert_pem)).unwrap();
    assert_eq!(bundle.authorities().len(), 1);
    assert_eq!(
        uri_sans(&st.identity[0].cert_pem),
        ["spiffe://test-cluster"]
    );
    let chain = [der(&leaf), der(&st.identity[0].cert_pem)].concat();
    spiffe::X509Svid::parse_from_der(&chain, &key).expect("CA passes as a signing certificate");
}

#[test]
fn upper_case_cluster_gets_a_lower_case_trust_domain() {
    let (_, leaf, key) = issue("Edge-Case", "robot");
    let svid = spiffe_parse(&leaf, &key).unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://edge-case/bot/robot");
}

#[test]
fn identity_chain_passes_strict_rfc5280_verifiers() {
    let (st, leaf, _) = issue("test-cluster", "robot");
    let bundle = &st.identity[0].cert_pem;
    openssl_strict(bundle, &leaf, "sslclient").unwrap();
    if let Some(r) = python_strict(bundle, &leaf, "client") {
        r.unwrap();
    }
}

#[test]
fn listener_certificate_passes_strict_rfc5280_verifiers() {
    let st = AuthorityState::generate("test-cluster", now()).unwrap();
    let a = Authority::load(&st).unwrap();
    let (chain, _) = a.issue_server_cert(&["localhost".into()], now()).unwrap();
    let leaf = pem(&chain[0]);
    openssl_strict(a.tls_ca_pem(), &leaf, "sslserver").unwrap();
    if let Some(r) = python_strict(a.tls_ca_pem(), &leaf, "localhost") {
        r.unwrap();
    }
}

fn pem(der: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let body: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        body.join("\n")
    )
}

/// A leaf signed by the identity CA of `st` with rcgen defaults, minus what `tweak` removes:
/// what our profile would produce if it regressed.
fn regressed_leaf(
    st: &AuthorityState,
    uri: &str,
    tweak: impl FnOnce(&mut rcgen::CertificateParams),
) -> (String, Vec<u8>) {
    let ca_key = rcgen::KeyPair::from_pem(&st.identity[0].key_pem).unwrap();
    let ca_der = CertificateDer::from(der(&st.identity[0].cert_pem));
    let issuer = rcgen::Issuer::from_ca_cert_der(&ca_der, ca_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "robot");
    p.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.use_authority_key_identifier_extension = true;
    tweak(&mut p);
    let cert = p.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_der())
}

#[test]
fn the_checkers_refuse_each_regression() {
    let st = AuthorityState::generate("test-cluster", now()).unwrap();
    let bundle = &st.identity[0].cert_pem;
    let good = "spiffe://test-cluster/bot/robot";

    // Sanity: the hand-made leaf with the full profile passes everything.
    let (leaf, key) = regressed_leaf(&st, good, |_| {});
    spiffe_parse(&leaf, &key).unwrap();
    openssl_strict(bundle, &leaf, "sslclient").unwrap();

    // Defect 1: no Authority Key Identifier.
    let (leaf, _) = regressed_leaf(&st, good, |p| {
        p.use_authority_key_identifier_extension = false
    });
    let e = openssl_strict(bundle, &leaf, "sslclient").unwrap_err();
    assert!(e.to_lowercase().contains("authority key"), "{e}");
    if let Some(r) = python_strict(bundle, &leaf, "client") {
        r.unwrap_err();
    }

    // Defect 2: no basicConstraints on the leaf.
    let (leaf, key) = regressed_leaf(&st, good, |p| p.is_ca = rcgen::IsCa::NoCa);
    let e = spiffe_parse(&leaf, &key).unwrap_err();
    assert!(e.to_lowercase().contains("extension"), "{e}");

    // Defect 3: an upper-case trust domain, a dot segment.
    for bad in [
        "spiffe://Edge-Case/bot/robot",
        "spiffe://test-cluster/bot/..",
        "spiffe://test-cluster/bot/.",
    ] {
        let (leaf, key) = regressed_leaf(&st, bad, |_| {});
        assert!(spiffe_parse(&leaf, &key).is_err(), "{bad} accepted");
    }
}

#[test]
fn dot_bot_names_are_never_issued() {
    let st = AuthorityState::generate("test-cluster", now()).unwrap();
    let a = Authority::load(&st).unwrap();
    let key = p256::SecretKey::random(&mut rand_core::OsRng).public_key();
    for bad in [".", ".."] {
        assert!(a
            .issue_identity(&claims("test-cluster", bad), &key, 60, now())
            .is_err());
    }
}

/// An identity CA as versions before the profile fix made it: no AKI, no trust-domain SAN, and a
/// cluster name with upper case. Such state must keep loading, and what it issues now conforms.
#[test]
fn identity_cas_made_by_earlier_versions_still_issue_conformant_certificates() {
    let mut st = AuthorityState::generate("Legacy-Cluster", now()).unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&st.identity[0].key_pem).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::OrganizationName, "Legacy-Cluster");
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "boundkey identity CA");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    p.use_authority_key_identifier_extension = false;
    st.identity[0].cert_pem = p.self_signed(&ca_key).unwrap().pem();
    assert!(uri_sans(&st.identity[0].cert_pem).is_empty());

    let a = Authority::load(&st).unwrap();
    let key = p256::SecretKey::random(&mut rand_core::OsRng);
    let leaf = a
        .issue_identity(
            &claims("Legacy-Cluster", "robot"),
            &key.public_key(),
            600,
            now(),
        )
        .unwrap()
        .certificate_pem;
    let key_der = key.to_pkcs8_der().unwrap().as_bytes().to_vec();
    let svid = spiffe_parse(&leaf, &key_der).unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://legacy-cluster/bot/robot"
    );
    openssl_strict(&st.identity[0].cert_pem, &leaf, "sslclient").unwrap();
    if let Some(r) = python_strict(&st.identity[0].cert_pem, &leaf, "client") {
        r.unwrap();
    }
}
