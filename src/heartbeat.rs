//! Heartbeats: facts the agent reports about itself over mTLS. The auth service records them for
//! operators and never decides anything from them, so a failing heartbeat is only logged.

use std::time::Instant;

use boundkey_hal::Backend;
use boundkey_proto::{ClientMessage, Endpoint, Heartbeat, ServerMessage};

use crate::error::AgentError;
use crate::session::CEREMONY_TIMEOUT;
use crate::transport::{ClientTls, TransportError};

/// Everything a heartbeat needs, detached from the agent so a separate task can send it.
#[derive(Debug)]
pub(crate) struct HeartbeatTarget {
    pub(crate) endpoint: Endpoint,
    /// The identity's TLS configuration, kept so that each heartbeat resumes the previous one's
    /// session. A new identity (renewal) comes with a new target, so a new session.
    pub(crate) tls: ClientTls,
    pub(crate) keystore: Backend,
    pub(crate) one_shot: bool,
}

/// Sends one heartbeat over mTLS and waits for the acknowledgement.
pub(crate) async fn send(
    t: &HeartbeatTarget,
    is_startup: bool,
    started: Instant,
) -> Result<(), AgentError> {
    let hb = Heartbeat {
        is_startup,
        version: env!("CARGO_PKG_VERSION").to_string(),
        hostname: hostname(),
        uptime_secs: started.elapsed().as_secs(),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        one_shot: t.one_shot,
        keystore: t.keystore,
    };
    let exchange = async {
        let mut conn = t.tls.connect(&t.endpoint).await?;
        conn.send(&ClientMessage::Heartbeat(hb)).await?;
        let reply = conn.recv().await?;
        conn.close().await;
        match reply {
            ServerMessage::HeartbeatAck(_) => Ok(()),
            ServerMessage::Error(e) => Err(AgentError::refused(e.code, &e.message, None, false)),
            other => Err(AgentError::Protocol(format!(
                "unexpected {} in reply to a heartbeat",
                other.kind()
            ))),
        }
    };
    tokio::time::timeout(CEREMONY_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(AgentError::Transport(TransportError::Timeout {
                addr: t.endpoint.to_string(),
                secs: CEREMONY_TIMEOUT.as_secs(),
            }))
        })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}
