//! Fuzz target `tools`: see `needlec_fuzz::tools`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| needlec_fuzz::tools(data));
