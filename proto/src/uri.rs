//! The join URI: `boundkey+bound-keypair://TOKEN[:SECRET]@HOST:PORT[?ca_pin=sha256:HEX]` and
//! `boundkey+token://TOKEN@HOST:PORT[?ca_pin=sha256:HEX]`.
//!
//! TOKEN and SECRET are percent-decoded. HOST may be a DNS name, an IPv4 address or a bracketed
//! IPv6 address. Any other query parameter is an error rather than being ignored, so a
//! misspelt `ca_pin` cannot silently turn pinning off.

use core::fmt;
use core::str::FromStr;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use serde::{Deserialize, Serialize};

use crate::endpoint::{Endpoint, EndpointError};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UriError {
    #[error("join URI must start with boundkey+bound-keypair:// or boundkey+token://")]
    Scheme,
    #[error("join URI has no TOKEN@ part")]
    MissingToken,
    #[error("join URI has an empty token")]
    EmptyToken,
    #[error("a boundkey+token:// URI cannot carry a registration secret")]
    SecretNotAllowed,
    #[error("join URI: {0}")]
    Address(#[from] EndpointError),
    #[error("join URI contains invalid percent-encoding")]
    Encoding,
    #[error("join URI parameter {0} is given more than once")]
    RepeatedParam(&'static str),
    #[error("unknown join URI parameter {0:?} (only ca_pin is defined)")]
    UnknownParam(String),
    #[error("invalid ca_pin {0:?}: expected sha256: followed by 64 hex digits")]
    CaPin(String),
}

/// Characters of a `token`-method token that may be shown (enough to tell tokens apart, far too
/// few to guess the rest: tokens carry 128 random bits).
pub const TOKEN_PREFIX_SHOWN: usize = 8;

/// How a device joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinMethod {
    BoundKeypair,
    Token,
}

impl JoinMethod {
    /// How a join token of this method may be shown in logs, audit events and tables. A
    /// bound-keypair token name is not a secret and is shown whole; a `token`-method token *is*
    /// the secret, so only a short prefix identifies it.
    pub fn displayed_token(self, token: &str) -> String {
        match self {
            JoinMethod::BoundKeypair => token.to_string(),
            JoinMethod::Token => {
                let head: String = token.chars().take(TOKEN_PREFIX_SHOWN).collect();
                format!("{head}…")
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JoinMethod::BoundKeypair => "bound_keypair",
            JoinMethod::Token => "token",
        }
    }
    fn scheme(self) -> &'static str {
        match self {
            JoinMethod::BoundKeypair => "boundkey+bound-keypair",
            JoinMethod::Token => "boundkey+token",
        }
    }
}

impl fmt::Display for JoinMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JoinMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bound_keypair" => Ok(Self::BoundKeypair),
            "token" => Ok(Self::Token),
            o => Err(format!(
                "unknown join method {o:?} (expected bound_keypair or token)"
            )),
        }
    }
}

/// SHA-256 of the auth service CA's SubjectPublicKeyInfo, written `sha256:HEX`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaPin(pub [u8; 32]);

impl CaPin {
    /// Pin of a DER SubjectPublicKeyInfo.
    pub fn of_spki(spki_der: &[u8]) -> Self {
        use sha2::Digest;
        CaPin(sha2::Sha256::digest(spki_der).into())
    }

    /// Constant-time comparison; the pin is not secret, but this costs nothing.
    pub fn matches(&self, other: &CaPin) -> bool {
        use subtle::ConstantTimeEq;
        self.0.ct_eq(&other.0).into()
    }
}

impl FromStr for CaPin {
    type Err = UriError;
    fn from_str(s: &str) -> Result<Self, UriError> {
        let err = || UriError::CaPin(s.to_string());
        let hex = s.strip_prefix("sha256:").ok_or_else(err)?;
        // from_str_radix would accept a sign ("+f"): only hex digits are a pin.
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err());
        }
        let mut out = [0u8; 32];
        for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
            let pair = core::str::from_utf8(chunk).map_err(|_| err())?;
            out[i] = u8::from_str_radix(pair, 16).map_err(|_| err())?;
        }
        Ok(CaPin(out))
    }
}

