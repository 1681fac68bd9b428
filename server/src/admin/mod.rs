//! The admin API: one JSON request line in, one JSON response line out, over the Unix socket
//! `DATA_DIR/admin.sock`. `docs/operations.md` documents every operation.
//!
//! Every operation is a type implementing [`Operation`], whose `Answer` is the view it gets back
//! (`views`). The handler must produce exactly that type and `boundkeyctl` decodes exactly that
//! type, so the two cannot drift apart.

use boundkey_auth::model::{AttestationMode, Bot, LockTarget};
use boundkey_proto::claims::RecoveryMode;
use boundkey_proto::{Endpoint, JoinMethod, UnixTime};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

pub mod client;
pub mod handler;
pub mod socket;
pub mod views;

use views::{
    AuditPage, BotDeleted, BotSummary, CaExported, CaRotated, InstanceDeleted, InstancePage,
    InstanceState, InstanceView, LockDeleted, LockView, ServerInfo, TokenCreated, TokenDeleted,
    TokenPage, TokenView,
};

/// File name of the admin socket inside the data directory.
pub const SOCKET_NAME: &str = "admin.sock";
/// Page size of `instances ls` and `tokens ls` when none is asked for.
pub const DEFAULT_PAGE: usize = 100;
/// Page size of `audit ls` when none is asked for.
pub const DEFAULT_AUDIT_PAGE: usize = 50;
/// Largest page one request may ask for: an answer is one JSON line held in memory.
pub const MAX_PAGE: usize = 1000;
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

/// One admin operation. `Answer` is the only shape its successful result may take: the handler
/// is typed to return it and the client decodes it.
pub trait Operation: Into<Request> {
    type Answer: Serialize + DeserializeOwned;
}

/// A request line. Each variant wraps its operation's parameters; `op` names it on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op")]
pub enum Request {
    #[serde(rename = "info")]
    Info(Info),
    #[serde(rename = "bots.add")]
    BotsAdd(BotsAdd),
    #[serde(rename = "bots.ls")]
    BotsLs(BotsLs),
    #[serde(rename = "bots.rm")]
    BotsRm(BotsRm),
    #[serde(rename = "tokens.add")]
    TokensAdd(TokensAdd),
    #[serde(rename = "tokens.ls")]
    TokensLs(TokensLs),
    #[serde(rename = "tokens.show")]
    TokensShow(TokensShow),
    #[serde(rename = "tokens.edit")]
    TokensEdit(TokensEdit),
    #[serde(rename = "tokens.rm")]
    TokensRm(TokensRm),
    #[serde(rename = "bound_keypair.request_rotation")]
    RequestRotation(RequestRotation),
    #[serde(rename = "instances.ls")]
    InstancesLs(InstancesLs),
    #[serde(rename = "instances.show")]
    InstancesShow(InstancesShow),
    #[serde(rename = "instances.rm")]
    InstancesRm(InstancesRm),
    #[serde(rename = "locks.add")]
    LocksAdd(LocksAdd),
    #[serde(rename = "locks.ls")]
    LocksLs(LocksLs),
    #[serde(rename = "locks.rm")]
    LocksRm(LocksRm),
    #[serde(rename = "audit.ls")]
    AuditLs(AuditLs),
    #[serde(rename = "ca.rotate")]
    CaRotate(CaRotate),
    #[serde(rename = "ca.export")]
    CaExport(CaExport),
}

impl Request {
    /// The `op` string, for logs (the request itself may carry a secret).
    pub fn op(&self) -> &'static str {
        match self {
            Request::Info(_) => "info",
            Request::BotsAdd(_) => "bots.add",
            Request::BotsLs(_) => "bots.ls",
            Request::BotsRm(_) => "bots.rm",
            Request::TokensAdd(_) => "tokens.add",
            Request::TokensLs(_) => "tokens.ls",
            Request::TokensShow(_) => "tokens.show",
            Request::TokensEdit(_) => "tokens.edit",
            Request::TokensRm(_) => "tokens.rm",
            Request::RequestRotation(_) => "bound_keypair.request_rotation",
            Request::InstancesLs(_) => "instances.ls",
            Request::InstancesShow(_) => "instances.show",
            Request::InstancesRm(_) => "instances.rm",
            Request::LocksAdd(_) => "locks.add",
            Request::LocksLs(_) => "locks.ls",
            Request::LocksRm(_) => "locks.rm",
            Request::AuditLs(_) => "audit.ls",
            Request::CaRotate(_) => "ca.rotate",
            Request::CaExport(_) => "ca.export",
        }
    }
}

