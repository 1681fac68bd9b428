//! Carries out admin requests against the store and the running service. Synchronous (the
//! store blocks): the socket layer calls it inside `spawn_blocking`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use boundkey_auth::admin::{self as rules, NewBoundKeypairToken};
use boundkey_auth::authority::{Authority, AuthorityState, CaKind};
use boundkey_auth::model::{
    event, AttestationSpec, AuditEvent, Bot, Lock, LockTarget, Token, TokenSpec,
};
use boundkey_auth::service::Service;
use boundkey_auth::store::{AuditQuery, InstanceCursor, InstanceQuery, StoreError, TokenQuery};
use boundkey_auth::UnixTime;
use boundkey_proto::{CaPin, Endpoint, JoinMethod, JoinUri};
use serde_json::{json, Value};

use super::views::{
    AuditPage, BotDeleted, BotSummary, CaExported, CaRotated, InstanceDeleted, InstancePage,
    InstanceSummary, InstanceView, LockDeleted, LockView, NewCredential, ServerInfo, TokenCreated,
    TokenDeleted, TokenPage, TokenView,
};
use super::{
    AdminError, AuditLs, CaExport, CaRotate, ErrorKind, ExportFormat, ExportType, InstancesLs,
    LocksAdd, Operation, Request, TokensAdd, TokensEdit, TokensLs, DEFAULT_AUDIT_PAGE,
    DEFAULT_PAGE, MAX_PAGE,
};

/// How often a spec edit is retried when a ceremony bumped the token's revision meanwhile.
const EDIT_ATTEMPTS: usize = 10;

/// Called with the new authority after a CA rotation.
pub type AuthorityHook = Box<dyn Fn(&Arc<Authority>) + Send + Sync>;

/// What the admin handler needs from the running server.
pub struct AdminContext {
    pub service: Service,
    /// The TLS listener's bound address (default host:port of join URIs).
    pub listen_addr: SocketAddr,
    pub ca_pin: CaPin,
    /// Runs after a CA rotation installed a new authority, to rebuild the TLS client verifier.
    pub on_authority_change: AuthorityHook,
    /// How long after a rotation the new keys begin to sign (`--ca-rotation-delay`).
    pub ca_rotation_delay: std::time::Duration,
}

/// Who is asking (from the socket's peer credentials).
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
}

impl Caller {
    fn label(&self) -> String {
        format!("admin (uid {})", self.uid)
    }
}

/// Carries out one request and encodes its answer. Each arm goes through [`reply`], which only
/// accepts the operation's own `Answer` type.
pub fn handle(
    ctx: &AdminContext,
    caller: Caller,
    req: Request,
    now: UnixTime,
) -> Result<Value, AdminError> {
    let h = Handler { ctx, caller, now };
    match req {
        Request::Info(op) => reply(op, |_| h.info()),
        Request::BotsAdd(op) => reply(op, |op| h.bots_add(&op.name)),
        Request::BotsLs(op) => reply(op, |_| h.bots_ls()),
        Request::BotsRm(op) => reply(op, |op| h.bots_rm(&op.name)),
        Request::TokensAdd(op) => reply(op, |op| h.tokens_add(op)),
        Request::TokensLs(op) => reply(op, |op| h.tokens_ls(op)),
        Request::TokensShow(op) => reply(op, |op| Ok(TokenView::from(&h.token(&op.name)?))),
        Request::TokensEdit(op) => reply(op, |op| h.tokens_edit(op)),
        Request::TokensRm(op) => reply(op, |op| h.tokens_rm(&op.name)),
        Request::RequestRotation(op) => reply(op, |op| h.request_rotation(&op.token)),
        Request::InstancesLs(op) => reply(op, |op| h.instances_ls(op)),
        Request::InstancesShow(op) => reply(op, |op| {
            let i = h.instance(&op.id)?;
            Ok(InstanceView::new(&i, now))
        }),
        Request::InstancesRm(op) => reply(op, |op| h.instances_rm(&op.id)),
        Request::LocksAdd(op) => reply(op, |op| h.locks_add(op)),
        Request::LocksLs(op) => reply(op, |_| h.locks_ls()),
        Request::LocksRm(op) => reply(op, |op| h.locks_rm(&op.name)),
        Request::AuditLs(op) => reply(op, |op| h.audit_ls(op)),
        Request::CaRotate(op) => reply(op, |op| h.ca_rotate(op)),
        Request::CaExport(op) => reply(op, |op| h.ca_export(op)),
    }
}

