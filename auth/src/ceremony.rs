//! The bound-keypair join ceremony as a sans-I/O state machine.
//!
//! [`Ceremony::start`] takes the client's `Init`, the verified client identity (if the client
//! presented a certificate) and a snapshot of the stored state; [`Ceremony::handle`] takes each
//! further client message. Both return a [`Step`]: a message to send, a [`Success`] to commit,
//! or a [`Refusal`]. Nothing here touches a socket, a clock or a database; the caller passes
//! `now` at every step, which is also what makes challenge expiry testable.
//!
//! Order of decisions (each closes an attack, see `docs/protocol.md`):
//! 1. prove possession: the registration secret and/or a challenge signed by the bound key;
//! 2. only then check locks (lock status never leaks to anonymous callers) and refuse a locked
//!    client before anything could create a second lock;
//! 3. recovery limit;
//! 4. join-state verification (after the proof, so anonymous garbage never locks a token);
//! 5. renewal only: certificate instance id == bound instance id, then the generation counter;
//! 6. rotation, if due;
//! 7. one commit carrying every status change, compare-and-swap on the token revision read at 1.

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use boundkey_proto::claims::{
    ChallengeClaims, JoinStateClaims, RecoveryMode, CHALLENGE_NBF_SKEW_SECS, CHALLENGE_TTL_SECS,
};
use boundkey_proto::{
    jws, keys, Challenge, ClientMessage, ErrorCode, Init, JoinMethod, JoinResult, RotationReason,
    RotationRequest, ServerMessage, UnixTime,
};
use rand_core::{OsRng, RngCore};
use subtle::ConstantTimeEq;

use crate::admin::hash_secret;
use crate::authority::{Authority, IdentityClaims, VerifiedIdentity};
use crate::model::{
    event, AuditEvent, Authentication, BotInstance, BoundKeypairSpec, Lock, LockTarget, Token,
    INSTANCE_EXPIRY_GRACE_SECS,
};
use crate::outcome::{messages, Refusal, Step, Success};
use crate::store::{Commit, InstanceWrite, TokenWrite};
use crate::ServiceConfig;

/// What the driver read before the ceremony started. Reading early is harmless: the ceremony
/// decides in the safe order, and the final compare-and-swap catches anything that changed.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub token: Option<Token>,
    /// The instance named by the client certificate, if any.
    pub instance: Option<BotInstance>,
    /// The token's bound instance, if any (the same as `instance` on an ordinary renewal).
    pub bound_instance: Option<BotInstance>,
    /// Locks in force now.
    pub locks: Vec<Lock>,
}

/// Facts about the connection established by the transport.
#[derive(Debug, Clone)]
pub struct Peer {
    pub remote_addr: String,
    /// Identity from a client certificate that the authority verified; never from a message.
    pub identity: Option<VerifiedIdentity>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    /// A: no bound key, no certificate.
    FirstJoin,
    /// D: bound key and a valid certificate.
    Renewal,
    /// E: bound key, no certificate.
    Recovery,
}

impl Case {
    fn as_str(self) -> &'static str {
        match self {
            Case::FirstJoin => "first_join",
            Case::Renewal => "renewal",
            Case::Recovery => "recovery",
        }
    }
}

#[derive(Debug)]
enum Stage {
    AwaitRotation(RotationReason),
    AwaitSolution {
        key: p256::PublicKey,
        claims: ChallengeClaims,
        /// Proving the key that is (or is about to be) bound, versus a rotation's new key.
        replacement: bool,
    },
    Done,
}

