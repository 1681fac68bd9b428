//! Errors a key store reports, each naming what failed so the agent can tell the operator what to
//! do. The texts describe the key store only: the agent adds its own flags and settings.

use std::fmt;
use std::io;
use std::path::PathBuf;

use boundkey_fs::{FsError, SecretFileError};

use crate::Parent;

/// Why a key-store operation failed. Each variant is one thing the operator can act on; the
/// causes inside are typed so a caller can tell them apart without reading the text.
#[derive(Debug, thiserror::Error)]
pub enum HalError {
    /// No TPM answered at `tcti` (device node missing, simulator not running).
    #[error("TPM not found at {tcti}: {cause} (is the TPM enabled and its device node present, or the TPM simulator running?)")]
    DeviceAbsent { tcti: String, cause: Absence },
    /// The device node exists but this user may not open it.
    #[error(
        "permission denied opening the TPM at {tcti} (run as a user in the tss group, or as root)"
    )]
    PermissionDenied { tcti: String },
    /// The TPM refuses authorizations until the lockout ends; retrying makes it longer.
    #[error("the TPM is in dictionary-attack lockout (wait for the lockout to expire or clear it with the lockout auth)")]
    Lockout,
    /// An auth value is wrong; it will not become right by retrying.
    #[error("TPM authorization failed for {what} (wrong auth value)")]
    AuthFailed { what: AuthTarget },
    /// A key file exists but does not hold a usable key; `path` is the file.
    #[error("key {name} is corrupt or was made by a different TPM: {}: {fault}", path.display())]
    KeyCorrupt {
        name: String,
        path: PathBuf,
        fault: KeyFault,
    },
    /// No key file of that name.
    #[error("key {0} does not exist")]
    KeyNotFound(String),
    /// A key of that name exists; a store never replaces one (delete it first).
    #[error("key {0} already exists")]
    KeyExists(String),
    /// The connection broke mid-operation; the next operation reconnects.
    #[error("the TPM stopped responding: {op} via {tcti}: {response}")]
    DeviceLost {
        op: &'static str,
        tcti: String,
        response: TpmResponse,
    },
    /// Any other TPM failure, with the operation it broke.
    #[error("TPM error during {op}: {fault}")]
    Tpm { op: &'static str, fault: TpmFault },
    /// Reading or writing the storage directory failed.
    #[error(transparent)]
    Io(#[from] FsError),
    /// A secret file (auth value) breaks the one rule for secret files.
    #[error(transparent)]
    Secret(#[from] SecretFileError),
    /// A TPM configuration refused when the store is opened, before touching the TPM.
    #[error("invalid TPM configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("invalid key name {0:?}")]
    InvalidKeyName(String),
    #[error("invalid P-256 public key")]
    InvalidPublicKey,
    #[error("this build has no TPM support (built without the tpm feature)")]
    TpmUnsupported,
    /// Key attestation needs a TPM.
    #[error("the {0} key store cannot prove that its keys live in a TPM")]
    CannotAttest(crate::Backend),
    /// A credential arrived without an attestation before it in this process.
    #[error("no key attestation is in progress for this credential")]
    NoAttestation,
}

impl HalError {
    /// True when retrying later may succeed (device temporarily gone), so the agent backs off
    /// instead of giving up.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            HalError::DeviceLost { .. } | HalError::DeviceAbsent { .. }
        )
    }
}

/// Whose auth value the TPM refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthTarget {
    /// The key's own auth value (set when it was created).
    Key(String),
    /// The owner hierarchy, needed to make the template parent.
    OwnerHierarchy,
    /// A persistent parent key at this handle.
    ParentKey(u32),
}

impl fmt::Display for AuthTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthTarget::Key(name) => write!(f, "key {name}"),
            AuthTarget::OwnerHierarchy => f.write_str("the owner hierarchy (owner auth)"),
            AuthTarget::ParentKey(h) => write!(f, "parent key {h:#010x}"),
        }
    }
}

