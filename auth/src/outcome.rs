//! What a pure decision step produces. The driver ([`crate::service`]) carries it out.

use boundkey_proto::{ErrorCode, ServerMessage};

use crate::model::{AuditEvent, Lock};
use crate::store::Commit;

/// The next thing to do after feeding a client message to a ceremony.
#[derive(Debug)]
pub enum Step {
    /// Send this and wait for the client's next message.
    Send(ServerMessage),
    /// The ceremony succeeded: commit atomically, and only if that succeeds send `reply`.
    Commit(Box<Success>),
    /// The ceremony failed: record what is here, send `reply`, close.
    Refuse(Box<Refusal>),
}

#[derive(Debug)]
pub struct Success {
    pub commit: Commit,
    pub reply: ServerMessage,
}

#[derive(Debug)]
pub struct Refusal {
    /// An automatic lock to create (if no lock of that name exists yet).
    pub lock: Option<Lock>,
    pub audit: Vec<AuditEvent>,
    pub reply: ServerMessage,
    /// The detailed reason, for the server log (the reply stays generic).
    pub reason: String,
    /// What the caller had proven when it was refused; decides rate limits and throttling.
    pub class: RefusalClass,
}

/// How far a refused caller got. Anyone can produce anonymous refusals at line rate, so the
/// service bounds how many of them it audits; wrong registration secrets are also throttled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalClass {
    /// Nothing proven: no verified certificate, secret or key.
    Anonymous,
    /// A registration secret was sent and did not match (a guess, as far as anyone can tell).
    WrongSecret,
    /// The caller proved a key, a secret or a certificate first.
    Authenticated,
}

impl Refusal {
    /// Marks the refusal as one of a caller that proved nothing.
    pub(crate) fn class(mut self: Box<Self>, class: RefusalClass) -> Box<Self> {
        self.class = class;
        self
    }

    pub fn code(&self) -> Option<ErrorCode> {
        match &self.reply {
            ServerMessage::Error(e) => Some(e.code),
            _ => None,
        }
    }
}

/// Generic client-facing messages. Details go to the audit log and the server log only.
pub mod messages {
    pub const ACCESS_DENIED: &str = "access denied";
    pub const LOCKED: &str = "this bot, instance or join token is locked; contact an administrator";
    pub const RECOVERY_LIMIT: &str =
        "the join token has no recoveries left; an administrator must raise its recovery limit";
    pub const CONFLICT: &str = "a concurrent join on this token won the race; retry";
    pub const INTERNAL: &str = "internal error; retry later";
    pub const ATTESTATION_REFUSED: &str =
        "the key attestation was refused; an administrator can see why in the audit log";
}
