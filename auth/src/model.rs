//! The auth-side resources: bots, tokens, bot instances, locks and audit events.
//!
//! Specs are what an administrator writes; statuses are what ceremonies write. Every type
//! serialises with the field names the brief uses, because `boundkeyctl --format json` prints
//! them and scripts rely on them.

use boundkey_proto::claims::RecoveryMode;
use boundkey_proto::{JoinMethod, UnixTime};
use serde::{Deserialize, Serialize};

/// Most recent authentications / heartbeats kept per instance (the initial one is kept apart).
pub const MAX_RECENT: usize = 10;
/// Bound keys a token remembers after rotating away from them (a rotation may not bring one
/// back), and identity keys it remembers having certified (see
/// [`TokenStatus::redeliverable_identity_key`]). Oldest forgotten first.
pub const MAX_KEY_HISTORY: usize = 32;
/// An instance outlives its last certificate by this much.
pub const INSTANCE_EXPIRY_GRACE_SECS: i64 = 5 * 60;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bot {
    pub name: String,
    pub created_at: UnixTime,
}

/// A join token. `revision` changes on every write; ceremonies commit with a compare-and-swap
/// on it, which is what makes concurrent ceremonies on one token safe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub name: String,
    pub spec: TokenSpec,
    pub status: TokenStatus,
    pub revision: u64,
    pub created_at: UnixTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenSpec {
    pub bot_name: String,
    pub join_method: JoinMethod,
    #[serde(default)]
    pub expires: Option<UnixTime>,
    /// Present exactly when `join_method` is `bound_keypair`.
    #[serde(default)]
    pub bound_keypair: Option<BoundKeypairSpec>,
    /// `token` method: how many joins the token allows.
    #[serde(default)]
    pub max_joins: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundKeypairSpec {
    pub onboarding: Onboarding,
    pub recovery: RecoverySpec,
    /// A rotation is due when this is set, not in the future, and later than `last_rotated_at`.
    #[serde(default)]
    pub rotate_after: Option<UnixTime>,
    /// Whether a new bound key must be proven to live in a TPM (`docs/protocol.md` §5.6).
    /// Left out of the JSON when it is the default (`mode: none`, nothing configured).
    #[serde(default, skip_serializing_if = "AttestationSpec::is_default")]
    pub attestation: AttestationSpec,
}

/// Which TPMs may hold a token's bound key. Invariant (kept by
/// [`crate::admin::validate_attestation`]): in `tpm` mode at least one of `ek_ca_bundle` and
/// `ek_allow` is set, the bundle parses as PEM certificates and every `ek_allow` entry is 64
/// lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AttestationSpec {
    pub mode: AttestationMode,
    /// PEM bundle of EK CA certificates (roots, and intermediates if the TPMs' certificates
    /// need them). An EK whose certificate chains to a root in it is trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ek_ca_bundle: Option<String>,
    /// SHA-256 (lowercase hex) of the DER SubjectPublicKeyInfo of EKs trusted without a
    /// certificate.
    #[serde(default)]
    pub ek_allow: Vec<String>,
}

impl AttestationSpec {
    pub fn is_default(&self) -> bool {
        *self == AttestationSpec::default()
    }

    pub fn required(&self) -> bool {
        self.mode == AttestationMode::Tpm
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AttestationMode {
    /// The agent's word on where the key lives is taken.
    #[default]
    None,
    /// Registration and rotation keys must come with a TPM key attestation.
    Tpm,
}

impl AttestationMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AttestationMode::None => "none",
            AttestationMode::Tpm => "tpm",
        }
    }
}

impl std::str::FromStr for AttestationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(AttestationMode::None),
            "tpm" => Ok(AttestationMode::Tpm),
            o => Err(format!("unknown attestation mode {o:?} (none, tpm)")),
        }
    }
}

/// The TPM a bound key was attested in: its EK, and the EK certificate that vouched for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EkIdentity {
    /// SHA-256 (lowercase hex) of the EK's DER SubjectPublicKeyInfo.
    pub ek_sha256: String,
    /// Present when the EK was trusted through its certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<EkCertificateInfo>,
}

