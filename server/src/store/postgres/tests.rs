//! What only the PostgreSQL store has: connecting (password, TLS modes), its migrations and
//! their advisory lock. Everything the `Store` trait promises is tested for every store in
//! `store/suite.rs`, against a real server too.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Barrier};

use boundkey_auth::model::LockTarget;
use boundkey_auth::store::Store;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

use super::*;
use crate::store::suite::{Backend, Postgres};

fn with_password(pw: &str) -> PostgresOptions {
    PostgresOptions {
        password: Some(Zeroizing::new(pw.to_string())),
        pool_size: 2,
    }
}

#[test]
fn fresh_database_gets_every_migration_once_even_when_services_start_together() {
    let pg = Postgres::fresh();
    let barrier = Arc::new(Barrier::new(4));
    let opened: Vec<_> = (0..4)
        .map(|_| {
            let (url, opts, barrier) = (pg.url.clone(), pg.options(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                PostgresStore::open(&url, &opts).map(|_| ())
            })
        })
        .collect();
    for h in opened {
        h.join().unwrap().unwrap();
    }
    let s = pg.open_pg();
    assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
    let recorded = pg
        .server
        .psql("boundkey", "SELECT count(*) FROM schema_migrations");
    assert_eq!(recorded.trim(), MIGRATIONS.len().to_string());
}

#[test]
fn newer_schema_is_refused() {
    let pg = Postgres::fresh();
    drop(pg.open_pg());
    pg.server.psql(
        "boundkey",
        "INSERT INTO schema_migrations (version) VALUES (999)",
    );
    let err = PostgresStore::open(&pg.url, &pg.options()).err().unwrap();
    assert!(matches!(err, OpenError::TooNew { found: 999, .. }), "{err}");
    assert!(err.to_string().contains(&pg.url.to_string()), "{err}");
}

#[test]
fn a_wrong_or_missing_password_fails_at_open_naming_the_database() {
    let pg = Postgres::fresh();
    for opts in [with_password("wrong"), PostgresOptions::default()] {
        let err = PostgresStore::open(&pg.url, &opts).err().unwrap();
        assert!(matches!(err, OpenError::Connect { .. }), "{err}");
        let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(text.contains(&pg.url.to_string()), "{text}");
        assert!(text.contains("password"), "{text}");
        assert!(!text.contains(pg.server.password()), "{text}");
    }
}

#[test]
fn sslmode_require_refuses_a_server_without_tls() {
    let pg = Postgres::fresh();
    let url = PostgresUrl::parse(
        &pg.url
            .to_string()
            .replace("sslmode=disable", "sslmode=require"),
    )
    .unwrap();
    let err = PostgresStore::open(&url, &pg.options()).err().unwrap();
    let text = format!("{err}: {:?}", std::error::Error::source(&err));
    assert!(text.to_lowercase().contains("tls"), "{text}");
    // prefer falls back to plain text.
    let url = PostgresUrl::parse(
        &pg.url
            .to_string()
            .replace("sslmode=disable", "sslmode=prefer"),
    )
    .unwrap();
    PostgresStore::open(&url, &pg.options()).unwrap();
}

/// A CA and a server certificate for `names`; returns (CA PEM, chain PEM, key PEM).
fn server_cert(names: &[&str]) -> (String, String, String) {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca_cert.pem(), leaf.pem(), key.serialize_pem())
}

/// libpq's modes against a TLS server whose certificate names `db.test` (not the address we
/// connect to): verify-full checks the name and refuses, verify-ca checks only the chain,
/// require without a root accepts any certificate, and a wrong root is refused.
#[test]
fn tls_modes_verify_what_they_promise() {
    let (ca, chain, key) = server_cert(&["db.test"]);
    let server = boundkey_testkit::Postgres::start_with_tls(&chain, &key);
    let base = server.create_database("boundkey");
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ca).unwrap();
    let (other_ca, _, _) = server_cert(&["db.test"]);
    let other_path = dir.path().join("other.pem");
    std::fs::write(&other_path, &other_ca).unwrap();
    let opts = with_password(server.password());
    let open = |mode: &str, root: Option<&std::path::Path>| {
        let mut url = base.replace("sslmode=disable", &format!("sslmode={mode}"));
        if let Some(r) = root {
            url.push_str(&format!("&sslrootcert={}", r.display()));
        }
        PostgresStore::open(&PostgresUrl::parse(&url).unwrap(), &opts)
            .map(|s| s.schema_version().unwrap())
    };
    assert!(
        open("verify-full", Some(&ca_path)).is_err(),
        "name mismatch"
    );
    assert!(open("verify-ca", Some(&ca_path)).is_ok());
    assert!(open("verify-ca", Some(&other_path)).is_err(), "wrong CA");
    assert!(
        open("require", Some(&other_path)).is_err(),
        "require with a root verifies it"
    );
    assert!(open("require", None).is_ok());
    // The connection really is encrypted.
    let s = PostgresStore::open(
        &PostgresUrl::parse(&base.replace("sslmode=disable", "sslmode=require")).unwrap(),
        &opts,
    )
    .unwrap();
    let ssl: bool = s
        .conn()
        .unwrap()
        .db()
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(ssl);
}

/// verify-full succeeds when the name matches (an IP address SAN for 127.0.0.1).
#[test]
fn tls_verify_full_accepts_the_right_name() {
    let (ca, chain, key) = server_cert(&["127.0.0.1"]);
    let server = boundkey_testkit::Postgres::start_with_tls(&chain, &key);
    let base = server.create_database("boundkey");
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ca).unwrap();
    let url = format!(
        "{}&sslrootcert={}",
        base.replace("sslmode=disable", "sslmode=verify-full"),
        ca_path.display()
    );
    let s = PostgresStore::open(
        &PostgresUrl::parse(&url).unwrap(),
        &with_password(server.password()),
    )
    .unwrap();
    assert!(s.list_bots().unwrap().is_empty());
}

/// A statement is prepared once per connection and then reused: the hot lookups are one round
/// trip each, not a prepare and a run. The server's own list of prepared statements shows it.
#[test]
fn statements_are_prepared_once_per_connection() {
    let pg = Postgres::fresh();
    let s = PostgresStore::open(
        &pg.url,
        &PostgresOptions {
            pool_size: 1,
            ..pg.options()
        },
    )
    .unwrap();
    let targets = [LockTarget::Bot("b".into())];
    for _ in 0..5 {
        assert!(s.get_instance("no-such-instance").unwrap().is_none());
        assert!(s.locks_for(&targets).unwrap().is_empty());
    }
    let prepared = |like: &str| -> i64 {
        s.conn()
            .unwrap()
            .db()
            .query_one(
                "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE $1",
                &[&like],
            )
            .unwrap()
            .get(0)
    };
    assert_eq!(prepared("%FROM instances WHERE id = $1%"), 1);
    assert_eq!(prepared("%FROM locks WHERE%"), 1);
}
