//! Compact JWS: the parser and the ES256 verifier, on arbitrary text, and a sign/verify round
//! trip with the input as payload.
//! Properties: no panic; nothing but a signature by the key verifies; what is signed verifies
//! and yields the payload back.
#![no_main]

use boundkey_proto::jws;
use libfuzzer_sys::fuzz_target;
use p256::ecdsa::SigningKey;

fn key(seed: u8) -> SigningKey {
    let mut bytes = [7u8; 32];
    bytes[0] = seed.max(1);
    SigningKey::from_bytes(&bytes.into()).expect("a fixed scalar in range")
}

struct Keys {
    signer: SigningKey,
    public: p256::PublicKey,
    other: p256::PublicKey,
}

/// Made once: deriving a public key costs as much as a signature.
fn keys() -> &'static Keys {
    static KEYS: std::sync::OnceLock<Keys> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        let signer = key(1);
        let public = p256::PublicKey::from(signer.verifying_key());
        let other = p256::PublicKey::from(key(2).verifying_key());
        Keys {
            signer,
            public,
            other,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Keys {
        signer,
        public,
        other,
    } = keys();
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = jws::parse(text);
        // Arbitrary text never verifies under a key whose private half only this target has,
        // unless it is the output of that key (which the fuzzer cannot produce).
        assert!(jws::verify(text, public).is_err());
    }
    // Signing costs a thousand parses: round-trip one input in sixteen.
    if data.first().is_none_or(|b| b & 0x0f != 0) {
        return;
    }
    let token = jws::sign(signer, Some("kid"), data);
    let (_, payload) = jws::verify(&token, public).expect("own signature verifies");
    assert_eq!(payload, data);
    assert!(jws::verify(&token, other).is_err());
});
