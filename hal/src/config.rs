//! TPM configuration, available with or without the `tpm` feature so callers (and
//! [`crate::open_store`]) have one signature in every build.

use std::fmt;

use zeroize::Zeroizing;

/// The TCTI used when none is configured: the kernel resource manager, which flushes whatever a
/// crashed process left loaded and lets several processes share the TPM.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

/// How to reach the TPM and which parent new keys are created under.
#[derive(Clone)]
pub struct TpmConfig {
    /// TCTI string: `device:/dev/tpmrm0` (default), `device:/dev/tpm0`, `tabrmd`,
    /// `swtpm:host=H,port=P`, `mssim:host=H,port=P`.
    pub tcti: String,
    /// Owner-hierarchy auth, needed to create the [`Parent::Template`] primary when the owner
    /// hierarchy has a password.
    pub owner_auth: Option<Zeroizing<Vec<u8>>>,
    /// Auth value set on new keys and presented when signing.
    pub key_auth: Option<Zeroizing<Vec<u8>>>,
    /// Parent for new keys. Existing keys record their own parent in their file.
    pub parent: Parent,
    /// The owner allows the store to make its [`Parent::Template`] primary persistent at the
    /// standard SRK handle `0x81000001` (one of the TPM's few persistent slots, written with
    /// the owner auth), so later operations open it instead of making it again.
    pub persist_srk: bool,
}

impl Default for TpmConfig {
    fn default() -> Self {
        TpmConfig {
            tcti: DEFAULT_TCTI.to_string(),
            owner_auth: None,
            key_auth: None,
            parent: Parent::Template,
            persist_srk: false,
        }
    }
}

impl fmt::Debug for TpmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |a: &Option<Zeroizing<Vec<u8>>>| a.as_ref().map(|_| "<redacted>");
        f.debug_struct("TpmConfig")
            .field("tcti", &self.tcti)
            .field("owner_auth", &redact(&self.owner_auth))
            .field("key_auth", &redact(&self.key_auth))
            .field("parent", &self.parent)
            .field("persist_srk", &self.persist_srk)
            .finish()
    }
}

/// The storage parent of bound keys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Parent {
    /// The TCG-standard ECC P-256 storage root key template (restricted decryption, AES-128-CFB,
    /// noDA, zero-filled unique) under the owner hierarchy. The same template under the same
    /// owner seed always yields the same key, so nothing needs a persistent handle: it is made
    /// for each operation (or ceremony), or taken from the standard SRK handle when a persistent
    /// copy of the very same key is there.
    #[default]
    Template,
    /// An existing persistent storage key, e.g. an SRK at `0x81000001`.
    Persistent(u32),
}

impl fmt::Display for Parent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Parent::Template => f.write_str("owner-hierarchy ECC P-256 storage primary"),
            Parent::Persistent(h) => write!(f, "persistent key {h:#010x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_auth() {
        let cfg = TpmConfig {
            key_auth: Some(Zeroizing::new(b"hunter2".to_vec())),
            ..TpmConfig::default()
        };
        let s = format!("{cfg:?}");
        assert!(!s.contains("hunter2") && s.contains("redacted"), "{s}");
    }
}
