//! Crash-safe file primitives, one set for every boundkey crate that writes to disk.
//!
//! The rules every function here keeps:
//! * **Atomic replacement**: a write goes to a fresh temporary file in the target's directory
//!   (random name, `O_EXCL`, the final mode from the start), is fsynced, renamed over the target,
//!   and the directory is fsynced. After a power loss the target holds the old or the new
//!   contents, never a mixture, nothing, or a file with a wider mode.
//! * **Owner-only by default**: directories this crate creates get exactly the mode asked for
//!   (the umask cannot widen or narrow it).
//! * **Bounded reads**: a file is never read past a caller-chosen limit, so a planted huge file
//!   cannot exhaust memory; secrets are read into zeroizing buffers.
//! * **No link following where it matters**: the directory lock file is opened with
//!   `O_NOFOLLOW`, so a symlink planted in a directory cannot redirect a root process's write.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

mod lock;
mod secret;

pub use lock::{DirLock, LockError};
pub use secret::{read_secret_bytes, read_secret_file, SecretFileError, MAX_SECRET_FILE};

/// An I/O failure and the path it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct FsError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl FsError {
    pub fn new(path: &Path, source: io::Error) -> FsError {
        FsError {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether a bounded read refused the file for being larger than its limit.
    pub fn is_too_large(&self) -> bool {
        self.source
            .get_ref()
            .is_some_and(|inner| inner.is::<TooLarge>())
    }

    /// Whether the file system ran out of space or quota (worth telling the operator plainly).
    pub fn is_no_space(&self) -> bool {
        matches!(
            self.source.raw_os_error(),
            Some(code) if code == rustix::io::Errno::NOSPC.raw_os_error()
                || code == rustix::io::Errno::DQUOT.raw_os_error()
        )
    }
}

/// `map_err` adapter attaching `path` to an [`io::Error`].
pub fn fs_err(path: &Path) -> impl FnOnce(io::Error) -> FsError + '_ {
    move |source| FsError::new(path, source)
}

/// Creates `dir` (and missing parents) with exactly `mode`. An existing directory is left as it
/// is (callers that need it private check with [`tighten_dir`]).
pub fn ensure_dir(dir: &Path, mode: u32) -> Result<(), FsError> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(FsError::new(
            dir,
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a directory",
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut b = fs::DirBuilder::new();
            b.recursive(true);
            std::os::unix::fs::DirBuilderExt::mode(&mut b, mode);
            b.create(dir).map_err(fs_err(dir))?;
            // The umask may have removed bits that were asked for: set exactly the mode.
            fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(fs_err(dir))?;
            if let Some(parent) = dir.parent() {
                // Best effort: the directory entry is durable once the parent is synced.
                let _ = fsync_dir(parent);
            }
            Ok(())
        }
        Err(e) => Err(FsError::new(dir, e)),
    }
}

/// Removes group and other bits from an existing directory's mode. Returns whether it changed
/// anything, so the caller can log that it did.
pub fn tighten_dir(dir: &Path) -> Result<bool, FsError> {
    let meta = fs::metadata(dir).map_err(fs_err(dir))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 == 0 {
        return Ok(false);
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(mode & 0o700)).map_err(fs_err(dir))?;
    Ok(true)
}

/// Checks that `path` is owned by this process's effective user and is not a symbolic link, so
/// a file another user planted (or a link to somewhere else) is never trusted. `Ok(false)` when
/// it does not exist.
pub fn check_owned(path: &Path) -> Result<bool, FsError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(FsError::new(path, e)),
    };
    if meta.file_type().is_symlink() {
        return Err(FsError::new(
            path,
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "is a symbolic link; refusing to follow it",
            ),
        ));
    }
    let me = rustix::process::geteuid().as_raw();
    let owner = std::os::unix::fs::MetadataExt::uid(&meta);
    if owner != me {
        return Err(FsError::new(
            path,
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "is owned by uid {owner}, not by this process's uid {me}; refusing to trust it"
                ),
            ),
        ));
    }
    Ok(true)
}

