//! Entry points for the fuzz targets in `fuzz/`: the agent's parsers of files a device's disk
//! holds. Built only with the `fuzzing` feature; the shipped agent has no such surface.
//! A failed expectation here is a finding: the fuzzer reports it as a crash.
#![allow(clippy::expect_used)]

use std::path::Path;

use crate::config::{self, ConfigError, FileConfig, Flags};
use crate::storage;

/// Parses a config file and merges it as `boundkeyd start` would (secret files are absent).
pub fn config_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    let Ok(file) = FileConfig::parse(path, text) else {
        return;
    };
    let flags = Flags {
        storage: Some("/storage".into()),
        ..Flags::default()
    };
    let no_files = |p: &Path| -> Result<_, ConfigError> {
        Err(ConfigError::Secret(boundkey_fs::SecretFileError {
            path: p.to_path_buf(),
            detail: "no such file".into(),
        }))
    };
    if let Err(e) = config::merge(Some((path, &file)), &flags, None, &no_files) {
        // Every error is one line for a person.
        assert!(!e.to_string().contains('\n'), "{e}");
    }
}

/// Loads a `state.json`; whatever loads must save and load back to the same state.
pub fn state_json(data: &[u8]) {
    let path = Path::new("state.json");
    if let Ok(state) = storage::parse_state(path, data) {
        let saved = storage::to_bytes(&state).expect("a loaded state serialises");
        let again = storage::parse_state(path, &saved).expect("a saved state loads");
        assert_eq!(again, state);
    }
}
