#![allow(clippy::unwrap_used, clippy::expect_used)]

use boundkey_proto::claims::ChallengeClaims;
use boundkey_proto::jws;

use super::proof::check_solution;
use super::{JoinStateRejection, SolutionError};
use crate::entropy::Entropy;

fn claims(now: i64) -> ChallengeClaims {
    ChallengeClaims {
        iss: "c".into(),
        aud: "c".into(),
        sub: "kid".into(),
        iat: now,
        nbf: now - 5,
        exp: now + 60,
        nonce: "n".into(),
    }
}

fn key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::random(&mut rand_core::OsRng)
}

#[test]
fn a_solution_is_checked_for_signer_claims_and_window() {
    let k = key();
    let pk = p256::PublicKey::from(k.verifying_key());
    let issued = claims(100);
    let doc = serde_json::to_vec(&issued).unwrap();
    let good = jws::sign(&k, None, &doc);
    check_solution(&good, &pk, &issued, 100).unwrap();
    assert!(matches!(
        check_solution(&good, &pk, &issued, 161),
        Err(SolutionError::Expired(1))
    ));
    assert!(matches!(
        check_solution(&good, &pk, &issued, 94),
        Err(SolutionError::NotYetValid)
    ));
    let other = p256::PublicKey::from(key().verifying_key());
    assert!(matches!(
        check_solution(&good, &other, &issued, 100),
        Err(SolutionError::Signature(_))
    ));
    let mut changed = claims(100);
    changed.nonce = "m".into();
    let forged = jws::sign(&k, None, &serde_json::to_vec(&changed).unwrap());
    assert!(matches!(
        check_solution(&forged, &pk, &issued, 100),
        Err(SolutionError::ClaimsDiffer)
    ));
}

#[test]
fn typed_reasons_keep_the_audit_text() {
    assert_eq!(
        SolutionError::Expired(3).to_string(),
        "challenge expired 3s ago"
    );
    assert_eq!(
        SolutionError::ClaimsDiffer.to_string(),
        "challenge solution claims differ from the issued challenge"
    );
    assert_eq!(
        JoinStateRejection::StaleSequence {
            presented: 1,
            stored: 2
        }
        .to_string(),
        "join state recovery_sequence 1 != recovery_count 2 (an older copy of the device state)"
    );
    assert_eq!(
        JoinStateRejection::NotBoundInstance.to_string(),
        "join state instance_id is not the bound instance"
    );
}

#[test]
fn seeded_entropy_repeats_and_serials_are_positive() {
    use rand_core::{CryptoRng, RngCore};
    /// A counter: enough to show that draws follow the source.
    struct Counter(u8);
    impl RngCore for Counter {
        fn next_u32(&mut self) -> u32 {
            rand_core::impls::next_u32_via_fill(self)
        }
        fn next_u64(&mut self) -> u64 {
            rand_core::impls::next_u64_via_fill(self)
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            for b in dest {
                self.0 = self.0.wrapping_add(0x91);
                *b = self.0;
            }
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }
    impl CryptoRng for Counter {}
    let a = Entropy::from_rng(Counter(0));
    let b = Entropy::from_rng(Counter(0));
    assert_eq!(a.instance_id(), b.instance_id());
    let shared = a.clone();
    assert_ne!(
        a.instance_id(),
        shared.instance_id(),
        "clones share one stream"
    );
    for _ in 0..300 {
        let s = a.serial();
        assert!(s[0] & 0x80 == 0 && s[0] != 0);
    }
    assert_eq!(
        uuid::Uuid::parse_str(&Entropy::os().instance_id())
            .unwrap()
            .get_version_num(),
        4
    );
}
