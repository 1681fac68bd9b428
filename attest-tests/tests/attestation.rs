//! Key attestation (`docs/protocol.md` §5.6), end to end through the pure auth service, with a
//! device whose keys live in a real swtpm manufactured with EK certificates by swtpm's own local
//! CA. Each refusal is checked for its error code, its audit event and (only for `ek_changed`)
//! its lock; each check of the verifier has a test here that fails without it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use boundkey_attest_tests::{AkKind, EkKind, KeyBlob, TpmDevice};
use boundkey_auth::admin::{new_bound_keypair_token, request_rotation, NewBoundKeypairToken};
use boundkey_auth::attestation::{ek as ek_rules, make_credential, tpm_types::Public};
use boundkey_auth::authority::{Authority, AuthorityState};
use boundkey_auth::model::{event, AttestationMode, AttestationSpec, AuditEvent, Token};
use boundkey_auth::service::{Action, Connection, Service};
use boundkey_auth::store::memory::MemoryStore;
use boundkey_auth::store::{AuditQuery, Store};
use boundkey_auth::ServiceConfig;
use boundkey_proto::{
    jws, keys, Attestation, BotParams, ChallengeSolution, ClientMessage, CredentialResponse,
    ErrorCode, ErrorMessage, Init, JoinResult, RotationResponse, ServerMessage,
};
use boundkey_testkit::{EkCa, Swtpm};
use p256::ecdsa::SigningKey;
use sha2::{Digest, Sha256};

const T0: i64 = 1_800_000_000;
const SECRET: &str = "correct horse battery";

struct World {
    store: Arc<MemoryStore>,
    svc: Service,
    now: i64,
}

impl World {
    fn new() -> World {
        let store = Arc::new(MemoryStore::new());
        let state = AuthorityState::generate("test-cluster", T0).unwrap();
        let authority = Arc::new(Authority::load(&state).unwrap());
        let svc = Service::new(store.clone(), authority, ServiceConfig::default());
        World {
            store,
            svc,
            now: T0,
        }
    }

    /// A registration-secret token requiring a TPM attestation trusted by `trust`.
    fn tpm_token(&self, name: &str, trust: AttestationSpec) -> Token {
        let (t, _) = new_bound_keypair_token(
            NewBoundKeypairToken {
                name: Some(name.into()),
                bot_name: "robot".into(),
                registration_secret: Some(SECRET.into()),
                recovery_limit: Some(3),
                attestation: Some(AttestationSpec {
                    mode: AttestationMode::Tpm,
                    ..trust
                }),
                ..Default::default()
            },
            self.now,
        )
        .unwrap();
        self.store.create_token(&t).unwrap();
        t
    }

    fn token(&self, name: &str) -> Token {
        self.store.get_token(name).unwrap().unwrap()
    }

    fn audit(&self, kind: &str) -> Vec<AuditEvent> {
        self.store
            .list_audit(&AuditQuery {
                kind: Some(kind.into()),
                ..Default::default()
            })
            .unwrap()
    }

    /// Asserts the refusal left exactly one `attestation_failed` event with `code` as reason.
    fn assert_attestation_failed(&self, code: ErrorCode) -> AuditEvent {
        let evs = self.audit(event::ATTESTATION_FAILED);
        assert_eq!(evs.len(), 1, "{evs:?}");
        let ev = evs.into_iter().next().unwrap();
        assert_eq!(ev.fields["reason"], code.as_str(), "{ev:?}");
        assert!(!ev.success);
        ev
    }
}

fn bundle(ca: &EkCa) -> AttestationSpec {
    AttestationSpec {
        ek_ca_bundle: Some(ca.bundle_pem()),
        ..Default::default()
    }
}

fn allow(hashes: Vec<String>) -> AttestationSpec {
    AttestationSpec {
        ek_allow: hashes,
        ..Default::default()
    }
}

/// How a device builds (or spoils) its attestation.
#[derive(Clone, Default)]
enum Attest {
    #[default]
    Honest,
    /// A file-backed agent: it cannot attest and sends none.
    Nothing,
    /// Certify this other TPM key; send `key_public` of the other key (`true`) or of the
    /// challenged key (`false`).
    OtherKey(KeyBlob, bool),
    /// Send this attestation, made in an earlier ceremony.
    Replay(Attestation),
    /// Flip a byte of the signed TPMS_ATTEST.
    TamperCertifyInfo,
    /// Send a TPM2_Quote by the AK instead of a certification.
    Quote,
}

