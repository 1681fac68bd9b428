//! boundkeyctl and boundkey-authd behaviour that needs no ceremony: output shapes, validation,
//! audit of admin actions, file modes, restart, storage errors, signals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use boundkey_proto::JoinUri;
use common::*;
use serde_json::Value;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn audit_types(s: &Server) -> Vec<String> {
    s.ctl_list(&["audit", "ls", "--limit", "1000"])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn data_dir_admin_socket_and_ca_file_permissions() {
    let s = Server::start();
    assert_eq!(file_mode(&s.data_dir), 0o700);
    assert_eq!(file_mode(&data_path(&s, "admin.sock")), 0o600);
    assert!(data_path(&s, "boundkey.db").exists());
    let info = s.ctl(&["info"]);
    assert_eq!(info["cluster"], "test-cluster");
    assert_eq!(info["ca_pin"], s.ca_pin.as_str());
    assert_eq!(info["listen_addr"], s.addr.to_string());
}

#[test]
fn data_dir_through_a_symlink_is_used_tightened_and_locked() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let s = Server::start_in(dir, link, &[]);
    assert_eq!(file_mode(&real), 0o700, "group and other access removed");
    assert!(real.join("ca.pem").exists());
    assert_eq!(file_mode(&real.join("ca.pem")), 0o644);
    // The lock file names the process holding it, for the second server's message.
    let pid = std::fs::read_to_string(real.join("authd.lock")).unwrap();
    assert_eq!(pid.trim(), s.pid().to_string());
    s.ctl(&["info"]);
}

