//! Several boundkey-authd nodes sharing one store serve one fleet (issue 11): real nodes, the
//! real agent, real TLS, one address in front of the nodes (`testkit::Front`, a TCP balancer).
//! Every scenario runs on a shared SQLite file and on a PostgreSQL server the test starts itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use boundkey_testkit::{Front, Policy};
use common::*;
use serde_json::Value;

/// The store the nodes share, kept alive for the test.
enum Shared {
    Sqlite(tempfile::TempDir),
    Postgres(boundkey_testkit::Postgres),
}

impl Shared {
    fn sqlite() -> Shared {
        Shared::Sqlite(tempfile::tempdir().unwrap())
    }

    fn postgres() -> Shared {
        let pg = boundkey_testkit::Postgres::start();
        pg.create_database("fleet");
        Shared::Postgres(pg)
    }

    fn url(&self) -> String {
        match self {
            Shared::Sqlite(d) => format!("sqlite:{}", d.path().join("fleet.db").display()),
            Shared::Postgres(pg) => pg.url("fleet"),
        }
    }

    /// The environment that gives a node the store's password (never on the command line).
    fn env(&self) -> Vec<(&'static str, String)> {
        match self {
            Shared::Sqlite(_) => Vec::new(),
            Shared::Postgres(pg) => vec![("BOUNDKEY_STORAGE_PASSWORD", pg.password().to_string())],
        }
    }
}

/// Seconds a rotation waits before the new keys sign: more than two of the nodes' 5 s reads of
/// the CA state.
const ROTATION_DELAY: u64 = 12;

/// `n` nodes on `shared`, each with its own data directory (admin socket).
fn nodes(shared: &Shared, n: usize, env: &[&[(&str, &str)]]) -> Vec<AuthServer> {
    let url = shared.url();
    let delay = format!("{ROTATION_DELAY}s");
    let store_env = shared.env();
    (0..n)
        .map(|i| {
            let mut e: Vec<(&str, &str)> =
                store_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            e.extend_from_slice(env.get(i).copied().unwrap_or(&[]));
            AuthServer::start_node(&["--storage", &url, "--ca-rotation-delay", &delay], &e)
        })
        .collect()
}

fn addr(node: &AuthServer) -> SocketAddr {
    node.addr.parse().unwrap()
}

