//! The agent's one decision stage: merged [`Settings`] and the stored [`State`] go in, a
//! [`Resolved`] configuration (or every conflict) comes out, and [`plan_attempt`] turns it into
//! what one ceremony sends.
//!
//! Pure: no files, no clock, no TPM. What the caller read from the machine (the CA file, whether a
//! TPM is usable) arrives as an [`Environment`], and the time as an argument, so every rule below
//! is unit-tested here.
//!
//! Rules:
//! * the key store is the one the storage directory already uses; a different configured one is
//!   a conflict; a new directory takes the configured one, else the TPM when usable, else files;
//! * a storage directory that joined keeps its join method and (bound keypair) token: a
//!   configuration naming others is a conflict, never a silent switch;
//! * join fields missing from the configuration come from the stored state;
//! * the auth service is authenticated by the configured CA file, else the CA learned at first
//!   contact (pinned again when a different pin is configured), else the configured pin;
//! * the ceremony kind follows from the stored identity (see [`ceremony_kind`]).

use std::time::Duration;

use boundkey_hal::Backend;
use boundkey_proto::{CaPin, CeremonyKind, Endpoint, JoinMethod};
use rustls::pki_types::CertificateDer;

use crate::config::{Conflict, Settings};
use crate::storage::{Identity, State};
use crate::transport::{self, Trust};

/// A certificate closer than this to expiry is not presented (it could expire mid-handshake).
pub(crate) const EXPIRY_MARGIN_SECS: i64 = 3;

/// What the caller read from the machine for [`resolve`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Environment {
    /// This build can use a TPM and the machine has one.
    pub(crate) tpm_available: bool,
    /// The certificates of the configured CA file (`--ca-file`), already read and parsed.
    pub(crate) ca_file: Option<Vec<CertificateDer<'static>>>,
}

/// Where and how to reach the auth service.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) method: JoinMethod,
    /// Token name (bound keypair) or secret token (`token` method, when configured).
    pub(crate) token: Option<String>,
    pub(crate) endpoint: Endpoint,
    pub(crate) trust: Trust,
}

/// Why there is no [`Target`]: only commands that contact the auth service need one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NoTarget {
    #[error("no join URI configured and this storage directory has never joined: pass --join-uri (from boundkeyctl tokens add)")]
    NeverJoined,
    #[error("no auth service address configured: pass --join-uri")]
    NoAddress,
    #[error("no way to authenticate the auth service: the join URI needs ?ca_pin=sha256:… (printed by boundkey-authd), or give --ca-file")]
    NoTrust,
}

/// The configuration resolved against the storage directory. Invariant: nothing in it
/// contradicts the stored state.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub(crate) backend: Backend,
    pub(crate) target: Result<Target, NoTarget>,
    /// The renewal interval in force (capped below the certificate TTL).
    pub(crate) renewal_interval: Duration,
    /// The configured interval was longer than allowed and was capped (worth a warning).
    pub(crate) renewal_interval_capped: bool,
}

/// Why the configuration cannot be used with this storage directory.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ResolveError {
    /// The configuration contradicts the stored state (listed in full).
    #[error("{} conflicting field(s)", .0.len())]
    Conflicts(Vec<Conflict>),
    /// The CA certificate recorded at first contact cannot be parsed.
    #[error("the auth service CA recorded in the storage directory is unreadable: {0}")]
    StoredCa(transport::TransportError),
}

