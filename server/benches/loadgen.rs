//! Load generator: many simulated devices (software P-256 keys, one process) drive a real
//! `boundkey-authd` over real TLS 1.3 through first joins, renewals and heartbeats, and the
//! result is printed next to the crypto floor measured in the same process and run.
//!
//! `cargo bench -p boundkey-server --bench loadgen --profile server -- --help` lists the knobs.
//! Without `--bench` (e.g. `cargo test -p boundkey-server --benches`) it runs a small version in
//! a few seconds so the code stays exercised. Everything is on loopback (or the address given
//! with `--connect`) and bounded in count.
//!
//! What is measured, per phase: operations/s, latency p50/p99/max (from the moment an operation
//! was due, so a rate-limited phase that falls behind shows it), errors by code, CPU seconds of
//! every authd process (utime + stime from /proc/PID/stat) and of this process, and authd's
//! peak RSS (VmHWM). The floor is the server's share of the cryptography a ceremony cannot do
//! without (docs/performance.md, "What a ceremony must compute"); each phase is printed as
//! `ops/s per authd core × floor time`, i.e. the fraction of a core's time authd spends on
//! that floor. Simulated devices sign with ring, so that the generator takes as little of the
//! shared cores as it can; it still takes a good part (printed).
//!
//! Devices join with pre-registered keys (tokens made through the admin socket); a few join by
//! registration secret, reported apart because the secret's PBKDF2 (100,000 rounds) is slow by
//! design. Renewals are over mTLS with a join state, as the agent does them. Heartbeats are
//! sent with a full handshake each, or (`resume`) with the device keeping its TLS session
//! between heartbeats, as the agent does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use boundkey_auth::authority::{Authority, AuthorityState, IdentityClaims};
use boundkey_auth::UnixTime;
use boundkey_proto::frame::{decode_frame, encode_frame, payload_len};
use boundkey_proto::keys::pkix_b64;
use boundkey_proto::{
    jws, ssh_public_key, BotParams, ChallengeSolution, ClientMessage, ErrorCode, Heartbeat, Init,
    JoinMethod, KeyBackend, RotationResponse, ServerMessage,
};
use boundkey_server::admin::{client as admin, BotsAdd, TokensAdd, SOCKET_NAME};
use clap::Parser;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, HandshakeKind, ServerConfig, ServerConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Mutex;
use tokio_rustls::TlsConnector;

/// One bounded wait for anything the server should answer at once.
const ANSWER_WITHIN: Duration = Duration::from_secs(60);

#[derive(Parser, Debug, Clone)]
#[command(
    name = "loadgen",
    about = "Drives boundkey-authd with simulated devices over real TLS and prints the result \
             next to the crypto floor measured in the same run"
)]
struct Args {
    /// Devices that join with a pre-registered key (one token each).
    #[arg(long, default_value_t = 500)]
    devices: usize,
    /// Further devices that join by registration secret (PBKDF2, reported apart).
    #[arg(long, default_value_t = 20)]
    secret_joins: usize,
    /// Renewals (over mTLS, with join-state verification), spread over the devices.
    #[arg(long, default_value_t = 3000)]
    renewals: usize,
    /// Heartbeats per heartbeat mode, spread over the devices.
    #[arg(long, default_value_t = 20000)]
    heartbeats: usize,
    /// Heartbeat handshakes to measure: full, resume (session kept between heartbeats) or both.
    #[arg(long, default_value = "both")]
    heartbeat_mode: String,
    /// Connections in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Target first joins per second (0: flat out).
    #[arg(long, default_value_t = 0.0)]
    join_rate: f64,
    /// Target renewals per second (0: flat out).
    #[arg(long, default_value_t = 0.0)]
    renew_rate: f64,
    /// Target heartbeats per second (0: flat out).
    #[arg(long, default_value_t = 0.0)]
    heartbeat_rate: f64,
    /// Phases to run, comma-separated: joins, renewals, heartbeats (joins always run when a
    /// later phase needs devices); `floor` alone measures the crypto floor and starts no authd;
    /// `ceiling` alone sends resumed heartbeats to a bare TLS server instead of authd (no
    /// service, no store): the most any server could answer on this machine.
    #[arg(long, default_value = "joins,renewals,heartbeats")]
    phases: String,
    /// authd processes to start, each with its own data directory, sharing one store: the
    /// `--storage` of `--authd-args` if given (e.g. PostgreSQL), else one SQLite file.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Extra boundkey-authd arguments, split on spaces (also LOADGEN_AUTHD_ARGS).
    #[arg(long, env = "LOADGEN_AUTHD_ARGS", default_value = "")]
    authd_args: String,
    /// RUST_LOG for the started authd processes.
    #[arg(long, default_value = "info")]
    authd_log: String,
    /// Drive an authd that is already running instead (repeatable: one per node), e.g. one on
    /// PostgreSQL; needs --ca-file and --data-dir.
    #[arg(long)]
    connect: Vec<SocketAddr>,
    /// With --connect: the TLS CA (DATA_DIR/ca.pem).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// With --connect: a data directory whose admin socket makes the tokens.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// With --connect: authd process ids, for CPU time and RSS (repeatable).
    #[arg(long)]
    authd_pid: Vec<u32>,
    /// Fleet sizes (joined devices) at which authd's RSS is sampled during the join phase,
    /// comma-separated.
    #[arg(long, default_value = "")]
    rss_at: String,
    /// Iterations per crypto-floor measurement.
    #[arg(long, default_value_t = 2000)]
    floor_iters: usize,
    /// Runtime threads of the generator.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Passed by `cargo bench`; without it a small quick version runs.
    #[arg(long, hide = true)]
    bench: bool,
    /// Internal: run as the ceiling server of `--phases ceiling`, with this authority state.
    #[arg(long, hide = true)]
    serve_ceiling: Option<PathBuf>,
}

