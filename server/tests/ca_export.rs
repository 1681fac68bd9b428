//! `boundkeyctl ca export`: what a relying party gets is enough to check what the service issues,
//! with tools that are not ours. A real authd issues an identity and a join-state document over
//! a real ceremony; the identity is verified against the exported bundle by
//! `openssl verify -x509_strict` and parsed by the `spiffe` crate, and the join-state document
//! is verified with nothing but the exported JWK set (and again with the exported PEM keys).
//! Through a rotation the exports keep every key still trusted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use common::*;
use p256::ecdsa::signature::Verifier;
use p256::pkcs8::{DecodePublicKey, EncodePrivateKey};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::Value;

fn export(s: &Server, kind: &str, encoding: &str) -> String {
    let v = s.ctl(&["ca", "export", "--type", kind, "--encoding", encoding]);
    assert_eq!(v["format"], encoding);
    v["data"].as_str().expect("data").to_string()
}

fn openssl_strict(dir: &Path, bundle: &str, leaf: &str, purpose: &str) -> Result<(), String> {
    let ca = dir.join("bundle.pem");
    let cert = dir.join("leaf.pem");
    std::fs::write(&ca, bundle).unwrap();
    std::fs::write(&cert, leaf).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
        .arg(&ca)
        .arg(&cert)
        .output()
        .expect("openssl is installed (scripts/deps.sh)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() && text.contains(": OK") {
        Ok(())
    } else {
        Err(text)
    }
}

/// Checks a compact ES256 JWS against a JWK set only; returns the payload.
fn verify_with_jwks(jwks: &Value, document: &str) -> Result<Value, String> {
    let parts: Vec<&str> = document.split('.').collect();
    let [h, p, sig] = parts[..] else {
        return Err("not a compact JWS".into());
    };
    let header: Value = serde_json::from_slice(&B64.decode(h).unwrap()).unwrap();
    assert_eq!(header["alg"], "ES256");
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == header["kid"])
        .ok_or_else(|| format!("no key with kid {}", header["kid"]))?;
    assert_eq!(
        (&jwk["kty"], &jwk["crv"], &jwk["alg"], &jwk["use"]),
        (
            &Value::from("EC"),
            &Value::from("P-256"),
            &Value::from("ES256"),
            &Value::from("sig")
        )
    );
    let mut sec1 = vec![4u8];
    sec1.extend(B64.decode(jwk["x"].as_str().unwrap()).unwrap());
    sec1.extend(B64.decode(jwk["y"].as_str().unwrap()).unwrap());
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1).unwrap();
    let sig = p256::ecdsa::Signature::from_slice(&B64.decode(sig).unwrap()).unwrap();
    key.verify(format!("{h}.{p}").as_bytes(), &sig)
        .map_err(|e| e.to_string())?;
    Ok(serde_json::from_slice(&B64.decode(p).unwrap()).unwrap())
}

