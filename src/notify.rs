//! The service manager's notification protocol (`sd_notify(3)`), written directly against the
//! documented `$NOTIFY_SOCKET` datagram socket: no libsystemd on the device.
//!
//! Messages are newline-separated `KEY=VALUE` lines in one datagram. Sending is best effort: a
//! lost notification must never stop the agent (systemd then reports a start timeout or a
//! watchdog failure, which is the signal an operator needs).

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// A connection to the service manager. Invariant: `sock` is `Some` only when `$NOTIFY_SOCKET`
/// named a usable address; otherwise every send is a no-op.
#[derive(Debug)]
pub(crate) struct Notifier {
    sock: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket). The variable is left
    /// in the environment: the agent starts no children that could misuse it.
    pub(crate) fn from_env() -> Notifier {
        let sock = std::env::var_os("NOTIFY_SOCKET").and_then(|v| {
            let addr = match address(v.to_str()?) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "NOTIFY_SOCKET is unusable; not notifying the service manager");
                    return None;
                }
            };
            match UnixDatagram::unbound() {
                Ok(s) => Some((s, addr)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot create the notification socket");
                    None
                }
            }
        });
        Notifier { sock }
    }

    /// Sends one notification (lines joined by `\n`); failures are logged at debug level.
    pub(crate) fn send(&self, msg: &str) {
        if let Some((s, addr)) = &self.sock {
            if let Err(e) = s.send_to_addr(msg.as_bytes(), addr) {
                tracing::debug!(error = %e, "service manager notification not sent");
            }
        }
    }

    /// `READY=1` with a status line.
    pub(crate) fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// A `STATUS=` line a person reads in `systemctl status`.
    pub(crate) fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    pub(crate) fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    pub(crate) fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping");
    }
}

/// The address `$NOTIFY_SOCKET` names: `@name` is an abstract socket, anything else a path.
fn address(v: &str) -> std::io::Result<SocketAddr> {
    match v.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())
        }
        None if v.starts_with('/') => SocketAddr::from_pathname(v),
        None => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "neither an absolute path nor an @abstract name",
        )),
    }
}

/// A value on one line: the protocol separates fields with newlines.
fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, if the watchdog is meant for this
/// process (`$WATCHDOG_PID` absent or equal to `pid`).
pub(crate) fn watchdog_interval(
    usec: Option<&str>,
    wd_pid: Option<&str>,
    pid: u32,
) -> Option<Duration> {
    if let Some(p) = wd_pid {
        if p.trim().parse::<u32>().ok()? != pid {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// [`watchdog_interval`] from this process's environment.
pub(crate) fn watchdog_from_env() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_interval(usec.as_deref(), pid.as_deref(), std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_is_half_the_interval_for_this_process_only() {
        assert_eq!(
            watchdog_interval(Some("2000000"), None, 7),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            watchdog_interval(Some("2000000"), Some("7"), 7),
            Some(Duration::from_secs(1))
        );
        assert_eq!(watchdog_interval(Some("2000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("x"), None, 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
    }

    #[test]
    fn addresses() {
        assert!(address("/run/systemd/notify").is_ok());
        assert!(address("@abstract").is_ok());
        assert!(address("relative").is_err());
    }

    #[test]
    fn datagrams_reach_a_bound_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            sock: Some((
                UnixDatagram::unbound().unwrap(),
                SocketAddr::from_pathname(&path).unwrap(),
            )),
        };
        n.ready("identity valid\nuntil x");
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=identity valid until x");
    }
}
