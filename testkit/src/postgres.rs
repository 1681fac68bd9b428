//! A private PostgreSQL server per test: its own temporary directory (`initdb`), its own
//! loopback port and Unix-socket directory, stopped on drop.
//!
//! Connections over TCP need the password ([`Postgres::password`], SCRAM), so tests exercise
//! the password path of the code they test; the Unix socket (trust) is for the kit itself.

use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::ChildGuard;

/// Superuser the server is initialised with.
const SUPERUSER: &str = "postgres";
/// Unprivileged account that runs the server when the tests run as root (PostgreSQL refuses to
/// run as root); Debian's package creates it.
const SERVICE_ACCOUNT: &str = "postgres";
const START_ATTEMPTS: usize = 10;
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `postgres` on 127.0.0.1, stopped (SIGQUIT, then SIGKILL) on drop.
///
/// Invariant: while the value exists its server accepts connections on [`Postgres::port`] (unless
/// a test stopped it), and its data directory is inside the value's own temporary directory.
pub struct Postgres {
    child: Option<ChildGuard>,
    dir: TempDir,
    bin: PathBuf,
    port: u16,
    password: String,
    as_service_account: bool,
    /// Extra `-c name=value` settings (TLS).
    settings: Vec<String>,
}

impl Postgres {
    /// Like [`Postgres::start`], with TLS on: the server presents `cert_pem` (a chain, leaf
    /// first) with `key_pem`.
    pub fn start_with_tls(cert_pem: &str, key_pem: &str) -> Postgres {
        Self::start_inner(Some((cert_pem, key_pem)))
    }
    /// Initialises a fresh cluster and starts it. Panics, saying how to install PostgreSQL,
    /// when it is not installed: a missing server must fail the run, never skip the tests.
    pub fn start() -> Postgres {
        Self::start_inner(None)
    }

    fn start_inner(tls: Option<(&str, &str)>) -> Postgres {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("boundkey-pg")
            .tempdir()
            .expect("create PostgreSQL temp dir");
        let as_service_account = is_root();
        if as_service_account {
            // The server process must own its directory; the temp dir is root's 0700.
            let status = Command::new("chown")
                .arg(format!("{SERVICE_ACCOUNT}:"))
                .arg(dir.path())
                .status()
                .expect("run chown");
            assert!(status.success(), "chown {SERVICE_ACCOUNT} {:?}", dir.path());
        }
        let password = format!("pw-{}", dir.path().file_name().unwrap().to_string_lossy());
        std::fs::write(dir.path().join("pwfile"), format!("{password}\n")).unwrap();
        std::fs::create_dir(dir.path().join("sock")).unwrap();
        let mut settings = Vec::new();
        let mut owned = vec!["pwfile", "sock"];
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(dir.path().join("server.crt"), cert).unwrap();
            std::fs::write(dir.path().join("server.key"), key).unwrap();
            // PostgreSQL refuses a key others can read.
            std::fs::set_permissions(
                dir.path().join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
            owned.extend(["server.crt", "server.key"]);
            settings.push("ssl=on".to_string());
            for (name, file) in [
                ("ssl_cert_file", "server.crt"),
                ("ssl_key_file", "server.key"),
            ] {
                settings.push(format!("{name}={}", dir.path().join(file).display()));
            }
        }
        if as_service_account {
            for f in owned {
                let st = Command::new("chown")
                    .arg(format!("{SERVICE_ACCOUNT}:"))
                    .arg(dir.path().join(f))
                    .status()
                    .unwrap();
                assert!(st.success());
            }
        }
        let mut pg = Postgres {
            child: None,
            dir,
            bin,
            port: 0,
            password,
            as_service_account,
            settings,
        };
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(pg.data_dir())
            .args([
                "-U",
                SUPERUSER,
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!(
                "--pwfile={}",
                pg.dir.path().join("pwfile").display()
            ))
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        pg.launch();
        pg
    }

    fn launch(&mut self) {
        let mut last_err = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = match free_port() {
                Ok(p) => p,
                Err(e) => {
                    last_err = format!("no free port: {e}");
                    continue;
                }
            };
            match self.spawn_on(port) {
                Ok(()) => return,
                Err(e) => last_err = e,
            }
        }
        panic!("PostgreSQL did not start after {START_ATTEMPTS} attempts: {last_err}");
    }

    fn spawn_on(&mut self, port: u16) -> Result<(), String> {
        let log = self.dir.path().join(format!("postgres-{port}.log"));
        let log_file = std::fs::File::create(&log).map_err(|e| format!("log file: {e}"))?;
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(self.socket_dir())
            // A test server: durability is not what is tested, speed is welcome.
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=200"])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
            .stderr(log_file);
        let mut child = ChildGuard::spawn(&mut cmd).map_err(|e| format!("spawn postgres: {e}"))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("postgres exited ({status}): {text}"));
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                self.port = port;
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!(
                    "postgres not ready after {READY_TIMEOUT:?}: {text}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A PostgreSQL program from the installation, run as the service account when we are root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_service_account {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={SERVICE_ACCOUNT}"))
                .arg(format!("--regid={SERVICE_ACCOUNT}"))
                .arg("--init-groups")
                .arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's password (TCP connections require it).
    pub fn password(&self) -> &str {
        &self.password
    }

    pub fn user(&self) -> &str {
        SUPERUSER
    }

    /// Runs SQL as the superuser over the Unix socket; panics with psql's output on failure.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(self.socket_dir())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
                "-d",
                database,
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-X", "-q", "-A", "-t", "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Creates an empty database and returns its URL (TCP, no password in it, TLS off).
    pub fn create_database(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.url(name)
    }

    /// `postgres://USER@127.0.0.1:PORT/DATABASE?sslmode=disable`.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@127.0.0.1:{}/{database}?sslmode=disable",
            self.port
        )
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Stops the server: SIGQUIT (immediate shutdown, backends included), SIGKILL if it lingers.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            let _ = Command::new("kill")
                .args(["-QUIT", &pid.to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        child.kill();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("port", &self.port)
            .field("dir", &self.dir.path())
            .field("pid", &self.child.as_ref().and_then(ChildGuard::id))
            .finish()
    }
}

/// The newest `/usr/lib/postgresql/N/bin` (Debian's layout), or `BOUNDKEY_PG_BINDIR`.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BOUNDKEY_PG_BINDIR") {
        return PathBuf::from(dir);
    }
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max_by_key(|(v, _)| *v);
    match newest {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): the PostgreSQL \
             store tests need a real server. Install it with `apt-get install postgresql` \
             (scripts/deps.sh does), or set BOUNDKEY_PG_BINDIR to a directory holding initdb, \
             postgres, pg_isready and psql."
        ),
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A port from the kernel's free pool at this instant; the caller retries if it is taken.
fn free_port() -> io::Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}
