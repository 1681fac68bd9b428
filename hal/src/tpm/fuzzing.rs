//! Entry point for the `tpm_blob` fuzz target in `fuzz/`: the key file format, as read back from a
//! storage directory that may have been damaged or tampered with.
//! A failed expectation here is a finding: the fuzzer reports it as a crash.
#![allow(clippy::expect_used)]

use super::blob::KeyBlob;

/// Parses a key file; whatever parses must encode to a file that parses to the same key.
pub fn key_blob(data: &[u8]) {
    if let Ok(blob) = KeyBlob::parse(data) {
        let bytes = blob.to_bytes().expect("a parsed key file encodes");
        let again = KeyBlob::parse(&bytes).expect("an encoded key file parses");
        assert_eq!(again.public_key(), blob.public_key());
        assert_eq!(again.parent(), blob.parent());
        assert_eq!(again.to_bytes().expect("encodes again"), bytes);
    }
}
