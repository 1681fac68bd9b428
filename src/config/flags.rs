//! Values given on the command line.

use std::path::PathBuf;
use std::time::Duration;

use boundkey_hal::Backend;

/// Command-line values (everything optional; `None` = not given).
#[derive(Debug, Clone, Default)]
pub(crate) struct Flags {
    pub join_uri: Option<String>,
    pub storage: Option<PathBuf>,
    pub destination: Option<PathBuf>,
    pub keystore: Option<Backend>,
    pub tcti: Option<String>,
    pub tpm_owner_auth_file: Option<PathBuf>,
    pub tpm_key_auth_file: Option<PathBuf>,
    pub tpm_parent: Option<String>,
    pub tpm_persist_srk: bool,
    pub certificate_ttl: Option<Duration>,
    pub renewal_interval: Option<Duration>,
    pub heartbeat_interval: Option<Duration>,
    pub registration_secret_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub oneshot: bool,
    pub health_socket: Option<PathBuf>,
    pub health_listen: Option<std::net::SocketAddr>,
}
