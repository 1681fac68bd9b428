//! TPM backend against a real software TPM (one swtpm process per test).
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(feature = "tpm")]

mod common;

use std::path::Path;

use boundkey_hal::tpm::KeyBlob;
use boundkey_hal::{
    open_store, AuthTarget, Backend, Digest, HalError, KeyName, KeyStore, Parent, TpmConfig,
    TpmFault, TpmKeyStore,
};
use boundkey_testkit::{Swtpm, TpmCommandCounter};
use common::{assert_verifies, mode};
use zeroize::Zeroizing;

fn name(s: &str) -> KeyName {
    KeyName::new(s).unwrap()
}

fn cfg(tpm: &Swtpm) -> TpmConfig {
    TpmConfig {
        tcti: tpm.tcti(),
        ..TpmConfig::default()
    }
}

fn store(tpm: &Swtpm, dir: &Path) -> TpmKeyStore {
    TpmKeyStore::open(dir, cfg(tpm)).unwrap()
}

fn secret(s: &str) -> Option<Zeroizing<Vec<u8>>> {
    Some(Zeroizing::new(s.as_bytes().to_vec()))
}

fn sign_and_verify(store: &mut dyn KeyStore, key: &KeyName, msg: &[u8]) {
    let pk = store.public_key(key).unwrap();
    let d = Digest::of(msg);
    let sig = store.sign_digest(key, &d).unwrap();
    assert_verifies(&pk, &d, &sig);
}

#[test]
fn create_sign_verify() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(&tpm, dir.path());
    assert_eq!(s.backend(), Backend::Tpm);
    let pk = s.create(&name("bound")).unwrap();
    assert_eq!(s.public_key(&name("bound")).unwrap(), pk);
    for i in 0..8u8 {
        let d = Digest::of(&[i]);
        let sig = s.sign_digest(&name("bound"), &d).unwrap();
        assert_verifies(&pk, &d, &sig);
    }
    assert_eq!(s.list().unwrap(), vec![name("bound")]);
    let err = s.create(&name("bound")).unwrap_err();
    assert!(matches!(err, HalError::KeyExists(_)), "{err}");
    assert_eq!(s.public_key(&name("bound")).unwrap(), pk);
}

#[test]
fn factory_opens_tpm_backend() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let mut s = open_store(Backend::Tpm, dir.path(), Some(cfg(&tpm))).unwrap();
    assert_eq!(s.backend(), Backend::Tpm);
    s.create(&name("k")).unwrap();
    sign_and_verify(s.as_mut(), &name("k"), b"m");
    assert!(dir.path().join("k.tpmkey").exists());
}

#[test]
fn key_reloads_from_blob_after_tpm_restart() {
    let state = tempfile::tempdir().unwrap();
    let mut tpm = Swtpm::start_in(state.path());
    let dir = tempfile::tempdir().unwrap();
    let pk = store(&tpm, dir.path()).create(&name("k")).unwrap();
    // A reset drops every transient object and session: only the blob and the seed remain.
    tpm.restart();
    let mut s = store(&tpm, dir.path());
    assert_eq!(s.public_key(&name("k")).unwrap(), pk);
    sign_and_verify(&mut s, &name("k"), b"after reset");
    // A new process on the same state (what a reboot looks like).
    drop(s);
    drop(tpm);
    let tpm = Swtpm::start_in(state.path());
    let mut s = store(&tpm, dir.path());
    sign_and_verify(&mut s, &name("k"), b"after reboot");
}