impl Args {
    /// The quick version `cargo test --benches` runs.
    fn smoke(mut self) -> Args {
        self.devices = self.devices.min(8);
        self.secret_joins = self.secret_joins.min(2);
        self.renewals = self.renewals.min(16);
        self.heartbeats = self.heartbeats.min(32);
        self.concurrency = self.concurrency.min(4);
        self.floor_iters = self.floor_iters.min(20);
        self
    }

    fn phase(&self, name: &str) -> bool {
        self.phases.split(',').any(|p| p.trim() == name)
    }
}

// ---------------------------------------------------------------------------------------------
// The crypto floor.

/// Mean time of one call of `f` over `n` calls (after a short warm-up).
fn time_per(n: usize, mut f: impl FnMut()) -> Duration {
    for _ in 0..n.div_ceil(10) {
        f();
    }
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed() / n.max(1) as u32
}

/// Server and client shares of one TLS handshake between in-memory rustls endpoints.
#[derive(Default, Clone, Copy)]
struct HandshakeCost {
    server: Duration,
    client: Duration,
}

/// Sends what `from` has to send to `to`, adding each side's time; whether anything moved.
fn flight(
    from: &mut rustls::Connection,
    to: &mut rustls::Connection,
    from_time: &mut Duration,
    to_time: &mut Duration,
) -> bool {
    let mut wire = Vec::new();
    let t = Instant::now();
    while from.wants_write() {
        from.write_tls(&mut wire).unwrap();
    }
    *from_time += t.elapsed();
    let t = Instant::now();
    let mut rd = &wire[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).unwrap();
        to.process_new_packets().unwrap();
    }
    *to_time += t.elapsed();
    !wire.is_empty()
}

/// One handshake between in-memory endpoints (tickets included); whether it resumed.
fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> (HandshakeCost, bool) {
    let mut cost = HandshakeCost::default();
    let name = ServerName::try_from("localhost").unwrap();
    let t = Instant::now();
    let mut c = rustls::Connection::from(ClientConnection::new(client, name).unwrap());
    cost.client += t.elapsed();
    let t = Instant::now();
    let mut s = rustls::Connection::from(ServerConnection::new(server).unwrap());
    cost.server += t.elapsed();
    loop {
        let sent = flight(&mut c, &mut s, &mut cost.client, &mut cost.server);
        let answered = flight(&mut s, &mut c, &mut cost.server, &mut cost.client);
        if !sent && !answered && !c.is_handshaking() && !s.is_handshaking() {
            break;
        }
    }
    let resumed = s.handshake_kind() == Some(HandshakeKind::Resumed);
    (cost, resumed)
}

fn mean_handshake(n: usize, mut f: impl FnMut() -> HandshakeCost) -> HandshakeCost {
    let mut sum = HandshakeCost::default();
    for _ in 0..n.div_ceil(10) {
        f();
    }
    for _ in 0..n {
        let c = f();
        sum.server += c.server;
        sum.client += c.client;
    }
    HandshakeCost {
        server: sum.server / n.max(1) as u32,
        client: sum.client / n.max(1) as u32,
    }
}

/// The floor's parts, each the time of one operation on this machine, in this run.
struct Floor {
    ring_sign: Duration,
    ring_verify: Duration,
    p256_sign: Duration,
    p256_verify: Duration,
    x25519: Duration,
    p256_ecdhe: Duration,
    pbkdf2: Duration,
    tls_anon: HandshakeCost,
    tls_mtls: HandshakeCost,
    tls_resumed: HandshakeCost,
}

impl Floor {
    /// The server's unavoidable cryptography per operation (docs/performance.md).
    fn renewal(&self) -> Duration {
        self.tls_mtls.server + 3 * self.ring_verify + 2 * self.ring_sign
    }
    fn first_join(&self) -> Duration {
        self.tls_anon.server + 2 * self.ring_verify + 2 * self.ring_sign
    }
    fn secret_join(&self) -> Duration {
        self.first_join() + self.pbkdf2
    }
    fn heartbeat_full(&self) -> Duration {
        self.tls_mtls.server
    }
    fn heartbeat_resumed(&self) -> Duration {
        self.tls_resumed.server
    }

    fn measure(iters: usize) -> Floor {
        let rng = SystemRandom::new();
        let msg = [0x5au8; 300]; // about a challenge's JWS signing input
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let sig = pair.sign(&rng, &msg).unwrap();
        let public = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            pair.public_key().as_ref().to_vec(),
        );
        let ring_sign = time_per(iters, || {
            std::hint::black_box(pair.sign(&rng, &msg).unwrap());
        });
        let ring_verify = time_per(iters, || {
            public.verify(&msg, sig.as_ref()).unwrap();
        });

