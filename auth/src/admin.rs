//! Administrative operations that need auth-side rules (secret generation and hashing, spec
//! validation, rotation requests). Listing and deleting are plain [`crate::store::Store`] calls.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use boundkey_proto::claims::RecoveryMode;
use boundkey_proto::{JoinMethod, UnixTime};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};

use crate::model::{
    AttestationMode, AttestationSpec, BoundKeypairSpec, Onboarding, RecoverySpec, Token, TokenSpec,
    TokenStatus,
};

/// Default lifetime of a `token`-method token.
pub const TOKEN_DEFAULT_TTL_SECS: u64 = 3600;
/// Above this, `boundkeyctl` warns.
pub const TOKEN_WARN_TTL_SECS: u64 = 24 * 3600;
/// Above this, creation is refused unless forced.
pub const TOKEN_MAX_TTL_SECS: u64 = 7 * 24 * 3600;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdminError {
    #[error("invalid name {0:?}: use 1-64 characters from [A-Za-z0-9._-], not . or ..")]
    InvalidName(String),
    #[error("invalid initial public key: {0}")]
    InvalidPublicKey(boundkey_proto::keys::KeyError),
    #[error("registration secret must be at least {MIN_SECRET_CHARS} characters (omit it to have a random one generated)")]
    WeakSecret,
    #[error("--initial-public-key and --registration-secret are mutually exclusive")]
    BothOnboardingMethods,
    #[error("token TTL {0}s is above the 7-day maximum (use --force to allow it)")]
    TtlTooLong(u64),
    #[error("max_joins must be at least 1")]
    ZeroJoins,
    #[error("token {0} does not use the bound_keypair join method")]
    NotBoundKeypair(String),
    #[error("attestation mode tpm needs an EK CA bundle (--ek-ca) or at least one allowed EK hash (--ek-allow)")]
    AttestationWithoutTrust,
    #[error("EK hash {0:?} is not 64 hex digits (SHA-256 of the EK's DER SubjectPublicKeyInfo)")]
    BadEkHash(String),
    #[error("{0}")]
    BadEkBundle(String),
}

/// Checks a bot, token or cluster name. Names appear in certificates, URIs and file names: a bot
/// name is a SPIFFE ID path segment (so never `.` or `..`), a cluster name becomes the SPIFFE
/// trust domain in lower case.
pub fn validate_name(name: &str) -> Result<(), AdminError> {
    let ok = name.len() <= 64 && crate::authority::is_spiffe_path_segment(name);
    if ok {
        Ok(())
    } else {
        Err(AdminError::InvalidName(name.into()))
    }
}

/// Shortest registration secret an administrator may choose. Generated secrets are 32 hex
/// digits (128 bits); a chosen one of 16 characters is still out of reach of an online guesser
/// held to the service's throttle.
pub const MIN_SECRET_CHARS: usize = 16;

/// PBKDF2-HMAC-SHA256 rounds for stored registration secrets. The count is stored with each
/// hash, so raising it later leaves existing hashes verifying.
pub const SECRET_HASH_ROUNDS: u32 = 100_000;

/// Tag of a stored registration-secret hash: `pbkdf2-sha256$ROUNDS$SALT$HASH` (base64url).
const SECRET_HASH_SCHEME: &str = "pbkdf2-sha256";

