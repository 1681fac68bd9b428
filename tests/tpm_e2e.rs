//! End-to-end scenarios with the TPM key store (issue 4): a real boundkey-authd, the real
//! boundkeyd binary over real TLS, and a private swtpm per test (own state directory and TCP port
//! pair, from boundkey-testkit), reached with `--keystore tpm --tcti swtpm:host=127.0.0.1,port=P`.
//!
//! Build the auth service first: `cargo build --workspace --bins && cargo test -p boundkey`.
//! swtpm and tpm2-tools must be installed (the harness panics with install instructions if not).
//!
//! Nothing here sleeps to synchronise: every wait polls a condition with a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use boundkey_testkit::Swtpm;
use common::*;
use p256::pkcs8::DecodePrivateKey;
use serde_json::Value;

fn s(v: &Value) -> String {
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

/// A device whose bound keys live in its own fresh swtpm.
fn tpm_device() -> Device {
    Device::with_keystore(Keystore::Tpm(Swtpm::start()))
}

fn tpm(d: &mut Device) -> &mut Swtpm {
    match &mut d.keystore {
        Keystore::Tpm(t) => t,
        Keystore::File => panic!("not a TPM device"),
    }
}

fn tpm_ref(d: &Device) -> &Swtpm {
    match &d.keystore {
        Keystore::Tpm(t) => t,
        Keystore::File => panic!("not a TPM device"),
    }
}

/// `state.json` as JSON (its layout is documented in docs/agent.md).
fn state(d: &Device) -> Value {
    let bytes = std::fs::read(d.storage.join("state.json")).expect("state.json");
    serde_json::from_slice(&bytes).expect("state.json is JSON")
}

fn key_names(st: &Value, which: &str) -> Vec<String> {
    match &st["keys"][which] {
        Value::Array(a) => a.iter().map(|k| s(&k["name"])).collect(),
        Value::Object(_) => vec![s(&st["keys"][which]["name"])],
        _ => Vec::new(),
    }
}

/// Names of the `.tpmkey` blobs in `STORAGE/keys`, sorted; panics on any other file there.
fn tpm_blobs(d: &Device) -> Vec<String> {
    let mut names = Vec::new();
    let Ok(rd) = std::fs::read_dir(d.storage.join("keys")) else {
        return names;
    };
    for e in rd {
        let name = e
            .expect("dir entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        match name.strip_suffix(".tpmkey") {
            Some(n) => names.push(n.to_string()),
            None => panic!("unexpected file in the TPM key store: {name}"),
        }
    }
    names.sort();
    names
}

fn blob_path(d: &Device, name: &str) -> PathBuf {
    d.storage.join("keys").join(format!("{name}.tpmkey"))
}

/// The SSH public key inside a `.tpmkey` blob. Parsing checks the public area describes a
/// non-exportable (fixedTPM, fixedParent, sensitiveDataOrigin) P-256 ECDSA signing key.
fn blob_public_key(d: &Device, name: &str) -> String {
    let blob = boundkey_hal::tpm::KeyBlob::read(&blob_path(d, name))
        .unwrap_or_else(|e| panic!("{name}.tpmkey: {e}"));
    boundkey_proto::ssh_public_key(&blob.public_key().to_p256())
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).expect("read_dir") {
            let e = e.expect("dir entry");
            let path = e.path();
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() && e.file_name() != "lock" {
                out.insert(path.clone(), std::fs::read(&path).expect("read"));
            }
        }
    }
    out
}

const PEM_PRIVATE_KEY: &str = "PRIVATE KEY-----";
/// Base64 of the start of a P-256 PKCS#8 DER private key (a PEM body without its armour).
const PKCS8_P256_B64: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEH";

/// Files under `dir` that hold something that looks like a private key, with the number of PEM
/// armour lines (`BEGIN`/`END … PRIVATE KEY-----`) or bare PKCS#8 bodies found in each.
fn private_key_material(dir: &Path) -> Vec<(PathBuf, usize)> {
    snapshot(dir)
        .into_iter()
        .filter_map(|(path, bytes)| {
            let text = String::from_utf8_lossy(&bytes);
            let armour = text.matches(PEM_PRIVATE_KEY).count();
            let bodies = text.matches(PKCS8_P256_B64).count();
            (armour + bodies > 0).then_some((path, armour.max(bodies)))
        })
        .collect()
}

