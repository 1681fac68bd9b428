//! Fleet-sized stores: seed a million instances, then measure the admin views and a ceremony.
//! A plain main (no harness), three commands:
//!
//! ```text
//! cargo bench -p boundkey-server --bench fleet -- seed --storage URL --instances N
//! cargo bench -p boundkey-server --bench fleet -- views --data-dir DIR [--samples N] [--ctl PATH]
//! cargo bench -p boundkey-server --bench fleet -- ceremony --storage URL [--samples N]
//! ```
//!
//! `seed` writes N bot instances into an empty store (SQLite file or PostgreSQL database), each
//! with its bound-keypair token, an authentication and heartbeat history of 1 to 10 entries
//! (as the model keeps at most 10), and its join's audit event, in batched transactions
//! (SQLite) or COPY (PostgreSQL). `views` times `boundkeyctl` against a running authd on that
//! store: the first page and a deep page of `instances ls --limit 100`, and `instances show`.
//! `ceremony` times renewals through the auth service over the store (no TLS: the store's
//! share of a ceremony is what grows with the fleet, if anything does). A PostgreSQL password
//! comes from `PGPASSWORD` or `BOUNDKEY_STORAGE_PASSWORD`. Figures: docs/performance.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boundkey_auth::admin::{new_bound_keypair_token, NewBoundKeypairToken};
use boundkey_auth::authority::{Authority, AuthorityState};
use boundkey_auth::model::{
    AuditEvent, Authentication, Bot, BotInstance, HeartbeatRecord, Token, TokenStatus,
};
use boundkey_auth::service::{Action, Connection, Service};
use boundkey_auth::store::Store;
use boundkey_auth::ServiceConfig;
use boundkey_proto::claims::RecoveryMode;
use boundkey_proto::{
    jws, keys, BotParams, ChallengeSolution, ClientMessage, Heartbeat, Init, JoinMethod,
    KeyBackend, ServerMessage,
};
use boundkey_server::store::postgres::config::resolve_password;
use boundkey_server::store::{PostgresOptions, StorageUrl};
use p256::ecdsa::SigningKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

const BOTS: usize = 100;
/// Rows per transaction (SQLite) or per COPY (PostgreSQL).
const BATCH: usize = 20_000;
/// Seeded instances were created over the 90 days before this.
const NOW: i64 = 1_800_000_000;
const DAY: i64 = 86_400;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    // `cargo bench` appends `--bench`.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let samples: usize = arg(&args, "--samples").map_or(200, |s| s.parse().unwrap());
    match args.first().map(String::as_str) {
        Some("seed") => {
            let url = arg(&args, "--storage").expect("--storage URL");
            let n: usize = arg(&args, "--instances")
                .expect("--instances N")
                .parse()
                .unwrap();
            seed(&StorageUrl::parse(&url).unwrap(), n);
        }
        Some("views") => {
            let dir = PathBuf::from(arg(&args, "--data-dir").expect("--data-dir DIR"));
            let ctl = arg(&args, "--ctl").unwrap_or_else(|| "target/release/boundkeyctl".into());
            views(&dir, Path::new(&ctl), samples);
        }
        Some("ceremony") => {
            let url = arg(&args, "--storage").expect("--storage URL");
            ceremony(&StorageUrl::parse(&url).unwrap(), samples);
        }
        // Plain `cargo bench` runs every bench: this one needs a store to work on.
        _ => eprintln!("fleet: usage: seed|views|ceremony … (see the file's doc comment)"),
    }
}

fn open(url: &StorageUrl) -> Arc<dyn Store> {
    let pg = match url {
        StorageUrl::Postgres(_) => PostgresOptions {
            password: resolve_password(None).unwrap(),
            pool_size: 4,
        },
        StorageUrl::Sqlite(_) => PostgresOptions::default(),
    };
    url.open(&pg).unwrap()
}

/// What one seeded device looks like: its token, its instance (history included) and the
/// audit event of its latest join.
struct Device {
    token: Token,
    instance: BotInstance,
    audit: AuditEvent,
}

