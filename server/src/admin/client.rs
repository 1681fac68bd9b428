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

/// Sends one operation and decodes the server's answer as that operation's answer type.
pub fn call<O: Operation>(socket: &Path, op: O) -> Result<O::Answer, ClientError> {
    let value = call_raw(socket, &op.into())?;
    serde_json::from_value(value).map_err(|source| ClientError::Malformed {
        path: socket.to_path_buf(),
        source,
    })
}

/// Sends one request and returns the server's result undecoded.
pub fn call_raw(socket: &Path, req: &Request) -> Result<serde_json::Value, ClientError> {
    let io_err = |source| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io_err)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io_err)?;
    let mut line = serde_json::to_vec(req).map_err(|source| ClientError::Encode {
        path: socket.to_path_buf(),
        source,
    })?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io_err)?;
    let mut resp = String::new();
    BufReader::new(&stream)
        .read_line(&mut resp)
        .map_err(io_err)?;
    let resp: Response =
        serde_json::from_str(resp.trim_end()).map_err(|source| ClientError::Malformed {
            path: socket.to_path_buf(),
            source,
        })?;
    resp.into_result().map_err(ClientError::Server)
}
