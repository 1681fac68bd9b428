//! One agent on one storage directory: decides what kind of ceremony to run, drives the
//! [`join`](crate::join) state machine over a [`transport`](crate::transport) connection, and
//! commits the outcome (state first, then outputs, then key clean-up).

use std::sync::Arc;
use std::time::{Duration, Instant};

use boundkey_hal::{Backend, Digest, KeyName, KeyStore, Parent, TpmConfig};
use boundkey_proto::{ClientMessage, Heartbeat, JoinMethod, ServerMessage};
use p256::pkcs8::{EncodePrivateKey, LineEnding};
use rustls::pki_types::CertificateDer;

use crate::config::{Conflict, Settings};
use crate::crash;
use crate::error::AgentError;
use crate::join::{Ceremony, Effects, HeldKey, JoinError, Mode, Outcome, Plan, Step};
use crate::keyset::{self, KeyRef};
use crate::outputs::Outputs;
use crate::storage::{Identity, InFlight, JoinInfo, Secret, State, Storage};
use crate::transport::{self, ClientIdentity, Endpoint, Trust};

/// Longest a whole ceremony (connect, handshake, every round) may take.
pub const CEREMONY_TIMEOUT: Duration = Duration::from_secs(60);
/// A certificate closer than this to expiry is not presented (it could expire mid-handshake).
pub const EXPIRY_MARGIN_SECS: i64 = 3;

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub fn rfc3339(t: i64) -> String {
    let st = std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    humantime::format_rfc3339_seconds(st).to_string()
}

/// Whether `id` can still be presented over mTLS at `now`.
pub fn usable(id: &Identity, now: i64) -> bool {
    id.expires - EXPIRY_MARGIN_SECS > now
}

/// The key-store backend for a storage directory: the one its keys already live in, else the
/// configured one, else `tpm` when this machine has a TPM.
pub fn resolve_backend(
    configured: Option<Backend>,
    state: Option<&State>,
    dir: &std::path::Path,
) -> Result<Backend, AgentError> {
    match (state.map(State::backend), configured) {
        (Some(stored), Some(c)) if stored != c => Err(AgentError::StateConflict {
            dir: dir.display().to_string(),
            list: vec![Conflict {
                field: "keystore",
                a: ("the storage directory".into(), Some(stored.to_string())),
                b: ("the configuration".into(), Some(c.to_string())),
            }],
        }),
        (Some(stored), _) => Ok(stored),
        (None, Some(c)) => Ok(c),
        (None, None) if boundkey_hal::tpm_present() => Ok(Backend::Tpm),
        (None, None) => Ok(Backend::File),
    }
}

/// Opens the key store in `STORAGE/keys`.
pub fn open_keystore(
    backend: Backend,
    storage: &Storage,
    s: &Settings,
) -> Result<Box<dyn KeyStore>, AgentError> {
    let tpm = match backend {
        Backend::File => None,
        Backend::Tpm => Some(TpmConfig {
            tcti: s
                .tpm
                .tcti
                .clone()
                .unwrap_or_else(|| boundkey_hal::DEFAULT_TCTI.to_string()),
            owner_auth: boundkey_hal::read_secret(
                s.tpm.owner_auth_file.as_deref(),
                "BOUNDKEY_TPM_OWNER_AUTH",
            )?,
            key_auth: boundkey_hal::read_secret(
                s.tpm.key_auth_file.as_deref(),
                "BOUNDKEY_TPM_KEY_AUTH",
            )?,
            parent: s.tpm.parent.map(Parent::Persistent).unwrap_or_default(),
        }),
    };
    Ok(boundkey_hal::open_store(backend, &storage.keys_dir(), tpm)?)
}

