//! A join's latency with the TPM key store next to the raw cost of the same TPM operations,
//! measured in one run against one swtpm (loopback TCP, no resource manager).
//!
//! ```text
//! cargo build --release --workspace --bins && cargo bench --bench tpm_join
//! ```
//!
//! * agent: wall-clock of `boundkeyd start --oneshot` (process start, TLS to a local
//!   boundkey-authd, the ceremony, the TPM operations, fsynced state and output writes, one
//!   heartbeat): N first joins (fresh token, registration secret and storage each: the TPM key is
//!   created, then signs) and N renewals (one signature), with `--keystore tpm` and, for context,
//!   `--keystore file`.
//! * tpm2-tools: the TPM operations the agent performs, one tool process each, against the same
//!   swtpm. Renewal: `tpm2_createprimary -C o -G ecc256` + `tpm2_load` + `tpm2_sign` +
//!   `tpm2_flushcontext`. First join: additionally `tpm2_create` of an ECC P-256 signing key
//!   under its own `tpm2_createprimary` + `tpm2_flushcontext`, as the agent recreates the
//!   primary for every operation. tpm2-tools keep their objects loaded between processes (context
//!   files), and swtpm has only three object slots, so an untimed `tpm2_flushcontext -t` runs
//!   between the timed tools.
//!   `tpm2_getrandom 8` shows what a tool costs before any real TPM work (process start, TCTI
//!   set-up, one trivial command).
//! * HAL in-process: the TPM commands the agent's ceremony sends, through `boundkey-hal`
//!   (tss-esapi) in this process, back to back, as the agent issues them (a hold from `prepare`
//!   to `release`): the TPM's own cost without process start-up or network. With a TLS round
//!   trip to the same authd (connect, TLS 1.3 handshake, one frame each way) it is the floor a
//!   renewal is compared with.
//! * Commands per ceremony: one first join and one renewal of the agent through a relay that
//!   records every TPM command (`testkit::TpmCommandCounter`), and the same with a persistent
//!   SRK at 0x81000001 (`--tpm-persist-srk`, on a second swtpm).
//!
//! The storage directories are on the disk (`/tmp`), the identity outputs on tmpfs
//! (`/dev/shm`), as the packaged unit has them (`/var/lib/boundkeyd`, `/run/boundkeyd`).
//!
//! The binaries are the bench profile's (`target/release`), started through the end-to-end test
//! harness (`tests/common`), so build the server binaries in release first. Numbers are printed,
//! never asserted. A run takes well under a minute.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use boundkey_hal::{Digest, KeyName, KeyStore, TpmConfig, TpmKeyStore};
use boundkey_testkit::{EkCa, Swtpm, TpmCommandCounter};

#[path = "../tests/common/mod.rs"]
mod common;

use common::{boundkeyd, AuthServer};

const JOINS: usize = 10;
const RENEWALS: usize = 20;

/// The cost floor of a renewal's network part: TCP connect, a TLS 1.3 handshake with the auth
/// service (its chain verified against the cluster CA) and one frame each way. The frame is a
/// message the service refuses, so the service answers at once without a ceremony or a store
/// write.
fn tls_round_trip(auth: &AuthServer) -> Duration {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};
    use std::io::{Read, Write};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(auth.data_dir.join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let frame =
        boundkey_proto::frame::encode_frame(&serde_json::json!({"v": 1, "type": "bench"})).unwrap();
    let t = Instant::now();
    let tcp = std::net::TcpStream::connect(&auth.addr).unwrap();
    tcp.set_nodelay(true).unwrap();
    let conn =
        rustls::ClientConnection::new(cfg, ServerName::try_from("127.0.0.1").unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(&frame).unwrap();
    let mut header = [0u8; 4];
    tls.read_exact(&mut header).unwrap();
    let len = boundkey_proto::frame::payload_len(header).unwrap();
    let mut reply = vec![0u8; len];
    tls.read_exact(&mut reply).unwrap();
    t.elapsed()
}

/// What a running daemon holds after its first join with the TPM key store, and how long a
/// renewal asked for with SIGUSR1 takes until the new generation is the `current` set.
struct DaemonRun {
    rss_kib: u64,
    pss_kib: u64,
    private_dirty_kib: u64,
    renewals: Vec<Duration>,
}

fn current_set(out: &Path) -> Option<PathBuf> {
    std::fs::read_link(out.join("current")).ok()
}

fn wait_for_change(out: &Path, from: Option<&Path>, what: &str) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = current_set(out);
        if now.is_some() && now.as_deref() != from {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no new identity set in 30 s"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn smaps_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{field} not in smaps_rollup"))
}

