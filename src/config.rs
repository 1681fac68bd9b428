//! Configuration: a TOML file, command-line flags and the join URI, merged into [`Settings`].
//!
//! Precedence and conflicts (see `docs/agent.md`):
//! * plain settings (storage, destination, keystore, durations, TPM): a flag overrides the file;
//! * join fields (method, token, auth server, CA pin): the file's explicit fields and its
//!   `join_uri` are combined, then the `--join-uri` flag is merged over them. A field given on
//!   both sides with different values is a conflict; every conflict is collected and reported in
//!   one error, nothing is silently picked;
//! * the registration secret may come from the join URI, `--registration-secret-file` (or the
//!   file's `registration_secret_file`) and the `BOUNDKEY_REGISTRATION_SECRET` environment
//!   variable; all sources given must agree (the error names the sources, never the values).
//!
//! [`merge`] is pure apart from the secret-file reader it is handed, so every rule is unit-tested.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use boundkey_hal::Backend;
use boundkey_proto::{CaPin, JoinMethod, JoinUri};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::transport::Endpoint;

pub const DEFAULT_CERTIFICATE_TTL: Duration = Duration::from_secs(3600);
pub const DEFAULT_RENEWAL_INTERVAL: Duration = Duration::from_secs(20 * 60);
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30 * 60);
pub const MIN_CERTIFICATE_TTL: Duration = Duration::from_secs(10);
pub const MAX_CERTIFICATE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
pub const SECRET_ENV: &str = "BOUNDKEY_REGISTRATION_SECRET";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {detail}", path.display())]
    Read { path: PathBuf, detail: String },
    #[error("config file {}: {detail}", path.display())]
    Parse { path: PathBuf, detail: String },
    #[error("invalid join URI ({source_name}): {detail}")]
    Uri {
        source_name: &'static str,
        detail: String,
    },
    #[error("{}", Conflicts(.0))]
    Conflicts(Vec<Conflict>),
    #[error("invalid {what}: {detail}")]
    Invalid { what: String, detail: String },
    #[error("{what} is required ({hint})")]
    Missing {
        what: &'static str,
        hint: &'static str,
    },
    #[error("registration secret file {}: {detail}", path.display())]
    Secret { path: PathBuf, detail: String },
}

/// One field set differently by two sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub field: &'static str,
    pub a: (String, Option<String>),
    pub b: (String, Option<String>),
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.a.1, &self.b.1) {
            (Some(x), Some(y)) => write!(
                f,
                "{}: {} says {x:?} but {} says {y:?}",
                self.field, self.a.0, self.b.0
            ),
            // Secrets: name the sources only.
            _ => write!(f, "{}: {} and {} disagree", self.field, self.a.0, self.b.0),
        }
    }
}

struct Conflicts<'a>(&'a [Conflict]);

impl fmt::Display for Conflicts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conflicting configuration ({}): ", self.0.len())?;
        for (i, c) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{c}")?;
        }
        f.write_str(" (make each pair agree or remove one side)")
    }
}

/// The `[tpm]` table of the config file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TpmFileConfig {
    pub tcti: Option<String>,
    pub owner_auth_file: Option<PathBuf>,
    pub key_auth_file: Option<PathBuf>,
    pub parent: Option<String>,
}

/// The TOML config file. Unknown keys are errors, so a typo never silently drops a setting.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub join_uri: Option<String>,
    pub join_method: Option<String>,
    pub token: Option<String>,
    pub auth_server: Option<String>,
    pub ca_pin: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub registration_secret_file: Option<PathBuf>,
    pub storage: Option<PathBuf>,
    pub destination: Option<PathBuf>,
    pub keystore: Option<String>,
    pub certificate_ttl: Option<String>,
    pub renewal_interval: Option<String>,
    pub heartbeat_interval: Option<String>,
    pub tpm: Option<TpmFileConfig>,
}

