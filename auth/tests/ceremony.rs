//! Every rule of the bound-keypair ceremony, driven through the real `Service` over the
//! in-memory store with an injected clock. Each test names the rule it guards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use boundkey_auth::admin::{new_bound_keypair_token, request_rotation, NewBoundKeypairToken};
use boundkey_auth::authority::{AuthorityState, CaKind};
use boundkey_auth::model::{event, Lock, LockTarget, Token};
use boundkey_auth::service::Action;
use boundkey_auth::store::Store;
use boundkey_proto::claims::{JoinStateClaims, RecoveryMode};
use boundkey_proto::{jws, ChallengeSolution, ClientMessage, ErrorCode, ServerMessage};
use harness::*;

const SECRET: &str = "correct horse battery";

fn secret_token(w: &World, name: &str, limit: u32, mode: RecoveryMode) -> Token {
    let (t, _) = new_bound_keypair_token(
        NewBoundKeypairToken {
            name: Some(name.into()),
            bot_name: "robot".into(),
            registration_secret: Some(SECRET.into()),
            recovery_limit: Some(limit),
            recovery_mode: Some(mode),
            must_register_before: Some(w.now + 3600),
            ..Default::default()
        },
        w.now,
    )
    .unwrap();
    w.add_token(&t);
    t
}

fn registered(w: &World, limit: u32, mode: RecoveryMode) -> Device {
    secret_token(w, "tok", limit, mode);
    let mut d = Device::new();
    d.join(w, "tok", Some(SECRET), false).expect("registration");
    d
}

// ---- Case A: first join -------------------------------------------------------------------

#[test]
fn a_registration_secret_binds_a_new_key_and_creates_an_instance() {
    let w = World::new();
    secret_token(&w, "tok", 1, RecoveryMode::Standard);
    let mut d = Device::new();
    let old_key = ssh(&d.bound);
    let r = d.join(&w, "tok", Some(SECRET), false).unwrap();
    assert_eq!(
        d.rotation_requests, 1,
        "the secret path asks for a fresh key"
    );
    assert_ne!(ssh(&d.bound), old_key);
    let t = w.token("tok");
    assert_eq!(
        t.status.bound_public_key.as_deref(),
        Some(ssh(&d.bound).as_str())
    );
    assert_eq!(
        t.status.bound_instance_id.as_deref(),
        Some(r.instance_id.as_str())
    );
    assert_eq!(
        t.status.recovery_count, 1,
        "a first join counts as a recovery"
    );
    assert!(
        t.status.registration_secret_hash.is_none(),
        "the secret is consumed"
    );
    assert_eq!(r.generation, 1);
    let inst = w.store.get_instance(&r.instance_id).unwrap().unwrap();
    assert_eq!(inst.spec.previous_instance_id, None);
    assert!(inst.status.initial_authentication.is_some());
    assert_eq!(inst.status.expires, r.expires + 300);
    assert_eq!(w.audit(event::RECOVERY).len(), 1);
}

#[test]
fn a_secret_works_once() {
    let w = World::new();
    secret_token(&w, "tok", 5, RecoveryMode::Standard);
    Device::new().join(&w, "tok", Some(SECRET), false).unwrap();
    let e = Device::new()
        .join(&w, "tok", Some(SECRET), false)
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::AccessDenied);
}

#[test]
fn a_wrong_missing_and_expired_secret_get_the_same_answer() {
    let mut w = World::new();
    secret_token(&w, "tok", 1, RecoveryMode::Standard);
    let wrong = Device::new()
        .join(&w, "tok", Some("not the secret"), false)
        .unwrap_err();
    let missing = Device::new().join(&w, "tok", None, false).unwrap_err();
    w.advance(3601);
    let late = Device::new()
        .join(&w, "tok", Some(SECRET), false)
        .unwrap_err();
    assert_eq!(wrong, missing);
    assert_eq!(wrong, late);
    assert_eq!(wrong.code, ErrorCode::AccessDenied);
    // The reasons differ in the audit log, not on the wire.
    let errors: Vec<_> = w
        .audit(event::BOT_JOIN)
        .into_iter()
        .filter_map(|e| e.error)
        .collect();
    assert!(errors.iter().any(|e| e.contains("wrong")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("missing")), "{errors:?}");
    assert!(
        errors.iter().any(|e| e.contains("must_register_before")),
        "{errors:?}"
    );
    assert!(
        w.token("tok").status.registration_secret_hash.is_some(),
        "nothing consumed"
    );
}

#[test]
fn a_pre_registered_key_joins_without_secret_and_other_keys_are_refused() {
    let w = World::new();
    let mut d = Device::new();
    let (t, secret) = new_bound_keypair_token(
        NewBoundKeypairToken {
            name: Some("pre".into()),
            bot_name: "robot".into(),
            initial_public_key: Some(ssh(&d.bound)),
            ..Default::default()
        },
        w.now,
    )
    .unwrap();
    assert!(secret.is_none());
    w.add_token(&t);
    // A device with another key cannot answer the challenge for the registered key.
    let e = Device::new().join(&w, "pre", None, false).unwrap_err();
    assert_eq!(e.code, ErrorCode::AccessDenied);
    let r = d.join(&w, "pre", None, false).unwrap();
    assert_eq!(d.rotation_requests, 0);
    assert_eq!(
        w.token("pre").status.bound_public_key.unwrap(),
        ssh(&d.bound)
    );
    assert_eq!(r.generation, 1);
}

#[test]
fn a_challenge_signed_by_the_wrong_key_is_refused() {
    let w = World::new();
    let d = Device::new();
    let (t, _) = new_bound_keypair_token(
        NewBoundKeypairToken {
            name: Some("pre".into()),
            bot_name: "robot".into(),
            initial_public_key: Some(ssh(&d.bound)),
            ..Default::default()
        },
        w.now,
    )
    .unwrap();
    w.add_token(&t);
    let thief = Device::new();
    let (mut s, a) = w
        .svc
        .open(thief.connection(false), init_msg(&thief, "pre"), w.now);
    let Action::Reply(ServerMessage::Challenge(c)) = a else {
        panic!("{a:?}")
    };
    let sol = jws::sign(&thief.bound, None, c.document.as_bytes());
    let a = s.handle(solution(sol), w.now);
    assert_eq!(err_code(&a), Some(ErrorCode::AccessDenied));
    assert!(w.token("pre").status.bound_public_key.is_none());
    assert!(w.store.list_instances(None).unwrap().is_empty());
}

fn init_msg(d: &Device, token: &str) -> ClientMessage {
    ClientMessage::Init(boundkey_proto::Init {
        token: token.into(),
        params: boundkey_proto::BotParams {
            identity_public_key: boundkey_proto::keys::pkix_b64(&p256::PublicKey::from(
                d.identity.verifying_key(),
            )),
            ttl_secs: 600,
        },
        registration_secret: None,
        join_state: d.join_state.clone(),
    })
}

fn solution(s: String) -> ClientMessage {
    ClientMessage::ChallengeSolution(ChallengeSolution {
        solution: s,
        identity_proof: None,
        attestation: None,
    })
}

fn err_code(a: &Action) -> Option<ErrorCode> {
    match a {
        Action::Close(ServerMessage::Error(e)) | Action::Reply(ServerMessage::Error(e)) => {
            Some(e.code)
        }
        _ => None,
    }
}

#[test]
fn a_recovery_limit_applies_to_the_first_join() {
    let w = World::new();
    secret_token(&w, "tok", 0, RecoveryMode::Standard);
    let e = Device::new()
        .join(&w, "tok", Some(SECRET), false)
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::RecoveryLimitExceeded);
    assert!(w.token("tok").status.registration_secret_hash.is_some());
}

