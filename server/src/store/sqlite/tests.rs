#![allow(clippy::unwrap_used, clippy::expect_used)]

use boundkey_auth::admin::{new_bound_keypair_token, NewBoundKeypairToken};
use boundkey_auth::model::{InstanceSpec, InstanceStatus, LockTarget};
use boundkey_auth::store::TokenWrite;
use boundkey_proto::JoinMethod;

use super::*;

fn open(dir: &tempfile::TempDir) -> SqliteStore {
    SqliteStore::open(dir.path().join("boundkey.db")).unwrap()
}

fn token(name: &str) -> Token {
    let (t, _) = new_bound_keypair_token(
        NewBoundKeypairToken {
            name: Some(name.into()),
            bot_name: "robot".into(),
            ..Default::default()
        },
        100,
    )
    .unwrap();
    t
}

fn instance(id: &str, bot: &str, expires: UnixTime) -> BotInstance {
    BotInstance {
        spec: InstanceSpec {
            bot_name: bot.into(),
            instance_id: id.into(),
            previous_instance_id: None,
            join_method: JoinMethod::BoundKeypair,
            join_token: "tok".into(),
            created_at: 100,
        },
        status: InstanceStatus {
            generation: 1,
            expires,
            initial_authentication: None,
            latest_authentications: vec![],
            initial_heartbeat: None,
            latest_heartbeats: vec![],
            ek_identity: None,
        },
        revision: 0,
    }
}

fn audit(kind: &str, time: UnixTime) -> AuditEvent {
    AuditEvent::new(kind, time, true)
}

