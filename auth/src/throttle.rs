//! Per-key token buckets on the service's clock: how the service bounds what callers that
//! proved nothing can cost it (audit rows, registration-secret guesses). In memory and per
//! process: a restart forgets them, which costs an attacker a restart of the service, not a
//! bypass.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;

use boundkey_proto::UnixTime;

/// A budget: `burst` events at once, then one more every `every_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub burst: u32,
    pub every_secs: i64,
}

/// The service's limits. Defaults: registration secrets 5 wrong guesses per token and 10 per
/// address, then one per minute / half-minute; anonymous audit events 30 per address, then one
/// per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub secret_per_token: Rate,
    pub secret_per_address: Rate,
    pub anonymous_audit_per_address: Rate,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            secret_per_token: Rate {
                burst: 5,
                every_secs: 60,
            },
            secret_per_address: Rate {
                burst: 10,
                every_secs: 30,
            },
            anonymous_audit_per_address: Rate {
                burst: 30,
                every_secs: 1,
            },
        }
    }
}

/// Keys tracked at most; full (idle) buckets are forgotten first. Past this, unknown keys are
/// treated as exhausted, so memory stays bounded whatever the number of addresses.
const MAX_KEYS: usize = 65_536;

#[derive(Debug)]
struct Bucket {
    available: u32,
    /// When `available` was last brought up to date.
    updated: UnixTime,
    /// Events refused since the last one admitted (for the audit summary).
    dropped: u64,
}

impl Bucket {
    fn refill(&mut self, rate: Rate, now: UnixTime) {
        let every = rate.every_secs.max(1);
        if self.available >= rate.burst || now < self.updated {
            self.updated = now;
            return;
        }
        let earned = (now - self.updated) / every;
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            self.available = self.available.saturating_add(earned).min(rate.burst);
            self.updated += i64::from(earned) * every;
        }
    }
}

/// Token buckets for one kind of event. Invariant: at most [`MAX_KEYS`] keys are held.
#[derive(Debug)]
pub struct Throttle {
    rate: Rate,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// What [`Throttle::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead; `dropped` events of this key were refused since the previous admitted one.
    Admitted {
        dropped: u64,
    },
    Refused,
}

impl Throttle {
    pub fn new(rate: Rate) -> Self {
        Throttle {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn with_bucket<T>(
        &self,
        key: &str,
        now: UnixTime,
        f: impl FnOnce(&mut Bucket) -> T,
    ) -> Option<T> {
        let mut map = match self.buckets.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if !map.contains_key(key) && map.len() >= MAX_KEYS {
            let rate = self.rate;
            map.retain(|_, b| {
                b.refill(rate, now);
                b.available < rate.burst
            });
            if map.len() >= MAX_KEYS {
                return None;
            }
        }
        let b = map.entry(key.to_string()).or_insert(Bucket {
            available: self.rate.burst,
            updated: now,
            dropped: 0,
        });
        b.refill(self.rate, now);
        Some(f(b))
    }

    /// Spends one event of `key`'s budget if there is one left.
    pub fn admit(&self, key: &str, now: UnixTime) -> Admission {
        self.with_bucket(key, now, |b| {
            if b.available == 0 {
                b.dropped += 1;
                Admission::Refused
            } else {
                b.available -= 1;
                Admission::Admitted {
                    dropped: std::mem::take(&mut b.dropped),
                }
            }
        })
        .unwrap_or(Admission::Refused)
    }

    /// Whether `key` has no budget left (spends nothing).
    pub fn exhausted(&self, key: &str, now: UnixTime) -> bool {
        self.with_bucket(key, now, |b| b.available == 0)
            .unwrap_or(true)
    }
}

/// The part of a transport address that identifies a caller: the IP (IPv6 by its /64, which
/// one host usually holds whole), without the port. Unparseable addresses are used as they are.
pub fn address_key(remote_addr: &str) -> String {
    match remote_addr.parse::<SocketAddr>().map(|a| a.ip()) {
        Ok(IpAddr::V4(ip)) => ip.to_string(),
        Ok(IpAddr::V6(ip)) => match ip.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = ip.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
        Err(_) => remote_addr.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_one_per_period_and_counts_drops() {
        let t = Throttle::new(Rate {
            burst: 2,
            every_secs: 10,
        });
        assert_eq!(t.admit("a", 0), Admission::Admitted { dropped: 0 });
        assert_eq!(t.admit("a", 0), Admission::Admitted { dropped: 0 });
        assert_eq!(t.admit("a", 5), Admission::Refused);
        assert_eq!(t.admit("a", 9), Admission::Refused);
        assert!(t.exhausted("a", 9));
        assert!(!t.exhausted("b", 9), "keys are independent");
        assert_eq!(t.admit("a", 10), Admission::Admitted { dropped: 2 });
        assert_eq!(t.admit("a", 15), Admission::Refused);
        assert_eq!(t.admit("a", 100), Admission::Admitted { dropped: 1 });
    }

    #[test]
    fn addresses_are_keyed_without_port_and_ipv6_by_prefix() {
        assert_eq!(address_key("192.0.2.7:5000"), "192.0.2.7");
        assert_eq!(
            address_key("[2001:db8:1:2:3:4:5:6]:443"),
            "2001:db8:1:2::/64"
        );
        assert_eq!(address_key("[::ffff:192.0.2.1]:1"), "192.0.2.1");
        assert_eq!(address_key("in-memory"), "in-memory");
    }
}
