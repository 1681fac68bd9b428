//! Fleet-sized views through `boundkeyctl` against a running authd, on SQLite and on a real
//! PostgreSQL server: paged listings with cursors and filters, and lock checks that look
//! locks up by target. Also how authd refuses PostgreSQL settings it must not use.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use boundkey_proto::ErrorCode;
use common::*;
use serde_json::Value;

/// authd on a fresh database of a private PostgreSQL server, the password in a file.
struct OnPostgres {
    server: Server,
    _pg: boundkey_testkit::Postgres,
}

fn start_on_postgres() -> OnPostgres {
    let pg = boundkey_testkit::Postgres::start();
    let url = pg.create_database("boundkey");
    let pw = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(pw.path(), format!("{}\n", pg.password())).unwrap();
    let server = Server::start_with(&[
        "--storage",
        &url,
        "--storage-password-file",
        pw.path().to_str().unwrap(),
    ]);
    assert!(
        !server.data_dir.join("boundkey.db").exists(),
        "no SQLite file with postgres:// storage"
    );
    OnPostgres { server, _pg: pg }
}

/// Every item of a listing, following `next` with pages of `limit`; checks each page's size.
fn walk(s: &Server, args: &[&str], key: &str, limit: usize) -> Vec<Value> {
    let mut items = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let limit_s = limit.to_string();
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["--limit", &limit_s]);
        if let Some(c) = &after {
            a.extend(["--after", c]);
        }
        let page = s.ctl(&a);
        let got = page[key].as_array().unwrap().clone();
        assert!(got.len() <= limit, "{page}");
        items.extend(got.clone());
        match page["next"].as_str() {
            Some(c) => {
                assert_eq!(got.len(), limit, "a page with a next is full: {page}");
                after = Some(c.to_string());
            }
            None => return items,
        }
    }
}

fn names(v: &[Value], field: &str) -> Vec<String> {
    v.iter()
        .map(|i| i[field].as_str().unwrap().to_string())
        .collect()
}

