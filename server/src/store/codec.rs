//! Row ⇄ model conversions shared by the SQL stores: documents travel as JSON text, revisions
//! and ids as SQL's signed 64-bit integers. Every decoding error names the row it came from.

use boundkey_auth::model::{AuditEvent, BotInstance, Token, TokenSpec, TokenStatus};
use boundkey_auth::store::{BotCounts, StoreError};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub(crate) fn to_json<T: Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Backend(format!("encoding: {e}")))
}

pub(crate) fn from_json<T: DeserializeOwned>(what: &str, s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s)
        .map_err(|e| StoreError::Backend(format!("stored {what} is corrupt: {e}")))
}

pub(crate) fn rev_to_sql(rev: u64) -> Result<i64, StoreError> {
    i64::try_from(rev).map_err(|_| StoreError::Backend(format!("revision {rev} out of range")))
}

pub(crate) fn rev_from_sql(rev: i64) -> u64 {
    // Revisions are written by this code starting at 1 and only ever incremented.
    u64::try_from(rev).unwrap_or(0)
}

pub(crate) fn token_from_row(
    (name, created_at, spec, status, revision): (String, i64, String, String, i64),
) -> Result<Token, StoreError> {
    Ok(Token {
        spec: from_json::<TokenSpec>(&format!("token {name} spec"), &spec)?,
        status: from_json::<TokenStatus>(&format!("token {name} status"), &status)?,
        name,
        revision: rev_from_sql(revision),
        created_at,
    })
}

pub(crate) fn instance_from_row(
    (id, doc, revision): (String, String, i64),
) -> Result<BotInstance, StoreError> {
    let mut i: BotInstance = from_json(&format!("bot instance {id}"), &doc)?;
    i.revision = rev_from_sql(revision);
    Ok(i)
}

pub(crate) fn audit_from_row(id: i64, doc: &str) -> Result<AuditEvent, StoreError> {
    let mut ev: AuditEvent = from_json(&format!("audit event {id}"), doc)?;
    ev.id = rev_from_sql(id);
    Ok(ev)
}

/// `(tokens, instances, active instances)` as counted by SQL.
pub(crate) fn bot_counts_from_row((tokens, instances, active): (i64, i64, i64)) -> BotCounts {
    let n = |v: i64| usize::try_from(v).unwrap_or(0);
    BotCounts {
        tokens: n(tokens),
        instances: n(instances),
        active_instances: n(active),
    }
}

/// Per-bot counts from the two grouped queries' rows: `(bot, tokens)` and
/// `(bot, instances, active instances)`.
pub(crate) fn bot_counts_by_name(
    tokens: impl IntoIterator<Item = (String, i64)>,
    instances: impl IntoIterator<Item = (String, i64, i64)>,
) -> std::collections::BTreeMap<String, BotCounts> {
    let mut rows: std::collections::BTreeMap<String, (i64, i64, i64)> = Default::default();
    for (bot, n) in tokens {
        rows.entry(bot).or_default().0 = n;
    }
    for (bot, n, active) in instances {
        let r = rows.entry(bot).or_default();
        (r.1, r.2) = (n, active);
    }
    rows.into_iter()
        .map(|(bot, r)| (bot, bot_counts_from_row(r)))
        .collect()
}

/// Errors from helpers that run inside a transaction: a store-level outcome (conflict, not
/// found) or a database error `E`, still to be tagged with the database's name.
pub(crate) enum TxError<E> {
    Store(StoreError),
    Sql(E),
}

impl<E> From<StoreError> for TxError<E> {
    fn from(e: StoreError) -> Self {
        TxError::Store(e)
    }
}
