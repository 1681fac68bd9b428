//! What can be wrong with a configuration, and how two sources that disagree are reported.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("cannot read config file {}: {detail}", path.display())]
    Read { path: PathBuf, detail: String },
    #[error("config file {}: {detail}", path.display())]
    Parse { path: PathBuf, detail: String },
    #[error("invalid join URI ({source_name}): {detail}")]
    Uri {
        source_name: &'static str,
        detail: String,
    },
    #[error("{}", Conflicts(.0))]
    Conflicts(Vec<Conflict>),
    #[error("invalid {what}: {detail}")]
    Invalid { what: String, detail: String },
    #[error("{what} is required ({hint})")]
    Missing {
        what: &'static str,
        hint: &'static str,
    },
    #[error("registration {0}")]
    Secret(#[from] boundkey_fs::SecretFileError),
}

/// One field set differently by two sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Conflict {
    pub(crate) field: &'static str,
    pub(crate) a: (String, Option<String>),
    pub(crate) b: (String, Option<String>),
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.a.1, &self.b.1) {
            (Some(x), Some(y)) => write!(
                f,
                "{}: {} says {x:?} but {} says {y:?}",
                self.field, self.a.0, self.b.0
            ),
            // Secrets: name the sources only.
            _ => write!(f, "{}: {} and {} disagree", self.field, self.a.0, self.b.0),
        }
    }
}

struct Conflicts<'a>(&'a [Conflict]);

impl fmt::Display for Conflicts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conflicting configuration ({}): ", self.0.len())?;
        for (i, c) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{c}")?;
        }
        f.write_str(" (make each pair agree or remove one side)")
    }
}