/// Resolves `settings` against the stored state (`None`: a new storage directory).
pub(crate) fn resolve(
    settings: &Settings,
    stored: Option<&State>,
    env: &Environment,
) -> Result<Resolved, ResolveError> {
    let mut conflicts = Vec::new();
    let backend = match (stored.map(State::backend), settings.keystore) {
        (Some(s), Some(c)) if s != c => {
            conflicts.push(stored_conflict("keystore", s.to_string(), c.to_string()));
            s
        }
        (Some(s), _) => s,
        (None, Some(c)) => c,
        (None, None) if env.tpm_available => Backend::Tpm,
        (None, None) => Backend::File,
    };
    if let Some(j) = stored.and_then(|s| s.join.as_ref()) {
        let mine = &settings.join;
        if let Some(m) = mine.method.filter(|m| *m != j.method) {
            conflicts.push(stored_conflict(
                "join_method",
                j.method.to_string(),
                m.to_string(),
            ));
        }
        if let (JoinMethod::BoundKeypair, Some(t), Some(s)) = (j.method, &mine.token, &j.token) {
            if t != s {
                conflicts.push(stored_conflict("token", s.clone(), t.clone()));
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(ResolveError::Conflicts(conflicts));
    }
    let (renewal_interval, renewal_interval_capped) = renewal_interval(settings);
    Ok(Resolved {
        backend,
        target: target(settings, stored, env)?,
        renewal_interval,
        renewal_interval_capped,
    })
}

fn stored_conflict(field: &'static str, stored: String, configured: String) -> Conflict {
    Conflict {
        field,
        a: ("the storage directory".into(), Some(stored)),
        b: ("the configuration".into(), Some(configured)),
    }
}

/// Renewing after the certificate expired would force a recovery every time, so the interval is
/// capped at half the TTL.
fn renewal_interval(s: &Settings) -> (Duration, bool) {
    let cap = s.certificate_ttl / 2;
    if s.renewal_interval > cap {
        (cap, true)
    } else {
        (s.renewal_interval, false)
    }
}

fn target(
    settings: &Settings,
    stored: Option<&State>,
    env: &Environment,
) -> Result<Result<Target, NoTarget>, ResolveError> {
    let j = &settings.join;
    let joined = stored.and_then(|s| s.join.as_ref());
    let Some(method) = j.method.or(joined.map(|s| s.method)) else {
        return Ok(Err(NoTarget::NeverJoined));
    };
    let token = j
        .token
        .clone()
        .or_else(|| joined.and_then(|s| s.token.clone()));
    let Some(endpoint) = j
        .auth_server
        .clone()
        .or_else(|| joined.map(|s| s.auth_server.clone()))
    else {
        return Ok(Err(NoTarget::NoAddress));
    };
    let learned = joined
        .and_then(|s| s.server_ca.as_deref())
        .map(transport::certs_from_pem)
        .transpose()
        .map_err(ResolveError::StoredCa)?
        .filter(|c| !c.is_empty());
    let Some(trust) = trust(env.ca_file.as_ref(), learned, j.ca_pin) else {
        return Ok(Err(NoTarget::NoTrust));
    };
    Ok(Ok(Target {
        method,
        token,
        endpoint,
        trust,
    }))
}

fn trust(
    ca_file: Option<&Vec<CertificateDer<'static>>>,
    learned: Option<Vec<CertificateDer<'static>>>,
    pin: Option<CaPin>,
) -> Option<Trust> {
    if let Some(certs) = ca_file {
        return Some(Trust::Ca(certs.clone()));
    }
    match (learned, pin) {
        (Some(certs), None) => Some(Trust::Ca(certs)),
        (Some(certs), Some(pin)) => {
            let same = certs.iter().any(|c| {
                transport::spki_of(c.as_ref()).is_some_and(|s| CaPin::of_spki(s).matches(&pin))
            });
            // A different pin means the service's CA changed: pin again rather than trust the
            // old CA.
            Some(if same {
                Trust::Ca(certs)
            } else {
                Trust::Pin(pin)
            })
        }
        (None, Some(pin)) => Some(Trust::Pin(pin)),
        (None, None) => None,
    }
}

/// Whether `id` can still be presented over mTLS at `now`.
pub(crate) fn usable(id: &Identity, now: i64) -> bool {
    id.expires.saturating_sub(EXPIRY_MARGIN_SECS) > now
}

/// Which ceremony to run now:
/// * no identity: a first join;
/// * `token` method: renew while the certificate is usable, else join again with the token;
/// * bound keypair: renew while the certificate is usable, else recover. After a ceremony whose
///   result may have been lost, the renewal is repeated with the same certificate only when the
///   identity key was recorded (so the auth service can deliver again); otherwise recover.
pub(crate) fn ceremony_kind(method: JoinMethod, state: &State, now: i64) -> CeremonyKind {
    let Some(id) = &state.identity else {
        return CeremonyKind::FirstJoin;
    };
    let retryable = state
        .in_flight
        .as_ref()
        .map_or(true, |f| f.identity_key.is_some());
    match method {
        JoinMethod::Token if usable(id, now) => CeremonyKind::Renewal,
        JoinMethod::Token => CeremonyKind::FirstJoin,
        JoinMethod::BoundKeypair if usable(id, now) && retryable => CeremonyKind::Renewal,
        JoinMethod::BoundKeypair => CeremonyKind::Recovery,
    }
}

/// What one attempt sends, decided before any I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AttemptPlan {
    pub(crate) kind: CeremonyKind,
    /// Token name (bound keypair) or secret token (`token` join); `None` for a `token` renewal.
    pub(crate) token: Option<String>,
    /// Only on a bound-keypair first join.
    pub(crate) registration_secret: Option<String>,
    /// Present the stored certificate over mTLS (renewals only).
    pub(crate) present_certificate: bool,
    /// The stored join-state document (not on a first join).
    pub(crate) join_state: Option<String>,
}

/// Why an attempt cannot be made as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PlanError {
    #[error("first join needs a registration secret (in the join URI, --registration-secret-file or BOUNDKEY_REGISTRATION_SECRET) or a pre-registered key (boundkeyd keypair create, then boundkeyctl tokens add --initial-public-key)")]
    NoOnboarding,
    #[error("the identity expired and the token join method cannot recover: get a new token (boundkeyctl tokens add --join-method token) and pass its --join-uri")]
    TokenExpired,
    #[error("no token configured: pass --join-uri")]
    NoToken,
    #[error("no token name configured: pass --join-uri")]
    NoTokenName,
}

