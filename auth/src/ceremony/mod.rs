//! The bound-keypair join ceremony as a sans-I/O state machine.
//!
//! [`Ceremony::start`] takes the client's `Init`, the verified client identity (if the client
//! presented a certificate) and a snapshot of the stored state; [`Ceremony::handle`] takes each
//! further client message. Both return a [`Step`]: a message to send, a
//! [`crate::outcome::Success`] to commit, or a [`crate::outcome::Refusal`]. Nothing here touches
//! a socket, a clock or a database; the caller passes `now` at every step, which is also what
//! makes challenge expiry testable.
//!
//! Order of decisions (each closes an attack, see `docs/protocol.md`):
//! 1. prove possession: the registration secret and/or a challenge signed by the bound key;
//! 2. only then check locks (lock status never leaks to anonymous callers) and refuse a locked
//!    client before anything could create a second lock;
//! 3. recovery limit;
//! 4. join-state verification (after the proof, so anonymous garbage never locks a token);
//! 5. renewal only: certificate instance id == bound instance id, then the generation counter;
//! 6. rotation, if due;
//! 7. one commit carrying every status change, compare-and-swap on the token revision read at 1.
//!
//! Steps 2–5 live in `checks`, in that order, and run exactly once: on the first proof of
//! possession. The shape of the code follows the order:
//! * `start`: `Init` is validated into a `Context` (what is fixed for the whole ceremony:
//!   config, authority, peer, token, spec, kind) and the first state;
//! * `states`: one type per thing the ceremony can wait for (`states::ExpectRotationResponse`,
//!   `states::ExpectSolution`); each holds only what has been established so far, as typed
//!   facts (`checks::Proven`, then `checks::Checked`), so "checked but not proven" or
//!   "rotating before the checks" cannot be represented;
//! * `finish`: what the commit carries, handed to the identity-issuing path in
//!   [`crate::issue`] shared with the `token` method.

mod checks;
mod context;
mod finish;
mod proof;
mod start;
mod states;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use boundkey_proto::{ClientMessage, Init, UnixTime};

use crate::authority::Authority;
use crate::entropy::Entropy;
use crate::model::AuditEvent;
use crate::outcome::{RefusalClass, Step};
use crate::ServiceConfig;

pub use self::checks::JoinStateRejection;
pub use self::proof::SolutionError;
pub(crate) use self::start::is_token_name;
pub use crate::input::{Peer, Snapshot};

use self::context::Context;
use self::states::State;

/// One ceremony in progress. Invariant: the state only moves forward, and every path out of it
/// ends in exactly one `Commit` or `Refuse` step, after which it is `State::Done`.
#[derive(Debug)]
pub struct Ceremony {
    ctx: Context,
    state: State,
}

impl Ceremony {
    /// Handles `Init`. Returns the ceremony (to feed further messages) and the first step.
    pub fn start(
        cfg: ServiceConfig,
        authority: Arc<Authority>,
        entropy: Entropy,
        peer: Peer,
        snapshot: Snapshot,
        init: Init,
        now: UnixTime,
    ) -> (Option<Ceremony>, Step) {
        match start::accept(cfg, authority, entropy, peer, snapshot, init, now) {
            Ok((ctx, secret)) => {
                let (state, step) = states::begin(&ctx, secret, now);
                (Some(Ceremony { ctx, state }), step)
            }
            Err(refusal) => (None, Step::Refuse(refusal)),
        }
    }

    /// Feeds the next client message.
    pub fn handle(&mut self, msg: ClientMessage, now: UnixTime) -> Step {
        let state = std::mem::replace(&mut self.state, State::Done);
        let (next, step) = state.handle(&self.ctx, msg, now);
        self.state = next;
        step
    }

    /// The connection ended or timed out mid-ceremony: the audit record for it, and what the
    /// caller had proven by then (a stalled first challenge is anonymous).
    pub fn abort_event(&self, reason: &str, now: UnixTime) -> Option<(AuditEvent, RefusalClass)> {
        let delivery = self.state.delivery()?;
        let mut ev = self
            .ctx
            .event(crate::model::event::BOT_JOIN, false, delivery, now);
        ev.error = Some(reason.to_string());
        Some((ev, self.state.caller()))
    }

    /// Config the ceremony was started with (for the driver's logs).
    pub fn config(&self) -> &ServiceConfig {
        &self.ctx.cfg
    }
}
