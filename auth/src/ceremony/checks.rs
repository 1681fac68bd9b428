//! Steps 2–5 of the ceremony (locks, recovery limit, join state, renewal's instance and
//! generation), run once on the first proof of possession, in that order.

use boundkey_proto::claims::{JoinStateClaims, RecoveryMode};
use boundkey_proto::{keys, CeremonyKind, ErrorCode, UnixTime};

use crate::attestation::AttestationError;
use crate::authority::JoinStateError;
use crate::issue::public_key_pem;
use crate::model::{event, EkIdentity};
use crate::outcome::{messages, Refusal};

use super::context::{Context, Delivery};

/// How the first key was proven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FirstProof {
    /// A challenge signed by the bound (or pre-registered) key.
    BoundKey,
    /// The registration secret, then a challenge signed by the key the device just made.
    Registration,
}

/// Whether the solution also carried a valid proof by the identity key named in `Init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdentityProof {
    Proven,
    Absent,
}

/// A first proof of possession, not yet checked against locks and stored state.
#[derive(Debug)]
pub(crate) struct Proven {
    pub(crate) key: p256::PublicKey,
    pub(crate) first: FirstProof,
    pub(crate) identity: IdentityProof,
}

/// A proof that passed every check: what the commit may rely on.
#[derive(Debug)]
pub(crate) struct Checked {
    /// The key proven first; bound on success unless a rotation replaces it.
    pub(crate) key: p256::PublicKey,
    pub(crate) first: FirstProof,
    pub(crate) delivery: Delivery,
    /// The presented join state, when it had to be verified.
    pub(crate) join_state: Option<JoinStateClaims>,
}

/// Why a presented join-state document does not match the stored state. Every one of these
/// locks the token: the document is genuine but stale, i.e. a copy of the device exists.
#[derive(Debug, thiserror::Error)]
pub enum JoinStateRejection {
    #[error(transparent)]
    Invalid(#[from] JoinStateError),
    #[error("join state names another bot")]
    OtherBot,
    #[error("join state recovery_sequence {presented} != recovery_count {stored} (an older copy of the device state)")]
    StaleSequence { presented: u32, stored: u32 },
    #[error("join state instance_id is not the bound instance")]
    NotBoundInstance,
}

impl Context {
    /// Everything decided after the first proof of possession, in the documented order.
    pub(crate) fn check(&self, proven: Proven, now: UnixTime) -> Result<Checked, Box<Refusal>> {
        // Locks: before any state change or new lock, after the proof.
        self.check_locks(now)?;
        let delivery = if self.is_redelivery(&proven, now) {
            Delivery::Redelivery
        } else {
            Delivery::Fresh
        };
        self.check_recovery_limit(delivery, now)?;
        let join_state = self.check_join_state(delivery, now)?;
        self.check_renewal(delivery, now)?;
        Ok(Checked {
            key: proven.key,
            first: proven.first,
            delivery,
            join_state,
        })
    }

    /// Whether this ceremony uses up one of the token's recoveries.
    pub(crate) fn consumes_recovery(&self, delivery: Delivery) -> bool {
        matches!(self.kind, CeremonyKind::FirstJoin | CeremonyKind::Recovery)
            && delivery == Delivery::Fresh
    }

    fn check_locks(&self, now: UnixTime) -> Result<(), Box<Refusal>> {
        let targets = self.lock_targets();
        match self
            .locks
            .iter()
            .find(|l| l.is_active(now) && targets.contains(&l.target))
        {
            Some(l) => {
                let reason = format!("locked by {} ({}: {})", l.name, l.target.kind(), l.message);
                Err(self.deny(
                    ErrorCode::Locked,
                    messages::LOCKED,
                    &reason,
                    Delivery::Fresh,
                    now,
                ))
            }
            None => Ok(()),
        }
    }

    /// A key attested by another TPM than the one the token's key was attested in: the token's
    /// key material is being used from elsewhere. Refused and the token locked (after the lock
    /// check, so a locked client retrying makes no second lock). A token without a recorded EK
    /// (attestation switched on after registration) records the first one it sees.
    pub(crate) fn check_ek(
        &self,
        presented: Option<&EkIdentity>,
        delivery: Delivery,
        now: UnixTime,
    ) -> Result<(), Box<Refusal>> {
        let (Some(presented), Some(recorded)) = (presented, &self.token.status.ek_identity) else {
            return Ok(());
        };
        if presented.ek_sha256 == recorded.ek_sha256 {
            return Ok(());
        }
        Err(self.deny_attestation(
            &AttestationError::EkChanged {
                recorded: recorded.ek_sha256.clone(),
                presented: presented.ek_sha256.clone(),
            },
            delivery,
            now,
        ))
    }

    fn check_recovery_limit(&self, delivery: Delivery, now: UnixTime) -> Result<(), Box<Refusal>> {
        let recovery = &self.spec.recovery;
        let count = self.token.status.recovery_count;
        if self.consumes_recovery(delivery)
            && recovery.mode == RecoveryMode::Standard
            && count >= recovery.limit
        {
            let reason = format!("recovery limit reached ({count} of {})", recovery.limit);
            return Err(self.deny(
                ErrorCode::RecoveryLimitExceeded,
                messages::RECOVERY_LIMIT,
                &reason,
                delivery,
                now,
            ));
        }
        Ok(())
    }

