//! Command line (clap). Turns flags into [`config::Flags`] and dispatches.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use zeroize::Zeroizing;

use crate::commands::{self, Format};
use boundkey_hal::Backend;

use crate::config::{self, Flags};
use crate::error::AgentError;

#[derive(Debug, Parser)]
#[command(
    name = "boundkeyd",
    version,
    about = "boundkey edge agent: joins an auth service with a hardware-bound key and keeps a renewable machine identity"
)]
pub struct Cli {
    /// Log level: error, warn, info, debug or trace (default info; also BOUNDKEY_LOG).
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// The `--log-level` flag, if given.
    pub fn log_level(&self) -> Option<&str> {
        self.log_level.as_deref()
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Join (or renew), write the identity, and keep renewing (or exit after one pass with --oneshot).
    Start(StartArgs),
    /// Manage the bound key.
    Keypair {
        #[command(subcommand)]
        command: KeypairCommand,
    },
    /// Show the stored identity and bound key.
    Status(StatusArgs),
}

#[derive(Debug, Subcommand)]
pub(crate) enum KeypairCommand {
    /// Create the bound key and print its SSH public key (for `boundkeyctl tokens add --initial-public-key`).
    Create(KeypairCreateArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum KeystoreArg {
    File,
    Tpm,
}

#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub(crate) enum FormatArg {
    #[default]
    Text,
    Json,
}

impl From<KeystoreArg> for Backend {
    fn from(k: KeystoreArg) -> Backend {
        match k {
            KeystoreArg::File => Backend::File,
            KeystoreArg::Tpm => Backend::Tpm,
        }
    }
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Format {
        match f {
            FormatArg::Text => Format::Text,
            FormatArg::Json => Format::Json,
        }
    }
}

#[derive(Debug, Clone, Args, Default)]
pub(crate) struct KeystoreArgs {
    /// Key store for the bound key (default: the one the storage directory already uses, else tpm
    /// if this machine has a TPM, else file).
    #[arg(long, value_enum)]
    pub(crate) keystore: Option<KeystoreArg>,
    /// TPM TCTI, e.g. device:/dev/tpmrm0 (default), tabrmd, swtpm:host=127.0.0.1,port=2321.
    #[arg(long, value_name = "TCTI")]
    pub(crate) tcti: Option<String>,
    /// File holding the TPM owner-hierarchy auth value (or env BOUNDKEY_TPM_OWNER_AUTH).
    #[arg(long, value_name = "FILE")]
    pub(crate) tpm_owner_auth_file: Option<PathBuf>,
    /// File holding the auth value of bound keys (or env BOUNDKEY_TPM_KEY_AUTH).
    #[arg(long, value_name = "FILE")]
    pub(crate) tpm_key_auth_file: Option<PathBuf>,
    /// Persistent TPM parent key handle (e.g. 0x81000001) instead of the standard ECC primary.
    #[arg(long, value_name = "HANDLE")]
    pub(crate) tpm_parent: Option<String>,
    /// Allow persisting the standard ECC storage primary at 0x81000001 (uses one persistent
    /// slot and the owner auth), so later operations open it instead of making it again.
    #[arg(long)]
    pub(crate) tpm_persist_srk: bool,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 30s, 20m, 1h)"))
}

#[derive(Debug, Clone, Args)]
pub(crate) struct StartArgs {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Join URI from `boundkeyctl tokens add` (merged over the config file).
    #[arg(long, value_name = "URI")]
    pub(crate) join_uri: Option<String>,
    /// Storage directory (keys and state; mode 0700; one agent per directory).
    #[arg(long, value_name = "DIR")]
    pub(crate) storage: Option<PathBuf>,
    /// Where the identity certificate, key and CA bundle are written.
    #[arg(long, value_name = "DIR")]
    pub(crate) destination: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) keystore: KeystoreArgs,
    /// Requested certificate lifetime, 10s to 7d (default 1h).
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub(crate) certificate_ttl: Option<Duration>,
    /// How often to renew (default 20m; capped at half the certificate TTL).
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub(crate) renewal_interval: Option<Duration>,
    /// How often to send a heartbeat (default 30m).
    #[arg(long, value_name = "DURATION", value_parser = duration, hide = true)]
    pub(crate) heartbeat_interval: Option<Duration>,
    /// Join or renew once, send one heartbeat, and exit.
    #[arg(long)]
    pub(crate) oneshot: bool,
    /// Serve /healthz, /readyz and /metrics on this Unix socket (off by default).
    #[arg(long, value_name = "PATH")]
    pub(crate) health_socket: Option<PathBuf>,
    /// Serve /healthz, /readyz and /metrics on this TCP address, e.g. 127.0.0.1:9105.
    #[arg(long, value_name = "ADDR")]
    pub(crate) health_listen: Option<std::net::SocketAddr>,
    /// File holding the one-time registration secret (or env BOUNDKEY_REGISTRATION_SECRET).
    #[arg(long, value_name = "FILE")]
    pub(crate) registration_secret_file: Option<PathBuf>,
    /// PEM file of the auth service's TLS CA (instead of, or before, a ca_pin).
    #[arg(long, value_name = "FILE")]
    pub(crate) ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct KeypairCreateArgs {
    /// TOML configuration file (for storage and key store settings).
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Storage directory.
    #[arg(long, value_name = "DIR")]
    pub(crate) storage: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) keystore: KeystoreArgs,
    /// Replace an existing key (the old one is kept in the key history).
    #[arg(long)]
    pub(crate) overwrite: bool,
    #[arg(long, value_enum, default_value_t)]
    pub(crate) format: FormatArg,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct StatusArgs {
    /// TOML configuration file (for the storage directory).
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Storage directory.
    #[arg(long, value_name = "DIR")]
    pub(crate) storage: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t)]
    pub(crate) format: FormatArg,
}