impl fmt::Display for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A parsed join URI.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinUri {
    pub method: JoinMethod,
    pub token: String,
    pub registration_secret: Option<String>,
    pub endpoint: Endpoint,
    pub ca_pin: Option<CaPin>,
}

impl fmt::Debug for JoinUri {
    // The token (token method) and the secret are credentials: never whole in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinUri")
            .field("method", &self.method)
            .field("token", &self.method.displayed_token(&self.token))
            .field(
                "registration_secret",
                &self.registration_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("endpoint", &self.endpoint)
            .field("ca_pin", &self.ca_pin)
            .finish()
    }
}

/// Characters escaped in the userinfo part when formatting a URI.
const USERINFO: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b':')
    .add(b';')
    .add(b'<')
    .add(b'=')
    .add(b'>')
    .add(b'?')
    .add(b'@')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// Percent-decodes `s`. A `%` not followed by two hex digits is an error: the lenient decoder
/// would keep it literally, so `%zz` and `%2` would reach the auth service as typed.
fn decode(s: &str) -> Result<String, UriError> {
    let b = s.as_bytes();
    for (i, _) in s.match_indices('%') {
        let ok = b.len() > i + 2 && b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit();
        if !ok {
            return Err(UriError::Encoding);
        }
    }
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| UriError::Encoding)
}

impl FromStr for JoinUri {
    type Err = UriError;

