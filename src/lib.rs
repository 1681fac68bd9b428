//! boundkeyd, the boundkey edge agent.
//!
//! Protocol logic is pure and I/O sits at the edges:
//! * [`join`]: the client ceremony as a sans-I/O state machine;
//! * [`keyset`]: bound-key bookkeeping (active, pending, history);
//! * [`config`]: TOML file + flags + join URI merged into settings;
//! * [`storage`]: the locked storage directory and its versioned state file;
//! * [`outputs`]: identity files in the destination directory, swapped as a set;
//! * [`transport`]: TLS 1.3 client with CA pinning and optional mTLS;
//! * [`agent`]: one storage directory's join/renew/recover logic around those;
//! * [`daemon`]: the renewal loop, heartbeats and signals;
//! * [`cli`], [`commands`]: the command line.

pub mod agent;
pub mod backoff;
pub mod cli;
pub mod commands;
pub mod config;
pub mod crash;
pub mod daemon;
pub mod error;
pub mod fsutil;
pub mod join;
pub mod keyset;
pub mod outputs;
#[cfg(test)]
mod pair_test;
pub mod storage;
pub mod transport;

pub use error::AgentError;
