//! What a decision is given about the connection and the stored state: the same for the
//! bound-keypair ceremony, the `token` method and heartbeats.

use crate::authority::VerifiedIdentity;
use crate::model::{BotInstance, Lock, Token};

/// What the driver read before the decision started. Reading early is harmless: the ceremony
/// decides in the safe order, and the final compare-and-swap catches anything that changed.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub token: Option<Token>,
    /// The instance named by the client certificate, if any.
    pub instance: Option<BotInstance>,
    /// The token's bound instance, if any (the same as `instance` on an ordinary renewal).
    pub bound_instance: Option<BotInstance>,
    /// Locks in force now.
    pub locks: Vec<Lock>,
}

/// Facts about the connection established by the transport.
#[derive(Debug, Clone)]
pub struct Peer {
    pub remote_addr: String,
    /// Identity from a client certificate that the authority verified; never from a message.
    pub identity: Option<VerifiedIdentity>,
}