async fn paged_views_and_locks_by_target(s: &Server) {
    s.ctl(&["bots", "add", "robot"]);
    s.ctl(&["bots", "add", "other"]);
    let mut tokens = Vec::new();
    for (n, bot) in ["robot", "robot", "robot", "other", "robot"]
        .iter()
        .enumerate()
    {
        let name = format!("tok-{n}");
        let v = s.ctl(&["tokens", "add", "--bot", bot, "--name", &name]);
        tokens.push((name, v["registration_secret"].as_str().unwrap().to_string()));
    }

    // Tokens: name order, every one exactly once whatever the page size; --bot filters.
    for limit in [1, 2, 10] {
        let all = walk(s, &["tokens", "ls"], "tokens", limit);
        assert_eq!(
            names(&all, "name"),
            ["tok-0", "tok-1", "tok-2", "tok-3", "tok-4"]
        );
    }
    let other = walk(s, &["tokens", "ls", "--bot", "other"], "tokens", 1);
    assert_eq!(names(&other, "name"), ["tok-3"]);
    // Text output: a final line says how to get the next page.
    let text = s.ctl_raw(&["tokens", "ls", "--limit", "2"]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert_eq!(
        text.lines().last(),
        Some("next page: --after tok-1"),
        "{text}"
    );

    // Instances: one per joined device, in creation order, paged and filtered.
    let mut agents = Vec::new();
    let mut ids = Vec::new();
    for (name, secret) in &tokens {
        let mut a = Agent::new(s, name, Some(secret));
        ids.push(a.join().await.expect("join").instance_id);
        agents.push(a);
    }
    let mut all = BTreeSet::new();
    for limit in [1, 2, 100] {
        let got = names(
            &walk(s, &["instances", "ls"], "instances", limit),
            "instance_id",
        );
        assert_eq!(got.len(), 5, "{got:?}");
        all = got.iter().cloned().collect();
    }
    assert_eq!(all, ids.iter().cloned().collect());
    let robots = walk(s, &["instances", "ls", "--bot", "robot"], "instances", 2);
    assert_eq!(robots.len(), 4);
    assert!(robots.iter().all(|i| i["bot_name"] == "robot"));
    assert_eq!(
        walk(s, &["instances", "ls", "--state", "active"], "instances", 3).len(),
        5
    );
    assert!(walk(
        s,
        &["instances", "ls", "--state", "expired"],
        "instances",
        3
    )
    .is_empty());
    assert_eq!(
        walk(s, &["instances", "ls", "--since", "1h"], "instances", 3).len(),
        5
    );
    assert!(walk(s, &["instances", "ls", "--until", "1h"], "instances", 3).is_empty());
    let bad = s.ctl_raw(&["instances", "ls", "--after", "nonsense"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid instance cursor"));
    let too_big = s.ctl_raw(&["instances", "ls", "--limit", "5000"]);
    assert!(String::from_utf8_lossy(&too_big.stderr).contains("maximum page size"));
    let bots = s.ctl(&["bots", "ls"]);
    let robot = bots
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "robot")
        .unwrap();
    assert_eq!(
        (robot["tokens"].as_u64(), robot["instances"].as_u64()),
        (Some(4), Some(4))
    );
    assert_eq!(robot["active_instances"], 4);

    // Audit: newest first, paged, by bot.
    let joins = walk(s, &["audit", "ls", "--type", "bot.join"], "events", 2);
    assert_eq!(joins.len(), 5);
    let ids_desc: Vec<u64> = joins.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert!(ids_desc.windows(2).all(|w| w[0] > w[1]), "{ids_desc:?}");
    let other_events = walk(s, &["audit", "ls", "--bot", "other"], "events", 1);
    assert!(!other_events.is_empty());
    assert!(other_events.iter().all(|e| e["bot_name"] == "other"));

    // Locks are found by target: a lock on one token stops that device only.
    s.ctl(&["locks", "add", "--join-token", "tok-1", "--name", "stop-1"]);
    let e = agents[1].join().await.expect_err("locked token");
    assert_eq!(e.code, ErrorCode::Locked);
    agents[2].join().await.expect("an unlocked device renews");
    s.ctl(&["locks", "add", "--instance", &ids[2], "--name", "stop-i2"]);
    assert_eq!(
        agents[2].join().await.expect_err("locked instance").code,
        ErrorCode::Locked
    );
    s.ctl(&["locks", "add", "--bot", "other", "--name", "stop-other"]);
    assert_eq!(
        agents[3].join().await.expect_err("locked bot").code,
        ErrorCode::Locked
    );
    agents[0].join().await.expect("still unlocked");
    s.ctl(&["locks", "rm", "stop-1"]);
    agents[1].join().await.expect("unlocked again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_paged_views_and_locks_by_target() {
    let s = Server::start();
    paged_views_and_locks_by_target(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_paged_views_and_locks_by_target() {
    let pg = start_on_postgres();
    paged_views_and_locks_by_target(&pg.server).await;
}

/// authd stops with one clear line naming what is wrong, and never echoes a password.
#[test]
fn postgres_settings_authd_refuses() {
    let pg = boundkey_testkit::Postgres::start();
    let url = pg.create_database("boundkey");
    let dir = tempfile::tempdir().unwrap();
    let start = |storage: &str, env: &[(&str, &str)], extra: &[&str]| {
        let out = Command::new(AUTHD)
            .args(["start", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--cluster",
                "c",
                "--storage",
                storage,
            ])
            .args(extra)
            .env_remove("PGPASSWORD")
            .env_remove("BOUNDKEY_STORAGE_PASSWORD")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let last = err.lines().last().unwrap_or_default().to_string();
        assert!(last.starts_with("boundkey-authd: error: "), "{err}");
        last
    };
    let with_pw = url.replace("postgres://postgres@", "postgres://postgres:s3cret-pw@");
    let e = start(&with_pw, &[], &[]);
    assert!(e.contains("contains a password"), "{e}");
    assert!(!e.contains("s3cret-pw"), "{e}");

    let e = start(&url, &[("BOUNDKEY_STORAGE_PASSWORD", "wrong-pw")], &[]);
    assert!(
        e.contains(&url) && e.contains("password authentication failed"),
        "{e}"
    );
    assert!(!e.contains("wrong-pw"), "{e}");

    let e = start(&url, &[], &["--storage-password-file", "/nonexistent/pw"]);
    assert!(e.contains("/nonexistent/pw"), "{e}");

    let e = start(
        &url.replace("sslmode=disable", "sslmode=verify-full"),
        &[],
        &[],
    );
    assert!(e.contains("sslrootcert"), "{e}");

    // And with libpq's PGPASSWORD it starts: the first line of its summary appears.
    let mut child = boundkey_testkit::ChildGuard::spawn(
        Command::new(AUTHD)
            .args(["start", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--cluster",
                "c",
                "--storage",
                &url,
            ])
            .env_remove("BOUNDKEY_STORAGE_PASSWORD")
            .env("PGPASSWORD", pg.password())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null()),
    )
    .unwrap();
    let stdout = child.child().unwrap().stdout.take().unwrap();
    let first = std::io::BufRead::lines(std::io::BufReader::new(stdout))
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(first, "cluster: c");
}
