#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Filled in by the in-memory client/server pair test.
