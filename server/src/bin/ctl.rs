//! `boundkeyctl`: administers a running boundkey-authd over its admin socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use boundkey_auth::admin::{TOKEN_MAX_TTL_SECS, TOKEN_WARN_TTL_SECS};
use boundkey_auth::model::{AttestationMode, LockTarget};
use boundkey_auth::UnixTime;
use boundkey_proto::claims::RecoveryMode;
use boundkey_proto::{Endpoint, EndpointError, JoinMethod};
use boundkey_server::admin::client::{self, ClientError};
use boundkey_server::admin::views::{InstanceState, NewCredential, TokenCreated};
use boundkey_server::admin::{
    self, CaType, ExportFormat, ExportType, LocksAdd, Operation, TokensAdd, TokensEdit,
};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use serde_json::Value;

/// Writes to standard output; `outln!` adds a newline. Unlike `print!`, a reader that has gone
/// away (`boundkeyctl instances ls | head`) ends the command quietly instead of panicking: Rust
/// ignores SIGPIPE, so the closed pipe arrives as an `EPIPE` write error, and this is the one
/// place that turns it into the exit a shell pipeline expects.
macro_rules! out {
    ($($arg:tt)*) => { write_stdout(format_args!($($arg)*), false) };
}
macro_rules! outln {
    ($($arg:tt)*) => { write_stdout(format_args!($($arg)*), true) };
}

fn write_stdout(args: std::fmt::Arguments<'_>, newline: bool) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let written = o
        .write_fmt(args)
        .and_then(|()| if newline { o.write_all(b"\n") } else { Ok(()) });
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            // What a C tool killed by SIGPIPE reports to its shell: 128 + 13.
            std::process::exit(141);
        }
        eprintln!("boundkeyctl: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}

#[derive(Parser)]
#[command(
    name = "boundkeyctl",
    version,
    about = "Administer a boundkey auth service"
)]
struct Cli {
    /// The server's data directory (its admin socket is DATA_DIR/admin.sock).
    #[arg(long, global = true, env = "BOUNDKEY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Output format: aligned tables / key-value lines, or JSON (times as Unix seconds).
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    format: Format,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Cluster name, CA pin and listener address of the server.
    Info,
    #[command(subcommand)]
    Bots(BotsCmd),
    #[command(subcommand)]
    Tokens(TokensCmd),
    #[command(subcommand, name = "bound-keypair")]
    BoundKeypair(BoundKeypairCmd),
    #[command(subcommand)]
    Instances(InstancesCmd),
    #[command(subcommand)]
    Locks(LocksCmd),
    #[command(subcommand)]
    Audit(AuditCmd),
    #[command(subcommand)]
    Ca(CaCmd),
}

#[derive(Subcommand)]
enum BotsCmd {
    /// Create a bot.
    Add { name: String },
    /// List bots.
    Ls,
    /// Delete a bot with all its tokens and instances.
    Rm { name: String },
}

