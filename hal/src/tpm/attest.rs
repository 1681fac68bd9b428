//! Key attestation on the device (`docs/protocol.md` §5.6): the endorsement key (EK) and its
//! certificate, an attestation key (AK) made under the EK, TPM2_Certify of a bound key by the AK,
//! and TPM2_ActivateCredential to recover the secret the auth service sealed to the EK.
//!
//! A TPM without a resource manager has about three object slots, so the order matters: the
//! bound key is loaded and its parent flushed before the EK and the AK come in. The recovered
//! credential comes back through a session salted to the EK with response encryption, so it
//! never crosses the TPM bus in the clear.

use tss_esapi::abstraction::{ak, ek, AsymmetricAlgorithmSelection};
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{
    AuthHandle, KeyHandle, ObjectHandle, PersistentTpmHandle, SessionHandle, TpmHandle,
};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, Digest, DigestList, EncryptedSecret, IdObject, Private, Public, SignatureScheme,
    SymmetricDefinition,
};
use tss_esapi::traits::Marshall;
use tss_esapi::Context;

use super::session::{no_session, start_encrypted_session, At, Fail, Stage};

/// The EKs a TPM may have been manufactured with, in the order the store looks for them: the
/// first whose certificate is in NV wins, so the auth service can check it against a vendor CA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum EkKind {
    Rsa2048,
    EccP256,
    EccP384,
}

const EK_KINDS: [EkKind; 3] = [EkKind::Rsa2048, EkKind::EccP256, EkKind::EccP384];

impl EkKind {
    /// Where the TCG EK Credential Profile (and swtpm_setup) persist this EK.
    fn persistent_handle(self) -> u32 {
        match self {
            EkKind::Rsa2048 => 0x8101_0001,
            EkKind::EccP256 => 0x8101_0002,
            EkKind::EccP384 => 0x8101_0016,
        }
    }

    fn selection(self) -> AsymmetricAlgorithmSelection {
        match self {
            EkKind::Rsa2048 => AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            EkKind::EccP256 => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
            EkKind::EccP384 => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP384),
        }
    }

    /// Whether the EK can be made again from tss-esapi's default (low-range) template. The P-384
    /// EK uses the high-range template, which only a persistent copy gives.
    fn has_default_template(self) -> bool {
        self != EkKind::EccP384
    }
}

/// The EK this TPM attests with, found once per store.
#[derive(Clone, Debug)]
pub(super) struct Ek {
    kind: EkKind,
    certificate: Option<Vec<u8>>,
    persistent: bool,
}

/// An AK made for an attestation, kept until the credential of the same ceremony is activated.
#[derive(Clone, Debug)]
pub(super) struct PendingAk {
    public: Public,
    private: Private,
}

/// What [`attest`] produced: the raw structures, and the AK for [`activate`].
pub(super) struct Certified {
    pub(super) ek_certificate: Option<Vec<u8>>,
    pub(super) ek_public: Vec<u8>,
    pub(super) ak_public: Vec<u8>,
    pub(super) certify_info: Vec<u8>,
    pub(super) certify_signature: Vec<u8>,
    pub(super) ak: PendingAk,
}

/// A u16 size, then `v`: the TPM2B form of a structure.
pub(super) fn tpm2b(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() + 2);
    out.extend_from_slice(&(v.len() as u16).to_be_bytes());
    out.extend_from_slice(v);
    out
}

fn marshall(p: &impl Marshall, stage: Stage) -> Result<Vec<u8>, Fail> {
    p.marshall().at(stage)
}

/// Looks for the EK: the first kind with a certificate (and a persistent copy or a template to
/// make it from), else the first persistent EK, else the ECC P-256 EK from its template.
pub(super) fn find_ek(ctx: &mut Context) -> Result<Ek, Fail> {
    let mut persistent = Vec::new();
    for kind in EK_KINDS {
        let present = open_persistent(ctx, kind.persistent_handle())?;
        if present {
            persistent.push(kind);
        }
        if !(present || kind.has_default_template()) {
            continue;
        }
        // An index that is not defined is the common case of a TPM without this certificate.
        if let Ok(cert) = ek::retrieve_ek_pubcert(ctx, kind.selection()) {
            return Ok(Ek {
                kind,
                certificate: Some(cert),
                persistent: present,
            });
        }
    }
    Ok(match persistent.first() {
        Some(&kind) => Ek {
            kind,
            certificate: None,
            persistent: true,
        },
        None => Ek {
            kind: EkKind::EccP256,
            certificate: None,
            persistent: false,
        },
    })
}

