//! The join URI, as typed by an operator or read from a config file.
//! Properties: no panic; a parsed URI prints to a string that parses to the same URI.
#![no_main]

use boundkey_proto::{CaPin, JoinUri};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(u) = s.parse::<JoinUri>() {
        let printed = u.to_string();
        assert_eq!(printed.parse::<JoinUri>().as_ref(), Ok(&u), "{printed}");
    }
    if let Ok(p) = s.parse::<CaPin>() {
        assert_eq!(p.to_string().parse::<CaPin>().ok(), Some(p));
    }
});