/// One ceremony's in-memory state. Invariant: `stage` only moves forward, and every path out of
/// it ends in exactly one `Commit` or `Refuse` step.
#[derive(Debug)]
pub struct Ceremony {
    cfg: ServiceConfig,
    authority: Arc<Authority>,
    peer: Peer,
    token: Token,
    /// The token's bound-keypair spec (`start` refuses tokens without one).
    bk: BoundKeypairSpec,
    instance: Option<BotInstance>,
    bound_instance: Option<BotInstance>,
    locks: Vec<Lock>,
    case: Case,
    identity_key: p256::PublicKey,
    ttl_secs: u64,
    join_state: Option<String>,
    stage: Stage,
    /// The key that will be bound on success.
    bound_key: Option<p256::PublicKey>,
    /// The key bound before this ceremony (for rotation audit and reuse refusal).
    previous_key: Option<p256::PublicKey>,
    registration: bool,
    rotated: bool,
    checks_done: bool,
    verified_join_state: Option<JoinStateClaims>,
    /// The client signed a challenge with the identity key named in `init`.
    identity_proven: bool,
    /// This ceremony repeats one whose result the client lost (see `is_redelivery`).
    redelivery: bool,
}

impl Ceremony {
    /// Handles `Init`. Returns the ceremony (to feed further messages) and the first step.
    pub fn start(
        cfg: ServiceConfig,
        authority: Arc<Authority>,
        peer: Peer,
        snapshot: Snapshot,
        init: Init,
        now: UnixTime,
    ) -> (Option<Ceremony>, Step) {
        let base = || {
            let mut ev = AuditEvent::new(event::BOT_JOIN, now, false);
            ev.remote_addr = Some(peer.remote_addr.clone());
            ev.token_name = Some(init.token.clone());
            ev.instance_id = peer.identity.as_ref().map(|i| i.claims.instance_id.clone());
            ev.field("join_method", JoinMethod::BoundKeypair.as_str())
        };
        let deny = |code: ErrorCode, msg: &str, reason: &str| {
            let mut ev = base();
            ev.error = Some(reason.to_string());
            ev.bot_name = snapshot.token.as_ref().map(|t| t.spec.bot_name.clone());
            (None, refuse(vec![ev], None, code, msg, reason))
        };

        let Some(token) = snapshot.token.clone() else {
            return deny(
                ErrorCode::AccessDenied,
                messages::ACCESS_DENIED,
                "unknown token",
            );
        };
        let (JoinMethod::BoundKeypair, Some(bk)) =
            (token.spec.join_method, token.spec.bound_keypair.clone())
        else {
            return deny(
                ErrorCode::AccessDenied,
                messages::ACCESS_DENIED,
                "token is not a bound_keypair token",
            );
        };
        if token.is_expired(now) {
            return deny(
                ErrorCode::AccessDenied,
                messages::ACCESS_DENIED,
                "token expired",
            );
        }
        let Ok(identity_key) = keys::parse_pkix_b64(&init.params.identity_public_key) else {
            return deny(
                ErrorCode::BadRequest,
                "identity_public_key must be base64 PKIX DER of a P-256 key",
                "bad identity key",
            );
        };
        if let Some(id) = &peer.identity {
            if id.claims.join_method != JoinMethod::BoundKeypair
                || id.claims.join_token != token.name
                || id.claims.bot_name != token.spec.bot_name
            {
                return deny(
                    ErrorCode::AccessDenied,
                    messages::ACCESS_DENIED,
                    "client certificate was issued for another token or bot",
                );
            }
        }
        let bound = token.status.bound_public_key.is_some();
        let authn = peer.identity.is_some();
        let case = match (bound, authn) {
            (false, false) => Case::FirstJoin,
            // B: a client cannot switch join methods.
            (false, true) => {
                return deny(
                    ErrorCode::AccessDenied,
                    messages::ACCESS_DENIED,
                    "token has no bound key but the client presented a certificate",
                )
            }
            (true, _) if token.status.bound_instance_id.is_none() => {
                return deny(
                    ErrorCode::AccessDenied,
                    "bad stored state for this token; an administrator must recreate it",
                    "bound key without bound instance (case C)",
                )
            }
            (true, true) => Case::Renewal,
            (true, false) => Case::Recovery,
        };
        let previous_key = match token
            .status
            .bound_public_key
            .as_deref()
            .map(keys::parse_ssh_public_key)
        {
            None => None,
            Some(Ok(k)) => Some(k),
            Some(Err(_)) => {
                return deny(
                    ErrorCode::AccessDenied,
                    "bad stored state for this token; an administrator must recreate it",
                    "stored bound key unparseable",
                )
            }
        };
        let instance = match (&peer.identity, snapshot.instance) {
            (Some(id), Some(inst)) if inst.spec.instance_id == id.claims.instance_id => Some(inst),
            _ => None,
        };
        let bound_instance = snapshot.bound_instance.filter(|b| {
            token.status.bound_instance_id.as_deref() == Some(b.spec.instance_id.as_str())
        });
        let mut c = Ceremony {
            ttl_secs: cfg.clamp_ttl(init.params.ttl_secs),
            cfg,
            authority,
            peer,
            token,
            bk,
            instance,
            bound_instance,
            locks: snapshot.locks,
            case,
            identity_key,
            join_state: init.join_state,
            stage: Stage::Done,
            bound_key: None,
            previous_key,
            registration: false,
            rotated: false,
            checks_done: false,
            verified_join_state: None,
            identity_proven: false,
            redelivery: false,
        };
        let step = c.begin(init.registration_secret, now);
        (Some(c), step)
    }