/// Whether a persistent object exists at `handle` (one ReadPublic).
fn open_persistent(ctx: &mut Context, handle: u32) -> Result<bool, Fail> {
    let h = PersistentTpmHandle::new(handle).at(Stage::Endorsement)?;
    match ctx.execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::Persistent(h))) {
        Ok(mut obj) => {
            ctx.tr_close(&mut obj).at(Stage::Cleanup)?;
            Ok(true)
        }
        Err(e) if matches!(super::error::classify(&e), super::error::Class::Tpm(_)) => Ok(false),
        Err(e) => Err(e).at(Stage::Endorsement),
    }
}

/// The EK's handle; release it with [`release_ek`].
fn ek_handle(ctx: &mut Context, ek: &Ek) -> Result<KeyHandle, Fail> {
    if ek.persistent {
        let h = PersistentTpmHandle::new(ek.kind.persistent_handle()).at(Stage::Endorsement)?;
        return ctx
            .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::Persistent(h)))
            .map(KeyHandle::from)
            .at(Stage::Endorsement);
    }
    ek::create_ek_object_2(ctx, ek.kind.selection(), None).at(Stage::Endorsement)
}

fn release_ek(ctx: &mut Context, ek: &Ek, handle: KeyHandle) -> Result<(), Fail> {
    let mut obj = ObjectHandle::from(handle);
    if ek.persistent {
        ctx.tr_close(&mut obj).at(Stage::Cleanup)
    } else {
        ctx.flush_context(obj).at(Stage::Cleanup)
    }
}

/// Certifies the loaded bound key `key` with a new AK under `ek`, `qualifying` as extraData.
/// `key_session` authorises the use of `key` (its auth value, if any, is set on the handle).
/// Flushes everything it loads; the caller flushes `key`.
pub(super) fn certify(
    ctx: &mut Context,
    ek: &Ek,
    key: KeyHandle,
    key_session: AuthSession,
    qualifying: &[u8; 32],
) -> Result<Certified, Fail> {
    let ek_h = ek_handle(ctx, ek)?;
    let made = (|| -> Result<_, Fail> {
        let (public, _, _) = ctx
            .execute_without_session(|c| c.read_public(ek_h))
            .at(Stage::Endorsement)?;
        let ak = ak::create_ak_2(
            ctx,
            ek_h,
            HashingAlgorithm::Sha256,
            AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
            SignatureSchemeAlgorithm::EcDsa,
            None,
            None,
        )
        .at(Stage::AttestationKey)?;
        let ak_h = ak::load_ak(
            ctx,
            ek_h,
            None,
            ak.out_private.clone(),
            ak.out_public.clone(),
        )
        .at(Stage::AttestationKey)?;
        Ok((public, ak, ak_h))
    })();
    // The AK, once loaded, no longer needs its parent: free the EK's slot before certifying.
    let released = release_ek(ctx, ek, ek_h);
    let (ek_public, ak, ak_h) = made?;
    released?;
    let data = Data::try_from(qualifying.to_vec()).at(Stage::Certify)?;
    let certified = ctx
        .execute_with_sessions(
            (Some(key_session), Some(AuthSession::Password), None),
            |c| c.certify(key.into(), ak_h, data, SignatureScheme::Null),
        )
        .at(Stage::Certify);
    let flushed = ctx.flush_context(ak_h.into()).at(Stage::Cleanup);
    let (attest, signature) = certified?;
    flushed?;
    Ok(Certified {
        ek_certificate: ek.certificate.clone(),
        ek_public: tpm2b(&marshall(&ek_public, Stage::Endorsement)?),
        ak_public: tpm2b(&marshall(&ak.out_public, Stage::AttestationKey)?),
        certify_info: marshall(&attest, Stage::Certify)?,
        certify_signature: marshall(&signature, Stage::Certify)?,
        ak: PendingAk {
            public: ak.out_public,
            private: ak.out_private,
        },
    })
}

/// TPM2_ActivateCredential with the AK of the last certification and the EK: the secret the
/// auth service sealed for them. The EK is authorised by its policy (PolicySecret on the
/// endorsement hierarchy, OR-ed with policy C for the SHA-384 high-range template); the AK by a
/// session salted to the EK that also encrypts the response, so the secret is never on the bus
/// in the clear.
pub(super) fn activate(
    ctx: &mut Context,
    ek: &Ek,
    ak: &PendingAk,
    credential_blob: &[u8],
    encrypted_secret: &[u8],
) -> Result<zeroize::Zeroizing<Vec<u8>>, Fail> {
    let blob = IdObject::try_from(credential_blob.to_vec()).at(Stage::Activate)?;
    let secret = EncryptedSecret::try_from(encrypted_secret.to_vec()).at(Stage::Activate)?;
    let ek_h = ek_handle(ctx, ek)?;
    let res = (|| -> Result<_, Fail> {
        let ak_h = ak::load_ak(ctx, ek_h, None, ak.private.clone(), ak.public.clone())
            .at(Stage::AttestationKey)?;
        let out = with_ek_policy(ctx, ek_h, |ctx, policy| {
            with_salted(ctx, ek_h, |ctx, salted| {
                ctx.execute_with_sessions((Some(salted), Some(policy), None), |c| {
                    c.activate_credential(ak_h, ek_h, blob.clone(), secret.clone())
                })
                .at(Stage::Activate)
            })
        });
        let flushed = ctx.flush_context(ak_h.into()).at(Stage::Cleanup);
        let out = out?;
        flushed?;
        Ok(zeroize::Zeroizing::new(out.value().to_vec()))
    })();
    let released = release_ek(ctx, ek, ek_h);
    let out = res?;
    released?;
    Ok(out)
}

