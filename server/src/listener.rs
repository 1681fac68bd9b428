//! The ceremony listener: one TLS connection carries one ceremony (or one heartbeat).
//!
//! Every connection runs in its own task, on one of the per-core [`Workers`]. Until its first valid frame a connection is
//! *pending*: it has cost the client nothing but a TCP handshake, so it gets a short deadline
//! (`first_frame_timeout`, covering the TLS handshake too) and counts against a small
//! per-address cap on pending connections. After that the ceremony deadline covers the whole
//! connection. Per-address caps are checked right after `accept`, before any TLS work: a
//! connection over a cap is closed at once, so one address cannot hold the slots every device
//! needs. Store access is blocking, so every call into the [`Service`] runs on the blocking
//! pool.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boundkey_auth::service::{Action, Connection, Service, Session};
use boundkey_proto::frame::{self, FrameError};
use boundkey_proto::{ClientMessage, ErrorCode, ServerMessage, FRAME_HEADER_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::workers::Workers;

/// Time allowed to deliver a final error (e.g. `timeout`) after the deadline passed.
const FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Said to a client that resumed a TLS session for anything but a heartbeat.
pub const RESUMED_CEREMONY: &str =
    "a ceremony needs a full TLS handshake; reconnect without resuming the session";

/// Connections refused by a per-address cap are logged at most this often (with a count), so
/// a flood does not turn into a flood of log lines.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct ListenerConfig {
    /// Deadline for handshake + ceremony.
    pub ceremony_timeout: Duration,
    /// Deadline from accept to the first valid frame (TLS handshake included); the ceremony
    /// deadline still bounds the whole connection.
    pub first_frame_timeout: Duration,
    /// Connections held at once, from all addresses; further clients wait in the backlog.
    pub max_connections: usize,
    /// Connections held at once from one address (an IPv6 /64 counts as one address).
    pub max_connections_per_address: usize,
    /// Connections from one address that have not yet sent a valid first frame.
    pub max_pending_per_address: usize,
    /// After shutdown is requested, how long in-flight ceremonies may take to finish.
    pub drain_timeout: Duration,
}

