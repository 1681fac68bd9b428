//! The `token` join method and heartbeats, through the real `Service`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use boundkey_auth::admin::new_join_token;
use boundkey_auth::model::{event, LockTarget};
use boundkey_auth::service::{Action, Connection};
use boundkey_auth::store::Store;
use boundkey_proto::{
    keys, BotParams, ClientMessage, ErrorCode, Heartbeat, JoinResult, ServerMessage, TokenJoin,
};
use harness::*;
use p256::ecdsa::SigningKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

struct Agent {
    identity: SigningKey,
    cert: Option<String>,
}

impl Agent {
    fn new() -> Self {
        Agent {
            identity: new_key(),
            cert: None,
        }
    }

    fn conn(&self) -> Connection {
        Connection {
            remote_addr: "198.51.100.1:1".into(),
            peer_certificates: self
                .cert
                .iter()
                .map(|p| CertificateDer::from_pem_slice(p.as_bytes()).unwrap())
                .collect(),
        }
    }

    fn send(&mut self, w: &World, token: Option<&str>) -> Result<JoinResult, ErrorCode> {
        let msg = ClientMessage::TokenJoin(TokenJoin {
            token: token.map(str::to_string),
            params: BotParams {
                identity_public_key: keys::pkix_b64(&p256::PublicKey::from(
                    self.identity.verifying_key(),
                )),
                ttl_secs: 600,
            },
        });
        match w.svc.open(self.conn(), msg, w.now).1 {
            Action::Close(ServerMessage::Result(r)) => {
                self.cert = Some(r.certificate.clone());
                Ok(r)
            }
            Action::Close(ServerMessage::Error(e)) => Err(e.code),
            other => panic!("{other:?}"),
        }
    }

    fn heartbeat(&self, w: &World) -> Action {
        let hb = Heartbeat {
            is_startup: true,
            version: "0.1.0".into(),
            hostname: "h".repeat(1000),
            uptime_secs: 5,
            os: "linux".into(),
            arch: "x86_64".into(),
            one_shot: false,
            keystore: boundkey_proto::KeyBackend::File,
        };
        w.svc
            .open(self.conn(), ClientMessage::Heartbeat(hb), w.now)
            .1
    }
}

#[test]
fn token_joins_up_to_max_joins_each_creating_an_instance() {
    let w = World::new();
    let (t, secret) = new_join_token("robot", Some(2), None, false, w.now).unwrap();
    w.add_token(&t);
    let a = Agent::new().send(&w, Some(&secret)).unwrap();
    let b = Agent::new().send(&w, Some(&secret)).unwrap();
    assert_ne!(a.instance_id, b.instance_id);
    assert_eq!(
        Agent::new().send(&w, Some(&secret)).unwrap_err(),
        ErrorCode::AccessDenied
    );
    assert_eq!(w.token(&t.name).status.join_count, 2);
    assert_eq!(w.store.list_instances(None).unwrap().len(), 2);
    // The secret never appears in the audit log; the token name there is masked.
    let audit = serde_json::to_string(&w.audit(event::BOT_JOIN)).unwrap();
    assert!(!audit.contains(&secret) && !audit.contains(&t.name));
}

#[test]
fn token_expiry_and_wrong_secret_are_refused() {
    let mut w = World::new();
    let (t, secret) = new_join_token("robot", None, Some(60), false, w.now).unwrap();
    w.add_token(&t);
    assert_eq!(
        Agent::new().send(&w, Some("wrong")).unwrap_err(),
        ErrorCode::AccessDenied
    );
    w.advance(60);
    assert_eq!(
        Agent::new().send(&w, Some(&secret)).unwrap_err(),
        ErrorCode::AccessDenied
    );
}