#[derive(Subcommand)]
enum TokensCmd {
    /// Create a join token and print a ready join URI.
    Add(TokensAddArgs),
    /// List tokens in name order, one page at a time.
    Ls {
        #[arg(long)]
        bot: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one token: spec and status.
    Show { name: String },
    /// Change a token's spec (never its status).
    Edit(TokensEditArgs),
    /// Delete a token.
    Rm { name: String },
}

#[derive(Args)]
struct TokensAddArgs {
    #[arg(long)]
    bot: String,
    #[arg(long, default_value = "bound_keypair")]
    join_method: JoinMethod,
    /// Token name (bound_keypair; generated when omitted).
    #[arg(long)]
    name: Option<String>,
    /// Pre-registered bound public key, `ecdsa-sha2-nistp256 AAAA…` (no registration secret).
    #[arg(long)]
    initial_public_key: Option<String>,
    /// Registration secret to use, at least 16 characters (a random one is generated when
    /// neither this nor a public key is given).
    #[arg(long)]
    registration_secret: Option<String>,
    #[arg(long)]
    recovery_limit: Option<u32>,
    #[arg(long)]
    recovery_mode: Option<RecoveryMode>,
    /// Deadline for the registration secret: RFC 3339 time or a duration from now (`24h`).
    #[arg(long, value_parser = parse_time)]
    must_register_before: Option<UnixTime>,
    /// token method: how many joins the token allows (default 1).
    #[arg(long)]
    max_joins: Option<u32>,
    /// token method: lifetime (default 1h); bound_keypair: sets the token's expiry.
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// Allow a token-method TTL above 7 days.
    #[arg(long)]
    force: bool,
    /// HOST:PORT to put in the join URI (default: the server's listener address).
    #[arg(long)]
    auth_server: Option<String>,
    #[command(flatten)]
    attestation: AttestationArgs,
}

/// Key attestation settings of a bound_keypair token (docs/operations.md).
#[derive(Args)]
struct AttestationArgs {
    /// `tpm`: every new bound key must be attested by a trusted TPM; `none`: not checked.
    #[arg(long)]
    attestation: Option<AttestationMode>,
    /// PEM file of trusted EK CA certificates (`none` on edit removes the bundle).
    #[arg(long, value_name = "FILE", value_parser = parse_optional_string)]
    ek_ca: Option<Cleared<String>>,
    /// SHA-256 hex of an allowed EK's DER SubjectPublicKeyInfo; repeatable, replaces the list
    /// on edit (`none` clears it).
    #[arg(long, value_name = "HASH")]
    ek_allow: Vec<String>,
}

/// What the attestation flags change: the bundle (`Some(None)` removes it) and the allow list,
/// each `None` when no flag touched it.
struct AttestationChange {
    bundle: Option<Option<String>>,
    allow: Option<Vec<String>>,
}

impl AttestationArgs {
    /// Reads the bundle file here, so the server never opens operator-named files.
    fn change(&self) -> Result<AttestationChange, CtlError> {
        let bundle = match &self.ek_ca {
            None => None,
            Some(Cleared(None)) => Some(None),
            Some(Cleared(Some(path))) => Some(Some(
                std::fs::read_to_string(path).map_err(|e| CtlError::EkCa(path.clone(), e))?,
            )),
        };
        let allow = match self.ek_allow.as_slice() {
            [] => None,
            [none] if none == "none" => Some(Vec::new()),
            list => Some(list.to_vec()),
        };
        Ok(AttestationChange { bundle, allow })
    }
}

#[derive(Args)]
struct TokensEditArgs {
    name: String,
    #[arg(long)]
    recovery_limit: Option<u32>,
    #[arg(long)]
    recovery_mode: Option<RecoveryMode>,
    /// RFC 3339 time, duration from now, or `none` to clear.
    #[arg(long, value_parser = parse_optional_time)]
    must_register_before: Option<Cleared<UnixTime>>,
    /// RFC 3339 time, duration from now, or `none` to clear.
    #[arg(long, value_parser = parse_optional_time)]
    expires: Option<Cleared<UnixTime>>,
    /// SSH public key, or `none` to clear.
    #[arg(long, value_parser = parse_optional_string)]
    initial_public_key: Option<Cleared<String>>,
    #[arg(long)]
    max_joins: Option<u32>,
    #[command(flatten)]
    attestation: AttestationArgs,
}

/// A value, or an explicit `none`.
#[derive(Clone, Debug)]
struct Cleared<T>(Option<T>);

#[derive(Subcommand)]
enum BoundKeypairCmd {
    /// Make the token's agent rotate its bound key at its next join or renewal.
    RequestRotation { token: String },
}

#[derive(Subcommand)]
enum InstancesCmd {
    /// List bot instances, oldest first, one page at a time.
    Ls {
        #[arg(long)]
        bot: Option<String>,
        /// active or expired.
        #[arg(long)]
        state: Option<InstanceState>,
        /// Only instances created at or after: RFC 3339 time, or a duration ago (`1h`).
        #[arg(long, value_parser = parse_since)]
        since: Option<UnixTime>,
        /// Only instances created before: RFC 3339 time, or a duration ago.
        #[arg(long, value_parser = parse_since)]
        until: Option<UnixTime>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one instance with its authentications and heartbeats.
    Show { id: String },
    /// Delete an instance record.
    Rm { id: String },
}

#[derive(Subcommand)]
enum LocksCmd {
    /// Lock a bot, an instance or a join token.
    Add(LocksAddArgs),
    /// List locks.
    Ls,
    /// Remove a lock.
    Rm { name: String },
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["bot", "instance", "join_token"])))]
struct LocksAddArgs {
    /// Lock every instance of this bot.
    #[arg(long)]
    bot: Option<String>,
    /// Lock one bot instance.
    #[arg(long)]
    instance: Option<String>,
    /// Lock a join token (by name).
    #[arg(long)]
    join_token: Option<String>,
    #[arg(long)]
    message: Option<String>,
    /// Lock lifetime (default: until removed).
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// Lock name (generated when omitted).
    #[arg(long)]
    name: Option<String>,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// List audit events, newest first, one page at a time (default 50 a page).
    Ls {
        #[arg(long = "type")]
        kind: Option<String>,
        #[arg(long)]
        bot: Option<String>,
        /// Only events at or after: RFC 3339 time, or a duration ago (`1h`).
        #[arg(long, value_parser = parse_since)]
        since: Option<UnixTime>,
        /// Only events before: RFC 3339 time, or a duration ago.
        #[arg(long, value_parser = parse_since)]
        until: Option<UnixTime>,
        #[command(flatten)]
        page: PageArgs,
    },
}