fn bot(name: &str) -> Bot {
    Bot {
        name: name.into(),
        created_at: 1,
    }
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
fn token_revisions_and_spec_update_never_touch_status() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    let mut t = token("t1");
    t.revision = 77; // ignored: creation always starts at 1
    s.create_token(&t).unwrap();
    assert!(matches!(
        s.create_token(&t),
        Err(StoreError::AlreadyExists(_))
    ));
    let got = s.get_token("t1").unwrap().unwrap();
    assert_eq!(got.revision, 1);
    assert_eq!(got.spec, t.spec);
    assert_eq!(got.status, t.status);

    // A ceremony writes status (revision 1 -> 2).
    let mut status = got.status.clone();
    status.bound_public_key = Some("ecdsa-sha2-nistp256 AAAA".into());
    status.recovery_count = 1;
    s.commit(&Commit {
        token: Some(TokenWrite {
            name: "t1".into(),
            expected_revision: 1,
            status: status.clone(),
        }),
        instance: InstanceWrite::Create(instance("i1", "robot", 1000)),
        audit: vec![],
        lock_guard: None,
    })
    .unwrap();

    // A spec edit based on a stale revision is refused; on the current one it applies and the
    // status the ceremony wrote survives even though the caller's copy had an old status.
    let mut spec = got.spec.clone();
    spec.expires = Some(5000);
    assert!(matches!(
        s.update_token_spec("t1", &spec, 1),
        Err(StoreError::Conflict(_))
    ));
    s.update_token_spec("t1", &spec, 2).unwrap();
    let after = s.get_token("t1").unwrap().unwrap();
    assert_eq!(after.revision, 3);
    assert_eq!(after.spec.expires, Some(5000));
    assert_eq!(after.status, status);
    assert!(matches!(
        s.update_token_spec("nope", &spec, 1),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn conflicting_commit_leaves_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    s.create_token(&token("t1")).unwrap();
    s.append_audit(&audit("token.created", 1)).unwrap();
    let before_token = s.get_token("t1").unwrap().unwrap();
    let before_audit = s.list_audit(&AuditQuery::default()).unwrap();

    let mut status = before_token.status.clone();
    status.bound_instance_id = Some("i-new".into());
    status.recovery_count = 1;
    let stale = Commit {
        token: Some(TokenWrite {
            name: "t1".into(),
            expected_revision: 0, // stale
            status,
        }),
        instance: InstanceWrite::Create(instance("i-new", "robot", 1000)),
        audit: vec![audit("bot.join", 2), audit("bound_keypair.recovery", 2)],
        lock_guard: None,
    };
    assert!(matches!(s.commit(&stale), Err(StoreError::Conflict(_))));
    assert_eq!(s.get_token("t1").unwrap().unwrap(), before_token);
    assert_eq!(s.get_instance("i-new").unwrap(), None);
    assert_eq!(s.list_audit(&AuditQuery::default()).unwrap(), before_audit);

    // Token CAS passes but the instance id is taken: still all-or-nothing.
    let mut existing = instance("i-old", "robot", 1000);
    s.commit(&Commit {
        token: None,
        instance: InstanceWrite::Create(existing.clone()),
        audit: vec![],
        lock_guard: None,
    })
    .unwrap();
    existing.status.generation = 9;
    let dup = Commit {
        token: Some(TokenWrite {
            name: "t1".into(),
            expected_revision: 1,
            status: before_token.status.clone(),
        }),
        instance: InstanceWrite::Create(existing),
        audit: vec![audit("bot.join", 3)],
        lock_guard: None,
    };
    assert!(matches!(s.commit(&dup), Err(StoreError::AlreadyExists(_))));
    assert_eq!(s.get_token("t1").unwrap().unwrap().revision, 1);
    assert_eq!(
        s.get_instance("i-old").unwrap().unwrap().status.generation,
        1
    );
    assert_eq!(s.list_audit(&AuditQuery::default()).unwrap(), before_audit);

    // Stale instance revision on update: nothing written either.
    let mut upd = s.get_instance("i-old").unwrap().unwrap();
    upd.status.generation = 2;
    let stale_inst = Commit {
        token: Some(TokenWrite {
            name: "t1".into(),
            expected_revision: 1,
            status: before_token.status.clone(),
        }),
        instance: InstanceWrite::Update {
            instance: upd.clone(),
            expected_revision: 5,
        },
        audit: vec![audit("bot.join", 4)],
        lock_guard: None,
    };
    assert!(matches!(
        s.commit(&stale_inst),
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.get_token("t1").unwrap().unwrap().revision, 1);
    assert_eq!(s.list_audit(&AuditQuery::default()).unwrap(), before_audit);

    // And the fresh version commits everything.
    let good = Commit {
        instance: InstanceWrite::Update {
            instance: upd,
            expected_revision: 1,
        },
        ..stale_inst
    };
    s.commit(&good).unwrap();
    assert_eq!(s.get_token("t1").unwrap().unwrap().revision, 2);
    let i = s.get_instance("i-old").unwrap().unwrap();
    assert_eq!((i.revision, i.status.generation), (2, 2));
    assert_eq!(s.list_audit(&AuditQuery::default()).unwrap().len(), 2);
}

#[test]
fn commit_to_missing_token_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    let c = Commit {
        token: Some(TokenWrite {
            name: "ghost".into(),
            expected_revision: 1,
            status: TokenStatus::default(),
        }),
        instance: InstanceWrite::Create(instance("i1", "robot", 1)),
        audit: vec![],
        lock_guard: None,
    };
    assert!(matches!(s.commit(&c), Err(StoreError::NotFound(_))));
    assert_eq!(s.get_instance("i1").unwrap(), None);
}

#[test]
fn instance_update_cas_list_and_purge() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    for (id, bot, exp) in [("a", "r1", 100), ("b", "r2", 200), ("c", "r1", 300)] {
        s.commit(&Commit {
            token: None,
            instance: InstanceWrite::Create(instance(id, bot, exp)),
            audit: vec![],
            lock_guard: None,
        })
        .unwrap();
    }
    let mut a = s.get_instance("a").unwrap().unwrap();
    assert_eq!(a.revision, 1);
    a.status.expires = 1000;
    s.update_instance(&a, 1).unwrap();
    assert!(matches!(
        s.update_instance(&a, 1),
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.update_instance(&instance("zz", "r1", 1), 1),
        Err(StoreError::NotFound(_))
    ));
    let a = s.get_instance("a").unwrap().unwrap();
    assert_eq!((a.revision, a.status.expires), (2, 1000));

    let ids = |v: Vec<BotInstance>| {
        v.into_iter()
            .map(|i| i.spec.instance_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(s.list_instances(None).unwrap()), ["a", "b", "c"]);
    assert_eq!(ids(s.list_instances(Some("r1")).unwrap()), ["a", "c"]);
    // Purge uses the `expires` column, which update_instance must keep in step with the doc.
    assert_eq!(s.purge_instances(300).unwrap(), 1);
    assert_eq!(ids(s.list_instances(None).unwrap()), ["a", "c"]);
    assert!(s.delete_instance("c").unwrap());
    assert!(!s.delete_instance("c").unwrap());
}

#[test]
fn locks_are_added_only_if_absent() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    let lock = Lock {
        name: "auto-t1".into(),
        target: LockTarget::JoinToken("t1".into()),
        message: "first".into(),
        expires: None,
        created_by: "system".into(),
        created_at: 1,
    };
    assert!(s.add_lock(&lock).unwrap());
    let second = Lock {
        message: "second".into(),
        ..lock.clone()
    };
    assert!(!s.add_lock(&second).unwrap());
    assert_eq!(s.list_locks().unwrap(), vec![lock]);
    assert!(s.delete_lock("auto-t1").unwrap());
    assert!(!s.delete_lock("auto-t1").unwrap());
    assert!(s.list_locks().unwrap().is_empty());
}

#[test]
fn audit_is_newest_first_and_filterable() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    for (i, kind) in ["bot.join", "lock.created", "bot.join", "bot.join"]
        .iter()
        .enumerate()
    {
        let mut ev = audit(kind, 10 + i as i64);
        ev.token_name = Some(format!("t{i}"));
        s.append_audit(&ev).unwrap();
    }
    let all = s.list_audit(&AuditQuery::default()).unwrap();
    assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), [4, 3, 2, 1]);
    assert_eq!(all[0].token_name.as_deref(), Some("t3"));
    let joins = s
        .list_audit(&AuditQuery {
            kind: Some("bot.join".into()),
            limit: Some(2),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(joins.iter().map(|e| e.id).collect::<Vec<_>>(), [4, 3]);
    let since = s
        .list_audit(&AuditQuery {
            since: Some(12),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(since.iter().map(|e| e.id).collect::<Vec<_>>(), [4, 3]);
}

#[test]
fn bots_and_cascading_delete() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    s.create_bot(&bot("robot")).unwrap();
    s.create_bot(&bot("other")).unwrap();
    assert!(matches!(
        s.create_bot(&bot("robot")),
        Err(StoreError::AlreadyExists(_))
    ));
    s.create_token(&token("t1")).unwrap();
    s.commit(&Commit {
        token: None,
        instance: InstanceWrite::Create(instance("i1", "robot", 1)),
        audit: vec![],
        lock_guard: None,
    })
    .unwrap();
    s.commit(&Commit {
        token: None,
        instance: InstanceWrite::Create(instance("i2", "other", 1)),
        audit: vec![],
        lock_guard: None,
    })
    .unwrap();
    assert_eq!(s.list_bots().unwrap().len(), 2);
    assert!(s.delete_bot("robot").unwrap());
    assert!(!s.delete_bot("robot").unwrap());
    assert_eq!(s.get_bot("robot").unwrap(), None);
    assert_eq!(s.get_token("t1").unwrap(), None);
    assert_eq!(s.get_instance("i1").unwrap(), None);
    assert!(s.get_instance("i2").unwrap().is_some());
}

#[test]
fn authority_insert_then_cas() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    assert!(s.load_authority().unwrap().is_none());
    let st = AuthorityState::generate("c1", 1000).unwrap();
    assert!(matches!(
        s.save_authority(&st, Some(1)),
        Err(StoreError::Conflict(_))
    ));
    s.save_authority(&st, None).unwrap();
    assert!(matches!(
        s.save_authority(&st, None),
        Err(StoreError::AlreadyExists(_))
    ));
    let (loaded, rev) = s.load_authority().unwrap().unwrap();
    assert_eq!((loaded, rev), (st.clone(), 1));
    s.save_authority(&st, Some(1)).unwrap();
    assert!(matches!(
        s.save_authority(&st, Some(1)),
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.load_authority().unwrap().unwrap().1, 2);
}

#[test]
fn data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(&dir);
        s.create_bot(&bot("robot")).unwrap();
        s.create_token(&token("t1")).unwrap();
        s.append_audit(&audit("token.created", 5)).unwrap();
        s.commit(&Commit {
            token: None,
            instance: InstanceWrite::Create(instance("i1", "robot", 77)),
            audit: vec![audit("bot.join", 6)],
            lock_guard: None,
        })
        .unwrap();
    }
    let s = open(&dir);
    assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
    assert!(s.get_bot("robot").unwrap().is_some());
    assert_eq!(s.get_token("t1").unwrap().unwrap().revision, 1);
    assert_eq!(s.get_instance("i1").unwrap().unwrap().status.expires, 77);
    // Ids keep increasing across reopen.
    s.append_audit(&audit("x", 7)).unwrap();
    let ids: Vec<_> = s
        .list_audit(&AuditQuery::default())
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, [3, 2, 1]);
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

