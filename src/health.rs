//! The opt-in local health endpoint: `/healthz`, `/readyz` and Prometheus `/metrics` over a
//! minimal HTTP/1.1 responder (one request per connection) on the agent's own current-thread
//! runtime. No HTTP framework: the agent ships on devices and must stay small.
//!
//! Enabled only by `--health-socket` / `--health-listen`: otherwise there is no socket and no
//! task. A response comes from the same event loop as renewals, so `/healthz` answering shows
//! that loop is alive.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;

use crate::metrics::Metrics;
use crate::time::unix_now;

/// A request head larger than this is refused: the three paths need a few dozen bytes.
const MAX_REQUEST: usize = 2048;
/// A client must send its request and read the answer within this.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; further ones wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 8;

/// The shared snapshot the daemon updates and the endpoint reads.
pub(crate) type Shared = Arc<Mutex<Metrics>>;

/// Where the endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// A bound endpoint. Invariant: a Unix socket file it created is removed when it is dropped.
pub(crate) struct Endpoint {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    paths: Vec<PathBuf>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Binds every address and starts serving `shared` on the current runtime.
pub(crate) fn start(listen: &[Listen], shared: &Shared) -> std::io::Result<Endpoint> {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut ep = Endpoint {
        tasks: Vec::new(),
        paths: Vec::new(),
    };
    for l in listen {
        match l {
            Listen::Unix(path) => {
                remove_stale_socket(path)?;
                let lis = UnixListener::bind(path)?;
                ep.paths.push(path.clone());
                let (shared, limit) = (shared.clone(), limit.clone());
                ep.tasks.push(tokio::spawn(async move {
                    loop {
                        match lis.accept().await {
                            Ok((s, _)) => serve(s, &shared, &limit).await,
                            Err(e) => accept_failed(e).await,
                        }
                    }
                }));
            }
            Listen::Tcp(addr) => {
                // Bound synchronously (like the Unix socket) so a taken port fails start-up.
                let bound = std::net::TcpListener::bind(addr)?;
                bound.set_nonblocking(true)?;
                let lis = TcpListener::from_std(bound)?;
                let (shared, limit) = (shared.clone(), limit.clone());
                ep.tasks.push(tokio::spawn(async move {
                    loop {
                        match lis.accept().await {
                            Ok((s, _)) => serve(s, &shared, &limit).await,
                            Err(e) => accept_failed(e).await,
                        }
                    }
                }));
            }
        }
        tracing::info!(listen = ?l, "health endpoint listening");
    }
    Ok(ep)
}

/// A socket file left by a previous run is replaced; any other file is an error.
fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Out of file descriptors and the like: wait instead of spinning.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "health endpoint: accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn serve<S>(s: S, shared: &Shared, limit: &Arc<Semaphore>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(permit) = limit.clone().acquire_owned().await else {
        return;
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let _ = tokio::time::timeout(CONNECTION_TIMEOUT, exchange(s, &shared)).await;
    });
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, shared: &Shared) {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    let response = loop {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let snapshot = match shared.lock() {
                Ok(m) => m.clone(),
                Err(p) => p.into_inner().clone(),
            };
            break respond(&buf, &snapshot, unix_now());
        }
        if buf.len() > MAX_REQUEST {
            break reply(431, "text/plain", "request too large\n", false);
        }
    };
    let _ = s.write_all(&response).await;
    let _ = s.shutdown().await;
}

/// The response to one request head. Pure: the connection handling is above.
pub(crate) fn respond(head: &[u8], m: &Metrics, now: i64) -> Vec<u8> {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return reply(400, "text/plain", "bad request\n", false);
    };
    if !version.starts_with("HTTP/1.") {
        return reply(400, "text/plain", "bad request\n", false);
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return reply(405, "text/plain", "method not allowed\n", false),
    };
    let path = target.split('?').next().unwrap_or_default();
    match path {
        "/healthz" => reply(200, "text/plain", "ok\n", head_only),
        "/readyz" => match m.ready(now) {
            Ok(()) => reply(200, "text/plain", "ready\n", head_only),
            Err(why) => reply(503, "text/plain", &format!("not ready: {why}\n"), head_only),
        },
        "/metrics" => reply(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            &m.render(),
            head_only,
        ),
        _ => reply(404, "text/plain", "not found\n", head_only),
    }
}

fn reply(status: u16, content_type: &str, body: &str, head_only: bool) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(b: Vec<u8>) -> String {
        String::from_utf8(b).unwrap()
    }

    #[test]
    fn routes() {
        let mut m = Metrics::default();
        let r = text(respond(b"GET /healthz HTTP/1.1\r\n\r\n", &m, 10));
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\nok\n"));
        let r = text(respond(b"GET /readyz HTTP/1.0\r\n\r\n", &m, 10));
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
        m.certificate_expiry = Some(20);
        let r = text(respond(b"GET /readyz HTTP/1.1\r\n\r\n", &m, 10));
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
        let r = text(respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", &m, 10));
        assert!(
            r.contains("version=0.0.4") && r.ends_with("\r\n\r\n"),
            "{r}"
        );
        let r = text(respond(b"POST /metrics HTTP/1.1\r\n\r\n", &m, 10));
        assert!(r.starts_with("HTTP/1.1 405 "));
        let r = text(respond(b"GET /nope HTTP/1.1\r\n\r\n", &m, 10));
        assert!(r.starts_with("HTTP/1.1 404 "));
        let r = text(respond(b"garbage\r\n\r\n", &m, 10));
        assert!(r.starts_with("HTTP/1.1 400 "));
    }
}