/// Builds devices from fixed keys (their text is what takes room, not their variety).
struct Factory {
    token: Token,
    identity_pem: String,
    bound_ssh: String,
    n: usize,
}

impl Factory {
    fn new(n: usize) -> Self {
        let bound = SigningKey::random(&mut rand_core::OsRng);
        let identity = SigningKey::random(&mut rand_core::OsRng);
        let bound_ssh = keys::ssh_public_key(&p256::PublicKey::from(bound.verifying_key()));
        let (token, _) = new_bound_keypair_token(
            NewBoundKeypairToken {
                name: Some("template".into()),
                bot_name: "fleet-000".into(),
                initial_public_key: Some(bound_ssh.clone()),
                ..Default::default()
            },
            NOW - 90 * DAY,
        )
        .unwrap();
        use p256::pkcs8::EncodePublicKey;
        let identity_pem = p256::PublicKey::from(identity.verifying_key())
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .unwrap();
        Factory {
            token,
            identity_pem,
            bound_ssh,
            n,
        }
    }

    fn device(&self, i: usize) -> Device {
        let bot = format!("fleet-{:03}", i % BOTS);
        let name = format!("dev-{i:07}");
        let id = uuid::Uuid::from_u128(0x5eed_0000_0000_4000_8000_0000_0000_0000 | i as u128)
            .to_string();
        let created = NOW - 90 * DAY + (i as i64 * 90 * DAY) / self.n.max(1) as i64;
        // One device in twenty stopped renewing two days ago.
        let last = if i.is_multiple_of(20) {
            NOW - 2 * DAY
        } else {
            NOW - 600
        };
        let depth = 1 + i % 10;
        let mut inst = BotInstance::new_with_id(
            id.clone(),
            &bot,
            JoinMethod::BoundKeypair,
            &name,
            None,
            created,
        );
        for k in 0..depth {
            let at = last - (depth - 1 - k) as i64 * 1200;
            let generation = (k + 1) as u64;
            inst.status.generation = generation;
            inst.record_authentication(Authentication {
                authenticated_at: at,
                join_method: JoinMethod::BoundKeypair,
                join_token: name.clone(),
                generation,
                public_key: self.identity_pem.clone(),
                bound_public_key: Some(self.bound_ssh.clone()),
                remote_addr: format!("198.51.100.{}:{}", i % 250, 40_000 + k),
            });
            inst.record_heartbeat(HeartbeatRecord {
                recorded_at: at + 5,
                remote_addr: format!("198.51.100.{}:{}", i % 250, 41_000 + k),
                heartbeat: Heartbeat {
                    is_startup: k == 0,
                    version: "0.1.0".into(),
                    hostname: format!("device-{i:07}.example"),
                    uptime_secs: (k as u64) * 1200,
                    os: "linux".into(),
                    arch: "aarch64".into(),
                    one_shot: false,
                    keystore: KeyBackend::Tpm,
                },
            });
        }
        inst.status.expires = last + 3600 + 300;
        inst.revision = 1;
        let mut token = self.token.clone();
        token.name = name.clone();
        token.spec.bot_name = bot.clone();
        token.created_at = created;
        token.status = TokenStatus {
            bound_public_key: Some(self.bound_ssh.clone()),
            bound_instance_id: Some(id.clone()),
            recovery_count: 1,
            last_recovered_at: Some(created),
            ..Default::default()
        };
        let mut audit = AuditEvent::new("bot.join", last, true)
            .field("join_method", "bound_keypair")
            .field("case", "renewal")
            .field("generation", depth);
        audit.bot_name = Some(bot);
        audit.instance_id = Some(id);
        audit.token_name = Some(name);
        audit.remote_addr = Some(format!("198.51.100.{}:40000", i % 250));
        Device {
            token,
            instance: inst,
            audit,
        }
    }
}

