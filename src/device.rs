//! One device as the agent sees it: the locked storage directory, its state resolved against the
//! configuration, and the key store that holds its bound keys. Every command that changes the
//! directory (`start`, `keypair create`) opens it through [`Device::open`].

use boundkey_hal::{Backend, KeyName, KeyStore, Parent, TpmConfig};

use crate::config::{Settings, TpmSettings};
use crate::error::AgentError;
use crate::keyset::{self, KeyRef};
use crate::resolve::{self, Environment, ResolveError, Resolved};
use crate::storage::{State, Storage, StorageError};
use crate::transport;

/// CA files hold a few certificates; a far larger file is the wrong file.
const MAX_CA_FILE: u64 = 1024 * 1024;

/// Invariant: `state` is what `storage` holds on disk (every change goes through [`Device::save`]),
/// and `resolved` was computed from it.
pub(crate) struct Device {
    pub(crate) storage: Storage,
    pub(crate) state: State,
    pub(crate) env: Environment,
    pub(crate) resolved: Resolved,
    pub(crate) keystore: Box<dyn KeyStore>,
}

impl Device {
    /// Locks and loads the storage directory, resolves the configuration against it and opens
    /// the key store.
    pub(crate) fn open(settings: &Settings) -> Result<Device, AgentError> {
        let storage = Storage::open_locked(&settings.storage)?;
        let loaded = storage.load()?;
        let env = environment(settings)?;
        let resolved = resolve::resolve(settings, loaded.as_ref(), &env)
            .map_err(|e| resolve_error(e, &storage))?;
        let state = loaded.unwrap_or_else(|| State::new(resolved.backend));
        let keystore = open_keystore(resolved.backend, &storage, &settings.tpm)?;
        Ok(Device {
            storage,
            state,
            env,
            resolved,
            keystore,
        })
    }

    /// Writes `next` durably, then makes it the state in memory.
    pub(crate) fn save(&mut self, next: State) -> Result<(), AgentError> {
        self.storage.save(&next)?;
        self.state = next;
        Ok(())
    }

    /// Resolves the configuration again after the stored state changed (a join records the
    /// auth service's CA and address).
    pub(crate) fn refresh(&mut self, settings: &Settings) -> Result<(), AgentError> {
        self.resolved = resolve::resolve(settings, Some(&self.state), &self.env)
            .map_err(|e| resolve_error(e, &self.storage))?;
        Ok(())
    }

    /// Creates a key in the store and describes it (not yet recorded in the state).
    pub(crate) fn create_key(&mut self, now: i64) -> Result<KeyRef, AgentError> {
        create_key(self.keystore.as_mut(), now)
    }

    /// Deletes keys that fell off the history. Only called after the state that no longer lists
    /// them is on disk; a failure leaves an orphan for the next start-up to collect.
    pub(crate) fn delete_keys(&mut self, keys: &[KeyRef]) {
        delete_keys(self.keystore.as_mut(), keys)
    }

    /// Deletes keys this agent made that the state does not reference (made just before a crash).
    pub(crate) fn collect_orphans(&mut self) {
        let Ok(names) = self.keystore.list() else {
            return;
        };
        for n in names {
            if n.as_str().starts_with(keyset::KEY_PREFIX)
                && !self.state.keys.contains_name(n.as_str())
            {
                match self.keystore.delete(&n) {
                    Ok(()) => {
                        tracing::info!(key = %n, "deleted an orphan key (created, never recorded)")
                    }
                    Err(e) => {
                        tracing::warn!(key = %n, error = %e, "could not delete an orphan key")
                    }
                }
            }
        }
    }
}

pub(crate) fn create_key(store: &mut dyn KeyStore, now: i64) -> Result<KeyRef, AgentError> {
    let name = keyset::new_key_name(now);
    let public_key = store.create(&KeyName::new(&name)?)?.to_p256();
    Ok(KeyRef {
        name,
        public_key,
        created_at: now,
    })
}

pub(crate) fn delete_keys(store: &mut dyn KeyStore, keys: &[KeyRef]) {
    for k in keys {
        match KeyName::new(&k.name).and_then(|n| store.delete(&n)) {
            Ok(()) => tracing::info!(key = %k.name, "deleted a key that fell off the key history"),
            Err(e) => tracing::warn!(key = %k.name, error = %e, "could not delete an old key"),
        }
    }
}

fn resolve_error(e: ResolveError, storage: &Storage) -> AgentError {
    match e {
        ResolveError::Conflicts(list) => AgentError::StateConflict {
            dir: storage.dir().display().to_string(),
            list,
        },
        ResolveError::StoredCa(e) => AgentError::Storage(StorageError::Corrupt {
            path: storage.state_path(),
            detail: format!("the recorded auth service CA is unreadable: {e}"),
        }),
    }
}

/// Reads what [`resolve::resolve`] needs from the machine.
fn environment(settings: &Settings) -> Result<Environment, AgentError> {
    let ca_file = match &settings.join.ca_file {
        None => None,
        Some(path) => {
            let bytes = boundkey_fs::read_limited(path, MAX_CA_FILE)
                .map_err(|e| AgentError::Usage(format!("CA file {e}")))?
                .ok_or_else(|| {
                    AgentError::Usage(format!("CA file {} does not exist", path.display()))
                })?;
            let certs = transport::certs_from_pem(&String::from_utf8_lossy(&bytes))?;
            if certs.is_empty() {
                return Err(AgentError::Usage(format!(
                    "CA file {} holds no PEM certificate",
                    path.display()
                )));
            }
            Some(certs)
        }
    };
    Ok(Environment {
        tpm_available: boundkey_hal::tpm_present(),
        ca_file,
    })
}

/// Opens the key store in `STORAGE/keys`. TPM auth values are read now, from files or the
/// environment, never from the command line.
fn open_keystore(
    backend: Backend,
    storage: &Storage,
    tpm: &TpmSettings,
) -> Result<Box<dyn KeyStore>, AgentError> {
    let tpm = match backend {
        Backend::File => None,
        Backend::Tpm => Some(TpmConfig {
            tcti: tpm
                .tcti
                .clone()
                .unwrap_or_else(|| boundkey_hal::DEFAULT_TCTI.to_string()),
            owner_auth: boundkey_hal::read_secret(
                tpm.owner_auth_file.as_deref(),
                "BOUNDKEY_TPM_OWNER_AUTH",
            )?,
            key_auth: boundkey_hal::read_secret(
                tpm.key_auth_file.as_deref(),
                "BOUNDKEY_TPM_KEY_AUTH",
            )?,
            parent: tpm.parent.map(Parent::Persistent).unwrap_or_default(),
            persist_srk: tpm.persist_srk,
        }),
    };
    Ok(boundkey_hal::open_store(backend, &storage.keys_dir(), tpm)?)
}