fn daemon_run(auth: &AuthServer, dir: &Path, keystore: &[String]) -> DaemonRun {
    let token = auth.bot_with_token("bench-daemon", &[]);
    let out = outputs_dir(dir).join("daemon");
    let mut child = Command::new(boundkeyd())
        .args(["start", "--log-level", "warn", "--storage"])
        .arg(dir.join("daemon/storage"))
        .arg("--destination")
        .arg(&out)
        .args(keystore)
        .args(["--join-uri", &token.join_uri])
        .env_remove("BOUNDKEY_REGISTRATION_SECRET")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    wait_for_change(&out, None, "daemon first join");
    // A page of a just-built binary that is not yet written back counts as the process's
    // private dirty memory; write everything back so only the daemon's own pages count.
    let _ = Command::new("sync").status();
    // Let the first heartbeat finish before looking at memory.
    std::thread::sleep(Duration::from_millis(500));
    let (rss_kib, pss_kib, private_dirty_kib) = (
        smaps_kib(pid, "Rss:"),
        smaps_kib(pid, "Pss:"),
        smaps_kib(pid, "Private_Dirty:"),
    );
    let target = rustix::process::Pid::from_raw(pid as i32).unwrap();
    let mut renewals = Vec::new();
    for i in 0..=RENEWALS {
        let before = current_set(&out);
        let t = Instant::now();
        rustix::process::kill_process(target, rustix::process::Signal::USR1).unwrap();
        let done = wait_for_change(&out, before.as_deref(), "SIGUSR1 renewal");
        // The heartbeat after a renewal runs once the set is written: let it end before the
        // next signal, as an operator's next renewal would be minutes away.
        std::thread::sleep(Duration::from_millis(100));
        if i > 0 {
            renewals.push(done - t);
        }
    }
    rustix::process::kill_process(target, rustix::process::Signal::TERM).unwrap();
    let _ = child.wait();
    DaemonRun {
        rss_kib,
        pss_kib,
        private_dirty_kib,
        renewals,
    }
}

#[track_caller]
fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}):\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn timed(cmd: &mut Command, what: &str) -> Duration {
    let t = Instant::now();
    let o = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let d = t.elapsed();
    ok(&o, what);
    d
}

/// `boundkeyd start --oneshot` on one storage directory with one key store.
struct Agent {
    storage: PathBuf,
    destination: PathBuf,
    keystore: Vec<String>,
}

impl Agent {
    fn run(&self, extra: &[&str]) -> Duration {
        timed(
            Command::new(boundkeyd())
                .args(["start", "--oneshot", "--log-level", "warn", "--storage"])
                .arg(&self.storage)
                .arg("--destination")
                .arg(&self.destination)
                .args(&self.keystore)
                .args(extra)
                .env_remove("BOUNDKEY_REGISTRATION_SECRET")
                .stdin(Stdio::null()),
            "boundkeyd start --oneshot",
        )
    }
}

/// First joins (one fresh token and storage directory each), then renewals of the first one.
fn agent_runs(
    auth: &AuthServer,
    dir: &Path,
    label: &str,
    keystore: &[String],
) -> (Vec<Duration>, Vec<Duration>) {
    let agent = |i: usize| Agent {
        storage: dir.join(format!("{label}-{i}/storage")),
        destination: outputs_dir(dir).join(format!("{label}-{i}")),
        keystore: keystore.to_vec(),
    };
    let joins: Vec<Duration> = (0..JOINS)
        .map(|i| {
            let token = auth.bot_with_token(&format!("bench-{label}-{i}"), &[]);
            agent(i).run(&["--join-uri", &token.join_uri])
        })
        .collect();
    let a = agent(0);
    a.run(&[]); // warm-up
    let renewals = (0..RENEWALS).map(|_| a.run(&[])).collect();
    (joins, renewals)
}

/// Where identity outputs go: tmpfs, as the packaged unit's `/run/boundkeyd`, when there is one.
fn outputs_dir(dir: &Path) -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let name = dir.file_name().map_or_else(
            || "boundkey-bench".into(),
            |n| n.to_string_lossy().into_owned(),
        );
        shm.join(name)
    } else {
        dir.join("out")
    }
}