        use p256::ecdsa::signature::{Signer, Verifier};
        let sk = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng);
        let vk = *sk.verifying_key();
        let psig: p256::ecdsa::Signature = sk.sign(&msg);
        let p256_sign = time_per(iters, || {
            let s: p256::ecdsa::Signature = sk.sign(&msg);
            std::hint::black_box(s);
        });
        let p256_verify = time_per(iters, || {
            vk.verify(&msg, &psig).unwrap();
        });

        use ring::agreement;
        let ecdhe = |alg: &'static agreement::Algorithm| {
            let peer = agreement::EphemeralPrivateKey::generate(alg, &rng).unwrap();
            let peer_pub = peer.compute_public_key().unwrap().as_ref().to_vec();
            time_per(iters, || {
                let mine = agreement::EphemeralPrivateKey::generate(alg, &rng).unwrap();
                std::hint::black_box(mine.compute_public_key().unwrap());
                let theirs = agreement::UnparsedPublicKey::new(alg, &peer_pub);
                agreement::agree_ephemeral(mine, &theirs, |k| std::hint::black_box(k.len()))
                    .unwrap();
            })
        };
        let x25519 = ecdhe(&agreement::X25519);
        let p256_ecdhe = ecdhe(&agreement::ECDH_P256);

        let pbkdf2 = time_per(iters.div_ceil(100).max(3), || {
            let mut out = [0u8; 32];
            ring::pbkdf2::derive(
                ring::pbkdf2::PBKDF2_HMAC_SHA256,
                std::num::NonZeroU32::new(100_000).unwrap(),
                b"0123456789abcdef",
                b"a registration secret",
                &mut out,
            );
        });

        // The listener's own TLS configuration (server/src/tls.rs) and an identity certificate
        // from the same authority, as a renewing device presents it.
        let now = boundkey_server::now();
        let state = AuthorityState::generate("floor", now).unwrap();
        let authority = Authority::load(&state).unwrap();
        let server = listener_tls(&authority, now);
        let id = DeviceKey::generate(&rng);
        let cert = device_certificate(&authority, "floor", 0, &id, now);
        let ca_pem = authority.tls_ca_pem().to_string();
        let anon = ceremony_config(&ca_pem, None);
        let mtls = ceremony_config(&ca_pem, Some((&cert, &id)));
        let resuming = heartbeat_config(&ca_pem, &cert, &id);
        let hs_iters = iters.div_ceil(4).max(3);
        let tls_anon = mean_handshake(hs_iters, || handshake(anon.clone(), server.clone()).0);
        let tls_mtls = mean_handshake(hs_iters, || handshake(mtls.clone(), server.clone()).0);
        // The first handshake leaves a ticket; every later one resumes (and gets a new ticket).
        let (_, resumed) = handshake(resuming.clone(), server.clone());
        assert!(!resumed, "the first handshake cannot resume");
        let tls_resumed = mean_handshake(hs_iters, || {
            let (c, resumed) = handshake(resuming.clone(), server.clone());
            assert!(
                resumed,
                "the listener's configuration did not resume a session"
            );
            c
        });
        Floor {
            ring_sign,
            ring_verify,
            p256_sign,
            p256_verify,
            x25519,
            p256_ecdhe,
            pbkdf2,
            tls_anon,
            tls_mtls,
            tls_resumed,
        }
    }

    fn print(&self) {
        println!("crypto floor (this process, this run; mean per operation):");
        let row = |what: &str, d: Duration| println!("  {what:<52} {}", us(d));
        row("ECDSA P-256 sign, ring", self.ring_sign);
        row("ECDSA P-256 verify, ring", self.ring_verify);
        row("ECDSA P-256 sign, p256", self.p256_sign);
        row("ECDSA P-256 verify, p256", self.p256_verify);
        row("ECDHE X25519 (keygen + agree), ring", self.x25519);
        row("ECDHE P-256 (keygen + agree), ring", self.p256_ecdhe);
        row("PBKDF2-HMAC-SHA256 100,000 rounds, ring", self.pbkdf2);
        let hs = |what: &str, c: HandshakeCost| {
            println!(
                "  {what:<52} {} (server {}, client {})",
                us(c.server + c.client),
                us(c.server),
                us(c.client)
            )
        };
        hs("TLS 1.3 handshake, no client certificate", self.tls_anon);
        hs("TLS 1.3 handshake, client certificate", self.tls_mtls);
        hs("TLS 1.3 handshake, resumed (PSK + ECDHE)", self.tls_resumed);
        println!("  server floor per operation:");
        row(
            "  first join = handshake + 2 verify + 2 sign",
            self.first_join(),
        );
        row(
            "  first join by secret = first join + PBKDF2",
            self.secret_join(),
        );
        row(
            "  renewal = mTLS handshake + 3 verify + 2 sign",
            self.renewal(),
        );
        row("  heartbeat, full = mTLS handshake", self.heartbeat_full());
        row(
            "  heartbeat, resumed = resumed handshake",
            self.heartbeat_resumed(),
        );
    }
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

// ---------------------------------------------------------------------------------------------
// Simulated devices.

/// A software P-256 key, signing with ring.
struct DeviceKey {
    pkcs8: Vec<u8>,
    pair: EcdsaKeyPair,
}

impl DeviceKey {
    fn generate(rng: &SystemRandom) -> DeviceKey {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, rng)
            .unwrap()
            .as_ref()
            .to_vec();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, rng).unwrap();
        DeviceKey { pkcs8, pair }
    }

    fn p256_public(&self) -> p256::PublicKey {
        p256::PublicKey::from_sec1_bytes(self.pair.public_key().as_ref()).unwrap()
    }

    fn ssh(&self) -> String {
        ssh_public_key(&self.p256_public())
    }

    /// A compact ES256 JWS over `payload` (low-S, as the agent signs).
    fn sign_jws(&self, rng: &SystemRandom, payload: &[u8]) -> String {
        let input = jws::signing_input(None, payload);
        let sig = self.pair.sign(rng, input.as_bytes()).unwrap();
        let sig = p256::ecdsa::Signature::from_slice(sig.as_ref()).unwrap();
        let sig = sig.normalize_s().unwrap_or(sig);
        jws::assemble(&input, &sig.to_bytes().into())
    }
}

fn tls13(ca_pem: &str) -> rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    ClientConfig::builder_with_provider(boundkey_server::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
}

fn with_identity(
    b: rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>,
    cert_pem: &str,
    key: &DeviceKey,
) -> ClientConfig {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.pkcs8.clone()));
    b.with_client_auth_cert(chain, key).unwrap()
}

