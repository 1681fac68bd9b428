//! End-to-end test harness: a real `boundkey-authd` per test, `boundkeyctl` against it, and the
//! real `boundkeyd` binary over real TLS.
//!
//! The auth service binaries are found next to `boundkeyd` in the target directory, so build them
//! first: `cargo build --workspace --bins && cargo test -p boundkey`.
//!
//! Every test gets its own temporary directories and an ephemeral port; every child process is
//! killed when its guard drops (panics included). Waiting is done by polling with a deadline.
//!
//! The key store is a parameter: `BOUNDKEY_TEST_KEYSTORE=tpm` runs every scenario against a
//! private swtpm per agent instead of the file backend.
//!
//! So is the agent: `BOUNDKEY_TEST_AGENT=PATH` runs another `boundkeyd` (a cross-built one) in
//! place of the one cargo built, through `BOUNDKEY_TEST_RUNNER` if set (a command split on
//! whitespace, e.g. `qemu-aarch64 -L /usr/aarch64-linux-gnu`); `cross/e2e.sh` sets both. The auth
//! service and `boundkeyctl` are always the host's.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use boundkey_testkit::{ChildGuard, Swtpm};
use serde_json::Value;
use tempfile::TempDir;

pub(crate) const DEADLINE: Duration = Duration::from_secs(60);

/// The agent under test: `BOUNDKEY_TEST_AGENT` if set, else the `boundkeyd` cargo built.
pub(crate) fn boundkeyd() -> PathBuf {
    match std::env::var_os("BOUNDKEY_TEST_AGENT") {
        Some(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "BOUNDKEY_TEST_AGENT={}: no such file",
                p.display()
            );
            p
        }
        _ => PathBuf::from(env!("CARGO_BIN_EXE_boundkeyd")),
    }
}

/// A command running the agent under test, through `BOUNDKEY_TEST_RUNNER` when set.
pub(crate) fn agent_command() -> Command {
    let runner = std::env::var("BOUNDKEY_TEST_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(boundkeyd());
            c
        }
        None => Command::new(boundkeyd()),
    }
}

