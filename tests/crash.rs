//! Kill the agent (abort: no destructors, no flushing) at every step of a rotation and of a first
//! join, then check that the next `--oneshot` run joins again, that the device and the auth
//! service agree on the bound key, and that no crash cost a recovery or created a lock: a result
//! lost after the service committed is delivered again (`docs/protocol.md` §5.4).
//!
//! Crash points exist in debug builds only (`BOUNDKEY_CRASH_AT`, see `src/crash.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;

fn s(v: &Value) -> String {
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

/// Every step of a rotating renewal, in order: Init, the in-flight mark, the old key's proof, key
/// creation (its file written in two steps), the pending key's state write, the
/// RotationResponse, the in-flight mark again, the new key's proof, the Result, the state write,
/// each output file (created and synced in the unpublished set directory), the synced set, the
/// `current` swap and the links. Every durable replacement is interrupted both before and after
/// its rename (`<file>-temp`, `<file>-written`, from `src/crash.rs`); an output file after its sync.
const ROTATION_STEPS: &[&str] = &[
    "after-init-sent",
    "state-temp:1",
    "state-written:1",
    "after-solution-sent:1",
    "key-temp",
    "key-written",
    "after-key-created",
    "state-temp:2",
    "state-written:2",
    "after-key-persisted",
    "after-rotation-response-sent",
    "state-temp:3",
    "state-written:3",
    "after-solution-sent:2",
    "after-result-received",
    "state-temp:4",
    "state-written:4",
    "after-state-written",
    "output-cert-written",
    "output-key-written",
    "output-ca-written",
    "outputs-set-synced",
    "current-swapped",
    "after-outputs-written",
];

/// Parallel workers for the rotation steps (each with its own bot, token and device).
const WORKERS: usize = 3;

/// Asks for a rotation, kills the agent at `step` of the rotating renewal, and checks that the
/// next run completes it: the device and the service agree on a new bound key, the outputs are
/// valid, and no key file is orphaned.
fn crash_a_rotation_at(auth: &AuthServer, tok: &Token, d: &Device, step: &str) {
    let t = auth.token(&tok.name);
    let before = s(&t["bound_public_key"]);
    // Rotation times have one-second resolution: a request in the same second as the last
    // rotation is not "later" than it. The previous run's heartbeat must be older than this
    // ceremony too: a heartbeat in the same second counts as a use of a lost result's
    // certificate and rules redelivery out (issue 8, defect 11, on the auth side).
    let last = t["last_rotated_at"].as_i64().unwrap_or(0).max(unix_now());
    wait_for("the next second", std::time::Duration::from_secs(5), || {
        (unix_now() > last).then_some(())
    });
    auth.ctl_json(&["bound-keypair", "request-rotation", &tok.name]);

    let o = d
        .start_cmd(&["--oneshot"])
        .env("BOUNDKEY_CRASH_AT", step)
        .output()
        .expect("run boundkeyd");
    assert_eq!(
        signal_of(&o),
        Some(libc::SIGABRT),
        "{step}: expected an abort, got {:?}\n{}",
        o.status,
        stderr(&o)
    );

    let o = d.oneshot(&[]);
    assert!(
        o.status.success(),
        "{step}: the device could not join again: {:?}\n{}\n--- authd log ---\n{}",
        o.status,
        stderr(&o),
        auth.log()
    );
    if let Some(l) = stderr(&o).lines().find(|l| l.contains("new identity")) {
        eprintln!("{step}: retry gave {l}");
    }
    let st = d.status();
    let bound = s(&auth.token(&tok.name)["bound_public_key"]);
    assert_eq!(
        bound,
        s(&st["public_key"]),
        "{step}: device and service disagree on the bound key"
    );
    assert_ne!(bound, before, "{step}: the rotation never completed");
    assert_eq!(st["interrupted_ceremony"], false, "{step}");
    d.verify_outputs();
    // No orphan keys: exactly the active key, the pending one (none) and the history.
    if let Some(n) = d.key_files() {
        let held = 1
            + st["key_history"].as_u64().unwrap_or(0) as usize
            + usize::from(!st["pending_kid"].is_null());
        assert_eq!(n, held, "{step}: key files vs keys in the state");
    }
    // No crash cost a recovery or created a lock.
    assert_eq!(
        auth.token(&tok.name)["recovery_count"],
        1,
        "{step}: a recovery was spent"
    );
    assert!(auth.locks().is_empty(), "{step}: {:?}", auth.locks());
}

#[test]
#[cfg(debug_assertions)]
fn a_crash_at_any_step_of_a_rotation_never_bricks_the_device() {
    let auth = AuthServer::start();
    // The default recovery limit (1): the first join uses it, so no crash may cost another.
    let workers: Vec<(Token, Device)> = (0..WORKERS)
        .map(|w| {
            let tok = auth.bot_with_token(&format!("crashy-{w}"), &[]);
            let d = Device::new();
            d.join(&tok.join_uri);
            (tok, d)
        })
        .collect();
    std::thread::scope(|scope| {
        for (w, (tok, d)) in workers.iter().enumerate() {
            let auth = &auth;
            scope.spawn(move || {
                for step in ROTATION_STEPS.iter().skip(w).step_by(WORKERS) {
                    crash_a_rotation_at(auth, tok, d, step);
                }
            });
        }
    });
    // No lock was ever created along the way, and no crash consumed a recovery.
    assert!(auth.locks().is_empty(), "{:?}", auth.locks());
    for (tok, _) in &workers {
        assert_eq!(auth.token(&tok.name)["recovery_count"], 1, "{}", tok.name);
    }
}

#[test]
#[cfg(debug_assertions)]
fn a_crash_while_the_first_join_result_arrives_does_not_brick_the_device() {
    let auth = AuthServer::start();
    for step in ["after-solution-sent", "after-result-received"] {
        let tok = auth.bot_with_token(&format!("first-{}", step.len()), &[]);
        let d = Device::new();
        let o = d
            .start_cmd(&["--oneshot", "--join-uri", &tok.join_uri])
            .env("BOUNDKEY_CRASH_AT", step)
            .output()
            .expect("run boundkeyd");
        assert_eq!(signal_of(&o), Some(libc::SIGABRT), "{step}: {}", stderr(&o));
        // The service commits (the secret used, the single recovery consumed) even though the
        // agent died: it may still be finishing when the agent is gone.
        wait_for(
            "the lost first join's commit",
            std::time::Duration::from_secs(10),
            || (auth.token(&tok.name)["recovery_count"] == 1).then_some(()),
        );
        let o = d.oneshot(&["--join-uri", &tok.join_uri]);
        assert!(
            o.status.success(),
            "{step}: {}
{}",
            stderr(&o),
            auth.log()
        );
        let t = auth.token(&tok.name);
        assert_eq!(
            t["recovery_count"], 1,
            "{step}: delivered again, no recovery used"
        );
        assert_eq!(
            s(&t["bound_public_key"]),
            s(&d.status()["public_key"]),
            "{step}"
        );
        d.verify_outputs();
        // And the device renews normally afterwards.
        assert!(d.oneshot(&[]).status.success(), "{step}");
    }
    assert!(auth.locks().is_empty(), "{:?}", auth.locks());
}
