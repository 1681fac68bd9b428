//! Test support: a real `boundkey-authd` process on an ephemeral port with its own data
//! directory, `boundkeyctl` invocations against it, and a small protocol client (tokio-rustls,
//! software P-256 keys) that performs real ceremonies.

// Shared by several test crates, each using a different part; `pub` is its interface.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boundkey_proto::frame::{decode_frame, encode_frame, payload_len};
use boundkey_proto::keys::pkix_b64;
use boundkey_proto::{
    jws, ssh_public_key, BotParams, CaPin, ChallengeSolution, ClientMessage, ErrorMessage,
    Heartbeat, Init, JoinResult, RotationResponse, ServerMessage, TokenJoin,
};
use p256::ecdsa::SigningKey;
use p256::pkcs8::EncodePrivateKey;
pub use rustix::process::Signal;
use rustix::process::{kill_process, Pid};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

pub const AUTHD: &str = env!("CARGO_BIN_EXE_boundkey-authd");
pub const CTL: &str = env!("CARGO_BIN_EXE_boundkeyctl");

/// A running `boundkey-authd`. Killed (SIGKILL) and reaped on drop; its log is printed if the
/// test is failing.
pub struct Server {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub addr: SocketAddr,
    pub ca_pin: String,
    pub ca_pem: String,
    pub log: PathBuf,
    /// Stdout lines after the start-up summary keep draining here.
    _stdout: std::thread::JoinHandle<()>,
}

impl Server {
    pub fn start() -> Server {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        Self::start_in(dir, data_dir, extra)
    }

    /// Starts on an existing data directory (restart tests).
    pub fn start_in(dir: tempfile::TempDir, data_dir: PathBuf, extra: &[&str]) -> Server {
        Self::start_logging(dir, data_dir, extra, "info,boundkey_server=debug")
    }

    /// Like [`Server::start_in`] with the server's `RUST_LOG` (benches log what a production
    /// service logs, not the tests' debug lines).
    pub fn start_logging(
        dir: tempfile::TempDir,
        data_dir: PathBuf,
        extra: &[&str],
        rust_log: &str,
    ) -> Server {
        let log = dir.path().join(format!("authd-{}.log", std::process::id()));
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut child = Command::new(AUTHD)
            .args(["start", "--data-dir"])
            .arg(&data_dir)
            .args(["--listen", "127.0.0.1:0", "--cluster", "test-cluster"])
            .args(extra)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("spawn boundkey-authd");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    // Nobody listens any more; keep draining so the server never blocks.
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut fields = std::collections::HashMap::new();
        while !fields.contains_key("admin_socket") {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some((k, v)) = line.split_once(": ") {
                        fields.insert(k.to_string(), v.to_string());
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "boundkey-authd did not start; log:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
        }
        let addr: SocketAddr = fields["listening"].parse().expect("listening address");
        let ca_pem = std::fs::read_to_string(data_dir.join("ca.pem")).expect("ca.pem");
        let ca_pin = fields["ca_pin"].clone();
        // The pin printed must be the SPKI hash of the CA in ca.pem.
        assert_eq!(
            pin_of_pem(&ca_pem).to_string(),
            ca_pin,
            "ca.pem does not match the printed pin"
        );
        Server {
            child: Some(child),
            dir,
            data_dir,
            addr,
            ca_pin,
            ca_pem,
            log,
            _stdout: reader,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends a signal to the server (our own child, still unreaped, so its pid is not reused).
    pub fn signal(&self, sig: Signal) {
        let pid = Pid::from_child(self.child.as_ref().expect("running"));
        kill_process(pid, sig).expect("kill");
    }

    /// Sends a signal and waits (bounded) for the exit status.
    pub fn signal_and_wait(&mut self, sig: Signal) -> std::process::ExitStatus {
        self.signal(sig);
        self.wait_exit()
    }

    /// Waits (bounded) for the server to exit.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let sig = "exit";
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit after signal {sig}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server and hands back its directories (to restart on the same data).
    pub fn stop(mut self) -> (tempfile::TempDir, PathBuf) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
        (dir, self.data_dir.clone())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `boundkeyctl --data-dir DIR ARGS…`.
    pub fn ctl_raw(&self, args: &[&str]) -> Output {
        Command::new(CTL)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .output()
            .expect("run boundkeyctl")
    }

    /// Runs `boundkeyctl --format json ARGS…`, asserts success, parses stdout.
    pub fn ctl(&self, args: &[&str]) -> Value {
        let mut full = vec!["--format", "json"];
        full.extend_from_slice(args);
        let out = self.ctl_raw(&full);
        assert!(
            out.status.success(),
            "boundkeyctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "boundkeyctl {args:?}: bad JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// A paged listing (`instances ls`, `tokens ls`, `audit ls`) in JSON: the page's items, as
    /// a JSON array.
    pub fn ctl_list(&self, args: &[&str]) -> Value {
        let key = match args.first() {
            Some(&"instances") => "instances",
            Some(&"tokens") => "tokens",
            Some(&"audit") => "events",
            other => panic!("not a paged listing: {other:?}"),
        };
        let page = self.ctl(args);
        assert!(
            page.get("next").is_some(),
            "a page has a next field: {page}"
        );
        page.get(key)
            .cloned()
            .unwrap_or_else(|| panic!("no {key} in {page}"))
    }

    /// `tokens add --bot BOT --join-method bound_keypair EXTRA…`: the token's name, its
    /// registration secret (when one was generated) and the whole answer.
    pub fn add_bk_token(&self, bot: &str, extra: &[&str]) -> (String, Option<String>, Value) {
        let mut args = vec![
            "tokens",
            "add",
            "--bot",
            bot,
            "--join-method",
            "bound_keypair",
        ];
        args.extend_from_slice(extra);
        let v = self.ctl(&args);
        let name = v["name"].as_str().expect("token name").to_string();
        let secret = v["registration_secret"].as_str().map(String::from);
        (name, secret, v)
    }

    /// A new device for `bot` (which must exist): a bound-keypair token with a generated
    /// registration secret, and an agent holding both, not joined yet.
    pub fn new_device(&self, bot: &str) -> Agent {
        let (token, secret, _) = self.add_bk_token(bot, &[]);
        Agent::new(self, &token, secret.as_deref())
    }

    pub fn client_config(
        &self,
        identity: Option<(&str, &p256::SecretKey)>,
    ) -> Arc<rustls::ClientConfig> {
        client_config(&self.ca_pem, identity)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- boundkey-authd log ----\n{}", self.log());
        }
    }
}

pub fn pin_of_pem(pem: &str) -> CaPin {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("CA PEM");
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect("CA cert");
    CaPin::of_spki(cert.tbs_certificate.subject_pki.raw)
}

/// TLS 1.3 client trusting only the service's CA (from ca.pem, whose pin was checked), with
/// an optional identity certificate for mTLS.
pub fn client_config(
    ca_pem: &str,
    identity: Option<(&str, &p256::SecretKey)>,
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("CA PEM"))
        .expect("add CA");
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key)) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .expect("identity PEM");
            let der = key.to_pkcs8_der().expect("pkcs8");
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.as_bytes().to_vec()));
            builder
                .with_client_auth_cert(chain, key)
                .expect("client cert")
        }
    };
    Arc::new(config)
}

