//! One reader for secrets kept in files (registration secrets, TPM auth values).

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::read_limited_secret;

/// Secrets are short; a larger file is a mistake (the wrong path), not a secret.
pub const MAX_SECRET_FILE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
#[error("secret file {}: {detail}", path.display())]
pub struct SecretFileError {
    pub path: PathBuf,
    pub detail: String,
}

/// Reads a secret file: at most [`MAX_SECRET_FILE`] bytes, UTF-8, one trailing newline (`\n` or
/// `\r\n`, which editors add) removed, not empty.
pub fn read_secret_file(path: &Path) -> Result<Zeroizing<String>, SecretFileError> {
    let bytes = read_secret_bytes(path)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| SecretFileError {
        path: path.to_path_buf(),
        detail: "not UTF-8 text".into(),
    })?;
    Ok(Zeroizing::new(text.to_string()))
}

/// [`read_secret_file`] for secrets that may be any bytes (TPM auth values): the same limit, the
/// same one trailing newline removed, not empty; no UTF-8 requirement.
pub fn read_secret_bytes(path: &Path) -> Result<Zeroizing<Vec<u8>>, SecretFileError> {
    let err = |detail: String| SecretFileError {
        path: path.to_path_buf(),
        detail,
    };
    let mut bytes = read_limited_secret(path, MAX_SECRET_FILE)
        .map_err(|e| err(e.source.to_string()))?
        .ok_or_else(|| err("no such file".into()))?;
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    if bytes.is_empty() {
        return Err(err("empty".into()));
    }
    Ok(bytes)
}
