//! Storage backends and the `--storage` URL that selects one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use boundkey_auth::store::Store;

mod codec;
pub mod crash;
mod query;
pub mod sqlite;

pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StorageUrlError {
    #[error("postgres:// is not supported yet; use sqlite:PATH")]
    PostgresNotSupported,
    #[error("storage URL {0:?} has an empty path (expected sqlite:PATH)")]
    EmptyPath(String),
    #[error("unsupported storage URL {0:?} (expected sqlite:PATH)")]
    Unsupported(String),
}

/// A parsed `--storage` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageUrl {
    Sqlite(PathBuf),
}

impl StorageUrl {
    /// The default: `sqlite:DATA_DIR/boundkey.db`.
    pub fn default_for(data_dir: &Path) -> Self {
        StorageUrl::Sqlite(data_dir.join("boundkey.db"))
    }

    pub fn parse(s: &str) -> Result<Self, StorageUrlError> {
        let lower = s.to_ascii_lowercase();
        if lower.starts_with("postgres:") || lower.starts_with("postgresql:") {
            return Err(StorageUrlError::PostgresNotSupported);
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

    /// Opens the store.
    pub fn open(&self) -> Result<Arc<dyn Store>, OpenStoreError> {
        match self {
            StorageUrl::Sqlite(p) => Ok(Arc::new(SqliteStore::open(p)?)),
        }
    }
}

impl std::fmt::Display for StorageUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageUrl::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenStoreError {
    #[error(transparent)]
    Sqlite(#[from] sqlite::OpenError),
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
        assert_eq!(
            StorageUrl::parse("postgres://u@h/db"),
            Err(StorageUrlError::PostgresNotSupported)
        );
        assert_eq!(
            StorageUrl::parse("postgresql://u@h/db"),
            Err(StorageUrlError::PostgresNotSupported)
        );
        assert!(matches!(
            StorageUrl::parse("sqlite:"),
            Err(StorageUrlError::EmptyPath(_))
        ));
        assert!(matches!(
            StorageUrl::parse("mysql://x"),
            Err(StorageUrlError::Unsupported(_))
        ));
        assert!(StorageUrl::parse("postgres://x")
            .unwrap_err()
            .to_string()
            .contains("postgres:// is not supported yet"));
    }
}
