//! PostgreSQL implementation of [`Store`]: one database shared by several auth services.
//!
//! The same compare-and-swap semantics as the SQLite store: every revision check is a
//! conditional `UPDATE … WHERE revision = $n` inside the write's transaction. Under READ
//! COMMITTED a concurrent `UPDATE` of the same row waits for the other transaction and then
//! re-checks its `WHERE` against the committed row, so of several ceremonies that read one
//! revision exactly one matches and the rest see zero rows: `Conflict`, and their transaction
//! rolls back. No data is cached between calls (only prepared statements, per connection), so
//! another process's writes are seen at once.
//!
//! The client is the blocking `postgres` crate behind an r2d2 pool: the `Store` trait is
//! synchronous and is called from blocking threads (docs/decisions.md, "PostgreSQL client").

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use boundkey_auth::authority::AuthorityState;
use boundkey_auth::model::{AuditEvent, Bot, BotInstance, Lock, LockTarget, Token, TokenSpec};
use boundkey_auth::store::{
    AuditQuery, BotCounts, Commit, InstanceQuery, InstanceWrite, Store, StoreError, TokenQuery,
};
use boundkey_auth::UnixTime;
use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, GenericClient, Row, Statement};
use r2d2_postgres::PostgresConnectionManager;
use zeroize::Zeroizing;

use super::codec::{
    self, audit_from_row, bot_counts_by_name, bot_counts_from_row, from_json, instance_from_row,
    rev_from_sql, rev_to_sql, to_json, token_from_row,
};
use super::query::{self, Arg, Dialect};

pub mod config;
pub mod tls;

use tls::MakeRustlsConnect;

pub use config::{PostgresUrl, PostgresUrlError, SslMode};

/// Connections kept by default (`--storage-pool-size`).
pub const DEFAULT_POOL_SIZE: u32 = 16;
/// How long a call waits for a free pooled connection (or a new one) before failing.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(10);
/// Key of the advisory lock that serialises migrations between auth services starting at
/// once: "boundkey" in ASCII.
const MIGRATION_LOCK: i64 = 0x626f_756e_646b_6579;

/// Schema migrations, applied in order inside one transaction under [`MIGRATION_LOCK`];
/// `schema_migrations` records each version. Never edit a released entry: append a new one.
/// Version 1 is the SQLite schema as of its third migration (the same tables, columns and
/// indexes), with documents as JSONB.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE bots (
        name        TEXT PRIMARY KEY,
        created_at  BIGINT NOT NULL,
        doc         JSONB NOT NULL
    );
    CREATE TABLE tokens (
        name        TEXT PRIMARY KEY,
        bot_name    TEXT NOT NULL,
        created_at  BIGINT NOT NULL,
        spec        JSONB NOT NULL,
        status      JSONB NOT NULL,
        revision    BIGINT NOT NULL
    );
    CREATE INDEX tokens_bot_page ON tokens(bot_name, name);
    CREATE TABLE instances (
        id          TEXT PRIMARY KEY,
        bot_name    TEXT NOT NULL,
        created_at  BIGINT NOT NULL,
        expires     BIGINT NOT NULL,
        doc         JSONB NOT NULL,
        revision    BIGINT NOT NULL
    );
    CREATE INDEX instances_page ON instances(created_at, id);
    CREATE INDEX instances_bot_page ON instances(bot_name, created_at, id);
    CREATE INDEX instances_expires ON instances(expires);
    CREATE TABLE locks (
        name          TEXT PRIMARY KEY,
        target_kind   TEXT NOT NULL,
        target_value  TEXT NOT NULL,
        doc           JSONB NOT NULL
    );
    CREATE INDEX locks_target ON locks(target_kind, target_value);
    CREATE TABLE audit (
        id          BIGSERIAL PRIMARY KEY,
        time        BIGINT NOT NULL,
        type        TEXT NOT NULL,
        bot_name    TEXT,
        doc         JSONB NOT NULL
    );
    CREATE INDEX audit_type ON audit(type, id);
    CREATE INDEX audit_bot ON audit(bot_name, id);
    CREATE INDEX audit_time ON audit(time);
    CREATE TABLE authority (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        doc         JSONB NOT NULL,
        revision    BIGINT NOT NULL
    );
