//! The ceremony listener: one TLS connection carries one ceremony (or one heartbeat).
//!
//! Every connection runs in its own task under one deadline that covers the TLS handshake and
//! the whole ceremony, so a slow or silent client costs one task and one connection slot until
//! the deadline, and never delays anyone else. Store access is blocking, so every call into the
//! [`Service`] runs on the blocking pool.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boundkey_auth::service::{Action, Connection, Service, Session};
use boundkey_proto::frame::{self, FrameError};
use boundkey_proto::{ClientMessage, ErrorCode, ServerMessage, FRAME_HEADER_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

/// Time allowed to deliver a final error (e.g. `timeout`) after the deadline passed.
const FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct ListenerConfig {
    /// Deadline for handshake + ceremony.
    pub ceremony_timeout: Duration,
    pub max_connections: usize,
    /// After shutdown is requested, how long in-flight ceremonies may take to finish.
    pub drain_timeout: Duration,
}

/// Accepts connections until `shutdown` turns true, then waits (bounded) for in-flight
/// connections to finish.
pub async fn run(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    service: Service,
    cfg: ListenerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
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
        let acceptor = acceptor.clone();
        let service = service.clone();
        let timeout = cfg.ceremony_timeout;
        tokio::spawn(async move {
            connection(tcp, peer, acceptor, service, timeout).await;
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
    deadline: Duration,
) {
    let started = Instant::now();
    let _ = tcp.set_nodelay(true);
    let mut tls = match tokio::time::timeout(deadline, acceptor.accept(tcp)).await {
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
    let remaining = deadline.saturating_sub(started.elapsed());
    // Set while a frame is being written: if the deadline cancels that write, another frame
    // appended after the partial one would be garbage to the client.
    let mut mid_write = false;
    let outcome = tokio::time::timeout(
        remaining,
        exchange(&mut tls, &service, conn, session.clone(), &mut mid_write),
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
            tracing::info!(%peer, ?deadline, "ceremony deadline exceeded");
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
    if let Some(reply) = final_reply.filter(|_| !mid_write) {
        let _ = tokio::time::timeout(FINAL_WRITE_TIMEOUT, write_message(&mut tls, &reply)).await;
    }
    let _ = tokio::time::timeout(FINAL_WRITE_TIMEOUT, tls.shutdown()).await;
}

/// Reads client messages and feeds them to the service until it says to close.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    service: &Service,
    conn: Connection,
    session: Arc<Mutex<Option<Session>>>,
    mid_write: &mut bool,
) -> Result<(), Ending> {
    let first = match read_message(stream).await? {
        Some(m) => m,
        None => return Err(Ending::Gone(Gone::BeforeFirstMessage)),
    };
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
