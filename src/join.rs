//! The client side of a join ceremony as a sans-I/O state machine.
//!
//! [`Ceremony::start`] returns the first message to send; [`Ceremony::handle`] takes each
//! [`ServerMessage`] and returns the next [`ClientMessage`] or, at the end, the [`Outcome`].
//! Everything with a side effect — creating a key, persisting it, signing, recording that a
//! commit may now happen — goes through the [`Effects`] trait, in an order this module fixes:
//!
//! * RotationRequest: create the key, **persist it as pending**, and only then return the
//!   `RotationResponse` carrying its public key. A crash at any point leaves either an orphan key
//!   nobody was told about, or a persisted key that can answer the next challenge for it.
//! * Challenge: find the key among every key held (active, pending, history), sign the document
//!   verbatim, check the signature locally, record that the auth service may commit from now on
//!   ([`Effects::mark_uncertain`], which also persists this ceremony's identity key), then return
//!   the solution together with an identity proof: the same document signed by the identity key.
//!   If the result is then lost, the retry reuses that identity key and the proof lets the auth
//!   service recognise it and deliver again instead of treating the device as a copy.
//!
//! Nothing here opens a socket or a file, so every path is unit-tested with canned messages.

use boundkey_proto::claims::ChallengeClaims;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use boundkey_hal::KeyAttestation;
use boundkey_proto::{
    jws, keys, Attestation, BotParams, ChallengeSolution, ClientMessage, CredentialResponse,
    ErrorCode, Init, JoinMethod, JoinResult, RotationResponse, ServerMessage, TokenJoin,
};

use crate::identity_key::IdentityKey;

/// Most server messages one ceremony accepts (a registration plus a rotation needs 4).
const MAX_ROUNDS: usize = 8;

/// A key the agent holds and may be asked to prove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeldKey {
    pub name: String,
    pub public_key: p256::PublicKey,
}

/// Everything the ceremony needs to know up front.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub method: JoinMethod,
    /// Token name (bound keypair), or the secret token (`token` method; `None` to renew).
    pub token: Option<String>,
    pub registration_secret: Option<String>,
    /// This ceremony's identity key: fresh, or the one of a ceremony whose result was lost.
    pub identity_key: IdentityKey,
    pub ttl_secs: u64,
    pub join_state: Option<String>,
    pub keys: Vec<HeldKey>,
    /// A previous ceremony's result may have been lost (the in-flight mark was set at start).
    pub prior_uncertain: bool,
}

