//! Length-prefixed frames: a 4-byte big-endian payload length, then that many bytes of JSON.
//!
//! The length is checked against [`MAX_FRAME_LEN`] before any payload byte is read or buffered,
//! so a peer cannot make the other side allocate more than that.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::PROTOCOL_VERSION;

/// Largest payload accepted (64 KiB). The largest real message, a Result with a certificate
/// chain, CA bundle and join state, is under 8 KiB.
pub const MAX_FRAME_LEN: usize = 64 * 1024;
pub const FRAME_HEADER_LEN: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("unsupported protocol version {0} (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u64),
}

/// Reads the header and returns the payload length, refusing oversized or empty frames.
pub fn payload_len(header: [u8; FRAME_HEADER_LEN]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    Ok(len)
}

/// Encodes a message as header + `{"v":1,"type":…,…}`.
pub fn encode_frame<M: Serialize>(msg: &M) -> Result<Vec<u8>, FrameError> {
    let mut value = serde_json::to_value(msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let obj = value
        .as_object_mut()
        .ok_or_else(|| FrameError::Malformed("message is not an object".into()))?;
    obj.insert("v".into(), PROTOCOL_VERSION.into());
    let payload = serde_json::to_vec(&value).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if payload.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(payload.len()));
    }
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes a payload (without its header): checks `v`, then the message itself.
pub fn decode_frame<M: DeserializeOwned>(payload: &[u8]) -> Result<M, FrameError> {
    if payload.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(payload.len()));
    }
    let mut value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let obj = value
        .as_object_mut()
        .ok_or_else(|| FrameError::Malformed("message is not a JSON object".into()))?;
    match obj.remove("v").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(v) => return Err(FrameError::UnsupportedVersion(v)),
        None => return Err(FrameError::Malformed("missing or non-numeric \"v\"".into())),
    }
    serde_json::from_value(value).map_err(|e| FrameError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::*;

    fn init() -> ClientMessage {
        ClientMessage::Init(Init {
            token: "tok".into(),
            params: BotParams {
                identity_public_key: "AAAA".into(),
                ttl_secs: 3600,
            },
            registration_secret: Some("s3cret".into()),
            join_state: None,
        })
    }

    #[test]
    fn round_trip_and_wire_shape() {
        let f = encode_frame(&init()).unwrap();
        let len = payload_len(f[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, f.len() - 4);
        let v: serde_json::Value = serde_json::from_slice(&f[4..]).unwrap();
        assert_eq!(v["v"], 1);
        assert_eq!(v["type"], "init");
        assert_eq!(v["params"]["ttl_secs"], 3600);
        assert!(v.get("join_state").is_none());
        assert_eq!(decode_frame::<ClientMessage>(&f[4..]).unwrap(), init());
    }

    #[test]
    fn oversized_and_empty_headers_are_refused_before_reading() {
        let big = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        assert_eq!(
            payload_len(big),
            Err(FrameError::TooLarge(MAX_FRAME_LEN + 1))
        );
        assert_eq!(
            payload_len([0xff; 4]),
            Err(FrameError::TooLarge(u32::MAX as usize))
        );
        assert_eq!(payload_len([0; 4]), Err(FrameError::Empty));
        assert_eq!(
            payload_len((MAX_FRAME_LEN as u32).to_be_bytes()),
            Ok(MAX_FRAME_LEN)
        );
    }

    #[test]
    fn malformed_payloads_are_refused() {
        for bad in [
            &b"not json"[..],
            b"[1,2]",
            br#"{"type":"init"}"#,
            br#"{"v":"1","type":"init"}"#,
            br#"{"v":1,"type":"nope"}"#,
            br#"{"v":1,"type":"heartbeat_ack","extra":1}"#,
        ] {
            assert!(
                matches!(
                    decode_frame::<ServerMessage>(bad),
                    Err(FrameError::Malformed(_))
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            decode_frame::<ServerMessage>(br#"{"v":2,"type":"heartbeat_ack"}"#),
            Err(FrameError::UnsupportedVersion(2))
        );
    }

    #[test]
    fn attestation_messages_have_their_documented_shape() {
        // A challenge without attestation is what it was before the field existed.
        let plain = ServerMessage::Challenge(Challenge {
            public_key: "k".into(),
            document: "d".into(),
            attest: false,
        });
        let v: serde_json::Value =
            serde_json::from_slice(&encode_frame(&plain).unwrap()[4..]).unwrap();
        assert!(v.get("attest").is_none(), "{v}");
        let p = br#"{"v":1,"type":"challenge","public_key":"k","document":"d","attest":true}"#;
        assert!(matches!(
            decode_frame::<ServerMessage>(p).unwrap(),
            ServerMessage::Challenge(Challenge { attest: true, .. })
        ));
        let p = br#"{"v":1,"type":"challenge_solution","solution":"x","attestation":{"ek_public":"AA==","ak_public":"AA==","key_public":"AA==","certify_info":"AA==","certify_signature":"AA==","ek_certificate":"AA=="}}"#;
        let ClientMessage::ChallengeSolution(s) = decode_frame::<ClientMessage>(p).unwrap() else {
            panic!()
        };
        assert_eq!(
            s.attestation.unwrap().ek_certificate.as_deref(),
            Some("AA==")
        );
        // Every attestation field but the certificate is required, and no other is accepted.
        let missing = br#"{"v":1,"type":"challenge_solution","solution":"x","attestation":{"ek_public":"AA==","ak_public":"AA==","key_public":"AA==","certify_info":"AA=="}}"#;
        assert!(decode_frame::<ClientMessage>(missing).is_err());
        let extra = br#"{"v":1,"type":"challenge_solution","solution":"x","attestation":{"ek_public":"AA==","ak_public":"AA==","key_public":"AA==","certify_info":"AA==","certify_signature":"AA==","pcrs":1}}"#;
        assert!(decode_frame::<ClientMessage>(extra).is_err());
        let p = br#"{"v":1,"type":"activate_credential","credential_blob":"AA==","encrypted_secret":"AA=="}"#;
        assert_eq!(
            decode_frame::<ServerMessage>(p).unwrap().kind(),
            "activate_credential"
        );
        let p = br#"{"v":1,"type":"credential_response","secret":"AA=="}"#;
        assert_eq!(
            decode_frame::<ClientMessage>(p).unwrap().kind(),
            "credential_response"
        );
        let p = br#"{"v":1,"type":"error","code":"ek_changed","message":"m"}"#;
        let ServerMessage::Error(e) = decode_frame::<ServerMessage>(p).unwrap() else {
            panic!()
        };
        assert_eq!(
            (e.code, e.code.as_str()),
            (ErrorCode::EkChanged, "ek_changed")
        );
        assert!(!e.code.is_retryable());
    }

    #[test]
    fn unknown_fields_inside_a_message_are_refused() {
        let p = br#"{"v":1,"type":"challenge_solution","solution":"x","extra":true}"#;
        assert!(decode_frame::<ClientMessage>(p).is_err());
        let ok = br#"{"v":1,"type":"challenge_solution","solution":"x"}"#;
        assert!(decode_frame::<ClientMessage>(ok).is_ok());
    }
}
