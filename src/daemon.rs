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
//! * Under systemd (`Type=notify`, see [`notify`]): `READY=1` once a valid identity is on disk
//!   (at start-up, or after the first join), a `STATUS=` line after every change, `WATCHDOG=1`
//!   at half of `WATCHDOG_USEC` from this loop (also while a ceremony waits on the network, so a
//!   stuck TPM call, which blocks the thread, is what trips the watchdog), `STOPPING=1` on exit.
//! * With `--health-socket`/`--health-listen`, the [`health`] endpoint serves the [`Metrics`]
//!   this loop updates after each ceremony.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tokio::time::{Interval, MissedTickBehavior};

use crate::backoff::Backoff;
use crate::config::Settings;
use crate::error::AgentError;
use crate::health;
use crate::heartbeat::{self, HeartbeatTarget};
use crate::metrics::Metrics;
use crate::notify::{self, Notifier};
use crate::session::Agent;
use crate::time::{rfc3339, unix_now};

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
    let outputs_current = match agent.sync_outputs() {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "could not restore the identity outputs from storage");
            false
        }
    };
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
    // Off unless configured: no socket, no task, no snapshot.
    let metrics: Option<health::Shared> =
        (!agent.settings().health.is_empty()).then(|| Arc::new(Mutex::new(Metrics::default())));
    let _endpoint = match &metrics {
        Some(m) => {
            agent.observe(&mut lock(m));
            Some(start_health(&agent, m)?)
        }
        None => None,
    };
    let notifier = Notifier::from_env();
    let mut watchdog = notify::watchdog_from_env().map(|d| {
        let mut i = tokio::time::interval(d);
        i.set_missed_tick_behavior(MissedTickBehavior::Delay);
        i
    });
    let mut ready = false;
    // Ready means consumers find a valid identity in the destination now.
    if let (true, Some(expires)) = (outputs_current, agent.valid_until()) {
        notifier.ready(&valid_until(expires));
        ready = true;
    }
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
    let mut next = tokio::time::Instant::now();
    tracing::info!(
        renewal_interval = %humantime::format_duration(interval),
        watchdog = watchdog.is_some(),
        "boundkeyd started"
    );
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = tick(&mut watchdog) => { notifier.watchdog(); continue; }
            _ = usr1.recv() => tracing::info!("SIGUSR1: renewing now"),
            _ = term.recv() => { tracing::info!("SIGTERM: exiting"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: exiting"); break; }
        }
        notifier.status(if agent.valid_until().is_some() {
            "renewing"
        } else {
            "joining"
        });
        let result = {
            let attempt = agent.join_or_renew();
            tokio::pin!(attempt);
            loop {
                tokio::select! {
                    r = &mut attempt => break r,
                    _ = tick(&mut watchdog) => notifier.watchdog(),
                }
            }
        };
        match result {
            Ok(_) => {
                backoff.reset();
                let _ = tx.send(agent.heartbeat_target().map(Arc::new));
                next = tokio::time::Instant::now() + interval;
                if let Some(m) = &metrics {
                    let mut m = lock(m);
                    agent.observe(&mut m);
                    m.last_success = Some(unix_now());
                    m.consecutive_failures = 0;
                    m.locked = None;
                }
                let status = agent
                    .valid_until()
                    .map_or_else(|| "identity written".to_string(), valid_until);
                if ready {
                    notifier.status(&status);
                } else {
                    notifier.ready(&status);
                    ready = true;
                }
            }
            Err(e) if e.is_fatal() => {
                notifier.status(&format!("failed: {e}"));
                return Err(e);
            }
            Err(e) => {
                let delay = if e.is_retryable() {
                    backoff.next_delay()
                } else {
                    REFUSED_RETRY
                };
                let retry_in =
                    humantime::format_duration(Duration::from_secs(delay.as_secs().max(1)));
                tracing::error!(error = %e, %retry_in, "join/renewal failed");
                next = tokio::time::Instant::now() + delay;
                // Refusals need an operator; anything else is expected to pass by itself.
                let mut status = if e.is_retryable() {
                    format!("error: {e}; retrying in {retry_in}")
                } else {
                    format!("locked: {e}; retrying in {retry_in}")
                };
                if let Some(expires) = agent.valid_until() {
                    status.push_str("; ");
                    status.push_str(&valid_until(expires));
                }
                notifier.status(&status);
                if let Some(m) = &metrics {
                    let mut m = lock(m);
                    agent.observe(&mut m);
                    m.consecutive_failures += 1;
                    m.failures_total += 1;
                    m.locked = (!e.is_retryable()).then(|| e.to_string());
                }
            }
        }
    }
    notifier.stopping();
    heartbeats.abort();
    Ok(())
}

fn valid_until(expires: i64) -> String {
    format!("identity valid until {}", rfc3339(expires))
}

/// The metrics snapshot; a panic while it was held cannot leave it half-written in a way that
/// matters (plain numbers), so a poisoned lock is still used.
fn lock(m: &health::Shared) -> MutexGuard<'_, Metrics> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn start_health(agent: &Agent, m: &health::Shared) -> Result<health::Endpoint, AgentError> {
    let listen = &agent.settings().health;
    health::start(listen, m).map_err(|source| AgentError::Health {
        listen: listen
            .iter()
            .map(|l| match l {
                health::Listen::Unix(p) => p.display().to_string(),
                health::Listen::Tcp(a) => a.to_string(),
            })
            .collect::<Vec<_>>()
            .join(", "),
        source,
    })
}

/// The next watchdog tick, or never without a watchdog.
async fn tick(watchdog: &mut Option<Interval>) {
    match watchdog {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
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
