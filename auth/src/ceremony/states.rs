//! The ceremony's states, one type per thing it waits for. Each transition consumes its state
//! and returns the next one with the step to take; a refusal always leads to
//! [`State::Done`].

use crate::admin::verify_registration_secret;
use crate::attestation::{self, AttestationError};
use crate::entropy::EntropyRng;
use crate::model::EkIdentity;
use crate::outcome::{messages, Refusal, RefusalClass, Step};
use base64::engine::general_purpose::STANDARD;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use boundkey_proto::claims::{ChallengeClaims, CHALLENGE_NBF_SKEW_SECS, CHALLENGE_TTL_SECS};
use boundkey_proto::{
    keys, ActivateCredential, Challenge, ChallengeSolution, ClientMessage, CredentialResponse,
    ErrorCode, RotationReason, RotationRequest, RotationResponse, ServerMessage, UnixTime,
};
use subtle::ConstantTimeEq;

use super::checks::{Checked, FirstProof, IdentityProof, Proven};
use super::context::{Context, Delivery};
use super::finish::{FinalKey, KeyChange};
use super::proof::check_solution;

/// Where a ceremony is.
#[derive(Debug)]
pub(crate) enum State {
    ExpectRotationResponse(ExpectRotationResponse),
    ExpectSolution(ExpectSolution),
    ExpectCredential(ExpectCredential),
    /// Committed or refused; any further message is refused.
    Done,
}

/// A `RotationRequest` was sent; the device must answer with a fresh public key.
#[derive(Debug)]
pub(crate) enum ExpectRotationResponse {
    /// First join by registration secret: the device makes its first bound key. Nothing is
    /// proven yet beyond the secret.
    Registration,
    /// A rotation is due and the current key passed every check.
    RotationDue(Box<Checked>),
}

/// A `Challenge` for `key` was sent; the device must sign exactly `claims` with it, and attest
/// the key when `attest` is set. Invariant: `document` is the serialisation of `claims` sent.
#[derive(Debug)]
pub(crate) struct ExpectSolution {
    key: p256::PublicKey,
    claims: ChallengeClaims,
    document: String,
    attest: bool,
    purpose: Purpose,
}

/// The solution and its attestation verified, and an `ActivateCredential` for the AK was sent:
/// the device must return `secret`, which only the TPM holding the attested EK can recover.
/// Invariant: `key` is proven and attested by `ek`; `secret` was drawn for this ceremony.
#[derive(Debug)]
pub(crate) struct ExpectCredential {
    key: p256::PublicKey,
    identity: IdentityProof,
    purpose: Purpose,
    ek: EkIdentity,
    secret: [u8; 32],
}

/// Which key a challenge asks the device to prove, and what is established already.
#[derive(Debug)]
pub(crate) enum Purpose {
    /// The bound (or pre-registered) key: the first proof.
    BoundKey,
    /// The key a registration just made: the first proof.
    Registration,
    /// A rotation's new key, after the old one passed every check.
    Rotation(Box<Checked>),
}

type Next = (State, Step);

fn refused(refusal: Box<Refusal>) -> Next {
    (State::Done, Step::Refuse(refusal))
}

/// The first state, from what `Init` carried.
pub(super) fn begin(ctx: &Context, secret: Option<String>, now: UnixTime) -> Next {
    if let Some(k) = ctx.previous_key {
        return challenge(ctx, k, Purpose::BoundKey, now);
    }
    // Case A: first join.
    let onboarding = &ctx.spec.onboarding;
    if let Some(initial) = &onboarding.initial_public_key {
        return match keys::parse_ssh_public_key(initial) {
            Ok(k) => challenge(ctx, k, Purpose::BoundKey, now),
            Err(_) => refused(
                ctx.deny(
                    ErrorCode::AccessDenied,
                    messages::ACCESS_DENIED,
                    "stored initial_public_key unparseable",
                    Delivery::Fresh,
                    now,
                )
                .class(RefusalClass::Anonymous),
            ),
        };
    }
    // Secret path: missing, late and wrong all get the same answer.
    let stored = &ctx.token.status.registration_secret_hash;
    let late = onboarding.must_register_before.is_some_and(|d| now >= d);
    let ok = match (&secret, stored) {
        (Some(s), Some(h)) => verify_registration_secret(s, h),
        _ => false,
    };
    if !ok || late {
        let reason = match (secret.is_some(), stored.is_some(), late) {
            (false, _, _) => "registration secret missing",
            (_, false, _) => "registration secret already used",
            (_, _, true) => "registration deadline (must_register_before) passed",
            _ => "wrong registration secret",
        };
        // Any sent secret that did not open the token counts as a guess (throttled).
        let class = if secret.is_some() {
            RefusalClass::WrongSecret
        } else {
            RefusalClass::Anonymous
        };
        return refused(
            ctx.deny(
                ErrorCode::AccessDenied,
                messages::ACCESS_DENIED,
                reason,
                Delivery::Fresh,
                now,
            )
            .class(class),
        );
    }
    request_rotation(
        ExpectRotationResponse::Registration,
        RotationReason::Registration,
    )
}

