//! An in-process [`Store`]: the same semantics as the database stores (revisions, atomic commit,
//! compare-and-swap), held in a mutex. Used by the unit tests and the benchmark, and usable by
//! an embedder that keeps state elsewhere.

use std::collections::BTreeMap;
use std::sync::Mutex;

use boundkey_proto::UnixTime;

use super::{
    AuditQuery, BotCounts, Commit, InstanceQuery, InstanceWrite, Store, StoreError, TokenQuery,
};
use crate::authority::AuthorityState;
use crate::model::{AuditEvent, Bot, BotInstance, Lock, LockTarget, Token, TokenSpec};

#[derive(Default)]
struct Inner {
    bots: BTreeMap<String, Bot>,
    tokens: BTreeMap<String, Token>,
    instances: BTreeMap<String, BotInstance>,
    locks: BTreeMap<String, Lock>,
    audit: Vec<AuditEvent>,
    /// Last audit id handed out (ids keep increasing across purges).
    audit_seq: u64,
    authority: Option<(AuthorityState, u64)>,
}

impl Inner {
    fn push_audit(&mut self, event: &AuditEvent) {
        self.audit_seq += 1;
        let mut ev = event.clone();
        ev.id = self.audit_seq;
        self.audit.push(ev);
    }
}

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, StoreError> {
        self.inner
            .lock()
            .map_err(|_| StoreError::Backend("memory store poisoned".into()))
    }
}

impl Store for MemoryStore {
    fn create_bot(&self, bot: &Bot) -> Result<(), StoreError> {
        let mut g = self.lock()?;
        if g.bots.contains_key(&bot.name) {
            return Err(StoreError::AlreadyExists(format!("bot {}", bot.name)));
        }
        g.bots.insert(bot.name.clone(), bot.clone());
        Ok(())
    }
    fn get_bot(&self, name: &str) -> Result<Option<Bot>, StoreError> {
        Ok(self.lock()?.bots.get(name).cloned())
    }
    fn list_bots(&self) -> Result<Vec<Bot>, StoreError> {
        Ok(self.lock()?.bots.values().cloned().collect())
    }
    fn delete_bot(&self, name: &str) -> Result<bool, StoreError> {
        let mut g = self.lock()?;
        let existed = g.bots.remove(name).is_some();
        g.tokens.retain(|_, t| t.spec.bot_name != name);
        g.instances.retain(|_, i| i.spec.bot_name != name);
        Ok(existed)
    }

