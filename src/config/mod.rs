//! Configuration: a TOML file, command-line flags and the join URI, merged into [`Settings`].
//!
//! Precedence and conflicts (see `docs/agent.md`):
//! * plain settings (storage, destination, keystore, durations, TPM): a flag overrides the file;
//! * join fields (method, token, auth server, CA pin): the file's explicit fields and its
//!   `join_uri` are combined, then the `--join-uri` flag is merged over them. A field given on
//!   both sides with different values is a conflict; every conflict is collected and reported in
//!   one error, nothing is silently picked;
//! * the registration secret may come from the join URI, `--registration-secret-file` (or the
//!   file's `registration_secret_file`) and the `BOUNDKEY_REGISTRATION_SECRET` environment
//!   variable; all sources given must agree (the error names the sources, never the values).
//!
//! [`merge`] is pure apart from the secret-file reader it is handed, so every rule is unit-tested.

mod error;
mod file;
mod flags;
mod join_fields;
mod merge;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use boundkey_hal::Backend;
use boundkey_proto::{CaPin, Endpoint, JoinMethod};
use zeroize::Zeroizing;

pub(crate) use error::{ConfigError, Conflict};
pub(crate) use file::FileConfig;
pub(crate) use flags::Flags;
pub(crate) use merge::merge;

pub(crate) const DEFAULT_CERTIFICATE_TTL: Duration = Duration::from_secs(3600);
pub(crate) const DEFAULT_RENEWAL_INTERVAL: Duration = Duration::from_secs(20 * 60);
pub(crate) const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30 * 60);
pub(crate) const MIN_CERTIFICATE_TTL: Duration = Duration::from_secs(10);
pub(crate) const MAX_CERTIFICATE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
pub(crate) const SECRET_ENV: &str = "BOUNDKEY_REGISTRATION_SECRET";

/// TPM settings (the auth values stay files; they are read when the key store opens).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TpmSettings {
    pub tcti: Option<String>,
    pub owner_auth_file: Option<PathBuf>,
    pub key_auth_file: Option<PathBuf>,
    pub parent: Option<u32>,
    /// The owner allows persisting the storage primary at the standard SRK handle.
    pub persist_srk: bool,
}

/// Join parameters. Any may be absent here and come from the storage directory instead.
#[derive(Clone, Default)]
pub(crate) struct JoinSettings {
    pub method: Option<JoinMethod>,
    pub token: Option<String>,
    pub auth_server: Option<Endpoint>,
    pub ca_pin: Option<CaPin>,
    pub ca_file: Option<PathBuf>,
    pub registration_secret: Option<Zeroizing<String>>,
}

impl fmt::Debug for JoinSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Without a method the token's nature is unknown: treat it as a secret.
        let method = self.method.unwrap_or(JoinMethod::Token);
        let token = self.token.as_deref().map(|t| method.displayed_token(t));
        f.debug_struct("JoinSettings")
            .field("method", &self.method)
            .field("token", &token)
            .field("auth_server", &self.auth_server)
            .field("ca_pin", &self.ca_pin)
            .field("ca_file", &self.ca_file)
            .field(
                "registration_secret",
                &self.registration_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// The merged configuration.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub storage: PathBuf,
    pub destination: Option<PathBuf>,
    pub keystore: Option<Backend>,
    pub tpm: TpmSettings,
    pub join: JoinSettings,
    pub certificate_ttl: Duration,
    pub renewal_interval: Duration,
    pub heartbeat_interval: Duration,
    pub oneshot: bool,
    /// Where the health endpoint listens; empty = disabled (no socket, no task).
    pub health: Vec<crate::health::Listen>,
}

impl Settings {
    /// Defaults for a storage directory, as unit tests need them.
    #[cfg(test)]
    pub(crate) fn for_tests(storage: &Path) -> Settings {
        Settings {
            storage: storage.to_path_buf(),
            destination: None,
            keystore: None,
            tpm: TpmSettings::default(),
            join: JoinSettings::default(),
            certificate_ttl: DEFAULT_CERTIFICATE_TTL,
            renewal_interval: DEFAULT_RENEWAL_INTERVAL,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            oneshot: false,
            health: Vec::new(),
        }
    }
}

/// Loads the config file (if any) and merges it with the flags and the environment.
pub(crate) fn load(
    config_file: Option<&Path>,
    flags: &Flags,
    env_secret: Option<Zeroizing<String>>,
) -> Result<Settings, ConfigError> {
    let file = config_file
        .map(|p| FileConfig::load(p).map(|c| (p, c)))
        .transpose()?;
    merge(
        file.as_ref().map(|(p, c)| (*p, c)),
        flags,
        env_secret,
        &|p| boundkey_fs::read_secret_file(p).map_err(ConfigError::from),
    )
}