/// Creates a key in the store and describes it.
pub fn create_key(store: &mut dyn KeyStore, now: i64) -> Result<KeyRef, AgentError> {
    let name = keyset::new_key_name(now);
    let kn = KeyName::new(&name)?;
    let pk = store.create(&kn)?;
    Ok(KeyRef {
        name,
        public_key: boundkey_proto::ssh_public_key(&pk.to_p256()),
        created_at: now,
    })
}

/// Deletes keys that fell off the history. Only ever called after the state that no longer
/// lists them is on disk; failures leave an orphan for the next start-up to collect.
fn delete_keys(store: &mut dyn KeyStore, keys: &[KeyRef]) {
    for k in keys {
        let r = KeyName::new(&k.name).and_then(|n| store.delete(&n));
        match r {
            Ok(()) => tracing::info!(key = %k.name, "deleted a key that fell off the key history"),
            Err(e) => tracing::warn!(key = %k.name, error = %e, "could not delete an old key"),
        }
    }
}

/// Deletes keys this agent made that the state does not reference (made just before a crash).
fn collect_orphans(store: &mut dyn KeyStore, state: &State) {
    let Ok(names) = store.list() else {
        return;
    };
    for n in names {
        if n.as_str().starts_with(keyset::KEY_PREFIX) && !state.keys.contains_name(n.as_str()) {
            match store.delete(&n) {
                Ok(()) => {
                    tracing::info!(key = %n, "deleted an orphan key (created, never recorded)")
                }
                Err(e) => tracing::warn!(key = %n, error = %e, "could not delete an orphan key"),
            }
        }
    }
}

/// Where and how to reach the auth service, resolved from settings and stored state.
#[derive(Debug, Clone)]
pub struct JoinParams {
    pub method: JoinMethod,
    /// Token name (bound keypair) or secret token (`token` method, when configured).
    pub token: Option<String>,
    pub endpoint: Endpoint,
    pub trust: Trust,
}

/// Everything a heartbeat needs, detached from the agent so a separate task can send it.
#[derive(Debug)]
pub struct HeartbeatTarget {
    pub endpoint: Endpoint,
    pub trust: Trust,
    pub client: ClientIdentity,
    pub keystore: Backend,
    pub one_shot: bool,
}

/// Summary of a completed join.
#[derive(Debug, Clone)]
pub struct JoinReport {
    pub mode: Mode,
    pub bot_name: String,
    pub instance_id: String,
    pub generation: u64,
    pub expires: i64,
}

pub struct Agent {
    settings: Settings,
    storage: Storage,
    state: State,
    keystore: Box<dyn KeyStore>,
    outputs: Option<Outputs>,
}

