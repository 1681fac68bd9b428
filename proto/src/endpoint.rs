//! The auth service's address, one parser for every place that reads `HOST:PORT`.

use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A `HOST:PORT` address. Invariant: `host` is non-empty, holds a `:` only when it is an IPv6
/// literal (written `[v6]:port`), and `port` is not 0.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("address {0:?} has no port (expected HOST:PORT or [IPv6]:PORT)")]
    MissingPort(String),
    #[error("address {0:?} has no host")]
    MissingHost(String),
    #[error("invalid address {0:?} (an IPv6 address must be written [v6]:PORT)")]
    Invalid(String),
    #[error("invalid port in {0:?} (expected 1 to 65535)")]
    Port(String),
}

impl Endpoint {
    pub fn new(host: impl Into<String>, port: u16) -> Endpoint {
        Endpoint {
            host: host.into(),
            port,
        }
    }
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    /// Parses `host:port`, `1.2.3.4:port` or `[v6]:port`. The port is plain decimal digits.
    fn from_str(s: &str) -> Result<Endpoint, EndpointError> {
        let s = s.trim();
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest
                .split_once(']')
                .ok_or_else(|| EndpointError::Invalid(s.into()))?;
            let p = p
                .strip_prefix(':')
                .ok_or_else(|| EndpointError::MissingPort(s.into()))?;
            if !h.contains(':') {
                return Err(EndpointError::Invalid(s.into()));
            }
            (h, p)
        } else {
            let (h, p) = s
                .rsplit_once(':')
                .ok_or_else(|| EndpointError::MissingPort(s.into()))?;
            if h.contains(':') || h.contains('[') || h.contains(']') {
                return Err(EndpointError::Invalid(s.into()));
            }
            (h, p)
        };
        if host.is_empty() {
            return Err(EndpointError::MissingHost(s.into()));
        }
        if host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '/' || c == '@')
        {
            return Err(EndpointError::Invalid(s.into()));
        }
        if p_is_not_digits(port) {
            return Err(EndpointError::Port(s.into()));
        }
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| EndpointError::Port(s.into()))?;
        Ok(Endpoint::new(host, port))
    }
}

/// `u16::from_str` accepts a leading `+`; an address never has one.
fn p_is_not_digits(p: &str) -> bool {
    p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Serialize for Endpoint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_v4_and_bracketed_v6() {
        assert_eq!(
            "auth.example:3025".parse::<Endpoint>().unwrap(),
            Endpoint::new("auth.example", 3025)
        );
        assert_eq!(
            "10.0.0.1:1".parse::<Endpoint>().unwrap(),
            Endpoint::new("10.0.0.1", 1)
        );
        let v6: Endpoint = "[::1]:443".parse().unwrap();
        assert_eq!(v6.host, "::1");
        assert_eq!(v6.to_string(), "[::1]:443");
        let json = serde_json::to_string(&v6).unwrap();
        assert_eq!(json, "\"[::1]:443\"");
        assert_eq!(serde_json::from_str::<Endpoint>(&json).unwrap(), v6);
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "",
            "host",
            "host:",
            ":1",
            "host:0",
            "host:65536",
            "host:+1",
            "host:-1",
            "::1:443",
            "[::1]",
            "[::1]443",
            "[host]:1",
            "[]:1",
            "a b:1",
            "user@host:1",
            "h/x:1",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad:?}");
        }
    }
}
