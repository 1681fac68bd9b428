//! `boundkeyd start`: the renewal loop, heartbeats and signals (or one pass with `--oneshot`).
//!
//! * Joins (or renews) at start; start-up failures retry with exponential backoff from 1 s to
//!   1 min with jitter; refusals that need an operator (access denied, locked, no recoveries left)
//!   are logged clearly and retried every [`REFUSED_RETRY`].
//! * Renews every renewal interval; SIGUSR1 renews at once.
//! * Heartbeats run in their own task (startup heartbeat, then every heartbeat interval, each
//!   with up to 5 retries): a failing heartbeat never delays a renewal.
//! * A wrong TPM auth value or a TPM in lockout stops the daemon (non-zero exit) instead of
//!   retrying: retries cannot succeed and would feed the TPM's dictionary-attack counter.
//! * SIGTERM/SIGINT: signals are only looked at between ceremonies, so the current ceremony and
//!   its writes finish first; then the process exits 0.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::config::Settings;
use crate::error::AgentError;
use crate::heartbeat::{self, HeartbeatTarget};
use crate::session::Agent;

/// Delay before retrying after a refusal that needs an operator.
pub(crate) const REFUSED_RETRY: Duration = Duration::from_secs(300);
pub(crate) const RETRY_BASE: Duration = Duration::from_secs(1);
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(60);
/// Heartbeat retries after the first attempt.
pub(crate) const HEARTBEAT_RETRIES: u32 = 5;
/// `--oneshot` attempts for failures that may pass (network, a lost race).
const ONESHOT_ATTEMPTS: u32 = 3;

fn sig(kind: SignalKind, name: &'static str) -> Result<Signal, AgentError> {
    signal(kind).map_err(|source| AgentError::Signal {
        signal: name,
        source,
    })
}

/// Runs `boundkeyd start`.
pub(crate) async fn run(settings: Settings) -> Result<(), AgentError> {
    if settings.destination.is_none() {
        return Err(AgentError::Usage(
            "--destination is required: the directory where the identity certificate, key and CA bundle are written".into(),
        ));
    }
    let started = Instant::now();
    let mut agent = Agent::open(settings)?;
    // A configuration that cannot work is reported now, not retried forever.
    agent.target()?;
    if let Err(e) = agent.sync_outputs() {
        tracing::warn!(error = %e, "could not restore the identity outputs from storage");
    }
    if agent.settings().oneshot {
        return oneshot(&mut agent, started).await;
    }
    let mut term = sig(SignalKind::terminate(), "SIGTERM")?;
    let mut int = sig(SignalKind::interrupt(), "SIGINT")?;
    let mut usr1 = sig(SignalKind::user_defined1(), "SIGUSR1")?;
    let interval = agent.resolved().renewal_interval;
    if agent.resolved().renewal_interval_capped {
        tracing::warn!(
            renewal_interval = %humantime::format_duration(agent.settings().renewal_interval),
            certificate_ttl = %humantime::format_duration(agent.settings().certificate_ttl),
            "renewal interval is not shorter than half the certificate TTL; renewing every {} instead",
            humantime::format_duration(interval)
        );
    }
    let (tx, rx) = watch::channel::<Option<Arc<HeartbeatTarget>>>(None);
    let heartbeats = tokio::spawn(heartbeat_loop(
        rx,
        agent.settings().heartbeat_interval,
        started,
    ));
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
    let mut next = tokio::time::Instant::now();
    tracing::info!(
        renewal_interval = %humantime::format_duration(interval),
        "boundkeyd started"
    );
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = usr1.recv() => tracing::info!("SIGUSR1: renewing now"),
            _ = term.recv() => { tracing::info!("SIGTERM: exiting"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: exiting"); break; }
        }
        match agent.join_or_renew().await {
            Ok(_) => {
                backoff.reset();
                let _ = tx.send(agent.heartbeat_target().map(Arc::new));
                next = tokio::time::Instant::now() + interval;
            }
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => {
                let delay = if e.is_retryable() {
                    backoff.next_delay()
                } else {
                    REFUSED_RETRY
                };
                tracing::error!(error = %e, retry_in = %humantime::format_duration(Duration::from_secs(delay.as_secs().max(1))), "join/renewal failed");
                next = tokio::time::Instant::now() + delay;
            }
        }
    }
    heartbeats.abort();
    Ok(())
}

async fn oneshot(agent: &mut Agent, started: Instant) -> Result<(), AgentError> {
    let mut backoff = Backoff::new(RETRY_BASE, Duration::from_secs(10));
    let mut attempt = 1;
    loop {
        match agent.join_or_renew().await {
            Ok(_) => break,
            Err(e) if e.is_retryable() && attempt < ONESHOT_ATTEMPTS => {
                let d = backoff.next_delay();
                tracing::warn!(error = %e, attempt, "join/renewal failed; retrying");
                tokio::time::sleep(d).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
    match agent.heartbeat_target() {
        Some(t) => {
            if let Err(e) = heartbeat_with_retries(&t, true, started, 2).await {
                tracing::warn!(error = %e, "heartbeat failed (the identity is written; not an error)");
            }
        }
        None => tracing::warn!("no usable identity for a heartbeat"),
    }
    Ok(())
}

async fn heartbeat_with_retries(
    t: &HeartbeatTarget,
    is_startup: bool,
    started: Instant,
    retries: u32,
) -> Result<(), AgentError> {
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
    let mut tries = 0;
    loop {
        match heartbeat::send(t, is_startup, started).await {
            Ok(()) => {
                tracing::debug!(is_startup, "heartbeat acknowledged");
                return Ok(());
            }
            Err(e) if tries < retries => {
                tries += 1;
                tracing::warn!(error = %e, attempt = tries, "heartbeat failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn heartbeat_loop(
    mut rx: watch::Receiver<Option<Arc<HeartbeatTarget>>>,
    interval: Duration,
    started: Instant,
) {
    let mut is_startup = true;
    loop {
        let target = loop {
            if let Some(t) = rx.borrow_and_update().clone() {
                break t;
            }
            if rx.changed().await.is_err() {
                return;
            }
        };
        if let Err(e) =
            heartbeat_with_retries(&target, is_startup, started, HEARTBEAT_RETRIES).await
        {
            tracing::warn!(error = %e, "heartbeat failed after {HEARTBEAT_RETRIES} retries; next one in {}", humantime::format_duration(interval));
        }
        is_startup = false;
        tokio::time::sleep(interval).await;
    }
}
