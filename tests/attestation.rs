//! Key attestation end to end (issue 12): the real boundkeyd with its TPM key store against a
//! real boundkey-authd, on swtpms manufactured with EK certificates by swtpm's own local CA
//! (`testkit::EkCa`), one per test. The refusals each check names are tested at the service
//! level too (`attest-tests/`); here the agent makes every attestation itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use boundkey_testkit::{EkCa, Swtpm};
use common::*;
use serde_json::Value;

fn s(v: &Value) -> String {
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

fn write(dir: &Path, name: &str, contents: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p.to_str().unwrap().to_string()
}

/// Audit events of `kind` for `token`.
fn events(auth: &AuthServer, kind: &str, token: &str) -> Vec<Value> {
    auth.audit()
        .into_iter()
        .filter(|e| e["type"] == kind && e["token_name"] == token)
        .collect()
}

/// The refusal code the agent reports in its one error line.
fn refused_with(o: &std::process::Output, code: &str) {
    assert_eq!(o.status.code(), Some(3), "{}", stderr(o));
    let line = error_line(o);
    assert!(line.contains(code), "expected {code}: {line}");
}

#[test]
fn a_device_registers_renews_and_rotates_with_its_key_attested_by_its_tpm() {
    let ca = EkCa::new();
    let tpm = Swtpm::manufacture(&ca);
    let tmp = tempfile::tempdir().unwrap();
    let bundle = write(tmp.path(), "ek-ca.pem", &ca.bundle_pem());
    let auth = AuthServer::start();
    let tok = auth.bot_with_token("sensor", &["--attestation", "tpm", "--ek-ca", &bundle]);
    let d = Device::with_keystore(Keystore::Tpm(tpm));

    d.join(&tok.join_uri);
    let t = auth.token(&tok.name);
    let ek = &t["ek_identity"];
    let ek_hash = s(&ek["ek_sha256"]);
    assert_eq!(ek_hash.len(), 64, "{t}");
    assert!(
        ek["certificate"]["issuer"].as_str().is_some(),
        "trusted through its certificate: {t}"
    );
    let inst = auth.instance(&s(&d.status()["instance_id"]));
    assert_eq!(s(&inst["ek_identity"]["ek_sha256"]), ek_hash, "{inst}");
    let joins = events(&auth, "bot.join", &tok.name);
    assert!(
        joins
            .iter()
            .any(|e| s(&e["fields"]["attested_ek_sha256"]) == ek_hash),
        "{joins:?}"
    );
    d.verify_outputs();

    // A renewal proves the bound key only: no attestation is asked for.
    let o = d.oneshot(&[]);
    assert_ok(&o);
    assert_eq!(d.status()["generation"], 2);

    // A rotation attests the new key, from the same TPM.
    let before = s(&auth.token(&tok.name)["bound_public_key"]);
    auth.ctl_json(&["bound-keypair", "request-rotation", &tok.name]);
    let o = d.oneshot(&[]);
    assert_ok(&o);
    let t = auth.token(&tok.name);
    assert_ne!(s(&t["bound_public_key"]), before, "rotated");
    assert_eq!(s(&t["ek_identity"]["ek_sha256"]), ek_hash);
    assert!(events(&auth, "bound_keypair.attestation_failed", &tok.name).is_empty());
    assert!(auth.locks().is_empty());
    d.verify_outputs();
}

#[test]
fn an_ek_certificate_from_another_ca_is_refused_and_the_secret_survives_for_the_right_one() {
    let ca = EkCa::new();
    let tpm = Swtpm::manufacture(&ca);
    let other = EkCa::new();
    let _made = Swtpm::manufacture(&other); // the other CA exists once it has issued
    let tmp = tempfile::tempdir().unwrap();
    let wrong = write(tmp.path(), "other.pem", &other.bundle_pem());
    let right = write(tmp.path(), "right.pem", &ca.bundle_pem());
    let auth = AuthServer::start();
    let tok = auth.bot_with_token("sensor", &["--attestation", "tpm", "--ek-ca", &wrong]);
    let d = Device::with_keystore(Keystore::Tpm(tpm));

    let o = d.oneshot(&["--join-uri", &tok.join_uri]);
    refused_with(&o, "ek_untrusted");
    let failed = events(&auth, "bound_keypair.attestation_failed", &tok.name);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["fields"]["reason"], "ek_untrusted");
    assert!(auth.locks().is_empty(), "an untrusted EK locks nothing");
    assert!(auth.token(&tok.name)["bound_public_key"].is_null());

    // The operator fixes the bundle; the same device and secret now register.
    auth.ctl_json(&["tokens", "edit", &tok.name, "--ek-ca", &right]);
    d.join(&tok.join_uri);
    assert!(!auth.token(&tok.name)["bound_public_key"].is_null());
}