/// Paging flags shared by the listings.
#[derive(Args)]
struct PageArgs {
    /// Page size (default 100, audit 50; at most 1000).
    #[arg(long)]
    limit: Option<usize>,
    /// Continue after this cursor: the `next` of the previous page.
    #[arg(long)]
    after: Option<String>,
}

#[derive(Subcommand)]
enum CaCmd {
    /// Replace the identity or join-state CA key; the old key stays trusted for the grace period.
    Rotate {
        #[arg(long = "type")]
        kind: CaType,
        #[arg(long, value_parser = humantime::parse_duration)]
        grace_period: Duration,
    },
    /// Print public trust material: the identity CA bundle (the SPIFFE trust bundle), the
    /// join-state verification keys, or the TLS CA. Every key still trusted is included.
    Export {
        /// identity, join-state or tls.
        #[arg(long = "type")]
        kind: ExportType,
        /// pem (certificates; public keys for join-state) or jwks (RFC 7517; for identity the
        /// SPIFFE bundle format).
        #[arg(long, default_value = "pem")]
        encoding: ExportFormat,
    },
}

fn now() -> UnixTime {
    boundkey_server::now()
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// RFC 3339 time, or a duration from now.
fn parse_time(s: &str) -> Result<UnixTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return t
            .duration_since(UNIX_EPOCH)
            .map(secs)
            .map_err(|_| format!("{s:?} is before 1970"));
    }
    humantime::parse_duration(s)
        .map(|d| now().saturating_add(secs(d)))
        .map_err(|_| format!("{s:?} is neither an RFC 3339 time nor a duration like 24h"))
}

fn parse_since(s: &str) -> Result<UnixTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return t
            .duration_since(UNIX_EPOCH)
            .map(secs)
            .map_err(|_| format!("{s:?} is before 1970"));
    }
    humantime::parse_duration(s)
        .map(|d| now().saturating_sub(secs(d)))
        .map_err(|_| format!("{s:?} is neither an RFC 3339 time nor a duration like 1h"))
}

fn parse_optional_time(s: &str) -> Result<Cleared<UnixTime>, String> {
    if s == "none" {
        return Ok(Cleared(None));
    }
    parse_time(s).map(|t| Cleared(Some(t)))
}