    fn create_token(&self, token: &Token) -> Result<(), StoreError> {
        let mut g = self.lock()?;
        if g.tokens.contains_key(&token.name) {
            return Err(StoreError::AlreadyExists(format!("token {}", token.name)));
        }
        let mut t = token.clone();
        t.revision = 1;
        g.tokens.insert(t.name.clone(), t);
        Ok(())
    }
    fn get_token(&self, name: &str) -> Result<Option<Token>, StoreError> {
        Ok(self.lock()?.tokens.get(name).cloned())
    }
    fn list_tokens(&self) -> Result<Vec<Token>, StoreError> {
        Ok(self.lock()?.tokens.values().cloned().collect())
    }
    fn page_tokens(&self, q: &TokenQuery) -> Result<Vec<Token>, StoreError> {
        Ok(self
            .lock()?
            .tokens
            .values()
            .filter(|t| q.bot.as_ref().is_none_or(|b| &t.spec.bot_name == b))
            .filter(|t| q.after.as_ref().is_none_or(|a| &t.name > a))
            .take(q.limit)
            .cloned()
            .collect())
    }
    fn update_token_spec(
        &self,
        name: &str,
        spec: &TokenSpec,
        expected_revision: u64,
    ) -> Result<(), StoreError> {
        let mut g = self.lock()?;
        let t = g
            .tokens
            .get_mut(name)
            .ok_or_else(|| StoreError::NotFound(format!("token {name}")))?;
        if t.revision != expected_revision {
            return Err(StoreError::Conflict(format!("token {name}")));
        }
        t.spec = spec.clone();
        t.revision += 1;
        Ok(())
    }
    fn delete_token(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.lock()?.tokens.remove(name).is_some())
    }

    fn get_instance(&self, id: &str) -> Result<Option<BotInstance>, StoreError> {
        Ok(self.lock()?.instances.get(id).cloned())
    }
    fn list_instances(&self, bot: Option<&str>) -> Result<Vec<BotInstance>, StoreError> {
        Ok(self
            .lock()?
            .instances
            .values()
            .filter(|i| bot.is_none_or(|b| i.spec.bot_name == b))
            .cloned()
            .collect())
    }
    fn page_instances(&self, q: &InstanceQuery) -> Result<Vec<BotInstance>, StoreError> {
        let g = self.lock()?;
        let mut page: Vec<BotInstance> = g
            .instances
            .values()
            .filter(|i| q.matches(i))
            .cloned()
            .collect();
        page.sort_by(|a, b| {
            (a.spec.created_at, &a.spec.instance_id).cmp(&(b.spec.created_at, &b.spec.instance_id))
        });
        page.truncate(q.limit);
        Ok(page)
    }
    fn bot_counts(&self, bot: &str, now: UnixTime) -> Result<BotCounts, StoreError> {
        let g = self.lock()?;
        let of_bot = || g.instances.values().filter(|i| i.spec.bot_name == bot);
        Ok(BotCounts {
            tokens: g.tokens.values().filter(|t| t.spec.bot_name == bot).count(),
            instances: of_bot().count(),
            active_instances: of_bot().filter(|i| !i.is_expired(now)).count(),
        })
    }
    fn update_instance(
        &self,
        instance: &BotInstance,
        expected_revision: u64,
    ) -> Result<(), StoreError> {
        let mut g = self.lock()?;
        let id = &instance.spec.instance_id;
        let cur = g
            .instances
            .get_mut(id)
            .ok_or_else(|| StoreError::NotFound(format!("bot instance {id}")))?;
        if cur.revision != expected_revision {
            return Err(StoreError::Conflict(format!("bot instance {id}")));
        }
        *cur = instance.clone();
        cur.revision = expected_revision + 1;
        Ok(())
    }
    fn delete_instance(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.lock()?.instances.remove(id).is_some())
    }
    fn purge_instances(&self, cutoff: UnixTime) -> Result<usize, StoreError> {
        let mut g = self.lock()?;
        let before = g.instances.len();
        g.instances.retain(|_, i| i.status.expires >= cutoff);
        Ok(before - g.instances.len())
    }

    fn commit(&self, c: &Commit) -> Result<(), StoreError> {
        let mut g = self.lock()?;
        // Check every precondition before writing anything: all or nothing.
        if let Some(l) = c
            .lock_guard
            .as_ref()
            .and_then(|guard| guard.blocking(g.locks.values()))
        {
            return Err(StoreError::Locked(l.name.clone()));
        }
        if let Some(tw) = &c.token {
            match g.tokens.get(&tw.name) {
                Some(t) if t.revision == tw.expected_revision => {}
                Some(_) => return Err(StoreError::Conflict(format!("token {}", tw.name))),
                None => return Err(StoreError::NotFound(format!("token {}", tw.name))),
            }
        }
        match &c.instance {
            InstanceWrite::Create(i) => {
                if g.instances.contains_key(&i.spec.instance_id) {
                    return Err(StoreError::AlreadyExists(format!(
                        "bot instance {}",
                        i.spec.instance_id
                    )));
                }
            }
            InstanceWrite::Update {
                instance,
                expected_revision,
            } => match g.instances.get(&instance.spec.instance_id) {
                Some(cur) if cur.revision == *expected_revision => {}
                Some(_) => {
                    return Err(StoreError::Conflict(format!(
                        "bot instance {}",
                        instance.spec.instance_id
                    )))
                }
                None => {
                    return Err(StoreError::NotFound(format!(
                        "bot instance {}",
                        instance.spec.instance_id
                    )))
                }
            },
        }
        if let Some(tw) = &c.token {
            if let Some(t) = g.tokens.get_mut(&tw.name) {
                t.status = tw.status.clone();
                t.revision += 1;
            }
        }
        match &c.instance {
            InstanceWrite::Create(i) => {
                let mut i = i.clone();
                i.revision = 1;
                g.instances.insert(i.spec.instance_id.clone(), i);
            }
            InstanceWrite::Update {
                instance,
                expected_revision,
            } => {
                let mut i = instance.clone();
                i.revision = expected_revision + 1;
                g.instances.insert(i.spec.instance_id.clone(), i);
            }
        }
        for ev in &c.audit {
            g.push_audit(ev);
        }
        Ok(())
    }

    fn add_lock(&self, lock: &Lock) -> Result<bool, StoreError> {
        let mut g = self.lock()?;
        if g.locks.contains_key(&lock.name) {
            return Ok(false);
        }
        g.locks.insert(lock.name.clone(), lock.clone());
        Ok(true)
    }
    fn list_locks(&self) -> Result<Vec<Lock>, StoreError> {
        Ok(self.lock()?.locks.values().cloned().collect())
    }
    fn locks_for(&self, targets: &[LockTarget]) -> Result<Vec<Lock>, StoreError> {
        Ok(self
            .lock()?
            .locks
            .values()
            .filter(|l| targets.contains(&l.target))
            .cloned()
            .collect())
    }
    fn get_lock(&self, name: &str) -> Result<Option<Lock>, StoreError> {
        Ok(self.lock()?.locks.get(name).cloned())
    }
    fn delete_lock(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.lock()?.locks.remove(name).is_some())
    }

    fn append_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        self.lock()?.push_audit(event);
        Ok(())
    }
    fn list_audit(&self, q: &AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
        let g = self.lock()?;
        Ok(g.audit
            .iter()
            .rev()
            .filter(|e| q.matches(e))
            .take(q.limit.unwrap_or(usize::MAX))
            .cloned()
            .collect())
    }

    fn purge_audit(&self, cutoff: UnixTime) -> Result<usize, StoreError> {
        let mut g = self.lock()?;
        let before = g.audit.len();
        g.audit.retain(|e| e.time >= cutoff);
        Ok(before - g.audit.len())
    }

    fn load_authority(&self) -> Result<Option<(AuthorityState, u64)>, StoreError> {
        Ok(self.lock()?.authority.clone())
    }
    fn save_authority(
        &self,
        state: &AuthorityState,
        expected_revision: Option<u64>,
    ) -> Result<(), StoreError> {
        let mut g = self.lock()?;
        let next = match (&g.authority, expected_revision) {
            (None, None) => 1,
            (Some((_, r)), Some(e)) if *r == e => e + 1,
            (Some(_), None) => return Err(StoreError::AlreadyExists("authority".into())),
            _ => return Err(StoreError::Conflict("authority".into())),
        };
        g.authority = Some((state.clone(), next));
        Ok(())
    }
}