// ---- Cases B and C ------------------------------------------------------------------------

#[test]
fn b_a_certificate_holder_cannot_join_an_unbound_token() {
    let w = World::new();
    let mut d = registered(&w, 1, RecoveryMode::Standard);
    // A second, unbound token for the same bot; the device presents its certificate to it.
    let (t, _) = new_bound_keypair_token(
        NewBoundKeypairToken {
            name: Some("tok".into()),
            bot_name: "robot".into(),
            ..Default::default()
        },
        w.now,
    )
    .unwrap();
    w.store.delete_token("tok").unwrap();
    w.add_token(&t);
    let e = d.renew(&w, "tok").unwrap_err();
    assert_eq!(e.code, ErrorCode::AccessDenied);
    let errs: Vec<_> = w
        .audit(event::BOT_JOIN)
        .into_iter()
        .filter_map(|e| e.error)
        .collect();
    assert!(errs[0].contains("no bound key"), "{errs:?}");
}

/// Issue 8 defect 12: before authentication, case C used to answer with a message naming the
/// stored state. Now the caller hears what an unknown token hears; the reason is audited.
#[test]
fn c_a_bound_key_without_bound_instance_is_refused_generically_and_audited() {
    let w = World::new();
    let mut d = registered(&w, 2, RecoveryMode::Standard);
    let mut t = w.token("tok");
    t.status.bound_instance_id = None;
    w.store.delete_token("tok").unwrap();
    w.add_token(&t);
    let e = d.recover(&w, "tok").unwrap_err();
    let unknown = Device::new().recover(&w, "no-such-token").unwrap_err();
    assert_eq!(e, unknown, "indistinguishable from any other refusal");
    let errors: Vec<_> = w
        .audit(event::BOT_JOIN)
        .into_iter()
        .filter_map(|e| e.error)
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("case C") && e.contains("recreate")),
        "{errors:?}"
    );
}

// ---- Case D: renewal ----------------------------------------------------------------------

#[test]
fn d_renewal_keeps_the_instance_and_increments_the_generation() {
    let mut w = World::new();
    let mut d = registered(&w, 1, RecoveryMode::Standard);
    let first = d.last.clone().unwrap();
    for g in 2..=4 {
        w.advance(60);
        let r = d.renew(&w, "tok").unwrap();
        assert_eq!(r.instance_id, first.instance_id);
        assert_eq!(r.generation, g);
    }
    let t = w.token("tok");
    assert_eq!(t.status.recovery_count, 1, "renewals consume no recovery");
    let inst = w.store.get_instance(&first.instance_id).unwrap().unwrap();
    assert_eq!(inst.status.generation, 4);
    assert_eq!(inst.status.latest_authentications.len(), 4);
}

#[test]
fn d_instance_keeps_at_most_ten_recent_authentications_and_the_initial_one() {
    let mut w = World::new();
    let mut d = registered(&w, 1, RecoveryMode::Standard);
    for _ in 0..12 {
        w.advance(10);
        d.renew(&w, "tok").unwrap();
    }
    let inst = w
        .store
        .get_instance(&d.last.as_ref().unwrap().instance_id)
        .unwrap()
        .unwrap();
    assert_eq!(inst.status.latest_authentications.len(), 10);
    assert_eq!(
        inst.status
            .initial_authentication
            .as_ref()
            .unwrap()
            .generation,
        1
    );
    assert_eq!(inst.status.latest_authentications[0].generation, 4);
}

#[test]
fn d_renewal_with_a_certificate_of_another_instance_is_refused() {
    let w = World::new();
    let mut d = registered(&w, 3, RecoveryMode::Insecure);
    let mut other = d.clone();
    // `other` recovers (new instance, new bound instance id); `d` keeps the old certificate.
    other.recover(&w, "tok").unwrap();
    let e = d.renew(&w, "tok").unwrap_err();
    assert_eq!(e.code, ErrorCode::AccessDenied);
}

// ---- Case E: recovery ---------------------------------------------------------------------

#[test]
fn e_recovery_creates_a_linked_instance_and_consumes_a_recovery() {
    let mut w = World::new();
    let mut d = registered(&w, 2, RecoveryMode::Standard);
    let old = d.last.clone().unwrap();
    w.advance(7200); // certificate expired while offline
    let r = d.recover(&w, "tok").unwrap();
    assert_ne!(r.instance_id, old.instance_id);
    assert_eq!(r.generation, 1);
    let inst = w.store.get_instance(&r.instance_id).unwrap().unwrap();
    assert_eq!(
        inst.spec.previous_instance_id.as_deref(),
        Some(old.instance_id.as_str())
    );
    let t = w.token("tok");
    assert_eq!(t.status.recovery_count, 2);
    assert_eq!(
        t.status.bound_instance_id.as_deref(),
        Some(r.instance_id.as_str())
    );
    assert_eq!(t.status.last_recovered_at, Some(w.now));
}

#[test]
fn e_standard_mode_refuses_when_no_recoveries_are_left_and_raising_the_limit_fixes_it() {
    let w = World::new();
    let mut d = registered(&w, 1, RecoveryMode::Standard);
    let e = d.recover(&w, "tok").unwrap_err();
    assert_eq!(e.code, ErrorCode::RecoveryLimitExceeded);
    assert_eq!(w.token("tok").status.recovery_count, 1);
    let mut t = w.token("tok");
    t.spec.bound_keypair.as_mut().unwrap().recovery.limit = 2;
    w.store
        .update_token_spec("tok", &t.spec, t.revision)
        .unwrap();
    d.recover(&w, "tok").unwrap();
    assert_eq!(w.token("tok").status.recovery_count, 2);
}

#[test]
fn e_relaxed_mode_ignores_the_limit_but_still_verifies_join_state() {
    let w = World::new();
    let mut d = registered(&w, 1, RecoveryMode::Relaxed);
    for n in 2..=4 {
        d.recover(&w, "tok").unwrap();
        assert_eq!(w.token("tok").status.recovery_count, n);
    }
    d.join_state = None;
    assert_eq!(
        d.recover(&w, "tok").unwrap_err().code,
        ErrorCode::AccessDenied
    );
}

#[test]
fn e_insecure_mode_ignores_limit_and_join_state() {
    let w = World::new();
    let mut d = registered(&w, 1, RecoveryMode::Insecure);
    d.join_state = Some("garbage".into());
    d.recover(&w, "tok").unwrap();
    d.join_state = None;
    d.recover(&w, "tok").unwrap();
    assert_eq!(w.token("tok").status.recovery_count, 3);
    assert!(w.locks().is_empty());
}

// ---- Rotation -----------------------------------------------------------------------------

#[test]
fn rotation_requested_by_an_admin_changes_the_key_at_the_next_renewal_only() {
    let mut w = World::new();
    let mut d = registered(&w, 1, RecoveryMode::Standard);
    let before = ssh(&d.bound);
    w.advance(10);
    let t = w.token("tok");
    let spec = request_rotation(&t, w.now).unwrap();
    w.store.update_token_spec("tok", &spec, t.revision).unwrap();
    w.advance(10);
    let requests = d.rotation_requests;
    let r = d.renew(&w, "tok").unwrap();
    assert_eq!(d.rotation_requests, requests + 1);
    assert_ne!(ssh(&d.bound), before);
    assert_eq!(r.bound_public_key.as_deref(), Some(ssh(&d.bound).as_str()));
    let t = w.token("tok");
    assert_eq!(t.status.last_rotated_at, Some(w.now));
    assert_eq!(
        t.status.recovery_count, 1,
        "a rotation consumes no recovery"
    );
    assert_eq!(
        w.store.list_instances(None).unwrap().len(),
        1,
        "and creates no instance"
    );
    let ev = &w.audit(event::ROTATION)[0];
    assert_eq!(ev.fields["old_public_key"], before.as_str());
    w.advance(10);
    d.renew(&w, "tok").unwrap();
    assert_eq!(d.rotation_requests, requests + 1, "not due any more");
}

