//! A transport-agnostic driver: loads what a decision needs from the [`Store`], runs the pure
//! logic ([`Ceremony`], [`token_join`], [`heartbeat`]) and applies the outcome. An auth service
//! wraps its network loop around [`Service::open`] and [`Session::handle`]; both are synchronous
//! and may block on the store.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use boundkey_proto::{ClientMessage, ErrorCode, HeartbeatAck, ServerMessage, UnixTime};
use rustls_pki_types::CertificateDer;

use crate::admin::hash_secret;
use crate::authority::Authority;
use crate::ceremony::Ceremony;
use crate::entropy::Entropy;
use crate::input::{Peer, Snapshot};
use crate::model::{event, AuditEvent, Lock, LockTarget, Token};
use crate::outcome::{messages, Refusal, RefusalClass, Step};
use crate::store::{Store, StoreError};
use crate::throttle::{address_key, Admission, Throttle};
use crate::{heartbeat, token_join, ServiceConfig};

/// Audit retention is applied at most this often (on the next audit write).
pub const AUDIT_PURGE_EVERY_SECS: i64 = 3600;

/// Deterministic names tried for an automatic lock before a unique one is made up.
const LOCK_NAME_TRIES: usize = 4;

/// Said to a client whose token or instance was deleted while its ceremony ran (it proved its
/// key; retrying cannot help).
const DELETED_MID_CEREMONY: &str =
    "the join token or bot instance was deleted during the ceremony; contact an administrator";

/// What the transport knows about a connection.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    pub remote_addr: String,
    /// The client's certificate chain, leaf first; empty when it presented none.
    pub peer_certificates: Vec<CertificateDer<'static>>,
}

/// What the transport should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send, then read the next client message.
    Reply(ServerMessage),
    /// Send, then close the connection.
    Close(ServerMessage),
}

struct Inner {
    store: Arc<dyn Store>,
    authority: RwLock<Arc<Authority>>,
    cfg: ServiceConfig,
    entropy: Entropy,
    /// Wrong registration secrets, per token name.
    secret_per_token: Throttle,
    /// Wrong registration secrets, per caller address.
    secret_per_address: Throttle,
    /// Audit events of callers that proved nothing, per address.
    anonymous_audit: Throttle,
    /// When audit retention last ran.
    last_audit_purge: AtomicI64,
    /// Heartbeat writes, grouped into one store transaction while another is in progress.
    heartbeats: heartbeat::GroupWriter,
}

/// Shared, cheap to clone.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

/// One connection's ceremony. Invariant: once it has returned [`Action::Close`], every further
/// call returns `Close` again without touching the store.
pub struct Session {
    svc: Service,
    ceremony: Option<Ceremony>,
    closed: bool,
    remote_addr: String,
}

impl Service {
    pub fn new(store: Arc<dyn Store>, authority: Arc<Authority>, cfg: ServiceConfig) -> Self {
        Self::with_entropy(store, authority, cfg, Entropy::os())
    }

    /// Like [`Service::new`], drawing nonces, instance ids and serials from `entropy` (a seeded
    /// generator makes a run reproducible).
    pub fn with_entropy(
        store: Arc<dyn Store>,
        authority: Arc<Authority>,
        cfg: ServiceConfig,
        entropy: Entropy,
    ) -> Self {
        let limits = cfg.limits;
        Service {
            inner: Arc::new(Inner {
                store,
                authority: RwLock::new(authority),
                cfg,
                entropy,
                secret_per_token: Throttle::new(limits.secret_per_token),
                secret_per_address: Throttle::new(limits.secret_per_address),
                anonymous_audit: Throttle::new(limits.anonymous_audit_per_address),
                last_audit_purge: AtomicI64::new(i64::MIN),
                heartbeats: heartbeat::GroupWriter::default(),
            }),
        }
    }

