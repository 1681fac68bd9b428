//! What the boundkey agent and auth service share: wire messages and their framing, the join URI,
//! compact JWS (ES256) helpers, SSH public-key encoding and key ids.
//!
//! This crate performs no I/O. Framing is exposed as pure encode/decode functions over byte
//! slices so that any transport (tokio, blocking std, a test harness) can drive it.

pub mod claims;
pub mod endpoint;
pub mod frame;
pub mod jws;
pub mod keys;
pub mod message;
pub mod uri;
pub mod vocabulary;

pub use endpoint::{Endpoint, EndpointError};
pub use frame::{decode_frame, encode_frame, FrameError, FRAME_HEADER_LEN, MAX_FRAME_LEN};
pub use keys::{kid, parse_ssh_public_key, ssh_public_key, KeyError};
pub use message::*;
pub use uri::{CaPin, JoinMethod, JoinUri, UriError};
pub use vocabulary::{CeremonyKind, KeyBackend, UnknownName};

/// Version of the wire encoding carried in every frame (`"v"`).
pub const PROTOCOL_VERSION: u16 = 1;

/// Seconds since the Unix epoch. Every time on the wire and in the store uses this.
pub type UnixTime = i64;