/// The TPM commands of one agent first join and one renewal, recorded by a relay.
fn commands_per_ceremony(
    auth: &AuthServer,
    tpm: &Swtpm,
    dir: &Path,
    label: &str,
    extra: &[&str],
) -> (Vec<u32>, Vec<u32>) {
    let relay = TpmCommandCounter::start(tpm.port());
    let mut keystore = vec![
        "--keystore".to_string(),
        "tpm".to_string(),
        "--tcti".to_string(),
        relay.tcti(),
    ];
    keystore.extend(extra.iter().map(|s| s.to_string()));
    let agent = Agent {
        storage: dir.join(format!("count-{label}/storage")),
        destination: outputs_dir(dir).join(format!("count-{label}")),
        keystore,
    };
    let token = auth.bot_with_token(&format!("bench-count-{label}"), &[]);
    relay.take();
    agent.run(&["--join-uri", &token.join_uri]);
    let join = relay.take();
    agent.run(&[]);
    let renewal = relay.take();
    (strip_tcti_probes(join), strip_tcti_probes(renewal))
}

/// Registrations on a TPM manufactured with EK certificates (`testkit::EkCa`), with and without
/// key attestation, alternating, each a fresh token and storage directory; and the TPM commands
/// of one of each through the recording relay.
struct AttestRuns {
    plain: Vec<Duration>,
    attested: Vec<Duration>,
    plain_commands: Vec<u32>,
    attested_commands: Vec<u32>,
}

fn attestation_runs(auth: &AuthServer, dir: &Path) -> AttestRuns {
    let ca = EkCa::new();
    let tpm = Swtpm::manufacture(&ca);
    let bundle = dir.join("ek-ca.pem");
    std::fs::write(&bundle, ca.bundle_pem()).expect("EK CA bundle");
    let bundle = bundle.to_str().expect("utf-8 path").to_string();
    let attest_args = ["--attestation", "tpm", "--ek-ca", bundle.as_str()];
    let agent = |label: &str, tcti: String| Agent {
        storage: dir.join(format!("{label}/storage")),
        destination: outputs_dir(dir).join(label),
        keystore: vec!["--keystore".into(), "tpm".into(), "--tcti".into(), tcti],
    };
    let mut out = AttestRuns {
        plain: Vec::new(),
        attested: Vec::new(),
        plain_commands: Vec::new(),
        attested_commands: Vec::new(),
    };
    for i in 0..=JOINS {
        for attested in [false, true] {
            let label = format!("ek-{attested}-{i}");
            let args: &[&str] = if attested { &attest_args } else { &[] };
            let token = auth.bot_with_token(&format!("bench-{label}"), args);
            let d = agent(&label, tpm.tcti()).run(&["--join-uri", &token.join_uri]);
            // The first pair warms up.
            if i > 0 {
                if attested {
                    &mut out.attested
                } else {
                    &mut out.plain
                }
                .push(d);
            }
        }
    }
    let relay = TpmCommandCounter::start(tpm.port());
    for attested in [false, true] {
        let label = format!("ek-count-{attested}");
        let args: &[&str] = if attested { &attest_args } else { &[] };
        let token = auth.bot_with_token(&format!("bench-{label}"), args);
        relay.take();
        agent(&label, relay.tcti()).run(&["--join-uri", &token.join_uri]);
        let cmds = strip_tcti_probes(relay.take());
        if attested {
            out.attested_commands = cmds;
        } else {
            out.plain_commands = cmds;
        }
    }
    out
}

/// The swtpm TCTI's own start-up (it asks the TPM for its properties on every connection set
/// up) is libtss2's, not the ceremony's.
fn strip_tcti_probes(mut v: Vec<u32>) -> Vec<u32> {
    v.retain(|&c| c != 0x17a);
    v
}

/// tpm2-tools against the swtpm; context files live in `dir`.
struct Tools<'a> {
    tpm: &'a Swtpm,
    dir: PathBuf,
}