",
    // 2: `bots ls` and `bots rm` count a bot's instances, and its live ones, by an index-only
    // scan; without it each count read every instance row of the bot for its `expires`
    // (16 s for 100 bots of 10,000 instances).
    "CREATE INDEX instances_bot_expires ON instances(bot_name, expires);",
];

/// Why the PostgreSQL store could not be opened. Always names the database (its URL, which
/// holds no password).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("PostgreSQL store {url}: cannot connect: {source}")]
    Connect {
        url: String,
        #[source]
        source: postgres::Error,
    },
    #[error("PostgreSQL store {url}: {detail}")]
    Config { url: String, detail: String },
    #[error("PostgreSQL store {url}: schema migration {version} failed: {source}")]
    Migration {
        url: String,
        version: usize,
        #[source]
        source: postgres::Error,
    },
    #[error(
        "PostgreSQL store {url} has schema version {found}, newer than this boundkey-authd \
         supports ({supported}); upgrade boundkey-authd"
    )]
    TooNew {
        url: String,
        found: i64,
        supported: i64,
    },
    #[error(transparent)]
    Url(#[from] PostgresUrlError),
}

/// Most statements one connection keeps prepared. The texts come from this module and the query
/// builder, never from input, so there are a few dozen; the cap only bounds a mistake.
const MAX_STATEMENTS: usize = 256;

/// Statements one connection has prepared, by SQL text.
///
/// Without them every `query(&str)` is two round trips, a prepare and then the run, and the
/// server parses and plans the text every time. A statement stays valid for the connection's
/// life (a rollback does not drop it) and goes with the connection when the pool discards it.
#[derive(Default)]
struct Statements(HashMap<String, Statement>);

impl Statements {
    /// `sql` prepared on `c`'s connection, preparing it (one round trip) the first time.
    fn get(&mut self, c: &mut impl GenericClient, sql: &str) -> Result<Statement, postgres::Error> {
        if let Some(st) = self.0.get(sql) {
            return Ok(st.clone());
        }
        let st = c.prepare(sql)?;
        if self.0.len() >= MAX_STATEMENTS {
            self.0.clear();
        }
        self.0.insert(sql.to_string(), st.clone());
        Ok(st)
    }
}

/// A pooled connection and the statements prepared on it.
struct PgConn {
    client: Client,
    statements: Statements,
}

impl PgConn {
    /// The connection itself, outside any transaction.
    fn db(&mut self) -> Db<'_, Client> {
        Db {
            c: &mut self.client,
            st: &mut self.statements,
        }
    }
}

/// A client (the connection or a transaction) with its connection's prepared
/// statements: the same calls as [`GenericClient`], each running a cached statement.
struct Db<'a, C> {
    c: &'a mut C,
    st: &'a mut Statements,
}

type Params<'p> = [&'p (dyn ToSql + Sync)];

impl<C: GenericClient> Db<'_, C> {
    fn query(&mut self, sql: &str, params: &Params<'_>) -> Result<Vec<Row>, postgres::Error> {
        let st = self.st.get(self.c, sql)?;
        self.c.query(&st, params)
    }

    fn query_opt(
        &mut self,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<Option<Row>, postgres::Error> {
        let st = self.st.get(self.c, sql)?;
        self.c.query_opt(&st, params)
    }

    fn query_one(&mut self, sql: &str, params: &Params<'_>) -> Result<Row, postgres::Error> {
        let st = self.st.get(self.c, sql)?;
        self.c.query_one(&st, params)
    }

    fn execute(&mut self, sql: &str, params: &Params<'_>) -> Result<u64, postgres::Error> {
        let st = self.st.get(self.c, sql)?;
        self.c.execute(&st, params)
    }
}

/// The pool's connection manager: r2d2-postgres's, with a statement cache per connection.
struct Manager(PostgresConnectionManager<MakeRustlsConnect>);

impl r2d2::ManageConnection for Manager {
    type Connection = PgConn;
    type Error = postgres::Error;