/// Declares each operation's answer and its place in [`Request`].
macro_rules! operations {
    ($($op:ident => $answer:ty,)*) => {
        $(
            impl Operation for $op {
                type Answer = $answer;
            }
            impl From<$op> for Request {
                fn from(op: $op) -> Request {
                    Request::$op(op)
                }
            }
        )*
    };
}

operations! {
    Info => ServerInfo,
    BotsAdd => Bot,
    BotsLs => Vec<BotSummary>,
    BotsRm => BotDeleted,
    TokensAdd => TokenCreated,
    TokensLs => TokenPage,
    TokensShow => TokenView,
    TokensEdit => TokenView,
    TokensRm => TokenDeleted,
    RequestRotation => TokenView,
    InstancesLs => InstancePage,
    InstancesShow => InstanceView,
    InstancesRm => InstanceDeleted,
    LocksAdd => LockView,
    LocksLs => Vec<LockView>,
    LocksRm => LockDeleted,
    AuditLs => AuditPage,
    CaRotate => CaRotated,
    CaExport => CaExported,
}

/// Cluster name, CA pin and listener address.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Info {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BotsAdd {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BotsLs {}

/// Deletes the bot with all its tokens and instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BotsRm {
    pub name: String,
}

/// Tokens in name order, one page at a time.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensLs {
    #[serde(default)]
    pub bot: Option<String>,
    /// Page size (default [`DEFAULT_PAGE`], at most [`MAX_PAGE`]).
    #[serde(default)]
    pub limit: Option<usize>,
    /// The `next` cursor of the previous page.
    #[serde(default)]
    pub after: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensShow {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensRm {
    pub name: String,
}

/// Makes the token's agent rotate its bound key at its next join or renewal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestRotation {
    pub token: String,
}

/// Instances in creation order (oldest first), one page at a time.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstancesLs {
    #[serde(default)]
    pub bot: Option<String>,
    #[serde(default)]
    pub state: Option<InstanceState>,
    /// Only instances created at or after this time.
    #[serde(default)]
    pub since: Option<UnixTime>,
    /// Only instances created before this time.
    #[serde(default)]
    pub until: Option<UnixTime>,
    /// Page size (default [`DEFAULT_PAGE`], at most [`MAX_PAGE`]).
    #[serde(default)]
    pub limit: Option<usize>,
    /// The `next` cursor of the previous page.
    #[serde(default)]
    pub after: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstancesShow {
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstancesRm {
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocksLs {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocksRm {
    pub name: String,
}

/// Audit events, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditLs {
    /// Only events of this type (`bot.join`, `token.updated`, …).
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub bot: Option<String>,
    /// Page size (default [`DEFAULT_AUDIT_PAGE`], at most [`MAX_PAGE`]).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Only events at or after this time.
    #[serde(default)]
    pub since: Option<UnixTime>,
    /// Only events before this time.
    #[serde(default)]
    pub until: Option<UnixTime>,
    /// The `next` cursor of the previous page.
    #[serde(default)]
    pub after: Option<String>,
}

/// Replaces a CA key; the old key stays trusted for the grace period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaRotate {
    #[serde(rename = "type")]
    pub kind: CaType,
    pub grace_period_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaType {
    Identity,
    JoinState,
}

impl CaType {
    /// The wire name (also the audit field's value).
    pub fn as_str(self) -> &'static str {
        match self {
            CaType::Identity => "identity",
            CaType::JoinState => "join_state",
        }
    }
}

/// A CA type name that is neither `identity` nor `join-state`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown CA type {0:?} (expected identity or join-state)")]
pub struct UnknownCaType(pub String);

impl std::str::FromStr for CaType {
    type Err = UnknownCaType;
    fn from_str(s: &str) -> Result<Self, UnknownCaType> {
        match s {
            "identity" => Ok(CaType::Identity),
            "join-state" | "join_state" => Ok(CaType::JoinState),
            o => Err(UnknownCaType(o.to_string())),
        }
    }
}

/// Public trust material for relying parties: a CA bundle, or the keys that verify join-state
/// documents. Only public keys and certificates leave the server this way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaExport {
    #[serde(rename = "type")]
    pub kind: ExportType,
    pub format: ExportFormat,
}

/// What `ca.export` exports: the identity CAs (the SPIFFE trust bundle), the join-state keys, or
/// the TLS CA that agents pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportType {
    Identity,
    JoinState,
    Tls,
}

/// A name that is not an [`ExportType`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown CA type {0:?} (expected identity, join-state or tls)")]
pub struct UnknownExportType(pub String);

