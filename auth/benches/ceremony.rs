//! Server-side cost of a bound-keypair ceremony, sans I/O: `Service::open` + `Session::handle`
//! over the in-memory store, with the client's signing excluded from the measured time.
//! Ceremonies/s per core = 1 / (time per ceremony).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use boundkey_auth::admin::{new_bound_keypair_token, NewBoundKeypairToken};
use boundkey_auth::authority::{Authority, AuthorityState};
use boundkey_auth::service::{Action, Connection, Service};
use boundkey_auth::store::memory::MemoryStore;
use boundkey_auth::store::Store;
use boundkey_auth::ServiceConfig;
use boundkey_proto::claims::RecoveryMode;
use boundkey_proto::{jws, keys, BotParams, ChallengeSolution, ClientMessage, Init, ServerMessage};
use criterion::{criterion_group, criterion_main, Criterion};
use p256::ecdsa::SigningKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

const NOW: i64 = 1_800_000_000;

struct Fixture {
    svc: Service,
    bound: SigningKey,
    identity: SigningKey,
    cert: Option<CertificateDer<'static>>,
    join_state: Option<String>,
}

impl Fixture {
    fn new(n_tokens: usize) -> (Self, Vec<String>) {
        let store = Arc::new(MemoryStore::new());
        let state = AuthorityState::generate("bench", NOW).unwrap();
        let svc = Service::new(
            store.clone(),
            Arc::new(Authority::load(&state).unwrap()),
            ServiceConfig::default(),
        );
        let bound = SigningKey::random(&mut rand_core::OsRng);
        let mut names = Vec::new();
        for i in 0..n_tokens {
            let (t, _) = new_bound_keypair_token(
                NewBoundKeypairToken {
                    name: Some(format!("t{i}")),
                    bot_name: "bench".into(),
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
            names.push(t.name);
        }
        let f = Fixture {
            svc,
            bound,
            identity: SigningKey::random(&mut rand_core::OsRng),
            cert: None,
            join_state: None,
        };
        (f, names)
    }

    /// Runs one ceremony; returns the time spent inside the service.
    fn ceremony(&mut self, token: &str, with_cert: bool) -> Duration {
        let init = ClientMessage::Init(Init {
            token: token.into(),
            params: BotParams {
                identity_public_key: keys::pkix_b64(&p256::PublicKey::from(
                    self.identity.verifying_key(),
                )),
                ttl_secs: 3600,
            },
            registration_secret: None,
            join_state: self.join_state.clone(),
        });
        let conn = Connection {
            remote_addr: "127.0.0.1:1".into(),
            peer_certificates: if with_cert {
                self.cert.iter().cloned().collect()
            } else {
                vec![]
            },
        };
        let t0 = Instant::now();
        let (mut session, action) = self.svc.open(conn, init, NOW);
        let mut spent = t0.elapsed();
        let Action::Reply(ServerMessage::Challenge(c)) = action else {
            panic!("{action:?}")
        };
        let solution = jws::sign(&self.bound, None, c.document.as_bytes());
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
        self.cert = Some(CertificateDer::from_pem_slice(r.certificate.as_bytes()).unwrap());
        self.join_state = r.join_state;
        spent
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("ceremony_server_side");
    g.sample_size(30).measurement_time(Duration::from_secs(8));

    g.bench_function("first_join_preregistered_key", |b| {
        b.iter_custom(|iters| {
            let (mut f, names) = Fixture::new(iters as usize);
            names.iter().map(|n| f.ceremony(n, false)).sum()
        })
    });

    g.bench_function("renewal_mtls_join_state", |b| {
        let (mut f, names) = Fixture::new(1);
        f.ceremony(&names[0], false);
        b.iter_custom(|iters| (0..iters).map(|_| f.ceremony(&names[0], true)).sum())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
