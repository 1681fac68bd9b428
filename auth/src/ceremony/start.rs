//! Accepting `Init`: which token, which kind of ceremony, and whether the stored state allows
//! one at all. Nothing here is a proof; every refusal is the same generic answer.

use std::sync::Arc;

use boundkey_proto::{keys, CeremonyKind, ErrorCode, Init, JoinMethod, UnixTime};

use crate::authority::Authority;
use crate::entropy::Entropy;
use crate::model::{event, AuditEvent};
use crate::outcome::{messages, Refusal, RefusalClass};
use crate::ServiceConfig;

use super::context::{refuse, Context};
use super::{Peer, Snapshot};

/// Validates `Init` into the ceremony's [`Context`]; also returns the registration secret the
/// client sent (used once, by the first state). Refusals here precede any proof, so their
/// audit records carry only what the client claimed.
pub(super) fn accept(
    cfg: ServiceConfig,
    authority: Arc<Authority>,
    entropy: Entropy,
    peer: Peer,
    snapshot: Snapshot,
    init: Init,
    now: UnixTime,
) -> Result<(Context, Option<String>), Box<Refusal>> {
    // The token name is the client's word: only a well-formed one reaches the audit log.
    let well_formed = is_token_name(&init.token);
    let deny = |code: ErrorCode, msg: &str, reason: &str| {
        let mut ev = AuditEvent::new(event::BOT_JOIN, now, false);
        ev.remote_addr = Some(peer.remote_addr.clone());
        ev.token_name = well_formed.then(|| init.token.clone());
        ev.instance_id = peer.identity.as_ref().map(|i| i.claims.instance_id.clone());
        let mut ev = ev.field("join_method", JoinMethod::BoundKeypair.as_str());
        ev.error = Some(reason.to_string());
        ev.bot_name = snapshot.token.as_ref().map(|t| t.spec.bot_name.clone());
        // Nothing is proven before a challenge is solved (a verified certificate alone is not
        // the bound key), so every refusal here counts against the anonymous budget.
        refuse(vec![ev], None, code, msg, reason).class(RefusalClass::Anonymous)
    };
    let denied = |reason: &str| deny(ErrorCode::AccessDenied, messages::ACCESS_DENIED, reason);

    if !well_formed {
        return Err(deny(
            ErrorCode::BadRequest,
            "token must be 1-64 characters from [A-Za-z0-9._-]",
            "malformed token name",
        ));
    }
    let Some(token) = snapshot.token.clone() else {
        return Err(denied("unknown token"));
    };
    let (JoinMethod::BoundKeypair, Some(spec)) =
        (token.spec.join_method, token.spec.bound_keypair.clone())
    else {
        return Err(denied("token is not a bound_keypair token"));
    };
    if token.is_expired(now) {
        return Err(denied("token expired"));
    }
    let Ok(identity_key) = keys::parse_pkix_b64(&init.params.identity_public_key) else {
        return Err(deny(
            ErrorCode::BadRequest,
            "identity_public_key must be base64 PKIX DER of a P-256 key",
            "bad identity key",
        ));
    };
    if let Some(id) = &peer.identity {
        if id.claims.join_method != JoinMethod::BoundKeypair
            || id.claims.join_token != token.name
            || id.claims.bot_name != token.spec.bot_name
        {
            return Err(denied(
                "client certificate was issued for another token or bot",
            ));
        }
    }
    let bound = token.status.bound_public_key.is_some();
    let kind =
        match (bound, peer.identity.is_some()) {
            (false, false) => CeremonyKind::FirstJoin,
            // B: a client cannot switch join methods.
            (false, true) => {
                return Err(denied(
                    "token has no bound key but the client presented a certificate",
                ))
            }
            // Case C. The caller has proven nothing yet, so it hears what any refused caller
            // hears; the stored-state problem goes to the audit log for the operator.
            (true, _) if token.status.bound_instance_id.is_none() => return Err(denied(
                "bad stored state: bound key without bound instance (case C); recreate the token",
            )),
            (true, true) => CeremonyKind::Renewal,
            (true, false) => CeremonyKind::Recovery,
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
            return Err(denied(
                "bad stored state: stored bound key unparseable; recreate the token",
            ))
        }
    };
    let instance = match (&peer.identity, snapshot.instance) {
        (Some(id), Some(inst)) if inst.spec.instance_id == id.claims.instance_id => Some(inst),
        _ => None,
    };
    let bound_instance = snapshot
        .bound_instance
        .filter(|b| token.status.bound_instance_id.as_deref() == Some(b.spec.instance_id.as_str()));
    let ctx = Context {
        ttl_secs: cfg.clamp_ttl(init.params.ttl_secs),
        cfg,
        authority,
        entropy,
        peer,
        token,
        spec,
        kind,
        identity_key,
        join_state: init.join_state,
        instance,
        bound_instance,
        locks: snapshot.locks,
        previous_key,
    };
    Ok((ctx, init.registration_secret))
}

/// Whether a client-sent token name has the shape of one the service can hold (the rule of
/// `admin::validate_name`): checked before the name is looked up or written anywhere.
pub(crate) fn is_token_name(name: &str) -> bool {
    crate::admin::validate_name(name).is_ok()
}
