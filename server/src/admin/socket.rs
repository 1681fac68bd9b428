//! The admin socket: `DATA_DIR/admin.sock`, mode 0600, and every connection's peer uid must be
//! the server's own uid (or root). The file mode alone would do on most systems, but the uid
//! check still holds if the mode is loosened by mistake or the directory is shared.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::handler::{self, AdminContext, Caller};
use super::{AdminError, ErrorKind, Request, Response, MAX_REQUEST_LEN};

/// A client that connects and sends nothing is dropped after this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another boundkey-authd is already serving {0} (its admin socket answers)")]
    InUse(PathBuf),
    #[error("cannot create admin socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// The effective uid of this process.
pub fn own_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Binds the socket with mode 0600, replacing a stale socket file left by a crashed server.
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    let io_err = |source| BindError::Io {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(BindError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io_err)?;
    }
    let listener = UnixListener::bind(path).map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    Ok(listener)
}

/// Accepts admin connections until the task is dropped.
pub async fn serve(listener: UnixListener, ctx: Arc<AdminContext>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, ctx).await {
                        tracing::debug!(error = %e, "admin connection ended with an error");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin socket accept failed");
                // Typically EMFILE: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(stream: UnixStream, ctx: Arc<AdminContext>) -> io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let me = own_uid();
    let (read, mut write) = stream.into_split();
    // The request line is read even from a refused peer: closing with its request unread
    // would reset the connection, and the client would see "Broken pipe" or "Connection
    // reset" instead of the answer below.
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST_LEN as u64 + 1);
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => return Ok(()),
        Ok(r) => {
            r?;
        }
    }
    let response = if uid != me && uid != 0 {
        tracing::warn!(uid, "admin request from a foreign uid refused");
        Response::from_result(Err(AdminError::new(
            ErrorKind::Forbidden,
            format!(
                "permission denied: this admin socket accepts only uid {me} (the user running \
                 boundkey-authd) and root; you are uid {uid}"
            ),
        )))
    } else if line.len() > MAX_REQUEST_LEN {
        Response::from_result(Err(AdminError::bad_request("request line too long")))
    } else {
        match serde_json::from_str::<Request>(line.trim_end()) {
            Err(e) => Response::from_result(Err(AdminError::bad_request(format!(
                "malformed admin request: {e}"
            )))),
            Ok(req) => {
                let caller = Caller { uid };
                let op = req.op();
                let r = tokio::task::spawn_blocking(move || {
                    handler::handle(&ctx, caller, req, crate::now())
                })
                .await
                .unwrap_or_else(|e| Err(AdminError::internal(format!("admin task failed: {e}"))));
                if let Err(e) = &r {
                    tracing::info!(uid, op, error = %e, "admin request failed");
                } else {
                    tracing::debug!(uid, op, "admin request");
                }
                Response::from_result(r)
            }
        }
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| {
        br#"{"ok":false,"error":{"code":"internal","message":"response encoding failed"}}"#.to_vec()
    });
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}