impl FileConfig {
    pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            detail: e.to_string().replace('\n', " ").trim().to_string(),
        })
    }

    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let bytes = crate::fsutil::read_limited(path, 256 * 1024)
            .map_err(|e| ConfigError::Read {
                path: path.to_path_buf(),
                detail: e.source.to_string(),
            })?
            .ok_or_else(|| ConfigError::Read {
                path: path.to_path_buf(),
                detail: "no such file".into(),
            })?;
        let text = String::from_utf8(bytes).map_err(|_| ConfigError::Parse {
            path: path.to_path_buf(),
            detail: "not UTF-8 text".into(),
        })?;
        Self::parse(path, &text)
    }
}

/// Command-line values (everything optional; `None` = not given).
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub join_uri: Option<String>,
    pub storage: Option<PathBuf>,
    pub destination: Option<PathBuf>,
    pub keystore: Option<String>,
    pub tcti: Option<String>,
    pub tpm_owner_auth_file: Option<PathBuf>,
    pub tpm_key_auth_file: Option<PathBuf>,
    pub tpm_parent: Option<String>,
    pub certificate_ttl: Option<Duration>,
    pub renewal_interval: Option<Duration>,
    pub heartbeat_interval: Option<Duration>,
    pub registration_secret_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub oneshot: bool,
}

/// TPM settings (the auth values stay files; they are read when the key store opens).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TpmSettings {
    pub tcti: Option<String>,
    pub owner_auth_file: Option<PathBuf>,
    pub key_auth_file: Option<PathBuf>,
    pub parent: Option<u32>,
}

/// Join parameters. Any may be absent here and come from the storage directory instead.
#[derive(Clone, Default)]
pub struct JoinSettings {
    pub method: Option<JoinMethod>,
    pub token: Option<String>,
    pub auth_server: Option<Endpoint>,
    pub ca_pin: Option<CaPin>,
    pub ca_file: Option<PathBuf>,
    pub registration_secret: Option<Zeroizing<String>>,
}

impl fmt::Debug for JoinSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = match self.method {
            Some(JoinMethod::Token) => self.token.as_ref().map(|_| "<redacted>".to_string()),
            _ => self.token.clone(),
        };
        f.debug_struct("JoinSettings")
            .field("method", &self.method)
            .field("token", &token)
            .field("auth_server", &self.auth_server)
            .field("ca_pin", &self.ca_pin)
            .field("ca_file", &self.ca_file)
            .field(
                "registration_secret",
                &self.registration_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// The merged configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub storage: PathBuf,
    pub destination: Option<PathBuf>,
    pub keystore: Option<Backend>,
    pub tpm: TpmSettings,
    pub join: JoinSettings,
    pub certificate_ttl: Duration,
    pub renewal_interval: Duration,
    pub heartbeat_interval: Duration,
    pub oneshot: bool,
}

/// Reads a secret file: UTF-8, one trailing newline removed, not empty.
pub fn read_secret_file(path: &Path) -> Result<Zeroizing<String>, ConfigError> {
    let err = |detail: String| ConfigError::Secret {
        path: path.to_path_buf(),
        detail,
    };
    let bytes = crate::fsutil::read_limited(path, 4096)
        .map_err(|e| err(e.source.to_string()))?
        .ok_or_else(|| err("no such file".into()))?;
    let mut s = Zeroizing::new(String::from_utf8(bytes).map_err(|_| err("not UTF-8".into()))?);
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    if s.is_empty() {
        return Err(err("empty".into()));
    }
    Ok(s)
}

fn parse_duration(what: &str, s: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s).map_err(|e| ConfigError::Invalid {
        what: what.to_string(),
        detail: format!("{s:?}: {e} (examples: 30s, 20m, 1h)"),
    })
}

fn parse_handle(s: &str) -> Result<u32, ConfigError> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => t.parse(),
    };
    r.map_err(|_| ConfigError::Invalid {
        what: "TPM parent handle".into(),
        detail: format!("{s:?} (expected e.g. 0x81000001)"),
    })
}

