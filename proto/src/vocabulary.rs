//! Names both sides use for the same things, so the agent, the auth service and the admin API
//! cannot spell them differently.

use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Serialize};

/// A name that is not one of an enum's spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {given:?} (expected {expected})")]
pub struct UnknownName {
    pub what: &'static str,
    pub given: String,
    pub expected: &'static str,
}

/// Which of the three bound-keypair ceremonies runs. The agent picks one from its stored state;
/// the auth service derives one from the token and the verified client certificate (cases A, D
/// and E of the design brief).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CeremonyKind {
    /// Never joined (case A): registration secret or pre-registered key, or a `token` join.
    FirstJoin,
    /// Over mTLS with the current certificate (case D).
    Renewal,
    /// Bound key, no usable certificate (case E).
    Recovery,
}

impl CeremonyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CeremonyKind::FirstJoin => "first_join",
            CeremonyKind::Renewal => "renewal",
            CeremonyKind::Recovery => "recovery",
        }
    }
}

impl fmt::Display for CeremonyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a device keeps its bound key: reported in heartbeats, shown to operators, chosen in
/// the agent's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyBackend {
    /// PKCS#8 PEM file (development, devices without a TPM).
    File,
    /// Inside a TPM 2.0.
    Tpm,
}

impl KeyBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyBackend::File => "file",
            KeyBackend::Tpm => "tpm",
        }
    }
}

impl fmt::Display for KeyBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyBackend {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        match s {
            "file" => Ok(KeyBackend::File),
            "tpm" => Ok(KeyBackend::Tpm),
            other => Err(UnknownName {
                what: "key store",
                given: other.into(),
                expected: "file or tpm",
            }),
        }
    }
}