fn request_rotation(state: ExpectRotationResponse, reason: RotationReason) -> Next {
    (
        State::ExpectRotationResponse(state),
        Step::Send(ServerMessage::RotationRequest(RotationRequest { reason })),
    )
}

/// Whether the key a challenge asks for is one being bound now (a registration's, a
/// pre-registered one on first join, a rotation's) on a token that requires attestation. A key
/// already bound was attested, if at all, when it was bound.
fn needs_attestation(ctx: &Context, purpose: &Purpose) -> bool {
    ctx.spec.attestation.required()
        && match purpose {
            Purpose::Registration | Purpose::Rotation(_) => true,
            Purpose::BoundKey => ctx.previous_key.is_none(),
        }
}

fn challenge(ctx: &Context, key: p256::PublicKey, purpose: Purpose, now: UnixTime) -> Next {
    let nonce: [u8; 16] = ctx.entropy.bytes();
    let cluster = ctx.authority.cluster().to_string();
    let claims = ChallengeClaims {
        iss: cluster.clone(),
        aud: cluster,
        sub: keys::kid(&key),
        iat: now,
        nbf: now - CHALLENGE_NBF_SKEW_SECS,
        exp: now + CHALLENGE_TTL_SECS,
        nonce: URL_SAFE_NO_PAD.encode(nonce),
    };
    // A struct of strings and integers always serialises.
    let document = serde_json::to_string(&claims).unwrap_or_default();
    let attest = needs_attestation(ctx, &purpose);
    let step = Step::Send(ServerMessage::Challenge(Challenge {
        public_key: keys::ssh_public_key(&key),
        document: document.clone(),
        attest,
    }));
    (
        State::ExpectSolution(ExpectSolution {
            key,
            claims,
            document,
            attest,
            purpose,
        }),
        step,
    )
}

impl State {
    pub(super) fn handle(self, ctx: &Context, msg: ClientMessage, now: UnixTime) -> Next {
        match (self, msg) {
            (State::ExpectRotationResponse(s), ClientMessage::RotationResponse(r)) => {
                s.handle(ctx, r, now)
            }
            (State::ExpectSolution(s), ClientMessage::ChallengeSolution(m)) => {
                s.handle(ctx, m, now)
            }
            (State::ExpectCredential(s), ClientMessage::CredentialResponse(m)) => {
                s.handle(ctx, m, now)
            }
            (State::Done, _) => refused(
                ctx.deny(
                    ErrorCode::BadRequest,
                    "the ceremony is over",
                    "message after the ceremony ended",
                    Delivery::Fresh,
                    now,
                )
                .class(RefusalClass::Anonymous),
            ),
            (state, msg) => {
                let reason = format!(
                    "unexpected {} while waiting for {}",
                    msg.kind(),
                    state.expects()
                );
                let delivery = state.delivery().unwrap_or(Delivery::Fresh);
                let class = state.caller();
                refused(
                    ctx.deny(
                        ErrorCode::BadRequest,
                        "unexpected message",
                        &reason,
                        delivery,
                        now,
                    )
                    .class(class),
                )
            }
        }
    }

