//! Test support: a private software TPM per test, a private PostgreSQL server per test, and
//! child processes that die with the test.
//!
//! Every [`Swtpm`] runs its own `swtpm` process on its own loopback TCP port pair with its own
//! state directory, so tests using it can run in parallel. Processes are SIGKILLed when their
//! guard is dropped, panics included, so no test leaves a stray process behind.
//!
//! swtpm is required: when it is not installed, starting one panics with install instructions
//! instead of skipping, so a missing dependency can never turn into a silently green run.
//! [`Postgres`] follows the same rules with Debian's `postgresql` package.

// Test support: failing loudly at the point of failure is this crate's contract.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub mod counter;
pub mod front;
pub use counter::TpmCommandCounter;
pub use front::{Front, Policy};

/// Kills (SIGKILL) and reaps a child process when dropped.
#[derive(Debug)]
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        ChildGuard(Some(child))
    }

    /// Spawns `cmd` and guards the child.
    pub fn spawn(cmd: &mut Command) -> io::Result<Self> {
        cmd.spawn().map(Self::new)
    }

    pub fn id(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
    }

    pub fn child(&mut self) -> Option<&mut Child> {
        self.0.as_mut()
    }

    /// Kills and reaps the child now. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            // Already exited is fine: kill then fails with InvalidInput and wait reaps it.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `Some(status)` if the child has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<std::process::ExitStatus>> {
        match self.0.as_mut() {
            Some(c) => c.try_wait(),
            None => Err(io::Error::other("child already killed")),
        }
    }

    /// Stops guarding: the caller owns the child again.
    pub fn into_inner(mut self) -> Option<Child> {
        self.0.take()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

enum StateDir {
    Owned(TempDir),
    Given(PathBuf),
}

impl StateDir {
    fn path(&self) -> &Path {
        match self {
            StateDir::Owned(t) => t.path(),
            StateDir::Given(p) => p,
        }
    }
}

/// A running `swtpm socket --tpm2` on 127.0.0.1, killed on drop.
pub struct Swtpm {
    child: Option<ChildGuard>,
    state: StateDir,
    /// Holds swtpm's stdout/stderr, shown when it fails to start.
    logs: TempDir,
    port: u16,
}

const START_ATTEMPTS: usize = 20;
const READY_TIMEOUT: Duration = Duration::from_secs(15);

impl Swtpm {
    /// Starts a fresh TPM in a new temporary state directory (removed on drop).
    pub fn start() -> Swtpm {
        let state = tempfile::tempdir().expect("create swtpm state dir");
        Self::launch(StateDir::Owned(state))
    }

    /// Starts a TPM on an existing state directory (a previous TPM's seeds and NV survive).
    /// The directory is left in place on drop.
    pub fn start_in(state_dir: &Path) -> Swtpm {
        std::fs::create_dir_all(state_dir).expect("create swtpm state dir");
        Self::launch(StateDir::Given(state_dir.to_path_buf()))
    }

    fn launch(state: StateDir) -> Swtpm {
        let logs = tempfile::tempdir().expect("create swtpm log dir");
        let mut swtpm = Swtpm {
            child: None,
            state,
            logs,
            port: 0,
        };
        let mut last_err = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = match free_port_pair() {
                Ok(p) => p,
                Err(e) => {
                    last_err = format!("no free port pair: {e}");
                    continue;
                }
            };
            match swtpm.spawn_on(port) {
                Ok(()) => return swtpm,
                Err(e) => last_err = e,
            }
        }
        panic!("swtpm did not start after {START_ATTEMPTS} attempts: {last_err}");
    }

    /// Starts swtpm on `port`/`port + 1`; on failure nothing is left running.
    fn spawn_on(&mut self, port: u16) -> Result<(), String> {
        let log_path = self.logs.path().join("swtpm.log");
        let log = File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new("swtpm");
        cmd.arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={}", self.state.path().display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .arg("--flags")
            .arg("not-need-init,startup-clear")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let mut child = match ChildGuard::spawn(&mut cmd) {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
                "swtpm is not installed (or not on PATH); these tests need a real software TPM: \
                 install it with `apt-get install swtpm swtpm-tools tpm2-tools`"
            ),
            Err(e) => panic!("cannot run swtpm: {e}"),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        loop {
            // Checked before connecting: if our swtpm lost the port race it exits at once, and
            // a connection would then reach whoever won the port.
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!("swtpm exited with {status} on port {port}: {log}"));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                std::thread::sleep(Duration::from_millis(20));
                if let Ok(None) = child.try_wait() {
                    self.child = Some(child);
                    self.port = port;
                    return Ok(());
                }
                continue;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "swtpm did not listen on port {port} within {READY_TIMEOUT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// TCTI string for tss-esapi / tpm2-tools (`TPM2TOOLS_TCTI`).
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The TPM command port (the control port is `port() + 1`).
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILLs the TPM, as if the device vanished. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    /// Kills the TPM if running and starts it again on the same state directory, on the same
    /// ports when they can be had again (so an existing TCTI string keeps working), otherwise
    /// on new ones. The TPM goes through a reset: transient objects and sessions are gone,
    /// seeds and persistent objects remain.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last_err = String::new();
        while Instant::now() < deadline {
            match self.spawn_on(port) {
                Ok(()) => return,
                Err(e) => last_err = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("swtpm: could not restart on port {port} ({last_err}); using new ports");
        for _ in 0..START_ATTEMPTS {
            if let Ok(p) = free_port_pair() {
                match self.spawn_on(p) {
                    Ok(()) => return,
                    Err(e) => last_err = e,
                }
            }
        }
        panic!("swtpm did not restart: {last_err}");
    }

    /// A tpm2-tools command (e.g. `"tpm2_createprimary"`) aimed at this TPM.
    pub fn tpm2_tool(&self, tool: &str) -> Command {
        let mut cmd = Command::new(tool);
        cmd.env("TPM2TOOLS_TCTI", self.tcti())
            .env_remove("TSS2_TCTI")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs a tpm2-tools command against this TPM and panics with its output if it fails.
    pub fn run_tpm2_tool(&self, tool: &str, args: &[&str]) -> String {
        run_or_panic(self.tpm2_tool(tool).args(args), tool, "tpm2-tools")
    }
}

/// A local EK CA made with swtpm's own tooling (`swtpm_localca`): a root and an intermediate
/// ("swtpm-localca") in a temporary directory, created on the first [`Swtpm::manufacture`].
/// Each test makes its own, so EK certificates of different tests chain to different roots.
pub struct EkCa {
    dir: TempDir,
}

impl EkCa {
    pub fn new() -> EkCa {
        let dir = tempfile::tempdir().expect("create EK CA dir");
        let d = dir.path().display();
        std::fs::write(
            dir.path().join("localca.conf"),
            format!(
                "statedir = {d}\nsigningkey = {d}/signkey.pem\nissuercert = {d}/issuercert.pem\ncertserial = {d}/certserial\n"
            ),
        )
        .expect("write localca.conf");
        std::fs::write(
            dir.path().join("setup.conf"),
            format!(
                "create_certs_tool= /usr/bin/swtpm_localca\ncreate_certs_tool_config = {d}/localca.conf\ncreate_certs_tool_options = /etc/swtpm-localca.options\nactive_pcr_banks = sha256\n"
            ),
        )
        .expect("write setup.conf");
        EkCa { dir }
    }

    /// The self-signed root (PEM). Exists once a TPM was manufactured with this CA.
    pub fn root_pem(&self) -> String {
        self.read("swtpm-localca-rootca-cert.pem")
    }

    /// The intermediate that signs the EK certificates (PEM).
    pub fn intermediate_pem(&self) -> String {
        self.read("issuercert.pem")
    }

    /// Root and intermediate: what an operator would put in a token's EK CA bundle.
    pub fn bundle_pem(&self) -> String {
        self.intermediate_pem() + &self.root_pem()
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name))
            .unwrap_or_else(|e| panic!("EK CA {name}: {e} (manufacture a TPM with it first)"))
    }
}

impl Default for EkCa {
    fn default() -> Self {
        EkCa::new()
    }
}

impl Swtpm {
    /// Manufactures a TPM like a vendor does (`swtpm_setup --create-ek-cert`): an RSA 2048 EK at
    /// 0x81010001 with its certificate in NV 0x01c00002 and an ECC P-384 EK at 0x81010016 with
    /// its certificate in NV 0x01c00016, both issued by `ca`; then starts it. Takes a second or
    /// two.
    pub fn manufacture(ca: &EkCa) -> Swtpm {
        let state = tempfile::tempdir().expect("create swtpm state dir");
        run_or_panic(
            Command::new("swtpm_setup")
                .arg("--tpm2")
                .arg("--tpmstate")
                .arg(state.path())
                .arg("--create-ek-cert")
                .arg("--config")
                .arg(ca.dir.path().join("setup.conf"))
                .arg("--overwrite")
                .stdin(Stdio::null()),
            "swtpm_setup",
            "swtpm swtpm-tools",
        );
        Self::launch(StateDir::Owned(state))
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.kill();
    }
}

impl std::fmt::Debug for Swtpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swtpm")
            .field("port", &self.port)
            .field("state_dir", &self.state.path())
            .field("pid", &self.child.as_ref().and_then(ChildGuard::id))
            .finish()
    }
}