/// fsyncs a directory so that renames, creations and removals inside it are durable.
pub fn fsync_dir(dir: &Path) -> Result<(), FsError> {
    let d = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(d).and_then(|f| f.sync_all()).map_err(fs_err(d))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A durable temporary file in `dir` holding `data` with `mode`, ready to be renamed to `target`.
/// Failures name `target` (what the caller asked to write), not the temporary file's random
/// name, so "No space left on device" points at the file that could not be written.
fn durable_temp(
    dir: &Path,
    target: &Path,
    data: &[u8],
    mode: u32,
) -> Result<tempfile::NamedTempFile, FsError> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".bk-")
        .suffix(".tmp")
        .permissions(fs::Permissions::from_mode(mode))
        .tempfile_in(dir)
        .map_err(fs_err(target))?;
    let f = tmp.as_file_mut();
    // The umask applies at creation: set the mode again so the file has exactly `mode`.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(fs_err(target))?;
    f.write_all(data).map_err(fs_err(target))?;
    f.sync_all().map_err(fs_err(target))?;
    Ok(tmp)
}

/// How far a durable write ([`write_atomic`], [`create_new`]) has got, reported to the hook
/// installed with [`set_write_hook`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteStage {
    /// The temporary file holds all the data and is fsynced; the target is not yet replaced.
    TempSynced,
    /// The target is replaced and its directory fsynced: the write is durable.
    Published,
}

/// Called at each [`WriteStage`] of every durable write with the target's path.
pub type WriteHook = fn(WriteStage, &Path);

static WRITE_HOOK: std::sync::OnceLock<WriteHook> = std::sync::OnceLock::new();

/// Installs a process-wide observer of durable writes, once (later calls are ignored). It exists
/// for fault injection: a test build can stop the process between the steps of any write made
/// through this crate, by whichever crate makes it. Nothing is called when no hook is installed.
pub fn set_write_hook(hook: WriteHook) {
    let _ = WRITE_HOOK.set(hook);
}

fn write_reached(stage: WriteStage, path: &Path) {
    if let Some(hook) = WRITE_HOOK.get() {
        hook(stage, path);
    }
}

/// Atomically replaces `path` with `data` (mode `mode`): temp file, fsync, rename, fsync dir.
/// On failure the previous file is untouched and no temporary file is left behind.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), FsError> {
    let dir = parent_of(path);
    let tmp = durable_temp(dir, path, data, mode)?;
    write_reached(WriteStage::TempSynced, path);
    // NamedTempFile removes the temp file on drop if the rename fails.
    tmp.persist(path).map_err(|e| FsError::new(path, e.error))?;
    fsync_dir(dir)?;
    write_reached(WriteStage::Published, path);
    Ok(())
}

/// Creates `path` (which must not exist) holding `data` with exactly `mode`, and fsyncs the file
/// but not its directory: for a set of files written into a fresh directory that nobody can see
/// yet, where one fsync of the directory after the last file replaces a temporary file, a rename
/// and a directory fsync per file. Reports [`WriteStage::Published`] once the data is synced.
pub fn create_synced(path: &Path, data: &[u8], mode: u32) -> Result<(), FsError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(fs_err(path))?;
    // The umask applies at creation: set the mode again so the file has exactly `mode`.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(fs_err(path))?;
    let written = f.write_all(data).and_then(|()| f.sync_all());
    if let Err(e) = written {
        drop(f);
        let _ = fs::remove_file(path);
        return Err(FsError::new(path, e));
    }
    write_reached(WriteStage::Published, path);
    Ok(())
}