/// What is wrong with a key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyFault {
    #[error("larger than {limit} bytes, too large for a key file")]
    TooLarge { limit: u64 },
    #[error("not a PEM file (not UTF-8 text)")]
    NotText,
    #[error("not a PKCS#8 PEM P-256 private key ({0})")]
    NotPkcs8(p256::pkcs8::Error),
    #[error("PKCS#8 encoding failed: {0}")]
    Pkcs8Encode(p256::pkcs8::Error),
    #[error("signing failed: {0}")]
    Sign(p256::ecdsa::Error),
    /// The TPM key file format is damaged.
    #[cfg(feature = "tpm")]
    #[error(transparent)]
    Blob(#[from] crate::tpm::BlobError),
    /// The file parses, but the TPM will not load it: damaged inside the wrapped private area, or
    /// made by another TPM or under another parent.
    #[error("the TPM refused to load it under the {parent} ({response}); it is damaged or belongs to another TPM or parent")]
    RefusedByTpm {
        parent: Parent,
        response: TpmResponse,
    },
}

/// A TPM configuration the store refuses before touching the TPM.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0:#010x} is not a persistent handle (0x81000000..0x81ffffff)")]
    NotPersistentHandle(u32),
    /// The TPM refuses an auth value longer than the digest it is checked against.
    #[error("the {what} value is longer than {max} bytes")]
    AuthTooLong { what: &'static str, max: usize },
    /// The TCTI library ignores options it does not know and then connects somewhere else.
    #[error("TCTI {tcti:?}: only host= and port= are supported (TCP), not {option}=")]
    TctiOption { tcti: String, option: String },
    #[cfg(feature = "tpm")]
    #[error("{tcti:?} is not a TCTI ({source}); expected device:PATH, tabrmd, swtpm:host=H,port=P or mssim:host=H,port=P")]
    Tcti {
        tcti: String,
        source: tss_esapi::Error,
    },
}

/// A failure the TPM software stack reported: its full TSS2_RC (layer byte included) when it had
/// one, and a description that names the layer and the code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TpmResponse {
    code: Option<u32>,
    description: String,
}

impl TpmResponse {
    #[cfg(feature = "tpm")]
    pub(crate) fn new(code: Option<u32>, description: String) -> Self {
        TpmResponse { code, description }
    }

    /// The TSS2_RC, e.g. `0x98e` (TPM_RC_AUTH_FAIL on session 1) or `0xa000a` (TCTI I/O error);
    /// `None` for failures inside the library that carry no response code.
    pub fn code(&self) -> Option<u32> {
        self.code
    }
}

impl fmt::Display for TpmResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.description)
    }
}

/// Why no TPM could be reached.
#[derive(Debug, thiserror::Error)]
pub enum Absence {
    /// The TCTI's device node cannot be opened (for a reason other than permissions).
    #[error("{}: {source}", path.display())]
    Node { path: PathBuf, source: io::Error },
    /// The TCTI library could not connect.
    #[error("{0}")]
    Connect(TpmResponse),
}

/// What went wrong in a TPM operation that is neither the device, the auth values nor the key
/// file.
#[derive(Debug, thiserror::Error)]
pub enum TpmFault {
    /// A command failed at `stage` ("signing", "loading the key", ...).
    #[error("{stage} failed: {response}")]
    Command {
        stage: &'static str,
        response: TpmResponse,
    },
    /// The parent to create or load keys under is missing or not a usable storage key.
    #[error("the {parent} does not exist or is unusable ({response})")]
    ParentUnusable {
        parent: Parent,
        response: TpmResponse,
    },
    /// The TPM refused a key blob while no key file was involved.
    #[error("{0}")]
    BlobRefused(TpmResponse),
    /// The TPM created a key this store must not use (or cannot store).
    #[cfg(feature = "tpm")]
    #[error("the TPM returned an unusable key: {0}")]
    UnusableKey(crate::tpm::BlobError),
    #[error("the TPM returned a signature that is not a valid ECDSA P-256 signature")]
    BadSignature,
}