impl Agent {
    /// Locks and loads the storage directory and opens the key store.
    pub fn open(settings: Settings) -> Result<Agent, AgentError> {
        let storage = Storage::open_locked(&settings.storage)?;
        let loaded = storage.load()?;
        let backend = resolve_backend(settings.keystore, loaded.as_ref(), storage.dir())?;
        let state = loaded.unwrap_or_else(|| State::new(backend));
        check_against_state(&settings, &state, storage.dir())?;
        let mut keystore = open_keystore(backend, &storage, &settings)?;
        collect_orphans(keystore.as_mut(), &state);
        let outputs = settings.destination.as_deref().map(Outputs::new);
        Ok(Agent {
            settings,
            storage,
            state,
            keystore,
            outputs,
        })
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Writes the stored identity to the destination if it is valid and not already there
    /// (e.g. after a crash between the state write and the output write).
    pub fn sync_outputs(&self) -> Result<(), AgentError> {
        let (Some(out), Some(id)) = (&self.outputs, &self.state.identity) else {
            return Ok(());
        };
        if usable(id, unix_now()) && !out.is_current(id) {
            out.write(id).map_err(AgentError::Outputs)?;
            tracing::info!(destination = %out.dir().display(), generation = id.generation, "identity outputs restored from storage");
        }
        Ok(())
    }

    /// Resolves method, token, address and server trust.
    pub fn join_params(&self) -> Result<JoinParams, AgentError> {
        let j = &self.settings.join;
        let stored = self.state.join.as_ref();
        let method = j.method.or(stored.map(|s| s.method)).ok_or_else(|| {
            AgentError::Usage(
                "no join URI configured and this storage directory has never joined: pass --join-uri (from boundkeyctl tokens add)".into(),
            )
        })?;
        let token = j
            .token
            .clone()
            .or_else(|| stored.and_then(|s| s.token.clone()));
        let endpoint = match (&j.auth_server, stored) {
            (Some(e), _) => e.clone(),
            (None, Some(s)) => s.auth_server.clone(),
            (None, None) => {
                return Err(AgentError::Usage(
                    "no auth service address configured: pass --join-uri".into(),
                ))
            }
        };
        let trust = self.trust()?;
        Ok(JoinParams {
            method,
            token,
            endpoint,
            trust,
        })
    }

    fn trust(&self) -> Result<Trust, AgentError> {
        let j = &self.settings.join;
        if let Some(path) = &j.ca_file {
            let bytes = crate::fsutil::read_limited(path, 1024 * 1024)
                .map_err(|e| AgentError::Usage(format!("CA file {e}")))?
                .ok_or_else(|| {
                    AgentError::Usage(format!("CA file {} does not exist", path.display()))
                })?;
            let certs = transport::certs_from_pem(&String::from_utf8_lossy(&bytes))?;
            if certs.is_empty() {
                return Err(AgentError::Usage(format!(
                    "CA file {} holds no PEM certificate",
                    path.display()
                )));
            }
            return Ok(Trust::Ca(certs));
        }
        let stored = self
            .state
            .join
            .as_ref()
            .and_then(|s| s.server_ca.as_deref())
            .map(transport::certs_from_pem)
            .transpose()?
            .filter(|c| !c.is_empty());
        match (stored, j.ca_pin) {
            (Some(certs), None) => Ok(Trust::Ca(certs)),
            (Some(certs), Some(pin)) => {
                let same = certs.iter().any(|c| {
                    transport::spki_of(c.as_ref())
                        .is_some_and(|s| boundkey_proto::CaPin::of_spki(s).matches(&pin))
                });
                if same {
                    Ok(Trust::Ca(certs))
                } else {
                    // A new pin was configured (the service's CA changed): pin again.
                    Ok(Trust::Pin(pin))
                }
            }
            (None, Some(pin)) => Ok(Trust::Pin(pin)),
            (None, None) => Err(AgentError::Usage(
                "no way to authenticate the auth service: the join URI needs ?ca_pin=sha256:… (printed by boundkey-authd), or give --ca-file".into(),
            )),
        }
    }

    /// Which ceremony to run now.
    pub fn choose_mode(&self, method: JoinMethod, now: i64) -> Mode {
        match (&self.state.identity, method) {
            (None, _) => Mode::FirstJoin,
            (Some(id), JoinMethod::Token) => {
                if usable(id, now) {
                    Mode::Renewal
                } else {
                    Mode::FirstJoin
                }
            }
            (Some(id), JoinMethod::BoundKeypair) => {
                // After a possibly lost result, retry the renewal with the same certificate only
                // when the identity key was recorded (the auth service can then redeliver).
                let retryable = self
                    .state
                    .in_flight
                    .as_ref()
                    .is_none_or(|f| f.identity_key.is_some());
                if usable(id, now) && retryable {
                    Mode::Renewal
                } else {
                    Mode::Recovery
                }
            }
        }
    }

    /// Joins, renews or recovers, whichever applies, and commits the result.
    pub async fn join_or_renew(&mut self) -> Result<JoinReport, AgentError> {
        let params = self.join_params()?;
        let mode = self.choose_mode(params.method, unix_now());
        match self.attempt(&params, mode).await {
            Err(AgentError::Transport(transport::TransportError::ClientCertRejected {
                detail,
                ..
            })) if mode == Mode::Renewal && params.method == JoinMethod::BoundKeypair => {
                // The TLS layer refused the certificate, so no ceremony ran: recovering is safe.
                tracing::warn!(%detail, "the auth service rejected this device's certificate; recovering without it");
                self.attempt(&params, Mode::Recovery).await
            }
            other => other,
        }
    }

    async fn attempt(&mut self, p: &JoinParams, mode: Mode) -> Result<JoinReport, AgentError> {
        let now = unix_now();
        let bound = p.method == JoinMethod::BoundKeypair;
        let secret = match mode {
            Mode::FirstJoin if bound => self
                .settings
                .join
                .registration_secret
                .as_ref()
                .map(|s| s.to_string()),
            _ => None,
        };
        if bound && mode == Mode::FirstJoin && secret.is_none() && self.state.keys.active.is_none()
        {
            return Err(AgentError::Usage(
                "first join needs a registration secret (in the join URI, --registration-secret-file or BOUNDKEY_REGISTRATION_SECRET) or a pre-registered key (boundkeyd keypair create, then boundkeyctl tokens add --initial-public-key)".into(),
            ));
        }
        let token = match (p.method, mode) {
            (JoinMethod::Token, Mode::Renewal) => None,
            (JoinMethod::Token, _) => Some(p.token.clone().ok_or_else(|| {
                AgentError::Usage(if self.state.identity.is_some() {
                    "the identity expired and the token join method cannot recover: get a new token (boundkeyctl tokens add --join-method token) and pass its --join-uri".into()
                } else {
                    "no token configured: pass --join-uri".into()
                })
            })?),
            (JoinMethod::BoundKeypair, _) => Some(p.token.clone().ok_or_else(|| {
                AgentError::Usage("no token name configured: pass --join-uri".into())
            })?),
        };
        let client = match (mode, &self.state.identity) {
            (Mode::Renewal, Some(id)) => Some(ClientIdentity::from_pem(
                &id.certificate,
                &id.private_key.0,
            )?),
            _ => None,
        };
        let identity_key = self.identity_key_for_attempt();
        let identity_key_pem = identity_key
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| AgentError::Internal(format!("cannot encode the identity key: {e}")))?
            .to_string();
        let plan = Plan {
            method: p.method,
            mode,
            token,
            registration_secret: secret,
            identity_key: identity_key.clone(),
            ttl_secs: self.settings.certificate_ttl.as_secs(),
            join_state: match mode {
                Mode::FirstJoin => None,
                _ => self
                    .state
                    .identity
                    .as_ref()
                    .and_then(|i| i.join_state.clone()),
            },
            keys: self
                .state
                .keys
                .all()
                .filter_map(|k| {
                    k.p256().map(|pk| HeldKey {
                        name: k.name.clone(),
                        public_key: pk,
                    })
                })
                .collect(),
            prior_uncertain: self.state.in_flight.is_some(),
        };
        let lost_first_join = mode == Mode::FirstJoin && self.state.in_flight.is_some();
        tracing::info!(
            ceremony = mode.as_str(),
            method = %p.method,
            auth_server = %p.endpoint,
            mtls = client.is_some(),
            "contacting the auth service"
        );
        let (mut ceremony, first) = Ceremony::start(plan);
        let token_name = p.token.clone().filter(|_| bound);
        let drive = {
            let mut fx = AgentEffects {
                store: self.keystore.as_mut(),
                storage: &self.storage,
                state: &mut self.state,
                mode,
                now,
                identity_key_pem: &identity_key_pem,
            };
            tokio::time::timeout(
                CEREMONY_TIMEOUT,
                drive(p, client.as_ref(), &mut ceremony, first, &mut fx),
            )
            .await
        };
        let result = match drive {
            Ok(r) => r,
            Err(_) => Err(AgentError::Transport(transport::TransportError::Timeout {
                addr: p.endpoint.to_string(),
                secs: CEREMONY_TIMEOUT.as_secs(),
            })),
        };
        let (outcome, learned_ca) = match result {
            Ok(x) => x,
            Err(e) => {
                self.settle_uncertainty(ceremony.uncertain_after_failure(), &identity_key_pem);
                return Err(match e {
                    AgentError::Refused { code, message } => {
                        AgentError::refused(code, &message, token_name.as_deref(), lost_first_join)
                    }
                    other => other,
                });
            }
        };
        self.commit(p, mode, outcome, identity_key, learned_ca)
    }