fn parse_optional_string(s: &str) -> Result<Cleared<String>, String> {
    Ok(Cleared((s != "none").then(|| s.to_string())))
}

/// Fields printed as times in text output.
const TIME_FIELDS: &[&str] = &[
    "created_at",
    "expires",
    "must_register_before",
    "rotate_after",
    "last_recovered_at",
    "last_rotated_at",
    "authenticated_at",
    "recorded_at",
    "time",
    "previous_trusted_until",
];

fn fmt_time(t: i64) -> String {
    match u64::try_from(t) {
        Ok(s) if s < 253_402_300_800 => {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(s)).to_string()
        }
        _ => t.to_string(),
    }
}

/// Renders a scalar for text output; `key` decides whether a number is a time.
fn scalar(key: &str, v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) if TIME_FIELDS.contains(&key) => {
            n.as_i64().map(fmt_time).unwrap_or_else(|| n.to_string())
        }
        other => other.to_string(),
    }
}

/// `s` safe to print on a terminal: control characters (newlines, escape sequences) and
/// bidirectional overrides are shown as escapes (`\n`, `\u{1b}`), so a value stored from the
/// network (token names, heartbeat fields, error texts) cannot start a row of its own or
/// drive the terminal. Every cell of text output goes through it; JSON output is escaped by
/// the encoder.
fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if c.is_control() || bidi {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A time for text output; `-` when unset.
fn opt_time(t: Option<UnixTime>) -> String {
    t.map(fmt_time).unwrap_or_else(|| "-".into())
}

/// A value for text output; `-` when unset.
fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// Prints `key: value` lines (keys sorted), nested objects and arrays flattened with dotted keys.
fn print_kv<T: Serialize>(v: &T) {
    let v = serde_json::to_value(v).unwrap_or(Value::Null);
    let mut lines = Vec::new();
    flatten("", &v, &mut lines);
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, val) in lines {
        let (k, val) = (printable(&k), printable(&val));
        outln!("{k:width$}  {val}");
    }
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, val) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match val {
                    Value::Object(inner) if inner.is_empty() => out.push((key, "-".into())),
                    Value::Array(a) if a.is_empty() => out.push((key, "-".into())),
                    Value::Object(_) | Value::Array(_) => flatten(&key, val, out),
                    _ => out.push((key, scalar(k, val))),
                }
            }
        }
        Value::Array(a) => {
            for (i, val) in a.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), val, out);
            }
        }
        other => out.push((prefix.to_string(), scalar(prefix, other))),
    }
}

/// `tokens show` in text mode: `print_kv`, with the EK CA bundle summarised as the subjects of
/// its certificates rather than printed as one long line of PEM.
fn print_token<T: Serialize>(t: &T) {
    let mut v = serde_json::to_value(t).unwrap_or(Value::Null);
    if let Some(b) = v.pointer_mut("/bound_keypair/attestation/ek_ca_bundle") {
        let pem = b.as_str().unwrap_or_default();
        let subjects: Vec<String> = boundkey_auth::attestation::ek::bundle_subjects(pem);
        *b = Value::String(format!(
            "{} certificate(s): {}",
            subjects.len(),
            subjects.join("; ")
        ));
    }
    print_kv(&v);
}

/// Prints an aligned table.
fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let rows = escape_rows(rows);
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let n = cells.len();
        let s: Vec<String> = cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == n {
                    c
                } else {
                    let pad = widths[i].saturating_sub(c.chars().count());
                    format!("{c}{}", " ".repeat(pad))
                }
            })
            .collect();
        outln!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

/// The last line of a paged table: how to ask for the next page, when there is one.
fn print_next(next: Option<&str>) {
    if let Some(c) = next {
        outln!("next page: --after {}", printable(c));
    }
}

/// Every cell of a table, made [`printable`] before widths are measured.
fn escape_rows(rows: Vec<Vec<String>>) -> Vec<Vec<String>> {
    rows.into_iter()
        .map(|r| r.iter().map(|c| printable(c)).collect())
        .collect()
}

