use std::fs;
use std::os::unix::fs::PermissionsExt;

use super::*;

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn write_atomic_replaces_with_the_exact_mode_and_leaves_no_temp_files() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("f.json");
    write_atomic(&p, b"one", 0o644).unwrap();
    write_atomic(&p, b"two", 0o600).unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"two");
    assert_eq!(mode(&p), 0o600);
    assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
}

#[test]
fn write_atomic_failure_keeps_the_old_file_and_cleans_up() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("f");
    write_atomic(&p, b"old", 0o600).unwrap();
    // Renaming a file over a non-empty directory fails: nothing else may change.
    let target = d.path().join("dir");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("x"), b"x").unwrap();
    assert!(write_atomic(&target, b"new", 0o600).is_err());
    assert_eq!(fs::read(&p).unwrap(), b"old");
    assert_eq!(fs::read_dir(d.path()).unwrap().count(), 2);
}

#[test]
fn create_new_never_replaces() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("k");
    create_new(&p, b"first", 0o600).unwrap();
    assert!(matches!(
        create_new(&p, b"second", 0o600),
        Err(CreateError::Exists(_))
    ));
    assert_eq!(fs::read(&p).unwrap(), b"first");
    assert_eq!(mode(&p), 0o600);
    assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    remove_durable(&p).unwrap();
    remove_durable(&p).unwrap();
    assert!(!p.exists());
}

#[test]
fn reads_are_bounded() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("big");
    fs::write(&p, vec![b'a'; 11]).unwrap();
    let e = read_limited(&p, 10).unwrap_err();
    assert!(e.to_string().contains("big"), "{e}");
    assert!(read_limited(&d.path().join("none"), 10).unwrap().is_none());
    assert_eq!(read_limited(&p, 11).unwrap().unwrap().len(), 11);
    assert!(read_limited_secret(&p, 10).is_err());
    assert_eq!(read_limited_secret(&p, 11).unwrap().unwrap().len(), 11);
    assert!(read_limited_secret(&d.path().join("none"), 10)
        .unwrap()
        .is_none());
}

#[test]
fn ensure_dir_sets_the_mode_exactly_and_tighten_removes_other_bits() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a/b");
    ensure_dir(&p, 0o700).unwrap();
    assert_eq!(mode(&p), 0o700);
    let f = d.path().join("file");
    fs::write(&f, b"").unwrap();
    assert!(ensure_dir(&f, 0o700).is_err());
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    assert!(tighten_dir(&p).unwrap());
    assert_eq!(mode(&p), 0o700);
    assert!(!tighten_dir(&p).unwrap());
}

#[test]
fn secret_files_follow_one_rule() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("s");
    fs::write(&p, b"hunter2\r\n").unwrap();
    assert_eq!(read_secret_file(&p).unwrap().as_str(), "hunter2");
    fs::write(&p, b"two\n\n").unwrap();
    assert_eq!(read_secret_file(&p).unwrap().as_str(), "two\n");
    fs::write(&p, b"\n").unwrap();
    assert!(read_secret_file(&p)
        .unwrap_err()
        .to_string()
        .contains("empty"));
    fs::write(&p, [0xff, 0xfe]).unwrap();
    assert!(read_secret_file(&p)
        .unwrap_err()
        .to_string()
        .contains("UTF-8"));
    fs::write(&p, vec![b'a'; MAX_SECRET_FILE as usize + 1]).unwrap();
    assert!(read_secret_file(&p).is_err());
    let e = read_secret_file(&d.path().join("none")).unwrap_err();
    assert!(e.to_string().contains("no such file"), "{e}");
}

#[test]
fn the_directory_lock_is_exclusive_and_names_the_holder() {
    let d = tempfile::tempdir().unwrap();
    let held = DirLock::acquire(d.path(), "lock").unwrap();
    // flock locks belong to the open file description: a second open in this process conflicts.
    match DirLock::acquire(d.path(), "lock") {
        Err(LockError::Busy { pid, .. }) => {
            assert_eq!(pid, Some(std::process::id().to_string()))
        }
        other => panic!("{other:?}"),
    }
    drop(held);
    DirLock::acquire(d.path(), "lock").unwrap();
}

