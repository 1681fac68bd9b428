//! An exclusive lock on a directory, held for the life of a process.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

use crate::{open_nofollow, FsError};

/// Why a directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock; `pid` is what it wrote into the lock file, if readable.
    #[error("{} is in use by another process{}", dir.display(), pid.as_deref().map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Busy { dir: PathBuf, pid: Option<String> },
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// Holds an exclusive `flock` on `DIR/NAME`. Invariant: while this value lives, no other process
/// holds the same lock; the kernel releases it when the process exits, however it exits.
///
/// The lock file is opened without following symlinks and must be a regular file owned by this
/// process's user, so a link planted by someone else cannot redirect the write of the pid.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
}

impl DirLock {
    /// Takes the lock without waiting, writing this process's pid into the file for a second
    /// process's error message.
    pub fn acquire(dir: &Path, name: &str) -> Result<DirLock, LockError> {
        let path = dir.join(name);
        let mut file = open_nofollow(&path, Some(0o600))?;
        let meta = file.metadata().map_err(|e| FsError::new(&path, e))?;
        if !meta.is_file() {
            return Err(FsError::new(
                &path,
                io::Error::new(io::ErrorKind::InvalidInput, "is not a regular file"),
            )
            .into());
        }
        let me = rustix::process::geteuid().as_raw();
        if std::os::unix::fs::MetadataExt::uid(&meta) != me {
            return Err(FsError::new(
                &path,
                io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "is owned by another user; refusing to use it",
                ),
            )
            .into());
        }
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                let mut s = String::new();
                let _ = (&file).take(64).read_to_string(&mut s);
                let pid = Some(s.trim().to_string()).filter(|s| !s.is_empty());
                return Err(LockError::Busy {
                    dir: dir.to_path_buf(),
                    pid,
                });
            }
            Err(e) => return Err(FsError::new(&path, e.into()).into()),
        }
        // Informational only; the flock is what counts.
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = writeln!(file, "{}", std::process::id());
        Ok(DirLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
