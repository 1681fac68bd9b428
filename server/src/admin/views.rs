//! What the admin API answers (and `boundkeyctl --format json` prints): one type per answer,
//! built by the handler and decoded by `boundkeyctl`.
//!
//! Tokens and instances are flat: the spec's and the status's fields sit side by side at the
//! top level under the model's own serde names (`bound_public_key`, `recovery_count`,
//! `generation`, …), so scripts read `.recovery_count` rather than `.status.recovery_count`.

use std::fmt::Display;
use std::net::SocketAddr;
use std::str::FromStr;

use boundkey_auth::model::{
    AuditEvent, Authentication, BotInstance, EkIdentity, HeartbeatRecord, InstanceSpec,
    InstanceStatus, Lock, Token, TokenSpec, TokenStatus,
};
use boundkey_auth::UnixTime;
use boundkey_proto::{CaPin, Endpoint, JoinMethod, JoinUri};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{CaType, ExportFormat, ExportType};

/// Serde through `Display` / `FromStr`, for proto types written as one string.
mod as_text {
    use super::*;

    pub(super) fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub(super) fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// `info`: who this server is and where agents reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub cluster: String,
    #[serde(with = "as_text")]
    pub ca_pin: CaPin,
    /// The TLS listener's bound address.
    pub listen_addr: SocketAddr,
    /// What join URIs name by default: the listener's address, a wildcard bind replaced by
    /// this machine's host name.
    pub auth_server: Endpoint,
    pub version: String,
}

/// `bots ls`: a bot and how much hangs off it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BotSummary {
    pub name: String,
    pub created_at: UnixTime,
    pub tokens: usize,
    pub instances: usize,
    /// Instances not yet expired.
    pub active_instances: usize,
}

/// `bots rm`: what the cascade removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BotDeleted {
    pub name: String,
    pub tokens_deleted: usize,
    pub instances_deleted: usize,
}

/// `tokens add`: the new token with its one-time credential and a ready join URI. The secret
/// is shown here once and never again, so this type has no `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreated {
    pub name: String,
    pub bot_name: String,
    pub expires: Option<UnixTime>,
    #[serde(with = "as_text")]
    pub join_uri: JoinUri,
    /// Carries `join_method` as its tag.
    #[serde(flatten)]
    pub credential: NewCredential,
}

/// What a new token's agent presents, by join method. The tag is `join_method` and spells the
/// same names as [`JoinMethod`] (a unit test keeps them equal).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "join_method", rename_all = "snake_case")]
pub enum NewCredential {
    BoundKeypair {
        /// Absent when the token was created with a pre-registered public key.
        registration_secret: Option<String>,
        initial_public_key: Option<String>,
        must_register_before: Option<UnixTime>,
    },
    Token {
        /// The token itself: a shared secret.
        token: String,
        max_joins: Option<u32>,
    },
}

impl NewCredential {
    pub fn join_method(&self) -> JoinMethod {
        match self {
            NewCredential::BoundKeypair { .. } => JoinMethod::BoundKeypair,
            NewCredential::Token { .. } => JoinMethod::Token,
        }
    }

    /// Whether the answer holds a secret that is not stored in clear.
    pub fn has_secret(&self) -> bool {
        match self {
            NewCredential::BoundKeypair {
                registration_secret,
                ..
            } => registration_secret.is_some(),
            NewCredential::Token { .. } => true,
        }
    }
}

/// A token: `name`, `revision`, `created_at`, every spec field, then the displayable status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenView {
    pub name: String,
    pub revision: u64,
    pub created_at: UnixTime,
    #[serde(flatten)]
    pub spec: TokenSpec,
    #[serde(flatten)]
    pub status: TokenStatusView,
}