/// A binary built next to the host's `boundkeyd` (the server package's binaries).
pub(crate) fn sibling(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_boundkeyd"))
        .parent()
        .expect("boundkeyd has a parent directory")
        .join(name);
    assert!(
        p.exists(),
        "{} not found: run `cargo build --workspace --bins` before `cargo test -p boundkey`",
        p.display()
    );
    p
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub(crate) fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub(crate) fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[track_caller]
pub(crate) fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "expected success, got {:?}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

/// The last line boundkeyd printed on stderr (its one-line error).
pub(crate) fn error_line(o: &Output) -> String {
    stderr(o)
        .lines()
        .rev()
        .find(|l| l.starts_with("boundkeyd: error:"))
        .unwrap_or_else(|| panic!("no error line in:\n{}", stderr(o)))
        .to_string()
}

/// A running auth service.
pub(crate) struct AuthServer {
    dir: TempDir,
    pub data_dir: PathBuf,
    pub addr: String,
    pub ca_pin: String,
    child: ChildGuard,
    /// Extra `start` arguments, kept for restarts.
    args: Vec<String>,
}

impl AuthServer {
    pub(crate) fn start() -> AuthServer {
        Self::start_with(&[])
    }

    /// Starts an auth service with extra environment variables (e.g. crash injection).
    pub(crate) fn start_with(env: &[(&str, &str)]) -> AuthServer {
        Self::start_node(&[], env)
    }

    /// Starts an auth service with extra `start` arguments (e.g. `--storage URL` shared with
    /// other nodes) and environment variables.
    pub(crate) fn start_node(args: &[&str], env: &[(&str, &str)]) -> AuthServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("auth");
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (child, addr, ca_pin) = spawn_authd(dir.path(), &data_dir, "127.0.0.1:0", &args, env);
        AuthServer {
            data_dir,
            addr,
            ca_pin,
            child,
            dir,
            args,
        }
    }

    /// Kills the service now (SIGKILL), as a crashed node.
    pub(crate) fn kill(&mut self) {
        self.child.kill();
    }

    /// Kills the service if it still runs and starts it again on the same data directory and
    /// address (devices keep reaching it), with `env`.
    pub(crate) fn restart_with(&mut self, env: &[(&str, &str)]) {
        self.child.kill();
        let (child, addr, pin) =
            spawn_authd(self.dir.path(), &self.data_dir, &self.addr, &self.args, env);
        assert_eq!(addr, self.addr, "the restarted service listens elsewhere");
        assert_eq!(pin, self.ca_pin, "the restarted service has another CA");
        self.child = child;
    }

    /// Waits for the service to exit on its own; the signal that ended it, if any.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let st = wait_for("boundkey-authd to exit", timeout, || {
            self.child.try_wait().ok().flatten()
        });
        st.signal()
    }

    pub(crate) fn log(&self) -> String {
        read_log(self.dir.path())
    }

    /// Runs `boundkeyctl --data-dir D --format json ARGS`.
    pub(crate) fn ctl(&self, args: &[&str]) -> Output {
        Command::new(sibling("boundkeyctl"))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--format", "json"])
            .args(args)
            .output()
            .expect("run boundkeyctl")
    }

    #[track_caller]
    pub(crate) fn ctl_json(&self, args: &[&str]) -> Value {
        let o = self.ctl(args);
        assert_ok(&o);
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "boundkeyctl {args:?} printed non-JSON ({e}): {}",
                stdout(&o)
            )
        })
    }

    pub(crate) fn add_bot(&self, name: &str) {
        self.ctl_json(&["bots", "add", name]);
    }

    /// `tokens add --bot BOT ARGS…`
    pub(crate) fn add_token(&self, bot: &str, args: &[&str]) -> Token {
        let mut a = vec!["tokens", "add", "--bot", bot];
        a.extend_from_slice(args);
        let v = self.ctl_json(&a);
        Token {
            name: v["name"].as_str().expect("token name").to_string(),
            join_uri: v["join_uri"].as_str().expect("join_uri").to_string(),
            registration_secret: v["registration_secret"].as_str().map(str::to_string),
        }
    }

    /// A bot and a bound-keypair token with a registration secret.
    pub(crate) fn bot_with_token(&self, bot: &str, args: &[&str]) -> Token {
        self.add_bot(bot);
        let mut a = vec!["--join-method", "bound_keypair"];
        a.extend_from_slice(args);
        self.add_token(bot, &a)
    }

    pub(crate) fn token(&self, name: &str) -> Value {
        self.ctl_json(&["tokens", "show", name])
    }

    pub(crate) fn instance(&self, id: &str) -> Value {
        self.ctl_json(&["instances", "show", id])
    }

    pub(crate) fn locks(&self) -> Vec<Value> {
        as_list(self.ctl_json(&["locks", "ls"]), "locks")
    }

    pub(crate) fn audit(&self) -> Vec<Value> {
        as_list(self.ctl_json(&["audit", "ls"]), "events")
    }
}

fn as_list(v: Value, key: &str) -> Vec<Value> {
    match v {
        Value::Array(a) => a,
        Value::Object(mut m) => match m.remove(key) {
            Some(Value::Array(a)) => a,
            _ => panic!("expected a list under {key}: {m:?}"),
        },
        other => panic!("expected a list: {other}"),
    }
}

/// Spawns `boundkey-authd start` (log appended to DIR/authd.log) and waits for its address and
/// CA pin on stdout.
fn spawn_authd(
    dir: &Path,
    data_dir: &Path,
    listen: &str,
    args: &[String],
    env: &[(&str, &str)],
) -> (ChildGuard, String, String) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("authd.log"))
        .expect("log file");
    let mut cmd = Command::new(sibling("boundkey-authd"));
    cmd.args(["start", "--listen", listen, "--cluster", "e2e"])
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("BOUNDKEY_AUTHD_CRASH_AT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = ChildGuard::spawn(&mut cmd).expect("spawn boundkey-authd");
    let out = child
        .child()
        .and_then(|c| c.stdout.take())
        .expect("authd stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut addr, mut pin) = (None, None);
    let end = Instant::now() + DEADLINE;
    while addr.is_none() || pin.is_none() {
        let left = end.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("boundkey-authd did not start; log: {}", read_log(dir)));
        if let Some(a) = line.strip_prefix("listening: ") {
            addr = Some(a.trim().to_string());
        }
        if let Some(p) = line.strip_prefix("ca_pin: ") {
            pin = Some(p.trim().to_string());
        }
    }
    (child, addr.unwrap(), pin.unwrap())
}

fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("authd.log")).unwrap_or_default()
}

#[derive(Debug, Clone)]
pub(crate) struct Token {
    pub name: String,
    pub join_uri: String,
    pub registration_secret: Option<String>,
}

/// Which key store the agents of a test use.
pub(crate) enum Keystore {
    File,
    /// A private software TPM (kept running for the agent's lifetime).
    Tpm(Swtpm),
}

impl Keystore {
    /// From `BOUNDKEY_TEST_KEYSTORE` (`file`, the default, or `tpm`).
    pub(crate) fn from_env() -> Keystore {
        match std::env::var("BOUNDKEY_TEST_KEYSTORE").as_deref() {
            Ok("tpm") => Keystore::Tpm(Swtpm::start()),
            Ok("file") | Err(_) => Keystore::File,
            Ok(other) => panic!("BOUNDKEY_TEST_KEYSTORE={other}: expected file or tpm"),
        }
    }

    pub(crate) fn args(&self) -> Vec<String> {
        match self {
            Keystore::File => vec!["--keystore".into(), "file".into()],
            Keystore::Tpm(t) => vec!["--keystore".into(), "tpm".into(), "--tcti".into(), t.tcti()],
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Keystore::File => "file",
            Keystore::Tpm(_) => "tpm",
        }
    }
}

/// One device: a storage and a destination directory, and its key store.
pub(crate) struct Device {
    dir: TempDir,
    pub storage: PathBuf,
    pub destination: PathBuf,
    pub keystore: Keystore,
}

impl Device {
    pub(crate) fn new() -> Device {
        Self::with_keystore(Keystore::from_env())
    }

    pub(crate) fn with_keystore(keystore: Keystore) -> Device {
        let dir = tempfile::tempdir().expect("tempdir");
        Device {
            storage: dir.path().join("storage"),
            destination: dir.path().join("out"),
            dir,
            keystore,
        }
    }

    /// Another device record sharing this one's key store (for copied storage).
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `boundkeyd start --storage S --destination D <keystore args> ARGS` (not yet run).
    pub(crate) fn start_cmd(&self, args: &[&str]) -> Command {
        self.start_cmd_at(&self.storage, &self.destination, args)
    }

    pub(crate) fn start_cmd_at(
        &self,
        storage: &Path,
        destination: &Path,
        args: &[&str],
    ) -> Command {
        let mut c = agent_command();
        c.arg("start")
            .arg("--storage")
            .arg(storage)
            .arg("--destination")
            .arg(destination)
            .args(self.keystore.args())
            .args(args)
            .env_remove("BOUNDKEY_REGISTRATION_SECRET")
            .env_remove("BOUNDKEY_CRASH_AT")
            .env_remove("BOUNDKEY_PAUSE_AT")
            .env_remove("BOUNDKEY_PAUSE_FILE")
            .env_remove("BOUNDKEY_TPM_KEY_AUTH")
            .env_remove("BOUNDKEY_TPM_OWNER_AUTH")
            // libtss2 logs its own errors to stderr; the agent's one-line error is what counts.
            .env("TSS2_LOG", "all+none")
            .stdin(Stdio::null());
        c
    }

    /// Runs `start --oneshot ARGS`.
    pub(crate) fn oneshot(&self, args: &[&str]) -> Output {
        let mut a = vec!["--oneshot"];
        a.extend_from_slice(args);
        self.start_cmd(&a).output().expect("run boundkeyd")
    }