/// The EK hash as `docs/protocol.md` tells an operator to compute it, with tpm2-tools and
/// openssl: here for the TCG default ECC P-256 EK of a TPM without EK certificates.
fn ek_hash_by_tools(tpm: &Swtpm, dir: &Path) -> String {
    let der = dir.join("ek.der");
    tpm.run_tpm2_tool(
        "tpm2_createek",
        &[
            "-c",
            "-",
            "-G",
            "ecc",
            "-f",
            "der",
            "-u",
            der.to_str().unwrap(),
        ],
    );
    tpm.run_tpm2_tool("tpm2_flushcontext", &["-t"]);
    let pkey = Command::new("openssl")
        .args(["pkey", "-pubin", "-inform", "DER", "-outform", "DER", "-in"])
        .arg(&der)
        .output()
        .unwrap();
    assert!(
        pkey.status.success(),
        "{}",
        String::from_utf8_lossy(&pkey.stderr)
    );
    use sha2::Digest as _;
    sha2::Sha256::digest(&pkey.stdout)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn a_tpm_without_an_ek_certificate_joins_only_with_its_ek_on_the_allow_list() {
    let tpm = Swtpm::start();
    let tmp = tempfile::tempdir().unwrap();
    let hash = ek_hash_by_tools(&tpm, tmp.path());
    let auth = AuthServer::start();
    let someone_else = "ab".repeat(32);
    let tok = auth.bot_with_token(
        "sensor",
        &["--attestation", "tpm", "--ek-allow", &someone_else],
    );
    let d = Device::with_keystore(Keystore::Tpm(tpm));

    let o = d.oneshot(&["--join-uri", &tok.join_uri]);
    refused_with(&o, "ek_not_allowed");
    let failed = events(&auth, "bound_keypair.attestation_failed", &tok.name);
    assert_eq!(
        failed[0]["fields"]["reason"], "ek_not_allowed",
        "{failed:?}"
    );

    auth.ctl_json(&["tokens", "edit", &tok.name, "--ek-allow", &hash]);
    d.join(&tok.join_uri);
    let t = auth.token(&tok.name);
    assert_eq!(s(&t["ek_identity"]["ek_sha256"]), hash);
    assert!(t["ek_identity"]["certificate"].is_null(), "{t}");
}

#[test]
fn a_file_key_store_device_on_a_token_that_requires_a_tpm_is_refused() {
    let ca = EkCa::new();
    let _made = Swtpm::manufacture(&ca);
    let tmp = tempfile::tempdir().unwrap();
    let bundle = write(tmp.path(), "ek-ca.pem", &ca.bundle_pem());
    let auth = AuthServer::start();
    let tok = auth.bot_with_token("sensor", &["--attestation", "tpm", "--ek-ca", &bundle]);
    let d = Device::with_keystore(Keystore::File);

    let o = d.oneshot(&["--join-uri", &tok.join_uri]);
    refused_with(&o, "TPM key attestation");
    assert!(
        error_line(&o).contains("--keystore tpm"),
        "{}",
        error_line(&o)
    );
    let failed = events(&auth, "bound_keypair.attestation_failed", &tok.name);
    assert_eq!(
        failed[0]["fields"]["reason"], "attestation_required",
        "{failed:?}"
    );
    assert!(auth.token(&tok.name)["bound_public_key"].is_null());
    assert!(auth.locks().is_empty());
}
