//! The device side of a key attestation, done with a real TPM (tss-esapi against a swtpm
//! manufactured with EK certificates), for the auth service's tests. It is also a worked example
//! of `docs/protocol.md` §5.6 for the agent: which TPM commands make each field.
//!
//! Every object is loaded for one operation and flushed after it, because a socket swtpm has no
//! resource manager and only a few object slots.

// Test support: failing loudly at the point of failure is this crate's contract.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::str::FromStr;

use tss_esapi::abstraction::ak;
use tss_esapi::abstraction::ek;
use tss_esapi::abstraction::AsymmetricAlgorithmSelection;
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::constants::SessionType;
use tss_esapi::handles::AuthHandle;
use tss_esapi::handles::{KeyHandle, ObjectHandle, PersistentTpmHandle, SessionHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{
    HashingAlgorithm, PublicAlgorithm, SignatureSchemeAlgorithm,
};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, Digest, DigestList, EccParameter, EccPoint, EccScheme, EncryptedSecret, HashScheme,
    HashcheckTicket, IdObject, KeyDerivationFunctionScheme, PcrSelectionList, Private, Public,
    PublicBuilder, PublicEccParametersBuilder, SignatureScheme, SymmetricDefinition,
    SymmetricDefinitionObject,
};
use tss_esapi::traits::Marshall;
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::{Context, TctiNameConf};

/// Which of the TPM's manufactured EKs (as `swtpm_setup --create-ek-cert` makes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EkKind {
    /// RSA 2048 at 0x81010001, certificate in NV 0x01c00002.
    Rsa2048,
    /// ECC P-384 (high-range template: SHA-384 name, AES-256) at 0x81010016, certificate in NV
    /// 0x01c00016.
    EccP384,
    /// ECC P-256 from the TCG default (low-range) template, made as a transient primary for
    /// each use; swtpm_setup gives it no certificate.
    EccP256,
}

impl EkKind {
    fn persistent(self) -> Option<u32> {
        match self {
            EkKind::Rsa2048 => Some(0x8101_0001),
            EkKind::EccP384 => Some(0x8101_0016),
            EkKind::EccP256 => None,
        }
    }

    fn selection(self) -> AsymmetricAlgorithmSelection {
        match self {
            EkKind::Rsa2048 => AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            EkKind::EccP384 => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP384),
            EkKind::EccP256 => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
        }
    }
}

/// What kind of key plays the attestation key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AkKind {
    /// A restricted ECDSA P-256/SHA-256 signing key under the EK (`tpm2_createak -G ecc`).
    EcdsaP256,
    /// A restricted RSASSA-SHA256 RSA 2048 signing key under the EK.
    Rsa2048,
    /// An unrestricted signing key: it signs anything, so its "certification" proves nothing.
    Unrestricted,
}

/// A key's blobs, as a device stores them: TPMT_PUBLIC and TPM2B_PRIVATE contents.
#[derive(Debug, Clone)]
pub struct KeyBlob {
    pub public: Public,
    pub private: Private,
    /// Under the EK (an AK) or under the owner storage primary.
    pub under_ek: Option<EkKind>,
}

impl KeyBlob {
    /// TPM2B_PUBLIC: the size prefix, then the TPMT_PUBLIC.
    pub fn tpm2b_public(&self) -> Vec<u8> {
        tpm2b(&self.public.marshall().unwrap())
    }

    /// The P-256 public key of an ECC key.
    pub fn p256(&self) -> p256::PublicKey {
        let Public::Ecc { unique, .. } = &self.public else {
            panic!("not an ECC key")
        };
        let mut sec1 = vec![4u8];
        sec1.extend(left_pad(unique.x().value(), 32));
        sec1.extend(left_pad(unique.y().value(), 32));
        p256::PublicKey::from_sec1_bytes(&sec1).unwrap()
    }
}

fn left_pad(v: &[u8], n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n - v.len()];
    out.extend_from_slice(v);
    out
}