/// Runs `cmd` (the program `tool`, from the Debian packages `packages`) and returns its stdout;
/// panics with its output when it fails or is not installed.
fn run_or_panic(cmd: &mut Command, tool: &str, packages: &str) -> String {
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            panic!("{tool} is not installed: install it with `apt-get install {packages}`")
        }
        Err(e) => panic!("cannot run {tool}: {e}"),
    };
    assert!(
        out.status.success(),
        "{tool} {:?} failed ({}): {}{}",
        cmd.get_args().collect::<Vec<_>>(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A port `p` from the kernel's free pool such that `p + 1` is free too at this instant. Another
/// process may still take them before swtpm binds; the caller retries on failure.
fn free_port_pair() -> io::Result<u16> {
    for _ in 0..50 {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let p = l.local_addr()?.port();
        if p == u16::MAX {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, p + 1)).is_ok() {
            return Ok(p);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "no adjacent free ports",
    ))
}

mod postgres;
pub use postgres::Postgres;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_guard_kills_on_drop() {
        let guard = ChildGuard::spawn(Command::new("sleep").arg("1000")).unwrap();
        let pid = guard.id().unwrap();
        drop(guard);
        // Reaped by the guard, so the pid no longer names our child.
        assert!(
            !Path::new(&format!("/proc/{pid}/cmdline")).exists() || {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                !cmd.starts_with(b"sleep")
            }
        );
    }

    #[test]
    fn swtpm_starts_restarts_and_dies_with_its_guard() {
        let mut tpm = Swtpm::start();
        let port = tpm.port();
        assert!(tpm.is_running());
        assert_eq!(tpm.tcti(), format!("swtpm:host=127.0.0.1,port={port}"));
        tpm.kill();
        assert!(!tpm.is_running());
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
        tpm.restart();
        assert!(tpm.is_running());
        let out = tpm.run_tpm2_tool("tpm2_getrandom", &["--hex", "8"]);
        assert_eq!(out.trim().len(), 16, "{out}");
        let port = tpm.port();
        drop(tpm);
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}
