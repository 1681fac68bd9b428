//! The admin API: one JSON request line in, one JSON response line out, over the Unix socket
//! `DATA_DIR/admin.sock`. `docs/operations.md` documents every operation.
//!
//! The request and response types live here so that `boundkeyctl` and the server cannot drift
//! apart.

use boundkey_auth::model::LockTarget;
use boundkey_proto::claims::RecoveryMode;
use boundkey_proto::{JoinMethod, UnixTime};
use serde::{Deserialize, Deserializer, Serialize};

pub mod client;
pub mod handler;
pub mod socket;
pub mod views;

/// File name of the admin socket inside the data directory.
pub const SOCKET_NAME: &str = "admin.sock";
/// Longest request line accepted; real requests are well under 4 KiB.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;

/// `Some(None)` for an explicit `null` (clear the field), `None` when the field is absent
/// (leave it alone).
fn double_option<'de, T, D>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    T: Deserialize<'de>,
    D: Deserializer<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", deny_unknown_fields)]
pub enum Request {
    /// Cluster name, CA pin and listener address.
    #[serde(rename = "info")]
    Info,
    #[serde(rename = "bots.add")]
    BotsAdd { name: String },
    #[serde(rename = "bots.ls")]
    BotsLs,
    #[serde(rename = "bots.rm")]
    BotsRm { name: String },
    #[serde(rename = "tokens.add")]
    TokensAdd(TokensAdd),
    #[serde(rename = "tokens.ls")]
    TokensLs {
        #[serde(default)]
        bot: Option<String>,
    },
    #[serde(rename = "tokens.show")]
    TokensShow { name: String },
    #[serde(rename = "tokens.edit")]
    TokensEdit(TokensEdit),
    #[serde(rename = "tokens.rm")]
    TokensRm { name: String },
    #[serde(rename = "bound_keypair.request_rotation")]
    RequestRotation { token: String },
    #[serde(rename = "instances.ls")]
    InstancesLs {
        #[serde(default)]
        bot: Option<String>,
    },
    #[serde(rename = "instances.show")]
    InstancesShow { id: String },
    #[serde(rename = "instances.rm")]
    InstancesRm { id: String },
    #[serde(rename = "locks.add")]
    LocksAdd(LocksAdd),
    #[serde(rename = "locks.ls")]
    LocksLs,
    #[serde(rename = "locks.rm")]
    LocksRm { name: String },
    #[serde(rename = "audit.ls")]
    AuditLs {
        #[serde(default, rename = "type")]
        kind: Option<String>,
        #[serde(default)]
        limit: Option<usize>,
        #[serde(default)]
        since: Option<UnixTime>,
    },
    #[serde(rename = "ca.rotate")]
    CaRotate {
        #[serde(rename = "type")]
        kind: CaType,
        grace_period_secs: u64,
    },
}