impl Tools<'_> {
    fn cmd(&self, tool: &str, args: &[&str]) -> Command {
        let mut c = self.tpm.tpm2_tool(tool);
        c.current_dir(&self.dir).args(args);
        c
    }

    fn time(&self, tool: &str, args: &[&str]) -> Duration {
        timed(&mut self.cmd(tool, args), tool)
    }

    /// Untimed: flush every transient object (tpm2-tools leave them loaded).
    fn flush_all(&self) {
        self.time("tpm2_flushcontext", &["-t"]);
    }

    fn primary(&self) -> Duration {
        self.time(
            "tpm2_createprimary",
            &["-Q", "-C", "o", "-G", "ecc256", "-c", "prim.ctx"],
        )
    }

    /// createprimary + create (ECC P-256 signing key, non-exportable) + flushcontext.
    fn create(&self, name: &str) -> [Duration; 3] {
        let cp = self.primary();
        let (pb, pr) = (format!("{name}.pub"), format!("{name}.priv"));
        let cr = self.time(
            "tpm2_create",
            &[
                "-Q",
                "-C",
                "prim.ctx",
                "-G",
                "ecc256:ecdsa-sha256",
                "-a",
                "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign",
                "-u",
                &pb,
                "-r",
                &pr,
            ],
        );
        let fl = self.time("tpm2_flushcontext", &["-t"]);
        [cp, cr, fl]
    }

    /// createprimary + load + sign (a SHA-256 digest) + flushcontext.
    fn sign(&self, name: &str) -> [Duration; 4] {
        let cp = self.primary();
        self.flush_all();
        let (pb, pr) = (format!("{name}.pub"), format!("{name}.priv"));
        let ld = self.time(
            "tpm2_load",
            &[
                "-Q", "-C", "prim.ctx", "-u", &pb, "-r", &pr, "-c", "key.ctx",
            ],
        );
        self.flush_all();
        let sg = self.time(
            "tpm2_sign",
            &[
                "-Q",
                "-c",
                "key.ctx",
                "-g",
                "sha256",
                "-d",
                "-f",
                "plain",
                "-o",
                "sig.bin",
                "digest.bin",
            ],
        );
        let fl = self.time("tpm2_flushcontext", &["-t"]);
        [cp, ld, sg, fl]
    }
}

struct ToolTimes {
    join: Vec<Duration>,
    renewal: Vec<Duration>,
    /// Per tool, over the renewal runs: createprimary, load, sign, flushcontext.
    renewal_parts: [Vec<Duration>; 4],
    /// Per tool, over the join runs: createprimary, create, flushcontext (create part only).
    create_parts: [Vec<Duration>; 3],
    /// `tpm2_getrandom 8`: a tool's process start, TCTI set-up and one trivial command.
    floor: Vec<Duration>,
}

fn tool_runs(tpm: &Swtpm, dir: &Path) -> ToolTimes {
    let dir = dir.join("tools");
    std::fs::create_dir_all(&dir).expect("tools dir");
    std::fs::write(dir.join("digest.bin"), [0x5a; 32]).expect("digest");
    let t = Tools { tpm, dir };
    t.flush_all();
    // Warm-up, and the key the renewals use.
    t.create("renew");
    t.sign("renew");

    let mut out = ToolTimes {
        join: Vec::new(),
        renewal: Vec::new(),
        renewal_parts: Default::default(),
        create_parts: Default::default(),
        floor: (0..RENEWALS)
            .map(|_| t.time("tpm2_getrandom", &["-o", "random.bin", "8"]))
            .collect(),
    };
    for i in 0..JOINS {
        let name = format!("join{i}");
        let c = t.create(&name);
        let s = t.sign(&name);
        out.join.push(c.iter().chain(s.iter()).sum());
        for (v, d) in out.create_parts.iter_mut().zip(c) {
            v.push(d);
        }
    }
    for _ in 0..RENEWALS {
        let s = t.sign("renew");
        out.renewal.push(s.iter().sum());
        for (v, d) in out.renewal_parts.iter_mut().zip(s) {
            v.push(d);
        }
    }
    out
}

/// The ceremony's TPM commands through boundkey-hal (tss-esapi) in this process, as the agent
/// sends them: a first join makes the parent, creates the key and signs with it in one hold; a
/// renewal loads the bound key, signs and flushes.
fn hal_runs(
    tpm: &Swtpm,
    dir: &Path,
    label: &str,
    persist_srk: bool,
) -> (Vec<Duration>, Vec<Duration>) {
    let cfg = TpmConfig {
        tcti: tpm.tcti(),
        persist_srk,
        ..TpmConfig::default()
    };
    let mut store =
        TpmKeyStore::open(&dir.join(format!("hal-{label}")), cfg).expect("open the TPM key store");
    let digest = Digest::of(b"bench");
    let warm = KeyName::new("warm").expect("key name");
    store.create(&warm).expect("create");
    store.sign_digest(&warm, &digest).expect("sign");
    let mut joins = Vec::new();
    for i in 0..JOINS {
        let k = KeyName::new(&format!("join{i}")).expect("key name");
        let t = Instant::now();
        store.prepare(None).expect("prepare");
        store.create(&k).expect("create");
        store.sign_digest(&k, &digest).expect("sign");
        store.release();
        joins.push(t.elapsed());
    }
    let renewals = (0..RENEWALS)
        .map(|_| {
            let t = Instant::now();
            store.prepare(Some(&warm)).expect("prepare");
            store.sign_digest(&warm, &digest).expect("sign");
            store.release();
            t.elapsed()
        })
        .collect();
    // swtpm serves one connection at a time.
    store.disconnect();
    (joins, renewals)
}

