//! A legitimate device's join latency with no attack, then while 1,000 idle and 1,000
//! garbage-sending connections are held open from other loopback addresses.
//!
//! `cargo bench -p boundkey-server --bench flood` runs the full benchmark (the figures in
//! docs/performance.md); without `--bench` (e.g. `cargo test --benches`) it runs a small,
//! quick version so the code stays exercised. Everything is on loopback and bounded in count
//! and time. Knobs: FLOOD_JOINS, FLOOD_IDLE, FLOOD_GARBAGE, and FLOOD_AUTHD_ARGS (extra
//! boundkey-authd flags, split on spaces, e.g. to compare other limits).
//!
//! The server is the real `boundkey-authd` with its default limits; the device is the test
//! agent (software P-256 keys, real TLS) connecting from 127.0.0.1 and renewing over mTLS
//! (challenge-response) each time. Attackers connect from 127.0.1.x (idle: connect and send
//! nothing) and 127.0.2.x (garbage: a TLS record header and then random bytes, dribbled, so
//! the connection stays open until the server drops it), spread over enough addresses that
//! the per-address caps admit them all, and reconnect whenever the server drops them. So the
//! figures show what the global limits and the first-frame deadline leave for a device when
//! an attacker has many addresses, not just that one address is capped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rand_core::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Matches boundkey-authd's default --max-pending-per-address, so each address's share is
/// admitted.
const PER_ADDRESS: usize = 32;

fn knob(name: &str, full: usize, smoke: usize, is_bench: bool) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if is_bench { full } else { smoke })
}

async fn tcp_from(src: [u8; 4], addr: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::from((src, 0)))?;
    sock.connect(addr).await
}

/// Source address of attacker `i` in 127.0.`net`.x.
fn source(net: u8, i: usize) -> [u8; 4] {
    let host = u8::try_from(1 + i / PER_ADDRESS).expect("at most 8160 attackers per kind");
    [127, 0, net, host]
}

/// A random pause before reconnecting, so connections the server dropped together do not all
/// come back together.
async fn backoff() {
    let ms = 50 + u64::from(rand_core::OsRng.next_u32() % 500);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// Holds one idle connection open, reconnecting whenever the server drops it.
async fn idle(src: [u8; 4], addr: SocketAddr, open: Arc<AtomicUsize>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        if let Ok(mut tcp) = tcp_from(src, addr).await {
            open.fetch_add(1, Ordering::Relaxed);
            let mut buf = [0u8; 256];
            while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
            open.fetch_sub(1, Ordering::Relaxed);
        }
        backoff().await;
    }
}

/// Holds one connection open sending garbage: a plausible TLS record header (so the server
/// waits for the record) and then random bytes, a few at a time.
async fn garbage(src: [u8; 4], addr: SocketAddr, open: Arc<AtomicUsize>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        if let Ok(tcp) = tcp_from(src, addr).await {
            open.fetch_add(1, Ordering::Relaxed);
            let (mut rd, mut wr) = tcp.into_split();
            let reader = async {
                let mut buf = [0u8; 256];
                while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
            };
            let writer = async {
                if wr.write_all(&[0x16, 0x03, 0x01, 0x40, 0x00]).await.is_err() {
                    return;
                }
                loop {
                    let mut chunk = [0u8; 16];
                    rand_core::OsRng.fill_bytes(&mut chunk);
                    if wr.write_all(&chunk).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            };
            tokio::select! { _ = reader => {}, _ = writer => {} }
            open.fetch_sub(1, Ordering::Relaxed);
        }
        backoff().await;
    }
}

struct Stats {
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    Stats {
        p50: at(0.50),
        p99: at(0.99),
        max: v[v.len() - 1],
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// `n` renewals, each timed from connect to result; also, per counter in `open`, the fewest
/// and the mean number of attack connections seen open (sampled after each renewal).
async fn joins(
    agent: &mut Agent,
    n: usize,
    open: &[Arc<AtomicUsize>],
) -> (Vec<Duration>, Vec<(usize, usize)>) {
    let mut times = Vec::with_capacity(n);
    let mut seen: Vec<(usize, usize)> = open
        .iter()
        .map(|o| (o.load(Ordering::Relaxed), 0))
        .collect();
    for _ in 0..n {
        let t = Instant::now();
        tokio::time::timeout(Duration::from_secs(60), agent.join())
            .await
            .expect("a join took over 60 s")
            .expect("join");
        times.push(t.elapsed());
        for ((least, sum), o) in seen.iter_mut().zip(open) {
            let now = o.load(Ordering::Relaxed);
            *least = (*least).min(now);
            *sum += now;
        }
    }
    let seen = seen
        .into_iter()
        .map(|(least, sum)| (least, sum / n.max(1)))
        .collect();
    (times, seen)
}

fn main() {
    let is_bench = std::env::args().any(|a| a == "--bench");
    // 1,000 renewals take longer than the first-frame deadline, so the measurement includes
    // the attack connections being dropped and coming back.
    let n = knob("FLOOD_JOINS", 1000, 5, is_bench);
    let extra = std::env::var("FLOOD_AUTHD_ARGS").unwrap_or_default();
    let extra: Vec<&str> = extra.split_whitespace().collect();
    let n_idle = knob("FLOOD_IDLE", 1000, 16, is_bench);
    let n_garbage = knob("FLOOD_GARBAGE", 1000, 16, is_bench);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = Server::start_with(&extra);
        s.ctl(&["bots", "add", "robot"]);
        let mut agent = s.new_device("robot");
        agent.join().await.expect("registration");
        // Warm-up: connection setup paths, SQLite pages, the blocking pool.
        let _ = joins(&mut agent, 10.min(n), &[]).await;

        let (quiet, _) = joins(&mut agent, n, &[]).await;

        let stop = Arc::new(AtomicBool::new(false));
        let idle_open = Arc::new(AtomicUsize::new(0));
        let garbage_open = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..n_idle {
            tasks.push(tokio::spawn(idle(
                source(1, i),
                s.addr,
                idle_open.clone(),
                stop.clone(),
            )));
        }
        for i in 0..n_garbage {
            tasks.push(tokio::spawn(garbage(
                source(2, i),
                s.addr,
                garbage_open.clone(),
                stop.clone(),
            )));
        }
        let ramp = Instant::now();
        while idle_open.load(Ordering::Relaxed) < n_idle
            || garbage_open.load(Ordering::Relaxed) < n_garbage
        {
            assert!(
                ramp.elapsed() < Duration::from_secs(60),
                "attack connections did not all open: idle {} garbage {}",
                idle_open.load(Ordering::Relaxed),
                garbage_open.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (flood, seen) = joins(&mut agent, n, &[idle_open.clone(), garbage_open.clone()]).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.abort();
        }

        let (q, f) = (stats(quiet), stats(flood));
        println!("flood benchmark: {n} renewals each, device on 127.0.0.1");
        println!(
            "  no attack:                 p50 {}  p99 {}  max {}",
            ms(q.p50),
            ms(q.p99),
            ms(q.max)
        );
        println!(
            "  {n_idle} idle + {n_garbage} garbage: p50 {}  p99 {}  max {}",
            ms(f.p50),
            ms(f.p99),
            ms(f.max)
        );
        println!(
            "  attack connections open while measuring: idle mean {} (min {}), \
             garbage mean {} (min {})",
            seen[0].1, seen[0].0, seen[1].1, seen[1].0
        );
        let ratio = f.p99.as_secs_f64() / q.p99.as_secs_f64();
        println!("  p99 ratio (flood / none): {ratio:.2} (goal: at most 2)");
    });
}