    fn connect(&self) -> Result<PgConn, postgres::Error> {
        Ok(PgConn {
            client: self.0.connect()?,
            statements: Statements::default(),
        })
    }

    fn is_valid(&self, conn: &mut PgConn) -> Result<(), postgres::Error> {
        self.0.is_valid(&mut conn.client)
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        self.0.has_broken(&mut conn.client)
    }
}
type Pool = r2d2::Pool<Manager>;

/// The PostgreSQL store.
///
/// Invariant: the schema is at [`MIGRATIONS`]' version (checked at open), and every write that
/// depends on a revision runs in one transaction with its check.
pub struct PostgresStore {
    url: PostgresUrl,
    /// `Option` only so that `Drop` can hand it to a plain thread (see there).
    pool: Option<Pool>,
}

/// Options beside the URL.
#[derive(Clone, Default)]
pub struct PostgresOptions {
    pub password: Option<Zeroizing<String>>,
    /// Most connections held at once (0: [`DEFAULT_POOL_SIZE`]).
    pub pool_size: u32,
}

impl std::fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

impl PostgresStore {
    /// Connects, brings the schema up to date, and starts the pool.
    pub fn open(url: &PostgresUrl, opts: &PostgresOptions) -> Result<Self, OpenError> {
        let shown = url.to_string();
        let config = url
            .client_config(opts.password.as_ref().map(|p| p.as_str()))
            .map_err(|detail| OpenError::Config {
                url: shown.clone(),
                detail,
            })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = MakeRustlsConnect::new(url.tls_config(provider)?);
        if url.unverified_tls() {
            tracing::warn!(
                storage = %url,
                sslmode = url.ssl_mode.as_str(),
                "PostgreSQL TLS without sslrootcert: encrypted, but the server is not \
                 authenticated; use sslmode=verify-full with sslrootcert=PATH"
            );
        }
        // One connection first, outside the pool: a wrong password or host fails here at once
        // with the server's own message, rather than after the pool's checkout timeout.
        let mut client = config
            .connect(tls.clone())
            .map_err(|source| OpenError::Connect {
                url: shown.clone(),
                source,
            })?;
        migrate(&mut client, &shown)?;
        drop(client);
        let size = if opts.pool_size == 0 {
            DEFAULT_POOL_SIZE
        } else {
            opts.pool_size
        };
        let pool = r2d2::Pool::builder()
            .max_size(size)
            .min_idle(Some(1))
            .connection_timeout(CHECKOUT_TIMEOUT)
            // A checkout costs no round trip; a broken connection fails its call (a backend
            // error the caller may retry) and is discarded by the pool.
            .test_on_check_out(false)
            .build_unchecked(Manager(PostgresConnectionManager::new(config, tls)));
        Ok(PostgresStore {
            url: url.clone(),
            pool: Some(pool),
        })
    }

    pub fn url(&self) -> &PostgresUrl {
        &self.url
    }