/// Why [`create_new`] did not create the file.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// A file of that name exists; nothing was written.
    #[error("{} already exists", .0.display())]
    Exists(PathBuf),
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// Atomically creates `path` holding `data` (mode `mode`), refusing to replace an existing file,
/// so two racing creators cannot silently swap contents under each other.
pub fn create_new(path: &Path, data: &[u8], mode: u32) -> Result<(), CreateError> {
    let dir = parent_of(path);
    let tmp = durable_temp(dir, path, data, mode)?;
    write_reached(WriteStage::TempSynced, path);
    match tmp.persist_noclobber(path) {
        Ok(_) => {}
        Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => {
            return Err(CreateError::Exists(path.to_path_buf()))
        }
        Err(e) => return Err(FsError::new(path, e.error).into()),
    }
    fsync_dir(dir).map_err(CreateError::Fs)?;
    write_reached(WriteStage::Published, path);
    Ok(())
}

/// Removes `path` durably. A missing file is not an error.
pub fn remove_durable(path: &Path) -> Result<(), FsError> {
    match fs::remove_file(path) {
        Ok(()) => fsync_dir(parent_of(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FsError::new(path, e)),
    }
}

/// The cause inside the [`io::Error`] of an [`FsError`] when a bounded read hit its limit, so a
/// caller can tell "this file is not what it should be" from a failing disk
/// ([`FsError::is_too_large`]).
#[derive(Debug, thiserror::Error)]
#[error("larger than {limit} bytes")]
pub struct TooLarge {
    pub limit: u64,
}

fn too_large(path: &Path, limit: u64) -> FsError {
    FsError::new(
        path,
        io::Error::new(io::ErrorKind::InvalidData, TooLarge { limit }),
    )
}

/// Reads a whole file of at most `limit` bytes. `Ok(None)` if it does not exist.
pub fn read_limited(path: &Path, limit: u64) -> Result<Option<Vec<u8>>, FsError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(FsError::new(path, e)),
    };
    let mut buf = Vec::new();
    f.take(limit.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(fs_err(path))?;
    if buf.len() as u64 > limit {
        return Err(too_large(path, limit));
    }
    Ok(Some(buf))
}

/// [`read_limited`] into zeroizing memory, for files that hold key material or secrets. The
/// buffer is sized once, so no unzeroized copy is left behind by a reallocation.
pub fn read_limited_secret(path: &Path, limit: u64) -> Result<Option<Zeroizing<Vec<u8>>>, FsError> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(FsError::new(path, e)),
    };
    let len = f.metadata().map_err(fs_err(path))?.len();
    if len > limit {
        return Err(too_large(path, limit));
    }
    let cap = usize::try_from(limit.min(len.saturating_add(1))).unwrap_or(usize::MAX);
    let mut buf = Zeroizing::new(Vec::with_capacity(cap));
    // Reads at most the capacity, so the vector never grows (and never reallocates).
    let mut chunk = [0u8; 512];
    loop {
        let n = f.read(&mut chunk).map_err(fs_err(path))?;
        if n == 0 {
            break;
        }
        if buf.len() + n > cap || buf.len() as u64 + n as u64 > limit {
            chunk.fill(0);
            return Err(too_large(path, limit));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    chunk.fill(0);
    Ok(Some(buf))
}

/// A short random hex string for names that must not collide (generation directories, keys).
pub fn random_suffix() -> String {
    let mut b = [0u8; 6];
    // Uniqueness is all that is needed; the clock is a fallback for a kernel without getrandom.
    if rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Opens an existing regular file for writing without following a symlink in its last
/// component. Used for files that a privileged process reopens by name.
pub fn open_nofollow(path: &Path, create_mode: Option<u32>) -> Result<File, FsError> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if let Some(mode) = create_mode {
        o.create(true).mode(mode);
    }
    o.custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32);
    o.open(path).map_err(|e| {
        if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
            FsError::new(
                path,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "is a symbolic link; refusing to follow it",
                ),
            )
        } else {
            FsError::new(path, e)
        }
    })
}

#[cfg(test)]
mod tests;
