//! Identity outputs in the destination directory, replaced atomically as a set.
//!
//! ```text
//! DEST/
//!   .gen-<generation>-<random>/     one complete set per identity
//!       cert.pem   identity certificate chain (leaf first), 0644
//!       key.pem    identity private key (PKCS#8), 0600
//!       ca.pem     identity CA bundle, 0644
//!   current -> .gen-…               symlink, swapped with one rename()
//!   cert.pem -> current/cert.pem    convenience links
//!   key.pem  -> current/key.pem
//!   ca.pem   -> current/ca.pem
//! ```
//!
//! A new set is written and fsynced in a fresh directory (each file once, then the directory), then `current` is switched with a single
//! atomic rename of a symlink. A reader that resolves `current` once (e.g. opens
//! `DEST/current/` as a directory, or `readlink`s it) and reads the three files from there never
//! sees a mixed set. The previous set is kept (a reader may still be using it); older ones are
//! removed.

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::storage::Identity;
use boundkey_fs::{fs_err, FsError};

pub(crate) const CURRENT: &str = "current";
pub(crate) const CERT: &str = "cert.pem";
pub(crate) const KEY: &str = "key.pem";
pub(crate) const CA: &str = "ca.pem";
const GEN_PREFIX: &str = ".gen-";

#[derive(Debug, Clone)]
pub(crate) struct Outputs {
    dir: PathBuf,
}

impl Outputs {
    pub(crate) fn new(dir: &Path) -> Self {
        Outputs {
            dir: dir.to_path_buf(),
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// True if `current` holds exactly this identity's certificate.
    pub(crate) fn is_current(&self, id: &Identity) -> bool {
        fs::read_to_string(self.dir.join(CURRENT).join(CERT))
            .map(|c| c == id.certificate)
            .unwrap_or(false)
    }

    /// Writes a complete new set and switches `current` to it.
    pub(crate) fn write(&self, id: &Identity) -> Result<(), FsError> {
        boundkey_fs::ensure_dir(&self.dir, 0o700)?;
        check_destination(&self.dir)?;
        let name = format!(
            "{GEN_PREFIX}{}-{}",
            id.generation,
            boundkey_fs::random_suffix()
        );
        let gen_dir = self.dir.join(&name);
        fs::create_dir(&gen_dir).map_err(fs_err(&gen_dir))?;
        fs::set_permissions(&gen_dir, fs::Permissions::from_mode(0o755))
            .map_err(fs_err(&gen_dir))?;
        let written = (|| {
            // The directory is not reachable before `current` points at it, so its files need
            // no temporary names: each is synced, then the directory once.
            boundkey_fs::create_synced(&gen_dir.join(CERT), id.certificate.as_bytes(), 0o644)?;
            boundkey_fs::create_synced(&gen_dir.join(KEY), id.private_key.0.as_bytes(), 0o600)?;
            boundkey_fs::create_synced(&gen_dir.join(CA), id.ca_bundle.as_bytes(), 0o644)?;
            boundkey_fs::fsync_dir(&gen_dir)
        })();
        if let Err(e) = written {
            let _ = fs::remove_dir_all(&gen_dir);
            return Err(e);
        }
        let previous = fs::read_link(self.dir.join(CURRENT)).ok();
        crate::crash::point("outputs-set-synced");
        self.replace_symlink(CURRENT, Path::new(&name))?;
        crate::crash::point("current-swapped");
        for f in [CERT, KEY, CA] {
            self.ensure_link(f)?;
        }
        boundkey_fs::fsync_dir(&self.dir)?;
        self.remove_old(&name, previous.as_deref());
        Ok(())
    }

    /// Points `DEST/link` at `target` atomically (temp symlink + rename).
    fn replace_symlink(&self, link: &str, target: &Path) -> Result<(), FsError> {
        let tmp = self
            .dir
            .join(format!(".{link}.tmp-{}", boundkey_fs::random_suffix()));
        symlink(target, &tmp).map_err(fs_err(&tmp))?;
        let dst = self.dir.join(link);
        if let Err(e) = fs::rename(&tmp, &dst) {
            let _ = fs::remove_file(&tmp);
            return Err(fs_err(&dst)(e));
        }
        Ok(())
    }

    /// Creates `DEST/f -> current/f` unless it already is that link. Anything else in the way is
    /// left alone (someone else's file) and reported once in the log.
    fn ensure_link(&self, f: &str) -> Result<(), FsError> {
        let path = self.dir.join(f);
        let want = Path::new(CURRENT).join(f);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                if fs::read_link(&path).map(|t| t == want).unwrap_or(false) {
                    return Ok(());
                }
                self.replace_symlink(f, &want)
            }
            Ok(m) if m.is_dir() => {
                tracing::warn!(path = %path.display(), "a directory stands where the identity link belongs; leaving it alone (read the identity from current/)");
                Ok(())
            }
            Ok(_) => {
                // Whatever stands here is not this agent's: a reader of DEST/key.pem must never
                // get a key someone else put there.
                tracing::warn!(path = %path.display(), "replacing a file that is not this agent's link");
                self.replace_symlink(f, &want)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => self.replace_symlink(f, &want),
            Err(e) => Err(fs_err(&path)(e)),
        }
    }

    /// Removes generation directories other than the current and the previous one. Failures
    /// only cost disk space, so they are logged, not returned.
    fn remove_old(&self, current: &str, previous: Option<&Path>) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if !name.starts_with(GEN_PREFIX) || name == current {
                continue;
            }
            if previous.is_some_and(|p| p == Path::new(name.as_ref())) {
                continue;
            }
            if let Err(err) = fs::remove_dir_all(e.path()) {
                tracing::warn!(path = %e.path().display(), error = %err, "could not remove an old identity set");
            }
        }
    }
}

