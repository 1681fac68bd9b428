//! Running TPM commands: the connection, one null-auth session per operation, and the parent and
//! key objects loaded for it and flushed afterwards, error paths included.
//!
//! A TPM reached without a resource manager (swtpm socket, `/dev/tpm0`) has only about three
//! object slots, so nothing may stay loaded between operations. One [`Context`] is kept per store
//! and created on first use; any failure that is not a plain TPM response (transport, library
//! state) drops it, so the next call reconnects. That is what lets a caller retry after the TPM
//! vanished and came back.

use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::handles::{KeyHandle, ObjectHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::structures::{
    Auth, EccParameter, EccPoint, EccScheme, HashScheme, HashcheckTicket, Public, PublicBuilder,
    PublicEccParametersBuilder, SymmetricDefinitionObject,
};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::{Context, TctiNameConf};

use super::blob::KeyBlob;
use super::error::{classify, Class};
use crate::Parent;

/// The stage an error came from decides what it means (an auth failure while signing is the
/// key's auth; while making the primary it is the owner's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stage {
    Connect,
    Session,
    Parent,
    Create,
    Load,
    Sign,
    Query,
    Cleanup,
}

impl Stage {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Stage::Connect => "connecting",
            Stage::Session => "starting a session",
            Stage::Parent => "making the parent key",
            Stage::Create => "creating the key",
            Stage::Load => "loading the key",
            Stage::Sign => "signing",
            Stage::Query => "querying the TPM",
            Stage::Cleanup => "flushing handles",
        }
    }
}

/// A failed TPM command and where in the operation it failed.
#[derive(Debug)]
pub(super) struct Fail {
    pub(super) stage: Stage,
    pub(super) err: tss_esapi::Error,
    /// A handle may still be loaded: the connection must be dropped to free it.
    pub(super) leaked: bool,
}

impl From<tss_esapi::Error> for Fail {
    fn from(err: tss_esapi::Error) -> Self {
        Fail {
            stage: Stage::Session,
            err,
            leaked: false,
        }
    }
}

/// Tags a tss-esapi result with the stage it belongs to.
pub(super) trait At<T> {
    fn at(self, stage: Stage) -> Result<T, Fail>;
}

impl<T> At<T> for Result<T, tss_esapi::Error> {
    fn at(self, stage: Stage) -> Result<T, Fail> {
        self.map_err(|err| Fail {
            stage,
            err,
            leaked: false,
        })
    }
}

/// Runs `f` in a fresh null-auth session on the store's connection, connecting first if needed,
/// and drops the connection after any failure that is not an ordinary TPM response.
pub(super) fn run<T>(
    slot: &mut Option<Context>,
    tcti: &TctiNameConf,
    f: impl FnOnce(&mut Context) -> Result<T, Fail>,
) -> Result<T, Fail> {
    run_in(slot, tcti, true, f)
}

/// [`run`] without a session, for commands that take no authorization (a parameter-encrypting
/// session is refused by commands without a sized first parameter).
pub(super) fn run_sessionless<T>(
    slot: &mut Option<Context>,
    tcti: &TctiNameConf,
    f: impl FnOnce(&mut Context) -> Result<T, Fail>,
) -> Result<T, Fail> {
    run_in(slot, tcti, false, f)
}

fn run_in<T>(
    slot: &mut Option<Context>,
    tcti: &TctiNameConf,
    session: bool,
    f: impl FnOnce(&mut Context) -> Result<T, Fail>,
) -> Result<T, Fail> {
    let ctx = match slot {
        Some(ctx) => ctx,
        None => slot.insert(Context::new(tcti.clone()).at(Stage::Connect)?),
    };
    let res = if session {
        ctx.execute_with_nullauth_session(f)
    } else {
        ctx.execute_without_session(f)
    };
    if let Err(fail) = &res {
        if fail.leaked || !matches!(classify(&fail.err), Class::Tpm(_)) {
            // Dropping the context also flushes every handle it still tracks.
            *slot = None;
        }
    }
    res
}

