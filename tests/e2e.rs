//! End-to-end scenarios of issue 3: a real boundkey-authd, the real boundkeyd binary, real TLS.
//!
//! Build the auth service first: `cargo build --workspace --bins && cargo test -p boundkey`.
//! `BOUNDKEY_TEST_KEYSTORE=tpm` runs them against swtpm instead of the file key store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

fn s(v: &Value) -> String {
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

/// Waits until the stored identity has expired (by its own `expires`).
fn wait_until_expired(d: &Device) {
    let expires = d.status()["expires_unix"].as_i64().expect("expires_unix");
    wait_for("the certificate to expire", Duration::from_secs(60), || {
        (unix_now() > expires).then_some(())
    });
}

fn bound_key(auth: &AuthServer, token: &str) -> String {
    s(&auth.token(token)["bound_public_key"])
}

#[test]
fn registration_renewal_and_heartbeat() {
    let auth = AuthServer::start();
    let tok = auth.bot_with_token("web", &[]);
    let d = Device::new();
    d.join(&tok.join_uri);
    d.verify_outputs();

    let st = d.status();
    assert_eq!(st["bot_name"], "web");
    assert_eq!(st["generation"], 1);
    assert_eq!(st["keystore"], d.keystore.name());
    let instance = s(&st["instance_id"]);

    // The secret was used once; the bound key is the device's.
    let t = auth.token(&tok.name);
    assert_eq!(t["registration_secret_pending"], false, "{t}");
    assert_eq!(t["bound_instance_id"], instance.as_str());
    assert_eq!(s(&t["bound_public_key"]), s(&st["public_key"]));

    // Renewal: same instance, generation + 1, no recovery used. The URI is not needed again.
    let o = d.oneshot(&[]);
    assert_ok(&o);
    let st2 = d.status();
    assert_eq!(s(&st2["instance_id"]), instance);
    assert_eq!(st2["generation"], 2);
    assert_eq!(auth.token(&tok.name)["recovery_count"], 1);
    d.verify_outputs();

    // Heartbeats appear on the instance.
    let inst = auth.instance(&instance);
    assert_eq!(inst["initial_heartbeat"]["is_startup"], true, "{inst}");
    assert_eq!(inst["initial_heartbeat"]["one_shot"], true);
    assert_eq!(inst["initial_heartbeat"]["keystore"], d.keystore.name());
    assert!(
        inst["latest_heartbeats"]
            .as_array()
            .is_some_and(|a| a.len() >= 2),
        "{inst}"
    );
    assert_eq!(inst["generation"], 2);
}

/// The daemon keeps its heartbeat TLS session: every heartbeat after the first with one
/// identity resumes it (docs/decisions.md, "Heartbeats resume their TLS session").
#[test]
fn daemon_heartbeats_resume_their_tls_session() {
    let auth = AuthServer::start_with(&[("RUST_LOG", "info,boundkey_server::listener=debug")]);
    let tok = auth.bot_with_token("beat", &[]);
    let d = Device::new();
    d.join(&tok.join_uri);
    let instance = s(&d.status()["instance_id"]);
    let _daemon = d.spawn_daemon(&["--heartbeat-interval", "1s"]);
    // One heartbeat from the join, then the daemon's: a full handshake, then resumed ones.
    wait_for("four heartbeats", Duration::from_secs(60), || {
        let inst = auth.instance(&instance);
        (inst["latest_heartbeats"].as_array().map_or(0, Vec::len) >= 4).then_some(())
    });
    let resumed = auth
        .log()
        .matches("TLS session resumed for a heartbeat")
        .count();
    assert!(resumed >= 2, "{resumed} resumed\n{}", auth.log());
    assert!(
        !d.daemon_log().contains("heartbeat failed"),
        "{}",
        d.daemon_log()
    );
}

#[test]
fn expiry_then_recovery_creates_a_linked_instance() {
    let auth = AuthServer::start();
    let tok = auth.bot_with_token("edge", &["--recovery-limit", "3"]);
    let d = Device::new();
    let o = d.oneshot(&["--join-uri", &tok.join_uri, "--certificate-ttl", "10s"]);
    assert_ok(&o);
    let first = d.status();
    let old = s(&first["instance_id"]);
    wait_until_expired(&d);

    let o = d.oneshot(&["--certificate-ttl", "10s"]);
    assert_ok(&o);
    assert!(
        stderr(&o).contains("ceremony=\"recovery\""),
        "{}",
        stderr(&o)
    );
    let st = d.status();
    let new = s(&st["instance_id"]);
    assert_ne!(new, old);
    assert_eq!(st["generation"], 1);
    let inst = auth.instance(&new);
    assert_eq!(inst["previous_instance_id"], old.as_str(), "{inst}");
    assert_eq!(auth.token(&tok.name)["recovery_count"], 2);
    d.verify_outputs();
}

#[test]
fn recovery_limit_exhausted_is_explained_and_raising_it_fixes_it() {
    let auth = AuthServer::start();
    // The first join itself counts as a recovery: a limit of 1 leaves none.
    let tok = auth.bot_with_token("tight", &["--recovery-limit", "1"]);
    let d = Device::new();
    let o = d.oneshot(&["--join-uri", &tok.join_uri, "--certificate-ttl", "10s"]);
    assert_ok(&o);
    wait_until_expired(&d);

    let o = d.oneshot(&["--certificate-ttl", "10s"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let line = error_line(&o);
    assert_eq!(
        line,
        format!(
            "boundkeyd: error: the join token has no recoveries left; ask an administrator to raise its recovery limit (boundkeyctl tokens edit {} --recovery-limit N)",
            tok.name
        )
    );

    auth.ctl_json(&["tokens", "edit", &tok.name, "--recovery-limit", "2"]);
    let o = d.oneshot(&["--certificate-ttl", "10s"]);
    assert_ok(&o);
    assert_eq!(auth.token(&tok.name)["recovery_count"], 2);
    d.verify_outputs();
}

#[test]
fn requested_rotation_changes_the_bound_key_on_the_next_renewal() {
    let auth = AuthServer::start();
    let tok = auth.bot_with_token("rot", &[]);
    let d = Device::new();
    d.join(&tok.join_uri);
    let before = d.status();
    let old_key = bound_key(&auth, &tok.name);
    assert_eq!(old_key, s(&before["public_key"]));

    auth.ctl_json(&["bound-keypair", "request-rotation", &tok.name]);
    assert_ok(&d.oneshot(&[]));
    let after = d.status();
    let new_key = bound_key(&auth, &tok.name);
    assert_ne!(new_key, old_key);
    assert_eq!(new_key, s(&after["public_key"]));
    assert_ne!(after["kid"], before["kid"]);
    assert_eq!(after["instance_id"], before["instance_id"]);
    assert_eq!(after["generation"], 2);
    assert_eq!(after["key_history"], 1, "the old key stays in the history");
    assert!(auth.token(&tok.name)["last_rotated_at"].is_i64());
    assert!(auth
        .audit()
        .iter()
        .any(|e| e["type"] == "bound_keypair.rotation"));

    // The next renewal uses the new key and rotates no further.
    assert_ok(&d.oneshot(&[]));
    assert_eq!(bound_key(&auth, &tok.name), new_key);
    assert_eq!(d.status()["generation"], 3);
}

#[test]
fn a_copied_storage_directory_is_refused_and_the_token_locked() {
    let auth = AuthServer::start();
    let tok = auth.bot_with_token("clone", &[]);
    let d = Device::new();
    d.join(&tok.join_uri);

    let copy = d.path("storage-copy");
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(&d.storage)
        .arg(&copy)
        .status()
        .expect("cp");
    assert!(st.success());

    // The original renews first (generation 2)...
    assert_ok(&d.oneshot(&[]));
    // ...so the copy presents a stale generation.
    let o = d
        .start_cmd_at(&copy, &d.path("out-copy"), &["--oneshot"])
        .output()
        .expect("run copy");
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        error_line(&o).contains("access denied"),
        "{}",
        error_line(&o)
    );

    let locks = auth.locks();
    assert!(
        locks
            .iter()
            .any(|l| l["target"]["join_token"] == tok.name.as_str()),
        "no join_token lock: {locks:?}"
    );
    assert!(auth
        .audit()
        .iter()
        .any(|e| e["type"] == "generation_mismatch"));
    // The token is locked for the original too, with a message that says what to do.
    let o = d.oneshot(&[]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        error_line(&o).contains("boundkeyctl locks ls"),
        "{}",
        error_line(&o)
    );
}

#[test]
fn wrong_ca_pin_is_refused_before_any_secret_is_sent() {
    let auth = AuthServer::start();
    let tok = auth.bot_with_token("pinned", &[]);
    let wrong = format!("sha256:{}", "ab".repeat(32));
    assert_ne!(wrong, auth.ca_pin);
    let uri = tok.join_uri.replace(&auth.ca_pin, &wrong);
    assert_ne!(uri, tok.join_uri);

    let d = Device::new();
    let o = d.oneshot(&["--join-uri", &uri]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let line = error_line(&o);
    assert!(line.contains("does not match the pinned CA"), "{line}");
    assert!(
        line.contains(&wrong) && line.contains(&auth.ca_pin),
        "{line}"
    );
    assert!(line.contains("nothing was sent"), "{line}");

    // The server never saw a join attempt and the secret is still unused.
    let t = auth.token(&tok.name);
    assert_eq!(t["registration_secret_pending"], true, "{t}");
    assert!(t["bound_public_key"].is_null());
    let joins: Vec<_> = auth
        .audit()
        .into_iter()
        .filter(|e| e["type"] == "bot.join")
        .collect();
    assert!(joins.is_empty(), "unexpected join attempts: {joins:?}");

    // The right pin works afterwards.
    d.join(&tok.join_uri);
}

#[test]
fn a_second_agent_on_the_same_storage_is_refused() {
    let auth = AuthServer::start();
    let tok = auth.bot_with_token("single", &[]);
    let d = Device::new();
    let mut daemon = d.spawn_daemon(&["--join-uri", &tok.join_uri]);
    wait_for("the daemon to join", DEADLINE, || {
        std::fs::metadata(d.storage.join("state.json"))
            .ok()
            .and_then(|_| d.status()["generation"].as_u64())
    });
    let o = d.oneshot(&[]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let line = error_line(&o);
    assert!(line.contains("is in use by another boundkeyd"), "{line}");
    assert!(line.contains(&d.storage.display().to_string()), "{line}");
    send_signal(&daemon, libc::SIGTERM);
    let st = wait_exit(&mut daemon, DEADLINE);
    assert_eq!(st.code(), Some(0), "{}", d.daemon_log());
}

#[test]
fn a_corrupt_state_file_is_named_and_left_alone() {
    let auth = AuthServer::start();
    let tok = auth.bot_with_token("corrupt", &[]);
    let d = Device::new();
    d.join(&tok.join_uri);
    let path = d.storage.join("state.json");
    let good = std::fs::read(&path).expect("state.json");
    let truncated = &good[..good.len() / 3];
    std::fs::write(&path, truncated).expect("truncate");

    let o = d.oneshot(&[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let line = error_line(&o);
    assert!(line.contains(&path.display().to_string()), "{line}");
    assert!(line.contains("is corrupt"), "{line}");
    assert_eq!(
        std::fs::read(&path).expect("state.json"),
        truncated,
        "file was rewritten"
    );

    let o = std::process::Command::new(boundkeyd())
        .args(["status", "--storage"])
        .arg(&d.storage)
        .output()
        .expect("status");
    assert_eq!(o.status.code(), Some(1));
    assert!(error_line(&o).contains("is corrupt"));
}

#[test]
fn daemon_renews_on_sigusr1_and_exits_cleanly_on_sigterm() {
    let auth = AuthServer::start();
    let tok = auth.bot_with_token("daemon", &[]);
    let d = Device::new();
    let mut daemon = d.spawn_daemon(&["--join-uri", &tok.join_uri, "--renewal-interval", "1h"]);
    let instance = wait_for("the first join", DEADLINE, || {
        std::fs::metadata(d.storage.join("state.json")).ok()?;
        let st = d.status();
        (st["generation"] == 1).then(|| s(&st["instance_id"]))
    });
    // The startup heartbeat arrives on its own task.
    wait_for("the startup heartbeat", DEADLINE, || {
        let inst = auth.instance(&instance);
        (inst["initial_heartbeat"]["is_startup"] == true).then_some(())
    });
    assert_eq!(
        auth.instance(&instance)["initial_heartbeat"]["one_shot"],
        false
    );

    send_signal(&daemon, libc::SIGUSR1);
    wait_for("the SIGUSR1 renewal", DEADLINE, || {
        (d.status()["generation"] == 2).then_some(())
    });
    d.verify_outputs();
    send_signal(&daemon, libc::SIGUSR1);
    wait_for("the second SIGUSR1 renewal", DEADLINE, || {
        (d.status()["generation"] == 3).then_some(())
    });

    send_signal(&daemon, libc::SIGTERM);
    let st = wait_exit(&mut daemon, DEADLINE);
    assert_eq!(st.code(), Some(0), "{}", d.daemon_log());
    assert!(d.daemon_log().contains("SIGTERM"), "{}", d.daemon_log());
}

#[test]
fn a_pre_registered_key_joins_without_a_secret() {
    let auth = AuthServer::start();
    let d = Device::new();
    let key = d.keypair_create(&[]);
    assert!(key.starts_with("ecdsa-sha2-nistp256 AAAA"), "{key}");
    // An existing key is kept unless --overwrite.
    assert_eq!(d.keypair_create(&[]), key);

    auth.add_bot("pre");
    let tok = auth.add_token(
        "pre",
        &[
            "--join-method",
            "bound_keypair",
            "--initial-public-key",
            &key,
        ],
    );
    assert!(tok.registration_secret.is_none(), "{tok:?}");
    d.join(&tok.join_uri);
    assert_eq!(bound_key(&auth, &tok.name), key);
    assert_eq!(d.status()["public_key"], key.as_str());
    d.verify_outputs();

    // --overwrite replaces the active key (the old one stays in the history).
    let other = d.keypair_create(&["--overwrite"]);
    assert_ne!(other, key);
    assert_eq!(d.status()["key_history"], 1);
}

#[test]
fn token_join_method_joins_and_renews() {
    let auth = AuthServer::start();
    auth.add_bot("tk");
    let tok = auth.add_token("tk", &["--join-method", "token"]);
    assert!(
        tok.join_uri.starts_with("boundkey+token://"),
        "{}",
        tok.join_uri
    );
    let d = Device::new();
    d.join(&tok.join_uri);
    let st = d.status();
    assert_eq!(st["join_method"], "token");
    assert_eq!(st["generation"], 1);
    d.verify_outputs();
    assert_ok(&d.oneshot(&[]));
    let st2 = d.status();
    assert_eq!(st2["generation"], 2);
    assert_eq!(st2["instance_id"], st["instance_id"]);
    // The token itself (a secret) is not kept on disk.
    let state = std::fs::read_to_string(d.storage.join("state.json")).expect("state");
    assert!(!state.contains(&tok.name), "the secret token was stored");
}

#[test]
fn configuration_conflicts_are_listed_in_one_line() {
    let d = Device::new();
    let cfg = d.path("boundkeyd.toml");
    std::fs::write(
        &cfg,
        "token = \"alpha\"\nauth_server = \"a.example:1\"\njoin_method = \"bound_keypair\"\n",
    )
    .expect("config");
    let o = d
        .start_cmd(&[
            "--oneshot",
            "--config",
            cfg.to_str().expect("utf-8 path"),
            "--join-uri",
            "boundkey+bound-keypair://beta@b.example:2",
        ])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let line = error_line(&o);
    assert!(line.contains("conflicting configuration (2)"), "{line}");
    assert!(
        line.contains("\"alpha\"") && line.contains("\"beta\""),
        "{line}"
    );
    assert!(
        line.contains("a.example:1") && line.contains("b.example:2"),
        "{line}"
    );
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
}

#[test]
fn a_certificate_refused_at_the_tls_layer_falls_back_to_recovery() {
    let auth = AuthServer::start();
    let tok = auth.bot_with_token("rotca", &["--recovery-limit", "2"]);
    let d = Device::new();
    d.join(&tok.join_uri);
    let old = s(&d.status()["instance_id"]);
    // Retire the identity CA at once: the device's still-unexpired certificate no longer chains.
    auth.ctl_json(&["ca", "rotate", "--type", "identity", "--grace-period", "0s"]);

    let o = d.oneshot(&[]);
    assert_ok(&o);
    let err = stderr(&o);
    assert!(err.contains("recovering without it"), "{err}");
    let st = d.status();
    assert_ne!(s(&st["instance_id"]), old);
    assert_eq!(
        auth.instance(&s(&st["instance_id"]))["previous_instance_id"],
        old.as_str()
    );
    d.verify_outputs();
    // And renews normally with the certificate from the new CA.
    assert_ok(&d.oneshot(&[]));
    assert_eq!(d.status()["generation"], 2);
}