/// The only private key in the storage directory is the software identity key, in its documented
/// place (`state.json` → `identity.private_key`, the same key as `DEST/current/key.pem`, matching
/// the certificate); the bound key exists only as TPM blobs that parse as non-exportable keys.
#[track_caller]
fn assert_no_bound_private_key_on_disk(d: &Device) {
    let found = private_key_material(&d.storage);
    let state_path = d.storage.join("state.json");
    assert_eq!(
        found,
        vec![(state_path, 2)],
        "private key material outside state.json's identity key"
    );
    let st = state(d);
    let pem = st["identity"]["private_key"]
        .as_str()
        .expect("identity.private_key");
    let identity = p256::SecretKey::from_pkcs8_pem(pem).expect("identity key is PKCS#8 PEM");
    let identity_pub = boundkey_proto::ssh_public_key(&identity.public_key());
    let key_pem =
        std::fs::read_to_string(d.destination.join("current/key.pem")).expect("DEST key.pem");
    assert_eq!(
        key_pem, pem,
        "state.json's identity key is the one in the outputs"
    );
    // verify_outputs checks key.pem against the certificate.
    d.verify_outputs();
    for name in key_names(&st, "active")
        .into_iter()
        .chain(key_names(&st, "history"))
    {
        let pk = blob_public_key(d, &name);
        assert_ne!(pk, identity_pub, "the identity key is a bound key");
    }
}

/// Waits until the stored identity has expired (by its own `expires`).
fn wait_until_expired(d: &Device) {
    let expires = d.status()["expires_unix"].as_i64().expect("expires_unix");
    wait_for("the certificate to expire", Duration::from_secs(60), || {
        (unix_now() > expires).then_some(())
    });
}

/// No transient objects left in the TPM (every handle the agent loaded was flushed).
#[track_caller]
fn assert_no_transient_objects(t: &Swtpm) {
    let out = t
        .tpm2_tool("tpm2_getcap")
        .arg("handles-transient")
        .env("TSS2_LOG", "all+none")
        .output()
        .expect("tpm2_getcap");
    assert_ok(&out);
    assert_eq!(stdout(&out).trim(), "", "transient objects left in the TPM");
}

#[test]
fn tpm_registration_renewal_then_expiry_and_recovery() {
    let auth = AuthServer::start();
    let tok = auth.bot_with_token("tpm-edge", &["--recovery-limit", "3"]);
    let d = tpm_device();
    assert_ok(&d.oneshot(&["--join-uri", &tok.join_uri, "--certificate-ttl", "10s"]));
    d.verify_outputs();
    let st = d.status();
    assert_eq!(st["keystore"], "tpm");
    assert_eq!(st["generation"], 1);
    let instance = s(&st["instance_id"]);
    let bound = s(&st["public_key"]);
    // The bound key is one TPM blob holding exactly that public key; the server has it bound.
    let active = key_names(&state(&d), "active");
    assert_eq!(tpm_blobs(&d), active);
    assert_eq!(blob_public_key(&d, &active[0]), bound);
    let t = auth.token(&tok.name);
    assert_eq!(s(&t["bound_public_key"]), bound);
    assert_eq!(t["registration_secret_pending"], false);
    assert_eq!(
        auth.instance(&instance)["initial_heartbeat"]["keystore"],
        "tpm"
    );
    assert_no_transient_objects(tpm_ref(&d));

    // Renewal over mTLS: same instance, generation 2, same TPM key.
    assert_ok(&d.oneshot(&["--certificate-ttl", "10s"]));
    let st = d.status();
    assert_eq!(s(&st["instance_id"]), instance);
    assert_eq!(st["generation"], 2);
    assert_eq!(s(&st["public_key"]), bound);
    assert_eq!(auth.instance(&instance)["generation"], 2);
    assert_no_transient_objects(tpm_ref(&d));
    assert_no_bound_private_key_on_disk(&d);

    // Expiry, then recovery with the TPM key: a new instance linked to the old one.
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
    assert_ne!(new, instance);
    assert_eq!(st["generation"], 1);
    assert_eq!(s(&st["public_key"]), bound);
    assert_eq!(
        auth.instance(&new)["previous_instance_id"],
        instance.as_str()
    );
    assert_eq!(auth.token(&tok.name)["recovery_count"], 2);
    d.verify_outputs();
}

#[test]
fn tpm_keys_survive_a_tpm_reset() {
    let auth = AuthServer::start();
    let tok = auth.bot_with_token("tpm-reset", &[]);
    let mut d = tpm_device();
    d.join(&tok.join_uri);
    let before = d.status();
    let blobs = snapshot(&d.storage.join("keys"));

    // TPM reset: transient objects and sessions are gone, the seeds stay.
    let port = tpm(&mut d).port();
    tpm(&mut d).restart();
    assert_eq!(tpm(&mut d).port(), port, "swtpm came back on other ports");

    let o = d.oneshot(&[]);
    assert_ok(&o);
    let after = d.status();
    assert_eq!(after["generation"], 2);
    assert_eq!(after["instance_id"], before["instance_id"]);
    assert_eq!(after["public_key"], before["public_key"]);
    assert_eq!(
        snapshot(&d.storage.join("keys")),
        blobs,
        "key blobs changed"
    );
    d.verify_outputs();
}

