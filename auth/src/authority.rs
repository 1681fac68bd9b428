//! The auth service's keys: a TLS CA (pinned by agents, signs the listener's certificate), an
//! identity CA (signs bot certificates; rotatable) and a join-state CA (signs join-state
//! documents; rotatable).
//!
//! Rotation keeps the previous key trusted for a grace period: certificates and documents it
//! signed keep verifying until then, while everything new is signed by the new key. That is what
//! lets an agent renew straight through a rotation.
//!
//! With several auth service processes on one store, a rotation is *staged*: the new key is
//! trusted at once but signs only from `signs_from`, a delay after the rotation long enough for
//! every process to have read the new state. Until then the previous key keeps signing. So no
//! process ever meets a certificate or join-state document signed by a key it does not know yet
//! (which it would take for a forgery and lock the token over).
//!
//! Certificate profile (RFC 5280 and the SPIFFE X509-SVID specification; `docs/protocol.md`
//! lists it): every certificate carries a Subject Key Identifier, every issued one an Authority
//! Key Identifier equal to its CA's SKI; CAs are `cA=true` with keyCertSign and cRLSign, leaves
//! `cA=false` with digitalSignature only. An identity leaf carries exactly one URI SAN,
//! `spiffe://TRUST_DOMAIN/bot/NAME`, and a new identity CA the trust domain's own SPIFFE ID.

use std::time::Duration;

use boundkey_proto::claims::JoinStateClaims;
use boundkey_proto::{jws, keys, CaPin, JoinMethod, UnixTime};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};

/// OID of the extension that carries [`IdentityClaims`] in an identity certificate. It sits in
/// a private, unregistered arc (the convention other private PKIs use for such extensions); it is
/// only ever read by this service.
pub const IDENTITY_EXTENSION_OID: &[u64] = &[1, 3, 9999, 4201, 1];
const IDENTITY_EXTENSION_OID_STR: &str = "1.3.9999.4201.1";

/// Lifetime of the CA certificates themselves.
const CA_VALIDITY_SECS: i64 = 10 * 365 * 24 * 3600;
/// Lifetime of the listener's TLS certificate (reissued at every start).
const SERVER_CERT_VALIDITY_SECS: i64 = 365 * 24 * 3600;
/// Identity certificates are valid from slightly before issue, for clock skew.
const NOT_BEFORE_SKEW_SECS: i64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("stored CA key {kid} is unusable: {detail}")]
    BadKey { kid: String, detail: String },
    #[error("no active {0} CA key")]
    NoActiveKey(&'static str),
    #[error("invalid time")]
    Time,
    #[error("signing a join-state document failed")]
    Sign,
    #[error("cluster name {0:?} cannot be a SPIFFE trust domain")]
    InvalidTrustDomain(String),
    #[error("bot name {0:?} cannot be a SPIFFE ID path segment")]
    InvalidBotName(String),
}

/// The SPIFFE trust domain of a cluster: its name in lower case. Trust domains are lower case
/// (SPIFFE ID specification §2.1) while cluster names created before this rule may carry upper
/// case; lowering keeps such data directories loadable and their SPIFFE IDs conformant. Cluster
/// names stay as given everywhere else (issuer and audience of documents, the identity claims).
pub fn trust_domain(cluster: &str) -> Result<String, AuthorityError> {
    let td = cluster.to_ascii_lowercase();
    let ok = !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(td)
    } else {
        Err(AuthorityError::InvalidTrustDomain(cluster.into()))
    }
}

/// Whether `segment` may be one segment of a SPIFFE ID path: not empty, not `.` or `..`, only
/// `[A-Za-z0-9._-]` (SPIFFE ID specification §2.2).
pub fn is_spiffe_path_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment != "."
        && segment != ".."
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The SPIFFE ID of a bot: `spiffe://TRUST_DOMAIN/bot/NAME`. Refuses a name that is not a valid
/// path segment, so no certificate is ever issued with a dot segment or a stray `/`.
pub fn bot_spiffe_id(trust_domain: &str, bot_name: &str) -> Result<String, AuthorityError> {
    if !is_spiffe_path_segment(bot_name) {
        return Err(AuthorityError::InvalidBotName(bot_name.into()));
    }
    Ok(format!("spiffe://{trust_domain}/bot/{bot_name}"))
}

/// Why a presented client certificate was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("certificate does not chain to a trusted identity CA: {0}")]
    Untrusted(webpki::Error),
    #[error("certificate is malformed: {0}")]
    Malformed(String),
    #[error("certificate lacks the boundkey identity extension")]
    MissingExtension,
    #[error("certificate was issued for cluster {0:?}")]
    WrongCluster(String),
}

/// Why a join-state document was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JoinStateError {
    #[error("join state is not a valid JWS: {0}")]
    Jws(#[from] jws::JwsError),
    #[error("join state is signed by unknown or retired key {0:?}")]
    UnknownKey(Option<String>),
    #[error("join state claims are malformed: {0}")]
    Claims(String),
    #[error("join state was issued for another cluster")]
    WrongCluster,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaKind {
    Identity,
    JoinState,
}

/// A CA type name that is neither `identity` nor `join-state`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown CA type {0:?} (expected identity or join-state)")]
pub struct UnknownCaKind(pub String);

impl core::str::FromStr for CaKind {
    type Err = UnknownCaKind;
    fn from_str(s: &str) -> Result<Self, UnknownCaKind> {
        match s {
            "identity" => Ok(CaKind::Identity),
            "join-state" | "join_state" => Ok(CaKind::JoinState),
            o => Err(UnknownCaKind(o.to_string())),
        }
    }
}

/// One CA key as stored. `trusted_until` is None while the key is current; a rotated-out key
/// keeps verifying until `trusted_until`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaKeyState {
    pub kid: String,
    /// PKCS#8 PEM.
    pub key_pem: String,
    /// Self-signed CA certificate, PEM.
    pub cert_pem: String,
    pub created_at: UnixTime,
    pub active: bool,
    #[serde(default)]
    pub trusted_until: Option<UnixTime>,
    /// A staged key signs only from this time on; before it, it is trusted but the previous
    /// key signs. None: from its creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signs_from: Option<UnixTime>,
}

