//! A protocol-speaking test device and a world (service + store + clock) to run it against.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]
#![allow(dead_code)]

use std::sync::Arc;

use boundkey_auth::authority::{Authority, AuthorityState, CaKind};
use boundkey_auth::model::{AuditEvent, Lock, Token};
use boundkey_auth::service::{Action, Connection, Service};
use boundkey_auth::store::memory::MemoryStore;
use boundkey_auth::store::{AuditQuery, Store};
use boundkey_auth::ServiceConfig;
use boundkey_proto::{
    jws, keys, BotParams, ChallengeSolution, ClientMessage, ErrorMessage, Init, JoinResult,
    RotationResponse, ServerMessage,
};
use p256::ecdsa::SigningKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

pub const T0: i64 = 1_800_000_000;

pub struct World {
    pub store: Arc<MemoryStore>,
    pub svc: Service,
    pub state: AuthorityState,
    pub now: i64,
}

impl World {
    pub fn new() -> Self {
        Self::with_config(ServiceConfig::default())
    }

    pub fn with_config(cfg: ServiceConfig) -> Self {
        let store = Arc::new(MemoryStore::new());
        let state = AuthorityState::generate("test-cluster", T0).unwrap();
        let svc = Service::new(
            store.clone(),
            Arc::new(Authority::load(&state).unwrap()),
            cfg,
        );
        World {
            store,
            svc,
            state,
            now: T0,
        }
    }

    pub fn add_token(&self, t: &Token) {
        self.store.create_token(t).unwrap();
    }

    pub fn token(&self, name: &str) -> Token {
        self.store.get_token(name).unwrap().unwrap()
    }

    pub fn locks(&self) -> Vec<Lock> {
        self.store.list_locks().unwrap()
    }

    pub fn audit(&self, kind: &str) -> Vec<AuditEvent> {
        self.store
            .list_audit(&AuditQuery {
                kind: Some(kind.into()),
                ..Default::default()
            })
            .unwrap()
    }

    pub fn rotate(&mut self, kind: CaKind, grace: u64) {
        self.state.rotate(kind, grace, 0, self.now).unwrap();
        self.svc
            .replace_authority(Arc::new(Authority::load(&self.state).unwrap()));
    }

    pub fn advance(&mut self, secs: i64) {
        self.now += secs;
    }
}

/// How a device answers a rotation request.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum OnRotation {
    NewKey,
    /// Misbehave: return the current key.
    ReuseKey,
}

/// A software device: bound keys (active + pending), identity key, certificate and join state.
#[derive(Clone)]
pub struct Device {
    pub bound: SigningKey,
    pub pending: Option<SigningKey>,
    /// Identity key of the current certificate.
    pub identity: SigningKey,
    /// Identity key of a ceremony in progress or whose result was lost. Like the real agent,
    /// the device makes a fresh one per ceremony and reuses it only to retry a lost one.
    pub in_flight: Option<SigningKey>,
    /// Whether solutions carry an identity proof (the real agent always sends one).
    pub prove_identity: bool,
    pub cert: Option<String>,
    pub join_state: Option<String>,
    pub last: Option<JoinResult>,
    pub on_rotation: OnRotation,
    /// When set, the answer to the next rotation request, whatever `on_rotation` says.
    pub next_rotation_key: Option<SigningKey>,
    pub rotation_requests: usize,
    pub ttl: u64,
}

pub fn new_key() -> SigningKey {
    SigningKey::random(&mut rand_core::OsRng)
}

pub fn ssh(k: &SigningKey) -> String {
    keys::ssh_public_key(&p256::PublicKey::from(k.verifying_key()))
}

impl Device {
    pub fn new() -> Self {
        Device {
            bound: new_key(),
            pending: None,
            identity: new_key(),
            in_flight: None,
            prove_identity: true,
            cert: None,
            join_state: None,
            last: None,
            on_rotation: OnRotation::NewKey,
            next_rotation_key: None,
            rotation_requests: 0,
            ttl: 3600,
        }
    }

    pub fn init(&self, identity: &SigningKey, token: &str, secret: Option<&str>) -> ClientMessage {
        ClientMessage::Init(Init {
            token: token.into(),
            params: BotParams {
                identity_public_key: keys::pkix_b64(&p256::PublicKey::from(
                    identity.verifying_key(),
                )),
                ttl_secs: self.ttl,
            },
            registration_secret: secret.map(str::to_string),
            join_state: self.join_state.clone(),
        })
    }