    /// A fresh identity key, or the one recorded by a ceremony whose result may have been lost
    /// (reusing it is what lets the auth service recognise the retry).
    fn identity_key_for_attempt(&self) -> p256::SecretKey {
        use p256::pkcs8::DecodePrivateKey;
        let recorded = self
            .state
            .in_flight
            .as_ref()
            .and_then(|f| f.identity_key.as_ref());
        match recorded.map(|k| p256::SecretKey::from_pkcs8_pem(&k.0)) {
            Some(Ok(k)) => k,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "the interrupted ceremony's identity key is unreadable; using a new one");
                p256::SecretKey::random(&mut rand_core::OsRng)
            }
            None => p256::SecretKey::random(&mut rand_core::OsRng),
        }
    }

    /// Makes the stored in-flight mark say `uncertain` (after a failed ceremony).
    fn settle_uncertainty(&mut self, uncertain: bool, identity_key_pem: &str) {
        if self.state.in_flight.is_some() == uncertain {
            return;
        }
        let mut next = self.state.clone();
        next.in_flight = uncertain.then(|| InFlight {
            since: unix_now(),
            ceremony: "unknown".into(),
            identity_key: Some(Secret(identity_key_pem.to_string())),
        });
        match self.storage.save(&next) {
            Ok(()) => self.state = next,
            Err(e) => tracing::warn!(error = %e, "could not update the in-flight mark"),
        }
        if uncertain {
            tracing::warn!("the auth service may have accepted the last ceremony without this device receiving the result; the next attempt repeats it with the same identity key so the service can deliver the result again");
        }
    }

    fn commit(
        &mut self,
        p: &JoinParams,
        mode: Mode,
        outcome: Outcome,
        identity_key: p256::SecretKey,
        learned_ca: Option<CertificateDer<'static>>,
    ) -> Result<JoinReport, AgentError> {
        crash::point("after-result-received");
        let r = outcome.result;
        let mut next = self.state.clone();
        let dropped = match &outcome.bound_key {
            Some(k) => next.keys.promote(&k.public_key).ok_or_else(|| {
                AgentError::Protocol("the bound key named by the result is not recorded".into())
            })?,
            None => Vec::new(),
        };
        let key_pem = identity_key
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| AgentError::Internal(format!("cannot encode the identity key: {e}")))?;
        let previous_ca = next.join.as_ref().and_then(|j| j.server_ca.clone());
        next.join = Some(JoinInfo {
            method: p.method,
            token: match p.method {
                JoinMethod::BoundKeypair => p.token.clone(),
                JoinMethod::Token => None,
            },
            auth_server: p.endpoint.clone(),
            server_ca: learned_ca
                .map(|c| transport::cert_to_pem(c.as_ref()))
                .or(previous_ca),
        });
        next.identity = Some(Identity {
            bot_name: r.bot_name.clone(),
            instance_id: r.instance_id.clone(),
            generation: r.generation,
            join_method: r.join_method.clone(),
            not_before: r.not_before,
            expires: r.expires,
            certificate: r.certificate.clone(),
            ca_bundle: r.ca_bundle.clone(),
            private_key: Secret(key_pem.to_string()),
            join_state: r.join_state.clone(),
        });
        next.in_flight = None;
        self.storage.save(&next)?;
        let rotated = self.state.keys.active != next.keys.active;
        self.state = next;
        crash::point("after-state-written");
        if let (Some(out), Some(id)) = (&self.outputs, &self.state.identity) {
            out.write(id).map_err(AgentError::Outputs)?;
        }
        crash::point("after-outputs-written");
        delete_keys(self.keystore.as_mut(), &dropped);
        tracing::info!(
            ceremony = mode.as_str(),
            bot = %r.bot_name,
            instance = %r.instance_id,
            generation = r.generation,
            not_before = %rfc3339(r.not_before),
            expires = %rfc3339(r.expires),
            "new identity"
        );
        if rotated {
            if let Some(k) = &self.state.keys.active {
                tracing::info!(kid = %k.kid().unwrap_or_default(), key = %k.name, "bound key is now this key");
            }
        }
        Ok(JoinReport {
            mode,
            bot_name: r.bot_name,
            instance_id: r.instance_id,
            generation: r.generation,
            expires: r.expires,
        })
    }

    /// What a heartbeat needs, if the stored identity is usable.
    pub fn heartbeat_target(&self) -> Option<HeartbeatTarget> {
        let id = self.state.identity.as_ref()?;
        if !usable(id, unix_now()) {
            return None;
        }
        let p = self.join_params().ok()?;
        let client = ClientIdentity::from_pem(&id.certificate, &id.private_key.0).ok()?;
        Some(HeartbeatTarget {
            endpoint: p.endpoint,
            trust: p.trust,
            client,
            keystore: self.state.backend(),
            one_shot: self.settings.oneshot,
        })
    }
}

