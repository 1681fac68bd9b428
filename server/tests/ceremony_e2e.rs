//! End-to-end: a real boundkey-authd process, real TLS, real SQLite file, and the test agent in
//! `common` performing real ceremonies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use boundkey_proto::{ErrorCode, Heartbeat, JoinMethod, JoinUri, ServerMessage};
use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

fn add_bot(s: &Server, name: &str) {
    s.ctl(&["bots", "add", name]);
}

fn show_token(s: &Server, name: &str) -> Value {
    s.ctl(&["tokens", "show", name])
}

fn show_instance(s: &Server, id: &str) -> Value {
    s.ctl(&["instances", "show", id])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_renewal_and_recovery() {
    let s = Server::start();
    add_bot(&s, "robot");
    let (token, secret, added) = s.add_bk_token("robot", &["--name", "dev-1"]);
    let secret = secret.expect("a generated registration secret");
    // The join URI is ready to paste: token, secret, listener address and CA pin.
    let uri: JoinUri = added["join_uri"].as_str().unwrap().parse().unwrap();
    assert_eq!(uri.method, JoinMethod::BoundKeypair);
    assert_eq!(uri.token, "dev-1");
    assert_eq!(uri.registration_secret.as_deref(), Some(secret.as_str()));
    assert_eq!(uri.endpoint.port, s.addr.port());
    assert_eq!(uri.ca_pin.unwrap().to_string(), s.ca_pin);

    let t = show_token(&s, &token);
    assert_eq!(t["registration_secret_pending"], true);
    assert_eq!(t["bound_public_key"], Value::Null);
    assert_eq!(t["recovery_count"], 0);
    assert!(t.get("registration_secret_hash").is_none());

    // A: first join with the secret (the server asks for a fresh key first).
    let mut agent = Agent::new(&s, &token, Some(&secret));
    let r1 = agent.join().await.expect("registration");
    assert_eq!((r1.generation, r1.bot_name.as_str()), (1, "robot"));
    let bound1 = ssh(agent.bound.as_ref().unwrap());
    assert_eq!(r1.bound_public_key.as_deref(), Some(bound1.as_str()));
    assert!(r1.join_state.is_some());
    let t = show_token(&s, &token);
    assert_eq!(t["bound_public_key"], bound1.as_str());
    assert_eq!(t["bound_instance_id"], r1.instance_id.as_str());
    assert_eq!(t["recovery_count"], 1, "a first join counts as a recovery");
    assert_eq!(t["registration_secret_pending"], false);
    assert!(t["last_recovered_at"].is_i64());
    let i = show_instance(&s, &r1.instance_id);
    assert_eq!(
        (i["generation"].as_u64(), i["state"].as_str()),
        (Some(1), Some("active"))
    );
    assert_eq!(i["bot_name"], "robot");
    assert_eq!(i["join_method"], "bound_keypair");

    // The secret was single-use.
    let mut thief = Agent::new(&s, &token, Some(&secret));
    let e = thief
        .join()
        .await
        .expect_err("a used secret must not work again");
    assert_eq!(e.code, ErrorCode::AccessDenied);

    // D: renewal over mTLS: same instance, generation + 1, no recovery consumed.
    let r2 = agent.join().await.expect("renewal");
    assert_eq!(r2.instance_id, r1.instance_id);
    assert_eq!(r2.generation, 2);
    let t = show_token(&s, &token);
    assert_eq!(t["recovery_count"], 1);
    assert_eq!(t["bound_public_key"], bound1.as_str());
    assert_eq!(show_instance(&s, &r1.instance_id)["generation"], 2);
    let auths = show_instance(&s, &r1.instance_id)["latest_authentications"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(auths, 2);

    // E: recovery without a certificate needs a recovery left: refused at limit 1 …
    agent.anonymous = true;
    let e = agent.join().await.expect_err("no recoveries left");
    assert_eq!(e.code, ErrorCode::RecoveryLimitExceeded);
    // … until an administrator raises the limit (a spec edit that keeps the status).
    let edited = s.ctl(&["tokens", "edit", &token, "--recovery-limit", "2"]);
    assert_eq!(edited["bound_keypair"]["recovery"]["limit"], 2);
    assert_eq!(edited["recovery_count"], 1);
    assert_eq!(edited["bound_public_key"], bound1.as_str());
    let r3 = agent.join().await.expect("recovery");
    assert_ne!(r3.instance_id, r1.instance_id);
    assert_eq!(r3.generation, 1);
    let i3 = show_instance(&s, &r3.instance_id);
    assert_eq!(i3["previous_instance_id"], r1.instance_id.as_str());
    let t = show_token(&s, &token);
    assert_eq!(t["recovery_count"], 2);
    assert_eq!(t["bound_instance_id"], r3.instance_id.as_str());
    assert_eq!(t["bound_public_key"], bound1.as_str());

    // The recovered agent renews on its new instance.
    agent.anonymous = false;
    let r4 = agent.join().await.expect("renewal after recovery");
    assert_eq!(
        (r4.instance_id.as_str(), r4.generation),
        (r3.instance_id.as_str(), 2)
    );

    let ls = s.ctl_list(&["instances", "ls", "--bot", "robot"]);
    assert_eq!(ls.as_array().unwrap().len(), 2);
    let joins = s.ctl_list(&["audit", "ls", "--type", "bot.join"]);
    assert!(joins
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["success"] == true));
    assert!(joins
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["success"] == false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_refused_and_changes_nothing() {
    let s = Server::start();
    add_bot(&s, "robot");
    let (token, secret, _) =
        s.add_bk_token("robot", &["--registration-secret", "correct horse battery"]);
    assert_eq!(secret.as_deref(), Some("correct horse battery"));
    let before = show_token(&s, &token);

    let mut wrong = Agent::new(&s, &token, Some("incorrect horse"));
    let e = wrong.join().await.expect_err("wrong secret");
    assert_eq!(e.code, ErrorCode::AccessDenied);
    let mut missing = Agent::new(&s, &token, None);
    let e2 = missing.join().await.expect_err("missing secret");
    // One generic message for every secret failure.
    assert_eq!((e2.code, e2.message.as_str()), (e.code, e.message.as_str()));
    assert_eq!(show_token(&s, &token), before);
    assert!(s
        .ctl_list(&["instances", "ls"])
        .as_array()
        .unwrap()
        .is_empty());

    let mut right = Agent::new(&s, &token, Some("correct horse battery"));
    right.join().await.expect("the right secret still works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_registered_key_joins_without_a_secret() {
    let s = Server::start();
    add_bot(&s, "robot");
    let key = new_key();
    let public = ssh(&key);
    let (token, secret, added) = s.add_bk_token(
        "robot",
        &["--initial-public-key", &format!("{public} device-7")],
    );
    assert_eq!(secret, None);
    assert_eq!(added["initial_public_key"], public.as_str());
    let uri: JoinUri = added["join_uri"].as_str().unwrap().parse().unwrap();
    assert_eq!(uri.registration_secret, None);

    // A different key cannot use the token.
    let mut impostor = Agent::new(&s, &token, None).with_bound_key(new_key());
    assert!(impostor.join().await.is_err());

    let mut agent = Agent::new(&s, &token, None).with_bound_key(key);
    let r = agent.join().await.expect("pre-registered join");
    assert_eq!(r.bound_public_key.as_deref(), Some(public.as_str()));
    let t = show_token(&s, &token);
    assert_eq!(t["bound_public_key"], public.as_str());
    assert_eq!(t["bound_instance_id"], r.instance_id.as_str());
    assert_eq!(
        t["bound_keypair"]["onboarding"]["initial_public_key"],
        public.as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_rotation_changes_the_bound_key_on_next_renewal() {
    let s = Server::start();
    add_bot(&s, "robot");
    let (token, secret, _) = s.add_bk_token("robot", &[]);
    let mut agent = Agent::new(&s, &token, secret.as_deref());
    let r1 = agent.join().await.unwrap();
    let key1 = ssh(agent.bound.as_ref().unwrap());

    let v = s.ctl(&["bound-keypair", "request-rotation", &token]);
    assert!(v["bound_keypair"]["rotate_after"].is_i64());
    assert_eq!(show_token(&s, &token)["bound_public_key"], key1.as_str());

    let r2 = agent.join().await.expect("renewal with rotation");
    let key2 = ssh(agent.bound.as_ref().unwrap());
    assert_ne!(key1, key2);
    assert_eq!(r2.bound_public_key.as_deref(), Some(key2.as_str()));
    assert_eq!(
        (r2.instance_id.as_str(), r2.generation),
        (r1.instance_id.as_str(), 2)
    );
    let t = show_token(&s, &token);
    assert_eq!(t["bound_public_key"], key2.as_str());
    assert!(t["last_rotated_at"].is_i64());
    assert_eq!(t["recovery_count"], 1, "a rotation consumes no recovery");

    // Done: the next renewal keeps the new key.
    agent.join().await.unwrap();
    assert_eq!(ssh(agent.bound.as_ref().unwrap()), key2);
    let rotations = s.ctl_list(&["audit", "ls", "--type", "bound_keypair.rotation"]);
    assert_eq!(rotations.as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_never_fail_through_ca_rotations() {
    let s = Server::start();
    add_bot(&s, "robot");
    let (token, secret, _) = s.add_bk_token("robot", &[]);
    let mut agent = Agent::new(&s, &token, secret.as_deref());
    let first = agent.join().await.unwrap();

    // The agent renews in a loop while the operator rotates both CAs (twice each).
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let renewer = tokio::spawn(async move {
        let mut n = 0u32;
        loop {
            let r = agent.join().await;
            let r = r.unwrap_or_else(|e| panic!("renewal {n} failed: {e:?}"));
            assert_eq!(r.instance_id, first.instance_id);
            n += 1;
            if stop_rx.try_recv().is_ok() {
                // A few more after the last rotation, with the new CAs only.
                for _ in 0..3 {
                    let r = agent.join().await.expect("renewal after rotations");
                    assert_eq!(r.instance_id, first.instance_id);
                    n += 1;
                }
                return (n, agent);
            }
        }
    });
    let s = std::sync::Arc::new(s);
    for kind in ["identity", "join-state", "identity", "join-state"] {
        let s2 = s.clone();
        let kind = kind.to_string();
        let v = tokio::task::spawn_blocking(move || {
            s2.ctl(&["ca", "rotate", "--type", &kind, "--grace-period", "1h"])
        })
        .await
        .unwrap();
        assert!(v["kid"].is_string());
        // Let at least one renewal run against each new CA set.
        let before = s
            .ctl_list(&["audit", "ls", "--type", "bot.join", "--limit", "1000"])
            .as_array()
            .unwrap()
            .len();
        let s3 = s.clone();
        tokio::task::spawn_blocking(move || {
            wait_for(T, || {
                let n = s3
                    .ctl_list(&["audit", "ls", "--type", "bot.join", "--limit", "1000"])
                    .as_array()
                    .unwrap()
                    .len();
                (n > before).then_some(())
            })
        })
        .await
        .unwrap();
    }
    let _ = stop_tx.send(());
    let (n, agent) = tokio::time::timeout(Duration::from_secs(120), renewer)
        .await
        .expect("renewer finished")
        .expect("no renewal failed");
    assert!(n >= 7, "only {n} renewals");
    let last = agent.last.as_ref().unwrap();
    // The CA bundle carries the current identity CAs; at least the new and the one in grace.
    assert!(last.ca_bundle.matches("BEGIN CERTIFICATE").count() >= 2);
    let failures: Vec<Value> = s
        .ctl_list(&["audit", "ls", "--type", "bot.join", "--limit", "1000"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["success"] == false)
        .cloned()
        .collect();
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        s.ctl_list(&["audit", "ls", "--type", "ca.rotated"])
            .as_array()
            .unwrap()
            .len(),
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_join_method_join_and_renewal() {
    let s = Server::start();
    add_bot(&s, "robot");
    let out = s.ctl_raw(&[
        "--format",
        "json",
        "tokens",
        "add",
        "--bot",
        "robot",
        "--join-method",
        "token",
        "--ttl",
        "48h",
    ]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("warning"),
        "TTL above 24h warns"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let uri: JoinUri = v["join_uri"].as_str().unwrap().parse().unwrap();
    assert_eq!(uri.method, JoinMethod::Token);
    assert_eq!(uri.ca_pin.unwrap().to_string(), s.ca_pin);
    let secret = uri.token.clone();
    assert_eq!(v["token"], secret.as_str());
    let name = v["name"].as_str().unwrap().to_string();
    assert_ne!(name, secret, "the stored name is not the secret");

    let mut agent = Agent::new(&s, &name, None);
    let r1 = agent.token_join(Some(&secret)).await.expect("token join");
    assert_eq!((r1.generation, r1.join_method.as_str()), (1, "token"));
    let r2 = agent.token_join(None).await.expect("mTLS renewal");
    assert_eq!(
        (r2.instance_id.as_str(), r2.generation),
        (r1.instance_id.as_str(), 2)
    );
    let i = show_instance(&s, &r1.instance_id);
    assert_eq!(i["generation"], 2);
    assert_eq!(i["join_method"], "token");
    assert!(!i["join_token"].as_str().unwrap().contains(&secret));

    // max_joins defaults to 1.
    let mut second = Agent::new(&s, &name, None);
    assert!(second.token_join(Some(&secret)).await.is_err());
    assert_eq!(show_token(&s, &name)["join_count"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_is_recorded_on_the_callers_instance() {
    let s = Server::start();
    add_bot(&s, "robot");
    let (token, secret, _) = s.add_bk_token("robot", &[]);
    let mut agent = Agent::new(&s, &token, secret.as_deref());
    let r = agent.join().await.unwrap();
    let hb = Heartbeat {
        is_startup: true,
        version: "9.9.9".into(),
        hostname: "dev-7.example".into(),
        uptime_secs: 42,
        os: "linux".into(),
        arch: "aarch64".into(),
        one_shot: false,
        keystore: boundkey_proto::KeyBackend::File,
    };
    assert!(matches!(
        agent.heartbeat(hb.clone()).await,
        ServerMessage::HeartbeatAck(_)
    ));
    let i = show_instance(&s, &r.instance_id);
    assert_eq!(i["initial_heartbeat"]["hostname"], "dev-7.example");
    assert_eq!(i["latest_heartbeats"][0]["version"], "9.9.9");
    assert_eq!(i["latest_heartbeats"][0]["arch"], "aarch64");
    assert!(i["latest_heartbeats"][0]["recorded_at"].is_i64());

    // Without a client certificate there is no instance to record on.
    agent.anonymous = true;
    assert!(matches!(agent.heartbeat(hb).await, ServerMessage::Error(_)));
    assert_eq!(
        show_instance(&s, &r.instance_id)["latest_heartbeats"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_refuse_renewal_and_unlock_restores_it() {
    let s = Server::start();
    add_bot(&s, "robot");
    let (token, secret, _) = s.add_bk_token("robot", &[]);
    let mut agent = Agent::new(&s, &token, secret.as_deref());
    let r = agent.join().await.unwrap();
    let lock = s.ctl(&[
        "locks",
        "add",
        "--instance",
        &r.instance_id,
        "--message",
        "stolen laptop",
        "--name",
        "l1",
    ]);
    assert_eq!(lock["name"], "l1");
    assert_eq!(lock["active"], true);
    let e = agent.join().await.expect_err("locked");
    assert_eq!(e.code, ErrorCode::Locked);
    s.ctl(&["locks", "rm", "l1"]);
    agent.join().await.expect("unlocked");
    let kinds: Vec<String> = s
        .ctl_list(&["audit", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect();
    assert!(kinds.contains(&"lock.created".to_string()));
    assert!(kinds.contains(&"lock.deleted".to_string()));
}

async fn raw_exchange(s: &Server, bytes: &[u8]) -> Option<ServerMessage> {
    use tokio::io::AsyncWriteExt;
    let mut conn = connect(s.addr, s.client_config(None)).await;
    conn.write_all(bytes).await.unwrap();
    conn.flush().await.unwrap();
    let reply = recv_within(&mut conn, T).await;
    // Then the server closes.
    assert!(recv_within(&mut conn, T).await.is_none());
    reply
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

fn error_code(m: Option<ServerMessage>) -> ErrorCode {
    match m {
        Some(ServerMessage::Error(e)) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_are_refused_and_the_server_keeps_serving() {
    let s = Server::start();
    add_bot(&s, "robot");
    let (token, secret, _) = s.add_bk_token("robot", &[]);

    assert_eq!(
        error_code(raw_exchange(&s, &[0xff, 0xff, 0xff, 0xff]).await),
        ErrorCode::BadRequest
    );
    let just_over = ((boundkey_proto::MAX_FRAME_LEN + 1) as u32).to_be_bytes();
    assert_eq!(
        error_code(raw_exchange(&s, &just_over).await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        error_code(raw_exchange(&s, &frame(b"{not json")).await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        error_code(raw_exchange(&s, &frame(br#"{"v":1,"type":"nope"}"#)).await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        error_code(raw_exchange(&s, &frame(br#"{"v":99,"type":"heartbeat"}"#)).await),
        ErrorCode::UnsupportedVersion
    );
    // A well-formed but out-of-order first message.
    assert_eq!(
        error_code(
            raw_exchange(
                &s,
                &frame(br#"{"v":1,"type":"challenge_solution","solution":"x"}"#)
            )
            .await
        ),
        ErrorCode::BadRequest
    );

    let mut agent = Agent::new(&s, &token, secret.as_deref());
    agent
        .join()
        .await
        .expect("a normal ceremony after the garbage");
    assert!(s.log().contains("refused frame"), "refusals are logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_mid_ceremony_is_refused_and_audited() {
    use tokio::io::AsyncWriteExt;
    let s = Server::start();
    add_bot(&s, "robot");
    let (token, secret, _) = s.add_bk_token("robot", &[]);
    let agent = Agent::new(&s, &token, secret.as_deref());
    let mut conn = agent.connect().await;
    send(
        &mut conn,
        &boundkey_proto::ClientMessage::Init(boundkey_proto::Init {
            token: token.clone(),
            params: agent.params(),
            registration_secret: secret.clone(),
            join_state: None,
        }),
    )
    .await;
    assert!(matches!(
        recv_within(&mut conn, T).await,
        Some(ServerMessage::RotationRequest(_))
    ));
    conn.write_all(&frame(b"garbage")).await.unwrap();
    conn.flush().await.unwrap();
    assert_eq!(
        error_code(recv_within(&mut conn, T).await),
        ErrorCode::BadRequest
    );
    // The secret was not consumed by the broken attempt.
    assert_eq!(show_token(&s, &token)["registration_secret_pending"], true);
    let mut agent = Agent::new(&s, &token, secret.as_deref());
    agent.join().await.expect("join after a broken attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_times_out_without_blocking_others() {
    let s = Server::start_with(&["--ceremony-timeout", "2s"]);
    add_bot(&s, "robot");
    let (token, secret, _) = s.add_bk_token("robot", &[]);

    // One client completes the handshake and then says nothing; another never even starts TLS.
    let mut silent = connect(s.addr, s.client_config(None)).await;
    let mut tcp_only = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let started = std::time::Instant::now();

    // Meanwhile a normal client completes a whole ceremony (a secret registration involves
    // three round trips) and renews.
    let mut agent = Agent::new(&s, &token, secret.as_deref());
    agent
        .join()
        .await
        .expect("join while a silent client is connected");
    agent
        .join()
        .await
        .expect("renew while a silent client is connected");

    match recv_within(&mut silent, T).await {
        Some(ServerMessage::Error(e)) => assert_eq!(e.code, ErrorCode::Timeout),
        other => panic!("expected a timeout error, got {other:?}"),
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "timed out early"
    );
    assert!(recv_within(&mut silent, T).await.is_none());
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(T, tcp_only.read(&mut buf))
        .await
        .expect("the server closes a client stuck before the handshake")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_mid_ceremony_times_out_and_is_audited() {
    let s = Server::start_with(&["--ceremony-timeout", "2s"]);
    add_bot(&s, "robot");
    let (token, secret, _) = s.add_bk_token("robot", &[]);
    let agent = Agent::new(&s, &token, secret.as_deref());
    let mut conn = agent.connect().await;
    send(
        &mut conn,
        &boundkey_proto::ClientMessage::Init(boundkey_proto::Init {
            token: token.clone(),
            params: agent.params(),
            registration_secret: secret.clone(),
            join_state: None,
        }),
    )
    .await;
    assert!(matches!(
        recv_within(&mut conn, T).await,
        Some(ServerMessage::RotationRequest(_))
    ));
    // … and never answers.
    assert_eq!(
        error_code(recv_within(&mut conn, T).await),
        ErrorCode::Timeout
    );
    assert_eq!(show_token(&s, &token)["registration_secret_pending"], true);
    let fails = wait_for(T, || {
        let v = s.ctl_list(&["audit", "ls", "--type", "bot.join"]);
        let f: Vec<Value> = v
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["success"] == false)
            .cloned()
            .collect();
        (!f.is_empty()).then_some(f)
    });
    assert!(
        fails[0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("deadline"),
        "{fails:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_ceremony_finish() {
    let mut s = Server::start();
    add_bot(&s, "robot");
    let (token, secret, _) = s.add_bk_token("robot", &[]);
    let mut agent = Agent::new(&s, &token, secret.as_deref());
    let mut conn = agent.connect().await;
    send(
        &mut conn,
        &boundkey_proto::ClientMessage::Init(boundkey_proto::Init {
            token: token.clone(),
            params: agent.params(),
            registration_secret: secret.clone(),
            join_state: None,
        }),
    )
    .await;
    assert!(matches!(
        recv_within(&mut conn, T).await,
        Some(ServerMessage::RotationRequest(_))
    ));

    s.signal(Signal::TERM);
    // Shutdown has begun once the listener stops accepting.
    wait_for(T, || s.log().contains("stopped accepting").then_some(()));
    assert!(
        tokio::net::TcpStream::connect(s.addr).await.is_err(),
        "no new connections during shutdown"
    );

    // The ceremony that was under way still completes.
    let k = new_key();
    agent.pending.push(k.clone());
    send(
        &mut conn,
        &boundkey_proto::ClientMessage::RotationResponse(boundkey_proto::RotationResponse {
            public_key: ssh(&k),
        }),
    )
    .await;
    let challenge = match recv_within(&mut conn, T).await {
        Some(ServerMessage::Challenge(c)) => c,
        other => panic!("expected a challenge, got {other:?}"),
    };
    send(
        &mut conn,
        &boundkey_proto::ClientMessage::ChallengeSolution(boundkey_proto::ChallengeSolution {
            solution: boundkey_proto::jws::sign(&k, None, challenge.document.as_bytes()),
            identity_proof: None,
            attestation: None,
        }),
    )
    .await;
    assert!(matches!(
        recv_within(&mut conn, T).await,
        Some(ServerMessage::Result(_))
    ));
    drop(conn);
    let (status, _s) = tokio::task::spawn_blocking(move || (s.wait_exit(), s))
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_ceremonies_all_complete() {
    let s = Server::start();
    add_bot(&s, "fleet");
    let mut agents = Vec::new();
    for i in 0..12 {
        let (token, secret, _) = s.add_bk_token("fleet", &["--name", &format!("dev-{i}")]);
        agents.push(Agent::new(&s, &token, secret.as_deref()));
    }
    let tasks: Vec<_> = agents
        .into_iter()
        .map(|mut a| {
            tokio::spawn(async move {
                let r1 = a.join().await.expect("join");
                let r2 = a.join().await.expect("renew");
                assert_eq!((r2.instance_id, r2.generation), (r1.instance_id, 2));
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("agent task");
    }
    assert_eq!(
        s.ctl_list(&["instances", "ls", "--bot", "fleet"])
            .as_array()
            .unwrap()
            .len(),
        12
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_racing_on_one_token_produce_one_instance() {
    let s = Server::start();
    add_bot(&s, "robot");
    let key = new_key();
    let (token, _, _) = s.add_bk_token("robot", &["--initial-public-key", &ssh(&key)]);
    // Eight copies of one device state join at once; only one may end up bound.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let mut a = Agent::new(&s, &token, None).with_bound_key(key.clone());
            tokio::spawn(async move { a.join().await })
        })
        .collect();
    let mut wins = Vec::new();
    let mut codes = Vec::new();
    for t in tasks {
        match t.await.expect("task") {
            Ok(r) => wins.push(r),
            Err(e) => codes.push(e.code),
        }
    }
    assert_eq!(
        wins.len(),
        1,
        "exactly one clone wins; others got {codes:?}"
    );
    assert!(
        codes
            .iter()
            .all(|c| matches!(c, ErrorCode::Conflict | ErrorCode::RecoveryLimitExceeded)),
        "{codes:?}"
    );
    let instances = s.ctl_list(&["instances", "ls"]);
    assert_eq!(instances.as_array().unwrap().len(), 1, "{instances}");
    let t = show_token(&s, &token);
    assert_eq!(t["bound_instance_id"], wins[0].instance_id.as_str());
    assert_eq!(t["recovery_count"], 1);
}
