//! The TPM key file format (`.tpmkey`): magic, parent, TPM2B public and private areas.
//! Properties: no panic; whatever parses re-encodes to a file that parses to the same key.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    boundkey_hal::tpm::fuzzing::key_blob(data);
});
