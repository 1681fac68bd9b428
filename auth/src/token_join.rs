//! The `token` join method: a shared secret (the token itself, stored only as a hash) allows
//! `max_joins` joins before it expires; each join creates a bot instance. Renewals use the
//! instance's certificate and are guarded by the generation counter, whose mismatch locks the
//! instance (two copies of one identity exist).
//!
//! [`decide`] reads top to bottom: `authenticate`, `check_locks`, `next_generation`, then the
//! identity-issuing path shared with the bound-keypair ceremony ([`crate::issue`]).

use boundkey_proto::{keys, ErrorCode, JoinMethod, ServerMessage, TokenJoin, UnixTime};

use crate::authority::{Authority, VerifiedIdentity};
use crate::entropy::Entropy;
use crate::input::{Peer, Snapshot};
use crate::issue::Issue;
use crate::model::{event, AuditEvent, BotInstance, Lock, LockTarget, Token};
use crate::outcome::{messages, Refusal, RefusalClass, Step};
use crate::store::{InstanceWrite, LockGuard, TokenWrite};
use crate::ServiceConfig;

/// A refusal before it is turned into audit records: code and generic message for the client,
/// the detailed reason for the logs, and a lock when the refusal is evidence of a copy.
struct Denial {
    code: ErrorCode,
    message: &'static str,
    reason: String,
    lock: Option<Box<Lock>>,
}

impl Denial {
    fn new(code: ErrorCode, message: &'static str, reason: impl Into<String>) -> Self {
        Denial {
            code,
            message,
            reason: reason.into(),
            lock: None,
        }
    }

    fn access(reason: impl Into<String>) -> Self {
        Denial::new(ErrorCode::AccessDenied, messages::ACCESS_DENIED, reason)
    }
}

fn refuse(mut ev: AuditEvent, d: Denial, class: RefusalClass) -> Step {
    ev.error = Some(d.reason.clone());
    let mut audit = vec![ev];
    if let Some(l) = &d.lock {
        let mut g = audit[0].clone();
        g.kind = event::GENERATION_MISMATCH.into();
        audit.insert(0, g.field("lock", l.name.clone()));
    }
    Step::Refuse(Box::new(Refusal {
        lock: d.lock.map(|l| *l),
        audit,
        reply: ServerMessage::error(d.code, d.message),
        reason: d.reason,
        class,
    }))
}

/// Who is joining, once the message and the stored token agree.
enum Admission<'a> {
    /// Renewal with the instance's certificate.
    Renewal(&'a VerifiedIdentity),
    /// A new instance on a token-method token with joins left.
    NewInstance(Box<Token>),
}

/// The instance the certificate will name, and the token write that goes with it.
struct Subject {
    instance: InstanceWrite,
    token: Option<TokenWrite>,
}

/// Decides a `token_join` message. One round: the result is a commit or a refusal.
/// The driver looks the token up by `hash_secret(token)` into `snapshot.token`.
pub fn decide(
    cfg: &ServiceConfig,
    authority: &Authority,
    entropy: &Entropy,
    peer: &Peer,
    snapshot: Snapshot,
    msg: TokenJoin,
    now: UnixTime,
) -> Step {
    // Collects what is known about the caller as it is learnt, for the refusal record.
    let mut ev = AuditEvent::new(event::BOT_JOIN, now, false).field("join_method", "token");
    ev.remote_addr = Some(peer.remote_addr.clone());
    // Until the certificate or the token is accepted, the caller has proven nothing.
    let mut class = RefusalClass::Anonymous;
    let decided = parse_identity_key(&msg).and_then(|identity_key| {
        let admission = authenticate(peer, msg.token.is_some(), snapshot.token, &mut ev, now)?;
        class = RefusalClass::Authenticated;
        let targets = lock_targets(&admission);
        check_locks(&targets, &snapshot.locks, now)?;
        let subject = next_generation(admission, snapshot.instance, entropy, now)?;
        let inst = match &subject.instance {
            InstanceWrite::Create(i) | InstanceWrite::Update { instance: i, .. } => i,
        };
        let mut done = ev.clone();
        done.success = true;
        done.instance_id = Some(inst.spec.instance_id.clone());
        let done = done.field("generation", inst.status.generation);
        Issue {
            authority,
            entropy,
            identity_key: &identity_key,
            ttl_secs: cfg.clamp_ttl(msg.params.ttl_secs),
            remote_addr: &peer.remote_addr,
            bot_name: inst.spec.bot_name.clone(),
            join_method: JoinMethod::Token,
            join_token: inst.spec.join_token.clone(),
            recorded_join_token: JoinMethod::Token.displayed_token(&inst.spec.join_token),
            instance: subject.instance,
            binding: None,
            token: subject.token,
            audit: vec![done],
            lock_guard: Some(LockGuard { targets, at: now }),
        }
        .issue(now)
        .map_err(|e| Denial::new(ErrorCode::Internal, messages::INTERNAL, e.to_string()))
    });
    match decided {
        Ok(success) => Step::Commit(success),
        Err(d) => refuse(ev, d, class),
    }
}

