//! The listener under connection floods (issue 8, defect 5): per-address caps close excess
//! connections before any TLS work, and a client that never sends a valid first frame is
//! dropped after the short first-frame deadline, while a device from another loopback address
//! still joins. The ceremony deadline is set far beyond the liveness bounds used here, so
//! without those defences every test below fails its bound rather than passing late.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use boundkey_proto::{ClientMessage, ErrorCode, Init, ServerMessage};
use common::*;
use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

/// Liveness bound: far above what any step needs, far below the server's ceremony deadline.
const BOUND: Duration = Duration::from_secs(60);
const CEREMONY: &str = "600s";

fn bk_token(s: &Server, bot: &str) -> (String, String) {
    let (name, secret, _) = s.add_bk_token(bot, &[]);
    (name, secret.expect("a registration secret"))
}

/// A TCP connection to `addr` from the loopback address `src` (any of 127.0.0.0/8).
async fn tcp_from(src: &str, addr: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
    sock.connect(addr).await.expect("connect")
}

async fn tls_from(src: &str, addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Conn {
    let tcp = tcp_from(src, addr).await;
    TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake")
}

/// Waits (bounded) until the server closes `tcp` without sending anything.
async fn assert_closed_without_data(tcp: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(BOUND, tcp.read(&mut buf)).await {
        Ok(Ok(0)) => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(Ok(n)) => panic!("{what}: the server sent {n} bytes instead of closing"),
        Ok(Err(e)) => panic!("{what}: read failed: {e}"),
        Err(_) => panic!("{what}: still open after {BOUND:?}"),
    }
}

async fn device_joins(s: &Server, bot: &str) {
    let (token, secret) = bk_token(s, bot);
    let mut agent = Agent::new(s, &token, Some(&secret));
    let r = tokio::time::timeout(BOUND, agent.join())
        .await
        .expect("the device's join finished within the bound")
        .expect("the device joined");
    assert_eq!(r.bot_name, bot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_one_address_do_not_stop_a_device_from_another() {
    // The setting: the old global cap of 256, and a deadline long enough that idle
    // connections would hold every slot for the whole test.
    let s = Server::start_with(&[
        "--max-connections",
        "256",
        "--ceremony-timeout",
        CEREMONY,
        "--first-frame-timeout",
        CEREMONY,
    ]);
    s.ctl(&["bots", "add", "robot"]);
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(tcp_from("127.0.0.2", s.addr).await);
    }
    // The last one is over the per-address cap: closed at once, before any TLS.
    assert_closed_without_data(idle.last_mut().unwrap(), "the 300th idle connection").await;
    // The device connects from 127.0.0.1 while the idle ones are still held open.
    device_joins(&s, "robot").await;
    drop(idle);
    assert!(
        s.log().contains("over a per-address cap"),
        "refusals are logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_are_dropped_after_the_first_frame_deadline() {
    let s = Server::start_with(&[
        "--ceremony-timeout",
        CEREMONY,
        "--first-frame-timeout",
        "1s",
    ]);
    s.ctl(&["bots", "add", "robot"]);
    // No TLS handshake at all.
    let mut tcp = tcp_from("127.0.0.5", s.addr).await;
    assert_closed_without_data(&mut tcp, "a connection that never started TLS").await;
    // TLS, then nothing: told why, then closed.
    let mut conn = tls_from("127.0.0.5", s.addr, s.client_config(None)).await;
    match recv_within(&mut conn, BOUND).await {
        Some(ServerMessage::Error(e)) => assert_eq!(e.code, ErrorCode::Timeout, "{e:?}"),
        other => panic!("expected a timeout error, got {other:?}"),
    }
    assert!(recv_within(&mut conn, BOUND).await.is_none(), "then closed");
    // A device that speaks at once is not affected.
    device_joins(&s, "robot").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_caps_close_excess_connections_before_tls() {
    let s = Server::start_with(&[
        "--ceremony-timeout",
        CEREMONY,
        "--first-frame-timeout",
        CEREMONY,
        "--max-connections-per-address",
        "2",
        "--max-pending-per-address",
        "1",
    ]);
    s.ctl(&["bots", "add", "robot"]);

    // Pending cap: one silent connection is held, the next from that address is closed.
    let _held = tcp_from("127.0.0.3", s.addr).await;
    let mut extra = tcp_from("127.0.0.3", s.addr).await;
    assert_closed_without_data(&mut extra, "a second pending connection").await;

    // Connection cap: two ceremonies in flight (past their first frame, so no longer
    // pending) from one address; a third connection from it is closed.
    let mut in_flight = Vec::new();
    for _ in 0..2 {
        let (token, secret) = bk_token(&s, "robot");
        let agent = Agent::new(&s, &token, Some(&secret));
        let mut conn = tls_from("127.0.0.4", s.addr, s.client_config(None)).await;
        send(
            &mut conn,
            &ClientMessage::Init(Init {
                token,
                params: agent.params(),
                registration_secret: Some(secret),
                join_state: None,
            }),
        )
        .await;
        // The server answered the first frame: the ceremony is under way.
        match recv_within(&mut conn, BOUND).await {
            Some(ServerMessage::RotationRequest(_) | ServerMessage::Challenge(_)) => {}
            other => panic!("expected the ceremony to go on, got {other:?}"),
        }
        in_flight.push(conn);
    }
    let mut third = tcp_from("127.0.0.4", s.addr).await;
    assert_closed_without_data(&mut third, "a third connection from one address").await;

    // Closing a connection gives its share back: a TLS handshake from that address succeeds
    // again (retried until the server has seen the close).
    drop(in_flight.pop());
    let mut handshakes = 0;
    let _again = loop {
        handshakes += 1;
        assert!(
            handshakes <= 200,
            "no slot came back after a connection closed"
        );
        let tcp = tcp_from("127.0.0.4", s.addr).await;
        let tls = TlsConnector::from(s.client_config(None))
            .connect(ServerName::try_from("localhost").unwrap(), tcp);
        match tokio::time::timeout(BOUND, tls).await {
            Ok(Ok(conn)) => break conn,
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => panic!("TLS handshake hung"),
        }
    };

    // Other addresses are unaffected throughout.
    device_joins(&s, "robot").await;
}