/// The side effects a ceremony asks for.
pub(crate) trait Effects {
    type Error;
    /// Creates a new key in the key store (not yet recorded anywhere).
    fn create_key(&mut self) -> Result<HeldKey, Self::Error>;
    /// Durably records `key` as the pending rotation key. `uncertain` is what the in-flight mark
    /// should say after this write.
    fn persist_pending(&mut self, key: &HeldKey, uncertain: bool) -> Result<(), Self::Error>;
    /// Durably records that the auth service may commit this ceremony from now on.
    fn mark_uncertain(&mut self) -> Result<(), Self::Error>;
    /// Signs a SHA-256 digest with the named key: 64-byte r‖s.
    fn sign(&mut self, key: &str, digest: &[u8; 32]) -> Result<[u8; 64], Self::Error>;
    /// Proves that the named key lives in a TPM, for the challenge whose document hashes to
    /// `qualifying`. `None` when the key store cannot (the auth service then refuses with
    /// `attestation_required`, which tells the operator more than a local failure would).
    fn attest(
        &mut self,
        key: &str,
        qualifying: &[u8; 32],
    ) -> Result<Option<KeyAttestation>, Self::Error>;
    /// The secret the auth service sealed to this TPM for the last attestation.
    fn activate_credential(
        &mut self,
        credential_blob: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>, Self::Error>;
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum JoinError<E> {
    /// The auth service refused, with its error code and generic message.
    #[error("the auth service refused: {message} ({})", code.as_str())]
    Refused { code: ErrorCode, message: String },
    /// The auth service broke the protocol.
    #[error("the auth service broke the protocol: {0} (check that boundkeyd and boundkey-authd versions match)")]
    Protocol(String),
    /// The auth service asked for a key this device does not hold.
    #[error("the join token is bound to key {kid}, which this device does not hold: the token already belongs to another device (every device needs its own token: boundkeyctl tokens add), or it was recreated for another key (onboard this device with a new storage directory)")]
    KeyNotHeld { kid: String },
    /// The key store returned a signature that does not verify.
    #[error("the key store produced a signature that does not verify (key {0}); the key store or TPM is faulty")]
    BadSignature(String),
    /// This ceremony's identity key could not sign its proof.
    #[error("cannot sign with this ceremony's identity key: {0}")]
    IdentityKey(String),
    #[error(transparent)]
    Effect(E),
}

impl<E> JoinError<E> {
    /// Separates a failed side effect (the caller's own error) from a ceremony failure.
    pub(crate) fn into_effect(self) -> Result<E, JoinError<std::convert::Infallible>> {
        match self {
            JoinError::Effect(e) => Ok(e),
            JoinError::Refused { code, message } => Err(JoinError::Refused { code, message }),
            JoinError::Protocol(p) => Err(JoinError::Protocol(p)),
            JoinError::KeyNotHeld { kid } => Err(JoinError::KeyNotHeld { kid }),
            JoinError::BadSignature(k) => Err(JoinError::BadSignature(k)),
            JoinError::IdentityKey(e) => Err(JoinError::IdentityKey(e)),
        }
    }
}

/// A finished ceremony.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub result: JoinResult,
    /// The held key the Result names as bound (bound keypair only).
    pub bound_key: Option<HeldKey>,
}

/// What to do next.
#[derive(Debug)]
pub(crate) enum Step {
    Send(ClientMessage),
    Done(Box<Outcome>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Running,
    Done,
}

#[derive(Debug)]
pub(crate) struct Ceremony {
    plan: Plan,
    stage: Stage,
    rounds: usize,
    solutions_sent: usize,
    marked_uncertain: bool,
    /// The last solution carried an attestation: the service may answer with a credential.
    attestation_sent: bool,
    /// A solution (or the one-shot `token_join`) was sent and no reply has arrived since.
    awaiting_reply_to_commit_candidate: bool,
}

impl Ceremony {
    /// Begins a ceremony: returns it and the first message.
    pub(crate) fn start(plan: Plan) -> (Ceremony, ClientMessage) {
        let params = BotParams {
            identity_public_key: keys::pkix_b64(plan.identity_key.public_key()),
            ttl_secs: plan.ttl_secs,
        };
        let (first, candidate) = match plan.method {
            JoinMethod::BoundKeypair => (
                ClientMessage::Init(Init {
                    token: plan.token.clone().unwrap_or_default(),
                    params,
                    registration_secret: plan.registration_secret.clone(),
                    join_state: plan.join_state.clone(),
                }),
                false,
            ),
            JoinMethod::Token => (
                ClientMessage::TokenJoin(TokenJoin {
                    token: plan.token.clone(),
                    params,
                }),
                true,
            ),
        };
        let prior_uncertain = plan.prior_uncertain;
        (
            Ceremony {
                plan,
                stage: Stage::Running,
                rounds: 0,
                solutions_sent: 0,
                attestation_sent: false,
                // Already recorded on disk: nothing to mark again.
                marked_uncertain: prior_uncertain,
                awaiting_reply_to_commit_candidate: candidate,
            },
            first,
        )
    }

    /// Records now, before the challenge arrives, that the auth service may commit this
    /// ceremony, so the caller can overlap that durable write with the network instead of
    /// making it between the signature and the solution. Marking early is conservative: a
    /// ceremony that fails before its solution is not uncertain
    /// ([`Ceremony::uncertain_after_failure`]) and its caller clears the mark again, and a
    /// rotation's pending key write resets it, to be set again before that key's solution.
    pub(crate) fn mark_early<F: Effects>(&mut self, fx: &mut F) -> Result<(), JoinError<F::Error>> {
        if self.plan.method == JoinMethod::BoundKeypair && !self.marked_uncertain {
            fx.mark_uncertain().map_err(JoinError::Effect)?;
            self.marked_uncertain = true;
        }
        Ok(())
    }

    /// After a failure: whether the auth service may have committed a ceremony whose result the
    /// agent never recorded (this one, or an earlier one).
    pub(crate) fn uncertain_after_failure(&self) -> bool {
        self.plan.prior_uncertain
            || (self.plan.method == JoinMethod::BoundKeypair
                && self.awaiting_reply_to_commit_candidate)
    }

    /// Feeds the next server message.
    pub(crate) fn handle<F: Effects>(
        &mut self,
        msg: ServerMessage,
        fx: &mut F,
    ) -> Result<Step, JoinError<F::Error>> {
        if self.stage == Stage::Done {
            return Err(JoinError::Protocol(
                "message after the ceremony ended".into(),
            ));
        }
        // Any reply means the previous message was not the one that committed.
        self.awaiting_reply_to_commit_candidate = false;
        self.rounds += 1;
        if self.rounds > MAX_ROUNDS {
            self.stage = Stage::Done;
            return Err(JoinError::Protocol(format!(
                "the auth service sent more than {MAX_ROUNDS} messages in one ceremony"
            )));
        }
        let r = self.dispatch(msg, fx);
        if !matches!(r, Ok(Step::Send(_))) {
            self.stage = Stage::Done;
        }
        r
    }

