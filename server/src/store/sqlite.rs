//! SQLite implementation of [`Store`]: the embedded default.
//!
//! Every compare-and-swap is a conditional `UPDATE … WHERE revision = ?` inside an `IMMEDIATE`
//! transaction, so the semantics hold even if several processes open the same file (SQLite
//! serialises writers; WAL lets readers proceed meanwhile). Documents are stored as JSON next to
//! the columns the queries need, so adding a model field needs no migration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use boundkey_auth::authority::AuthorityState;
use boundkey_auth::model::{AuditEvent, Bot, BotInstance, Lock, LockTarget, Token, TokenSpec};
use boundkey_auth::store::{
    AuditQuery, BotCounts, Commit, InstanceQuery, InstanceWrite, Store, StoreError, TokenQuery,
};
use boundkey_auth::UnixTime;
use rusqlite::config::DbConfig;
use rusqlite::types::ToSqlOutput;
use rusqlite::{
    params, params_from_iter, Connection, ErrorCode, OptionalExtension, ToSql, TransactionBehavior,
};
use serde::de::DeserializeOwned;

use super::codec::{
    self, audit_from_row, bot_counts_by_name, bot_counts_from_row, from_json, instance_from_row,
    rev_from_sql, rev_to_sql, to_json, token_from_row,
};
use super::query::{self, Arg, Dialect};

/// How long a writer waits for another writer (another process, or a long transaction) before
/// giving up with a backend error.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran. Never edit
/// a released entry: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "
    CREATE TABLE bots (
        name        TEXT PRIMARY KEY NOT NULL,
        created_at  INTEGER NOT NULL,
        doc         TEXT NOT NULL
    );
    CREATE TABLE tokens (
        name        TEXT PRIMARY KEY NOT NULL,
        bot_name    TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        spec        TEXT NOT NULL,
        status      TEXT NOT NULL,
        revision    INTEGER NOT NULL
    );
    CREATE INDEX tokens_bot ON tokens(bot_name);
    CREATE TABLE instances (
        id          TEXT PRIMARY KEY NOT NULL,
        bot_name    TEXT NOT NULL,
        expires     INTEGER NOT NULL,
        doc         TEXT NOT NULL,
        revision    INTEGER NOT NULL
    );
    CREATE INDEX instances_bot ON instances(bot_name);
    CREATE INDEX instances_expires ON instances(expires);
    CREATE TABLE locks (
        name        TEXT PRIMARY KEY NOT NULL,
        doc         TEXT NOT NULL
    );
    CREATE TABLE audit (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        time        INTEGER NOT NULL,
        type        TEXT NOT NULL,
        doc         TEXT NOT NULL
    );
    CREATE INDEX audit_type ON audit(type, id);
    CREATE TABLE authority (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        doc         TEXT NOT NULL,
        revision    INTEGER NOT NULL
    );
    ",
    // 2: audit retention deletes by time.
    "CREATE INDEX audit_time ON audit(time);",
    // 3: fleet-sized views. Instances page by (created_at, id), locks are found by target,
    // audit events by bot; the new columns are filled from the documents.
    "
    ALTER TABLE instances ADD COLUMN created_at INTEGER NOT NULL DEFAULT 0;
    UPDATE instances SET created_at = json_extract(doc, '$.spec.created_at');
    DROP INDEX instances_bot;
    CREATE INDEX instances_page ON instances(created_at, id);
    CREATE INDEX instances_bot_page ON instances(bot_name, created_at, id);
    DROP INDEX tokens_bot;
    CREATE INDEX tokens_bot_page ON tokens(bot_name, name);
    ALTER TABLE locks ADD COLUMN target_kind TEXT NOT NULL DEFAULT '';
    ALTER TABLE locks ADD COLUMN target_value TEXT NOT NULL DEFAULT '';
    UPDATE locks SET
        target_kind = CASE
            WHEN json_type(doc, '$.target.bot') IS NOT NULL THEN 'bot'
            WHEN json_type(doc, '$.target.bot_instance_id') IS NOT NULL THEN 'bot_instance_id'
            ELSE 'join_token' END,
        target_value = coalesce(json_extract(doc, '$.target.bot'),
            json_extract(doc, '$.target.bot_instance_id'),
            json_extract(doc, '$.target.join_token'), '');
    CREATE INDEX locks_target ON locks(target_kind, target_value);
    ALTER TABLE audit ADD COLUMN bot_name TEXT;
    UPDATE audit SET bot_name = json_extract(doc, '$.bot_name');
    CREATE INDEX audit_bot ON audit(bot_name, id);
    ",
    // 4: `bots ls` and `bots rm` count a bot's instances, and its live ones, from an index
    // alone; without it each count read every instance row of the bot for its `expires`.
    "CREATE INDEX instances_bot_expires ON instances(bot_name, expires);",
];