    fn bk(&self) -> &BoundKeypairSpec {
        &self.bk
    }

    fn begin(&mut self, secret: Option<String>, now: UnixTime) -> Step {
        if let Some(k) = self.previous_key {
            return self.challenge(k, false, now);
        }
        // Case A: first join.
        let onboarding = self.bk().onboarding.clone();
        if let Some(initial) = onboarding.initial_public_key {
            return match keys::parse_ssh_public_key(&initial) {
                Ok(k) => self.challenge(k, false, now),
                Err(_) => self.deny(
                    ErrorCode::AccessDenied,
                    messages::ACCESS_DENIED,
                    "stored initial_public_key unparseable",
                    now,
                ),
            };
        }
        // Secret path: missing, late and wrong all get the same answer.
        let stored = self.token.status.registration_secret_hash.clone();
        let late = onboarding.must_register_before.is_some_and(|d| now >= d);
        let ok = match (&secret, &stored) {
            (Some(s), Some(h)) => bool::from(hash_secret(s).as_bytes().ct_eq(h.as_bytes())),
            _ => false,
        };
        if !ok || late {
            let reason = match (secret.is_some(), stored.is_some(), late) {
                (false, _, _) => "registration secret missing",
                (_, false, _) => "registration secret already used",
                (_, _, true) => "registration deadline (must_register_before) passed",
                _ => "wrong registration secret",
            };
            return self.deny(
                ErrorCode::AccessDenied,
                messages::ACCESS_DENIED,
                reason,
                now,
            );
        }
        self.registration = true;
        self.stage = Stage::AwaitRotation(RotationReason::Registration);
        Step::Send(ServerMessage::RotationRequest(RotationRequest {
            reason: RotationReason::Registration,
        }))
    }