/// A ceremony's configuration: full handshakes only, as the agent's ceremonies.
fn ceremony_config(ca_pem: &str, identity: Option<(&str, &DeviceKey)>) -> Arc<ClientConfig> {
    let b = tls13(ca_pem);
    let mut c = match identity {
        Some((cert, key)) => with_identity(b, cert, key),
        None => b.with_no_client_auth(),
    };
    c.resumption = Resumption::disabled();
    Arc::new(c)
}

/// A heartbeat configuration that keeps the session for the next heartbeat.
fn heartbeat_config(ca_pem: &str, cert_pem: &str, key: &DeviceKey) -> Arc<ClientConfig> {
    let mut c = with_identity(tls13(ca_pem), cert_pem, key);
    c.resumption = Resumption::in_memory_sessions(1);
    Arc::new(c)
}

struct Device {
    token: String,
    /// The bound key; None until a registration binds one.
    bound: Option<DeviceKey>,
    secret: Option<String>,
    identity: DeviceKey,
    identity_b64: String,
    join_state: Option<String>,
    mtls: Option<Arc<ClientConfig>>,
    heartbeat: Option<Arc<ClientConfig>>,
}

/// Why one operation failed, as counted in the report.
#[derive(Debug)]
enum Failure {
    Refused(ErrorCode),
    Connect(std::io::ErrorKind),
    Tls(String),
    Io(std::io::ErrorKind),
    Unexpected(&'static str),
    Timeout,
}

impl Failure {
    fn label(&self) -> String {
        match self {
            Failure::Refused(c) => c.as_str().to_string(),
            Failure::Connect(k) => format!("connect: {k:?}"),
            Failure::Tls(e) => format!("tls: {e}"),
            Failure::Io(k) => format!("io: {k:?}"),
            Failure::Unexpected(m) => format!("unexpected {m}"),
            Failure::Timeout => "timeout (client)".into(),
        }
    }
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// Where connections go, and from which loopback source address each worker connects (so that
/// authd's per-address caps see many devices, as they would in a fleet, rather than one).
#[derive(Clone)]
struct Target {
    addrs: Vec<SocketAddr>,
    ca_pem: String,
}

async fn connect(
    target: &Target,
    worker: usize,
    n: usize,
    cfg: Arc<ClientConfig>,
) -> Result<(Tls, bool), Failure> {
    let addr = target.addrs[n % target.addrs.len()];
    let tcp = match addr.ip() {
        IpAddr::V4(v4) if v4.is_loopback() => {
            let sock = TcpSocket::new_v4().map_err(|e| Failure::Connect(e.kind()))?;
            let src = [127, 0, 3 + (worker / 250) as u8, 1 + (worker % 250) as u8];
            sock.bind(SocketAddr::from((src, 0)))
                .map_err(|e| Failure::Connect(e.kind()))?;
            sock.connect(addr).await
        }
        _ => TcpStream::connect(addr).await,
    }
    .map_err(|e| Failure::Connect(e.kind()))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from("localhost").unwrap();
    let tls = TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| Failure::Tls(e.to_string()))?;
    let resumed = tls.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
    Ok((tls, resumed))
}

async fn send(tls: &mut Tls, msg: &ClientMessage) -> Result<(), Failure> {
    let f = encode_frame(msg).unwrap();
    tls.write_all(&f).await.map_err(|e| Failure::Io(e.kind()))?;
    tls.flush().await.map_err(|e| Failure::Io(e.kind()))
}

async fn recv(tls: &mut Tls) -> Result<ServerMessage, Failure> {
    let read = async {
        let mut header = [0u8; 4];
        tls.read_exact(&mut header)
            .await
            .map_err(|e| Failure::Io(e.kind()))?;
        let len = payload_len(header).map_err(|_| Failure::Unexpected("frame length"))?;
        let mut payload = vec![0u8; len];
        tls.read_exact(&mut payload)
            .await
            .map_err(|e| Failure::Io(e.kind()))?;
        decode_frame(&payload).map_err(|_| Failure::Unexpected("frame"))
    };
    tokio::time::timeout(ANSWER_WITHIN, read)
        .await
        .map_err(|_| Failure::Timeout)?
}

/// One bound-keypair ceremony: first join, by registration or pre-registered key, or renewal.
async fn ceremony(
    target: &Target,
    worker: usize,
    n: usize,
    d: &mut Device,
    rng: &SystemRandom,
) -> Result<(), Failure> {
    let cfg = match &d.mtls {
        Some(c) => c.clone(),
        None => ceremony_config(&target.ca_pem, None),
    };
    let (mut tls, _) = connect(target, worker, n, cfg).await?;
    send(
        &mut tls,
        &ClientMessage::Init(Init {
            token: d.token.clone(),
            params: BotParams {
                identity_public_key: d.identity_b64.clone(),
                ttl_secs: 3600,
            },
            registration_secret: if d.bound.is_none() {
                d.secret.clone()
            } else {
                None
            },
            join_state: d.join_state.clone(),
        }),
    )
    .await?;
    let mut pending: Option<DeviceKey> = None;
    loop {
        match recv(&mut tls).await? {
            ServerMessage::RotationRequest(_) => {
                let k = DeviceKey::generate(rng);
                let public_key = k.ssh();
                pending = Some(k);
                send(
                    &mut tls,
                    &ClientMessage::RotationResponse(RotationResponse { public_key }),
                )
                .await?;
            }
            ServerMessage::Challenge(c) => {
                let key = match (&pending, &d.bound) {
                    (Some(p), _) if p.ssh() == c.public_key => p,
                    (_, Some(b)) => b,
                    _ => return Err(Failure::Unexpected("challenge for an unknown key")),
                };
                let solution = key.sign_jws(rng, c.document.as_bytes());
                let identity_proof = Some(d.identity.sign_jws(rng, c.document.as_bytes()));
                send(
                    &mut tls,
                    &ClientMessage::ChallengeSolution(ChallengeSolution {
                        solution,
                        identity_proof,
                        attestation: None,
                    }),
                )
                .await?;
            }
            ServerMessage::Result(r) => {
                if let Some(p) = pending.take() {
                    d.bound = Some(p);
                    d.secret = None;
                }
                d.join_state = r.join_state.clone().or(d.join_state.take());
                d.mtls = Some(ceremony_config(
                    &target.ca_pem,
                    Some((&r.certificate, &d.identity)),
                ));
                d.heartbeat = Some(heartbeat_config(
                    &target.ca_pem,
                    &r.certificate,
                    &d.identity,
                ));
                let _ = tokio::time::timeout(Duration::from_secs(2), tls.shutdown()).await;
                return Ok(());
            }
            ServerMessage::Error(e) => return Err(Failure::Refused(e.code)),
            ServerMessage::HeartbeatAck(_) => return Err(Failure::Unexpected("heartbeat_ack")),
            // Simulated devices hold software keys: tokens here never require attestation.
            ServerMessage::ActivateCredential(_) => {
                return Err(Failure::Unexpected("activate_credential"))
            }
        }
    }
}

/// One heartbeat; returns whether the TLS session was resumed.
async fn heartbeat(
    target: &Target,
    worker: usize,
    n: usize,
    d: &Device,
    resume: bool,
    started: Instant,
) -> Result<bool, Failure> {
    let cfg = if resume { &d.heartbeat } else { &d.mtls };
    let Some(cfg) = cfg.clone() else {
        return Err(Failure::Unexpected("heartbeat before a join"));
    };
    let (mut tls, resumed) = connect(target, worker, n, cfg).await?;
    send(
        &mut tls,
        &ClientMessage::Heartbeat(Heartbeat {
            is_startup: false,
            version: "loadgen".into(),
            hostname: format!("device-{n}"),
            uptime_secs: started.elapsed().as_secs(),
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            one_shot: false,
            keystore: KeyBackend::File,
        }),
    )
    .await?;
    let reply = recv(&mut tls).await?;
    let _ = tokio::time::timeout(Duration::from_secs(2), tls.shutdown()).await;
    match reply {
        ServerMessage::HeartbeatAck(_) => Ok(resumed),
        ServerMessage::Error(e) => Err(Failure::Refused(e.code)),
        _ => Err(Failure::Unexpected("reply to a heartbeat")),
    }
}

// ---------------------------------------------------------------------------------------------
// Measuring authd (and ourselves) from /proc.

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process, in seconds (`self` for this process).
fn cpu_secs(pid: &str, ticks: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces; the fields after it are fixed.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    (field(11) + field(12)) / ticks
}

/// (VmRSS, VmHWM) in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

#[derive(Clone, Copy)]
struct CpuMark {
    at: Instant,
    authd: f64,
    me: f64,
}

struct Probe {
    pids: Vec<u32>,
    ticks: f64,
}

impl Probe {
    fn mark(&self) -> CpuMark {
        CpuMark {
            at: Instant::now(),
            authd: self
                .pids
                .iter()
                .map(|p| cpu_secs(&p.to_string(), self.ticks))
                .sum(),
            me: cpu_secs("self", self.ticks),
        }
    }

