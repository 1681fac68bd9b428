//! What is fixed for a whole ceremony once `Init` is accepted, and the audit and refusal
//! records built from it.

use std::sync::Arc;

use boundkey_proto::{CeremonyKind, ErrorCode, JoinMethod, ServerMessage, UnixTime};

use crate::attestation::AttestationError;
use crate::authority::Authority;
use crate::entropy::Entropy;
use crate::model::{event, AuditEvent, BotInstance, BoundKeypairSpec, Lock, LockTarget, Token};
use crate::outcome::{messages, Refusal, RefusalClass};
use crate::ServiceConfig;

use super::Peer;

/// Whether this ceremony repeats one that committed but whose result the client lost. Known
/// once the checks have run; before that every ceremony is [`Delivery::Fresh`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    Fresh,
    Redelivery,
}

/// The ceremony's fixed facts. Invariant: `token` is a bound-keypair token and `spec` is its
/// bound-keypair spec; `kind` agrees with the token's bound key and the peer's certificate;
/// `instance` and `bound_instance` are the stored instances the certificate and the token name.
#[derive(Debug)]
pub(crate) struct Context {
    pub(crate) cfg: ServiceConfig,
    pub(crate) authority: Arc<Authority>,
    pub(crate) entropy: Entropy,
    pub(crate) peer: Peer,
    pub(crate) token: Token,
    pub(crate) spec: BoundKeypairSpec,
    pub(crate) kind: CeremonyKind,
    /// The fresh key the certificate will be issued for (from `Init`).
    pub(crate) identity_key: p256::PublicKey,
    pub(crate) ttl_secs: u64,
    /// The join-state document the client presented, unverified.
    pub(crate) join_state: Option<String>,
    /// The instance named by the client certificate.
    pub(crate) instance: Option<BotInstance>,
    /// The token's bound instance.
    pub(crate) bound_instance: Option<BotInstance>,
    pub(crate) locks: Vec<Lock>,
    /// The key bound before this ceremony (for rotation audit and reuse refusal).
    pub(crate) previous_key: Option<p256::PublicKey>,
}

impl Context {
    pub(crate) fn event(
        &self,
        kind: &str,
        success: bool,
        delivery: Delivery,
        now: UnixTime,
    ) -> AuditEvent {
        let mut ev = AuditEvent::new(kind, now, success);
        ev.remote_addr = Some(self.peer.remote_addr.clone());
        ev.bot_name = Some(self.token.spec.bot_name.clone());
        ev.token_name = Some(self.token.name.clone());
        ev.instance_id = self
            .peer
            .identity
            .as_ref()
            .map(|i| i.claims.instance_id.clone())
            .or_else(|| self.token.status.bound_instance_id.clone());
        let case = match delivery {
            Delivery::Redelivery => "redelivery",
            Delivery::Fresh => self.kind.as_str(),
        };
        ev.field("join_method", JoinMethod::BoundKeypair.as_str())
            .field("case", case)
    }

    /// The lock targets that must stay unlocked for this ceremony to commit: its bot, its
    /// token, the instance its certificate names and the token's bound instance.
    pub(crate) fn lock_targets(&self) -> Vec<LockTarget> {
        let mut targets = vec![
            LockTarget::Bot(self.token.spec.bot_name.clone()),
            LockTarget::JoinToken(self.token.name.clone()),
        ];
        if let Some(id) = &self.peer.identity {
            targets.push(LockTarget::BotInstanceId(id.claims.instance_id.clone()));
        }
        if let Some(bound) = &self.token.status.bound_instance_id {
            targets.push(LockTarget::BotInstanceId(bound.clone()));
        }
        targets
    }

    pub(crate) fn deny(
        &self,
        code: ErrorCode,
        msg: &str,
        reason: &str,
        delivery: Delivery,
        now: UnixTime,
    ) -> Box<Refusal> {
        let mut ev = self.event(event::BOT_JOIN, false, delivery, now);
        ev.error = Some(reason.to_string());
        refuse(vec![ev], None, code, msg, reason)
    }

    /// The automatic `join_token` lock for `cause`, under its deterministic name.
    fn auto_lock(&self, cause: &str, message: String, now: UnixTime) -> Lock {
        Lock {
            name: format!("auto-{cause}-{}", self.token.name),
            target: LockTarget::JoinToken(self.token.name.clone()),
            message,
            expires: None,
            created_by: format!("boundkey-auth ({cause})"),
            created_at: now,
        }
    }

    /// Refuses a key attestation with its own code and a `bound_keypair.attestation_failed`
    /// event. Only `ek_changed` locks (`docs/decisions.md`, "Key attestation"): it is the one
    /// failure that shows the token's key material was used from another TPM; every other one
    /// proves that no copy was accepted, and must not let a caller get a token locked.
    pub(crate) fn deny_attestation(
        &self,
        e: &AttestationError,
        delivery: Delivery,
        now: UnixTime,
    ) -> Box<Refusal> {
        let code = e.code();
        let reason = e.to_string();
        let lock = matches!(e, AttestationError::EkChanged { .. })
            .then(|| self.auto_lock("ek-changed", format!("key attestation: {reason}"), now));
        let mut ev = self
            .event(event::ATTESTATION_FAILED, false, delivery, now)
            .field("reason", code.as_str());
        ev.error = Some(reason.clone());
        if let Some(l) = &lock {
            ev = ev.field("lock", l.name.clone());
        }
        let mut join = self.event(event::BOT_JOIN, false, delivery, now);
        join.error = Some(reason.clone());
        let msg = match code {
            ErrorCode::BadRequest => "malformed or unexpected key attestation",
            _ => messages::ATTESTATION_REFUSED,
        };
        refuse(vec![ev, join], lock, code, msg, &reason)
    }

    /// Refuses and locks the token: evidence of a second copy of the device.
    pub(crate) fn deny_and_lock(
        &self,
        cause: &str,
        event_kind: &str,
        lock_message: String,
        reason: &str,
        delivery: Delivery,
        now: UnixTime,
    ) -> Box<Refusal> {
        let lock = self.auto_lock(cause, lock_message, now);
        let mut ev = self.event(event_kind, false, delivery, now);
        ev.error = Some(reason.to_string());
        let ev = ev.field("lock", lock.name.clone());
        let mut join = self.event(event::BOT_JOIN, false, delivery, now);
        join.error = Some(reason.to_string());
        refuse(
            vec![ev, join],
            Some(lock),
            ErrorCode::AccessDenied,
            messages::ACCESS_DENIED,
            reason,
        )
    }
}

pub(crate) fn refuse(
    audit: Vec<AuditEvent>,
    lock: Option<Lock>,
    code: ErrorCode,
    msg: &str,
    reason: &str,
) -> Box<Refusal> {
    Box::new(Refusal {
        lock,
        audit,
        reply: ServerMessage::error(code, msg),
        reason: reason.to_string(),
        class: RefusalClass::Authenticated,
    })
}
