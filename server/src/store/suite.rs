//! One test suite for every [`Store`]: the memory store (the reference), SQLite (a real file)
//! and PostgreSQL (a real server per test, `boundkey_testkit::Postgres`). Each case is a
//! generic function; [`store_suite!`] instantiates all of them for one backend, so a case
//! added here runs against every store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Barrier};

use boundkey_auth::admin::{new_bound_keypair_token, NewBoundKeypairToken};
use boundkey_auth::authority::AuthorityState;
use boundkey_auth::model::{
    AuditEvent, Bot, BotInstance, InstanceSpec, InstanceStatus, Lock, LockTarget, Token,
    TokenStatus,
};
use boundkey_auth::store::{
    AuditQuery, BotCounts, Commit, InstanceCursor, InstanceQuery, InstanceState, InstanceWrite,
    LockGuard, Store, StoreError, TokenQuery, TokenWrite,
};
use boundkey_auth::UnixTime;
use boundkey_proto::JoinMethod;

/// A kind of store under test.
pub(crate) trait Backend: Sized {
    /// A fresh, empty database.
    fn fresh() -> Self;
    /// A new handle on that database: what a second auth service process would open.
    fn open(&self) -> Arc<dyn Store>;
}

pub(crate) struct Memory(Arc<boundkey_auth::store::memory::MemoryStore>);

impl Backend for Memory {
    fn fresh() -> Self {
        Memory(Arc::new(boundkey_auth::store::memory::MemoryStore::new()))
    }
    fn open(&self) -> Arc<dyn Store> {
        self.0.clone()
    }
}

pub(crate) struct Sqlite(tempfile::TempDir);

impl Backend for Sqlite {
    fn fresh() -> Self {
        Sqlite(tempfile::tempdir().unwrap())
    }
    fn open(&self) -> Arc<dyn Store> {
        Arc::new(super::SqliteStore::open(self.0.path().join("boundkey.db")).unwrap())
    }
}

/// A private server and one database in it.
pub(crate) struct Postgres {
    pub(crate) server: boundkey_testkit::Postgres,
    pub(crate) url: super::PostgresUrl,
}

impl Postgres {
    pub(crate) fn options(&self) -> super::PostgresOptions {
        super::PostgresOptions {
            password: Some(zeroize::Zeroizing::new(self.server.password().to_string())),
            pool_size: 4,
        }
    }

    pub(crate) fn open_pg(&self) -> super::PostgresStore {
        super::PostgresStore::open(&self.url, &self.options()).unwrap()
    }
}

impl Backend for Postgres {
    fn fresh() -> Self {
        let server = boundkey_testkit::Postgres::start();
        let url = super::PostgresUrl::parse(&server.create_database("boundkey")).unwrap();
        Postgres { server, url }
    }
    fn open(&self) -> Arc<dyn Store> {
        Arc::new(self.open_pg())
    }
}

/// Instantiates every case of the suite for one backend, as `#[test]`s in module `$name`.
macro_rules! store_suite {
    ($name:ident, $backend:ty) => {
        mod $name {
            use super::*;
            store_suite!(@cases $backend;
                token_revisions_and_spec_update_never_touch_status,
                conflicting_commit_leaves_nothing_written,
                commit_to_missing_token_is_not_found,
                instance_update_cas_list_and_purge,
                a_group_of_instance_writes_fails_only_where_its_revision_is_stale,
                locks_are_added_only_if_absent_and_found_by_target,
                audit_is_newest_first_and_filterable,
                bots_cascading_delete_and_counts,
                authority_insert_then_cas,
                data_survives_reopen,
                concurrent_commits_on_one_token_exactly_one_wins_per_revision,
                commit_is_refused_by_an_active_lock_on_a_guarded_target,
                purge_audit_deletes_only_events_older_than_the_cutoff,
                instance_pages_follow_the_cursor_and_filters,
                token_and_audit_pages_follow_the_cursor,
            );
        }
    };
    (@cases $backend:ty; $($case:ident,)*) => {
        $(
            #[test]
            fn $case() {
                super::$case::<$backend>();
            }
        )*
    };
}

