//! `boundkeyd keypair create` and `boundkeyd status`.

use std::io::Write;

use serde_json::json;

use crate::config::Settings;
use crate::device::Device;
use crate::error::AgentError;
use crate::resolve::usable;
use crate::storage;
use crate::time::{rfc3339, unix_now};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Text,
    Json,
}

fn print(out: &mut dyn Write, s: &str) -> Result<(), AgentError> {
    writeln!(out, "{s}").map_err(AgentError::Stdout)
}

/// Creates the bound key (unless one exists and `overwrite` is false) and prints its public key.
pub(crate) fn keypair_create(
    settings: &Settings,
    overwrite: bool,
    format: Format,
    out: &mut dyn Write,
) -> Result<(), AgentError> {
    let mut device = Device::open(settings)?;
    let key = match (&device.state.keys.active, overwrite) {
        (Some(existing), false) => {
            tracing::info!(key = %existing.name, "a bound key exists; keeping it (use --overwrite to replace it)");
            existing.clone()
        }
        (existing, _) => {
            if existing.is_some() && device.state.identity.is_some() {
                tracing::warn!("replacing the active key of a device that has joined; the auth service still expects the old key, which stays in the key history");
            }
            let k = device.create_key(unix_now())?;
            let mut next = device.state.clone();
            let dropped = next.keys.set_active(k.clone());
            device.save(next)?;
            device.delete_keys(&dropped);
            tracing::info!(key = %k.name, keystore = %device.state.keystore, "created the bound key");
            k
        }
    };
    let ssh = key.ssh_public_key();
    match format {
        Format::Text => print(out, &ssh),
        Format::Json => print(out, &json!({ "public_key": ssh }).to_string()),
    }
}

/// Prints the stored identity. Reads without the lock, so it works while the agent runs.
pub(crate) fn status(
    settings: &Settings,
    format: Format,
    out: &mut dyn Write,
) -> Result<(), AgentError> {
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
                "valid": id.map(|i| usable(i, now)).unwrap_or(false),
                "keystore": state.as_ref().map(|s| s.keystore),
                "kid": active.map(|k| k.kid()),
                "public_key": active.map(|k| k.ssh_public_key()),
                "pending_kid": pending.map(|k| k.kid()),
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
                    let state_word = if usable(i, now) { "valid" } else { "EXPIRED" };
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
                    .map(|k| format!("kid {}", k.kid()))
                    .unwrap_or_else(|| "none".into())
            ));
            if let Some(p) = pending.map(|k| k.kid()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shows_times_past_year_9999_instead_of_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let state = r#"{"version":1,"keystore":"file","identity":{"bot_name":"b","instance_id":"i",
            "generation":1,"join_method":"bound_keypair","not_before":-5,"expires":300000000000,
            "certificate":"","ca_bundle":"","private_key":""}}"#;
        std::fs::write(dir.path().join("state.json"), state).unwrap();
        let settings = Settings::for_tests(dir.path());
        for format in [Format::Text, Format::Json] {
            let mut out = Vec::new();
            status(&settings, format, &mut out).unwrap();
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains("@300000000000"), "{text}");
        }
    }
}