#[test]
fn rotation_refuses_a_reused_key_and_changes_nothing() {
    let mut w = World::new();
    let mut d = registered(&w, 1, RecoveryMode::Standard);
    let t = w.token("tok");
    let spec = request_rotation(&t, w.now + 1).unwrap();
    w.store.update_token_spec("tok", &spec, t.revision).unwrap();
    w.advance(5);
    d.on_rotation = OnRotation::ReuseKey;
    let gen_before = d.last.as_ref().unwrap().generation;
    let e = d.renew(&w, "tok").unwrap_err();
    assert_eq!(e.code, ErrorCode::AccessDenied);
    assert!(e.message.contains("differ"), "{}", e.message);
    let t = w.token("tok");
    assert!(t.status.last_rotated_at.is_none());
    let inst = w
        .store
        .get_instance(&d.last.as_ref().unwrap().instance_id)
        .unwrap()
        .unwrap();
    assert_eq!(inst.status.generation, gen_before);
    d.on_rotation = OnRotation::NewKey;
    d.renew(&w, "tok").unwrap();
    assert!(w.token("tok").status.last_rotated_at.is_some());
}

#[test]
fn rotation_due_during_registration_is_satisfied_by_the_registration_key() {
    let mut w = World::new();
    let t = secret_token(&w, "tok", 1, RecoveryMode::Standard);
    let spec = request_rotation(&t, w.now).unwrap();
    w.store.update_token_spec("tok", &spec, 1).unwrap();
    w.advance(1);
    let mut d = Device::new();
    d.join(&w, "tok", Some(SECRET), false).unwrap();
    assert_eq!(d.rotation_requests, 1, "one fresh key serves both");
    let t = w.token("tok");
    assert_eq!(t.status.last_rotated_at, Some(w.now));
    assert!(!t.rotation_due(w.now));
    w.advance(10);
    d.renew(&w, "tok").unwrap();
    assert_eq!(d.rotation_requests, 1);
}

// ---- Join state ---------------------------------------------------------------------------

/// A join-state document signed by the service's real join-state key, for bot `robot`, with
/// the given instance and sequence: only the claim checks can refuse it.
fn signed_join_state(w: &World, instance_id: &str, recovery_sequence: u32) -> String {
    let claims = JoinStateClaims {
        iss: "test-cluster".into(),
        aud: "test-cluster".into(),
        sub: "robot".into(),
        iat: w.now,
        nbf: w.now,
        instance_id: instance_id.into(),
        recovery_sequence,
        recovery_limit: 3,
        recovery_mode: RecoveryMode::Standard,
    };
    let a = boundkey_auth::authority::Authority::load(&w.state).unwrap();
    a.sign_join_state(&claims, w.now).unwrap()
}

fn join_state_refusal(w: &World, d: &mut Device) {
    let e = d.recover(w, "tok").unwrap_err();
    assert_eq!(e.code, ErrorCode::AccessDenied);
    assert_eq!(w.locks().len(), 1, "one join_token lock");
    assert_eq!(w.locks()[0].target, LockTarget::JoinToken("tok".into()));
    assert_eq!(w.audit(event::JOIN_STATE_VERIFICATION_FAILED).len(), 1);
}

#[test]
fn join_state_missing_is_a_plain_refusal() {
    let w = World::new();
    let mut d = registered(&w, 3, RecoveryMode::Standard);
    d.join_state = None;
    assert_eq!(
        d.recover(&w, "tok").unwrap_err().code,
        ErrorCode::AccessDenied
    );
    assert!(w.locks().is_empty());
    assert!(w.audit(event::JOIN_STATE_VERIFICATION_FAILED).is_empty());
}

#[test]
fn join_state_garbage_from_the_key_holder_locks_the_token() {
    let w = World::new();
    let mut d = registered(&w, 3, RecoveryMode::Standard);
    d.join_state = Some("not.a.jws".into());
    join_state_refusal(&w, &mut d);
}

#[test]
fn join_state_with_a_wrong_signature_locks_the_token() {
    let w = World::new();
    let mut d = registered(&w, 3, RecoveryMode::Standard);
    // Same claims and kid, signed by a key the service never had.
    let real = d.join_state.clone().unwrap();
    let header_kid = jws::parse(&real).unwrap().header.kid;
    let ca_key = {
        use p256::pkcs8::DecodePrivateKey;
        p256::SecretKey::from_pkcs8_pem(&w.state.join_state[0].key_pem)
            .unwrap()
            .public_key()
    };
    let payload = jws::verify(&real, &ca_key).unwrap().1;
    d.join_state = Some(jws::sign(&new_key(), header_kid.as_deref(), &payload));
    join_state_refusal(&w, &mut d);
}

#[test]
fn join_state_with_an_old_recovery_sequence_is_a_clone_and_locks_the_token() {
    let w = World::new();
    let mut d = registered(&w, 5, RecoveryMode::Standard);
    let mut clone = d.clone();
    d.recover(&w, "tok").unwrap(); // recovery_count 2; the clone still holds sequence 1
    join_state_refusal(&w, &mut clone);
}

#[test]
fn join_state_naming_another_instance_locks_the_token() {
    let w = World::new();
    let mut d = registered(&w, 3, RecoveryMode::Standard);
    let t = w.token("tok");
    d.join_state = Some(signed_join_state(
        &w,
        "00000000-0000-4000-8000-000000000000",
        t.status.recovery_count,
    ));
    join_state_refusal(&w, &mut d);
}

#[test]
fn join_state_signed_by_a_rotated_out_key_fails_after_the_grace_period() {
    let mut w = World::new();
    let mut d = registered(&w, 5, RecoveryMode::Standard);
    w.rotate(CaKind::JoinState, 600);
    let mut within = d.clone();
    w.advance(599);
    within
        .recover(&w, "tok")
        .expect("old key still trusted inside the grace period");
    // `within` now holds a document from the new key; `d`'s is from the retired key.
    let mut w2 = w;
    w2.advance(2);
    let mut t = w2.token("tok");
    // Put the token back to what `d`'s document describes, so only the key is wrong.
    t.status.recovery_count = 1;
    t.status.bound_instance_id = Some(d.last.as_ref().unwrap().instance_id.clone());
    w2.store.delete_token("tok").unwrap();
    w2.add_token(&t);
    join_state_refusal(&w2, &mut d);
}

#[test]
fn a_client_renewing_through_both_ca_rotations_never_fails() {
    let mut w = World::new();
    let mut d = registered(&w, 1, RecoveryMode::Standard);
    d.ttl = 600;
    for step in 0..12 {
        w.advance(300);
        if step == 2 {
            w.rotate(CaKind::Identity, 900);
        }
        if step == 5 {
            w.rotate(CaKind::JoinState, 900);
        }
        d.renew(&w, "tok")
            .unwrap_or_else(|e| panic!("renewal {step} failed: {e:?}"));
    }
    assert!(w.locks().is_empty());
    // After both grace periods the device holds material from the new keys only.
    let a = boundkey_auth::authority::Authority::load(&w.state).unwrap();
    assert_eq!(a.identity_roots(w.now).len(), 1);
    assert!(a
        .verify_join_state(d.join_state.as_ref().unwrap(), w.now)
        .is_ok());
}

