//! The `token` join method: a shared secret (the token itself, stored only as a hash) allows
//! `max_joins` joins before it expires; each join creates a bot instance. Renewals use the
//! instance's certificate and are guarded by the generation counter, whose mismatch locks the
//! instance (two copies of one identity exist).

use boundkey_proto::{keys, ErrorCode, JoinMethod, JoinResult, ServerMessage, TokenJoin, UnixTime};

use crate::authority::{Authority, IdentityClaims};
use crate::ceremony::{public_key_pem, Peer, Snapshot};
use crate::model::{
    event, mask_token, AuditEvent, Authentication, BotInstance, Lock, LockTarget,
    INSTANCE_EXPIRY_GRACE_SECS,
};
use crate::outcome::{messages, Refusal, Step, Success};
use crate::store::{Commit, InstanceWrite, TokenWrite};
use crate::ServiceConfig;

fn refuse(ev: AuditEvent, lock: Option<Lock>, code: ErrorCode, msg: &str, reason: &str) -> Step {
    let mut ev = ev;
    ev.error = Some(reason.to_string());
    let mut audit = vec![ev];
    if let Some(l) = &lock {
        let mut g = audit[0].clone();
        g.kind = event::GENERATION_MISMATCH.into();
        audit.insert(0, g.field("lock", l.name.clone()));
    }
    Step::Refuse(Box::new(Refusal {
        lock,
        audit,
        reply: ServerMessage::error(code, msg),
        reason: reason.to_string(),
    }))
}

