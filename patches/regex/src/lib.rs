//! `regex-lite` re-exported as `regex`.
//!
//! The only user of `regex` in the agent is tss-esapi 7.6, which splits TCTI configuration
//! strings (`swtpm:host=127.0.0.1,port=2321`) with a handful of ASCII patterns through
//! `Regex::new`, `is_match`, `captures`, `Captures::get` and `Match::as_str`. regex-lite, by the
//! regex authors, has the same API and syntax for those patterns without Unicode tables or the
//! several matching engines that cost the full crate about 700 KB of the agent's binary. A crate
//! that needs more of regex's API than regex-lite has fails to compile here, not at run time.
#![forbid(unsafe_code)]

pub use regex_lite::*;
