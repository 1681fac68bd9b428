//! An in-memory client/server pair: the agent's own join ceremony ([`crate::join`]) driven
//! against the auth service ([`boundkey_auth::service::Service`]) with no sockets, files or
//! processes. The service draws its nonces, instance ids and serials from a seeded
//! [`Entropy`], the device makes its keys from a seeded generator, and the clock is a number the
//! test moves, so one seed always gives one transcript. That is what lets the protocol be
//! tested (and fuzzed) end to end without either side's I/O.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use boundkey_auth::admin::{new_bound_keypair_token, request_rotation, NewBoundKeypairToken};
use boundkey_auth::authority::{Authority, AuthorityState};
use boundkey_auth::model::{event, Token};
use boundkey_auth::service::{Action, Connection, Service};
use boundkey_auth::store::memory::MemoryStore;
use boundkey_auth::store::{AuditQuery, Store};
use boundkey_auth::{Entropy, ServiceConfig};
use boundkey_proto::claims::RecoveryMode;
use boundkey_proto::{CeremonyKind, ClientMessage, ErrorCode, JoinMethod, ServerMessage};
use p256::ecdsa::signature::hazmat::PrehashSigner;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::identity_key::IdentityKey;
use crate::join::{Ceremony, Effects, HeldKey, JoinError, Outcome, Plan, Step};

const T0: i64 = 1_800_000_000;
const SECRET: &str = "correct horse battery";
const TTL: u64 = 600;

/// The auth side: a service over an in-memory store, and the clock both sides read.
struct World {
    store: Arc<MemoryStore>,
    svc: Service,
    now: i64,
}

impl World {
    fn new(authority: &AuthorityState, seed: u64) -> Self {
        let store = Arc::new(MemoryStore::new());
        let svc = Service::with_entropy(
            store.clone(),
            Arc::new(Authority::load(authority).unwrap()),
            ServiceConfig::default(),
            Entropy::from_rng(ChaCha20Rng::seed_from_u64(seed)),
        );
        World {
            store,
            svc,
            now: T0,
        }
    }

    /// A bound-keypair token `tok` for bot `robot` with a registration secret.
    fn add_secret_token(&self, limit: u32) {
        let (t, _) = new_bound_keypair_token(
            NewBoundKeypairToken {
                name: Some("tok".into()),
                bot_name: "robot".into(),
                registration_secret: Some(SECRET.into()),
                recovery_limit: Some(limit),
                recovery_mode: Some(RecoveryMode::Standard),
                must_register_before: Some(self.now + 3600),
                ..Default::default()
            },
            self.now,
        )
        .unwrap();
        self.store.create_token(&t).unwrap();
    }

    fn token(&self) -> Token {
        self.store.get_token("tok").unwrap().unwrap()
    }

    fn request_rotation(&self) {
        let t = self.token();
        let spec = request_rotation(&t, self.now).unwrap();
        self.store
            .update_token_spec("tok", &spec, t.revision)
            .unwrap();
    }

    fn audit(&self, kind: &str) -> Vec<boundkey_auth::model::AuditEvent> {
        self.store
            .list_audit(&AuditQuery {
                kind: Some(kind.into()),
                ..Default::default()
            })
            .unwrap()
    }
}

/// The device side: what the agent keeps in its storage directory, in memory. Keys are p256
/// secrets made from the device's own seeded generator.
#[derive(Clone)]
struct Device {
    rng: ChaCha20Rng,
    keys: BTreeMap<String, p256::SecretKey>,
    created: usize,
    /// The key the auth service has bound, as far as the device knows.
    bound: Option<HeldKey>,
    pending: Option<HeldKey>,
    cert: Option<String>,
    join_state: Option<String>,
    /// The identity key of the ceremony in progress.
    current: Option<p256::SecretKey>,
    /// Set by `mark_uncertain`: a ceremony whose result may be lost, and its identity key.
    in_flight: Option<p256::SecretKey>,
}

