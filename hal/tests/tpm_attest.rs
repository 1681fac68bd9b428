//! Key attestation by the TPM backend against swtpms manufactured with EK certificates by swtpm's
//! own local CA, checked with tools that are not ours: tpm2-tools reads back the EK certificate
//! and public area, and `tpm2_makecredential` seals the credential the store must recover.
//! A relay between the store and the TPM records the bus, to show that what is secret never
//! crosses it in the clear.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(feature = "tpm")]

mod common;

use std::path::Path;

use boundkey_hal::tpm::KeyBlob;
use boundkey_hal::{Digest, FileKeyStore, HalError, KeyName, KeyStore, TpmConfig, TpmKeyStore};
use boundkey_testkit::{EkCa, Swtpm, TpmCommandCounter};
use common::assert_verifies;
use sha2::Digest as _;
use zeroize::Zeroizing;

fn name(s: &str) -> KeyName {
    KeyName::new(s).unwrap()
}

fn store_via(tcti: String, dir: &Path, key_auth: Option<&str>) -> TpmKeyStore {
    TpmKeyStore::open(
        dir,
        TpmConfig {
            tcti,
            key_auth: key_auth.map(|a| Zeroizing::new(a.as_bytes().to_vec())),
            ..TpmConfig::default()
        },
    )
    .unwrap()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A u16 size, then the contents.
fn tpm2b_contents(b: &[u8]) -> &[u8] {
    let n = u16::from_be_bytes([b[0], b[1]]) as usize;
    assert_eq!(b.len(), n + 2, "one whole TPM2B");
    &b[2..]
}

/// The TPM name of a TPM2B_PUBLIC with a SHA-256 name algorithm: 0x000b ‖ SHA-256(TPMT_PUBLIC).
fn sha256_name(tpm2b_public: &[u8]) -> Vec<u8> {
    let mut n = vec![0x00, 0x0b];
    n.extend(sha2::Sha256::digest(tpm2b_contents(tpm2b_public)));
    n
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `tpm2_makecredential -T none`: the credential blob and encrypted seed (TPM2B contents) that
/// seal `secret` to the EK `ek_public` (a TPM2B_PUBLIC) for the object named `name`. Made by
/// tpm2-tools in software, independently of this crate and of the auth service's code.
fn make_credential(dir: &Path, ek_public: &[u8], name: &[u8], secret: &[u8]) -> (Vec<u8>, Vec<u8>) {
    std::fs::write(dir.join("ek.pub"), ek_public).unwrap();
    std::fs::write(dir.join("secret"), secret).unwrap();
    let out = std::process::Command::new("tpm2_makecredential")
        .current_dir(dir)
        .args([
            "-T",
            "none",
            "-e",
            "ek.pub",
            "-s",
            "secret",
            "-n",
            &hex(name),
        ])
        .args(["-o", "cred.out"])
        .env("TSS2_LOG", "all+none")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // tpm2-tools' file: magic, version, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET.
    let f = std::fs::read(dir.join("cred.out")).unwrap();
    assert_eq!(&f[..8], &[0xba, 0xdc, 0xc0, 0xde, 0, 0, 0, 1]);
    let n1 = u16::from_be_bytes([f[8], f[9]]) as usize;
    let blob = f[10..10 + n1].to_vec();
    let rest = &f[10 + n1..];
    let n2 = u16::from_be_bytes([rest[0], rest[1]]) as usize;
    assert_eq!(rest.len(), 2 + n2);
    (blob, rest[2..].to_vec())
}

#[test]
fn a_bound_key_is_certified_by_an_ak_under_the_certified_ek_and_the_credential_is_recovered() {
    let ca = EkCa::new();
    let tpm = Swtpm::manufacture(&ca);
    let dir = tempfile::tempdir().unwrap();
    let mut s = store_via(tpm.tcti(), &dir.path().join("keys"), None);
    let pk = s.create(&name("bound")).unwrap();
    let qualifying: [u8; 32] = sha2::Sha256::digest(b"the challenge document").into();
    let a = s.attest(&name("bound"), &qualifying).unwrap();
    s.disconnect(); // swtpm serves one connection at a time

    // The EK is the manufactured RSA EK, as the TPM itself reports it, with its certificate.
    let tools = tempfile::tempdir().unwrap();
    let nv = tools.path().join("ek.crt");
    tpm.run_tpm2_tool("tpm2_nvread", &["0x01c00002", "-o", nv.to_str().unwrap()]);
    let cert = a.ek_certificate.clone().expect("the EK certificate");
    assert_eq!(&std::fs::read(&nv).unwrap()[..cert.len()], &cert[..]);
    let ekp = tools.path().join("ek.pub");
    tpm.run_tpm2_tool(
        "tpm2_readpublic",
        &["-c", "0x81010001", "-o", ekp.to_str().unwrap()],
    );
    assert_eq!(std::fs::read(&ekp).unwrap(), a.ek_public);

    // The certified key is the bound key, as stored; the certification is for this challenge.
    let blob = KeyBlob::read(&dir.path().join("keys/bound.tpmkey")).unwrap();
    assert_eq!(blob.public_key(), pk);
    assert_eq!(
        tpm2b_contents(&a.key_public),
        &tss_esapi::traits::Marshall::marshall(blob.public()).unwrap()[..]
    );
    assert!(contains(&a.certify_info, &qualifying));
    assert!(contains(&a.certify_info, &sha256_name(&a.key_public)));
    // TPM_GENERATED_VALUE, TPM_ST_ATTEST_CERTIFY
    assert_eq!(&a.certify_info[..6], &[0xff, 0x54, 0x43, 0x47, 0x80, 0x17]);
    assert!(!a.ak_public.is_empty() && !a.certify_signature.is_empty());

    // A credential sealed by tpm2-tools to this EK for this AK comes back out.
    let secret = *b"a credential only this TPM opens";
    let (cred, seed) = make_credential(
        tools.path(),
        &a.ek_public,
        &sha256_name(&a.ak_public),
        &secret,
    );
    let got = s.activate_credential(&cred, &seed).unwrap();
    assert_eq!(&got[..], &secret[..]);
    // Once: the attestation key is gone with its ceremony.
    assert!(matches!(
        s.activate_credential(&cred, &seed),
        Err(HalError::NoAttestation)
    ));
    assert_eq!(s.transient_objects().unwrap(), 0, "nothing left loaded");
    // The key still signs.
    let d = Digest::of(b"after");
    assert_verifies(&pk, &d, &s.sign_digest(&name("bound"), &d).unwrap());
}

#[test]
fn a_credential_for_another_ak_or_another_tpm_does_not_open() {
    let ca = EkCa::new();
    let tpm = Swtpm::manufacture(&ca);
    let other = Swtpm::manufacture(&ca);
    let dir = tempfile::tempdir().unwrap();
    let tools = tempfile::tempdir().unwrap();
    let mut s = store_via(tpm.tcti(), dir.path(), None);
    s.create(&name("k")).unwrap();
    let q = [7u8; 32];
    let a = s.attest(&name("k"), &q).unwrap();
    // Sealed for a name that is not this AK's.
    let (cred, seed) = make_credential(
        tools.path(),
        &a.ek_public,
        &sha256_name(&a.key_public),
        b"x",
    );
    assert!(s.activate_credential(&cred, &seed).is_err());

    // Sealed to another TPM's EK.
    let mut o = store_via(other.tcti(), &dir.path().join("other"), None);
    o.create(&name("k")).unwrap();
    let b = o.attest(&name("k"), &q).unwrap();
    assert_ne!(a.ek_public, b.ek_public, "two TPMs, two EKs");
    s.attest(&name("k"), &q).unwrap();
    let (cred, seed) =
        make_credential(tools.path(), &b.ek_public, &sha256_name(&a.ak_public), b"x");
    assert!(s.activate_credential(&cred, &seed).is_err());
    assert_eq!(s.transient_objects().unwrap(), 0);
}

#[test]
fn a_tpm_without_an_ek_certificate_attests_with_its_ecc_ek() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let tools = tempfile::tempdir().unwrap();
    let mut s = store_via(tpm.tcti(), dir.path(), None);
    s.create(&name("k")).unwrap();
    let a = s.attest(&name("k"), &[1u8; 32]).unwrap();
    assert!(a.ek_certificate.is_none());
    // TPMT_PUBLIC of the TCG default ECC P-256 EK: type ECC (0x0023), nameAlg SHA-256.
    assert_eq!(
        &tpm2b_contents(&a.ek_public)[..4],
        &[0x00, 0x23, 0x00, 0x0b]
    );
    let (cred, seed) = make_credential(
        tools.path(),
        &a.ek_public,
        &sha256_name(&a.ak_public),
        b"ecc",
    );
    assert_eq!(&s.activate_credential(&cred, &seed).unwrap()[..], b"ecc");
    assert_eq!(s.transient_objects().unwrap(), 0);
}

#[test]
fn the_file_key_store_cannot_attest() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = FileKeyStore::open(dir.path()).unwrap();
    s.create(&name("k")).unwrap();
    assert!(matches!(
        s.attest(&name("k"), &[0; 32]),
        Err(HalError::CannotAttest(_))
    ));
}

