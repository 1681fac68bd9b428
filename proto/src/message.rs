//! Wire messages. Each frame carries one JSON object with `"v"` (the protocol version) and
//! `"type"` (the message kind); the remaining fields are the variant's. `docs/protocol.md`
//! documents every field; unknown fields are rejected so a typo never silently drops data.

use serde::{Deserialize, Serialize};

use crate::{JoinMethod, KeyBackend, UnixTime};

/// Messages the agent sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// Opens a bound-keypair ceremony (first join, renewal, recovery).
    Init(Init),
    /// Answers a [`ServerMessage::RotationRequest`] with a freshly made public key.
    RotationResponse(RotationResponse),
    /// Answers a [`ServerMessage::Challenge`].
    ChallengeSolution(ChallengeSolution),
    /// Answers a [`ServerMessage::ActivateCredential`] with the secret the TPM recovered.
    CredentialResponse(CredentialResponse),
    /// Joins or renews with the `token` join method.
    TokenJoin(TokenJoin),
    /// Reports agent facts on an authenticated (mTLS) connection.
    Heartbeat(Heartbeat),
}

/// Messages the auth service sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    RotationRequest(RotationRequest),
    Challenge(Challenge),
    /// Asks the device's TPM to prove that the attestation key sits beside the endorsement key
    /// (TPM2_ActivateCredential); sent after a challenge that required an attestation.
    ActivateCredential(ActivateCredential),
    Result(JoinResult),
    HeartbeatAck(HeartbeatAck),
    Error(ErrorMessage),
}