impl Device {
    fn new(seed: u64) -> Self {
        Device {
            rng: ChaCha20Rng::seed_from_u64(seed),
            keys: BTreeMap::new(),
            created: 0,
            bound: None,
            pending: None,
            cert: None,
            join_state: None,
            current: None,
            in_flight: None,
        }
    }

    fn held(&self) -> Vec<HeldKey> {
        self.keys
            .iter()
            .map(|(name, sk)| HeldKey {
                name: name.clone(),
                public_key: sk.public_key(),
            })
            .collect()
    }
}

impl Effects for Device {
    type Error = Infallible;
    fn create_key(&mut self) -> Result<HeldKey, Infallible> {
        self.created += 1;
        let name = format!("key-{}", self.created);
        let sk = p256::SecretKey::random(&mut self.rng);
        let public_key = sk.public_key();
        self.keys.insert(name.clone(), sk);
        Ok(HeldKey { name, public_key })
    }
    fn persist_pending(&mut self, key: &HeldKey, _uncertain: bool) -> Result<(), Infallible> {
        self.pending = Some(key.clone());
        Ok(())
    }
    fn mark_uncertain(&mut self) -> Result<(), Infallible> {
        self.in_flight = self.current.clone();
        Ok(())
    }
    fn sign(&mut self, key: &str, digest: &[u8; 32]) -> Result<[u8; 64], Infallible> {
        let sk = self
            .keys
            .get(key)
            .expect("the ceremony only signs with held keys");
        let sig: p256::ecdsa::Signature = p256::ecdsa::SigningKey::from(sk)
            .sign_prehash(digest)
            .unwrap();
        Ok(sig.normalize_s().unwrap_or(sig).to_bytes().into())
    }
    /// In-memory keys are software keys: nothing to attest with (the TPM paths are tested
    /// against swtpm in `tests/attestation.rs`).
    fn attest(
        &mut self,
        _key: &str,
        _qualifying: &[u8; 32],
    ) -> Result<Option<boundkey_hal::KeyAttestation>, Infallible> {
        Ok(None)
    }
    fn activate_credential(&mut self, _: &[u8], _: &[u8]) -> Result<Vec<u8>, Infallible> {
        unreachable!("no attestation was sent, so no credential can be asked for")
    }
}

/// Every message of one ceremony, in order, as JSON. A certificate's and a join-state
/// document's signatures are made with a random nonce inside the signing library (ring), so
/// only their signed parts are recorded.
type Transcript = Vec<String>;

/// The TBSCertificate of a PEM certificate: the first element of the outer DER SEQUENCE.
fn tbs(pem: &str) -> Vec<u8> {
    fn header(der: &[u8]) -> (usize, usize) {
        let l0 = der[1];
        if l0 < 0x80 {
            return (2, usize::from(l0));
        }
        let n = usize::from(l0 & 0x7f);
        let len = der[2..2 + n]
            .iter()
            .fold(0usize, |a, b| a << 8 | usize::from(*b));
        (2 + n, len)
    }
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let (outer, _) = header(der.as_ref());
    let inner = &der.as_ref()[outer..];
    let (h, len) = header(inner);
    inner[..h + len].to_vec()
}

/// A compact JWS without its signature: `header.payload`.
fn signed_part(jws: &str) -> String {
    jws.rsplit_once('.')
        .map_or(jws, |(input, _)| input)
        .to_string()
}

fn record(t: &mut Transcript, m: &ServerMessage) {
    let mut m = m.clone();
    if let ServerMessage::Result(r) = &mut m {
        r.certificate = tbs(&r.certificate)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        r.join_state = r.join_state.as_deref().map(signed_part);
    }
    t.push(serde_json::to_string(&m).unwrap());
}

fn record_sent(t: &mut Transcript, m: &ClientMessage) {
    let mut m = m.clone();
    if let ClientMessage::Init(i) = &mut m {
        i.join_state = i.join_state.as_deref().map(signed_part);
    }
    t.push(serde_json::to_string(&m).unwrap());
}

/// How a run ends on the device.
#[derive(Debug)]
enum Ending {
    Joined(Box<Outcome>),
    /// The auth service committed and sent the result; the device lost power before reading it.
    Lost,
    Failed(JoinError<Infallible>),
}