/// Accepts connections until `shutdown` turns true, running each on one of `workers`, then
/// waits (bounded) for in-flight connections to finish.
pub async fn run(
    listener: TcpListener,
    workers: Arc<Workers>,
    acceptor: TlsAcceptor,
    service: Service,
    cfg: ListenerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let limits = Arc::new(AddressLimits::new(
        cfg.max_connections_per_address,
        cfg.max_pending_per_address,
    ));
    let mut refused: u64 = 0;
    let mut last_refusal_log: Option<Instant> = None;
    loop {
        // Taking the slot before accepting leaves excess clients in the kernel's backlog rather
        // than holding sockets we will not serve.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stopped(&mut shutdown) => break,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    // Typically EMFILE: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let admission = match limits.admit(peer.ip()) {
            Ok(a) => a,
            Err(cap) => {
                refused += 1;
                if last_refusal_log.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL) {
                    tracing::warn!(%peer, %cap, refused, "closed connections over a per-address cap");
                    refused = 0;
                    last_refusal_log = Some(Instant::now());
                }
                // Closed before any TLS work: an over-cap connection costs one accept.
                drop(tcp);
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let service = service.clone();
        let deadlines = Deadlines {
            first_frame: cfg.first_frame_timeout,
            ceremony: cfg.ceremony_timeout,
        };
        // Handed to a worker as a plain socket: it is registered with that worker's reactor.
        let tcp = match tcp.into_std() {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot hand the connection to a worker");
                continue;
            }
        };
        workers.spawn(async move {
            match TcpStream::from_std(tcp) {
                Ok(tcp) => connection(tcp, peer, acceptor, service, deadlines, admission).await,
                Err(e) => tracing::warn!(%peer, error = %e, "cannot register the connection"),
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("stopped accepting; waiting for in-flight ceremonies");
    let all = u32::try_from(cfg.max_connections).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(cfg.drain_timeout, slots.acquire_many(all)).await;
    if drained.is_ok() {
        tracing::info!("all ceremonies finished");
    } else {
        tracing::warn!("gave up waiting for in-flight ceremonies");
    }
}

/// What the per-address caps count an address by: an IPv4 address (IPv4-mapped IPv6
/// included), or an IPv6 /64, since one IPv6 host usually has a whole /64 to pick from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum AddressKey {
    V4(Ipv4Addr),
    V6Prefix(u64),
}

impl AddressKey {
    fn of(ip: IpAddr) -> AddressKey {
        match ip {
            IpAddr::V4(v4) => AddressKey::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddressKey::V4(v4),
                None => AddressKey::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// Which per-address cap a refused connection hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum OverCap {
    #[error("connections per address")]
    Open,
    #[error("pending connections per address")]
    Pending,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    open: usize,
    pending: usize,
}

/// Open and pending connection counts per address.
///
/// Invariant: every entry has `1 <= open <= max_open` and `pending <= min(open, max_pending)`,
/// and an address without an open connection has no entry, so the map never holds more
/// entries than there are connections. Counts change only through [`Admission`], whose drop
/// gives its share back.
struct AddressLimits {
    max_open: usize,
    max_pending: usize,
    counts: Mutex<HashMap<AddressKey, Counts>>,
}

impl AddressLimits {
    fn new(max_open: usize, max_pending: usize) -> AddressLimits {
        AddressLimits {
            max_open: max_open.max(1),
            max_pending: max_pending.max(1),
            counts: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AddressKey, Counts>> {
        // The counts stay consistent even if a holder panicked: every update is one statement.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a new (pending) connection from `ip`, or says which cap it is over.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admission, OverCap> {
        let key = AddressKey::of(ip);
        let mut counts = self.lock();
        let c = counts.entry(key).or_default();
        let over = if c.open >= self.max_open {
            Some(OverCap::Open)
        } else if c.pending >= self.max_pending {
            Some(OverCap::Pending)
        } else {
            None
        };
        if let Some(over) = over {
            if c.open == 0 {
                counts.remove(&key);
            }
            return Err(over);
        }
        c.open += 1;
        c.pending += 1;
        Ok(Admission {
            limits: self.clone(),
            key,
            pending: true,
        })
    }

    #[cfg(test)]
    fn counts(&self, ip: IpAddr) -> Option<Counts> {
        self.lock().get(&AddressKey::of(ip)).copied()
    }
}

/// One admitted connection's share of its address's counts; given back on drop.
struct Admission {
    limits: Arc<AddressLimits>,
    key: AddressKey,
    pending: bool,
}

impl Admission {
    /// The connection delivered a valid first frame: it no longer counts as pending.
    fn established(&mut self) {
        if std::mem::replace(&mut self.pending, false) {
            if let Some(c) = self.limits.lock().get_mut(&self.key) {
                c.pending = c.pending.saturating_sub(1);
            }
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut counts = self.limits.lock();
        if let Some(c) = counts.get_mut(&self.key) {
            if self.pending {
                c.pending = c.pending.saturating_sub(1);
            }
            c.open = c.open.saturating_sub(1);
            if c.open == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// The two deadlines of one connection, both counted from accept.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    first_frame: Duration,
    ceremony: Duration,
}

/// Resolves once shutdown was requested (or the sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    // The returned guard is not Send; drop it here rather than across an await in the caller.
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

/// How a connection's exchange ended, when it did not end with a `Close` action.
enum Ending {
    /// The client closed the connection (or it broke).
    Gone(Gone),
    /// The client sent something unusable, or the service failed: tell it why, then close.
    Refused {
        reply: ServerMessage,
        reason: Refusal,
    },
}

/// Why the connection went away before the ceremony finished (recorded as the abort reason).
#[derive(Debug, thiserror::Error)]
enum Gone {
    #[error("connection closed before the first message")]
    BeforeFirstMessage,
    #[error("connection closed mid-ceremony")]
    MidCeremony,
    #[error("read failed: {0}")]
    Read(#[source] io::Error),
    #[error("read failed mid-frame: {0}")]
    ReadMidFrame(#[source] io::Error),
    #[error("write failed: {0}")]
    Write(#[source] io::Error),
}

/// Why the server refused to go on (recorded as the abort reason).
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("refused frame: {0}")]
    Frame(#[source] FrameError),
    #[error("internal error")]
    ServicePanicked,
}

fn unix_now() -> boundkey_auth::UnixTime {
    crate::now()
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    service: Service,
    deadlines: Deadlines,
    mut admission: Admission,
) {
    let started = Instant::now();
    let ceremony_by = started + deadlines.ceremony;
    let first_by = started + deadlines.first_frame.min(deadlines.ceremony);
    let _ = tcp.set_nodelay(true);
    let mut tls = match tokio::time::timeout_at(first_by, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake timed out");
            return;
        }
    };
    // No session exists before the first message, so nothing needs aborting here.
    let first = match tokio::time::timeout_at(first_by, read_message(&mut tls)).await {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) => {
            tracing::debug!(%peer, reason = %Gone::BeforeFirstMessage, "connection ended");
            return;
        }
        Ok(Err(Ending::Gone(reason))) => {
            tracing::debug!(%peer, %reason, "connection ended before the first message");
            return;
        }
        Ok(Err(Ending::Refused { reply, reason })) => {
            tracing::info!(%peer, %reason, "client refused");
            finish(&mut tls, Some(reply)).await;
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "no valid first message before the first-frame deadline");
            let reply = ServerMessage::error(
                ErrorCode::Timeout,
                "no valid message within the server's first-message deadline",
            );
            return finish(&mut tls, Some(reply)).await;
        }
    };
    admission.established();
    // A resumed session proved no key in this connection: it only renews a ticket from an
    // earlier full handshake. That is enough for a heartbeat (a report, whose certificate the
    // service verifies again now), never for a ceremony, which must see the client prove its
    // identity key now (docs/decisions.md, "Heartbeats resume their TLS session").
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    if resumed && !matches!(first, ClientMessage::Heartbeat(_)) {
        tracing::info!(%peer, "ceremony on a resumed TLS session refused");
        let reply = ServerMessage::error(ErrorCode::BadRequest, RESUMED_CEREMONY);
        return finish(&mut tls, Some(reply)).await;
    }
    if resumed {
        tracing::debug!(%peer, "TLS session resumed for a heartbeat");
    }
    let conn = Connection {
        remote_addr: peer.to_string(),
        peer_certificates: tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default(),
    };
    let session: Arc<Mutex<Option<Session>>> = Arc::new(Mutex::new(None));
    // Set while a frame is being written: if the deadline cancels that write, another frame
    // appended after the partial one would be garbage to the client.
    let mut mid_write = false;
    let outcome = tokio::time::timeout_at(
        ceremony_by,
        exchange(
            &mut tls,
            &service,
            conn,
            first,
            session.clone(),
            &mut mid_write,
        ),
    )
    .await;
    let (final_reply, abort_reason) = match outcome {
        Ok(Ok(())) => (None, None),
        Ok(Err(Ending::Gone(reason))) => {
            tracing::debug!(%peer, %reason, "connection ended before the ceremony finished");
            (None, Some(reason.to_string()))
        }
        Ok(Err(Ending::Refused { reply, reason })) => {
            tracing::info!(%peer, %reason, "client refused");
            (Some(reply), Some(reason.to_string()))
        }
        Err(_) => {
            tracing::info!(%peer, deadline = ?deadlines.ceremony, "ceremony deadline exceeded");
            (
                Some(ServerMessage::error(
                    ErrorCode::Timeout,
                    "the ceremony exceeded the server's deadline",
                )),
                Some("ceremony deadline exceeded".to_string()),
            )
        }
    };
    if let Some(reason) = abort_reason {
        // Waits for a Service call still running on the blocking pool (its outcome stands:
        // a session that already closed ignores the abort).
        let session = session.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let mut g = session.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = g.as_mut() {
                s.abort(&reason, unix_now());
            }
        })
        .await;
    }
    finish(&mut tls, final_reply.filter(|_| !mid_write)).await;
}

/// Sends a last error (if any) and closes the TLS session, each bounded so a client that
/// stopped reading cannot hold the task.
async fn finish<S: AsyncWrite + Unpin>(stream: &mut S, reply: Option<ServerMessage>) {
    if let Some(reply) = reply {
        let _ = tokio::time::timeout(FINAL_WRITE_TIMEOUT, write_message(stream, &reply)).await;
    }
    let _ = tokio::time::timeout(FINAL_WRITE_TIMEOUT, stream.shutdown()).await;
}

/// Feeds the first message, then every further one, to the service until it says to close.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    service: &Service,
    conn: Connection,
    first: ClientMessage,
    session: Arc<Mutex<Option<Session>>>,
    mid_write: &mut bool,
) -> Result<(), Ending> {
    let mut action = {
        let service = service.clone();
        let session = session.clone();
        blocking(move || {
            let (s, a) = service.open(conn, first, unix_now());
            *session.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
            a
        })
        .await?
    };
    loop {
        let (msg, last) = match action {
            Action::Close(msg) => (msg, true),
            Action::Reply(msg) => (msg, false),
        };
        *mid_write = true;
        write_message(stream, &msg)
            .await
            .map_err(|e| Ending::Gone(Gone::Write(e)))?;
        *mid_write = false;
        if last {
            return Ok(());
        }
        let msg = match read_message(stream).await? {
            Some(m) => m,
            None => return Err(Ending::Gone(Gone::MidCeremony)),
        };
        let session = session.clone();
        action = blocking(move || {
            let mut g = session.lock().unwrap_or_else(|p| p.into_inner());
            match g.as_mut() {
                Some(s) => s.handle(msg, unix_now()),
                None => Action::Close(ServerMessage::error(ErrorCode::Internal, "no session")),
            }
        })
        .await?;
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Ending> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        tracing::error!(error = %e, "service call panicked");
        Ending::Refused {
            reply: ServerMessage::error(ErrorCode::Internal, "internal error; retry later"),
            reason: Refusal::ServicePanicked,
        }
    })
}

/// Reads one frame. `Ok(None)` on a clean EOF before a header byte.
async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Option<ClientMessage>, Ending> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    match stream.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(Ending::Gone(Gone::Read(e))),
    }
    // The length is checked before anything is allocated for the payload.
    let len = frame::payload_len(header).map_err(refuse)?;
    let mut payload = vec![0u8; len];
    stream
        .read_exact(&mut payload)
        .await
        .map_err(|e| Ending::Gone(Gone::ReadMidFrame(e)))?;
    frame::decode_frame::<ClientMessage>(&payload)
        .map(Some)
        .map_err(refuse)
}

fn refuse(e: FrameError) -> Ending {
    let code = match e {
        FrameError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
        _ => ErrorCode::BadRequest,
    };
    Ending::Refused {
        reply: ServerMessage::error(code, e.to_string()),
        reason: Refusal::Frame(e),
    }
}

async fn write_message<S: AsyncWrite + Unpin>(
    stream: &mut S,
    msg: &ServerMessage,
) -> io::Result<()> {
    let bytes = frame::encode_frame(msg).map_err(io::Error::other)?;
    stream.write_all(&bytes).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn pending_cap_refuses_then_frees_on_first_frame_and_drop() {
        let limits = Arc::new(AddressLimits::new(3, 2));
        let mut a = limits.admit(ip("127.0.0.2")).unwrap();
        let b = limits.admit(ip("127.0.0.2")).unwrap();
        assert_eq!(limits.admit(ip("127.0.0.2")).err(), Some(OverCap::Pending));
        // Another address is not affected.
        let other = limits.admit(ip("127.0.0.1")).unwrap();
        a.established();
        a.established();
        let c = limits.admit(ip("127.0.0.2")).unwrap();
        assert_eq!(
            limits.counts(ip("127.0.0.2")),
            Some(Counts {
                open: 3,
                pending: 2
            })
        );
        assert_eq!(limits.admit(ip("127.0.0.2")).err(), Some(OverCap::Open));
        drop((a, b, c, other));
        assert_eq!(limits.counts(ip("127.0.0.2")), None);
        assert_eq!(limits.counts(ip("127.0.0.1")), None);
        assert!(limits.lock().is_empty(), "refusals leave no entries behind");
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let limits = Arc::new(AddressLimits::new(8, 1));
        let _a = limits.admit(ip("2001:db8:1:2::1")).unwrap();
        assert_eq!(
            limits.admit(ip("2001:db8:1:2:ffff::9")).err(),
            Some(OverCap::Pending)
        );
        let _b = limits.admit(ip("2001:db8:1:3::1")).unwrap();
        let _c = limits.admit(ip("192.0.2.7")).unwrap();
        assert_eq!(
            limits.admit(ip("::ffff:192.0.2.7")).err(),
            Some(OverCap::Pending)
        );
    }
}