    fn dispatch<F: Effects>(
        &mut self,
        msg: ServerMessage,
        fx: &mut F,
    ) -> Result<Step, JoinError<F::Error>> {
        let bound = self.plan.method == JoinMethod::BoundKeypair;
        match msg {
            ServerMessage::Error(e) => Err(JoinError::Refused {
                code: e.code,
                message: e.message,
            }),
            ServerMessage::RotationRequest(_) if bound => {
                let key = fx.create_key().map_err(JoinError::Effect)?;
                // The key is on disk before anyone outside this device learns of it.
                fx.persist_pending(&key, self.plan.prior_uncertain)
                    .map_err(JoinError::Effect)?;
                self.marked_uncertain = self.plan.prior_uncertain;
                let public_key = keys::ssh_public_key(&key.public_key);
                self.plan.keys.push(key);
                Ok(Step::Send(ClientMessage::RotationResponse(
                    RotationResponse { public_key },
                )))
            }
            ServerMessage::Challenge(c) if bound => {
                let public_key = keys::parse_ssh_public_key(&c.public_key).map_err(|e| {
                    JoinError::Protocol(format!("challenge names an unusable key: {e}"))
                })?;
                let kid = keys::kid(&public_key);
                let held = self
                    .plan
                    .keys
                    .iter()
                    .find(|k| k.public_key == public_key)
                    .cloned()
                    .ok_or_else(|| JoinError::KeyNotHeld { kid: kid.clone() })?;
                // Sign only what looks like a challenge for this key: the bound key is not a
                // general-purpose signing oracle.
                let claims: ChallengeClaims = serde_json::from_str(&c.document).map_err(|e| {
                    JoinError::Protocol(format!("challenge document is not a challenge: {e}"))
                })?;
                if claims.sub != kid {
                    return Err(JoinError::Protocol(
                        "challenge document is for another key than it names".into(),
                    ));
                }
                let input = jws::signing_input(Some(&kid), c.document.as_bytes());
                let sig = fx
                    .sign(&held.name, &jws::digest(&input))
                    .map_err(JoinError::Effect)?;
                let solution = jws::assemble(&input, &sig);
                if jws::verify(&solution, &public_key).is_err() {
                    return Err(JoinError::BadSignature(held.name));
                }
                // Bound to this challenge: its extraData is the document's hash, so it is worth
                // this one challenge only.
                let attestation = if c.attest {
                    // SHA-256 of the document's bytes as received (`digest` hashes any string).
                    let qualifying = jws::digest(&c.document);
                    fx.attest(&held.name, &qualifying)
                        .map_err(JoinError::Effect)?
                        .map(|a| wire_attestation(&a))
                } else {
                    None
                };
                self.attestation_sent = attestation.is_some();
                if !self.marked_uncertain {
                    fx.mark_uncertain().map_err(JoinError::Effect)?;
                    self.marked_uncertain = true;
                }
                self.solutions_sent += 1;
                self.awaiting_reply_to_commit_candidate = true;
                let identity_proof = Some(
                    self.plan
                        .identity_key
                        .sign_jws(c.document.as_bytes())
                        .map_err(|e| JoinError::IdentityKey(e.to_string()))?,
                );
                Ok(Step::Send(ClientMessage::ChallengeSolution(
                    ChallengeSolution {
                        solution,
                        identity_proof,
                        attestation,
                    },
                )))
            }
            ServerMessage::ActivateCredential(a) if bound => {
                if !std::mem::take(&mut self.attestation_sent) {
                    return Err(JoinError::Protocol(
                        "a credential to activate without an attestation before it".into(),
                    ));
                }
                let decode = |what: &str, s: &str| {
                    STANDARD.decode(s).map_err(|_| {
                        JoinError::Protocol(format!("activate_credential.{what} is not base64"))
                    })
                };
                let blob = decode("credential_blob", &a.credential_blob)?;
                let sealed = decode("encrypted_secret", &a.encrypted_secret)?;
                let secret = fx
                    .activate_credential(&blob, &sealed)
                    .map_err(JoinError::Effect)?;
                // The service commits once the secret checks out.
                self.awaiting_reply_to_commit_candidate = true;
                Ok(Step::Send(ClientMessage::CredentialResponse(
                    CredentialResponse {
                        secret: STANDARD.encode(&secret),
                    },
                )))
            }
            ServerMessage::Result(result) => {
                if result.join_method != self.plan.method {
                    return Err(JoinError::Protocol(format!(
                        "result is for join method {:?}, expected {}",
                        result.join_method, self.plan.method
                    )));
                }
                if !bound {
                    return Ok(Step::Done(Box::new(Outcome {
                        result,
                        bound_key: None,
                    })));
                }
                if self.solutions_sent == 0 {
                    return Err(JoinError::Protocol(
                        "result before any challenge was answered".into(),
                    ));
                }
                let named = result.bound_public_key.as_deref().ok_or_else(|| {
                    JoinError::Protocol("result does not name the bound public key".into())
                })?;
                let pk = keys::parse_ssh_public_key(named).map_err(|e| {
                    JoinError::Protocol(format!("result names an unusable bound key: {e}"))
                })?;
                let held = self
                    .plan
                    .keys
                    .iter()
                    .find(|k| k.public_key == pk)
                    .cloned()
                    .ok_or_else(|| JoinError::KeyNotHeld {
                        kid: keys::kid(&pk),
                    })?;
                Ok(Step::Done(Box::new(Outcome {
                    result,
                    bound_key: Some(held),
                })))
            }
            other => Err(JoinError::Protocol(format!(
                "unexpected {} during a {} ceremony",
                server_msg_name(&other),
                self.plan.method
            ))),
        }
    }
}

/// The wire form of an attestation: every structure in standard base64 (protocol.md §5.6).
fn wire_attestation(a: &KeyAttestation) -> Attestation {
    Attestation {
        ek_certificate: a.ek_certificate.as_ref().map(|c| STANDARD.encode(c)),
        ek_public: STANDARD.encode(&a.ek_public),
        ak_public: STANDARD.encode(&a.ak_public),
        key_public: STANDARD.encode(&a.key_public),
        certify_info: STANDARD.encode(&a.certify_info),
        certify_signature: STANDARD.encode(&a.certify_signature),
    }
}

fn server_msg_name(m: &ServerMessage) -> &'static str {
    match m {
        ServerMessage::RotationRequest(_) => "rotation_request",
        ServerMessage::Challenge(_) => "challenge",
        ServerMessage::ActivateCredential(_) => "activate_credential",
        ServerMessage::Result(_) => "result",
        ServerMessage::HeartbeatAck(_) => "heartbeat_ack",
        ServerMessage::Error(_) => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boundkey_proto::{Challenge, RotationReason, RotationRequest};
    use p256::ecdsa::signature::hazmat::PrehashSigner;
    use std::collections::HashMap;

    /// Records every effect in order; keys are in-memory.
    #[derive(Default)]
    struct Fake {
        keys: HashMap<String, p256::SecretKey>,
        log: Vec<String>,
        fail_persist: bool,
        next: usize,
        /// Stands for a TPM key store (else: a file key store, which cannot attest).
        attests: bool,
    }

    impl Fake {
        fn add(&mut self, name: &str) -> HeldKey {
            let sk = p256::SecretKey::random(&mut rand_core::OsRng);
            let pk = sk.public_key();
            self.keys.insert(name.into(), sk);
            HeldKey {
                name: name.into(),
                public_key: pk,
            }
        }
    }

    impl Effects for Fake {
        type Error = String;
        fn create_key(&mut self) -> Result<HeldKey, String> {
            self.next += 1;
            let name = format!("new-{}", self.next);
            self.log.push(format!("create {name}"));
            Ok(self.add(&name))
        }
        fn persist_pending(&mut self, key: &HeldKey, uncertain: bool) -> Result<(), String> {
            if self.fail_persist {
                return Err("disk full".into());
            }
            self.log.push(format!("persist {} {uncertain}", key.name));
            Ok(())
        }
        fn mark_uncertain(&mut self) -> Result<(), String> {
            self.log.push("mark".into());
            Ok(())
        }
        fn attest(
            &mut self,
            key: &str,
            qualifying: &[u8; 32],
        ) -> Result<Option<KeyAttestation>, String> {
            self.log.push(format!("attest {key}"));
            Ok(self.attests.then(|| KeyAttestation {
                ek_certificate: None,
                ek_public: b"ek".to_vec(),
                ak_public: b"ak".to_vec(),
                key_public: key.as_bytes().to_vec(),
                certify_info: qualifying.to_vec(),
                certify_signature: b"sig".to_vec(),
            }))
        }
        fn activate_credential(&mut self, blob: &[u8], sealed: &[u8]) -> Result<Vec<u8>, String> {
            self.log.push(format!(
                "activate {} {}",
                String::from_utf8_lossy(blob),
                String::from_utf8_lossy(sealed)
            ));
            Ok(b"recovered".to_vec())
        }
        fn sign(&mut self, key: &str, digest: &[u8; 32]) -> Result<[u8; 64], String> {
            self.log.push(format!("sign {key}"));
            let sk = self.keys.get(key).ok_or("no key")?;
            let sig: p256::ecdsa::Signature = p256::ecdsa::SigningKey::from(sk)
                .sign_prehash(digest)
                .map_err(|e| e.to_string())?;
            Ok(sig.normalize_s().unwrap_or(sig).to_bytes().into())
        }
    }

    fn identity() -> p256::PublicKey {
        p256::SecretKey::random(&mut rand_core::OsRng).public_key()
    }

    fn plan(keys: Vec<HeldKey>) -> Plan {
        Plan {
            method: JoinMethod::BoundKeypair,
            token: Some("tok".into()),
            registration_secret: None,
            identity_key: IdentityKey::generate().unwrap(),
            ttl_secs: 60,
            join_state: Some("js".into()),
            keys,
            prior_uncertain: false,
        }
    }

    fn challenge_for(pk: &p256::PublicKey) -> (ServerMessage, ChallengeClaims) {
        let claims = ChallengeClaims {
            iss: "c".into(),
            aud: "c".into(),
            sub: keys::kid(pk),
            iat: 100,
            nbf: 90,
            exp: 160,
            nonce: "bm9uY2U".into(),
        };
        let doc = serde_json::to_string(&claims).unwrap();
        (
            ServerMessage::Challenge(Challenge {
                public_key: keys::ssh_public_key(pk),
                document: doc,
                attest: false,
            }),
            claims,
        )
    }

    fn result_naming(pk: Option<&p256::PublicKey>) -> ServerMessage {
        ServerMessage::Result(JoinResult {
            bot_name: "bot".into(),
            instance_id: "inst".into(),
            generation: 2,
            join_method: JoinMethod::BoundKeypair,
            certificate: "CERT".into(),
            ca_bundle: "CA".into(),
            not_before: 1,
            expires: 2,
            join_state: Some("js2".into()),
            bound_public_key: pk.map(keys::ssh_public_key),
            recovery_remaining: None,
        })
    }

    fn solution(step: Step) -> String {
        match step {
            Step::Send(ClientMessage::ChallengeSolution(s)) => s.solution,
            other => panic!("expected a solution, got {other:?}"),
        }
    }

    #[test]
    fn renewal_signs_the_document_verbatim_with_the_bound_key() {
        let mut fx = Fake::default();
        let a = fx.add("a");
        let (mut c, first) = Ceremony::start(plan(vec![a.clone()]));
        match first {
            ClientMessage::Init(i) => {
                assert_eq!(i.token, "tok");
                assert_eq!(i.join_state.as_deref(), Some("js"));
                assert!(i.registration_secret.is_none());
            }
            other => panic!("{other:?}"),
        }
        let (ch, claims) = challenge_for(&a.public_key);
        let doc = match &ch {
            ServerMessage::Challenge(c) => c.document.clone(),
            _ => unreachable!(),
        };
        let sol = solution(c.handle(ch, &mut fx).unwrap());
        let (hdr, payload) = jws::verify(&sol, &a.public_key).unwrap();
        assert_eq!(payload, doc.as_bytes());
        assert_eq!(hdr.kid.as_deref(), Some(claims.sub.as_str()));
        assert_eq!(fx.log, vec!["sign a", "mark"]);
        assert!(c.uncertain_after_failure(), "solution sent, no reply yet");
        match c
            .handle(result_naming(Some(&a.public_key)), &mut fx)
            .unwrap()
        {
            Step::Done(o) => {
                assert_eq!(o.bound_key.unwrap().name, "a");
                assert_eq!(o.result.generation, 2);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            c.handle(result_naming(None), &mut fx).is_err(),
            "after done"
        );
    }

    #[test]
    fn rotation_persists_the_new_key_before_sending_it_and_old_key_answers_first() {
        let mut fx = Fake::default();
        let a = fx.add("a");
        let (mut c, _) = Ceremony::start(plan(vec![a.clone()]));
        let (ch, _) = challenge_for(&a.public_key);
        solution(c.handle(ch, &mut fx).unwrap());
        let step = c
            .handle(
                ServerMessage::RotationRequest(RotationRequest {
                    reason: RotationReason::RotationDue,
                }),
                &mut fx,
            )
            .unwrap();
        let new_pk = match step {
            Step::Send(ClientMessage::RotationResponse(r)) => {
                keys::parse_ssh_public_key(&r.public_key).unwrap()
            }
            other => panic!("{other:?}"),
        };
        // Created, then persisted (clearing the in-flight mark: the server did not commit),
        // and only then returned for sending.
        assert_eq!(
            fx.log,
            vec!["sign a", "mark", "create new-1", "persist new-1 false"]
        );
        assert!(!c.uncertain_after_failure());
        let (ch2, _) = challenge_for(&new_pk);
        let sol = solution(c.handle(ch2, &mut fx).unwrap());
        jws::verify(&sol, &new_pk).unwrap();
        assert_eq!(fx.log.last().map(String::as_str), Some("mark"));
        match c.handle(result_naming(Some(&new_pk)), &mut fx).unwrap() {
            Step::Done(o) => assert_eq!(o.bound_key.unwrap().name, "new-1"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn registration_creates_the_first_key_and_sends_the_secret() {
        let mut fx = Fake::default();
        let mut p = plan(vec![]);
        p.registration_secret = Some("s3cret".into());
        p.join_state = None;
        let (mut c, first) = Ceremony::start(p);
        match first {
            ClientMessage::Init(i) => assert_eq!(i.registration_secret.as_deref(), Some("s3cret")),
            other => panic!("{other:?}"),
        }
        let step = c
            .handle(
                ServerMessage::RotationRequest(RotationRequest {
                    reason: RotationReason::Registration,
                }),
                &mut fx,
            )
            .unwrap();
        let Step::Send(ClientMessage::RotationResponse(r)) = step else {
            panic!()
        };
        let pk = keys::parse_ssh_public_key(&r.public_key).unwrap();
        solution(c.handle(challenge_for(&pk).0, &mut fx).unwrap());
        assert!(matches!(
            c.handle(result_naming(Some(&pk)), &mut fx).unwrap(),
            Step::Done(_)
        ));
    }

    #[test]
    fn a_failed_persist_means_the_key_is_never_sent() {
        let mut fx = Fake {
            fail_persist: true,
            ..Fake::default()
        };
        let (mut c, _) = Ceremony::start(plan(vec![]));
        let r = c.handle(
            ServerMessage::RotationRequest(RotationRequest {
                reason: RotationReason::Registration,
            }),
            &mut fx,
        );
        assert!(
            matches!(r, Err(JoinError::Effect(ref e)) if e == "disk full"),
            "{r:?}"
        );
    }

    #[test]
    fn unknown_keys_and_mismatched_documents_are_not_signed() {
        let mut fx = Fake::default();
        let a = fx.add("a");
        let stranger = identity();
        let (mut c, _) = Ceremony::start(plan(vec![a.clone()]));
        let r = c.handle(challenge_for(&stranger).0, &mut fx);
        assert!(matches!(r, Err(JoinError::KeyNotHeld { .. })), "{r:?}");

        let (mut c, _) = Ceremony::start(plan(vec![a.clone()]));
        let (ServerMessage::Challenge(mut ch), _) = challenge_for(&stranger) else {
            unreachable!()
        };
        ch.public_key = keys::ssh_public_key(&a.public_key);
        let r = c.handle(ServerMessage::Challenge(ch), &mut fx);
        assert!(matches!(r, Err(JoinError::Protocol(_))), "{r:?}");

        let (mut c, _) = Ceremony::start(plan(vec![a.clone()]));
        let ch = ServerMessage::Challenge(Challenge {
            public_key: keys::ssh_public_key(&a.public_key),
            document: "{\"anything\":1}".into(),
            attest: false,
        });
        assert!(matches!(c.handle(ch, &mut fx), Err(JoinError::Protocol(_))));
        assert!(fx.log.is_empty(), "nothing signed: {:?}", fx.log);
    }

    #[test]
    fn history_keys_answer_challenges() {
        let mut fx = Fake::default();
        let a = fx.add("a");
        let old = fx.add("old");
        let (mut c, _) = Ceremony::start(plan(vec![a, old.clone()]));
        let sol = solution(c.handle(challenge_for(&old.public_key).0, &mut fx).unwrap());
        jws::verify(&sol, &old.public_key).unwrap();
    }

    #[test]
    fn refusals_are_reported_with_their_code_and_clear_this_ceremonys_uncertainty() {
        let mut fx = Fake::default();
        let a = fx.add("a");
        let (mut c, _) = Ceremony::start(plan(vec![a.clone()]));
        solution(c.handle(challenge_for(&a.public_key).0, &mut fx).unwrap());
        assert!(c.uncertain_after_failure());
        let r = c.handle(
            ServerMessage::error(ErrorCode::RecoveryLimitExceeded, "no recoveries left"),
            &mut fx,
        );
        match r {
            Err(JoinError::Refused { code, message }) => {
                assert_eq!(code, ErrorCode::RecoveryLimitExceeded);
                assert_eq!(message, "no recoveries left");
            }
            other => panic!("{other:?}"),
        }
        assert!(!c.uncertain_after_failure());

        let mut p = plan(vec![a]);
        p.prior_uncertain = true;
        let (mut c, _) = Ceremony::start(p);
        let _ = c.handle(ServerMessage::error(ErrorCode::Internal, "x"), &mut fx);
        assert!(
            c.uncertain_after_failure(),
            "an earlier lost result stays uncertain"
        );
    }

    fn attest_challenge_for(pk: &p256::PublicKey) -> (ServerMessage, String) {
        let (msg, _) = challenge_for(pk);
        let ServerMessage::Challenge(mut c) = msg else {
            unreachable!()
        };
        c.attest = true;
        let doc = c.document.clone();
        (ServerMessage::Challenge(c), doc)
    }

    fn activate(blob: &[u8], sealed: &[u8]) -> ServerMessage {
        ServerMessage::ActivateCredential(boundkey_proto::ActivateCredential {
            credential_blob: STANDARD.encode(blob),
            encrypted_secret: STANDARD.encode(sealed),
        })
    }

    #[test]
    fn an_attested_challenge_carries_a_certification_of_this_document_then_the_credential() {
        let mut fx = Fake {
            attests: true,
            ..Fake::default()
        };
        let a = fx.add("a");
        let (mut c, _) = Ceremony::start(plan(vec![a.clone()]));
        let (ch, doc) = attest_challenge_for(&a.public_key);
        let att = match c.handle(ch, &mut fx).unwrap() {
            Step::Send(ClientMessage::ChallengeSolution(s)) => s.attestation.unwrap(),
            other => panic!("{other:?}"),
        };
        // The certification is made after the signature checks out and before the solution
        // may commit anything, for exactly this document.
        assert_eq!(fx.log, vec!["sign a", "attest a", "mark"]);
        let extra = STANDARD.decode(&att.certify_info).unwrap();
        assert_eq!(extra, jws::digest(&doc).to_vec());
        assert_eq!(STANDARD.decode(&att.key_public).unwrap(), b"a");
        assert!(att.ek_certificate.is_none());

        // The credential is activated and its secret returned, base64.
        match c.handle(activate(b"blob", b"seed"), &mut fx).unwrap() {
            Step::Send(ClientMessage::CredentialResponse(r)) => {
                assert_eq!(STANDARD.decode(r.secret).unwrap(), b"recovered")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(fx.log.last().unwrap(), "activate blob seed");
        assert!(c.uncertain_after_failure(), "the service may commit now");
        match c
            .handle(result_naming(Some(&a.public_key)), &mut fx)
            .unwrap()
        {
            Step::Done(o) => assert_eq!(o.bound_key.unwrap().name, "a"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn credentials_are_activated_only_right_after_an_attestation() {
        // A file key store sends no attestation; a credential then is a protocol violation.
        let mut fx = Fake::default();
        let a = fx.add("a");
        let (mut c, _) = Ceremony::start(plan(vec![a.clone()]));
        let (ch, _) = attest_challenge_for(&a.public_key);
        match c.handle(ch, &mut fx).unwrap() {
            Step::Send(ClientMessage::ChallengeSolution(s)) => assert!(s.attestation.is_none()),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            c.handle(activate(b"b", b"s"), &mut fx),
            Err(JoinError::Protocol(_))
        ));
        assert!(!fx.log.iter().any(|l| l.starts_with("activate")));

        // Not twice for one attestation, and not without one asked for.
        let mut fx = Fake {
            attests: true,
            ..Fake::default()
        };
        let a = fx.add("a");
        let (mut c, _) = Ceremony::start(plan(vec![a.clone()]));
        c.handle(attest_challenge_for(&a.public_key).0, &mut fx)
            .unwrap();
        c.handle(activate(b"b", b"s"), &mut fx).unwrap();
        assert!(matches!(
            c.handle(activate(b"b", b"s"), &mut fx),
            Err(JoinError::Protocol(_))
        ));
        let (mut c, _) = Ceremony::start(plan(vec![a.clone()]));
        c.handle(challenge_for(&a.public_key).0, &mut fx).unwrap();
        assert!(matches!(
            c.handle(activate(b"b", b"s"), &mut fx),
            Err(JoinError::Protocol(_))
        ));
        // Garbage is refused before the TPM sees it.
        let (mut c, _) = Ceremony::start(plan(vec![a.clone()]));
        c.handle(attest_challenge_for(&a.public_key).0, &mut fx)
            .unwrap();
        let bad = ServerMessage::ActivateCredential(boundkey_proto::ActivateCredential {
            credential_blob: "%%%".into(),
            encrypted_secret: "AA==".into(),
        });
        let before = fx.log.len();
        assert!(matches!(
            c.handle(bad, &mut fx),
            Err(JoinError::Protocol(_))
        ));
        assert_eq!(fx.log.len(), before);
    }

    #[test]
    fn an_early_mark_replaces_the_one_before_the_solution_and_a_refusal_undoes_it() {
        let mut fx = Fake::default();
        let a = fx.add("a");
        let (mut c, _) = Ceremony::start(plan(vec![a.clone()]));
        c.mark_early(&mut fx).unwrap();
        c.mark_early(&mut fx).unwrap();
        assert_eq!(fx.log, vec!["mark"], "marked once");
        assert!(
            !c.uncertain_after_failure(),
            "nothing sent that could commit yet: a failure now clears the mark"
        );
        solution(c.handle(challenge_for(&a.public_key).0, &mut fx).unwrap());
        assert_eq!(fx.log, vec!["mark", "sign a"], "no second mark");
        assert!(c.uncertain_after_failure());

        // A rotation after an early mark: the pending key's write resets it, and the new
        // key's solution is preceded by a mark again.
        let new_pk = match c
            .handle(
                ServerMessage::RotationRequest(RotationRequest {
                    reason: RotationReason::RotationDue,
                }),
                &mut fx,
            )
            .unwrap()
        {
            Step::Send(ClientMessage::RotationResponse(r)) => {
                keys::parse_ssh_public_key(&r.public_key).unwrap()
            }
            other => panic!("{other:?}"),
        };
        solution(c.handle(challenge_for(&new_pk).0, &mut fx).unwrap());
        assert_eq!(
            fx.log,
            vec![
                "mark",
                "sign a",
                "create new-1",
                "persist new-1 false",
                "sign new-1",
                "mark"
            ]
        );

        // The token method has no in-flight mark.
        let mut p = plan(vec![]);
        p.method = JoinMethod::Token;
        let (mut c, _) = Ceremony::start(p);
        let mut fx = Fake::default();
        c.mark_early(&mut fx).unwrap();
        assert!(fx.log.is_empty());
    }

    #[test]
    fn prior_uncertainty_is_kept_through_a_rotation_and_not_marked_twice() {
        let mut fx = Fake::default();
        let a = fx.add("a");
        let mut p = plan(vec![a.clone()]);
        p.prior_uncertain = true;
        let (mut c, _) = Ceremony::start(p);
        solution(c.handle(challenge_for(&a.public_key).0, &mut fx).unwrap());
        let _ = c
            .handle(
                ServerMessage::RotationRequest(RotationRequest {
                    reason: RotationReason::RotationDue,
                }),
                &mut fx,
            )
            .unwrap();
        assert_eq!(fx.log, vec!["sign a", "create new-1", "persist new-1 true"]);
    }

    #[test]
    fn protocol_violations_are_refused() {
        let mut fx = Fake::default();
        let a = fx.add("a");
        // Result before any proof.
        let (mut c, _) = Ceremony::start(plan(vec![a.clone()]));
        assert!(matches!(
            c.handle(result_naming(Some(&a.public_key)), &mut fx),
            Err(JoinError::Protocol(_))
        ));
        // Result naming a key we do not hold.
        let (mut c, _) = Ceremony::start(plan(vec![a.clone()]));
        solution(c.handle(challenge_for(&a.public_key).0, &mut fx).unwrap());
        assert!(matches!(
            c.handle(result_naming(Some(&identity())), &mut fx),
            Err(JoinError::KeyNotHeld { .. })
        ));
        // Result without a bound key.
        let (mut c, _) = Ceremony::start(plan(vec![a.clone()]));
        solution(c.handle(challenge_for(&a.public_key).0, &mut fx).unwrap());
        assert!(matches!(
            c.handle(result_naming(None), &mut fx),
            Err(JoinError::Protocol(_))
        ));
        // Heartbeat ack in a ceremony.
        let (mut c, _) = Ceremony::start(plan(vec![a.clone()]));
        assert!(matches!(
            c.handle(ServerMessage::HeartbeatAck(Default::default()), &mut fx),
            Err(JoinError::Protocol(_))
        ));
        // Endless rounds.
        let (mut c, _) = Ceremony::start(plan(vec![a.clone()]));
        let mut failed = false;
        for _ in 0..=MAX_ROUNDS {
            if c.handle(challenge_for(&a.public_key).0, &mut fx).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed);
    }

    #[test]
    fn token_method_sends_token_join_and_accepts_a_result_directly() {
        let mut fx = Fake::default();
        let mut p = plan(vec![]);
        p.method = JoinMethod::Token;
        p.token = Some("secret-token".into());
        let (mut c, first) = Ceremony::start(p);
        match first {
            ClientMessage::TokenJoin(t) => assert_eq!(t.token.as_deref(), Some("secret-token")),
            other => panic!("{other:?}"),
        }
        // Rotation and challenges are bound-keypair only.
        assert!(c.handle(challenge_for(&identity()).0, &mut fx).is_err());
        let (mut c, _) = Ceremony::start(Plan {
            method: JoinMethod::Token,
            token: None,
            ..plan(vec![])
        });
        let ServerMessage::Result(mut r) = result_naming(None) else {
            unreachable!()
        };
        r.join_method = JoinMethod::Token;
        assert!(matches!(
            c.handle(ServerMessage::Result(r), &mut fx).unwrap(),
            Step::Done(_)
        ));
    }
}
