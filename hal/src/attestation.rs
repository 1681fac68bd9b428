//! What a key store sends to prove that a key lives in its TPM (`docs/protocol.md` §5.6), as
//! bytes in the TPM's own marshalling, ready to be base64-encoded onto the wire.

use core::fmt;

/// A TPM2_Certify of a bound key by an attestation key (AK) that sits under the TPM's
/// endorsement key (EK), made for one challenge.
///
/// Invariant: every structure is what the TPM produced, unmodified: the public areas as
/// TPM2B_PUBLIC (u16 size, then TPMT_PUBLIC), `certify_info` a TPMS_ATTEST whose extraData is
/// the challenge's hash, `certify_signature` the AK's TPMT_SIGNATURE over it.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyAttestation {
    /// DER EK certificate from the TPM's NV storage, when it has one.
    pub ek_certificate: Option<Vec<u8>>,
    pub ek_public: Vec<u8>,
    pub ak_public: Vec<u8>,
    pub key_public: Vec<u8>,
    pub certify_info: Vec<u8>,
    pub certify_signature: Vec<u8>,
}

impl fmt::Debug for KeyAttestation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyAttestation")
            .field(
                "ek_certificate",
                &self.ek_certificate.as_ref().map(Vec::len),
            )
            .field("ek_public", &self.ek_public.len())
            .field("ak_public", &self.ak_public.len())
            .field("key_public", &self.key_public.len())
            .field("certify_info", &self.certify_info.len())
            .field("certify_signature", &self.certify_signature.len())
            .finish()
    }
}