impl CaKeyState {
    fn trusted(&self, now: UnixTime) -> bool {
        self.active || self.trusted_until.is_some_and(|t| now < t)
    }

    fn signs(&self, now: UnixTime) -> bool {
        self.trusted(now) && self.signs_from.is_none_or(|t| t <= now)
    }
}

/// The key that signs at `now`: the newest trusted key whose signing has begun. During a staged
/// rotation that is the previous key (retired, but trusted past the new key's `signs_from`).
fn signing_key<K>(keys: &[K], state: impl Fn(&K) -> &CaKeyState, now: UnixTime) -> Option<&K> {
    keys.iter().rev().find(|k| state(k).signs(now))
}

/// Everything the auth service persists about its CAs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorityState {
    pub cluster: String,
    pub tls: CaKeyState,
    pub identity: Vec<CaKeyState>,
    pub join_state: Vec<CaKeyState>,
}

fn offset(t: UnixTime) -> Result<time::OffsetDateTime, AuthorityError> {
    time::OffsetDateTime::from_unix_timestamp(t).map_err(|_| AuthorityError::Time)
}

fn new_ca(
    cluster: &str,
    purpose: &str,
    spiffe_id: Option<String>,
    now: UnixTime,
) -> Result<CaKeyState, AuthorityError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, cluster);
    dn.push(DnType::CommonName, format!("boundkey {purpose} CA {now}"));
    params.distinguished_name = dn;
    // rcgen writes the SKI (SHA-256 of the SPKI, truncated) for every CA; on a self-signed CA
    // the AKI repeats it, which strict path builders use to pick the anchor.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_identifier_method = rcgen::KeyIdMethod::Sha256;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    if let Some(id) = spiffe_id {
        params.subject_alt_names = vec![SanType::URI(id.try_into()?)];
    }
    params.not_before = offset(now - NOT_BEFORE_SKEW_SECS)?;
    params.not_after = offset(now + CA_VALIDITY_SECS)?;
    let cert = params.self_signed(&key)?;
    let pk = spki_public_key(&key.subject_public_key_info(), "new")?;
    Ok(CaKeyState {
        kid: keys::kid(&pk),
        key_pem: key.serialize_pem(),
        cert_pem: cert.pem(),
        created_at: now,
        active: true,
        trusted_until: None,
        signs_from: None,
    })
}

/// `spiffe://TRUST_DOMAIN`: the SPIFFE ID an identity CA carries (X509-SVID §4.1 allows a
/// signing certificate to name its trust domain this way).
fn td_id(cluster: &str) -> Result<String, AuthorityError> {
    Ok(format!("spiffe://{}", trust_domain(cluster)?))
}

fn spki_public_key(spki: &[u8], kid: &str) -> Result<p256::PublicKey, AuthorityError> {
    use p256::pkcs8::DecodePublicKey;
    p256::PublicKey::from_public_key_der(spki).map_err(|e| AuthorityError::BadKey {
        kid: kid.into(),
        detail: e.to_string(),
    })
}

impl AuthorityState {
    /// Fresh CAs for a new cluster.
    pub fn generate(cluster: &str, now: UnixTime) -> Result<Self, AuthorityError> {
        Ok(AuthorityState {
            cluster: cluster.to_string(),
            tls: new_ca(cluster, "TLS", None, now)?,
            identity: vec![new_ca(cluster, "identity", Some(td_id(cluster)?), now)?],
            join_state: vec![new_ca(cluster, "join-state", None, now)?],
        })
    }

    /// Makes a new active key of `kind`, trusted at once and signing after `delay_secs` (the
    /// time every auth service process sharing the store needs to read the new state; 0 for a
    /// single process). The previous active key keeps signing until then and stays trusted for
    /// `grace_secs` after it. Keys whose grace period has ended are dropped.
    pub fn rotate(
        &mut self,
        kind: CaKind,
        grace_secs: u64,
        delay_secs: u64,
        now: UnixTime,
    ) -> Result<String, AuthorityError> {
        let (list, purpose, spiffe_id) = match kind {
            CaKind::Identity => (&mut self.identity, "identity", Some(td_id(&self.cluster)?)),
            CaKind::JoinState => (&mut self.join_state, "join-state", None),
        };
        let mut fresh = new_ca(&self.cluster, purpose, spiffe_id, now)?;
        let kid = fresh.kid.clone();
        let secs = |s: u64| i64::try_from(s).unwrap_or(i64::MAX);
        let starts = now.saturating_add(secs(delay_secs));
        if delay_secs > 0 {
            fresh.signs_from = Some(starts);
        }
        let until = starts.saturating_add(secs(grace_secs));
        for k in list.iter_mut().filter(|k| k.active) {
            k.active = false;
            k.trusted_until = Some(until);
        }
        list.retain(|k| k.trusted(now));
        list.push(fresh);
        Ok(kid)
    }

