//! Crash injection for tests: a [`Store`] decorator that aborts the auth service at a named
//! point of a ceremony's commit, so end-to-end tests can show that the store stays consistent
//! and the device completes after a restart.
//!
//! `BOUNDKEY_AUTHD_CRASH_AT=<point>[:<n>]` aborts (`std::process::abort`: no destructors, no
//! flushing, nothing more sent to the client) the `n`-th time (default: first) a commit reaches
//! `<point>`:
//! * `before-commit`: the ceremony is decided but nothing of it is written;
//! * `after-commit`: the transaction is durable but the reply was never sent.
//!
//! Compiled into debug builds only; in release builds [`wrap`] returns the store unchanged and
//! the environment is never read.

use std::sync::Arc;

use boundkey_auth::store::Store;

/// The environment variable that arms the decorator.
pub const CRASH_ENV: &str = "BOUNDKEY_AUTHD_CRASH_AT";

/// `store`, wrapped in the crash decorator if [`CRASH_ENV`] is set (debug builds only).
#[cfg(debug_assertions)]
pub fn wrap(store: Arc<dyn Store>) -> Arc<dyn Store> {
    match std::env::var(CRASH_ENV) {
        Ok(spec) if !spec.is_empty() => {
            tracing::warn!(spec = %spec, "crash injection armed ({CRASH_ENV}); a test build only");
            Arc::new(debug::CrashingStore::new(store, &spec))
        }
        _ => store,
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn wrap(store: Arc<dyn Store>) -> Arc<dyn Store> {
    store
}

#[cfg(debug_assertions)]
mod debug {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use boundkey_auth::authority::AuthorityState;
    use boundkey_auth::model::{AuditEvent, Bot, BotInstance, Lock, LockTarget, Token, TokenSpec};
    use boundkey_auth::store::{
        AuditQuery, BotCounts, Commit, InstanceQuery, Store, StoreError, TokenQuery,
    };
    use boundkey_proto::UnixTime;

    /// Delegates every call to `inner`; aborts the process at one point of the `nth` commit.
    /// Invariant: apart from that abort it behaves exactly like `inner`.
    pub(super) struct CrashingStore {
        inner: Arc<dyn Store>,
        point: String,
        nth: u32,
        commits: AtomicU32,
    }

    impl CrashingStore {
        pub(super) fn new(inner: Arc<dyn Store>, spec: &str) -> Self {
            let (point, nth) = match spec.rsplit_once(':') {
                Some((p, n)) => (p, n.parse().unwrap_or(1)),
                None => (spec, 1),
            };
            CrashingStore {
                inner,
                point: point.to_string(),
                nth,
                commits: AtomicU32::new(0),
            }
        }

        fn reached(&self, point: &str, commit: u32) {
            if point == self.point && commit == self.nth {
                eprintln!(
                    "boundkey-authd: {}={point}:{commit}: aborting",
                    super::CRASH_ENV
                );
                std::process::abort();
            }
        }
    }

    impl Store for CrashingStore {
        fn create_bot(&self, bot: &Bot) -> Result<(), StoreError> {
            self.inner.create_bot(bot)
        }
        fn get_bot(&self, name: &str) -> Result<Option<Bot>, StoreError> {
            self.inner.get_bot(name)
        }
        fn list_bots(&self) -> Result<Vec<Bot>, StoreError> {
            self.inner.list_bots()
        }
        fn delete_bot(&self, name: &str) -> Result<bool, StoreError> {
            self.inner.delete_bot(name)
        }
        fn create_token(&self, token: &Token) -> Result<(), StoreError> {
            self.inner.create_token(token)
        }
        fn get_token(&self, name: &str) -> Result<Option<Token>, StoreError> {
            self.inner.get_token(name)
        }
        fn list_tokens(&self) -> Result<Vec<Token>, StoreError> {
            self.inner.list_tokens()
        }
        fn page_tokens(&self, q: &TokenQuery) -> Result<Vec<Token>, StoreError> {
            self.inner.page_tokens(q)
        }
        fn update_token_spec(
            &self,
            name: &str,
            spec: &TokenSpec,
            expected_revision: u64,
        ) -> Result<(), StoreError> {
            self.inner.update_token_spec(name, spec, expected_revision)
        }
        fn delete_token(&self, name: &str) -> Result<bool, StoreError> {
            self.inner.delete_token(name)
        }
        fn get_instance(&self, id: &str) -> Result<Option<BotInstance>, StoreError> {
            self.inner.get_instance(id)
        }
        fn list_instances(&self, bot: Option<&str>) -> Result<Vec<BotInstance>, StoreError> {
            self.inner.list_instances(bot)
        }
        fn page_instances(&self, q: &InstanceQuery) -> Result<Vec<BotInstance>, StoreError> {
            self.inner.page_instances(q)
        }
        fn bot_counts(&self, bot: &str, now: UnixTime) -> Result<BotCounts, StoreError> {
            self.inner.bot_counts(bot, now)
        }
        fn all_bot_counts(
            &self,
            now: UnixTime,
        ) -> Result<std::collections::BTreeMap<String, BotCounts>, StoreError> {
            self.inner.all_bot_counts(now)
        }
        fn update_instance(
            &self,
            instance: &BotInstance,
            expected_revision: u64,
        ) -> Result<(), StoreError> {
            self.inner.update_instance(instance, expected_revision)
        }
        fn delete_instance(&self, id: &str) -> Result<bool, StoreError> {
            self.inner.delete_instance(id)
        }
        fn purge_instances(&self, cutoff: UnixTime) -> Result<usize, StoreError> {
            self.inner.purge_instances(cutoff)
        }
        fn purge_audit(&self, cutoff: UnixTime) -> Result<usize, StoreError> {
            self.inner.purge_audit(cutoff)
        }
        fn commit(&self, commit: &Commit) -> Result<(), StoreError> {
            let n = self.commits.fetch_add(1, Ordering::SeqCst) + 1;
            self.reached("before-commit", n);
            let r = self.inner.commit(commit);
            if r.is_ok() {
                self.reached("after-commit", n);
            }
            r
        }
        fn add_lock(&self, lock: &Lock) -> Result<bool, StoreError> {
            self.inner.add_lock(lock)
        }
        fn list_locks(&self) -> Result<Vec<Lock>, StoreError> {
            self.inner.list_locks()
        }
        fn locks_for(&self, targets: &[LockTarget]) -> Result<Vec<Lock>, StoreError> {
            self.inner.locks_for(targets)
        }
        fn get_lock(&self, name: &str) -> Result<Option<Lock>, StoreError> {
            self.inner.get_lock(name)
        }
        fn delete_lock(&self, name: &str) -> Result<bool, StoreError> {
            self.inner.delete_lock(name)
        }
        fn append_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
            self.inner.append_audit(event)
        }
        fn list_audit(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
            self.inner.list_audit(query)
        }
        fn load_authority(&self) -> Result<Option<(AuthorityState, u64)>, StoreError> {
            self.inner.load_authority()
        }
        fn save_authority(
            &self,
            state: &AuthorityState,
            expected_revision: Option<u64>,
        ) -> Result<(), StoreError> {
            self.inner.save_authority(state, expected_revision)
        }
    }
}