/// Why a `boundkeyctl` command failed; printed as one line.
#[derive(Debug, thiserror::Error)]
enum CtlError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("token TTL {} is above the 7-day maximum; pass --force to allow it", humantime::format_duration(Duration::from_secs(*.0)))]
    TtlTooLong(u64),
    #[error("invalid --auth-server: {0}")]
    AuthServer(#[from] EndpointError),
    #[error("give exactly one of --bot, --instance, --join-token")]
    LockTarget,
    #[error("cannot read --ek-ca {0}: {1}")]
    EkCa(String, std::io::Error),
}

struct Ctl {
    socket: PathBuf,
    format: Format,
}

impl Ctl {
    fn call<O: Operation>(&self, op: O) -> Result<O::Answer, CtlError> {
        Ok(client::call(&self.socket, op)?)
    }

    /// JSON mode prints the answer as is; text mode runs `f`.
    fn show<T: Serialize>(&self, v: &T, f: impl FnOnce(&T)) {
        match self.format {
            Format::Json => match serde_json::to_string_pretty(v) {
                Ok(s) => outln!("{s}"),
                Err(e) => eprintln!("boundkeyctl: cannot print the answer as JSON: {e}"),
            },
            Format::Text => f(v),
        }
    }

    fn run(&self, cmd: Cmd) -> Result<(), CtlError> {
        match cmd {
            Cmd::Info => {
                let v = self.call(admin::Info {})?;
                self.show(&v, print_kv);
            }
            Cmd::Bots(c) => self.bots(c)?,
            Cmd::Tokens(c) => self.tokens(c)?,
            Cmd::BoundKeypair(BoundKeypairCmd::RequestRotation { token }) => {
                let t = self.call(admin::RequestRotation { token })?;
                self.show(&t, |t| {
                    outln!(
                        "rotation requested for token {}: the agent gets a new bound key at its next join or renewal (rotate_after {})",
                        t.name,
                        opt_time(t.spec.bound_keypair.as_ref().and_then(|b| b.rotate_after))
                    )
                });
            }
            Cmd::Instances(c) => self.instances(c)?,
            Cmd::Locks(c) => self.locks(c)?,
            Cmd::Audit(AuditCmd::Ls {
                kind,
                bot,
                since,
                until,
                page,
            }) => {
                let page = self.call(admin::AuditLs {
                    kind,
                    bot,
                    limit: page.limit,
                    since,
                    until,
                    after: page.after,
                })?;
                self.show(&page, |page| {
                    let events = &page.events;
                    print_table(
                        &[
                            "ID", "TIME", "TYPE", "OK", "BOT", "INSTANCE", "TOKEN", "REMOTE",
                            "DETAILS",
                        ],
                        events
                            .iter()
                            .map(|e| {
                                let details: Vec<String> = e
                                    .error
                                    .iter()
                                    .map(|err| format!("error={err}"))
                                    .chain(
                                        e.fields
                                            .iter()
                                            .map(|(k, v)| format!("{k}={}", scalar(k, v))),
                                    )
                                    .collect();
                                vec![
                                    e.id.to_string(),
                                    fmt_time(e.time),
                                    e.kind.clone(),
                                    if e.success { "yes" } else { "no" }.into(),
                                    opt(e.bot_name.as_ref()),
                                    opt(e.instance_id.as_ref()),
                                    opt(e.token_name.as_ref()),
                                    opt(e.remote_addr.as_ref()),
                                    details.join(" "),
                                ]
                            })
                            .collect(),
                    );
                    print_next(page.next.as_deref());
                });
            }
            Cmd::Ca(CaCmd::Rotate { kind, grace_period }) => {
                let r = self.call(admin::CaRotate {
                    kind,
                    grace_period_secs: grace_period.as_secs(),
                })?;
                self.show(&r, |r| {
                    outln!(
                        "rotated the {} CA: new key {}, trusted now and signing from {}; the previous key stays trusted until {}",
                        r.kind.as_str(),
                        r.kid,
                        fmt_time(r.signs_from),
                        fmt_time(r.previous_trusted_until),
                    )
                });
            }
            Cmd::Ca(CaCmd::Export { kind, encoding }) => {
                let r = self.call(admin::CaExport {
                    kind,
                    format: encoding,
                })?;
                // Text mode prints the material alone so it can be redirected to a file.
                self.show(&r, |r| out!("{}", r.data));
            }
        }
        Ok(())
    }