/// A device whose keys live in one of its TPMs; `new_keys_in` says which TPM makes new keys.
struct Agent {
    tpms: Vec<Tpm>,
    new_keys_in: usize,
    bound: Option<(usize, KeyBlob)>,
    pending: Option<(usize, KeyBlob)>,
    /// Template attributes for new keys (None: the agent's bound-key template).
    key_attributes: Option<fn() -> tss_esapi::attributes::ObjectAttributesBuilder>,
    attest: Attest,
    send_certificate: bool,
    /// Claim this TPM's EK instead of the one beside the AK.
    claim_ek_of: Option<usize>,
    /// Send this TPM's EK certificate (with the claimed EK's public area).
    certificate_of: Option<usize>,
    /// Answer the credential with this instead of what the TPM recovers.
    wrong_secret: bool,
    cert: Option<String>,
    join_state: Option<String>,
    /// Every attestation sent, oldest first.
    sent: Vec<Attestation>,
    /// The identity key of the ceremony in progress.
    identity: SigningKey,
}

struct Tpm {
    _swtpm: Swtpm,
    dev: TpmDevice,
    ek: EkKind,
    ak: KeyBlob,
}

impl Tpm {
    fn new(ca: &EkCa, ek: EkKind, ak: AkKind) -> Tpm {
        let swtpm = Swtpm::manufacture(ca);
        let mut dev = TpmDevice::connect(&swtpm.tcti());
        let ak = dev.create_ak(ek, ak);
        Tpm {
            _swtpm: swtpm,
            dev,
            ek,
            ak,
        }
    }

    /// The EK hash an operator computes from the EK certificate with openssl
    /// (`docs/operations.md`), checked against the service's own computation.
    fn ek_hash(&mut self) -> String {
        let der = self.dev.ek_certificate(self.ek);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ek.der");
        std::fs::write(&path, der).unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "openssl x509 -inform DER -in {} -noout -pubkey | openssl pkey -pubin -outform DER | openssl dgst -sha256 -r",
                path.display()
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let hash = String::from_utf8(out.stdout).unwrap()[..64].to_string();
        let ek = Public::from_tpm2b(&self.dev.ek_public(self.ek)).unwrap();
        let ours = ek_rules::spki_hash(&ek_rules::spki_der(&ek).unwrap());
        assert_eq!(
            hash, ours,
            "the documented openssl command gives the service's EK hash"
        );
        hash
    }
}

impl Agent {
    fn new(tpm: Tpm) -> Agent {
        Agent {
            tpms: vec![tpm],
            new_keys_in: 0,
            bound: None,
            pending: None,
            key_attributes: None,
            attest: Attest::Honest,
            send_certificate: true,
            claim_ek_of: None,
            certificate_of: None,
            wrong_secret: false,
            cert: None,
            join_state: None,
            sent: Vec::new(),
            identity: SigningKey::random(&mut rand_core::OsRng),
        }
    }

    fn make_key(&mut self) -> (usize, KeyBlob) {
        let i = self.new_keys_in;
        let attrs = self.key_attributes.map(|f| f());
        (i, self.tpms[i].dev.create_key(attrs))
    }

    fn connection(&self, use_cert: bool) -> Connection {
        use rustls_pki_types::pem::PemObject;
        let peer_certificates = match (&self.cert, use_cert) {
            (Some(pem), true) => {
                vec![rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()]
            }
            _ => vec![],
        };
        Connection {
            remote_addr: "192.0.2.9:4000".into(),
            peer_certificates,
        }
    }

