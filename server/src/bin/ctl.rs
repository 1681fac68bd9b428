//! `boundkeyctl`: administers a running boundkey-authd over its admin socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use boundkey_auth::admin::{TOKEN_MAX_TTL_SECS, TOKEN_WARN_TTL_SECS};
use boundkey_auth::model::LockTarget;
use boundkey_auth::UnixTime;
use boundkey_proto::claims::RecoveryMode;
use boundkey_proto::JoinMethod;
use boundkey_server::admin::{self, client, CaType, LocksAdd, Request, TokensAdd, TokensEdit};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::Value;

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
    /// List tokens.
    Ls {
        #[arg(long)]
        bot: Option<String>,
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
    /// Registration secret to use (generated when neither this nor a public key is given).
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
    /// List bot instances.
    Ls {
        #[arg(long)]
        bot: Option<String>,
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
    /// List audit events, newest first.
    Ls {
        #[arg(long = "type")]
        kind: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Only events at or after: RFC 3339 time, or a duration ago (`1h`).
        #[arg(long, value_parser = parse_since)]
        since: Option<UnixTime>,
    },
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

fn field<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    let mut cur = v;
    for p in path {
        cur = cur.get(p).unwrap_or(&Value::Null);
    }
    cur
}

fn text(v: &Value, path: &[&str]) -> String {
    scalar(path.last().copied().unwrap_or(""), field(v, path))
}

/// Prints `key: value` lines, nested objects and arrays flattened with dotted keys.
fn print_kv(v: &Value) {
    let mut lines = Vec::new();
    flatten("", v, &mut lines);
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, val) in lines {
        println!("{k:width$}  {val}");
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

/// Prints an aligned table.
fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
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
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn rows(v: &Value, f: impl Fn(&Value) -> Vec<String>) -> Vec<Vec<String>> {
    v.as_array()
        .map(|a| a.iter().map(f).collect())
        .unwrap_or_default()
}

fn last_of(v: &Value, list: &str, key: &str) -> String {
    v.get(list)
        .and_then(Value::as_array)
        .and_then(|a| a.last())
        .map(|e| text(e, &[key]))
        .unwrap_or_else(|| "-".into())
}

struct Ctl {
    socket: PathBuf,
    format: Format,
}

impl Ctl {
    fn call(&self, req: &Request) -> Result<Value, String> {
        client::call(&self.socket, req).map_err(|e| e.to_string())
    }

    /// JSON mode prints the result as is; text mode runs `f`.
    fn show(&self, v: &Value, f: impl FnOnce(&Value)) {
        match self.format {
            Format::Json => println!(
                "{}",
                serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
            ),
            Format::Text => f(v),
        }
    }

    fn run(&self, cmd: Cmd) -> Result<(), String> {
        match cmd {
            Cmd::Info => {
                let v = self.call(&Request::Info)?;
                self.show(&v, print_kv);
            }
            Cmd::Bots(c) => self.bots(c)?,
            Cmd::Tokens(c) => self.tokens(c)?,
            Cmd::BoundKeypair(BoundKeypairCmd::RequestRotation { token }) => {
                let v = self.call(&Request::RequestRotation { token })?;
                self.show(&v, |v| {
                    println!(
                        "rotation requested for token {}: the agent gets a new bound key at its next join or renewal (rotate_after {})",
                        text(v, &["name"]),
                        text(v, &["bound_keypair", "rotate_after"])
                    )
                });
            }
            Cmd::Instances(c) => self.instances(c)?,
            Cmd::Locks(c) => self.locks(c)?,
            Cmd::Audit(AuditCmd::Ls { kind, limit, since }) => {
                let v = self.call(&Request::AuditLs {
                    kind,
                    limit: Some(limit),
                    since,
                })?;
                self.show(&v, |v| {
                    print_table(
                        &[
                            "ID", "TIME", "TYPE", "OK", "BOT", "INSTANCE", "TOKEN", "REMOTE",
                            "DETAILS",
                        ],
                        rows(v, |e| {
                            let mut details = Vec::new();
                            if let Some(err) = e.get("error").and_then(Value::as_str) {
                                details.push(format!("error={err}"));
                            }
                            if let Some(m) = e.get("fields").and_then(Value::as_object) {
                                details
                                    .extend(m.iter().map(|(k, v)| format!("{k}={}", scalar(k, v))));
                            }
                            vec![
                                text(e, &["id"]),
                                text(e, &["time"]),
                                text(e, &["type"]),
                                if e.get("success").and_then(Value::as_bool) == Some(true) {
                                    "yes".into()
                                } else {
                                    "no".into()
                                },
                                text(e, &["bot_name"]),
                                text(e, &["instance_id"]),
                                text(e, &["token_name"]),
                                text(e, &["remote_addr"]),
                                details.join(" "),
                            ]
                        }),
                    )
                });
            }
            Cmd::Ca(CaCmd::Rotate { kind, grace_period }) => {
                let v = self.call(&Request::CaRotate {
                    kind,
                    grace_period_secs: grace_period.as_secs(),
                })?;
                self.show(&v, |v| {
                    println!(
                        "rotated the {} CA: new key {}; the previous key stays trusted until {}",
                        text(v, &["type"]),
                        text(v, &["kid"]),
                        text(v, &["previous_trusted_until"]),
                    )
                });
            }
        }
        Ok(())
    }

    fn bots(&self, c: BotsCmd) -> Result<(), String> {
        match c {
            BotsCmd::Add { name } => {
                let v = self.call(&Request::BotsAdd { name })?;
                self.show(&v, |v| println!("bot {} created", text(v, &["name"])));
            }
            BotsCmd::Ls => {
                let v = self.call(&Request::BotsLs)?;
                self.show(&v, |v| {
                    print_table(
                        &["NAME", "CREATED", "TOKENS", "INSTANCES", "ACTIVE"],
                        rows(v, |b| {
                            vec![
                                text(b, &["name"]),
                                text(b, &["created_at"]),
                                text(b, &["tokens"]),
                                text(b, &["instances"]),
                                text(b, &["active_instances"]),
                            ]
                        }),
                    )
                });
            }
            BotsCmd::Rm { name } => {
                let v = self.call(&Request::BotsRm { name })?;
                self.show(&v, |v| {
                    println!(
                        "bot {} deleted ({} tokens, {} instances)",
                        text(v, &["name"]),
                        text(v, &["tokens_deleted"]),
                        text(v, &["instances_deleted"])
                    )
                });
            }
        }
        Ok(())
    }

    fn tokens(&self, c: TokensCmd) -> Result<(), String> {
        match c {
            TokensCmd::Add(a) => {
                let ttl = a.ttl.map(|d| d.as_secs());
                if a.join_method == JoinMethod::Token {
                    let t = ttl.unwrap_or(boundkey_auth::admin::TOKEN_DEFAULT_TTL_SECS);
                    if t > TOKEN_MAX_TTL_SECS && !a.force {
                        return Err(format!(
                            "token TTL {} is above the 7-day maximum; pass --force to allow it",
                            humantime::format_duration(Duration::from_secs(t))
                        ));
                    }
                    if t > TOKEN_WARN_TTL_SECS {
                        eprintln!(
                            "boundkeyctl: warning: a token TTL of {} is long for a shared secret; prefer bound_keypair for long-lived devices",
                            humantime::format_duration(Duration::from_secs(t))
                        );
                    }
                }
                let v = self.call(&Request::TokensAdd(TokensAdd {
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
                    auth_server: a.auth_server,
                }))?;
                self.show(&v, |v| {
                    let mut keys = vec!["name", "bot_name", "join_method"];
                    match a.join_method {
                        JoinMethod::BoundKeypair => {
                            if v.get("registration_secret").is_some_and(|s| !s.is_null()) {
                                keys.push("registration_secret");
                            } else {
                                keys.push("initial_public_key");
                            }
                            keys.push("must_register_before");
                        }
                        JoinMethod::Token => keys.extend(["token", "max_joins"]),
                    }
                    keys.extend(["expires", "join_uri"]);
                    let width = keys.iter().map(|k| k.len() + 1).max().unwrap_or(0);
                    for k in keys {
                        println!("{:width$} {}", format!("{k}:"), text(v, &[k]));
                    }
                });
                if v.get("registration_secret").is_some_and(|s| !s.is_null())
                    || v.get("token").is_some_and(|s| !s.is_null())
                {
                    eprintln!("boundkeyctl: the secret above is shown only once; it is not stored in clear");
                }
            }
            TokensCmd::Ls { bot } => {
                let v = self.call(&Request::TokensLs { bot })?;
                self.show(&v, |v| {
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
                        rows(v, |t| {
                            let recoveries = match t.get("join_method").and_then(Value::as_str) {
                                Some("token") => format!(
                                    "joins {}/{}",
                                    text(t, &["join_count"]),
                                    text(t, &["max_joins"])
                                ),
                                _ => format!(
                                    "{}/{}",
                                    text(t, &["recovery_count"]),
                                    text(t, &["bound_keypair", "recovery", "limit"])
                                ),
                            };
                            vec![
                                text(t, &["name"]),
                                text(t, &["bot_name"]),
                                text(t, &["join_method"]),
                                text(t, &["bound_instance_id"]),
                                recoveries,
                                text(t, &["bound_keypair", "recovery", "mode"]),
                                text(t, &["expires"]),
                            ]
                        }),
                    )
                });
            }
            TokensCmd::Show { name } => {
                let v = self.call(&Request::TokensShow { name })?;
                self.show(&v, print_kv);
            }
            TokensCmd::Edit(e) => {
                let v = self.call(&Request::TokensEdit(TokensEdit {
                    name: e.name,
                    recovery_limit: e.recovery_limit,
                    recovery_mode: e.recovery_mode,
                    must_register_before: e.must_register_before.map(|c| c.0),
                    expires: e.expires.map(|c| c.0),
                    initial_public_key: e.initial_public_key.map(|c| c.0),
                    max_joins: e.max_joins,
                }))?;
                self.show(&v, print_kv);
            }
            TokensCmd::Rm { name } => {
                let v = self.call(&Request::TokensRm { name })?;
                self.show(&v, |v| println!("token {} deleted", text(v, &["name"])));
            }
        }
        Ok(())
    }

    fn instances(&self, c: InstancesCmd) -> Result<(), String> {
        match c {
            InstancesCmd::Ls { bot } => {
                let v = self.call(&Request::InstancesLs { bot })?;
                self.show(&v, |v| {
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
                        rows(v, |i| {
                            vec![
                                text(i, &["instance_id"]),
                                text(i, &["bot_name"]),
                                text(i, &["state"]),
                                text(i, &["generation"]),
                                text(i, &["join_method"]),
                                last_of(i, "latest_authentications", "authenticated_at"),
                                last_of(i, "latest_heartbeats", "recorded_at"),
                                text(i, &["expires"]),
                            ]
                        }),
                    )
                });
            }
            InstancesCmd::Show { id } => {
                let v = self.call(&Request::InstancesShow { id })?;
                self.show(&v, print_kv);
            }
            InstancesCmd::Rm { id } => {
                let v = self.call(&Request::InstancesRm { id })?;
                self.show(&v, |v| {
                    println!("bot instance {} deleted", text(v, &["instance_id"]))
                });
            }
        }
        Ok(())
    }

    fn locks(&self, c: LocksCmd) -> Result<(), String> {
        match c {
            LocksCmd::Add(a) => {
                let target = match (a.bot, a.instance, a.join_token) {
                    (Some(b), None, None) => LockTarget::Bot(b),
                    (None, Some(i), None) => LockTarget::BotInstanceId(i),
                    (None, None, Some(t)) => LockTarget::JoinToken(t),
                    _ => return Err("give exactly one of --bot, --instance, --join-token".into()),
                };
                let v = self.call(&Request::LocksAdd(LocksAdd {
                    target,
                    name: a.name,
                    message: a.message,
                    ttl_secs: a.ttl.map(|d| d.as_secs()),
                }))?;
                self.show(&v, |v| println!("lock {} created", text(v, &["name"])));
            }
            LocksCmd::Ls => {
                let v = self.call(&Request::LocksLs)?;
                self.show(&v, |v| {
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
                        rows(v, |l| {
                            let (kind, value) = l
                                .get("target")
                                .and_then(Value::as_object)
                                .and_then(|m| m.iter().next())
                                .map(|(k, v)| (k.clone(), scalar(k, v)))
                                .unwrap_or_default();
                            vec![
                                text(l, &["name"]),
                                kind,
                                value,
                                text(l, &["active"]),
                                text(l, &["expires"]),
                                text(l, &["created_by"]),
                                text(l, &["message"]),
                            ]
                        }),
                    )
                });
            }
            LocksCmd::Rm { name } => {
                let v = self.call(&Request::LocksRm { name })?;
                self.show(&v, |v| println!("lock {} deleted", text(v, &["name"])));
            }
        }
        Ok(())
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