/// A renewal must not silently switch the device to another token or method.
fn check_against_state(
    s: &Settings,
    state: &State,
    dir: &std::path::Path,
) -> Result<(), AgentError> {
    let Some(j) = &state.join else {
        return Ok(());
    };
    let mut list = Vec::new();
    if let Some(m) = s.join.method {
        if m != j.method {
            list.push(Conflict {
                field: "join_method",
                a: ("the storage directory".into(), Some(j.method.to_string())),
                b: ("the configuration".into(), Some(m.to_string())),
            });
        }
    }
    if let (Some(t), Some(stored), JoinMethod::BoundKeypair) = (&s.join.token, &j.token, j.method) {
        if t != stored {
            list.push(Conflict {
                field: "token",
                a: ("the storage directory".into(), Some(stored.clone())),
                b: ("the configuration".into(), Some(t.clone())),
            });
        }
    }
    if list.is_empty() {
        Ok(())
    } else {
        Err(AgentError::StateConflict {
            dir: dir.display().to_string(),
            list,
        })
    }
}

/// The agent's side effects for a ceremony: the HAL and the storage directory.
struct AgentEffects<'a> {
    store: &'a mut dyn KeyStore,
    storage: &'a Storage,
    state: &'a mut State,
    mode: Mode,
    now: i64,
    /// PKCS#8 PEM of this ceremony's identity key, recorded with the in-flight mark.
    identity_key_pem: &'a str,
}