    /// The pin agents use on first contact: SHA-256 of the TLS CA's SubjectPublicKeyInfo.
    pub fn ca_pin(&self) -> Result<CaPin, AuthorityError> {
        let key = KeyPair::from_pem(&self.tls.key_pem)?;
        Ok(CaPin::of_spki(&key.subject_public_key_info()))
    }
}

struct LoadedCa {
    state: CaKeyState,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

struct LoadedJoinStateKey {
    state: CaKeyState,
    /// Signs through ring, as rcgen signs certificates and rustls its handshakes: its P-256 is
    /// several times faster than the `p256` crate's, and a join-state document is signed in
    /// every ceremony (docs/performance.md, "Verification and signing paths").
    signing: ring::signature::EcdsaKeyPair,
    public: p256::PublicKey,
}

/// What goes into an identity certificate's boundkey extension (JSON in a DER UTF8String).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityClaims {
    pub cluster: String,
    pub bot_name: String,
    pub instance_id: String,
    pub generation: u64,
    pub join_method: JoinMethod,
    pub join_token: String,
}

/// An identity taken from a client certificate that chained to a trusted identity CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedIdentity {
    pub claims: IdentityClaims,
    pub public_key: p256::PublicKey,
    pub not_after: UnixTime,
}

/// A freshly issued identity certificate.
#[derive(Debug, Clone)]
pub struct IssuedIdentity {
    pub certificate_pem: String,
    pub not_before: UnixTime,
    pub expires: UnixTime,
}

/// Loaded, ready-to-sign CA keys. Built from an [`AuthorityState`]; immutable (rotation builds a
/// new one), so it can be shared across ceremonies behind an `Arc`.
pub struct Authority {
    cluster: String,
    /// The cluster name in lower case; checked at load.
    trust_domain: String,
    tls: LoadedCa,
    identity: Vec<LoadedCa>,
    join_state: Vec<LoadedJoinStateKey>,
}

impl std::fmt::Debug for Authority {
    // Never print key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("cluster", &self.cluster)
            .field(
                "identity_kids",
                &self
                    .identity
                    .iter()
                    .map(|k| &k.state.kid)
                    .collect::<Vec<_>>(),
            )
            .field(
                "join_state_kids",
                &self
                    .join_state
                    .iter()
                    .map(|k| &k.state.kid)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn load_ca(s: &CaKeyState) -> Result<LoadedCa, AuthorityError> {
    let bad = |d: String| AuthorityError::BadKey {
        kid: s.kid.clone(),
        detail: d,
    };
    let key = KeyPair::from_pem(&s.key_pem).map_err(|e| bad(e.to_string()))?;
    let cert_der = CertificateDer::from_pem_slice(s.cert_pem.as_bytes())
        .map_err(|e| bad(format!("certificate PEM: {e}")))?;
    let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| bad(e.to_string()))?;
    Ok(LoadedCa {
        state: s.clone(),
        cert_der,
        issuer,
    })
}

fn load_join_state_key(s: &CaKeyState) -> Result<LoadedJoinStateKey, AuthorityError> {
    let bad = |detail: String| AuthorityError::BadKey {
        kid: s.kid.clone(),
        detail,
    };
    let der = PrivatePkcs8KeyDer::from_pem_slice(s.key_pem.as_bytes())
        .map_err(|e| bad(format!("key PEM: {e}")))?;
    let signing = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        der.secret_pkcs8_der(),
        &ring::rand::SystemRandom::new(),
    )
    .map_err(|e| bad(format!("not a P-256 PKCS#8 key: {e}")))?;
    use ring::signature::KeyPair as _;
    let public = p256::PublicKey::from_sec1_bytes(signing.public_key().as_ref())
        .map_err(|e| bad(e.to_string()))?;
    Ok(LoadedJoinStateKey {
        state: s.clone(),
        signing,
        public,
    })
}

use rustls_pki_types::pem::PemObject;