    /// Feeds the next client message.
    pub fn handle(&mut self, msg: ClientMessage, now: UnixTime) -> Step {
        match (std::mem::replace(&mut self.stage, Stage::Done), msg) {
            (Stage::AwaitRotation(reason), ClientMessage::RotationResponse(r)) => {
                let Ok(new_key) = keys::parse_ssh_public_key(&r.public_key) else {
                    return self.deny(
                        ErrorCode::BadRequest,
                        "public_key must be an ecdsa-sha2-nistp256 SSH public key",
                        "rotation response key unparseable",
                        now,
                    );
                };
                let current = self.bound_key.or(self.previous_key);
                if current == Some(new_key) {
                    return self.deny(
                        ErrorCode::AccessDenied,
                        "the new key must differ from the current bound key",
                        "rotation reused the current key",
                        now,
                    );
                }
                let _ = reason;
                self.challenge(new_key, true, now)
            }
            (
                Stage::AwaitSolution {
                    key,
                    claims,
                    replacement,
                },
                ClientMessage::ChallengeSolution(s),
            ) => {
                if let Err(reason) = check_solution(&s.solution, &key, &claims, now) {
                    return self.deny(
                        ErrorCode::AccessDenied,
                        messages::ACCESS_DENIED,
                        &reason,
                        now,
                    );
                }
                if let Some(proof) = &s.identity_proof {
                    if let Err(reason) = check_solution(proof, &self.identity_key, &claims, now) {
                        let reason = format!("identity proof: {reason}");
                        let msg = messages::ACCESS_DENIED;
                        return self.deny(ErrorCode::AccessDenied, msg, &reason, now);
                    }
                    self.identity_proven = true;
                }
                self.proven(key, replacement, now)
            }
            (Stage::Done, _) => self.deny(
                ErrorCode::BadRequest,
                "the ceremony is over",
                "message after the ceremony ended",
                now,
            ),
            (stage, msg) => {
                let reason = format!(
                    "unexpected {} while waiting for {}",
                    msg_name(&msg),
                    stage_name(&stage)
                );
                self.deny(ErrorCode::BadRequest, "unexpected message", &reason, now)
            }
        }
    }

    fn challenge(&mut self, key: p256::PublicKey, replacement: bool, now: UnixTime) -> Step {
        let mut nonce = [0u8; 16];
        OsRng.fill_bytes(&mut nonce);
        let cluster = self.authority.cluster().to_string();
        let claims = ChallengeClaims {
            iss: cluster.clone(),
            aud: cluster,
            sub: keys::kid(&key),
            iat: now,
            nbf: now - CHALLENGE_NBF_SKEW_SECS,
            exp: now + CHALLENGE_TTL_SECS,
            nonce: URL_SAFE_NO_PAD.encode(nonce),
        };
        // A struct of strings and integers always serialises.
        let document = serde_json::to_string(&claims).unwrap_or_default();
        self.stage = Stage::AwaitSolution {
            key,
            claims,
            replacement,
        };
        Step::Send(ServerMessage::Challenge(Challenge {
            public_key: keys::ssh_public_key(&key),
            document,
        }))
    }

    fn proven(&mut self, key: p256::PublicKey, replacement: bool, now: UnixTime) -> Step {
        self.bound_key = Some(key);
        if replacement && !self.registration {
            self.rotated = true;
        } else if replacement && self.registration && self.token.rotation_due(now) {
            // A registration makes a fresh key, which satisfies a rotation due at the same time.
            self.rotated = true;
        }
        if !self.checks_done {
            self.checks_done = true;
            if let Some(step) = self.checks(now) {
                return step;
            }
        }
        if !self.rotated && self.token.rotation_due(now) {
            self.stage = Stage::AwaitRotation(RotationReason::RotationDue);
            return Step::Send(ServerMessage::RotationRequest(RotationRequest {
                reason: RotationReason::RotationDue,
            }));
        }
        self.finish(now)
    }