store_suite!(memory, Memory);
store_suite!(sqlite, Sqlite);
store_suite!(postgres, Postgres);

fn token(name: &str) -> Token {
    token_of(name, "robot")
}

fn token_of(name: &str, bot: &str) -> Token {
    let (t, _) = new_bound_keypair_token(
        NewBoundKeypairToken {
            name: Some(name.into()),
            bot_name: bot.into(),
            ..Default::default()
        },
        100,
    )
    .unwrap();
    t
}

fn instance(id: &str, bot: &str, expires: UnixTime) -> BotInstance {
    instance_at(id, bot, 100, expires)
}

fn instance_at(id: &str, bot: &str, created_at: UnixTime, expires: UnixTime) -> BotInstance {
    BotInstance {
        spec: InstanceSpec {
            bot_name: bot.into(),
            instance_id: id.into(),
            previous_instance_id: None,
            join_method: JoinMethod::BoundKeypair,
            join_token: "tok".into(),
            created_at,
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

fn create(s: &dyn Store, i: BotInstance) {
    s.commit(&Commit {
        token: None,
        instance: InstanceWrite::Create(i),
        audit: vec![],
        lock_guard: None,
    })
    .unwrap();
}

fn audit(kind: &str, time: UnixTime) -> AuditEvent {
    AuditEvent::new(kind, time, true)
}

fn all_audit(s: &dyn Store) -> Vec<AuditEvent> {
    s.list_audit(&AuditQuery::default()).unwrap()
}

fn bot(name: &str) -> Bot {
    Bot {
        name: name.into(),
        created_at: 1,
    }
}

fn lock(name: &str, target: LockTarget, expires: Option<UnixTime>) -> Lock {
    Lock {
        name: name.into(),
        target,
        message: "m".into(),
        expires,
        created_by: "admin".into(),
        created_at: 1,
    }
}

fn ids(v: &[BotInstance]) -> Vec<&str> {
    v.iter().map(|i| i.spec.instance_id.as_str()).collect()
}

fn token_revisions_and_spec_update_never_touch_status<B: Backend>() {
    let b = B::fresh();
    let s = b.open();
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

fn conflicting_commit_leaves_nothing_written<B: Backend>() {
    let b = B::fresh();
    let s = b.open();
    s.create_token(&token("t1")).unwrap();
    s.append_audit(&audit("token.created", 1)).unwrap();
    let before_token = s.get_token("t1").unwrap().unwrap();
    let before_audit = all_audit(&*s);

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
    assert_eq!(all_audit(&*s), before_audit);

    // Token CAS passes but the instance id is taken: still all-or-nothing.
    let mut existing = instance("i-old", "robot", 1000);
    create(&*s, existing.clone());
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
    assert_eq!(all_audit(&*s), before_audit);

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
    assert_eq!(all_audit(&*s), before_audit);

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
    assert_eq!(all_audit(&*s).len(), 2);
}

fn commit_to_missing_token_is_not_found<B: Backend>() {
    let b = B::fresh();
    let s = b.open();
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

fn instance_update_cas_list_and_purge<B: Backend>() {
    let b = B::fresh();
    let s = b.open();
    for (id, bot, exp) in [("a", "r1", 100), ("b", "r2", 200), ("c", "r1", 300)] {
        create(&*s, instance(id, bot, exp));
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

    assert_eq!(ids(&s.list_instances(None).unwrap()), ["a", "b", "c"]);
    assert_eq!(ids(&s.list_instances(Some("r1")).unwrap()), ["a", "c"]);
    // Purge uses the `expires` column, which update_instance must keep in step with the doc.
    assert_eq!(s.purge_instances(300).unwrap(), 1);
    assert_eq!(ids(&s.list_instances(None).unwrap()), ["a", "c"]);
    assert!(s.delete_instance("c").unwrap());
    assert!(!s.delete_instance("c").unwrap());
}

/// Heartbeat writes are grouped into one transaction (`Store::update_instances`): a stale
/// revision or a missing instance fails alone, and every other write of the group lands.
fn a_group_of_instance_writes_fails_only_where_its_revision_is_stale<B: Backend>() {
    let b = B::fresh();
    let s = b.open();
    for id in ["a", "b", "c"] {
        create(&*s, instance(id, "r1", 100));
    }
    let mut updates = Vec::new();
    for (id, expires, revision) in [("a", 1000, 1), ("b", 2000, 7), ("c", 3000, 1)] {
        let mut i = s.get_instance(id).unwrap().unwrap();
        i.status.expires = expires;
        updates.push((i, revision));
    }
    updates.push((instance("zz", "r1", 1), 1));
    let results = s.update_instances(&updates);
    assert_eq!(results.len(), 4);
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    assert!(
        matches!(results[1], Err(StoreError::Conflict(_))),
        "{results:?}"
    );
    assert!(
        matches!(results[3], Err(StoreError::NotFound(_))),
        "{results:?}"
    );
    let got = |id| s.get_instance(id).unwrap().unwrap();
    assert_eq!((got("a").revision, got("a").status.expires), (2, 1000));
    assert_eq!((got("b").revision, got("b").status.expires), (1, 100));
    assert_eq!((got("c").revision, got("c").status.expires), (2, 3000));
}

fn locks_are_added_only_if_absent_and_found_by_target<B: Backend>() {
    let b = B::fresh();
    let s = b.open();
    let first = Lock {
        message: "first".into(),
        ..lock("auto-t1", LockTarget::JoinToken("t1".into()), None)
    };
    assert!(s.add_lock(&first).unwrap());
    let second = Lock {
        message: "second".into(),
        ..first.clone()
    };
    assert!(!s.add_lock(&second).unwrap());
    assert_eq!(s.list_locks().unwrap(), vec![first.clone()]);
    assert_eq!(s.get_lock("auto-t1").unwrap(), Some(first.clone()));
    assert_eq!(s.get_lock("nope").unwrap(), None);

    // Looked up by target: kind and value must both match; expired locks are returned too
    // (the caller judges activity at its own time).
    let on_bot = lock("b", LockTarget::Bot("t1".into()), Some(5));
    let on_instance = lock("i", LockTarget::BotInstanceId("i1".into()), None);
    s.add_lock(&on_bot).unwrap();
    s.add_lock(&on_instance).unwrap();
    let names = |v: Vec<Lock>| v.into_iter().map(|l| l.name).collect::<Vec<_>>();
    assert_eq!(
        names(s.locks_for(&[LockTarget::JoinToken("t1".into())]).unwrap()),
        ["auto-t1"]
    );
    assert_eq!(
        names(
            s.locks_for(&[
                LockTarget::Bot("t1".into()),
                LockTarget::BotInstanceId("i1".into()),
                LockTarget::JoinToken("other".into()),
            ])
            .unwrap()
        ),
        ["b", "i"]
    );
    assert!(s.locks_for(&[]).unwrap().is_empty());
    assert!(s.delete_lock("auto-t1").unwrap());
    assert!(!s.delete_lock("auto-t1").unwrap());
    assert!(s
        .locks_for(&[LockTarget::JoinToken("t1".into())])
        .unwrap()
        .is_empty());
    assert_eq!(s.list_locks().unwrap().len(), 2);
}

fn audit_is_newest_first_and_filterable<B: Backend>() {
    let b = B::fresh();
    let s = b.open();
    for (i, kind) in ["bot.join", "lock.created", "bot.join", "bot.join"]
        .iter()
        .enumerate()
    {
        let mut ev = audit(kind, 10 + i as i64);
        ev.token_name = Some(format!("t{i}"));
        s.append_audit(&ev).unwrap();
    }
    let all = all_audit(&*s);
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

fn bots_cascading_delete_and_counts<B: Backend>() {
    let b = B::fresh();
    let s = b.open();
    s.create_bot(&bot("robot")).unwrap();
    s.create_bot(&bot("other")).unwrap();
    assert!(matches!(
        s.create_bot(&bot("robot")),
        Err(StoreError::AlreadyExists(_))
    ));
    s.create_token(&token("t1")).unwrap();
    create(&*s, instance("i1", "robot", 1));
    create(&*s, instance("i3", "robot", 500));
    create(&*s, instance("i2", "other", 1));
    assert_eq!(
        s.bot_counts("robot", 100).unwrap(),
        BotCounts {
            tokens: 1,
            instances: 2,
            active_instances: 1
        }
    );
    // Expired from the second `expires` is reached.
    assert_eq!(s.bot_counts("robot", 500).unwrap().active_instances, 0);
    assert_eq!(s.bot_counts("none", 100).unwrap(), BotCounts::default());
    // Every bot at once, as `bots ls` asks: the same counts, each bot alone.
    let all = s.all_bot_counts(100).unwrap();
    assert_eq!(all.get("robot"), Some(&s.bot_counts("robot", 100).unwrap()));
    assert_eq!(
        all.get("other"),
        Some(&BotCounts {
            tokens: 0,
            instances: 1,
            active_instances: 0
        })
    );
    assert_eq!(all.get("none"), None);
    assert_eq!(s.list_bots().unwrap().len(), 2);
    assert!(s.delete_bot("robot").unwrap());
    assert!(!s.delete_bot("robot").unwrap());
    assert_eq!(s.get_bot("robot").unwrap(), None);
    assert_eq!(s.get_token("t1").unwrap(), None);
    assert_eq!(s.get_instance("i1").unwrap(), None);
    assert!(s.get_instance("i2").unwrap().is_some());
}

fn authority_insert_then_cas<B: Backend>() {
    let b = B::fresh();
    let s = b.open();
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

fn data_survives_reopen<B: Backend>() {
    let b = B::fresh();
    {
        let s = b.open();
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
    let s = b.open();
    assert!(s.get_bot("robot").unwrap().is_some());
    assert_eq!(s.get_token("t1").unwrap().unwrap().revision, 1);
    assert_eq!(s.get_instance("i1").unwrap().unwrap().status.expires, 77);
    // Ids keep increasing across reopen.
    s.append_audit(&audit("x", 7)).unwrap();
    let ids: Vec<_> = all_audit(&*s).iter().map(|e| e.id).collect();
    assert_eq!(ids, [3, 2, 1]);
}

/// Threads, each with its own store handle (as separate auth service processes have), commit
/// on one token in rounds, all against the revision they read at the round's start: in every
/// round exactly one wins, every other gets `Conflict` and writes nothing (no instance, no
/// audit event).
fn concurrent_commits_on_one_token_exactly_one_wins_per_revision<B: Backend>() {
    const THREADS: usize = 8;
    const ROUNDS: usize = 6;
    let b = B::fresh();
    let setup = b.open();
    setup.create_token(&token("t1")).unwrap();
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|n| {
            let s = b.open();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut outcomes = Vec::new();
                for round in 0..ROUNDS {
                    let rev = s.get_token("t1").unwrap().unwrap().revision;
                    // Everyone has read this round's revision before anyone commits.
                    barrier.wait();
                    let id = format!("i{round}-{n}");
                    let r = s.commit(&Commit {
                        token: Some(TokenWrite {
                            name: "t1".into(),
                            expected_revision: rev,
                            status: TokenStatus {
                                bound_instance_id: Some(id.clone()),
                                recovery_count: u32::try_from(round + 1).unwrap(),
                                ..Default::default()
                            },
                        }),
                        instance: InstanceWrite::Create(instance(&id, "robot", 1)),
                        audit: vec![audit("bot.join", 1)],
                        lock_guard: None,
                    });
                    outcomes.push((round, id, r));
                    // Every commit of this round is over before the next round reads.
                    barrier.wait();
                }
                outcomes
            })
        })
        .collect();
    let outcomes: Vec<_> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let mut winners = Vec::new();
    for round in 0..ROUNDS {
        let this: Vec<_> = outcomes.iter().filter(|(r, _, _)| *r == round).collect();
        let won: Vec<_> = this.iter().filter(|(_, _, r)| r.is_ok()).collect();
        assert_eq!(won.len(), 1, "round {round}: {this:?}");
        for (_, _, r) in &this {
            assert!(
                matches!(r, Ok(()) | Err(StoreError::Conflict(_))),
                "round {round}: {r:?}"
            );
        }
        winners.push(won[0].1.clone());
    }
    let s = b.open();
    let mut stored: Vec<_> = s
        .list_instances(None)
        .unwrap()
        .into_iter()
        .map(|i| i.spec.instance_id)
        .collect();
    stored.sort();
    let mut expected = winners.clone();
    expected.sort();
    assert_eq!(stored, expected, "only the winners' instances exist");
    assert_eq!(
        all_audit(&*s).len(),
        ROUNDS,
        "only the winners' audit events"
    );
    let t = s.get_token("t1").unwrap().unwrap();
    assert_eq!(t.revision, 1 + ROUNDS as u64);
    assert_eq!(t.status.bound_instance_id.as_ref(), winners.last());
    assert_eq!(t.status.recovery_count, ROUNDS as u32);
}

/// Issue 8 defect 7: the commit re-reads the locks inside its transaction, so a lock placed
/// after the ceremony's snapshot stops it and nothing is written.
fn commit_is_refused_by_an_active_lock_on_a_guarded_target<B: Backend>() {
    let b = B::fresh();
    let s = b.open();
    s.create_token(&token("t1")).unwrap();
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
    // Placed through another handle, as another auth service would.
    b.open()
        .add_lock(&lock("new", LockTarget::JoinToken("t1".into()), None))
        .unwrap();
    let before = s.get_token("t1").unwrap().unwrap();
    let audit_before = all_audit(&*s).len();
    match s.commit(&commit("i2")) {
        Err(StoreError::Locked(name)) => assert_eq!(name, "new"),
        other => panic!("expected Locked, got {other:?}"),
    }
    assert_eq!(s.get_token("t1").unwrap().unwrap(), before);
    assert_eq!(s.get_instance("i2").unwrap(), None);
    assert_eq!(all_audit(&*s).len(), audit_before);
}

/// Issue 8 defect 6: audit retention.
fn purge_audit_deletes_only_events_older_than_the_cutoff<B: Backend>() {
    let b = B::fresh();
    let s = b.open();
    for t in [10, 20, 30] {
        s.append_audit(&audit("bot.join", t)).unwrap();
    }
    assert_eq!(s.purge_audit(20).unwrap(), 1);
    let left: Vec<_> = all_audit(&*s).into_iter().map(|e| e.time).collect();
    assert_eq!(left, vec![30, 20]);
    // Ids keep increasing after a purge.
    s.append_audit(&audit("bot.join", 40)).unwrap();
    let ids: Vec<_> = all_audit(&*s).into_iter().map(|e| e.id).collect();
    assert_eq!(ids, vec![4, 3, 2]);
}

/// Pages through `q` with page size `limit`, `after` taken from each page's last instance.
fn walk(s: &dyn Store, q: &InstanceQuery, limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = s
            .page_instances(&InstanceQuery {
                after: after.clone(),
                limit,
                ..q.clone()
            })
            .unwrap();
        assert!(page.len() <= limit);
        out.extend(page.iter().map(|i| i.spec.instance_id.clone()));
        match page.last() {
            Some(last) if page.len() == limit => {
                after = Some(InstanceCursor {
                    created_at: last.spec.created_at,
                    id: last.spec.instance_id.clone(),
                })
            }
            _ => return out,
        }
    }
}

fn instance_pages_follow_the_cursor_and_filters<B: Backend>() {
    let b = B::fresh();
    let s = b.open();
    let mut all = Vec::new();
    // Creation times repeat (several instances per second), so the id breaks ties.
    for n in 0..23 {
        let i = instance_at(
            &format!("id-{:02}", (n * 7) % 23),
            if n % 3 == 0 { "a" } else { "b" },
            1000 + (n / 4) as i64,
            if n % 2 == 0 { 50 } else { 5000 },
        );
        all.push(i.clone());
        create(&*s, i);
    }
    let now = 100;
    let queries = [
        InstanceQuery::first(0, now),
        InstanceQuery {
            bot: Some("b".into()),
            ..InstanceQuery::first(0, now)
        },
        InstanceQuery {
            state: Some(InstanceState::Active),
            ..InstanceQuery::first(0, now)
        },
        InstanceQuery {
            state: Some(InstanceState::Expired),
            bot: Some("a".into()),
            ..InstanceQuery::first(0, now)
        },
        InstanceQuery {
            created_since: Some(1002),
            created_until: Some(1005),
            ..InstanceQuery::first(0, now)
        },
    ];
    for q in &queries {
        let mut expected: Vec<_> = all.iter().filter(|i| q.matches(i)).collect();
        expected.sort_by_key(|i| (i.spec.created_at, i.spec.instance_id.clone()));
        let expected: Vec<_> = expected
            .iter()
            .map(|i| i.spec.instance_id.clone())
            .collect();
        assert!(!expected.is_empty(), "{q:?} selects something");
        for limit in [1, 4, 100] {
            assert_eq!(walk(&*s, q, limit), expected, "{q:?} by {limit}");
        }
    }
    // A cursor stays valid when the instance it names is deleted meanwhile.
    let first = s.page_instances(&InstanceQuery::first(3, now)).unwrap();
    let last = first.last().unwrap();
    s.delete_instance(&last.spec.instance_id).unwrap();
    let next = s
        .page_instances(&InstanceQuery {
            after: Some(InstanceCursor {
                created_at: last.spec.created_at,
                id: last.spec.instance_id.clone(),
            }),
            ..InstanceQuery::first(100, now)
        })
        .unwrap();
    assert_eq!(next.len(), 23 - 3);
}

fn token_and_audit_pages_follow_the_cursor<B: Backend>() {
    let b = B::fresh();
    let s = b.open();
    for n in 0..9 {
        s.create_token(&token_of(
            &format!("tok-{n}"),
            if n < 5 { "a" } else { "b" },
        ))
        .unwrap();
    }
    let page = |bot: Option<&str>, after: Option<&str>, limit| {
        s.page_tokens(&TokenQuery {
            bot: bot.map(Into::into),
            after: after.map(Into::into),
            limit,
        })
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect::<Vec<_>>()
    };
    assert_eq!(page(None, None, 3), ["tok-0", "tok-1", "tok-2"]);
    assert_eq!(page(None, Some("tok-2"), 3), ["tok-3", "tok-4", "tok-5"]);
    assert_eq!(
        page(Some("b"), Some("tok-2"), 3),
        ["tok-5", "tok-6", "tok-7"]
    );
    assert_eq!(page(Some("b"), Some("tok-7"), 3), ["tok-8"]);

    for n in 0..10 {
        let mut ev = audit(
            if n % 2 == 0 {
                "bot.join"
            } else {
                "lock.created"
            },
            100 + n,
        );
        ev.bot_name = Some(if n < 6 { "a" } else { "b" }.into());
        s.append_audit(&ev).unwrap();
    }
    let times = |q: AuditQuery| {
        s.list_audit(&q)
            .unwrap()
            .into_iter()
            .map(|e| e.time)
            .collect::<Vec<_>>()
    };
    let first = s
        .list_audit(&AuditQuery {
            limit: Some(4),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        first.iter().map(|e| e.time).collect::<Vec<_>>(),
        [109, 108, 107, 106]
    );
    assert_eq!(
        times(AuditQuery {
            before: Some(first[3].id),
            limit: Some(4),
            ..Default::default()
        }),
        [105, 104, 103, 102]
    );
    assert_eq!(
        times(AuditQuery {
            bot: Some("a".into()),
            kind: Some("bot.join".into()),
            ..Default::default()
        }),
        [104, 102, 100]
    );
    assert_eq!(
        times(AuditQuery {
            since: Some(103),
            until: Some(107),
            ..Default::default()
        }),
        [106, 105, 104, 103]
    );
}