fn seed(url: &StorageUrl, n: usize) {
    // Opening applies the migrations: the seeded rows meet the real schema.
    let store = open(url);
    for b in 0..BOTS {
        let bot = Bot {
            name: format!("fleet-{b:03}"),
            created_at: NOW - 90 * DAY,
        };
        store.create_bot(&bot).unwrap();
    }
    drop(store);
    let f = Factory::new(n);
    let t0 = Instant::now();
    match url {
        StorageUrl::Sqlite(path) => seed_sqlite(path, &f, n),
        StorageUrl::Postgres(u) => seed_postgres(u, &f, n),
    }
    println!(
        "seeded {n} instances (+ tokens, audit) into {url} in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

fn seed_sqlite(path: &Path, f: &Factory, n: usize) {
    let mut c = rusqlite::Connection::open(path).unwrap();
    // A bulk load that can be redone: durability per batch is not needed.
    c.pragma_update(None, "synchronous", "OFF").unwrap();
    let mut i = 0;
    while i < n {
        let tx = c.transaction().unwrap();
        {
            let mut ti = tx
                .prepare_cached(
                    "INSERT INTO tokens (name, bot_name, created_at, spec, status, revision)
                     VALUES (?1, ?2, ?3, ?4, ?5, 2)",
                )
                .unwrap();
            let mut ii = tx
                .prepare_cached(
                    "INSERT INTO instances (id, bot_name, created_at, expires, doc, revision)
                     VALUES (?1, ?2, ?3, ?4, ?5, 1)",
                )
                .unwrap();
            let mut ai = tx
                .prepare_cached(
                    "INSERT INTO audit (time, type, bot_name, doc) VALUES (?1, ?2, ?3, ?4)",
                )
                .unwrap();
            for k in i..(i + BATCH).min(n) {
                let d = f.device(k);
                let t = &d.token;
                ti.execute(rusqlite::params![
                    t.name,
                    t.spec.bot_name,
                    t.created_at,
                    serde_json::to_string(&t.spec).unwrap(),
                    serde_json::to_string(&t.status).unwrap()
                ])
                .unwrap();
                let s = &d.instance.spec;
                ii.execute(rusqlite::params![
                    s.instance_id,
                    s.bot_name,
                    s.created_at,
                    d.instance.status.expires,
                    serde_json::to_string(&d.instance).unwrap()
                ])
                .unwrap();
                ai.execute(rusqlite::params![
                    d.audit.time,
                    d.audit.kind,
                    d.audit.bot_name,
                    serde_json::to_string(&d.audit).unwrap()
                ])
                .unwrap();
            }
        }
        tx.commit().unwrap();
        i += BATCH;
        progress(i.min(n), n);
    }
    c.execute_batch("ANALYZE").unwrap();
}

fn seed_postgres(url: &boundkey_server::store::PostgresUrl, f: &Factory, n: usize) {
    let password = resolve_password(None).unwrap();
    let config = url
        .client_config(password.as_ref().map(|p| p.as_str()))
        .unwrap();
    let tls = boundkey_server::store::postgres::tls::MakeRustlsConnect::new(
        url.tls_config(Arc::new(rustls::crypto::ring::default_provider()))
            .unwrap(),
    );
    let mut c = config.connect(tls).unwrap();
    let csv = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let mut i = 0;
    while i < n {
        let end = (i + BATCH).min(n);
        let devices: Vec<Device> = (i..end).map(|k| f.device(k)).collect();
        let mut tx = c.transaction().unwrap();
        let mut w = tx
            .copy_in("COPY tokens (name, bot_name, created_at, spec, status, revision) FROM STDIN WITH (FORMAT csv)")
            .unwrap();
        for d in &devices {
            let t = &d.token;
            writeln!(
                w,
                "{},{},{},{},{},2",
                csv(&t.name),
                csv(&t.spec.bot_name),
                t.created_at,
                csv(&serde_json::to_string(&t.spec).unwrap()),
                csv(&serde_json::to_string(&t.status).unwrap())
            )
            .unwrap();
        }
        w.finish().unwrap();
        let mut w = tx
            .copy_in("COPY instances (id, bot_name, created_at, expires, doc, revision) FROM STDIN WITH (FORMAT csv)")
            .unwrap();
        for d in &devices {
            let s = &d.instance.spec;
            writeln!(
                w,
                "{},{},{},{},{},1",
                csv(&s.instance_id),
                csv(&s.bot_name),
                s.created_at,
                d.instance.status.expires,
                csv(&serde_json::to_string(&d.instance).unwrap())
            )
            .unwrap();
        }
        w.finish().unwrap();
        let mut w = tx
            .copy_in("COPY audit (time, type, bot_name, doc) FROM STDIN WITH (FORMAT csv)")
            .unwrap();
        for d in &devices {
            writeln!(
                w,
                "{},{},{},{}",
                d.audit.time,
                csv(&d.audit.kind),
                csv(d.audit.bot_name.as_deref().unwrap_or_default()),
                csv(&serde_json::to_string(&d.audit).unwrap())
            )
            .unwrap();
        }
        w.finish().unwrap();
        tx.commit().unwrap();
        i = end;
        progress(i, n);
    }
    c.batch_execute("ANALYZE").unwrap();
}

fn progress(done: usize, n: usize) {
    if done % 100_000 < BATCH || done == n {
        eprintln!("  {done}/{n}");
    }
}

/// p50, p99 and mean of `d`, in ms.
fn summary(mut d: Vec<Duration>) -> String {
    d.sort();
    let ms = |x: Duration| x.as_secs_f64() * 1000.0;
    let at = |q: f64| ms(d[((d.len() as f64 * q) as usize).min(d.len() - 1)]);
    let mean = d.iter().map(|x| ms(*x)).sum::<f64>() / d.len() as f64;
    format!(
        "p50 {:7.2} ms  p99 {:7.2} ms  mean {:7.2} ms  (n={})",
        at(0.50),
        at(0.99),
        mean,
        d.len()
    )
}

fn ctl(ctl: &Path, dir: &Path, args: &[&str]) -> (Duration, serde_json::Value) {
    let t0 = Instant::now();
    let out = Command::new(ctl)
        .arg("--data-dir")
        .arg(dir)
        .args(["--format", "json"])
        .args(args)
        .output()
        .unwrap();
    let spent = t0.elapsed();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (spent, serde_json::from_slice(&out.stdout).unwrap())
}

fn views(dir: &Path, ctl_bin: &Path, samples: usize) {
    // Warm-up, and the cursors: the first page's next, and one deep in the listing (the page
    // after the instance created at the midpoint of the seeded 90 days).
    let (_, first) = ctl(ctl_bin, dir, &["instances", "ls", "--limit", "100"]);
    let next = first["next"]
        .as_str()
        .expect("more than one page")
        .to_string();
    let deep = format!("{}.{}", NOW - 45 * DAY, "0");
    let ids: Vec<String> = first["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance_id"].as_str().unwrap().to_string())
        .collect();
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("instances ls --limit 100", vec![]),
        (
            "instances ls --limit 100 --after <page 2>",
            vec!["--after".into(), next],
        ),
        (
            "instances ls --limit 100 --after <middle>",
            vec!["--after".into(), deep],
        ),
        (
            "instances ls --limit 100 --bot fleet-042 --state active",
            vec![
                "--bot".into(),
                "fleet-042".into(),
                "--state".into(),
                "active".into(),
            ],
        ),
        (
            "instances ls --limit 100 --bot fleet-042 --since <middle>",
            vec![
                "--bot".into(),
                "fleet-042".into(),
                "--since".into(),
                // NOW - 45 days, where `deep` starts.
                "2026-12-01T08:00:00Z".into(),
            ],
        ),
    ];
    for (label, extra) in &cases {
        let mut args = vec!["instances", "ls", "--limit", "100"];
        args.extend(extra.iter().map(String::as_str));
        let times: Vec<Duration> = (0..samples)
            .map(|_| {
                let (t, v) = ctl(ctl_bin, dir, &args);
                assert_eq!(v["instances"].as_array().unwrap().len(), 100, "{label}");
                t
            })
            .collect();
        println!("{label:58} {}", summary(times));
    }
    let times: Vec<Duration> = (0..samples)
        .map(|k| ctl(ctl_bin, dir, &["instances", "show", &ids[k % ids.len()]]).0)
        .collect();
    println!("{:58} {}", "instances show ID", summary(times));
    let times: Vec<Duration> = (0..samples)
        .map(|_| ctl(ctl_bin, dir, &["info"]).0)
        .collect();
    println!("{:58} {}", "info (boundkeyctl's own cost)", summary(times));
    // Counts every bot's tokens, instances and live instances: the whole fleet, from indexes.
    let times: Vec<Duration> = (0..samples.min(20))
        .map(|_| {
            let (t, v) = ctl(ctl_bin, dir, &["bots", "ls"]);
            assert!(v.as_array().is_some_and(|b| b.len() >= BOTS), "bots ls");
            t
        })
        .collect();
    println!("{:58} {}", "bots ls (100 bots)", summary(times));
}