/// What identifies an EK certificate to an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EkCertificateInfo {
    pub subject: String,
    pub issuer: String,
    /// Serial number, lowercase hex.
    pub serial: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Onboarding {
    /// Pre-registered public key (SSH form). When set, the secret path is not used.
    #[serde(default)]
    pub initial_public_key: Option<String>,
    /// Deadline for the registration-secret path only.
    #[serde(default)]
    pub must_register_before: Option<UnixTime>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoverySpec {
    /// Maximum value of `recovery_count` in standard mode.
    pub limit: u32,
    pub mode: RecoveryMode,
}

impl Default for RecoverySpec {
    fn default() -> Self {
        RecoverySpec {
            limit: 1,
            mode: RecoveryMode::Standard,
        }
    }
}

/// Written only by ceremonies (and token creation). Editing a token's spec never touches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TokenStatus {
    /// SHA-256 (hex) of the unused registration secret; cleared when used (one use).
    #[serde(default)]
    pub registration_secret_hash: Option<String>,
    /// SSH form.
    #[serde(default)]
    pub bound_public_key: Option<String>,
    #[serde(default)]
    pub bound_instance_id: Option<String>,
    #[serde(default)]
    pub recovery_count: u32,
    #[serde(default)]
    pub last_recovered_at: Option<UnixTime>,
    #[serde(default)]
    pub last_rotated_at: Option<UnixTime>,
    /// `token` method: joins so far.
    #[serde(default)]
    pub join_count: u32,
    /// Key ids (`keys::kid`) of bound keys this token rotated away from, newest last, at most
    /// [`MAX_KEY_HISTORY`]. A rotation to one of them is refused.
    #[serde(default)]
    pub retired_public_keys: Vec<String>,
    /// Key ids of identity keys certified through this token, newest last, at most
    /// [`MAX_KEY_HISTORY`].
    #[serde(default)]
    pub seen_identity_keys: Vec<String>,
    /// Key id of the identity key the latest certificate was issued for, when that key had
    /// never been certified before through this token. Only such a key can later prove that
    /// a repeated ceremony is the same device retrying a lost result (redelivery): a key that
    /// was reused is not evidence of one device, since a copy may hold it too. Set and cleared
    /// by ceremonies only; never by heartbeats.
    #[serde(default)]
    pub redeliverable_identity_key: Option<String>,
    /// The TPM the bound key was attested in (first attested registration or rotation). A
    /// rotation attested by another TPM is refused (`ek_changed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ek_identity: Option<EkIdentity>,
}

/// Appends `item` to a bounded history, dropping the oldest entries beyond `max`.
pub fn remember(list: &mut Vec<String>, item: String, max: usize) {
    list.retain(|k| k != &item);
    list.push(item);
    if list.len() > max {
        let excess = list.len() - max;
        list.drain(..excess);
    }
}

impl Token {
    pub fn is_expired(&self, now: UnixTime) -> bool {
        self.spec.expires.is_some_and(|e| now >= e)
    }

    /// Whether the token's `rotate_after` asks for a new bound key now.
    pub fn rotation_due(&self, now: UnixTime) -> bool {
        let Some(bk) = &self.spec.bound_keypair else {
            return false;
        };
        match bk.rotate_after {
            Some(at) if at <= now => self.status.last_rotated_at.is_none_or(|last| at > last),
            _ => false,
        }
    }
}

/// One running copy of the agent. The spec never changes after creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BotInstance {
    pub spec: InstanceSpec,
    pub status: InstanceStatus,
    pub revision: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    pub bot_name: String,
    pub instance_id: String,
    /// Set on a recovery, from the verified join state.
    #[serde(default)]
    pub previous_instance_id: Option<String>,
    pub join_method: JoinMethod,
    /// Token name (masked for the `token` method).
    pub join_token: String,
    pub created_at: UnixTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// Generation of the latest certificate issued to this instance.
    pub generation: u64,
    /// Certificate expiry + 5 minutes; extended on each authentication.
    pub expires: UnixTime,
    pub initial_authentication: Option<Authentication>,
    #[serde(default)]
    pub latest_authentications: Vec<Authentication>,
    #[serde(default)]
    pub initial_heartbeat: Option<HeartbeatRecord>,
    #[serde(default)]
    pub latest_heartbeats: Vec<HeartbeatRecord>,
    /// The TPM holding this instance's bound key, when the key was attested: copied from the
    /// token when the instance is created, updated by an attested rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ek_identity: Option<EkIdentity>,
}