/// What the agent asks for in its identity certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BotParams {
    /// Standard base64 of the PKIX (SubjectPublicKeyInfo) DER of the identity key (P-256).
    pub identity_public_key: String,
    /// Requested certificate lifetime; the server clamps it to its bounds.
    pub ttl_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Init {
    /// Token name.
    pub token: String,
    pub params: BotParams,
    /// One-time registration secret (first join on the secret path only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_secret: Option<String>,
    /// The join-state document from the previous join, verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_state: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationRequest {
    /// Why a new key is wanted (informational).
    pub reason: RotationReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RotationReason {
    /// Registration-secret onboarding: the device makes its first bound key.
    Registration,
    /// The token's `rotate_after` is due.
    RotationDue,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationResponse {
    /// The new bound public key, SSH `ecdsa-sha2-nistp256 …` form.
    pub public_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Challenge {
    /// The key that must sign, SSH form.
    pub public_key: String,
    /// JSON text of the challenge claims; sign it byte for byte.
    pub document: String,
    /// The solution must carry a TPM key attestation of `public_key` whose qualifying data is
    /// SHA-256 of `document` (`docs/protocol.md` §5.6). Omitted on the wire when false, so a
    /// challenge on a token without attestation is byte for byte what it always was.
    #[serde(default, skip_serializing_if = "is_false")]
    pub attest: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeSolution {
    /// Compact JWS (ES256) whose payload is the challenge document verbatim.
    pub solution: String,
    /// The same document signed by the identity key named in `init`. Proves the client holds
    /// that key; the server uses it only to recognise a retry of a ceremony whose result was
    /// lost after the server committed it (redelivery, `docs/protocol.md` §5.4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_proof: Option<String>,
    /// Proof that the challenged key lives in a TPM; present exactly when the challenge asked
    /// for it (`attest: true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<Attestation>,
}

/// A TPM key attestation: the TPM's endorsement key (EK), an attestation key (AK) and the
/// AK's TPM2_Certify of the challenged key. Every field is standard base64 (with padding) of
/// the bytes named; the TPM structures are in the TPM's own big-endian marshalling
/// (`docs/protocol.md` §5.6). Only the shape is checked here; the auth service verifies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attestation {
    /// DER X.509 EK certificate (TPM NV index 0x01c00002 for RSA, 0x01c0000a for ECC P-256,
    /// 0x01c00016 for ECC P-384), when the TPM has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ek_certificate: Option<String>,
    /// TPM2B_PUBLIC of the EK (size-prefixed, as TPM2_ReadPublic returns it).
    pub ek_public: String,
    /// TPM2B_PUBLIC of the AK.
    pub ak_public: String,
    /// TPM2B_PUBLIC of the certified (challenged) key.
    pub key_public: String,
    /// TPMS_ATTEST from TPM2_Certify: the contents of the returned TPM2B_ATTEST, without its
    /// size prefix.
    pub certify_info: String,
    /// TPMT_SIGNATURE from TPM2_Certify, by the AK over `certify_info`.
    pub certify_signature: String,
}

/// The device answers with the secret its TPM recovered from an [`ActivateCredential`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialResponse {
    /// Standard base64 of the recovered credential (the TPM2B_DIGEST's bytes, no size prefix).
    pub secret: String,
}

/// MakeCredential output for the AK named in the attestation, sealed to the EK. Both fields are
/// standard base64 of the TPM2B's contents, without the size prefix: tss-esapi's
/// `IdObject::try_from(Vec<u8>)` and `EncryptedSecret::try_from(Vec<u8>)` take them as they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivateCredential {
    /// TPM2B_ID_OBJECT contents: integrity HMAC (as a TPM2B_DIGEST) then the encrypted
    /// credential.
    pub credential_blob: String,
    /// TPM2B_ENCRYPTED_SECRET contents: the seed, RSA-OAEP-encrypted or as an ECC point.
    pub encrypted_secret: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenJoin {
    /// The secret token. Required without a client certificate; must be absent on renewal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    pub params: BotParams,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinResult {
    pub bot_name: String,
    pub instance_id: String,
    pub generation: u64,
    pub join_method: JoinMethod,
    /// PEM: identity certificate (first) followed by nothing else; the chain ends at a CA in
    /// `ca_bundle`.
    pub certificate: String,
    /// PEM: every identity CA certificate currently trusted (more than one during a rotation).
    pub ca_bundle: String,
    pub not_before: UnixTime,
    pub expires: UnixTime,
    /// New join-state document (bound keypair only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_state: Option<String>,
    /// The bound public key now on record, SSH form (bound keypair only). The agent switches its
    /// active key to the one this names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_public_key: Option<String>,
    /// Recoveries the token still allows after this ceremony (`recovery_limit -
    /// recovery_count`), bound keypair in the standard recovery mode only; absent when recoveries
    /// are not limited. Informational: the agent reports it in its metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_remaining: Option<u32>,
}

/// Facts the agent reports about itself. Recorded for operators, never used for decisions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub is_startup: bool,
    pub version: String,
    pub hostname: String,
    pub uptime_secs: u64,
    pub os: String,
    pub arch: String,
    pub one_shot: bool,
    pub keystore: KeyBackend,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatAck {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorMessage {
    pub code: ErrorCode,
    /// A generic, human-readable explanation. Details stay in the server log and audit.
    pub message: String,
}

/// Error codes. A client decides what to do from the code alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed or unexpected message. Do not retry unchanged.
    BadRequest,
    /// The frame's `v` is not supported.
    UnsupportedVersion,
    /// Refused: unknown token, wrong secret, failed proof, bad join state, … (generic on purpose).
    AccessDenied,
    /// The bot, instance or token is locked. Only sent after the client proved its key.
    Locked,
    /// The token has no recoveries left (standard mode). An administrator must raise the limit.
    RecoveryLimitExceeded,
    /// Lost a race with a concurrent ceremony on the same token; retry with backoff.
    Conflict,
    /// The ceremony took longer than the server's deadline.
    Timeout,
    /// Server-side failure; retry with backoff.
    Internal,
    /// The token requires a TPM key attestation and the solution carried none (a key that is
    /// not in a TPM, e.g. the `file` key store).
    AttestationRequired,
    /// The EK certificate does not chain to the token's EK CA bundle, or does not match the EK.
    EkUntrusted,
    /// The EK has no certificate the token trusts and its hash is not on the token's allow list.
    EkNotAllowed,
    /// The attestation key is not a restricted, fixed signing key of a scheme the service checks.
    AkInvalid,
    /// The certification does not verify, names another key, or the key's attributes do not
    /// make it non-exportable.
    CertifyInvalid,
    /// The certification was made for another challenge (replayed).
    AttestationReplayed,
    /// Credential activation failed: the AK is not in the TPM the EK belongs to.
    CredentialFailed,
    /// A rotation was attested by another TPM than the one the token's key was registered in.
    EkChanged,
}

impl ErrorCode {
    /// Whether the same request may succeed later without operator action.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Conflict | ErrorCode::Timeout | ErrorCode::Internal
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::AccessDenied => "access_denied",
            ErrorCode::Locked => "locked",
            ErrorCode::RecoveryLimitExceeded => "recovery_limit_exceeded",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
            ErrorCode::AttestationRequired => "attestation_required",
            ErrorCode::EkUntrusted => "ek_untrusted",
            ErrorCode::EkNotAllowed => "ek_not_allowed",
            ErrorCode::AkInvalid => "ak_invalid",
            ErrorCode::CertifyInvalid => "certify_invalid",
            ErrorCode::AttestationReplayed => "attestation_replayed",
            ErrorCode::CredentialFailed => "credential_failed",
            ErrorCode::EkChanged => "ek_changed",
        }
    }
}

impl ClientMessage {
    /// The message's `type` on the wire, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientMessage::Init(_) => "init",
            ClientMessage::RotationResponse(_) => "rotation_response",
            ClientMessage::ChallengeSolution(_) => "challenge_solution",
            ClientMessage::CredentialResponse(_) => "credential_response",
            ClientMessage::TokenJoin(_) => "token_join",
            ClientMessage::Heartbeat(_) => "heartbeat",
        }
    }
}

impl ServerMessage {
    /// The message's `type` on the wire, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerMessage::RotationRequest(_) => "rotation_request",
            ServerMessage::Challenge(_) => "challenge",
            ServerMessage::ActivateCredential(_) => "activate_credential",
            ServerMessage::Result(_) => "result",
            ServerMessage::HeartbeatAck(_) => "heartbeat_ack",
            ServerMessage::Error(_) => "error",
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ServerMessage::Error(ErrorMessage {
            code,
            message: message.into(),
        })
    }
}
