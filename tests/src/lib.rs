//! The end-to-end tests against the reference implementation's golden vectors live in `tests/`
//! and `benches/` beside this file; this library is empty. Their helpers (fixture paths, golden
//! readers, C harnesses, host tools) are shared with the other crates' tests in
//! `needle-test-support` (`test-support/`).

#![forbid(unsafe_code)]