impl AgentEffects<'_> {
    fn save(&mut self, next: State) -> Result<(), AgentError> {
        self.storage.save(&next)?;
        *self.state = next;
        Ok(())
    }
}

impl Effects for AgentEffects<'_> {
    type Error = AgentError;

    fn create_key(&mut self) -> Result<HeldKey, AgentError> {
        let k = create_key(self.store, self.now)?;
        crash::point("after-key-created");
        let public_key = k.p256().ok_or_else(|| {
            AgentError::Internal("the key store returned an invalid public key".into())
        })?;
        tracing::info!(key = %k.name, kid = %boundkey_proto::kid(&public_key), "created a new bound key for the auth service's rotation request");
        Ok(HeldKey {
            name: k.name,
            public_key,
        })
    }

    fn persist_pending(&mut self, key: &HeldKey, uncertain: bool) -> Result<(), AgentError> {
        let mut next = self.state.clone();
        let dropped = next.keys.set_pending(KeyRef {
            name: key.name.clone(),
            public_key: boundkey_proto::ssh_public_key(&key.public_key),
            created_at: self.now,
        });
        if !uncertain {
            next.in_flight = None;
        }
        self.save(next)?;
        delete_keys(self.store, &dropped);
        crash::point("after-key-persisted");
        Ok(())
    }

    fn mark_uncertain(&mut self) -> Result<(), AgentError> {
        let mut next = self.state.clone();
        next.in_flight = Some(InFlight {
            since: self.now,
            ceremony: self.mode.as_str().into(),
            identity_key: Some(Secret(self.identity_key_pem.to_string())),
        });
        self.save(next)
    }

    fn sign(&mut self, key: &str, digest: &[u8; 32]) -> Result<[u8; 64], AgentError> {
        let name = KeyName::new(key)?;
        Ok(self.store.sign_digest(&name, &Digest(*digest))?.0)
    }
}