    fn check_join_state(
        &self,
        delivery: Delivery,
        now: UnixTime,
    ) -> Result<Option<JoinStateClaims>, Box<Refusal>> {
        // A redelivered recovery checked its (one step old) join state in is_redelivery.
        let redelivered_recovery =
            delivery == Delivery::Redelivery && self.kind == CeremonyKind::Recovery;
        if !matches!(self.kind, CeremonyKind::Renewal | CeremonyKind::Recovery)
            || redelivered_recovery
            || self.spec.recovery.mode == RecoveryMode::Insecure
            || self.token.status.recovery_count == 0
        {
            return Ok(None);
        }
        let Some(doc) = &self.join_state else {
            return Err(self.deny(
                ErrorCode::AccessDenied,
                messages::ACCESS_DENIED,
                "join state required but missing",
                delivery,
                now,
            ));
        };
        match self.verify_join_state(doc, now) {
            Ok(claims) => Ok(Some(claims)),
            Err(rejection) => {
                let reason = rejection.to_string();
                Err(self.deny_and_lock(
                    "join-state",
                    event::JOIN_STATE_VERIFICATION_FAILED,
                    format!("join state verification failed: {reason}"),
                    &reason,
                    delivery,
                    now,
                ))
            }
        }
    }

    fn check_renewal(&self, delivery: Delivery, now: UnixTime) -> Result<(), Box<Refusal>> {
        let (CeremonyKind::Renewal, Some(id)) = (self.kind, &self.peer.identity) else {
            return Ok(());
        };
        let denied = |reason: &str| {
            self.deny(
                ErrorCode::AccessDenied,
                messages::ACCESS_DENIED,
                reason,
                delivery,
                now,
            )
        };
        if self.token.status.bound_instance_id.as_deref() != Some(id.claims.instance_id.as_str()) {
            return Err(denied(
                "certificate instance is not the token's bound instance",
            ));
        }
        let Some(inst) = &self.instance else {
            return Err(denied("bot instance no longer exists"));
        };
        if inst.status.generation != id.claims.generation && delivery == Delivery::Fresh {
            let reason = format!(
                "generation mismatch: certificate has {}, instance has {}",
                id.claims.generation, inst.status.generation
            );
            return Err(self.deny_and_lock(
                "generation",
                event::GENERATION_MISMATCH,
                reason.clone(),
                &reason,
                delivery,
                now,
            ));
        }
        Ok(())
    }

    /// Whether this ceremony repeats one that committed but whose result the client never
    /// stored (power loss, dropped connection). It is, when all of these hold:
    /// * the client proved the bound key and, with `identity_proof`, the identity key it names;
    /// * that identity key is the one the bound instance's latest certificate was issued for,
    ///   and the server had never certified it before that ceremony (recorded server-side in
    ///   `redeliverable_identity_key`; the client's word that it made a fresh key counts for
    ///   nothing, and heartbeats, being reports, count for nothing either);
    /// * what the client presents is exactly one step behind the stored state: on a renewal its
    ///   certificate is one generation old; on a recovery the bound instance is still at its
    ///   first generation and the join state names its predecessor with the previous recovery
    ///   sequence (or is absent after a lost first join).
    ///
    /// The identity key is made fresh by the device for each ceremony and never leaves it, so a
    /// copy of the device's state from before the lost ceremony cannot qualify; it is still
    /// refused and locked as a clone.
    fn is_redelivery(&self, proven: &Proven, now: UnixTime) -> bool {
        if proven.identity != IdentityProof::Proven {
            return false;
        }
        let Some(b) = &self.bound_instance else {
            return false;
        };
        let Some(latest) = b.status.latest_authentications.last() else {
            return false;
        };
        let fresh_when_issued = self.token.status.redeliverable_identity_key.as_deref()
            == Some(keys::kid(&self.identity_key).as_str());
        if latest.public_key != public_key_pem(&self.identity_key) || !fresh_when_issued {
            return false;
        }
        let count = self.token.status.recovery_count;
        match self.kind {
            CeremonyKind::Renewal => self.peer.identity.as_ref().is_some_and(|id| {
                id.claims.instance_id == b.spec.instance_id
                    && id.claims.generation + 1 == b.status.generation
            }),
            CeremonyKind::Recovery if b.status.generation == 1 => {
                match (&self.join_state, self.spec.recovery.mode) {
                    (_, RecoveryMode::Insecure) => true,
                    (None, _) => count == 1 && b.spec.previous_instance_id.is_none(),
                    (Some(doc), _) => self.authority.verify_join_state(doc, now).is_ok_and(|c| {
                        c.sub == self.token.spec.bot_name
                            && c.recovery_sequence + 1 == count
                            && b.spec.previous_instance_id.as_deref()
                                == Some(c.instance_id.as_str())
                    }),
                }
            }
            _ => false,
        }
    }

    fn verify_join_state(
        &self,
        doc: &str,
        now: UnixTime,
    ) -> Result<JoinStateClaims, JoinStateRejection> {
        let claims = self.authority.verify_join_state(doc, now)?;
        let st = &self.token.status;
        if claims.sub != self.token.spec.bot_name {
            return Err(JoinStateRejection::OtherBot);
        }
        if claims.recovery_sequence != st.recovery_count {
            return Err(JoinStateRejection::StaleSequence {
                presented: claims.recovery_sequence,
                stored: st.recovery_count,
            });
        }
        if st.bound_instance_id.as_deref() != Some(claims.instance_id.as_str()) {
            return Err(JoinStateRejection::NotBoundInstance);
        }
        Ok(claims)
    }
}