/// What a probe on the TPM bus records: the relay's traffic. First shown to catch the secrets
/// when they do travel in the clear (tpm2-tools with default sessions), then shown not to
/// catch them with the store.
#[test]
fn the_key_auth_and_the_credential_never_cross_the_bus_in_the_clear() {
    let ca = EkCa::new();
    let tpm = Swtpm::manufacture(&ca);
    let auth = "key-auth-0f3a9c71";
    let secret = *b"credential-9d2e4b7a1c6f8e3d5b0a2";

    // The probe works: a plain password session sends the new key's auth as it is.
    let relay = TpmCommandCounter::start(tpm.port());
    let tools = tempfile::tempdir().unwrap();
    let ctx_file = tools.path().join("prim.ctx");
    let tool = |args: &[&str]| {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .current_dir(tools.path())
            .env("TPM2TOOLS_TCTI", relay.tcti())
            .env("TSS2_LOG", "all+none")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    tool(&[
        "tpm2_createprimary",
        "-C",
        "o",
        "-G",
        "ecc",
        "-c",
        ctx_file.to_str().unwrap(),
    ]);
    tool(&[
        "tpm2_create",
        "-C",
        ctx_file.to_str().unwrap(),
        "-G",
        "ecc",
        "-p",
        auth,
        "-u",
        "k.pub",
        "-r",
        "k.priv",
    ]);
    tool(&["tpm2_flushcontext", "-t"]);
    let (to_tpm, _) = relay.traffic();
    assert!(
        contains(&to_tpm, auth.as_bytes()),
        "the probe must see a clear auth value"
    );
    drop(relay);

    // The store: the same kind of key with an auth value, a signature with it.
    let relay = TpmCommandCounter::start(tpm.port());
    let dir = tempfile::tempdir().unwrap();
    let mut s = store_via(relay.tcti(), dir.path(), Some(auth));
    let pk = s.create(&name("k")).unwrap();
    let d = Digest::of(b"m");
    assert_verifies(&pk, &d, &s.sign_digest(&name("k"), &d).unwrap());

    // An attestation and its credential (sealed by tpm2-tools to the EK for the AK).
    let a = s.attest(&name("k"), &[3u8; 32]).unwrap();
    let (cred, seed) = make_credential(
        tools.path(),
        &a.ek_public,
        &sha256_name(&a.ak_public),
        &secret,
    );
    assert_eq!(
        &s.activate_credential(&cred, &seed).unwrap()[..],
        &secret[..]
    );
    let (to_tpm, from_tpm) = relay.traffic();
    assert!(!to_tpm.is_empty() && !from_tpm.is_empty());
    assert!(
        !contains(&to_tpm, auth.as_bytes()),
        "the key auth went to the TPM in the clear"
    );
    assert!(
        !contains(&from_tpm, &secret),
        "the credential came back in the clear"
    );
    assert!(!contains(&to_tpm, &secret));
}

#[test]
fn attestation_leaves_no_object_loaded_even_inside_a_ceremony_hold() {
    let ca = EkCa::new();
    let tpm = Swtpm::manufacture(&ca);
    let dir = tempfile::tempdir().unwrap();
    let mut s = store_via(tpm.tcti(), dir.path(), None);
    // A registration: the parent is held, the key made, signed with, then attested.
    s.prepare(None).unwrap();
    let pk = s.create(&name("k")).unwrap();
    let d = Digest::of(b"challenge");
    assert_verifies(&pk, &d, &s.sign_digest(&name("k"), &d).unwrap());
    s.attest(&name("k"), &[9u8; 32]).unwrap();
    s.release();
    assert_eq!(s.transient_objects().unwrap(), 0);
    // And again, as a later rotation would.
    s.create(&name("k2")).unwrap();
    s.attest(&name("k2"), &[8u8; 32]).unwrap();
    assert_eq!(s.transient_objects().unwrap(), 0);
}