/// A token's status as operators see it: the registration secret's hash is replaced by
/// whether an unused secret exists (even a hash of an admin-chosen secret is not for display).
/// Built by destructuring [`TokenStatus`] whole, so a field the model gains must be placed
/// here deliberately rather than leaking by default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenStatusView {
    pub bound_public_key: Option<String>,
    pub bound_instance_id: Option<String>,
    pub recovery_count: u32,
    pub last_recovered_at: Option<UnixTime>,
    pub last_rotated_at: Option<UnixTime>,
    pub join_count: u32,
    pub registration_secret_pending: bool,
    /// The TPM the bound key was attested in, when the token requires attestation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ek_identity: Option<EkIdentity>,
}

impl From<&TokenStatus> for TokenStatusView {
    fn from(s: &TokenStatus) -> Self {
        let TokenStatus {
            registration_secret_hash,
            bound_public_key,
            bound_instance_id,
            recovery_count,
            last_recovered_at,
            last_rotated_at,
            join_count,
            // Key histories the ceremony keeps for its own checks; not shown to operators.
            retired_public_keys: _,
            seen_identity_keys: _,
            redeliverable_identity_key: _,
            ek_identity,
        } = s;
        TokenStatusView {
            bound_public_key: bound_public_key.clone(),
            bound_instance_id: bound_instance_id.clone(),
            recovery_count: *recovery_count,
            last_recovered_at: *last_recovered_at,
            last_rotated_at: *last_rotated_at,
            join_count: *join_count,
            registration_secret_pending: registration_secret_hash.is_some(),
            ek_identity: ek_identity.clone(),
        }
    }
}

impl From<&Token> for TokenView {
    fn from(t: &Token) -> Self {
        TokenView {
            name: t.name.clone(),
            revision: t.revision,
            created_at: t.created_at,
            spec: t.spec.clone(),
            status: (&t.status).into(),
        }
    }
}

pub use boundkey_auth::store::InstanceState;

/// An instance: `instance_id`, `bot_name`, … (spec), `generation`, `expires`, authentications
/// and heartbeats (status), plus `revision` and `state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceView {
    #[serde(flatten)]
    pub spec: InstanceSpec,
    #[serde(flatten)]
    pub status: InstanceStatus,
    pub revision: u64,
    pub state: InstanceState,
}

impl InstanceView {
    pub fn new(i: &BotInstance, now: UnixTime) -> Self {
        InstanceView {
            spec: i.spec.clone(),
            status: i.status.clone(),
            revision: i.revision,
            state: InstanceState::of(i, now),
        }
    }
}

/// A row of `instances ls`: the instance without its histories (`instances show` has them),
/// so a page of a hundred stays small whatever the histories hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSummary {
    #[serde(flatten)]
    pub spec: InstanceSpec,
    pub generation: u64,
    pub expires: UnixTime,
    pub last_authentication: Option<Authentication>,
    pub last_heartbeat: Option<HeartbeatRecord>,
    pub revision: u64,
    pub state: InstanceState,
}

impl InstanceSummary {
    pub fn new(i: &BotInstance, now: UnixTime) -> Self {
        InstanceSummary {
            spec: i.spec.clone(),
            generation: i.status.generation,
            expires: i.status.expires,
            last_authentication: i.status.latest_authentications.last().cloned(),
            last_heartbeat: i.status.latest_heartbeats.last().cloned(),
            revision: i.revision,
            state: InstanceState::of(i, now),
        }
    }
}

/// One page of `instances ls`: `next` is the cursor for `--after` when more follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstancePage {
    pub instances: Vec<InstanceSummary>,
    pub next: Option<String>,
}

/// One page of `tokens ls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenPage {
    pub tokens: Vec<TokenView>,
    pub next: Option<String>,
}

/// One page of `audit ls`, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditPage {
    pub events: Vec<AuditEvent>,
    pub next: Option<String>,
}

/// A lock as stored, plus `active` (not expired).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockView {
    #[serde(flatten)]
    pub lock: Lock,
    pub active: bool,
}

