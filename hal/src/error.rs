//! Errors a key store reports, each naming what failed so the agent can tell the operator what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum HalError {
    #[error("TPM not found at {tcti}: {detail} (is the TPM enabled and its device node present, or the TPM simulator running?)")]
    DeviceAbsent { tcti: String, detail: String },
    #[error(
        "permission denied opening the TPM at {tcti} (run as a user in the tss group, or as root)"
    )]
    PermissionDenied { tcti: String },
    #[error("the TPM is in dictionary-attack lockout (wait for the lockout to expire or clear it with the lockout auth)")]
    Lockout,
    #[error("TPM authorization failed for {what} (wrong auth value)")]
    AuthFailed { what: String },
    #[error("key {name} is corrupt or was made by a different TPM: {detail}")]
    KeyCorrupt { name: String, detail: String },
    #[error("key {0} does not exist")]
    KeyNotFound(String),
    #[error("key {0} already exists (use --overwrite to replace it)")]
    KeyExists(String),
    #[error("the TPM stopped responding: {0}")]
    DeviceLost(String),
    #[error("TPM error during {op}: {detail}")]
    Tpm { op: &'static str, detail: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid key name {0:?}")]
    InvalidKeyName(String),
    #[error("invalid P-256 public key")]
    InvalidPublicKey,
    #[error("this build has no TPM support (built without the tpm feature)")]
    TpmUnsupported,
}

impl HalError {
    /// True when retrying later may succeed (device temporarily gone), so the agent backs off
    /// instead of giving up.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            HalError::DeviceLost(_) | HalError::DeviceAbsent { .. }
        )
    }
}
