//! The key-attestation parsers and verifier (`boundkey_auth::attestation`) on arbitrary bytes:
//! TPM2B_PUBLIC, TPMS_ATTEST, TPMT_SIGNATURE, and a whole attestation built from slices of the
//! input, including MakeCredential for any EK that parses.
//! Properties: no panic; a parsed public area names itself the same way twice; an attestation
//! made of arbitrary bytes never verifies (it would need a signature by the AK it names over a
//! certification of the challenged key for this challenge).
#![no_main]

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use boundkey_auth::attestation::tpm_types::{CertifyInfo, Public, Signature};
use boundkey_auth::attestation::{make_credential, verify, Policy};
use boundkey_auth::model::{AttestationMode, AttestationSpec};
use boundkey_proto::Attestation;
use libfuzzer_sys::fuzz_target;
use rand_core::{CryptoRng, RngCore};

/// A deterministic generator: the target must not depend on the OS's entropy to reproduce.
struct Counter(u64);

impl RngCore for Counter {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1);
        self.0
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for b in dest {
            *b = self.next_u64() as u8;
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}
impl CryptoRng for Counter {}

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Public::from_tpm2b(data) {
        assert_eq!(p.name(), p.name());
        let _ = make_credential(&p, &p.name(), &[1; 32], &mut Counter(1));
    }
    let _ = Public::from_tpmt(data);
    let _ = CertifyInfo::parse(data);
    let _ = Signature::parse(data);

    // Six fields cut from the input at offsets its first bytes choose.
    let (cuts, rest) = data.split_at(data.len().min(6));
    let mut fields = Vec::new();
    let mut at = 0;
    for c in cuts {
        let end = (at + usize::from(*c) * 4).min(rest.len());
        fields.push(STANDARD.encode(&rest[at..end]));
        at = end;
    }
    fields.resize(6, String::new());
    let att = Attestation {
        ek_certificate: Some(fields[0].clone()),
        ek_public: fields[1].clone(),
        ak_public: fields[2].clone(),
        key_public: fields[3].clone(),
        certify_info: fields[4].clone(),
        certify_signature: fields[5].clone(),
    };
    let policy = Policy::from_spec(&AttestationSpec {
        mode: AttestationMode::Tpm,
        ek_ca_bundle: None,
        ek_allow: vec!["00".repeat(32)],
    });
    let key = p256::PublicKey::from_sec1_bytes(&hex_point()).expect("fixed point");
    assert!(verify(&policy, &key, "{}", &att, 1_800_000_000).is_err());
});

/// The P-256 generator, as an uncompressed point.
fn hex_point() -> Vec<u8> {
    let x = "6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296";
    let y = "4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5";
    let mut p = vec![4u8];
    for h in [x, y] {
        p.extend((0..32).map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap_or(0)));
    }
    p
}
