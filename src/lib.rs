//! boundkeyd, the boundkey edge agent. `docs/architecture.md` walks one join through these
//! modules in order.
//!
//! The command line ([`cli`]) becomes [`config::Settings`]; [`resolve`] decides, from the settings
//! and the stored state, everything an attempt needs; [`session`] drives the sans-I/O [`join`]
//! state machine over [`transport`] and commits to [`storage`] and [`outputs`]; [`daemon`] runs
//! that in a loop with [`heartbeat`]s and signals.
//!
//! Only [`Cli`] and [`run`] are public: the agent is a program, not a library.

mod backoff;
mod cli;
mod commands;
mod config;
mod crash;
mod daemon;
mod device;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod health;
mod heartbeat;
mod identity_key;
mod join;
mod keyset;
mod metrics;
mod notify;
mod outputs;
#[cfg(all(test, feature = "pair-test"))]
mod pair_test;
mod resolve;
mod session;
mod storage;
mod time;
mod transport;

use std::process::ExitCode;

pub use cli::Cli;

/// Runs a parsed command line; failures become one line on standard error and an exit code
/// (documented in `docs/agent.md`).
pub fn run(cli: Cli) -> ExitCode {
    crash::install();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("boundkeyd: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