impl BotInstance {
    /// A new instance at generation 1 with a fresh UUIDv4, not yet stored. Its expiry is set
    /// when its first certificate is issued.
    pub fn new(
        bot_name: &str,
        join_method: JoinMethod,
        join_token: &str,
        previous_instance_id: Option<String>,
        now: UnixTime,
    ) -> Self {
        let id = uuid::Uuid::new_v4().to_string();
        Self::new_with_id(
            id,
            bot_name,
            join_method,
            join_token,
            previous_instance_id,
            now,
        )
    }

    /// Like [`BotInstance::new`] with a caller-chosen id (the service draws it from its
    /// [`crate::entropy::Entropy`]).
    pub fn new_with_id(
        instance_id: String,
        bot_name: &str,
        join_method: JoinMethod,
        join_token: &str,
        previous_instance_id: Option<String>,
        now: UnixTime,
    ) -> Self {
        BotInstance {
            spec: InstanceSpec {
                bot_name: bot_name.to_string(),
                instance_id,
                previous_instance_id,
                join_method,
                join_token: join_token.to_string(),
                created_at: now,
            },
            status: InstanceStatus {
                generation: 1,
                expires: now,
                initial_authentication: None,
                latest_authentications: Vec::new(),
                initial_heartbeat: None,
                latest_heartbeats: Vec::new(),
                ek_identity: None,
            },
            revision: 0,
        }
    }

    pub fn is_expired(&self, now: UnixTime) -> bool {
        now >= self.status.expires
    }

    /// Records an authentication: the first is kept forever, the recent list is bounded.
    pub fn record_authentication(&mut self, auth: Authentication) {
        if self.status.initial_authentication.is_none() {
            self.status.initial_authentication = Some(auth.clone());
        }
        push_bounded(&mut self.status.latest_authentications, auth);
    }

    pub fn record_heartbeat(&mut self, hb: HeartbeatRecord) {
        if self.status.initial_heartbeat.is_none() {
            self.status.initial_heartbeat = Some(hb.clone());
        }
        push_bounded(&mut self.status.latest_heartbeats, hb);
    }
}