    /// Runs `start --oneshot --join-uri URI`, asserting success.
    #[track_caller]
    pub(crate) fn join(&self, uri: &str) {
        let o = self.oneshot(&["--join-uri", uri]);
        assert_ok(&o);
    }

    /// Starts the daemon (not --oneshot).
    pub(crate) fn spawn_daemon(&self, args: &[&str]) -> ChildGuard {
        let log = File::create(self.dir.path().join("daemon.log")).expect("daemon log");
        ChildGuard::spawn(
            self.start_cmd(args)
                .stdout(Stdio::null())
                .stderr(Stdio::from(log)),
        )
        .expect("spawn boundkeyd")
    }

    pub(crate) fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub(crate) fn status_at(storage: &Path) -> Value {
        let o = agent_command()
            .args(["status", "--format", "json", "--storage"])
            .arg(storage)
            .output()
            .expect("run boundkeyd status");
        assert_ok(&o);
        serde_json::from_slice(&o.stdout).expect("status JSON")
    }

    pub(crate) fn status(&self) -> Value {
        Self::status_at(&self.storage)
    }

    /// `keypair create --format json ARGS` → the public key.
    pub(crate) fn keypair_create(&self, args: &[&str]) -> String {
        let o = agent_command()
            .args(["keypair", "create", "--format", "json", "--storage"])
            .arg(&self.storage)
            .args(self.keystore.args())
            .args(args)
            .env("TSS2_LOG", "all+none")
            .output()
            .expect("run keypair create");
        assert_ok(&o);
        let v: Value = serde_json::from_slice(&o.stdout).expect("keypair JSON");
        v["public_key"].as_str().expect("public_key").to_string()
    }

    /// `openssl verify -CAfile out/ca.pem out/cert.pem` through the resolved `current` set, and
    /// the key file's mode.
    #[track_caller]
    pub(crate) fn verify_outputs(&self) {
        let cur = self.destination.join("current");
        let o = Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(cur.join("ca.pem"))
            .arg(cur.join("cert.pem"))
            .output()
            .expect("run openssl");
        assert_ok(&o);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(cur.join("key.pem"))
            .expect("key.pem")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "key.pem mode");
        // The key matches the certificate.
        let pk = |args: &[&str]| {
            let o = Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl");
            assert_ok(&o);
            o.stdout
        };
        let from_cert = pk(&[
            "x509",
            "-noout",
            "-pubkey",
            "-in",
            cur.join("cert.pem").to_str().unwrap(),
        ]);
        let from_key = pk(&[
            "pkey",
            "-pubout",
            "-in",
            cur.join("key.pem").to_str().unwrap(),
        ]);
        assert_eq!(from_cert, from_key, "certificate and key do not match");
    }

    /// Keys in the file-backed key store (None for the TPM backend).
    pub(crate) fn key_files(&self) -> Option<usize> {
        let ext = match self.keystore {
            Keystore::File => ".pem",
            Keystore::Tpm(_) => ".tpmkey",
        };
        Some(
            std::fs::read_dir(self.storage.join("keys"))
                .map(|d| {
                    d.filter_map(Result::ok)
                        .filter(|e| e.file_name().to_string_lossy().ends_with(ext))
                        .count()
                })
                .unwrap_or(0),
        )
    }
}

/// The signal that ended a process, if any.
pub(crate) fn signal_of(o: &Output) -> Option<i32> {
    o.status.signal()
}

/// Sends a signal to a guarded child.
pub(crate) fn send_signal(child: &ChildGuard, sig: i32) {
    let raw = child.id().expect("child running") as i32;
    let pid = rustix::process::Pid::from_raw(raw).expect("a child's pid is positive");
    let signal = rustix::process::Signal::from_named_raw(sig).expect("a named signal");
    rustix::process::kill_process(pid, signal)
        .unwrap_or_else(|e| panic!("kill({raw}, {sig}): {e}"));
}

/// Waits for a guarded child to exit.
pub(crate) fn wait_exit(child: &mut ChildGuard, timeout: Duration) -> std::process::ExitStatus {
    wait_for("the agent to exit", timeout, || {
        child.try_wait().ok().flatten()
    })
}
