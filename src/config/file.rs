//! The TOML configuration file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;

/// Config files are a few hundred bytes; a far larger one is the wrong file.
const MAX_CONFIG_FILE: u64 = 256 * 1024;

/// The `[tpm]` table of the config file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct TpmFileConfig {
    pub tcti: Option<String>,
    pub owner_auth_file: Option<PathBuf>,
    pub key_auth_file: Option<PathBuf>,
    pub parent: Option<String>,
    pub persist_srk: Option<bool>,
}

/// The TOML config file. Unknown keys are errors, so a typo never silently drops a setting.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    pub join_uri: Option<String>,
    pub join_method: Option<String>,
    pub token: Option<String>,
    pub auth_server: Option<String>,
    pub ca_pin: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub registration_secret_file: Option<PathBuf>,
    pub storage: Option<PathBuf>,
    pub destination: Option<PathBuf>,
    pub keystore: Option<String>,
    pub certificate_ttl: Option<String>,
    pub renewal_interval: Option<String>,
    pub heartbeat_interval: Option<String>,
    /// Unix socket of the health endpoint (off when neither health key is set).
    pub health_socket: Option<PathBuf>,
    /// TCP address (`127.0.0.1:9105`) of the health endpoint.
    pub health_listen: Option<String>,
    pub tpm: Option<TpmFileConfig>,
}

impl FileConfig {
    pub(crate) fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            detail: e.to_string().replace('\n', " ").trim().to_string(),
        })
    }

    pub(crate) fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let bytes = boundkey_fs::read_limited(path, MAX_CONFIG_FILE)
            .map_err(|e| ConfigError::Read {
                path: path.to_path_buf(),
                detail: e.source.to_string(),
            })?
            .ok_or_else(|| ConfigError::Read {
                path: path.to_path_buf(),
                detail: "no such file".into(),
            })?;
        let text = String::from_utf8(bytes).map_err(|_| ConfigError::Parse {
            path: path.to_path_buf(),
            detail: "not UTF-8 text".into(),
        })?;
        Self::parse(path, &text)
    }
}