fn push_bounded<T>(v: &mut Vec<T>, item: T) {
    v.push(item);
    if v.len() > MAX_RECENT {
        let excess = v.len() - MAX_RECENT;
        v.drain(..excess);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authentication {
    pub authenticated_at: UnixTime,
    pub join_method: JoinMethod,
    pub join_token: String,
    pub generation: u64,
    /// Identity public key, PEM.
    pub public_key: String,
    /// Bound public key (SSH form) that proved this join, bound keypair only.
    #[serde(default)]
    pub bound_public_key: Option<String>,
    pub remote_addr: String,
}

/// What an agent reported. Shown to operators; never used for a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRecord {
    pub recorded_at: UnixTime,
    pub remote_addr: String,
    #[serde(flatten)]
    pub heartbeat: boundkey_proto::Heartbeat,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockTarget {
    /// All instances of a bot.
    Bot(String),
    BotInstanceId(String),
    /// A token name.
    JoinToken(String),
}

impl LockTarget {
    pub fn kind(&self) -> &'static str {
        match self {
            LockTarget::Bot(_) => "bot",
            LockTarget::BotInstanceId(_) => "bot_instance_id",
            LockTarget::JoinToken(_) => "join_token",
        }
    }
    pub fn value(&self) -> &str {
        match self {
            LockTarget::Bot(v) | LockTarget::BotInstanceId(v) | LockTarget::JoinToken(v) => v,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    /// Unique. Automatic locks use a name derived from target and cause, so concurrent
    /// ceremonies that detect the same problem create one lock, not several.
    pub name: String,
    pub target: LockTarget,
    pub message: String,
    #[serde(default)]
    pub expires: Option<UnixTime>,
    pub created_by: String,
    pub created_at: UnixTime,
}

impl Lock {
    pub fn is_active(&self, now: UnixTime) -> bool {
        self.expires.is_none_or(|e| now < e)
    }
}

/// Audit event types.
pub mod event {
    pub const BOT_JOIN: &str = "bot.join";
    pub const RECOVERY: &str = "bound_keypair.recovery";
    pub const ROTATION: &str = "bound_keypair.rotation";
    pub const JOIN_STATE_VERIFICATION_FAILED: &str = "bound_keypair.join_state_verification_failed";
    /// A key attestation was refused; `fields.reason` is the error code sent to the client.
    pub const ATTESTATION_FAILED: &str = "bound_keypair.attestation_failed";
    pub const GENERATION_MISMATCH: &str = "generation_mismatch";
    pub const LOCK_CREATED: &str = "lock.created";
    pub const LOCK_DELETED: &str = "lock.deleted";
    pub const TOKEN_CREATED: &str = "token.created";
    pub const TOKEN_UPDATED: &str = "token.updated";
    pub const TOKEN_DELETED: &str = "token.deleted";
    pub const BOT_CREATED: &str = "bot.created";
    pub const BOT_DELETED: &str = "bot.deleted";
    pub const BOT_INSTANCE_DELETED: &str = "bot_instance.deleted";
    pub const CA_ROTATED: &str = "ca.rotated";
    pub const HEARTBEAT: &str = "bot_instance.heartbeat";
    /// Anonymous failure events from one address were dropped by the rate limit; `fields.dropped`
    /// says how many since the previous such summary.
    pub const AUDIT_DROPPED: &str = "audit.dropped";
}

/// Append-only record. `id` is assigned by the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    #[serde(default)]
    pub id: u64,
    pub time: UnixTime,
    #[serde(rename = "type")]
    pub kind: String,
    pub success: bool,
    #[serde(default)]
    pub remote_addr: Option<String>,
    #[serde(default)]
    pub bot_name: Option<String>,
    #[serde(default)]
    pub instance_id: Option<String>,
    #[serde(default)]
    pub token_name: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    /// Event-specific details (new recovery count, old/new public key, lock name, …).
    #[serde(default)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}

/// Longest string the audit log keeps in any one field; longer values are clipped.
pub const MAX_AUDIT_TEXT: usize = 512;

/// `s` made safe to store and show: at most `max` bytes (cut at a character boundary, marked
/// with `…`), and every control character (C0, DEL, C1: newlines, escapes) or bidirectional
/// override replaced by U+FFFD, so a value cannot start a new row or steer a terminal.
pub fn clean_text(s: &str, max: usize) -> String {
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars() {
        let c = if unsafe_char(c) { '\u{fffd}' } else { c };
        if out.len() + c.len_utf8() > max {
            while out.len() + '…'.len_utf8() > max && out.pop().is_some() {}
            if out.len() + '…'.len_utf8() <= max {
                out.push('…');
            }
            break;
        }
        out.push(c);
    }
    out
}

fn clean_value(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) => *s = clean_text(s, MAX_AUDIT_TEXT),
        serde_json::Value::Array(a) => a.iter_mut().for_each(clean_value),
        serde_json::Value::Object(m) => m.values_mut().for_each(clean_value),
        _ => {}
    }
}

impl AuditEvent {
    /// The event with every string passed through [`clean_text`]: what the service writes,
    /// since several fields (token names, error texts, addresses) come from the network.
    pub fn sanitized(mut self) -> Self {
        let clean = |s: &mut String| *s = clean_text(s, MAX_AUDIT_TEXT);
        clean(&mut self.kind);
        for f in [
            &mut self.remote_addr,
            &mut self.bot_name,
            &mut self.instance_id,
            &mut self.token_name,
            &mut self.error,
        ]
        .into_iter()
        .flatten()
        {
            clean(f);
        }
        let fields = std::mem::take(&mut self.fields);
        self.fields = fields
            .into_iter()
            .map(|(k, mut v)| {
                clean_value(&mut v);
                (clean_text(&k, MAX_AUDIT_TEXT), v)
            })
            .collect();
        self
    }

    pub fn new(kind: &str, time: UnixTime, success: bool) -> Self {
        AuditEvent {
            id: 0,
            time,
            kind: kind.to_string(),
            success,
            remote_addr: None,
            bot_name: None,
            instance_id: None,
            token_name: None,
            error: None,
            fields: serde_json::Map::new(),
        }
    }

    pub fn field(mut self, k: &str, v: impl Into<serde_json::Value>) -> Self {
        self.fields.insert(k.to_string(), v.into());
        self
    }
}