#[test]
fn tpm_rotation_makes_a_new_tpm_key_and_keeps_at_most_ten_old_ones() {
    let auth = AuthServer::start();
    let tok = auth.bot_with_token("tpm-rot", &[]);
    let d = tpm_device();
    d.join(&tok.join_uri);
    let first = key_names(&state(&d), "active").remove(0);
    let mut expect_gen = 1;

    // Eleven rotations: eleven new TPM keys, the history keeps ten, the oldest is deleted.
    for round in 1..=11usize {
        let t = auth.token(&tok.name);
        let old_key = s(&t["bound_public_key"]);
        let old_name = key_names(&state(&d), "active").remove(0);
        // Rotation times have one-second resolution: a request in the same second as the last
        // rotation is not "later" than it.
        let last = t["last_rotated_at"].as_i64().unwrap_or(0);
        wait_for("the next second", Duration::from_secs(5), || {
            (unix_now() > last).then_some(())
        });
        auth.ctl_json(&["bound-keypair", "request-rotation", &tok.name]);
        assert_ok(&d.oneshot(&[]));
        expect_gen += 1;

        let st = state(&d);
        let status = d.status();
        let new_key = s(&auth.token(&tok.name)["bound_public_key"]);
        let new_name = key_names(&st, "active").remove(0);
        assert_ne!(
            new_key, old_key,
            "round {round}: the bound key did not change"
        );
        assert_ne!(new_name, old_name);
        assert_eq!(new_key, s(&status["public_key"]));
        assert_eq!(status["generation"], expect_gen);
        assert!(status["pending_kid"].is_null());
        // A new blob holds the new key; the old key is the newest in the history and its blob
        // is still there (it may still answer a challenge).
        assert_eq!(blob_public_key(&d, &new_name), new_key);
        let history = key_names(&st, "history");
        assert_eq!(history.first(), Some(&old_name), "round {round}");
        assert_eq!(blob_public_key(&d, &old_name), old_key);
        assert_eq!(history.len(), round.min(10), "round {round}");
        // Exactly the active key and the history have blobs.
        let mut held: Vec<String> = std::iter::once(new_name).chain(history).collect();
        held.sort();
        assert_eq!(tpm_blobs(&d), held, "round {round}");
    }
    assert!(
        !blob_path(&d, &first).exists(),
        "the key that fell off the history still has a blob"
    );
    assert!(auth
        .audit()
        .iter()
        .any(|e| e["type"] == "bound_keypair.rotation"));
    assert_no_transient_objects(tpm_ref(&d));
    assert_no_bound_private_key_on_disk(&d);
}

#[test]
fn tpm_copied_storage_is_refused_and_the_token_locked() {
    let auth = AuthServer::start();
    let tok = auth.bot_with_token("tpm-clone", &[]);
    let d = tpm_device();
    d.join(&tok.join_uri);

    let copy = d.path("storage-copy");
    let st = Command::new("cp")
        .arg("-a")
        .arg(&d.storage)
        .arg(&copy)
        .status()
        .expect("cp");
    assert!(st.success());

    // The original renews first (generation 2)...
    assert_ok(&d.oneshot(&[]));
    assert_eq!(d.status()["generation"], 2);
    // ...so the copy, whose TPM blobs load fine in the same TPM, presents a stale generation.
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
    assert!(auth
        .audit()
        .iter()
        .any(|e| e["type"] == "generation_mismatch"));
    let locks = auth.locks();
    assert!(
        locks
            .iter()
            .any(|l| l["target"]["join_token"] == tok.name.as_str()),
        "no join_token lock: {locks:?}"
    );
    // Locked for the original too.
    let o = d.oneshot(&[]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        error_line(&o).contains("boundkeyctl locks ls"),
        "{}",
        error_line(&o)
    );
}

