//! File backend against a real directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use boundkey_hal::{open_store, Backend, Digest, FileKeyStore, HalError, KeyName, KeyStore};
use common::{assert_verifies, mode};

fn name(s: &str) -> KeyName {
    KeyName::new(s).unwrap()
}

#[test]
fn create_sign_verify() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = FileKeyStore::open(dir.path()).unwrap();
    assert_eq!(store.backend(), Backend::File);
    let pk = store.create(&name("bound")).unwrap();
    assert_eq!(store.public_key(&name("bound")).unwrap(), pk);
    let digest = Digest::of(b"challenge document");
    let sig = store.sign_digest(&name("bound"), &digest).unwrap();
    assert_verifies(&pk, &digest, &sig);
    // A different digest must not verify with that signature (the digest is what is signed).
    let other = Digest::of(b"something else");
    let vk = p256::ecdsa::VerifyingKey::from(&pk.to_p256());
    let parsed = p256::ecdsa::Signature::from_slice(&sig.0).unwrap();
    use p256::ecdsa::signature::hazmat::PrehashVerifier;
    assert!(vk.verify_prehash(&other.0, &parsed).is_err());
}

#[test]
fn create_refuses_existing_key_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = FileKeyStore::open(dir.path()).unwrap();
    let pk = store.create(&name("k")).unwrap();
    let before = std::fs::read(store.key_path(&name("k"))).unwrap();
    let err = store.create(&name("k")).unwrap_err();
    assert!(
        matches!(err, HalError::KeyExists(ref n) if n == "k"),
        "{err}"
    );
    assert_eq!(std::fs::read(store.key_path(&name("k"))).unwrap(), before);
    assert_eq!(store.public_key(&name("k")).unwrap(), pk);
}

#[test]
fn key_file_is_0600_and_new_dir_is_0700() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("a/keys");
    let mut store = FileKeyStore::open(&dir).unwrap();
    assert_eq!(mode(&dir), 0o700);
    store.create(&name("k")).unwrap();
    let path = dir.join("k.pem");
    assert_eq!(mode(&path), 0o600);
    let pem = std::fs::read_to_string(&path).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
    // Nothing but the key is left behind (no temp files).
    let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(entries.len(), 1);
}

#[test]
fn corrupt_or_truncated_file_is_key_corrupt_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = FileKeyStore::open(dir.path()).unwrap();
    store.create(&name("k")).unwrap();
    let path = store.key_path(&name("k"));
    let pem = std::fs::read(&path).unwrap();
    for damaged in [
        pem[..pem.len() / 2].to_vec(),
        b"not a key at all\n".to_vec(),
        vec![0xff; 100],
        Vec::new(),
    ] {
        std::fs::write(&path, &damaged).unwrap();
        for err in [
            store
                .sign_digest(&name("k"), &Digest::of(b"x"))
                .unwrap_err(),
            store.public_key(&name("k")).unwrap_err(),
        ] {
            match &err {
                HalError::KeyCorrupt { name, path: p, .. } => {
                    assert_eq!(name, "k");
                    assert_eq!(p, &path);
                    assert!(
                        err.to_string().contains(&path.display().to_string()),
                        "{err}"
                    );
                }
                other => panic!("expected KeyCorrupt, got {other:?}"),
            }
        }
    }
}

#[test]
fn missing_key_is_key_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = FileKeyStore::open(dir.path()).unwrap();
    let err = store
        .sign_digest(&name("nope"), &Digest::of(b"x"))
        .unwrap_err();
    assert!(
        matches!(err, HalError::KeyNotFound(ref n) if n == "nope"),
        "{err}"
    );
}

#[test]
fn list_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = FileKeyStore::open(dir.path()).unwrap();
    assert!(store.list().unwrap().is_empty());
    store.create(&name("b")).unwrap();
    store.create(&name("a.1")).unwrap();
    // Foreign and temp files are not keys.
    std::fs::write(dir.path().join(".bk-x.tmp"), b"junk").unwrap();
    std::fs::write(dir.path().join(".hidden.pem"), b"junk").unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"junk").unwrap();
    assert_eq!(store.list().unwrap(), vec![name("a.1"), name("b")]);
    store.delete(&name("b")).unwrap();
    assert!(!dir.path().join("b.pem").exists());
    assert_eq!(store.list().unwrap(), vec![name("a.1")]);
    store.delete(&name("b")).unwrap(); // deleting a missing key is fine
                                       // The name is free again.
    store.create(&name("b")).unwrap();
}

#[test]
fn factory_opens_file_backend() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_store(Backend::File, dir.path(), None).unwrap();
    assert_eq!(store.backend(), Backend::File);
    let pk = store.create(&name("k")).unwrap();
    let d = Digest::of(b"m");
    assert_verifies(&pk, &d, &store.sign_digest(&name("k"), &d).unwrap());
}

#[cfg(not(feature = "tpm"))]
#[test]
fn a_build_without_tpm_support_refuses_the_tpm_and_never_defaults_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let res = open_store(Backend::Tpm, dir.path(), None);
    assert!(matches!(res, Err(HalError::TpmUnsupported)));
    assert!(!boundkey_hal::tpm_supported());
    assert_eq!(boundkey_hal::default_backend(), Backend::File);
}
