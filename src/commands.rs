//! `boundkeyd keypair create` and `boundkeyd status`.

use std::io::Write;

use serde_json::json;

use crate::agent::{self, rfc3339, unix_now};
use crate::config::Settings;
use crate::error::AgentError;
use crate::storage::{self, State, Storage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

fn print(out: &mut dyn Write, s: &str) -> Result<(), AgentError> {
    writeln!(out, "{s}").map_err(|e| AgentError::Usage(format!("cannot write to stdout: {e}")))
}

/// Creates the bound key (unless one exists and `overwrite` is false) and prints its public key.
pub fn keypair_create(
    settings: &Settings,
    overwrite: bool,
    format: Format,
    out: &mut dyn Write,
) -> Result<(), AgentError> {
    let storage = Storage::open_locked(&settings.storage)?;
    let loaded = storage.load()?;
    let backend = agent::resolve_backend(settings.keystore, loaded.as_ref(), storage.dir())?;
    let mut state = loaded.unwrap_or_else(|| State::new(backend));
    let key = match (&state.keys.active, overwrite) {
        (Some(existing), false) => {
            tracing::info!(key = %existing.name, "a bound key exists; keeping it (use --overwrite to replace it)");
            existing.clone()
        }
        (existing, _) => {
            if existing.is_some() && state.identity.is_some() {
                tracing::warn!("replacing the active key of a device that has joined; the auth service still expects the old key, which stays in the key history");
            }
            let mut store = agent::open_keystore(backend, &storage, settings)?;
            let k = agent::create_key(store.as_mut(), unix_now())?;
            let mut next = state.clone();
            let dropped = next.keys.set_active(k.clone());
            storage.save(&next)?;
            state = next;
            for d in dropped {
                if let Ok(n) = boundkey_hal::KeyName::new(&d.name) {
                    let _ = store.delete(&n);
                }
            }
            tracing::info!(key = %k.name, keystore = %state.keystore, "created the bound key");
            k
        }
    };
    match format {
        Format::Text => print(out, &key.public_key),
        Format::Json => print(out, &json!({ "public_key": key.public_key }).to_string()),
    }
}

/// Prints the stored identity. Reads without the lock, so it works while the agent runs.
pub fn status(settings: &Settings, format: Format, out: &mut dyn Write) -> Result<(), AgentError> {
    let dir = &settings.storage;
    if !dir.is_dir() {
        return Err(AgentError::Usage(format!(
            "storage directory {} does not exist (nothing has been set up there yet)",
            dir.display()
        )));
    }
    let state = storage::read_state(dir)?;
    let now = unix_now();
    let id = state.as_ref().and_then(|s| s.identity.as_ref());
    let active = state.as_ref().and_then(|s| s.keys.active.as_ref());
    let pending = state.as_ref().and_then(|s| s.keys.pending.as_ref());
    let join = state.as_ref().and_then(|s| s.join.as_ref());
    match format {
        Format::Json => {
            let v = json!({
                "bot_name": id.map(|i| i.bot_name.clone()),
                "instance_id": id.map(|i| i.instance_id.clone()),
                "generation": id.map(|i| i.generation),
                "expires": id.map(|i| rfc3339(i.expires)),
                "expires_unix": id.map(|i| i.expires),
                "not_before": id.map(|i| rfc3339(i.not_before)),
                "valid": id.map(|i| agent::usable(i, now)).unwrap_or(false),
                "keystore": state.as_ref().map(|s| s.keystore.clone()),
                "kid": active.and_then(|k| k.kid()),
                "public_key": active.map(|k| k.public_key.clone()),
                "pending_kid": pending.and_then(|k| k.kid()),
                "key_history": state.as_ref().map(|s| s.keys.history.len()).unwrap_or(0),
                "join_method": join.map(|j| j.method.as_str()),
                "token": join.and_then(|j| j.token.clone()),
                "auth_server": join.map(|j| j.auth_server.clone()),
                "interrupted_ceremony": state.as_ref().is_some_and(|s| s.in_flight.is_some()),
            });
            print(out, &v.to_string())
        }
        Format::Text => {
            let Some(state) = &state else {
                return print(out, "not set up: no key and no identity yet (run boundkeyd keypair create or boundkeyd start)");
            };
            let mut lines = Vec::new();
            match id {
                Some(i) => {
                    lines.push(format!("bot:          {}", i.bot_name));
                    lines.push(format!("instance:     {}", i.instance_id));
                    lines.push(format!("generation:   {}", i.generation));
                    let state_word = if agent::usable(i, now) {
                        "valid"
                    } else {
                        "EXPIRED"
                    };
                    lines.push(format!(
                        "certificate:  {state_word}, {} .. {}",
                        rfc3339(i.not_before),
                        rfc3339(i.expires)
                    ));
                }
                None => lines.push("identity:     none (not joined yet)".into()),
            }
            lines.push(format!("key store:    {}", state.keystore));
            lines.push(format!(
                "bound key:    {}",
                active
                    .and_then(|k| k.kid())
                    .map(|k| format!("kid {k}"))
                    .unwrap_or_else(|| "none".into())
            ));
            if let Some(p) = pending.and_then(|k| k.kid()) {
                lines.push(format!(
                    "pending key:  kid {p} (rotation not yet confirmed)"
                ));
            }
            if let Some(j) = join {
                lines.push(format!(
                    "auth server:  {} ({}{})",
                    j.auth_server,
                    j.method,
                    j.token
                        .as_ref()
                        .map(|t| format!(", token {t}"))
                        .unwrap_or_default()
                ));
            }
            if state.in_flight.is_some() {
                lines.push(
                    "note:         the last ceremony was interrupted; the next run recovers".into(),
                );
            }
            print(out, &lines.join("\n"))
        }
    }
}