    fn rss(&self) -> String {
        self.pids
            .iter()
            .map(|p| {
                let (rss, hwm) = rss_kib(*p);
                format!("RSS {rss} KiB (peak {hwm} KiB)")
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

// ---------------------------------------------------------------------------------------------
// Phases.

struct PhaseResult {
    name: String,
    ok: usize,
    /// Latency from the moment each operation was due.
    latencies: Vec<Duration>,
    errors: BTreeMap<String, usize>,
    resumed: usize,
    wall: f64,
    authd_cpu: f64,
    my_cpu: f64,
}

impl PhaseResult {
    /// Prints the phase; in the quick version (a test) every operation must have succeeded.
    fn report(&self, floor: Duration, cores: usize, rss: &str, args: &Args) {
        self.print(floor, cores, rss);
        if !args.bench {
            assert!(
                self.errors.is_empty(),
                "{}: errors {:?}",
                self.name,
                self.errors
            );
        }
    }

    fn print(&self, floor: Duration, cores: usize, rss: &str) {
        let rate = self.ok as f64 / self.wall;
        println!("{}:", self.name);
        let mut v = self.latencies.clone();
        v.sort();
        let at = |q: f64| {
            if v.is_empty() {
                Duration::ZERO
            } else {
                v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
            }
        };
        println!(
            "  {} ok in {:.2} s: {:.0}/s; latency p50 {} p99 {} max {}",
            self.ok,
            self.wall,
            rate,
            ms(at(0.5)),
            ms(at(0.99)),
            ms(v.last().copied().unwrap_or_default())
        );
        if self.resumed > 0 {
            println!("  resumed TLS sessions: {} of {}", self.resumed, self.ok);
        }
        if self.errors.is_empty() {
            println!("  errors: none");
        } else {
            let e: Vec<String> = self
                .errors
                .iter()
                .map(|(k, n)| format!("{k} ×{n}"))
                .collect();
            println!("  errors: {}", e.join(", "));
        }
        let authd_cores = self.authd_cpu / self.wall;
        println!(
            "  CPU: authd {:.2} s ({:.2} cores, {} per op), generator {:.2} s ({:.2} cores); \
             authd {rss}",
            self.authd_cpu,
            authd_cores,
            ms(Duration::from_secs_f64(
                self.authd_cpu / (self.ok.max(1) as f64)
            )),
            self.my_cpu,
            self.my_cpu / self.wall
        );
        let f = floor.as_secs_f64();
        let per_authd_core = if authd_cores > 0.0 {
            rate / authd_cores
        } else {
            0.0
        };
        println!(
            "  floor {} per op: {:.0}/s per core at the floor; achieved {:.0}/s per authd core \
             = {:.2} of the floor ({:.2} per machine core, {cores} cores shared with the generator)",
            us(floor),
            1.0 / f,
            per_authd_core,
            per_authd_core * f,
            rate / cores as f64 * f
        );
    }
}

/// Runs `total` operations with `concurrency` workers, at `rate` per second (0: flat out).
/// Operation `i` goes to device `i % devices.len()`; a device is used by one worker at a time.
async fn phase<F>(
    name: &str,
    devices: &[Arc<Mutex<Device>>],
    total: usize,
    concurrency: usize,
    rate: f64,
    probe: &Probe,
    op: F,
) -> PhaseResult
where
    F: Fn(usize, usize, Arc<Mutex<Device>>) -> BoxFuture<Result<bool, Failure>>
        + Send
        + Sync
        + 'static,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(StdMutex::new((
        Vec::with_capacity(total),
        BTreeMap::<String, usize>::new(),
        0usize,
    )));
    let devices: Arc<[Arc<Mutex<Device>>]> = devices.into();
    let before = probe.mark();
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency.max(1) {
        let (op, next, results) = (op.clone(), next.clone(), results.clone());
        let devices = devices.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let due = if rate > 0.0 {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due).await;
                    due
                } else {
                    tokio::time::Instant::now()
                };
                let d = devices[i % devices.len()].clone();
                let r = op(w, i, d).await;
                let took = due.elapsed();
                let mut g = results.lock().unwrap();
                match r {
                    Ok(resumed) => {
                        g.0.push(took);
                        g.2 += usize::from(resumed);
                    }
                    Err(e) => *g.1.entry(e.label()).or_default() += 1,
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let after = probe.mark();
    let (latencies, errors, resumed) = std::mem::take(&mut *results.lock().unwrap());
    PhaseResult {
        name: name.to_string(),
        ok: latencies.len(),
        latencies,
        errors,
        resumed,
        wall: after.at.duration_since(before.at).as_secs_f64(),
        authd_cpu: after.authd - before.authd,
        my_cpu: after.me - before.me,
    }
}

/// One operation of a phase, boxed (without a futures crate).
type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// Makes `n` tokens through the admin socket (blocking calls, on the blocking pool).
async fn make_tokens(
    socket: PathBuf,
    bot: &str,
    keys: Vec<Option<String>>,
) -> Vec<(String, Option<String>)> {
    let bot = bot.to_string();
    tokio::task::spawn_blocking(move || {
        keys.into_iter()
            .map(|initial_public_key| {
                let created = admin::call(
                    &socket,
                    TokensAdd {
                        bot: bot.clone(),
                        join_method: Some(JoinMethod::BoundKeypair),
                        initial_public_key,
                        ..Default::default()
                    },
                )
                .expect("tokens add");
                let secret = match created.credential {
                    boundkey_server::admin::views::NewCredential::BoundKeypair {
                        registration_secret,
                        ..
                    } => registration_secret,
                    _ => None,
                };
                (created.name, secret)
            })
            .collect()
    })
    .await
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The ceiling: heartbeats against a server that does nothing a heartbeat could do without.

/// The listener's own TLS configuration (server/src/tls.rs) for `authority`.
fn listener_tls(authority: &Authority, now: UnixTime) -> Arc<ServerConfig> {
    let provider = boundkey_server::tls::provider();
    let verifier =
        boundkey_server::tls::ReloadableClientVerifier::new(provider.clone(), authority, now)
            .unwrap();
    boundkey_server::tls::server_config(
        provider,
        authority,
        &["localhost".to_string()],
        verifier,
        now,
    )
    .unwrap()
}

/// An identity certificate (PEM) from `authority` for device `n`'s key, as a renewing device
/// presents it.
fn device_certificate(
    authority: &Authority,
    cluster: &str,
    n: usize,
    key: &DeviceKey,
    now: UnixTime,
) -> String {
    authority
        .issue_identity(
            &IdentityClaims {
                cluster: cluster.into(),
                bot_name: cluster.into(),
                instance_id: format!("00000000-0000-4000-8000-{n:012}"),
                generation: 1,
                join_method: JoinMethod::BoundKeypair,
                join_token: cluster.into(),
            },
            &key.p256_public(),
            3600,
            now,
        )
        .unwrap()
        .certificate_pem
}

/// A heartbeat phase: `args.heartbeats` heartbeats spread over `devices`, each resuming its
/// device's session or not, at `args.heartbeat_rate`.
async fn heartbeat_phase(
    name: &str,
    devices: &[Arc<Mutex<Device>>],
    target: Target,
    resume: bool,
    started: Instant,
    args: &Args,
    probe: &Probe,
) -> PhaseResult {
    let op = move |w: usize, i: usize, d: Arc<Mutex<Device>>| {
        let target = target.clone();
        Box::pin(async move {
            let d = d.lock().await;
            heartbeat(&target, w, i, &d, resume, started).await
        }) as BoxFuture<_>
    };
    let (total, rate) = (args.heartbeats, args.heartbeat_rate);
    phase(name, devices, total, args.concurrency, rate, probe, op).await
}

/// Runs this process as a bare heartbeat server: the listener's TLS configuration
/// (`server/src/tls.rs`) and its shape (accepts on one thread, connections on per-core
/// [`Workers`](boundkey_server::workers::Workers)), answering each first frame with
/// `heartbeat_ack`. No service, no store, no second certificate check: TCP, the TLS
/// handshake and one frame each way. Prints its address, then serves until killed.
fn serve_ceiling(state_file: &std::path::Path) {
    let state: AuthorityState =
        serde_json::from_slice(&std::fs::read(state_file).unwrap()).unwrap();
    let authority = Authority::load(&state).unwrap();
    let config = listener_tls(&authority, boundkey_server::now());
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let workers = boundkey_server::workers::Workers::per_core().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap());
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let Ok(tcp) = tcp.into_std() else {
                continue;
            };
            let acceptor = acceptor.clone();
            workers.spawn(async move {
                let Ok(tcp) = TcpStream::from_std(tcp) else {
                    return;
                };
                let _ = tcp.set_nodelay(true);
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut header = [0u8; 4];
                if tls.read_exact(&mut header).await.is_err() {
                    return;
                }
                let Ok(len) = payload_len(header) else {
                    return;
                };
                let mut payload = vec![0u8; len];
                if tls.read_exact(&mut payload).await.is_err()
                    || decode_frame::<ClientMessage>(&payload).is_err()
                {
                    return;
                }
                let ack = encode_frame(&ServerMessage::HeartbeatAck(Default::default())).unwrap();
                let _ = tls.write_all(&ack).await;
                let _ = tls.flush().await;
                let _ = tls.shutdown().await;
            });
        }
    });
}