impl Ending {
    fn joined(self) -> Outcome {
        match self {
            Ending::Joined(o) => *o,
            other => panic!("expected a join, got {other:?}"),
        }
    }

    fn refused(self) -> ErrorCode {
        match self {
            Ending::Failed(JoinError::Refused { code, .. }) => code,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}

/// Runs one ceremony between the device and the world, as the agent would: the plan from what
/// the device holds, the certificate presented on a renewal, the result absorbed on success.
fn run(
    d: &mut Device,
    w: &World,
    kind: CeremonyKind,
    secret: Option<&str>,
    lose_result: bool,
    t: &mut Transcript,
) -> Ending {
    let prior_uncertain = d.in_flight.is_some();
    let identity_secret = match &d.in_flight {
        Some(k) => k.clone(),
        None => p256::SecretKey::random(&mut d.rng),
    };
    d.current = Some(identity_secret.clone());
    let identity_key = IdentityKey::deterministic(&identity_secret);
    let plan = Plan {
        method: JoinMethod::BoundKeypair,
        token: Some("tok".into()),
        registration_secret: secret.map(str::to_string),
        identity_key,
        ttl_secs: TTL,
        join_state: d.join_state.clone(),
        keys: d.held(),
        prior_uncertain,
    };
    let peer_certificates = match (&d.cert, kind) {
        (Some(pem), CeremonyKind::Renewal) => {
            vec![CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()]
        }
        _ => Vec::new(),
    };
    let conn = Connection {
        remote_addr: "192.0.2.7:5000".into(),
        peer_certificates,
    };
    let (mut ceremony, first) = Ceremony::start(plan);
    record_sent(t, &first);
    let (mut session, mut action) = w.svc.open(conn, first, w.now);
    loop {
        let (msg, closed) = match action {
            Action::Reply(m) => (m, false),
            Action::Close(m) => (m, true),
        };
        record(t, &msg);
        if lose_result && matches!(msg, ServerMessage::Result(_)) {
            return Ending::Lost;
        }
        match ceremony.handle(msg, d) {
            Ok(Step::Send(m)) => {
                assert!(!closed, "the agent answered a closing message");
                record_sent(t, &m);
                action = session.handle(m, w.now);
            }
            Ok(Step::Done(outcome)) => {
                let r = &outcome.result;
                d.cert = Some(r.certificate.clone());
                d.join_state = r.join_state.clone().or(d.join_state.take());
                d.bound = outcome.bound_key.clone();
                d.pending = None;
                d.in_flight = None;
                return Ending::Joined(outcome);
            }
            Err(e) => {
                // A refusal means nothing was committed for this attempt, unless an earlier one
                // is still unresolved (the agent keeps that mark).
                if !ceremony.uncertain_after_failure() {
                    d.in_flight = None;
                }
                return Ending::Failed(e);
            }
        }
    }
}

fn kinds(t: &[String]) -> Vec<String> {
    t.iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_str(m).unwrap();
            v["type"].as_str().unwrap_or("?").to_string()
        })
        .collect()
}

fn authority() -> AuthorityState {
    AuthorityState::generate("test-cluster", T0).unwrap()
}

/// Registers a device with the secret (first join) and returns both sides.
fn registered(authority: &AuthorityState, seed: u64, limit: u32) -> (World, Device) {
    let w = World::new(authority, seed);
    w.add_secret_token(limit);
    let mut d = Device::new(seed.wrapping_add(1));
    run(
        &mut d,
        &w,
        CeremonyKind::FirstJoin,
        Some(SECRET),
        false,
        &mut Vec::new(),
    )
    .joined();
    (w, d)
}