/// Refuses a destination other users may write to: they could replace the identity links, or
/// plant files that readers take for the identity.
fn check_destination(dir: &Path) -> Result<(), FsError> {
    boundkey_fs::check_owned(dir)?;
    let mode = fs::metadata(dir).map_err(fs_err(dir))?.permissions().mode();
    if mode & 0o022 != 0 {
        return Err(FsError::new(
            dir,
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "is writable by other users (mode {:o}); make it writable by this agent only (chmod go-w)",
                    mode & 0o7777
                ),
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Secret;

    fn id(generation: u64) -> Identity {
        Identity {
            bot_name: "b".into(),
            instance_id: "i".into(),
            generation,
            join_method: boundkey_proto::JoinMethod::BoundKeypair,
            not_before: 0,
            expires: 1,
            certificate: format!("CERT {generation}"),
            ca_bundle: format!("CA {generation}"),
            private_key: Secret(format!("KEY {generation}")),
            join_state: None,
        }
    }

    fn gen_dirs(d: &Path) -> usize {
        fs::read_dir(d)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(GEN_PREFIX)
            })
            .count()
    }

    #[test]
    fn sets_are_swapped_whole_and_old_ones_pruned() {
        let t = tempfile::tempdir().unwrap();
        let o = Outputs::new(&t.path().join("out"));
        for g in 1..=4 {
            o.write(&id(g)).unwrap();
            // Through the resolved current/ directory, every file is from one generation.
            let cur = o.dir().join(CURRENT);
            assert_eq!(
                fs::read_to_string(cur.join(CERT)).unwrap(),
                format!("CERT {g}")
            );
            assert_eq!(
                fs::read_to_string(cur.join(KEY)).unwrap(),
                format!("KEY {g}")
            );
            assert_eq!(fs::read_to_string(cur.join(CA)).unwrap(), format!("CA {g}"));
            assert_eq!(
                fs::read_to_string(o.dir().join(CERT)).unwrap(),
                format!("CERT {g}")
            );
            assert!(o.is_current(&id(g)));
            assert!(gen_dirs(o.dir()) <= 2);
        }
        let key_mode = fs::metadata(o.dir().join(CURRENT).join(KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        assert!(!o.is_current(&id(3)));
    }

    #[test]
    fn a_planted_file_in_place_of_a_link_is_replaced() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join(KEY), b"planted").unwrap();
        let o = Outputs::new(t.path());
        o.write(&id(1)).unwrap();
        assert_eq!(fs::read_to_string(t.path().join(KEY)).unwrap(), "KEY 1");
        assert!(fs::symlink_metadata(t.path().join(KEY))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn a_destination_others_can_write_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("out");
        fs::create_dir(&dest).unwrap();
        for mode in [0o777, 0o1777, 0o775] {
            fs::set_permissions(&dest, fs::Permissions::from_mode(mode)).unwrap();
            let e = Outputs::new(&dest).write(&id(1)).unwrap_err().to_string();
            assert!(e.contains("writable by other users"), "{e}");
            assert_eq!(fs::read_dir(&dest).unwrap().count(), 0);
        }
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o755)).unwrap();
        Outputs::new(&dest).write(&id(1)).unwrap();
    }
}