    fn bots(&self, c: BotsCmd) -> Result<(), CtlError> {
        match c {
            BotsCmd::Add { name } => {
                let b = self.call(admin::BotsAdd { name })?;
                self.show(&b, |b| outln!("bot {} created", b.name));
            }
            BotsCmd::Ls => {
                let bots = self.call(admin::BotsLs {})?;
                self.show(&bots, |bots| {
                    print_table(
                        &["NAME", "CREATED", "TOKENS", "INSTANCES", "ACTIVE"],
                        bots.iter()
                            .map(|b| {
                                vec![
                                    b.name.clone(),
                                    fmt_time(b.created_at),
                                    b.tokens.to_string(),
                                    b.instances.to_string(),
                                    b.active_instances.to_string(),
                                ]
                            })
                            .collect(),
                    )
                });
            }
            BotsCmd::Rm { name } => {
                let d = self.call(admin::BotsRm { name })?;
                self.show(&d, |d| {
                    outln!(
                        "bot {} deleted ({} tokens, {} instances)",
                        d.name,
                        d.tokens_deleted,
                        d.instances_deleted
                    )
                });
            }
        }
        Ok(())
    }

    fn tokens(&self, c: TokensCmd) -> Result<(), CtlError> {
        match c {
            TokensCmd::Add(a) => {
                let ttl = a.ttl.map(|d| d.as_secs());
                if a.join_method == JoinMethod::Token {
                    let t = ttl.unwrap_or(boundkey_auth::admin::TOKEN_DEFAULT_TTL_SECS);
                    if t > TOKEN_MAX_TTL_SECS && !a.force {
                        return Err(CtlError::TtlTooLong(t));
                    }
                    if t > TOKEN_WARN_TTL_SECS {
                        eprintln!(
                            "boundkeyctl: warning: a token TTL of {} is long for a shared secret; prefer bound_keypair for long-lived devices",
                            humantime::format_duration(Duration::from_secs(t))
                        );
                    }
                }
                let auth_server = a
                    .auth_server
                    .as_deref()
                    .map(str::parse::<Endpoint>)
                    .transpose()?;
                let change = a.attestation.change()?;
                let created = self.call(TokensAdd {
                    bot: a.bot,
                    join_method: Some(a.join_method),
                    name: a.name,
                    initial_public_key: a.initial_public_key,
                    registration_secret: a.registration_secret,
                    recovery_limit: a.recovery_limit,
                    recovery_mode: a.recovery_mode,
                    must_register_before: a.must_register_before,
                    max_joins: a.max_joins,
                    ttl_secs: ttl,
                    force: a.force,
                    auth_server,
                    attestation: a.attestation.attestation,
                    ek_ca_bundle: change.bundle.flatten(),
                    ek_allow: change.allow.unwrap_or_default(),
                })?;
                self.show(&created, print_token_created);
                if created.credential.has_secret() {
                    eprintln!("boundkeyctl: the secret above is shown only once; it is not stored in clear");
                }
            }
            TokensCmd::Ls { bot, page } => {
                let page = self.call(admin::TokensLs {
                    bot,
                    limit: page.limit,
                    after: page.after,
                })?;
                self.show(&page, |page| {
                    let tokens = &page.tokens;
                    print_table(
                        &[
                            "NAME",
                            "BOT",
                            "METHOD",
                            "BOUND_INSTANCE",
                            "RECOVERIES",
                            "MODE",
                            "EXPIRES",
                        ],
                        tokens
                            .iter()
                            .map(|t| {
                                let bk = t.spec.bound_keypair.as_ref();
                                let recoveries = match t.spec.join_method {
                                    JoinMethod::Token => format!(
                                        "joins {}/{}",
                                        t.status.join_count,
                                        opt(t.spec.max_joins)
                                    ),
                                    JoinMethod::BoundKeypair => format!(
                                        "{}/{}",
                                        t.status.recovery_count,
                                        opt(bk.map(|b| b.recovery.limit))
                                    ),
                                };
                                vec![
                                    t.name.clone(),
                                    t.spec.bot_name.clone(),
                                    t.spec.join_method.to_string(),
                                    opt(t.status.bound_instance_id.as_ref()),
                                    recoveries,
                                    opt(bk.map(|b| b.recovery.mode.as_str())),
                                    opt_time(t.spec.expires),
                                ]
                            })
                            .collect(),
                    );
                    print_next(page.next.as_deref());
                });
            }
            TokensCmd::Show { name } => {
                let t = self.call(admin::TokensShow { name })?;
                self.show(&t, print_token);
            }
            TokensCmd::Edit(e) => {
                let change = e.attestation.change()?;
                let t = self.call(TokensEdit {
                    name: e.name,
                    recovery_limit: e.recovery_limit,
                    recovery_mode: e.recovery_mode,
                    must_register_before: e.must_register_before.map(|c| c.0),
                    expires: e.expires.map(|c| c.0),
                    initial_public_key: e.initial_public_key.map(|c| c.0),
                    max_joins: e.max_joins,
                    attestation: e.attestation.attestation,
                    ek_ca_bundle: change.bundle,
                    ek_allow: change.allow,
                })?;
                self.show(&t, print_token);
            }
            TokensCmd::Rm { name } => {
                let d = self.call(admin::TokensRm { name })?;
                self.show(&d, |d| outln!("token {} deleted", d.name));
            }
        }
        Ok(())
    }

