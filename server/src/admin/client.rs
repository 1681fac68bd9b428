//! Blocking admin client (what `boundkeyctl` uses).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{AdminError, Operation, Request, Response};

/// Longest the client waits for an answer; a CA rotation generates a key, which is quick.
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach boundkey-authd at {path}: {source} (is it running with this --data-dir?)"
    )]
    Connect { path: PathBuf, source: io::Error },
    /// The socket refused this user: either the file mode kept us from connecting, or the
    /// server checked our uid and hung up.
    #[error("permission denied: the admin socket {path} accepts only {owner} and root (you are uid {me})")]
    PermissionDenied {
        path: PathBuf,
        owner: SocketOwner,
        me: u32,
    },
    #[error("admin socket {path}: boundkey-authd closed the connection without answering (did it stop?)")]
    NoAnswer { path: PathBuf },
    #[error("admin socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("admin socket {path}: cannot encode the request: {source}")]
    Encode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("admin socket {path}: malformed response: {source}")]
    Malformed {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{0}")]
    Server(AdminError),
}

/// Who may use an admin socket, as far as this client can tell: the socket file's owner is
/// the user running boundkey-authd (it creates the socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketOwner {
    Uid(u32),
    Unknown,
}

impl std::fmt::Display for SocketOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SocketOwner::Uid(uid) => write!(f, "uid {uid} (the user running boundkey-authd)"),
            SocketOwner::Unknown => f.write_str("the user running boundkey-authd"),
        }
    }
}

fn permission_denied(socket: &Path) -> ClientError {
    use std::os::unix::fs::MetadataExt;
    ClientError::PermissionDenied {
        path: socket.to_path_buf(),
        owner: std::fs::metadata(socket)
            .map(|m| SocketOwner::Uid(m.uid()))
            .unwrap_or(SocketOwner::Unknown),
        me: super::socket::own_uid(),
    }
}

/// The server hung up without answering. It does that to a peer whose uid it refuses (it
/// answers every request it accepts, errors included), so when the socket belongs to another
/// user that is the likely reason; otherwise the server probably stopped mid-request.
fn closed_without_answer(socket: &Path) -> ClientError {
    match permission_denied(socket) {
        e @ ClientError::PermissionDenied {
            owner: SocketOwner::Uid(owner),
            me,
            ..
        } if owner != me && me != 0 => e,
        _ => ClientError::NoAnswer {
            path: socket.to_path_buf(),
        },
    }
}

/// Sends one operation and decodes the server's answer as that operation's answer type.
pub fn call<O: Operation>(socket: &Path, op: O) -> Result<O::Answer, ClientError> {
    let value = call_raw(socket, &op.into())?;
    serde_json::from_value(value).map_err(|source| ClientError::Malformed {
        path: socket.to_path_buf(),
        source,
    })
}

/// The server hung up (before or instead of answering).
fn hung_up(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

/// Sends one request and returns the server's result undecoded.
pub fn call_raw(socket: &Path, req: &Request) -> Result<serde_json::Value, ClientError> {
    let io_err = |source| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| {
        if source.kind() == io::ErrorKind::PermissionDenied {
            permission_denied(socket)
        } else {
            ClientError::Connect {
                path: socket.to_path_buf(),
                source,
            }
        }
    })?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io_err)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io_err)?;
    let mut line = serde_json::to_vec(req).map_err(|source| ClientError::Encode {
        path: socket.to_path_buf(),
        source,
    })?;
    line.push(b'\n');
    // A server that refuses our uid may answer and close before the request is written: its
    // answer (already in our receive buffer) says why, so read it rather than report the pipe.
    match stream.write_all(&line) {
        Ok(()) => {}
        Err(e) if hung_up(&e) => {}
        Err(e) => return Err(io_err(e)),
    }
    let mut resp = String::new();
    match BufReader::new(&stream).read_line(&mut resp) {
        Ok(_) => {}
        Err(e) if hung_up(&e) && resp.is_empty() => return Err(closed_without_answer(socket)),
        Err(e) => return Err(io_err(e)),
    }
    if resp.is_empty() {
        return Err(closed_without_answer(socket));
    }
    let resp: Response =
        serde_json::from_str(resp.trim_end()).map_err(|source| ClientError::Malformed {
            path: socket.to_path_buf(),
            source,
        })?;
    resp.into_result().map_err(ClientError::Server)
}
