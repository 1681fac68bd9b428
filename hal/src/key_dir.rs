//! The storage directory of a key store: one file `NAME.EXT` per key, through the shared
//! crash-safe file helpers of `boundkey-fs`.
//!
//! Invariants: the directory is created 0700; a key file is created 0600 and appears under its
//! final name only complete and durable (temp file, fsync, no-replace rename, fsync of the
//! directory), so a power cut leaves either no key or the whole key. Temp files start with `.`,
//! which no [`KeyName`] may, so they are never mistaken for keys.

use std::fs;
use std::path::{Path, PathBuf};

use boundkey_fs::{CreateError, FsError};
use zeroize::Zeroizing;

use crate::{HalError, KeyFault, KeyName};

/// Key files are a few hundred bytes; anything far larger is not ours and is not read into memory.
pub(crate) const MAX_KEY_FILE: u64 = 64 * 1024;

const DIR_MODE: u32 = 0o700;
const KEY_MODE: u32 = 0o600;

/// The files of one backend (`ext` tells them apart) in one private directory.
#[derive(Debug)]
pub(crate) struct KeyDir {
    dir: PathBuf,
    ext: &'static str,
}

impl KeyDir {
    /// Uses `dir` for keys stored as `NAME.ext`, creating it 0700 if missing.
    pub(crate) fn open(dir: &Path, ext: &'static str) -> Result<Self, HalError> {
        boundkey_fs::ensure_dir(dir, DIR_MODE)?;
        Ok(KeyDir {
            dir: dir.to_path_buf(),
            ext,
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file that holds (or would hold) key `name`.
    pub(crate) fn path(&self, name: &KeyName) -> PathBuf {
        self.dir.join(format!("{name}.{}", self.ext))
    }

    /// The contents of key `name`'s file, in zeroizing memory.
    pub(crate) fn read(&self, name: &KeyName) -> Result<Zeroizing<Vec<u8>>, HalError> {
        let path = self.path(name);
        read_key_file(&path, name.as_str())?.ok_or_else(|| HalError::KeyNotFound(name.to_string()))
    }

    /// Writes key `name`'s file, refusing to replace an existing one.
    pub(crate) fn create(&self, name: &KeyName, contents: &[u8]) -> Result<(), HalError> {
        match boundkey_fs::create_new(&self.path(name), contents, KEY_MODE) {
            Ok(()) => Ok(()),
            Err(CreateError::Exists(_)) => Err(HalError::KeyExists(name.to_string())),
            Err(CreateError::Fs(e)) => Err(e.into()),
        }
    }

    /// Removes key `name`'s file durably; a missing file is not an error.
    pub(crate) fn remove(&self, name: &KeyName) -> Result<(), HalError> {
        Ok(boundkey_fs::remove_durable(&self.path(name))?)
    }

    /// Names of the files `NAME.ext` whose `NAME` is a valid key name, sorted.
    pub(crate) fn list(&self) -> Result<Vec<KeyName>, HalError> {
        let suffix = format!(".{}", self.ext);
        let io = |e| HalError::Io(FsError::new(&self.dir, e));
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io)? {
            let file_name = entry.map_err(io)?.file_name();
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
}

/// Reads a key file into zeroizing memory; `Ok(None)` when it does not exist. A file over
/// [`MAX_KEY_FILE`] is reported as key `name` being corrupt.
pub(crate) fn read_key_file(
    path: &Path,
    name: &str,
) -> Result<Option<Zeroizing<Vec<u8>>>, HalError> {
    match boundkey_fs::read_limited_secret(path, MAX_KEY_FILE) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.is_too_large() => Err(HalError::KeyCorrupt {
            name: name.to_string(),
            path: path.to_path_buf(),
            fault: KeyFault::TooLarge {
                limit: MAX_KEY_FILE,
            },
        }),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn name(s: &str) -> KeyName {
        KeyName::new(s).unwrap()
    }

    #[test]
    fn keys_are_private_files_created_once() {
        let root = tempfile::tempdir().unwrap();
        let keys = KeyDir::open(&root.path().join("keys"), "k").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(keys.dir()), 0o700);
        keys.create(&name("a"), b"one").unwrap();
        assert_eq!(mode(&keys.path(&name("a"))), 0o600);
        let err = keys.create(&name("a"), b"two").unwrap_err();
        assert!(
            matches!(err, HalError::KeyExists(ref n) if n == "a"),
            "{err}"
        );
        assert_eq!(keys.read(&name("a")).unwrap().as_slice(), b"one");
        keys.remove(&name("a")).unwrap();
        keys.remove(&name("a")).unwrap();
        let err = keys.read(&name("a")).unwrap_err();
        assert!(
            matches!(err, HalError::KeyNotFound(ref n) if n == "a"),
            "{err}"
        );
    }

    #[test]
    fn an_oversized_key_file_is_a_corrupt_key() {
        let dir = tempfile::tempdir().unwrap();
        let keys = KeyDir::open(dir.path(), "k").unwrap();
        let path = keys.path(&name("big"));
        fs::write(&path, vec![0u8; MAX_KEY_FILE as usize + 1]).unwrap();
        match keys.read(&name("big")).unwrap_err() {
            HalError::KeyCorrupt {
                name,
                path: p,
                fault: KeyFault::TooLarge { .. },
            } => {
                assert_eq!(name, "big");
                assert_eq!(p, path);
            }
            other => panic!("expected KeyCorrupt, got {other:?}"),
        }
    }

    #[test]
    fn listing_sees_only_this_backends_key_names() {
        let dir = tempfile::tempdir().unwrap();
        let keys = KeyDir::open(dir.path(), "k").unwrap();
        for f in [
            "b.k",
            "a.k",
            ".bk-x.tmp",
            ".hidden.k",
            "c.pem",
            "bad name.k",
        ] {
            fs::write(dir.path().join(f), b"x").unwrap();
        }
        assert_eq!(keys.list().unwrap(), vec![name("a"), name("b")]);
    }
}
