//! The persistence boundary. `boundkey-auth` never opens a database; the auth service implements
//! [`Store`] (SQLite, PostgreSQL) and the ceremony's outcome reaches it as one [`Commit`].

use std::collections::BTreeMap;

use boundkey_proto::UnixTime;

use crate::authority::AuthorityState;
use crate::model::{AuditEvent, Bot, BotInstance, Lock, LockTarget, Token, TokenSpec, TokenStatus};

pub mod memory;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A compare-and-swap found a different revision: someone else wrote first.
    #[error("conflict: {0} changed concurrently")]
    Conflict(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("storage backend error: {0}")]
    Backend(String),
    /// A commit's [`LockGuard`] found an active lock (added while the ceremony ran).
    #[error("locked by {0}")]
    Locked(String),
}

/// A ceremony's complete set of state changes, applied atomically or not at all.
#[derive(Debug, Clone)]
pub struct Commit {
    /// Token status written with a compare-and-swap on `expected_revision`. Bound-keypair
    /// ceremonies always carry one (even when the status is unchanged) so two concurrent
    /// ceremonies on one token cannot both commit.
    pub token: Option<TokenWrite>,
    pub instance: InstanceWrite,
    pub audit: Vec<AuditEvent>,
    /// Checked inside the commit's transaction: a lock placed after the ceremony read the locks
    /// (while the client was solving its challenge) still stops it.
    pub lock_guard: Option<LockGuard>,
}

/// [`Store::bot_counts`]'s answer: what hangs off one bot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BotCounts {
    pub tokens: usize,
    pub instances: usize,
    /// Instances not expired at the time asked about.
    pub active_instances: usize,
}

/// The lock targets a commit must not proceed past.
#[derive(Debug, Clone)]
pub struct LockGuard {
    pub targets: Vec<LockTarget>,
    /// Locks are judged active at this time (the ceremony's `now`).
    pub at: UnixTime,
}

impl LockGuard {
    /// The first of `locks` that is active and covers one of the targets.
    pub fn blocking<'a>(&self, locks: impl IntoIterator<Item = &'a Lock>) -> Option<&'a Lock> {
        locks
            .into_iter()
            .find(|l| l.is_active(self.at) && self.targets.contains(&l.target))
    }
}

#[derive(Debug, Clone)]
pub struct TokenWrite {
    pub name: String,
    pub expected_revision: u64,
    pub status: TokenStatus,
}

#[derive(Debug, Clone)]
pub enum InstanceWrite {
    /// Insert; fails with `AlreadyExists` if the id is taken.
    Create(BotInstance),
    /// Replace with a compare-and-swap on `expected_revision`.
    Update {
        instance: BotInstance,
        expected_revision: u64,
    },
}

/// Filter for audit queries; newest first (descending id). Paging is by id: `before` is the
/// id of the last event of the previous page.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub kind: Option<String>,
    pub bot: Option<String>,
    /// Only events at or after this time.
    pub since: Option<UnixTime>,
    /// Only events before this time.
    pub until: Option<UnixTime>,
    /// Only events with an id below this one.
    pub before: Option<u64>,
    pub limit: Option<usize>,
}

impl AuditQuery {
    /// Whether `e` passes every filter (ignoring `limit`), written once for stores that
    /// filter in memory.
    pub fn matches(&self, e: &AuditEvent) -> bool {
        self.kind.as_ref().is_none_or(|k| &e.kind == k)
            && self
                .bot
                .as_ref()
                .is_none_or(|b| e.bot_name.as_ref() == Some(b))
            && self.since.is_none_or(|s| e.time >= s)
            && self.until.is_none_or(|u| e.time < u)
            && self.before.is_none_or(|b| e.id < b)
    }
}

/// Whether an instance still holds a usable certificate (plus grace) at some `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Active,
    Expired,
}

impl InstanceState {
    pub fn of(i: &BotInstance, now: UnixTime) -> Self {
        if i.is_expired(now) {
            InstanceState::Expired
        } else {
            InstanceState::Active
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Active => "active",
            InstanceState::Expired => "expired",
        }
    }
}

