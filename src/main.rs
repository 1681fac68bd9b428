//! `boundkeyd`: see `docs/agent.md`.

use std::process::ExitCode;

use boundkey::Cli;
use clap::Parser;
use tracing::Level;

fn log_level(flag: Option<&str>) -> Level {
    let s = flag
        .map(str::to_string)
        .or_else(|| std::env::var("BOUNDKEY_LOG").ok())
        .unwrap_or_default();
    match s.to_ascii_lowercase().as_str() {
        "error" => Level::ERROR,
        "warn" | "warning" => Level::WARN,
        "debug" => Level::DEBUG,
        "trace" => Level::TRACE,
        _ => Level::INFO,
    }
}

fn main() -> ExitCode {
    // libtss2 prints its own ERROR lines for every failed TPM command, before the agent's one
    // clear line. Quiet by default; an operator debugging the TPM sets TSS2_LOG themselves.
    if std::env::var_os("TSS2_LOG").is_none() {
        // Single-threaded here: nothing else reads the environment yet.
        std::env::set_var("TSS2_LOG", "all+none");
    }
    let cli = Cli::parse();
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let level = log_level(cli.log_level());
    // tss-esapi logs every context open/close at INFO: noise for an operator.
    let filter = tracing_subscriber::filter::Targets::new()
        .with_default(level)
        .with_target("tss_esapi", Level::WARN.min(level));
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(false),
        )
        .with(filter)
        .init();
    boundkey::run(cli)
}