/// Plans one attempt of ceremony `kind` towards `target`.
pub(crate) fn plan_attempt(
    target: &Target,
    kind: CeremonyKind,
    state: &State,
    registration_secret: Option<&str>,
) -> Result<AttemptPlan, PlanError> {
    let bound = target.method == JoinMethod::BoundKeypair;
    let registration_secret = match kind {
        CeremonyKind::FirstJoin if bound => registration_secret.map(str::to_string),
        _ => None,
    };
    if bound
        && kind == CeremonyKind::FirstJoin
        && registration_secret.is_none()
        && state.keys.active.is_none()
    {
        return Err(PlanError::NoOnboarding);
    }
    let token = match (target.method, kind) {
        (JoinMethod::Token, CeremonyKind::Renewal) => None,
        (JoinMethod::Token, _) => {
            Some(target.token.clone().ok_or(if state.identity.is_some() {
                PlanError::TokenExpired
            } else {
                PlanError::NoToken
            })?)
        }
        (JoinMethod::BoundKeypair, _) => Some(target.token.clone().ok_or(PlanError::NoTokenName)?),
    };
    let join_state = match kind {
        CeremonyKind::FirstJoin => None,
        _ => state.identity.as_ref().and_then(|i| i.join_state.clone()),
    };
    Ok(AttemptPlan {
        kind,
        token,
        registration_secret,
        present_certificate: kind == CeremonyKind::Renewal && state.identity.is_some(),
        join_state,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::Path;

    use super::*;
    use crate::keyset::KeyRef;
    use crate::storage::{InFlight, JoinInfo, Secret};

    const PIN: &str = "sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn settings() -> Settings {
        Settings::for_tests(Path::new("/s"))
    }

    fn uri_settings(method: JoinMethod, token: &str) -> Settings {
        let mut s = settings();
        s.join.method = Some(method);
        s.join.token = Some(token.into());
        s.join.auth_server = Some(Endpoint::new("auth", 3025));
        s.join.ca_pin = Some(PIN.parse().unwrap());
        s
    }

    fn joined(method: JoinMethod, token: Option<&str>) -> State {
        let mut st = State::new(Backend::File);
        st.join = Some(JoinInfo {
            method,
            token: token.map(str::to_string),
            auth_server: Endpoint::new("stored", 1),
            server_ca: None,
        });
        st
    }

    fn identity(expires: i64) -> Identity {
        Identity {
            bot_name: "b".into(),
            instance_id: "i".into(),
            generation: 1,
            join_method: JoinMethod::BoundKeypair,
            not_before: 0,
            expires,
            certificate: String::new(),
            ca_bundle: String::new(),
            private_key: Secret(String::new()),
            join_state: Some("js".into()),
        }
    }

    fn env() -> Environment {
        Environment::default()
    }

    #[test]
    fn a_new_directory_takes_the_configured_backend_else_the_tpm_when_usable() {
        let mut s = settings();
        assert_eq!(resolve(&s, None, &env()).unwrap().backend, Backend::File);
        let tpm = Environment {
            tpm_available: true,
            ..env()
        };
        assert_eq!(resolve(&s, None, &tpm).unwrap().backend, Backend::Tpm);
        s.keystore = Some(Backend::File);
        assert_eq!(resolve(&s, None, &tpm).unwrap().backend, Backend::File);
    }

    #[test]
    fn a_joined_directory_keeps_its_backend_method_and_token() {
        let st = joined(JoinMethod::BoundKeypair, Some("dev-1"));
        // Nothing configured: the stored values are used.
        let r = resolve(&settings(), Some(&st), &env()).unwrap();
        assert_eq!(r.backend, Backend::File);
        assert!(matches!(r.target, Err(NoTarget::NoTrust)));
        // Every contradiction is listed.
        let mut s = uri_settings(JoinMethod::Token, "other");
        s.keystore = Some(Backend::Tpm);
        let Err(ResolveError::Conflicts(list)) = resolve(&s, Some(&st), &env()) else {
            panic!("expected conflicts")
        };
        let fields: Vec<_> = list.iter().map(|c| c.field).collect();
        assert_eq!(fields, ["keystore", "join_method", "token"]);
        let s = uri_settings(JoinMethod::BoundKeypair, "other");
        let Err(ResolveError::Conflicts(list)) = resolve(&s, Some(&st), &env()) else {
            panic!("expected conflicts")
        };
        assert_eq!(list[0].field, "token");
        assert!(list[0].to_string().contains("\"dev-1\""), "{}", list[0]);
        // The same values are no conflict.
        let s = uri_settings(JoinMethod::BoundKeypair, "dev-1");
        assert!(resolve(&s, Some(&st), &env()).is_ok());
        // A token-method token is a secret, not stored: a new one is no conflict.
        let st = joined(JoinMethod::Token, None);
        assert!(resolve(&uri_settings(JoinMethod::Token, "new"), Some(&st), &env()).is_ok());
    }

    #[test]
    fn missing_join_fields_come_from_the_stored_state() {
        let mut st = joined(JoinMethod::BoundKeypair, Some("dev-1"));
        let mut s = settings();
        s.join.ca_pin = Some(PIN.parse().unwrap());
        let t = resolve(&s, Some(&st), &env()).unwrap().target.unwrap();
        assert_eq!(t.method, JoinMethod::BoundKeypair);
        assert_eq!(t.token.as_deref(), Some("dev-1"));
        assert_eq!(t.endpoint, Endpoint::new("stored", 1));
        assert!(matches!(t.trust, Trust::Pin(_)));
        // The configured address wins over the stored one.
        s.join.auth_server = Some(Endpoint::new("moved", 2));
        let t = resolve(&s, Some(&st), &env()).unwrap().target.unwrap();
        assert_eq!(t.endpoint, Endpoint::new("moved", 2));
        // A garbage stored CA is reported, not ignored.
        st.join.as_mut().unwrap().server_ca =
            Some("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n".into());
        assert!(matches!(
            resolve(&s, Some(&st), &env()),
            Err(ResolveError::StoredCa(_))
        ));
    }

    #[test]
    fn a_new_directory_without_a_join_uri_has_no_target() {
        let r = resolve(&settings(), None, &env()).unwrap();
        assert_eq!(r.target.unwrap_err(), NoTarget::NeverJoined);
        let mut s = settings();
        s.join.method = Some(JoinMethod::BoundKeypair);
        assert_eq!(
            resolve(&s, None, &env()).unwrap().target.unwrap_err(),
            NoTarget::NoAddress
        );
    }

    #[test]
    fn the_ca_file_wins_over_the_pin() {
        let s = uri_settings(JoinMethod::BoundKeypair, "t");
        let e = Environment {
            ca_file: Some(vec![CertificateDer::from(vec![0x30, 0x00])]),
            ..env()
        };
        let t = resolve(&s, None, &e).unwrap().target.unwrap();
        assert!(matches!(t.trust, Trust::Ca(c) if c.len() == 1));
    }

    #[test]
    fn renewal_interval_is_capped_below_the_ttl() {
        let mut s = settings();
        s.certificate_ttl = Duration::from_secs(10);
        let r = resolve(&s, None, &env()).unwrap();
        assert_eq!(r.renewal_interval, Duration::from_secs(5));
        assert!(r.renewal_interval_capped);
        s.certificate_ttl = Duration::from_secs(3600);
        let r = resolve(&s, None, &env()).unwrap();
        assert_eq!(r.renewal_interval, Duration::from_secs(1200));
        assert!(!r.renewal_interval_capped);
    }

    #[test]
    fn the_ceremony_kind_follows_the_stored_identity() {
        let bk = JoinMethod::BoundKeypair;
        let mut st = State::new(Backend::File);
        assert_eq!(ceremony_kind(bk, &st, 100), CeremonyKind::FirstJoin);
        st.identity = Some(identity(200));
        assert_eq!(ceremony_kind(bk, &st, 100), CeremonyKind::Renewal);
        // Within the margin of expiry: not presented.
        assert_eq!(ceremony_kind(bk, &st, 198), CeremonyKind::Recovery);
        assert_eq!(
            ceremony_kind(JoinMethod::Token, &st, 100),
            CeremonyKind::Renewal
        );
        assert_eq!(
            ceremony_kind(JoinMethod::Token, &st, 300),
            CeremonyKind::FirstJoin
        );
        // A possibly lost result: renew again only with the recorded identity key.
        st.in_flight = Some(InFlight {
            since: 1,
            ceremony: Some(CeremonyKind::Renewal),
            identity_key: None,
        });
        assert_eq!(ceremony_kind(bk, &st, 100), CeremonyKind::Recovery);
        st.in_flight.as_mut().unwrap().identity_key = Some(Secret("pem".into()));
        assert_eq!(ceremony_kind(bk, &st, 100), CeremonyKind::Renewal);
    }

    fn target(method: JoinMethod, token: Option<&str>) -> Target {
        Target {
            method,
            token: token.map(str::to_string),
            endpoint: Endpoint::new("auth", 1),
            trust: Trust::Pin(PIN.parse().unwrap()),
        }
    }

    #[test]
    fn a_first_join_needs_a_secret_or_a_pre_registered_key() {
        let t = target(JoinMethod::BoundKeypair, Some("dev"));
        let mut st = State::new(Backend::File);
        let first = CeremonyKind::FirstJoin;
        assert_eq!(
            plan_attempt(&t, first, &st, None).unwrap_err(),
            PlanError::NoOnboarding
        );
        let p = plan_attempt(&t, first, &st, Some("s3cret")).unwrap();
        assert_eq!(p.registration_secret.as_deref(), Some("s3cret"));
        assert_eq!(p.token.as_deref(), Some("dev"));
        assert!(!p.present_certificate && p.join_state.is_none());
        st.keys.active = Some(KeyRef {
            name: "bound-1".into(),
            public_key: p256::SecretKey::random(&mut rand_core::OsRng).public_key(),
            created_at: 1,
        });
        assert!(plan_attempt(&t, first, &st, None).is_ok());
        let no_name = target(JoinMethod::BoundKeypair, None);
        assert_eq!(
            plan_attempt(&no_name, first, &st, None).unwrap_err(),
            PlanError::NoTokenName
        );
    }

    #[test]
    fn renewals_present_the_certificate_and_the_join_state_but_no_secret() {
        let t = target(JoinMethod::BoundKeypair, Some("dev"));
        let mut st = State::new(Backend::File);
        st.identity = Some(identity(200));
        let p = plan_attempt(&t, CeremonyKind::Renewal, &st, Some("ignored")).unwrap();
        assert_eq!(p.registration_secret, None);
        assert!(p.present_certificate);
        assert_eq!(p.join_state.as_deref(), Some("js"));
        let p = plan_attempt(&t, CeremonyKind::Recovery, &st, None).unwrap();
        assert!(!p.present_certificate);
        assert_eq!(p.join_state.as_deref(), Some("js"));
    }

    #[test]
    fn the_token_method_renews_without_its_token_and_cannot_recover() {
        let mut st = State::new(Backend::File);
        st.identity = Some(identity(200));
        let t = target(JoinMethod::Token, Some("secret"));
        let p = plan_attempt(&t, CeremonyKind::Renewal, &st, None).unwrap();
        assert_eq!(p.token, None);
        let none = target(JoinMethod::Token, None);
        assert_eq!(
            plan_attempt(&none, CeremonyKind::FirstJoin, &st, None).unwrap_err(),
            PlanError::TokenExpired
        );
        st.identity = None;
        assert_eq!(
            plan_attempt(&none, CeremonyKind::FirstJoin, &st, None).unwrap_err(),
            PlanError::NoToken
        );
    }
}