#[test]
fn blob_from_another_tpm_is_key_corrupt() {
    let tpm_a = Swtpm::start();
    let tpm_b = Swtpm::start(); // different state dir, so different seeds
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    store(&tpm_a, dir_a.path()).create(&name("k")).unwrap();
    std::fs::copy(dir_a.path().join("k.tpmkey"), dir_b.path().join("k.tpmkey")).unwrap();

    let mut b = store(&tpm_b, dir_b.path());
    let err = b.sign_digest(&name("k"), &Digest::of(b"x")).unwrap_err();
    eprintln!("foreign blob: {err}");
    match &err {
        HalError::KeyCorrupt { name, path: p, .. } => {
            assert_eq!(name, "k");
            let path = dir_b.path().join("k.tpmkey");
            assert_eq!(p, &path);
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{err}"
            );
        }
        other => panic!("expected KeyCorrupt, got {other:?} ({other})"),
    }
    // The refusal flushed what it loaded and kept the connection usable.
    assert_eq!(b.transient_objects().unwrap(), 0);
    b.create(&name("own")).unwrap();
    sign_and_verify(&mut b, &name("own"), b"still works");
}

#[test]
fn damaged_key_file_is_key_corrupt_naming_the_file() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(&tpm, dir.path());
    s.create(&name("k")).unwrap();
    let path = dir.path().join("k.tpmkey");
    let good = std::fs::read(&path).unwrap();
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x55; // inside the wrapped private area: only the TPM can tell
    let mut extra = good.clone();
    extra.push(0);
    for damaged in [
        good[..good.len() - 10].to_vec(),
        good[..20].to_vec(),
        b"-----BEGIN PRIVATE KEY-----\n".to_vec(),
        extra,
        flipped,
    ] {
        std::fs::write(&path, &damaged).unwrap();
        let err = s.sign_digest(&name("k"), &Digest::of(b"x")).unwrap_err();
        match &err {
            HalError::KeyCorrupt { name, path: p, .. } => {
                assert_eq!(name, "k");
                assert_eq!(p, &path);
                assert!(
                    err.to_string().contains(&path.display().to_string()),
                    "{err}"
                );
            }
            other => panic!("expected KeyCorrupt, got {other:?} ({other})"),
        }
    }
    assert_eq!(s.transient_objects().unwrap(), 0);
}

#[test]
fn key_is_not_exportable() {
    let tpm = Swtpm::start();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("keys");
    let mut s = store(&tpm, &dir);
    s.create(&name("k")).unwrap();

    // Attributes as the TPM reports them for the loaded object, not as our file claims.
    let public = s.tpm_public(&name("k")).unwrap();
    let a = public.object_attributes();
    assert!(a.fixed_tpm(), "fixedTPM");
    assert!(a.fixed_parent(), "fixedParent");
    assert!(a.sensitive_data_origin(), "sensitiveDataOrigin");
    assert!(a.user_with_auth() && a.sign_encrypt() && !a.decrypt() && !a.restricted());

    // The only thing on disk is the wrapped blob: no PEM, no PKCS#8, no second file.
    assert_eq!(mode(&dir), 0o700);
    let entries: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(entries, vec!["k.tpmkey".to_string()]);
    let path = dir.join("k.tpmkey");
    assert_eq!(mode(&path), 0o600);
    let bytes = std::fs::read(&path).unwrap();
    assert!(bytes.starts_with(b"BKTPM1\n"));
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(!contains(b"-----BEGIN"));
    assert!(!contains(b"PRIVATE KEY"));
    // PKCS#8 / SEC1 EC private keys carry these OIDs (id-ecPublicKey, prime256v1) in DER.
    assert!(!contains(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]));
    assert!(!contains(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]));
    let blob = KeyBlob::read(&path).unwrap();
    assert_eq!(blob.parent(), Parent::Template);
    assert_eq!(blob.public_key(), s.public_key(&name("k")).unwrap());
}

