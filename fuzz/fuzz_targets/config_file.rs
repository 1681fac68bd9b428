//! The agent's TOML configuration file, merged the way `boundkeyd start` merges it.
//! Properties: no panic; a clear error or a configuration.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    boundkey::fuzzing::config_file(data);
});