fn map_join_err(e: JoinError<AgentError>) -> AgentError {
    match e {
        JoinError::Refused { code, message } => AgentError::Refused { code, message },
        JoinError::Protocol(s) => AgentError::Protocol(s),
        JoinError::KeyNotHeld { kid } => AgentError::KeyNotHeld { kid },
        JoinError::BadSignature(k) => AgentError::BadSignature(k),
        JoinError::Effect(e) => e,
    }
}

async fn drive(
    p: &JoinParams,
    client: Option<&ClientIdentity>,
    ceremony: &mut Ceremony,
    first: ClientMessage,
    fx: &mut AgentEffects<'_>,
) -> Result<(Outcome, Option<CertificateDer<'static>>), AgentError> {
    let mut conn = transport::connect(&p.endpoint, &p.trust, client).await?;
    conn.send(&first).await?;
    crash::point("after-init-sent");
    loop {
        let msg = conn.recv().await?;
        match ceremony.handle(msg, fx).map_err(map_join_err)? {
            Step::Send(m) => {
                conn.send(&m).await?;
                match m {
                    ClientMessage::RotationResponse(_) => {
                        crash::point("after-rotation-response-sent")
                    }
                    ClientMessage::ChallengeSolution(_) => crash::point("after-solution-sent"),
                    _ => {}
                }
            }
            Step::Done(o) => {
                let ca = conn.learned_ca().cloned();
                conn.close().await;
                return Ok((*o, ca));
            }
        }
    }
}

/// Sends one heartbeat over mTLS and waits for the acknowledgement.
pub async fn send_heartbeat(
    t: &HeartbeatTarget,
    is_startup: bool,
    started: Instant,
) -> Result<(), AgentError> {
    let hb = Heartbeat {
        is_startup,
        version: env!("CARGO_PKG_VERSION").to_string(),
        hostname: hostname(),
        uptime_secs: started.elapsed().as_secs(),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        one_shot: t.one_shot,
        keystore: t.keystore,
    };
    let fut = async {
        let mut conn = transport::connect(&t.endpoint, &t.trust, Some(&t.client)).await?;
        conn.send(&ClientMessage::Heartbeat(hb)).await?;
        let reply = conn.recv().await?;
        conn.close().await;
        match reply {
            ServerMessage::HeartbeatAck(_) => Ok(()),
            ServerMessage::Error(e) => Err(AgentError::refused(e.code, &e.message, None, false)),
            _ => Err(AgentError::Protocol(
                "unexpected reply to a heartbeat".into(),
            )),
        }
    };
    match tokio::time::timeout(CEREMONY_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(AgentError::Transport(transport::TransportError::Timeout {
            addr: t.endpoint.to_string(),
            secs: CEREMONY_TIMEOUT.as_secs(),
        })),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Shared handle for the daemon's heartbeat task.
pub type SharedTarget = Option<Arc<HeartbeatTarget>>;
