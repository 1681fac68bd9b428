//! The reference boundkey auth service: a TLS listener driving `boundkey-auth`'s ceremonies, a
//! SQLite store, and an admin API on a Unix socket used by `boundkeyctl`.

pub mod admin;
pub mod daemon;
pub mod listener;
pub mod store;
pub mod tls;
pub mod workers;

/// Seconds since the Unix epoch.
pub fn now() -> boundkey_auth::UnixTime {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// This machine's host name, if the kernel reports one.
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}