impl std::str::FromStr for InstanceState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "active" => Ok(InstanceState::Active),
            "expired" => Ok(InstanceState::Expired),
            o => Err(format!(
                "unknown instance state {o:?} (expected active or expired)"
            )),
        }
    }
}

/// Where a page of instances starts: strictly after this `(created_at, id)`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct InstanceCursor {
    pub created_at: UnixTime,
    pub id: String,
}

/// A page of instances in `(created_at, id)` order: a stable order (an instance's creation
/// time never changes), so a cursor stays valid while instances come and go.
#[derive(Debug, Clone)]
pub struct InstanceQuery {
    pub bot: Option<String>,
    pub state: Option<InstanceState>,
    /// The time `state` is judged at.
    pub now: UnixTime,
    /// Only instances created at or after this time.
    pub created_since: Option<UnixTime>,
    /// Only instances created before this time.
    pub created_until: Option<UnixTime>,
    pub after: Option<InstanceCursor>,
    pub limit: usize,
}

impl InstanceQuery {
    /// The first `limit` instances, unfiltered.
    pub fn first(limit: usize, now: UnixTime) -> Self {
        InstanceQuery {
            bot: None,
            state: None,
            now,
            created_since: None,
            created_until: None,
            after: None,
            limit,
        }
    }

    /// Whether `i` passes every filter and lies after the cursor (what a store's query must
    /// select, written once for stores that filter in memory).
    pub fn matches(&self, i: &BotInstance) -> bool {
        let created = i.spec.created_at;
        self.bot.as_ref().is_none_or(|b| &i.spec.bot_name == b)
            && self
                .state
                .is_none_or(|s| s == InstanceState::of(i, self.now))
            && self.created_since.is_none_or(|t| created >= t)
            && self.created_until.is_none_or(|t| created < t)
            && self.after.as_ref().is_none_or(|c| {
                (created, i.spec.instance_id.as_str()) > (c.created_at, c.id.as_str())
            })
    }
}

/// A page of tokens in name order, optionally of one bot, strictly after `after`.
#[derive(Debug, Clone, Default)]
pub struct TokenQuery {
    pub bot: Option<String>,
    pub after: Option<String>,
    pub limit: usize,
}

/// Storage used by the auth service. Implementations must make [`Store::commit`] atomic and
/// every `expected_revision` check a true compare-and-swap, so several auth service processes
/// sharing one database stay correct. Revisions are assigned by the store: a successful write
/// sets the stored revision to `expected_revision + 1` (or 1 on creation).
pub trait Store: Send + Sync {
    fn create_bot(&self, bot: &Bot) -> Result<(), StoreError>;
    fn get_bot(&self, name: &str) -> Result<Option<Bot>, StoreError>;
    fn list_bots(&self) -> Result<Vec<Bot>, StoreError>;
    /// Deletes the bot with its tokens and instances. Returns false if it did not exist.
    fn delete_bot(&self, name: &str) -> Result<bool, StoreError>;

    /// Inserts with revision 1; `AlreadyExists` if the name is taken.
    fn create_token(&self, token: &Token) -> Result<(), StoreError>;
    fn get_token(&self, name: &str) -> Result<Option<Token>, StoreError>;
    fn list_tokens(&self) -> Result<Vec<Token>, StoreError>;
    /// At most `q.limit` tokens matching `q`, in name order.
    fn page_tokens(&self, q: &TokenQuery) -> Result<Vec<Token>, StoreError>;
    /// Replaces the spec only (never the status), compare-and-swap on the revision.
    fn update_token_spec(
        &self,
        name: &str,
        spec: &TokenSpec,
        expected_revision: u64,
    ) -> Result<(), StoreError>;
    fn delete_token(&self, name: &str) -> Result<bool, StoreError>;