fn parse_identity_key(msg: &TokenJoin) -> Result<p256::PublicKey, Denial> {
    keys::parse_pkix_b64(&msg.params.identity_public_key).map_err(|_| {
        Denial::new(
            ErrorCode::BadRequest,
            "identity_public_key must be base64 PKIX DER of a P-256 key",
            "bad identity key",
        )
    })
}

/// Step 1: the certificate (renewal) or the token (new instance) must name a usable
/// token-method identity.
fn authenticate<'a>(
    peer: &'a Peer,
    sent_token: bool,
    token: Option<Token>,
    ev: &mut AuditEvent,
    now: UnixTime,
) -> Result<Admission<'a>, Denial> {
    if let Some(id) = &peer.identity {
        ev.instance_id = Some(id.claims.instance_id.clone());
        ev.bot_name = Some(id.claims.bot_name.clone());
        ev.token_name = Some(JoinMethod::Token.displayed_token(&id.claims.join_token));
        if id.claims.join_method != JoinMethod::Token {
            return Err(Denial::access(
                "bound_keypair certificate used for a token renewal",
            ));
        }
        if sent_token {
            return Err(Denial::new(
                ErrorCode::BadRequest,
                "a renewal must not carry a token",
                "token sent with a certificate",
            ));
        }
        return Ok(Admission::Renewal(id));
    }
    if !sent_token {
        return Err(Denial::access("no token and no client certificate"));
    }
    let Some(token) = token else {
        return Err(Denial::access("unknown token"));
    };
    ev.token_name = Some(JoinMethod::Token.displayed_token(&token.name));
    ev.bot_name = Some(token.spec.bot_name.clone());
    if token.spec.join_method != JoinMethod::Token {
        return Err(Denial::access("not a token-method token"));
    }
    if token.is_expired(now) {
        return Err(Denial::access("token expired"));
    }
    let max = token.spec.max_joins.unwrap_or(1);
    if token.status.join_count >= max {
        return Err(Denial::access(format!("token used up ({max} joins)")));
    }
    Ok(Admission::NewInstance(Box::new(token)))
}

/// What must stay unlocked: the bot, the token and (on renewal) the instance.
fn lock_targets(admission: &Admission<'_>) -> Vec<LockTarget> {
    match admission {
        Admission::Renewal(id) => vec![
            LockTarget::Bot(id.claims.bot_name.clone()),
            LockTarget::BotInstanceId(id.claims.instance_id.clone()),
            LockTarget::JoinToken(id.claims.join_token.clone()),
        ],
        Admission::NewInstance(token) => vec![
            LockTarget::Bot(token.spec.bot_name.clone()),
            LockTarget::JoinToken(token.name.clone()),
        ],
    }
}

/// Step 2: no lock on any of the targets.
fn check_locks(targets: &[LockTarget], locks: &[Lock], now: UnixTime) -> Result<(), Denial> {
    match locks
        .iter()
        .find(|l| l.is_active(now) && targets.contains(&l.target))
    {
        Some(l) => Err(Denial::new(
            ErrorCode::Locked,
            messages::LOCKED,
            format!("locked by {}", l.name),
        )),
        None => Ok(()),
    }
}

/// Step 3: the instance at its next generation. A renewal must present the generation the
/// instance is at; anything else means two copies of the identity exist, and locks it.
fn next_generation(
    admission: Admission<'_>,
    stored: Option<BotInstance>,
    entropy: &Entropy,
    now: UnixTime,
) -> Result<Subject, Denial> {
    match admission {
        Admission::Renewal(id) => {
            let Some(mut inst) = stored.filter(|i| i.spec.instance_id == id.claims.instance_id)
            else {
                return Err(Denial::access("bot instance no longer exists"));
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
                let mut d = Denial::access(reason);
                d.lock = Some(Box::new(lock));
                return Err(d);
            }
            let expected_revision = inst.revision;
            inst.status.generation += 1;
            Ok(Subject {
                instance: InstanceWrite::Update {
                    instance: inst,
                    expected_revision,
                },
                token: None,
            })
        }
        Admission::NewInstance(token) => {
            let mut status = token.status.clone();
            status.join_count += 1;
            let inst = BotInstance::new_with_id(
                entropy.instance_id(),
                &token.spec.bot_name,
                JoinMethod::Token,
                &token.name,
                None,
                now,
            );
            Ok(Subject {
                instance: InstanceWrite::Create(inst),
                token: Some(TokenWrite {
                    name: token.name,
                    expected_revision: token.revision,
                    status,
                }),
            })
        }
    }
}