/// What a renewal's two durable state writes (the in-flight mark, then the new identity) cost on
/// the storage directory's disk: each a temporary file, fsync, rename and directory fsync, as
/// `boundkey_fs::write_atomic` does for `state.json` (about 4 KB).
fn durable_writes(dir: &Path) -> Vec<Duration> {
    let d = dir.join("writes");
    std::fs::create_dir_all(&d).expect("writes dir");
    let data = vec![b'x'; 4096];
    (0..RENEWALS)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..2 {
                boundkey_fs::write_atomic(&d.join("state.json"), &data, 0o600).expect("write");
            }
            t.elapsed()
        })
        .collect()
}

fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2
    }
}

/// Nearest-rank 90th percentile.
fn p90(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    let rank = (s.len() * 9).div_ceil(10).max(1);
    s[rank - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn row(what: &str, v: &[Duration]) {
    println!(
        "{what:<52} {:>3} {:>10} {:>10}",
        v.len(),
        ms(median(v)),
        ms(p90(v))
    );
}

fn version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn main() {
    // libtss2 logs its own errors to stderr; none are expected, and none should clutter the table.
    std::env::set_var("TSS2_LOG", "all+none");
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let tpm = Swtpm::start();
    let auth = AuthServer::start();

    println!("boundkey: TPM join benchmark");
    println!(
        "binaries: {}",
        boundkeyd()
            .parent()
            .map_or_else(String::new, |p| p.display().to_string())
    );
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "machine: {} {}, {cores} cores; swtpm on loopback TCP ({}), no resource manager",
        std::env::consts::OS,
        std::env::consts::ARCH,
        tpm.tcti()
    );
    println!(
        "versions: {}; tpm2-tools {}",
        version("swtpm", "--version"),
        version("tpm2_createprimary", "--version")
    );

    let tpm_args = vec![
        "--keystore".to_string(),
        "tpm".to_string(),
        "--tcti".to_string(),
        tpm.tcti(),
    ];
    let file_args = vec!["--keystore".to_string(), "file".to_string()];
    let (tpm_joins, tpm_renewals) = agent_runs(&auth, dir.path(), "tpm", &tpm_args);
    let (file_joins, file_renewals) = agent_runs(&auth, dir.path(), "file", &file_args);
    let daemon = daemon_run(&auth, dir.path(), &tpm_args);
    tls_round_trip(&auth); // warm-up
    let tls: Vec<Duration> = (0..RENEWALS).map(|_| tls_round_trip(&auth)).collect();
    let writes = durable_writes(dir.path());
    let tools = tool_runs(&tpm, dir.path());
    let (hal_joins, hal_renewals) = hal_runs(&tpm, dir.path(), "plain", false);
    let (count_join, count_renewal) = commands_per_ceremony(&auth, &tpm, dir.path(), "plain", &[]);
    // A second TPM, whose owner lets the agent persist the storage primary at 0x81000001.
    let tpm_srk = Swtpm::start();
    let srk_args = vec![
        "--keystore".to_string(),
        "tpm".to_string(),
        "--tcti".to_string(),
        tpm_srk.tcti(),
        "--tpm-persist-srk".to_string(),
    ];
    let (srk_count_join, srk_count_renewal) =
        commands_per_ceremony(&auth, &tpm_srk, dir.path(), "srk", &["--tpm-persist-srk"]);
    let (_, srk_renewals) = agent_runs(&auth, dir.path(), "srk", &srk_args);
    let (hal_srk_joins, hal_srk_renewals) = hal_runs(&tpm_srk, dir.path(), "srk", true);
    let attest = attestation_runs(&auth, dir.path());

    println!();
    println!("{:<52} {:>3} {:>10} {:>10}", "", "N", "median", "p90");
    row("agent first join, --keystore tpm", &tpm_joins);
    row("agent renewal,    --keystore tpm", &tpm_renewals);
    row("daemon renewal (SIGUSR1 -> new set), tpm", &daemon.renewals);
    row("agent first join, --keystore file", &file_joins);
    row("agent renewal,    --keystore file", &file_renewals);
    row("tpm2-tools, first-join ops (7 tools)", &tools.join);
    for (name, v) in ["createprimary", "create", "flushcontext"]
        .iter()
        .zip(&tools.create_parts)
    {
        row(&format!("  key creation: tpm2_{name}"), v);
    }
    row("tpm2-tools, renewal ops (4 tools)", &tools.renewal);
    for (name, v) in ["createprimary", "load", "sign", "flushcontext"]
        .iter()
        .zip(&tools.renewal_parts)
    {
        row(&format!("  signature: tpm2_{name}"), v);
    }
    row(
        "  floor: tpm2_getrandom 8 (start-up + 1 command)",
        &tools.floor,
    );
    row("HAL in-process (tss-esapi), create + sign", &hal_joins);
    row("HAL in-process (tss-esapi), sign", &hal_renewals);
    row("agent renewal, tpm, persistent SRK", &srk_renewals);
    row(
        "HAL in-process, create + sign, persistent SRK",
        &hal_srk_joins,
    );
    row("HAL in-process, sign, persistent SRK", &hal_srk_renewals);
    row("TLS round trip (connect, handshake, 1 frame)", &tls);
    row("two durable state writes (storage disk)", &writes);

    row("registration, TPM with EK certificates", &attest.plain);
    row(
        "registration with key attestation (same TPM)",
        &attest.attested,
    );

    println!();
    println!("TPM commands per ceremony (agent, through a recording relay):");
    for (what, v) in [
        ("first join", &count_join),
        ("renewal", &count_renewal),
        ("first join, persistent SRK", &srk_count_join),
        ("renewal, persistent SRK", &srk_count_renewal),
        ("registration (EK TPM)", &attest.plain_commands),
        ("registration, attested", &attest.attested_commands),
    ] {
        println!(
            "  {what:<28} {:>2}: {}",
            v.len(),
            TpmCommandCounter::describe(v)
        );
    }

    let ratio = |a: &[Duration], b: &[Duration]| median(a).as_secs_f64() / median(b).as_secs_f64();
    println!();
    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "median", "agent tpm", "tpm2-tools", "agent/tools", "HAL", "agent/HAL"
    );
    for (what, agent, tool, hal) in [
        ("first join", &tpm_joins, &tools.join, &hal_joins),
        ("renewal", &tpm_renewals, &tools.renewal, &hal_renewals),
    ] {
        println!(
            "{what:<34} {:>12} {:>12} {:>12} {:>10} {:>10}",
            ms(median(agent)),
            ms(median(tool)),
            format!("{:.2}", ratio(agent, tool)),
            ms(median(hal)),
            format!("{:.2}", ratio(agent, hal)),
        );
    }
    println!(
        "TPM backend cost over the file backend (agent medians): first join +{}, renewal +{}",
        ms(median(&tpm_joins).saturating_sub(median(&file_joins))),
        ms(median(&tpm_renewals).saturating_sub(median(&file_renewals)))
    );
    let floor = median(&hal_renewals) + median(&tls);
    println!(
        "renewal floor (HAL sign + TLS round trip): {}; oneshot / floor {:.2}; daemon / floor {:.2}",
        ms(floor),
        median(&tpm_renewals).as_secs_f64() / floor.as_secs_f64(),
        median(&daemon.renewals).as_secs_f64() / floor.as_secs_f64(),
    );
    let with_writes = floor + median(&writes);
    println!(
        "  with the two durable state writes: {}; oneshot / that {:.2}; daemon / that {:.2}",
        ms(with_writes),
        median(&tpm_renewals).as_secs_f64() / with_writes.as_secs_f64(),
        median(&daemon.renewals).as_secs_f64() / with_writes.as_secs_f64(),
    );
    println!(
        "key attestation adds {} and {} TPM commands to a registration",
        ms(median(&attest.attested).saturating_sub(median(&attest.plain))),
        attest.attested_commands.len() as i64 - attest.plain_commands.len() as i64
    );
    let srk_floor = median(&hal_srk_renewals) + median(&tls);
    println!(
        "with a persistent SRK: floor {}; oneshot / floor {:.2}",
        ms(srk_floor),
        median(&srk_renewals).as_secs_f64() / srk_floor.as_secs_f64(),
    );
    println!(
        "daemon after a TPM join: RSS {} KiB, PSS {} KiB, private dirty {} KiB",
        daemon.rss_kib, daemon.pss_kib, daemon.private_dirty_kib
    );
    println!();
    println!("total bench time: {:.1} s", started.elapsed().as_secs_f64());
}
