//! A protocol-speaking test device and a world (service + store + clock) to run it against.
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
        let store = Arc::new(MemoryStore::new());
        let state = AuthorityState::generate("test-cluster", T0).unwrap();
        let svc = Service::new(
            store.clone(),
            Arc::new(Authority::load(&state).unwrap()),
            ServiceConfig::default(),
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
        self.state.rotate(kind, grace, self.now).unwrap();
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
    pub identity: SigningKey,
    pub cert: Option<String>,
    pub join_state: Option<String>,
    pub last: Option<JoinResult>,
    pub on_rotation: OnRotation,
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
            cert: None,
            join_state: None,
            last: None,
            on_rotation: OnRotation::NewKey,
            rotation_requests: 0,
            ttl: 3600,
        }
    }

    fn init(&self, token: &str, secret: Option<&str>) -> ClientMessage {
        ClientMessage::Init(Init {
            token: token.into(),
            params: BotParams {
                identity_public_key: keys::pkix_b64(&p256::PublicKey::from(
                    self.identity.verifying_key(),
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
                let k = match self.on_rotation {
                    OnRotation::NewKey => new_key(),
                    OnRotation::ReuseKey => self.bound.clone(),
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
                Some(ClientMessage::ChallengeSolution(ChallengeSolution {
                    solution: jws::sign(&key, None, c.document.as_bytes()),
                }))
            }
            _ => None,
        }
    }

    fn absorb(&mut self, r: &JoinResult) {
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
        let (mut session, mut action) =
            w.svc
                .open(self.connection(use_cert), self.init(token, secret), w.now);
        loop {
            match action {
                Action::Close(ServerMessage::Result(r)) => {
                    self.absorb(&r);
                    return Ok(r);
                }
                Action::Close(ServerMessage::Error(e)) | Action::Reply(ServerMessage::Error(e)) => {
                    self.pending = None;
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