/// Renewals of one device through `Service` over the store: token, instance and lock reads,
/// then the compare-and-swap commit with its audit event. The client's signing is excluded.
fn ceremony(url: &StorageUrl, samples: usize) {
    let store = open(url);
    let state = AuthorityState::generate("bench", NOW).unwrap();
    let svc = Service::new(
        store.clone(),
        Arc::new(Authority::load(&state).unwrap()),
        ServiceConfig::default(),
    );
    let bound = SigningKey::random(&mut rand_core::OsRng);
    let identity = SigningKey::random(&mut rand_core::OsRng);
    let name = format!("bench-{}-{}", std::process::id(), NOW);
    let (t, _) = new_bound_keypair_token(
        NewBoundKeypairToken {
            name: Some(name.clone()),
            bot_name: "fleet-001".into(),
            initial_public_key: Some(keys::ssh_public_key(&p256::PublicKey::from(
                bound.verifying_key(),
            ))),
            recovery_mode: Some(RecoveryMode::Relaxed),
            ..Default::default()
        },
        NOW,
    )
    .unwrap();
    store.create_token(&t).unwrap();
    let mut cert: Option<CertificateDer<'static>> = None;
    let mut join_state = None;
    let mut run = |cert: &mut Option<CertificateDer<'static>>| {
        let init = ClientMessage::Init(Init {
            token: name.clone(),
            params: BotParams {
                identity_public_key: keys::pkix_b64(&p256::PublicKey::from(
                    identity.verifying_key(),
                )),
                ttl_secs: 3600,
            },
            registration_secret: None,
            join_state: join_state.clone(),
        });
        let conn = Connection {
            remote_addr: "127.0.0.1:1".into(),
            peer_certificates: cert.iter().cloned().collect(),
        };
        let t0 = Instant::now();
        let (mut session, action) = svc.open(conn, init, NOW);
        let mut spent = t0.elapsed();
        let Action::Reply(ServerMessage::Challenge(c)) = action else {
            panic!("{action:?}")
        };
        let solution = jws::sign(&bound, None, c.document.as_bytes());
        let t1 = Instant::now();
        let action = session.handle(
            ClientMessage::ChallengeSolution(ChallengeSolution {
                solution,
                identity_proof: None,
                attestation: None,
            }),
            NOW,
        );
        spent += t1.elapsed();
        let Action::Close(ServerMessage::Result(r)) = action else {
            panic!("{action:?}")
        };
        *cert = Some(CertificateDer::from_pem_slice(r.certificate.as_bytes()).unwrap());
        join_state = r.join_state;
        spent
    };
    run(&mut cert);
    for _ in 0..10 {
        run(&mut cert);
    }
    let times: Vec<Duration> = (0..samples).map(|_| run(&mut cert)).collect();
    println!("{:58} {}", format!("renewal over {url}"), summary(times));
    store.delete_token(&name).unwrap();
}