/// Combines an operation's result with its cleanup's, keeping the first error.
fn finish<T>(res: Result<T, Fail>, cleanup: Result<(), Fail>) -> Result<T, Fail> {
    match (res, cleanup) {
        (Ok(v), Ok(())) => Ok(v),
        (Ok(_), Err(mut c)) => {
            c.leaked = true;
            Err(c)
        }
        (Err(mut e), Err(_)) => {
            e.leaked = true;
            Err(e)
        }
        (Err(e), Ok(())) => Err(e),
    }
}

/// Makes the parent available for `f` and releases it afterwards, whatever `f` returned.
pub(super) fn with_parent<T>(
    ctx: &mut Context,
    parent: Parent,
    owner_auth: Option<&[u8]>,
    f: impl FnOnce(&mut Context, KeyHandle) -> Result<T, Fail>,
) -> Result<T, Fail> {
    match parent {
        Parent::Template => {
            if let Some(a) = owner_auth {
                ctx.tr_set_auth(ObjectHandle::Owner, auth_value(a)?)
                    .at(Stage::Parent)?;
            }
            let template = storage_primary_template().at(Stage::Parent)?;
            let primary = ctx
                .create_primary(Hierarchy::Owner, template, None, None, None, None)
                .at(Stage::Parent)?
                .key_handle;
            let res = f(ctx, primary);
            let cleanup = ctx.flush_context(primary.into()).at(Stage::Cleanup);
            finish(res, cleanup)
        }
        Parent::Persistent(h) => {
            let handle = PersistentTpmHandle::new(h).at(Stage::Parent)?;
            let mut obj = ctx
                .tr_from_tpm_public(TpmHandle::Persistent(handle))
                .at(Stage::Parent)?;
            let res = f(ctx, obj.into());
            // A persistent object is only closed in ESYS; flushing it is not allowed.
            let cleanup = ctx.tr_close(&mut obj).at(Stage::Cleanup);
            finish(res, cleanup)
        }
    }
}

/// Loads `blob` under its parent for the length of `f`, flushing both afterwards: the path every
/// operation on an existing key takes.
pub(super) fn with_loaded_key<T>(
    ctx: &mut Context,
    blob: &KeyBlob,
    owner_auth: Option<&[u8]>,
    f: impl FnOnce(&mut Context, KeyHandle) -> Result<T, Fail>,
) -> Result<T, Fail> {
    with_parent(ctx, blob.parent(), owner_auth, |ctx, parent| {
        with_key(ctx, parent, blob, f)
    })
}

/// Loads `blob` under `parent` for `f` and flushes it afterwards, whatever `f` returned.
pub(super) fn with_key<T>(
    ctx: &mut Context,
    parent: KeyHandle,
    blob: &KeyBlob,
    f: impl FnOnce(&mut Context, KeyHandle) -> Result<T, Fail>,
) -> Result<T, Fail> {
    let key = ctx
        .load(parent, blob.private().clone(), blob.public().clone())
        .at(Stage::Load)?;
    let res = f(ctx, key);
    let cleanup = ctx.flush_context(key.into()).at(Stage::Cleanup);
    finish(res, cleanup)
}

pub(super) fn auth_value(a: &[u8]) -> Result<Auth, Fail> {
    Auth::try_from(a).at(Stage::Session)
}

/// The TCG ECC P-256 SRK template (TCG TPM v2.0 Provisioning Guidance, 7.5.1): the same
/// primary as other software that follows it, and deterministic per owner seed.
fn storage_primary_template() -> Result<Public, tss_esapi::Error> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    let zero = EccParameter::try_from(vec![0u8; 32])?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::new(zero.clone(), zero))
        .build()
}

/// fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | sign, ECDSA-SHA256, P-256.
pub(super) fn key_template() -> Result<Public, tss_esapi::Error> {
    tss_esapi::utils::create_unrestricted_signing_ecc_public(
        EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
        EccCurve::NistP256,
    )
}

/// An unrestricted key may sign an externally computed digest; the TPM wants a NULL ticket for
/// that (a real ticket only matters for restricted keys).
pub(super) fn null_ticket() -> Result<HashcheckTicket, tss_esapi::Error> {
    HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
        tag: TPM2_ST_HASHCHECK,
        hierarchy: TPM2_RH_NULL,
        digest: Default::default(),
    })
}