    fn get_instance(&self, id: &str) -> Result<Option<BotInstance>, StoreError>;
    /// Every instance (of one bot): for whole-bot operations, not for listings (see
    /// [`Store::page_instances`]).
    fn list_instances(&self, bot: Option<&str>) -> Result<Vec<BotInstance>, StoreError>;
    /// At most `q.limit` instances matching `q`, in `(created_at, id)` order.
    fn page_instances(&self, q: &InstanceQuery) -> Result<Vec<BotInstance>, StoreError>;
    /// How many tokens and instances a bot has, and how many of the instances are active at
    /// `now`, counted by the store (a bot may have a million instances).
    fn bot_counts(&self, bot: &str, now: UnixTime) -> Result<BotCounts, StoreError>;
    /// [`Store::bot_counts`] of every bot at once, by name (`bots ls`): a database store counts
    /// them in one grouped query per table instead of a round trip per bot. A bot missing from
    /// the map has no token and no instance.
    fn all_bot_counts(&self, now: UnixTime) -> Result<BTreeMap<String, BotCounts>, StoreError> {
        self.list_bots()?
            .into_iter()
            .map(|b| Ok((b.name.clone(), self.bot_counts(&b.name, now)?)))
            .collect()
    }
    /// Replaces an instance with a compare-and-swap (heartbeats).
    fn update_instance(
        &self,
        instance: &BotInstance,
        expected_revision: u64,
    ) -> Result<(), StoreError>;
    /// Several instance replacements at once (heartbeats: the service groups the ones that
    /// arrive while the previous group is being written). Each is a compare-and-swap exactly
    /// like [`Store::update_instance`] and gets its own result, in order; one that fails does
    /// not stop the others. A backend that can should write them in one transaction (one sync
    /// to disk for the group); this default writes them one by one.
    fn update_instances(&self, updates: &[(BotInstance, u64)]) -> Vec<Result<(), StoreError>> {
        updates
            .iter()
            .map(|(instance, expected_revision)| self.update_instance(instance, *expected_revision))
            .collect()
    }
    fn delete_instance(&self, id: &str) -> Result<bool, StoreError>;
    /// Deletes instances whose `expires` is before `cutoff`; returns how many.
    fn purge_instances(&self, cutoff: UnixTime) -> Result<usize, StoreError>;

    /// Applies a ceremony's changes atomically. `Conflict` if a revision check fails, `Locked`
    /// if the commit's [`LockGuard`] finds an active lock (read in the same transaction), in
    /// either case nothing at all was written.
    fn commit(&self, commit: &Commit) -> Result<(), StoreError>;

    /// Inserts a lock unless one with the same name exists. Returns whether it was inserted.
    fn add_lock(&self, lock: &Lock) -> Result<bool, StoreError>;
    fn list_locks(&self) -> Result<Vec<Lock>, StoreError>;
    /// Every lock (active or not) whose target is one of `targets`: what a ceremony reads,
    /// looked up by target rather than by reading all locks.
    fn locks_for(&self, targets: &[LockTarget]) -> Result<Vec<Lock>, StoreError>;
    fn get_lock(&self, name: &str) -> Result<Option<Lock>, StoreError>;
    fn delete_lock(&self, name: &str) -> Result<bool, StoreError>;

    /// Appends; the store assigns increasing ids.
    fn append_audit(&self, event: &AuditEvent) -> Result<(), StoreError>;
    /// Events matching `query`, newest (highest id) first.
    fn list_audit(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>, StoreError>;
    /// Deletes audit events older than `cutoff` (retention); returns how many.
    fn purge_audit(&self, cutoff: UnixTime) -> Result<usize, StoreError>;

    /// The CA state with its revision, if initialised.
    fn load_authority(&self) -> Result<Option<(AuthorityState, u64)>, StoreError>;
    /// Writes the CA state: insert when `expected_revision` is None, else compare-and-swap.
    fn save_authority(
        &self,
        state: &AuthorityState,
        expected_revision: Option<u64>,
    ) -> Result<(), StoreError>;
}