#[test]
fn wrong_key_auth_is_auth_failed() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let with_auth = |auth: Option<Zeroizing<Vec<u8>>>| {
        TpmKeyStore::open(
            dir.path(),
            TpmConfig {
                key_auth: auth,
                ..cfg(&tpm)
            },
        )
        .unwrap()
    };
    with_auth(secret("correct horse"))
        .create(&name("k"))
        .unwrap();

    // swtpm locks out after 3 failures: stay at 2.
    for auth in [secret("battery staple"), None] {
        let mut s = with_auth(auth);
        let err = s.sign_digest(&name("k"), &Digest::of(b"x")).unwrap_err();
        match &err {
            HalError::AuthFailed { what } => {
                assert_eq!(what, &AuthTarget::Key("k".into()), "{err}");
                assert!(err.to_string().contains("key k"), "{err}");
            }
            other => panic!("expected AuthFailed, got {other:?} ({other})"),
        }
        // The failed signature flushed the parent and the key.
        assert_eq!(s.transient_objects().unwrap(), 0);
    }
    let mut good = with_auth(secret("correct horse"));
    sign_and_verify(&mut good, &name("k"), b"m");
}

#[test]
fn repeated_auth_failures_report_lockout() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let open = |auth: &str| {
        TpmKeyStore::open(
            dir.path(),
            TpmConfig {
                key_auth: secret(auth),
                ..cfg(&tpm)
            },
        )
        .unwrap()
    };
    open("right").create(&name("k")).unwrap();
    let mut wrong = open("wrong");
    let mut lockout = None;
    for attempt in 0..10 {
        match wrong.sign_digest(&name("k"), &Digest::of(b"x")) {
            Err(HalError::AuthFailed { .. }) => {}
            Err(HalError::Lockout) => {
                lockout = Some(attempt);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(lockout.is_some(), "never reported Lockout");
    drop(wrong);
    // In lockout even the right auth is refused, and the operator is told why.
    let err = open("right")
        .sign_digest(&name("k"), &Digest::of(b"x"))
        .unwrap_err();
    assert!(matches!(err, HalError::Lockout), "{err:?}");
}

#[test]
fn owner_auth_is_used_for_the_primary() {
    let tpm = Swtpm::start();
    tpm.run_tpm2_tool("tpm2_changeauth", &["-c", "o", "ownerpass"]);
    let dir = tempfile::tempdir().unwrap();
    let err = store(&tpm, dir.path()).create(&name("k")).unwrap_err();
    eprintln!("no owner auth: {err}");
    match &err {
        HalError::AuthFailed { what } => {
            assert_eq!(what, &AuthTarget::OwnerHierarchy, "{err}");
            assert!(err.to_string().contains("owner"), "{err}");
        }
        other => panic!("expected AuthFailed, got {other:?} ({other})"),
    }
    let mut s = TpmKeyStore::open(
        dir.path(),
        TpmConfig {
            owner_auth: secret("ownerpass"),
            ..cfg(&tpm)
        },
    )
    .unwrap();
    s.create(&name("k")).unwrap();
    sign_and_verify(&mut s, &name("k"), b"m");
}

#[test]
fn tpm_killed_mid_ceremony_then_back() {
    let mut tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(&tpm, dir.path());
    s.create(&name("k")).unwrap();
    sign_and_verify(&mut s, &name("k"), b"before");

    tpm.kill();
    let err = s.sign_digest(&name("k"), &Digest::of(b"x")).unwrap_err();
    eprintln!("after kill: {err}");
    assert!(
        matches!(
            err,
            HalError::DeviceLost { .. } | HalError::DeviceAbsent { .. }
        ),
        "{err:?}"
    );
    assert!(err.is_transient());
    // Still gone: reconnecting fails cleanly too.
    let err = s.sign_digest(&name("k"), &Digest::of(b"x")).unwrap_err();
    eprintln!("still gone: {err}");
    assert!(err.is_transient(), "{err:?}");

    tpm.restart();
    // The same store object reconnects and the key still loads.
    sign_and_verify(&mut s, &name("k"), b"after");
}

#[test]
fn absent_tpm_is_device_absent() {
    let mut tpm = Swtpm::start();
    let tcti = tpm.tcti();
    tpm.kill(); // nothing listens on that port now
    let dir = tempfile::tempdir().unwrap();
    let mut s = TpmKeyStore::open(
        dir.path(),
        TpmConfig {
            tcti,
            ..TpmConfig::default()
        },
    )
    .unwrap();
    let err = s.create(&name("k")).unwrap_err();
    assert!(matches!(err, HalError::DeviceAbsent { .. }), "{err:?}");
    assert!(!dir.path().join("k.tpmkey").exists());

    let mut s = TpmKeyStore::open(
        dir.path(),
        TpmConfig {
            tcti: "device:/nonexistent/tpmrm0".into(),
            ..TpmConfig::default()
        },
    )
    .unwrap();
    let err = s.create(&name("k")).unwrap_err();
    match &err {
        HalError::DeviceAbsent { cause, .. } => {
            assert!(cause.to_string().contains("/nonexistent/tpmrm0"), "{err}")
        }
        other => panic!("expected DeviceAbsent, got {other:?}"),
    }
}

#[test]
fn persistent_parent_handle() {
    const SRK: &str = "0x81000001";
    let tpm = Swtpm::start();
    let tools = tempfile::tempdir().unwrap();
    let ctx_file = tools.path().join("srk.ctx");
    let ctx_file = ctx_file.to_str().unwrap();
    let provision = || {
        tpm.run_tpm2_tool(
            "tpm2_createprimary",
            &["-C", "o", "-G", "ecc", "-c", ctx_file],
        );
        tpm.run_tpm2_tool("tpm2_evictcontrol", &["-C", "o", "-c", ctx_file, SRK]);
        // Without a resource manager tpm2-tools leaves its transient copy loaded.
        tpm.run_tpm2_tool("tpm2_flushcontext", &["-t"]);
    };
    provision();

    let dir = tempfile::tempdir().unwrap();
    let mut s = TpmKeyStore::open(
        dir.path(),
        TpmConfig {
            parent: Parent::Persistent(0x8100_0001),
            ..cfg(&tpm)
        },
    )
    .unwrap();
    s.create(&name("k")).unwrap();
    sign_and_verify(&mut s, &name("k"), b"m");
    let blob = KeyBlob::read(&dir.path().join("k.tpmkey")).unwrap();
    assert_eq!(blob.parent(), Parent::Persistent(0x8100_0001));
    assert_eq!(s.transient_objects().unwrap(), 0);

    // The key really hangs off that handle: without it, signing fails and says why.
    s.disconnect(); // swtpm serves one connection at a time
    tpm.run_tpm2_tool("tpm2_evictcontrol", &["-C", "o", "-c", SRK]);
    let err = s.sign_digest(&name("k"), &Digest::of(b"x")).unwrap_err();
    eprintln!("parent gone: {err}");
    assert!(
        matches!(
            err,
            HalError::Tpm {
                fault: TpmFault::ParentUnusable {
                    parent: Parent::Persistent(0x8100_0001),
                    ..
                },
                ..
            }
        ),
        "{err:?} ({err})"
    );
    assert!(err.to_string().contains("0x81000001"), "{err}");
    // The same template under the same seed is the same key: the blob loads again.
    s.disconnect();
    provision();
    sign_and_verify(&mut s, &name("k"), b"again");
}

#[test]
fn fifty_signs_leave_no_objects_loaded() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(&tpm, dir.path());
    let pk = s.create(&name("k")).unwrap();
    // swtpm has 3 object slots and no resource manager: one leaked handle per call would end
    // in TPM_RC_OBJECT_MEMORY within two calls.
    for i in 0..50u32 {
        let d = Digest::of(&i.to_be_bytes());
        let sig = s
            .sign_digest(&name("k"), &d)
            .unwrap_or_else(|e| panic!("sign #{i}: {e}"));
        assert_verifies(&pk, &d, &sig);
    }
    assert_eq!(s.transient_objects().unwrap(), 0);
}

#[test]
fn delete_and_list() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(&tpm, dir.path());
    s.create(&name("b")).unwrap();
    s.create(&name("a")).unwrap();
    std::fs::write(dir.path().join("a.pem"), b"not ours").unwrap();
    assert_eq!(s.list().unwrap(), vec![name("a"), name("b")]);
    s.delete(&name("a")).unwrap();
    s.delete(&name("a")).unwrap();
    assert_eq!(s.list().unwrap(), vec![name("b")]);
    let err = s.sign_digest(&name("a"), &Digest::of(b"x")).unwrap_err();
    assert!(matches!(err, HalError::KeyNotFound(_)), "{err}");
}