#[test]
fn concurrent_commits_on_one_token_only_one_wins() {
    // Two connections (as two auth service processes would have) racing on the same revision.
    let dir = tempfile::tempdir().unwrap();
    let a = std::sync::Arc::new(open(&dir));
    a.create_token(&token("t1")).unwrap();
    let b = std::sync::Arc::new(open(&dir));
    let handles: Vec<_> = [a, b]
        .into_iter()
        .enumerate()
        .map(|(n, s)| {
            std::thread::spawn(move || {
                s.commit(&Commit {
                    token: Some(TokenWrite {
                        name: "t1".into(),
                        expected_revision: 1,
                        status: TokenStatus {
                            bound_instance_id: Some(format!("i{n}")),
                            ..Default::default()
                        },
                    }),
                    instance: InstanceWrite::Create(instance(&format!("i{n}"), "robot", 1)),
                    audit: vec![audit("bot.join", 1)],
                    lock_guard: None,
                })
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    assert!(results
        .iter()
        .any(|r| matches!(r, Err(StoreError::Conflict(_)))));
    let s = open(&dir);
    assert_eq!(s.list_instances(None).unwrap().len(), 1);
    assert_eq!(s.list_audit(&AuditQuery::default()).unwrap().len(), 1);
    let t = s.get_token("t1").unwrap().unwrap();
    assert_eq!(t.revision, 2);
    assert_eq!(
        t.status.bound_instance_id,
        Some(s.list_instances(None).unwrap()[0].spec.instance_id.clone())
    );
}

/// Issue 8 defect 7: the commit re-reads the locks inside its transaction, so a lock placed
/// after the ceremony's snapshot stops it and nothing is written.
#[test]
fn commit_is_refused_by_an_active_lock_on_a_guarded_target() {
    use boundkey_auth::store::LockGuard;
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    s.create_token(&token("t1")).unwrap();
    let lock = |name: &str, target: LockTarget, expires: Option<UnixTime>| Lock {
        name: name.into(),
        target,
        message: "m".into(),
        expires,
        created_by: "admin".into(),
        created_at: 1,
    };
    // Expired, and on another target: neither stops the commit below.
    s.add_lock(&lock("old", LockTarget::Bot("robot".into()), Some(50)))
        .unwrap();
    s.add_lock(&lock("other", LockTarget::Bot("other".into()), None))
        .unwrap();
    let commit = |id: &str| Commit {
        token: Some(TokenWrite {
            name: "t1".into(),
            expected_revision: s.get_token("t1").unwrap().unwrap().revision,
            status: TokenStatus::default(),
        }),
        instance: InstanceWrite::Create(instance(id, "robot", 1000)),
        audit: vec![audit("bot.join", 100)],
        lock_guard: Some(LockGuard {
            targets: vec![
                LockTarget::Bot("robot".into()),
                LockTarget::JoinToken("t1".into()),
            ],
            at: 100,
        }),
    };
    s.commit(&commit("i1")).unwrap();
    s.add_lock(&lock("new", LockTarget::JoinToken("t1".into()), None))
        .unwrap();
    let before = s.get_token("t1").unwrap().unwrap();
    let audit_before = s.list_audit(&AuditQuery::default()).unwrap().len();
    match s.commit(&commit("i2")) {
        Err(StoreError::Locked(name)) => assert_eq!(name, "new"),
        other => panic!("expected Locked, got {other:?}"),
    }
    assert_eq!(s.get_token("t1").unwrap().unwrap(), before);
    assert_eq!(s.get_instance("i2").unwrap(), None);
    assert_eq!(
        s.list_audit(&AuditQuery::default()).unwrap().len(),
        audit_before
    );
}

/// Issue 8 defect 6: audit retention.
#[test]
fn purge_audit_deletes_only_events_older_than_the_cutoff() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    for t in [10, 20, 30] {
        s.append_audit(&audit("bot.join", t)).unwrap();
    }
    assert_eq!(s.purge_audit(20).unwrap(), 1);
    let left: Vec<_> = s
        .list_audit(&AuditQuery::default())
        .unwrap()
        .into_iter()
        .map(|e| e.time)
        .collect();
    assert_eq!(left, vec![30, 20]);
    // Ids keep increasing after a purge.
    s.append_audit(&audit("bot.join", 40)).unwrap();
    let ids: Vec<_> = s
        .list_audit(&AuditQuery::default())
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, vec![4, 3, 2]);
}
