//! A transport-agnostic driver: loads what a decision needs from the [`Store`], runs the pure
//! logic ([`Ceremony`], [`token_join`], [`heartbeat`]) and applies the outcome. An auth service
//! wraps its network loop around [`Service::open`] and [`Session::handle`]; both are synchronous
//! and may block on the store.

use std::sync::{Arc, RwLock};

use boundkey_proto::{ClientMessage, ErrorCode, HeartbeatAck, ServerMessage, UnixTime};
use rustls_pki_types::CertificateDer;

use crate::admin::hash_secret;
use crate::authority::Authority;
use crate::ceremony::Ceremony;
use crate::entropy::Entropy;
use crate::input::{Peer, Snapshot};
use crate::model::{event, AuditEvent};
use crate::outcome::{messages, Refusal, Step};
use crate::store::{Store, StoreError};
use crate::{heartbeat, token_join, ServiceConfig};

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
        Service {
            inner: Arc::new(Inner {
                store,
                authority: RwLock::new(authority),
                cfg,
                entropy,
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
                    self.inner.store.append_audit(&ev)?;
                    tracing::info!(remote = %conn.remote_addr, error = %e, "client certificate refused");
                    return Ok(Action::Close(ServerMessage::error(
                        ErrorCode::AccessDenied,
                        messages::ACCESS_DENIED,
                    )));
                }
            }
        };
        let peer = Peer {
            remote_addr: conn.remote_addr,
            identity,
        };
        let store = &self.inner.store;
        let instance = match &peer.identity {
            Some(id) => store.get_instance(&id.claims.instance_id)?,
            None => None,
        };
        let locks: Vec<_> = store
            .list_locks()?
            .into_iter()
            .filter(|l| l.is_active(now))
            .collect();
        match first {
            ClientMessage::Init(init) => {
                let token = store.get_token(&init.token)?;
                let bound_id = token
                    .as_ref()
                    .and_then(|t| t.status.bound_instance_id.clone());
                let bound_instance = match (bound_id, &instance) {
                    (Some(id), Some(i)) if i.spec.instance_id == id => Some(i.clone()),
                    (Some(id), _) => store.get_instance(&id)?,
                    (None, _) => None,
                };
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
                self.apply(step, now)
            }
            ClientMessage::TokenJoin(tj) => {
                let token = match &tj.token {
                    Some(secret) if peer.identity.is_none() => {
                        store.get_token(&hash_secret(secret))?
                    }
                    _ => None,
                };
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
                self.apply(step, now)
            }
            ClientMessage::Heartbeat(hb) => {
                let snapshot = Snapshot {
                    token: None,
                    instance,
                    bound_instance: None,
                    locks,
                };
                match heartbeat::decide(&peer, snapshot, hb, now) {
                    Ok(inst) => {
                        let rev = inst.revision;
                        match store.update_instance(&inst, rev) {
                            Ok(()) => {
                                Ok(Action::Close(ServerMessage::HeartbeatAck(HeartbeatAck {})))
                            }
                            Err(StoreError::Conflict(_)) => Ok(Action::Close(
                                ServerMessage::error(ErrorCode::Conflict, messages::CONFLICT),
                            )),
                            Err(e) => Err(e),
                        }
                    }
                    Err(r) => self.apply(Step::Refuse(r), now),
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

    fn apply(&self, step: Step, now: UnixTime) -> Result<Action, StoreError> {
        let store = &self.inner.store;
        match step {
            Step::Send(m) => Ok(Action::Reply(m)),
            Step::Commit(success) => match store.commit(&success.commit) {
                Ok(()) => {
                    if let ServerMessage::Result(r) = &success.reply {
                        tracing::info!(bot = %r.bot_name, instance = %r.instance_id, generation = r.generation, "identity issued");
                    }
                    Ok(Action::Close(success.reply))
                }
                Err(StoreError::Conflict(what)) | Err(StoreError::AlreadyExists(what)) => {
                    let mut ev = success
                        .commit
                        .audit
                        .first()
                        .cloned()
                        .unwrap_or_else(|| AuditEvent::new(event::BOT_JOIN, now, false));
                    ev.kind = event::BOT_JOIN.into();
                    ev.success = false;
                    ev.error = Some(format!("commit lost a race: {what}"));
                    store.append_audit(&ev)?;
                    tracing::info!(%what, "ceremony lost a compare-and-swap race");
                    Ok(Action::Close(ServerMessage::error(
                        ErrorCode::Conflict,
                        messages::CONFLICT,
                    )))
                }
                Err(e) => Err(e),
            },
            Step::Refuse(r) => self.record_refusal(*r, now),
        }
    }

    fn record_refusal(&self, r: Refusal, now: UnixTime) -> Result<Action, StoreError> {
        let store = &self.inner.store;
        if let Some(lock) = &r.lock {
            if store.add_lock(lock)? {
                let mut ev = AuditEvent::new(event::LOCK_CREATED, now, true)
                    .field("lock", lock.name.clone())
                    .field("target", lock.target.kind())
                    .field("target_value", lock.target.value())
                    .field("message", lock.message.clone());
                ev.token_name = r.audit.first().and_then(|e| e.token_name.clone());
                ev.bot_name = r.audit.first().and_then(|e| e.bot_name.clone());
                store.append_audit(&ev)?;
                tracing::warn!(lock = %lock.name, reason = %r.reason, "automatic lock created");
            }
        }
        for ev in &r.audit {
            store.append_audit(ev)?;
        }
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
                match self.svc.apply(step, now) {
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
        if let Some(ev) = self
            .ceremony
            .as_ref()
            .and_then(|c| c.abort_event(reason, now))
        {
            if let Err(e) = self.svc.inner.store.append_audit(&ev) {
                tracing::error!(error = %e, "could not audit an aborted ceremony");
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }
}