// ---- Ordering rules -----------------------------------------------------------------------

#[test]
fn rule3_stolen_key_recovery_is_caught_by_the_legitimate_renewal_with_exactly_one_lock() {
    let mut w = World::new();
    let mut device = registered(&w, 3, RecoveryMode::Standard);
    // The thief copies the key and join state (no certificate) and recovers.
    let mut thief = device.clone();
    thief.cert = None;
    thief.recover(&w, "tok").unwrap();
    assert!(w.locks().is_empty());
    w.advance(60);
    // The real device renews with its certificate: its join state is now stale.
    let e = device.renew(&w, "tok").unwrap_err();
    assert_eq!(e.code, ErrorCode::AccessDenied);
    assert_eq!(w.locks().len(), 1);
    // Later attempts, by either party, are refused as locked and add no lock.
    assert_eq!(device.renew(&w, "tok").unwrap_err().code, ErrorCode::Locked);
    assert_eq!(thief.renew(&w, "tok").unwrap_err().code, ErrorCode::Locked);
    assert_eq!(w.locks().len(), 1);
}

#[test]
fn rule1_a_locked_client_retrying_twenty_times_produces_exactly_one_lock() {
    let w = World::new();
    let mut d = registered(&w, 20, RecoveryMode::Standard);
    let mut clone = d.clone();
    d.recover(&w, "tok").unwrap();
    let first = clone.recover(&w, "tok").unwrap_err();
    assert_eq!(first.code, ErrorCode::AccessDenied);
    for _ in 0..20 {
        assert_eq!(
            clone.recover(&w, "tok").unwrap_err().code,
            ErrorCode::Locked
        );
    }
    assert_eq!(w.locks().len(), 1);
    assert_eq!(w.audit(event::LOCK_CREATED).len(), 1);
}

#[test]
fn rule1_lock_status_is_not_revealed_before_the_proof() {
    let w = World::new();
    let d = registered(&w, 3, RecoveryMode::Standard);
    w.store
        .add_lock(&Lock {
            name: "l".into(),
            target: LockTarget::Bot("robot".into()),
            message: "x".into(),
            expires: None,
            created_by: "t".into(),
            created_at: w.now,
        })
        .unwrap();
    // An anonymous caller gets a challenge, not "locked".
    let (_, a) = w.svc.open(d.connection(false), init_msg(&d, "tok"), w.now);
    assert!(
        matches!(a, Action::Reply(ServerMessage::Challenge(_))),
        "{a:?}"
    );
    let mut d = d;
    assert_eq!(d.recover(&w, "tok").unwrap_err().code, ErrorCode::Locked);
}

#[test]
fn rule2_garbage_join_state_from_a_client_without_the_key_creates_no_lock() {
    let w = World::new();
    let d = registered(&w, 3, RecoveryMode::Standard);
    let mut anon = Device::new();
    anon.join_state = Some("garbage.garbage.garbage".into());
    for _ in 0..5 {
        let (mut s, a) = w
            .svc
            .open(anon.connection(false), init_msg(&anon, "tok"), w.now);
        let Action::Reply(ServerMessage::Challenge(c)) = a else {
            panic!("{a:?}")
        };
        let a = s.handle(
            solution(jws::sign(&anon.bound, None, c.document.as_bytes())),
            w.now,
        );
        assert_eq!(err_code(&a), Some(ErrorCode::AccessDenied));
    }
    assert!(w.locks().is_empty());
    assert!(w.audit(event::JOIN_STATE_VERIFICATION_FAILED).is_empty());
    let _ = d;
}

#[test]
fn generation_mismatch_locks_the_token() {
    let mut w = World::new();
    // Insecure mode: no join state, so only the generation counter can catch the copy.
    let mut d = registered(&w, 1, RecoveryMode::Insecure);
    let mut copy = d.clone();
    w.advance(10);
    d.renew(&w, "tok").unwrap();
    let e = copy.renew(&w, "tok").unwrap_err();
    assert_eq!(e.code, ErrorCode::AccessDenied);
    assert_eq!(w.locks().len(), 1);
    assert_eq!(w.locks()[0].target, LockTarget::JoinToken("tok".into()));
    assert_eq!(w.audit(event::GENERATION_MISMATCH).len(), 1);
    assert_eq!(d.renew(&w, "tok").unwrap_err().code, ErrorCode::Locked);
}

#[test]
fn rule4_two_concurrent_ceremonies_on_one_token_commit_at_most_once() {
    let w = World::new();
    let d = registered(&w, 5, RecoveryMode::Standard);
    let before = w.token("tok");
    let (mut a, a0) = w.svc.open(d.connection(false), init_msg(&d, "tok"), w.now);
    let (mut b, b0) = w.svc.open(d.connection(false), init_msg(&d, "tok"), w.now);
    let sign = |act: &Action| {
        let Action::Reply(ServerMessage::Challenge(c)) = act else {
            panic!("{act:?}")
        };
        solution(jws::sign(&d.bound, None, c.document.as_bytes()))
    };
    let (sa, sb) = (sign(&a0), sign(&b0));
    let ra = a.handle(sa, w.now);
    let rb = b.handle(sb, w.now);
    assert!(
        matches!(ra, Action::Close(ServerMessage::Result(_))),
        "{ra:?}"
    );
    assert_eq!(err_code(&rb), Some(ErrorCode::Conflict));
    assert!(ErrorCode::Conflict.is_retryable());
    let after = w.token("tok");
    assert_eq!(
        after.status.recovery_count,
        before.status.recovery_count + 1
    );
    assert_eq!(after.revision, before.revision + 1);
    let Action::Close(ServerMessage::Result(r)) = ra else {
        unreachable!()
    };
    assert_eq!(
        after.status.bound_instance_id.as_deref(),
        Some(r.instance_id.as_str())
    );
    assert_eq!(
        w.store.list_instances(None).unwrap().len(),
        2,
        "first + one recovery, none from the loser"
    );
}

// ---- Challenges ---------------------------------------------------------------------------

#[test]
fn a_challenge_solved_after_its_window_is_refused_and_one_inside_is_accepted() {
    let mut w = World::new();
    let d = registered(&w, 5, RecoveryMode::Standard);
    for (delay, ok) in [(61, false), (60, true)] {
        let (mut s, a) = w.svc.open(d.connection(false), init_msg(&d, "tok"), w.now);
        let Action::Reply(ServerMessage::Challenge(c)) = a else {
            panic!()
        };
        let sol = solution(jws::sign(&d.bound, None, c.document.as_bytes()));
        let a = s.handle(sol, w.now + delay);
        assert_eq!(
            matches!(a, Action::Close(ServerMessage::Result(_))),
            ok,
            "delay {delay}: {a:?}"
        );
        w.advance(1);
    }
}

#[test]
fn a_replayed_solution_is_refused_in_the_same_and_in_a_new_ceremony() {
    let w = World::new();
    let mut d = registered(&w, 5, RecoveryMode::Standard);
    let (mut s, a) = w.svc.open(d.connection(false), init_msg(&d, "tok"), w.now);
    let Action::Reply(ServerMessage::Challenge(c)) = a else {
        panic!()
    };
    let sol = jws::sign(&d.bound, None, c.document.as_bytes());
    assert!(matches!(
        s.handle(solution(sol.clone()), w.now),
        Action::Close(ServerMessage::Result(_))
    ));
    assert_eq!(
        err_code(&s.handle(solution(sol.clone()), w.now)),
        Some(ErrorCode::BadRequest)
    );
    // Refresh the device's join state to the one just issued so only the replay is wrong.
    d.join_state = None;
    let t = w.token("tok");
    let (mut s2, a2) = w.svc.open(d.connection(false), init_msg(&d, "tok"), w.now);
    assert!(matches!(a2, Action::Reply(ServerMessage::Challenge(_))));
    assert_eq!(
        err_code(&s2.handle(solution(sol), w.now)),
        Some(ErrorCode::AccessDenied)
    );
    assert_eq!(w.token("tok").revision, t.revision);
}