/// Decides a `token_join` message. One round: the result is a commit or a refusal.
/// The driver looks the token up by `hash_secret(token)` into `snapshot.token`.
pub fn decide(
    cfg: &ServiceConfig,
    authority: &Authority,
    peer: &Peer,
    snapshot: Snapshot,
    msg: TokenJoin,
    now: UnixTime,
) -> Step {
    let mut ev = AuditEvent::new(event::BOT_JOIN, now, false).field("join_method", "token");
    ev.remote_addr = Some(peer.remote_addr.clone());
    let Ok(identity_key) = keys::parse_pkix_b64(&msg.params.identity_public_key) else {
        return refuse(
            ev,
            None,
            ErrorCode::BadRequest,
            "identity_public_key must be base64 PKIX DER of a P-256 key",
            "bad identity key",
        );
    };
    let ttl = cfg.clamp_ttl(msg.params.ttl_secs);
    let active = |targets: &[LockTarget]| {
        snapshot
            .locks
            .iter()
            .find(|l| l.is_active(now) && targets.contains(&l.target))
            .cloned()
    };

    let (instance, base_rev, token_write) = if let Some(id) = &peer.identity {
        // Renewal with the instance's certificate.
        ev.instance_id = Some(id.claims.instance_id.clone());
        ev.bot_name = Some(id.claims.bot_name.clone());
        ev.token_name = Some(mask_token(&id.claims.join_token));
        if id.claims.join_method != JoinMethod::Token {
            return refuse(
                ev,
                None,
                ErrorCode::AccessDenied,
                messages::ACCESS_DENIED,
                "bound_keypair certificate used for a token renewal",
            );
        }
        if msg.token.is_some() {
            return refuse(
                ev,
                None,
                ErrorCode::BadRequest,
                "a renewal must not carry a token",
                "token sent with a certificate",
            );
        }
        if let Some(l) = active(&[
            LockTarget::Bot(id.claims.bot_name.clone()),
            LockTarget::BotInstanceId(id.claims.instance_id.clone()),
            LockTarget::JoinToken(id.claims.join_token.clone()),
        ]) {
            return refuse(
                ev,
                None,
                ErrorCode::Locked,
                messages::LOCKED,
                &format!("locked by {}", l.name),
            );
        }
        let Some(inst) = snapshot
            .instance
            .filter(|i| i.spec.instance_id == id.claims.instance_id)
        else {
            return refuse(
                ev,
                None,
                ErrorCode::AccessDenied,
                messages::ACCESS_DENIED,
                "bot instance no longer exists",
            );
        };
        if inst.status.generation != id.claims.generation {
            let reason = format!(
                "generation mismatch: certificate has {}, instance has {}",
                id.claims.generation, inst.status.generation
            );
            let lock = Lock {
                name: format!("auto-generation-{}", inst.spec.instance_id),
                target: LockTarget::BotInstanceId(inst.spec.instance_id.clone()),
                message: reason.clone(),
                expires: None,
                created_by: "boundkey-auth (generation)".into(),
                created_at: now,
            };
            return refuse(
                ev,
                Some(lock),
                ErrorCode::AccessDenied,
                messages::ACCESS_DENIED,
                &reason,
            );
        }
        let rev = inst.revision;
        let mut inst = inst;
        inst.status.generation += 1;
        (inst, Some(rev), None)
    } else {
        let Some(_) = msg.token else {
            return refuse(
                ev,
                None,
                ErrorCode::AccessDenied,
                messages::ACCESS_DENIED,
                "no token and no client certificate",
            );
        };
        let Some(token) = snapshot.token else {
            return refuse(
                ev,
                None,
                ErrorCode::AccessDenied,
                messages::ACCESS_DENIED,
                "unknown token",
            );
        };
        ev.token_name = Some(mask_token(&token.name));
        ev.bot_name = Some(token.spec.bot_name.clone());
        if token.spec.join_method != JoinMethod::Token {
            return refuse(
                ev,
                None,
                ErrorCode::AccessDenied,
                messages::ACCESS_DENIED,
                "not a token-method token",
            );
        }
        if token.is_expired(now) {
            return refuse(
                ev,
                None,
                ErrorCode::AccessDenied,
                messages::ACCESS_DENIED,
                "token expired",
            );
        }
        let max = token.spec.max_joins.unwrap_or(1);
        if token.status.join_count >= max {
            return refuse(
                ev,
                None,
                ErrorCode::AccessDenied,
                messages::ACCESS_DENIED,
                &format!("token used up ({max} joins)"),
            );
        }
        if let Some(l) = active(&[
            LockTarget::Bot(token.spec.bot_name.clone()),
            LockTarget::JoinToken(token.name.clone()),
        ]) {
            return refuse(
                ev,
                None,
                ErrorCode::Locked,
                messages::LOCKED,
                &format!("locked by {}", l.name),
            );
        }
        let mut status = token.status.clone();
        status.join_count += 1;
        let inst = BotInstance::new(
            &token.spec.bot_name,
            JoinMethod::Token,
            &token.name,
            None,
            now,
        );
        let tw = TokenWrite {
            name: token.name.clone(),
            expected_revision: token.revision,
            status,
        };
        (inst, None, Some(tw))
    };

    let mut instance = instance;
    let claims = IdentityClaims {
        cluster: authority.cluster().to_string(),
        bot_name: instance.spec.bot_name.clone(),
        instance_id: instance.spec.instance_id.clone(),
        generation: instance.status.generation,
        join_method: JoinMethod::Token,
        join_token: instance.spec.join_token.clone(),
    };
    let issued = match authority.issue_identity(&claims, &identity_key, ttl, now) {
        Ok(i) => i,
        Err(e) => {
            return refuse(
                ev,
                None,
                ErrorCode::Internal,
                messages::INTERNAL,
                &format!("issuing identity: {e}"),
            )
        }
    };
    instance.status.expires = issued.expires + INSTANCE_EXPIRY_GRACE_SECS;
    instance.record_authentication(Authentication {
        authenticated_at: now,
        join_method: JoinMethod::Token,
        join_token: mask_token(&instance.spec.join_token),
        generation: instance.status.generation,
        public_key: public_key_pem(&identity_key),
        bound_public_key: None,
        remote_addr: peer.remote_addr.clone(),
    });
    ev.success = true;
    ev.instance_id = Some(instance.spec.instance_id.clone());
    let ev = ev.field("generation", instance.status.generation);
    let reply = ServerMessage::Result(JoinResult {
        bot_name: instance.spec.bot_name.clone(),
        instance_id: instance.spec.instance_id.clone(),
        generation: instance.status.generation,
        join_method: JoinMethod::Token,
        certificate: issued.certificate_pem,
        ca_bundle: authority.identity_ca_bundle(now),
        not_before: issued.not_before,
        expires: issued.expires,
        join_state: None,
        bound_public_key: None,
    });
    let instance = match base_rev {
        Some(rev) => InstanceWrite::Update {
            instance,
            expected_revision: rev,
        },
        None => InstanceWrite::Create(instance),
    };
    Step::Commit(Box::new(Success {
        commit: Commit {
            token: token_write,
            instance,
            audit: vec![ev],
        },
        reply,
    }))
}
