//! JSON shapes the admin API returns (and `boundkeyctl --format json` prints).
//!
//! Tokens and instances are flattened: the spec's and the status's fields sit side by side at
//! the top level under the model's own serde names (`bound_public_key`, `recovery_count`,
//! `generation`, …), so scripts read `.recovery_count` rather than `.status.recovery_count`.
//! Built generically from the model's serialisation, so a field the model gains shows up here
//! without a code change.

use boundkey_auth::model::{BotInstance, Lock, Token};
use boundkey_auth::UnixTime;
use serde_json::{Map, Value};

fn object(v: impl serde::Serialize) -> Map<String, Value> {
    match serde_json::to_value(v) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

/// A token: `name`, `revision`, `created_at`, then every spec field, then every status field.
/// The registration secret's hash is replaced by `registration_secret_pending` (whether an
/// unused secret exists): even a hash of an admin-chosen secret is not for display.
pub fn token(t: &Token) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), t.name.clone().into());
    m.insert("revision".into(), t.revision.into());
    m.insert("created_at".into(), t.created_at.into());
    m.extend(object(&t.spec));
    let mut status = object(&t.status);
    let pending = status
        .remove("registration_secret_hash")
        .is_some_and(|v| !v.is_null());
    m.extend(status);
    m.insert("registration_secret_pending".into(), pending.into());
    Value::Object(m)
}

pub fn instance_state(i: &BotInstance, now: UnixTime) -> &'static str {
    if i.is_expired(now) {
        "expired"
    } else {
        "active"
    }
}

/// An instance: `instance_id`, `bot_name`, … (spec), `generation`, `expires`, authentications
/// and heartbeats (status), plus `revision` and `state` (`active` | `expired`).
pub fn instance(i: &BotInstance, now: UnixTime) -> Value {
    let mut m = object(&i.spec);
    m.extend(object(&i.status));
    m.insert("revision".into(), i.revision.into());
    m.insert("state".into(), instance_state(i, now).into());
    Value::Object(m)
}

/// A lock as stored, plus `active` (not expired).
pub fn lock(l: &Lock, now: UnixTime) -> Value {
    let mut m = object(l);
    m.insert("active".into(), l.is_active(now).into());
    Value::Object(m)
}