    /// The wire name of the message this state waits for.
    fn expects(&self) -> &'static str {
        match self {
            State::ExpectRotationResponse(_) => "rotation_response",
            State::ExpectSolution(_) => "challenge_solution",
            State::ExpectCredential(_) => "credential_response",
            State::Done => "nothing",
        }
    }

    /// What the caller has proven in this state: nothing while its first challenge is open
    /// (or once the ceremony is over).
    pub(super) fn caller(&self) -> RefusalClass {
        match self {
            State::ExpectSolution(ExpectSolution {
                purpose: Purpose::BoundKey,
                ..
            })
            | State::Done => RefusalClass::Anonymous,
            State::ExpectSolution(_)
            | State::ExpectRotationResponse(_)
            | State::ExpectCredential(_) => RefusalClass::Authenticated,
        }
    }

    /// Whether the ceremony so far is a redelivery; `None` once it is over.
    pub(super) fn delivery(&self) -> Option<Delivery> {
        match self {
            State::ExpectRotationResponse(ExpectRotationResponse::RotationDue(c))
            | State::ExpectSolution(ExpectSolution {
                purpose: Purpose::Rotation(c),
                ..
            })
            | State::ExpectCredential(ExpectCredential {
                purpose: Purpose::Rotation(c),
                ..
            }) => Some(c.delivery),
            State::ExpectRotationResponse(ExpectRotationResponse::Registration)
            | State::ExpectSolution(_)
            | State::ExpectCredential(_) => Some(Delivery::Fresh),
            State::Done => None,
        }
    }
}

impl ExpectRotationResponse {
    fn handle(self, ctx: &Context, r: RotationResponse, now: UnixTime) -> Next {
        let delivery = match &self {
            ExpectRotationResponse::Registration => Delivery::Fresh,
            ExpectRotationResponse::RotationDue(c) => c.delivery,
        };
        let Ok(new_key) = keys::parse_ssh_public_key(&r.public_key) else {
            return refused(ctx.deny(
                ErrorCode::BadRequest,
                "public_key must be an ecdsa-sha2-nistp256 SSH public key",
                "rotation response key unparseable",
                delivery,
                now,
            ));
        };
        let (current, purpose) = match self {
            ExpectRotationResponse::Registration => (ctx.previous_key, Purpose::Registration),
            ExpectRotationResponse::RotationDue(c) => (Some(c.key), Purpose::Rotation(c)),
        };
        if current == Some(new_key) {
            return refused(ctx.deny(
                ErrorCode::AccessDenied,
                "the new key must differ from the current bound key",
                "rotation reused the current key",
                delivery,
                now,
            ));
        }
        // A retired key may have been copied or leaked while it was bound: never again.
        if ctx
            .token
            .status
            .retired_public_keys
            .contains(&keys::kid(&new_key))
        {
            return refused(ctx.deny(
                ErrorCode::AccessDenied,
                "the new key must not be one this token was bound to before",
                "rotation reused a retired bound key",
                delivery,
                now,
            ));
        }
        challenge(ctx, new_key, purpose, now)
    }
}

impl Purpose {
    fn delivery(&self) -> Delivery {
        match self {
            Purpose::Rotation(c) => c.delivery,
            Purpose::BoundKey | Purpose::Registration => Delivery::Fresh,
        }
    }
}

