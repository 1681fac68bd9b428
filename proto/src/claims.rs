//! Claims of the two signed documents: the challenge a client signs with its bound key, and the
//! join-state document the auth service signs with its join-state CA.

use serde::{Deserialize, Serialize};

use crate::UnixTime;

/// Seconds a challenge stays valid after it is issued.
pub const CHALLENGE_TTL_SECS: i64 = 60;
/// `nbf` is set this far before `iat` to tolerate a client clock slightly ahead.
pub const CHALLENGE_NBF_SKEW_SECS: i64 = 10;

/// The challenge document. The client signs the exact JSON text the server sent; the server
/// compares every claim to what it issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeClaims {
    pub iss: String,
    pub aud: String,
    /// kid of the key that must sign.
    pub sub: String,
    pub iat: UnixTime,
    pub nbf: UnixTime,
    pub exp: UnixTime,
    /// 128 random bits, base64url-no-pad.
    pub nonce: String,
}

/// How strictly recoveries are limited and join state is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryMode {
    /// `recovery_count` may not exceed `limit`; join state verified.
    #[default]
    Standard,
    /// The limit is ignored; join state verified.
    Relaxed,
    /// Neither the limit nor join state is enforced.
    Insecure,
}

impl RecoveryMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RecoveryMode::Standard => "standard",
            RecoveryMode::Relaxed => "relaxed",
            RecoveryMode::Insecure => "insecure",
        }
    }
}

impl core::str::FromStr for RecoveryMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "standard" => Ok(Self::Standard),
            "relaxed" => Ok(Self::Relaxed),
            "insecure" => Ok(Self::Insecure),
            o => Err(format!(
                "unknown recovery mode {o:?} (expected standard, relaxed or insecure)"
            )),
        }
    }
}

/// The join-state document: proof of which instance last joined and how many recoveries the
/// token had consumed then. A copy of a device's storage holds an old document, which stops
/// verifying as soon as either copy joins again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinStateClaims {
    pub iss: String,
    pub aud: String,
    /// Bot name.
    pub sub: String,
    pub iat: UnixTime,
    pub nbf: UnixTime,
    pub instance_id: String,
    pub recovery_sequence: u32,
    /// Informational.
    pub recovery_limit: u32,
    /// Informational.
    pub recovery_mode: RecoveryMode,
}
