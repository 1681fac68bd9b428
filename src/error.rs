//! The agent's top-level error: every failure becomes one line saying what failed and what to do,
//! and an exit code (documented in `docs/agent.md`).

use boundkey_hal::HalError;
use boundkey_proto::ErrorCode;

use std::convert::Infallible;

use boundkey_fs::FsError;

use crate::config::{ConfigError, Conflict};
use crate::join::JoinError;
use crate::resolve::{NoTarget, PlanError};
use crate::storage::StorageError;
use crate::transport::TransportError;

/// Exit codes.
pub(crate) mod exit {
    /// Network, TLS, storage I/O, key store or any other runtime failure.
    pub(crate) const FAILURE: u8 = 1;
    /// Bad command line or configuration.
    pub(crate) const USAGE: u8 = 2;
    /// The auth service refused (access denied, locked, no recoveries left, bad request).
    pub(crate) const REFUSED: u8 = 3;
    /// The storage directory is in use by another agent.
    pub(crate) const IN_USE: u8 = 4;
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("key store: {0}")]
    Keystore(#[from] HalError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Refused by the auth service; `message` already says what to do.
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    /// The ceremony failed on the device's side or the auth service broke the protocol.
    #[error(transparent)]
    Join(JoinError<Infallible>),
    #[error("the auth service broke the protocol: {0} (check that boundkeyd and boundkey-authd versions match)")]
    Protocol(String),
    #[error(transparent)]
    NoTarget(#[from] NoTarget),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("cannot write the identity outputs: {0}")]
    Outputs(FsError),
    #[error(
        "storage directory {dir} already belongs to another join configuration: {} (onboard a new token with a new --storage directory)",
        list.iter().map(|c| c.to_string()).collect::<Vec<_>>().join("; ")
    )]
    StateConflict { dir: String, list: Vec<Conflict> },
    #[error("{0}")]
    Usage(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("cannot set up the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot install the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        source: std::io::Error,
    },
    #[error("cannot start the health endpoint on {listen}: {source} (check --health-socket / --health-listen)")]
    Health {
        listen: String,
        source: std::io::Error,
    },
    #[error("cannot write to standard output: {0}")]
    Stdout(std::io::Error),
}

impl From<JoinError<AgentError>> for AgentError {
    /// A failed side effect keeps its own error; a ceremony failure keeps the ceremony's words.
    /// A refusal becomes [`AgentError::Refused`] so the caller can add what to do about it.
    fn from(e: JoinError<AgentError>) -> AgentError {
        match e.into_effect() {
            Ok(effect) => effect,
            Err(JoinError::Refused { code, message }) => AgentError::Refused { code, message },
            Err(other) => AgentError::Join(other),
        }
    }
}

