//! [`merge`]: file, flags and environment into [`Settings`].

use std::path::Path;
use std::time::Duration;

use boundkey_hal::Backend;
use boundkey_proto::{CaPin, Endpoint, JoinMethod};
use zeroize::Zeroizing;

use super::join_fields::{parse_uri, JoinFields};
use super::{
    ConfigError, Conflict, FileConfig, Flags, JoinSettings, Settings, TpmSettings,
    DEFAULT_CERTIFICATE_TTL, DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_RENEWAL_INTERVAL,
    MAX_CERTIFICATE_TTL, MIN_CERTIFICATE_TTL, SECRET_ENV,
};

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

/// Merges file, flags and environment into [`Settings`].
///
/// `env_secret` is the value of `BOUNDKEY_REGISTRATION_SECRET`; `read_secret` reads a secret file.
pub(crate) fn merge(
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
    let keystore = match flags.keystore {
        Some(b) => Some(b),
        None => fc.keystore.as_deref().map(parse_backend).transpose()?,
    };
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
        persist_srk: flags.tpm_persist_srk || ftpm.persist_srk.unwrap_or(false),
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
    let mut health = Vec::new();
    if let Some(p) = flags
        .health_socket
        .clone()
        .or_else(|| fc.health_socket.clone())
    {
        health.push(crate::health::Listen::Unix(p));
    }
    let listen = match (flags.health_listen, &fc.health_listen) {
        (Some(a), _) => Some(a),
        (None, Some(s)) => Some(s.parse().map_err(|_| ConfigError::Invalid {
            what: "health_listen".into(),
            detail: format!("{s:?} is not an IP address and port (e.g. 127.0.0.1:9105)"),
        })?),
        (None, None) => None,
    };
    if let Some(a) = listen {
        health.push(crate::health::Listen::Tcp(a));
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
        health,
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    const PIN_A: &str = "sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    const PIN_B: &str = "sha256:ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

    fn no_files(p: &Path) -> Result<Zeroizing<String>, ConfigError> {
        match p.to_str() {
            Some("/secret-a") => Ok(Zeroizing::new("alpha".into())),
            Some("/secret-b") => Ok(Zeroizing::new("beta".into())),
            _ => Err(ConfigError::Secret(boundkey_fs::SecretFileError {
                path: p.into(),
                detail: "no such file".into(),
            })),
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
            persist_srk = true
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
        assert!(s.tpm.persist_srk);
        assert_eq!(
            s.tpm.tcti.as_deref(),
            Some("swtpm:host=127.0.0.1,port=2321")
        );
        // The flag alone turns it on too; neither leaves it off.
        let on = Flags {
            tpm_persist_srk: true,
            storage: Some("/s".into()),
            ..Flags::default()
        };
        assert!(merge(None, &on, None, &no_files).unwrap().tpm.persist_srk);
        let off = Flags {
            storage: Some("/s".into()),
            ..Flags::default()
        };
        assert!(!merge(None, &off, None, &no_files).unwrap().tpm.persist_srk);
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
        f.keystore = Some(Backend::File);
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
}