fn parse_backend(s: &str) -> Result<Backend, ConfigError> {
    s.parse().map_err(|_| ConfigError::Invalid {
        what: "keystore".into(),
        detail: format!("{s:?} (expected file or tpm)"),
    })
}

/// Join fields as one source states them.
#[derive(Default)]
struct JoinFields {
    method: Option<JoinMethod>,
    token: Option<String>,
    auth_server: Option<Endpoint>,
    ca_pin: Option<CaPin>,
    secret: Option<Zeroizing<String>>,
}

impl JoinFields {
    fn from_uri(u: JoinUri) -> JoinFields {
        JoinFields {
            method: Some(u.method),
            token: Some(u.token),
            auth_server: Some(u.endpoint),
            ca_pin: u.ca_pin,
            secret: u.registration_secret.map(Zeroizing::new),
        }
    }

    /// Merges `other` (named `b`) over `self` (named `a`), recording conflicts.
    fn merge(&mut self, a: &str, other: JoinFields, b: &str, out: &mut Vec<Conflict>) {
        fn field<T: PartialEq + Clone>(
            name: &'static str,
            mine: &mut Option<T>,
            theirs: Option<T>,
            show: impl Fn(&T) -> Option<String>,
            a: &str,
            b: &str,
            out: &mut Vec<Conflict>,
        ) {
            match (mine.as_ref(), theirs) {
                (Some(x), Some(y)) if *x != y => out.push(Conflict {
                    field: name,
                    a: (a.to_string(), show(x)),
                    b: (b.to_string(), show(&y)),
                }),
                (None, Some(y)) => *mine = Some(y),
                _ => {}
            }
        }
        // The token is a secret for the token method: never echo it.
        let token_method =
            self.method == Some(JoinMethod::Token) || other.method == Some(JoinMethod::Token);
        field(
            "join_method",
            &mut self.method,
            other.method,
            |m| Some(m.to_string()),
            a,
            b,
            out,
        );
        field(
            "token",
            &mut self.token,
            other.token,
            |t| (!token_method).then(|| t.clone()),
            a,
            b,
            out,
        );
        field(
            "auth_server",
            &mut self.auth_server,
            other.auth_server,
            |e| Some(e.to_string()),
            a,
            b,
            out,
        );
        field(
            "ca_pin",
            &mut self.ca_pin,
            other.ca_pin,
            |p| Some(p.to_string()),
            a,
            b,
            out,
        );
        field(
            "registration_secret",
            &mut self.secret,
            other.secret,
            |_| None,
            a,
            b,
            out,
        );
    }
}

fn parse_uri(source_name: &'static str, s: &str) -> Result<JoinUri, ConfigError> {
    s.parse::<JoinUri>().map_err(|e| ConfigError::Uri {
        source_name,
        detail: e.to_string(),
    })
}

