//! The `postgres://` storage URL, its password and its TLS settings.
//!
//! A password never travels in the URL (it would show in `ps` and in logs): it comes from
//! `--storage-password-file`, `BOUNDKEY_STORAGE_PASSWORD` or `PGPASSWORD`. `sslmode` follows
//! libpq's meaning (docs/operations.md): `disable`, `prefer` (the default), `require`,
//! `verify-ca`, `verify-full`; `sslrootcert=PATH` names the CA bundle that verifies the server.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use percent_encoding::percent_decode_str;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use zeroize::Zeroizing;

/// Environment variables a password is read from, in this order, when no file is given.
pub const PASSWORD_ENVS: [&str; 2] = ["BOUNDKEY_STORAGE_PASSWORD", "PGPASSWORD"];

/// Why a `postgres://` URL or its password cannot be used. Never contains a password.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PostgresUrlError {
    #[error(
        "the storage URL contains a password, which would be visible in the process list; \
         remove it and use --storage-password-file or BOUNDKEY_STORAGE_PASSWORD"
    )]
    PasswordInUrl,
    #[error("invalid PostgreSQL storage URL {url}: {reason}")]
    Invalid { url: String, reason: String },
    #[error("unknown sslmode {0:?} (expected disable, prefer, require, verify-ca or verify-full)")]
    SslMode(String),
    #[error("sslmode={0} verifies the server's certificate: give its CA with sslrootcert=PATH")]
    RootCertMissing(&'static str),
    #[error("sslrootcert {path}: {reason}")]
    RootCert { path: PathBuf, reason: String },
    #[error("cannot read the storage password file {path}: {reason}")]
    PasswordFile { path: PathBuf, reason: String },
}

/// libpq's `sslmode`, as far as boundkey implements it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl FromStr for SslMode {
    type Err = PostgresUrlError;
    fn from_str(s: &str) -> Result<Self, PostgresUrlError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            o => return Err(PostgresUrlError::SslMode(o.to_string())),
        })
    }
}

/// A parsed `postgres://` URL.
///
/// Invariant: the URL holds no password (parsing refuses one), so `url` may be shown anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresUrl {
    /// As given: safe to print.
    url: String,
    /// The URL without the parameters boundkey handles itself (`sslmode`, `sslrootcert`), for
    /// the client library.
    client_url: String,
    pub ssl_mode: SslMode,
    pub root_cert: Option<PathBuf>,
}

impl PostgresUrl {
    /// Parses `postgres://USER@HOST:PORT/DB?sslmode=…&sslrootcert=…` (also `postgresql://`).
    pub fn parse(url: &str) -> Result<Self, PostgresUrlError> {
        let invalid = |reason: String| PostgresUrlError::Invalid {
            url: redact(url),
            reason,
        };
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut ssl_mode = SslMode::Prefer;
        let mut root_cert = None;
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode_str(v)
                .decode_utf8()
                .map_err(|e| invalid(format!("parameter {k}: {e}")))?;
            match k {
                "sslmode" => ssl_mode = value.parse()?,
                "sslrootcert" => root_cert = Some(PathBuf::from(value.as_ref())),
                "password" => return Err(PostgresUrlError::PasswordInUrl),
                _ => rest.push(pair),
            }
        }
        let client_url = if rest.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        let config = postgres::Config::from_str(&client_url).map_err(|e| invalid(e.to_string()))?;
        if config.get_password().is_some() {
            return Err(PostgresUrlError::PasswordInUrl);
        }
        if matches!(ssl_mode, SslMode::VerifyCa | SslMode::VerifyFull) && root_cert.is_none() {
            return Err(PostgresUrlError::RootCertMissing(ssl_mode.as_str()));
        }
        Ok(PostgresUrl {
            url: url.to_string(),
            client_url,
            ssl_mode,
            root_cert,
        })
    }

    /// The client library's configuration, with `password` set.
    pub fn client_config(&self, password: Option<&str>) -> Result<postgres::Config, String> {
        let mut config = postgres::Config::from_str(&self.client_url).map_err(|e| e.to_string())?;
        config.ssl_mode(match self.ssl_mode {
            SslMode::Disable => postgres::config::SslMode::Disable,
            SslMode::Prefer => postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                postgres::config::SslMode::Require
            }
        });
        if let Some(p) = password {
            config.password(p);
        }
        Ok(config)
    }

    /// The rustls client configuration `sslmode` and `sslrootcert` ask for (unused with
    /// `disable`). Whether the server's certificate is verified:
    ///
    /// * `verify-full`: chain to `sslrootcert` and the host name;
    /// * `verify-ca`, and `prefer`/`require` with `sslrootcert`: the chain only, as libpq;
    /// * `prefer`/`require` without `sslrootcert`: not at all (encryption against passive
    ///   eavesdropping only, as libpq); [`PostgresUrl::unverified_tls`] says so for a warning.
    pub fn tls_config(
        &self,
        provider: Arc<CryptoProvider>,
    ) -> Result<ClientConfig, PostgresUrlError> {
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| PostgresUrlError::Invalid {
                url: self.url.clone(),
                reason: format!("TLS: {e}"),
            })?;
        let chain = match &self.root_cert {
            None => None,
            Some(path) => Some(
                WebPkiServerVerifier::builder_with_provider(
                    Arc::new(load_roots(path)?),
                    provider.clone(),
                )
                .build()
                .map_err(|e| PostgresUrlError::RootCert {
                    path: path.clone(),
                    reason: e.to_string(),
                })?,
            ),
        };
        let verifier = Arc::new(ServerVerifier {
            chain,
            check_name: self.ssl_mode == SslMode::VerifyFull,
            provider,
        });
        Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth())
    }

    /// Whether TLS may be used without authenticating the server (see
    /// [`PostgresUrl::tls_config`]).
    pub fn unverified_tls(&self) -> bool {
        matches!(self.ssl_mode, SslMode::Prefer | SslMode::Require) && self.root_cert.is_none()
    }
}

