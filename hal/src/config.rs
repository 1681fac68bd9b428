//! TPM configuration and secret input, available with or without the `tpm` feature so callers
//! (and [`crate::open_store`]) have one signature in every build.

use std::fmt;
use std::path::Path;

use zeroize::Zeroizing;

use crate::fsutil::{self, ReadError};
use crate::HalError;

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
}

impl Default for TpmConfig {
    fn default() -> Self {
        TpmConfig {
            tcti: DEFAULT_TCTI.to_string(),
            owner_auth: None,
            key_auth: None,
            parent: Parent::Template,
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
            .finish()
    }
}

/// The storage parent of bound keys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Parent {
    /// The TCG-standard ECC P-256 storage root key template (restricted decryption, AES-128-CFB,
    /// noDA, zero-filled unique) under the owner hierarchy. It is recreated for every operation:
    /// the same template under the same owner seed always yields the same key, so nothing needs
    /// a persistent handle.
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

/// True when this machine exposes a TPM character device.
pub fn tpm_present() -> bool {
    Path::new("/dev/tpmrm0").exists() || Path::new("/dev/tpm0").exists()
}

/// Reads an auth value or other secret from `file` if given, else from the environment variable
/// `env_var`; `Ok(None)` when neither is set.
///
/// Secrets never come from the command line (visible in `ps` and shell history). One trailing
/// newline (`\n` or `\r\n`) is removed from file contents, because editors add one.
pub fn read_secret(
    file: Option<&Path>,
    env_var: &str,
) -> Result<Option<Zeroizing<Vec<u8>>>, HalError> {
    if let Some(path) = file {
        let mut buf = match fsutil::read_key_file(path) {
            Ok(Some(b)) => b,
            Ok(None) => {
                return Err(fsutil::io_err(
                    path,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "secret file not found"),
                ))
            }
            Err(ReadError::Io(e)) => return Err(e),
            Err(ReadError::TooLarge(n)) => {
                return Err(fsutil::io_err(
                    path,
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{n} bytes is too large for a secret"),
                    ),
                ))
            }
        };
        if buf.last() == Some(&b'\n') {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
        }
        return Ok(Some(buf));
    }
    use std::os::unix::ffi::OsStringExt;
    Ok(std::env::var_os(env_var).map(|v| Zeroizing::new(v.into_vec())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_file_loses_one_trailing_newline_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, b"pa ss\n\n").unwrap();
        let s = read_secret(Some(&p), "BOUNDKEY_HAL_TEST_UNSET_VAR").unwrap();
        assert_eq!(s.as_deref().map(|v| v.as_slice()), Some(&b"pa ss\n"[..]));
        std::fs::write(&p, b"x\r\n").unwrap();
        let s = read_secret(Some(&p), "BOUNDKEY_HAL_TEST_UNSET_VAR").unwrap();
        assert_eq!(s.as_deref().map(|v| v.as_slice()), Some(&b"x"[..]));
    }

    #[test]
    fn secret_missing_everywhere_is_none_and_missing_file_is_an_error() {
        assert!(read_secret(None, "BOUNDKEY_HAL_TEST_UNSET_VAR")
            .unwrap()
            .is_none());
        let err = read_secret(Some(Path::new("/nonexistent/secret")), "X").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/secret"), "{err}");
    }

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
