//! The storage directory: everything the agent must remember between runs.
//!
//! Layout (documented in `docs/agent.md`):
//!
//! ```text
//! STORAGE/            mode 0700, one agent at a time (exclusive lock on STORAGE/lock)
//!   lock              lock file; holds the pid of the agent that owns the directory
//!   state.json        mode 0600: versioned JSON, see [`State`]
//!   keys/             the key store (file backend: NAME.pem; TPM backend: wrapped key blobs)
//! ```
//!
//! Everything that changes when a join completes (new identity, the key the auth service now has
//! bound, the join-state document) lives in the one `state.json` and is replaced with a single
//! atomic rename, so no crash can leave a new certificate next to an old key reference or an old
//! join state. Corrupt or truncated files are reported by name and never overwritten.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use boundkey_hal::Backend;
use boundkey_proto::{CeremonyKind, JoinMethod};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::keyset::KeySet;
use boundkey_fs::{DirLock, FsError, LockError};

pub(crate) const STATE_FILE: &str = "state.json";
pub(crate) const LOCK_FILE: &str = "lock";
pub(crate) const KEYS_DIR: &str = "keys";
/// Version of `state.json` this build writes; older versions are upgraded on load.
pub(crate) const STATE_VERSION: u32 = 1;
const MAX_STATE_LEN: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum StorageError {
    #[error(transparent)]
    Io(#[from] FsError),
    #[error(
        "storage directory {} is in use by another boundkeyd{} (one agent per storage directory: stop the other agent or use another --storage)",
        dir.display(),
        pid.as_ref().map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    InUse { dir: PathBuf, pid: Option<String> },
    #[error(
        "{} is corrupt ({detail}); it was left untouched: restore it from a backup, or move it aside and onboard this device again with a new join token",
        path.display()
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "{} was written by a newer boundkeyd (state version {found}, this build reads up to {STATE_VERSION}); upgrade boundkeyd",
        path.display()
    )]
    TooNew { path: PathBuf, found: u64 },
}

/// A secret string (PEM private key): zeroed on drop, never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// How and where this device joins. Recorded at the first successful join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JoinInfo {
    pub method: JoinMethod,
    /// Token name (bound keypair). For the `token` method the token is a secret and is not kept.
    #[serde(default)]
    pub token: Option<String>,
    /// `HOST:PORT` of the auth service.
    pub auth_server: boundkey_proto::Endpoint,
    /// PEM of the auth service's TLS CA, learned (and pinned) at first contact.
    #[serde(default)]
    pub server_ca: Option<String>,
}

/// The current identity: what the last `Result` carried, plus the identity private key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Identity {
    pub bot_name: String,
    pub instance_id: String,
    pub generation: u64,
    pub join_method: JoinMethod,
    pub not_before: i64,
    pub expires: i64,
    /// PEM certificate chain, leaf first.
    pub certificate: String,
    /// PEM identity CA bundle.
    pub ca_bundle: String,
    /// PKCS#8 PEM of the software P-256 identity key.
    pub private_key: Secret,
    /// Join-state document from the last join (bound keypair).
    #[serde(default)]
    pub join_state: Option<String>,
}

/// Marks that a ceremony may have been committed by the auth service without the agent having
/// recorded its result (set before a challenge solution is sent, cleared when a result or a
/// refusal arrives). While set, the next attempt reuses the recorded identity key and presents
/// the same certificate and join state, so the auth service can recognise the retry and deliver
/// the result again (`docs/protocol.md` §5.4). A mark without an identity key (written by an
/// older agent) makes the agent recover instead of renewing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InFlight {
    /// Unix seconds.
    pub since: i64,
    /// The interrupted ceremony (`None` in marks written before it was recorded).
    #[serde(default, deserialize_with = "kind_or_unknown")]
    pub ceremony: Option<CeremonyKind>,
    /// PKCS#8 PEM of the interrupted ceremony's identity key.
    #[serde(default)]
    pub identity_key: Option<Secret>,
}

/// Older agents wrote `"unknown"` when they did not know the ceremony: read that as `None`
/// instead of refusing the whole file.
fn kind_or_unknown<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<CeremonyKind>, D::Error> {
    let v = Option::<String>::deserialize(d)?;
    Ok(v.and_then(|s| serde_json::from_value(serde_json::Value::String(s)).ok()))
}

/// `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct State {
    pub version: u32,
    /// Key store backend holding the bound keys (`file` or `tpm`); fixed for the directory.
    pub keystore: Backend,
    #[serde(default)]
    pub keys: KeySet,
    #[serde(default)]
    pub join: Option<JoinInfo>,
    #[serde(default)]
    pub identity: Option<Identity>,
    #[serde(default)]
    pub in_flight: Option<InFlight>,
}

impl State {
    pub(crate) fn new(backend: Backend) -> Self {
        State {
            version: STATE_VERSION,
            keystore: backend,
            keys: KeySet::default(),
            join: None,
            identity: None,
            in_flight: None,
        }
    }

    pub(crate) fn backend(&self) -> Backend {
        self.keystore
    }
}

