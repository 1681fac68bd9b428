//! Storage backends and the `--storage` URL that selects one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use boundkey_auth::store::Store;

mod codec;
pub mod crash;
pub mod postgres;
mod query;
pub mod sqlite;
#[cfg(test)]
mod suite;

pub use postgres::{PostgresOptions, PostgresStore, PostgresUrl};
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StorageUrlError {
    #[error("storage URL {0:?} has an empty path (expected sqlite:PATH)")]
    EmptyPath(String),
    #[error(
        "unsupported storage URL {0:?} (expected sqlite:PATH or postgres://USER@HOST:PORT/DB)"
    )]
    Unsupported(String),
    #[error(transparent)]
    Postgres(#[from] postgres::PostgresUrlError),
}

/// A parsed `--storage` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageUrl {
    Sqlite(PathBuf),
    Postgres(PostgresUrl),
}

impl StorageUrl {
    /// The default: `sqlite:DATA_DIR/boundkey.db`.
    pub fn default_for(data_dir: &Path) -> Self {
        StorageUrl::Sqlite(data_dir.join("boundkey.db"))
    }

    pub fn parse(s: &str) -> Result<Self, StorageUrlError> {
        let lower = s.to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            return Ok(StorageUrl::Postgres(PostgresUrl::parse(s)?));
        }
        let Some(rest) = s.strip_prefix("sqlite:") else {
            return Err(StorageUrlError::Unsupported(s.into()));
        };
        // `sqlite://PATH` is accepted too, since URL habits die hard: `sqlite:///abs` is `/abs`.
        let path = rest.strip_prefix("//").unwrap_or(rest);
        if path.is_empty() {
            return Err(StorageUrlError::EmptyPath(s.into()));
        }
        Ok(StorageUrl::Sqlite(PathBuf::from(path)))
    }

    /// Opens the store. `pg` is for PostgreSQL (password, pool size); a password given for
    /// SQLite is refused rather than ignored.
    pub fn open(&self, pg: &PostgresOptions) -> Result<Arc<dyn Store>, OpenStoreError> {
        match self {
            StorageUrl::Sqlite(_) if pg.password.is_some() => {
                Err(OpenStoreError::PasswordForSqlite)
            }
            StorageUrl::Sqlite(p) => Ok(Arc::new(SqliteStore::open(p)?)),
            StorageUrl::Postgres(u) => Ok(Arc::new(PostgresStore::open(u, pg)?)),
        }
    }
}

impl std::fmt::Display for StorageUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageUrl::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            StorageUrl::Postgres(u) => write!(f, "{u}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenStoreError {
    #[error(transparent)]
    Sqlite(#[from] sqlite::OpenError),
    #[error(transparent)]
    Postgres(#[from] postgres::OpenError),
    #[error(
        "--storage-password-file is for postgres:// storage; the SQLite store takes no password"
    )]
    PasswordForSqlite,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn parses_storage_urls() {
        assert_eq!(
            StorageUrl::parse("sqlite:/var/lib/bk/db.sqlite").unwrap(),
            StorageUrl::Sqlite("/var/lib/bk/db.sqlite".into())
        );
        assert_eq!(
            StorageUrl::parse("sqlite:rel.db").unwrap(),
            StorageUrl::Sqlite("rel.db".into())
        );
        assert_eq!(
            StorageUrl::parse("sqlite:///abs.db").unwrap(),
            StorageUrl::Sqlite("/abs.db".into())
        );
        assert!(matches!(
            StorageUrl::parse("postgres://u@h/db"),
            Ok(StorageUrl::Postgres(_))
        ));
        assert_eq!(
            StorageUrl::parse("postgresql://u@h/db")
                .unwrap()
                .to_string(),
            "postgresql://u@h/db"
        );
        assert_eq!(
            StorageUrl::parse("postgres://u:pw@h/db"),
            Err(StorageUrlError::Postgres(
                postgres::PostgresUrlError::PasswordInUrl
            ))
        );
        assert!(matches!(
            StorageUrl::parse("sqlite:"),
            Err(StorageUrlError::EmptyPath(_))
        ));
        assert!(matches!(
            StorageUrl::parse("mysql://x"),
            Err(StorageUrlError::Unsupported(_))
        ));
        assert!(StorageUrl::parse("postgres:x")
            .unwrap_err()
            .to_string()
            .contains("expected sqlite:PATH or postgres://"));
    }
}