    /// Everything decided after the first proof of possession, in the documented order.
    fn checks(&mut self, now: UnixTime) -> Option<Step> {
        // Locks: before any state change or new lock, after the proof.
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
        if let Some(l) = self
            .locks
            .iter()
            .find(|l| l.is_active(now) && targets.contains(&l.target))
        {
            let reason = format!("locked by {} ({}: {})", l.name, l.target.kind(), l.message);
            return Some(self.deny(ErrorCode::Locked, messages::LOCKED, &reason, now));
        }

        self.redelivery = self.is_redelivery(now);

        let bk = self.bk().clone();
        let status = self.token.status.clone();
        if matches!(self.case, Case::FirstJoin | Case::Recovery)
            && !self.redelivery
            && bk.recovery.mode == RecoveryMode::Standard
            && status.recovery_count >= bk.recovery.limit
        {
            let reason = format!(
                "recovery limit reached ({} of {})",
                status.recovery_count, bk.recovery.limit
            );
            return Some(self.deny(
                ErrorCode::RecoveryLimitExceeded,
                messages::RECOVERY_LIMIT,
                &reason,
                now,
            ));
        }

        // A redelivered recovery checked its (one step old) join state in is_redelivery.
        let redelivered_recovery = self.redelivery && self.case == Case::Recovery;
        if matches!(self.case, Case::Renewal | Case::Recovery)
            && !redelivered_recovery
            && bk.recovery.mode != RecoveryMode::Insecure
            && status.recovery_count > 0
        {
            let Some(doc) = self.join_state.clone() else {
                return Some(self.deny(
                    ErrorCode::AccessDenied,
                    messages::ACCESS_DENIED,
                    "join state required but missing",
                    now,
                ));
            };
            match self.verify_join_state(&doc, now) {
                Ok(claims) => self.verified_join_state = Some(claims),
                Err(reason) => return Some(self.join_state_failure(&reason, now)),
            }
        }

        if self.case == Case::Renewal {
            let id = self.peer.identity.clone()?;
            if status.bound_instance_id.as_deref() != Some(id.claims.instance_id.as_str()) {
                return Some(self.deny(
                    ErrorCode::AccessDenied,
                    messages::ACCESS_DENIED,
                    "certificate instance is not the token's bound instance",
                    now,
                ));
            }
            let Some(inst) = &self.instance else {
                return Some(self.deny(
                    ErrorCode::AccessDenied,
                    messages::ACCESS_DENIED,
                    "bot instance no longer exists",
                    now,
                ));
            };
            if inst.status.generation != id.claims.generation && !self.redelivery {
                let reason = format!(
                    "generation mismatch: certificate has {}, instance has {}",
                    id.claims.generation, inst.status.generation
                );
                return Some(self.generation_failure(&reason, now));
            }
        }
        None
    }

