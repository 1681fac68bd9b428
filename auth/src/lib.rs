//! Auth-side verification for boundkey.
//!
//! * [`ceremony`]: the bound-keypair join ceremony as a sans-I/O state machine (feed it client
//!   messages, it says what to send and, at the end, what to commit).
//! * [`token_join`]: the simpler `token` join method.
//! * [`issue`]: the one identity-issuing path both join methods end in.
//! * [`entropy`]: the service's source of randomness (seedable for tests).
//! * [`service`]: a thin, transport-agnostic driver that loads what a ceremony needs from a
//!   [`store::Store`], runs it and commits the outcome. Auth services (the reference
//!   `boundkey-server`, or a third party's) put their network loop around it.
//! * [`authority`]: the CAs, identity certificates and join-state documents.
//! * [`model`]: tokens, bots, bot instances, locks, audit events.

pub mod admin;
pub mod attestation;
pub mod authority;
pub mod model;
pub mod store;

pub use boundkey_proto::UnixTime;

pub mod ceremony;
pub mod entropy;
pub mod input;
pub mod issue;
pub mod outcome;

pub use entropy::Entropy;

/// Certificate lifetime bounds the service enforces on every join, and the limits it puts on
/// callers and on its audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Used when the client asks for 0.
    pub default_ttl_secs: u64,
    pub max_ttl_secs: u64,
    /// As short as 10 s so that expiry and recovery can be exercised in tests.
    pub min_ttl_secs: u64,
    /// Audit events older than this are deleted (checked at most every
    /// [`service::AUDIT_PURGE_EVERY_SECS`]); 0 keeps them forever.
    pub audit_retention_secs: u64,
    /// Throttling of registration secrets and of anonymous audit events.
    pub limits: throttle::Limits,
}

/// Default audit retention: 90 days.
pub const DEFAULT_AUDIT_RETENTION_SECS: u64 = 90 * 24 * 3600;

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            default_ttl_secs: 3600,
            max_ttl_secs: 7 * 24 * 3600,
            min_ttl_secs: 10,
            audit_retention_secs: DEFAULT_AUDIT_RETENTION_SECS,
            limits: throttle::Limits::default(),
        }
    }
}

impl ServiceConfig {
    pub fn clamp_ttl(&self, requested: u64) -> u64 {
        if requested == 0 {
            return self.default_ttl_secs;
        }
        requested.clamp(self.min_ttl_secs, self.max_ttl_secs)
    }
}
pub mod heartbeat;
pub mod service;
pub mod throttle;
pub mod token_join;
