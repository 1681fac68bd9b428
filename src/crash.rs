//! Fault injection for tests, compiled into debug builds only (in release builds every function
//! here is an empty inline function and the environment is never read).
//!
//! * `BOUNDKEY_CRASH_AT=<point>[:<n>]` aborts the process (`std::process::abort`: no destructors,
//!   no flushing, as close to a power cut as a test can get) the `n`-th time (default: first)
//!   execution reaches `<point>`.
//! * `BOUNDKEY_PAUSE_AT=<point>[:<n>]` with `BOUNDKEY_PAUSE_FILE=<path>` stops there instead: the
//!   agent creates `<path>` and waits until the test removes it (at most [`PAUSE_LIMIT`]), so the
//!   test can break something (kill the TPM, fill the disk) at exactly that moment.
//!
//! Points, in the order a rotating renewal reaches them:
//! `after-init-sent`, `before-sign` (once per challenge), `after-solution-sent` (once per
//! challenge answered), `after-key-created`, `after-key-persisted`,
//! `after-rotation-response-sent`, `after-result-received`, `after-state-written`,
//! `outputs-set-synced`, `current-swapped`, `after-outputs-written`.
//!
//! Every durable write made through `boundkey-fs` (by the agent or its key store) is a point
//! too, twice: `<file>-temp` when the complete temporary file is fsynced but not yet renamed,
//! and `<file>-written` once the rename and the directory fsync are done. `<file>` is `state`
//! (`state.json`), `key` (a key file or TPM blob in `keys/`), or `output-cert`, `output-key`,
//! `output-ca` (the files of a new output set).

/// Longest a pause point waits for the test to remove its file.
#[cfg(debug_assertions)]
pub(crate) const PAUSE_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Installs the write hook that turns every durable write into crash points.
#[cfg(debug_assertions)]
pub(crate) fn install() {
    if std::env::var_os("BOUNDKEY_CRASH_AT").is_some()
        || std::env::var_os("BOUNDKEY_PAUSE_AT").is_some()
    {
        boundkey_fs::set_write_hook(on_write);
    }
}

#[cfg(debug_assertions)]
fn on_write(stage: boundkey_fs::WriteStage, path: &std::path::Path) {
    let label = write_label(path);
    match stage {
        boundkey_fs::WriteStage::TempSynced => point(&format!("{label}-temp")),
        boundkey_fs::WriteStage::Published => point(&format!("{label}-written")),
    }
}

/// The point name of a written file (see the module documentation).
#[cfg(debug_assertions)]
fn write_label(path: &std::path::Path) -> String {
    let name = |p: Option<&std::path::Path>| {
        p.and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let file = name(Some(path));
    let parent = name(path.parent());
    if file == "state.json" {
        "state".into()
    } else if parent == "keys" {
        "key".into()
    } else if parent.starts_with(".gen-") {
        format!("output-{}", file.trim_end_matches(".pem"))
    } else {
        file
    }
}

/// `Some(n)` if `spec` (`<point>[:<n>]`) names `name`.
#[cfg(debug_assertions)]
fn matches(spec: &str, name: &str) -> Option<u32> {
    let (target, nth) = match spec.rsplit_once(':') {
        Some((t, n)) => (t, n.parse::<u32>().unwrap_or(1)),
        None => (spec, 1),
    };
    (target == name).then_some(nth)
}

#[cfg(debug_assertions)]
pub(crate) fn point(name: &str) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CRASH_HITS: AtomicU32 = AtomicU32::new(0);
    static PAUSE_HITS: AtomicU32 = AtomicU32::new(0);
    if let Ok(spec) = std::env::var("BOUNDKEY_CRASH_AT") {
        if let Some(nth) = matches(&spec, name) {
            if CRASH_HITS.fetch_add(1, Ordering::SeqCst) + 1 == nth {
                eprintln!("boundkeyd: BOUNDKEY_CRASH_AT={spec}: aborting at {name}");
                std::process::abort();
            }
        }
    }
    if let Ok(spec) = std::env::var("BOUNDKEY_PAUSE_AT") {
        if let Some(nth) = matches(&spec, name) {
            if PAUSE_HITS.fetch_add(1, Ordering::SeqCst) + 1 == nth {
                pause(&spec, name);
            }
        }
    }
}

/// Creates the pause file and waits for it to go away. Blocking the runtime thread is the point:
/// nothing of this agent may move while the test breaks something.
#[cfg(debug_assertions)]
fn pause(spec: &str, name: &str) {
    let Some(file) = std::env::var_os("BOUNDKEY_PAUSE_FILE") else {
        eprintln!("boundkeyd: BOUNDKEY_PAUSE_AT={spec} without BOUNDKEY_PAUSE_FILE: not pausing");
        return;
    };
    let file = std::path::PathBuf::from(file);
    if let Err(e) = std::fs::write(&file, name) {
        eprintln!(
            "boundkeyd: BOUNDKEY_PAUSE_AT={spec}: cannot create {}: {e}",
            file.display()
        );
        return;
    }
    eprintln!("boundkeyd: BOUNDKEY_PAUSE_AT={spec}: paused at {name}");
    let end = std::time::Instant::now() + PAUSE_LIMIT;
    while file.exists() && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    eprintln!("boundkeyd: BOUNDKEY_PAUSE_AT={spec}: resuming after {name}");
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub(crate) fn install() {}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub(crate) fn point(_name: &str) {}

#[cfg(all(test, debug_assertions))]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn specs_and_write_labels() {
        assert_eq!(matches("state-temp", "state-temp"), Some(1));
        assert_eq!(matches("state-temp:3", "state-temp"), Some(3));
        assert_eq!(matches("state-temp:3", "state-written"), None);
        assert_eq!(write_label(Path::new("/s/state.json")), "state");
        assert_eq!(write_label(Path::new("/s/keys/bk-1.tpm")), "key");
        assert_eq!(
            write_label(Path::new("/d/.gen-3-abc/cert.pem")),
            "output-cert"
        );
        assert_eq!(
            write_label(Path::new("/d/.gen-3-abc/key.pem")),
            "output-key"
        );
    }
}