impl std::fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

/// `url` with anything between `://` and `@` after a `:` hidden, for error messages about a
/// URL that may hold a password.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

fn load_roots(path: &Path) -> Result<RootCertStore, PostgresUrlError> {
    let bad = |reason: String| PostgresUrlError::RootCert {
        path: path.to_path_buf(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
        roots
            .add(cert.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    Ok(roots)
}

/// The database password: `--storage-password-file` when given, else the first of
/// [`PASSWORD_ENVS`] that is set, else none (trust, peer or certificate authentication).
pub fn resolve_password(
    file: Option<&Path>,
) -> Result<Option<Zeroizing<String>>, PostgresUrlError> {
    if let Some(path) = file {
        let text =
            boundkey_fs::read_secret_file(path).map_err(|e| PostgresUrlError::PasswordFile {
                path: path.to_path_buf(),
                reason: e.detail,
            })?;
        return Ok(Some(text));
    }
    Ok(PASSWORD_ENVS
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .map(Zeroizing::new))
}

/// Checks as much of the server's certificate as `sslmode` and `sslrootcert` ask for; the
/// handshake signatures are always checked.
#[derive(Debug)]
struct ServerVerifier {
    /// The chain to `sslrootcert`; `None` (`prefer`/`require` without a root): not verified.
    chain: Option<Arc<WebPkiServerVerifier>>,
    /// Whether the host name must match too (`verify-full`).
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn parses_mode_and_root_and_keeps_other_parameters() {
        let u = PostgresUrl::parse(
            "postgres://bk@db.example:5433/boundkey?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=authd",
        )
        .unwrap();
        assert_eq!(u.ssl_mode, SslMode::VerifyFull);
        assert_eq!(u.root_cert.as_deref(), Some(Path::new("/etc/ca.pem")));
        let c = u.client_config(Some("pw")).unwrap();
        assert_eq!(c.get_user(), Some("bk"));
        assert_eq!(c.get_dbname(), Some("boundkey"));
        assert_eq!(c.get_application_name(), Some("authd"));
        assert_eq!(c.get_password(), Some(&b"pw"[..]));
        assert_eq!(c.get_ssl_mode(), postgres::config::SslMode::Require);
        assert!(!u.unverified_tls());
        let plain = PostgresUrl::parse("postgresql://bk@localhost/boundkey").unwrap();
        assert_eq!(plain.ssl_mode, SslMode::Prefer);
        assert!(plain.unverified_tls());
        assert_eq!(plain.to_string(), "postgresql://bk@localhost/boundkey");
    }

    #[test]
    fn a_password_in_the_url_is_refused_without_echoing_it() {
        for url in [
            "postgres://bk:hunter2@localhost/db",
            "postgres://bk@localhost/db?password=hunter2",
        ] {
            let e = PostgresUrl::parse(url).unwrap_err();
            assert_eq!(e, PostgresUrlError::PasswordInUrl, "{url}");
            assert!(!e.to_string().contains("hunter2"));
        }
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
    }

    #[test]
    fn verification_modes_need_a_root_and_unknown_modes_are_refused() {
        assert_eq!(
            PostgresUrl::parse("postgres://bk@h/db?sslmode=verify-ca").unwrap_err(),
            PostgresUrlError::RootCertMissing("verify-ca")
        );
        assert!(matches!(
            PostgresUrl::parse("postgres://bk@h/db?sslmode=allow").unwrap_err(),
            PostgresUrlError::SslMode(m) if m == "allow"
        ));
        let u = PostgresUrl::parse("postgres://bk@h/db?sslmode=require&sslrootcert=/nonexistent")
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        assert!(matches!(
            u.tls_config(provider),
            Err(PostgresUrlError::RootCert { .. })
        ));
    }
}
