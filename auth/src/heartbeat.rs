//! Heartbeats: facts an agent reports over its authenticated connection. They are recorded on
//! the caller's own instance (named by its verified certificate, never by the message) and are
//! never used for a decision.

use boundkey_proto::{ErrorCode, Heartbeat, ServerMessage, UnixTime};

use crate::input::{Peer, Snapshot};
use crate::model::{clean_text, event, AuditEvent, BotInstance, HeartbeatRecord, LockTarget};
use crate::outcome::{messages, Refusal, RefusalClass};

/// Longest string accepted in any heartbeat field; longer values are truncated, not refused.
pub const MAX_FIELD_LEN: usize = 256;

/// Heartbeat strings are the agent's word only: clipped, and control characters replaced, so
/// they cannot forge lines where operators read them.
fn clip(s: &mut String) {
    *s = clean_text(s, MAX_FIELD_LEN);
}

/// Returns the instance with the heartbeat recorded, for the driver to write with a CAS.
pub fn decide(
    peer: &Peer,
    snapshot: Snapshot,
    mut hb: Heartbeat,
    now: UnixTime,
) -> Result<BotInstance, Box<Refusal>> {
    let deny = |code: ErrorCode, msg: &str, reason: &str| {
        let mut ev = AuditEvent::new(event::HEARTBEAT, now, false);
        ev.remote_addr = Some(peer.remote_addr.clone());
        ev.instance_id = peer.identity.as_ref().map(|i| i.claims.instance_id.clone());
        ev.error = Some(reason.into());
        Box::new(Refusal {
            lock: None,
            audit: vec![ev],
            reply: ServerMessage::error(code, msg),
            reason: reason.into(),
            class: if peer.identity.is_some() {
                RefusalClass::Authenticated
            } else {
                RefusalClass::Anonymous
            },
        })
    };
    let Some(id) = &peer.identity else {
        return Err(deny(
            ErrorCode::AccessDenied,
            "heartbeats need a client certificate",
            "heartbeat without certificate",
        ));
    };
    let targets = [
        LockTarget::Bot(id.claims.bot_name.clone()),
        LockTarget::BotInstanceId(id.claims.instance_id.clone()),
        LockTarget::JoinToken(id.claims.join_token.clone()),
    ];
    if snapshot
        .locks
        .iter()
        .any(|l| l.is_active(now) && targets.contains(&l.target))
    {
        return Err(deny(ErrorCode::Locked, messages::LOCKED, "locked"));
    }
    let Some(mut inst) = snapshot
        .instance
        .filter(|i| i.spec.instance_id == id.claims.instance_id)
    else {
        return Err(deny(
            ErrorCode::AccessDenied,
            messages::ACCESS_DENIED,
            "bot instance no longer exists",
        ));
    };
    for f in [&mut hb.version, &mut hb.hostname, &mut hb.os, &mut hb.arch] {
        clip(f);
    }
    inst.record_heartbeat(HeartbeatRecord {
        recorded_at: now,
        remote_addr: peer.remote_addr.clone(),
        heartbeat: hb,
    });
    Ok(inst)
}
