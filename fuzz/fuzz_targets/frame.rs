//! The frame decoder: a 4-byte header and a payload, as read from a socket.
//! Properties: no panic; the length check refuses what it must; a decoded message re-encodes to
//! a frame that decodes to the same message.
#![no_main]

use boundkey_proto::{decode_frame, encode_frame, frame, ClientMessage, ServerMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() >= frame::FRAME_HEADER_LEN {
        let mut header = [0u8; frame::FRAME_HEADER_LEN];
        header.copy_from_slice(&data[..frame::FRAME_HEADER_LEN]);
        if let Ok(n) = frame::payload_len(header) {
            assert!(n > 0 && n <= boundkey_proto::MAX_FRAME_LEN);
        }
    }
    if let Ok(m) = decode_frame::<ClientMessage>(data) {
        let f = encode_frame(&m).expect("a decoded message encodes");
        let again: ClientMessage =
            decode_frame(&f[frame::FRAME_HEADER_LEN..]).expect("an encoded frame decodes");
        assert_eq!(again, m);
    }
    if let Ok(m) = decode_frame::<ServerMessage>(data) {
        let f = encode_frame(&m).expect("a decoded message encodes");
        let again: ServerMessage =
            decode_frame(&f[frame::FRAME_HEADER_LEN..]).expect("an encoded frame decodes");
        assert_eq!(again, m);
    }
});