    pub fn authority(&self) -> Arc<Authority> {
        match self.inner.authority.read() {
            Ok(a) => a.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Installs a new authority (after a CA rotation). Running ceremonies keep the one they began with.
    pub fn replace_authority(&self, a: Arc<Authority>) {
        match self.inner.authority.write() {
            Ok(mut g) => *g = a,
            Err(p) => *p.into_inner() = a,
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    pub fn config(&self) -> ServiceConfig {
        self.inner.cfg
    }

    /// Handles the first message of a connection.
    pub fn open(&self, conn: Connection, first: ClientMessage, now: UnixTime) -> (Session, Action) {
        let mut session = Session {
            svc: self.clone(),
            ceremony: None,
            closed: false,
            remote_addr: conn.remote_addr.clone(),
        };
        let action = match self.begin(&mut session, conn, first, now) {
            Ok(a) => a,
            Err(e) => self.store_failure(e),
        };
        session.closed = matches!(action, Action::Close(_));
        (session, action)
    }

    fn store_failure(&self, e: StoreError) -> Action {
        tracing::error!(error = %e, "store failure during a ceremony");
        Action::Close(ServerMessage::error(
            ErrorCode::Internal,
            messages::INTERNAL,
        ))
    }

    fn begin(
        &self,
        session: &mut Session,
        conn: Connection,
        first: ClientMessage,
        now: UnixTime,
    ) -> Result<Action, StoreError> {
        let authority = self.authority();
        let identity = if conn.peer_certificates.is_empty() {
            None
        } else {
            match authority.verify_identity(&conn.peer_certificates, now) {
                Ok(id) => Some(id),
                Err(e) => {
                    let mut ev = AuditEvent::new(event::BOT_JOIN, now, false);
                    ev.remote_addr = Some(conn.remote_addr.clone());
                    ev.error = Some(format!("client certificate refused: {e}"));
                    self.audit(&[ev], RefusalClass::Anonymous, &conn.remote_addr, now)?;
                    tracing::info!(remote = %conn.remote_addr, error = %e, "client certificate refused");
                    return Ok(Action::Close(ServerMessage::error(
                        ErrorCode::AccessDenied,
                        messages::ACCESS_DENIED,
                    )));
                }
            }
        };
        let remote_addr = conn.remote_addr.clone();
        let peer = Peer {
            remote_addr: conn.remote_addr,
            identity,
        };
        let store = &self.inner.store;
        let instance = match &peer.identity {
            Some(id) => store.get_instance(&id.claims.instance_id)?,
            None => None,
        };
        match first {
            ClientMessage::Init(init) => {
                // A malformed name is refused by the ceremony without being looked up.
                let well_formed = crate::ceremony::is_token_name(&init.token);
                if well_formed
                    && init.registration_secret.is_some()
                    && self.secret_throttled(&init.token, &remote_addr, now)
                {
                    return self.refuse_throttled(&init.token, &remote_addr, now);
                }
                let token = if well_formed {
                    store.get_token(&init.token)?
                } else {
                    None
                };
                let bound_id = token
                    .as_ref()
                    .and_then(|t| t.status.bound_instance_id.clone());
                let bound_instance = match (bound_id, &instance) {
                    (Some(id), Some(i)) if i.spec.instance_id == id => Some(i.clone()),
                    (Some(id), _) => store.get_instance(&id)?,
                    (None, _) => None,
                };
                let locks = self.locks_in_force(&peer, token.as_ref(), now)?;
                let snapshot = Snapshot {
                    token,
                    instance,
                    bound_instance,
                    locks,
                };
                let (ceremony, step) = Ceremony::start(
                    self.inner.cfg,
                    authority,
                    self.inner.entropy.clone(),
                    peer,
                    snapshot,
                    init,
                    now,
                );
                session.ceremony = ceremony;
                self.apply(step, &remote_addr, now)
            }
            ClientMessage::TokenJoin(tj) => {
                let token = match &tj.token {
                    Some(secret) if peer.identity.is_none() => {
                        store.get_token(&hash_secret(secret))?
                    }
                    _ => None,
                };
                let locks = self.locks_in_force(&peer, token.as_ref(), now)?;
                let snapshot = Snapshot {
                    token,
                    instance,
                    bound_instance: None,
                    locks,
                };
                let step = token_join::decide(
                    &self.inner.cfg,
                    &authority,
                    &self.inner.entropy,
                    &peer,
                    snapshot,
                    tj,
                    now,
                );
                self.apply(step, &remote_addr, now)
            }
            ClientMessage::Heartbeat(hb) => {
                let locks = self.locks_in_force(&peer, None, now)?;
                let snapshot = Snapshot {
                    token: None,
                    instance,
                    bound_instance: None,
                    locks,
                };
                match heartbeat::decide(&peer, snapshot, hb, now) {
                    Ok(inst) => {
                        let rev = inst.revision;
                        match self.inner.heartbeats.write(&**store, inst, rev) {
                            Ok(()) => {
                                Ok(Action::Close(ServerMessage::HeartbeatAck(HeartbeatAck {})))
                            }
                            Err(StoreError::Conflict(_)) => Ok(Action::Close(
                                ServerMessage::error(ErrorCode::Conflict, messages::CONFLICT),
                            )),
                            Err(e) => Err(e),
                        }
                    }
                    Err(r) => self.apply(Step::Refuse(r), &remote_addr, now),
                }
            }
            other => {
                let _ = other;
                Ok(Action::Close(ServerMessage::error(
                    ErrorCode::BadRequest,
                    "the first message must be init, token_join or heartbeat",
                )))
            }
        }
    }

    /// The locks in force now on every target a decision about this connection can consult
    /// (the certificate's bot, instance and token; the token's bot, name and bound instance),
    /// looked up by target: a ceremony's cost must not grow with the number of locks. Each
    /// decision then picks the targets it guards from these.
    fn locks_in_force(
        &self,
        peer: &Peer,
        token: Option<&Token>,
        now: UnixTime,
    ) -> Result<Vec<Lock>, StoreError> {
        let mut targets = Vec::new();
        if let Some(id) = &peer.identity {
            targets.push(LockTarget::Bot(id.claims.bot_name.clone()));
            targets.push(LockTarget::BotInstanceId(id.claims.instance_id.clone()));
            targets.push(LockTarget::JoinToken(id.claims.join_token.clone()));
        }
        if let Some(t) = token {
            targets.push(LockTarget::Bot(t.spec.bot_name.clone()));
            targets.push(LockTarget::JoinToken(t.name.clone()));
            if let Some(bound) = &t.status.bound_instance_id {
                targets.push(LockTarget::BotInstanceId(bound.clone()));
            }
        }
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let mut unique = Vec::with_capacity(targets.len());
        for t in targets {
            if !unique.contains(&t) {
                unique.push(t);
            }
        }
        Ok(self
            .inner
            .store
            .locks_for(&unique)?
            .into_iter()
            .filter(|l| l.is_active(now))
            .collect())
    }

    fn apply(&self, step: Step, remote_addr: &str, now: UnixTime) -> Result<Action, StoreError> {
        match step {
            Step::Send(m) => Ok(Action::Reply(m)),
            Step::Commit(mut success) => {
                success.commit.audit = std::mem::take(&mut success.commit.audit)
                    .into_iter()
                    .map(AuditEvent::sanitized)
                    .collect();
                self.commit(*success, remote_addr, now)
            }
            Step::Refuse(r) => self.record_refusal(*r, remote_addr, now),
        }
    }

    /// Commits a decided join; a commit the store refuses is audited and answered here.
    fn commit(
        &self,
        success: crate::outcome::Success,
        remote_addr: &str,
        now: UnixTime,
    ) -> Result<Action, StoreError> {
        let store = &self.inner.store;
        // The failure record for a commit that did not happen: the join event, as a failure.
        let failed = |error: String| {
            let mut ev = success
                .commit
                .audit
                .first()
                .cloned()
                .unwrap_or_else(|| AuditEvent::new(event::BOT_JOIN, now, false));
            ev.kind = event::BOT_JOIN.into();
            ev.success = false;
            ev.error = Some(error);
            ev
        };
        match store.commit(&success.commit) {
            Ok(()) => {
                if let ServerMessage::Result(r) = &success.reply {
                    tracing::info!(bot = %r.bot_name, instance = %r.instance_id, generation = r.generation, "identity issued");
                }
                Ok(Action::Close(success.reply))
            }
            Err(StoreError::Conflict(what)) | Err(StoreError::AlreadyExists(what)) => {
                let ev = failed(format!("commit lost a race: {what}"));
                self.audit(&[ev], RefusalClass::Authenticated, remote_addr, now)?;
                tracing::info!(%what, "ceremony lost a compare-and-swap race");
                Ok(Action::Close(ServerMessage::error(
                    ErrorCode::Conflict,
                    messages::CONFLICT,
                )))
            }
            // A lock placed while the client was solving its challenge.
            Err(StoreError::Locked(lock)) => {
                let ev = failed(format!("locked by {lock} (placed during the ceremony)"));
                self.audit(&[ev], RefusalClass::Authenticated, remote_addr, now)?;
                tracing::info!(%lock, "ceremony stopped at commit by a new lock");
                Ok(Action::Close(ServerMessage::error(
                    ErrorCode::Locked,
                    messages::LOCKED,
                )))
            }
            // The token or instance the ceremony read was deleted since: an operator's
            // decision, not a server fault, and final.
            Err(StoreError::NotFound(what)) => {
                let ev = failed(format!("{what} was deleted during the ceremony"));
                self.audit(&[ev], RefusalClass::Authenticated, remote_addr, now)?;
                tracing::info!(%what, "ceremony target deleted before commit");
                Ok(Action::Close(ServerMessage::error(
                    ErrorCode::AccessDenied,
                    DELETED_MID_CEREMONY,
                )))
            }
            Err(e) => Err(e),
        }
    }

    /// Whether registration-secret attempts for `token` or from `remote_addr` are throttled.
    fn secret_throttled(&self, token: &str, remote_addr: &str, now: UnixTime) -> bool {
        self.inner.secret_per_token.exhausted(token, now)
            || self
                .inner
                .secret_per_address
                .exhausted(&address_key(remote_addr), now)
    }

    /// Refuses a registration attempt while throttled: the answer every wrong secret gets, so
    /// a guesser learns nothing, not even that it is throttled; the audit log says why.
    fn refuse_throttled(
        &self,
        token: &str,
        remote_addr: &str,
        now: UnixTime,
    ) -> Result<Action, StoreError> {
        let mut ev = AuditEvent::new(event::BOT_JOIN, now, false).field(
            "join_method",
            boundkey_proto::JoinMethod::BoundKeypair.as_str(),
        );
        ev.remote_addr = Some(remote_addr.to_string());
        ev.token_name = Some(token.to_string());
        ev.error = Some(
            "registration secret attempts throttled (too many wrong secrets for this token or address)"
                .into(),
        );
        self.audit(&[ev], RefusalClass::Anonymous, remote_addr, now)?;
        tracing::info!(%token, remote = %remote_addr, "registration attempt throttled");
        Ok(Action::Close(ServerMessage::error(
            ErrorCode::AccessDenied,
            messages::ACCESS_DENIED,
        )))
    }

    /// Writes audit events, sanitised. Those of callers that proved nothing are rate limited
    /// per address; when some were dropped, a summary event says how many before the next one.
    fn audit(
        &self,
        events: &[AuditEvent],
        class: RefusalClass,
        remote_addr: &str,
        now: UnixTime,
    ) -> Result<(), StoreError> {
        let store = &self.inner.store;
        if class != RefusalClass::Authenticated {
            let key = address_key(remote_addr);
            match self.inner.anonymous_audit.admit(&key, now) {
                Admission::Refused => return Ok(()),
                Admission::Admitted { dropped: 0 } => {}
                Admission::Admitted { dropped } => {
                    let mut summary = AuditEvent::new(event::AUDIT_DROPPED, now, false)
                        .field("dropped", dropped)
                        .field(
                            "reason",
                            "anonymous failure events over the per-address rate",
                        );
                    summary.remote_addr = Some(key);
                    store.append_audit(&summary.sanitized())?;
                }
            }
        }
        for ev in events {
            store.append_audit(&ev.clone().sanitized())?;
        }
        self.purge_audit_if_due(now);
        Ok(())
    }

    /// Applies audit retention if it has not run for [`AUDIT_PURGE_EVERY_SECS`].
    fn purge_audit_if_due(&self, now: UnixTime) {
        let retention = self.inner.cfg.audit_retention_secs;
        if retention == 0 {
            return;
        }
        let last = self.inner.last_audit_purge.load(Ordering::Relaxed);
        if now.saturating_sub(last) < AUDIT_PURGE_EVERY_SECS
            || self
                .inner
                .last_audit_purge
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let cutoff = now.saturating_sub(i64::try_from(retention).unwrap_or(i64::MAX));
        match self.inner.store.purge_audit(cutoff) {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "purged audit events past the retention period"),
            Err(e) => tracing::warn!(error = %e, "purging old audit events failed"),
        }
    }

    /// Places an automatic lock. An existing lock that merely has the same name (an operator's,
    /// an expired one, one on another target) does not stand in for it: only a permanent lock
    /// on the same target does (another ceremony that caught the same copy). Returns the lock
    /// placed, if one was.
    fn place_lock(&self, lock: &Lock) -> Result<Option<Lock>, StoreError> {
        let store = &self.inner.store;
        let equivalent = |l: &Lock| l.target == lock.target && l.expires.is_none();
        for n in 0..=LOCK_NAME_TRIES {
            let candidate = Lock {
                name: match n {
                    0 => lock.name.clone(),
                    LOCK_NAME_TRIES => {
                        format!("{}-{}", lock.name, self.inner.entropy.instance_id())
                    }
                    n => format!("{}-{}", lock.name, n + 1),
                },
                ..lock.clone()
            };
            if store.add_lock(&candidate)? {
                return Ok(Some(candidate));
            }
            if store
                .get_lock(&candidate.name)?
                .is_some_and(|l| equivalent(&l))
            {
                return Ok(None);
            }
        }
        Err(StoreError::Backend(format!(
            "could not place automatic lock {}",
            lock.name
        )))
    }

    fn record_refusal(
        &self,
        r: Refusal,
        remote_addr: &str,
        now: UnixTime,
    ) -> Result<Action, StoreError> {
        if r.class == RefusalClass::WrongSecret {
            if let Some(token) = r.audit.first().and_then(|e| e.token_name.as_deref()) {
                let _ = self.inner.secret_per_token.admit(token, now);
            }
            let _ = self
                .inner
                .secret_per_address
                .admit(&address_key(remote_addr), now);
        }
        if let Some(lock) = &r.lock {
            if let Some(lock) = self.place_lock(lock)? {
                let mut ev = AuditEvent::new(event::LOCK_CREATED, now, true)
                    .field("lock", lock.name.clone())
                    .field("target", lock.target.kind())
                    .field("target_value", lock.target.value())
                    .field("message", lock.message.clone());
                ev.token_name = r.audit.first().and_then(|e| e.token_name.clone());
                ev.bot_name = r.audit.first().and_then(|e| e.bot_name.clone());
                self.audit(&[ev], RefusalClass::Authenticated, remote_addr, now)?;
                tracing::warn!(lock = %lock.name, reason = %r.reason, "automatic lock created");
            }
        }
        self.audit(&r.audit, r.class, remote_addr, now)?;
        tracing::info!(reason = %r.reason, "join refused");
        Ok(Action::Close(r.reply))
    }
}

impl Session {
    /// Handles a further client message.
    pub fn handle(&mut self, msg: ClientMessage, now: UnixTime) -> Action {
        if self.closed {
            return Action::Close(ServerMessage::error(
                ErrorCode::BadRequest,
                "the ceremony is over",
            ));
        }
        let action = match self.ceremony.as_mut() {
            Some(c) => {
                let step = c.handle(msg, now);
                match self.svc.apply(step, &self.remote_addr, now) {
                    Ok(a) => a,
                    Err(e) => self.svc.store_failure(e),
                }
            }
            None => Action::Close(ServerMessage::error(
                ErrorCode::BadRequest,
                "unexpected message",
            )),
        };
        self.closed = matches!(action, Action::Close(_));
        action
    }

    /// The connection ended or hit its deadline mid-ceremony: audits it (once).
    pub fn abort(&mut self, reason: &str, now: UnixTime) {
        if self.closed {
            return;
        }
        self.closed = true;
        if let Some((ev, class)) = self
            .ceremony
            .as_ref()
            .and_then(|c| c.abort_event(reason, now))
        {
            if let Err(e) = self.svc.audit(&[ev], class, &self.remote_addr, now) {
                tracing::error!(error = %e, "could not audit an aborted ceremony");
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }
}