    fn instances(&self, c: InstancesCmd) -> Result<(), CtlError> {
        match c {
            InstancesCmd::Ls {
                bot,
                state,
                since,
                until,
                page,
            } => {
                let page = self.call(admin::InstancesLs {
                    bot,
                    state,
                    since,
                    until,
                    limit: page.limit,
                    after: page.after,
                })?;
                self.show(&page, |page| {
                    let instances = &page.instances;
                    print_table(
                        &[
                            "INSTANCE",
                            "BOT",
                            "STATE",
                            "GENERATION",
                            "METHOD",
                            "LAST_AUTH",
                            "LAST_HEARTBEAT",
                            "EXPIRES",
                        ],
                        instances
                            .iter()
                            .map(|i| {
                                vec![
                                    i.spec.instance_id.clone(),
                                    i.spec.bot_name.clone(),
                                    i.state.as_str().into(),
                                    i.generation.to_string(),
                                    i.spec.join_method.to_string(),
                                    opt_time(
                                        i.last_authentication.as_ref().map(|a| a.authenticated_at),
                                    ),
                                    opt_time(i.last_heartbeat.as_ref().map(|h| h.recorded_at)),
                                    fmt_time(i.expires),
                                ]
                            })
                            .collect(),
                    );
                    print_next(page.next.as_deref());
                });
            }
            InstancesCmd::Show { id } => {
                let i = self.call(admin::InstancesShow { id })?;
                self.show(&i, print_kv);
            }
            InstancesCmd::Rm { id } => {
                let d = self.call(admin::InstancesRm { id })?;
                self.show(&d, |d| outln!("bot instance {} deleted", d.instance_id));
            }
        }
        Ok(())
    }

