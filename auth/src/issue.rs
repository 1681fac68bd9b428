//! Issuing an identity: the last step of every successful join, whichever the method.
//!
//! Claims → certificate → (bound keypair only) signed join state → authentication record →
//! `JoinResult` → instance write → one commit. Both join methods decide *whether* to issue and
//! *what* the instance and token become; this module is the one place that turns that decision
//! into a certificate and a [`Success`], so the two methods cannot drift apart.

use boundkey_proto::claims::{JoinStateClaims, RecoveryMode};
use boundkey_proto::{JoinMethod, JoinResult, ServerMessage, UnixTime};

use crate::authority::{Authority, AuthorityError, IdentityClaims};
use crate::entropy::Entropy;
use crate::model::{AuditEvent, Authentication, BotInstance, INSTANCE_EXPIRY_GRACE_SECS};
use crate::outcome::Success;
use crate::store::{Commit, InstanceWrite, LockGuard, TokenWrite};

/// Why an identity could not be issued. Always an internal error: the decision was to issue.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("issuing identity: {0}")]
    Identity(AuthorityError),
    #[error("signing join state: {0}")]
    JoinState(AuthorityError),
}

/// What a bound-keypair join adds to the result: the key now bound and the join-state
/// document the device must present next time.
#[derive(Debug, Clone)]
pub(crate) struct Binding {
    /// SSH form of the bound public key.
    pub(crate) public_key: String,
    pub(crate) join_state: JoinStateClaims,
}

/// A decided join, ready to be issued. The instance inside `instance` already has the
/// generation the certificate will carry.
pub(crate) struct Issue<'a> {
    pub(crate) authority: &'a Authority,
    pub(crate) entropy: &'a Entropy,
    /// The key the certificate is issued for (the client's fresh identity key).
    pub(crate) identity_key: &'a p256::PublicKey,
    pub(crate) ttl_secs: u64,
    pub(crate) remote_addr: &'a str,
    pub(crate) bot_name: String,
    pub(crate) join_method: JoinMethod,
    /// The join token named in the certificate.
    pub(crate) join_token: String,
    /// The join token as recorded in the instance's history (masked for the `token` method,
    /// whose token name is itself the secret's hash).
    pub(crate) recorded_join_token: String,
    pub(crate) instance: InstanceWrite,
    pub(crate) binding: Option<Binding>,
    pub(crate) token: Option<TokenWrite>,
    /// Success events, written in the same commit.
    pub(crate) audit: Vec<AuditEvent>,
    /// The locks the commit re-checks (see [`Commit::lock_guard`]).
    pub(crate) lock_guard: Option<LockGuard>,
}

fn instance_mut(w: &mut InstanceWrite) -> &mut BotInstance {
    match w {
        InstanceWrite::Create(i) => i,
        InstanceWrite::Update { instance, .. } => instance,
    }
}

impl Issue<'_> {
    pub(crate) fn issue(self, now: UnixTime) -> Result<Box<Success>, IssueError> {
        let Issue {
            authority,
            entropy,
            identity_key,
            ttl_secs,
            remote_addr,
            bot_name,
            join_method,
            join_token,
            recorded_join_token,
            mut instance,
            binding,
            token,
            audit,
            lock_guard,
        } = self;
        let inst = instance_mut(&mut instance);
        let claims = IdentityClaims {
            cluster: authority.cluster().to_string(),
            bot_name: bot_name.clone(),
            instance_id: inst.spec.instance_id.clone(),
            generation: inst.status.generation,
            join_method,
            join_token,
        };
        let issued = authority
            .issue_identity_with_serial(&claims, identity_key, ttl_secs, entropy.serial(), now)
            .map_err(IssueError::Identity)?;
        let join_state = match &binding {
            Some(b) => Some(
                authority
                    .sign_join_state(&b.join_state, now)
                    .map_err(IssueError::JoinState)?,
            ),
            None => None,
        };
        // What the device may still spend, as the join state it receives records it.
        let recovery_remaining = binding
            .as_ref()
            .map(|b| &b.join_state)
            .filter(|j| j.recovery_mode == RecoveryMode::Standard)
            .map(|j| j.recovery_limit.saturating_sub(j.recovery_sequence));
        let bound_public_key = binding.map(|b| b.public_key);

        inst.status.expires = issued.expires + INSTANCE_EXPIRY_GRACE_SECS;
        inst.record_authentication(Authentication {
            authenticated_at: now,
            join_method,
            join_token: recorded_join_token,
            generation: inst.status.generation,
            public_key: public_key_pem(identity_key),
            bound_public_key: bound_public_key.clone(),
            remote_addr: remote_addr.to_string(),
        });
        let reply = ServerMessage::Result(JoinResult {
            bot_name,
            instance_id: inst.spec.instance_id.clone(),
            generation: inst.status.generation,
            join_method,
            certificate: issued.certificate_pem,
            ca_bundle: authority.identity_ca_bundle(now),
            not_before: issued.not_before,
            expires: issued.expires,
            join_state,
            bound_public_key,
            recovery_remaining,
        });
        Ok(Box::new(Success {
            commit: Commit {
                token,
                instance,
                audit,
                lock_guard,
            },
            reply,
        }))
    }
}

/// PEM of an identity public key (PKIX), as recorded in authentications.
pub(crate) fn public_key_pem(key: &p256::PublicKey) -> String {
    use p256::pkcs8::{EncodePublicKey, LineEnding};
    key.to_public_key_pem(LineEnding::LF).unwrap_or_default()
}