    /// Current schema version (the highest recorded migration).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        let mut c = self.conn()?;
        let row = c
            .db()
            .query_one(
                "SELECT coalesce(max(version), 0)::BIGINT FROM schema_migrations",
                &[],
            )
            .map_err(|e| self.err(e))?;
        Ok(row.get(0))
    }

    fn conn(&self) -> Result<r2d2::PooledConnection<Manager>, StoreError> {
        let pool = self
            .pool
            .as_ref()
            .ok_or_else(|| StoreError::Backend(format!("PostgreSQL {}: closed", self.url)))?;
        pool.get().map_err(|e| {
            StoreError::Backend(format!(
                "PostgreSQL {}: no connection within {CHECKOUT_TIMEOUT:?}: {e}",
                self.url
            ))
        })
    }

    /// A database error as a store error naming the database. Serialization failures and
    /// deadlocks are `Conflict`: the caller's retry is the remedy, as for a revision conflict.
    fn err(&self, e: postgres::Error) -> StoreError {
        match e.code() {
            Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE => {
                StoreError::Conflict(format!("PostgreSQL {}: {e}", self.url))
            }
            Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED => {
                StoreError::Conflict(format!("PostgreSQL {}: {e}", self.url))
            }
            _ => StoreError::Backend(format!("PostgreSQL {}: {e}", self.url)),
        }
    }

    fn map_tx(&self, e: TxError) -> StoreError {
        match e {
            TxError::Store(s) => s,
            TxError::Sql(e) => self.err(e),
        }
    }

    /// Runs a built listing query.
    fn select(&self, q: &query::Query) -> Result<Vec<Row>, StoreError> {
        self.conn()?
            .db()
            .query(q.sql.as_str(), &pg_params(&q.args))
            .map_err(|e| self.err(e))
    }

    /// Every `(name, doc)` row of `table` in name order, decoded. `table` is one of this
    /// module's constants, never input.
    fn list_named_docs<T: serde::de::DeserializeOwned>(
        &self,
        table: &'static str,
        what: &str,
    ) -> Result<Vec<T>, StoreError> {
        let rows = self
            .conn()?
            .db()
            .query(
                &format!("SELECT name, doc::text FROM {table} ORDER BY name"),
                &[],
            )
            .map_err(|e| self.err(e))?;
        rows.iter()
            .map(|r| from_json(&format!("{what} {}", r.get::<_, &str>(0)), r.get(1)))
            .collect()
    }

    /// Runs an `INSERT`; a unique violation is `AlreadyExists(what)`.
    fn insert(
        &self,
        c: &mut Db<'_, impl GenericClient>,
        sql: &str,
        params: &Params<'_>,
        what: impl FnOnce() -> String,
    ) -> Result<(), StoreError> {
        match c.execute(sql, params) {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::AlreadyExists(what())),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Runs a statement that changes rows outside any transaction; returns how many.
    fn execute(&self, sql: &str, params: &Params<'_>) -> Result<u64, StoreError> {
        self.conn()?
            .db()
            .execute(sql, params)
            .map_err(|e| self.err(e))
    }

    /// Runs `f` in one transaction and commits what it did if it returns `Ok`; an error (any
    /// early return) drops the transaction, which rolls back: a failed write writes nothing.
    fn in_transaction<T>(
        &self,
        f: impl FnOnce(&mut Db<'_, postgres::Transaction<'_>>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut c = self.conn()?;
        let PgConn { client, statements } = &mut *c;
        let mut tx = client.transaction().map_err(|e| self.err(e))?;
        let out = f(&mut Db {
            c: &mut tx,
            st: statements,
        })?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Each pooled client owns a small tokio runtime, which must not be dropped on an async
        // thread (authd may drop the last store handle there): drop them on a thread of ours.
        if let Some(pool) = self.pool.take() {
            // Should no thread be available, the failed spawn drops the closure, and the pool
            // with it, right here: better than leaking it.
            let dropper = std::thread::Builder::new().name("pg-pool-drop".into());
            if let Ok(handle) = dropper.spawn(move || drop(pool)) {
                let _ = handle.join();
            }
        }
    }
}

fn migrate(client: &mut postgres::Client, url: &str) -> Result<(), OpenError> {
    let failed = |version: usize| {
        move |source| OpenError::Migration {
            url: url.to_string(),
            version,
            source,
        }
    };
    let supported = MIGRATIONS.len() as i64;
    let mut tx = client.transaction().map_err(failed(0))?;
    // Held until commit: a second auth service starting now waits here, then finds the
    // schema current.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(failed(0))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version     INTEGER PRIMARY KEY,
             applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .map_err(failed(0))?;
    let version: i64 = tx
        .query_one(
            "SELECT coalesce(max(version), 0)::BIGINT FROM schema_migrations",
            &[],
        )
        .map_err(failed(0))?
        .get(0);
    if version > supported {
        return Err(OpenError::TooNew {
            url: url.to_string(),
            found: version,
            supported,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        let v = i + 1;
        tx.batch_execute(sql).map_err(failed(v))?;
        let v32 = i32::try_from(v).unwrap_or(i32::MAX);
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[&v32],
        )
        .map_err(failed(v))?;
        tracing::info!(storage = %url, version = v, "applied schema migration");
    }
    tx.commit().map_err(failed(0))
}

/// A built query's arguments as the client library takes them.
fn pg_params(args: &[Arg]) -> Vec<&(dyn ToSql + Sync)> {
    args.iter()
        .map(|a| match a {
            Arg::Int(i) => i as &(dyn ToSql + Sync),
            Arg::Text(t) => t as &(dyn ToSql + Sync),
        })
        .collect()
}

/// What a helper running inside a transaction fails with.
type TxError = codec::TxError<postgres::Error>;

impl From<postgres::Error> for TxError {
    fn from(e: postgres::Error) -> Self {
        TxError::Sql(e)
    }
}

fn is_unique_violation(e: &postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

const TOKEN_COLS: &str = "name, created_at, spec::text, status::text, revision";

fn token_row(r: &Row) -> Result<Token, StoreError> {
    token_from_row((r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
}

fn instance_row(r: &Row) -> Result<BotInstance, StoreError> {
    instance_from_row((r.get(0), r.get(1), r.get(2)))
}

/// Distinguishes why a CAS on `table`'s row `key` matched nothing.
fn cas_miss(
    c: &mut Db<'_, impl GenericClient>,
    table: &'static str,
    key_col: &'static str,
    key: &str,
    what: &str,
) -> Result<StoreError, postgres::Error> {
    let exists = c
        .query_opt(
            &format!("SELECT 1 FROM {table} WHERE {key_col} = $1"),
            &[&key],
        )?
        .is_some();
    Ok(if exists {
        StoreError::Conflict(format!("{what} {key}"))
    } else {
        StoreError::NotFound(format!("{what} {key}"))
    })
}

fn update_instance_tx(
    c: &mut Db<'_, impl GenericClient>,
    instance: &BotInstance,
    expected_revision: u64,
) -> Result<(), TxError> {
    let id = &instance.spec.instance_id;
    let mut i = instance.clone();
    i.revision = expected_revision + 1;
    let doc = to_json(&i)?;
    let n = c.execute(
        "UPDATE instances SET doc = $1::text::jsonb, expires = $2, bot_name = $3,
             revision = revision + 1
         WHERE id = $4 AND revision = $5",
        &[
            &doc,
            &i.status.expires,
            &i.spec.bot_name,
            id,
            &rev_to_sql(expected_revision)?,
        ],
    )?;
    if n == 0 {
        return Err(cas_miss(c, "instances", "id", id, "bot instance")?.into());
    }
    Ok(())
}

fn read_locks(
    c: &mut Db<'_, impl GenericClient>,
    targets: &[LockTarget],
) -> Result<Vec<Lock>, TxError> {
    let q = query::locks_for(Dialect::Postgres, "name, doc::text", targets);
    let rows = c.query(q.sql.as_str(), &pg_params(&q.args))?;
    let mut locks = Vec::with_capacity(rows.len());
    for r in rows {
        locks.push(from_json(
            &format!("lock {}", r.get::<_, &str>(0)),
            r.get(1),
        )?);
    }
    Ok(locks)
}

fn insert_audit(c: &mut Db<'_, impl GenericClient>, events: &[AuditEvent]) -> Result<(), TxError> {
    for ev in events {
        let doc = to_json(ev)?;
        c.execute(
            "INSERT INTO audit (time, type, bot_name, doc) VALUES ($1, $2, $3, $4::text::jsonb)",
            &[&ev.time, &ev.kind, &ev.bot_name, &doc],
        )?;
    }
    Ok(())
}

impl Store for PostgresStore {
    fn create_bot(&self, bot: &Bot) -> Result<(), StoreError> {
        let doc = to_json(bot)?;
        self.insert(
            &mut self.conn()?.db(),
            "INSERT INTO bots (name, created_at, doc) VALUES ($1, $2, $3::text::jsonb)",
            &[&bot.name, &bot.created_at, &doc],
            || format!("bot {}", bot.name),
        )
    }

    fn get_bot(&self, name: &str) -> Result<Option<Bot>, StoreError> {
        let row = self
            .conn()?
            .db()
            .query_opt("SELECT doc::text FROM bots WHERE name = $1", &[&name])
            .map_err(|e| self.err(e))?;
        row.map(|r| from_json(&format!("bot {name}"), r.get(0)))
            .transpose()
    }

    fn list_bots(&self) -> Result<Vec<Bot>, StoreError> {
        self.list_named_docs("bots", "bot")
    }

    fn delete_bot(&self, name: &str) -> Result<bool, StoreError> {
        self.in_transaction(|db| {
            let n = db
                .execute("DELETE FROM bots WHERE name = $1", &[&name])
                .map_err(|e| self.err(e))?;
            db.execute("DELETE FROM tokens WHERE bot_name = $1", &[&name])
                .map_err(|e| self.err(e))?;
            db.execute("DELETE FROM instances WHERE bot_name = $1", &[&name])
                .map_err(|e| self.err(e))?;
            Ok(n > 0)
        })
    }

    fn create_token(&self, token: &Token) -> Result<(), StoreError> {
        let spec = to_json(&token.spec)?;
        let status = to_json(&token.status)?;
        self.insert(
            &mut self.conn()?.db(),
            "INSERT INTO tokens (name, bot_name, created_at, spec, status, revision)
             VALUES ($1, $2, $3, $4::text::jsonb, $5::text::jsonb, 1)",
            &[
                &token.name,
                &token.spec.bot_name,
                &token.created_at,
                &spec,
                &status,
            ],
            || format!("token {}", token.name),
        )
    }

    fn get_token(&self, name: &str) -> Result<Option<Token>, StoreError> {
        let row = self
            .conn()?
            .db()
            .query_opt(
                &format!("SELECT {TOKEN_COLS} FROM tokens WHERE name = $1"),
                &[&name],
            )
            .map_err(|e| self.err(e))?;
        row.as_ref().map(token_row).transpose()
    }

    fn list_tokens(&self) -> Result<Vec<Token>, StoreError> {
        let rows = self
            .conn()?
            .db()
            .query(
                &format!("SELECT {TOKEN_COLS} FROM tokens ORDER BY name"),
                &[],
            )
            .map_err(|e| self.err(e))?;
        rows.iter().map(token_row).collect()
    }

    fn page_tokens(&self, q: &TokenQuery) -> Result<Vec<Token>, StoreError> {
        let rows = self.select(&query::tokens(Dialect::Postgres, TOKEN_COLS, q))?;
        rows.iter().map(token_row).collect()
    }

    fn update_token_spec(
        &self,
        name: &str,
        spec: &TokenSpec,
        expected_revision: u64,
    ) -> Result<(), StoreError> {
        let doc = to_json(spec)?;
        self.in_transaction(|db| {
            // Only `spec` (and the bot_name column derived from it) is written: a spec edit
            // must never overwrite status a ceremony committed.
            let n = db
                .execute(
                    "UPDATE tokens SET spec = $1::text::jsonb, bot_name = $2,
                         revision = revision + 1
                     WHERE name = $3 AND revision = $4",
                    &[&doc, &spec.bot_name, &name, &rev_to_sql(expected_revision)?],
                )
                .map_err(|e| self.err(e))?;
            if n == 0 {
                return Err(cas_miss(db, "tokens", "name", name, "token").map_err(|e| self.err(e))?);
            }
            Ok(())
        })
    }

    fn delete_token(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.execute("DELETE FROM tokens WHERE name = $1", &[&name])? > 0)
    }

    fn get_instance(&self, id: &str) -> Result<Option<BotInstance>, StoreError> {
        let row = self
            .conn()?
            .db()
            .query_opt(
                "SELECT id, doc::text, revision FROM instances WHERE id = $1",
                &[&id],
            )
            .map_err(|e| self.err(e))?;
        row.as_ref().map(instance_row).transpose()
    }

    fn list_instances(&self, bot: Option<&str>) -> Result<Vec<BotInstance>, StoreError> {
        let rows = self
            .conn()?
            .db()
            .query(
                "SELECT id, doc::text, revision FROM instances
                 WHERE $1::text IS NULL OR bot_name = $1 ORDER BY id",
                &[&bot],
            )
            .map_err(|e| self.err(e))?;
        rows.iter().map(instance_row).collect()
    }

    fn page_instances(&self, q: &InstanceQuery) -> Result<Vec<BotInstance>, StoreError> {
        let rows = self.select(&query::instances(
            Dialect::Postgres,
            "id, doc::text, revision",
            q,
        ))?;
        rows.iter().map(instance_row).collect()
    }

    fn bot_counts(&self, bot: &str, now: UnixTime) -> Result<BotCounts, StoreError> {
        let r = self
            .conn()?
            .db()
            .query_one(
                "SELECT (SELECT count(*) FROM tokens WHERE bot_name = $1),
                     count(*), count(*) FILTER (WHERE expires > $2)
                 FROM instances WHERE bot_name = $1",
                &[&bot, &now],
            )
            .map_err(|e| self.err(e))?;
        Ok(bot_counts_from_row((r.get(0), r.get(1), r.get(2))))
    }

    fn all_bot_counts(&self, now: UnixTime) -> Result<BTreeMap<String, BotCounts>, StoreError> {
        let mut c = self.conn()?;
        let mut db = c.db();
        let tokens = db
            .query(
                "SELECT bot_name, count(*) FROM tokens GROUP BY bot_name",
                &[],
            )
            .map_err(|e| self.err(e))?;
        let instances = db
            .query(
                "SELECT bot_name, count(*), count(*) FILTER (WHERE expires > $1)
                 FROM instances GROUP BY bot_name",
                &[&now],
            )
            .map_err(|e| self.err(e))?;
        Ok(bot_counts_by_name(
            tokens.iter().map(|r| (r.get(0), r.get(1))),
            instances.iter().map(|r| (r.get(0), r.get(1), r.get(2))),
        ))
    }

    fn update_instance(
        &self,
        instance: &BotInstance,
        expected_revision: u64,
    ) -> Result<(), StoreError> {
        self.in_transaction(|db| {
            update_instance_tx(db, instance, expected_revision).map_err(|e| self.map_tx(e))
        })
    }

    /// One transaction for a group of heartbeat writes, as the SQLite store does. A
    /// compare-and-swap that misses is an `UPDATE` of no rows, not a failed statement, so it
    /// neither writes nor aborts the transaction and needs no savepoint: it fails alone. A
    /// database error fails the group.
    fn update_instances(&self, updates: &[(BotInstance, u64)]) -> Vec<Result<(), StoreError>> {
        self.in_transaction(|db| {
            let mut results = Vec::with_capacity(updates.len());
            for (instance, expected_revision) in updates {
                match update_instance_tx(db, instance, *expected_revision) {
                    Ok(()) => results.push(Ok(())),
                    Err(TxError::Store(e)) => results.push(Err(e)),
                    Err(TxError::Sql(e)) => return Err(self.err(e)),
                }
            }
            Ok(results)
        })
        .unwrap_or_else(|e| updates.iter().map(|_| Err(e.clone())).collect())
    }

    fn delete_instance(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.execute("DELETE FROM instances WHERE id = $1", &[&id])? > 0)
    }

    fn purge_instances(&self, cutoff: UnixTime) -> Result<usize, StoreError> {
        let n = self.execute("DELETE FROM instances WHERE expires < $1", &[&cutoff])?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn commit(&self, c: &Commit) -> Result<(), StoreError> {
        self.in_transaction(|db| {
            if let Some(guard) = &c.lock_guard {
                let locks = read_locks(db, &guard.targets).map_err(|e| self.map_tx(e))?;
                if let Some(l) = guard.blocking(&locks) {
                    return Err(StoreError::Locked(l.name.clone()));
                }
            }
            if let Some(tw) = &c.token {
                let status = to_json(&tw.status)?;
                let n = db
                    .execute(
                        "UPDATE tokens SET status = $1::text::jsonb, revision = revision + 1
                         WHERE name = $2 AND revision = $3",
                        &[&status, &tw.name, &rev_to_sql(tw.expected_revision)?],
                    )
                    .map_err(|e| self.err(e))?;
                if n == 0 {
                    return Err(cas_miss(db, "tokens", "name", &tw.name, "token")
                        .map_err(|e| self.err(e))?);
                }
            }
            match &c.instance {
                InstanceWrite::Create(i) => {
                    let mut i = i.clone();
                    i.revision = 1;
                    let doc = to_json(&i)?;
                    self.insert(
                        db,
                        "INSERT INTO instances (id, bot_name, created_at, expires, doc, revision)
                         VALUES ($1, $2, $3, $4, $5::text::jsonb, 1)",
                        &[
                            &i.spec.instance_id,
                            &i.spec.bot_name,
                            &i.spec.created_at,
                            &i.status.expires,
                            &doc,
                        ],
                        || format!("bot instance {}", i.spec.instance_id),
                    )?;
                }
                InstanceWrite::Update {
                    instance,
                    expected_revision,
                } => update_instance_tx(db, instance, *expected_revision)
                    .map_err(|e| self.map_tx(e))?,
            }
            insert_audit(db, &c.audit).map_err(|e| self.map_tx(e))?;
            Ok(())
        })
    }

    fn add_lock(&self, lock: &Lock) -> Result<bool, StoreError> {
        let doc = to_json(lock)?;
        let n = self.execute(
            "INSERT INTO locks (name, target_kind, target_value, doc)
             VALUES ($1, $2, $3, $4::text::jsonb) ON CONFLICT (name) DO NOTHING",
            &[&lock.name, &lock.target.kind(), &lock.target.value(), &doc],
        )?;
        Ok(n == 1)
    }

    fn list_locks(&self) -> Result<Vec<Lock>, StoreError> {
        self.list_named_docs("locks", "lock")
    }

    fn locks_for(&self, targets: &[LockTarget]) -> Result<Vec<Lock>, StoreError> {
        read_locks(&mut self.conn()?.db(), targets).map_err(|e| self.map_tx(e))
    }

    fn get_lock(&self, name: &str) -> Result<Option<Lock>, StoreError> {
        let row = self
            .conn()?
            .db()
            .query_opt("SELECT doc::text FROM locks WHERE name = $1", &[&name])
            .map_err(|e| self.err(e))?;
        row.map(|r| from_json(&format!("lock {name}"), r.get(0)))
            .transpose()
    }

    fn delete_lock(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.execute("DELETE FROM locks WHERE name = $1", &[&name])? > 0)
    }

    fn append_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        insert_audit(&mut self.conn()?.db(), std::slice::from_ref(event))
            .map_err(|e| self.map_tx(e))
    }

    fn list_audit(&self, q: &AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
        let rows = self.select(&query::audit(Dialect::Postgres, "id, doc::text", q))?;
        rows.iter()
            .map(|r| audit_from_row(r.get(0), r.get(1)))
            .collect()
    }

    fn purge_audit(&self, cutoff: UnixTime) -> Result<usize, StoreError> {
        let n = self.execute("DELETE FROM audit WHERE time < $1", &[&cutoff])?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn load_authority(&self) -> Result<Option<(AuthorityState, u64)>, StoreError> {
        let row = self
            .conn()?
            .db()
            .query_opt(
                "SELECT doc::text, revision FROM authority WHERE id = 1",
                &[],
            )
            .map_err(|e| self.err(e))?;
        row.map(|r| Ok((from_json("authority", r.get(0))?, rev_from_sql(r.get(1)))))
            .transpose()
    }

    fn save_authority(
        &self,
        state: &AuthorityState,
        expected_revision: Option<u64>,
    ) -> Result<(), StoreError> {
        let doc = to_json(state)?;
        match expected_revision {
            None => self.insert(
                &mut self.conn()?.db(),
                "INSERT INTO authority (id, doc, revision) VALUES (1, $1::text::jsonb, 1)",
                &[&doc],
                || "authority".into(),
            ),
            Some(rev) => {
                let n = self.execute(
                    "UPDATE authority SET doc = $1::text::jsonb, revision = revision + 1
                     WHERE id = 1 AND revision = $2",
                    &[&doc, &rev_to_sql(rev)?],
                )?;
                if n == 0 {
                    Err(StoreError::Conflict("authority".into()))
                } else {
                    Ok(())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
