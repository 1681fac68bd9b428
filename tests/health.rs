//! The health endpoint for real: the real `boundkeyd` with `--health-socket` and
//! `--health-listen`, HTTP requests over the Unix socket and TCP, and the Prometheus text
//! checked line by line against the exposition format.
//!
//! Build the auth service first: `cargo build --workspace --bins && cargo test -p boundkey`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use common::*;

/// One request, one response (the endpoint closes the connection): (status, body).
fn get<S: Read + Write>(mut s: S, path: &str) -> (u16, String) {
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .parse()
        .unwrap();
    assert_eq!(len, body.len(), "{raw}");
    (status, body.to_string())
}

fn get_unix(sock: &Path, path: &str) -> (u16, String) {
    get(UnixStream::connect(sock).unwrap(), path)
}

/// A Prometheus sample: metric name, labels, value.
type Sample = (String, HashMap<String, String>, f64);

/// Parses the text exposition format strictly enough to catch malformed output: every sample's
/// family has `# HELP` and `# TYPE` lines before it, names and labels are well formed, values
/// are numbers, and histograms have `_bucket`/`_sum`/`_count` with cumulative buckets.
fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut typed: HashMap<String, String> = HashMap::new();
    let mut helped = HashSet::new();
    let mut samples = Vec::new();
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(valid_name(name), "{line}");
            helped.insert(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["gauge", "counter", "histogram"].contains(&kind), "{line}");
            assert!(
                typed.insert(name.into(), kind.into()).is_none(),
                "repeated {line}"
            );
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => {
                let l = l.strip_suffix('}').unwrap_or_else(|| panic!("{line}"));
                let labels = l
                    .split(',')
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap();
                        assert!(valid_name(k), "{line}");
                        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"'));
                        (
                            k.to_string(),
                            v.unwrap_or_else(|| panic!("{line}")).to_string(),
                        )
                    })
                    .collect();
                (n, labels)
            }
            None => (series, HashMap::new()),
        };
        assert!(valid_name(name), "{line}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| typed.get(*f).map(String::as_str) == Some("histogram"))
            .unwrap_or(name);
        assert!(typed.contains_key(family), "no # TYPE before {line}");
        assert!(helped.contains(family), "no # HELP before {line}");
        samples.push((name.to_string(), labels, value));
    }
    samples
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.2)
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn health_endpoint_serves_liveness_readiness_and_metrics() {
    let auth = AuthServer::start();
    let tok = auth.bot_with_token("watched", &["--recovery-limit", "3"]);
    let d = Device::new();
    let sock = d.path("health.sock");
    let tcp = format!("127.0.0.1:{}", free_tcp_port());
    let mut daemon = d.spawn_daemon(&[
        "--join-uri",
        &tok.join_uri,
        "--renewal-interval",
        "1h",
        "--health-socket",
        sock.to_str().unwrap(),
        "--health-listen",
        &tcp,
    ]);
    wait_for("the health socket", DEADLINE, || {
        UnixStream::connect(&sock).ok().map(|_| ())
    });
    assert_eq!(get_unix(&sock, "/healthz"), (200, "ok\n".into()));
    wait_for("readiness after the first join", DEADLINE, || {
        (get_unix(&sock, "/readyz").0 == 200).then_some(())
    });
    let st = d.status();
    assert_eq!(st["generation"], 1);

    let (code, text) = get_unix(&sock, "/metrics");
    assert_eq!(code, 200);
    let m = parse_prometheus(&text);
    let expires = st["expires_unix"].as_i64().unwrap() as f64;
    assert_eq!(
        value(&m, "boundkeyd_certificate_expiry_timestamp_seconds", &[]),
        Some(expires),
        "{text}"
    );
    assert_eq!(value(&m, "boundkeyd_identity_generation", &[]), Some(1.0));
    assert_eq!(value(&m, "boundkeyd_consecutive_failures", &[]), Some(0.0));
    assert_eq!(value(&m, "boundkeyd_locked", &[]), Some(0.0));
    // What the service says is left: the limit minus what its token record counts (a first
    // join spends one).
    let used = auth.token(&tok.name)["recovery_count"].as_f64().unwrap();
    assert_eq!(used, 1.0);
    assert_eq!(
        value(&m, "boundkeyd_recovery_remaining", &[]),
        Some(3.0 - used),
        "{text}"
    );
    let last = value(&m, "boundkeyd_last_success_timestamp_seconds", &[]).unwrap();
    assert!(last > 0.0 && last <= unix_now() as f64);
    assert_eq!(
        value(
            &m,
            "boundkeyd_keystore_info",
            &[("backend", d.keystore.name())]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            &m,
            "boundkeyd_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    // The first join signed the registration challenge with the bound key.
    let h = "boundkeyd_keystore_operation_duration_seconds";
    let signs = value(&m, &format!("{h}_count"), &[("op", "sign")]).unwrap();
    assert!(signs >= 1.0, "{text}");
    assert_eq!(
        value(
            &m,
            &format!("{h}_bucket"),
            &[("op", "sign"), ("le", "+Inf")]
        ),
        Some(signs)
    );
    let buckets: Vec<f64> = m
        .iter()
        .filter(|(n, l, _)| *n == format!("{h}_bucket") && l["op"] == "sign")
        .map(|s| s.2)
        .collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");

    // A refused renewal shows as a failure and a lock; the identity keeps the daemon ready.
    auth.ctl_json(&["locks", "add", "--bot", "watched", "--message", "audit"]);
    send_signal(&daemon, libc::SIGUSR1);
    let m = wait_for("the refused renewal in /metrics", DEADLINE, || {
        let m = parse_prometheus(&get_unix(&sock, "/metrics").1);
        (value(&m, "boundkeyd_consecutive_failures", &[]) == Some(1.0)).then_some(m)
    });
    assert_eq!(value(&m, "boundkeyd_locked", &[]), Some(1.0));
    assert_eq!(value(&m, "boundkeyd_failures_total", &[]), Some(1.0));
    assert_eq!(get_unix(&sock, "/readyz").0, 200);

    // TCP serves the same; unknown paths, other methods and oversized requests are refused.
    let (code, body) = get(std::net::TcpStream::connect(&tcp).unwrap(), "/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    assert_eq!(get_unix(&sock, "/nope").0, 404);
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"DELETE /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    assert!(r.starts_with("HTTP/1.1 405 "), "{r}");
    let mut s = UnixStream::connect(&sock).unwrap();
    let _ = s.write_all(&vec![b'a'; 8192]);
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
    // A client that never sends a request does not stop others from being served.
    let _idle = UnixStream::connect(&sock).unwrap();
    assert_eq!(get_unix(&sock, "/healthz").0, 200);

    send_signal(&daemon, libc::SIGTERM);
    assert_eq!(wait_exit(&mut daemon, DEADLINE).code(), Some(0));
    assert!(!sock.exists(), "the socket file is removed on exit");
}

#[test]
fn a_health_address_in_use_is_a_clear_start_up_error() {
    let auth = AuthServer::start();
    let tok = auth.bot_with_token("busy", &[]);
    let d = Device::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let o = d
        .start_cmd(&["--join-uri", &tok.join_uri, "--health-listen", &addr])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let line = error_line(&o);
    assert!(
        line.contains("cannot start the health endpoint") && line.contains(&addr),
        "{line}"
    );
}