/// Runs `f` and encodes its answer, which must be `O`'s declared answer type.
fn reply<O: Operation>(
    op: O,
    f: impl FnOnce(O) -> Result<O::Answer, AdminError>,
) -> Result<Value, AdminError> {
    let answer = f(op)?;
    serde_json::to_value(answer)
        .map_err(|e| AdminError::internal(format!("cannot encode the answer: {e}")))
}

/// The page size asked for, or `default`; 0 and more than [`MAX_PAGE`] are refused.
fn page_size(limit: Option<usize>, default: usize) -> Result<usize, AdminError> {
    match limit.unwrap_or(default) {
        0 => Err(AdminError::bad_request("--limit must be at least 1")),
        n if n > MAX_PAGE => Err(AdminError::bad_request(format!(
            "--limit {n} is above the maximum page size {MAX_PAGE}; page with --after"
        ))),
        n => Ok(n),
    }
}

/// Keeps the first `limit` of `items` (fetched as `limit + 1`) and returns the cursor of the
/// last one kept when more follow.
fn next_cursor<T>(
    items: &mut Vec<T>,
    limit: usize,
    cursor: impl Fn(&T) -> String,
) -> Option<String> {
    if items.len() <= limit {
        return None;
    }
    items.truncate(limit);
    items.last().map(cursor)
}

/// An instance cursor is `CREATED_AT.INSTANCE_ID`: the listing's sort key, so a page resumes
/// exactly after the last instance shown, whatever was added or removed meanwhile.
fn parse_instance_cursor(c: &str) -> Result<InstanceCursor, AdminError> {
    let bad = || AdminError::bad_request(format!("invalid instance cursor {c:?}"));
    let (t, id) = c.split_once('.').ok_or_else(bad)?;
    Ok(InstanceCursor {
        created_at: t.parse().map_err(|_| bad())?,
        id: id.to_string(),
    })
}

struct Handler<'a> {
    ctx: &'a AdminContext,
    caller: Caller,
    now: UnixTime,
}