#[test]
fn unexpected_messages_end_the_ceremony_without_changes() {
    let w = World::new();
    let d = registered(&w, 5, RecoveryMode::Standard);
    let before = w.token("tok");
    let (mut s, _) = w.svc.open(d.connection(false), init_msg(&d, "tok"), w.now);
    let a = s.handle(init_msg(&d, "tok"), w.now);
    assert_eq!(err_code(&a), Some(ErrorCode::BadRequest));
    assert_eq!(w.token("tok"), before);
}

#[test]
fn an_unknown_token_and_an_expired_token_are_refused() {
    let mut w = World::new();
    assert_eq!(
        Device::new()
            .join(&w, "nope", Some(SECRET), false)
            .unwrap_err()
            .code,
        ErrorCode::AccessDenied
    );
    let (mut t, _) = new_bound_keypair_token(
        NewBoundKeypairToken {
            name: Some("short".into()),
            bot_name: "robot".into(),
            registration_secret: Some(SECRET.into()),
            expires: Some(w.now + 10),
            ..Default::default()
        },
        w.now,
    )
    .unwrap();
    t.revision = 0;
    w.add_token(&t);
    w.advance(10);
    assert_eq!(
        Device::new()
            .join(&w, "short", Some(SECRET), false)
            .unwrap_err()
            .code,
        ErrorCode::AccessDenied
    );
}

#[test]
fn identity_certificates_from_another_authority_are_refused() {
    let w = World::new();
    let mut d = registered(&w, 1, RecoveryMode::Standard);
    let other = AuthorityState::generate("test-cluster", w.now).unwrap();
    let a = boundkey_auth::authority::Authority::load(&other).unwrap();
    let claims = boundkey_auth::authority::IdentityClaims {
        cluster: "test-cluster".into(),
        bot_name: "robot".into(),
        instance_id: d.last.as_ref().unwrap().instance_id.clone(),
        generation: 1,
        join_method: boundkey_proto::JoinMethod::BoundKeypair,
        join_token: "tok".into(),
    };
    let pk = p256::PublicKey::from(d.identity.verifying_key());
    d.cert = Some(
        a.issue_identity(&claims, &pk, 600, w.now)
            .unwrap()
            .certificate_pem,
    );
    assert_eq!(
        d.renew(&w, "tok").unwrap_err().code,
        ErrorCode::AccessDenied
    );
}

#[test]
fn join_state_with_a_stale_sequence_for_the_bound_instance_locks_the_token() {
    let w = World::new();
    let mut d = registered(&w, 3, RecoveryMode::Standard);
    let t = w.token("tok");
    // Everything right (signer, instance) except the sequence: only that check can refuse it.
    d.join_state = Some(signed_join_state(
        &w,
        t.status.bound_instance_id.as_deref().unwrap(),
        t.status.recovery_count - 1,
    ));
    join_state_refusal(&w, &mut d);
}

// ---- Redelivery: a result lost after the commit --------------------------------------------

fn assert_no_locks_and_recoveries(w: &World, recoveries: u32) {
    assert!(w.locks().is_empty(), "{:?}", w.locks());
    assert_eq!(w.token("tok").status.recovery_count, recoveries);
}

#[test]
fn redelivery_after_a_lost_first_join_even_at_the_recovery_limit() {
    let w = World::new();
    secret_token(&w, "tok", 1, RecoveryMode::Standard);
    let mut d = Device::new();
    d.join_lost(&w, "tok", Some(SECRET), false);
    let lost = w.token("tok");
    // The device retries with what it persisted: the pending key and in-flight identity key.
    let r = d.join(&w, "tok", Some(SECRET), false).unwrap();
    assert_eq!(
        Some(r.instance_id.as_str()),
        lost.status.bound_instance_id.as_deref()
    );
    assert_eq!(r.generation, 2);
    assert_eq!(ssh(&d.bound), lost.status.bound_public_key.unwrap());
    assert_no_locks_and_recoveries(&w, 1);
    assert_eq!(w.store.list_instances(None).unwrap().len(), 1);
    d.renew(&w, "tok").unwrap();
}

#[test]
fn redelivery_after_a_lost_renewal_does_not_trip_the_generation_lock() {
    let mut w = World::new();
    let mut d = registered(&w, 1, RecoveryMode::Standard);
    w.advance(60);
    d.join_lost(&w, "tok", None, true);
    let r = d.renew(&w, "tok").unwrap();
    assert_eq!(r.generation, 3);
    assert_no_locks_and_recoveries(&w, 1);
    let ev = w.audit(event::BOT_JOIN);
    assert_eq!(ev[0].fields["case"], "redelivery");
}

#[test]
fn redelivery_after_a_lost_recovery_continues_the_new_instance() {
    let mut w = World::new();
    let mut d = registered(&w, 2, RecoveryMode::Standard);
    w.advance(7200);
    d.join_lost(&w, "tok", None, false);
    let lost = w.token("tok");
    let r = d.recover(&w, "tok").unwrap();
    assert_eq!(
        Some(r.instance_id.as_str()),
        lost.status.bound_instance_id.as_deref()
    );
    assert_eq!(r.generation, 2);
    assert_no_locks_and_recoveries(&w, 2);
    d.renew(&w, "tok").unwrap();
}

#[test]
fn redelivery_after_a_lost_rotation_binds_the_pending_key() {
    let mut w = World::new();
    let mut d = registered(&w, 1, RecoveryMode::Standard);
    w.advance(10);
    let t = w.token("tok");
    let spec = request_rotation(&t, w.now).unwrap();
    w.store.update_token_spec("tok", &spec, t.revision).unwrap();
    w.advance(10);
    d.join_lost(&w, "tok", None, true);
    let pending = d
        .pending
        .clone()
        .expect("rotation key persisted before it was sent");
    assert_eq!(
        w.token("tok").status.bound_public_key.unwrap(),
        ssh(&pending)
    );
    d.renew(&w, "tok").unwrap();
    assert_eq!(ssh(&d.bound), ssh(&pending));
    assert_no_locks_and_recoveries(&w, 1);
}

#[test]
fn no_redelivery_without_the_identity_proof() {
    let mut w = World::new();
    let mut d = registered(&w, 1, RecoveryMode::Standard);
    w.advance(60);
    d.join_lost(&w, "tok", None, true);
    d.prove_identity = false;
    assert_eq!(
        d.renew(&w, "tok").unwrap_err().code,
        ErrorCode::AccessDenied
    );
    assert_eq!(
        w.locks().len(),
        1,
        "an old-generation certificate is a copy"
    );
}

