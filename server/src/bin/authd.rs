//! `boundkey-authd`: the reference boundkey auth service.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use boundkey_auth::ServiceConfig;
use boundkey_server::daemon::{self, Options};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "boundkey-authd", version, about = "The boundkey auth service")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the service (creates the CAs on first start).
    Start(Start),
}

#[derive(clap::Args)]
struct Start {
    /// State directory (created with mode 0700): database, ca.pem, admin.sock.
    #[arg(long, env = "BOUNDKEY_DATA_DIR")]
    data_dir: PathBuf,
    /// Address of the TLS listener for agents; port 0 picks a free port (printed at start).
    #[arg(long, default_value = "0.0.0.0:3025")]
    listen: String,
    /// Cluster name: issuer and audience of every document, part of SPIFFE ids.
    #[arg(long)]
    cluster: String,
    /// Storage URL: sqlite:PATH (default sqlite:DATA_DIR/boundkey.db).
    #[arg(long)]
    storage: Option<String>,
    /// Extra DNS name or IP address for the listener's certificate (repeatable).
    #[arg(long = "tls-name")]
    tls_names: Vec<String>,
    /// Deadline for one connection: TLS handshake plus the whole ceremony.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    ceremony_timeout: Duration,
    /// Most connections served at once; more wait in the listen backlog.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// How long an expired bot instance stays listed before it is purged.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    instance_retention: Duration,
    /// How long audit events are kept (0 keeps them forever).
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    audit_retention: Duration,
    /// How often expired instances are purged.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    purge_interval: Duration,
    /// Identity certificate lifetime when an agent asks for none.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    default_cert_ttl: Duration,
    /// Longest identity certificate lifetime granted.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    max_cert_ttl: Duration,
    /// Shortest identity certificate lifetime granted.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    min_cert_ttl: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let Cmd::Start(s) = cli.cmd;
    if s.min_cert_ttl > s.max_cert_ttl {
        eprintln!("boundkey-authd: error: --min-cert-ttl is above --max-cert-ttl");
        return ExitCode::from(2);
    }
    let opts = Options {
        data_dir: s.data_dir,
        listen: s.listen,
        cluster: s.cluster,
        storage: s.storage,
        tls_names: s.tls_names,
        ceremony_timeout: s.ceremony_timeout,
        max_connections: s.max_connections,
        instance_retention: s.instance_retention,
        purge_interval: s.purge_interval,
        service: ServiceConfig {
            default_ttl_secs: s.default_cert_ttl.as_secs(),
            max_ttl_secs: s.max_cert_ttl.as_secs(),
            min_ttl_secs: s.min_cert_ttl.as_secs(),
            audit_retention_secs: s.audit_retention.as_secs(),
            ..ServiceConfig::default()
        },
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("boundkey-authd: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout();
    match rt.block_on(daemon::start(opts, &mut stdout)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("boundkey-authd: error: {e}");
            ExitCode::FAILURE
        }
    }
}