pub type Conn = TlsStream<TcpStream>;

pub async fn connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Conn {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("TLS handshake")
}

pub async fn send(conn: &mut Conn, msg: &ClientMessage) {
    let f = encode_frame(msg).expect("encode");
    conn.write_all(&f).await.expect("write");
    conn.flush().await.expect("flush");
}

/// Reads one server frame; None on EOF.
pub async fn recv(conn: &mut Conn) -> Option<ServerMessage> {
    let mut header = [0u8; 4];
    match conn.read_exact(&mut header).await {
        Ok(_) => {}
        Err(_) => return None,
    }
    let len = payload_len(header).expect("server frame length");
    let mut payload = vec![0u8; len];
    conn.read_exact(&mut payload).await.expect("payload");
    Some(decode_frame(&payload).expect("server frame"))
}

/// Reads one frame with a generous bound, so a hung server fails the test instead of hanging.
pub async fn recv_within(conn: &mut Conn, d: Duration) -> Option<ServerMessage> {
    tokio::time::timeout(d, recv(conn))
        .await
        .expect("server answered in time")
}

pub fn new_key() -> SigningKey {
    SigningKey::random(&mut rand_core::OsRng)
}

pub fn ssh(k: &SigningKey) -> String {
    ssh_public_key(&p256::PublicKey::from(k.verifying_key()))
}

/// A software agent: bound keys, identity key and certificate, join state.
pub struct Agent {
    pub addr: SocketAddr,
    pub ca_pem: String,
    pub token: String,
    pub registration_secret: Option<String>,
    /// The key the server has bound (or the pre-registered one).
    pub bound: Option<SigningKey>,
    /// Keys made for rotations and not yet confirmed; kept so a challenge for them is answered.
    pub pending: Vec<SigningKey>,
    pub identity: p256::SecretKey,
    pub cert_pem: Option<String>,
    pub join_state: Option<String>,
    pub last: Option<JoinResult>,
    pub ttl_secs: u64,
    /// Connect without the identity certificate even when holding one (forces a recovery).
    pub anonymous: bool,
}

impl Agent {
    pub fn new(server: &Server, token: &str, secret: Option<&str>) -> Agent {
        Agent {
            addr: server.addr,
            ca_pem: server.ca_pem.clone(),
            token: token.into(),
            registration_secret: secret.map(String::from),
            bound: None,
            pending: Vec::new(),
            identity: p256::SecretKey::random(&mut rand_core::OsRng),
            cert_pem: None,
            join_state: None,
            last: None,
            ttl_secs: 3600,
            anonymous: false,
        }
    }

