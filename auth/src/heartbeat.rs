//! Heartbeats: facts an agent reports over its authenticated connection. They are recorded on
//! the caller's own instance (named by its verified certificate, never by the message) and are
//! never used for a decision.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};

use boundkey_proto::{ErrorCode, Heartbeat, ServerMessage, UnixTime};

use crate::input::{Peer, Snapshot};
use crate::model::{clean_text, event, AuditEvent, BotInstance, HeartbeatRecord, LockTarget};
use crate::outcome::{messages, Refusal, RefusalClass};
use crate::store::{Store, StoreError};

/// Longest string accepted in any heartbeat field; longer values are truncated, not refused.
pub const MAX_FIELD_LEN: usize = 256;

/// Heartbeat strings are the agent's word only: clipped, and control characters replaced, so
/// they cannot forge lines where operators read them.
fn clip(s: &mut String) {
    *s = clean_text(s, MAX_FIELD_LEN);
}

/// Returns the instance with the heartbeat recorded, for the driver to write with a CAS.
pub fn decide(
    peer: &Peer,
    snapshot: Snapshot,
    mut hb: Heartbeat,
    now: UnixTime,
) -> Result<BotInstance, Box<Refusal>> {
    let deny = |code: ErrorCode, msg: &str, reason: &str| {
        let mut ev = AuditEvent::new(event::HEARTBEAT, now, false);
        ev.remote_addr = Some(peer.remote_addr.clone());
        ev.instance_id = peer.identity.as_ref().map(|i| i.claims.instance_id.clone());
        ev.error = Some(reason.into());
        Box::new(Refusal {
            lock: None,
            audit: vec![ev],
            reply: ServerMessage::error(code, msg),
            reason: reason.into(),
            class: if peer.identity.is_some() {
                RefusalClass::Authenticated
            } else {
                RefusalClass::Anonymous
            },
        })
    };
    let Some(id) = &peer.identity else {
        return Err(deny(
            ErrorCode::AccessDenied,
            "heartbeats need a client certificate",
            "heartbeat without certificate",
        ));
    };
    let targets = [
        LockTarget::Bot(id.claims.bot_name.clone()),
        LockTarget::BotInstanceId(id.claims.instance_id.clone()),
        LockTarget::JoinToken(id.claims.join_token.clone()),
    ];
    if snapshot
        .locks
        .iter()
        .any(|l| l.is_active(now) && targets.contains(&l.target))
    {
        return Err(deny(ErrorCode::Locked, messages::LOCKED, "locked"));
    }
    let Some(mut inst) = snapshot
        .instance
        .filter(|i| i.spec.instance_id == id.claims.instance_id)
    else {
        return Err(deny(
            ErrorCode::AccessDenied,
            messages::ACCESS_DENIED,
            "bot instance no longer exists",
        ));
    };
    for f in [&mut hb.version, &mut hb.hostname, &mut hb.os, &mut hb.arch] {
        clip(f);
    }
    inst.record_heartbeat(HeartbeatRecord {
        recorded_at: now,
        remote_addr: peer.remote_addr.clone(),
        heartbeat: hb,
    });
    Ok(inst)
}

/// Most heartbeats written in one store call; more wait for the next group.
const MAX_GROUP: usize = 512;

/// Group commit for heartbeat writes: whoever finds no write in progress writes everything
/// queued so far in one [`Store::update_instances`] call (one transaction, one sync to disk),
/// while heartbeats arriving meanwhile queue for the next group. Nobody waits for a timer: one
/// heartbeat alone is written at once, and under load a group is as large as what arrived
/// during the previous write. Each caller returns only when its own write has committed, so an
/// acknowledged heartbeat is on disk as before; only the number of transactions changes.
#[derive(Default)]
pub(crate) struct GroupWriter {
    state: Mutex<GroupState>,
    written: Condvar,
}

/// The instance to write and the revision its compare-and-swap expects.
type Update = (BotInstance, u64);

#[derive(Default)]
struct GroupState {
    next_ticket: u64,
    queue: Vec<(u64, Update)>,
    writing: bool,
    /// Results of written heartbeats not yet collected by their callers.
    done: HashMap<u64, Result<(), StoreError>>,
}

impl GroupWriter {
    fn lock(&self) -> MutexGuard<'_, GroupState> {
        // Every update below leaves the state consistent, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `instance` (a compare-and-swap on `expected_revision`) to `store` together with
    /// whatever other heartbeats are waiting, and returns this one's result.
    pub(crate) fn write(
        &self,
        store: &dyn Store,
        instance: BotInstance,
        expected_revision: u64,
    ) -> Result<(), StoreError> {
        self.write_with((instance, expected_revision), |group| {
            store.update_instances(group)
        })
    }

