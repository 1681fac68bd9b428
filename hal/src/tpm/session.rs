//! Running TPM commands: the connection, the session each operation runs in, and the parent and
//! key objects loaded for it.
//!
//! A TPM reached without a resource manager (swtpm socket, `/dev/tpm0`) has only about three
//! object slots, so outside a *hold* nothing stays loaded between operations. A hold (from
//! `TpmKeyStore::prepare` to `release`) covers one ceremony: the parent and the one key in use
//! stay loaded across its operations, so a first join makes the storage primary once instead of
//! twice and a renewal's key is loaded before the challenge arrives. One [`Conn`] is kept per
//! store and made on first use; any failure that is not a plain TPM response (transport, library
//! state) drops it with everything it held, so the next call reconnects. That is what lets a
//! caller retry after the TPM vanished and came back.
//!
//! Sessions: with no auth value configured nothing secret crosses the bus, so commands run in a
//! password session with the empty password, which costs no TPM command; with an owner or key
//! auth value they run in an HMAC session, so the value itself is never sent, and the commands
//! that carry a secret (creating a key with an auth value, signing with it, activating a
//! credential) use a session salted to a key already in the TPM, with parameter encryption.

use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::constants::SessionType;
use tss_esapi::handles::SessionHandle;
use tss_esapi::handles::{KeyHandle, ObjectHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Auth, EccParameter, EccPoint, EccScheme, HashScheme, HashcheckTicket, Public, PublicBuilder,
    PublicEccParametersBuilder, SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::{Context, TctiNameConf};

use super::blob::KeyBlob;
use super::error::{classify, Class};
use crate::{KeyName, Parent, PublicKeyBytes};

/// Where the TCG provisioning guidance puts the storage root key, and where other software
/// (systemd, tpm2-tss-engine) persists the same ECC P-256 SRK the template gives.
pub(super) const STANDARD_SRK: u32 = 0x8100_0001;

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
    Endorsement,
    AttestationKey,
    Certify,
    Activate,
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
            Stage::Endorsement => "using the endorsement key",
            Stage::AttestationKey => "making the attestation key",
            Stage::Certify => "certifying the key",
            Stage::Activate => "activating the credential",
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

/// A connection to the TPM and what the store keeps loaded on it.
///
/// Invariant: every handle in `held` was loaded on `ctx` and is still loaded; when `holding` is
/// false, `held` is empty between operations.
pub(super) struct Conn {
    pub(super) ctx: Context,
    held: Held,
    holding: bool,
}

#[derive(Default)]
struct Held {
    parent: Option<LoadedParent>,
    key: Option<LoadedKey>,
}

/// A parent in use: a transient primary is flushed when let go, a persistent key only closed.
#[derive(Clone, Copy)]
struct LoadedParent {
    which: Parent,
    handle: KeyHandle,
    transient: bool,
}

/// A loaded bound key, identified by name and public key so a key deleted and made again under
/// the same name is never mistaken for the loaded one.
struct LoadedKey {
    name: KeyName,
    public: PublicKeyBytes,
    handle: KeyHandle,
}

/// How the store makes its parent: the owner's auth, and what it knows of a persistent SRK at
/// [`STANDARD_SRK`].
#[derive(Clone, Default)]
pub(super) struct ParentPolicy {
    pub(super) owner_auth: Option<zeroize::Zeroizing<Vec<u8>>>,
    /// The TPM name of the template primary when a persistent copy of it sits at
    /// [`STANDARD_SRK`] (checked by name, so another object there is never used).
    pub(super) srk_name: Option<Vec<u8>>,
    /// The owner allows this store to persist the template primary at [`STANDARD_SRK`].
    pub(super) persist_srk: bool,
    /// Set once this process looked at [`STANDARD_SRK`] after making the primary.
    pub(super) srk_probed: bool,
}

/// Whether commands need an HMAC session (an auth value must not cross the bus).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum SessionKind {
    Password,
    Hmac,
}

/// Runs `f` in a session of `kind` on the store's connection, connecting first if needed, and
/// drops the connection (with everything it held) after any failure that is not an ordinary
/// TPM response. Outside a hold, everything `f` loaded is released before returning.
///
/// When the TPM is out of object slots, `f` runs once more after every transient object was
/// flushed: a store that releases what it loads never fills the TPM, so the objects belong to a
/// process that died while holding them (on a TPM without a resource manager they stay loaded
/// until the TPM resets; through one, only this connection's objects are even visible).
pub(super) fn run<T>(
    slot: &mut Option<Conn>,
    tcti: &TctiNameConf,
    kind: SessionKind,
    mut f: impl FnMut(&mut Conn) -> Result<T, Fail>,
) -> Result<T, Fail> {
    match run_in(slot, tcti, Some(kind), &mut f) {
        Err(fail) if is_object_memory(&fail) => {
            // Ours go with the connection; then whatever a dead process left.
            *slot = None;
            let flushed = run_in(slot, tcti, None, |conn| flush_leftovers(&mut conn.ctx));
            match flushed {
                Ok(n) => {
                    tracing::warn!(objects = n, "the TPM was out of object slots; flushed the transient objects a stopped process left loaded");
                    run_in(slot, tcti, Some(kind), &mut f)
                }
                Err(_) => Err(fail),
            }
        }
        r => r,
    }
}