/// Why the database could not be opened. Always names the file.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot restrict SQLite database {path} to its owner (mode 0600): {source}")]
    Permissions {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open SQLite database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "{path} is not a usable boundkey SQLite database (corrupt or not a database?): {source}"
    )]
    Corrupt {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{path} failed SQLite's integrity check (the file is damaged): {detail}")]
    Damaged { path: PathBuf, detail: String },
    #[error(
        "{path} has schema version {found}, newer than this boundkey-authd supports ({supported}); \
         upgrade boundkey-authd"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
}

pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
    /// The integrity check of a database too large to check before serving, running on its
    /// own connection; its verdict (`ok`, or what is damaged).
    background_check: Mutex<Option<std::thread::JoinHandle<String>>>,
}

/// Databases up to this size are checked (`PRAGMA quick_check`) before the service starts; the
/// check reads the whole file, which for a fleet of a million devices (several GB) takes
/// minutes, so a larger one is checked in the background while the service runs.
pub const QUICK_CHECK_AT_OPEN_MAX: u64 = 256 * 1024 * 1024;

/// Runs `PRAGMA quick_check` on a read-only connection of its own and logs the verdict: a
/// damaged file is an error an operator must see, but it must not keep a large fleet's service
/// from starting for minutes.
fn spawn_background_check(path: &Path, size: u64) -> std::thread::JoinHandle<String> {
    tracing::info!(path = %path.display(), size, "checking the database's integrity in the background (large file)");
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let verdict =
            Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .and_then(|c| c.query_row("PRAGMA quick_check", [], |r| r.get::<_, String>(0)))
                .unwrap_or_else(|e| e.to_string());
        if verdict == "ok" {
            tracing::info!(path = %path.display(), "database integrity check passed");
        } else {
            tracing::error!(path = %path.display(), detail = %verdict, "the database failed SQLite's integrity check (the file is damaged): stop the service and restore it from a backup");
        }
        verdict
    })
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::ConstraintViolation)
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `path` and brings its schema up to date.
    ///
    /// The file holds the CA private keys, so it and its `-wal`/`-shm` companions are kept
    /// owner-only (0600) wherever `path` points: see [`restrict_files`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, OpenError> {
        Self::open_checking(path, QUICK_CHECK_AT_OPEN_MAX)
    }

    /// [`SqliteStore::open`], checking the file before returning only if it is at most
    /// `check_at_open_max` bytes.
    pub fn open_checking(
        path: impl AsRef<Path>,
        check_at_open_max: u64,
    ) -> Result<Self, OpenError> {
        let path = path.as_ref().to_path_buf();
        restrict_files(&path)?;
        let conn = Connection::open(&path).map_err(|source| OpenError::Open {
            path: path.clone(),
            source,
        })?;
        let corrupt = |source| OpenError::Corrupt {
            path: path.clone(),
            source,
        };
        conn.busy_timeout(BUSY_TIMEOUT).map_err(corrupt)?;
        // The first statement that reads the file is where a non-database or damaged file
        // shows up, so it doubles as the corruption check.
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(corrupt)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), mode, "SQLite WAL mode unavailable");
        }
        // A ceremony's result is sent to the client only after commit; FULL makes that commit
        // survive power loss, or a device could hold a key the server forgot it bound.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(corrupt)?;
        // Plans that never look at bound values. Without this SQLite reads a bound LIMIT (and
        // bound values next to an index) while planning, so each new binding expires the
        // cached statement and every run parses and plans it again (docs/performance.md).
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
            .map_err(corrupt)?;
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let background_check = if size <= check_at_open_max {
            let check: String = conn
                .query_row("PRAGMA quick_check", [], |r| r.get(0))
                .map_err(corrupt)?;
            if check != "ok" {
                return Err(OpenError::Damaged {
                    path: path.clone(),
                    detail: check,
                });
            }
            None
        } else {
            Some(spawn_background_check(&path, size))
        };
        let mut conn = conn;
        migrate(&mut conn, &path)?;
        // The WAL switch above may have just created -wal and -shm; SQLite gives them the
        // database's mode, but a wider pair left over from before is tightened here too.
        restrict_files(&path)?;
        Ok(SqliteStore {
            path,
            conn: Mutex::new(conn),
            background_check: Mutex::new(background_check),
        })
    }

    /// The verdict of a background integrity check (`Some("ok")` when the file is sound), once
    /// it finished; `None` if none ran. Waits for it.
    pub fn wait_background_check(&self) -> Option<String> {
        let handle = self.background_check.lock().ok()?.take()?;
        Some(
            handle
                .join()
                .unwrap_or_else(|_| "the check's thread failed".into()),
        )
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Current schema version (`PRAGMA user_version`).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.conn()?
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    fn conn(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| {
            StoreError::Backend(format!("{}: connection poisoned", self.path.display()))
        })
    }

    fn err(&self, e: rusqlite::Error) -> StoreError {
        StoreError::Backend(format!("{}: {e}", self.path.display()))
    }

    /// Every row of a `(name, doc)` table (bots, locks), decoded, in name order. `table` is
    /// one of this module's constants, never input.
    fn list_named_docs<T: DeserializeOwned>(
        &self,
        table: &'static str,
        what: &str,
    ) -> Result<Vec<T>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare_cached(&format!("SELECT name, doc FROM {table} ORDER BY name"))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| self.err(e))?;
        rows.map(|r| {
            let (name, doc) = r.map_err(|e| self.err(e))?;
            from_json(&format!("{what} {name}"), &doc)
        })
        .collect()
    }
}