impl std::str::FromStr for ExportType {
    type Err = UnknownExportType;
    fn from_str(s: &str) -> Result<Self, UnknownExportType> {
        match s {
            "identity" => Ok(ExportType::Identity),
            "join-state" | "join_state" => Ok(ExportType::JoinState),
            "tls" => Ok(ExportType::Tls),
            o => Err(UnknownExportType(o.to_string())),
        }
    }
}

/// PEM (certificates, or SPKI public keys for join-state) or an RFC 7517 JWK set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    Pem,
    Jwks,
}

/// A name that is not an [`ExportFormat`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown export format {0:?} (expected pem or jwks)")]
pub struct UnknownExportFormat(pub String);

impl std::str::FromStr for ExportFormat {
    type Err = UnknownExportFormat;
    fn from_str(s: &str) -> Result<Self, UnknownExportFormat> {
        match s {
            "pem" => Ok(ExportFormat::Pem),
            "jwks" => Ok(ExportFormat::Jwks),
            o => Err(UnknownExportFormat(o.to_string())),
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
    /// Where the join URI sends agents instead of the listener's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_server: Option<Endpoint>,
    /// Key attestation (bound keypair): `none` (default) or `tpm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<AttestationMode>,
    /// PEM bundle of trusted EK CA certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ek_ca_bundle: Option<String>,
    /// Allowed EK hashes (hex SHA-256 of the EK's DER SubjectPublicKeyInfo).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ek_allow: Vec<String>,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<AttestationMode>,
    /// `null` removes the bundle.
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub ek_ca_bundle: Option<Option<String>>,
    /// Replaces the whole allow list (an empty list clears it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ek_allow: Option<Vec<String>>,
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
            // Only ceremony commits check locks; no admin operation sees `Locked`.
            S::Conflict(_) | S::Locked(_) => ErrorKind::Conflict,
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
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn request_wire_shapes() {
        let r: Request = serde_json::from_str(r#"{"op":"bots.add","name":"robot"}"#).unwrap();
        assert_eq!(
            r,
            Request::BotsAdd(BotsAdd {
                name: "robot".into()
            })
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
            Request::CaRotate(CaRotate {
                kind: CaType::JoinState,
                grace_period_secs: 60
            })
        );
        let r: Request =
            serde_json::from_str(r#"{"op":"ca.export","type":"join_state","format":"jwks"}"#)
                .unwrap();
        assert_eq!(
            r,
            Request::CaExport(CaExport {
                kind: ExportType::JoinState,
                format: ExportFormat::Jwks
            })
        );
        assert_eq!("tls".parse(), Ok(ExportType::Tls));
        assert_eq!("join-state".parse(), Ok(ExportType::JoinState));
        assert!("der".parse::<ExportFormat>().is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"bots.add","name":"x","y":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"nope"}"#).is_err());
    }

    #[test]
    fn operations_without_parameters_are_just_the_op() {
        for (line, op) in [
            (r#"{"op":"info"}"#, Request::Info(Info {})),
            (r#"{"op":"bots.ls"}"#, Request::BotsLs(BotsLs {})),
            (r#"{"op":"locks.ls"}"#, Request::LocksLs(LocksLs {})),
            (
                r#"{"op":"tokens.ls"}"#,
                Request::TokensLs(TokensLs::default()),
            ),
            (
                r#"{"op":"audit.ls","type":"bot.join","limit":3}"#,
                Request::AuditLs(AuditLs {
                    kind: Some("bot.join".into()),
                    limit: Some(3),
                    ..AuditLs::default()
                }),
            ),
        ] {
            assert_eq!(serde_json::from_str::<Request>(line).unwrap(), op, "{line}");
            let again: Request =
                serde_json::from_str(&serde_json::to_string(&op).unwrap()).unwrap();
            assert_eq!(again, op);
        }
        assert!(serde_json::from_str::<Request>(r#"{"op":"info","x":1}"#).is_err());
    }

    #[test]
    fn auth_server_travels_as_an_endpoint_string() {
        let r: Request = serde_json::from_str(
            r#"{"op":"tokens.add","bot":"b","join_method":null,"auth_server":"[::1]:3025"}"#,
        )
        .unwrap();
        let Request::TokensAdd(add) = r else {
            panic!("not tokens.add")
        };
        assert_eq!(add.auth_server.unwrap().to_string(), "[::1]:3025");
        assert!(serde_json::from_str::<Request>(
            r#"{"op":"tokens.add","bot":"b","join_method":null,"auth_server":"no port"}"#
        )
        .is_err());
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