impl ExpectSolution {
    fn handle(self, ctx: &Context, s: ChallengeSolution, now: UnixTime) -> Next {
        let ExpectSolution {
            key,
            claims,
            document,
            attest,
            purpose,
        } = self;
        let delivery = purpose.delivery();
        // A failed first proof by the bound key means nothing was proven.
        let class = match purpose {
            Purpose::BoundKey => RefusalClass::Anonymous,
            Purpose::Registration | Purpose::Rotation(_) => RefusalClass::Authenticated,
        };
        let denied = |reason: &str| {
            refused(
                ctx.deny(
                    ErrorCode::AccessDenied,
                    messages::ACCESS_DENIED,
                    reason,
                    delivery,
                    now,
                )
                .class(class),
            )
        };
        if let Err(e) = check_solution(&s.solution, &key, &claims, now) {
            return denied(&e.to_string());
        }
        let identity = match &s.identity_proof {
            Some(proof) => match check_solution(proof, &ctx.identity_key, &claims, now) {
                Ok(()) => IdentityProof::Proven,
                Err(e) => return denied(&format!("identity proof: {e}")),
            },
            None => IdentityProof::Absent,
        };
        // The attestation is checked once the key is proven (so only a holder of the key learns
        // why it was refused) and before the locks and stored state are looked at: for a token
        // that requires it, a key outside a trusted TPM is no proof at all.
        let attestation = match (attest, s.attestation) {
            (false, None) => return proven(ctx, key, identity, purpose, None, now),
            (false, Some(_)) => Err(AttestationError::Unrequested),
            (true, None) => Err(AttestationError::Missing),
            (true, Some(a)) => {
                let policy = attestation::Policy::from_spec(&ctx.spec.attestation);
                attestation::verify(&policy, &key, &document, &a, now)
            }
        };
        let verified = match attestation {
            Ok(v) => v,
            Err(e) => return refused(ctx.deny_attestation(&e, delivery, now)),
        };
        let secret: [u8; 32] = ctx.entropy.bytes();
        let made = match attestation::make_credential(
            &verified.ek_public,
            &verified.ak_name,
            &secret,
            &mut EntropyRng(&ctx.entropy),
        ) {
            Ok(m) => m,
            Err(e) => {
                let e = AttestationError::EkUnusable(e.to_string());
                return refused(ctx.deny_attestation(&e, delivery, now));
            }
        };
        (
            State::ExpectCredential(ExpectCredential {
                key,
                identity,
                purpose,
                ek: verified.ek,
                secret,
            }),
            Step::Send(ServerMessage::ActivateCredential(ActivateCredential {
                credential_blob: STANDARD.encode(made.credential_blob),
                encrypted_secret: STANDARD.encode(made.encrypted_secret),
            })),
        )
    }
}

impl ExpectCredential {
    fn handle(self, ctx: &Context, r: CredentialResponse, now: UnixTime) -> Next {
        let ExpectCredential {
            key,
            identity,
            purpose,
            ek,
            secret,
        } = self;
        let recovered = STANDARD.decode(r.secret.as_bytes()).unwrap_or_default();
        if !bool::from(recovered.as_slice().ct_eq(&secret)) {
            let e = AttestationError::Credential(
                "the secret returned is not the one sealed to the EK for this AK".into(),
            );
            return refused(ctx.deny_attestation(&e, purpose.delivery(), now));
        }
        proven(ctx, key, identity, purpose, Some(ek), now)
    }
}

/// Continues after the challenged key is proven (and attested, with `ek`, when that was asked):
/// a rotation's new key is bound; a first proof goes through the checks of §5.2.
fn proven(
    ctx: &Context,
    key: p256::PublicKey,
    identity: IdentityProof,
    purpose: Purpose,
    ek: Option<EkIdentity>,
    now: UnixTime,
) -> Next {
    let first = match purpose {
        Purpose::Rotation(checked) => {
            // The locks were checked on this ceremony's first proof, so a lock placed here is
            // the only one this ceremony can create.
            if let Err(r) = ctx.check_ek(ek.as_ref(), checked.delivery, now) {
                return refused(r);
            }
            let bound = FinalKey {
                key,
                change: KeyChange::Rotated,
                ek,
            };
            return (State::Done, ctx.finish(*checked, bound, now));
        }
        Purpose::BoundKey => FirstProof::BoundKey,
        Purpose::Registration => FirstProof::Registration,
    };
    let checked = match ctx.check(
        Proven {
            key,
            first,
            identity,
        },
        now,
    ) {
        Ok(c) => c,
        Err(refusal) => return refused(refusal),
    };
    if let Err(r) = ctx.check_ek(ek.as_ref(), checked.delivery, now) {
        return refused(r);
    }
    let rotation_due = ctx.token.rotation_due(now);
    match first {
        // A registration makes a fresh key, which satisfies a rotation due at the same time.
        FirstProof::Registration => {
            let change = if rotation_due {
                KeyChange::Rotated
            } else {
                KeyChange::Kept
            };
            let bound = FinalKey { key, change, ek };
            (State::Done, ctx.finish(checked, bound, now))
        }
        FirstProof::BoundKey if rotation_due => request_rotation(
            ExpectRotationResponse::RotationDue(Box::new(checked)),
            RotationReason::RotationDue,
        ),
        FirstProof::BoundKey => {
            let bound = FinalKey {
                key,
                change: KeyChange::Kept,
                ek,
            };
            (State::Done, ctx.finish(checked, bound, now))
        }
    }
}