/// Merges file, flags and environment into [`Settings`].
///
/// `env_secret` is the value of `BOUNDKEY_REGISTRATION_SECRET`; `read_secret` reads a secret file.
pub fn merge(
    file: Option<(&Path, &FileConfig)>,
    flags: &Flags,
    env_secret: Option<Zeroizing<String>>,
    read_secret: &dyn Fn(&Path) -> Result<Zeroizing<String>, ConfigError>,
) -> Result<Settings, ConfigError> {
    let empty = FileConfig::default();
    let fc = file.map(|(_, c)| c).unwrap_or(&empty);
    let mut conflicts = Vec::new();

    // Join fields stated by the config file: explicit keys, then its join_uri.
    let mut joined = JoinFields {
        method: fc
            .join_method
            .as_deref()
            .map(|m| {
                m.parse::<JoinMethod>()
                    .map_err(|detail| ConfigError::Invalid {
                        what: "join_method in the config file".into(),
                        detail,
                    })
            })
            .transpose()?,
        token: fc.token.clone(),
        auth_server: fc
            .auth_server
            .as_deref()
            .map(|s| {
                s.parse::<Endpoint>().map_err(|e| ConfigError::Invalid {
                    what: "auth_server in the config file".into(),
                    detail: e.to_string(),
                })
            })
            .transpose()?,
        ca_pin: fc
            .ca_pin
            .as_deref()
            .map(|p| {
                p.parse::<CaPin>().map_err(|e| ConfigError::Invalid {
                    what: "ca_pin in the config file".into(),
                    detail: e.to_string(),
                })
            })
            .transpose()?,
        secret: None,
    };
    if let Some(u) = &fc.join_uri {
        let u = parse_uri("join_uri in the config file", u)?;
        joined.merge(
            "the config file",
            JoinFields::from_uri(u),
            "the config file's join_uri",
            &mut conflicts,
        );
    }
    // The URI on the command line is merged over the file.
    if let Some(u) = &flags.join_uri {
        let u = parse_uri("--join-uri", u)?;
        joined.merge(
            "the config file",
            JoinFields::from_uri(u),
            "--join-uri",
            &mut conflicts,
        );
    }
    let uri_secret = joined.secret.take();

    // Registration secret: every source given must agree.
    let mut secrets: Vec<(String, Zeroizing<String>)> = Vec::new();
    if let Some(s) = uri_secret {
        secrets.push(("the join URI".into(), s));
    }
    match (
        &flags.registration_secret_file,
        &fc.registration_secret_file,
    ) {
        (Some(p), _) => secrets.push(("--registration-secret-file".into(), read_secret(p)?)),
        (None, Some(p)) => secrets.push((
            "registration_secret_file in the config file".into(),
            read_secret(p)?,
        )),
        (None, None) => {}
    }
    if let Some(s) = env_secret.filter(|s| !s.is_empty()) {
        secrets.push((SECRET_ENV.into(), s));
    }
    if let Some((first_name, first)) = secrets.first() {
        for (name, s) in &secrets[1..] {
            if s != first {
                conflicts.push(Conflict {
                    field: "registration_secret",
                    a: (first_name.clone(), None),
                    b: (name.clone(), None),
                });
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(ConfigError::Conflicts(conflicts));
    }
    let registration_secret = secrets.into_iter().next().map(|(_, s)| s);

    let storage =
        flags
            .storage
            .clone()
            .or_else(|| fc.storage.clone())
            .ok_or(ConfigError::Missing {
                what: "--storage",
                hint: "the directory where the agent keeps its keys and state",
            })?;
    let keystore = flags
        .keystore
        .as_deref()
        .or(fc.keystore.as_deref())
        .map(parse_backend)
        .transpose()?;
    let ftpm = fc.tpm.clone().unwrap_or_default();
    let tpm = TpmSettings {
        tcti: flags.tcti.clone().or(ftpm.tcti),
        owner_auth_file: flags.tpm_owner_auth_file.clone().or(ftpm.owner_auth_file),
        key_auth_file: flags.tpm_key_auth_file.clone().or(ftpm.key_auth_file),
        parent: flags
            .tpm_parent
            .as_deref()
            .or(ftpm.parent.as_deref())
            .map(parse_handle)
            .transpose()?,
    };
    let dur = |flag: Option<Duration>, file: &Option<String>, what: &str, default: Duration| match (
        flag, file,
    ) {
        (Some(d), _) => Ok(d),
        (None, Some(s)) => parse_duration(what, s),
        (None, None) => Ok(default),
    };
    let certificate_ttl = dur(
        flags.certificate_ttl,
        &fc.certificate_ttl,
        "certificate_ttl",
        DEFAULT_CERTIFICATE_TTL,
    )?;
    if certificate_ttl < MIN_CERTIFICATE_TTL || certificate_ttl > MAX_CERTIFICATE_TTL {
        return Err(ConfigError::Invalid {
            what: "certificate TTL".into(),
            detail: format!(
                "{} is outside 10s..7days",
                humantime::format_duration(certificate_ttl)
            ),
        });
    }
    let renewal_interval = dur(
        flags.renewal_interval,
        &fc.renewal_interval,
        "renewal_interval",
        DEFAULT_RENEWAL_INTERVAL,
    )?;
    let heartbeat_interval = dur(
        flags.heartbeat_interval,
        &fc.heartbeat_interval,
        "heartbeat_interval",
        DEFAULT_HEARTBEAT_INTERVAL,
    )?;
    for (what, d) in [
        ("renewal interval", renewal_interval),
        ("heartbeat interval", heartbeat_interval),
    ] {
        if d < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                what: what.into(),
                detail: "must be at least 1s".into(),
            });
        }
    }
    Ok(Settings {
        storage,
        destination: flags.destination.clone().or_else(|| fc.destination.clone()),
        keystore,
        tpm,
        join: JoinSettings {
            method: joined.method,
            token: joined.token,
            auth_server: joined.auth_server,
            ca_pin: joined.ca_pin,
            ca_file: flags.ca_file.clone().or_else(|| fc.ca_file.clone()),
            registration_secret,
        },
        certificate_ttl,
        renewal_interval,
        heartbeat_interval,
        oneshot: flags.oneshot,
    })
}