impl Handler<'_> {
    fn store(&self) -> &Arc<dyn boundkey_auth::store::Store> {
        self.ctx.service.store()
    }

    fn audit(&self, kind: &str) -> AuditEvent {
        AuditEvent::new(kind, self.now, true).field("created_by", self.caller.label())
    }

    fn token(&self, name: &str) -> Result<Token, AdminError> {
        self.store()
            .get_token(name)?
            .ok_or_else(|| AdminError::not_found(format!("token {name} not found")))
    }

    fn instance(&self, id: &str) -> Result<boundkey_auth::model::BotInstance, AdminError> {
        self.store()
            .get_instance(id)?
            .ok_or_else(|| AdminError::not_found(format!("bot instance {id} not found")))
    }

    /// Where agents should connect: the listener's address, with a wildcard bind replaced by
    /// this machine's host name.
    fn default_server(&self) -> Endpoint {
        let a = self.ctx.listen_addr;
        let host = match a.ip() {
            ip if ip.is_unspecified() => crate::hostname().unwrap_or_else(|| "localhost".into()),
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => v6.to_string(),
        };
        Endpoint::new(host, a.port())
    }

    fn info(&self) -> Result<ServerInfo, AdminError> {
        Ok(ServerInfo {
            cluster: self.ctx.service.authority().cluster().to_string(),
            ca_pin: self.ctx.ca_pin,
            listen_addr: self.ctx.listen_addr,
            auth_server: self.default_server(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        })
    }

    fn bots_add(&self, name: &str) -> Result<Bot, AdminError> {
        rules::validate_name(name)?;
        let bot = Bot {
            name: name.into(),
            created_at: self.now,
        };
        self.store().create_bot(&bot)?;
        let mut ev = self.audit(event::BOT_CREATED);
        ev.bot_name = Some(name.into());
        self.store().append_audit(&ev)?;
        Ok(bot)
    }

    fn bots_ls(&self) -> Result<Vec<BotSummary>, AdminError> {
        let counts = self.store().all_bot_counts(self.now)?;
        Ok(self
            .store()
            .list_bots()?
            .into_iter()
            .map(|b| {
                let c = counts.get(&b.name).copied().unwrap_or_default();
                BotSummary {
                    tokens: c.tokens,
                    instances: c.instances,
                    active_instances: c.active_instances,
                    created_at: b.created_at,
                    name: b.name,
                }
            })
            .collect())
    }

    fn bots_rm(&self, name: &str) -> Result<BotDeleted, AdminError> {
        let counts = self.store().bot_counts(name, self.now)?;
        let (tokens, instances) = (counts.tokens, counts.instances);
        if !self.store().delete_bot(name)? && tokens == 0 && instances == 0 {
            return Err(AdminError::not_found(format!("bot {name} not found")));
        }
        let mut ev = self
            .audit(event::BOT_DELETED)
            .field("tokens_deleted", tokens)
            .field("instances_deleted", instances);
        ev.bot_name = Some(name.into());
        self.store().append_audit(&ev)?;
        Ok(BotDeleted {
            name: name.into(),
            tokens_deleted: tokens,
            instances_deleted: instances,
        })
    }

    fn tokens_add(&self, r: TokensAdd) -> Result<TokenCreated, AdminError> {
        if self.store().get_bot(&r.bot)?.is_none() {
            return Err(AdminError::not_found(format!(
                "bot {} not found; create it first with `boundkeyctl bots add {}`",
                r.bot, r.bot
            )));
        }
        let method = r.join_method.unwrap_or(JoinMethod::BoundKeypair);
        let endpoint = r.auth_server.unwrap_or_else(|| self.default_server());
        let expires_in = |ttl: u64| {
            self.now
                .saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX))
        };
        let (token, credential, uri) = match method {
            JoinMethod::BoundKeypair => {
                if r.max_joins.is_some() {
                    return Err(AdminError::bad_request(
                        "--max-joins applies to the token join method only",
                    ));
                }
                let (token, secret) = rules::new_bound_keypair_token(
                    NewBoundKeypairToken {
                        name: r.name,
                        bot_name: r.bot.clone(),
                        initial_public_key: r.initial_public_key,
                        registration_secret: r.registration_secret,
                        must_register_before: r.must_register_before,
                        recovery_limit: r.recovery_limit,
                        recovery_mode: r.recovery_mode,
                        expires: r.ttl_secs.map(expires_in),
                        attestation: Some(AttestationSpec {
                            mode: r.attestation.unwrap_or_default(),
                            ek_ca_bundle: r.ek_ca_bundle,
                            ek_allow: r.ek_allow,
                        }),
                    },
                    self.now,
                )?;
                let uri = JoinUri {
                    method,
                    token: token.name.clone(),
                    registration_secret: secret.clone(),
                    endpoint,
                    ca_pin: Some(self.ctx.ca_pin),
                };
                let onboarding = token.spec.bound_keypair.as_ref().map(|b| &b.onboarding);
                let credential = NewCredential::BoundKeypair {
                    registration_secret: secret,
                    initial_public_key: onboarding.and_then(|o| o.initial_public_key.clone()),
                    must_register_before: onboarding.and_then(|o| o.must_register_before),
                };
                (token, credential, uri)
            }
            JoinMethod::Token => {
                let bk_only = [
                    (r.name.is_some(), "--name"),
                    (r.initial_public_key.is_some(), "--initial-public-key"),
                    (r.registration_secret.is_some(), "--registration-secret"),
                    (r.recovery_limit.is_some(), "--recovery-limit"),
                    (r.recovery_mode.is_some(), "--recovery-mode"),
                    (r.must_register_before.is_some(), "--must-register-before"),
                    (r.attestation.is_some(), "--attestation"),
                    (r.ek_ca_bundle.is_some(), "--ek-ca"),
                    (!r.ek_allow.is_empty(), "--ek-allow"),
                ];
                if let Some((_, flag)) = bk_only.iter().find(|(set, _)| *set) {
                    return Err(AdminError::bad_request(format!(
                        "{flag} applies to the bound_keypair join method only"
                    )));
                }
                let (token, secret) =
                    rules::new_join_token(&r.bot, r.max_joins, r.ttl_secs, r.force, self.now)?;
                let uri = JoinUri {
                    method,
                    token: secret.clone(),
                    registration_secret: None,
                    endpoint,
                    ca_pin: Some(self.ctx.ca_pin),
                };
                let credential = NewCredential::Token {
                    token: secret,
                    max_joins: token.spec.max_joins,
                };
                (token, credential, uri)
            }
        };
        self.store().create_token(&token)?;
        let mut ev = self
            .audit(event::TOKEN_CREATED)
            .field("join_method", method.as_str());
        ev.bot_name = Some(token.spec.bot_name.clone());
        ev.token_name = Some(method.displayed_token(&token.name));
        self.store().append_audit(&ev)?;
        Ok(TokenCreated {
            name: token.name,
            bot_name: token.spec.bot_name,
            expires: token.spec.expires,
            join_uri: uri,
            credential,
        })
    }

    fn tokens_ls(&self, op: TokensLs) -> Result<TokenPage, AdminError> {
        let limit = page_size(op.limit, DEFAULT_PAGE)?;
        let mut tokens = self.store().page_tokens(&TokenQuery {
            bot: op.bot,
            after: op.after,
            limit: limit + 1,
        })?;
        let next = next_cursor(&mut tokens, limit, |t| t.name.clone());
        Ok(TokenPage {
            tokens: tokens.iter().map(TokenView::from).collect(),
            next,
        })
    }

    /// Applies `change` to the token's spec with a compare-and-swap, retrying when a ceremony
    /// committed in between (its status write bumps the revision; the spec edit is still valid).
    fn edit_spec(
        &self,
        name: &str,
        change: impl Fn(&Token) -> Result<TokenSpec, AdminError>,
    ) -> Result<Token, AdminError> {
        for _ in 0..EDIT_ATTEMPTS {
            let t = self.token(name)?;
            let spec = change(&t)?;
            match self.store().update_token_spec(name, &spec, t.revision) {
                Ok(()) => return self.token(name),
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(AdminError::new(
            ErrorKind::Conflict,
            format!("token {name} kept changing concurrently; retry"),
        ))
    }

    fn tokens_edit(&self, r: TokensEdit) -> Result<TokenView, AdminError> {
        let initial_key = match &r.initial_public_key {
            Some(Some(k)) => Some(Some(
                boundkey_proto::parse_ssh_public_key(k)
                    .map(|pk| boundkey_proto::ssh_public_key(&pk))
                    .map_err(|e| {
                        AdminError::bad_request(format!("invalid initial public key: {e}"))
                    })?,
            )),
            other => other.clone(),
        };
        let mut changed: Vec<&str> = Vec::new();
        let bk_fields = [
            (r.recovery_limit.is_some(), "recovery_limit"),
            (r.recovery_mode.is_some(), "recovery_mode"),
            (r.must_register_before.is_some(), "must_register_before"),
            (initial_key.is_some(), "initial_public_key"),
            (r.attestation.is_some(), "attestation"),
            (r.ek_ca_bundle.is_some(), "ek_ca_bundle"),
            (r.ek_allow.is_some(), "ek_allow"),
        ];
        changed.extend(bk_fields.iter().filter(|(s, _)| *s).map(|(_, n)| *n));
        if r.expires.is_some() {
            changed.push("expires");
        }
        if r.max_joins.is_some() {
            changed.push("max_joins");
        }
        if changed.is_empty() {
            return Err(AdminError::bad_request("nothing to change"));
        }
        let t = self.edit_spec(&r.name, |t| {
            let mut spec = t.spec.clone();
            if let Some(e) = r.expires {
                spec.expires = e;
            }
            match (spec.join_method, spec.bound_keypair.as_mut()) {
                (JoinMethod::BoundKeypair, Some(bk)) => {
                    if r.max_joins.is_some() {
                        return Err(AdminError::bad_request(
                            "max_joins applies to the token join method only",
                        ));
                    }
                    if let Some(l) = r.recovery_limit {
                        bk.recovery.limit = l;
                    }
                    if let Some(m) = r.recovery_mode {
                        bk.recovery.mode = m;
                    }
                    if let Some(m) = r.must_register_before {
                        bk.onboarding.must_register_before = m;
                    }
                    if let Some(k) = &initial_key {
                        bk.onboarding.initial_public_key = k.clone();
                    }
                    // The spec only: the EK a token recorded at registration stays in its
                    // status whatever the new trust settings are.
                    let mut att = bk.attestation.clone();
                    if let Some(m) = r.attestation {
                        att.mode = m;
                    }
                    if let Some(b) = &r.ek_ca_bundle {
                        att.ek_ca_bundle = b.clone();
                    }
                    if let Some(a) = &r.ek_allow {
                        att.ek_allow = a.clone();
                    }
                    bk.attestation = rules::validate_attestation(att)?;
                }
                _ => {
                    if let Some((_, f)) = bk_fields.iter().find(|(s, _)| *s) {
                        return Err(AdminError::bad_request(format!(
                            "{f} applies to the bound_keypair join method only"
                        )));
                    }
                    if let Some(m) = r.max_joins {
                        if m == 0 {
                            return Err(AdminError::bad_request("max_joins must be at least 1"));
                        }
                        spec.max_joins = Some(m);
                    }
                }
            }
            Ok(spec)
        })?;
        let mut ev = self
            .audit(event::TOKEN_UPDATED)
            .field("changed", json!(changed));
        ev.bot_name = Some(t.spec.bot_name.clone());
        ev.token_name = Some(t.name.clone());
        self.store().append_audit(&ev)?;
        Ok(TokenView::from(&t))
    }

    fn tokens_rm(&self, name: &str) -> Result<TokenDeleted, AdminError> {
        let t = self.token(name)?;
        if !self.store().delete_token(name)? {
            return Err(AdminError::not_found(format!("token {name} not found")));
        }
        let mut ev = self.audit(event::TOKEN_DELETED);
        ev.bot_name = Some(t.spec.bot_name);
        ev.token_name = Some(t.spec.join_method.displayed_token(name));
        self.store().append_audit(&ev)?;
        Ok(TokenDeleted { name: name.into() })
    }

    fn request_rotation(&self, name: &str) -> Result<TokenView, AdminError> {
        let t = self.edit_spec(name, |t| Ok(rules::request_rotation(t, self.now)?))?;
        let rotate_after = t.spec.bound_keypair.as_ref().and_then(|b| b.rotate_after);
        let mut ev = self
            .audit(event::TOKEN_UPDATED)
            .field("changed", json!(["rotate_after"]))
            .field("rotate_after", json!(rotate_after));
        ev.bot_name = Some(t.spec.bot_name.clone());
        ev.token_name = Some(t.name.clone());
        self.store().append_audit(&ev)?;
        Ok(TokenView::from(&t))
    }

    fn instances_ls(&self, op: InstancesLs) -> Result<InstancePage, AdminError> {
        let limit = page_size(op.limit, DEFAULT_PAGE)?;
        let after = op.after.as_deref().map(parse_instance_cursor).transpose()?;
        let mut instances = self.store().page_instances(&InstanceQuery {
            bot: op.bot,
            state: op.state,
            now: self.now,
            created_since: op.since,
            created_until: op.until,
            after,
            limit: limit + 1,
        })?;
        let next = next_cursor(&mut instances, limit, |i| {
            format!("{}.{}", i.spec.created_at, i.spec.instance_id)
        });
        Ok(InstancePage {
            instances: instances
                .iter()
                .map(|i| InstanceSummary::new(i, self.now))
                .collect(),
            next,
        })
    }

    fn instances_rm(&self, id: &str) -> Result<InstanceDeleted, AdminError> {
        let i = self.instance(id)?;
        if !self.store().delete_instance(id)? {
            return Err(AdminError::not_found(format!(
                "bot instance {id} not found"
            )));
        }
        let mut ev = self.audit(event::BOT_INSTANCE_DELETED);
        ev.bot_name = Some(i.spec.bot_name);
        ev.instance_id = Some(id.into());
        self.store().append_audit(&ev)?;
        Ok(InstanceDeleted {
            instance_id: id.into(),
        })
    }

    fn locks_add(&self, r: LocksAdd) -> Result<LockView, AdminError> {
        if r.target.value().is_empty() {
            return Err(AdminError::bad_request("lock target is empty"));
        }
        let name = match r.name {
            Some(n) => {
                rules::validate_name(&n)?;
                n
            }
            None => format!("admin-{}", uuid::Uuid::new_v4().simple()),
        };
        let lock = Lock {
            name,
            message: r
                .message
                .unwrap_or_else(|| format!("locked by {}", self.caller.label())),
            expires: r.ttl_secs.map(|t| {
                self.now
                    .saturating_add(i64::try_from(t).unwrap_or(i64::MAX))
            }),
            created_by: self.caller.label(),
            created_at: self.now,
            target: r.target,
        };
        if !self.store().add_lock(&lock)? {
            return Err(AdminError::new(
                ErrorKind::AlreadyExists,
                format!("lock {} already exists", lock.name),
            ));
        }
        let mut ev = self
            .audit(event::LOCK_CREATED)
            .field("lock", lock.name.clone())
            .field("target", lock.target.kind())
            .field("target_value", lock.target.value())
            .field("message", lock.message.clone())
            .field("expires", json!(lock.expires));
        match &lock.target {
            LockTarget::Bot(b) => ev.bot_name = Some(b.clone()),
            LockTarget::BotInstanceId(i) => ev.instance_id = Some(i.clone()),
            LockTarget::JoinToken(t) => ev.token_name = Some(t.clone()),
        }
        self.store().append_audit(&ev)?;
        Ok(LockView::new(&lock, self.now))
    }

    fn locks_ls(&self) -> Result<Vec<LockView>, AdminError> {
        Ok(self
            .store()
            .list_locks()?
            .iter()
            .map(|l| LockView::new(l, self.now))
            .collect())
    }

    fn locks_rm(&self, name: &str) -> Result<LockDeleted, AdminError> {
        let lock = self
            .store()
            .get_lock(name)?
            .ok_or_else(|| AdminError::not_found(format!("lock {name} not found")))?;
        if !self.store().delete_lock(name)? {
            return Err(AdminError::not_found(format!("lock {name} not found")));
        }
        let ev = self
            .audit(event::LOCK_DELETED)
            .field("lock", name)
            .field("target", lock.target.kind())
            .field("target_value", lock.target.value());
        self.store().append_audit(&ev)?;
        Ok(LockDeleted { name: name.into() })
    }

    fn audit_ls(&self, q: AuditLs) -> Result<AuditPage, AdminError> {
        let limit = page_size(q.limit, DEFAULT_AUDIT_PAGE)?;
        let before = q
            .after
            .as_deref()
            .map(|c| {
                c.parse::<u64>()
                    .map_err(|_| AdminError::bad_request(format!("invalid audit cursor {c:?}")))
            })
            .transpose()?;
        let mut events = self.store().list_audit(&AuditQuery {
            kind: q.kind,
            bot: q.bot,
            since: q.since,
            until: q.until,
            before,
            limit: Some(limit + 1),
        })?;
        let next = next_cursor(&mut events, limit, |e| e.id.to_string());
        Ok(AuditPage { events, next })
    }

    fn ca_rotate(&self, op: CaRotate) -> Result<CaRotated, AdminError> {
        let CaRotate {
            kind,
            grace_period_secs: grace,
        } = op;
        let (mut state, rev): (AuthorityState, u64) = self
            .store()
            .load_authority()?
            .ok_or_else(|| AdminError::internal("the store holds no CA state"))?;
        let ca_kind = match kind {
            super::CaType::Identity => CaKind::Identity,
            super::CaType::JoinState => CaKind::JoinState,
        };
        let delay = self.ctx.ca_rotation_delay.as_secs();
        let kid = state
            .rotate(ca_kind, grace, delay, self.now)
            .map_err(|e| AdminError::internal(format!("CA rotation failed: {e}")))?;
        let authority = Arc::new(
            Authority::load(&state)
                .map_err(|e| AdminError::internal(format!("rotated CA state is unusable: {e}")))?,
        );
        // Persist first: if the CAS fails, nothing changed anywhere.
        self.store()
            .save_authority(&state, Some(rev))
            .map_err(|e| match e {
                StoreError::Conflict(_) => AdminError::new(
                    ErrorKind::Conflict,
                    "the CA state changed concurrently; retry",
                ),
                e => e.into(),
            })?;
        self.ctx.service.replace_authority(authority.clone());
        (self.ctx.on_authority_change)(&authority);
        let type_str = kind.as_str();
        let signs_from = self
            .now
            .saturating_add(i64::try_from(delay).unwrap_or(i64::MAX));
        let trusted_until = signs_from.saturating_add(i64::try_from(grace).unwrap_or(i64::MAX));
        let ev = self
            .audit(event::CA_ROTATED)
            .field("type", type_str)
            .field("kid", kid.clone())
            .field("grace_period_secs", grace)
            .field("signs_from", signs_from)
            .field("previous_trusted_until", trusted_until);
        self.store().append_audit(&ev)?;
        tracing::info!(r#type = type_str, %kid, grace_secs = grace, "CA rotated");
        Ok(CaRotated {
            kind,
            kid,
            grace_period_secs: grace,
            signs_from,
            previous_trusted_until: trusted_until,
        })
    }

    /// Public material only, from the authority the service uses now: after a rotation the
    /// export holds every key still trusted (grace period included).
    fn ca_export(&self, op: CaExport) -> Result<CaExported, AdminError> {
        let a = self.ctx.service.authority();
        let json = |v: serde_json::Result<String>| {
            v.map(|mut s| {
                s.push('\n');
                s
            })
            .map_err(|e| AdminError::internal(format!("cannot encode the JWK set: {e}")))
        };
        let failed = |e: boundkey_auth::authority::AuthorityError| {
            AdminError::internal(format!("cannot export the CA: {e}"))
        };
        let data = match (op.kind, op.format) {
            (ExportType::Identity, ExportFormat::Pem) => a.identity_ca_bundle(self.now),
            (ExportType::Identity, ExportFormat::Jwks) => json(serde_json::to_string_pretty(
                &a.identity_jwks(self.now).map_err(failed)?,
            ))?,
            (ExportType::JoinState, ExportFormat::Pem) => {
                a.join_state_public_pem(self.now).map_err(failed)?
            }
            (ExportType::JoinState, ExportFormat::Jwks) => {
                json(serde_json::to_string_pretty(&a.join_state_jwks(self.now)))?
            }
            (ExportType::Tls, ExportFormat::Pem) => a.tls_ca_pem().to_string(),
            (ExportType::Tls, ExportFormat::Jwks) => {
                return Err(AdminError::bad_request(
                    "the TLS CA exports as PEM only (agents pin it by its SPKI hash)",
                ))
            }
        };
        Ok(CaExported {
            kind: op.kind,
            format: op.format,
            data,
        })
    }
}
