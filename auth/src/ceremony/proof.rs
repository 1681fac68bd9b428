//! Checking a proof of possession: a challenge solution, or the identity proof beside it.

use boundkey_proto::claims::ChallengeClaims;
use boundkey_proto::{jws, UnixTime};
use subtle::ConstantTimeEq;

/// Why a challenge solution (or identity proof) was not accepted. The text goes to the audit
/// log; the client only ever hears "access denied".
#[derive(Debug, thiserror::Error)]
pub enum SolutionError {
    #[error("challenge solution: {0}")]
    Signature(jws::JwsError),
    #[error("challenge solution payload: {0}")]
    Payload(serde_json::Error),
    #[error("challenge solution claims differ from the issued challenge")]
    ClaimsDiffer,
    #[error("challenge expired {0}s ago")]
    Expired(i64),
    #[error("challenge not yet valid")]
    NotYetValid,
}

/// Verifies a challenge solution: ES256 by exactly `key`, claims equal to what was issued
/// (nonce compared in constant time), and inside the validity window.
pub(super) fn check_solution(
    solution: &str,
    key: &p256::PublicKey,
    issued: &ChallengeClaims,
    now: UnixTime,
) -> Result<(), SolutionError> {
    let (_, payload) = jws::verify(solution, key).map_err(SolutionError::Signature)?;
    let got: ChallengeClaims = serde_json::from_slice(&payload).map_err(SolutionError::Payload)?;
    let same = got.iss == issued.iss
        && got.aud == issued.aud
        && got.sub == issued.sub
        && got.iat == issued.iat
        && got.nbf == issued.nbf
        && got.exp == issued.exp;
    let nonce_ok: bool = got.nonce.as_bytes().ct_eq(issued.nonce.as_bytes()).into();
    if !(same && nonce_ok) {
        return Err(SolutionError::ClaimsDiffer);
    }
    if now > issued.exp {
        return Err(SolutionError::Expired(now - issued.exp));
    }
    if now < issued.nbf {
        return Err(SolutionError::NotYetValid);
    }
    Ok(())
}
