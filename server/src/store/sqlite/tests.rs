//! What only the SQLite store has: the file, WAL, `user_version` migrations. Everything the
//! `Store` trait promises is tested for every store in `store/suite.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use boundkey_auth::model::LockTarget;

use super::*;

fn open(dir: &tempfile::TempDir) -> SqliteStore {
    SqliteStore::open(dir.path().join("boundkey.db")).unwrap()
}

#[test]
fn fresh_database_has_current_schema_and_wal() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
    let mode: String = s
        .conn()
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn garbage_file_gives_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("boundkey.db");
    std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
    let err = SqliteStore::open(&path).err().unwrap().to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("not a usable"), "{err}");
}

/// A database with many pages, then a page in its middle overwritten (page 1, the header and
/// schema, intact): the damage only a whole-file check finds.
fn damaged_database(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("boundkey.db");
    {
        let s = SqliteStore::open(&path).unwrap();
        let c = s.conn().unwrap();
        c.execute_batch("CREATE TABLE filler (x BLOB); CREATE INDEX filler_x ON filler(x);")
            .unwrap();
        for i in 0..2000u32 {
            c.execute(
                "INSERT INTO filler VALUES (?1)",
                [i.to_le_bytes().repeat(64)],
            )
            .unwrap();
        }
        c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
    }
    let mut bytes = std::fs::read(&path).unwrap();
    let page = 4096;
    let middle = (bytes.len() / page / 2) * page;
    for b in &mut bytes[middle..middle + page] {
        *b = 0x5a;
    }
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn a_damaged_file_is_refused_at_open_and_a_large_one_is_checked_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let path = damaged_database(&dir);
    // Small enough to check before serving: refused, naming the file.
    let err = SqliteStore::open(&path).err().expect("refused").to_string();
    assert!(
        err.contains("integrity check") && err.contains(&path.display().to_string()),
        "{err}"
    );
    // Over the limit: the service starts, and the check that runs beside it finds the damage.
    let s = SqliteStore::open_checking(&path, 0).unwrap();
    let verdict = s.wait_background_check().expect("a background check ran");
    assert_ne!(verdict, "ok");
    // A sound file passes either way.
    let sound = tempfile::tempdir().unwrap();
    drop(open(&sound));
    let s = SqliteStore::open_checking(sound.path().join("boundkey.db"), 0).unwrap();
    assert_eq!(s.wait_background_check().as_deref(), Some("ok"));
    assert!(
        open(&sound).wait_background_check().is_none(),
        "checked at open instead"
    );
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("boundkey.db");
    {
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", 999).unwrap();
    }
    let err = SqliteStore::open(&path).err().unwrap();
    assert!(matches!(err, OpenError::TooNew { found: 999, .. }), "{err}");
}

/// A database written before migration 3 (no `created_at`, target or audit `bot_name`
/// columns) gets them filled from its documents, so old rows page, lock and filter like new.
#[test]
fn migration_3_fills_the_new_columns_from_existing_documents() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("boundkey.db");
    {
        let c = Connection::open(&path).unwrap();
        for sql in &MIGRATIONS[..2] {
            c.execute_batch(sql).unwrap();
        }
        c.pragma_update(None, "user_version", 2).unwrap();
        let inst = serde_json::json!({
            "spec": {"bot_name": "robot", "instance_id": "i1", "join_method": "bound_keypair",
                     "join_token": "t", "created_at": 1234},
            "status": {"generation": 1, "expires": 99, "initial_authentication": null},
            "revision": 1
        });
        c.execute(
            "INSERT INTO instances (id, bot_name, expires, doc, revision) VALUES ('i1', 'robot', 99, ?1, 1)",
            [inst.to_string()],
        )
        .unwrap();
        for (name, target) in [
            ("l-bot", serde_json::json!({"bot": "robot"})),
            ("l-inst", serde_json::json!({"bot_instance_id": "i1"})),
            ("l-tok", serde_json::json!({"join_token": "t"})),
        ] {
            let doc = serde_json::json!({"name": name, "target": target, "message": "m",
                                         "created_by": "x", "created_at": 1});
            c.execute(
                "INSERT INTO locks (name, doc) VALUES (?1, ?2)",
                [name.to_string(), doc.to_string()],
            )
            .unwrap();
        }
        let ev = serde_json::json!({"time": 5, "type": "bot.join", "success": true,
                                    "bot_name": "robot"});
        c.execute(
            "INSERT INTO audit (time, type, doc) VALUES (5, 'bot.join', ?1)",
            [ev.to_string()],
        )
        .unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
    let page = s
        .page_instances(&InstanceQuery {
            created_since: Some(1234),
            ..InstanceQuery::first(10, 0)
        })
        .unwrap();
    assert_eq!(page.len(), 1);
    for (target, name) in [
        (LockTarget::Bot("robot".into()), "l-bot"),
        (LockTarget::BotInstanceId("i1".into()), "l-inst"),
        (LockTarget::JoinToken("t".into()), "l-tok"),
    ] {
        let found = s.locks_for(std::slice::from_ref(&target)).unwrap();
        assert_eq!(found.len(), 1, "{target:?}");
        assert_eq!(found[0].name, name);
    }
    let by_bot = s
        .list_audit(&AuditQuery {
            bot: Some("robot".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(by_bot.len(), 1);
}

/// The statements every ceremony, heartbeat and page runs are planned once and then reused
/// with new bindings. With bound values visible to the planner (SQLite's default), each new
/// binding of a LIMIT expires the statement and every run parses and plans it again.
#[test]
fn hot_statements_are_not_planned_again_for_new_bindings() {
    use boundkey_auth::model::Lock;
    use boundkey_auth::store::{AuditQuery, InstanceQuery};
    use rusqlite::StatementStatus;

    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    let target = |n: u32| LockTarget::Bot(format!("bot{n}"));
    s.add_lock(&Lock {
        name: "l".into(),
        target: target(1),
        message: "m".into(),
        expires: None,
        created_by: "admin".into(),
        created_at: 1,
    })
    .unwrap();
    s.append_audit(&boundkey_auth::model::AuditEvent::new("x", 1, true))
        .unwrap();
    for n in 0..5u32 {
        assert_eq!(
            s.locks_for(&[target(n % 2)]).unwrap().len(),
            (n % 2) as usize
        );
        s.page_instances(&InstanceQuery::first(10 + n as usize, 5))
            .unwrap();
        s.list_audit(&AuditQuery {
            limit: Some(10 + n as usize),
            ..AuditQuery::default()
        })
        .unwrap();
    }
    let conn = s.conn().unwrap();
    for sql in [
        query::locks_for(Dialect::Sqlite, "name, doc", &[target(0)]).sql,
        query::instances(
            Dialect::Sqlite,
            "id, doc, revision",
            &InstanceQuery::first(1, 5),
        )
        .sql,
        query::audit(
            Dialect::Sqlite,
            "id, doc",
            &AuditQuery {
                limit: Some(1),
                ..AuditQuery::default()
            },
        )
        .sql,
    ] {
        let stmt = conn.prepare_cached(&sql).unwrap();
        assert_eq!(stmt.get_status(StatementStatus::RePrepare), 0, "{sql}");
        assert!(
            stmt.get_status(StatementStatus::Run) >= 5,
            "{sql} was not the one run"
        );
    }
}
