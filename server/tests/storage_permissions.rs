//! The SQLite database holds the CA private keys in clear (issue 8, defect 4): it and its
//! `-wal`/`-shm` files are owner-only wherever `--storage` points, whatever the umask.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::*;
use rustix::fs::Mode;

fn db_files(db: &Path) -> [PathBuf; 3] {
    ["", "-wal", "-shm"].map(|suffix| {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    })
}

#[test]
fn database_outside_the_data_dir_is_owner_only_and_a_wider_one_is_tightened() {
    // The usual umask, which leaves SQLite's own default (0644) readable by everyone. This is
    // the only test in this binary, so changing the process umask affects nothing else.
    rustix::process::umask(Mode::from_raw_mode(0o022));
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::set_permissions(elsewhere.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let db = elsewhere.path().join("keys.db");
    let storage = format!("sqlite:{}", db.display());

    let s = Server::start_with(&["--storage", &storage]);
    s.ctl(&["bots", "add", "robot"]);
    for f in db_files(&db) {
        assert_eq!(file_mode(&f), 0o600, "{}", f.display());
    }
    assert!(
        !s.data_dir.join("boundkey.db").exists(),
        "the --storage path is the one used"
    );

    // A database left wider by an older version or an operator: tightened, with a warning.
    let (dir, data_dir) = s.stop();
    for f in db_files(&db) {
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let s = Server::start_in(dir, data_dir, &["--storage", &storage]);
    for f in db_files(&db) {
        assert_eq!(file_mode(&f), 0o600, "{}", f.display());
    }
    assert!(
        s.log().contains("database file was accessible to others"),
        "the tightening is logged"
    );
    s.ctl(&["bots", "add", "robot-2"]);
}