/// Through the relay every TPM command the store sends is recorded, whatever the store thinks it
/// does: the counts here are the ones `docs/performance.md` reports per ceremony.
fn counted(tpm: &Swtpm, dir: &Path, persist_srk: bool) -> (TpmKeyStore, TpmCommandCounter) {
    let relay = TpmCommandCounter::start(tpm.port());
    let s = TpmKeyStore::open(
        dir,
        TpmConfig {
            tcti: relay.tcti(),
            persist_srk,
            ..TpmConfig::default()
        },
    )
    .unwrap();
    (s, relay)
}

#[test]
fn a_ceremony_hold_makes_the_primary_once_and_releases_everything() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let (mut s, relay) = counted(&tpm, dir.path(), false);
    s.transient_objects().unwrap(); // connects (the TCTI's own probes are not ours to count)
    relay.take();

    // A first join: the parent is made once for the key's creation and its proof.
    s.prepare(None).unwrap();
    let pk = s.create(&name("k")).unwrap();
    let d = Digest::of(b"challenge");
    let sig = s.sign_digest(&name("k"), &d).unwrap();
    assert_verifies(&pk, &d, &sig);
    s.release();
    let cmds = relay.take();
    assert_eq!(
        TpmCommandCounter::describe(&cmds),
        // ReadPublic: the first key creation looks whether 0x81000001 holds the same primary.
        "CreatePrimary, Create, ReadPublic, Load, Sign, FlushContext x2"
    );
    assert_eq!(s.transient_objects().unwrap(), 0);
    relay.take();

    // A renewal: everything but the signature is done before the challenge arrives.
    s.prepare(Some(&name("k"))).unwrap();
    assert_eq!(
        TpmCommandCounter::describe(&relay.take()),
        "CreatePrimary, Load"
    );
    assert_eq!(s.transient_objects().unwrap(), 2, "parent and key held");
    relay.take();
    let sig = s.sign_digest(&name("k"), &d).unwrap();
    assert_verifies(&pk, &d, &sig);
    assert_eq!(TpmCommandCounter::describe(&relay.take()), "Sign");
    s.release();
    assert_eq!(
        TpmCommandCounter::describe(&relay.take()),
        "FlushContext x2"
    );
    assert_eq!(s.transient_objects().unwrap(), 0);

    // Without a hold nothing outlives an operation.
    relay.take();
    sign_and_verify(&mut s, &name("k"), b"m");
    assert_eq!(
        TpmCommandCounter::describe(&relay.take()),
        "CreatePrimary, Load, Sign, FlushContext x2"
    );
    assert_eq!(s.transient_objects().unwrap(), 0);

    // A hold survives a failed operation on another key and still releases everything.
    s.prepare(Some(&name("k"))).unwrap();
    assert!(s.sign_digest(&name("absent"), &d).is_err());
    sign_and_verify(&mut s, &name("k"), b"still held");
    s.release();
    assert_eq!(s.transient_objects().unwrap(), 0);
}