#[test]
fn tpm_pre_registered_key_joins_and_status_shows_the_tpm() {
    let auth = AuthServer::start();
    let d = tpm_device();
    let key = d.keypair_create(&[]);
    assert!(key.starts_with("ecdsa-sha2-nistp256 AAAA"), "{key}");
    let names = tpm_blobs(&d);
    assert_eq!(names.len(), 1, "{names:?}");
    assert_eq!(blob_public_key(&d, &names[0]), key);
    assert_eq!(d.status()["keystore"], "tpm");
    // Kept, not recreated, without --overwrite.
    assert_eq!(d.keypair_create(&[]), key);
    assert_eq!(tpm_blobs(&d), names);

    auth.add_bot("tpm-pre");
    let tok = auth.add_token(
        "tpm-pre",
        &[
            "--join-method",
            "bound_keypair",
            "--initial-public-key",
            &key,
        ],
    );
    assert!(tok.registration_secret.is_none(), "{tok:?}");
    d.join(&tok.join_uri);
    let st = d.status();
    assert_eq!(st["keystore"], "tpm");
    assert_eq!(st["generation"], 1);
    assert_eq!(s(&st["public_key"]), key);
    assert_eq!(s(&auth.token(&tok.name)["bound_public_key"]), key);
    assert_no_bound_private_key_on_disk(&d);

    // The same detector does see a software bound key (so it can fail).
    let f = Device::with_keystore(Keystore::File);
    f.keypair_create(&[]);
    let found = private_key_material(&f.storage);
    assert!(
        found
            .iter()
            .any(|(p, _)| p.starts_with(f.storage.join("keys"))),
        "{found:?}"
    );
}

#[test]
fn tpm_key_auth_value_from_file_and_a_wrong_one_is_explained() {
    let auth = AuthServer::start();
    let tok = auth.bot_with_token("tpm-auth", &[]);
    let d = tpm_device();
    let good = d.path("key-auth");
    std::fs::write(&good, "correct horse battery\n").expect("auth file");
    let wrong = d.path("wrong-auth");
    std::fs::write(&wrong, "incorrect horse\n").expect("auth file");
    let good_s = good.to_str().expect("utf-8 path");
    let wrong_s = wrong.to_str().expect("utf-8 path");

    assert_ok(&d.oneshot(&["--join-uri", &tok.join_uri, "--tpm-key-auth-file", good_s]));
    assert_ok(&d.oneshot(&["--tpm-key-auth-file", good_s]));
    assert_eq!(d.status()["generation"], 2);
    let before = snapshot(&d.storage);

    // A wrong auth value: one line that says it is the TPM key's authorization.
    let o = d.oneshot(&["--tpm-key-auth-file", wrong_s]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let line = error_line(&o);
    assert!(
        line.contains("TPM authorization failed") && line.contains("auth value"),
        "{line}"
    );
    let active = key_names(&state(&d), "active").remove(0);
    assert!(line.contains(&active), "the line names the key: {line}");
    assert_eq!(
        snapshot(&d.storage),
        before,
        "a failed signature changed the storage"
    );
    assert!(auth.locks().is_empty(), "{:?}", auth.locks());

    // The daemon gives up instead of retrying: the value is read once and cannot become right,
    // and every retry would count towards the TPM's dictionary-attack lockout.
    let mut daemon = d.spawn_daemon(&["--tpm-key-auth-file", wrong_s]);
    let status = wait_for("the daemon to stop", Duration::from_secs(30), || {
        daemon.try_wait().ok().flatten()
    });
    let log = d.daemon_log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert_eq!(
        log.matches("TPM authorization failed").count(),
        1,
        "one attempt only: {log}"
    );
    assert_eq!(snapshot(&d.storage), before);

    // The right value from the environment works again: nothing was damaged.
    let o = d
        .start_cmd(&["--oneshot"])
        .env("BOUNDKEY_TPM_KEY_AUTH", "correct horse battery")
        .output()
        .expect("run boundkeyd");
    assert_ok(&o);
    assert_eq!(d.status()["generation"], 3);
    d.verify_outputs();
}

/// Timestamps of the daemon's "join/renewal failed" log lines that blame the TPM.
fn tpm_failures(log: &str) -> Vec<SystemTime> {
    log.lines()
        .filter(|l| l.contains("join/renewal failed") && l.contains("TPM"))
        .map(|l| {
            let ts = l.split_whitespace().next().unwrap_or_default();
            humantime::parse_rfc3339(ts).unwrap_or_else(|e| panic!("no timestamp in {l:?}: {e}"))
        })
        .collect()
}

#[test]
fn tpm_vanishing_mid_operation_is_retried_with_backoff_and_damages_nothing() {
    let auth = AuthServer::start();
    let tok = auth.bot_with_token("tpm-vanish", &[]);
    let mut d = tpm_device();
    // Renewals come only from SIGUSR1 and the retry schedule (the interval is far longer than
    // the test), so a scheduled renewal cannot race the storage snapshot below, and the renewal
    // after the TPM returns can only be the backoff retry.
    let mut daemon = d.spawn_daemon(&["--join-uri", &tok.join_uri, "--renewal-interval", "20m"]);
    let instance = wait_for("the first join", DEADLINE, || {
        std::fs::metadata(d.storage.join("state.json")).ok()?;
        let st = d.status();
        (st["generation"] == 1).then(|| s(&st["instance_id"]))
    });
    let before = snapshot(&d.storage);

    // The TPM disappears; a renewal is asked for.
    tpm(&mut d).kill();
    send_signal(&daemon, libc::SIGUSR1);
    let failures = wait_for("three failed attempts", DEADLINE, || {
        let f = tpm_failures(&d.daemon_log());
        (f.len() >= 3).then_some(f)
    });
    assert!(
        matches!(daemon.try_wait(), Ok(None)),
        "the daemon exited: {}",
        d.daemon_log()
    );
    // Exponential backoff from 1 s with jitter in [d/2, d]: waits of at least 0.5 s, then 1 s.
    let gap = |i: usize| {
        failures[i + 1]
            .duration_since(failures[i])
            .unwrap_or_default()
    };
    assert!(
        gap(0) >= Duration::from_millis(450) && gap(1) >= Duration::from_millis(950),
        "retries are not backing off: {:?}, {:?}\n{}",
        gap(0),
        gap(1),
        d.daemon_log()
    );
    let log = d.daemon_log();
    let line = log
        .lines()
        .find(|l| l.contains("join/renewal failed"))
        .expect("a failure line");
    assert!(
        line.contains(&tpm_ref(&d).tcti()) && line.contains("retry_in="),
        "{line}"
    );
    assert_eq!(
        snapshot(&d.storage),
        before,
        "the failed renewals changed the storage"
    );
    assert_eq!(d.status()["generation"], 1);

    // The TPM comes back (same ports, same seeds): the next retry renews on its own.
    let port = tpm(&mut d).port();
    tpm(&mut d).restart();
    assert_eq!(tpm(&mut d).port(), port, "swtpm came back on other ports");
    wait_for("the renewal after the TPM came back", DEADLINE, || {
        (d.status()["generation"] == 2).then_some(())
    });
    let st = d.status();
    assert_eq!(s(&st["instance_id"]), instance);
    assert_eq!(auth.instance(&instance)["generation"], 2);
    d.verify_outputs();
    assert!(auth.locks().is_empty(), "{:?}", auth.locks());

    send_signal(&daemon, libc::SIGTERM);
    let st = wait_exit(&mut daemon, DEADLINE);
    assert_eq!(st.code(), Some(0), "{}", d.daemon_log());
}

fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("local addr").port()
}