/// The renewal interval actually used: renewing after the certificate expired would force a
/// recovery every time, so the interval is capped at half the TTL (with a warning).
pub fn effective_renewal_interval(s: &Settings) -> Duration {
    let cap = s.certificate_ttl / 2;
    if s.renewal_interval > cap {
        tracing::warn!(
            renewal_interval = %humantime::format_duration(s.renewal_interval),
            certificate_ttl = %humantime::format_duration(s.certificate_ttl),
            "renewal interval is not shorter than half the certificate TTL; renewing every {} instead",
            humantime::format_duration(cap)
        );
        cap
    } else {
        s.renewal_interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN_A: &str = "sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    const PIN_B: &str = "sha256:ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

    fn no_files(p: &Path) -> Result<Zeroizing<String>, ConfigError> {
        match p.to_str() {
            Some("/secret-a") => Ok(Zeroizing::new("alpha".into())),
            Some("/secret-b") => Ok(Zeroizing::new("beta".into())),
            _ => Err(ConfigError::Secret {
                path: p.into(),
                detail: "no such file".into(),
            }),
        }
    }

    fn flags(storage: &str) -> Flags {
        Flags {
            storage: Some(storage.into()),
            ..Flags::default()
        }
    }

    fn toml(s: &str) -> FileConfig {
        FileConfig::parse(Path::new("/etc/boundkeyd.toml"), s).unwrap()
    }

    #[test]
    fn uri_alone_fills_every_join_field() {
        let mut f = flags("/s");
        f.join_uri = Some(format!(
            "boundkey+bound-keypair://dev:alpha@auth:3025?ca_pin={PIN_A}"
        ));
        let s = merge(None, &f, None, &no_files).unwrap();
        assert_eq!(s.join.method, Some(JoinMethod::BoundKeypair));
        assert_eq!(s.join.token.as_deref(), Some("dev"));
        assert_eq!(
            s.join.auth_server.as_ref().unwrap().to_string(),
            "auth:3025"
        );
        assert_eq!(s.join.ca_pin.unwrap().to_string(), PIN_A);
        assert_eq!(
            s.join.registration_secret.as_deref().map(|s| s.as_str()),
            Some("alpha")
        );
        assert_eq!(s.certificate_ttl, DEFAULT_CERTIFICATE_TTL);
        assert_eq!(s.renewal_interval, DEFAULT_RENEWAL_INTERVAL);
    }

    #[test]
    fn uri_is_merged_over_the_file_and_fills_gaps() {
        let fc = toml(
            r#"
            storage = "/var/lib/boundkey"
            destination = "/run/boundkey"
            auth_server = "auth:3025"
            certificate_ttl = "2h"
            [tpm]
            tcti = "swtpm:host=127.0.0.1,port=2321"
            parent = "0x81000001"
            "#,
        );
        let f = Flags {
            join_uri: Some(format!(
                "boundkey+bound-keypair://dev@auth:3025?ca_pin={PIN_A}"
            )),
            ..Flags::default()
        };
        let s = merge(Some((Path::new("/c"), &fc)), &f, None, &no_files).unwrap();
        assert_eq!(s.storage, PathBuf::from("/var/lib/boundkey"));
        assert_eq!(s.destination, Some(PathBuf::from("/run/boundkey")));
        assert_eq!(s.join.token.as_deref(), Some("dev"));
        assert_eq!(s.certificate_ttl, Duration::from_secs(7200));
        assert_eq!(s.tpm.parent, Some(0x8100_0001));
        assert_eq!(
            s.tpm.tcti.as_deref(),
            Some("swtpm:host=127.0.0.1,port=2321")
        );
    }

    #[test]
    fn every_conflict_is_listed_in_one_error() {
        let fc = toml(&format!(
            r#"
            storage = "/s"
            token = "dev-a"
            auth_server = "auth-a:1"
            ca_pin = "{PIN_A}"
            join_method = "bound_keypair"
            registration_secret_file = "/secret-a"
            "#
        ));
        let f = Flags {
            join_uri: Some(format!(
                "boundkey+bound-keypair://dev-b:beta@auth-b:2?ca_pin={PIN_B}"
            )),
            ..Flags::default()
        };
        let e = merge(Some((Path::new("/c"), &fc)), &f, None, &no_files).unwrap_err();
        let ConfigError::Conflicts(list) = &e else {
            panic!("{e}")
        };
        let fields: Vec<_> = list.iter().map(|c| c.field).collect();
        assert_eq!(
            fields,
            vec!["token", "auth_server", "ca_pin", "registration_secret"]
        );
        let msg = e.to_string();
        assert!(msg.contains("conflicting configuration (4)"), "{msg}");
        assert!(
            msg.contains(r#"token: the config file says "dev-a" but --join-uri says "dev-b""#),
            "{msg}"
        );
        assert!(
            msg.contains("auth-a:1") && msg.contains("auth-b:2"),
            "{msg}"
        );
        // Secrets are never echoed.
        assert!(!msg.contains("alpha") && !msg.contains("beta"), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn the_file_join_uri_conflicting_with_its_own_fields_is_reported() {
        let fc = toml(
            r#"
            storage = "/s"
            token = "one"
            join_uri = "boundkey+bound-keypair://two@h:1"
            "#,
        );
        let e = merge(
            Some((Path::new("/c"), &fc)),
            &Flags::default(),
            None,
            &no_files,
        )
        .unwrap_err();
        assert!(e.to_string().contains("join_uri"), "{e}");
    }

    #[test]
    fn identical_values_are_not_conflicts() {
        let fc = toml(&format!(
            r#"
            storage = "/s"
            token = "dev"
            ca_pin = "{PIN_A}"
            "#
        ));
        let f = Flags {
            join_uri: Some(format!(
                "boundkey+bound-keypair://dev:alpha@h:1?ca_pin={PIN_A}"
            )),
            ..Flags::default()
        };
        let s = merge(
            Some((Path::new("/c"), &fc)),
            &f,
            Some(Zeroizing::new("alpha".into())),
            &no_files,
        )
        .unwrap();
        assert_eq!(
            s.join.registration_secret.as_deref().map(|s| s.as_str()),
            Some("alpha")
        );
    }

    #[test]
    fn secret_sources_must_agree() {
        let mut f = flags("/s");
        f.registration_secret_file = Some("/secret-a".into());
        let e = merge(None, &f, Some(Zeroizing::new("beta".into())), &no_files).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("--registration-secret-file and BOUNDKEY_REGISTRATION_SECRET disagree"),
            "{msg}"
        );
        // From the environment alone.
        let s = merge(
            None,
            &flags("/s"),
            Some(Zeroizing::new("beta".into())),
            &no_files,
        )
        .unwrap();
        assert_eq!(
            s.join.registration_secret.as_deref().map(|s| s.as_str()),
            Some("beta")
        );
        // A flag file overrides the config file's file (not a conflict: one setting).
        let fc = toml(r#"registration_secret_file = "/secret-b""#);
        let s = merge(Some((Path::new("/c"), &fc)), &f, None, &no_files).unwrap();
        assert_eq!(
            s.join.registration_secret.as_deref().map(|s| s.as_str()),
            Some("alpha")
        );
        // A missing file is an error naming it.
        f.registration_secret_file = Some("/nope".into());
        let e = merge(None, &f, None, &no_files).unwrap_err();
        assert!(e.to_string().contains("/nope"), "{e}");
    }

    #[test]
    fn token_method_tokens_are_never_echoed() {
        let fc = toml(
            r#"
            storage = "/s"
            join_uri = "boundkey+token://secret-one@h:1"
            "#,
        );
        let f = Flags {
            join_uri: Some("boundkey+token://secret-two@h:1".into()),
            ..Flags::default()
        };
        let msg = merge(Some((Path::new("/c"), &fc)), &f, None, &no_files)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("token:") && !msg.contains("secret-one") && !msg.contains("secret-two"),
            "{msg}"
        );
    }

    #[test]
    fn flags_override_file_settings() {
        let fc = toml(
            r#"
            storage = "/file"
            keystore = "tpm"
            renewal_interval = "5m"
            "#,
        );
        let mut f = flags("/flag");
        f.keystore = Some("file".into());
        f.renewal_interval = Some(Duration::from_secs(60));
        let s = merge(Some((Path::new("/c"), &fc)), &f, None, &no_files).unwrap();
        assert_eq!(s.storage, PathBuf::from("/flag"));
        assert_eq!(s.keystore, Some(Backend::File));
        assert_eq!(s.renewal_interval, Duration::from_secs(60));
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let bad = |t: &str| {
            let fc = toml(t);
            merge(Some((Path::new("/c"), &fc)), &flags("/s"), None, &no_files)
                .unwrap_err()
                .to_string()
        };
        assert!(bad(r#"certificate_ttl = "8d""#).contains("outside 10s..7days"));
        assert!(bad(r#"certificate_ttl = "5s""#).contains("outside 10s..7days"));
        assert!(bad(r#"renewal_interval = "soon""#).contains("renewal_interval"));
        assert!(bad(r#"keystore = "hsm""#).contains("expected file or tpm"));
        assert!(bad(r#"join_uri = "https://x""#).contains("join_uri in the config file"));
        assert!(bad(r#"ca_pin = "md5:00""#).contains("ca_pin"));
        assert!(bad("[tpm]\nparent = \"zz\"").contains("0x81000001"));
        // Storage is required from somewhere.
        let e = merge(None, &Flags::default(), None, &no_files).unwrap_err();
        assert!(e.to_string().contains("--storage"), "{e}");
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused() {
        let e = FileConfig::parse(Path::new("/etc/b.toml"), "storgae = \"/x\"").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("/etc/b.toml") && msg.contains("storgae"),
            "{msg}"
        );
    }

    #[test]
    fn renewal_interval_is_capped_below_the_ttl() {
        let mut f = flags("/s");
        f.certificate_ttl = Some(Duration::from_secs(10));
        let s = merge(None, &f, None, &no_files).unwrap();
        assert_eq!(effective_renewal_interval(&s), Duration::from_secs(5));
        f.certificate_ttl = Some(Duration::from_secs(3600));
        let s = merge(None, &f, None, &no_files).unwrap();
        assert_eq!(effective_renewal_interval(&s), DEFAULT_RENEWAL_INTERVAL);
    }
}