impl Authority {
    pub fn load(state: &AuthorityState) -> Result<Self, AuthorityError> {
        Ok(Authority {
            cluster: state.cluster.clone(),
            trust_domain: trust_domain(&state.cluster)?,
            tls: load_ca(&state.tls)?,
            identity: state
                .identity
                .iter()
                .map(load_ca)
                .collect::<Result<_, _>>()?,
            join_state: state
                .join_state
                .iter()
                .map(load_join_state_key)
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The SPIFFE trust domain of this cluster (see [`trust_domain`]).
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// PEM of the TLS CA certificate (`DIR/ca.pem`).
    pub fn tls_ca_pem(&self) -> &str {
        &self.tls.state.cert_pem
    }

    /// Issues the listener's certificate for the given DNS names / IP addresses. Returns the
    /// chain (leaf, TLS CA) as DER and the leaf's PKCS#8 key.
    pub fn issue_server_cert(
        &self,
        names: &[String],
        now: UnixTime,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivatePkcs8KeyDer<'static>), AuthorityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("boundkey auth {}", self.cluster),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf_profile(&mut params);
        params.not_before = offset(now - NOT_BEFORE_SKEW_SECS)?;
        params.not_after = offset(now + SERVER_CERT_VALIDITY_SECS)?;
        let cert = params.signed_by(&key, &self.tls.issuer)?;
        let key_der = PrivatePkcs8KeyDer::from(key.serialize_der());
        Ok((vec![cert.der().clone(), self.tls.cert_der.clone()], key_der))
    }

    fn signing_identity(&self, now: UnixTime) -> Result<&LoadedCa, AuthorityError> {
        signing_key(&self.identity, |k| &k.state, now)
            .ok_or(AuthorityError::NoActiveKey("identity"))
    }

    /// Issues a bot identity certificate: SPIFFE-style URI SAN, client and server auth, and the
    /// boundkey extension naming bot, instance, generation and join token.
    /// The serial number is derived from the public key; see [`Self::issue_identity_with_serial`].
    pub fn issue_identity(
        &self,
        claims: &IdentityClaims,
        public_key: &p256::PublicKey,
        ttl_secs: u64,
        now: UnixTime,
    ) -> Result<IssuedIdentity, AuthorityError> {
        self.issue_identity_inner(claims, public_key, ttl_secs, None, now)
    }

    /// Like [`Self::issue_identity`] with a caller-chosen serial number, so that two
    /// certificates for one identity key (a redelivered result) never share a serial.
    pub fn issue_identity_with_serial(
        &self,
        claims: &IdentityClaims,
        public_key: &p256::PublicKey,
        ttl_secs: u64,
        serial: [u8; 16],
        now: UnixTime,
    ) -> Result<IssuedIdentity, AuthorityError> {
        self.issue_identity_inner(claims, public_key, ttl_secs, Some(serial), now)
    }

    fn issue_identity_inner(
        &self,
        claims: &IdentityClaims,
        public_key: &p256::PublicKey,
        ttl_secs: u64,
        serial: Option<[u8; 16]>,
        now: UnixTime,
    ) -> Result<IssuedIdentity, AuthorityError> {
        let ca = self.signing_identity(now)?;
        let mut params = CertificateParams::default();
        params.serial_number = serial.map(|s| rcgen::SerialNumber::from_slice(&s));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, self.cluster.as_str());
        dn.push(DnType::CommonName, claims.bot_name.as_str());
        params.distinguished_name = dn;
        let spiffe = bot_spiffe_id(&self.trust_domain, &claims.bot_name)?;
        params.subject_alt_names = vec![SanType::URI(spiffe.try_into()?)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf_profile(&mut params);
        let not_before = now - NOT_BEFORE_SKEW_SECS;
        let expires = now.saturating_add(i64::try_from(ttl_secs).unwrap_or(i64::MAX));
        params.not_before = offset(not_before)?;
        params.not_after = offset(expires)?;
        let json = serde_json::to_vec(claims).map_err(|_| AuthorityError::Time)?;
        params
            .custom_extensions
            .push(CustomExtension::from_oid_content(
                IDENTITY_EXTENSION_OID,
                der_utf8(&json),
            ));
        let spki = rcgen::SubjectPublicKeyInfo::from_der(&keys::pkix_der(public_key))?;
        let cert = params.signed_by(&spki, &ca.issuer)?;
        Ok(IssuedIdentity {
            certificate_pem: cert.pem(),
            not_before,
            expires,
        })
    }

    fn trusted_identity(&self, now: UnixTime) -> impl Iterator<Item = &LoadedCa> {
        self.identity.iter().filter(move |k| k.state.trusted(now))
    }

    /// PEM of every identity CA certificate trusted now (several during a rotation).
    pub fn identity_ca_bundle(&self, now: UnixTime) -> String {
        self.trusted_identity(now)
            .map(|k| k.state.cert_pem.as_str())
            .collect()
    }

    /// DER of the trusted identity CA certificates, for the TLS layer's client verifier.
    pub fn identity_roots(&self, now: UnixTime) -> Vec<CertificateDer<'static>> {
        self.trusted_identity(now)
            .map(|k| k.cert_der.clone())
            .collect()
    }

    /// Verifies a client certificate chain (leaf first) with rustls-webpki against the trusted
    /// identity CAs and extracts the identity from it.
    pub fn verify_identity(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<VerifiedIdentity, IdentityError> {
        let leaf = chain
            .first()
            .ok_or_else(|| IdentityError::Malformed("empty chain".into()))?;
        let anchors: Vec<_> = self
            .trusted_identity(now)
            .filter_map(|k| webpki::anchor_from_trusted_cert(&k.cert_der).ok())
            .map(|a| a.to_owned())
            .collect();
        let ee = webpki::EndEntityCert::try_from(leaf)
            .map_err(|e| IdentityError::Malformed(e.to_string()))?;
        let t = rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
            u64::try_from(now).unwrap_or(0),
        ));
        ee.verify_for_usage(
            &[webpki::ring::ECDSA_P256_SHA256],
            &anchors,
            &chain[1..],
            t,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(IdentityError::Untrusted)?;

        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(leaf.as_ref())
            .map_err(|e| IdentityError::Malformed(e.to_string()))?;
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == IDENTITY_EXTENSION_OID_STR)
            .ok_or(IdentityError::MissingExtension)?;
        let json = parse_der_utf8(ext.value).ok_or(IdentityError::MissingExtension)?;
        let claims: IdentityClaims = serde_json::from_slice(json)
            .map_err(|e| IdentityError::Malformed(format!("identity extension: {e}")))?;
        if claims.cluster != self.cluster {
            return Err(IdentityError::WrongCluster(claims.cluster));
        }
        let public_key = spki_public_key(cert.public_key().raw, "client")
            .map_err(|e| IdentityError::Malformed(e.to_string()))?;
        Ok(VerifiedIdentity {
            claims,
            public_key,
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    /// Public keys of the join-state keys trusted now (the active one and any still in their
    /// grace period), as SPKI PEM blocks. Relying parties that check join-state documents
    /// themselves use these.
    pub fn join_state_public_pem(&self, now: UnixTime) -> Result<String, AuthorityError> {
        use p256::pkcs8::{EncodePublicKey, LineEnding};
        let mut out = String::new();
        for k in self.join_state.iter().filter(|k| k.state.trusted(now)) {
            let pem =
                k.public
                    .to_public_key_pem(LineEnding::LF)
                    .map_err(|e| AuthorityError::BadKey {
                        kid: k.state.kid.clone(),
                        detail: e.to_string(),
                    })?;
            out.push_str(&pem);
        }
        Ok(out)
    }

    /// The join-state keys trusted now as an RFC 7517 JWK set; each `kid` is the one the
    /// documents' JWS headers carry, so a verifier picks the key by header.
    pub fn join_state_jwks(&self, now: UnixTime) -> Jwks {
        Jwks {
            keys: self
                .join_state
                .iter()
                .filter(|k| k.state.trusted(now))
                .map(|k| Jwk::es256(&k.public, &k.state.kid, "sig", None))
                .collect(),
        }
    }

    /// The identity CAs trusted now as a SPIFFE trust bundle (a JWK set whose keys have
    /// `use: x509-svid` and the CA certificate in `x5c`).
    pub fn identity_jwks(&self, now: UnixTime) -> Result<Jwks, AuthorityError> {
        let mut keys = Vec::new();
        for k in self.trusted_identity(now) {
            let public = spki_public_key(&k.issuer.key().subject_public_key_info(), &k.state.kid)?;
            use base64::Engine as _;
            let x5c = base64::engine::general_purpose::STANDARD.encode(k.cert_der.as_ref());
            keys.push(Jwk::es256(&public, &k.state.kid, "x509-svid", Some(x5c)));
        }
        Ok(Jwks { keys })
    }

    /// Signs a join-state document with the join-state key that signs at `now`.
    pub fn sign_join_state(
        &self,
        claims: &JoinStateClaims,
        now: UnixTime,
    ) -> Result<String, AuthorityError> {
        let key = signing_key(&self.join_state, |k| &k.state, now)
            .ok_or(AuthorityError::NoActiveKey("join-state"))?;
        let payload = serde_json::to_vec(claims).map_err(|_| AuthorityError::Time)?;
        let input = jws::signing_input(Some(&key.state.kid), &payload);
        let sig = key
            .signing
            .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
            .map_err(|_| AuthorityError::Sign)?;
        let sig =
            p256::ecdsa::Signature::from_slice(sig.as_ref()).map_err(|_| AuthorityError::Sign)?;
        // Everything this service signs is low-S (jws.rs); ring does not normalise.
        let sig = sig.normalize_s().unwrap_or(sig);
        Ok(jws::assemble(&input, &sig.to_bytes().into()))
    }

    /// Checks a join-state document's signature against a join-state key trusted now (matching
    /// kid) and its issuer/audience. The caller compares the remaining claims with stored state.
    pub fn verify_join_state(
        &self,
        document: &str,
        now: UnixTime,
    ) -> Result<JoinStateClaims, JoinStateError> {
        let parsed = jws::parse(document)?;
        let kid = parsed.header.kid.clone();
        let key = self
            .join_state
            .iter()
            .filter(|k| k.state.trusted(now))
            .find(|k| Some(&k.state.kid) == kid.as_ref())
            .ok_or(JoinStateError::UnknownKey(kid))?;
        let payload = parsed.verify(&key.public)?;
        let claims: JoinStateClaims =
            serde_json::from_slice(&payload).map_err(|e| JoinStateError::Claims(e.to_string()))?;
        if claims.iss != self.cluster || claims.aud != self.cluster {
            return Err(JoinStateError::WrongCluster);
        }
        Ok(claims)
    }
}

/// An RFC 7517 JWK set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

/// One P-256 public key as an RFC 7517/7518 JWK. Only EC P-256 keys exist here, so the shape is
/// fixed: `kty` EC, `crv` P-256, `x`/`y` the base64url (unpadded) 32-byte coordinates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    pub x: String,
    pub y: String,
    pub kid: String,
    #[serde(rename = "use")]
    pub use_: String,
    /// ES256 for signing keys; absent on x509-svid keys (SPIFFE bundle format).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    /// The CA certificate (standard base64 DER), on x509-svid keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x5c: Option<Vec<String>>,
}

impl Jwk {
    fn es256(key: &p256::PublicKey, kid: &str, use_: &str, x5c: Option<String>) -> Jwk {
        use base64::Engine as _;
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        let point = key.to_encoded_point(false);
        let b64 = |c: Option<&p256::FieldBytes>| {
            c.map(|c| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(c))
                .unwrap_or_default()
        };
        Jwk {
            kty: "EC".into(),
            crv: "P-256".into(),
            x: b64(point.x()),
            y: b64(point.y()),
            kid: kid.into(),
            use_: use_.into(),
            alg: x5c.is_none().then(|| "ES256".into()),
            x5c: x5c.map(|c| vec![c]),
        }
    }
}

/// What every leaf carries besides its names and usages: SKI, an AKI naming the issuing CA's
/// key (copied from the CA certificate's SKI by rcgen's `Issuer`) and an explicit
/// basicConstraints `cA=false` (critical), which X509-SVID requires of leaves.
fn leaf_profile(params: &mut CertificateParams) {
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_identifier_method = rcgen::KeyIdMethod::Sha256;
    params.use_authority_key_identifier_extension = true;
}

/// DER UTF8String (tag 12) with definite length.
fn der_utf8(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![0x0c];
    let len = bytes.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len <= 0xff {
        out.extend_from_slice(&[0x81, len as u8]);
    } else {
        out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(bytes);
    out
}

fn parse_der_utf8(der: &[u8]) -> Option<&[u8]> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x0c {
        return None;
    }
    let (&l0, rest) = rest.split_first()?;
    let (len, rest) = match l0 {
        l if l < 0x80 => (usize::from(l), rest),
        0x81 => (usize::from(*rest.first()?), rest.get(1..)?),
        0x82 => (
            usize::from(*rest.first()?) << 8 | usize::from(*rest.get(1)?),
            rest.get(2..)?,
        ),
        _ => return None,
    };
    (rest.len() == len).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: UnixTime = 1_800_000_000;

    fn claims() -> IdentityClaims {
        IdentityClaims {
            cluster: "c1".into(),
            bot_name: "robot".into(),
            instance_id: "i-1".into(),
            generation: 3,
            join_method: JoinMethod::BoundKeypair,
            join_token: "tok".into(),
        }
    }

    fn join_claims() -> JoinStateClaims {
        JoinStateClaims {
            iss: "c1".into(),
            aud: "c1".into(),
            sub: "robot".into(),
            iat: NOW,
            nbf: NOW,
            instance_id: "i-1".into(),
            recovery_sequence: 1,
            recovery_limit: 1,
            recovery_mode: Default::default(),
        }
    }

    fn id_key() -> p256::PublicKey {
        p256::SecretKey::random(&mut rand_core::OsRng).public_key()
    }

    fn der_of(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn identity_round_trip() {
        let st = AuthorityState::generate("c1", NOW).unwrap();
        let a = Authority::load(&st).unwrap();
        let k = id_key();
        let issued = a.issue_identity(&claims(), &k, 600, NOW).unwrap();
        assert_eq!(issued.expires, NOW + 600);
        let v = a
            .verify_identity(&[der_of(&issued.certificate_pem)], NOW + 10)
            .unwrap();
        assert_eq!(v.claims, claims());
        assert_eq!(v.public_key, k);
        assert_eq!(v.not_after, NOW + 600);
        // Expired, and from another cluster's CA: refused.
        assert!(matches!(
            a.verify_identity(&[der_of(&issued.certificate_pem)], NOW + 601),
            Err(IdentityError::Untrusted(_))
        ));
        let other = Authority::load(&AuthorityState::generate("c1", NOW).unwrap()).unwrap();
        assert!(matches!(
            other.verify_identity(&[der_of(&issued.certificate_pem)], NOW),
            Err(IdentityError::Untrusted(_))
        ));
    }

    #[test]
    fn identity_ca_rotation_keeps_old_certs_valid_for_the_grace_period() {
        let mut st = AuthorityState::generate("c1", NOW).unwrap();
        let old = Authority::load(&st).unwrap();
        let cert = old.issue_identity(&claims(), &id_key(), 7200, NOW).unwrap();
        st.rotate(CaKind::Identity, 600, 0, NOW + 1).unwrap();
        let a = Authority::load(&st).unwrap();
        assert_eq!(a.identity_roots(NOW + 2).len(), 2);
        assert!(a
            .verify_identity(&[der_of(&cert.certificate_pem)], NOW + 500)
            .is_ok());
        assert!(a
            .verify_identity(&[der_of(&cert.certificate_pem)], NOW + 700)
            .is_err());
        assert_eq!(a.identity_roots(NOW + 700).len(), 1);
        let fresh = a
            .issue_identity(&claims(), &id_key(), 7200, NOW + 2)
            .unwrap();
        assert!(a
            .verify_identity(&[der_of(&fresh.certificate_pem)], NOW + 700)
            .is_ok());
    }

    #[test]
    fn join_state_sign_verify_and_rotation() {
        let mut st = AuthorityState::generate("c1", NOW).unwrap();
        let a = Authority::load(&st).unwrap();
        let c = join_claims();
        let doc = a.sign_join_state(&c, NOW).unwrap();
        assert_eq!(a.verify_join_state(&doc, NOW).unwrap(), c);
        st.rotate(CaKind::JoinState, 100, 0, NOW).unwrap();
        let b = Authority::load(&st).unwrap();
        assert!(b.verify_join_state(&doc, NOW + 99).is_ok());
        assert!(matches!(
            b.verify_join_state(&doc, NOW + 100),
            Err(JoinStateError::UnknownKey(_))
        ));
        let doc2 = b.sign_join_state(&c, NOW).unwrap();
        assert!(b.verify_join_state(&doc2, NOW + 100).is_ok());
    }

    #[test]
    fn a_staged_rotation_trusts_the_new_keys_at_once_and_signs_with_them_after_the_delay() {
        let mut st = AuthorityState::generate("c1", NOW).unwrap();
        let old_id = st.identity[0].kid.clone();
        let old_js = st.join_state[0].kid.clone();
        let new_id = st.rotate(CaKind::Identity, 600, 30, NOW).unwrap();
        let new_js = st.rotate(CaKind::JoinState, 600, 30, NOW).unwrap();
        let a = Authority::load(&st).unwrap();
        let issuer_kid = |pem: &str| {
            use x509_parser::prelude::*;
            let der = der_of(pem);
            let (_, c) = X509Certificate::from_der(der.as_ref()).unwrap();
            let aki = c
                .extensions()
                .iter()
                .find_map(|e| match e.parsed_extension() {
                    ParsedExtension::AuthorityKeyIdentifier(k) => k.key_identifier.clone(),
                    _ => None,
                })
                .unwrap();
            [&old_id, &new_id]
                .into_iter()
                .find(|kid| {
                    let ca = st.identity.iter().find(|k| &&k.kid == kid).unwrap();
                    let cder = der_of(&ca.cert_pem);
                    let (_, cc) = X509Certificate::from_der(cder.as_ref()).unwrap();
                    cc.extensions().iter().any(|e| {
                        matches!(e.parsed_extension(), ParsedExtension::SubjectKeyIdentifier(s) if s.0 == aki.0)
                    })
                })
                .unwrap()
                .clone()
        };
        let kid_of = |doc: &str| jws::parse(doc).unwrap().header.kid.unwrap();
        let c = join_claims();
        // During the delay: both trusted (every process learns the new keys before they are
        // used), the old ones still sign.
        assert_eq!(a.identity_roots(NOW + 29).len(), 2);
        let cert = a
            .issue_identity(&claims(), &id_key(), 3600, NOW + 29)
            .unwrap();
        assert_eq!(issuer_kid(&cert.certificate_pem), old_id);
        let doc = a.sign_join_state(&c, NOW + 29).unwrap();
        assert_eq!(kid_of(&doc), old_js);
        // From the delay on, the new ones sign; the old ones verify for the grace period after.
        let cert2 = a
            .issue_identity(&claims(), &id_key(), 3600, NOW + 30)
            .unwrap();
        assert_eq!(issuer_kid(&cert2.certificate_pem), new_id);
        let doc2 = a.sign_join_state(&c, NOW + 30).unwrap();
        assert_eq!(kid_of(&doc2), new_js);
        assert!(a.verify_join_state(&doc, NOW + 629).is_ok());
        assert!(a.verify_join_state(&doc, NOW + 630).is_err());
        assert!(a.verify_join_state(&doc2, NOW + 630).is_ok());
        assert!(a
            .verify_identity(&[der_of(&cert.certificate_pem)], NOW + 629)
            .is_ok());
        assert_eq!(a.identity_roots(NOW + 630).len(), 1);
        // The state round-trips through the store's JSON with the stage.
        let back: AuthorityState =
            serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
        assert_eq!(back, st);
    }

    /// The extensions of one certificate that the profile is about.
    struct Profile {
        ski: Option<Vec<u8>>,
        aki: Option<Vec<u8>>,
        /// (critical, cA)
        basic_constraints: Option<(bool, bool)>,
        /// (digitalSignature, keyCertSign, cRLSign)
        key_usage: Option<(bool, bool, bool)>,
        uris: Vec<String>,
    }

    fn profile(pem: &str) -> Profile {
        use x509_parser::extensions::{GeneralName, ParsedExtension};
        use x509_parser::prelude::*;
        let der = der_of(pem);
        let (_, cert) = X509Certificate::from_der(der.as_ref()).unwrap();
        let mut p = Profile {
            ski: None,
            aki: None,
            basic_constraints: None,
            key_usage: None,
            uris: Vec::new(),
        };
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => p.ski = Some(k.0.to_vec()),
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    p.aki = a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                ParsedExtension::BasicConstraints(b) => {
                    p.basic_constraints = Some((ext.critical, b.ca))
                }
                ParsedExtension::KeyUsage(k) => {
                    p.key_usage = Some((k.digital_signature(), k.key_cert_sign(), k.crl_sign()))
                }
                ParsedExtension::SubjectAlternativeName(san) => {
                    for n in &san.general_names {
                        if let GeneralName::URI(u) = n {
                            p.uris.push(u.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        p
    }

    #[test]
    fn leaves_and_cas_follow_the_rfc5280_and_x509_svid_profile() {
        let st = AuthorityState::generate("c1", NOW).unwrap();
        let a = Authority::load(&st).unwrap();
        let id_ca = profile(&st.identity[0].cert_pem);
        let ca_ski = id_ca.ski.clone().expect("identity CA has an SKI");
        assert_eq!(id_ca.aki.as_ref(), Some(&ca_ski), "self-signed: AKI = SKI");
        assert_eq!(id_ca.basic_constraints, Some((true, true)));
        assert_eq!(id_ca.key_usage.map(|k| (k.1, k.2)), Some((true, true)));
        assert_eq!(id_ca.uris, ["spiffe://c1"]);
        for ca in [&st.tls, &st.join_state[0]] {
            let p = profile(&ca.cert_pem);
            assert!(p.ski.is_some() && p.aki == p.ski);
            assert_eq!(p.basic_constraints, Some((true, true)));
            assert!(
                p.uris.is_empty(),
                "only the identity CA names the trust domain"
            );
        }

        let leaf = profile(
            &a.issue_identity(&claims(), &id_key(), 600, NOW)
                .unwrap()
                .certificate_pem,
        );
        assert!(leaf.ski.is_some());
        assert_eq!(leaf.aki, Some(ca_ski), "AKI names the identity CA's key");
        assert_eq!(leaf.basic_constraints, Some((true, false)), "cA=false");
        assert_eq!(leaf.key_usage, Some((true, false, false)));
        assert_eq!(leaf.uris, ["spiffe://c1/bot/robot"]);

        let (chain, _) = a.issue_server_cert(&["localhost".into()], NOW).unwrap();
        let server = profile(&String::from_utf8(pem_of(&chain[0])).unwrap());
        assert!(server.ski.is_some());
        assert_eq!(server.aki, profile(&st.tls.cert_pem).ski);
        assert_eq!(server.basic_constraints, Some((true, false)));
        assert_eq!(server.key_usage, Some((true, false, false)));
    }

    fn pem_of(der: &CertificateDer<'_>) -> Vec<u8> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
        out.into_bytes()
    }

    #[test]
    fn spiffe_ids_have_a_lower_case_trust_domain_and_no_dot_segments() {
        let st = AuthorityState::generate("Edge-Case", NOW).unwrap();
        assert_eq!(
            profile(&st.identity[0].cert_pem).uris,
            ["spiffe://edge-case"]
        );
        let a = Authority::load(&st).unwrap();
        assert_eq!((a.cluster(), a.trust_domain()), ("Edge-Case", "edge-case"));
        let c = IdentityClaims {
            cluster: "Edge-Case".into(),
            ..claims()
        };
        let issued = a.issue_identity(&c, &id_key(), 600, NOW).unwrap();
        assert_eq!(
            profile(&issued.certificate_pem).uris,
            ["spiffe://edge-case/bot/robot"]
        );
        // The cluster name itself is unchanged: the certificate still verifies as Edge-Case's.
        let v = a
            .verify_identity(&[der_of(&issued.certificate_pem)], NOW)
            .unwrap();
        assert_eq!(v.claims.cluster, "Edge-Case");

        for bad in [".", "..", "", "a/b", "a%2fb"] {
            let c = IdentityClaims {
                bot_name: bad.into(),
                ..claims()
            };
            assert!(
                matches!(
                    a.issue_identity(&c, &id_key(), 600, NOW),
                    Err(AuthorityError::InvalidBotName(_))
                ),
                "{bad:?} must not be issued"
            );
        }
        assert!(matches!(
            Authority::load(&AuthorityState {
                cluster: "bad/td".into(),
                ..st
            }),
            Err(AuthorityError::InvalidTrustDomain(_))
        ));
    }

    /// Verifies a compact ES256 JWS with nothing but a JWK (no boundkey_proto::jws code).
    fn verify_with_jwks(jwks: &Jwks, document: &str) -> Option<Vec<u8>> {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        use base64::Engine as _;
        use p256::ecdsa::signature::Verifier;
        let mut parts = document.split('.');
        let (h, p, sig) = (parts.next()?, parts.next()?, parts.next()?);
        let header: serde_json::Value = serde_json::from_slice(&B64.decode(h).ok()?).ok()?;
        assert_eq!(header["alg"], "ES256");
        let jwk = jwks.keys.iter().find(|k| header["kid"] == k.kid.as_str())?;
        assert_eq!((jwk.kty.as_str(), jwk.crv.as_str()), ("EC", "P-256"));
        let mut sec1 = vec![4u8];
        sec1.extend(B64.decode(&jwk.x).ok()?);
        sec1.extend(B64.decode(&jwk.y).ok()?);
        let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1).ok()?;
        let sig = p256::ecdsa::Signature::from_slice(&B64.decode(sig).ok()?).ok()?;
        key.verify(format!("{h}.{p}").as_bytes(), &sig).ok()?;
        B64.decode(p).ok()
    }

    #[test]
    fn join_state_keys_export_as_jwks_and_pem_including_the_grace_period() {
        let mut st = AuthorityState::generate("c1", NOW).unwrap();
        let a = Authority::load(&st).unwrap();
        let c = join_claims();
        let doc = a.sign_join_state(&c, NOW).unwrap();
        let jwks = a.join_state_jwks(NOW);
        assert_eq!(jwks.keys.len(), 1);
        let json = serde_json::to_value(&jwks).unwrap();
        assert_eq!(json["keys"][0]["use"], "sig");
        assert_eq!(json["keys"][0]["alg"], "ES256");
        assert_eq!(json["keys"][0]["kid"], st.join_state[0].kid.as_str());
        let payload = verify_with_jwks(&jwks, &doc).expect("verifies with the JWKS alone");
        assert_eq!(
            serde_json::from_slice::<JoinStateClaims>(&payload).unwrap(),
            c
        );

        st.rotate(CaKind::JoinState, 100, 0, NOW).unwrap();
        let b = Authority::load(&st).unwrap();
        let during = b.join_state_jwks(NOW + 50);
        assert_eq!(
            during.keys.len(),
            2,
            "the old key is exported while trusted"
        );
        assert!(verify_with_jwks(&during, &doc).is_some());
        assert!(verify_with_jwks(&during, &b.sign_join_state(&c, NOW).unwrap()).is_some());
        let after = b.join_state_jwks(NOW + 100);
        assert_eq!(after.keys.len(), 1);
        assert!(verify_with_jwks(&after, &doc).is_none());
        assert_eq!(
            b.join_state_public_pem(NOW + 50)
                .unwrap()
                .matches("BEGIN PUBLIC KEY")
                .count(),
            2
        );

        let id = serde_json::to_value(a.identity_jwks(NOW).unwrap()).unwrap();
        assert_eq!(id["keys"][0]["use"], "x509-svid");
        assert!(id["keys"][0].get("alg").is_none());
        assert!(id["keys"][0]["x5c"][0].is_string());
    }

    #[test]
    fn der_utf8_round_trip_all_length_forms() {
        for n in [0usize, 5, 127, 128, 255, 256, 4000] {
            let data = vec![b'a'; n];
            assert_eq!(parse_der_utf8(&der_utf8(&data)), Some(&data[..]));
        }
        assert_eq!(parse_der_utf8(&[0x04, 0x00]), None);
        assert_eq!(parse_der_utf8(&[0x0c, 0x05, b'a']), None);
    }
}