    fn from_str(s: &str) -> Result<Self, UriError> {
        let s = s.trim();
        let (method, rest) = if let Some(r) = s.strip_prefix("boundkey+bound-keypair://") {
            (JoinMethod::BoundKeypair, r)
        } else if let Some(r) = s.strip_prefix("boundkey+token://") {
            (JoinMethod::Token, r)
        } else {
            return Err(UriError::Scheme);
        };
        let (authority, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let authority = authority.strip_suffix('/').unwrap_or(authority);
        let (userinfo, hostport) = authority.rsplit_once('@').ok_or(UriError::MissingToken)?;
        let (token_raw, secret_raw) = match userinfo.split_once(':') {
            Some((t, s)) => (t, Some(s)),
            None => (userinfo, None),
        };
        let token = decode(token_raw)?;
        if token.is_empty() {
            return Err(UriError::EmptyToken);
        }
        let registration_secret = match secret_raw {
            Some(_) if method == JoinMethod::Token => return Err(UriError::SecretNotAllowed),
            Some(s) => Some(decode(s)?).filter(|s| !s.is_empty()),
            None => None,
        };
        let endpoint: Endpoint = hostport.parse()?;
        let mut ca_pin = None;
        for pair in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
        {
            match pair.split_once('=') {
                Some(("ca_pin", _)) if ca_pin.is_some() => {
                    return Err(UriError::RepeatedParam("ca_pin"))
                }
                Some(("ca_pin", v)) => ca_pin = Some(decode(v)?.parse()?),
                _ => return Err(UriError::UnknownParam(pair.to_string())),
            }
        }
        Ok(JoinUri {
            method,
            token,
            registration_secret,
            endpoint,
            ca_pin,
        })
    }
}

impl fmt::Display for JoinUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}",
            self.method.scheme(),
            utf8_percent_encode(&self.token, USERINFO)
        )?;
        if let Some(s) = &self.registration_secret {
            write!(f, ":{}", utf8_percent_encode(s, USERINFO))?;
        }
        write!(f, "@{}", self.endpoint)?;
        if let Some(pin) = &self.ca_pin {
            write!(f, "?ca_pin={pin}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn parses_bound_keypair_with_secret_and_pin() {
        let u: JoinUri =
            format!("boundkey+bound-keypair://dev-1:s%40cret@auth.example:3025?ca_pin={PIN}")
                .parse()
                .unwrap();
        assert_eq!(u.method, JoinMethod::BoundKeypair);
        assert_eq!(u.token, "dev-1");
        assert_eq!(u.registration_secret.as_deref(), Some("s@cret"));
        assert_eq!(u.endpoint, Endpoint::new("auth.example", 3025));
        assert_eq!(u.ca_pin.unwrap().to_string(), PIN);
        assert_eq!(u.to_string().parse::<JoinUri>().unwrap(), u);
    }

    #[test]
    fn parses_minimal_forms_and_ipv6() {
        let u: JoinUri = "boundkey+bound-keypair://tok@10.0.0.1:443".parse().unwrap();
        assert_eq!((u.registration_secret, u.ca_pin), (None, None));
        let u: JoinUri = "boundkey+token://abc@[::1]:3025".parse().unwrap();
        assert_eq!(
            (u.method, u.endpoint.host.as_str(), u.endpoint.port),
            (JoinMethod::Token, "::1", 3025)
        );
        assert_eq!(u.to_string(), "boundkey+token://abc@[::1]:3025");
    }

    #[test]
    fn refuses_bad_uris_with_specific_errors() {
        let cases: &[(&str, UriError)] = &[
            ("https://a@b:1", UriError::Scheme),
            ("boundkey+token://host:1", UriError::MissingToken),
            ("boundkey+token://@host:1", UriError::EmptyToken),
            ("boundkey+token://t:s@host:1", UriError::SecretNotAllowed),
            (
                "boundkey+bound-keypair://t@host",
                UriError::Address(EndpointError::MissingPort("host".into())),
            ),
            (
                "boundkey+bound-keypair://t@host:0",
                UriError::Address(EndpointError::Port("host:0".into())),
            ),
            (
                "boundkey+bound-keypair://t@host:99999",
                UriError::Address(EndpointError::Port("host:99999".into())),
            ),
            (
                "boundkey+bound-keypair://t@:1",
                UriError::Address(EndpointError::MissingHost(":1".into())),
            ),
            (
                "boundkey+bound-keypair://t@h:1?capin=x",
                UriError::UnknownParam("capin=x".into()),
            ),
            (
                "boundkey+bound-keypair://t@h:1?ca_pin=sha256:12",
                UriError::CaPin("sha256:12".into()),
            ),
            ("boundkey+bound-keypair://t%ff@h:1", UriError::Encoding),
            ("boundkey+bound-keypair://t%zz@h:1", UriError::Encoding),
            ("boundkey+bound-keypair://t:s%2@h:1", UriError::Encoding),
            ("boundkey+bound-keypair://t:s%@h:1", UriError::Encoding),
            (
                "boundkey+bound-keypair://t@h:+1",
                UriError::Address(EndpointError::Port("h:+1".into())),
            ),
            (
                "boundkey+bound-keypair://t@h:1?ca_pin=sha256:+0112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
                UriError::CaPin("sha256:+0112233445566778899aabbccddeeff00112233445566778899aabbccddeeff".into()),
            ),
            (
                "boundkey+bound-keypair://t@h:1?ca_pin=sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff&ca_pin=sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
                UriError::RepeatedParam("ca_pin"),
            ),
        ];
        for (s, e) in cases {
            assert_eq!(s.parse::<JoinUri>().as_ref().err(), Some(e), "{s}");
        }
    }

    #[test]
    fn debug_redacts_secrets() {
        let u: JoinUri = "boundkey+bound-keypair://tok:topsecret@h:1"
            .parse()
            .unwrap();
        assert!(!format!("{u:?}").contains("topsecret"));
        let u: JoinUri = "boundkey+token://tokensecret@h:1".parse().unwrap();
        assert!(!format!("{u:?}").contains("tokensecret"));
    }

    #[test]
    fn only_token_method_tokens_are_shortened_for_display() {
        assert_eq!(
            JoinMethod::BoundKeypair.displayed_token("sensor-0042"),
            "sensor-0042"
        );
        let shown = JoinMethod::Token.displayed_token("0123456789abcdef");
        assert_eq!(shown, "01234567…");
        assert_eq!(JoinMethod::Token.displayed_token("ab"), "ab…");
    }
}