impl AgentError {
    /// Whether retrying the same operation later may succeed without anyone changing anything.
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            AgentError::Transport(t) => t.is_retryable(),
            AgentError::Refused { code, .. } => code.is_retryable(),
            AgentError::Keystore(h) => h.is_transient(),
            AgentError::Outputs(_) => true,
            AgentError::Storage(StorageError::Io(_)) => true,
            _ => false,
        }
    }

    /// Whether the daemon must stop instead of retrying: a wrong TPM auth value cannot become
    /// right (it is read once, at start-up), and every retry counts towards the TPM's
    /// dictionary-attack lockout, which would lock the TPM for every other user too.
    pub(crate) fn is_fatal(&self) -> bool {
        self.exit_code() == exit::USAGE
            || matches!(
                self,
                AgentError::Keystore(HalError::AuthFailed { .. } | HalError::Lockout)
            )
    }

    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            AgentError::Config(_)
            | AgentError::Usage(_)
            | AgentError::StateConflict { .. }
            | AgentError::NoTarget(_)
            | AgentError::Plan(_) => exit::USAGE,
            AgentError::Storage(StorageError::InUse { .. }) => exit::IN_USE,
            AgentError::Refused { code, .. } if !code.is_retryable() => exit::REFUSED,
            _ => exit::FAILURE,
        }
    }

    /// Builds the refusal message for a server error code, with what to do about it.
    pub(crate) fn refused(
        code: ErrorCode,
        server_message: &str,
        token: Option<&str>,
        lost_first_join: bool,
    ) -> Self {
        let token = token.unwrap_or("TOKEN");
        let message = match code {
            ErrorCode::RecoveryLimitExceeded => format!(
                "the join token has no recoveries left; ask an administrator to raise its recovery limit (boundkeyctl tokens edit {token} --recovery-limit N)"
            ),
            ErrorCode::Locked => format!(
                "the auth service refused: this bot, bot instance or join token ({token}) is locked; ask an administrator to investigate (boundkeyctl locks ls) and remove the lock (boundkeyctl locks rm NAME)"
            ),
            ErrorCode::AccessDenied if lost_first_join => format!(
                "the auth service refused the join (access denied); an earlier join of this device may have been accepted without the device recording it and could not be delivered again (for example the device state was restored from an older copy): ask an administrator to check `boundkeyctl audit ls`, then recreate token {token} (boundkeyctl tokens rm / tokens add) and onboard again"
            ),
            ErrorCode::AccessDenied => format!(
                "the auth service refused the join (access denied: {server_message}); check the token name and registration secret, or ask an administrator to look at the audit log (boundkeyctl audit ls) for token {token}"
            ),
            ErrorCode::AttestationRequired => format!(
                "the auth service requires a TPM key attestation for token {token} and this device sent none: the bound key must be made in a TPM (--keystore tpm; a storage directory keeps the key store it was made with, so a file-backed device needs a new storage directory and a new token); see `boundkeyctl tokens show {token}`"
            ),
            ErrorCode::EkUntrusted
            | ErrorCode::EkNotAllowed
            | ErrorCode::AkInvalid
            | ErrorCode::CertifyInvalid
            | ErrorCode::AttestationReplayed
            | ErrorCode::CredentialFailed
            | ErrorCode::EkChanged => format!(
                "the auth service refused the key attestation ({}: {server_message}); token {token} requires the bound key to be attested by a TPM the token trusts: ask an administrator to look at the audit log (boundkeyctl audit ls) and at the token's attestation settings (boundkeyctl tokens show {token})",
                code.as_str()
            ),
            ErrorCode::BadRequest | ErrorCode::UnsupportedVersion => format!(
                "the auth service rejected the request ({}: {server_message}); check that boundkeyd and boundkey-authd versions match",
                code.as_str()
            ),
            ErrorCode::Conflict | ErrorCode::Timeout | ErrorCode::Internal => format!(
                "the auth service failed temporarily ({}: {server_message}); will retry",
                code.as_str()
            ),
        };
        AgentError::Refused { code, message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_say_what_to_do_and_pick_exit_codes() {
        let e = AgentError::refused(ErrorCode::RecoveryLimitExceeded, "x", Some("dev-1"), false);
        assert_eq!(
            e.to_string(),
            "the join token has no recoveries left; ask an administrator to raise its recovery limit (boundkeyctl tokens edit dev-1 --recovery-limit N)"
        );
        assert_eq!(e.exit_code(), exit::REFUSED);
        assert!(!e.is_retryable());
        let e = AgentError::refused(ErrorCode::Conflict, "race", Some("t"), false);
        assert!(e.is_retryable());
        assert_eq!(e.exit_code(), exit::FAILURE);
        let e = AgentError::refused(ErrorCode::Locked, "x", Some("t"), false);
        assert!(e.to_string().contains("boundkeyctl locks ls"));
        let e = AgentError::refused(ErrorCode::AccessDenied, "access denied", Some("t"), true);
        assert!(e.to_string().contains("recreate token t"));
    }
}
