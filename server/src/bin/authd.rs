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
    /// Cluster name: issuer and audience of every document. In lower case it is the SPIFFE
    /// trust domain (spiffe://CLUSTER/bot/NAME); 1-64 characters from [A-Za-z0-9._-], not . or ..
    #[arg(long, value_parser = parse_cluster)]
    cluster: String,
    /// Storage URL: sqlite:PATH (default sqlite:DATA_DIR/boundkey.db) or
    /// postgres://USER@HOST:PORT/DB[?sslmode=…&sslrootcert=PATH] (no password in the URL).
    #[arg(long)]
    storage: Option<String>,
    /// PostgreSQL: file holding the database password (else BOUNDKEY_STORAGE_PASSWORD, then
    /// PGPASSWORD, are read).
    #[arg(long, env = "BOUNDKEY_STORAGE_PASSWORD_FILE")]
    storage_password_file: Option<PathBuf>,
    /// PostgreSQL: most connections this process holds at once.
    #[arg(long, default_value_t = boundkey_server::store::postgres::DEFAULT_POOL_SIZE)]
    storage_pool_size: u32,
    /// Extra DNS name or IP address for the listener's certificate (repeatable).
    #[arg(long = "tls-name")]
    tls_names: Vec<String>,
    /// Deadline for one connection: TLS handshake plus the whole ceremony.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    ceremony_timeout: Duration,
    /// Deadline from connect to the first valid message (TLS handshake included).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    first_frame_timeout: Duration,
    /// Most connections served at once; more wait in the listen backlog.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Most connections from one address (an IPv6 /64) at once; more are closed at once.
    #[arg(long, default_value_t = 128)]
    max_connections_per_address: usize,
    /// Most connections from one address that have not yet sent a valid first message.
    #[arg(long, default_value_t = 32)]
    max_pending_per_address: usize,
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
    /// How long after `boundkeyctl ca rotate` the new key begins to sign (it is trusted at
    /// once). Several authd processes sharing one database need every process to have read the
    /// new CA state first: at least 10s (they read it every 5s). Default: 15s on PostgreSQL,
    /// none on SQLite.
    #[arg(long, value_parser = humantime::parse_duration)]
    ca_rotation_delay: Option<Duration>,
}

/// Refuses at argument parsing what can never be a trust domain or was always refused later.
/// Upper case is accepted (clusters created before the trust-domain rule must stay loadable
/// under their name) and lowered in SPIFFE IDs; `main` says so.
fn parse_cluster(s: &str) -> Result<String, String> {
    boundkey_auth::admin::validate_name(s)
        .map_err(|_| "use 1-64 characters from [A-Za-z0-9._-], not . or ..".to_string())?;
    boundkey_auth::authority::trust_domain(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

/// `RUST_LOG` holds `level` or `target=level` directives separated by commas (default `info`).
/// A `Targets` filter rather than `EnvFilter`: the latter's regex-based span matching would be
/// unified into the agent's tracing-subscriber by a `--workspace` build and grow the agent.
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let spec = std::env::var("RUST_LOG").unwrap_or_default();
    let filter = match spec.trim() {
        "" => tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO),
        s => s.parse().unwrap_or_else(|e| {
            eprintln!("boundkey-authd: warning: RUST_LOG={s:?} ignored ({e}); logging at info");
            tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
        }),
    };
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false),
        )
        .with(filter)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let Cmd::Start(s) = cli.cmd;
    if s.cluster.bytes().any(|b| b.is_ascii_uppercase()) {
        eprintln!(
            "boundkey-authd: warning: cluster name {:?} has upper-case letters; SPIFFE IDs use \
             the lower-case trust domain {:?}",
            s.cluster,
            s.cluster.to_ascii_lowercase()
        );
    }
    if s.min_cert_ttl > s.max_cert_ttl {
        eprintln!("boundkey-authd: error: --min-cert-ttl is above --max-cert-ttl");
        return ExitCode::from(2);
    }
    let opts = Options {
        data_dir: s.data_dir,
        listen: s.listen,
        cluster: s.cluster,
        storage: s.storage,
        storage_password_file: s.storage_password_file,
        storage_pool_size: s.storage_pool_size,
        tls_names: s.tls_names,
        ceremony_timeout: s.ceremony_timeout,
        first_frame_timeout: s.first_frame_timeout,
        max_connections: s.max_connections,
        max_connections_per_address: s.max_connections_per_address,
        max_pending_per_address: s.max_pending_per_address,
        instance_retention: s.instance_retention,
        purge_interval: s.purge_interval,
        ca_rotation_delay: s.ca_rotation_delay,
        service: ServiceConfig {
            default_ttl_secs: s.default_cert_ttl.as_secs(),
            max_ttl_secs: s.max_cert_ttl.as_secs(),
            min_ttl_secs: s.min_cert_ttl.as_secs(),
            audit_retention_secs: s.audit_retention.as_secs(),
            ..ServiceConfig::default()
        },
    };
    // The main runtime accepts and serves the admin socket; connections run on per-core
    // workers (server/src/workers.rs).
    let rt = match tokio::runtime::Builder::new_current_thread()
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