/// Runs `f` with a policy session satisfying the EK's authPolicy, flushing it afterwards.
fn with_ek_policy<T>(
    ctx: &mut Context,
    ek_h: KeyHandle,
    f: impl FnOnce(&mut Context, AuthSession) -> Result<T, Fail>,
) -> Result<T, Fail> {
    let (public, _, _) = ctx
        .execute_without_session(|c| c.read_public(ek_h))
        .at(Stage::Endorsement)?;
    let high_range = public.name_hashing_algorithm() == HashingAlgorithm::Sha384;
    let (hash, sym) = if high_range {
        (HashingAlgorithm::Sha384, SymmetricDefinition::AES_256_CFB)
    } else {
        (HashingAlgorithm::Sha256, SymmetricDefinition::AES_128_CFB)
    };
    let policy = ctx
        .start_auth_session(None, None, None, SessionType::Policy, sym, hash)
        .at(Stage::Session)?
        .ok_or_else(no_session)?;
    let res = (|| -> Result<_, Fail> {
        let ps = PolicySession::try_from(policy).at(Stage::Session)?;
        ctx.execute_with_session(Some(AuthSession::Password), |c| {
            c.policy_secret(
                ps,
                AuthHandle::Endorsement,
                Default::default(),
                Default::default(),
                Default::default(),
                None,
            )
        })
        .at(Stage::Session)?;
        if high_range {
            let mut digests = DigestList::new();
            for d in [POLICY_A_SHA384, POLICY_C_SHA384] {
                digests
                    .add(Digest::try_from(d.to_vec()).at(Stage::Session)?)
                    .at(Stage::Session)?;
            }
            ctx.policy_or(ps, digests).at(Stage::Session)?;
        }
        f(ctx, policy)
    })();
    let flushed = ctx
        .flush_context(SessionHandle::from(policy).into())
        .at(Stage::Cleanup);
    let out = res?;
    flushed?;
    Ok(out)
}

/// Runs `f` in a session salted to `key` with parameter encryption
/// ([`start_encrypted_session`]), then flushes the session whatever `f` returned; `f`'s error
/// comes first.
pub(super) fn with_salted<T>(
    ctx: &mut Context,
    key: KeyHandle,
    f: impl FnOnce(&mut Context, AuthSession) -> Result<T, Fail>,
) -> Result<T, Fail> {
    let salted = start_encrypted_session(ctx, Some(key))?;
    let r = f(ctx, salted);
    let flushed = ctx
        .flush_context(SessionHandle::from(salted).into())
        .at(Stage::Cleanup);
    let r = r?;
    flushed?;
    Ok(r)
}

/// The TCG EK templates' policies for a SHA-384 EK (policy A: PolicySecret(endorsement);
/// policy C), OR-ed in its authPolicy (TCG EK Credential Profile 2.5, B.4).
const POLICY_A_SHA384: [u8; 48] = [
    0x8b, 0xbf, 0x22, 0x66, 0x53, 0x7c, 0x17, 0x1c, 0xb5, 0x6e, 0x40, 0x3c, 0x4d, 0xc1, 0xd4, 0xb6,
    0x4f, 0x43, 0x26, 0x11, 0xdc, 0x38, 0x6e, 0x6f, 0x53, 0x20, 0x50, 0xc3, 0x27, 0x8c, 0x93, 0x0e,
    0x14, 0x3e, 0x8b, 0xb1, 0x13, 0x38, 0x24, 0xcc, 0xb4, 0x31, 0x05, 0x38, 0x71, 0xc6, 0xdb, 0x53,
];
const POLICY_C_SHA384: [u8; 48] = [
    0xd6, 0x03, 0x2c, 0xe6, 0x1f, 0x2f, 0xb3, 0xc2, 0x40, 0xeb, 0x3c, 0xf6, 0xa3, 0x32, 0x37, 0xef,
    0x2b, 0x6a, 0x16, 0xf4, 0x29, 0x3c, 0x22, 0xb4, 0x55, 0xe2, 0x61, 0xcf, 0xfd, 0x21, 0x7a, 0xd5,
    0xb4, 0x94, 0x7c, 0x2d, 0x73, 0xe6, 0x30, 0x05, 0xee, 0xd2, 0xdc, 0x2b, 0x35, 0x93, 0xd1, 0x65,
];