    pub fn connection(&self, use_cert: bool) -> Connection {
        let peer_certificates = match (&self.cert, use_cert) {
            (Some(pem), true) => vec![CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()],
            _ => vec![],
        };
        Connection {
            remote_addr: "192.0.2.7:5000".into(),
            peer_certificates,
        }
    }

    /// Answers one server message; None when the ceremony is over.
    pub fn answer(&mut self, msg: &ServerMessage) -> Option<ClientMessage> {
        match msg {
            ServerMessage::RotationRequest(_) => {
                self.rotation_requests += 1;
                let k = match (self.next_rotation_key.take(), self.on_rotation) {
                    (Some(k), _) => k,
                    (None, OnRotation::NewKey) => new_key(),
                    (None, OnRotation::ReuseKey) => self.bound.clone(),
                };
                let pk = ssh(&k);
                self.pending = Some(k);
                Some(ClientMessage::RotationResponse(RotationResponse {
                    public_key: pk,
                }))
            }
            ServerMessage::Challenge(c) => {
                let key = [Some(&self.bound), self.pending.as_ref()]
                    .into_iter()
                    .flatten()
                    .find(|k| ssh(k) == c.public_key)
                    // A device that does not hold the challenged key signs with what it has.
                    .unwrap_or(&self.bound)
                    .clone();
                let identity_proof = match (&self.in_flight, self.prove_identity) {
                    (Some(id), true) => Some(jws::sign(id, None, c.document.as_bytes())),
                    _ => None,
                };
                Some(ClientMessage::ChallengeSolution(ChallengeSolution {
                    solution: jws::sign(&key, None, c.document.as_bytes()),
                    identity_proof,
                    attestation: None,
                }))
            }
            _ => None,
        }
    }

    pub fn absorb(&mut self, r: &JoinResult) {
        if let Some(id) = self.in_flight.take() {
            self.identity = id;
        }
        if let Some(p) = self.pending.take() {
            if r.bound_public_key.as_deref() == Some(ssh(&p).as_str()) {
                self.bound = p;
            }
        }
        self.cert = Some(r.certificate.clone());
        if r.join_state.is_some() {
            self.join_state = r.join_state.clone();
        }
        self.last = Some(r.clone());
    }

    /// Runs a whole bound-keypair ceremony.
    pub fn join(
        &mut self,
        w: &World,
        token: &str,
        secret: Option<&str>,
        use_cert: bool,
    ) -> Result<JoinResult, ErrorMessage> {
        self.run(w, token, secret, use_cert, false)
    }

    /// Runs a ceremony whose result never reaches the device (power lost as it arrived): the
    /// server committed; the device keeps its old state plus what it persisted on the way (the
    /// in-flight identity key and any pending rotation key).
    pub fn join_lost(&mut self, w: &World, token: &str, secret: Option<&str>, use_cert: bool) {
        self.run(w, token, secret, use_cert, true)
            .expect("the lost ceremony itself succeeds on the server");
    }

    fn run(
        &mut self,
        w: &World,
        token: &str,
        secret: Option<&str>,
        use_cert: bool,
        lose_result: bool,
    ) -> Result<JoinResult, ErrorMessage> {
        let identity = self.in_flight.clone().unwrap_or_else(new_key);
        self.in_flight = Some(identity.clone());
        let init = self.init(&identity, token, secret);
        let (mut session, mut action) = w.svc.open(self.connection(use_cert), init, w.now);
        loop {
            match action {
                Action::Close(ServerMessage::Result(r)) => {
                    if !lose_result {
                        self.absorb(&r);
                    }
                    return Ok(r);
                }
                Action::Close(ServerMessage::Error(e)) | Action::Reply(ServerMessage::Error(e)) => {
                    // An error means the server committed nothing: the attempt is settled.
                    self.pending = None;
                    self.in_flight = None;
                    return Err(e);
                }
                Action::Reply(m) => {
                    let next = self.answer(&m).expect("device had no answer");
                    action = session.handle(next, w.now);
                }
                Action::Close(other) => panic!("unexpected close with {other:?}"),
            }
        }
    }

    /// Renewal with the current certificate.
    pub fn renew(&mut self, w: &World, token: &str) -> Result<JoinResult, ErrorMessage> {
        self.join(w, token, None, true)
    }

    /// Recovery: no certificate.
    pub fn recover(&mut self, w: &World, token: &str) -> Result<JoinResult, ErrorMessage> {
        self.join(w, token, None, false)
    }
}