/// SHA-256 hex of a secret. Used as the *name* of a `token`-method token (a lookup key for a
/// 128-bit random secret, so it cannot be salted), and as the legacy form of a stored
/// registration secret.
pub fn hash_secret(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A registration secret as stored: salted and slow (PBKDF2-HMAC-SHA256, a random 16-byte
/// salt), so a leaked database does not give the secrets away to an offline guesser.
pub fn hash_registration_secret(secret: &str) -> String {
    let mut salt = [0u8; 16];
    OsRng.fill_bytes(&mut salt);
    let dk = pbkdf2_sha256(secret, &salt, SECRET_HASH_ROUNDS);
    format!(
        "{SECRET_HASH_SCHEME}${SECRET_HASH_ROUNDS}${}${}",
        URL_SAFE_NO_PAD.encode(salt),
        URL_SAFE_NO_PAD.encode(dk)
    )
}

/// `ring`'s PBKDF2 (already in the tree through rustls): optimised even in debug builds, where
/// a generic implementation would be instantiated unoptimised in this crate.
fn pbkdf2_sha256(secret: &str, salt: &[u8], rounds: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    let rounds = std::num::NonZeroU32::new(rounds).unwrap_or(std::num::NonZeroU32::MIN);
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        rounds,
        salt,
        secret.as_bytes(),
        &mut out,
    );
    out
}

/// Highest round count accepted from a stored hash: a corrupted or hostile row must not make
/// one verification take minutes.
const MAX_SECRET_HASH_ROUNDS: u32 = 10_000_000;

/// Whether `secret` matches a stored registration-secret hash, compared in constant time.
/// Accepts the salted form of [`hash_registration_secret`] and, for tokens created before it,
/// the legacy unsalted SHA-256 hex (still verifying; it is replaced when the secret is used,
/// since a used secret is cleared). Anything else never matches.
pub fn verify_registration_secret(secret: &str, stored: &str) -> bool {
    use subtle::ConstantTimeEq;
    let mut parts = stored.split('$');
    let (Some(scheme), Some(rounds), Some(salt), Some(hash), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        let legacy = stored.len() == 64 && stored.bytes().all(|b| b.is_ascii_hexdigit());
        return legacy && bool::from(hash_secret(secret).as_bytes().ct_eq(stored.as_bytes()));
    };
    let (Ok(rounds), Ok(salt), Ok(hash)) = (
        rounds.parse::<u32>(),
        URL_SAFE_NO_PAD.decode(salt),
        URL_SAFE_NO_PAD.decode(hash),
    ) else {
        return false;
    };
    if scheme != SECRET_HASH_SCHEME || rounds == 0 || rounds > MAX_SECRET_HASH_ROUNDS {
        return false;
    }
    bool::from(pbkdf2_sha256(secret, &salt, rounds).ct_eq(hash.as_slice()))
}

/// Checks and normalises a token's attestation spec: EK hashes become lowercase, the CA bundle
/// must be PEM certificates, and `tpm` needs something to trust. Writing a spec never touches
/// the token's recorded EK (that is status).
pub fn validate_attestation(spec: AttestationSpec) -> Result<AttestationSpec, AdminError> {
    let mut ek_allow = Vec::with_capacity(spec.ek_allow.len());
    for h in spec.ek_allow {
        let h = h.trim().to_ascii_lowercase();
        if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AdminError::BadEkHash(h));
        }
        if !ek_allow.contains(&h) {
            ek_allow.push(h);
        }
    }
    let ek_ca_bundle = spec.ek_ca_bundle.filter(|b| !b.trim().is_empty());
    if let Some(b) = &ek_ca_bundle {
        crate::attestation::ek::parse_bundle(b)
            .map_err(|e| AdminError::BadEkBundle(e.to_string()))?;
    }
    if spec.mode == AttestationMode::Tpm && ek_ca_bundle.is_none() && ek_allow.is_empty() {
        return Err(AdminError::AttestationWithoutTrust);
    }
    Ok(AttestationSpec {
        mode: spec.mode,
        ek_ca_bundle,
        ek_allow,
    })
}

/// 128 random bits as 32 lowercase hex digits: what the server generates when the admin chose
/// nothing. Hex, not base64url, so a secret never starts with `-` and can be passed as a
/// command-line value or put in a URI without escaping.
pub fn random_secret() -> String {
    let mut b = [0u8; 16];
    OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Request to create a bound-keypair token.
#[derive(Debug, Clone, Default)]
pub struct NewBoundKeypairToken {
    /// Token name; generated when None.
    pub name: Option<String>,
    pub bot_name: String,
    pub initial_public_key: Option<String>,
    pub registration_secret: Option<String>,
    pub must_register_before: Option<UnixTime>,
    pub recovery_limit: Option<u32>,
    pub recovery_mode: Option<RecoveryMode>,
    pub expires: Option<UnixTime>,
    /// Key attestation; none when absent.
    pub attestation: Option<AttestationSpec>,
}

/// Builds a bound-keypair token. Returns the token and the registration secret to show once
/// (None when onboarding uses a pre-registered key).
pub fn new_bound_keypair_token(
    req: NewBoundKeypairToken,
    now: UnixTime,
) -> Result<(Token, Option<String>), AdminError> {
    validate_name(&req.bot_name)?;
    let name = match req.name {
        Some(n) => {
            validate_name(&n)?;
            n
        }
        None => format!("bk-{}", &hash_secret(&random_secret())[..16]),
    };
    if req.initial_public_key.is_some() && req.registration_secret.is_some() {
        return Err(AdminError::BothOnboardingMethods);
    }
    let initial_public_key = match req.initial_public_key {
        Some(k) => {
            let pk =
                boundkey_proto::parse_ssh_public_key(&k).map_err(AdminError::InvalidPublicKey)?;
            Some(boundkey_proto::ssh_public_key(&pk))
        }
        None => None,
    };
    let attestation = validate_attestation(req.attestation.unwrap_or_default())?;
    let secret = match (&initial_public_key, req.registration_secret) {
        (Some(_), _) => None,
        (None, Some(s)) if s.chars().count() < MIN_SECRET_CHARS => {
            return Err(AdminError::WeakSecret)
        }
        (None, Some(s)) => Some(s),
        (None, None) => Some(random_secret()),
    };
    let token = Token {
        name,
        spec: TokenSpec {
            bot_name: req.bot_name,
            join_method: JoinMethod::BoundKeypair,
            expires: req.expires,
            bound_keypair: Some(BoundKeypairSpec {
                onboarding: Onboarding {
                    initial_public_key,
                    must_register_before: req.must_register_before,
                },
                recovery: RecoverySpec {
                    limit: req.recovery_limit.unwrap_or(1),
                    mode: req.recovery_mode.unwrap_or_default(),
                },
                rotate_after: None,
                attestation,
            }),
            max_joins: None,
        },
        status: TokenStatus {
            registration_secret_hash: secret.as_deref().map(hash_registration_secret),
            ..TokenStatus::default()
        },
        revision: 0,
        created_at: now,
    };
    Ok((token, secret))
}

/// Builds a `token`-method token. Its name is the hash of the returned secret, which is shown
/// once and never stored.
pub fn new_join_token(
    bot_name: &str,
    max_joins: Option<u32>,
    ttl_secs: Option<u64>,
    force: bool,
    now: UnixTime,
) -> Result<(Token, String), AdminError> {
    validate_name(bot_name)?;
    let ttl = ttl_secs.unwrap_or(TOKEN_DEFAULT_TTL_SECS);
    if ttl > TOKEN_MAX_TTL_SECS && !force {
        return Err(AdminError::TtlTooLong(ttl));
    }
    let max_joins = max_joins.unwrap_or(1);
    if max_joins == 0 {
        return Err(AdminError::ZeroJoins);
    }
    let secret = random_secret();
    let token = Token {
        name: hash_secret(&secret),
        spec: TokenSpec {
            bot_name: bot_name.into(),
            join_method: JoinMethod::Token,
            expires: Some(now.saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX))),
            bound_keypair: None,
            max_joins: Some(max_joins),
        },
        status: TokenStatus::default(),
        revision: 0,
        created_at: now,
    };
    Ok((token, secret))
}

