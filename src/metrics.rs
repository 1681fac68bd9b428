//! What the health endpoint reports: the agent's counters and the Prometheus text format.
//!
//! Pure data and formatting; [`health`](crate::health) serves it and [`daemon`](crate::daemon)
//! fills it in after each ceremony.

use std::fmt::Write as _;
use std::time::Duration;

/// Upper bounds (seconds) of the key-store latency buckets: a TPM signature takes a few
/// milliseconds, a key creation tens to hundreds.
const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// A latency histogram. Invariant: `counts[i]` counts observations in bucket `i` alone
/// (not cumulative; the last slot is `+Inf`), and `count` is their sum.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Histogram {
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    pub(crate) fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[i] += 1;
        self.sum += s;
        self.count += 1;
    }
}

/// Key-store operation latencies, by operation.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct KeystoreLatency {
    pub(crate) sign: Histogram,
    pub(crate) create_key: Histogram,
    /// TPM2_Certify by a fresh attestation key (tokens that require key attestation).
    pub(crate) attest: Histogram,
    /// TPM2_ActivateCredential of the same ceremony.
    pub(crate) activate: Histogram,
}

/// A snapshot of the agent for `/metrics` and `/readyz`. Times are Unix seconds.
#[derive(Debug, Clone, Default)]
pub(crate) struct Metrics {
    /// `notAfter` of the identity on disk.
    pub(crate) certificate_expiry: Option<i64>,
    pub(crate) generation: Option<u64>,
    pub(crate) last_success: Option<i64>,
    pub(crate) consecutive_failures: u64,
    pub(crate) failures_total: u64,
    /// Recoveries the auth service still allows, as its last answer said.
    pub(crate) recovery_remaining: Option<u64>,
    pub(crate) keystore: Option<&'static str>,
    pub(crate) latency: KeystoreLatency,
    /// Why the agent cannot renew without an operator (a refusal), if it cannot.
    pub(crate) locked: Option<String>,
}

impl Metrics {
    /// Ready = a certificate on disk that is still valid at `now`.
    pub(crate) fn ready(&self, now: i64) -> Result<(), String> {
        match self.certificate_expiry {
            Some(e) if e > now => Ok(()),
            Some(_) => Err("the identity has expired".into()),
            None => Err("no identity yet".into()),
        }
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub(crate) fn render(&self) -> String {
        let mut o = String::with_capacity(2048);
        gauge(
            &mut o,
            "boundkeyd_build_info",
            "Agent version and key store support.",
            &[(
                &format!(
                    "version=\"{}\",tpm=\"{}\"",
                    env!("CARGO_PKG_VERSION"),
                    cfg!(feature = "tpm")
                ),
                1,
            )],
        );
        if let Some(e) = self.certificate_expiry {
            gauge(
                &mut o,
                "boundkeyd_certificate_expiry_timestamp_seconds",
                "notAfter of the identity certificate on disk.",
                &[("", e)],
            );
        }
        if let Some(g) = self.generation {
            gauge(
                &mut o,
                "boundkeyd_identity_generation",
                "Generation of the identity on disk.",
                &[("", g as i64)],
            );
        }
        if let Some(t) = self.last_success {
            gauge(
                &mut o,
                "boundkeyd_last_success_timestamp_seconds",
                "When the last join or renewal succeeded.",
                &[("", t)],
            );
        }
        gauge(
            &mut o,
            "boundkeyd_consecutive_failures",
            "Failed joins or renewals since the last success.",
            &[("", self.consecutive_failures as i64)],
        );
        counter(
            &mut o,
            "boundkeyd_failures_total",
            "Failed joins or renewals since start.",
            self.failures_total,
        );
        if let Some(r) = self.recovery_remaining {
            gauge(
                &mut o,
                "boundkeyd_recovery_remaining",
                "Recoveries the auth service still allows this device (its last answer).",
                &[("", r as i64)],
            );
        }
        gauge(
            &mut o,
            "boundkeyd_locked",
            "1 when the auth service refused the device and an operator must act.",
            &[("", i64::from(self.locked.is_some()))],
        );
        if let Some(k) = self.keystore {
            gauge(
                &mut o,
                "boundkeyd_keystore_info",
                "Key store backend of the bound key.",
                &[(&format!("backend=\"{k}\""), 1)],
            );
        }
        let name = "boundkeyd_keystore_operation_duration_seconds";
        let _ = writeln!(
            o,
            "# HELP {name} Key-store (TPM) operation latency.\n# TYPE {name} histogram"
        );
        histogram(&mut o, name, "sign", &self.latency.sign);
        histogram(&mut o, name, "create_key", &self.latency.create_key);
        histogram(&mut o, name, "attest", &self.latency.attest);
        histogram(&mut o, name, "activate_credential", &self.latency.activate);
        o
    }
}

fn gauge(o: &mut String, name: &str, help: &str, samples: &[(&str, i64)]) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (labels, v) in samples {
        if labels.is_empty() {
            let _ = writeln!(o, "{name} {v}");
        } else {
            let _ = writeln!(o, "{name}{{{labels}}} {v}");
        }
    }
}

fn counter(o: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
}

fn histogram(o: &mut String, name: &str, op: &str, h: &Histogram) {
    let mut cumulative = 0;
    for (i, b) in BUCKETS.iter().enumerate() {
        cumulative += h.counts[i];
        let _ = writeln!(o, "{name}_bucket{{op=\"{op}\",le=\"{b}\"}} {cumulative}");
    }
    let _ = writeln!(
        o,
        "{name}_bucket{{op=\"{op}\",le=\"+Inf\"}} {}\n{name}_sum{{op=\"{op}\"}} {}\n{name}_count{{op=\"{op}\"}} {}",
        h.count, h.sum, h.count
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_in_the_text() {
        let mut m = Metrics::default();
        m.latency.sign.observe(Duration::from_micros(800));
        m.latency.sign.observe(Duration::from_millis(7));
        m.latency.sign.observe(Duration::from_secs(3));
        let t = m.render();
        let n = "boundkeyd_keystore_operation_duration_seconds";
        assert!(t.contains(&format!("{n}_bucket{{op=\"sign\",le=\"0.001\"}} 1\n")));
        assert!(t.contains(&format!("{n}_bucket{{op=\"sign\",le=\"0.01\"}} 2\n")));
        assert!(t.contains(&format!("{n}_bucket{{op=\"sign\",le=\"1\"}} 2\n")));
        assert!(t.contains(&format!("{n}_bucket{{op=\"sign\",le=\"+Inf\"}} 3\n")));
        assert!(t.contains(&format!("{n}_count{{op=\"sign\"}} 3\n")));
        assert!(t.contains(&format!("{n}_count{{op=\"create_key\"}} 0\n")));
    }

    #[test]
    fn readiness_follows_the_certificate() {
        let mut m = Metrics::default();
        assert!(m.ready(100).is_err());
        m.certificate_expiry = Some(200);
        assert!(m.ready(100).is_ok());
        assert!(m.ready(200).is_err());
    }
}
