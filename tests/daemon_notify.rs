//! `Type=notify` support against a real notification socket: the test binds the datagram socket
//! systemd would, starts the real `boundkeyd` with `NOTIFY_SOCKET` and `WATCHDOG_USEC`, and reads
//! what the agent says, in order.
//!
//! Build the auth service first: `cargo build --workspace --bins && cargo test -p boundkey`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Stdio;

use boundkey_testkit::ChildGuard;
use common::*;

/// The service manager's side: a bound datagram socket, and what arrived on it.
struct Manager {
    sock: UnixDatagram,
    watchdogs: usize,
}

impl Manager {
    fn bind(sock: UnixDatagram) -> Manager {
        // A deadline for a message that never comes (a failure), not a timing assertion.
        sock.set_read_timeout(Some(DEADLINE)).unwrap();
        Manager { sock, watchdogs: 0 }
    }

    /// The next notification that is not a watchdog ping (pings are counted).
    fn next(&mut self) -> String {
        let mut buf = [0u8; 4096];
        loop {
            let n = self
                .sock
                .recv(&mut buf)
                .expect("a notification before the deadline");
            let msg = String::from_utf8(buf[..n].to_vec()).expect("UTF-8 notification");
            if msg == "WATCHDOG=1" {
                self.watchdogs += 1;
            } else {
                return msg;
            }
        }
    }

    fn wait_watchdogs(&mut self, at_least: usize) {
        let mut buf = [0u8; 4096];
        while self.watchdogs < at_least {
            let n = self.sock.recv(&mut buf).expect("a watchdog ping");
            assert_eq!(&buf[..n], b"WATCHDOG=1", "only pings while idle");
            self.watchdogs += 1;
        }
    }
}

fn spawn(d: &Device, notify_socket: &str, args: &[&str]) -> ChildGuard {
    ChildGuard::spawn(
        d.start_cmd(args)
            .env("NOTIFY_SOCKET", notify_socket)
            .env("WATCHDOG_USEC", "200000")
            .env_remove("WATCHDOG_PID")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("spawn boundkeyd")
}

#[track_caller]
fn assert_valid_until(msg: &str, ready: bool) {
    let (prefix, rest) = if ready {
        ("READY=1\n", msg.strip_prefix("READY=1\n"))
    } else {
        ("", Some(msg))
    };
    let status = rest.unwrap_or_else(|| panic!("expected {prefix:?} first in {msg:?}"));
    assert!(
        status.starts_with("STATUS=identity valid until 20") && !status.contains('\n'),
        "{msg:?}"
    );
}

#[test]
fn readiness_status_watchdog_and_stopping_reach_the_service_manager() {
    let auth = AuthServer::start();
    let tok = auth.bot_with_token("notified", &[]);
    let d = Device::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let mut m = Manager::bind(UnixDatagram::bind(&path).unwrap());

    // First start: no identity yet, so READY=1 only after the first join.
    let mut daemon = spawn(
        &d,
        path.to_str().unwrap(),
        &["--join-uri", &tok.join_uri, "--renewal-interval", "1h"],
    );
    assert_eq!(m.next(), "STATUS=joining");
    assert_valid_until(&m.next(), true);
    assert_eq!(d.status()["generation"], 1);
    // Idle: the event loop pings at half of WATCHDOG_USEC and says nothing else.
    m.wait_watchdogs(m.watchdogs + 3);

    // A renewal reports itself but does not repeat READY=1.
    send_signal(&daemon, libc::SIGUSR1);
    assert_eq!(m.next(), "STATUS=renewing");
    assert_valid_until(&m.next(), false);
    assert_eq!(d.status()["generation"], 2);

    // A refusal that needs an operator.
    auth.ctl_json(&[
        "locks",
        "add",
        "--bot",
        "notified",
        "--message",
        "stolen device",
    ]);
    send_signal(&daemon, libc::SIGUSR1);
    assert_eq!(m.next(), "STATUS=renewing");
    let locked = m.next();
    assert!(
        locked.starts_with("STATUS=locked: ")
            && locked.contains("retrying in 5m")
            && locked.contains("identity valid until"),
        "{locked:?}"
    );

    send_signal(&daemon, libc::SIGTERM);
    assert_eq!(m.next(), "STOPPING=1\nSTATUS=stopping");
    assert_eq!(wait_exit(&mut daemon, DEADLINE).code(), Some(0));
    let before_restart = m.watchdogs;

    // Second start, on an abstract socket: the identity on disk is still valid, so READY=1
    // comes before any contact with the (now refusing) auth service.
    let name = format!("boundkey-test-{}", std::process::id());
    let abstract_sock = {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        UnixDatagram::bind_addr(&addr).unwrap()
    };
    let mut m = Manager::bind(abstract_sock);
    let mut daemon = spawn(&d, &format!("@{name}"), &["--renewal-interval", "1h"]);
    assert_valid_until(&m.next(), true);
    assert_eq!(m.next(), "STATUS=renewing");
    assert!(m.next().starts_with("STATUS=locked: "));
    send_signal(&daemon, libc::SIGTERM);
    assert_eq!(m.next(), "STOPPING=1\nSTATUS=stopping");
    assert_eq!(wait_exit(&mut daemon, DEADLINE).code(), Some(0));
    assert!(before_restart >= 3);
}