/// Issue 8 defect 11: heartbeats used to feed the redelivery decision (a heartbeat with the new
/// certificate made a retry count as a clone). They are reports and decide nothing now: a copy
/// that shares the in-flight identity key of one renewal cannot be told from the device
/// retrying, so it is redelivered; the two copies then collide on the generation counter at
/// the next renewal, which locks the token.
#[test]
fn heartbeats_do_not_decide_redelivery_and_a_copy_sharing_one_renewal_is_caught_next() {
    let mut w = World::new();
    let mut d = registered(&w, 1, RecoveryMode::Standard);
    w.advance(60);
    let mut rolled_back = d.clone();
    rolled_back.in_flight = Some(new_key());
    let identity = rolled_back.in_flight.clone().unwrap();
    d.in_flight = Some(identity);
    d.renew(&w, "tok").unwrap();
    w.advance(1);
    let hb = boundkey_proto::Heartbeat {
        is_startup: true,
        version: "test".into(),
        hostname: "device".into(),
        uptime_secs: 1,
        os: "linux".into(),
        arch: "x86_64".into(),
        one_shot: false,
        keystore: boundkey_proto::KeyBackend::File,
    };
    let a = w
        .svc
        .open(d.connection(true), ClientMessage::Heartbeat(hb), w.now)
        .1;
    assert!(
        matches!(a, Action::Close(ServerMessage::HeartbeatAck(_))),
        "{a:?}"
    );
    rolled_back
        .renew(&w, "tok")
        .expect("the heartbeat does not turn a retry into a refusal");
    assert!(w.locks().is_empty());
    w.advance(1);
    assert_eq!(
        d.renew(&w, "tok").unwrap_err().code,
        ErrorCode::AccessDenied
    );
    assert_eq!(w.locks().len(), 1);
    assert_eq!(w.audit(event::GENERATION_MISMATCH).len(), 1);
}

#[test]
fn a_clone_from_before_a_lost_ceremony_is_still_locked() {
    let mut w = World::new();
    let mut d = registered(&w, 3, RecoveryMode::Standard);
    let mut clone = d.clone();
    w.advance(7200);
    d.join_lost(&w, "tok", None, false);
    // The clone holds the same bound key and join state but not the in-flight identity key.
    assert_eq!(
        clone.recover(&w, "tok").unwrap_err().code,
        ErrorCode::AccessDenied
    );
    assert_eq!(w.locks().len(), 1);
    assert_eq!(d.recover(&w, "tok").unwrap_err().code, ErrorCode::Locked);
}

#[test]
fn no_redelivery_with_a_join_state_more_than_one_step_old() {
    let mut w = World::new();
    let mut d = registered(&w, 3, RecoveryMode::Standard);
    let old_instance = d.last.as_ref().unwrap().instance_id.clone();
    w.advance(7200);
    d.join_lost(&w, "tok", None, false);
    // Right predecessor instance, wrong sequence: only the one-step rule can refuse it.
    d.join_state = Some(signed_join_state(&w, &old_instance, 0));
    assert_eq!(
        d.recover(&w, "tok").unwrap_err().code,
        ErrorCode::AccessDenied
    );
    assert_eq!(w.locks().len(), 1);
}

// ---- Issue 8: the ceremony and the audit log under attack ---------------------------------

/// Opens a ceremony and returns its session with the first challenge, answered later.
fn open_until_challenge(
    w: &World,
    d: &mut Device,
    token: &str,
    use_cert: bool,
) -> (boundkey_auth::service::Session, ClientMessage) {
    let identity = new_key();
    d.in_flight = Some(identity.clone());
    let init = ClientMessage::Init(boundkey_proto::Init {
        token: token.into(),
        params: boundkey_proto::BotParams {
            identity_public_key: boundkey_proto::keys::pkix_b64(&p256::PublicKey::from(
                identity.verifying_key(),
            )),
            ttl_secs: 600,
        },
        registration_secret: None,
        join_state: d.join_state.clone(),
    });
    let (session, action) = w.svc.open(d.connection(use_cert), init, w.now);
    let Action::Reply(m @ ServerMessage::Challenge(_)) = action else {
        panic!("expected a challenge, got {action:?}");
    };
    let answer = d.answer(&m).unwrap();
    (session, answer)
}

/// Defect 7: locks were read once, at `Init`; one placed while the client solved its
/// challenge did not stop the commit.
#[test]
fn a_lock_added_between_challenge_and_solution_stops_the_commit() {
    for target in [
        LockTarget::Bot("robot".into()),
        LockTarget::JoinToken("tok".into()),
    ] {
        let mut w = World::new();
        let mut d = registered(&w, 1, RecoveryMode::Standard);
        w.advance(10);
        let before = w.token("tok");
        let (mut session, answer) = open_until_challenge(&w, &mut d, "tok", true);
        w.store
            .add_lock(&Lock {
                name: "ops".into(),
                target: target.clone(),
                message: "incident".into(),
                expires: None,
                created_by: "admin".into(),
                created_at: w.now,
            })
            .unwrap();
        let a = session.handle(answer, w.now);
        assert_eq!(err_code(&a), Some(ErrorCode::Locked), "{target:?}: {a:?}");
        assert_eq!(w.token("tok"), before, "nothing committed");
        let errs: Vec<_> = w
            .audit(event::BOT_JOIN)
            .into_iter()
            .filter_map(|e| e.error)
            .collect();
        assert!(
            errs[0].contains("locked by ops") && errs[0].contains("during the ceremony"),
            "{errs:?}"
        );
    }
}

/// Defect 9: a lock that merely had the automatic lock's name (expired, another target)
/// suppressed the clone lock.
#[test]
fn a_lock_squatting_the_automatic_name_does_not_suppress_the_clone_lock() {
    let mut w = World::new();
    let mut d = registered(&w, 1, RecoveryMode::Insecure);
    w.store
        .add_lock(&Lock {
            name: "auto-generation-tok".into(),
            target: LockTarget::Bot("someone-else".into()),
            message: "old".into(),
            expires: Some(w.now + 1),
            created_by: "admin".into(),
            created_at: w.now,
        })
        .unwrap();
    let mut copy = d.clone();
    w.advance(10);
    d.renew(&w, "tok").unwrap();
    assert_eq!(
        copy.renew(&w, "tok").unwrap_err().code,
        ErrorCode::AccessDenied
    );
    let on_token: Vec<_> = w
        .locks()
        .into_iter()
        .filter(|l| l.target == LockTarget::JoinToken("tok".into()) && l.is_active(w.now))
        .collect();
    assert_eq!(on_token.len(), 1, "{:?}", w.locks());
    assert_eq!(w.audit(event::LOCK_CREATED).len(), 1);
    assert_eq!(d.renew(&w, "tok").unwrap_err().code, ErrorCode::Locked);
    // The same copy trying again adds no second lock.
    assert_eq!(copy.renew(&w, "tok").unwrap_err().code, ErrorCode::Locked);
    assert_eq!(w.locks().len(), 2, "the squatter and one clone lock");
}

/// Defect 10: a token deleted while its ceremony ran made the commit answer `internal` and
/// left no audit record.
#[test]
fn a_token_deleted_mid_ceremony_gets_a_final_answer_and_is_audited() {
    let mut w = World::new();
    let mut d = registered(&w, 1, RecoveryMode::Standard);
    w.advance(10);
    let (mut session, answer) = open_until_challenge(&w, &mut d, "tok", true);
    w.store.delete_token("tok").unwrap();
    let a = session.handle(answer, w.now);
    let code = err_code(&a).expect("an error");
    assert_eq!(code, ErrorCode::AccessDenied, "{a:?}");
    assert!(!code.is_retryable());
    let errs: Vec<_> = w
        .audit(event::BOT_JOIN)
        .into_iter()
        .filter_map(|e| e.error)
        .collect();
    assert!(
        errs[0].contains("token tok was deleted during the ceremony"),
        "{errs:?}"
    );
}

fn request_rotation_now(w: &World) {
    let t = w.token("tok");
    let spec = request_rotation(&t, w.now).unwrap();
    w.store.update_token_spec("tok", &spec, t.revision).unwrap();
}

