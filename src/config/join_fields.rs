//! The join fields (method, token, auth server, CA pin, registration secret) as each source
//! states them, and the merge that records every disagreement instead of picking a side.

use boundkey_proto::{CaPin, Endpoint, JoinMethod, JoinUri};
use zeroize::Zeroizing;

use super::{ConfigError, Conflict};

/// Join fields as one source states them.
#[derive(Default)]
pub(super) struct JoinFields {
    pub(super) method: Option<JoinMethod>,
    pub(super) token: Option<String>,
    pub(super) auth_server: Option<Endpoint>,
    pub(super) ca_pin: Option<CaPin>,
    pub(super) secret: Option<Zeroizing<String>>,
}

impl JoinFields {
    pub(super) fn from_uri(u: JoinUri) -> JoinFields {
        JoinFields {
            method: Some(u.method),
            token: Some(u.token),
            auth_server: Some(u.endpoint),
            ca_pin: u.ca_pin,
            secret: u.registration_secret.map(Zeroizing::new),
        }
    }

    /// Merges `other` (named `b`) over `self` (named `a`), recording conflicts.
    pub(super) fn merge(&mut self, a: &str, other: JoinFields, b: &str, out: &mut Vec<Conflict>) {
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

pub(super) fn parse_uri(source_name: &'static str, s: &str) -> Result<JoinUri, ConfigError> {
    s.parse::<JoinUri>().map_err(|e| ConfigError::Uri {
        source_name,
        detail: e.to_string(),
    })
}