fn is_object_memory(f: &Fail) -> bool {
    matches!(
        classify(&f.err),
        Class::Tpm(tss_esapi::constants::response_code::Tss2ResponseCodeKind::ObjectMemory)
    )
}

/// Flushes every transient object the TPM lists; returns how many.
fn flush_leftovers(ctx: &mut Context) -> Result<usize, Fail> {
    use tss_esapi::constants::tss::TPM2_TRANSIENT_FIRST;
    use tss_esapi::constants::CapabilityType;
    use tss_esapi::structures::CapabilityData;
    let (data, _) = ctx
        .get_capability(CapabilityType::Handles, TPM2_TRANSIENT_FIRST, 64)
        .at(Stage::Cleanup)?;
    let CapabilityData::Handles(list) = data else {
        return Ok(0);
    };
    let mut n = 0;
    for h in list.into_inner() {
        let obj = ctx.tr_from_tpm_public(h).at(Stage::Cleanup)?;
        ctx.flush_context(obj).at(Stage::Cleanup)?;
        n += 1;
    }
    Ok(n)
}

/// [`run`] without a session, for commands that take no authorization (a parameter-encrypting
/// session is refused by commands without a sized first parameter).
pub(super) fn run_sessionless<T>(
    slot: &mut Option<Conn>,
    tcti: &TctiNameConf,
    f: impl FnMut(&mut Conn) -> Result<T, Fail>,
) -> Result<T, Fail> {
    run_in(slot, tcti, None, f)
}

fn run_in<T>(
    slot: &mut Option<Conn>,
    tcti: &TctiNameConf,
    kind: Option<SessionKind>,
    mut f: impl FnMut(&mut Conn) -> Result<T, Fail>,
) -> Result<T, Fail> {
    let conn = match slot {
        Some(conn) => conn,
        None => slot.insert(Conn {
            ctx: Context::new(tcti.clone()).at(Stage::Connect)?,
            held: Held::default(),
            holding: false,
        }),
    };
    let body = |conn: &mut Conn| {
        let res = f(conn);
        let cleanup = if conn.holding {
            Ok(())
        } else {
            conn.release_all()
        };
        finish(res, cleanup)
    };
    let res = match kind {
        Some(SessionKind::Password) => with_sessions(conn, Some(AuthSession::Password), body),
        Some(SessionKind::Hmac) => {
            let session = start_hmac_session(&mut conn.ctx)?;
            let res = with_sessions(conn, Some(session), body);
            let flushed = conn
                .ctx
                .flush_context(SessionHandle::from(session).into())
                .at(Stage::Cleanup);
            finish(res, flushed)
        }
        None => with_sessions(conn, None, body),
    };
    if let Err(fail) = &res {
        if fail.leaked || !matches!(classify(&fail.err), Class::Tpm(_)) {
            // Dropping the context also flushes every handle it still tracks.
            *slot = None;
        }
    }
    res
}
/// Runs `body` with `session` as the only authorization session, restoring the old ones after.
fn with_sessions<T>(
    conn: &mut Conn,
    session: Option<AuthSession>,
    body: impl FnOnce(&mut Conn) -> Result<T, Fail>,
) -> Result<T, Fail> {
    let old = conn.ctx.sessions();
    conn.ctx.set_sessions((session, None, None));
    let res = body(conn);
    conn.ctx.set_sessions(old);
    res
}

/// An unbound, unsalted HMAC session with parameter encryption (what
/// `execute_with_nullauth_session` starts), so auth values are proven by HMAC, not sent.
pub(super) fn start_hmac_session(ctx: &mut Context) -> Result<AuthSession, Fail> {
    start_encrypted_session(ctx, None)
}

/// An HMAC session with command and response parameter encryption, salted to `salt_key` when
/// one is given (its public key encrypts the salt: only this process and the TPM then know the
/// session key).
pub(super) fn start_encrypted_session(
    ctx: &mut Context,
    salt_key: Option<KeyHandle>,
) -> Result<AuthSession, Fail> {
    let session = ctx
        .start_auth_session(
            salt_key,
            None,
            None,
            SessionType::Hmac,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )
        .at(Stage::Session)?
        .ok_or_else(no_session)?;
    let (attributes, mask) = SessionAttributesBuilder::new()
        .with_decrypt(true)
        .with_encrypt(true)
        .build();
    if let Err(e) = ctx.tr_sess_set_attributes(session, attributes, mask) {
        let _ = ctx.flush_context(SessionHandle::from(session).into());
        return Err(e).at(Stage::Session);
    }
    Ok(session)
}

