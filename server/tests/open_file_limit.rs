//! `--max-connections` beyond the open-file limit would make `accept` fail with EMFILE for
//! everyone alike; boundkey-authd raises its soft limit as far as the hard one allows and
//! otherwise lowers the cap, with a warning.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_is_fitted_to_the_open_file_limit() {
    // Inherited by the server. This is the only test in this binary, and 300 descriptors are
    // plenty for it (the hard limit cannot be raised back without CAP_SYS_RESOURCE).
    assert!(getrlimit(Resource::Nofile).maximum.is_none_or(|m| m >= 300));
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(200),
            maximum: Some(300),
        },
    )
    .unwrap();
    let s = Server::start();
    let log = s.log();
    assert!(
        log.contains("--max-connections lowered to fit the open-file limit"),
        "{log}"
    );
    // The soft limit (200) was raised to the hard one (300), less the reserve of 64.
    assert!(log.contains("236"), "{log}");
    // Still serving.
    s.ctl(&["bots", "add", "robot"]);
    let v = s.ctl(&[
        "tokens",
        "add",
        "--bot",
        "robot",
        "--join-method",
        "bound_keypair",
    ]);
    let mut agent = Agent::new(
        &s,
        v["name"].as_str().unwrap(),
        v["registration_secret"].as_str(),
    );
    agent.join().await.expect("join");
}
