//! Step 7: what one successful ceremony commits. The token's new status, the instance (new or
//! continued) and the audit records are decided here; the identity itself is issued by
//! [`crate::issue`], the path shared with the `token` method.

use boundkey_proto::claims::JoinStateClaims;
use boundkey_proto::{keys, CeremonyKind, ErrorCode, JoinMethod, UnixTime};

use crate::issue::{Binding, Issue};
use crate::model::{event, remember, BotInstance, EkIdentity, MAX_KEY_HISTORY};
use crate::outcome::{messages, Step};
use crate::store::{InstanceWrite, LockGuard, TokenWrite};

use super::checks::{Checked, FirstProof};
use super::context::{Context, Delivery};

/// Whether the key bound on success replaces the one bound before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyChange {
    Kept,
    Rotated,
}

/// The key bound on success, proven in this ceremony, and the TPM it was attested in when the
/// token asked for an attestation.
#[derive(Debug)]
pub(crate) struct FinalKey {
    pub(crate) key: p256::PublicKey,
    pub(crate) change: KeyChange,
    pub(crate) ek: Option<EkIdentity>,
}

impl Context {
    pub(crate) fn finish(&self, checked: Checked, bound: FinalKey, now: UnixTime) -> Step {
        let delivery = checked.delivery;
        let internal = |reason: &str| {
            Step::Refuse(self.deny(
                ErrorCode::Internal,
                messages::INTERNAL,
                reason,
                delivery,
                now,
            ))
        };
        let registration = checked.first == FirstProof::Registration;
        let rotated = bound.change == KeyChange::Rotated;
        let consumes_recovery = self.consumes_recovery(delivery);
        // A redelivery continues the bound instance, like a renewal.
        let continued = match (self.kind, delivery) {
            (CeremonyKind::Renewal, _) => self.instance.as_ref(),
            (_, Delivery::Redelivery) => self.bound_instance.as_ref(),
            _ => None,
        };
        let instance = match (self.kind, continued) {
            (_, Some(inst)) => {
                let mut i = inst.clone();
                i.status.generation += 1;
                InstanceWrite::Update {
                    instance: i,
                    expected_revision: inst.revision,
                }
            }
            (CeremonyKind::Renewal, None) => return internal("renewal without instance"),
            (kind, None) => {
                let previous = match kind {
                    CeremonyKind::Recovery => {
                        checked.join_state.as_ref().map(|c| c.instance_id.clone())
                    }
                    _ => None,
                };
                InstanceWrite::Create(BotInstance::new_with_id(
                    self.entropy.instance_id(),
                    &self.token.spec.bot_name,
                    JoinMethod::BoundKeypair,
                    &self.token.name,
                    previous,
                    now,
                ))
            }
        };
        let mut status = self.token.status.clone();
        if let Some(ek) = &bound.ek {
            status.ek_identity = Some(ek.clone());
        }
        let mut instance = instance;
        // A new instance inherits the TPM of the key it is created with; a continued one
        // changes TPM only through an attested rotation (which check_ek held to the same EK).
        match &mut instance {
            InstanceWrite::Create(i) => i.status.ek_identity = status.ek_identity.clone(),
            InstanceWrite::Update { instance: i, .. } => {
                if bound.ek.is_some() {
                    i.status.ek_identity = bound.ek.clone();
                }
            }
        }
        let (instance_id, generation, previous_instance_id) = match &instance {
            InstanceWrite::Create(i) | InstanceWrite::Update { instance: i, .. } => (
                i.spec.instance_id.clone(),
                i.status.generation,
                i.spec.previous_instance_id.clone(),
            ),
        };

        if consumes_recovery {
            status.recovery_count += 1;
            status.last_recovered_at = Some(now);
        }
        if registration {
            status.registration_secret_hash = None;
        }
        if rotated {
            status.last_rotated_at = Some(now);
        }
        if let (true, Some(old)) = (rotated, self.previous_key) {
            if old != bound.key {
                remember(
                    &mut status.retired_public_keys,
                    keys::kid(&old),
                    MAX_KEY_HISTORY,
                );
            }
        }
        // Whether this certificate's identity key could later vouch for a redelivery: only if
        // it was never certified before (a redelivery's key was, by definition).
        let identity_kid = keys::kid(&self.identity_key);
        status.redeliverable_identity_key =
            (!status.seen_identity_keys.contains(&identity_kid)).then(|| identity_kid.clone());
        remember(
            &mut status.seen_identity_keys,
            identity_kid,
            MAX_KEY_HISTORY,
        );
        let bound_ssh = keys::ssh_public_key(&bound.key);
        status.bound_public_key = Some(bound_ssh.clone());
        status.bound_instance_id = Some(instance_id.clone());

        let mut audit = Vec::new();
        let mut join = self.event(event::BOT_JOIN, true, delivery, now);
        join.instance_id = Some(instance_id.clone());
        let mut join = join.field("generation", generation);
        if let Some(ek) = &bound.ek {
            join = join.field("attested_ek_sha256", ek.ek_sha256.clone());
        }
        audit.push(join);
        if consumes_recovery {
            let mut ev = self.event(event::RECOVERY, true, delivery, now);
            ev.instance_id = Some(instance_id.clone());
            let ev = ev
                .field("recovery_count", status.recovery_count)
                .field("previous_instance_id", previous_instance_id)
                .field("registration", registration);
            audit.push(ev);
        }
        if rotated {
            let mut ev = self.event(event::ROTATION, true, delivery, now);
            ev.instance_id = Some(instance_id.clone());
            let ev = ev
                .field(
                    "old_public_key",
                    self.previous_key.as_ref().map(keys::ssh_public_key),
                )
                .field("new_public_key", bound_ssh.clone());
            audit.push(ev);
        }

        let cluster = self.authority.cluster().to_string();
        let join_state = JoinStateClaims {
            iss: cluster.clone(),
            aud: cluster,
            sub: self.token.spec.bot_name.clone(),
            iat: now,
            nbf: now,
            instance_id,
            recovery_sequence: status.recovery_count,
            recovery_limit: self.spec.recovery.limit,
            recovery_mode: self.spec.recovery.mode,
        };
        let issue = Issue {
            authority: &self.authority,
            entropy: &self.entropy,
            identity_key: &self.identity_key,
            ttl_secs: self.ttl_secs,
            remote_addr: &self.peer.remote_addr,
            bot_name: self.token.spec.bot_name.clone(),
            join_method: JoinMethod::BoundKeypair,
            join_token: self.token.name.clone(),
            recorded_join_token: self.token.name.clone(),
            instance,
            binding: Some(Binding {
                public_key: bound_ssh,
                join_state,
            }),
            token: Some(TokenWrite {
                name: self.token.name.clone(),
                expected_revision: self.token.revision,
                status,
            }),
            audit,
            lock_guard: Some(LockGuard {
                targets: self.lock_targets(),
                at: now,
            }),
        };
        match issue.issue(now) {
            Ok(success) => Step::Commit(success),
            Err(e) => internal(&e.to_string()),
        }
    }
}
