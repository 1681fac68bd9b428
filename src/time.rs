//! Wall-clock helpers. Everything else in the agent takes the time as an argument.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// First second of the year 10000: RFC 3339 has four year digits (and the formatter panics
/// past them), so later times are shown as plain numbers.
const YEAR_10000: i64 = 253_402_300_800;

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// RFC 3339 in UTC, for logs and `status`. Times a stored file may hold but RFC 3339 cannot
/// express are written as Unix seconds rather than failing.
pub(crate) fn rfc3339(t: i64) -> String {
    match u64::try_from(t) {
        Ok(secs) if t < YEAR_10000 => {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
        }
        _ => format!("@{t} (Unix seconds, outside years 1970..9999)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stored_time_formats_without_panicking() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(YEAR_10000 - 1), "9999-12-31T23:59:59Z");
        assert!(rfc3339(YEAR_10000).starts_with("@253402300800"));
        assert!(rfc3339(i64::MAX).starts_with('@'));
        assert!(rfc3339(-1).starts_with("@-1"));
    }
}