/// Mode of the database and its `-wal`/`-shm` files: they hold the CA private keys in clear.
const DB_FILE_MODE: u32 = 0o600;

/// Creates a missing database file with mode 0600 (before SQLite creates it with 0644 less the
/// umask), and tightens an existing database, `-wal` or `-shm` that others could read or write,
/// with a warning. SQLite creates `-wal`/`-shm` with the database's own mode, so a 0600
/// database keeps them 0600 regardless of the umask.
fn restrict_files(db: &Path) -> Result<(), OpenError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    let perm_err = |path: &Path, source: std::io::Error| OpenError::Permissions {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(DB_FILE_MODE)
        .open(db)
    {
        Ok(f) => {
            // The umask may have taken bits off 0600 (e.g. 0277 leaves 0400); set it exactly.
            f.set_permissions(std::fs::Permissions::from_mode(DB_FILE_MODE))
                .map_err(|e| perm_err(db, e))?;
            return Ok(());
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(perm_err(db, e)),
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let file = PathBuf::from(name);
        let meta = match std::fs::metadata(&file) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(perm_err(&file, e)),
        };
        if !meta.is_file() {
            // Not ours to chmod (e.g. a device node); SQLite reports what is wrong with it.
            continue;
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(DB_FILE_MODE))
                .map_err(|e| perm_err(&file, e))?;
            tracing::warn!(
                path = %file.display(),
                mode = format!("{mode:o}"),
                "database file was accessible to others (it holds the CA keys); set mode 0600"
            );
        }
    }
    Ok(())
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), OpenError> {
    let corrupt = |source| OpenError::Corrupt {
        path: path.to_path_buf(),
        source,
    };
    let supported = MIGRATIONS.len() as i64;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(corrupt)?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(corrupt)?;
    if version > supported {
        return Err(OpenError::TooNew {
            path: path.to_path_buf(),
            found: version,
            supported,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        tx.execute_batch(sql).map_err(corrupt)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)
            .map_err(corrupt)?;
        tracing::info!(path = %path.display(), version = i + 1, "applied schema migration");
    }
    tx.commit().map_err(corrupt)
}

fn read_token(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, i64, String, String, i64)> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
    ))
}

const TOKEN_COLS: &str = "name, created_at, spec, status, revision";