#[test]
fn tokens_add_text_output_has_name_secret_and_uri() {
    let s = Server::start();
    let out = s.ctl_raw(&["bots", "add", "robot"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = s.ctl_raw(&[
        "tokens",
        "add",
        "--bot",
        "robot",
        "--join-method",
        "bound_keypair",
        "--name",
        "dev-1",
        "--auth-server",
        "auth.example.com:4433",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let get = |k: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(&format!("{k}:"))
                    .map(|v| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no {k} line in:\n{text}"))
    };
    assert_eq!(get("name"), "dev-1");
    let secret = get("registration_secret");
    assert!(secret.len() >= 16);
    let uri: JoinUri = get("join_uri").parse().unwrap();
    assert_eq!(uri.endpoint.to_string(), "auth.example.com:4433");
    assert_eq!(uri.registration_secret.as_deref(), Some(secret.as_str()));
    assert_eq!(uri.ca_pin.unwrap().to_string(), s.ca_pin);
    assert!(stderr(&out).contains("shown only once"));
    // The secret is never shown again.
    let shown = s.ctl_raw(&["tokens", "show", "dev-1"]);
    assert!(!stdout(&shown).contains(&secret));
    let json = s.ctl(&["tokens", "show", "dev-1"]);
    assert!(!json.to_string().contains(&secret));
    for k in [
        "name",
        "bot_name",
        "join_method",
        "bound_public_key",
        "bound_instance_id",
        "recovery_count",
        "last_recovered_at",
        "last_rotated_at",
        "registration_secret_pending",
        "revision",
        "bound_keypair",
    ] {
        assert!(json.get(k).is_some(), "tokens show lacks {k}: {json}");
    }
    // Aligned table output.
    let ls = s.ctl_raw(&["tokens", "ls"]);
    let ls = stdout(&ls);
    let header = ls.lines().next().unwrap();
    assert!(header.starts_with("NAME"), "{ls}");
    assert!(ls.lines().nth(1).unwrap().starts_with("dev-1 "), "{ls}");
}

#[test]
fn token_method_ttl_rules() {
    let s = Server::start();
    s.ctl(&["bots", "add", "robot"]);
    let out = s.ctl_raw(&[
        "tokens",
        "add",
        "--bot",
        "robot",
        "--join-method",
        "token",
        "--ttl",
        "8d",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).trim().lines().count(),
        1,
        "one clear line: {}",
        stderr(&out)
    );
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
        "8d",
        "--force",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("warning"));
    let out = s.ctl_raw(&["tokens", "add", "--bot", "robot", "--join-method", "token"]);
    assert!(out.status.success());
    assert!(
        !stderr(&out).contains("warning"),
        "default TTL is 1h: {}",
        stderr(&out)
    );
    // Bound-keypair-only options are refused for the token method.
    let out = s.ctl_raw(&[
        "tokens",
        "add",
        "--bot",
        "robot",
        "--join-method",
        "token",
        "--recovery-limit",
        "3",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--recovery-limit"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn validation_errors_are_one_clear_line() {
    let s = Server::start();
    for (args, needle) in [
        (
            vec!["tokens", "add", "--bot", "ghost"],
            "bot ghost not found",
        ),
        (vec!["tokens", "show", "nope"], "not found"),
        (vec!["bots", "add", "bad name"], "invalid name"),
        (vec!["instances", "rm", "nope"], "not found"),
        (vec!["locks", "rm", "nope"], "not found"),
    ] {
        let out = s.ctl_raw(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("boundkeyctl: error:"), "{err}");
    }
    s.ctl(&["bots", "add", "robot"]);
    let out = s.ctl_raw(&["bots", "add", "robot"]);
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    let out = s.ctl_raw(&[
        "tokens",
        "add",
        "--bot",
        "robot",
        "--initial-public-key",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGYlbcmW0P2EVSSYQg4tI0fCRN5Wm1qZB7ma2CTbBl0k",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("public key"), "{}", stderr(&out));
}

#[test]
fn ctl_without_a_server_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(CTL)
        .arg("--data-dir")
        .arg(dir.path())
        .args(["bots", "ls"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("admin.sock") && err.contains("is it running"),
        "{err}"
    );
}

/// `boundkeyctl … | head`: a reader that has gone away ends the command the way a shell
/// pipeline expects (status 141, as if killed by SIGPIPE), not with a panic message.
#[test]
fn ctl_into_a_closed_pipe_exits_quietly() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let s = Server::start();
    for args in [
        &["bots", "ls"][..],
        &["--format", "json", "audit", "ls"],
        &["info"],
    ] {
        let mut child = Command::new(CTL)
            .arg("--data-dir")
            .arg(&s.data_dir)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Closed before the command can have its answer from the server: its first write
        // meets a pipe with no reader.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(141), "{args:?}: {}", stderr(&out));
        assert_eq!(out.status.signal(), None);
        assert_eq!(stderr(&out), "", "{args:?}");
    }
}
#[test]
fn edits_change_spec_only_and_are_audited() {
    let s = Server::start();
    s.ctl(&["bots", "add", "robot"]);
    s.ctl(&["tokens", "add", "--bot", "robot", "--name", "t1"]);
    let before = s.ctl(&["tokens", "show", "t1"]);
    let v = s.ctl(&[
        "tokens",
        "edit",
        "t1",
        "--recovery-limit",
        "5",
        "--recovery-mode",
        "relaxed",
        "--expires",
        "30d",
        "--must-register-before",
        "2030-01-01T00:00:00Z",
    ]);
    assert_eq!(v["bound_keypair"]["recovery"]["limit"], 5);
    assert_eq!(v["bound_keypair"]["recovery"]["mode"], "relaxed");
    assert_eq!(
        v["bound_keypair"]["onboarding"]["must_register_before"],
        1_893_456_000
    );
    assert!(v["expires"].is_i64());
    assert_eq!(
        v["registration_secret_pending"],
        before["registration_secret_pending"]
    );
    assert_eq!(v["revision"], before["revision"].as_u64().unwrap() + 1);
    let v = s.ctl(&["tokens", "edit", "t1", "--expires", "none"]);
    assert_eq!(v["expires"], Value::Null);
    let out = s.ctl_raw(&["tokens", "edit", "t1"]);
    assert!(stderr(&out).contains("nothing to change"));
    let updated = s.ctl_list(&["audit", "ls", "--type", "token.updated"]);
    assert_eq!(updated.as_array().unwrap().len(), 2);
    assert_eq!(
        updated[0]["fields"]["created_by"].as_str().unwrap(),
        format!("admin (uid {})", rustix::process::geteuid().as_raw())
    );
}

#[test]
fn admin_actions_are_audited_and_bots_rm_cascades() {
    let s = Server::start();
    s.ctl(&["bots", "add", "robot"]);
    s.ctl(&["tokens", "add", "--bot", "robot", "--name", "t1"]);
    s.ctl(&["tokens", "add", "--bot", "robot", "--name", "t2"]);
    s.ctl(&[
        "locks", "add", "--bot", "robot", "--ttl", "1h", "--name", "l1",
    ]);
    s.ctl(&["locks", "add", "--join-token", "t2", "--name", "l2"]);
    let locks = s.ctl(&["locks", "ls"]);
    assert_eq!(locks.as_array().unwrap().len(), 2);
    assert_eq!(locks[0]["target"]["bot"], "robot");
    assert!(locks[0]["expires"].is_i64());
    assert_eq!(locks[1]["expires"], Value::Null);
    let dup = s.ctl_raw(&["locks", "add", "--bot", "robot", "--name", "l1"]);
    assert!(stderr(&dup).contains("already exists"));
    let both = s.ctl_raw(&["locks", "add", "--bot", "robot", "--instance", "x"]);
    assert!(!both.status.success());
    s.ctl(&["locks", "rm", "l1"]);
    s.ctl(&["tokens", "rm", "t1"]);
    let rm = s.ctl(&["bots", "rm", "robot"]);
    assert_eq!(rm["tokens_deleted"], 1);
    assert!(s.ctl_list(&["tokens", "ls"]).as_array().unwrap().is_empty());
    let types = audit_types(&s);
    for t in [
        "bot.created",
        "token.created",
        "lock.created",
        "lock.deleted",
        "token.deleted",
        "bot.deleted",
    ] {
        assert!(types.contains(&t.to_string()), "no {t} in {types:?}");
    }
    // Newest first, and --type / --limit filter.
    assert_eq!(types[0], "bot.deleted");
    let two = s.ctl_list(&["audit", "ls", "--limit", "2"]);
    assert_eq!(two.as_array().unwrap().len(), 2);
    let only = s.ctl_list(&["audit", "ls", "--type", "token.created"]);
    assert_eq!(only.as_array().unwrap().len(), 2);
    // Text tables render too.
    for args in [["audit", "ls"], ["locks", "ls"]] {
        let out = s.ctl_raw(&args);
        assert!(out.status.success());
    }
}

#[test]
fn restart_keeps_state_and_refuses_another_cluster() {
    let s = Server::start();
    s.ctl(&["bots", "add", "robot"]);
    let pin = s.ca_pin.clone();
    let (dir, data) = s.stop();

    let out = Command::new(AUTHD)
        .args(["start", "--data-dir"])
        .arg(&data)
        .args(["--listen", "127.0.0.1:0", "--cluster", "other-cluster"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("belongs to cluster \"test-cluster\""), "{err}");

    let s = Server::start_in(dir, data, &[]);
    assert_eq!(s.ca_pin, pin, "CAs persist across restarts");
    assert_eq!(s.ctl(&["bots", "ls"])[0]["name"], "robot");
}

#[test]
fn second_server_on_the_same_data_dir_is_refused() {
    let s = Server::start();
    let out = Command::new(AUTHD)
        .args(["start", "--data-dir"])
        .arg(&s.data_dir)
        .args(["--listen", "127.0.0.1:0", "--cluster", "test-cluster"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already running"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("(pid {})", s.pid())),
        "{}",
        stderr(&out)
    );
    // The first one is unaffected.
    s.ctl(&["info"]);
}

#[test]
fn storage_url_and_corrupt_database_errors() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        Command::new(AUTHD)
            .args(["start", "--data-dir"])
            .arg(dir.path().join("d"))
            .args(["--listen", "127.0.0.1:0", "--cluster", "c"])
            .args(extra)
            .output()
            .unwrap()
    };
    // Nothing listens on port 1: the error names the database and says what failed.
    let url = "postgres://user@127.0.0.1:1/boundkey?sslmode=disable";
    let out = run(&["--storage", url]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("PostgreSQL store {url}: cannot connect")),
        "{err}"
    );
    let out = run(&["--storage", "mysql://x"]);
    assert!(
        stderr(&out).contains("unsupported storage URL"),
        "{}",
        stderr(&out)
    );

    let bad = dir.path().join("garbage.db");
    std::fs::write(&bad, vec![0x5au8; 4096]).unwrap();
    let out = run(&["--storage", &format!("sqlite:{}", bad.display())]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&bad.display().to_string()), "{err}");
    assert!(err.contains("boundkey-authd: error:"), "{err}");
}

#[test]
fn sigterm_stops_cleanly() {
    let mut s = Server::start();
    let st = s.signal_and_wait(Signal::TERM);
    assert!(st.success(), "exit status {st:?}");
    assert!(
        !data_path(&s, "admin.sock").exists(),
        "socket removed on shutdown"
    );
    let log = wait_for(Duration::from_secs(5), || {
        let l = s.log();
        l.contains("stopped").then_some(l)
    });
    assert!(log.contains("SIGTERM"));
}

#[test]
fn attestation_flags_are_validated_stored_shown_and_edited_without_touching_status() {
    let s = Server::start();
    s.ctl(&["bots", "add", "robot"]);
    // Any PEM certificate will do as a bundle here: the server's own CA.
    let bundle = data_path(&s, "ca.pem");
    let bundle = bundle.to_str().unwrap();
    let out = s.ctl_raw(&["tokens", "add", "--bot", "robot", "--attestation", "tpm"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--ek-ca"), "{}", stderr(&out));
    let out = s.ctl_raw(&[
        "tokens",
        "add",
        "--bot",
        "robot",
        "--attestation",
        "tpm",
        "--ek-allow",
        "xyz",
    ]);
    assert!(stderr(&out).contains("64 hex digits"), "{}", stderr(&out));
    let hash = "AB".repeat(32);
    s.ctl(&[
        "tokens",
        "add",
        "--bot",
        "robot",
        "--name",
        "t1",
        "--attestation",
        "tpm",
        "--ek-ca",
        bundle,
        "--ek-allow",
        &hash,
    ]);
    let v = s.ctl(&["tokens", "show", "t1"]);
    let att = &v["bound_keypair"]["attestation"];
    assert_eq!(att["mode"], "tpm");
    assert_eq!(att["ek_allow"][0], "ab".repeat(32));
    assert!(att["ek_ca_bundle"]
        .as_str()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    // Text output names the bundle's certificates instead of printing the PEM.
    let text = stdout(&s.ctl_raw(&["tokens", "show", "t1"]));
    assert!(text.contains("1 certificate(s): "), "{text}");
    assert!(!text.contains("BEGIN CERTIFICATE"), "{text}");
    // tpm without anything to trust is refused on edit too; the spec is unchanged.
    let out = s.ctl_raw(&[
        "tokens",
        "edit",
        "t1",
        "--ek-ca",
        "none",
        "--ek-allow",
        "none",
    ]);
    assert!(!out.status.success());
    let same = s.ctl(&["tokens", "show", "t1"]);
    assert_eq!(same["bound_keypair"], v["bound_keypair"]);
    let v = s.ctl(&[
        "tokens",
        "edit",
        "t1",
        "--attestation",
        "none",
        "--ek-ca",
        "none",
        "--ek-allow",
        "none",
    ]);
    assert!(v["bound_keypair"].get("attestation").is_none(), "{v}");
    assert_eq!(v["registration_secret_pending"], true, "status untouched");
    let out = s.ctl_raw(&[
        "tokens",
        "add",
        "--bot",
        "robot",
        "--join-method",
        "token",
        "--attestation",
        "tpm",
    ]);
    assert!(stderr(&out).contains("--attestation"), "{}", stderr(&out));
}