fn run_with_tcti(d: &Device, tcti: &str, args: &[&str]) -> Output {
    Command::new(boundkeyd())
        .arg("start")
        .arg("--storage")
        .arg(&d.storage)
        .arg("--destination")
        .arg(&d.destination)
        .args(["--keystore", "tpm", "--tcti", tcti])
        .args(args)
        .env_remove("BOUNDKEY_REGISTRATION_SECRET")
        .env_remove("BOUNDKEY_TPM_KEY_AUTH")
        .env_remove("BOUNDKEY_TPM_OWNER_AUTH")
        .env("TSS2_LOG", "all+none")
        .stdin(Stdio::null())
        .output()
        .expect("run boundkeyd")
}

#[test]
fn tpm_absent_at_startup_fails_with_one_line_naming_the_tpm() {
    let auth = AuthServer::start();
    let tok = auth.bot_with_token("tpm-absent", &[]);
    let d = tpm_device();
    let tcti = format!("swtpm:host=127.0.0.1,port={}", closed_port());

    let o = run_with_tcti(&d, &tcti, &["--oneshot", "--join-uri", &tok.join_uri]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let errors: Vec<&str> = std::str::from_utf8(&o.stderr)
        .expect("utf-8 stderr")
        .lines()
        .filter(|l| l.starts_with("boundkeyd: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{}", stderr(&o));
    assert!(
        errors[0].contains("TPM not found") && errors[0].contains(&tcti),
        "{}",
        errors[0]
    );
    // Nothing was used up or written: the secret is still pending, no key blob exists.
    assert_eq!(
        auth.token(&tok.name)["registration_secret_pending"],
        true,
        "a TPM failure used up the registration secret"
    );
    assert!(tpm_blobs(&d).is_empty(), "{:?}", tpm_blobs(&d));

    // With the TPM there, the same URI joins.
    d.join(&tok.join_uri);
    assert_eq!(d.status()["keystore"], "tpm");
    d.verify_outputs();
}
