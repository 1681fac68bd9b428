//! Key-store operation costs: TPM backend against a local swtpm (loopback TCP, no resource
//! manager) and the file backend. Small samples keep a full run to well under a minute.
//!
//! Each TPM operation includes what the store always does: start a session, recreate the
//! storage primary, load the key, act, flush everything.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use boundkey_hal::{Digest, FileKeyStore, KeyName, KeyStore};
use criterion::{criterion_group, criterion_main, Criterion};

fn quick(c: &mut Criterion) -> criterion::BenchmarkGroup<'_, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group("keystore");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g
}

fn file_backend(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = FileKeyStore::open(dir.path()).expect("open file store");
    let name = KeyName::new("bench").expect("name");
    store.create(&name).expect("create");
    let digest = Digest::of(b"bench");
    let mut g = quick(c);
    g.bench_function("file/sign", |b| {
        b.iter(|| store.sign_digest(&name, &digest).expect("sign"))
    });
    g.finish();
}

#[cfg(feature = "tpm")]
fn tpm_backend(c: &mut Criterion) {
    use boundkey_hal::{TpmConfig, TpmKeyStore};
    use boundkey_testkit::Swtpm;

    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = TpmConfig {
        tcti: tpm.tcti(),
        ..TpmConfig::default()
    };
    let mut store = TpmKeyStore::open(dir.path(), cfg).expect("open tpm store");
    let name = KeyName::new("bench").expect("name");
    store.create(&name).expect("create");
    let digest = Digest::of(b"bench");
    let mut g = quick(c);
    g.bench_function("tpm/sign", |b| {
        b.iter(|| store.sign_digest(&name, &digest).expect("sign"))
    });
    g.bench_function("tpm/public_key", |b| {
        b.iter(|| store.public_key(&name).expect("public key"))
    });
    let mut n = 0u64;
    g.bench_function("tpm/create", |b| {
        b.iter(|| {
            n += 1;
            let k = KeyName::new(&format!("k{n}")).expect("name");
            store.create(&k).expect("create")
        })
    });
    g.finish();
}

#[cfg(not(feature = "tpm"))]
fn tpm_backend(_: &mut Criterion) {}

criterion_group!(benches, file_backend, tpm_backend);
criterion_main!(benches);
