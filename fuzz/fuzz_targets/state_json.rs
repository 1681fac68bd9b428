//! The agent's `state.json`, as read back from a storage directory.
//! Properties: no panic; a loaded state saves to bytes that load to the same state.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    boundkey::fuzzing::state_json(data);
});