/// The failure of a session start that returned no session.
pub(super) fn no_session() -> Fail {
    Fail {
        stage: Stage::Session,
        err: tss_esapi::Error::WrapperError(tss_esapi::WrapperErrorKind::WrongValueFromTpm),
        leaked: false,
    }
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

impl Conn {
    /// Keeps what operations load until [`Conn::release_all`] (or the connection is dropped).
    pub(super) fn hold(&mut self) {
        self.holding = true;
    }

    /// Flushes the held key and lets go of the held parent, and ends the hold.
    pub(super) fn release_all(&mut self) -> Result<(), Fail> {
        self.holding = false;
        let key = self.drop_key();
        let parent = match self.held.parent.take() {
            Some(p) => release_parent(&mut self.ctx, p),
            None => Ok(()),
        };
        key.and(parent)
    }

    fn drop_key(&mut self) -> Result<(), Fail> {
        match self.held.key.take() {
            Some(k) => self.ctx.flush_context(k.handle.into()).at(Stage::Cleanup),
            None => Ok(()),
        }
    }

    /// The handle of parent `which`, made (or opened) unless it is already held.
    fn parent(&mut self, which: Parent, policy: &mut ParentPolicy) -> Result<KeyHandle, Fail> {
        if let Some(p) = self.held.parent {
            if p.which == which {
                return Ok(p.handle);
            }
            // Another parent: its key goes with it.
            self.drop_key()?;
            self.held.parent = None;
            release_parent(&mut self.ctx, p)?;
        }
        let p = load_parent(&mut self.ctx, which, policy)?;
        self.held.parent = Some(p);
        Ok(p.handle)
    }

    /// The handle of `blob` (key `name`) loaded under its parent, unless it is already held.
    pub(super) fn key(
        &mut self,
        name: &KeyName,
        blob: &KeyBlob,
        policy: &mut ParentPolicy,
    ) -> Result<KeyHandle, Fail> {
        let parent = self.parent(blob.parent(), policy)?;
        let public = blob.public_key();
        if let Some(k) = &self.held.key {
            if &k.name == name && k.public == public {
                return Ok(k.handle);
            }
        }
        // One key at a time: a TPM without a resource manager has few object slots.
        self.drop_key()?;
        let handle = self
            .ctx
            .load(parent, blob.private().clone(), blob.public().clone())
            .at(Stage::Load)?;
        self.held.key = Some(LoadedKey {
            name: name.clone(),
            public,
            handle,
        });
        Ok(handle)
    }
}

impl Conn {
    /// Loads `blob` for the caller alone (it flushes the handle) and lets its parent go, ending
    /// any hold first: for operations that need the TPM's few object slots for other keys.
    /// `session` authorises the parent's creation and use.
    pub(super) fn load_unheld(
        &mut self,
        blob: &KeyBlob,
        policy: &mut ParentPolicy,
        session: AuthSession,
    ) -> Result<KeyHandle, Fail> {
        self.release_all()?;
        let ctx = &mut self.ctx;
        let parent =
            ctx.execute_with_session(Some(session), |c| load_parent(c, blob.parent(), policy))?;
        let key = ctx
            .execute_with_session(Some(session), |c| {
                c.load(parent.handle, blob.private().clone(), blob.public().clone())
            })
            .at(Stage::Load);
        let released = release_parent(&mut self.ctx, parent);
        let key = key?;
        if let Err(mut e) = released {
            e.leaked = true;
            return Err(e);
        }
        Ok(key)
    }
}

fn release_parent(ctx: &mut Context, p: LoadedParent) -> Result<(), Fail> {
    let mut obj = ObjectHandle::from(p.handle);
    if p.transient {
        ctx.flush_context(obj).at(Stage::Cleanup)
    } else {
        // A persistent object is only closed in ESYS; flushing it is not allowed.
        ctx.tr_close(&mut obj).at(Stage::Cleanup)
    }
}

/// Makes `which` available: opens a persistent key, or for the template uses the persistent SRK
/// when it is known to be the same key, else creates the primary.
fn load_parent(
    ctx: &mut Context,
    which: Parent,
    policy: &mut ParentPolicy,
) -> Result<LoadedParent, Fail> {
    match which {
        Parent::Persistent(h) => {
            let obj = open_persistent(ctx, h)?;
            Ok(LoadedParent {
                which,
                handle: obj.into(),
                transient: false,
            })
        }
        Parent::Template => {
            if let Some(expected) = policy.srk_name.clone() {
                match open_persistent(ctx, STANDARD_SRK) {
                    Ok(mut obj) => match ctx.tr_get_name(obj) {
                        Ok(n) if n.value() == expected.as_slice() => {
                            return Ok(LoadedParent {
                                which,
                                handle: obj.into(),
                                transient: false,
                            })
                        }
                        _ => {
                            ctx.tr_close(&mut obj).at(Stage::Cleanup)?;
                            policy.srk_name = None;
                        }
                    },
                    // Evicted (or the TPM was cleared): back to making the primary.
                    Err(f) if matches!(classify(&f.err), Class::Tpm(_)) => policy.srk_name = None,
                    Err(f) => return Err(f),
                }
            }
            if let Some(a) = policy.owner_auth.as_ref() {
                ctx.tr_set_auth(ObjectHandle::Owner, auth_value(a)?)
                    .at(Stage::Parent)?;
            }
            let template = storage_primary_template().at(Stage::Parent)?;
            let handle = ctx
                .create_primary(Hierarchy::Owner, template, None, None, None, None)
                .at(Stage::Parent)?
                .key_handle;
            Ok(LoadedParent {
                which,
                handle,
                transient: true,
            })
        }
    }
}

fn open_persistent(ctx: &mut Context, h: u32) -> Result<ObjectHandle, Fail> {
    let handle = PersistentTpmHandle::new(h).at(Stage::Parent)?;
    // ReadPublic takes no authorization; libtss2 crashes when given the password session.
    ctx.execute_without_session(|ctx| ctx.tr_from_tpm_public(TpmHandle::Persistent(handle)))
        .at(Stage::Parent)
}

/// Runs `f` with the parent `which` available (held, or made for `f` alone).
pub(super) fn with_parent<T>(
    conn: &mut Conn,
    which: Parent,
    policy: &mut ParentPolicy,
    f: impl FnOnce(&mut Context, KeyHandle) -> Result<T, Fail>,
) -> Result<T, Fail> {
    let parent = conn.parent(which, policy)?;
    f(&mut conn.ctx, parent)
}

/// Runs `f` with key `name` (stored as `blob`) loaded under its parent: the path every
/// operation on an existing key takes.
pub(super) fn with_loaded_key<T>(
    conn: &mut Conn,
    name: &KeyName,
    blob: &KeyBlob,
    policy: &mut ParentPolicy,
    f: impl FnOnce(&mut Context, KeyHandle) -> Result<T, Fail>,
) -> Result<T, Fail> {
    let key = conn.key(name, blob, policy)?;
    f(&mut conn.ctx, key)
}

/// After making the template primary (transient `primary`, with TPM name `name`): learns whether
/// [`STANDARD_SRK`] holds the same key, and persists it there when the owner allows and the
/// handle is free. Returns the name to remember, if the SRK is now usable. Never fails the
/// operation: a refusal only means keys keep using a transient primary.
pub(super) fn learn_srk(ctx: &mut Context, primary: KeyHandle, persist: bool) -> Option<Vec<u8>> {
    let ours = ctx.tr_get_name(primary.into()).ok()?.value().to_vec();
    match open_persistent(ctx, STANDARD_SRK) {
        Ok(mut obj) => {
            let theirs = ctx.tr_get_name(obj).ok().map(|n| n.value().to_vec());
            let _ = ctx.tr_close(&mut obj);
            if theirs.as_deref() == Some(ours.as_slice()) {
                return Some(ours);
            }
            tracing::info!(handle = "0x81000001", "the standard SRK handle holds another object; bound keys keep using a transient storage primary");
            None
        }
        Err(_) if persist => {
            let handle = PersistentTpmHandle::new(STANDARD_SRK).ok()?;
            match ctx.evict_control(
                Provision::Owner,
                primary.into(),
                Persistent::Persistent(handle),
            ) {
                Ok(mut obj) => {
                    let _ = ctx.tr_close(&mut obj);
                    tracing::info!(
                        handle = "0x81000001",
                        "persisted the storage primary at the standard SRK handle"
                    );
                    Some(ours)
                }
                Err(e) => {
                    tracing::warn!(handle = "0x81000001", error = %e, "could not persist the storage primary; bound keys keep using a transient one");
                    None
                }
            }
        }
        Err(_) => None,
    }
}

/// The parent `conn` holds now (after `with_parent` or `with_loaded_key` it is the one in use).
pub(super) fn held_parent(conn: &Conn) -> Option<KeyHandle> {
    conn.held.parent.map(|p| p.handle)
}

/// The parent `conn` holds now, if it is a transient primary (just made from the template).
pub(super) fn held_transient_primary(conn: &Conn) -> Option<KeyHandle> {
    conn.held
        .parent
        .filter(|p| p.transient && p.which == Parent::Template)
        .map(|p| p.handle)
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