/// `--phases ceiling`: resumed heartbeats from `--devices` devices against [`serve_ceiling`]
/// in a child process, measured as authd is (its CPU from /proc, next to the same floor).
async fn ceiling(args: &Args) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let floor = Floor::measure(args.floor_iters);
    floor.print();
    let now = boundkey_server::now();
    let state = AuthorityState::generate("ceiling", now).unwrap();
    let authority = Authority::load(&state).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("authority.json");
    std::fs::write(&state_file, serde_json::to_vec(&state).unwrap()).unwrap();
    let mut child = CeilingServer(
        std::process::Command::new(std::env::current_exe().unwrap())
            .arg("--serve-ceiling")
            .arg(&state_file)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.0.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let target = Target {
        addrs: vec![line.trim().parse().unwrap()],
        ca_pem: authority.tls_ca_pem().to_string(),
    };
    let probe = Probe {
        pids: vec![child.0.id()],
        ticks: clock_ticks(),
    };
    let rng = SystemRandom::new();
    let devices: Vec<_> = (0..args.devices.max(1))
        .map(|n| {
            let identity = DeviceKey::generate(&rng);
            let cert = device_certificate(&authority, "ceiling", n, &identity, now);
            let heartbeat = heartbeat_config(&target.ca_pem, &cert, &identity);
            Arc::new(Mutex::new(Device {
                token: String::new(),
                bound: None,
                secret: None,
                identity_b64: String::new(),
                identity,
                join_state: None,
                mtls: None,
                heartbeat: Some(heartbeat),
            }))
        })
        .collect();
    println!(
        "ceiling: a bare TLS heartbeat server (pid {}) at {}, {} devices, concurrency {}, {cores} cores",
        child.0.id(),
        target.addrs[0],
        devices.len(),
        args.concurrency
    );
    let r = heartbeat_phase(
        "heartbeats against the bare TLS server (session resumed between heartbeats)",
        &devices,
        target,
        true,
        Instant::now(),
        args,
        &probe,
    )
    .await;
    r.report(floor.heartbeat_resumed(), cores, &probe.rss(), args);
}