#[test]
fn the_standard_srk_replaces_the_primary_when_it_is_the_same_key() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    // A key made before the SRK existed: its blob says "template parent".
    let before = store(&tpm, dir.path()).create(&name("old")).unwrap();
    assert!(!dir.path().join("srk.name").exists());

    // The owner allows persisting: the first key creation puts the primary at 0x81000001.
    let (mut s, relay) = counted(&tpm, dir.path(), true);
    s.create(&name("new")).unwrap();
    assert!(relay.commands().contains(&0x120), "EvictControl expected");
    assert!(s.uses_persistent_srk());
    assert!(dir.path().join("srk.name").exists());
    let out = tpm.run_tpm2_tool("tpm2_getcap", &["handles-persistent"]);
    assert!(out.contains("0x81000001"), "{out}");
    drop((s, relay));

    // A later process opens it instead of making the primary, for old and new keys alike.
    let (mut s, relay) = counted(&tpm, dir.path(), false);
    s.transient_objects().unwrap();
    relay.take();
    s.prepare(Some(&name("old"))).unwrap();
    let d = Digest::of(b"x");
    let sig = s.sign_digest(&name("old"), &d).unwrap();
    s.release();
    assert_verifies(&before, &d, &sig);
    assert_eq!(
        TpmCommandCounter::describe(&relay.take()),
        "ReadPublic, Load, Sign, FlushContext"
    );
    sign_and_verify(&mut s, &name("new"), b"y");
    assert_eq!(s.transient_objects().unwrap(), 0);
    let blob = KeyBlob::read(&dir.path().join("new.tpmkey")).unwrap();
    assert_eq!(blob.parent(), Parent::Template, "the blob stays portable");

    // Evicted (or the TPM cleared): back to making the primary, nothing lost.
    s.disconnect();
    tpm.run_tpm2_tool("tpm2_evictcontrol", &["-C", "o", "-c", "0x81000001"]);
    sign_and_verify(&mut s, &name("old"), b"after eviction");
    assert!(!s.uses_persistent_srk());
}