#[test]
fn token_renewal_increments_generation_and_a_copy_locks_the_instance() {
    let mut w = World::new();
    let (t, secret) = new_join_token("robot", None, Some(120), false, w.now).unwrap();
    w.add_token(&t);
    let mut a = Agent::new();
    let first = a.send(&w, Some(&secret)).unwrap();
    // Renewals need no token, even after it expired (the certificate lives 600 s).
    w.advance(300);
    assert_eq!(
        a.send(&w, Some(&secret)).unwrap_err(),
        ErrorCode::BadRequest
    );
    let mut copy = Agent {
        identity: a.identity.clone(),
        cert: a.cert.clone(),
    };
    let r = a.send(&w, None).unwrap();
    assert_eq!(
        (r.instance_id.as_str(), r.generation),
        (first.instance_id.as_str(), 2)
    );
    assert_eq!(copy.send(&w, None).unwrap_err(), ErrorCode::AccessDenied);
    let locks = w.locks();
    assert_eq!(locks.len(), 1);
    assert_eq!(
        locks[0].target,
        LockTarget::BotInstanceId(first.instance_id.clone())
    );
    assert_eq!(w.audit(event::GENERATION_MISMATCH).len(), 1);
    assert_eq!(a.send(&w, None).unwrap_err(), ErrorCode::Locked);
    assert_eq!(w.locks().len(), 1);
}

#[test]
fn heartbeats_are_recorded_on_the_callers_own_instance_only() {
    let w = World::new();
    let (t, secret) = new_join_token("robot", Some(2), None, false, w.now).unwrap();
    w.add_token(&t);
    let mut a = Agent::new();
    let ra = a.send(&w, Some(&secret)).unwrap();
    let rb = Agent::new().send(&w, Some(&secret)).unwrap();
    for _ in 0..12 {
        assert_eq!(
            a.heartbeat(&w),
            Action::Close(ServerMessage::HeartbeatAck(Default::default()))
        );
    }
    let ia = w.store.get_instance(&ra.instance_id).unwrap().unwrap();
    let ib = w.store.get_instance(&rb.instance_id).unwrap().unwrap();
    assert!(ia.status.initial_heartbeat.is_some());
    assert_eq!(ia.status.latest_heartbeats.len(), 10);
    assert_eq!(
        ia.status.latest_heartbeats[0].heartbeat.hostname.len(),
        256,
        "clipped"
    );
    assert!(ib.status.initial_heartbeat.is_none());
    // Without a certificate there is no instance to record on.
    let anon = Agent::new();
    assert!(
        matches!(anon.heartbeat(&w), Action::Close(ServerMessage::Error(e)) if e.code == ErrorCode::AccessDenied)
    );
}

/// Issue 8 defect 7, token method: the join is decided on a snapshot of the locks; its commit
/// carries the lock targets, so a lock placed after the snapshot still stops it.
#[test]
fn a_token_join_decided_before_a_lock_does_not_commit_after_it() {
    use boundkey_auth::input::{Peer, Snapshot};
    use boundkey_auth::model::Lock;
    use boundkey_auth::outcome::Step;
    use boundkey_auth::store::StoreError;
    let w = World::new();
    let (t, secret) = new_join_token("robot", None, None, false, w.now).unwrap();
    w.add_token(&t);
    let snapshot = Snapshot {
        token: Some(w.token(&t.name)),
        ..Default::default()
    };
    let msg = TokenJoin {
        token: Some(secret),
        params: BotParams {
            identity_public_key: keys::pkix_b64(&p256::PublicKey::from(new_key().verifying_key())),
            ttl_secs: 600,
        },
    };
    let peer = Peer {
        remote_addr: "198.51.100.1:1".into(),
        identity: None,
    };
    let step = boundkey_auth::token_join::decide(
        &w.svc.config(),
        &w.svc.authority(),
        &boundkey_auth::Entropy::os(),
        &peer,
        snapshot,
        msg,
        w.now,
    );
    let Step::Commit(success) = step else {
        panic!("expected a commit, got {step:?}");
    };
    w.store
        .add_lock(&Lock {
            name: "ops".into(),
            target: LockTarget::Bot("robot".into()),
            message: "incident".into(),
            expires: None,
            created_by: "admin".into(),
            created_at: w.now,
        })
        .unwrap();
    assert!(matches!(
        w.store.commit(&success.commit),
        Err(StoreError::Locked(name)) if name == "ops"
    ));
    assert!(w.store.list_instances(None).unwrap().is_empty());
    assert_eq!(w.token(&t.name).status.join_count, 0);
}