/// The ceiling's server process, stopped when dropped (a failed check too): left running it
/// would hold the test's output pipes open, and the test would never end.
struct CeilingServer(std::process::Child);

impl Drop for CeilingServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let mut args = Args::parse();
    if let Some(state) = &args.serve_ceiling {
        return serve_ceiling(state);
    }
    let smoke = !args.bench;
    if smoke {
        args = args.smoke();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .unwrap();
    if smoke && args.phase("heartbeats") {
        // The quick version (`cargo test --benches`) checks the ceiling's server works too.
        rt.block_on(ceiling(&args));
    }
    rt.block_on(run(args));
}

async fn run(args: Args) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if args.phases.trim() == "floor" {
        return Floor::measure(args.floor_iters).print();
    }
    if args.phases.trim() == "ceiling" {
        return ceiling(&args).await;
    }
    let extra: Vec<String> = args
        .authd_args
        .split_whitespace()
        .map(String::from)
        .collect();

    // The servers: started here (sharing one SQLite file when there are several), or given.
    // Declared before the servers, so it is removed after they stopped.
    let shared = tempfile::tempdir().unwrap();
    let mut servers = Vec::new();
    let (target, socket, pids) = if args.connect.is_empty() {
        let storage = format!("sqlite:{}", shared.path().join("boundkey.db").display());
        for _ in 0..args.nodes.max(1) {
            let mut a: Vec<&str> = extra.iter().map(String::as_str).collect();
            // Several nodes share a store: the one given (`--authd-args "--storage
            // postgres://…"`, password from PGPASSWORD), else one SQLite file.
            if args.nodes > 1 && !extra.iter().any(|x| x == "--storage") {
                a.extend(["--storage", storage.as_str()]);
            }
            let dir = tempfile::tempdir().unwrap();
            let data_dir = dir.path().join("data");
            servers.push(common::Server::start_logging(
                dir,
                data_dir,
                &a,
                &args.authd_log,
            ));
        }
        let target = Target {
            addrs: servers.iter().map(|s| s.addr).collect(),
            ca_pem: servers[0].ca_pem.clone(),
        };
        let socket = servers[0].data_dir.join(SOCKET_NAME);
        let pids = servers.iter().map(|s| s.pid()).collect();
        (target, socket, pids)
    } else {
        let ca = args.ca_file.clone().expect("--connect needs --ca-file");
        let dir = args.data_dir.clone().expect("--connect needs --data-dir");
        let target = Target {
            addrs: args.connect.clone(),
            ca_pem: std::fs::read_to_string(ca).expect("read --ca-file"),
        };
        (target, dir.join(SOCKET_NAME), args.authd_pid.clone())
    };
    let probe = Probe {
        pids,
        ticks: clock_ticks(),
    };
    println!(
        "loadgen: {} authd node(s) at {:?}, {} pre-registered + {} secret devices, concurrency {}, \
         {cores} cores",
        target.addrs.len(),
        target.addrs,
        args.devices,
        args.secret_joins,
        args.concurrency
    );
    println!("authd at start: {}", probe.rss());

    let floor = Floor::measure(args.floor_iters);
    floor.print();

    // Devices and their tokens.
    let rng = SystemRandom::new();
    let bot = format!("loadgen-{}", std::process::id());
    admin::call(&socket, BotsAdd { name: bot.clone() }).expect("bots add");
    let t = Instant::now();
    let bound: Vec<DeviceKey> = (0..args.devices)
        .map(|_| DeviceKey::generate(&rng))
        .collect();
    let mut keys: Vec<Option<String>> = bound.iter().map(|k| Some(k.ssh())).collect();
    keys.extend((0..args.secret_joins).map(|_| None));
    let tokens = make_tokens(socket.clone(), &bot, keys).await;
    println!(
        "setup: {} tokens through the admin socket in {:.1} s",
        tokens.len(),
        t.elapsed().as_secs_f64()
    );
    let mut bound = bound.into_iter();
    let mut devices = Vec::new();
    let mut secret_devices = Vec::new();
    for (token, secret) in tokens {
        let identity = DeviceKey::generate(&rng);
        let d = Device {
            token,
            bound: if secret.is_none() { bound.next() } else { None },
            secret: secret.clone(),
            identity_b64: pkix_b64(&identity.p256_public()),
            identity,
            join_state: None,
            mtls: None,
            heartbeat: None,
        };
        let d = Arc::new(Mutex::new(d));
        if secret.is_some() {
            secret_devices.push(d);
        } else {
            devices.push(d);
        }
    }

    let ceremony_op = {
        let target = target.clone();
        move |w: usize, i: usize, d: Arc<Mutex<Device>>| {
            let target = target.clone();
            Box::pin(async move {
                let rng = SystemRandom::new();
                let mut d = d.lock().await;
                ceremony(&target, w, i, &mut d, &rng).await.map(|_| false)
            }) as BoxFuture<_>
        }
    };

    // First joins, with RSS samples at the requested fleet sizes.
    let checkpoints: Vec<usize> = args
        .rss_at
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .filter(|&n| n <= devices.len())
        .collect();
    let mut bounds = checkpoints.clone();
    bounds.push(devices.len());
    let mut from = 0;
    let mut joins: Option<PhaseResult> = None;
    for upto in bounds {
        if upto <= from {
            continue;
        }
        let r = phase(
            "first joins (pre-registered key)",
            &devices[from..upto],
            upto - from,
            args.concurrency,
            args.join_rate,
            &probe,
            ceremony_op.clone(),
        )
        .await;
        if checkpoints.contains(&upto) {
            println!("fleet {upto} joined: authd {}", probe.rss());
        }
        joins = Some(match joins {
            None => r,
            Some(mut j) => {
                j.ok += r.ok;
                j.latencies.extend(r.latencies);
                for (k, n) in r.errors {
                    *j.errors.entry(k).or_default() += n;
                }
                j.wall += r.wall;
                j.authd_cpu += r.authd_cpu;
                j.my_cpu += r.my_cpu;
                j
            }
        });
        from = upto;
    }
    if let Some(j) = joins {
        j.report(floor.first_join(), cores, &probe.rss(), &args);
    }
    if !secret_devices.is_empty() {
        let r = phase(
            "first joins (registration secret)",
            &secret_devices,
            secret_devices.len(),
            args.concurrency,
            args.join_rate,
            &probe,
            ceremony_op.clone(),
        )
        .await;
        r.report(floor.secret_join(), cores, &probe.rss(), &args);
    }
    if devices.is_empty() {
        return;
    }

    if args.phase("renewals") && args.renewals > 0 {
        let r = phase(
            "renewals (mTLS, join state verified)",
            &devices,
            args.renewals,
            args.concurrency,
            args.renew_rate,
            &probe,
            ceremony_op.clone(),
        )
        .await;
        r.report(floor.renewal(), cores, &probe.rss(), &args);
    }

    if args.phase("heartbeats") && args.heartbeats > 0 {
        let modes: &[bool] = match args.heartbeat_mode.as_str() {
            "full" => &[false],
            "resume" => &[true],
            _ => &[false, true],
        };
        let started = Instant::now();
        for &resume in modes {
            let (name, f) = if resume {
                (
                    "heartbeats (session resumed between heartbeats)",
                    floor.heartbeat_resumed(),
                )
            } else {
                (
                    "heartbeats (full mTLS handshake each)",
                    floor.heartbeat_full(),
                )
            };
            let r = heartbeat_phase(
                name,
                &devices,
                target.clone(),
                resume,
                started,
                &args,
                &probe,
            )
            .await;
            r.report(f, cores, &probe.rss(), &args);
        }
    }
    drop(servers);
}