    fn attestation(&mut self, key: &(usize, KeyBlob), document: &str) -> Option<Attestation> {
        let qualifying = Sha256::digest(document.as_bytes()).to_vec();
        let (i, blob) = key;
        let claimed = self.claim_ek_of.unwrap_or(*i);
        let claimed_ek = self.tpms[claimed].ek;
        let ek_public = self.tpms[claimed].dev.ek_public(claimed_ek);
        let cert_tpm = self.certificate_of.unwrap_or(claimed);
        let cert_ek = self.tpms[cert_tpm].ek;
        let ek_certificate = self
            .send_certificate
            .then(|| STANDARD.encode(self.tpms[cert_tpm].dev.ek_certificate(cert_ek)));
        let tpm = &mut self.tpms[*i];
        let ak = tpm.ak.clone();
        let mut key_public = blob.tpm2b_public();
        let (mut info, sig) = match &self.attest {
            Attest::Nothing => return None,
            Attest::Replay(a) => return Some(a.clone()),
            Attest::OtherKey(other, send_other) => {
                if *send_other {
                    key_public = other.tpm2b_public();
                }
                tpm.dev.certify(other, &ak, &qualifying)
            }
            Attest::Quote => tpm.dev.quote(&ak, &qualifying),
            Attest::Honest | Attest::TamperCertifyInfo => tpm.dev.certify(blob, &ak, &qualifying),
        };
        if let Attest::TamperCertifyInfo = self.attest {
            // restartCount: a field no check looks at, so only the signature can catch it.
            let at = info.len() - 2 - 34 - 2 - 34 - 8 - 1 - 4;
            info[at] ^= 1;
        }
        Some(Attestation {
            ek_certificate,
            ek_public: STANDARD.encode(ek_public),
            ak_public: STANDARD.encode(ak.tpm2b_public()),
            key_public: STANDARD.encode(key_public),
            certify_info: STANDARD.encode(info),
            certify_signature: STANDARD.encode(sig),
        })
    }

