//! Auth values and other secrets handed to the key store.

use std::path::Path;

use zeroize::Zeroizing;

use crate::HalError;

/// Reads an auth value or other secret from `file` if given, else from the environment variable
/// `env_var`; `Ok(None)` when neither is set.
///
/// Secrets never come from the command line (visible in `ps` and shell history). A file follows
/// the one rule for secret files ([`boundkey_fs::read_secret_bytes`]: at most
/// [`boundkey_fs::MAX_SECRET_FILE`] bytes, one trailing newline removed because editors add one,
/// not empty); auth values are bytes, so the file need not be text. An environment value is
/// taken as it is.
pub fn read_secret(
    file: Option<&Path>,
    env_var: &str,
) -> Result<Option<Zeroizing<Vec<u8>>>, HalError> {
    if let Some(path) = file {
        return Ok(Some(boundkey_fs::read_secret_bytes(path)?));
    }
    use std::os::unix::ffi::OsStringExt;
    Ok(std::env::var_os(env_var).map(|v| Zeroizing::new(v.into_vec())))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

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
    fn secret_files_follow_the_shared_rule() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        // Auth values are bytes: a file need not be text.
        std::fs::write(&p, [0xff, 0x01, b'\n']).unwrap();
        let s = read_secret(Some(&p), "X").unwrap();
        assert_eq!(s.as_deref().map(|v| v.as_slice()), Some(&[0xff, 0x01][..]));
        // Empty after the newline is removed: a mistake, not an empty password.
        std::fs::write(&p, b"\n").unwrap();
        let err = read_secret(Some(&p), "X").unwrap_err();
        assert!(matches!(err, HalError::Secret(_)), "{err:?}");
        assert!(err.to_string().contains("empty"), "{err}");
        // Larger than the one limit for secret files.
        let limit = boundkey_fs::MAX_SECRET_FILE as usize;
        std::fs::write(&p, vec![b'a'; limit + 1]).unwrap();
        assert!(read_secret(Some(&p), "X").is_err());
        std::fs::write(&p, vec![b'a'; limit]).unwrap();
        assert_eq!(read_secret(Some(&p), "X").unwrap().unwrap().len(), limit);
    }
}
