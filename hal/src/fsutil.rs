//! Storage-directory helpers shared by the backends.
//!
//! Invariants: the directory is created 0700; a key file is created 0600 and appears under its
//! final name only complete and durable (temp file in the same directory, fsync, no-replace
//! rename, fsync of the directory), so a power cut leaves either no key or the whole key. Temp
//! files start with `.`, which no [`KeyName`] may, so they are never mistaken for keys.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::{HalError, KeyName};

/// Key files are a few hundred bytes; anything far larger is not ours and is not read into memory.
pub(crate) const MAX_KEY_FILE: u64 = 64 * 1024;

pub(crate) fn io_err(path: &Path, source: io::Error) -> HalError {
    HalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `dir` (and missing parents) with mode 0700. An existing directory is left as it is.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), HalError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_err(dir, e))?;
    if !dir.is_dir() {
        return Err(io_err(dir, io::Error::other("not a directory")));
    }
    Ok(())
}

pub(crate) fn key_path(dir: &Path, name: &KeyName, ext: &str) -> PathBuf {
    dir.join(format!("{name}.{ext}"))
}

/// Makes a rename or unlink in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), HalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
}

/// Outcome of [`create_new`] when the target already exists: the caller reports `KeyExists`.
pub(crate) enum CreateError {
    Exists,
    Hal(HalError),
}

/// Atomically creates `path` (in `dir`) holding `contents`, mode 0600; refuses to replace an
/// existing file, so two racing creates cannot silently swap a key under a caller.
pub(crate) fn create_new(dir: &Path, path: &Path, contents: &[u8]) -> Result<(), CreateError> {
    let hal = |e: io::Error| CreateError::Hal(io_err(dir, e));
    let mut tmp = tempfile::Builder::new()
        .prefix(".bk-")
        .suffix(".tmp")
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .map_err(hal)?;
    tmp.write_all(contents).map_err(hal)?;
    tmp.as_file().sync_all().map_err(hal)?;
    match tmp.persist_noclobber(path) {
        Ok(_) => {}
        Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => {
            return Err(CreateError::Exists)
        }
        Err(e) => return Err(CreateError::Hal(io_err(path, e.error))),
    }
    sync_dir(dir).map_err(CreateError::Hal)
}

/// Reads a key file into zeroizing memory. `Ok(None)` when it does not exist.
pub(crate) fn read_key_file(path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>, ReadError> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ReadError::Io(io_err(path, e))),
    };
    let len = f
        .metadata()
        .map_err(|e| ReadError::Io(io_err(path, e)))?
        .len();
    if len > MAX_KEY_FILE {
        return Err(ReadError::TooLarge(len));
    }
    // Sized up front so the buffer holding key material is never reallocated (which would leave
    // an unzeroized copy behind).
    let mut buf = Zeroizing::new(Vec::with_capacity(len as usize + 1));
    Read::by_ref(&mut f)
        .take(MAX_KEY_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| ReadError::Io(io_err(path, e)))?;
    if buf.len() as u64 > MAX_KEY_FILE {
        return Err(ReadError::TooLarge(buf.len() as u64));
    }
    Ok(Some(buf))
}

pub(crate) enum ReadError {
    Io(HalError),
    TooLarge(u64),
}

/// Removes `path` durably. A missing file is not an error.
pub(crate) fn remove(dir: &Path, path: &Path) -> Result<(), HalError> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path, e)),
    }
}

/// Names of the files `NAME.ext` in `dir` whose `NAME` is a valid key name, sorted.
pub(crate) fn list(dir: &Path, ext: &str) -> Result<Vec<KeyName>, HalError> {
    let suffix = format!(".{ext}");
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let file_name = entry.file_name();
        let Some(stem) = file_name.to_str().and_then(|s| s.strip_suffix(&suffix)) else {
            continue;
        };
        // Temp files (leading '.') and foreign files with odd names fail here and are skipped.
        if let Ok(name) = KeyName::new(stem) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}