fn s(v: &Value) -> String {
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

/// A bot and a token whose join URI names the front.
fn token_via(node: &AuthServer, front: &Front, bot: &str) -> Token {
    node.add_bot(bot);
    node.add_token(
        bot,
        &[
            "--join-method",
            "bound_keypair",
            "--auth-server",
            &front.addr().to_string(),
        ],
    )
}

/// What an operator lists, from one node: bots, tokens, instances, locks and the audit log.
fn fleet_view(node: &AuthServer) -> Vec<Value> {
    ["bots", "tokens", "instances", "locks", "audit"]
        .iter()
        .map(|what| node.ctl_json(&[what, "ls"]))
        .collect()
}

fn two_nodes_serve_one_fleet_and_a_rotation_through_one_reaches_the_other(shared: Shared) {
    let ns = nodes(&shared, 2, &[]);
    assert_eq!(ns[0].ca_pin, ns[1].ca_pin, "one TLS CA for the cluster");
    let front = Front::start(&[addr(&ns[0]), addr(&ns[1])], Policy::RoundRobin);
    let tok = token_via(&ns[0], &front, "sensor");
    let d = Device::new();
    d.join(&tok.join_uri);
    for _ in 0..3 {
        assert_ok(&d.oneshot(&[]));
    }
    let served = front.served();
    assert!(
        served.contains(&addr(&ns[0])) && served.contains(&addr(&ns[1])),
        "both nodes served the device: {served:?}"
    );
    // Either node shows the same fleet.
    assert_eq!(fleet_view(&ns[0]), fleet_view(&ns[1]));
    let inst = s(&d.status()["instance_id"]);
    assert_eq!(ns[1].instance(&inst)["generation"], 4);

    // Both CAs rotated through node 0, with a grace period that ends a few seconds after the
    // new keys begin to sign.
    let rotated = std::time::Instant::now();
    for kind in ["identity", "join_state"] {
        ns[0].ctl_json(&["ca", "rotate", "--type", kind, "--grace-period", "6s"]);
    }
    // Right after it the device renews through node 0, then at once through node 1, which may
    // not have read the new CA state yet: the old keys still sign until the delay, so node 1
    // never meets a certificate or join state of a key it does not know.
    front.set_backends(&[addr(&ns[0])]);
    assert_ok(&d.oneshot(&[]));
    front.set_backends(&[addr(&ns[1])]);
    let o = d.oneshot(&[]);
    assert_ok(&o);
    assert!(!stderr(&o).contains("recovering"), "{}", stderr(&o));
    // After the delay the new keys sign: the device renews through node 0 (its old certificate
    // still in its grace period) and gets a certificate and join state of the new keys.
    let wait_until = |secs: u64| {
        let t = rotated + Duration::from_secs(secs);
        std::thread::sleep(t.saturating_duration_since(std::time::Instant::now()));
    };
    wait_until(ROTATION_DELAY + 1);
    front.set_backends(&[addr(&ns[0])]);
    assert_ok(&d.oneshot(&[]));
    // Past the grace period only the new keys are trusted. Node 1 read them from the store
    // meanwhile (no restart): the device renews through it with what node 0 issued, and
    // nothing is recovered or locked.
    wait_until(ROTATION_DELAY + 7);
    front.set_backends(&[addr(&ns[1])]);
    let o = d.oneshot(&[]);
    assert_ok(&o);
    assert!(
        !stderr(&o).contains("recovering"),
        "node 1 did not trust node 0's new identity CA: {}",
        stderr(&o)
    );
    let t = ns[1].token(&tok.name);
    assert_eq!(t["recovery_count"], 1, "only the first join spent one: {t}");
    assert!(ns[1].locks().is_empty(), "{:?}", ns[1].locks());
    assert_eq!(
        s(&d.status()["instance_id"]),
        inst,
        "the same instance throughout"
    );
    // Both nodes export the same trust material now.
    for kind in ["identity", "join_state"] {
        let a = ns[0].ctl_json(&["ca", "export", "--type", kind]);
        let b = ns[1].ctl_json(&["ca", "export", "--type", kind]);
        assert_eq!(a, b, "{kind}");
    }
}

fn a_clone_racing_the_original_through_two_nodes_commits_once_and_locks_once(shared: Shared) {
    let ns = nodes(&shared, 2, &[]);
    let front = Front::start(&[addr(&ns[0]), addr(&ns[1])], Policy::RoundRobin);
    let tok = token_via(&ns[0], &front, "sensor");
    let d = Device::new();
    d.join(&tok.join_uri);
    // The clone: a copy of the whole storage directory (a cloned VM, a restored backup).
    let clone_storage = d.path("clone-storage");
    let cp = std::process::Command::new("cp")
        .args(["-a"])
        .arg(&d.storage)
        .arg(&clone_storage)
        .status()
        .unwrap();
    assert!(cp.success());
    let clone_out: PathBuf = d.path("clone-out");
    let before = front.served().len();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| d.oneshot(&[]));
        let b = s.spawn(|| {
            d.start_cmd_at(&clone_storage, &clone_out, &["--oneshot"])
                .output()
                .unwrap()
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    let won = [&a, &b].iter().filter(|o| o.status.success()).count();
    assert_eq!(
        won,
        1,
        "exactly one copy renews:\n{}\n---\n{}",
        stderr(&a),
        stderr(&b)
    );
    let served: Vec<_> = front.served()[before..].to_vec();
    assert!(
        served.contains(&addr(&ns[0])) && served.contains(&addr(&ns[1])),
        "the copies went through both nodes: {served:?}"
    );
    for n in &ns {
        let locks = n.locks();
        assert_eq!(locks.len(), 1, "exactly one lock: {locks:?}");
        assert_eq!(s(&locks[0]["target"]["join_token"]), tok.name, "{locks:?}");
    }
    let t = ns[1].token(&tok.name);
    let inst = ns[1].instance(&s(&t["bound_instance_id"]));
    assert_eq!(inst["generation"], 2, "one commit: {inst}");
}

fn a_node_killed_after_it_committed_loses_nothing_and_the_device_completes_on_the_other(
    shared: Shared,
) {
    // Node 0 dies right after its second commit (the first is the device's join) is durable,
    // before it can answer: the device's renewal was accepted and its result lost.
    let ns = nodes(
        &shared,
        2,
        &[&[("BOUNDKEY_AUTHD_CRASH_AT", "after-commit:2")], &[]],
    );
    let front = Front::start(&[addr(&ns[0]), addr(&ns[1])], Policy::Failover);
    let tok = token_via(&ns[1], &front, "sensor");
    let d = Device::new();
    d.join(&tok.join_uri);
    assert!(
        front.served().iter().all(|a| *a == addr(&ns[0])),
        "the join and its heartbeat went to node 0"
    );
    let o = d.oneshot(&[]);
    assert_ok(&o);
    let served = front.served();
    assert_eq!(
        served.last(),
        Some(&addr(&ns[1])),
        "completed on node 1: {served:?}"
    );
    // Node 0 committed generation 2 and died; node 1 recognised the retry (the same, proven,
    // never-certified identity key) and delivered again, so the device kept its instance, did
    // not fall back to a recovery, and nothing is locked.
    let st = d.status();
    let inst = ns[1].instance(&s(&st["instance_id"]));
    assert!(st["generation"].as_u64().unwrap() >= 2, "{st}");
    assert_eq!(
        inst["generation"], st["generation"],
        "device and service agree"
    );
    let t = ns[1].token(&tok.name);
    assert_eq!(t["recovery_count"], 1, "{t}");
    assert_eq!(s(&t["bound_instance_id"]), s(&st["instance_id"]));
    assert!(ns[1].locks().is_empty(), "{:?}", ns[1].locks());
    d.verify_outputs();
    assert_ok(&d.oneshot(&[]));
}

#[test]
fn sqlite_two_nodes_serve_one_fleet_and_a_rotation_through_one_reaches_the_other() {
    two_nodes_serve_one_fleet_and_a_rotation_through_one_reaches_the_other(Shared::sqlite());
}

#[test]
fn sqlite_a_clone_racing_the_original_through_two_nodes_commits_once_and_locks_once() {
    a_clone_racing_the_original_through_two_nodes_commits_once_and_locks_once(Shared::sqlite());
}

#[test]
fn sqlite_a_node_killed_after_it_committed_loses_nothing_and_the_device_completes_on_the_other() {
    a_node_killed_after_it_committed_loses_nothing_and_the_device_completes_on_the_other(
        Shared::sqlite(),
    );
}

#[test]
fn postgres_two_nodes_serve_one_fleet_and_a_rotation_through_one_reaches_the_other() {
    two_nodes_serve_one_fleet_and_a_rotation_through_one_reaches_the_other(Shared::postgres());
}

#[test]
fn postgres_a_clone_racing_the_original_through_two_nodes_commits_once_and_locks_once() {
    a_clone_racing_the_original_through_two_nodes_commits_once_and_locks_once(Shared::postgres());
}

#[test]
fn postgres_a_node_killed_after_it_committed_loses_nothing_and_the_device_completes_on_the_other() {
    a_node_killed_after_it_committed_loses_nothing_and_the_device_completes_on_the_other(
        Shared::postgres(),
    );
}