#[test]
fn another_object_at_the_srk_handle_is_never_used() {
    let tpm = Swtpm::start();
    let tools = tempfile::tempdir().unwrap();
    let ctx_file = tools.path().join("other.ctx");
    let ctx_file = ctx_file.to_str().unwrap();
    // Someone else's key at the standard handle: an RSA primary, not our template.
    tpm.run_tpm2_tool(
        "tpm2_createprimary",
        &["-C", "o", "-G", "rsa", "-c", ctx_file],
    );
    tpm.run_tpm2_tool(
        "tpm2_evictcontrol",
        &["-C", "o", "-c", ctx_file, "0x81000001"],
    );
    tpm.run_tpm2_tool("tpm2_flushcontext", &["-t"]);

    let dir = tempfile::tempdir().unwrap();
    let (mut s, relay) = counted(&tpm, dir.path(), true);
    s.create(&name("k")).unwrap();
    assert!(!relay.commands().contains(&0x120), "must not evict over it");
    assert!(!s.uses_persistent_srk());
    assert!(!dir.path().join("srk.name").exists());
    sign_and_verify(&mut s, &name("k"), b"m");

    // A recorded name that no longer matches what sits there is not trusted either.
    std::fs::write(
        dir.path().join("srk.name"),
        "000b".to_string() + &"00".repeat(32),
    )
    .unwrap();
    drop((s, relay));
    let mut s = store(&tpm, dir.path());
    assert!(s.uses_persistent_srk(), "the stale record is read");
    sign_and_verify(&mut s, &name("k"), b"n");
    assert!(
        !s.uses_persistent_srk(),
        "and dropped when the object differs"
    );
    assert_eq!(s.transient_objects().unwrap(), 0);
}

#[test]
fn objects_a_dead_process_left_loaded_are_flushed_when_the_tpm_is_full() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(&tpm, dir.path());
    s.create(&name("k")).unwrap();
    s.disconnect();
    // tpm2-tools without a resource manager leave their objects loaded, as a process killed
    // during a ceremony's hold does: fill every object slot.
    let tools = tempfile::tempdir().unwrap();
    for i in 0..3 {
        let ctx = tools.path().join(format!("p{i}.ctx"));
        tpm.run_tpm2_tool(
            "tpm2_createprimary",
            &["-C", "o", "-G", "ecc", "-c", ctx.to_str().unwrap()],
        );
    }
    let full = s.transient_objects().unwrap();
    assert!(full >= 3, "{full} objects loaded");
    sign_and_verify(&mut s, &name("k"), b"after the flush");
    assert_eq!(s.transient_objects().unwrap(), 0);
}
