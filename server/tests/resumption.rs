//! TLS session resumption for heartbeats, end to end: a real boundkey-authd, real TLS, a real
//! SQLite file. A heartbeat may resume the session of an earlier connection; what it may do
//! then is bounded by the rules of docs/decisions.md ("Heartbeats resume their TLS session"),
//! one test each:
//! * the instance comes only from the certificate the server verified in the full handshake
//!   the ticket came from, verified again at every use;
//! * a resumed session does not outlive that certificate's validity, nor its CA's trust;
//! * locks apply to a resumed heartbeat like to any other;
//! * ceremonies never run on a resumed session.
//!
//! Heartbeats written together (group commit) each get their own answer and record.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use boundkey_auth::model::{BotInstance, HeartbeatRecord};
use boundkey_auth::store::{Commit, InstanceWrite, Store, StoreError};
use boundkey_proto::{
    BotParams, ClientMessage, ErrorCode, Heartbeat, Init, JoinMethod, KeyBackend, ServerMessage,
};
use boundkey_server::store::SqliteStore;
use common::*;
use rustls::HandshakeKind;

const T: Duration = Duration::from_secs(30);

fn heartbeat(n: u64) -> Heartbeat {
    Heartbeat {
        is_startup: n == 0,
        version: format!("hb-{n}"),
        hostname: "device".into(),
        uptime_secs: n,
        os: "linux".into(),
        arch: "x86_64".into(),
        one_shot: false,
        keystore: KeyBackend::File,
    }
}

/// Sends one message on a new connection made with `config` (which keeps its sessions, so a
/// second call resumes the first's); returns the answer and the kind of handshake made.
async fn exchange(
    s: &Server,
    config: &Arc<rustls::ClientConfig>,
    msg: ClientMessage,
) -> (ServerMessage, HandshakeKind) {
    let mut conn = connect(s.addr, config.clone()).await;
    let kind = conn.get_ref().1.handshake_kind().expect("handshake done");
    send(&mut conn, &msg).await;
    let answer = recv_within(&mut conn, T).await.expect("an answer");
    (answer, kind)
}

/// A device that joined, and a TLS configuration with its identity that keeps sessions.
async fn joined(s: &Server, ttl_secs: u64) -> (Agent, Arc<rustls::ClientConfig>) {
    s.ctl(&["bots", "add", "robot"]);
    let mut agent = s.new_device("robot");
    agent.ttl_secs = ttl_secs;
    agent.join().await.expect("join");
    // `client_config` keeps rustls's default in-memory session cache.
    let config = s.client_config(Some((agent.cert_pem.as_deref().unwrap(), &agent.identity)));
    (agent, config)
}

fn instance_id(agent: &Agent) -> String {
    agent.last.as_ref().unwrap().instance_id.clone()
}

fn heartbeats_recorded(s: &Server, id: &str) -> usize {
    s.ctl(&["instances", "show", id])["latest_heartbeats"]
        .as_array()
        .unwrap()
        .len()
}

