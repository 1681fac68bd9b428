//! TPM key attestation: proof that a bound key was made inside a TPM the token trusts and can
//! never leave it (`docs/protocol.md` §5.6).
//!
//! * [`tpm_types`]: strict parsers for the TPM structures on the wire;
//! * [`ek`]: the EK's identity (SPKI hash) and EK certificate paths through a token's bundle;
//! * [`verify`]: the ordered checks, each with its own [`AttestationError`];
//! * [`credential`]: MakeCredential, which the device's TPM must undo with ActivateCredential
//!   to show the AK sits beside the EK.
//!
//! Everything here is pure: bytes and keys in, a verdict out. The ceremony
//! (`crate::ceremony`) decides when to ask for an attestation and what a failure does.

pub mod credential;
pub mod ek;
pub mod tpm_types;
pub mod verify;

pub use credential::{make_credential, CredentialError, MadeCredential};
pub use verify::{verify, AttestationError, Policy, Verified};
