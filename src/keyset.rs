//! The agent's bound keys: which one is active, which one a rotation made, and the history.
//!
//! Pure bookkeeping over key references; the keys themselves live in the HAL key store. The rules
//! (DESIGN §6):
//! * a key made for a rotation is recorded as `pending` before its public key is sent;
//! * every key the agent holds (active, pending, history) may answer a challenge, so the previous
//!   key keeps working until a `Result` names the new one;
//! * when a `Result` names a key, that key becomes active and every other key moves to the
//!   history, newest first, which keeps at most [`HISTORY_LIMIT`] keys; the ones that fall off are
//!   returned so the caller deletes them from the key store *after* the new state is on disk.

use serde::{Deserialize, Serialize};

/// Earlier keys kept (and still able to answer challenges).
pub(crate) const HISTORY_LIMIT: usize = 10;

/// Prefix of every key name this agent creates; only such keys are garbage-collected.
pub(crate) const KEY_PREFIX: &str = "bound-";

/// A key in the key store, with its public key so challenges can be matched without the HAL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KeyRef {
    /// Name in the key store.
    pub name: String,
    /// Stored in SSH `ecdsa-sha2-nistp256 …` form; parsed once, when `state.json` is read.
    #[serde(with = "ssh_form")]
    pub public_key: p256::PublicKey,
    /// Unix seconds.
    pub created_at: i64,
}

impl KeyRef {
    pub(crate) fn kid(&self) -> String {
        boundkey_proto::kid(&self.public_key)
    }

    /// The SSH `authorized_keys` form an operator pastes into `boundkeyctl`.
    pub(crate) fn ssh_public_key(&self) -> String {
        boundkey_proto::ssh_public_key(&self.public_key)
    }
}

/// Serde for a P-256 public key as an SSH `ecdsa-sha2-nistp256` string.
mod ssh_form {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(k: &p256::PublicKey, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&boundkey_proto::ssh_public_key(k))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<p256::PublicKey, D::Error> {
        let s = String::deserialize(d)?;
        boundkey_proto::parse_ssh_public_key(&s).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KeySet {
    /// The key believed bound on the auth service (or made by `keypair create`).
    #[serde(default)]
    pub active: Option<KeyRef>,
    /// Made for a rotation, persisted before its public key was sent, not yet confirmed.
    #[serde(default)]
    pub pending: Option<KeyRef>,
    /// Earlier keys, newest first, at most [`HISTORY_LIMIT`].
    #[serde(default)]
    pub history: Vec<KeyRef>,
}

impl KeySet {
    /// Every key held, active first, then pending, then history.
    pub(crate) fn all(&self) -> impl Iterator<Item = &KeyRef> {
        self.active
            .iter()
            .chain(self.pending.iter())
            .chain(self.history.iter())
    }

    pub(crate) fn contains_name(&self, name: &str) -> bool {
        self.all().any(|k| k.name == name)
    }

    /// Finds a key by public key (SSH form compared as parsed points).
    pub(crate) fn find(&self, public_key: &p256::PublicKey) -> Option<&KeyRef> {
        self.all().find(|k| k.public_key == *public_key)
    }

    /// Records a new rotation key. A previous unconfirmed pending key moves to the history (it
    /// may have been sent, so it is kept like any other earlier key). Returns keys that fell
    /// off the history.
    pub(crate) fn set_pending(&mut self, key: KeyRef) -> Vec<KeyRef> {
        if let Some(old) = self.pending.take() {
            self.history.insert(0, old);
        }
        self.pending = Some(key);
        self.trim()
    }

    /// Replaces the active key (e.g. `keypair create --overwrite`); the old one joins the history.
    pub(crate) fn set_active(&mut self, key: KeyRef) -> Vec<KeyRef> {
        if let Some(old) = self.active.take() {
            self.history.insert(0, old);
        }
        self.active = Some(key);
        self.trim()
    }

    /// A `Result` named `public_key` as bound: that key becomes active, every other key goes to
    /// the history. Returns the keys that fell off the history, or `None` if no held key matches
    /// (nothing is changed then).
    pub(crate) fn promote(&mut self, public_key: &p256::PublicKey) -> Option<Vec<KeyRef>> {
        let chosen = self.find(public_key)?.clone();
        let mut others: Vec<KeyRef> = Vec::new();
        if let Some(p) = self.pending.take() {
            if p != chosen {
                others.push(p);
            }
        }
        if let Some(a) = self.active.take() {
            if a != chosen {
                others.push(a);
            }
        }
        self.history.retain(|k| *k != chosen);
        for k in others.into_iter().rev() {
            self.history.insert(0, k);
        }
        self.active = Some(chosen);
        Some(self.trim())
    }