/// Defect 11: a rotation could bind a key the token was bound to earlier.
#[test]
fn a_rotation_cannot_bring_back_a_retired_key() {
    let mut w = World::new();
    let mut d = registered(&w, 1, RecoveryMode::Standard);
    let first = d.bound.clone();
    w.advance(10);
    request_rotation_now(&w);
    w.advance(10);
    d.renew(&w, "tok").unwrap();
    assert_ne!(ssh(&d.bound), ssh(&first));
    w.advance(10);
    request_rotation_now(&w);
    w.advance(10);
    d.next_rotation_key = Some(first);
    let before = w.token("tok");
    assert_eq!(
        d.renew(&w, "tok").unwrap_err().code,
        ErrorCode::AccessDenied
    );
    assert_eq!(w.token("tok"), before, "nothing committed");
    let errs: Vec<_> = w
        .audit(event::BOT_JOIN)
        .into_iter()
        .filter_map(|e| e.error)
        .collect();
    assert!(errs[0].contains("retired"), "{errs:?}");
    // A genuinely new key still rotates.
    d.renew(&w, "tok").unwrap();
}

/// Defect 11: redelivery trusted that the client made a fresh identity key. A device that
/// renews with the identity key it already had gives a copy of it everything a retry has; the
/// server now knows the key was certified before and refuses the copy as a clone.
#[test]
fn no_redelivery_for_an_identity_key_certified_before() {
    let mut w = World::new();
    let mut d = registered(&w, 1, RecoveryMode::Standard);
    let mut copy = d.clone();
    w.advance(60);
    d.in_flight = Some(d.identity.clone());
    d.renew(&w, "tok").unwrap();
    copy.in_flight = Some(copy.identity.clone());
    assert_eq!(
        copy.renew(&w, "tok").unwrap_err().code,
        ErrorCode::AccessDenied
    );
    assert_eq!(w.locks().len(), 1, "the copy is caught at once");
    assert_eq!(w.audit(event::GENERATION_MISMATCH).len(), 1);
}

fn raw_init(token: &str, secret: Option<&str>) -> ClientMessage {
    ClientMessage::Init(boundkey_proto::Init {
        token: token.into(),
        params: boundkey_proto::BotParams {
            identity_public_key: boundkey_proto::keys::pkix_b64(&p256::PublicKey::from(
                new_key().verifying_key(),
            )),
            ttl_secs: 600,
        },
        registration_secret: secret.map(str::to_string),
        join_state: None,
    })
}

fn conn_from(addr: &str) -> boundkey_auth::service::Connection {
    boundkey_auth::service::Connection {
        remote_addr: addr.into(),
        peer_certificates: vec![],
    }
}

/// Defect 6: the unauthenticated token name went into the audit log before validation
/// (newlines and escapes forged rows, 60 KB names filled the store).
#[test]
fn a_malformed_token_name_is_refused_before_it_reaches_the_audit_log() {
    let w = World::new();
    for name in [
        "tok\nID 1 forged row".to_string(),
        "\u{1b}[2J\u{1b}[31mred".to_string(),
        "x".repeat(60_000),
        String::new(),
    ] {
        let a = w
            .svc
            .open(conn_from("198.51.100.1:1"), raw_init(&name, None), w.now)
            .1;
        assert_eq!(err_code(&a), Some(ErrorCode::BadRequest), "{a:?}");
    }
    let events = w.audit(event::BOT_JOIN);
    assert_eq!(events.len(), 4);
    for e in events {
        assert_eq!(e.token_name, None, "{e:?}");
        assert_eq!(e.error.as_deref(), Some("malformed token name"));
    }
}

/// Defect 6: anonymous failures were audited without limit. Now at most the burst per
/// address is written, then one per second, and a summary says how many were dropped.
#[test]
fn anonymous_failures_are_rate_limited_per_address_with_a_dropped_summary() {
    let mut w = World::new();
    let burst = boundkey_auth::throttle::Limits::default()
        .anonymous_audit_per_address
        .burst as usize;
    for port in 0..100 {
        let a = w
            .svc
            .open(
                conn_from(&format!("203.0.113.9:{port}")),
                raw_init("no-such-token", None),
                w.now,
            )
            .1;
        assert_eq!(err_code(&a), Some(ErrorCode::AccessDenied));
    }
    assert_eq!(w.audit(event::BOT_JOIN).len(), burst);
    // Another address is not held up by the first.
    w.svc.open(
        conn_from("192.0.2.200:1"),
        raw_init("no-such-token", None),
        w.now,
    );
    assert_eq!(w.audit(event::BOT_JOIN).len(), burst + 1);
    w.advance(1);
    w.svc.open(
        conn_from("203.0.113.9:1"),
        raw_init("no-such-token", None),
        w.now,
    );
    let dropped = w.audit(event::AUDIT_DROPPED);
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0].fields["dropped"], 100 - burst);
    assert_eq!(dropped[0].remote_addr.as_deref(), Some("203.0.113.9"));
    assert_eq!(w.audit(event::BOT_JOIN).len(), burst + 2);
}

/// Defect 6: heartbeat strings were stored as sent.
#[test]
fn heartbeat_strings_are_stored_without_control_characters() {
    let w = World::new();
    let d = registered(&w, 1, RecoveryMode::Standard);
    let hb = boundkey_proto::Heartbeat {
        is_startup: true,
        version: "1.0\r\nID  TIME  forged".into(),
        hostname: "host\u{1b}]0;pwned\u{7}".into(),
        uptime_secs: 1,
        os: "linux\u{202e}xunil".into(),
        arch: "é".repeat(300),
        one_shot: false,
        keystore: boundkey_proto::KeyBackend::File,
    };
    let a = w
        .svc
        .open(d.connection(true), ClientMessage::Heartbeat(hb), w.now)
        .1;
    assert!(
        matches!(a, Action::Close(ServerMessage::HeartbeatAck(_))),
        "{a:?}"
    );
    let id = &d.last.as_ref().unwrap().instance_id;
    let inst = w.store.get_instance(id).unwrap().unwrap();
    let got = &inst.status.latest_heartbeats[0].heartbeat;
    for s in [&got.version, &got.hostname, &got.os, &got.arch] {
        assert!(!s.chars().any(|c| c.is_control()), "{s:?}");
        assert!(
            s.len() <= boundkey_auth::heartbeat::MAX_FIELD_LEN,
            "{}",
            s.len()
        );
    }
    assert!(!got.os.contains('\u{202e}'));
}

/// Defect 6: audit events were kept forever.
#[test]
fn audit_events_past_the_retention_period_are_purged() {
    let mut w = World::with_config(boundkey_auth::ServiceConfig {
        audit_retention_secs: 600,
        ..Default::default()
    });
    Device::new().recover(&w, "no-such-token").unwrap_err();
    assert_eq!(w.audit(event::BOT_JOIN).len(), 1);
    w.advance(boundkey_auth::service::AUDIT_PURGE_EVERY_SECS);
    Device::new().recover(&w, "no-such-token").unwrap_err();
    let left = w.audit(event::BOT_JOIN);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].time, w.now);
}