#[test]
fn a_planted_symlink_is_not_followed_by_the_lock() {
    let d = tempfile::tempdir().unwrap();
    let victim = d.path().join("victim");
    fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, d.path().join("lock")).unwrap();
    let e = DirLock::acquire(d.path(), "lock").unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
}

#[test]
fn ownership_checks_refuse_links_and_other_users_files() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("f");
    assert!(!check_owned(&f).unwrap());
    fs::write(&f, b"x").unwrap();
    assert!(check_owned(&f).unwrap());
    let l = d.path().join("l");
    std::os::unix::fs::symlink(&f, &l).unwrap();
    assert!(check_owned(&l)
        .unwrap_err()
        .to_string()
        .contains("symbolic link"));
    // Only root can give a file away; the rule is the same for everyone.
    if rustix::process::geteuid().is_root() {
        rustix::fs::chown(&f, Some(rustix::process::Uid::from_raw(65534)), None).unwrap();
        let e = check_owned(&f).unwrap_err().to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");
    }
}

#[test]
fn a_read_over_its_limit_says_so_in_its_type() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("big");
    fs::write(&p, vec![b'a'; 11]).unwrap();
    for e in [
        read_limited(&p, 10).unwrap_err(),
        read_limited_secret(&p, 10).unwrap_err(),
    ] {
        assert!(e.is_too_large(), "{e}");
        assert!(e.to_string().contains("larger than 10 bytes"), "{e}");
    }
    // Other failures are not mistaken for it.
    let e = read_limited(d.path(), 10).unwrap_err();
    assert!(!e.is_too_large(), "{e}");
}

#[test]
fn secret_bytes_follow_the_secret_file_rule_without_requiring_text() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("s");
    fs::write(&p, [0xff, 0x00, b'\n']).unwrap();
    assert_eq!(read_secret_bytes(&p).unwrap().as_slice(), &[0xff, 0x00]);
    fs::write(&p, b"pa ss\n\n").unwrap();
    assert_eq!(read_secret_bytes(&p).unwrap().as_slice(), b"pa ss\n");
    fs::write(&p, b"\r\n").unwrap();
    assert!(read_secret_bytes(&p)
        .unwrap_err()
        .to_string()
        .contains("empty"));
    fs::write(&p, vec![b'a'; MAX_SECRET_FILE as usize + 1]).unwrap();
    let e = read_secret_bytes(&p).unwrap_err();
    assert!(e.to_string().contains("larger than"), "{e}");
    fs::write(&p, vec![b'a'; MAX_SECRET_FILE as usize]).unwrap();
    assert_eq!(
        read_secret_bytes(&p).unwrap().len(),
        MAX_SECRET_FILE as usize
    );
    let e = read_secret_bytes(&d.path().join("none")).unwrap_err();
    assert!(e.to_string().contains("no such file"), "{e}");
}

#[test]
fn the_write_hook_sees_both_halves_of_every_durable_write() {
    use std::sync::Mutex;
    // The hook is process-wide: other tests' writes are recorded too and filtered out below.
    static SEEN: Mutex<Vec<(WriteStage, PathBuf, bool)>> = Mutex::new(Vec::new());
    fn record(stage: WriteStage, path: &Path) {
        // Whether the target exists at each stage is what a crash there would leave behind.
        SEEN.lock()
            .unwrap()
            .push((stage, path.to_path_buf(), path.exists()));
    }
    set_write_hook(record);
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a");
    let b = d.path().join("b");
    write_atomic(&a, b"1", 0o600).unwrap();
    create_new(&b, b"2", 0o600).unwrap();
    let seen: Vec<_> = SEEN
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, p, _)| p.starts_with(d.path()))
        .cloned()
        .collect();
    assert_eq!(
        seen,
        vec![
            (WriteStage::TempSynced, a.clone(), false),
            (WriteStage::Published, a, true),
            (WriteStage::TempSynced, b.clone(), false),
            (WriteStage::Published, b, true),
        ]
    );
}