    fn trim(&mut self) -> Vec<KeyRef> {
        // Never list one key twice (e.g. a key both pending and in the history).
        let mut seen = Vec::new();
        self.history.retain(|k| {
            if seen.contains(&k.name) {
                false
            } else {
                seen.push(k.name.clone());
                true
            }
        });
        let active = self.active.as_ref().map(|k| k.name.clone());
        let pending = self.pending.as_ref().map(|k| k.name.clone());
        self.history
            .retain(|k| Some(&k.name) != active.as_ref() && Some(&k.name) != pending.as_ref());
        if self.history.len() > HISTORY_LIMIT {
            self.history.split_off(HISTORY_LIMIT)
        } else {
            Vec::new()
        }
    }
}

/// A fresh, unique key name: `bound-<unix seconds>-<random>`.
pub(crate) fn new_key_name(now: i64) -> String {
    format!("{KEY_PREFIX}{now}-{}", boundkey_fs::random_suffix())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: i64) -> (KeyRef, p256::PublicKey) {
        let pk = p256::SecretKey::random(&mut rand_core::OsRng).public_key();
        (
            KeyRef {
                name: format!("bound-{i}"),
                public_key: pk,
                created_at: i,
            },
            pk,
        )
    }

    #[test]
    fn rotation_keeps_the_old_key_until_the_result_names_the_new_one() {
        let (a, pa) = key(1);
        let (b, pb) = key(2);
        let mut ks = KeySet::default();
        ks.set_active(a.clone());
        assert!(ks.set_pending(b.clone()).is_empty());
        // Both can answer challenges.
        assert_eq!(ks.find(&pa), Some(&a));
        assert_eq!(ks.find(&pb), Some(&b));
        // A Result naming the old key: the unconfirmed pending key moves to the history, where
        // it still can answer.
        assert!(ks.promote(&pa).unwrap().is_empty());
        assert_eq!(ks.active, Some(a.clone()));
        assert_eq!(
            (ks.pending.as_ref(), ks.history.as_slice()),
            (None, &[b.clone()][..])
        );
        // A Result naming the new key makes it active.
        let mut ks2 = KeySet::default();
        ks2.set_active(a.clone());
        ks2.set_pending(b.clone());
        assert!(ks2.promote(&pb).unwrap().is_empty());
        assert_eq!(ks2.active, Some(b));
        assert_eq!(ks2.pending, None);
        assert_eq!(ks2.history, vec![a]);
    }

    #[test]
    fn history_is_bounded_and_returns_the_dropped_keys() {
        let mut ks = KeySet::default();
        let (first, _) = key(0);
        ks.set_active(first.clone());
        let mut dropped = Vec::new();
        for i in 1..=(HISTORY_LIMIT as i64 + 2) {
            let (k, pk) = key(i);
            dropped.extend(ks.set_pending(k));
            dropped.extend(ks.promote(&pk).unwrap());
        }
        assert_eq!(ks.history.len(), HISTORY_LIMIT);
        assert_eq!(dropped.len(), 2);
        assert_eq!(dropped[0], first);
        // Newest first.
        assert!(ks.history[0].created_at > ks.history[1].created_at);
    }

    #[test]
    fn promote_of_an_unknown_key_changes_nothing() {
        let (a, _) = key(1);
        let (_, other) = key(2);
        let mut ks = KeySet::default();
        ks.set_active(a);
        let before = ks.clone();
        assert!(ks.promote(&other).is_none());
        assert_eq!(ks, before);
    }

    #[test]
    fn promote_from_history_reorders_without_duplicates() {
        let (a, pa) = key(1);
        let (b, pb) = key(2);
        let mut ks = KeySet::default();
        ks.set_active(a.clone());
        ks.set_pending(b.clone());
        ks.promote(&pb).unwrap();
        ks.promote(&pa).unwrap();
        assert_eq!(ks.active, Some(a));
        assert_eq!(ks.history, vec![b]);
    }
}
