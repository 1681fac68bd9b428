//! The auth crate's `Service` driven by hand over the real SQLite store: two ceremonies on one
//! token interleaved step by step. Exactly one commits; the other gets `conflict` and leaves
//! nothing behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use boundkey_auth::admin::{new_bound_keypair_token, NewBoundKeypairToken};
use boundkey_auth::authority::{Authority, AuthorityState};
use boundkey_auth::model::Bot;
use boundkey_auth::service::{Action, Connection, Service};
use boundkey_auth::store::{AuditQuery, Store};
use boundkey_auth::ServiceConfig;
use boundkey_proto::keys::pkix_b64;
use boundkey_proto::{
    jws, ssh_public_key, BotParams, ChallengeSolution, ClientMessage, ErrorCode, Init,
    ServerMessage,
};
use boundkey_server::store::SqliteStore;

const NOW: i64 = 1_800_000_000;

fn init(token: &str) -> ClientMessage {
    let identity = p256::SecretKey::random(&mut rand_core::OsRng);
    ClientMessage::Init(Init {
        token: token.into(),
        params: BotParams {
            identity_public_key: pkix_b64(&identity.public_key()),
            ttl_secs: 3600,
        },
        registration_secret: None,
        join_state: None,
    })
}

fn solve(action: &Action, key: &p256::ecdsa::SigningKey) -> ClientMessage {
    match action {
        Action::Reply(ServerMessage::Challenge(c)) => {
            ClientMessage::ChallengeSolution(ChallengeSolution {
                solution: jws::sign(key, None, c.document.as_bytes()),
                identity_proof: None,
                attestation: None,
            })
        }
        other => panic!("expected a challenge, got {other:?}"),
    }
}

fn conn(addr: &str) -> Connection {
    Connection {
        remote_addr: addr.into(),
        peer_certificates: vec![],
    }
}

#[test]
fn two_interleaved_ceremonies_on_one_token_commit_once() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<SqliteStore> =
        Arc::new(SqliteStore::open(dir.path().join("boundkey.db")).unwrap());
    let state = AuthorityState::generate("c1", NOW).unwrap();
    store.save_authority(&state, None).unwrap();
    let authority = Arc::new(Authority::load(&state).unwrap());
    store
        .create_bot(&Bot {
            name: "robot".into(),
            created_at: NOW,
        })
        .unwrap();
    // A pre-registered key: both copies of a cloned device hold it.
    let key = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng);
    let public = ssh_public_key(&p256::PublicKey::from(key.verifying_key()));
    let (token, _) = new_bound_keypair_token(
        NewBoundKeypairToken {
            name: Some("dev-1".into()),
            bot_name: "robot".into(),
            initial_public_key: Some(public.clone()),
            recovery_limit: Some(5),
            ..Default::default()
        },
        NOW,
    )
    .unwrap();
    store.create_token(&token).unwrap();
    let audit_before = store.list_audit(&AuditQuery::default()).unwrap().len();

    let svc = Service::new(store.clone(), authority, ServiceConfig::default());
    // Both open and both get a challenge before either answers.
    let (mut a, a1) = svc.open(conn("10.0.0.1:1"), init("dev-1"), NOW);
    let (mut b, b1) = svc.open(conn("10.0.0.2:2"), init("dev-1"), NOW);
    let a_sol = solve(&a1, &key);
    let b_sol = solve(&b1, &key);

    let a_done = a.handle(a_sol, NOW + 1);
    let first = match a_done {
        Action::Close(ServerMessage::Result(r)) => r,
        other => panic!("first solver should win: {other:?}"),
    };
    match b.handle(b_sol, NOW + 1) {
        Action::Close(ServerMessage::Error(e)) => assert_eq!(e.code, ErrorCode::Conflict),
        other => panic!("second solver must lose the race: {other:?}"),
    }

    // Exactly one new instance, and the token reflects only the winner.
    let instances = store.list_instances(None).unwrap();
    assert_eq!(instances.len(), 1, "{instances:?}");
    assert_eq!(instances[0].spec.instance_id, first.instance_id);
    let t = store.get_token("dev-1").unwrap().unwrap();
    assert_eq!(t.revision, 2);
    assert_eq!(
        t.status.bound_instance_id.as_deref(),
        Some(first.instance_id.as_str())
    );
    assert_eq!(t.status.bound_public_key.as_deref(), Some(public.as_str()));
    assert_eq!(t.status.recovery_count, 1);
    // The loser is audited as a failed join; nothing else of its ceremony was written.
    let audit = store.list_audit(&AuditQuery::default()).unwrap();
    let new: Vec<_> = audit.iter().take(audit.len() - audit_before).collect();
    assert!(
        new.iter().any(|e| e.kind == "bot.join" && !e.success),
        "{new:?}"
    );
    assert_eq!(
        new.iter()
            .filter(|e| e.kind == "bot.join" && e.success)
            .count(),
        1,
        "{new:?}"
    );

    // Both sessions are finished: further messages do not touch the store.
    let rev = store.get_token("dev-1").unwrap().unwrap().revision;
    assert!(matches!(b.handle(init("dev-1"), NOW + 2), Action::Close(_)));
    assert!(matches!(a.handle(init("dev-1"), NOW + 2), Action::Close(_)));
    assert_eq!(store.get_token("dev-1").unwrap().unwrap().revision, rev);
}