impl LockView {
    pub fn new(l: &Lock, now: UnixTime) -> Self {
        LockView {
            lock: l.clone(),
            active: l.is_active(now),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenDeleted {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceDeleted {
    pub instance_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockDeleted {
    pub name: String,
}

/// `ca rotate`: the new key and until when the previous one is still trusted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRotated {
    #[serde(rename = "type")]
    pub kind: CaType,
    pub kid: String,
    pub grace_period_secs: u64,
    /// When the new key begins to sign (the rotation time unless staged for a cluster).
    pub signs_from: UnixTime,
    pub previous_trusted_until: UnixTime,
}

/// `ca export`: the exported material as text (PEM blocks, or the JWK set as JSON), ready to be
/// written to a file as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaExported {
    #[serde(rename = "type")]
    pub kind: ExportType,
    pub format: ExportFormat,
    pub data: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use boundkey_auth::model::{
        Authentication, BoundKeypairSpec, HeartbeatRecord, LockTarget, Onboarding, RecoverySpec,
    };
    use boundkey_proto::claims::RecoveryMode;
    use boundkey_proto::{Heartbeat, KeyBackend};
    use serde_json::{json, Value};

    use super::*;

    /// Serialises, checks the JSON against `expected`, and decodes it back to the same value.
    fn round_trip<T>(v: &T, expected: Value)
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let json = serde_json::to_value(v).unwrap();
        assert_eq!(json, expected);
        assert_eq!(&serde_json::from_value::<T>(json).unwrap(), v);
    }

    fn token() -> Token {
        Token {
            name: "dev-1".into(),
            spec: TokenSpec {
                bot_name: "robot".into(),
                join_method: JoinMethod::BoundKeypair,
                expires: None,
                bound_keypair: Some(BoundKeypairSpec {
                    onboarding: Onboarding {
                        initial_public_key: None,
                        must_register_before: Some(100),
                    },
                    recovery: RecoverySpec {
                        limit: 2,
                        mode: RecoveryMode::Relaxed,
                    },
                    rotate_after: None,
                    attestation: Default::default(),
                }),
                max_joins: None,
            },
            status: TokenStatus {
                registration_secret_hash: Some("ab".repeat(32)),
                recovery_count: 1,
                ..Default::default()
            },
            revision: 3,
            created_at: 50,
        }
    }

    #[test]
    fn token_view_is_flat_and_hides_the_secret_hash() {
        let view = TokenView::from(&token());
        round_trip(
            &view,
            json!({
                "name": "dev-1",
                "revision": 3,
                "created_at": 50,
                "bot_name": "robot",
                "join_method": "bound_keypair",
                "expires": null,
                "bound_keypair": {
                    "onboarding": {"initial_public_key": null, "must_register_before": 100},
                    "recovery": {"limit": 2, "mode": "relaxed"},
                    "rotate_after": null,
                },
                "max_joins": null,
                "bound_public_key": null,
                "bound_instance_id": null,
                "recovery_count": 1,
                "last_recovered_at": null,
                "last_rotated_at": null,
                "join_count": 0,
                "registration_secret_pending": true,
            }),
        );
    }

    #[test]
    fn instance_view_is_flat_with_a_state() {
        let mut i = BotInstance::new("robot", JoinMethod::Token, "abcdefgh…", None, 10);
        i.status.expires = 20;
        i.record_authentication(Authentication {
            authenticated_at: 10,
            join_method: JoinMethod::Token,
            join_token: "abcdefgh…".into(),
            generation: 1,
            public_key: "PEM".into(),
            bound_public_key: None,
            remote_addr: "127.0.0.1:1".into(),
        });
        i.record_heartbeat(HeartbeatRecord {
            recorded_at: 11,
            remote_addr: "127.0.0.1:1".into(),
            heartbeat: Heartbeat {
                is_startup: true,
                version: "0.1.0".into(),
                hostname: "h".into(),
                uptime_secs: 5,
                os: "linux".into(),
                arch: "x86_64".into(),
                one_shot: false,
                keystore: KeyBackend::Tpm,
            },
        });
        let active = InstanceView::new(&i, 19);
        assert_eq!(active.state, InstanceState::Active);
        assert_eq!(InstanceView::new(&i, 20).state, InstanceState::Expired);
        let json = serde_json::to_value(&active).unwrap();
        assert_eq!(json["instance_id"], i.spec.instance_id.as_str());
        assert_eq!(json["state"], "active");
        assert_eq!(json["generation"], 1);
        assert_eq!(json["latest_heartbeats"][0]["keystore"], "tpm");
        assert_eq!(json["initial_heartbeat"]["is_startup"], true);
        assert_eq!(json["latest_authentications"][0]["authenticated_at"], 10);
        assert_eq!(
            serde_json::from_value::<InstanceView>(json).unwrap(),
            active
        );
    }

    #[test]
    fn lock_view_adds_active() {
        let lock = Lock {
            name: "l1".into(),
            target: LockTarget::Bot("robot".into()),
            message: "m".into(),
            expires: Some(30),
            created_by: "admin (uid 0)".into(),
            created_at: 10,
        };
        assert!(!LockView::new(&lock, 30).active);
        round_trip(
            &LockView::new(&lock, 29),
            json!({
                "name": "l1",
                "target": {"bot": "robot"},
                "message": "m",
                "expires": 30,
                "created_by": "admin (uid 0)",
                "created_at": 10,
                "active": true,
            }),
        );
    }

    #[test]
    fn token_created_tags_the_credential_with_the_join_method() {
        let uri: JoinUri = "boundkey+bound-keypair://dev-1:s3cret-s3cret@auth.example.com:4433"
            .parse()
            .unwrap();
        let bk = TokenCreated {
            name: "dev-1".into(),
            bot_name: "robot".into(),
            expires: None,
            join_uri: uri.clone(),
            credential: NewCredential::BoundKeypair {
                registration_secret: Some("s3cret-s3cret".into()),
                initial_public_key: None,
                must_register_before: None,
            },
        };
        let json = serde_json::to_value(&bk).unwrap();
        assert_eq!(
            json,
            json!({
                "name": "dev-1",
                "bot_name": "robot",
                "join_method": "bound_keypair",
                "expires": null,
                "join_uri": uri.to_string(),
                "registration_secret": "s3cret-s3cret",
                "initial_public_key": null,
                "must_register_before": null,
            })
        );
        assert!(serde_json::from_value::<TokenCreated>(json).unwrap() == bk);

        let tok = TokenCreated {
            credential: NewCredential::Token {
                token: "0123456789abcdef".into(),
                max_joins: Some(1),
            },
            ..bk
        };
        let json = serde_json::to_value(&tok).unwrap();
        assert_eq!(json["join_method"], "token");
        assert_eq!(json["token"], "0123456789abcdef");
        assert_eq!(json["max_joins"], 1);
        assert!(json.get("registration_secret").is_none());
        assert!(serde_json::from_value::<TokenCreated>(json).unwrap() == tok);

        // The tag spells the join method exactly as JoinMethod does.
        for c in [&bk.credential, &tok.credential] {
            assert_eq!(
                serde_json::to_value(c).unwrap()["join_method"],
                serde_json::to_value(c.join_method()).unwrap()
            );
        }
    }

    #[test]
    fn info_and_ca_rotation_shapes() {
        let pin = CaPin([7; 32]);
        round_trip(
            &ServerInfo {
                cluster: "c".into(),
                ca_pin: pin,
                listen_addr: "127.0.0.1:3025".parse().unwrap(),
                auth_server: "auth.example.com:3025".parse().unwrap(),
                version: "0.1.0".into(),
            },
            json!({
                "cluster": "c",
                "ca_pin": pin.to_string(),
                "listen_addr": "127.0.0.1:3025",
                "auth_server": "auth.example.com:3025",
                "version": "0.1.0",
            }),
        );
        round_trip(
            &CaRotated {
                kind: CaType::JoinState,
                kid: "k".into(),
                grace_period_secs: 60,
                signs_from: 100,
                previous_trusted_until: 160,
            },
            json!({
                "type": "join_state",
                "kid": "k",
                "grace_period_secs": 60,
                "signs_from": 100,
                "previous_trusted_until": 160,
            }),
        );
    }
}