fn keystore_flags(k: &KeystoreArgs, f: &mut Flags) {
    f.keystore = k.keystore.map(Backend::from);
    f.tcti = k.tcti.clone();
    f.tpm_owner_auth_file = k.tpm_owner_auth_file.clone();
    f.tpm_key_auth_file = k.tpm_key_auth_file.clone();
    f.tpm_parent = k.tpm_parent.clone();
    f.tpm_persist_srk = k.tpm_persist_srk;
}

/// Runs a parsed command line.
pub(crate) fn run(cli: Cli) -> Result<(), AgentError> {
    match cli.command {
        Command::Start(a) => {
            let mut f = Flags {
                join_uri: a.join_uri.clone(),
                storage: a.storage.clone(),
                destination: a.destination.clone(),
                certificate_ttl: a.certificate_ttl,
                renewal_interval: a.renewal_interval,
                heartbeat_interval: a.heartbeat_interval,
                registration_secret_file: a.registration_secret_file.clone(),
                ca_file: a.ca_file.clone(),
                oneshot: a.oneshot,
                health_socket: a.health_socket.clone(),
                health_listen: a.health_listen,
                ..Flags::default()
            };
            keystore_flags(&a.keystore, &mut f);
            let env_secret = std::env::var(config::SECRET_ENV).ok().map(Zeroizing::new);
            let s = config::load(a.config.as_deref(), &f, env_secret)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
                .map_err(AgentError::Runtime)?;
            rt.block_on(crate::daemon::run(s))
        }
        Command::Keypair {
            command: KeypairCommand::Create(a),
        } => {
            let mut f = Flags {
                storage: a.storage.clone(),
                ..Flags::default()
            };
            keystore_flags(&a.keystore, &mut f);
            let s = config::load(a.config.as_deref(), &f, None)?;
            commands::keypair_create(&s, a.overwrite, a.format.into(), &mut std::io::stdout())
        }
        Command::Status(a) => {
            let f = Flags {
                storage: a.storage.clone(),
                ..Flags::default()
            };
            let s = config::load(a.config.as_deref(), &f, None)?;
            commands::status(&s, a.format.into(), &mut std::io::stdout())
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn start_flags_parse() {
        let cli = Cli::try_parse_from([
            "boundkeyd",
            "start",
            "--join-uri",
            "boundkey+bound-keypair://t@h:1",
            "--storage",
            "/s",
            "--destination",
            "/d",
            "--keystore",
            "tpm",
            "--tcti",
            "swtpm:host=127.0.0.1,port=1",
            "--certificate-ttl",
            "10s",
            "--renewal-interval",
            "20m",
            "--oneshot",
        ])
        .unwrap();
        let Command::Start(a) = cli.command else {
            panic!()
        };
        assert_eq!(a.certificate_ttl, Some(Duration::from_secs(10)));
        assert_eq!(a.renewal_interval, Some(Duration::from_secs(1200)));
        assert!(a.oneshot);
        assert!(matches!(a.keystore.keystore, Some(KeystoreArg::Tpm)));
        let e =
            Cli::try_parse_from(["boundkeyd", "start", "--certificate-ttl", "soon"]).unwrap_err();
        assert!(e.to_string().contains("30s"), "{e}");
    }

    #[test]
    fn keypair_and_status_parse() {
        let cli = Cli::try_parse_from([
            "boundkeyd",
            "keypair",
            "create",
            "--storage",
            "/s",
            "--overwrite",
            "--format",
            "json",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Keypair {
                command: KeypairCommand::Create(KeypairCreateArgs {
                    overwrite: true,
                    format: FormatArg::Json,
                    ..
                })
            }
        ));
        let cli =
            Cli::try_parse_from(["boundkeyd", "status", "--storage", "/s", "--format", "json"])
                .unwrap();
        assert!(matches!(cli.command, Command::Status(_)));
    }
}
