//! Exponential backoff with jitter.

use std::time::Duration;

/// Doubles from `base` up to `max`; each delay is drawn uniformly from `[d/2, d]` so a fleet that
/// lost the auth service at the same moment does not come back in lockstep.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    /// The un-jittered delay of the next attempt.
    pub(crate) fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        jitter(d)
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A uniformly random duration in `[d/2, d]`.
pub(crate) fn jitter(d: Duration) -> Duration {
    use rand_core::RngCore;
    let half = d / 2;
    let span = u64::try_from((d - half).as_millis()).unwrap_or(u64::MAX);
    if span == 0 {
        return d;
    }
    let r = rand_core::OsRng.next_u64() % (span + 1);
    half + Duration::from_millis(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_bounded_jitter() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            let c = b.ceiling();
            let d = b.next_delay();
            assert!(d <= c && d >= c / 2, "{d:?} vs {c:?}");
            ceilings.push(c.as_secs());
        }
        assert_eq!(ceilings, vec![1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_secs(1));
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), Duration::from_secs(60));
    }
}