    fn answer(&mut self, msg: &ServerMessage) -> ClientMessage {
        match msg {
            ServerMessage::RotationRequest(_) => {
                let k = self.make_key();
                let pk = keys::ssh_public_key(&k.1.p256());
                self.pending = Some(k);
                ClientMessage::RotationResponse(RotationResponse { public_key: pk })
            }
            ServerMessage::Challenge(c) => {
                let key = [self.bound.clone(), self.pending.clone()]
                    .into_iter()
                    .flatten()
                    .find(|(_, b)| keys::ssh_public_key(&b.p256()) == c.public_key)
                    .expect("challenged key held");
                let kid = keys::kid(&key.1.p256());
                let input = jws::signing_input(Some(&kid), c.document.as_bytes());
                let sig = self.tpms[key.0].dev.sign(&key.1, &jws::digest(&input));
                let identity = self.identity.clone();
                let attestation = if c.attest {
                    self.attestation(&key, &c.document)
                } else {
                    None
                };
                if let Some(a) = &attestation {
                    self.sent.push(a.clone());
                }
                ClientMessage::ChallengeSolution(ChallengeSolution {
                    solution: jws::assemble(&input, &sig),
                    identity_proof: Some(jws::sign(&identity, None, c.document.as_bytes())),
                    attestation,
                })
            }
            ServerMessage::ActivateCredential(a) => {
                let key = self.pending.clone().or(self.bound.clone()).unwrap();
                let tpm = &mut self.tpms[key.0];
                let ak = tpm.ak.clone();
                let recovered = tpm.dev.activate_credential(
                    &ak,
                    tpm.ek,
                    &STANDARD.decode(&a.credential_blob).unwrap(),
                    &STANDARD.decode(&a.encrypted_secret).unwrap(),
                );
                // A TPM that cannot recover the secret leaves the device nothing true to say.
                let secret = match (recovered, self.wrong_secret) {
                    (Ok(s), false) => s,
                    _ => vec![0x5a; 32],
                };
                ClientMessage::CredentialResponse(CredentialResponse {
                    secret: STANDARD.encode(secret),
                })
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Runs one ceremony: registration (with the secret), renewal (`use_cert`) or recovery.
    fn join(
        &mut self,
        w: &World,
        token: &str,
        secret: Option<&str>,
        use_cert: bool,
    ) -> Result<JoinResult, ErrorMessage> {
        self.identity = SigningKey::random(&mut rand_core::OsRng);
        let identity = self.identity.clone();
        let init = ClientMessage::Init(Init {
            token: token.into(),
            params: BotParams {
                identity_public_key: keys::pkix_b64(&p256::PublicKey::from(
                    identity.verifying_key(),
                )),
                ttl_secs: 600,
            },
            registration_secret: secret.map(str::to_string),
            join_state: self.join_state.clone(),
        });
        let (mut session, mut action) = w.svc.open(self.connection(use_cert), init, w.now);
        loop {
            match action {
                Action::Close(ServerMessage::Result(r)) => {
                    if let Some(p) = self.pending.take() {
                        if r.bound_public_key.as_deref()
                            == Some(keys::ssh_public_key(&p.1.p256()).as_str())
                        {
                            self.bound = Some(p);
                        }
                    }
                    self.cert = Some(r.certificate.clone());
                    self.join_state = r.join_state.clone().or(self.join_state.take());
                    return Ok(r);
                }
                Action::Close(ServerMessage::Error(e)) | Action::Reply(ServerMessage::Error(e)) => {
                    self.pending = None;
                    return Err(e);
                }
                Action::Reply(m) => {
                    let next = self.answer(&m);
                    action = session.handle(next, w.now);
                }
                Action::Close(other) => panic!("unexpected close with {other:?}"),
            }
        }
    }

    fn register(&mut self, w: &World, token: &str) -> Result<JoinResult, ErrorMessage> {
        self.join(w, token, Some(SECRET), false)
    }
}

/// A token refused at registration is left as it was: no key bound, the secret unused, no
/// instance, no lock.
fn assert_untouched(w: &World, token: &str) {
    let t = w.token(token);
    assert!(t.status.bound_public_key.is_none());
    assert!(t.status.ek_identity.is_none());
    assert!(t.status.registration_secret_hash.is_some());
    assert!(w.store.list_instances(None).unwrap().is_empty());
    assert!(w.store.list_locks().unwrap().is_empty());
}

#[test]
fn a_valid_attestation_binds_the_key_and_records_the_ek_on_token_and_instance() {
    let w = World::new();
    let ca = EkCa::new();
    let mut tpm = Tpm::new(&ca, EkKind::Rsa2048, AkKind::EcdsaP256);
    let hash = tpm.ek_hash();
    w.tpm_token("tok", bundle(&ca));
    let mut agent = Agent::new(tpm);
    let r = agent.register(&w, "tok").expect("attested registration");

    let t = w.token("tok");
    let ek = t
        .status
        .ek_identity
        .clone()
        .expect("EK recorded on the token");
    assert_eq!(ek.ek_sha256, hash);
    let cert = ek
        .certificate
        .clone()
        .expect("trusted through its certificate");
    assert_eq!(cert.issuer, "CN=swtpm-localca");
    assert_eq!(cert.subject, "CN=unknown");
    let inst = w.store.get_instance(&r.instance_id).unwrap().unwrap();
    assert_eq!(inst.status.ek_identity.as_ref(), Some(&ek));
    let joins = w.audit(event::BOT_JOIN);
    assert_eq!(joins.last().unwrap().fields["attested_ek_sha256"], hash);
    assert!(w.audit(event::ATTESTATION_FAILED).is_empty());

    // Renewals prove the already-attested key: no attestation is asked for.
    agent.attest = Attest::Nothing;
    let renewed = agent.join(&w, "tok", None, true).expect("renewal");
    assert_eq!(renewed.generation, 2);
    assert_eq!(w.token("tok").status.ek_identity, Some(ek));
}

#[test]
fn an_ecc_p384_ek_and_an_rsa_ak_attest_through_ecdh_credential_activation() {
    let w = World::new();
    let ca = EkCa::new();
    let tpm = Tpm::new(&ca, EkKind::EccP384, AkKind::Rsa2048);
    w.tpm_token("tok", bundle(&ca));
    let mut agent = Agent::new(tpm);
    agent.register(&w, "tok").expect("attested registration");
    assert!(w.token("tok").status.ek_identity.is_some());
}

#[test]
fn an_ecc_p256_ek_without_a_certificate_attests_through_the_allow_list() {
    let w = World::new();
    let ca = EkCa::new();
    let tpm = Tpm::new(&ca, EkKind::EccP256, AkKind::EcdsaP256);
    let mut agent = Agent::new(tpm);
    agent.send_certificate = false;
    let ek = Public::from_tpm2b(&agent.tpms[0].dev.ek_public(EkKind::EccP256)).unwrap();
    let hash = ek_rules::spki_hash(&ek_rules::spki_der(&ek).unwrap());
    w.tpm_token("tok", allow(vec![hash.clone()]));
    agent.register(&w, "tok").expect("allowed P-256 EK");
    assert_eq!(w.token("tok").status.ek_identity.unwrap().ek_sha256, hash);
}

#[test]
fn an_ek_on_the_allow_list_is_trusted_without_a_certificate() {
    let w = World::new();
    let ca = EkCa::new();
    let mut tpm = Tpm::new(&ca, EkKind::Rsa2048, AkKind::EcdsaP256);
    let hash = tpm.ek_hash();
    w.tpm_token("tok", allow(vec![hash.to_uppercase()]));
    let mut agent = Agent::new(tpm);
    agent.send_certificate = false;
    agent.register(&w, "tok").expect("allowed EK");
    let ek = w.token("tok").status.ek_identity.unwrap();
    assert_eq!(ek.ek_sha256, hash);
    assert!(ek.certificate.is_none());
}

#[test]
fn an_ek_certificate_from_another_ca_is_refused() {
    let w = World::new();
    let ca = EkCa::new();
    let other_ca = EkCa::new();
    let _other_tpm = Swtpm::manufacture(&other_ca);
    let tpm = Tpm::new(&ca, EkKind::Rsa2048, AkKind::EcdsaP256);
    w.tpm_token("tok", bundle(&other_ca));
    let mut agent = Agent::new(tpm);
    let e = agent.register(&w, "tok").unwrap_err();
    assert_eq!(e.code, ErrorCode::EkUntrusted);
    let ev = w.assert_attestation_failed(ErrorCode::EkUntrusted);
    assert!(
        ev.error.unwrap().contains("no path"),
        "the chain, not the key, failed"
    );
    assert_untouched(&w, "tok");
}

#[test]
fn an_ek_certificate_of_another_tpm_is_refused() {
    let w = World::new();
    let ca = EkCa::new();
    let mut agent = Agent::new(Tpm::new(&ca, EkKind::Rsa2048, AkKind::EcdsaP256));
    agent
        .tpms
        .push(Tpm::new(&ca, EkKind::Rsa2048, AkKind::EcdsaP256));
    w.tpm_token("tok", bundle(&ca));
    // Everything from TPM 1, but the (trusted, genuine) EK certificate of TPM 0.
    agent.new_keys_in = 1;
    agent.certificate_of = Some(0);
    let e = agent.register(&w, "tok").unwrap_err();
    assert_eq!(e.code, ErrorCode::EkUntrusted);
    let ev = w.assert_attestation_failed(ErrorCode::EkUntrusted);
    assert!(ev.error.unwrap().contains("not the EK"));
    assert_untouched(&w, "tok");
}

#[test]
fn an_ek_hash_that_is_not_allowed_is_refused() {
    let w = World::new();
    let ca = EkCa::new();
    let tpm = Tpm::new(&ca, EkKind::Rsa2048, AkKind::EcdsaP256);
    w.tpm_token("tok", allow(vec!["ab".repeat(32)]));
    let mut agent = Agent::new(tpm);
    // With or without its certificate: the token trusts no CA, so only the hash counts.
    let e = agent.register(&w, "tok").unwrap_err();
    assert_eq!(e.code, ErrorCode::EkNotAllowed);
    w.assert_attestation_failed(ErrorCode::EkNotAllowed);
    assert_untouched(&w, "tok");
}

#[test]
fn a_certification_of_another_key_is_refused() {
    let w = World::new();
    let ca = EkCa::new();
    let tpm = Tpm::new(&ca, EkKind::Rsa2048, AkKind::EcdsaP256);
    w.tpm_token("tok", bundle(&ca));
    w.tpm_token("tok2", bundle(&ca));
    let mut agent = Agent::new(tpm);
    let other = agent.tpms[0].dev.create_key(None);
    // The certified name is not the name of the key_public sent.
    agent.attest = Attest::OtherKey(other.clone(), false);
    let e = agent.register(&w, "tok").unwrap_err();
    assert_eq!(e.code, ErrorCode::CertifyInvalid);
    w.assert_attestation_failed(ErrorCode::CertifyInvalid);
    assert_untouched(&w, "tok");
    // Consistent, but about a key that is not the challenged one.
    agent.attest = Attest::OtherKey(other, true);
    let e = agent.register(&w, "tok2").unwrap_err();
    assert_eq!(e.code, ErrorCode::CertifyInvalid);
    let evs = w.audit(event::ATTESTATION_FAILED);
    assert!(
        evs.iter().any(|e| e
            .error
            .as_deref()
            .unwrap_or("")
            .contains("not the challenged key")),
        "{evs:?}"
    );
}

#[test]
fn a_file_backed_agent_is_refused_on_a_token_that_requires_tpm() {
    let w = World::new();
    let ca = EkCa::new();
    let tpm = Tpm::new(&ca, EkKind::Rsa2048, AkKind::EcdsaP256);
    w.tpm_token("tok", bundle(&ca));
    let mut agent = Agent::new(tpm);
    agent.attest = Attest::Nothing;
    let e = agent.register(&w, "tok").unwrap_err();
    assert_eq!(e.code, ErrorCode::AttestationRequired);
    w.assert_attestation_failed(ErrorCode::AttestationRequired);
    assert_untouched(&w, "tok");
}

#[test]
fn an_attestation_replayed_from_an_earlier_ceremony_is_refused() {
    let w = World::new();
    let ca = EkCa::new();
    let tpm = Tpm::new(&ca, EkKind::Rsa2048, AkKind::EcdsaP256);
    let mut agent = Agent::new(tpm);
    // A pre-registered key: every ceremony challenges the same key, so only the challenge
    // binding tells an old attestation from a fresh one.
    let key = agent.make_key();
    agent.bound = Some(key.clone());
    let (t, _) = new_bound_keypair_token(
        NewBoundKeypairToken {
            name: Some("pre".into()),
            bot_name: "robot".into(),
            initial_public_key: Some(keys::ssh_public_key(&key.1.p256())),
            attestation: Some(AttestationSpec {
                mode: AttestationMode::Tpm,
                ..bundle(&ca)
            }),
            ..Default::default()
        },
        w.now,
    )
    .unwrap();
    w.store.create_token(&t).unwrap();
    // First ceremony: an honest attestation, then the device gives up (wrong credential).
    agent.wrong_secret = true;
    let e = agent.join(&w, "pre", None, false).unwrap_err();
    assert_eq!(e.code, ErrorCode::CredentialFailed);
    let earlier = agent.sent.last().cloned().unwrap();
    // Second ceremony: the earlier attestation with a fresh (valid) key proof.
    agent.wrong_secret = false;
    agent.attest = Attest::Replay(earlier);
    let e = agent.join(&w, "pre", None, false).unwrap_err();
    assert_eq!(e.code, ErrorCode::AttestationReplayed);
    let evs = w.audit(event::ATTESTATION_FAILED);
    assert_eq!(evs.len(), 2);
    assert!(
        evs.iter()
            .any(|e| e.fields["reason"] == "attestation_replayed"),
        "{evs:?}"
    );
    assert!(w.token("pre").status.bound_public_key.is_none());
    assert!(w.store.list_locks().unwrap().is_empty());
}

#[test]
fn an_ak_that_is_not_restricted_is_refused() {
    let w = World::new();
    let ca = EkCa::new();
    let tpm = Tpm::new(&ca, EkKind::Rsa2048, AkKind::Unrestricted);
    w.tpm_token("tok", bundle(&ca));
    let mut agent = Agent::new(tpm);
    let e = agent.register(&w, "tok").unwrap_err();
    assert_eq!(e.code, ErrorCode::AkInvalid);
    w.assert_attestation_failed(ErrorCode::AkInvalid);
    assert_untouched(&w, "tok");
}

#[test]
fn a_rotation_from_another_tpm_is_refused_and_locks_the_token_once() {
    let mut w = World::new();
    let ca = EkCa::new();
    let mut agent = Agent::new(Tpm::new(&ca, EkKind::Rsa2048, AkKind::EcdsaP256));
    w.tpm_token("tok", bundle(&ca));
    agent.register(&w, "tok").expect("registration");
    let recorded = w.token("tok").status.ek_identity.unwrap();

    // A rotation attested by the same TPM is fine.
    let spec = request_rotation(&w.token("tok"), w.now).unwrap();
    w.store
        .update_token_spec("tok", &spec, w.token("tok").revision)
        .unwrap();
    agent
        .join(&w, "tok", None, true)
        .expect("rotation in the same TPM");
    assert_eq!(w.token("tok").status.ek_identity.as_ref(), Some(&recorded));

    // The holder of the bound key rotates to a key in another (equally trusted) TPM.
    agent
        .tpms
        .push(Tpm::new(&ca, EkKind::Rsa2048, AkKind::EcdsaP256));
    agent.new_keys_in = 1;
    w.now += 10;
    let spec = request_rotation(&w.token("tok"), w.now).unwrap();
    w.store
        .update_token_spec("tok", &spec, w.token("tok").revision)
        .unwrap();
    let before = w.token("tok").status.bound_public_key;
    let e = agent.join(&w, "tok", None, true).unwrap_err();
    assert_eq!(e.code, ErrorCode::EkChanged);
    let ev = w.assert_attestation_failed(ErrorCode::EkChanged);
    assert_eq!(ev.fields["lock"], "auto-ek-changed-tok");
    let locks = w.store.list_locks().unwrap();
    assert_eq!(locks.len(), 1, "{locks:?}");
    assert_eq!(locks[0].name, "auto-ek-changed-tok");
    let t = w.token("tok");
    assert_eq!(t.status.bound_public_key, before, "the old key stays bound");
    assert_eq!(t.status.ek_identity.as_ref(), Some(&recorded));
    // Retrying is refused at the lock check, before any attestation: still one lock.
    let e = agent.join(&w, "tok", None, true).unwrap_err();
    assert_eq!(e.code, ErrorCode::Locked);
    assert_eq!(w.store.list_locks().unwrap().len(), 1);
}

#[test]
fn an_ak_in_another_tpm_than_the_ek_fails_credential_activation() {
    let w = World::new();
    let ca = EkCa::new();
    let mut agent = Agent::new(Tpm::new(&ca, EkKind::Rsa2048, AkKind::EcdsaP256));
    w.tpm_token("tok", bundle(&ca));
    agent
        .tpms
        .push(Tpm::new(&ca, EkKind::Rsa2048, AkKind::EcdsaP256));
    // Key and AK in TPM 1, but the trusted EK (and certificate) of TPM 0 is claimed.
    agent.new_keys_in = 1;
    agent.claim_ek_of = Some(0);
    let e = agent.register(&w, "tok").unwrap_err();
    assert_eq!(e.code, ErrorCode::CredentialFailed);
    w.assert_attestation_failed(ErrorCode::CredentialFailed);
    assert_untouched(&w, "tok");
}

#[test]
fn a_wrong_credential_secret_is_refused() {
    let w = World::new();
    let ca = EkCa::new();
    let mut agent = Agent::new(Tpm::new(&ca, EkKind::Rsa2048, AkKind::EcdsaP256));
    w.tpm_token("tok", bundle(&ca));
    agent.wrong_secret = true;
    let e = agent.register(&w, "tok").unwrap_err();
    assert_eq!(e.code, ErrorCode::CredentialFailed);
    w.assert_attestation_failed(ErrorCode::CredentialFailed);
    assert_untouched(&w, "tok");
}

#[test]
fn a_certification_whose_signature_does_not_verify_is_refused() {
    let w = World::new();
    let ca = EkCa::new();
    let mut agent = Agent::new(Tpm::new(&ca, EkKind::Rsa2048, AkKind::EcdsaP256));
    w.tpm_token("tok", bundle(&ca));
    agent.attest = Attest::TamperCertifyInfo;
    let e = agent.register(&w, "tok").unwrap_err();
    assert_eq!(e.code, ErrorCode::CertifyInvalid);
    let ev = w.assert_attestation_failed(ErrorCode::CertifyInvalid);
    assert!(ev.error.unwrap().contains("signature"));
}

#[test]
fn a_quote_is_not_a_certification() {
    let w = World::new();
    let ca = EkCa::new();
    let mut agent = Agent::new(Tpm::new(&ca, EkKind::Rsa2048, AkKind::EcdsaP256));
    w.tpm_token("tok", bundle(&ca));
    agent.attest = Attest::Quote;
    let e = agent.register(&w, "tok").unwrap_err();
    assert_eq!(e.code, ErrorCode::CertifyInvalid);
    let ev = w.assert_attestation_failed(ErrorCode::CertifyInvalid);
    assert!(ev.error.unwrap().contains("TPM_ST_ATTEST_CERTIFY"));
}

#[test]
fn a_key_that_can_leave_the_tpm_is_refused() {
    let w = World::new();
    let ca = EkCa::new();
    let mut agent = Agent::new(Tpm::new(&ca, EkKind::Rsa2048, AkKind::EcdsaP256));
    w.tpm_token("tok", bundle(&ca));
    // Duplicable: neither fixedTPM nor fixedParent.
    agent.key_attributes = Some(|| {
        tss_esapi::attributes::ObjectAttributesBuilder::new()
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_sign_encrypt(true)
    });
    let e = agent.register(&w, "tok").unwrap_err();
    assert_eq!(e.code, ErrorCode::CertifyInvalid);
    let ev = w.assert_attestation_failed(ErrorCode::CertifyInvalid);
    assert!(ev.error.unwrap().contains("attributes"));
}

#[test]
fn an_attestation_nobody_asked_for_is_a_bad_request() {
    let w = World::new();
    let ca = EkCa::new();
    let mut agent = Agent::new(Tpm::new(&ca, EkKind::Rsa2048, AkKind::EcdsaP256));
    let (t, _) = new_bound_keypair_token(
        NewBoundKeypairToken {
            name: Some("plain".into()),
            bot_name: "robot".into(),
            registration_secret: Some(SECRET.into()),
            ..Default::default()
        },
        w.now,
    )
    .unwrap();
    w.store.create_token(&t).unwrap();
    // The device attests although the challenge did not ask.
    let init = ClientMessage::Init(Init {
        token: "plain".into(),
        params: BotParams {
            identity_public_key: keys::pkix_b64(&p256::PublicKey::from(
                agent.identity.verifying_key(),
            )),
            ttl_secs: 600,
        },
        registration_secret: Some(SECRET.into()),
        join_state: None,
    });
    let (mut s, a) = w.svc.open(agent.connection(false), init, w.now);
    let Action::Reply(rr) = a else {
        panic!("{a:?}")
    };
    let next = agent.answer(&rr);
    let Action::Reply(ServerMessage::Challenge(mut c)) = s.handle(next, w.now) else {
        panic!()
    };
    assert!(!c.attest);
    c.attest = true;
    let sol = agent.answer(&ServerMessage::Challenge(c));
    let Action::Close(ServerMessage::Error(e)) = s.handle(sol, w.now) else {
        panic!()
    };
    assert_eq!(e.code, ErrorCode::BadRequest);
    w.assert_attestation_failed(ErrorCode::BadRequest);
}

/// The service's MakeCredential, checked against a real TPM's ActivateCredential: accepted as
/// made, refused when tampered with, for both EK types swtpm manufactures and the TCG default
/// ECC P-256 EK.
#[test]
fn make_credential_is_what_a_real_tpm_activates_and_tampering_is_refused() {
    let ca = EkCa::new();
    let swtpm = Swtpm::manufacture(&ca);
    let mut dev = TpmDevice::connect(&swtpm.tcti());
    for ek in [EkKind::Rsa2048, EkKind::EccP384, EkKind::EccP256] {
        let ak = dev.create_ak(ek, AkKind::EcdsaP256);
        let ek_public = Public::from_tpm2b(&dev.ek_public(ek)).unwrap();
        let ak_public = Public::from_tpm2b(&ak.tpm2b_public()).unwrap();
        let secret = [7u8; 32];
        let made = make_credential(
            &ek_public,
            &ak_public.name(),
            &secret,
            &mut rand_core::OsRng,
        )
        .unwrap();
        let got = dev
            .activate_credential(&ak, ek, &made.credential_blob, &made.encrypted_secret)
            .unwrap_or_else(|e| panic!("{ek:?}: {e}"));
        assert_eq!(got, secret, "{ek:?}");

        let mut blob = made.credential_blob.clone();
        let last = blob.len() - 1;
        blob[last] ^= 1;
        assert!(
            dev.activate_credential(&ak, ek, &blob, &made.encrypted_secret)
                .is_err(),
            "{ek:?}: a tampered credential blob fails the integrity check"
        );
        let mut enc = made.encrypted_secret.clone();
        enc[10] ^= 1;
        assert!(
            dev.activate_credential(&ak, ek, &made.credential_blob, &enc)
                .is_err(),
            "{ek:?}: a tampered seed is refused"
        );
        // Bound to the AK's name: another object cannot activate it.
        let other = dev.create_ak(ek, AkKind::EcdsaP256);
        assert!(
            dev.activate_credential(&other, ek, &made.credential_blob, &made.encrypted_secret)
                .is_err(),
            "{ek:?}: only the named AK activates the credential"
        );
    }
}
