//! Crash-safe file primitives shared by the storage and output layers.
//!
//! Every write goes to a fresh temporary file in the target's directory, is fsynced, renamed over
//! the target and followed by an fsync of the directory, so after a power loss the target holds
//! either the old or the new contents, never a mixture or nothing.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// An I/O failure and the path it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct FsError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

pub fn fs_err(path: &Path) -> impl FnOnce(io::Error) -> FsError + '_ {
    move |source| FsError {
        path: path.to_path_buf(),
        source,
    }
}

/// A short random hex string for temporary names.
pub fn random_suffix() -> String {
    use rand_core::RngCore;
    let mut b = [0u8; 6];
    rand_core::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Creates `dir` (and parents) with `mode` if missing. An existing directory is left as it is.
pub fn ensure_dir(dir: &Path, mode: u32) -> Result<(), FsError> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(FsError {
            path: dir.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a directory",
            ),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut b = fs::DirBuilder::new();
            b.recursive(true);
            std::os::unix::fs::DirBuilderExt::mode(&mut b, mode);
            b.create(dir).map_err(fs_err(dir))?;
            // The umask may have removed bits we asked for; set exactly what was asked.
            fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(fs_err(dir))?;
            if let Some(parent) = dir.parent() {
                let _ = fsync_dir(parent);
            }
            Ok(())
        }
        Err(e) => Err(fs_err(dir)(e)),
    }
}

/// fsyncs a directory so that renames and creations inside it are durable.
pub fn fsync_dir(dir: &Path) -> Result<(), FsError> {
    let d = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(d).and_then(|f| f.sync_all()).map_err(fs_err(d))
}

/// Atomically replaces `path` with `data` (mode `mode`): temp file, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), FsError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", random_suffix()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(fs_err(&tmp))?;
        f.write_all(data).map_err(fs_err(&tmp))?;
        f.sync_all().map_err(fs_err(&tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(fs_err(path))?;
        fsync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads a whole file of at most `limit` bytes. `Ok(None)` if it does not exist.
pub fn read_limited(path: &Path, limit: u64) -> Result<Option<Vec<u8>>, FsError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fs_err(path)(e)),
    };
    let mut buf = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(fs_err(path))?;
    if buf.len() as u64 > limit {
        return Err(FsError {
            path: path.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("larger than {limit} bytes; not a file this agent wrote"),
            ),
        });
    }
    Ok(Some(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.json");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn write_atomic_failure_keeps_the_old_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_atomic(&p, b"old", 0o600).unwrap();
        // Renaming a file over a non-empty directory fails: the old target must survive.
        let target = d.path().join("dir");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("x"), b"x").unwrap();
        assert!(write_atomic(&target, b"new", 0o600).is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 2);
    }

    #[test]
    fn read_limited_refuses_oversized_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("big");
        fs::write(&p, vec![b'a'; 11]).unwrap();
        let e = read_limited(&p, 10).unwrap_err();
        assert!(e.to_string().contains("big"), "{e}");
        assert!(read_limited(&d.path().join("none"), 10).unwrap().is_none());
        assert_eq!(read_limited(&p, 11).unwrap().unwrap().len(), 11);
    }

    #[test]
    fn ensure_dir_sets_the_mode_exactly() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b");
        ensure_dir(&p, 0o700).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let f = d.path().join("file");
        fs::write(&f, b"").unwrap();
        assert!(ensure_dir(&f, 0o700).is_err());
    }
}