/// Spec change that makes a rotation due at the next join or renewal.
pub fn request_rotation(token: &Token, now: UnixTime) -> Result<TokenSpec, AdminError> {
    let mut spec = token.spec.clone();
    let bk = spec
        .bound_keypair
        .as_mut()
        .ok_or_else(|| AdminError::NotBoundKeypair(token.name.clone()))?;
    // Strictly after the last rotation, or the rule "later than last_rotated_at" would make a
    // request in the same second as a rotation a no-op.
    let after = token.status.last_rotated_at.map_or(now, |l| now.max(l + 1));
    bk.rotate_after = Some(after);
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_keypair_token_secret_is_generated_and_stored_hashed() {
        let (t, secret) = new_bound_keypair_token(
            NewBoundKeypairToken {
                bot_name: "robot".into(),
                ..Default::default()
            },
            100,
        )
        .unwrap();
        let secret = secret.unwrap();
        assert_eq!(secret.len(), 32);
        assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()), "{secret}");
        let stored = t.status.registration_secret_hash.clone().unwrap();
        assert!(verify_registration_secret(&secret, &stored));
        assert!(!verify_registration_secret("not the secret", &stored));
        assert!(!serde_json::to_string(&t).unwrap().contains(&secret));
        assert_eq!(t.spec.bound_keypair.unwrap().recovery.limit, 1);
    }

    #[test]
    fn pre_registered_key_path_has_no_secret_and_rejects_bad_keys() {
        let k = p256::SecretKey::random(&mut OsRng).public_key();
        let req = NewBoundKeypairToken {
            bot_name: "robot".into(),
            initial_public_key: Some(boundkey_proto::ssh_public_key(&k)),
            ..Default::default()
        };
        let (t, secret) = new_bound_keypair_token(req.clone(), 1).unwrap();
        assert!(secret.is_none() && t.status.registration_secret_hash.is_none());
        let bad = NewBoundKeypairToken {
            initial_public_key: Some("ssh-rsa AAAA".into()),
            ..req.clone()
        };
        assert!(matches!(
            new_bound_keypair_token(bad, 1),
            Err(AdminError::InvalidPublicKey(_))
        ));
        let both = NewBoundKeypairToken {
            registration_secret: Some("long enough secret".into()),
            ..req
        };
        assert_eq!(
            new_bound_keypair_token(both, 1).unwrap_err(),
            AdminError::BothOnboardingMethods
        );
    }

    #[test]
    fn registration_secrets_are_salted_slow_hashes_and_legacy_hashes_still_verify() {
        let a = hash_registration_secret("correct horse battery");
        let b = hash_registration_secret("correct horse battery");
        assert_ne!(a, b, "salted: one secret, two hashes");
        assert!(
            a.starts_with(&format!("pbkdf2-sha256${SECRET_HASH_ROUNDS}$")),
            "{a}"
        );
        assert!(verify_registration_secret("correct horse battery", &a));
        assert!(!verify_registration_secret("correct horse batterx", &a));
        // Tokens created before salting stored the bare SHA-256.
        let legacy = hash_secret("correct horse battery");
        assert!(verify_registration_secret("correct horse battery", &legacy));
        assert!(!verify_registration_secret("wrong", &legacy));
        for garbage in [
            "",
            "$",
            "pbkdf2-sha256$0$AA$AA",
            "md5$1$AA$AA",
            "pbkdf2-sha256$99999999999$AA$AA",
        ] {
            assert!(!verify_registration_secret("", garbage), "{garbage}");
        }
    }

    #[test]
    fn chosen_registration_secrets_need_sixteen_characters() {
        let req = |s: &str| NewBoundKeypairToken {
            bot_name: "robot".into(),
            registration_secret: Some(s.into()),
            ..Default::default()
        };
        assert_eq!(
            new_bound_keypair_token(req("fifteen chars!!"), 1).unwrap_err(),
            AdminError::WeakSecret
        );
        assert!(new_bound_keypair_token(req("sixteen chars!!!"), 1).is_ok());
    }

    #[test]
    fn join_token_ttl_rules() {
        let (t, s) = new_join_token("robot", None, None, false, 1000).unwrap();
        assert_eq!(t.name, hash_secret(&s));
        assert_eq!(t.spec.expires, Some(1000 + 3600));
        assert_eq!(t.spec.max_joins, Some(1));
        let week = TOKEN_MAX_TTL_SECS + 1;
        assert_eq!(
            new_join_token("robot", None, Some(week), false, 0).unwrap_err(),
            AdminError::TtlTooLong(week)
        );
        assert!(new_join_token("robot", None, Some(week), true, 0).is_ok());
        assert!(new_join_token("bad name", None, None, false, 0).is_err());
    }

    #[test]
    fn attestation_specs_are_validated_and_normalised() {
        let tpm = |ek_ca_bundle: Option<&str>, ek_allow: Vec<&str>| AttestationSpec {
            mode: AttestationMode::Tpm,
            ek_ca_bundle: ek_ca_bundle.map(str::to_string),
            ek_allow: ek_allow.into_iter().map(str::to_string).collect(),
        };
        assert_eq!(
            validate_attestation(tpm(None, vec![])),
            Err(AdminError::AttestationWithoutTrust)
        );
        assert_eq!(
            validate_attestation(tpm(Some("  \n"), vec![])),
            Err(AdminError::AttestationWithoutTrust),
            "a blank bundle is no bundle"
        );
        let upper = "AB".repeat(32);
        let ok = validate_attestation(tpm(None, vec![&upper, &"ab".repeat(32)])).unwrap();
        assert_eq!(ok.ek_allow, vec!["ab".repeat(32)], "lower case, once");
        for bad in ["ab", &"zz".repeat(32), &"ab".repeat(33)] {
            assert!(matches!(
                validate_attestation(tpm(None, vec![bad])),
                Err(AdminError::BadEkHash(_))
            ));
        }
        assert!(matches!(
            validate_attestation(tpm(Some("not pem"), vec![])),
            Err(AdminError::BadEkBundle(_))
        ));
        // `none` may keep its settings for later.
        let none = AttestationSpec {
            mode: AttestationMode::None,
            ..tpm(None, vec![&upper])
        };
        assert!(validate_attestation(none).is_ok());
        let req = NewBoundKeypairToken {
            bot_name: "robot".into(),
            attestation: Some(tpm(None, vec![])),
            ..Default::default()
        };
        assert_eq!(
            new_bound_keypair_token(req, 0).unwrap_err(),
            AdminError::AttestationWithoutTrust
        );
    }

    #[test]
    fn dot_segments_are_not_names() {
        // A bot name is the last segment of a SPIFFE ID; `.` and `..` are forbidden there.
        for bad in [".", "..", "", "a/b", "a b", &"x".repeat(65)] {
            assert_eq!(
                validate_name(bad),
                Err(AdminError::InvalidName(bad.to_string())),
                "{bad:?}"
            );
        }
        for good in ["...", ".a", "a..b", "robot-1_x.y", &"x".repeat(64)] {
            assert_eq!(validate_name(good), Ok(()), "{good:?}");
        }
        for bad in [".", ".."] {
            let req = NewBoundKeypairToken {
                bot_name: bad.into(),
                ..Default::default()
            };
            assert!(new_bound_keypair_token(req, 0).is_err());
            assert!(new_join_token(bad, None, None, false, 0).is_err());
        }
    }
}