    fn locks(&self, c: LocksCmd) -> Result<(), CtlError> {
        match c {
            LocksCmd::Add(a) => {
                let target = match (a.bot, a.instance, a.join_token) {
                    (Some(b), None, None) => LockTarget::Bot(b),
                    (None, Some(i), None) => LockTarget::BotInstanceId(i),
                    (None, None, Some(t)) => LockTarget::JoinToken(t),
                    _ => return Err(CtlError::LockTarget),
                };
                let l = self.call(LocksAdd {
                    target,
                    name: a.name,
                    message: a.message,
                    ttl_secs: a.ttl.map(|d| d.as_secs()),
                })?;
                self.show(&l, |l| outln!("lock {} created", l.lock.name));
            }
            LocksCmd::Ls => {
                let locks = self.call(admin::LocksLs {})?;
                self.show(&locks, |locks| {
                    print_table(
                        &[
                            "NAME",
                            "TARGET",
                            "VALUE",
                            "ACTIVE",
                            "EXPIRES",
                            "CREATED_BY",
                            "MESSAGE",
                        ],
                        locks
                            .iter()
                            .map(|l| {
                                let lock = &l.lock;
                                vec![
                                    lock.name.clone(),
                                    lock.target.kind().into(),
                                    lock.target.value().into(),
                                    l.active.to_string(),
                                    opt_time(lock.expires),
                                    lock.created_by.clone(),
                                    lock.message.clone(),
                                ]
                            })
                            .collect(),
                    )
                });
            }
            LocksCmd::Rm { name } => {
                let d = self.call(admin::LocksRm { name })?;
                self.show(&d, |d| outln!("lock {} deleted", d.name));
            }
        }
        Ok(())
    }
}

/// `tokens add` in text mode: the fields an operator needs, the secret (or the pre-registered
/// key) included, as aligned `key: value` lines.
fn print_token_created(c: &TokenCreated) {
    let mut lines: Vec<(&str, String)> = vec![
        ("name", c.name.clone()),
        ("bot_name", c.bot_name.clone()),
        ("join_method", c.credential.join_method().to_string()),
    ];
    match &c.credential {
        NewCredential::BoundKeypair {
            registration_secret,
            initial_public_key,
            must_register_before,
        } => {
            match registration_secret {
                Some(s) => lines.push(("registration_secret", s.clone())),
                None => lines.push(("initial_public_key", opt(initial_public_key.as_ref()))),
            }
            lines.push(("must_register_before", opt_time(*must_register_before)));
        }
        NewCredential::Token { token, max_joins } => {
            lines.push(("token", token.clone()));
            lines.push(("max_joins", opt(*max_joins)));
        }
    }
    lines.push(("expires", opt_time(c.expires)));
    lines.push(("join_uri", c.join_uri.to_string()));
    let width = lines.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    for (k, v) in lines {
        outln!("{:width$} {v}", format!("{k}:"));
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(dir) = cli.data_dir else {
        eprintln!("boundkeyctl: error: --data-dir is required (or set BOUNDKEY_DATA_DIR)");
        return ExitCode::from(2);
    };
    let ctl = Ctl {
        socket: dir.join(admin::SOCKET_NAME),
        format: cli.format,
    };
    match ctl.run(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("boundkeyctl: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 8 defect 6: stored strings from the network were printed raw by `audit ls` and
    /// the other tables (newlines forged rows, escapes reached the terminal).
    #[test]
    fn untrusted_strings_are_printed_escaped() {
        assert_eq!(printable("plain name-1.x"), "plain name-1.x");
        assert_eq!(
            printable("tok\n42  2026-01-01  bot.join  yes"),
            "tok\\n42  2026-01-01  bot.join  yes"
        );
        assert_eq!(printable("\u{1b}[2J\r\t"), "\\u{1b}[2J\\r\\t");
        assert_eq!(printable("a\u{202e}b"), "a\\u{202e}b");
        let rows = escape_rows(vec![vec!["x\ny".into(), "\u{7}".into()]]);
        assert_eq!(rows, vec![vec!["x\\ny".to_string(), "\\u{7}".to_string()]]);
        assert!(rows
            .iter()
            .flatten()
            .all(|c| !c.chars().any(char::is_control)));
    }
}