#[test]
fn first_join_with_a_registration_secret_binds_the_key_the_device_made() {
    let w = World::new(&authority(), 1);
    w.add_secret_token(1);
    let mut d = Device::new(2);
    let mut t = Vec::new();
    let o = run(
        &mut d,
        &w,
        CeremonyKind::FirstJoin,
        Some(SECRET),
        false,
        &mut t,
    )
    .joined();
    assert_eq!(
        kinds(&t),
        [
            "init",
            "rotation_request",
            "rotation_response",
            "challenge",
            "challenge_solution",
            "result"
        ]
    );
    let bound = o.bound_key.expect("a bound-keypair result names its key");
    assert_eq!(bound.name, "key-1", "the key the rotation request made");
    assert_eq!(o.result.generation, 1);
    let tok = w.token();
    assert_eq!(
        tok.status.bound_public_key.as_deref(),
        Some(boundkey_proto::keys::ssh_public_key(&bound.public_key).as_str())
    );
    assert_eq!(
        tok.status.bound_instance_id.as_deref(),
        Some(o.result.instance_id.as_str())
    );
    assert_eq!(tok.status.recovery_count, 1);
    assert!(tok.status.registration_secret_hash.is_none());
    let inst = w
        .store
        .get_instance(&o.result.instance_id)
        .unwrap()
        .unwrap();
    assert_eq!(inst.status.generation, 1);
    assert!(d.join_state.is_some());
}

#[test]
fn renewal_increments_the_generation_of_the_same_instance() {
    let (mut w, mut d) = registered(&authority(), 3, 1);
    let first = w.token().status.bound_instance_id.unwrap();
    w.now += 60;
    let mut t = Vec::new();
    let o = run(&mut d, &w, CeremonyKind::Renewal, None, false, &mut t).joined();
    assert_eq!(
        kinds(&t),
        ["init", "challenge", "challenge_solution", "result"]
    );
    assert_eq!(o.result.instance_id, first);
    assert_eq!(o.result.generation, 2);
    assert_eq!(o.bound_key.unwrap().name, "key-1");
    let inst = w.store.get_instance(&first).unwrap().unwrap();
    assert_eq!(inst.status.generation, 2);
    assert_eq!(
        w.token().status.recovery_count,
        1,
        "a renewal is no recovery"
    );
}

#[test]
fn a_requested_rotation_binds_a_new_key_at_the_next_renewal() {
    let (mut w, mut d) = registered(&authority(), 5, 1);
    w.now += 10;
    w.request_rotation();
    w.now += 10;
    let mut t = Vec::new();
    let o = run(&mut d, &w, CeremonyKind::Renewal, None, false, &mut t).joined();
    assert_eq!(
        kinds(&t),
        [
            "init",
            "challenge",
            "challenge_solution",
            "rotation_request",
            "rotation_response",
            "challenge",
            "challenge_solution",
            "result"
        ]
    );
    let bound = o.bound_key.unwrap();
    assert_eq!(bound.name, "key-2");
    let tok = w.token();
    assert_eq!(
        tok.status.bound_public_key.as_deref(),
        Some(boundkey_proto::keys::ssh_public_key(&bound.public_key).as_str())
    );
    assert_eq!(tok.status.last_rotated_at, Some(w.now));
    assert_eq!(w.audit(event::ROTATION).len(), 1);
}

#[test]
fn recovery_after_expiry_starts_a_linked_instance() {
    let (mut w, mut d) = registered(&authority(), 7, 2);
    let old = w.token().status.bound_instance_id.unwrap();
    w.now += 7200;
    let mut t = Vec::new();
    let o = run(&mut d, &w, CeremonyKind::Recovery, None, false, &mut t).joined();
    assert_eq!(
        kinds(&t),
        ["init", "challenge", "challenge_solution", "result"]
    );
    assert_ne!(o.result.instance_id, old);
    assert_eq!(o.result.generation, 1);
    let inst = w
        .store
        .get_instance(&o.result.instance_id)
        .unwrap()
        .unwrap();
    assert_eq!(
        inst.spec.previous_instance_id.as_deref(),
        Some(old.as_str())
    );
    assert_eq!(w.token().status.recovery_count, 2);
}

