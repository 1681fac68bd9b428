//! Crash-point injection for tests: `BOUNDKEY_CRASH_AT=<point>[:<n>]` aborts the process
//! (`std::process::abort`, no destructors, no flushing: as close to a power cut as a test can
//! get) the `n`-th time (default: first) execution reaches `<point>`.
//!
//! Compiled into debug builds only; in release builds [`point`] is an empty inline function.
//!
//! Points, in the order a rotating renewal reaches them:
//! `after-init-sent`, `after-solution-sent` (once per challenge answered),
//! `after-key-created`, `after-key-persisted`, `after-rotation-response-sent`,
//! `after-result-received`, `after-state-written`, `after-outputs-written`.

#[cfg(debug_assertions)]
pub(crate) fn point(name: &str) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static HITS: AtomicU32 = AtomicU32::new(0);
    let Ok(spec) = std::env::var("BOUNDKEY_CRASH_AT") else {
        return;
    };
    let (target, nth) = match spec.split_once(':') {
        Some((t, n)) => (t, n.parse::<u32>().unwrap_or(1)),
        None => (spec.as_str(), 1),
    };
    if target != name {
        return;
    }
    if HITS.fetch_add(1, Ordering::SeqCst) + 1 == nth {
        eprintln!("boundkeyd: BOUNDKEY_CRASH_AT={spec}: aborting at {name}");
        std::process::abort();
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub(crate) fn point(_name: &str) {}