/// Defect 8: wrong registration secrets were not throttled (514 guesses/s).
#[test]
fn wrong_registration_secrets_are_throttled_per_token_with_the_same_answer() {
    let mut w = World::new();
    secret_token(&w, "tok", 1, RecoveryMode::Standard);
    let limits = boundkey_auth::throttle::Limits::default();
    let wrong = Device::new()
        .join(&w, "tok", Some("not the secret at all"), false)
        .unwrap_err();
    for _ in 1..limits.secret_per_token.burst {
        Device::new()
            .join(&w, "tok", Some("not the secret at all"), false)
            .unwrap_err();
    }
    // Now even the right secret gets the answer a wrong one gets.
    let throttled = Device::new()
        .join(&w, "tok", Some(SECRET), false)
        .unwrap_err();
    assert_eq!(throttled, wrong);
    assert!(w.token("tok").status.registration_secret_hash.is_some());
    let errors: Vec<_> = w
        .audit(event::BOT_JOIN)
        .into_iter()
        .filter_map(|e| e.error)
        .collect();
    assert!(errors[0].contains("throttled"), "{errors:?}");
    // The budget comes back with time.
    w.advance(limits.secret_per_token.every_secs);
    Device::new()
        .join(&w, "tok", Some(SECRET), false)
        .expect("the right secret after the pause");
}

/// Defect 8, per address: spreading guesses over many tokens does not escape the throttle.
#[test]
fn wrong_registration_secrets_are_throttled_per_address() {
    let w = World::new();
    let limits = boundkey_auth::throttle::Limits::default();
    let n = limits.secret_per_address.burst;
    for i in 0..n {
        secret_token(&w, &format!("t{i}"), 1, RecoveryMode::Standard);
        Device::new()
            .join(&w, &format!("t{i}"), Some("not the secret at all"), false)
            .unwrap_err();
    }
    secret_token(&w, "fresh", 1, RecoveryMode::Standard);
    let e = Device::new()
        .join(&w, "fresh", Some(SECRET), false)
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::AccessDenied);
    // From another address the same token opens.
    let mut other = Device::new();
    let init = raw_init("fresh", Some(SECRET));
    let (mut s, mut a) = w.svc.open(conn_from("198.51.100.77:9"), init, w.now);
    while let Action::Reply(m) = &a {
        let next = other.answer(m).unwrap();
        a = s.handle(next, w.now);
    }
    assert!(
        matches!(a, Action::Close(ServerMessage::Result(_))),
        "{a:?}"
    );
}

// ---- Key attestation (protocol.md §5.6): what needs no TPM ----------------------------------
// The TPM side (valid attestations and every check) is in attest-tests/tests/attestation.rs.

fn tpm_mode() -> boundkey_auth::model::AttestationSpec {
    boundkey_auth::model::AttestationSpec {
        mode: boundkey_auth::model::AttestationMode::Tpm,
        ek_ca_bundle: None,
        ek_allow: vec!["ab".repeat(32)],
    }
}

fn set_attestation(w: &World, name: &str, att: boundkey_auth::model::AttestationSpec) {
    let t = w.token(name);
    let mut spec = t.spec.clone();
    spec.bound_keypair.as_mut().unwrap().attestation = att;
    w.store.update_token_spec(name, &spec, t.revision).unwrap();
}

/// Records every server message a device answers, to see which challenges asked to attest.
fn challenges_asking(
    w: &World,
    d: &mut Device,
    token: &str,
    secret: Option<&str>,
    cert: bool,
) -> (Vec<bool>, Option<ErrorCode>) {
    let identity = harness::new_key();
    d.in_flight = Some(identity.clone());
    let init = d.init(&identity, token, secret);
    let (mut s, mut a) = w.svc.open(d.connection(cert), init, w.now);
    let mut asked = Vec::new();
    loop {
        match a {
            Action::Reply(ServerMessage::Challenge(ref c)) => {
                asked.push(c.attest);
                let next = d.answer(&ServerMessage::Challenge(c.clone())).unwrap();
                a = s.handle(next, w.now);
            }
            Action::Reply(m) => {
                let next = d.answer(&m).unwrap();
                a = s.handle(next, w.now);
            }
            Action::Close(ServerMessage::Error(e)) => return (asked, Some(e.code)),
            Action::Close(ServerMessage::Result(r)) => {
                d.absorb(&r);
                return (asked, None);
            }
            Action::Close(other) => panic!("{other:?}"),
        }
    }
}

#[test]
fn attestation_is_required_of_a_registration_key_and_a_software_key_is_refused_without_a_lock() {
    let w = World::new();
    secret_token(&w, "tok", 1, RecoveryMode::Standard);
    set_attestation(&w, "tok", tpm_mode());
    // The harness device is a file-backed agent: it ignores `attest`.
    let (asked, code) = challenges_asking(&w, &mut Device::new(), "tok", Some(SECRET), false);
    assert_eq!(asked, vec![true]);
    assert_eq!(code, Some(ErrorCode::AttestationRequired));
    let evs = w.audit(event::ATTESTATION_FAILED);
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].fields["reason"], "attestation_required");
    assert_eq!(evs[0].token_name.as_deref(), Some("tok"));
    let t = w.token("tok");
    assert!(t.status.bound_public_key.is_none());
    assert!(
        t.status.registration_secret_hash.is_some(),
        "the secret is not used up"
    );
    assert!(w.locks().is_empty());
}

#[test]
fn attestation_is_required_of_a_pre_registered_key_at_first_join_only() {
    let w = World::new();
    let mut d = Device::new();
    let (t, _) = new_bound_keypair_token(
        NewBoundKeypairToken {
            name: Some("pre".into()),
            bot_name: "robot".into(),
            initial_public_key: Some(ssh(&d.bound)),
            attestation: Some(tpm_mode()),
            ..Default::default()
        },
        w.now,
    )
    .unwrap();
    w.add_token(&t);
    let (asked, code) = challenges_asking(&w, &mut d, "pre", None, false);
    assert_eq!(
        (asked, code),
        (vec![true], Some(ErrorCode::AttestationRequired))
    );
}

#[test]
fn attestation_is_not_asked_of_a_bound_key_but_of_a_rotation_key() {
    let mut w = World::new();
    let mut d = registered(&w, 1, RecoveryMode::Standard);
    // Switched on after registration: renewals prove the bound key as before.
    set_attestation(&w, "tok", tpm_mode());
    let (asked, code) = challenges_asking(&w, &mut d, "tok", None, true);
    assert_eq!((asked, code), (vec![false], None));
    let before = w.token("tok").status.bound_public_key;
    // A rotation's new key must be attested; a software key is refused and the old key kept.
    let t = w.token("tok");
    let spec = request_rotation(&t, w.now + 1).unwrap();
    w.store.update_token_spec("tok", &spec, t.revision).unwrap();
    w.advance(5);
    let (asked, code) = challenges_asking(&w, &mut d, "tok", None, true);
    assert_eq!(asked, vec![false, true]);
    assert_eq!(code, Some(ErrorCode::AttestationRequired));
    assert_eq!(w.token("tok").status.bound_public_key, before);
    assert!(w.locks().is_empty());
}

#[test]
fn editing_the_attestation_spec_keeps_the_recorded_ek() {
    let w = World::new();
    let (mut t, _) = new_bound_keypair_token(
        NewBoundKeypairToken {
            name: Some("tok".into()),
            bot_name: "robot".into(),
            attestation: Some(tpm_mode()),
            ..Default::default()
        },
        w.now,
    )
    .unwrap();
    // As an attested registration leaves it (status is written by ceremonies only).
    let ek = boundkey_auth::model::EkIdentity {
        ek_sha256: "cd".repeat(32),
        certificate: None,
    };
    t.status.ek_identity = Some(ek.clone());
    w.add_token(&t);
    set_attestation(&w, "tok", boundkey_auth::model::AttestationSpec::default());
    set_attestation(&w, "tok", tpm_mode());
    assert_eq!(w.token("tok").status.ek_identity, Some(ek));
}