fn error_code(m: &ServerMessage) -> Option<ErrorCode> {
    match m {
        ServerMessage::Error(e) => Some(e.code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_resume_and_ceremonies_on_a_resumed_session_are_refused() {
    let s = Server::start();
    let (mut agent, config) = joined(&s, 3600).await;
    let id = instance_id(&agent);

    let (a, kind) = exchange(&s, &config, ClientMessage::Heartbeat(heartbeat(0))).await;
    assert!(matches!(a, ServerMessage::HeartbeatAck(_)), "{a:?}");
    assert_eq!(kind, HandshakeKind::Full);
    for n in 1..3 {
        let (a, kind) = exchange(&s, &config, ClientMessage::Heartbeat(heartbeat(n))).await;
        assert!(matches!(a, ServerMessage::HeartbeatAck(_)), "{a:?}");
        assert_eq!(kind, HandshakeKind::Resumed, "heartbeat {n}");
    }
    // Recorded on the instance named by the certificate of the original handshake.
    assert_eq!(heartbeats_recorded(&s, &id), 3);

    // A renewal on a resumed session: refused before the service sees it.
    let generation = agent.last.as_ref().unwrap().generation;
    let init = ClientMessage::Init(Init {
        token: agent.token.clone(),
        params: agent.params(),
        registration_secret: None,
        join_state: agent.join_state.clone(),
    });
    let (a, kind) = exchange(&s, &config, init).await;
    assert_eq!(kind, HandshakeKind::Resumed);
    assert_eq!(error_code(&a), Some(ErrorCode::BadRequest), "{a:?}");
    assert!(s
        .log()
        .contains("ceremony on a resumed TLS session refused"));
    // So is a token join (the other ceremony a first message can start).
    let tj = ClientMessage::TokenJoin(boundkey_proto::TokenJoin {
        token: None,
        params: BotParams {
            identity_public_key: agent.params().identity_public_key,
            ttl_secs: 3600,
        },
    });
    let (a, _) = exchange(&s, &config, tj).await;
    assert_eq!(error_code(&a), Some(ErrorCode::BadRequest), "{a:?}");
    // Nothing of it was recorded: the next renewal (full handshake) continues the generation.
    let r = agent.join().await.expect("renewal with a full handshake");
    assert_eq!(r.generation, generation + 1);
    assert_eq!(r.instance_id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_does_not_outlive_its_certificate() {
    let s = Server::start_with(&["--min-cert-ttl", "1s"]);
    let (agent, config) = joined(&s, 3).await;
    let id = instance_id(&agent);
    let (a, kind) = exchange(&s, &config, ClientMessage::Heartbeat(heartbeat(0))).await;
    assert!(matches!(a, ServerMessage::HeartbeatAck(_)), "{a:?}");
    assert_eq!(kind, HandshakeKind::Full);
    let expires = agent.last.as_ref().unwrap().expires;
    while boundkey_server::now() <= expires {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The ticket is still good for TLS; the certificate it carries is not.
    let (a, kind) = exchange(&s, &config, ClientMessage::Heartbeat(heartbeat(1))).await;
    assert_eq!(kind, HandshakeKind::Resumed);
    assert_eq!(error_code(&a), Some(ErrorCode::AccessDenied), "{a:?}");
    assert_eq!(heartbeats_recorded(&s, &id), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_stops_at_a_lock_and_at_the_end_of_its_cas_trust() {
    let s = Server::start();
    let (agent, config) = joined(&s, 3600).await;
    let id = instance_id(&agent);
    let (a, _) = exchange(&s, &config, ClientMessage::Heartbeat(heartbeat(0))).await;
    assert!(matches!(a, ServerMessage::HeartbeatAck(_)), "{a:?}");

    s.ctl(&["locks", "add", "--instance", &id, "--name", "hold"]);
    let (a, kind) = exchange(&s, &config, ClientMessage::Heartbeat(heartbeat(1))).await;
    assert_eq!(kind, HandshakeKind::Resumed);
    assert_eq!(error_code(&a), Some(ErrorCode::Locked), "{a:?}");
    s.ctl(&["locks", "rm", "hold"]);
    let (a, kind) = exchange(&s, &config, ClientMessage::Heartbeat(heartbeat(2))).await;
    assert_eq!(kind, HandshakeKind::Resumed);
    assert!(matches!(a, ServerMessage::HeartbeatAck(_)), "{a:?}");

    // The identity CA that signed the certificate stops being trusted when its grace period
    // ends: a session resumed from before is refused from then on.
    s.ctl(&["ca", "rotate", "--type", "identity", "--grace-period", "1s"]);
    let (a, kind) = exchange(&s, &config, ClientMessage::Heartbeat(heartbeat(3))).await;
    assert_eq!(kind, HandshakeKind::Resumed);
    assert!(
        matches!(a, ServerMessage::HeartbeatAck(_)),
        "still trusted in the grace period: {a:?}"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (a, kind) = exchange(&s, &config, ClientMessage::Heartbeat(heartbeat(4))).await;
    assert_eq!(kind, HandshakeKind::Resumed);
    assert_eq!(error_code(&a), Some(ErrorCode::AccessDenied), "{a:?}");
    assert_eq!(heartbeats_recorded(&s, &id), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_heartbeats_are_each_acknowledged_and_recorded() {
    let s = Server::start();
    s.ctl(&["bots", "add", "fleet"]);
    let mut devices = Vec::new();
    for _ in 0..8 {
        let mut a = s.new_device("fleet");
        a.join().await.unwrap();
        devices.push(Arc::new(a));
    }
    // Four rounds of eight at once: the writes of one round overlap and are grouped.
    for round in 0..4u64 {
        let tasks: Vec<_> = devices
            .iter()
            .map(|a| {
                let a = a.clone();
                tokio::spawn(async move { a.heartbeat(heartbeat(round)).await })
            })
            .collect();
        for t in tasks {
            let a = t.await.unwrap();
            assert!(matches!(a, ServerMessage::HeartbeatAck(_)), "{a:?}");
        }
    }
    for a in &devices {
        assert_eq!(heartbeats_recorded(&s, &instance_id(a)), 4);
    }
}

/// The SQLite store's grouped write: one transaction, and a result per update.
#[test]
fn sqlite_writes_a_group_of_heartbeats_with_a_result_each() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("b.db")).unwrap();
    let mut stored = Vec::new();
    for n in 0..3 {
        let i = BotInstance::new("bot", JoinMethod::BoundKeypair, &format!("t{n}"), None, 1);
        store
            .commit(&Commit {
                token: None,
                instance: InstanceWrite::Create(i.clone()),
                audit: vec![],
                lock_guard: None,
            })
            .unwrap();
        stored.push(store.get_instance(&i.spec.instance_id).unwrap().unwrap());
    }
    let with_heartbeat = |i: &BotInstance, n: u64| {
        let mut i = i.clone();
        i.record_heartbeat(HeartbeatRecord {
            recorded_at: 2,
            remote_addr: "127.0.0.1:1".into(),
            heartbeat: heartbeat(n),
        });
        i
    };
    let gone = BotInstance::new("bot", JoinMethod::BoundKeypair, "gone", None, 1);
    let results = store.update_instances(&[
        (with_heartbeat(&stored[0], 0), stored[0].revision),
        // A stale revision: this one alone fails, as its own compare-and-swap.
        (with_heartbeat(&stored[1], 1), stored[1].revision + 1),
        (with_heartbeat(&gone, 9), 1),
        (with_heartbeat(&stored[2], 2), stored[2].revision),
    ]);
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(matches!(results[1], Err(StoreError::Conflict(_))));
    assert!(matches!(results[2], Err(StoreError::NotFound(_))));
    assert!(results[3].is_ok(), "{:?}", results[3]);
    let after: Vec<BotInstance> = stored
        .iter()
        .map(|i| store.get_instance(&i.spec.instance_id).unwrap().unwrap())
        .collect();
    assert_eq!(after[0].status.latest_heartbeats.len(), 1);
    assert_eq!(after[0].revision, stored[0].revision + 1);
    assert_eq!(after[1].status.latest_heartbeats.len(), 0);
    assert_eq!(after[1].revision, stored[1].revision);
    assert_eq!(after[2].status.latest_heartbeats.len(), 1);
}