#[test]
fn a_lost_result_is_redelivered_to_the_device_that_asked() {
    let (mut w, mut d) = registered(&authority(), 9, 1);
    w.now += 60;
    let lost = run(
        &mut d,
        &w,
        CeremonyKind::Renewal,
        None,
        true,
        &mut Vec::new(),
    );
    assert!(matches!(lost, Ending::Lost));
    assert!(
        d.in_flight.is_some(),
        "the identity key was kept for the retry"
    );
    let committed = w.token().status.bound_instance_id.unwrap();
    assert_eq!(
        w.store
            .get_instance(&committed)
            .unwrap()
            .unwrap()
            .status
            .generation,
        2
    );
    w.now += 5;
    let o = run(
        &mut d,
        &w,
        CeremonyKind::Renewal,
        None,
        false,
        &mut Vec::new(),
    )
    .joined();
    assert_eq!(o.result.instance_id, committed);
    assert_eq!(o.result.generation, 3);
    assert!(w.store.list_locks().unwrap().is_empty());
    assert_eq!(w.audit(event::BOT_JOIN)[0].fields["case"], "redelivery");
    // And the device carries on normally.
    w.now += 60;
    let o = run(
        &mut d,
        &w,
        CeremonyKind::Renewal,
        None,
        false,
        &mut Vec::new(),
    )
    .joined();
    assert_eq!(o.result.generation, 4);
}

#[test]
fn a_cloned_state_is_refused_and_locks_the_token() {
    let (mut w, mut d) = registered(&authority(), 11, 1);
    let mut clone = d.clone();
    // A copy of the device has its own randomness: it cannot guess the original's identity keys.
    clone.rng = ChaCha20Rng::seed_from_u64(1011);
    w.now += 60;
    run(
        &mut d,
        &w,
        CeremonyKind::Renewal,
        None,
        false,
        &mut Vec::new(),
    )
    .joined();
    w.now += 60;
    let code = run(
        &mut clone,
        &w,
        CeremonyKind::Renewal,
        None,
        false,
        &mut Vec::new(),
    )
    .refused();
    assert_eq!(code, ErrorCode::AccessDenied);
    let locks = w.store.list_locks().unwrap();
    assert_eq!(locks.len(), 1, "{locks:?}");
    assert_eq!(w.audit(event::GENERATION_MISMATCH).len(), 1);
    // The original is locked out too until an administrator looks.
    let code = run(
        &mut d,
        &w,
        CeremonyKind::Renewal,
        None,
        false,
        &mut Vec::new(),
    )
    .refused();
    assert_eq!(code, ErrorCode::Locked);
}

/// Registration, renewal, rotation, a lost result and its redelivery, then a recovery.
fn scripted(authority: &AuthorityState, seed: u64) -> Transcript {
    let mut t = Vec::new();
    let w0 = World::new(authority, seed);
    w0.add_secret_token(2);
    let mut w = w0;
    let mut d = Device::new(seed ^ 0x5eed);
    run(
        &mut d,
        &w,
        CeremonyKind::FirstJoin,
        Some(SECRET),
        false,
        &mut t,
    )
    .joined();
    w.now += 60;
    run(&mut d, &w, CeremonyKind::Renewal, None, false, &mut t).joined();
    w.request_rotation();
    w.now += 60;
    run(&mut d, &w, CeremonyKind::Renewal, None, false, &mut t).joined();
    w.now += 60;
    run(&mut d, &w, CeremonyKind::Renewal, None, true, &mut t);
    w.now += 5;
    run(&mut d, &w, CeremonyKind::Renewal, None, false, &mut t).joined();
    w.now += 7200;
    run(&mut d, &w, CeremonyKind::Recovery, None, false, &mut t).joined();
    t
}

#[test]
fn one_seed_gives_one_transcript() {
    let authority = authority();
    let a = scripted(&authority, 42);
    let b = scripted(&authority, 42);
    assert_eq!(a.len(), 30);
    assert_eq!(a, b);
    let c = scripted(&authority, 43);
    assert_eq!(a.len(), c.len());
    assert_ne!(
        a, c,
        "another seed gives other nonces, keys and instance ids"
    );
}