/// Checks the JWS against any of the exported SPKI PEM public keys.
fn verify_with_pem_keys(pem: &str, document: &str) -> bool {
    let (input, sig) = document.rsplit_once('.').unwrap();
    let sig = p256::ecdsa::Signature::from_slice(&B64.decode(sig).unwrap()).unwrap();
    pem.split_inclusive("-----END PUBLIC KEY-----")
        .filter(|b| b.contains("BEGIN PUBLIC KEY"))
        .map(|b| p256::ecdsa::VerifyingKey::from_public_key_pem(b.trim()).unwrap())
        .any(|k| k.verify(input.as_bytes(), &sig).is_ok())
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_trust_material_verifies_what_the_service_issues() {
    let s = Server::start();
    s.ctl(&["bots", "add", "robot"]);
    let t = s.ctl(&["tokens", "add", "--bot", "robot", "--name", "dev-1"]);
    let secret = t["registration_secret"].as_str().unwrap();
    let mut agent = Agent::new(&s, "dev-1", Some(secret));
    let r = agent.join().await.expect("join");
    let leaf = r.certificate.clone();
    let document = r.join_state.clone().expect("a join-state document");
    let dir = tempfile::tempdir().unwrap();

    // Identity: a strict RFC 5280 path to the exported bundle, and a valid X509-SVID.
    let bundle = export(&s, "identity", "pem");
    openssl_strict(dir.path(), &bundle, &leaf, "sslclient").unwrap();
    let key = agent.identity.to_pkcs8_der().unwrap();
    let svid = spiffe::X509Svid::parse_from_der(&der(&leaf), key.as_bytes()).unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://test-cluster/bot/robot"
    );
    let td = spiffe::TrustDomain::new("test-cluster").unwrap();
    let b = spiffe::X509Bundle::parse_from_der(td, &der(&bundle)).unwrap();
    assert_eq!(b.authorities().len(), 1);
    // The SPIFFE bundle (JWKS) carries the same CA certificate.
    let id_jwks: Value = serde_json::from_str(&export(&s, "identity", "jwks")).unwrap();
    let x5c = id_jwks["keys"][0]["x5c"][0].as_str().unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(x5c)
            .unwrap(),
        der(&bundle)
    );
    assert_eq!(id_jwks["keys"][0]["use"], "x509-svid");

    // Join state: verifiable with the JWK set alone, and with the PEM keys alone.
    let jwks: Value = serde_json::from_str(&export(&s, "join-state", "jwks")).unwrap();
    let claims = verify_with_jwks(&jwks, &document).unwrap();
    assert_eq!(
        (&claims["iss"], &claims["sub"], &claims["instance_id"]),
        (
            &Value::from("test-cluster"),
            &Value::from("robot"),
            &Value::from(r.instance_id.as_str())
        )
    );
    assert!(verify_with_pem_keys(
        &export(&s, "join-state", "pem"),
        &document
    ));

    // TLS: the pinned CA, PEM only; the listener's certificate passes the strict verifier.
    assert_eq!(export(&s, "tls", "pem"), s.ca_pem);
    let out = s.ctl_raw(&["ca", "export", "--type", "tls", "--encoding", "jwks"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PEM only"));

    // Text mode prints the material alone, ready to redirect into a file.
    let out = s.ctl_raw(&["ca", "export", "--type", "identity"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), bundle);

    // Rotations: both keys stay exported during the grace period, and what the old keys signed
    // still verifies with the new exports.
    s.ctl(&[
        "ca",
        "rotate",
        "--type",
        "join-state",
        "--grace-period",
        "1h",
    ]);
    s.ctl(&["ca", "rotate", "--type", "identity", "--grace-period", "1h"]);
    let jwks2: Value = serde_json::from_str(&export(&s, "join-state", "jwks")).unwrap();
    assert_eq!(jwks2["keys"].as_array().unwrap().len(), 2);
    verify_with_jwks(&jwks2, &document).unwrap();
    let bundle2 = export(&s, "identity", "pem");
    assert_eq!(bundle2.matches("BEGIN CERTIFICATE").count(), 2);
    openssl_strict(dir.path(), &bundle2, &leaf, "sslclient").unwrap();

    // A renewal after the rotations is signed by the new keys and verifies the same way.
    let r2 = agent.join().await.expect("renewal");
    openssl_strict(dir.path(), &bundle2, &r2.certificate, "sslclient").unwrap();
    if let Some(doc2) = &r2.join_state {
        verify_with_jwks(&jwks2, doc2).unwrap();
    }
}

#[test]
fn authd_refuses_dot_cluster_names() {
    for bad in [".", ".."] {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(AUTHD)
            .args([
                "start",
                "--listen",
                "127.0.0.1:0",
                "--cluster",
                bad,
                "--data-dir",
            ])
            .arg(dir.path().join("data"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A refused name exits at argument parsing; one that is accepted starts serving, which
        // is the failure (and is stopped here rather than left running).
        let (status, served) = wait_for(std::time::Duration::from_secs(60), || {
            if let Some(st) = child.try_wait().unwrap() {
                return Some((st, false));
            }
            dir.path()
                .join("data")
                .join("admin.sock")
                .exists()
                .then(|| {
                    let _ = child.kill();
                    (child.wait().unwrap(), true)
                })
        });
        assert!(!served, "--cluster {bad} accepted: the service started");
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "--cluster {bad} accepted");
        assert!(stderr.contains("not . or .."), "--cluster {bad}: {stderr}");
        assert!(!dir.path().join("data").exists(), "nothing is created");
    }
}

#[test]
fn dot_bot_names_are_refused_by_the_admin_api() {
    let s = Server::start();
    for bad in [".", ".."] {
        let out = s.ctl_raw(&["bots", "add", bad]);
        assert!(!out.status.success(), "bot {bad} accepted");
        let out = s.ctl_raw(&["tokens", "add", "--bot", bad]);
        assert!(!out.status.success(), "token for bot {bad} accepted");
    }
    assert_eq!(s.ctl(&["bots", "ls"]), Value::Array(vec![]));
}