/// A bot's tokens, instances, and instances active at `?2` (see `BotInstance::is_expired`).
const BOT_COUNTS_SQL: &str = "SELECT (SELECT count(*) FROM tokens WHERE bot_name = ?1),
     count(*), coalesce(sum(CASE WHEN expires > ?2 THEN 1 ELSE 0 END), 0)
     FROM instances WHERE bot_name = ?1";

impl ToSql for Arg {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        match self {
            Arg::Int(i) => i.to_sql(),
            Arg::Text(t) => t.to_sql(),
        }
    }
}

impl Store for SqliteStore {
    fn create_bot(&self, bot: &Bot) -> Result<(), StoreError> {
        let doc = to_json(bot)?;
        match self.conn()?.execute(
            "INSERT INTO bots (name, created_at, doc) VALUES (?1, ?2, ?3)",
            params![bot.name, bot.created_at, doc],
        ) {
            Ok(_) => Ok(()),
            Err(e) if is_constraint(&e) => {
                Err(StoreError::AlreadyExists(format!("bot {}", bot.name)))
            }
            Err(e) => Err(self.err(e)),
        }
    }

    fn get_bot(&self, name: &str) -> Result<Option<Bot>, StoreError> {
        let doc: Option<String> = self
            .conn()?
            .query_row("SELECT doc FROM bots WHERE name = ?1", [name], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))?;
        doc.map(|d| from_json(&format!("bot {name}"), &d))
            .transpose()
    }

    fn list_bots(&self) -> Result<Vec<Bot>, StoreError> {
        self.list_named_docs("bots", "bot")
    }

    fn delete_bot(&self, name: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let n = tx
            .execute("DELETE FROM bots WHERE name = ?1", [name])
            .map_err(|e| self.err(e))?;
        tx.execute("DELETE FROM tokens WHERE bot_name = ?1", [name])
            .map_err(|e| self.err(e))?;
        tx.execute("DELETE FROM instances WHERE bot_name = ?1", [name])
            .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    fn create_token(&self, token: &Token) -> Result<(), StoreError> {
        let spec = to_json(&token.spec)?;
        let status = to_json(&token.status)?;
        match self.conn()?.execute(
            "INSERT INTO tokens (name, bot_name, created_at, spec, status, revision)
             VALUES (?1, ?2, ?3, ?4, ?5, 1)",
            params![
                token.name,
                token.spec.bot_name,
                token.created_at,
                spec,
                status
            ],
        ) {
            Ok(_) => Ok(()),
            Err(e) if is_constraint(&e) => {
                Err(StoreError::AlreadyExists(format!("token {}", token.name)))
            }
            Err(e) => Err(self.err(e)),
        }
    }

    fn get_token(&self, name: &str) -> Result<Option<Token>, StoreError> {
        let conn = self.conn()?;
        let row = conn
            .prepare_cached(&format!("SELECT {TOKEN_COLS} FROM tokens WHERE name = ?1"))
            .and_then(|mut stmt| stmt.query_row([name], read_token).optional())
            .map_err(|e| self.err(e))?;
        row.map(token_from_row).transpose()
    }

    fn list_tokens(&self) -> Result<Vec<Token>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare(&format!("SELECT {TOKEN_COLS} FROM tokens ORDER BY name"))
            .map_err(|e| self.err(e))?;
        let rows = stmt.query_map([], read_token).map_err(|e| self.err(e))?;
        rows.map(|r| token_from_row(r.map_err(|e| self.err(e))?))
            .collect()
    }

    fn page_tokens(&self, q: &TokenQuery) -> Result<Vec<Token>, StoreError> {
        let query = query::tokens(Dialect::Sqlite, TOKEN_COLS, q);
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(&query.sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params_from_iter(&query.args), read_token)
            .map_err(|e| self.err(e))?;
        rows.map(|r| token_from_row(r.map_err(|e| self.err(e))?))
            .collect()
    }

    fn update_token_spec(
        &self,
        name: &str,
        spec: &TokenSpec,
        expected_revision: u64,
    ) -> Result<(), StoreError> {
        let doc = to_json(spec)?;
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        // Only `spec` (and the bot_name column derived from it) is written: a spec edit must
        // never overwrite status a ceremony committed.
        let n = tx
            .execute(
                "UPDATE tokens SET spec = ?1, bot_name = ?2, revision = revision + 1
                 WHERE name = ?3 AND revision = ?4",
                params![doc, spec.bot_name, name, rev_to_sql(expected_revision)?],
            )
            .map_err(|e| self.err(e))?;
        if n == 0 {
            return Err(token_miss(&tx, name).map_err(|e| self.err(e))?);
        }
        tx.commit().map_err(|e| self.err(e))
    }

    fn delete_token(&self, name: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()?
            .execute("DELETE FROM tokens WHERE name = ?1", [name])
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    fn get_instance(&self, id: &str) -> Result<Option<BotInstance>, StoreError> {
        let conn = self.conn()?;
        let row = conn
            .prepare_cached("SELECT id, doc, revision FROM instances WHERE id = ?1")
            .and_then(|mut stmt| {
                stmt.query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .optional()
            })
            .map_err(|e| self.err(e))?;
        row.map(instance_from_row).transpose()
    }

    fn list_instances(&self, bot: Option<&str>) -> Result<Vec<BotInstance>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare(
                "SELECT id, doc, revision FROM instances
                 WHERE ?1 IS NULL OR bot_name = ?1 ORDER BY id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([bot], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(|e| self.err(e))?;
        rows.map(|r| instance_from_row(r.map_err(|e| self.err(e))?))
            .collect()
    }

    fn page_instances(&self, q: &InstanceQuery) -> Result<Vec<BotInstance>, StoreError> {
        let query = query::instances(Dialect::Sqlite, "id, doc, revision", q);
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(&query.sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params_from_iter(&query.args), |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(|e| self.err(e))?;
        rows.map(|r| instance_from_row(r.map_err(|e| self.err(e))?))
            .collect()
    }

    fn bot_counts(&self, bot: &str, now: UnixTime) -> Result<BotCounts, StoreError> {
        let counts: (i64, i64, i64) = self
            .conn()?
            .query_row(BOT_COUNTS_SQL, params![bot, now], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(|e| self.err(e))?;
        Ok(bot_counts_from_row(counts))
    }

    fn all_bot_counts(&self, now: UnixTime) -> Result<BTreeMap<String, BotCounts>, StoreError> {
        let conn = self.conn()?;
        let tokens = conn
            .prepare_cached("SELECT bot_name, count(*) FROM tokens GROUP BY bot_name")
            .and_then(|mut st| {
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(|e| self.err(e))?;
        let instances = conn
            .prepare_cached(
                "SELECT bot_name, count(*), coalesce(sum(CASE WHEN expires > ?1 THEN 1 ELSE 0 END), 0)
                 FROM instances GROUP BY bot_name",
            )
            .and_then(|mut st| {
                st.query_map([now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(|e| self.err(e))?;
        Ok(bot_counts_by_name(tokens, instances))
    }

    fn update_instance(
        &self,
        instance: &BotInstance,
        expected_revision: u64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        update_instance_tx(&tx, instance, expected_revision).map_err(|e| self.map_tx(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    /// One IMMEDIATE transaction, so one sync to disk, for the whole group. A compare-and-swap
    /// that misses changes nothing, so it needs no savepoint; a database error fails the group.
    fn update_instances(&self, updates: &[(BotInstance, u64)]) -> Vec<Result<(), StoreError>> {
        let all = |e: StoreError| updates.iter().map(|_| Err(e.clone())).collect();
        let mut conn = match self.conn() {
            Ok(c) => c,
            Err(e) => return all(e),
        };
        let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => return all(self.err(e)),
        };
        let mut results = Vec::with_capacity(updates.len());
        for (instance, expected_revision) in updates {
            match update_instance_tx(&tx, instance, *expected_revision) {
                Ok(()) => results.push(Ok(())),
                Err(TxError::Store(e)) => results.push(Err(e)),
                Err(TxError::Sql(e)) => return all(self.err(e)),
            }
        }
        match tx.commit() {
            Ok(()) => results,
            Err(e) => all(self.err(e)),
        }
    }

    fn delete_instance(&self, id: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()?
            .execute("DELETE FROM instances WHERE id = ?1", [id])
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    fn purge_instances(&self, cutoff: UnixTime) -> Result<usize, StoreError> {
        self.conn()?
            .execute("DELETE FROM instances WHERE expires < ?1", [cutoff])
            .map_err(|e| self.err(e))
    }

    fn commit(&self, c: &Commit) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        // IMMEDIATE takes the write lock up front, so the revision checks below and the writes
        // that depend on them cannot interleave with another writer. Any early return drops
        // `tx`, which rolls back: a failed commit writes nothing.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        // Locks are read under the write lock too: one added while the ceremony ran (after its
        // snapshot) stops the commit, and none can be added between this check and the writes.
        if let Some(guard) = &c.lock_guard {
            let locks = read_locks(&tx, &guard.targets).map_err(|e| self.map_tx(e))?;
            if let Some(l) = guard.blocking(&locks) {
                return Err(StoreError::Locked(l.name.clone()));
            }
        }
        if let Some(tw) = &c.token {
            let status = to_json(&tw.status)?;
            let expected = rev_to_sql(tw.expected_revision)?;
            let n = tx
                .prepare_cached(
                    "UPDATE tokens SET status = ?1, revision = revision + 1
                     WHERE name = ?2 AND revision = ?3",
                )
                .and_then(|mut stmt| stmt.execute(params![status, tw.name, expected]))
                .map_err(|e| self.err(e))?;
            if n == 0 {
                return Err(token_miss(&tx, &tw.name).map_err(|e| self.err(e))?);
            }
        }
        match &c.instance {
            InstanceWrite::Create(i) => {
                let mut i = i.clone();
                i.revision = 1;
                let doc = to_json(&i)?;
                match tx.execute(
                    "INSERT INTO instances (id, bot_name, created_at, expires, doc, revision)
                     VALUES (?1, ?2, ?3, ?4, ?5, 1)",
                    params![
                        i.spec.instance_id,
                        i.spec.bot_name,
                        i.spec.created_at,
                        i.status.expires,
                        doc
                    ],
                ) {
                    Ok(_) => {}
                    Err(e) if is_constraint(&e) => {
                        return Err(StoreError::AlreadyExists(format!(
                            "bot instance {}",
                            i.spec.instance_id
                        )))
                    }
                    Err(e) => return Err(self.err(e)),
                }
            }
            InstanceWrite::Update {
                instance,
                expected_revision,
            } => {
                update_instance_tx(&tx, instance, *expected_revision).map_err(|e| self.map_tx(e))?
            }
        }
        insert_audit(&tx, &c.audit).map_err(|e| self.map_tx(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    fn add_lock(&self, lock: &Lock) -> Result<bool, StoreError> {
        let doc = to_json(lock)?;
        let n = self
            .conn()?
            .execute(
                "INSERT INTO locks (name, target_kind, target_value, doc) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO NOTHING",
                params![lock.name, lock.target.kind(), lock.target.value(), doc],
            )
            .map_err(|e| self.err(e))?;
        Ok(n == 1)
    }

    fn list_locks(&self) -> Result<Vec<Lock>, StoreError> {
        self.list_named_docs("locks", "lock")
    }

    fn locks_for(&self, targets: &[LockTarget]) -> Result<Vec<Lock>, StoreError> {
        let conn = self.conn()?;
        read_locks(&conn, targets).map_err(|e| self.map_tx(e))
    }

    fn get_lock(&self, name: &str) -> Result<Option<Lock>, StoreError> {
        let doc: Option<String> = self
            .conn()?
            .query_row("SELECT doc FROM locks WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.err(e))?;
        doc.map(|d| from_json(&format!("lock {name}"), &d))
            .transpose()
    }

    fn delete_lock(&self, name: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()?
            .execute("DELETE FROM locks WHERE name = ?1", [name])
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    fn append_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        let conn = self.conn()?;
        insert_audit(&conn, std::slice::from_ref(event)).map_err(|e| self.map_tx(e))
    }

    fn list_audit(&self, q: &AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
        let query = query::audit(Dialect::Sqlite, "id, doc", q);
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(&query.sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params_from_iter(&query.args), |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(|e| self.err(e))?;
        rows.map(|r| {
            let (id, doc) = r.map_err(|e| self.err(e))?;
            audit_from_row(id, &doc)
        })
        .collect()
    }

    fn purge_audit(&self, cutoff: UnixTime) -> Result<usize, StoreError> {
        self.conn()?
            .execute("DELETE FROM audit WHERE time < ?1", [cutoff])
            .map_err(|e| self.err(e))
    }

    fn load_authority(&self) -> Result<Option<(AuthorityState, u64)>, StoreError> {
        let row: Option<(String, i64)> = self
            .conn()?
            .query_row(
                "SELECT doc, revision FROM authority WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        row.map(|(doc, rev)| Ok((from_json("authority", &doc)?, rev_from_sql(rev))))
            .transpose()
    }

    fn save_authority(
        &self,
        state: &AuthorityState,
        expected_revision: Option<u64>,
    ) -> Result<(), StoreError> {
        let doc = to_json(state)?;
        let conn = self.conn()?;
        match expected_revision {
            None => match conn.execute(
                "INSERT INTO authority (id, doc, revision) VALUES (1, ?1, 1)",
                [doc],
            ) {
                Ok(_) => Ok(()),
                Err(e) if is_constraint(&e) => Err(StoreError::AlreadyExists("authority".into())),
                Err(e) => Err(self.err(e)),
            },
            Some(rev) => {
                let n = conn
                    .execute(
                        "UPDATE authority SET doc = ?1, revision = revision + 1
                         WHERE id = 1 AND revision = ?2",
                        params![doc, rev_to_sql(rev)?],
                    )
                    .map_err(|e| self.err(e))?;
                if n == 0 {
                    Err(StoreError::Conflict("authority".into()))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// What a helper running inside a transaction fails with.
type TxError = codec::TxError<rusqlite::Error>;

impl From<rusqlite::Error> for TxError {
    fn from(e: rusqlite::Error) -> Self {
        TxError::Sql(e)
    }
}

impl SqliteStore {
    fn map_tx(&self, e: TxError) -> StoreError {
        match e {
            TxError::Store(s) => s,
            TxError::Sql(e) => self.err(e),
        }
    }
}

/// Distinguishes why a token CAS matched no row.
fn token_miss(conn: &Connection, name: &str) -> rusqlite::Result<StoreError> {
    let exists: Option<i64> = conn
        .query_row("SELECT 1 FROM tokens WHERE name = ?1", [name], |r| r.get(0))
        .optional()?;
    Ok(match exists {
        Some(_) => StoreError::Conflict(format!("token {name}")),
        None => StoreError::NotFound(format!("token {name}")),
    })
}

fn update_instance_tx(
    conn: &Connection,
    instance: &BotInstance,
    expected_revision: u64,
) -> Result<(), TxError> {
    let id = &instance.spec.instance_id;
    let mut i = instance.clone();
    i.revision = expected_revision + 1;
    let doc = to_json(&i)?;
    let n = conn
        .prepare_cached(
            "UPDATE instances SET doc = ?1, expires = ?2, bot_name = ?3, revision = revision + 1
         WHERE id = ?4 AND revision = ?5",
        )?
        .execute(params![
            doc,
            i.status.expires,
            i.spec.bot_name,
            id,
            rev_to_sql(expected_revision)?
        ])?;
    if n == 0 {
        let exists: Option<i64> = conn
            .query_row("SELECT 1 FROM instances WHERE id = ?1", [id], |r| r.get(0))
            .optional()?;
        return Err(match exists {
            Some(_) => StoreError::Conflict(format!("bot instance {id}")),
            None => StoreError::NotFound(format!("bot instance {id}")),
        }
        .into());
    }
    Ok(())
}

fn read_locks(conn: &Connection, targets: &[LockTarget]) -> Result<Vec<Lock>, TxError> {
    let query = query::locks_for(Dialect::Sqlite, "name, doc", targets);
    let mut stmt = conn.prepare_cached(&query.sql)?;
    let rows = stmt.query_map(params_from_iter(&query.args), |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    let mut locks = Vec::new();
    for row in rows {
        let (name, doc) = row?;
        locks.push(from_json(&format!("lock {name}"), &doc)?);
    }
    Ok(locks)
}

fn insert_audit(conn: &Connection, events: &[AuditEvent]) -> Result<(), TxError> {
    let mut stmt = conn
        .prepare_cached("INSERT INTO audit (time, type, bot_name, doc) VALUES (?1, ?2, ?3, ?4)")?;
    for ev in events {
        let doc = to_json(ev)?;
        stmt.execute(params![ev.time, ev.kind, ev.bot_name, doc])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