    /// [`GroupWriter::write`] with the group write given as `flush` (one result per update).
    fn write_with(
        &self,
        update: Update,
        flush: impl Fn(&[Update]) -> Vec<Result<(), StoreError>>,
    ) -> Result<(), StoreError> {
        let mut g = self.lock();
        let ticket = g.next_ticket;
        g.next_ticket = g.next_ticket.wrapping_add(1);
        g.queue.push((ticket, update));
        loop {
            if let Some(r) = g.done.remove(&ticket) {
                return r;
            }
            if g.writing {
                g = self.written.wait(g).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            g.writing = true;
            let take = g.queue.len().min(MAX_GROUP);
            let (tickets, updates): (Vec<u64>, Vec<Update>) = g.queue.drain(..take).unzip();
            drop(g);
            // The store call runs outside the lock, so the next group can queue meanwhile. If
            // it panics, the guard still hands every caller of this group an error and lets
            // the next writer in, rather than leaving them waiting forever.
            let mut pending = PendingGroup {
                writer: self,
                tickets,
                results: None,
            };
            pending.results = Some(flush(&updates));
            drop(pending);
            g = self.lock();
        }
    }
}

/// One group being written; publishes its results (or an error for each) when dropped.
struct PendingGroup<'a> {
    writer: &'a GroupWriter,
    tickets: Vec<u64>,
    results: Option<Vec<Result<(), StoreError>>>,
}

impl Drop for PendingGroup<'_> {
    fn drop(&mut self) {
        let mut results = self.results.take().unwrap_or_default().into_iter();
        let mut g = self.writer.lock();
        for t in self.tickets.drain(..) {
            let r = results.next().unwrap_or_else(|| {
                Err(StoreError::Backend(
                    "the heartbeat group write did not complete".into(),
                ))
            });
            g.done.insert(t, r);
        }
        g.writing = false;
        drop(g);
        self.writer.written.notify_all();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use boundkey_proto::JoinMethod;

    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::{Commit, InstanceWrite};

    fn stored(store: &MemoryStore, n: usize) -> BotInstance {
        let i = BotInstance::new("bot", JoinMethod::BoundKeypair, &format!("t{n}"), None, 1);
        store
            .commit(&Commit {
                token: None,
                instance: InstanceWrite::Create(i.clone()),
                audit: vec![],
                lock_guard: None,
            })
            .unwrap();
        store.get_instance(&i.spec.instance_id).unwrap().unwrap()
    }

    #[test]
    fn concurrent_heartbeats_share_writes_and_each_gets_its_own_result() {
        let store = Arc::new(MemoryStore::new());
        let writer = Arc::new(GroupWriter::default());
        let groups = Arc::new(AtomicUsize::new(0));
        let largest = Arc::new(AtomicUsize::new(0));
        let n = 32;
        let threads: Vec<_> = (0..n)
            .map(|k| {
                let inst = stored(&store, k);
                let (store, writer) = (store.clone(), writer.clone());
                let (groups, largest) = (groups.clone(), largest.clone());
                std::thread::spawn(move || {
                    // Every fourth one carries a stale revision: its CAS must fail alone.
                    let rev = inst.revision + if k % 4 == 0 { 7 } else { 0 };
                    let r = writer.write_with((inst, rev), |group| {
                        groups.fetch_add(1, Ordering::Relaxed);
                        largest.fetch_max(group.len(), Ordering::Relaxed);
                        // Slow, so that the other threads queue behind this group.
                        std::thread::sleep(Duration::from_millis(20));
                        store.update_instances(group)
                    });
                    (k, r)
                })
            })
            .collect();
        for t in threads {
            let (k, r) = t.join().unwrap();
            if k % 4 == 0 {
                assert!(matches!(r, Err(StoreError::Conflict(_))), "{k}: {r:?}");
            } else {
                assert!(r.is_ok(), "{k}: {r:?}");
            }
        }
        let g = groups.load(Ordering::Relaxed);
        assert!(g < n, "{g} writes for {n} heartbeats: nothing was grouped");
        assert!(largest.load(Ordering::Relaxed) > 1);
        // A lone heartbeat later is written at once, in a group of its own.
        let one = stored(&store, 1000);
        let rev = one.revision;
        writer.write(&*store, one, rev).unwrap();
    }

    #[test]
    fn writers_in_a_loop_all_get_through() {
        let store = Arc::new(MemoryStore::new());
        let writer = Arc::new(GroupWriter::default());
        let threads: Vec<_> = (0..8)
            .map(|k| {
                let (store, writer) = (store.clone(), writer.clone());
                let mut inst = stored(&store, k);
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let rev = inst.revision;
                        writer.write(&*store, inst.clone(), rev).unwrap();
                        inst = store.get_instance(&inst.spec.instance_id).unwrap().unwrap();
                    }
                    inst.revision
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 201);
        }
    }

    #[test]
    fn a_failed_group_write_answers_every_caller() {
        let store = MemoryStore::new();
        let writer = GroupWriter::default();
        let inst = stored(&store, 1);
        let rev = inst.revision;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            writer.write_with((inst.clone(), rev), |_| panic!("store failed"))
        }));
        assert!(r.is_err());
        // The writer is free again and the next heartbeat goes through.
        writer.write(&store, inst, rev).unwrap();
    }
}