    /// Whether this ceremony repeats one that committed but whose result the client never
    /// stored (power loss, dropped connection). It is, when all of these hold:
    /// * the client proved the bound key and, with `identity_proof`, the identity key it names;
    /// * that identity key is the one the bound instance's latest certificate was issued for,
    ///   and the instance shows no sign of that certificate being used since (no heartbeat);
    /// * what the client presents is exactly one step behind the stored state: on a renewal its
    ///   certificate is one generation old; on a recovery the bound instance is still at its
    ///   first generation and the join state names its predecessor with the previous recovery
    ///   sequence (or is absent after a lost first join).
    ///
    /// The identity key is made fresh by the device for each ceremony and never leaves it, so a
    /// copy of the device's state from before the lost ceremony cannot qualify; it is still
    /// refused and locked as a clone.
    fn is_redelivery(&self, now: UnixTime) -> bool {
        if !self.identity_proven {
            return false;
        }
        let Some(b) = &self.bound_instance else {
            return false;
        };
        let Some(latest) = b.status.latest_authentications.last() else {
            return false;
        };
        let used_since = b
            .status
            .latest_heartbeats
            .iter()
            .any(|h| h.recorded_at >= latest.authenticated_at);
        if latest.public_key != public_key_pem(&self.identity_key) || used_since {
            return false;
        }
        let count = self.token.status.recovery_count;
        match self.case {
            Case::Renewal => self.peer.identity.as_ref().is_some_and(|id| {
                id.claims.instance_id == b.spec.instance_id
                    && id.claims.generation + 1 == b.status.generation
            }),
            Case::Recovery if b.status.generation == 1 => {
                match (&self.join_state, self.bk().recovery.mode) {
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

    fn verify_join_state(&self, doc: &str, now: UnixTime) -> Result<JoinStateClaims, String> {
        let claims = self
            .authority
            .verify_join_state(doc, now)
            .map_err(|e| e.to_string())?;
        let st = &self.token.status;
        if claims.sub != self.token.spec.bot_name {
            return Err("join state names another bot".into());
        }
        if claims.recovery_sequence != st.recovery_count {
            return Err(format!(
                "join state recovery_sequence {} != recovery_count {} (an older copy of the device state)",
                claims.recovery_sequence, st.recovery_count
            ));
        }
        if st.bound_instance_id.as_deref() != Some(claims.instance_id.as_str()) {
            return Err("join state instance_id is not the bound instance".into());
        }
        Ok(claims)
    }

    fn base_event(&self, kind: &str, success: bool, now: UnixTime) -> AuditEvent {
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
        ev.field("join_method", JoinMethod::BoundKeypair.as_str())
            .field(
                "case",
                if self.redelivery {
                    "redelivery"
                } else {
                    self.case.as_str()
                },
            )
    }

    fn deny(&mut self, code: ErrorCode, msg: &str, reason: &str, now: UnixTime) -> Step {
        self.stage = Stage::Done;
        let mut ev = self.base_event(event::BOT_JOIN, false, now);
        ev.error = Some(reason.to_string());
        refuse(vec![ev], None, code, msg, reason)
    }

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

    fn join_state_failure(&mut self, reason: &str, now: UnixTime) -> Step {
        self.stage = Stage::Done;
        let lock = self.auto_lock(
            "join-state",
            format!("join state verification failed: {reason}"),
            now,
        );
        let mut ev = self.base_event(event::JOIN_STATE_VERIFICATION_FAILED, false, now);
        ev.error = Some(reason.to_string());
        let ev = ev.field("lock", lock.name.clone());
        let mut join = self.base_event(event::BOT_JOIN, false, now);
        join.error = Some(reason.to_string());
        refuse(
            vec![ev, join],
            Some(lock),
            ErrorCode::AccessDenied,
            messages::ACCESS_DENIED,
            reason,
        )
    }

    fn generation_failure(&mut self, reason: &str, now: UnixTime) -> Step {
        self.stage = Stage::Done;
        let lock = self.auto_lock("generation", reason.to_string(), now);
        let mut ev = self.base_event(event::GENERATION_MISMATCH, false, now);
        ev.error = Some(reason.to_string());
        let ev = ev.field("lock", lock.name.clone());
        let mut join = self.base_event(event::BOT_JOIN, false, now);
        join.error = Some(reason.to_string());
        refuse(
            vec![ev, join],
            Some(lock),
            ErrorCode::AccessDenied,
            messages::ACCESS_DENIED,
            reason,
        )
    }

    fn finish(&mut self, now: UnixTime) -> Step {
        self.stage = Stage::Done;
        let Some(bound_key) = self.bound_key else {
            return self.deny(
                ErrorCode::Internal,
                messages::INTERNAL,
                "finish without a proven key",
                now,
            );
        };
        let bk = self.bk().clone();
        let mut status = self.token.status.clone();
        let consumes_recovery =
            matches!(self.case, Case::FirstJoin | Case::Recovery) && !self.redelivery;
        // A redelivery continues the bound instance, like a renewal.
        let continued = match (self.case, self.redelivery) {
            (Case::Renewal, _) => self.instance.as_ref(),
            (_, true) => self.bound_instance.as_ref(),
            _ => None,
        };

        let (mut instance, write_base): (BotInstance, Option<u64>) = match (&self.case, continued) {
            (_, Some(inst)) => {
                let mut i = inst.clone();
                i.status.generation += 1;
                (i, Some(inst.revision))
            }
            (Case::Renewal, None) => {
                return self.deny(
                    ErrorCode::Internal,
                    messages::INTERNAL,
                    "renewal without instance",
                    now,
                )
            }
            _ => {
                let previous = match self.case {
                    Case::Recovery => self
                        .verified_join_state
                        .as_ref()
                        .map(|c| c.instance_id.clone()),
                    _ => None,
                };
                let inst = BotInstance::new(
                    &self.token.spec.bot_name,
                    JoinMethod::BoundKeypair,
                    &self.token.name,
                    previous,
                    now,
                );
                (inst, None)
            }
        };

        if consumes_recovery {
            status.recovery_count += 1;
            status.last_recovered_at = Some(now);
        }
        if self.registration {
            status.registration_secret_hash = None;
        }
        if self.rotated {
            status.last_rotated_at = Some(now);
        }
        let bound_ssh = keys::ssh_public_key(&bound_key);
        status.bound_public_key = Some(bound_ssh.clone());
        status.bound_instance_id = Some(instance.spec.instance_id.clone());

        let claims = IdentityClaims {
            cluster: self.authority.cluster().to_string(),
            bot_name: self.token.spec.bot_name.clone(),
            instance_id: instance.spec.instance_id.clone(),
            generation: instance.status.generation,
            join_method: JoinMethod::BoundKeypair,
            join_token: self.token.name.clone(),
        };
        let issued =
            match self
                .authority
                .issue_identity(&claims, &self.identity_key, self.ttl_secs, now)
            {
                Ok(i) => i,
                Err(e) => {
                    return self.deny(
                        ErrorCode::Internal,
                        messages::INTERNAL,
                        &format!("issuing identity: {e}"),
                        now,
                    )
                }
            };
        let join_state_claims = JoinStateClaims {
            iss: self.authority.cluster().to_string(),
            aud: self.authority.cluster().to_string(),
            sub: self.token.spec.bot_name.clone(),
            iat: now,
            nbf: now,
            instance_id: instance.spec.instance_id.clone(),
            recovery_sequence: status.recovery_count,
            recovery_limit: bk.recovery.limit,
            recovery_mode: bk.recovery.mode,
        };
        let join_state = match self.authority.sign_join_state(&join_state_claims) {
            Ok(j) => j,
            Err(e) => {
                return self.deny(
                    ErrorCode::Internal,
                    messages::INTERNAL,
                    &format!("signing join state: {e}"),
                    now,
                )
            }
        };

        instance.status.expires = issued.expires + INSTANCE_EXPIRY_GRACE_SECS;
        instance.record_authentication(Authentication {
            authenticated_at: now,
            join_method: JoinMethod::BoundKeypair,
            join_token: self.token.name.clone(),
            generation: instance.status.generation,
            public_key: public_key_pem(&self.identity_key),
            bound_public_key: Some(bound_ssh.clone()),
            remote_addr: self.peer.remote_addr.clone(),
        });

        let mut audit = Vec::new();
        let mut join = self.base_event(event::BOT_JOIN, true, now);
        join.instance_id = Some(instance.spec.instance_id.clone());
        audit.push(join.field("generation", instance.status.generation));
        if consumes_recovery {
            let mut ev = self.base_event(event::RECOVERY, true, now);
            ev.instance_id = Some(instance.spec.instance_id.clone());
            let ev = ev
                .field("recovery_count", status.recovery_count)
                .field(
                    "previous_instance_id",
                    instance.spec.previous_instance_id.clone(),
                )
                .field("registration", self.registration);
            audit.push(ev);
        }
        if self.rotated {
            let mut ev = self.base_event(event::ROTATION, true, now);
            ev.instance_id = Some(instance.spec.instance_id.clone());
            let ev = ev
                .field(
                    "old_public_key",
                    self.previous_key.as_ref().map(keys::ssh_public_key),
                )
                .field("new_public_key", bound_ssh.clone());
            audit.push(ev);
        }

        let reply = ServerMessage::Result(JoinResult {
            bot_name: self.token.spec.bot_name.clone(),
            instance_id: instance.spec.instance_id.clone(),
            generation: instance.status.generation,
            join_method: JoinMethod::BoundKeypair,
            certificate: issued.certificate_pem,
            ca_bundle: self.authority.identity_ca_bundle(now),
            not_before: issued.not_before,
            expires: issued.expires,
            join_state: Some(join_state),
            bound_public_key: Some(bound_ssh),
        });
        let instance_write = match write_base {
            Some(rev) => InstanceWrite::Update {
                instance,
                expected_revision: rev,
            },
            None => InstanceWrite::Create(instance),
        };
        Step::Commit(Box::new(Success {
            commit: Commit {
                token: Some(TokenWrite {
                    name: self.token.name.clone(),
                    expected_revision: self.token.revision,
                    status,
                }),
                instance: instance_write,
                audit,
            },
            reply,
        }))
    }

    /// The connection ended or timed out mid-ceremony: the audit record for it.
    pub fn abort_event(&self, reason: &str, now: UnixTime) -> Option<AuditEvent> {
        if matches!(self.stage, Stage::Done) {
            return None;
        }
        let mut ev = self.base_event(event::BOT_JOIN, false, now);
        ev.error = Some(reason.to_string());
        Some(ev)
    }

    /// Config the ceremony was started with (for the driver's logs).
    pub fn config(&self) -> &ServiceConfig {
        &self.cfg
    }
}

fn refuse(
    audit: Vec<AuditEvent>,
    lock: Option<Lock>,
    code: ErrorCode,
    msg: &str,
    reason: &str,
) -> Step {
    Step::Refuse(Box::new(Refusal {
        lock,
        audit,
        reply: ServerMessage::error(code, msg),
        reason: reason.to_string(),
    }))
}

/// Verifies a challenge solution: ES256 by exactly `key`, claims equal to what was issued
/// (nonce compared in constant time), and inside the validity window.
fn check_solution(
    solution: &str,
    key: &p256::PublicKey,
    issued: &ChallengeClaims,
    now: UnixTime,
) -> Result<(), String> {
    let (_, payload) =
        jws::verify(solution, key).map_err(|e| format!("challenge solution: {e}"))?;
    let got: ChallengeClaims =
        serde_json::from_slice(&payload).map_err(|e| format!("challenge solution payload: {e}"))?;
    let same = got.iss == issued.iss
        && got.aud == issued.aud
        && got.sub == issued.sub
        && got.iat == issued.iat
        && got.nbf == issued.nbf
        && got.exp == issued.exp;
    let nonce_ok: bool = got.nonce.as_bytes().ct_eq(issued.nonce.as_bytes()).into();
    if !(same && nonce_ok) {
        return Err("challenge solution claims differ from the issued challenge".into());
    }
    if now > issued.exp {
        return Err(format!("challenge expired {}s ago", now - issued.exp));
    }
    if now < issued.nbf {
        return Err("challenge not yet valid".into());
    }
    Ok(())
}

/// PEM of an identity public key (PKIX), as recorded in authentications.
pub(crate) fn public_key_pem(key: &p256::PublicKey) -> String {
    use p256::pkcs8::{EncodePublicKey, LineEnding};
    key.to_public_key_pem(LineEnding::LF).unwrap_or_default()
}

fn msg_name(m: &ClientMessage) -> &'static str {
    match m {
        ClientMessage::Init(_) => "init",
        ClientMessage::RotationResponse(_) => "rotation_response",
        ClientMessage::ChallengeSolution(_) => "challenge_solution",
        ClientMessage::TokenJoin(_) => "token_join",
        ClientMessage::Heartbeat(_) => "heartbeat",
    }
}

fn stage_name(s: &Stage) -> &'static str {
    match s {
        Stage::AwaitRotation(_) => "rotation_response",
        Stage::AwaitSolution { .. } => "challenge_solution",
        Stage::Done => "nothing",
    }
}
