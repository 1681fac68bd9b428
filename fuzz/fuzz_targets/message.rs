//! Every message type and claim set on its own (the first byte picks which), so the fuzzer
//! reaches each type's fields without first having to discover the frame envelope.
//! Properties: no panic; whatever parses re-serialises to something that parses to the same value.
#![no_main]

use boundkey_proto::claims::{ChallengeClaims, JoinStateClaims};
use boundkey_proto::*;
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

fn round_trip<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<T>(data) {
        let text = serde_json::to_vec(&v).expect("a parsed value serialises");
        let again: T = serde_json::from_slice(&text).expect("a serialised value parses");
        assert_eq!(again, v);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 14 {
        0 => round_trip::<ClientMessage>(rest),
        1 => round_trip::<ServerMessage>(rest),
        2 => round_trip::<Init>(rest),
        3 => round_trip::<RotationResponse>(rest),
        4 => round_trip::<ChallengeSolution>(rest),
        5 => round_trip::<TokenJoin>(rest),
        6 => round_trip::<Heartbeat>(rest),
        7 => round_trip::<RotationRequest>(rest),
        8 => round_trip::<Challenge>(rest),
        9 => round_trip::<JoinResult>(rest),
        10 => round_trip::<ErrorMessage>(rest),
        11 => round_trip::<ChallengeClaims>(rest),
        12 => round_trip::<JoinStateClaims>(rest),
        _ => {
            if let Ok(s) = std::str::from_utf8(rest) {
                if let Ok(k) = parse_ssh_public_key(s) {
                    assert_eq!(parse_ssh_public_key(&ssh_public_key(&k)).ok(), Some(k));
                }
                let _ = keys::parse_pkix_b64(s);
                if let Ok(e) = s.parse::<Endpoint>() {
                    assert_eq!(e.to_string().parse::<Endpoint>().ok(), Some(e));
                }
            }
        }
    }
});