/// The storage directory, locked for this process. Invariant: while a `Storage` lives, no other
/// agent writes to the directory.
#[derive(Debug)]
pub(crate) struct Storage {
    dir: PathBuf,
    /// Held for the life of the process; the OS releases the lock when it exits, however it exits.
    _lock: DirLock,
}

impl Storage {
    /// Opens (creating with mode 0700) and exclusively locks `dir`.
    pub(crate) fn open_locked(dir: &Path) -> Result<Storage, StorageError> {
        boundkey_fs::ensure_dir(dir, 0o700)?;
        // The directory and what the agent keeps in it must be its own: a file or link planted
        // by another user (before the mode was tightened, or through a wrong owner) is refused
        // rather than read, followed or overwritten.
        boundkey_fs::check_owned(dir)?;
        for name in [LOCK_FILE, STATE_FILE, KEYS_DIR] {
            boundkey_fs::check_owned(&dir.join(name))?;
        }
        if boundkey_fs::tighten_dir(dir)? {
            tracing::warn!(dir = %dir.display(), "storage directory was accessible to other users; removed their access");
        }
        let lock = DirLock::acquire(dir, LOCK_FILE).map_err(|e| match e {
            LockError::Busy { dir, pid } => StorageError::InUse { dir, pid },
            LockError::Fs(e) => StorageError::Io(e),
        })?;
        Ok(Storage {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn keys_dir(&self) -> PathBuf {
        self.dir.join(KEYS_DIR)
    }

    pub(crate) fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    pub(crate) fn load(&self) -> Result<Option<State>, StorageError> {
        read_state(&self.dir)
    }

    /// Atomically replaces `state.json`.
    pub(crate) fn save(&self, state: &State) -> Result<(), StorageError> {
        let mut bytes = to_bytes(state).map_err(|e| FsError {
            path: self.state_path(),
            source: io::Error::other(e),
        })?;
        let r = boundkey_fs::write_atomic(&self.state_path(), &bytes, 0o600);
        bytes.zeroize();
        r.map_err(StorageError::from)
    }
}

/// The bytes of `state.json` for `state` (pretty JSON, one trailing newline).
pub(crate) fn to_bytes(state: &State) -> Result<Vec<u8>, serde_json::Error> {
    let mut bytes = serde_json::to_vec_pretty(state)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Reads `DIR/state.json` without taking the lock (for `status`; writes are atomic, so a reader
/// sees either the old or the new file). `Ok(None)` if the agent never wrote one.
pub(crate) fn read_state(dir: &Path) -> Result<Option<State>, StorageError> {
    let path = dir.join(STATE_FILE);
    let Some(mut bytes) = boundkey_fs::read_limited(&path, MAX_STATE_LEN)? else {
        return Ok(None);
    };
    let r = parse_state(&path, &bytes);
    bytes.zeroize();
    r.map(Some)
}

pub(crate) fn parse_state(path: &Path, bytes: &[u8]) -> Result<State, StorageError> {
    let corrupt = |detail: String| StorageError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    if bytes.is_empty() {
        return Err(corrupt("empty file".into()));
    }
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not valid JSON: {e}")))?;
    let version = value
        .get("version")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| corrupt("no numeric \"version\" field".into()))?;
    if version > u64::from(STATE_VERSION) {
        return Err(StorageError::TooNew {
            path: path.to_path_buf(),
            found: version,
        });
    }
    if version == 0 {
        return Err(corrupt("version 0 is not a valid state version".into()));
    }
    let state: State =
        serde_json::from_value(value).map_err(|e| corrupt(format!("unexpected contents: {e}")))?;
    for k in state.keys.all() {
        if boundkey_hal::KeyName::new(&k.name).is_err() {
            return Err(corrupt(format!("invalid key reference {:?}", k.name)));
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::keyset::KeyRef;

    fn sample() -> State {
        let pk = p256::SecretKey::random(&mut rand_core::OsRng).public_key();
        let mut s = State::new(Backend::File);
        s.keys.set_active(KeyRef {
            name: "bound-1-ab".into(),
            public_key: pk,
            created_at: 1,
        });
        s.join = Some(JoinInfo {
            method: JoinMethod::BoundKeypair,
            token: Some("tok".into()),
            auth_server: boundkey_proto::Endpoint::new("127.0.0.1", 1),
            server_ca: None,
        });
        s.identity = Some(Identity {
            bot_name: "b".into(),
            instance_id: "i".into(),
            generation: 3,
            join_method: JoinMethod::BoundKeypair,
            not_before: 1,
            expires: 2,
            certificate: "C".into(),
            ca_bundle: "CA".into(),
            private_key: Secret("KEY".into()),
            join_state: Some("js".into()),
        });
        s
    }

    #[test]
    fn round_trip_and_mode() {
        let d = tempfile::tempdir().unwrap();
        let st = Storage::open_locked(&d.path().join("s")).unwrap();
        assert!(st.load().unwrap().is_none());
        let s = sample();
        st.save(&s).unwrap();
        assert_eq!(st.load().unwrap(), Some(s));
        let mode = fs::metadata(st.state_path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = fs::metadata(st.dir()).unwrap().permissions().mode() & 0o777;
        assert_eq!(dmode, 0o700);
    }

    #[test]
    fn second_lock_is_refused_with_a_clear_message() {
        let d = tempfile::tempdir().unwrap();
        let _a = Storage::open_locked(d.path()).unwrap();
        let e = Storage::open_locked(d.path()).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, StorageError::InUse { .. }), "{msg}");
        assert!(msg.contains("in use by another boundkeyd"), "{msg}");
        assert!(msg.contains(&std::process::id().to_string()), "{msg}");
    }

    #[test]
    fn lock_is_released_on_drop() {
        let d = tempfile::tempdir().unwrap();
        drop(Storage::open_locked(d.path()).unwrap());
        Storage::open_locked(d.path()).unwrap();
    }

    #[test]
    fn corrupt_and_truncated_files_name_the_file_and_stay_untouched() {
        let d = tempfile::tempdir().unwrap();
        let st = Storage::open_locked(d.path()).unwrap();
        st.save(&sample()).unwrap();
        let good = fs::read(st.state_path()).unwrap();
        let cases: Vec<Vec<u8>> = vec![
            good[..good.len() / 2].to_vec(),
            Vec::new(),
            b"garbage".to_vec(),
            br#"{"keystore":"file"}"#.to_vec(),
            br#"{"version":1,"keystore":"floppy"}"#.to_vec(),
            br#"{"version":1,"keystore":"file","surprise":1}"#.to_vec(),
            br#"{"version":1,"keystore":"file","keys":{"active":{"name":"../x","public_key":"p","created_at":1}}}"#.to_vec(),
        ];
        for bad in cases {
            fs::write(st.state_path(), &bad).unwrap();
            let e = st.load().unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, StorageError::Corrupt { .. }), "{msg}");
            assert!(
                msg.contains(&st.state_path().display().to_string()),
                "{msg}"
            );
            assert_eq!(fs::read(st.state_path()).unwrap(), bad);
        }
    }

    #[test]
    fn newer_versions_are_refused() {
        let d = tempfile::tempdir().unwrap();
        fs::write(
            d.path().join(STATE_FILE),
            br#"{"version":99,"keystore":"file"}"#,
        )
        .unwrap();
        let e = read_state(d.path()).unwrap_err();
        assert!(matches!(e, StorageError::TooNew { found: 99, .. }), "{e}");
    }

    #[test]
    fn debug_output_hides_the_identity_key() {
        let s = sample();
        assert!(!format!("{s:?}").contains("KEY\""));
    }

    #[test]
    fn wide_permissions_are_tightened() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        fs::create_dir(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        let _st = Storage::open_locked(&p).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn an_in_flight_mark_of_an_older_agent_still_loads() {
        let path = Path::new("/s/state.json");
        let old =
            br#"{"version":1,"keystore":"file","in_flight":{"since":5,"ceremony":"unknown"}}"#;
        let st = parse_state(path, old).unwrap();
        let f = st.in_flight.unwrap();
        assert_eq!((f.since, f.ceremony), (5, None));
        let new =
            br#"{"version":1,"keystore":"tpm","in_flight":{"since":5,"ceremony":"recovery"}}"#;
        let st = parse_state(path, new).unwrap();
        assert_eq!(st.in_flight.unwrap().ceremony, Some(CeremonyKind::Recovery));
        assert_eq!(st.keystore, Backend::Tpm);
    }

    #[test]
    fn planted_links_and_foreign_files_are_refused_and_left_alone() {
        for planted in [LOCK_FILE, STATE_FILE, KEYS_DIR] {
            let d = tempfile::tempdir().unwrap();
            let victim = d.path().join("victim");
            fs::write(&victim, b"precious").unwrap();
            let dir = d.path().join("storage");
            fs::create_dir(&dir).unwrap();
            std::os::unix::fs::symlink(&victim, dir.join(planted)).unwrap();
            let e = Storage::open_locked(&dir).unwrap_err().to_string();
            assert!(e.contains("symbolic link"), "{planted}: {e}");
            assert_eq!(fs::read(&victim).unwrap(), b"precious");
        }
        // A directory (or a state file) that belongs to another user is not this agent's.
        if rustix::process::geteuid().is_root() {
            let d = tempfile::tempdir().unwrap();
            let nobody = Some(rustix::process::Uid::from_raw(65534));
            rustix::fs::chown(d.path(), nobody, None).unwrap();
            let e = Storage::open_locked(d.path()).unwrap_err().to_string();
            assert!(e.contains("owned by uid 65534"), "{e}");
            let d = tempfile::tempdir().unwrap();
            fs::write(d.path().join(STATE_FILE), b"{}").unwrap();
            rustix::fs::chown(d.path().join(STATE_FILE), nobody, None).unwrap();
            let e = Storage::open_locked(d.path()).unwrap_err().to_string();
            assert!(e.contains("owned by uid 65534"), "{e}");
        }
    }
}