impl Request {
    /// The `op` string, for logs (the request itself may carry a secret).
    pub fn op(&self) -> &'static str {
        match self {
            Request::Info => "info",
            Request::BotsAdd { .. } => "bots.add",
            Request::BotsLs => "bots.ls",
            Request::BotsRm { .. } => "bots.rm",
            Request::TokensAdd(_) => "tokens.add",
            Request::TokensLs { .. } => "tokens.ls",
            Request::TokensShow { .. } => "tokens.show",
            Request::TokensEdit(_) => "tokens.edit",
            Request::TokensRm { .. } => "tokens.rm",
            Request::RequestRotation { .. } => "bound_keypair.request_rotation",
            Request::InstancesLs { .. } => "instances.ls",
            Request::InstancesShow { .. } => "instances.show",
            Request::InstancesRm { .. } => "instances.rm",
            Request::LocksAdd(_) => "locks.add",
            Request::LocksLs => "locks.ls",
            Request::LocksRm { .. } => "locks.rm",
            Request::AuditLs { .. } => "audit.ls",
            Request::CaRotate { .. } => "ca.rotate",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaType {
    Identity,
    JoinState,
}

impl std::str::FromStr for CaType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "identity" => Ok(CaType::Identity),
            "join-state" | "join_state" => Ok(CaType::JoinState),
            o => Err(format!(
                "unknown CA type {o:?} (expected identity or join-state)"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensAdd {
    pub bot: String,
    pub join_method: Option<JoinMethod>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_public_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_mode: Option<RecoveryMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub must_register_before: Option<UnixTime>,
    /// `token` method only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_joins: Option<u32>,
    /// `token` method: the token's lifetime (default 1 h). `bound_keypair`: sets `expires`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// Allow a `token`-method TTL above 7 days.
    #[serde(default)]
    pub force: bool,
    /// `HOST:PORT` to put in the join URI instead of the listener's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_server: Option<String>,
}

/// Absent field: unchanged. `null`: cleared (for optional fields). Value: set.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensEdit {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_mode: Option<RecoveryMode>,
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub must_register_before: Option<Option<UnixTime>>,
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires: Option<Option<UnixTime>>,
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub initial_public_key: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_joins: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocksAdd {
    pub target: LockTarget,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

/// Machine-readable error classes of the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    BadRequest,
    NotFound,
    AlreadyExists,
    Conflict,
    Forbidden,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct AdminError {
    pub code: ErrorKind,
    pub message: String,
}

impl AdminError {
    pub fn new(code: ErrorKind, message: impl Into<String>) -> Self {
        AdminError {
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, m)
    }
}

impl From<boundkey_auth::store::StoreError> for AdminError {
    fn from(e: boundkey_auth::store::StoreError) -> Self {
        use boundkey_auth::store::StoreError as S;
        let code = match &e {
            S::Conflict(_) => ErrorKind::Conflict,
            S::AlreadyExists(_) => ErrorKind::AlreadyExists,
            S::NotFound(_) => ErrorKind::NotFound,
            S::Backend(_) => ErrorKind::Internal,
        };
        AdminError::new(code, e.to_string())
    }
}

impl From<boundkey_auth::admin::AdminError> for AdminError {
    fn from(e: boundkey_auth::admin::AdminError) -> Self {
        AdminError::bad_request(e.to_string())
    }
}

/// The response line: `{"ok":true,"result":…}` or `{"ok":false,"error":{"code":…,"message":…}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<AdminError>,
}

impl Response {
    pub fn from_result(r: Result<serde_json::Value, AdminError>) -> Self {
        match r {
            Ok(v) => Response {
                ok: true,
                result: Some(v),
                error: None,
            },
            Err(e) => Response {
                ok: false,
                result: None,
                error: Some(e),
            },
        }
    }

    pub fn into_result(self) -> Result<serde_json::Value, AdminError> {
        match (self.ok, self.error) {
            (true, _) => Ok(self.result.unwrap_or(serde_json::Value::Null)),
            (false, Some(e)) => Err(e),
            (false, None) => Err(AdminError::internal(
                "the server reported an unspecified error",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_shapes() {
        let r: Request = serde_json::from_str(r#"{"op":"bots.add","name":"robot"}"#).unwrap();
        assert_eq!(
            r,
            Request::BotsAdd {
                name: "robot".into()
            }
        );
        let r: Request =
            serde_json::from_str(r#"{"op":"locks.add","target":{"bot_instance_id":"i-1"}}"#)
                .unwrap();
        assert!(matches!(
            r,
            Request::LocksAdd(LocksAdd {
                target: LockTarget::BotInstanceId(_),
                ..
            })
        ));
        let r: Request = serde_json::from_str(
            r#"{"op":"ca.rotate","type":"join_state","grace_period_secs":60}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::CaRotate {
                kind: CaType::JoinState,
                grace_period_secs: 60
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"bots.add","name":"x","y":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"nope"}"#).is_err());
    }

    #[test]
    fn edit_distinguishes_absent_null_and_value() {
        let e: TokensEdit = serde_json::from_str(r#"{"name":"t"}"#).unwrap();
        assert_eq!(e.expires, None);
        let e: TokensEdit = serde_json::from_str(r#"{"name":"t","expires":null}"#).unwrap();
        assert_eq!(e.expires, Some(None));
        let e: TokensEdit = serde_json::from_str(r#"{"name":"t","expires":5}"#).unwrap();
        assert_eq!(e.expires, Some(Some(5)));
        let round: TokensEdit = serde_json::from_str(
            &serde_json::to_string(&TokensEdit {
                name: "t".into(),
                expires: Some(None),
                ..Default::default()
            })
            .unwrap(),
        )
        .unwrap();
        assert_eq!(round.expires, Some(None));
    }
}