pub fn tpm2b(v: &[u8]) -> Vec<u8> {
    let mut out = (v.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(v);
    out
}

/// One connection to one TPM.
pub struct TpmDevice {
    ctx: Context,
}

impl TpmDevice {
    pub fn connect(tcti: &str) -> TpmDevice {
        let ctx = Context::new(TctiNameConf::from_str(tcti).unwrap()).unwrap();
        TpmDevice { ctx }
    }

    /// The EK's handle; pair every call with [`TpmDevice::release_ek`].
    fn ek_handle(&mut self, kind: EkKind) -> KeyHandle {
        let Some(handle) = kind.persistent() else {
            return ek::create_ek_object_2(&mut self.ctx, kind.selection(), None).unwrap();
        };
        let h = PersistentTpmHandle::new(handle).unwrap();
        self.ctx
            .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::Persistent(h)))
            .unwrap()
            .into()
    }

    /// Flushes a transient EK (a persistent one stays).
    fn release_ek(&mut self, kind: EkKind, h: KeyHandle) {
        if kind.persistent().is_none() {
            self.ctx.flush_context(h.into()).unwrap();
        }
    }

    /// The EK's TPM2B_PUBLIC, as TPM2_ReadPublic returns it.
    pub fn ek_public(&mut self, kind: EkKind) -> Vec<u8> {
        let ek = self.ek_handle(kind);
        let (public, _, _) = self
            .ctx
            .execute_without_session(|c| c.read_public(ek))
            .unwrap();
        self.release_ek(kind, ek);
        tpm2b(&public.marshall().unwrap())
    }

    /// The EK certificate (DER) from its NV index.
    pub fn ek_certificate(&mut self, kind: EkKind) -> Vec<u8> {
        ek::retrieve_ek_pubcert(&mut self.ctx, kind.selection()).unwrap()
    }

    fn primary(&mut self) -> KeyHandle {
        primary_in(&mut self.ctx)
    }

    /// A P-256 ECDSA signing key under the owner storage primary, made like the agent's bound
    /// key (fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, sign), or with the
    /// attributes `custom` builds.
    pub fn create_key(&mut self, custom: Option<ObjectAttributesBuilder>) -> KeyBlob {
        let template = match custom {
            None => tss_esapi::utils::create_unrestricted_signing_ecc_public(
                EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
                EccCurve::NistP256,
            )
            .unwrap(),
            Some(attrs) => PublicBuilder::new()
                .with_public_algorithm(PublicAlgorithm::Ecc)
                .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
                .with_object_attributes(attrs.build().unwrap())
                .with_ecc_parameters(
                    PublicEccParametersBuilder::new()
                        .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(
                            HashingAlgorithm::Sha256,
                        )))
                        .with_curve(EccCurve::NistP256)
                        .with_symmetric(SymmetricDefinitionObject::Null)
                        .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                        .with_is_signing_key(true)
                        .with_is_decryption_key(false)
                        .with_restricted(false)
                        .build()
                        .unwrap(),
                )
                .with_ecc_unique_identifier(EccPoint::default())
                .build()
                .unwrap(),
        };
        let parent = self.primary();
        let r = self
            .ctx
            .execute_with_nullauth_session(|c| c.create(parent, template, None, None, None, None))
            .unwrap();
        self.ctx.flush_context(parent.into()).unwrap();
        KeyBlob {
            public: r.out_public,
            private: r.out_private,
            under_ek: None,
        }
    }

    /// An attestation key under `ek` (or, for [`AkKind::Unrestricted`], a plain signing key).
    pub fn create_ak(&mut self, ek: EkKind, kind: AkKind) -> KeyBlob {
        let (sign, selection) = match kind {
            AkKind::EcdsaP256 => (
                SignatureSchemeAlgorithm::EcDsa,
                AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
            ),
            AkKind::Rsa2048 => (
                SignatureSchemeAlgorithm::RsaSsa,
                AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            ),
            AkKind::Unrestricted => return self.create_key(None),
        };
        let ek_handle = self.ek_handle(ek);
        let r = ak::create_ak_2(
            &mut self.ctx,
            ek_handle,
            HashingAlgorithm::Sha256,
            selection,
            sign,
            None,
            None,
        )
        .unwrap();
        self.release_ek(ek, ek_handle);
        KeyBlob {
            public: r.out_public,
            private: r.out_private,
            under_ek: Some(ek),
        }
    }

    /// Loads `blob`, runs `f` with its handle, flushes it.
    fn with_loaded<T>(
        &mut self,
        blob: &KeyBlob,
        f: impl FnOnce(&mut Context, KeyHandle) -> T,
    ) -> T {
        let handle = match blob.under_ek {
            Some(ekk) => {
                let ek_handle = self.ek_handle(ekk);
                let h = ak::load_ak(
                    &mut self.ctx,
                    ek_handle,
                    None,
                    blob.private.clone(),
                    blob.public.clone(),
                )
                .unwrap();
                self.release_ek(ekk, ek_handle);
                h
            }
            None => {
                let parent = self.primary();
                let h = self
                    .ctx
                    .execute_with_nullauth_session(|c| {
                        c.load(parent, blob.private.clone(), blob.public.clone())
                    })
                    .unwrap();
                // A loaded key no longer needs its parent; the slot is needed (three in all).
                self.ctx.flush_context(parent.into()).unwrap();
                h
            }
        };
        let out = f(&mut self.ctx, handle);
        self.ctx.flush_context(handle.into()).unwrap();
        out
    }

    /// ES256 signature (r‖s) of a SHA-256 digest by `key`.
    pub fn sign(&mut self, key: &KeyBlob, digest: &[u8]) -> [u8; 64] {
        let digest = Digest::try_from(digest.to_vec()).unwrap();
        let sig = self.with_loaded(key, |c, h| {
            let ticket = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
                tag: TPM2_ST_HASHCHECK,
                hierarchy: TPM2_RH_NULL,
                digest: Default::default(),
            })
            .unwrap();
            c.execute_with_nullauth_session(|c| c.sign(h, digest, SignatureScheme::Null, ticket))
                .unwrap()
        });
        let tss_esapi::structures::Signature::EcDsa(e) = sig else {
            panic!("not ECDSA")
        };
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&left_pad(e.signature_r().value(), 32));
        out[32..].copy_from_slice(&left_pad(e.signature_s().value(), 32));
        out
    }

    /// TPM2_Certify of `key` by `signer` with `qualifying` as extraData: the TPMS_ATTEST and
    /// the TPMT_SIGNATURE, marshalled.
    pub fn certify(
        &mut self,
        key: &KeyBlob,
        signer: &KeyBlob,
        qualifying: &[u8],
    ) -> (Vec<u8>, Vec<u8>) {
        let signer = signer.clone();
        let data = Data::try_from(qualifying.to_vec()).unwrap();
        let key = key.clone();
        self.with_loaded(&signer, |ctx, ak_handle| {
            // The certified key is always a device key under the owner storage primary.
            let parent = primary_in(ctx);
            let obj = ctx
                .execute_with_nullauth_session(|c| {
                    c.load(parent, key.private.clone(), key.public.clone())
                })
                .unwrap();
            ctx.flush_context(parent.into()).unwrap();
            let (attest, sig) = ctx
                .execute_with_sessions(
                    (
                        Some(AuthSession::Password),
                        Some(AuthSession::Password),
                        None,
                    ),
                    |c| {
                        c.certify(
                            ObjectHandle::from(obj),
                            ak_handle,
                            data,
                            SignatureScheme::Null,
                        )
                    },
                )
                .unwrap();
            ctx.flush_context(obj.into()).unwrap();
            (attest.marshall().unwrap(), sig.marshall().unwrap())
        })
    }

    /// TPM2_Quote by `signer` (a TPMS_ATTEST of type quote, not a certification).
    pub fn quote(&mut self, signer: &KeyBlob, qualifying: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let data = Data::try_from(qualifying.to_vec()).unwrap();
        self.with_loaded(signer, |ctx, h| {
            let (attest, sig) = ctx
                .execute_with_nullauth_session(|c| {
                    c.quote(
                        h,
                        data,
                        SignatureScheme::Null,
                        PcrSelectionList::builder().build().unwrap(),
                    )
                })
                .unwrap();
            (attest.marshall().unwrap(), sig.marshall().unwrap())
        })
    }

    /// TPM2_ActivateCredential with `ak` and the EK `ek` (authorised by PolicySecret on the
    /// endorsement hierarchy, OR-ed with the high-range templates' policy for a SHA-384 EK).
    pub fn activate_credential(
        &mut self,
        ak_blob: &KeyBlob,
        ek: EkKind,
        credential_blob: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>, tss_esapi::Error> {
        let blob = IdObject::try_from(credential_blob.to_vec())?;
        let secret = EncryptedSecret::try_from(encrypted_secret.to_vec())?;
        let ek_handle = self.ek_handle(ek);
        let ak_blob = ak_blob.clone();
        // The AK is loaded with its own policy session first (load_ak), then a fresh one
        // authorises the EK for the activation itself.
        let out = self.with_loaded(&ak_blob, |ctx, ak_handle| {
            let (hash, sym) = match ek {
                EkKind::Rsa2048 | EkKind::EccP256 => {
                    (HashingAlgorithm::Sha256, SymmetricDefinition::AES_128_CFB)
                }
                EkKind::EccP384 => (HashingAlgorithm::Sha384, SymmetricDefinition::AES_256_CFB),
            };
            let policy = ctx
                .start_auth_session(None, None, None, SessionType::Policy, sym, hash)?
                .expect("policy session");
            let (attrs, mask) = SessionAttributesBuilder::new().build();
            ctx.tr_sess_set_attributes(policy, attrs, mask)?;
            let result = (|| {
                ctx.execute_with_nullauth_session(|c| {
                    c.policy_secret(
                        PolicySession::try_from(policy)?,
                        AuthHandle::Endorsement,
                        Default::default(),
                        Default::default(),
                        Default::default(),
                        None,
                    )
                })?;
                if ek == EkKind::EccP384 {
                    let mut digests = DigestList::new();
                    digests.add(Digest::try_from(POLICY_A_SHA384.to_vec())?)?;
                    digests.add(Digest::try_from(POLICY_C_SHA384.to_vec())?)?;
                    ctx.policy_or(PolicySession::try_from(policy)?, digests)?;
                }
                ctx.execute_with_sessions((Some(AuthSession::Password), Some(policy), None), |c| {
                    c.activate_credential(ak_handle, ek_handle, blob, secret)
                })
            })();
            ctx.flush_context(SessionHandle::from(policy).into())?;
            result.map(|d| d.value().to_vec())
        });
        self.release_ek(ek, ek_handle);
        out
    }
}

fn primary_in(ctx: &mut Context) -> KeyHandle {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .unwrap();
    let zero = EccParameter::try_from(vec![0u8; 32]).unwrap();
    let template = PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()
            .unwrap(),
        )
        .with_ecc_unique_identifier(EccPoint::new(zero.clone(), zero))
        .build()
        .unwrap();
    ctx.execute_with_nullauth_session(|c| {
        c.create_primary(Hierarchy::Owner, template, None, None, None, None)
    })
    .unwrap()
    .key_handle
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