    pub fn with_bound_key(mut self, k: SigningKey) -> Self {
        self.bound = Some(k);
        self
    }

    fn config(&self) -> Arc<rustls::ClientConfig> {
        match (&self.cert_pem, self.anonymous) {
            (Some(c), false) => client_config(&self.ca_pem, Some((c, &self.identity))),
            _ => client_config(&self.ca_pem, None),
        }
    }

    pub async fn connect(&self) -> Conn {
        connect(self.addr, self.config()).await
    }

    pub fn params(&self) -> BotParams {
        BotParams {
            identity_public_key: pkix_b64(&self.identity.public_key()),
            ttl_secs: self.ttl_secs,
        }
    }

    fn key_for(&self, ssh_key: &str) -> Option<&SigningKey> {
        self.bound
            .iter()
            .chain(self.pending.iter())
            .find(|k| ssh(k) == ssh_key)
    }

    /// One bound-keypair ceremony (join, renewal or recovery, whichever the server decides).
    pub async fn join(&mut self) -> Result<JoinResult, ErrorMessage> {
        let mut conn = self.connect().await;
        send(
            &mut conn,
            &ClientMessage::Init(Init {
                token: self.token.clone(),
                params: self.params(),
                registration_secret: if self.bound.is_none() {
                    self.registration_secret.clone()
                } else {
                    None
                },
                join_state: self.join_state.clone(),
            }),
        )
        .await;
        loop {
            let msg = recv_within(&mut conn, Duration::from_secs(30))
                .await
                .expect("server closed the connection without a result");
            match msg {
                ServerMessage::RotationRequest(_) => {
                    let k = new_key();
                    let public_key = ssh(&k);
                    // Kept before the public key leaves, as the real agent persists it first.
                    self.pending.push(k);
                    send(
                        &mut conn,
                        &ClientMessage::RotationResponse(RotationResponse { public_key }),
                    )
                    .await;
                }
                ServerMessage::Challenge(c) => {
                    // A client without the key (a thief, an impostor) can only sign with another.
                    let stranger = new_key();
                    let key = self.key_for(&c.public_key).unwrap_or(&stranger);
                    let solution = jws::sign(key, None, c.document.as_bytes());
                    send(
                        &mut conn,
                        &ClientMessage::ChallengeSolution(ChallengeSolution {
                            solution,
                            identity_proof: None,
                            attestation: None,
                        }),
                    )
                    .await;
                }
                ServerMessage::Result(r) => {
                    self.accept_result(&r);
                    return Ok(r);
                }
                ServerMessage::Error(e) => return Err(e),
                ServerMessage::HeartbeatAck(_) => panic!("unexpected heartbeat_ack"),
                ServerMessage::ActivateCredential(_) => panic!("unexpected activate_credential"),
            }
        }
    }

    fn accept_result(&mut self, r: &JoinResult) {
        if let Some(bpk) = &r.bound_public_key {
            let all: Vec<SigningKey> = self
                .bound
                .take()
                .into_iter()
                .chain(self.pending.drain(..))
                .collect();
            self.bound = all.into_iter().find(|k| &ssh(k) == bpk);
            assert!(
                self.bound.is_some(),
                "result names a bound key we do not hold"
            );
        }
        self.cert_pem = Some(r.certificate.clone());
        if r.join_state.is_some() {
            self.join_state = r.join_state.clone();
        }
        self.registration_secret = None;
        self.last = Some(r.clone());
    }

    /// `token` join method: join with the secret, or renew over mTLS without it.
    pub async fn token_join(&mut self, secret: Option<&str>) -> Result<JoinResult, ErrorMessage> {
        let mut conn = self.connect().await;
        send(
            &mut conn,
            &ClientMessage::TokenJoin(TokenJoin {
                token: secret.map(String::from),
                params: self.params(),
            }),
        )
        .await;
        match recv_within(&mut conn, Duration::from_secs(30)).await {
            Some(ServerMessage::Result(r)) => {
                self.accept_result(&r);
                Ok(r)
            }
            Some(ServerMessage::Error(e)) => Err(e),
            other => panic!("unexpected answer to token_join: {other:?}"),
        }
    }

    pub async fn heartbeat(&self, hb: Heartbeat) -> ServerMessage {
        let mut conn = self.connect().await;
        send(&mut conn, &ClientMessage::Heartbeat(hb)).await;
        recv_within(&mut conn, Duration::from_secs(30))
            .await
            .expect("heartbeat answer")
    }
}

/// Polls `f` until it returns Some, failing after `within`.
pub fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "condition not reached within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn data_path(server: &Server, name: &str) -> PathBuf {
    server.data_dir.join(name)
}

pub fn file_mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o7777
}
